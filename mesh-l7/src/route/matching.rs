//! Which route a request takes: the first route with a matching entry (tables are ordered by the
//! controller), and, for rewrites, how much of the path its path match consumed.

use std::{borrow::Cow, collections::BTreeMap};

use http::HeaderMap;
use serde::Serialize;

use super::Route;

/// A compiled string match.
#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    /// Plain string prefix (VirtualService `prefix`).
    Prefix(String),
    /// Gateway API `PathPrefix`: element-wise; stored without a trailing `/` (except "/").
    PathPrefix(String),
    /// Anchored: the whole value must match.
    Regex(regex::Regex),
    /// Headers and query parameters: present with any value.
    Present,
}

impl StringMatch {
    /// A `PathPrefix` match, normalized (a trailing `/` is ignored, as the spec says).
    pub fn path_prefix(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        Self::PathPrefix(if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        })
    }

    /// An anchored regex (RE2 syntax).
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        regex::Regex::new(&format!("^(?:{pattern})$")).map(Self::Regex)
    }

    /// Whether `value` matches; for prefix kinds, also how many bytes the prefix covered.
    pub fn matches(&self, value: &str) -> Option<usize> {
        match self {
            Self::Exact(s) => (value == s).then_some(value.len()),
            Self::Prefix(p) => value.starts_with(p.as_str()).then_some(p.len()),
            // Covers nothing, so a prefix rewrite keeps the path's leading `/`.
            Self::PathPrefix(p) if p == "/" => value.starts_with('/').then_some(0),
            Self::PathPrefix(p) => {
                let rest = value.strip_prefix(p.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some(p.len())
            }
            Self::Regex(r) => r.is_match(value).then_some(value.len()),
            Self::Present => Some(0),
        }
    }

    fn prefix_kind(&self) -> Option<PrefixKind> {
        match self {
            Self::Prefix(_) => Some(PrefixKind::String),
            Self::PathPrefix(_) => Some(PrefixKind::Segments),
            _ => None,
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            Self::Exact(v) => m.serialize_entry("exact", v)?,
            Self::Prefix(v) => m.serialize_entry("prefix", v)?,
            Self::PathPrefix(v) => m.serialize_entry("pathPrefix", v)?,
            Self::Regex(r) => {
                let p = r.as_str();
                m.serialize_entry(
                    "regex",
                    p.strip_prefix("^(?:")
                        .and_then(|p| p.strip_suffix(")$"))
                        .unwrap_or(p),
                )?;
            }
            Self::Present => m.serialize_entry("present", &true)?,
        }
        m.end()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "header_name")]
    pub name: http::HeaderName,
    pub value: StringMatch,
    /// Matches when the header does not match (VirtualService `withoutHeaders`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

fn header_name<S: serde::Serializer>(n: &http::HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_str())
}

#[derive(Clone, Debug, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub value: StringMatch,
}

/// Every set field must match.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryMatch>,
    /// Service port the request arrived on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

/// The calling workload, as far as the source node knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Client<'a> {
    pub namespace: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// What matching looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Service port the request arrived on.
    pub port: u16,
    pub client: Client<'a>,
}

impl<'a> RequestView<'a> {
    pub fn of<B>(req: &'a http::Request<B>, port: u16, client: Client<'a>) -> Self {
        Self {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            port,
            client,
        }
    }
}

/// How a prefix path match matched, for prefix rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Bytes of the path the prefix covered.
    pub len: usize,
    pub kind: PrefixKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixKind {
    /// Plain string prefix: a rewrite concatenates.
    String,
    /// Gateway API `PathPrefix`: a rewrite joins path segments.
    Segments,
}

/// The route a request took.
#[derive(Clone, Copy, Debug)]
pub struct Matched<'r> {
    pub route: &'r Route,
    /// Position of `route` in the table.
    pub index: usize,
    /// The prefix path match that matched, if the matching entry had one.
    pub prefix: Option<PrefixMatch>,
}

/// The first route (in table order) one of whose matches accepts the request.
pub fn find<'r>(routes: &'r [Route], req: &RequestView<'_>) -> Option<Matched<'r>> {
    for (index, route) in routes.iter().enumerate() {
        if route.matches.is_empty() {
            return Some(Matched {
                route,
                index,
                prefix: None,
            });
        }
        for m in &route.matches {
            if let Some(prefix) = m.accepts(req) {
                return Some(Matched {
                    route,
                    index,
                    prefix,
                });
            }
        }
    }
    None
}

impl RouteMatch {
    /// `None`: no match; `Some(prefix)`: a match, with how the path matched when by prefix.
    pub fn accepts(&self, req: &RequestView<'_>) -> Option<Option<PrefixMatch>> {
        if self.port.is_some_and(|p| p != req.port) {
            return None;
        }
        if let Some(ns) = &self.source_namespace
            && req.client.namespace != Some(ns.as_str())
        {
            return None;
        }
        if !self.source_labels.is_empty() {
            let labels = req.client.labels?;
            if !self
                .source_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
            {
                return None;
            }
        }
        if let Some(m) = &self.method {
            m.matches(req.method)?;
        }
        let prefix = match &self.path {
            Some(m) => {
                let len = m.matches(req.path)?;
                m.prefix_kind().map(|kind| PrefixMatch { len, kind })
            }
            None => None,
        };
        for h in &self.headers {
            if h.accepts(req.headers) == h.invert {
                return None;
            }
        }
        for q in &self.query_params {
            let found = query_values(req.query, &q.name).any(|v| q.value.matches(&v).is_some());
            if !found {
                return None;
            }
        }
        Some(prefix)
    }
}

impl HeaderMatch {
    /// Whether any value of the header matches (ignoring `invert`).
    fn accepts(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(&self.name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| self.value.matches(v).is_some()))
    }
}

/// Values of query parameter `name` (percent-decoded, `+` as space), in order.
pub fn query_values<'q>(
    query: Option<&'q str>,
    name: &'q str,
) -> impl Iterator<Item = Cow<'q, str>> + 'q {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k) == name).then(|| decode(v))
        })
}

fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let spaced = s.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
#[path = "matching_tests.rs"]
mod tests;
