//! Istio's server-side `destination_service` for HTTP. One pod port can serve several Services
//! (in the lab, `whoami`, `whoami-v1` and `helloworld` all reach port 8081 of the same pods), and
//! the connection alone cannot tell which one a request was for. As Istio's stats filter does on
//! the inbound side, the request's host decides: the Service it names (by VIP or DNS name) when
//! that Service serves this pod port; otherwise the connection's default, the first Service by
//! namespace and name (`State::serving`). A host naming a Service that does not serve the port
//! changes nothing: a client cannot relabel its traffic as another Service's.
//!
//! The layer sits inside the recorder and the tracer and answers with [`Peers`], which both read.
//! With one Service on the port (the usual case) it is not built at all.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either, FutureExt as _};
use http::{Request, Response};
use mesh_l7::{
    body::Body,
    metrics::PeerLabels,
    record::Peers,
    route::filter::{authority, split_host_port},
};

use crate::{proxy::metrics::set_service, state::State};

/// The Services serving one pod port, with the labels each gives requests naming it.
pub struct Candidates {
    /// The first is the connection's default (its labels are the recorder's own: `None`).
    services: Vec<Candidate>,
    namespace: String,
    /// `.svc.<cluster domain>`, made once: it is looked for in every request's host.
    svc_suffix: String,
}

struct Candidate {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    peers: Option<Arc<PeerLabels>>,
}

impl Candidates {
    /// The Services serving `dst` (a pod of namespace `namespace`), when there are several;
    /// `base` is the connection's labels, its `destination_service*` those of the first.
    pub fn new(state: &State, dst: SocketAddr, namespace: &str, base: &PeerLabels, cluster_domain: &str) -> Option<Arc<Self>> {
        let mut services = Vec::new();
        for (i, (s, _)) in state.serving_all(dst).enumerate() {
            let peers = (i > 0).then(|| {
                let mut p = base.clone();
                set_service(&mut p, Some(s), cluster_domain);
                Arc::new(p)
            });
            services.push(Candidate { name: s.name.clone(), namespace: s.namespace.clone(), vips: s.vips.clone(), peers });
        }
        (services.len() > 1).then(|| Arc::new(Self { services, namespace: namespace.to_owned(), svc_suffix: format!(".svc.{cluster_domain}") }))
    }

    /// The labels for a request to `authority`, when they are not the connection's.
    fn for_authority(&self, authority: &str) -> Option<&Arc<PeerLabels>> {
        let host = split_host_port(authority).0.trim_start_matches('[').trim_end_matches(']');
        let found = if let Ok(ip) = host.parse::<IpAddr>() {
            self.services.iter().find(|c| c.vips.contains(&ip))
        } else {
            let (name, namespace) = self.name_and_namespace(host);
            self.services.iter().find(|c| c.name.eq_ignore_ascii_case(name) && c.namespace.eq_ignore_ascii_case(namespace))
        };
        found?.peers.as_ref()
    }

    /// `name`, `name.ns`, `name.ns.svc` or `name.ns.svc.<cluster domain>`: a bare name is in the
    /// pod's namespace, as DNS search paths resolve it.
    fn name_and_namespace<'a>(&'a self, host: &'a str) -> (&'a str, &'a str) {
        let short = strip_suffix_ignore_case(host, &self.svc_suffix)
            .or_else(|| strip_suffix_ignore_case(host, ".svc"))
            .unwrap_or(host);
        short.split_once('.').unwrap_or((short, self.namespace.as_str()))
    }
}

fn strip_suffix_ignore_case<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    (s.is_char_boundary(cut) && s[cut..].eq_ignore_ascii_case(suffix)).then(|| &s[..cut])
}

/// Answers with the [`Peers`] of the Service a request's host names (see the module doc).
#[derive(Clone)]
pub struct ByHost<S> {
    inner: S,
    candidates: Option<Arc<Candidates>>,
}

impl<S> ByHost<S> {
    pub fn new(inner: S, candidates: Option<Arc<Candidates>>) -> Self {
        Self { inner, candidates }
    }
}

impl<S> tower::Service<Request<Body>> for ByHost<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let peers = self.candidates.as_ref().and_then(|c| authority(&req).and_then(|a| c.for_authority(a))).cloned();
        let response = self.inner.call(req);
        match peers {
            None => Either::Left(response),
            Some(p) => Either::Right(
                response
                    .map(move |Ok(mut resp)| {
                        resp.extensions_mut().insert(Peers(p));
                        Ok(resp)
                    })
                    .boxed(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_l7::metrics::SecurityPolicy;

    use super::*;
    use crate::{
        proxy::metrics::{Peer, Reporter, peer_labels},
        state::{Endpoint, Service, ServicePort, ServiceProtocol, Snapshot},
    };

    const POD: [u8; 4] = [198, 18, 2, 11];

    /// A Service `namespace/name` at `vip` whose port 80 reaches port 8081 of the pod.
    fn service(namespace: &str, name: &str, vip: [u8; 4]) -> Service {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            vips: vec![IpAddr::from(vip)],
            ports: vec![ServicePort { name: "http".into(), port: 80, protocol: ServiceProtocol::Tcp, target_port: 8081, app_protocol: None }],
            endpoints: vec![Endpoint {
                address: IpAddr::from(POD),
                ports: BTreeMap::new(),
                healthy: true,
                node: "n2".into(),
                node_address: None,
                meshed: true,
                identity: None,
                subsets: Vec::new(),
                locality: None,
            }],
        }
    }

    fn candidates(services: Vec<Service>) -> Option<Arc<Candidates>> {
        let state = State::build("cluster.local", "mesh-system", Snapshot { services, ..Snapshot::default() }).expect("state");
        let nobody = Peer { workload: None, identity: None };
        let mut base = peer_labels(Reporter::destination, nobody, nobody, SecurityPolicy::mutual_tls, "Kubernetes");
        let dst = SocketAddr::from((POD, 8081));
        set_service(&mut base, state.serving(dst).map(|(s, _)| s), "cluster.local");
        Candidates::new(&state, dst, "demo", &base, "cluster.local")
    }

    fn named(c: &Candidates, authority: &str) -> Option<String> {
        c.for_authority(authority).map(|p| p.destination_service.to_string())
    }

    #[test]
    fn the_host_picks_among_the_services_of_the_port() {
        let c = candidates(vec![
            service("demo", "whoami", [198, 19, 0, 10]),
            service("demo", "helloworld", [198, 19, 0, 20]),
            service("other", "whoami", [198, 19, 0, 30]),
        ])
        .expect("three Services serve the port");
        // helloworld sorts first: it is the connection's default, so no override for it.
        assert_eq!(named(&c, "helloworld.demo"), None);
        assert_eq!(named(&c, "198.19.0.20"), None);
        let whoami = Some("whoami.demo.svc.cluster.local".to_owned());
        for host in ["whoami", "whoami:80", "whoami.demo", "WHOAMI.demo.svc", "whoami.demo.svc.cluster.local:80", "198.19.0.10", "198.19.0.10:80"] {
            assert_eq!(named(&c, host), whoami, "{host}");
        }
        assert_eq!(named(&c, "whoami.other"), Some("whoami.other.svc.cluster.local".to_owned()));
        assert_eq!(named(&c, "198.19.0.30"), Some("whoami.other.svc.cluster.local".to_owned()));
        // Hosts that name no Service of this port leave the default.
        for host in ["reviews.demo", "198.19.0.99", "example.com", "", "[::1]:80"] {
            assert_eq!(named(&c, host), None, "{host}");
        }
    }

    #[test]
    fn one_service_needs_no_layer() {
        assert!(candidates(vec![service("demo", "whoami", [198, 19, 0, 10])]).is_none());
        assert!(candidates(vec![]).is_none());
    }
}
