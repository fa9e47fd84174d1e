//! A cluster, through kubeconfig (`--kubeconfig`, `KUBECONFIG`, `~/.kube/config`, or the
//! in-cluster ServiceAccount; `--context`): every endpoint through the apiserver's pod proxy,
//! `/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`.
//!
//! - nodes: the `mesh-node` DaemonSet's pods (`app.kubernetes.io/name=mesh-node`), one per
//!   node, named after `spec.nodeName`;
//! - mesh-control: its pods (`app.kubernetes.io/name=mesh-control`), the leader preferred.
//!
//! The node daemon's admin port listens on 127.0.0.1 of the node (the DaemonSet does not set
//! `MESH_ADMIN_ADDR`), which the pod proxy cannot reach: `config`, `explain` and `version` read
//! it through a port-forward instead, as `kubectl port-forward` and `istioctl` do (the kubelet
//! dials the port inside the pod's network namespace, the node's for the DaemonSet), so the port
//! stays closed to the node network. That needs RBAC `create` on `pods/portforward`, as
//! `kubectl port-forward` does. Readiness uses the metrics port's `/healthz/ready`, which the
//! proxy reaches.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{Choice, Port};
use crate::http::Response;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("reading kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("finding a kubeconfig or an in-cluster config: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("building the request for {path}: {source}")]
    Request { path: String, source: http::Error },
    #[error("port-forward to {pod}:{port}: {detail}")]
    Forward {
        pod: String,
        port: u16,
        detail: String,
    },
    #[error("no running {app} pod in namespace {namespace}")]
    NoPod {
        app: &'static str,
        namespace: String,
    },
}

const NODE_APP: &str = "mesh-node";
const CONTROL_APP: &str = "mesh-control";
const CONTROL_STATUS_PORT: u16 = 15_014;

pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    client: Client,
    namespace: String,
    context: String,
}

impl Cluster {
    pub fn connect(choice: &Choice) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let options = KubeConfigOptions {
            context: choice.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = runtime.block_on(async {
            match &choice.kubeconfig {
                Some(path) => {
                    let file = Kubeconfig::read_from(path)?;
                    Ok::<_, Error>(kube::Config::from_custom_kubeconfig(file, &options).await?)
                }
                None if choice.context.is_some() => {
                    Ok(kube::Config::from_kubeconfig(&options).await?)
                }
                None => Ok(kube::Config::infer().await?),
            }
        })?;
        let context = choice
            .context
            .clone()
            .unwrap_or_else(|| config.cluster_url.to_string());
        let client = {
            let _guard = runtime.enter();
            Client::try_from(config)?
        };
        Ok(Self {
            runtime,
            client,
            namespace: choice.namespace.clone(),
            context,
        })
    }

    pub fn describe(&self) -> String {
        format!("{}, namespace {}", self.context, self.namespace)
    }

    /// Running pods of `app` that are not terminating, by pod name, with their node.
    fn pods(&self, app: &'static str) -> Result<BTreeMap<String, String>, Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = ListParams::default().labels(&format!("app.kubernetes.io/name={app}"));
        let list = self.runtime.block_on(api.list(&params))?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            // Terminating (a rolling update, a drain): still `Running`, but going away.
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.metadata.name?, p.spec?.node_name.unwrap_or_default())))
            .collect())
    }

    pub fn nodes(&self) -> Result<Vec<String>, Error> {
        let mut nodes: Vec<String> = self.pods(NODE_APP)?.into_values().collect();
        nodes.sort();
        Ok(nodes)
    }

    fn node_pod(&self, node: &str) -> Result<String, Error> {
        self.pods(NODE_APP)?
            .into_iter()
            .find_map(|(pod, n)| (n == node).then_some(pod))
            .ok_or_else(|| Error::NoPod {
                app: NODE_APP,
                namespace: self.namespace.clone(),
            })
    }

    /// `GET path` through the pod proxy; the answer's status as the pod gave it.
    fn proxy_get(&self, pod: &str, port: u16, path: &str) -> Result<Response, Error> {
        let uri = proxy_path(&self.namespace, pod, port, path);
        let request = http::Request::get(&uri)
            .body(Vec::new())
            .map_err(|source| Error::Request {
                path: uri.clone(),
                source,
            })?;
        self.runtime.block_on(async {
            let answer = self
                .client
                .send(request.map(kube::client::Body::from))
                .await?;
            let status = answer.status().as_u16();
            let bytes = answer.into_body().collect_bytes().await?;
            Ok(Response {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        })
    }

    /// `GET path` on `pod`'s `port` through a port-forward: for ports bound to the loopback
    /// address of the pod's network namespace, which the pod proxy cannot reach.
    fn forward_get(&self, pod: &str, port: u16, path: &str) -> Result<Response, Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let failed = |detail: String| Error::Forward {
            pod: pod.to_owned(),
            port,
            detail,
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        self.runtime.block_on(async {
            let mut forward = api.portforward(pod, &[port]).await?;
            let mut stream = forward
                .take_stream(port)
                .ok_or_else(|| failed("no stream for the port".into()))?;
            let exchange = async {
                stream
                    .write_all(crate::http::request("127.0.0.1", path).as_bytes())
                    .await?;
                let mut raw = Vec::new();
                let mut buf = vec![0u8; 64 << 10];
                // The server closes after one answer; the forwarded stream may not say so.
                while !crate::http::complete(&raw) {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    raw.extend_from_slice(&buf[..n]);
                }
                Ok::<_, std::io::Error>(raw)
            };
            // The kubelet says on the error channel why it could not connect to the port.
            let refused = forward.take_error(port);
            let refused = async {
                match refused {
                    Some(error) => error.await,
                    None => std::future::pending().await,
                }
            };
            let raw = tokio::select! {
                raw = tokio::time::timeout(crate::http::TIMEOUT, exchange) => raw
                    .map_err(|_| failed(format!("no answer within {:?}", crate::http::TIMEOUT)))?
                    .map_err(|e| failed(e.to_string()))?,
                Some(error) = refused => return Err(failed(error)),
            };
            drop(stream);
            forward.abort();
            crate::http::parse(&raw).map_err(failed)
        })
    }

    /// mesh-control's status port; with several replicas, the leader's answer.
    pub fn control_get(&self, path: &str) -> Result<Response, Error> {
        Ok(self.control_get_all(path)?.swap_remove(0))
    }

    /// Every replica's answer, the leader's first: what only the replica serving a node knows
    /// (the node's acks) is spread over them.
    pub fn control_get_all(&self, path: &str) -> Result<Vec<Response>, Error> {
        let pods = self.pods(CONTROL_APP)?;
        let mut answers = Vec::new();
        for pod in pods.keys() {
            answers.push(self.proxy_get(pod, CONTROL_STATUS_PORT, path)?);
        }
        if answers.is_empty() {
            return Err(Error::NoPod {
                app: CONTROL_APP,
                namespace: self.namespace.clone(),
            });
        }
        let leads = |a: &Response| {
            serde_json::from_str::<serde_json::Value>(&a.body)
                .is_ok_and(|v| v["leader"] == serde_json::Value::Bool(true))
        };
        answers.sort_by_key(|a| !leads(a));
        Ok(answers)
    }

    pub fn node_get(&self, node: &str, port: Port, path: &str) -> Result<Response, Error> {
        let pod = self.node_pod(node)?;
        match (port, path) {
            // The admin port's /ready is the metrics port's /healthz/ready, which the proxy
            // reaches.
            (Port::Admin, "/ready") => {
                self.proxy_get(&pod, Port::Metrics.number(), "/healthz/ready")
            }
            (Port::Admin, path) => self.forward_get(&pod, Port::Admin.number(), path),
            (Port::Metrics, path) => self.proxy_get(&pod, Port::Metrics.number(), path),
        }
    }
}

/// The apiserver path that proxies `GET path` to `pod:port`.
pub fn proxy_path(namespace: &str, pod: &str, port: u16, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_go_through_the_pod_proxy() {
        assert_eq!(
            proxy_path("mesh-system", "mesh-node-x7k2p", 15_000, "/config_dump"),
            "/api/v1/namespaces/mesh-system/pods/mesh-node-x7k2p:15000/proxy/config_dump"
        );
        assert_eq!(
            proxy_path(
                "mesh-system",
                "mesh-node-x7k2p",
                15_000,
                "/debug/explain?src=1.2.3.4"
            ),
            "/api/v1/namespaces/mesh-system/pods/mesh-node-x7k2p:15000/proxy/debug/explain?src=1.2.3.4"
        );
    }
}
