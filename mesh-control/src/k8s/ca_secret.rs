//! The mesh root in Kubernetes: the Secret `mesh-ca` (keys `root.crt`, `root.key`, and during a
//! root rotation `extra-roots.pem`) in the controller namespace, created on first start. The
//! trust bundle (the root, then the extra roots) is published in the ConfigMap `mesh-root-cert`
//! (key `root.crt`) that the node DaemonSet mounts to verify the controller.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::ca::{self, Ca, RootPem};

pub const SECRET_NAME: &str = "mesh-ca";
pub const CONFIG_MAP_NAME: &str = "mesh-root-cert";
/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "mesh-control";

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

pub async fn load_or_create(client: &Client, namespace: &str, trust_domain: &str) -> Result<Ca, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ns = || namespace.to_owned();
    let ca = if let Some(s) = secrets.get_opt(SECRET_NAME).await.map_err(|source| Error::Get { namespace: ns(), source })? { from_secret(&s, namespace, trust_domain)? } else {
        let ca = Ca::generate(trust_domain)?;
        match secrets.create(&PostParams::default(), &to_secret(ca.root(), namespace)).await {
            Ok(_) => {
                tracing::info!(namespace, "generated a new mesh root in Secret {SECRET_NAME}");
                ca
            }
            // Another replica won the race: use its root.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let s = secrets.get(SECRET_NAME).await.map_err(|source| Error::Get { namespace: ns(), source })?;
                from_secret(&s, namespace, trust_domain)?
            }
            Err(source) => return Err(Error::Create { namespace: ns(), source }),
        }
    };
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(CONFIG_MAP_NAME.into()), namespace: Some(ns()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([("root.crt".to_owned(), ca.trust_bundle().concat())])),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(CONFIG_MAP_NAME, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm))
        .await
        .map_err(|source| Error::Publish { namespace: ns(), source })?;
    Ok(ca)
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
