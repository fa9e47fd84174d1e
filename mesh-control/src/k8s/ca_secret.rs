//! The mesh root in Kubernetes: the Secret `mesh-ca` (keys `root.crt`, `root.key`, and during a
//! root rotation `extra-roots.pem`) in the controller namespace, created on first start. The
//! trust bundle (the root, then the extra roots) is published in the ConfigMap `mesh-root-cert`
//! (key `root.crt`) that the node DaemonSet mounts to verify the controller.
//!
//! Only the leader (`election`) creates the Secret and publishes the ConfigMap: a replica that
//! finds no Secret and does not lead waits for the leader's, and adopts it (or creates it, if it
//! becomes the leader first).

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::{
    ca::{self, Ca, RootPem},
    election::Leadership,
};

pub const SECRET_NAME: &str = "mesh-ca";
pub const CONFIG_MAP_NAME: &str = "mesh-root-cert";
/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "mesh-control";
/// How often a replica that does not lead looks for the leader's Secret.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {namespace}/{SECRET_NAME}: {source}")]
    Get { namespace: String, source: kube::Error },
    #[error("creating Secret {namespace}/{SECRET_NAME}: {source}")]
    Create { namespace: String, source: kube::Error },
    #[error("publishing ConfigMap {namespace}/{CONFIG_MAP_NAME}: {source}")]
    Publish { namespace: String, source: kube::Error },
    #[error("Secret {namespace}/{SECRET_NAME} lacks key {key}")]
    MissingKey { namespace: String, key: &'static str },
    #[error(transparent)]
    Ca(#[from] ca::Error),
}

/// The mesh root from the Secret; created (by the leader only) when there is none.
pub async fn load_or_create(client: &Client, namespace: &str, trust_domain: &str, leadership: &Leadership) -> Result<Ca, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ns = || namespace.to_owned();
    let mut leadership = leadership.clone();
    let mut waiting = false;
    loop {
        if let Some(s) = secrets.get_opt(SECRET_NAME).await.map_err(|source| Error::Get { namespace: ns(), source })? {
            return from_secret(&s, namespace, trust_domain);
        }
        if leadership.is_leader() {
            let ca = Ca::generate(trust_domain)?;
            return match secrets.create(&PostParams::default(), &to_secret(ca.root(), namespace)).await {
                Ok(_) => {
                    tracing::info!(namespace, "generated a new mesh root in Secret {SECRET_NAME}");
                    Ok(ca)
                }
                // Someone created it meanwhile (a former leader, an operator): use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let s = secrets.get(SECRET_NAME).await.map_err(|source| Error::Get { namespace: ns(), source })?;
                    from_secret(&s, namespace, trust_domain)
                }
                Err(source) => Err(Error::Create { namespace: ns(), source }),
            };
        }
        if !waiting {
            tracing::info!(namespace, "no Secret {SECRET_NAME} yet: waiting for the leader to create it");
            waiting = true;
        }
        tokio::select! {
            () = tokio::time::sleep(WAIT_POLL) => {}
            () = leadership.changed() => {}
        }
    }
}

/// Publishes the trust bundle in the ConfigMap the nodes mount (the leader does, when it becomes
/// the leader).
pub async fn publish(client: &Client, namespace: &str, ca: &Ca) -> Result<(), Error> {
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(CONFIG_MAP_NAME.into()), namespace: Some(namespace.to_owned()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([("root.crt".to_owned(), ca.trust_bundle().concat())])),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(CONFIG_MAP_NAME, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm))
        .await
        .map(|_| ())
        .map_err(|source| Error::Publish { namespace: namespace.to_owned(), source })
}

/// Publishes the ConfigMap each time this replica becomes the leader (retrying while it leads),
/// so the bundle the nodes get is the current leader's. Runs until the process stops.
pub async fn publish_while_leading(client: Client, namespace: String, ca: std::sync::Arc<Ca>, mut leadership: Leadership) {
    loop {
        leadership.acquired().await;
        while leadership.is_leader() {
            match publish(&client, &namespace, &ca).await {
                Ok(()) => {
                    tracing::info!(namespace, "published the trust bundle in ConfigMap {CONFIG_MAP_NAME}");
                    break;
                }
                Err(e) => tracing::warn!("{e} (retrying)"),
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
        while leadership.is_leader() {
            leadership.changed().await;
        }
    }
}

fn to_secret(root: &RootPem, namespace: &str) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(SECRET_NAME.into()), namespace: Some(namespace.into()), ..ObjectMeta::default() },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            ("root.crt".to_owned(), ByteString(root.cert.clone().into_bytes())),
            ("root.key".to_owned(), ByteString(root.key.clone().into_bytes())),
        ])),
        ..Secret::default()
    }
}

fn from_secret(s: &Secret, namespace: &str, trust_domain: &str) -> Result<Ca, Error> {
    let get = |key: &'static str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or(Error::MissingKey { namespace: namespace.to_owned(), key })
    };
    let ca = Ca::from_pem(RootPem { cert: get("root.crt")?, key: get("root.key")? }, trust_domain)?;
    Ok(match get(ca::EXTRA_ROOTS) {
        Ok(extra) => ca.with_extra_roots(&extra)?,
        Err(_) => ca,
    })
}

#[cfg(test)]
#[path = "ca_secret_tests.rs"]
mod tests;
