//! Kubernetes node authentication: the node daemon sends its pod-bound ServiceAccount token; a
//! TokenReview proves it, the user must be the node DaemonSet's ServiceAccount, and the pod the
//! token is bound to must be scheduled on the node the daemon claims to be. The token must be
//! issued for [`AUDIENCE`] (the DaemonSet's projected token says so): a token made for the API
//! server, or for anything else the pod talks to, is no credential here, so whoever receives
//! one cannot replay it to the controller.

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};

/// The audience node tokens are issued for (`serviceAccountToken.audience` in the DaemonSet).
pub const AUDIENCE: &str = "mesh-control";

/// Extra field of a TokenReview for a pod-bound token.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TokenReview failed: {0}")]
    Api(#[source] kube::Error),
    #[error("token not authenticated: {0}")]
    NotAuthenticated(String),
    #[error("token is not for audience {AUDIENCE:?} (the API server confirmed {confirmed:?}): project it with `audience: {AUDIENCE}`")]
    WrongAudience { confirmed: Vec<String> },
    #[error("token belongs to {user:?}, not the node ServiceAccount {expected:?}")]
    WrongUser { user: String, expected: String },
    #[error("token is not bound to a pod (use a projected ServiceAccount token)")]
    NotPodBound,
    #[error("pod {namespace}/{pod} of the token: {source}")]
    Pod { namespace: String, pod: String, source: kube::Error },
    #[error("the token's pod {pod} runs on node {actual:?}, not on {claimed:?}")]
    WrongNode { pod: String, actual: String, claimed: String },
}

pub struct Reviewer {
    client: Client,
    /// `system:serviceaccount:<ns>:<name>` of the node DaemonSet.
    expected_user: String,
    namespace: String,
}

impl Reviewer {
    pub fn new(client: Client, namespace: &str, service_account: &str) -> Self {
        Self {
            client,
            expected_user: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.to_owned(),
        }
    }

    pub async fn check(&self, token: &str, claimed_node: &str) -> Result<(), Error> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![AUDIENCE.to_owned()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(Error::Api)?;
        let pod = bound_pod(reviewed.status.as_ref(), &self.expected_user)?;
        let found = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get(&pod)
            .await
            .map_err(|source| Error::Pod { namespace: self.namespace.clone(), pod: pod.clone(), source })?;
        let actual = found.spec.and_then(|s| s.node_name).unwrap_or_default();
        if actual != claimed_node {
            return Err(Error::WrongNode { pod, actual, claimed: claimed_node.to_owned() });
        }
        Ok(())
    }
}

/// The pod a reviewed token is bound to, if the review authenticated `expected_user` for
/// [`AUDIENCE`] (sans-IO). The audience is checked in the answer too: an API server that ignores
/// `spec.audiences` would otherwise pass any of the pod's tokens.
pub fn bound_pod(status: Option<&TokenReviewStatus>, expected_user: &str) -> Result<String, Error> {
    let status = status.ok_or_else(|| Error::NotAuthenticated("no status".into()))?;
    if status.authenticated != Some(true) {
        return Err(Error::NotAuthenticated(status.error.clone().unwrap_or_else(|| "rejected".into())));
    }
    let confirmed = status.audiences.clone().unwrap_or_default();
    if !confirmed.iter().any(|a| a == AUDIENCE) {
        return Err(Error::WrongAudience { confirmed });
    }
    let user = status.user.as_ref().ok_or_else(|| Error::NotAuthenticated("no user".into()))?;
    let name = user.username.clone().unwrap_or_default();
    if name != expected_user {
        return Err(Error::WrongUser { user: name, expected: expected_user.to_owned() });
    }
    user.extra
        .as_ref()
        .and_then(|e| e.get(POD_NAME_EXTRA))
        .and_then(|v| v.first())
        .cloned()
        .ok_or(Error::NotPodBound)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, user: &str, pod: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: pod.map(|p| [(POD_NAME_EXTRA.to_owned(), vec![p.to_owned()])].into()),
                ..UserInfo::default()
            }),
            audiences: Some(vec![AUDIENCE.to_owned()]),
            ..TokenReviewStatus::default()
        }
    }

    const SA: &str = "system:serviceaccount:mesh-system:mesh-node";

    #[test]
    fn accepts_only_the_node_service_account_with_a_bound_pod() {
        assert_eq!(bound_pod(Some(&status(true, SA, Some("mesh-node-abc"))), SA).expect("ok"), "mesh-node-abc");
        let e = bound_pod(Some(&status(false, SA, Some("p"))), SA).expect_err("unauthenticated");
        assert!(matches!(e, Error::NotAuthenticated(_)), "{e}");
        let e = bound_pod(Some(&status(true, "system:serviceaccount:default:default", Some("p"))), SA).expect_err("other SA");
        assert!(matches!(e, Error::WrongUser { .. }), "{e}");
        let e = bound_pod(Some(&status(true, SA, None)), SA).expect_err("legacy token");
        assert!(matches!(e, Error::NotPodBound), "{e}");
        assert!(bound_pod(None, SA).is_err());
        let unaware = TokenReviewStatus { audiences: None, ..status(true, SA, Some("p")) };
        let e = bound_pod(Some(&unaware), SA).expect_err("audience not confirmed");
        assert!(matches!(e, Error::WrongAudience { .. }), "{e}");
        assert!(e.to_string().contains("audience: mesh-control"), "{e}");
    }
}
