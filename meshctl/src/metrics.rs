//! Prometheus text from the node daemons (`:15020/metrics`) and what `meshctl top` makes of two
//! scrapes: per destination workload (Istio's `reporter="destination"` series), requests per
//! second, the share of 5xx answers, p50/p99 estimated from `istio_request_duration_milliseconds`
//! buckets the way Prometheus' `histogram_quantile` does, and TCP connections opened per second.

use std::collections::BTreeMap;

use serde::Serialize;

/// One sample: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Parses the Prometheus text format; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `a="x",b="y\"z"} rest` → the labels and `rest`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = s.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        s = &after[1 + end + 1..];
    }
}

/// The `q` quantile (0..=1) of a histogram given as cumulative `(le, count)` buckets, as
/// Prometheus' `histogram_quantile` estimates it: linear interpolation inside the bucket the
/// rank falls in (from 0 for the first bucket); in the `+Inf` bucket, the largest finite bound.
/// `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let fraction = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * fraction);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

/// One row of `meshctl top`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopRow {
    /// `namespace/workload` of the destination.
    pub workload: String,
    pub rps: f64,
    /// Share of 5xx answers, percent (0 without requests).
    pub error_percent: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub tcp_opened_per_second: f64,
}

const REQUESTS: &str = "istio_requests_total";
const DURATION_BUCKET: &str = "istio_request_duration_milliseconds_bucket";
const TCP_OPENED: &str = "istio_tcp_connections_opened_total";

/// What changed between two scrapes of the same daemons (`before`, `after`: every node's
/// samples, each node's kept apart by a `node` label the caller adds), over `seconds`.
pub fn top(before: &[Sample], after: &[Sample], seconds: f64) -> Vec<TopRow> {
    #[derive(Default)]
    struct Acc {
        requests: f64,
        errors: f64,
        buckets: BTreeMap<u64, (f64, f64)>,
        tcp_opened: f64,
    }
    let key = |s: &Sample| (s.name.clone(), s.labels.clone());
    let earlier: BTreeMap<_, f64> = before.iter().map(|s| (key(s), s.value)).collect();
    let mut by_workload: BTreeMap<String, Acc> = BTreeMap::new();
    for s in after {
        if s.label("reporter") != "destination" {
            continue;
        }
        // A series that appeared between the scrapes started from 0; a counter that went
        // down was reset (daemon restart): count what it has now.
        let previous = earlier.get(&key(s)).copied().unwrap_or(0.0);
        let delta = if s.value >= previous {
            s.value - previous
        } else {
            s.value
        };
        let workload = format!(
            "{}/{}",
            s.label("destination_workload_namespace"),
            s.label("destination_workload")
        );
        let acc = || Acc::default();
        match s.name.as_str() {
            REQUESTS => {
                let a = by_workload.entry(workload).or_insert_with(acc);
                a.requests += delta;
                if s.label("response_code").starts_with('5') {
                    a.errors += delta;
                }
            }
            DURATION_BUCKET => {
                let le = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::INFINITY),
                };
                let a = by_workload.entry(workload).or_insert_with(acc);
                a.buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += delta;
            }
            TCP_OPENED => by_workload.entry(workload).or_insert_with(acc).tcp_opened += delta,
            _ => {}
        }
    }
    by_workload
        .into_iter()
        .map(|(workload, a)| {
            let buckets: Vec<(f64, f64)> = a.buckets.into_values().collect();
            TopRow {
                workload,
                rps: a.requests / seconds,
                error_percent: if a.requests > 0.0 {
                    100.0 * a.errors / a.requests
                } else {
                    0.0
                },
                p50_ms: histogram_quantile(0.5, &buckets),
                p99_ms: histogram_quantile(0.99, &buckets),
                tcp_opened_per_second: a.tcp_opened / seconds,
            }
        })
        .collect()
}

/// Adds `node="<node>"` to every sample, so equal series of two daemons stay apart.
pub fn tag_node(samples: &mut [Sample], node: &str) {
    for s in samples {
        s.labels.insert("node".into(), node.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP istio_requests_total Requests, by Istio's labels
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",destination_workload="whoami-1",destination_workload_namespace="demo",response_code="200",source_principal="spiffe://cluster.local/ns/demo/sa/client"} 10
istio_requests_total{reporter="destination",destination_workload="whoami-1",destination_workload_namespace="demo",response_code="503"} 2
istio_requests_total{reporter="source",destination_workload="whoami-1",destination_workload_namespace="demo",response_code="200"} 12
istio_tcp_connections_opened_total{reporter="destination",destination_workload="whoami-1",destination_workload_namespace="demo"} 4
weird_label{a="x\"y,z}",b="2"} 1.5e3
"#;

    #[test]
    fn text_format_with_escapes_and_comments() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 5);
        assert_eq!(
            samples[0].label("source_principal"),
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert!((samples[0].value - 10.0).abs() < f64::EPSILON);
        assert_eq!(samples[4].label("a"), "x\"y,z}");
        assert_eq!(samples[4].label("b"), "2");
        assert!((samples[4].value - 1500.0).abs() < f64::EPSILON);
        assert!(parse("no_value\n{broken\n").is_empty());
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        // 100 observations: 50 in (0,10], 40 in (10,50], 10 in (50,100].
        let b = [
            (10.0, 50.0),
            (50.0, 90.0),
            (100.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(0.5, &b), Some(10.0));
        assert_eq!(histogram_quantile(0.25, &b), Some(5.0));
        assert_eq!(histogram_quantile(0.7, &b), Some(30.0));
        assert_eq!(histogram_quantile(0.99, &b), Some(95.0));
        // In the +Inf bucket: the largest finite bound.
        let tail = [(1.0, 1.0), (5.0, 1.0), (f64::INFINITY, 4.0)];
        assert_eq!(histogram_quantile(0.99, &tail), Some(5.0));
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    fn scrape(text: &str, node: &str) -> Vec<Sample> {
        let mut s = parse(text);
        tag_node(&mut s, node);
        s
    }

    #[test]
    fn top_takes_rates_errors_and_latency_from_the_destination_reporter() {
        let before = scrape(TEXT, "n1");
        let later = TEXT
            .replace("} 10\n", "} 30\n")
            .replace("} 4\n", "} 8\n")
            .replace("} 2\n", "} 4\n")
            .replace("} 12\n", "} 100\n")
            + concat!(
                "istio_request_duration_milliseconds_bucket{reporter=\"destination\",destination_workload=\"whoami-1\",destination_workload_namespace=\"demo\",le=\"1\"} 11\n",
                "istio_request_duration_milliseconds_bucket{reporter=\"destination\",destination_workload=\"whoami-1\",destination_workload_namespace=\"demo\",le=\"5\"} 22\n",
                "istio_request_duration_milliseconds_bucket{reporter=\"destination\",destination_workload=\"whoami-1\",destination_workload_namespace=\"demo\",le=\"+Inf\"} 22\n",
            );
        // n2 serves whoami-3 and shows up only in the second scrape (a new series).
        let n2 = "istio_requests_total{reporter=\"destination\",destination_workload=\"whoami-3\",destination_workload_namespace=\"demo\",response_code=\"200\"} 6\n";
        let mut after = scrape(&later, "n1");
        after.extend(scrape(n2, "n2"));
        let rows = top(&before, &after, 2.0);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let w1 = &rows[0];
        assert_eq!(w1.workload, "demo/whoami-1");
        // (20 + 2) requests over 2 s, the source reporter's 88 not counted.
        assert!((w1.rps - 11.0).abs() < 1e-9, "{w1:?}");
        assert!((w1.error_percent - 100.0 * 2.0 / 22.0).abs() < 1e-9);
        assert!((w1.tcp_opened_per_second - 2.0).abs() < 1e-9);
        // 11 of 22 in (0,1], the rest in (1,5].
        assert_eq!(w1.p50_ms, Some(1.0));
        assert!((w1.p99_ms.expect("p99") - 4.92).abs() < 1e-9);
        assert_eq!(rows[1].workload, "demo/whoami-3");
        assert!((rows[1].rps - 3.0).abs() < 1e-9);
        assert_eq!(rows[1].p50_ms, None);
    }

    #[test]
    fn a_counter_reset_counts_what_the_new_process_has() {
        let before = scrape("istio_requests_total{reporter=\"destination\"} 100\n", "n1");
        let after = scrape("istio_requests_total{reporter=\"destination\"} 4\n", "n1");
        assert!((top(&before, &after, 1.0)[0].rps - 4.0).abs() < 1e-9);
    }
}
