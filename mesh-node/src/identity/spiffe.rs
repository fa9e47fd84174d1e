//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: the only identity shape the mesh
//! issues and accepts (the same as Istio's, so principals in policies carry over).

use std::{fmt, str::FromStr};

use super::Error;

pub const SCHEME: &str = "spiffe://";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The form Istio policies use for principals: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }

    /// A DNS-shaped name sent as TLS SNI so a daemon that serves many workloads on one address
    /// can pick the certificate the client expects. Only compared, never parsed: a collision can
    /// at worst fail a handshake, because the client still verifies the URI SAN.
    pub fn sni(&self) -> String {
        format!("{}.{}.id.{}", self.service_account, self.namespace, self.trust_domain)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.principal())
    }
}

impl From<Identity> for String {
    fn from(id: Identity) -> Self {
        id.to_string()
    }
}

impl TryFrom<String> for Identity {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl FromStr for Identity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidId { id: s.to_owned(), reason };
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| invalid("must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(invalid("expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_shapes() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
        for bad in [
            "cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/sa/web/ns/default",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            // A node certificate's id (mesh-control `auth::NodeIds`): never a workload identity.
            "spiffe://cluster.local/ns/mesh-system/sa/mesh-node/node/n1",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} must be rejected");
        }
    }
}
