//! The order of Gateway API matches across every route attached to one Service (the nodes take
//! the first match, so this order is the precedence).
//!
//! The spec orders: path (Exact, then the longest PathPrefix), then a method match, then the most
//! header matches, then the most query parameter matches, then the oldest route, then
//! namespace/name alphabetically, then rule and match order within a route. It leaves regular
//! expressions to implementations; we put them after every prefix, longest pattern first, which
//! is Istio's order (exact > prefix > regex, longer first within each). As in Istio, `PathPrefix
//! /` counts as no path match at all: it matches every path, so it comes after the regular
//! expressions (a catch-all rule must not hide them). GRPCRoute matches are
//! path matches by then (`/svc/method` Exact, `/svc` PathPrefix, a method alone a regex), which
//! orders them as the GRPCRoute spec asks: more service characters first, then more method
//! characters, then more headers.

use std::cmp::Reverse;

use k8s_openapi::jiff::Timestamp;

use super::model::{Match, StringMatch};
use crate::model::NamespacedName;

/// Sorts ascending: the smallest key is tried first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    path_kind: Reverse<u8>,
    path_len: Reverse<usize>,
    method: Reverse<bool>,
    headers: Reverse<usize>,
    query_params: Reverse<usize>,
    /// Objects without a creation time (file mode) after those with one, then by time.
    created: (bool, Option<Timestamp>),
    route: NamespacedName,
    rule: u32,
    match_index: u32,
}

impl Precedence {
    pub fn of(
        m: &Match,
        created: Option<Timestamp>,
        route: &NamespacedName,
        rule: u32,
        match_index: u32,
    ) -> Self {
        let (kind, len) = match &m.path {
            Some(StringMatch::Exact(p)) => (3, p.len()),
            Some(StringMatch::PathPrefix(p)) if p.trim_end_matches('/').is_empty() => (0, 0),
            Some(StringMatch::PathPrefix(p) | StringMatch::Prefix(p)) => {
                (2, p.trim_end_matches('/').len())
            }
            Some(StringMatch::Regex(p)) => (1, p.len()),
            Some(StringMatch::Present) | None => (0, 0),
        };
        Self {
            path_kind: Reverse(kind),
            path_len: Reverse(len),
            method: Reverse(m.method.is_some()),
            headers: Reverse(m.headers.len()),
            query_params: Reverse(m.query_params.len()),
            created: (created.is_none(), created),
            route: route.clone(),
            rule,
            match_index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::model::{HeaderMatch, QueryMatch};

    fn path(m: StringMatch) -> Match {
        Match {
            path: Some(m),
            ..Match::default()
        }
    }

    fn header(n: &str) -> HeaderMatch {
        HeaderMatch {
            name: n.into(),
            value: StringMatch::Exact("x".into()),
            invert: false,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    /// Each row must come before every row below it.
    #[test]
    fn the_spec_order_then_istio_order_for_regexes() {
        let route = NamespacedName::new("demo", "r");
        let rows: Vec<(&str, Match)> = vec![
            ("exact, longer", path(StringMatch::Exact("/foo/bar".into()))),
            ("exact", path(StringMatch::Exact("/foo".into()))),
            (
                "prefix, longest",
                path(StringMatch::PathPrefix("/foo/bar".into())),
            ),
            (
                "prefix with method",
                Match {
                    method: Some(StringMatch::Exact("GET".into())),
                    ..path(StringMatch::PathPrefix("/foo".into()))
                },
            ),
            (
                "prefix, two headers",
                Match {
                    headers: vec![header("a"), header("b")],
                    ..path(StringMatch::PathPrefix("/foo".into()))
                },
            ),
            (
                "prefix, one header, a query",
                Match {
                    headers: vec![header("a")],
                    query_params: vec![QueryMatch {
                        name: "q".into(),
                        value: StringMatch::Present,
                    }],
                    ..path(StringMatch::PathPrefix("/foo".into()))
                },
            ),
            (
                "prefix, one header",
                Match {
                    headers: vec![header("a")],
                    ..path(StringMatch::PathPrefix("/foo".into()))
                },
            ),
            ("prefix", path(StringMatch::PathPrefix("/foo".into()))),
            (
                "regex, longer",
                path(StringMatch::Regex("/foo/.*/bar".into())),
            ),
            ("regex", path(StringMatch::Regex("/f.*".into()))),
            (
                "prefix / with a header",
                Match {
                    headers: vec![header("a")],
                    ..path(StringMatch::PathPrefix("/".into()))
                },
            ),
            (
                "prefix / (every path)",
                path(StringMatch::PathPrefix("/".into())),
            ),
        ];
        let keys: Vec<Precedence> = rows
            .iter()
            .map(|(_, m)| Precedence::of(m, None, &route, 0, 0))
            .collect();
        for (i, pair) in keys.windows(2).enumerate() {
            assert!(
                pair[0] < pair[1],
                "{:?} must come before {:?}",
                rows[i].0,
                rows[i + 1].0
            );
        }
    }

    #[test]
    fn ties_go_to_the_oldest_route_then_by_name_then_rule_and_match_order() {
        let m = path(StringMatch::PathPrefix("/".into()));
        let (a, b) = (
            NamespacedName::new("demo", "a"),
            NamespacedName::new("demo", "b"),
        );
        let older_b = Precedence::of(&m, Some(ts("2026-01-01T00:00:00Z")), &b, 0, 0);
        let newer_a = Precedence::of(&m, Some(ts("2026-02-01T00:00:00Z")), &a, 0, 0);
        let undated_a = Precedence::of(&m, None, &a, 0, 0);
        assert!(
            older_b < newer_a && newer_a < undated_a,
            "oldest first; undated last"
        );
        assert!(
            Precedence::of(&m, None, &a, 0, 0) < Precedence::of(&m, None, &b, 0, 0),
            "then namespace/name"
        );
        assert!(
            Precedence::of(&m, None, &a, 0, 1) < Precedence::of(&m, None, &a, 1, 0),
            "then rule order"
        );
        assert!(
            Precedence::of(&m, None, &a, 1, 0) < Precedence::of(&m, None, &a, 1, 1),
            "then match order"
        );
        // A trailing slash does not make a prefix longer (the node ignores it).
        assert_eq!(
            Precedence::of(
                &path(StringMatch::PathPrefix("/foo/".into())),
                None,
                &a,
                0,
                0
            )
            .path_len,
            Precedence::of(
                &path(StringMatch::PathPrefix("/foo".into())),
                None,
                &a,
                0,
                0
            )
            .path_len
        );
    }
}
