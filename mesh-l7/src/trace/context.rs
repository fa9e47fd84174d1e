//! Trace context propagation in the headers Envoy reads and writes: W3C Trace Context
//! (`traceparent`; `tracestate` is forwarded untouched) and B3, single (`b3`) and multi
//! (`x-b3-*`). A malformed header is ignored as if absent, never an error: the request starts a
//! new trace instead.

use http::{HeaderMap, HeaderValue, header::HeaderName};

use super::{
    Propagation,
    span::{SpanId, TraceId},
};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The caller's span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

/// What a request's headers say about its trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's span, when a format carried valid ids.
    pub parent: Option<Parent>,
    /// The caller's sampling decision (B3 debug counts as sampled); `None`: this proxy decides.
    pub sampled: Option<bool>,
}

/// The context of the span this proxy makes, as it goes on to the next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
}

impl SpanContext {
    /// A new span under `parent` (a new trace without one), with a new span id.
    pub fn child_of(parent: Option<Parent>, sampled: bool) -> Self {
        Self {
            trace_id: parent.map_or_else(TraceId::random, |p| p.trace_id),
            span_id: SpanId::random(),
            parent_id: parent.map(|p| p.span_id),
            sampled,
        }
    }
}

/// Reads the trace context: `traceparent` first, then `b3`, then the `x-b3-*` headers; the first
/// well-formed one wins.
pub fn extract(headers: &HeaderMap) -> Incoming {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(mut found) = text(&TRACEPARENT).and_then(parse_traceparent) {
        // A 64-bit B3 trace id travels in `traceparent` zero-padded; when the B3 headers that
        // came with it carry the same id in 64 bits, keep that width, so every hop reports the
        // trace under one id.
        if let Some(p) = &mut found.parent
            && p.trace_id.get() >> 64 == 0
        {
            let b3_trace =
                text(&X_B3_TRACEID).or_else(|| text(&B3).and_then(|b| b.split('-').next()));
            if let Some(t) = b3_trace
                && t.len() == 16
                && u64::from_str_radix(t, 16).is_ok_and(|id| u128::from(id) == p.trace_id.get())
            {
                p.trace_id = TraceId::b3_64(u64::from_str_radix(t, 16).unwrap_or_default());
            }
        }
        return found;
    }
    if let Some(found) = text(&B3).and_then(parse_b3_single) {
        return found;
    }
    parse_b3_multi(
        text(&X_B3_TRACEID),
        text(&X_B3_SPANID),
        text(&X_B3_SAMPLED),
        text(&X_B3_FLAGS),
    )
}

/// Writes `ctx` for the next hop, in every format the request came with (replacing the caller's
/// values) and those `propagation` adds: `traceparent`, the `x-b3-*` headers, `b3` (only when
/// the request had one). `tracestate` and `x-b3-flags` stay as they are. With nothing to write
/// otherwise, `traceparent`.
pub fn inject(ctx: &SpanContext, headers: &mut HeaderMap, propagation: Propagation) {
    let flag = if ctx.sampled { "1" } else { "0" };
    let b3_multi = propagation.b3 || headers.contains_key(X_B3_TRACEID);
    let b3_single = headers.contains_key(B3);
    let w3c = propagation.w3c || headers.contains_key(TRACEPARENT) || !(b3_multi || b3_single);
    if w3c {
        let mut v = Text::new();
        v.push(b"00-")
            .hex(ctx.trace_id.get(), 32)
            .push(b"-")
            .span(ctx.span_id)
            .push(b"-0")
            .push(flag.as_bytes());
        headers.insert(TRACEPARENT, v.value());
    }
    if b3_multi {
        headers.insert(X_B3_TRACEID, Text::new().trace(ctx.trace_id).value());
        headers.insert(X_B3_SPANID, Text::new().span(ctx.span_id).value());
        match ctx.parent_id {
            Some(p) => headers.insert(X_B3_PARENTSPANID, Text::new().span(p).value()),
            None => headers.remove(X_B3_PARENTSPANID),
        };
        headers.insert(X_B3_SAMPLED, HeaderValue::from_static(flag));
    }
    if b3_single {
        let mut v = Text::new();
        v.trace(ctx.trace_id)
            .push(b"-")
            .span(ctx.span_id)
            .push(b"-")
            .push(flag.as_bytes());
        if let Some(p) = ctx.parent_id {
            v.push(b"-").span(p);
        }
        headers.insert(B3, v.value());
    }
}

/// A header value of hex digits and dashes, written without a formatter or an intermediate
/// `String`: it runs on every request a tracer sees, sampled or not.
struct Text {
    bytes: [u8; 64],
    len: usize,
}

impl Text {
    fn new() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) -> &mut Self {
        self.bytes[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
        self
    }

    /// The low `digits` hex digits of `n`, lower case, zero-padded.
    fn hex(&mut self, n: u128, digits: usize) -> &mut Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in self.bytes[self.len..self.len + digits]
            .iter_mut()
            .enumerate()
        {
            let shift = 4 * (digits - 1 - i);
            *b = DIGITS[usize::try_from((n >> shift) & 0xf).unwrap_or_default()];
        }
        self.len += digits;
        self
    }

    /// As B3 writes it: 16 digits for a 64-bit id, else 32 ([`TraceId`]'s `Display`).
    fn trace(&mut self, id: TraceId) -> &mut Self {
        self.hex(id.get(), if id.is_64() { 16 } else { 32 })
    }

    fn span(&mut self, id: SpanId) -> &mut Self {
        self.hex(u128::from(id.0), 16)
    }

    fn value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.bytes[..self.len])
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// The request's `x-request-id`, added first (a random UUID, version 4) when it has none.
pub fn ensure_request_id(headers: &mut HeaderMap) -> &HeaderValue {
    headers.entry(X_REQUEST_ID).or_insert_with(uuid_v4)
}

/// A random UUID (version 4, RFC 9562) in its text form.
pub fn uuid_v4() -> HeaderValue {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let n = u128::from_be_bytes(b);
    let mut v = Text::new();
    v.hex(n >> 96, 8)
        .push(b"-")
        .hex(n >> 80, 4)
        .push(b"-")
        .hex(n >> 64, 4)
        .push(b"-")
        .hex(n >> 48, 4)
        .push(b"-")
        .hex(n, 12);
    v.value()
}

/// `s` as a number of exactly `digits` hex digits: lower case only (W3C), or either case (B3,
/// whose senders are not all strict). `from_str_radix` alone would take a sign.
fn hex(s: &str, digits: usize, lower_only: bool) -> Option<u128> {
    let ok = |c: u8| {
        c.is_ascii_digit()
            || (b'a'..=b'f').contains(&c)
            || (!lower_only && (b'A'..=b'F').contains(&c))
    };
    if s.len() != digits || !s.bytes().all(ok) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// A span id: 16 hex digits, not all zero.
fn parse_span_id(s: &str, lower_only: bool) -> Option<SpanId> {
    let n = hex(s, 16, lower_only).filter(|n| *n != 0)?;
    u64::try_from(n).ok().map(SpanId)
}

/// A B3 trace id: 16 or 32 hex digits, not all zero.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let n = hex(s, s.len(), false).filter(|n| *n != 0)?;
    match s.len() {
        16 => u64::try_from(n).ok().map(TraceId::b3_64),
        32 => Some(TraceId::new(n)),
        _ => None,
    }
}

/// `{version}-{trace-id}-{parent-id}-{flags}`, lower-case hex. Version `00` has exactly these
/// four fields; a later version may append more after a dash; version `ff` is invalid.
fn parse_traceparent(s: &str) -> Option<Incoming> {
    let s = s.trim();
    let (head, rest) = (s.get(..55)?, &s[55..]);
    let mut fields = head.split('-');
    let mut field = |digits| hex(fields.next()?, digits, true);
    let (version, trace, span, flags) = (field(2)?, field(32)?, field(16)?, field(2)?);
    let extra_ok = match version {
        0 => rest.is_empty(),
        0xff => false,
        _ => rest.is_empty() || rest.starts_with('-'),
    };
    if !extra_ok || trace == 0 || span == 0 {
        return None;
    }
    Some(Incoming {
        parent: Some(Parent {
            trace_id: TraceId::new(trace),
            span_id: SpanId(u64::try_from(span).ok()?),
        }),
        sampled: Some(flags & 1 == 1),
    })
}

/// A B3 sampling state: `1`, `0`, or `d` (debug, which is sampled).
fn b3_sampling(s: &str) -> Option<bool> {
    match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// `{trace-id}-{span-id}[-{sampling}[-{parent-span-id}]]`, or a sampling state alone.
fn parse_b3_single(s: &str) -> Option<Incoming> {
    let s = s.trim();
    if let Some(sampled) = b3_sampling(s) {
        return Some(Incoming {
            parent: None,
            sampled: Some(sampled),
        });
    }
    let mut parts = s.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = parse_span_id(parts.next()?, false)?;
    let sampled = match parts.next() {
        Some(p) => Some(b3_sampling(p)?),
        None => None,
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent, false)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        parent: Some(Parent { trace_id, span_id }),
        sampled,
    })
}

/// `x-b3-traceid` and `x-b3-spanid` (both, or no parent), `x-b3-sampled` (`1`/`0`/`true`/
/// `false`), `x-b3-flags: 1` (debug: sampled, whatever `x-b3-sampled` says).
fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Incoming {
    let trace = trace.map(str::trim).and_then(b3_trace_id);
    let span = span.and_then(|s| parse_span_id(s.trim(), false));
    let parent = match (trace, span) {
        (Some(trace_id), Some(span_id)) => Some(Parent { trace_id, span_id }),
        _ => None,
    };
    let sampled = match sampled.map(str::trim) {
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        _ => None,
    };
    let debug = flags.is_some_and(|f| f.trim() == "1");
    Incoming {
        parent,
        sampled: if debug { Some(true) } else { sampled },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const TRACE_ID: u128 = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736;
    const SPAN: &str = "00f067aa0ba902b7";
    const SPAN_ID: SpanId = SpanId(0x00f0_67aa_0ba9_02b7);

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    fn parent(trace_id: TraceId) -> Parent {
        Parent {
            trace_id,
            span_id: SPAN_ID,
        }
    }

    fn continued(sampled: Option<bool>) -> Incoming {
        Incoming {
            parent: Some(parent(TraceId::new(TRACE_ID))),
            sampled,
        }
    }

    #[test]
    fn w3c_traceparent() {
        let ok = |v: &str| extract(&headers(&[("traceparent", v)]));
        assert_eq!(ok(&format!("00-{TRACE}-{SPAN}-01")), continued(Some(true)));
        assert_eq!(ok(&format!("00-{TRACE}-{SPAN}-00")), continued(Some(false)));
        assert_eq!(
            ok(&format!("00-{TRACE}-{SPAN}-09")),
            continued(Some(true)),
            "other flag bits"
        );
        // A later version may carry more fields; we read the four we know.
        assert_eq!(
            ok(&format!("01-{TRACE}-{SPAN}-01-what-ever")),
            continued(Some(true))
        );
        assert_eq!(ok(&format!("01-{TRACE}-{SPAN}-01")), continued(Some(true)));
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        let bad = [
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("01-{TRACE}-{SPAN}-01extra"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{}-01", SPAN.to_uppercase()),
            format!("0-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{TRACE}a-{SPAN}-01"),
            format!("00-{TRACE}-{}-01", &SPAN[1..]),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}-{SPAN}-0g"),
            format!("00_{TRACE}_{SPAN}_01"),
            format!("00-+{}-{SPAN}-01", &TRACE[1..]),
            "garbage".to_owned(),
            String::new(),
        ];
        for v in &bad {
            assert_eq!(
                extract(&headers(&[("traceparent", v)])),
                Incoming::default(),
                "{v:?}"
            );
        }
    }

    #[test]
    fn b3_single() {
        let ok = |v: &str| extract(&headers(&[("b3", v)]));
        assert_eq!(ok(&format!("{TRACE}-{SPAN}")), continued(None));
        assert_eq!(ok(&format!("{TRACE}-{SPAN}-1")), continued(Some(true)));
        assert_eq!(ok(&format!("{TRACE}-{SPAN}-0")), continued(Some(false)));
        assert_eq!(ok(&format!("{TRACE}-{SPAN}-d")), continued(Some(true)));
        assert_eq!(
            ok(&format!("{TRACE}-{SPAN}-1-0000000000000001")),
            continued(Some(true))
        );
        assert_eq!(
            ok(&format!("a3ce929d0e0e4736-{SPAN}-1")),
            Incoming {
                parent: Some(parent(TraceId::b3_64(0xa3ce_929d_0e0e_4736))),
                sampled: Some(true)
            },
            "64-bit trace id"
        );
        for (v, sampled) in [("0", false), ("1", true), ("d", true)] {
            assert_eq!(
                ok(v),
                Incoming {
                    parent: None,
                    sampled: Some(sampled)
                },
                "{v}"
            );
        }
    }

    #[test]
    fn malformed_b3_single_is_ignored() {
        let bad = [
            format!("{}-{SPAN}-1", "0".repeat(32)),
            format!("{TRACE}-{}-1", "0".repeat(16)),
            format!("{}-{SPAN}-1", &TRACE[..20]),
            format!("{TRACE}-{SPAN}-2"),
            format!("{TRACE}-{SPAN}-1-00"),
            format!("{TRACE}-{SPAN}-1-{}", "0".repeat(16)),
            format!("{TRACE}-{SPAN}-1-{SPAN}-x"),
            TRACE.to_owned(),
            "true".to_owned(),
            "x".to_owned(),
        ];
        for v in &bad {
            assert_eq!(
                extract(&headers(&[("b3", v)])),
                Incoming::default(),
                "{v:?}"
            );
        }
    }

    #[test]
    fn b3_multi() {
        let multi = |extra: &[(&'static str, &str)]| {
            let mut pairs = vec![("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)];
            pairs.extend_from_slice(extra);
            extract(&headers(&pairs))
        };
        assert_eq!(multi(&[]), continued(None));
        assert_eq!(multi(&[("x-b3-sampled", "1")]), continued(Some(true)));
        assert_eq!(multi(&[("x-b3-sampled", "true")]), continued(Some(true)));
        assert_eq!(multi(&[("x-b3-sampled", "0")]), continued(Some(false)));
        assert_eq!(multi(&[("x-b3-sampled", "false")]), continued(Some(false)));
        assert_eq!(multi(&[("x-b3-sampled", "maybe")]), continued(None));
        assert_eq!(
            multi(&[("x-b3-sampled", "0"), ("x-b3-flags", "1")]),
            continued(Some(true)),
            "debug wins"
        );
        assert_eq!(
            multi(&[("x-b3-parentspanid", "0000000000000001")]),
            continued(None)
        );
        // Upper case is taken from B3 senders (W3C refuses it).
        assert_eq!(
            extract(&headers(&[
                ("x-b3-traceid", &TRACE.to_uppercase()),
                ("x-b3-spanid", SPAN)
            ])),
            continued(None)
        );
        assert_eq!(
            extract(&headers(&[
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", SPAN)
            ])),
            Incoming {
                parent: Some(parent(TraceId::b3_64(0xa3ce_929d_0e0e_4736))),
                sampled: None
            }
        );
    }

    #[test]
    fn malformed_b3_multi_is_ignored_but_a_sampling_decision_stands() {
        let zeros = "0".repeat(32);
        let cases: [&[(&'static str, &str)]; 6] = [
            &[("x-b3-traceid", TRACE)],
            &[("x-b3-spanid", SPAN)],
            &[("x-b3-traceid", &zeros), ("x-b3-spanid", SPAN)],
            &[("x-b3-traceid", TRACE), ("x-b3-spanid", "0000000000000000")],
            &[("x-b3-traceid", &TRACE[..30]), ("x-b3-spanid", SPAN)],
            &[("x-b3-traceid", TRACE), ("x-b3-spanid", &SPAN[..15])],
        ];
        for pairs in cases {
            assert_eq!(extract(&headers(pairs)), Incoming::default(), "{pairs:?}");
        }
        assert_eq!(
            extract(&headers(&[("x-b3-sampled", "0")])),
            Incoming {
                parent: None,
                sampled: Some(false)
            }
        );
    }

    #[test]
    fn w3c_then_b3_single_then_multi() {
        let other = "11111111111111111111111111111111";
        let w3c = format!("00-{TRACE}-{SPAN}-01");
        let single = format!("{other}-{SPAN}-0");
        let h = headers(&[
            ("traceparent", &w3c),
            ("b3", &single),
            ("x-b3-traceid", other),
            ("x-b3-spanid", SPAN),
        ]);
        assert_eq!(extract(&h), continued(Some(true)));
        let h = headers(&[
            ("traceparent", "bad"),
            ("b3", &format!("{TRACE}-{SPAN}-0")),
            ("x-b3-traceid", other),
            ("x-b3-spanid", SPAN),
        ]);
        assert_eq!(
            extract(&h),
            continued(Some(false)),
            "a bad traceparent falls through"
        );
        let h = headers(&[
            ("b3", "bad"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
        ]);
        assert_eq!(extract(&h), continued(None));
    }

    #[test]
    fn a_64_bit_b3_trace_keeps_its_width_at_the_next_hop() {
        // What this proxy injected for a 64-bit B3 trace, read by the next hop.
        let ctx = SpanContext {
            trace_id: TraceId::b3_64(0xa3ce_929d_0e0e_4736),
            span_id: SpanId(0xabc),
            parent_id: None,
            sampled: true,
        };
        let mut h = HeaderMap::new();
        inject(
            &ctx,
            &mut h,
            Propagation {
                w3c: true,
                b3: true,
            },
        );
        let got = extract(&h).parent.expect("continued");
        assert!(got.trace_id.is_64(), "{got:?}");
        assert_eq!(got.trace_id.to_string(), "a3ce929d0e0e4736");
        // A 128-bit W3C id whose high half is zero, without B3, stays 128-bit.
        let h = headers(&[(
            "traceparent",
            "00-0000000000000000a3ce929d0e0e4736-0000000000000abc-01",
        )]);
        assert!(!extract(&h).parent.expect("continued").trace_id.is_64());
    }

    #[test]
    fn inject_writes_every_format_and_keeps_b3_width() {
        let ctx = SpanContext {
            trace_id: TraceId::b3_64(0xa3ce_929d_0e0e_4736),
            span_id: SpanId(0xabc),
            parent_id: Some(SPAN_ID),
            sampled: true,
        };
        let mut h = headers(&[
            ("b3", "whatever"),
            ("tracestate", "vendor=x"),
            ("x-b3-flags", "1"),
            ("x-b3-sampled", "0"),
        ]);
        inject(
            &ctx,
            &mut h,
            Propagation {
                w3c: true,
                b3: true,
            },
        );
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(
            get("traceparent").as_deref(),
            Some("00-0000000000000000a3ce929d0e0e4736-0000000000000abc-01")
        );
        assert_eq!(get("x-b3-traceid").as_deref(), Some("a3ce929d0e0e4736"));
        assert_eq!(get("x-b3-spanid").as_deref(), Some("0000000000000abc"));
        assert_eq!(get("x-b3-parentspanid").as_deref(), Some(SPAN));
        assert_eq!(get("x-b3-sampled").as_deref(), Some("1"));
        assert_eq!(
            get("b3").as_deref(),
            Some("a3ce929d0e0e4736-0000000000000abc-1-00f067aa0ba902b7")
        );
        assert_eq!(get("tracestate").as_deref(), Some("vendor=x"));
        assert_eq!(get("x-b3-flags").as_deref(), Some("1"));
        assert_eq!(h.get_all("x-b3-sampled").iter().count(), 1, "replaced");

        let root = SpanContext {
            trace_id: TraceId::new(TRACE_ID),
            span_id: SPAN_ID,
            parent_id: None,
            sampled: false,
        };
        let mut h = headers(&[("x-b3-parentspanid", "0000000000000001")]);
        inject(
            &root,
            &mut h,
            Propagation {
                w3c: true,
                b3: true,
            },
        );
        assert_eq!(h["traceparent"], format!("00-{TRACE}-{SPAN}-00").as_str());
        assert_eq!(h["x-b3-traceid"], TRACE);
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(!h.contains_key("x-b3-parentspanid"), "a root has no parent");
        assert!(!h.contains_key("b3"), "b3 only when the request had it");
        // What was injected reads back as the same context.
        assert_eq!(
            extract(&h),
            Incoming {
                parent: Some(Parent {
                    trace_id: root.trace_id,
                    span_id: root.span_id
                }),
                sampled: Some(false)
            }
        );
    }

    #[test]
    fn child_of_keeps_the_trace_and_links_the_parent() {
        let p = parent(TraceId::new(TRACE_ID));
        let child = SpanContext::child_of(Some(p), true);
        assert_eq!(child.trace_id, p.trace_id);
        assert_eq!(child.parent_id, Some(p.span_id));
        assert_ne!(child.span_id, p.span_id);
        let root = SpanContext::child_of(None, false);
        assert_ne!(root.trace_id.get(), 0);
        assert!(!root.trace_id.is_64());
        assert_eq!(root.parent_id, None);
    }

    #[test]
    fn hand_written_hex_matches_the_formatter() {
        for _ in 0..1000 {
            let (t, s) = (TraceId::random(), SpanId::random());
            let t64 = TraceId::b3_64(fastrand::u64(1..));
            for id in [t, t64] {
                assert_eq!(Text::new().trace(id).value(), id.to_string().as_str());
            }
            assert_eq!(Text::new().span(s).value(), s.to_string().as_str());
            assert_eq!(
                Text::new().hex(t.get(), 32).value(),
                format!("{:032x}", t.get()).as_str()
            );
        }
    }

    #[test]
    fn request_id_is_kept_or_a_uuid_v4() {
        let mut h = headers(&[("x-request-id", "mine")]);
        assert_eq!(ensure_request_id(&mut h), "mine");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h)
            .to_str()
            .expect("ascii")
            .to_owned();
        assert_eq!(h["x-request-id"], id.as_str());
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(groups[2].starts_with('4'), "version 4: {id}");
        assert!("89ab".contains(&groups[3][..1]), "RFC variant: {id}");
        assert_ne!(uuid_v4(), uuid_v4());
    }
}
