//! OTLP over gRPC: spans become an `ExportTraceServiceRequest` (one resource per local service,
//! `service.name` as OpenTelemetry names it) sent to `TraceService/Export` over plaintext HTTP/2.
//! The proto types stay in this module.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_l7::trace::{Span, SpanKind};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{self as proto, ResourceSpans, ScopeSpans, span, status},
};
use tonic::transport::{Channel, Endpoint};

use super::Error;

/// An export request, as [`request`] makes it.
pub(super) type Request = ExportTraceServiceRequest;

pub(super) struct Client {
    timeout: Duration,
    /// One channel per collector address; a new address gets a new channel.
    channel: Option<(SocketAddr, TraceServiceClient<Channel>)>,
}

impl Client {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            channel: None,
        }
    }

    pub(super) fn reset(&mut self) {
        self.channel = None;
    }

    pub(super) async fn export(
        &mut self,
        addr: SocketAddr,
        request: ExportTraceServiceRequest,
    ) -> Result<(), Error> {
        let mut client = match self.channel.take() {
            Some((a, c)) if a == addr => c,
            _ => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(self.timeout)
                    .timeout(self.timeout);
                TraceServiceClient::new(endpoint.connect_lazy())
            }
        };
        client.export(request).await?;
        self.channel = Some((addr, client));
        Ok(())
    }
}

/// The OTLP request for `spans`.
pub fn request(spans: &[Span]) -> ExportTraceServiceRequest {
    let mut resource_spans: Vec<ResourceSpans> = Vec::new();
    let mut services: Vec<&str> = Vec::new();
    for s in spans {
        let i = services
            .iter()
            .position(|n| *n == &*s.local_service)
            .unwrap_or_else(|| {
                services.push(&s.local_service);
                resource_spans.push(ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![string("service.name", s.local_service.to_string())],
                        ..Resource::default()
                    }),
                    scope_spans: vec![ScopeSpans::default()],
                    schema_url: String::new(),
                });
                services.len() - 1
            });
        resource_spans[i].scope_spans[0].spans.push(convert(s));
    }
    ExportTraceServiceRequest { resource_spans }
}

fn convert(s: &Span) -> proto::Span {
    let kind = match s.kind {
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Server => span::SpanKind::Server,
    };
    let code = if s.error {
        status::StatusCode::Error
    } else {
        status::StatusCode::Unset
    };
    proto::Span {
        trace_id: s.trace_id.get().to_be_bytes().to_vec(),
        span_id: s.span_id.0.to_be_bytes().to_vec(),
        parent_span_id: s
            .parent_id
            .map(|p| p.0.to_be_bytes().to_vec())
            .unwrap_or_default(),
        name: s.name.clone(),
        kind: kind.into(),
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.start + s.duration),
        attributes: s
            .tags
            .iter()
            .map(|(k, v)| string(k, v.to_string()))
            .collect(),
        status: Some(proto::Status {
            message: String::new(),
            code: code.into(),
        }),
        ..proto::Span::default()
    }
}

fn string(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
