//! One span per request, as Envoy's HTTP tracing makes it: the caller's context is continued (or
//! a trace begun), the next hop is told about the new span in the request's headers, and, when the
//! request is sampled, the span goes to the tracer's sink once the response body has ended or was
//! dropped, so its duration and sizes cover the whole exchange, streams included.
//!
//! Without a tracer the layer passes requests through untouched and allocates nothing.

use std::{
    borrow::Cow,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use futures::future::{BoxFuture, Either, FutureExt as _};
use http::{HeaderMap, Request, Response, Version, header, response};

use crate::{
    body::Body,
    metrics::UNKNOWN,
    record::{self, Flags, OnEnd, Peers, Upstream},
    trace::{
        Span, SpanKind, TagText, TagValue, Tracer,
        context::{self, SpanContext},
    },
};

#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    source: Arc<dyn TracerSource>,
}

/// The tracer for each request of a stack: fixed (`Option<Arc<Tracer>>`; `None`: tracing off),
/// or following the config (the node's, for connections that outlive a Telemetry change).
pub trait TracerSource: Send + Sync + 'static {
    fn tracer(&self) -> Option<Arc<Tracer>>;
}

impl TracerSource for Option<Arc<Tracer>> {
    fn tracer(&self) -> Option<Arc<Tracer>> {
        self.clone()
    }
}

impl<S> Trace<S> {
    pub fn new(inner: S, source: Arc<dyn TracerSource>) -> Self {
        Self { inner, source }
    }
}

impl<S> tower::Service<Request<Body>> for Trace<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(tracer) = self.source.tracer() else {
            return Either::Left(self.inner.call(req));
        };
        let incoming = context::extract(req.headers());
        let sampled = incoming.sampled.unwrap_or_else(|| tracer.sample());
        let ctx = SpanContext::child_of(incoming.parent, sampled);
        context::inject(&ctx, req.headers_mut(), tracer.propagation);
        context::ensure_request_id(req.headers_mut());
        if !sampled {
            return Either::Left(self.inner.call(req));
        }
        let (req, received) = record::counted(req);
        let mut draft = Draft::new(tracer.clone(), ctx, &req, received);
        Either::Right(Box::pin(self.inner.call(req).map(move |Ok(resp)| {
            let (parts, body) = resp.into_parts();
            draft.respond(&parts);
            Ok(Response::from_parts(parts, record::watch(body, draft)))
        })))
    }
}

type Tags = Vec<(Cow<'static, str>, TagText)>;

/// A sampled request's span while it is under way. It is submitted once: when the response body
/// ends, or when it is dropped (with the body, or with the response future before any response).
struct Draft {
    tracer: Arc<Tracer>,
    ctx: SpanContext,
    start: SystemTime,
    clock: Instant,
    /// The request's host, without a port: names the span when no service is known.
    host: String,
    tags: Tags,
    received: Arc<AtomicU64>,
    /// 0 until a response arrives.
    status: u16,
    flags: Flags,
    service: Option<Arc<str>>,
    upstream: Option<SocketAddr>,
    grpc: Option<Arc<str>>,
    submitted: bool,
}

impl Draft {
    fn new(
        tracer: Arc<Tracer>,
        ctx: SpanContext,
        req: &Request<Body>,
        received: Arc<AtomicU64>,
    ) -> Self {
        let headers = req.headers();
        let authority = crate::route::filter::authority(req).unwrap_or_default();
        let host = crate::route::filter::split_host_port(authority)
            .0
            .to_owned();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let local = &tracer.local;
        let mut tags: Tags = Vec::with_capacity(24 + tracer.custom_tags.len());
        let mut tag = |k: &'static str, v: TagText| tags.push((Cow::Borrowed(k), v));
        tag("http.method", method(req.method()));
        tag("http.url", format!("http://{authority}{path}").into());
        tag("http.protocol", protocol(req.version()).into());
        tag("component", "proxy".into());
        // The connection's own values are shared with every span it makes.
        tag("node_id", local.node_id.clone().into());
        tag("istio.mesh_id", local.mesh_id.clone().into());
        tag(
            "istio.canonical_service",
            local.canonical_service.clone().into(),
        );
        tag(
            "istio.canonical_revision",
            local.canonical_revision.clone().into(),
        );
        tag("istio.namespace", local.namespace.clone().into());
        tag("peer.address", tracer.downstream.ip().to_string().into());
        if let Some(id) = text(headers, &context::X_REQUEST_ID) {
            tag("guid:x-request-id", id.to_owned().into());
        }
        if let Some(ua) = text(headers, &header::USER_AGENT) {
            tag("user_agent", ua.to_owned().into());
        }
        for custom in tracer.custom_tags.iter() {
            let value = match &custom.value {
                TagValue::Literal(v) => Some(v.clone()),
                TagValue::Header { name, default } => text(headers, name)
                    .map(str::to_owned)
                    .or_else(|| default.clone()),
            };
            if let Some(v) = value {
                tags.push((Cow::Owned(custom.name.clone()), v.into()));
            }
        }
        Self {
            tracer,
            ctx,
            start: SystemTime::now(),
            clock: Instant::now(),
            host,
            tags,
            received,
            status: 0,
            flags: Flags::default(),
            service: None,
            upstream: None,
            grpc: None,
            submitted: false,
        }
    }

    /// What the response tells: inner layers' extensions and its headers.
    fn respond(&mut self, parts: &response::Parts) {
        self.status = parts.status.as_u16();
        self.flags = Flags::of(&parts.extensions);
        self.service = parts
            .extensions
            .get::<Peers>()
            .map(|p| p.0.destination_service.clone());
        self.upstream = parts.extensions.get::<Upstream>().map(|u| u.0);
        self.grpc = record::grpc_status(&parts.headers);
    }

    fn submit(&mut self, sent: u64, complete: bool) {
        if std::mem::replace(&mut self.submitted, true) {
            return;
        }
        let t = &*self.tracer;
        let host = match self.service.as_deref() {
            Some(s) if s != UNKNOWN => s,
            _ => &self.host,
        };
        let cluster = match t.kind {
            SpanKind::Client => format!("outbound|{}||{host}", t.port),
            SpanKind::Server => format!("inbound|{}||", t.port),
        };
        let name = format!("{host}:{}/*", t.port);
        let flags = self.flags.label(complete);
        let error = self.status >= 500 || flags != "-";
        let mut tags = std::mem::take(&mut self.tags);
        let mut tag = |k: &'static str, v: TagText| tags.push((Cow::Borrowed(k), v));
        tag("http.status_code", self.status.to_string().into());
        tag("response_flags", flags.into());
        let cluster = TagText::Shared(cluster.into());
        tag("upstream_cluster", cluster.clone());
        tag("upstream_cluster.name", cluster);
        tag(
            "request_size",
            self.received.load(Ordering::Relaxed).to_string().into(),
        );
        tag("response_size", sent.to_string().into());
        if let Some(u) = self.upstream {
            tag("upstream.address", u.to_string().into());
        }
        if let Some(g) = &self.grpc {
            tag("grpc.status_code", g.clone().into());
        }
        if error {
            tag("error", "true".into());
        }
        let local = &t.local;
        t.sink.submit(Span {
            trace_id: self.ctx.trace_id,
            span_id: self.ctx.span_id,
            parent_id: self.ctx.parent_id,
            name,
            kind: t.kind,
            start: self.start,
            duration: self.clock.elapsed(),
            local_service: local.service.clone(),
            local_ip: local.ip,
            remote: match t.kind {
                SpanKind::Client => self.upstream,
                SpanKind::Server => Some(t.downstream),
            },
            tags,
            error,
        });
    }
}

impl OnEnd for Draft {
    fn grpc(&mut self, status: Arc<str>) {
        self.grpc = Some(status);
    }

    fn finish(mut self, sent: u64, complete: bool) {
        self.submit(sent, complete);
    }
}

impl Drop for Draft {
    /// The response future was dropped before a response (the client went away first).
    fn drop(&mut self) {
        self.submit(0, false);
    }
}

fn text<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The method's name, without an allocation for the standard ones.
fn method(m: &http::Method) -> TagText {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    KNOWN.iter().find(|k| **k == m.as_str()).map_or_else(
        || TagText::Owned(m.as_str().to_owned()),
        |k| TagText::Static(k),
    )
}

/// Envoy's `http.protocol` value.
fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use http::{HeaderValue, StatusCode};
    use http_body::Frame;
    use http_body_util::{BodyExt as _, StreamBody};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        body,
        flags::ResponseFlag,
        layer::{HttpService, testing::text},
        metrics::{PeerLabels, Reporter, SecurityPolicy},
        trace::Propagation,
        trace::{CustomTag, LocalInfo, SpanId, SpanSink, TraceId},
    };

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const TRACE_ID: u128 = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736;
    const SPAN: &str = "00f067aa0ba902b7";
    const SPAN_ID: SpanId = SpanId(0x00f0_67aa_0ba9_02b7);

    #[derive(Default)]
    struct Collect(Mutex<Vec<Span>>);

    impl SpanSink for Collect {
        fn submit(&self, span: Span) {
            self.0.lock().expect("lock").push(span);
        }
    }

    impl Collect {
        fn take(&self) -> Vec<Span> {
            std::mem::take(&mut *self.0.lock().expect("lock"))
        }
    }

    fn tracer(kind: SpanKind, percent: f64, sink: &Arc<Collect>) -> Arc<Tracer> {
        Arc::new(Tracer {
            propagation: Propagation {
                w3c: true,
                b3: true,
            },
            kind,
            sampling_percent: percent,
            custom_tags: Arc::from([]),
            local: Arc::new(LocalInfo {
                node_id: "node-a".into(),
                mesh_id: "cluster.local".into(),
                canonical_service: "productpage".into(),
                canonical_revision: "v1".into(),
                namespace: "demo".into(),
                service: "productpage.demo".into(),
                ip: Some("10.0.0.7".parse().expect("ip")),
            }),
            downstream: "10.0.0.9:41000".parse().expect("addr"),
            port: 9080,
            sink: sink.clone(),
        })
    }

    fn peers(destination_service: &str) -> Peers {
        let s = |v: &str| Arc::<str>::from(v);
        Peers(Arc::new(PeerLabels {
            reporter: Reporter::source,
            source_workload: s("productpage-v1"),
            source_canonical_service: s("productpage"),
            source_canonical_revision: s("v1"),
            source_workload_namespace: s("demo"),
            source_principal: s(UNKNOWN),
            source_app: s("productpage"),
            source_version: s("v1"),
            source_cluster: s("Kubernetes"),
            destination_service: s(destination_service),
            destination_service_name: s("reviews"),
            destination_service_namespace: s("demo"),
            destination_workload: s("reviews-v1"),
            destination_canonical_service: s("reviews"),
            destination_canonical_revision: s("v1"),
            destination_workload_namespace: s("demo"),
            destination_principal: s(UNKNOWN),
            destination_app: s("reviews"),
            destination_version: s("v1"),
            destination_cluster: s("Kubernetes"),
            connection_security_policy: SecurityPolicy::unknown,
        }))
    }

    /// An upstream that reads the request body, answers `got {bytes}` with the request's headers
    /// echoed, and lets `f` add what inner layers would (extensions, a status).
    fn upstream(f: fn(&mut Response<Body>)) -> impl HttpService {
        tower::service_fn(move |req: Request<Body>| async move {
            let (parts, body) = req.into_parts();
            let n = body.collect().await.expect("body").to_bytes().len();
            let mut resp = Response::new(body::full(format!("got {n}")));
            for (k, v) in &parts.headers {
                resp.headers_mut().append(k.clone(), v.clone());
            }
            f(&mut resp);
            Ok::<_, Infallible>(resp)
        })
    }

    fn plain() -> impl HttpService {
        upstream(|_| {})
    }

    fn request(headers: &[(&'static str, &str)]) -> Request<Body> {
        let mut req = Request::post("http://reviews:9080/api/v1?x=1")
            .body(body::full("hello"))
            .expect("request");
        for (k, v) in headers {
            req.headers_mut()
                .append(*k, HeaderValue::from_str(v).expect("value"));
        }
        req
    }

    async fn call<S: HttpService>(
        svc: S,
        tracer: Option<Arc<Tracer>>,
        req: Request<Body>,
    ) -> Response<Body> {
        Trace::new(svc, Arc::new(tracer))
            .oneshot(req)
            .await
            .expect("infallible")
    }

    fn header<'a>(resp: &'a Response<Body>, name: &str) -> Option<&'a str> {
        resp.headers().get(name).and_then(|v| v.to_str().ok())
    }

    /// The span the upstream was told about, from the echoed headers.
    fn injected(resp: &Response<Body>) -> context::Incoming {
        context::extract(resp.headers())
    }

    #[tokio::test]
    async fn continues_a_w3c_trace() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 0.0, &sink));
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let resp = call(
            plain(),
            t,
            request(&[("traceparent", &tp), ("tracestate", "v=1")]),
        )
        .await;
        let sent = injected(&resp).parent.expect("parent");
        assert_eq!(sent.trace_id, TraceId::new(TRACE_ID));
        assert_ne!(sent.span_id, SPAN_ID, "a new span");
        let tp = header(&resp, "traceparent").expect("traceparent");
        assert_eq!(tp, format!("00-{TRACE}-{}-01", sent.span_id));
        assert_eq!(header(&resp, "tracestate"), Some("v=1"));
        assert_eq!(header(&resp, "x-b3-traceid"), Some(TRACE));
        assert_eq!(header(&resp, "x-b3-parentspanid"), Some(SPAN));
        assert_eq!(header(&resp, "x-b3-sampled"), Some("1"));
        assert!(header(&resp, "b3").is_none());
        assert!(sink.take().is_empty(), "nothing before the body ends");
        assert_eq!(text(resp).await, "got 5");
        let spans = sink.take();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(
            (s.trace_id, s.span_id, s.parent_id),
            (sent.trace_id, sent.span_id, Some(SPAN_ID))
        );
        assert_eq!(s.kind, SpanKind::Client);
    }

    #[tokio::test]
    async fn continues_a_64_bit_b3_single_trace_at_its_width() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Server, 0.0, &sink));
        let b3 = format!("a3ce929d0e0e4736-{SPAN}-1");
        let resp = call(plain(), t, request(&[("b3", &b3)])).await;
        // The next hop reads `traceparent` (32 digits) with the B3 headers: the width is kept.
        let sent = injected(&resp).parent.expect("parent");
        assert_eq!(sent.trace_id, TraceId::b3_64(0xa3ce_929d_0e0e_4736));
        let want = format!("a3ce929d0e0e4736-{}-1-{SPAN}", sent.span_id);
        assert_eq!(header(&resp, "b3"), Some(want.as_str()));
        assert_eq!(header(&resp, "x-b3-traceid"), Some("a3ce929d0e0e4736"));
        let tp = format!("00-0000000000000000a3ce929d0e0e4736-{}-01", sent.span_id);
        assert_eq!(header(&resp, "traceparent"), Some(tp.as_str()));
        drop(resp);
        let spans = sink.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].trace_id, TraceId::b3_64(0xa3ce_929d_0e0e_4736));
        assert_eq!(spans[0].span_id, sent.span_id);
        assert_eq!(spans[0].parent_id, Some(SPAN_ID));
    }

    #[tokio::test]
    async fn continues_a_b3_multi_trace() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 100.0, &sink));
        let resp = call(
            plain(),
            t,
            request(&[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-parentspanid", "0000000000000001"),
                ("x-b3-sampled", "1"),
            ]),
        )
        .await;
        let sent = injected(&resp).parent.expect("parent");
        assert_eq!(sent.trace_id, TraceId::new(TRACE_ID));
        assert_eq!(
            header(&resp, "x-b3-spanid"),
            Some(sent.span_id.to_string().as_str())
        );
        assert_eq!(header(&resp, "x-b3-parentspanid"), Some(SPAN));
        assert_eq!(resp.headers().get_all("x-b3-traceid").iter().count(), 1);
        text(resp).await;
        let spans = sink.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_id, Some(SPAN_ID));
    }

    #[tokio::test]
    async fn starts_a_trace_when_there_is_none() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 100.0, &sink));
        let resp = call(plain(), t, request(&[])).await;
        let sent = injected(&resp);
        assert_eq!(sent.sampled, Some(true));
        let sent = sent.parent.expect("context sent on");
        assert!(!sent.trace_id.is_64());
        assert!(header(&resp, "x-b3-parentspanid").is_none());
        let id = header(&resp, "x-request-id")
            .expect("x-request-id")
            .to_owned();
        assert_eq!(id.len(), 36);
        text(resp).await;
        let spans = sink.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            (spans[0].trace_id, spans[0].span_id),
            (sent.trace_id, sent.span_id)
        );
        assert_eq!(spans[0].parent_id, None);
        assert_eq!(spans[0].tag("guid:x-request-id"), Some(id.as_str()));
    }

    #[tokio::test]
    async fn a_callers_no_is_honoured_even_at_100_percent() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 100.0, &sink));
        let tp = format!("00-{TRACE}-{SPAN}-00");
        let resp = call(plain(), t.clone(), request(&[("traceparent", &tp)])).await;
        let sent = injected(&resp);
        assert_eq!(sent.sampled, Some(false));
        assert_eq!(
            sent.parent.expect("parent").trace_id,
            TraceId::new(TRACE_ID)
        );
        assert_eq!(header(&resp, "x-b3-sampled"), Some("0"));
        assert!(header(&resp, "traceparent").expect("tp").ends_with("-00"));
        text(resp).await;
        let resp = call(plain(), t, request(&[("b3", "0")])).await;
        assert_eq!(injected(&resp).sampled, Some(false));
        text(resp).await;
        assert!(sink.take().is_empty());
    }

    #[tokio::test]
    async fn a_callers_yes_is_honoured_at_0_percent() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 0.0, &sink));
        for h in [("x-b3-sampled", "1"), ("x-b3-flags", "1"), ("b3", "d")] {
            let resp = call(plain(), t.clone(), request(&[h])).await;
            assert_eq!(injected(&resp).sampled, Some(true), "{h:?}");
            text(resp).await;
        }
        assert_eq!(sink.take().len(), 3);
    }

    #[tokio::test]
    async fn percentage_0_never_and_100_always_samples() {
        let sink = Arc::new(Collect::default());
        for _ in 0..50 {
            let resp = call(
                plain(),
                Some(tracer(SpanKind::Client, 0.0, &sink)),
                request(&[]),
            )
            .await;
            assert_eq!(header(&resp, "x-b3-sampled"), Some("0"));
            assert!(header(&resp, "traceparent").expect("tp").ends_with("-00"));
            text(resp).await;
        }
        assert!(sink.take().is_empty());
        for _ in 0..50 {
            let resp = call(
                plain(),
                Some(tracer(SpanKind::Client, 100.0, &sink)),
                request(&[]),
            )
            .await;
            assert_eq!(header(&resp, "x-b3-sampled"), Some("1"));
            text(resp).await;
        }
        assert_eq!(sink.take().len(), 50);
    }

    #[tokio::test]
    async fn client_span_tags() {
        let sink = Arc::new(Collect::default());
        let mut t = Arc::into_inner(tracer(SpanKind::Client, 100.0, &sink)).expect("one owner");
        let header = |name: &'static str, default: Option<&str>| TagValue::Header {
            name: http::HeaderName::from_static(name),
            default: default.map(str::to_owned),
        };
        t.custom_tags = Arc::from([
            CustomTag {
                name: "team".into(),
                value: TagValue::Literal("books".into()),
            },
            CustomTag {
                name: "tenant".into(),
                value: header("x-tenant", Some("none")),
            },
            CustomTag {
                name: "user".into(),
                value: header("x-user", Some("anonymous")),
            },
            CustomTag {
                name: "absent".into(),
                value: header("x-absent", None),
            },
        ]);
        let svc = upstream(|resp| {
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            let ext = resp.extensions_mut();
            ext.insert(peers("reviews.demo.svc.cluster.local"));
            ext.insert(Upstream("10.0.1.9:9080".parse().expect("addr")));
            ext.insert(ResponseFlag::UpstreamConnectionFailure);
        });
        let mut req = request(&[("user-agent", "curl/8"), ("x-tenant", "acme")]);
        *req.version_mut() = Version::HTTP_2;
        let resp = call(svc, Some(Arc::new(t)), req).await;
        let id = resp.headers()["x-request-id"]
            .to_str()
            .expect("id")
            .to_owned();
        assert_eq!(text(resp).await, "got 5");
        let spans = sink.take();
        let s = &spans[0];
        assert_eq!(s.name, "reviews.demo.svc.cluster.local:9080/*");
        assert_eq!(&*s.local_service, "productpage.demo");
        assert_eq!(s.local_ip, Some("10.0.0.7".parse().expect("ip")));
        assert_eq!(s.remote, Some("10.0.1.9:9080".parse().expect("addr")));
        assert!(s.error);
        let cluster = "outbound|9080||reviews.demo.svc.cluster.local";
        let want: Vec<(&str, &str)> = vec![
            ("http.method", "POST"),
            ("http.url", "http://reviews:9080/api/v1?x=1"),
            ("http.protocol", "HTTP/2"),
            ("component", "proxy"),
            ("node_id", "node-a"),
            ("istio.mesh_id", "cluster.local"),
            ("istio.canonical_service", "productpage"),
            ("istio.canonical_revision", "v1"),
            ("istio.namespace", "demo"),
            ("peer.address", "10.0.0.9"),
            ("guid:x-request-id", &id),
            ("user_agent", "curl/8"),
            ("team", "books"),
            ("tenant", "acme"),
            ("user", "anonymous"),
            ("http.status_code", "503"),
            ("response_flags", "UF"),
            ("upstream_cluster", cluster),
            ("upstream_cluster.name", cluster),
            ("request_size", "5"),
            ("response_size", "5"),
            ("upstream.address", "10.0.1.9:9080"),
            ("error", "true"),
        ];
        let got: Vec<(&str, &str)> = s.tags.iter().map(|(k, v)| (&**k, v.as_str())).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn server_span_names_the_authority_and_reads_grpc_trailers() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Server, 100.0, &sink));
        let svc = tower::service_fn(|_req: Request<Body>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("14"));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"abc"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut resp =
                Response::new(body::boxed(StreamBody::new(futures::stream::iter(frames))));
            resp.extensions_mut().insert(peers(UNKNOWN));
            Ok::<_, Infallible>(resp)
        });
        let resp = call(svc, t, request(&[("content-type", "application/grpc")])).await;
        text(resp).await;
        let spans = sink.take();
        let s = &spans[0];
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(
            s.name, "reviews:9080/*",
            "the authority's host, for an unknown service"
        );
        assert_eq!(s.remote, Some("10.0.0.9:41000".parse().expect("addr")));
        assert_eq!(s.tag("upstream_cluster"), Some("inbound|9080||"));
        assert_eq!(s.tag("grpc.status_code"), Some("14"));
        assert_eq!(s.tag("http.status_code"), Some("200"));
        assert_eq!(s.tag("response_flags"), Some("-"));
        assert_eq!(s.tag("response_size"), Some("3"));
        assert_eq!(s.tag("error"), None);
        assert!(!s.error);
        assert_eq!(s.tag("user_agent"), None);
        assert_eq!(s.tag("upstream.address"), None);
    }

    #[tokio::test]
    async fn a_span_is_submitted_once_when_the_body_is_dropped_early() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 100.0, &sink));
        let svc = tower::service_fn(|_req: Request<Body>| async {
            // A body that never ends on its own.
            let pending = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
            Ok::<_, Infallible>(Response::new(body::boxed(StreamBody::new(pending))))
        });
        let resp = call(svc, t, request(&[])).await;
        assert!(sink.take().is_empty());
        drop(resp);
        let spans = sink.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].tag("response_flags"), Some("DC"));
        assert!(spans[0].error);
    }

    #[tokio::test]
    async fn a_span_is_submitted_when_the_client_leaves_before_the_response() {
        let sink = Arc::new(Collect::default());
        let t = Some(tracer(SpanKind::Client, 100.0, &sink));
        let never = tower::service_fn(|_req: Request<Body>| {
            futures::future::pending::<Result<Response<Body>, Infallible>>()
        });
        let fut = Trace::new(never, Arc::new(t)).oneshot(request(&[]));
        let polled = tokio::time::timeout(std::time::Duration::from_millis(10), fut).await;
        assert!(polled.is_err(), "still waiting");
        let spans = sink.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].tag("http.status_code"), Some("0"));
        assert_eq!(spans[0].tag("response_flags"), Some("DC"));
    }

    #[tokio::test]
    async fn without_a_tracer_nothing_is_touched() {
        fn stackable<S: HttpService>(_: &S) {}
        stackable(&Trace::new(plain(), Arc::new(None::<Arc<Tracer>>)));
        let resp = call(plain(), None, request(&[("b3", "1")])).await;
        let names: Vec<&str> = resp
            .headers()
            .keys()
            .map(http::HeaderName::as_str)
            .collect();
        assert_eq!(names, ["b3"]);
        assert_eq!(text(resp).await, "got 5");
    }

    #[tokio::test]
    async fn a_proxy_writes_its_providers_format_and_every_format_the_request_had() {
        let sink = Arc::new(Collect::default());
        let with = |propagation: Propagation| {
            let mut t = Arc::into_inner(tracer(SpanKind::Client, 100.0, &sink)).expect("one owner");
            t.propagation = propagation;
            Some(Arc::new(t))
        };
        // A new trace, Zipkin's way: B3 headers only.
        let resp = call(plain(), with(Propagation::B3), request(&[])).await;
        assert!(header(&resp, "traceparent").is_none());
        assert!(header(&resp, "x-b3-traceid").is_some() && header(&resp, "x-b3-spanid").is_some());
        // OpenTelemetry's way: traceparent only.
        let resp = call(plain(), with(Propagation::W3C), request(&[])).await;
        assert!(header(&resp, "traceparent").is_some());
        assert!(header(&resp, "x-b3-traceid").is_none());
        // A caller's W3C context under a Zipkin provider: both, the W3C one updated.
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let resp = call(
            plain(),
            with(Propagation::B3),
            request(&[("traceparent", &tp)]),
        )
        .await;
        let sent = injected(&resp).parent.expect("continued");
        assert_eq!(header(&resp, "x-b3-traceid"), Some(TRACE));
        assert_eq!(
            header(&resp, "traceparent"),
            Some(format!("00-{TRACE}-{}-01", sent.span_id).as_str())
        );
    }
}
