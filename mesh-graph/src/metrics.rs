//! Prometheus text as the node daemons serve it (`:15020/metrics`), and what two scrapes of it
//! say: the one parser of the workspace (`meshctl top`, the service graph of mesh-control and
//! `meshctl graph` all read through it), counter deltas that survive a daemon restart, and
//! Prometheus' `histogram_quantile` estimate.

use std::collections::BTreeMap;

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

/// Adds `node="<node>"` to every sample, so equal series of two daemons stay apart.
pub fn tag_node(samples: &mut [Sample], node: &str) {
    for s in samples {
        s.labels.insert("node".into(), node.to_owned());
    }
}

/// Each sample of `after` with how much it grew since `before` (the same name and labels): a
/// series that appeared between the scrapes started from 0, and a counter that went down was
/// reset (a daemon restart), so what it has now is what it counted since.
pub fn deltas<'a>(before: &[Sample], after: &'a [Sample]) -> Vec<(&'a Sample, f64)> {
    let earlier: BTreeMap<(&str, &BTreeMap<String, String>), f64> = before
        .iter()
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    after
        .iter()
        .map(|s| {
            let previous = earlier
                .get(&(s.name.as_str(), &s.labels))
                .copied()
                .unwrap_or(0.0);
            let delta = if s.value >= previous {
                s.value - previous
            } else {
                s.value
            };
            (s, delta)
        })
        .collect()
}

/// The `le` bound of a histogram bucket sample (`+Inf` for a missing or odd one).
pub fn bucket_bound(s: &Sample) -> f64 {
    match s.label("le") {
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or(f64::INFINITY),
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

    #[test]
    fn deltas_start_new_series_from_zero_and_survive_a_reset() {
        let before = parse("a{x=\"1\"} 10\nb 100\n");
        let after = parse("a{x=\"1\"} 15\nb 4\nc 7\n");
        let d: Vec<f64> = deltas(&before, &after).iter().map(|(_, d)| *d).collect();
        assert_eq!(d, [5.0, 4.0, 7.0]);
    }
}
