//! What `meshctl top` makes of two scrapes of the node daemons' metrics (parsed by
//! [`mesh_graph::metrics`]): per destination workload (Istio's `reporter="destination"` series),
//! requests per second, the share of 5xx answers, p50/p99 estimated from
//! `istio_request_duration_milliseconds` buckets the way Prometheus' `histogram_quantile` does,
//! and TCP connections opened per second.

use std::collections::BTreeMap;

pub use mesh_graph::metrics::{Sample, histogram_quantile, parse, tag_node};
use mesh_graph::metrics::{bucket_bound, deltas};
use serde::Serialize;

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
    let mut by_workload: BTreeMap<String, Acc> = BTreeMap::new();
    for (s, delta) in deltas(before, after) {
        if s.label("reporter") != "destination" {
            continue;
        }
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
                let le = bucket_bound(s);
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

#[cfg(test)]
mod tests {
    use super::*;

    // The destination's view of whoami-1 (and the client's, which `top` leaves out).
    const TEXT: &str = r#"istio_requests_total{reporter="destination",destination_workload="whoami-1",destination_workload_namespace="demo",response_code="200",source_principal="spiffe://cluster.local/ns/demo/sa/client"} 10
istio_requests_total{reporter="destination",destination_workload="whoami-1",destination_workload_namespace="demo",response_code="503"} 2
istio_requests_total{reporter="source",destination_workload="whoami-1",destination_workload_namespace="demo",response_code="200"} 12
istio_tcp_connections_opened_total{reporter="destination",destination_workload="whoami-1",destination_workload_namespace="demo"} 4
"#;

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
