//! The graph as DOT (for Graphviz), as SVG (drawn here, no Graphviz needed), as JSON, and as a
//! page that redraws itself from `graph.svg` every few seconds.
//!
//! The SVG layout is layered and deterministic: a node's column is the length of the longest
//! path reaching it (clients left, Services in the middle, the workloads serving them right),
//! and nodes are ordered by id inside a column. Same traffic, same picture.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::graph::{Edge, Graph, Node, NodeKind};

const NODE_W: f64 = 190.0;
const NODE_H: f64 = 46.0;
const COLUMN_GAP: f64 = 270.0;
const ROW_GAP: f64 = 40.0;
const MARGIN: f64 = 30.0;
const TOP: f64 = 50.0;

/// The edge's numbers as one short line: `12.3 rps · 0.0% err · p99 4.9ms` or, for TCP,
/// `2.0 conn/s · 1.5 kB/s`.
pub fn edge_label(e: &Edge) -> String {
    if e.protocol == "tcp" {
        format!(
            "{:.1} conn/s · {}",
            e.connections_per_second,
            bytes_rate(e.bytes_per_second)
        )
    } else {
        let p99 = e.p99_ms.map_or_else(|| "-".into(), |v| format!("{v:.1}ms"));
        format!("{:.1} rps · {:.1}% err · p99 {p99}", e.rps, e.error_percent)
    }
}

fn bytes_rate(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB/s", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB/s", b / 1e3)
    } else {
        format!("{b:.0} B/s")
    }
}

/// Green below 1 % errors, orange below 5 %, red above; TCP blue.
fn edge_colour(e: &Edge) -> &'static str {
    if e.protocol == "tcp" {
        "#3b7dd8"
    } else if e.error_percent < 1.0 {
        "#2e9e44"
    } else if e.error_percent < 5.0 {
        "#e38b00"
    } else {
        "#d43a2f"
    }
}

fn node_label(n: &Node) -> String {
    match n.kind {
        NodeKind::Unknown => n.name.clone(),
        _ => format!("{}\n{}", n.name, n.namespace),
    }
}

/// Graphviz DOT: `dot -Tpng graph.dot > graph.png`.
pub fn dot(g: &Graph) -> String {
    let q = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let mut out = String::from(
        "digraph mesh {\n  rankdir=LR;\n  node [fontname=\"sans-serif\", fontsize=11];\n  edge [fontname=\"sans-serif\", fontsize=9];\n",
    );
    for n in &g.nodes {
        let (shape, fill) = match n.kind {
            NodeKind::Workload => ("box", "#e8f0fe"),
            NodeKind::Service => ("triangle", "#fff4d6"),
            NodeKind::Unknown => ("box", "#eeeeee"),
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\", shape={shape}, style=\"rounded,filled\", fillcolor=\"{fill}\"];",
            q(&n.id),
            q(&node_label(n))
        );
    }
    for e in &g.edges {
        let lock = if e.mtls { " 🔒 mTLS" } else { "" };
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\" [label=\"{} {}{lock}\", color=\"{}\"];",
            q(&e.source),
            q(&e.target),
            e.protocol,
            q(&edge_label(e)),
            edge_colour(e)
        );
    }
    out.push_str("}\n");
    out
}

/// JSON of the whole graph (what `/graph.json` serves).
///
/// # Panics
/// Never: the graph holds only strings, numbers and booleans.
pub fn json(g: &Graph) -> String {
    serde_json::to_string_pretty(g).expect("the graph serializes") + "\n"
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Column of each node: the longest path reaching it (a cycle is cut after as many rounds as
/// there are nodes).
fn columns(g: &Graph) -> BTreeMap<&str, usize> {
    let mut col: BTreeMap<&str, usize> = g.nodes.iter().map(|n| (n.id.as_str(), 0)).collect();
    for _ in 0..g.nodes.len() {
        let mut changed = false;
        for e in &g.edges {
            if e.source == e.target {
                continue;
            }
            let next = col.get(e.source.as_str()).copied().unwrap_or(0) + 1;
            if let Some(c) = col.get_mut(e.target.as_str())
                && *c < next
                && next < g.nodes.len()
            {
                *c = next;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    col
}

/// Top-left corner of each node's box; the picture's width and height.
fn layout(g: &Graph) -> (BTreeMap<&str, (f64, f64)>, f64, f64) {
    let col = columns(g);
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut at = BTreeMap::new();
    for n in &g.nodes {
        let c = col[n.id.as_str()];
        let r = rows.entry(c).or_insert(0);
        #[expect(clippy::cast_precision_loss, reason = "a handful of columns and rows")]
        let pos = (
            MARGIN + c as f64 * (NODE_W + COLUMN_GAP),
            TOP + *r as f64 * (NODE_H + ROW_GAP),
        );
        at.insert(n.id.as_str(), pos);
        *r += 1;
    }
    let columns = rows.len().max(1);
    let most = rows.values().copied().max().unwrap_or(0).max(1);
    #[expect(clippy::cast_precision_loss, reason = "a handful of columns and rows")]
    let size = (
        2.0 * MARGIN + columns as f64 * NODE_W + (columns - 1) as f64 * COLUMN_GAP,
        TOP + MARGIN + most as f64 * (NODE_H + ROW_GAP),
    );
    (at, size.0, size.1)
}

/// A padlock drawn at (x, y) (its body's top-left corner), so it shows without an emoji font.
fn lock(x: f64, y: f64) -> String {
    format!(
        "<g class=\"lock\" data-mtls=\"true\"><title>mutual TLS</title><path d=\"M{:.1} {y:.1} v-3.5 a3.5 3.5 0 0 1 7 0 v3.5\" fill=\"none\" stroke=\"#444\" stroke-width=\"1.6\"/><rect x=\"{:.1}\" y=\"{y:.1}\" width=\"10\" height=\"7.5\" rx=\"1.2\" fill=\"#444\"/></g>",
        x + 1.5,
        x
    )
}

/// One edge: its curve from `from` to `to` (top-left corners of the boxes), its label and lock.
fn svg_edge(out: &mut String, e: &Edge, (sx, sy): (f64, f64), (tx, ty): (f64, f64), spread: f64) {
    let (x1, y1) = (sx + NODE_W, sy + NODE_H / 2.0 + spread);
    let (x2, y2) = (tx, ty + NODE_H / 2.0 + spread);
    let mid = f64::midpoint(x1, x2);
    let colour = edge_colour(e);
    let width = 1.5 + (e.rps + e.connections_per_second).max(0.0).ln_1p().min(4.0);
    let dash = if e.protocol == "tcp" {
        " stroke-dasharray=\"6 3\""
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "<g class=\"edge\" data-source=\"{}\" data-target=\"{}\" data-protocol=\"{}\" data-rps=\"{:.3}\" data-error-percent=\"{:.3}\" data-p99-ms=\"{}\" data-bytes-per-second=\"{:.1}\" data-mtls=\"{}\">",
        xml(&e.source),
        xml(&e.target),
        xml(&e.protocol),
        e.rps,
        e.error_percent,
        e.p99_ms.map_or_else(String::new, |v| format!("{v:.3}")),
        e.bytes_per_second,
        e.mtls
    );
    let _ = writeln!(
        out,
        "<path d=\"M{x1:.1} {y1:.1} C{mid:.1} {y1:.1} {mid:.1} {y2:.1} {x2:.1} {y2:.1}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"{width:.1}\"{dash} marker-end=\"url(#arrow)\"/>"
    );
    let label = format!("{} {}", e.protocol, edge_label(e));
    // At the arrow's end, right-aligned: edges fan out from a Service, their ends do not meet
    // (but for the rows of one pair, `spread` apart).
    let (lx, ly) = (x2 - 14.0, y2 - 4.0);
    #[expect(clippy::cast_precision_loss, reason = "short labels")]
    let text_w = label.chars().count() as f64 * 5.0;
    let lock_w = if e.mtls { 14.0 } else { 0.0 };
    let _ = writeln!(
        out,
        "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"13\" rx=\"3\" fill=\"#ffffff\" fill-opacity=\"0.85\"/>",
        lx - text_w - lock_w - 3.0,
        ly - 10.0,
        text_w + lock_w + 5.0
    );
    let _ = writeln!(
        out,
        "<text class=\"edge-label\" x=\"{lx:.1}\" y=\"{ly:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#222\">{}</text>",
        xml(&label)
    );
    if e.mtls {
        out.push_str(&lock(lx - text_w - lock_w, ly - 7.5));
        out.push('\n');
    }
    out.push_str("</g>\n");
}

/// One node's box at (x, y) with its name and kind.
fn svg_node(out: &mut String, n: &Node, (x, y): (f64, f64)) {
    let (fill, stroke, kind, radius) = match n.kind {
        NodeKind::Workload => ("#e8f0fe", "#3b6fc4", "workload", 6.0),
        NodeKind::Service => ("#fff4d6", "#c48a00", "service", NODE_H / 2.0),
        NodeKind::Unknown => ("#eeeeee", "#888888", "unknown", 6.0),
    };
    let _ = writeln!(
        out,
        "<g class=\"node\" data-id=\"{}\" data-kind=\"{kind}\"><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{NODE_W}\" height=\"{NODE_H}\" rx=\"{radius:.1}\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"1.5\"/>",
        xml(&n.id)
    );
    let cx = x + NODE_W / 2.0;
    let _ = writeln!(
        out,
        "<text x=\"{cx:.1}\" y=\"{:.1}\" font-size=\"13\" font-weight=\"bold\" text-anchor=\"middle\" fill=\"#111\">{}</text>",
        y + 20.0,
        xml(&n.name)
    );
    let sub = if n.kind == NodeKind::Unknown {
        "unmeshed or outside the mesh".to_owned()
    } else {
        format!("{kind} · {}", n.namespace)
    };
    let _ = writeln!(
        out,
        "<text x=\"{cx:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555\">{}</text></g>",
        y + 36.0,
        xml(&sub)
    );
}

/// A standalone SVG document.
pub fn svg(g: &Graph) -> String {
    let (at, width, height) = layout(g);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"mesh-graph\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\">\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"9\" markerHeight=\"9\" orient=\"auto-start-reverse\"><path d=\"M0 0 L10 5 L0 10 z\" fill=\"#666\"/></marker></defs>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{MARGIN}\" y=\"24\" font-size=\"13\" fill=\"#333\">{} workloads and Services, {} edges, over {:.1} s (reported by {})</text>",
        g.nodes.len(),
        g.edges.len(),
        g.window_seconds,
        if g.reporters.is_empty() {
            "no node yet".into()
        } else {
            xml(&g.reporters.join(", "))
        }
    );
    if g.edges.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{MARGIN}\" y=\"{:.0}\" font-size=\"13\" fill=\"#888\">no traffic in the last window</text>",
            TOP + 20.0
        );
    }
    // Several edges between one pair (HTTP and TCP) are spread apart.
    let mut pair_seen: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for e in &g.edges {
        let (Some(&(sx, sy)), Some(&(tx, ty))) =
            (at.get(e.source.as_str()), at.get(e.target.as_str()))
        else {
            continue;
        };
        let nth = pair_seen
            .entry((e.source.as_str(), e.target.as_str()))
            .or_insert(-1.0);
        *nth += 1.0;
        svg_edge(&mut out, e, (sx, sy), (tx, ty), *nth * 16.0);
    }
    for n in &g.nodes {
        if let Some(&at) = at.get(n.id.as_str()) {
            svg_node(&mut out, n, at);
        }
    }
    out.push_str("</svg>\n");
    out
}

/// The page: today's SVG inline (so it shows without JavaScript), replaced by a fresh
/// `svg_url` every `refresh_seconds`; the time of the last redraw and how many there were are
/// on the page (`#updated`, `data-refreshes`) for people and tests.
pub fn html(g: &Graph, svg_url: &str, refresh_seconds: u64) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mesh service graph</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 4px 0; }}
#status {{ font-size: 12px; color: #666; margin-bottom: 10px; }}
#graph svg {{ max-width: 100%; height: auto; border: 1px solid #ddd; }}
.legend span {{ margin-right: 14px; font-size: 12px; }}
</style>
</head>
<body data-refreshes="0">
<h1>mesh service graph</h1>
<div id="status">live traffic between workloads and Services, redrawn every {refresh_seconds} s · <span id="updated">as served</span></div>
<div class="legend"><span style="color:#2e9e44">━ HTTP/gRPC, &lt; 1% errors</span><span style="color:#e38b00">━ &lt; 5%</span><span style="color:#d43a2f">━ ≥ 5%</span><span style="color:#3b7dd8">╍ TCP</span><span>padlock: all of it mutual TLS</span></div>
<div id="graph">
{svg}</div>
<script>
"use strict";
let refreshes = 0;
async function redraw() {{
  try {{
    const answer = await fetch("{svg_url}", {{ cache: "no-store" }});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    document.getElementById("graph").innerHTML = await answer.text();
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }} catch (e) {{
    document.getElementById("updated").textContent = "update failed: " + e.message;
  }}
}}
setInterval(redraw, {refresh_ms});
setTimeout(redraw, 1000);
</script>
</body>
</html>
"#,
        svg = svg(g),
        refresh_ms = refresh_seconds.max(1) * 1000,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::tests::sample_graph;

    #[test]
    fn dot_has_every_node_and_edge_with_its_numbers() {
        let text = dot(&sample_graph());
        assert!(text.starts_with("digraph mesh {\n  rankdir=LR;"), "{text}");
        assert!(
            text.contains("\"service:demo/whoami\" [label=\"whoami\\ndemo\", shape=triangle"),
            "{text}"
        );
        assert!(
            text.contains("\"workload:demo/client\" -> \"service:demo/whoami\" [label=\"http 26.0 rps · 3.8% err · p99 4.9ms 🔒 mTLS\""),
            "{text}"
        );
        assert!(
            text.contains(
                "\"unknown\" -> \"service:demo/whoami\" [label=\"tcp 2.0 conn/s · 2.0 kB/s\""
            ),
            "{text}"
        );
        assert_eq!(text.matches(" -> ").count(), 5, "{text}");
    }

    #[test]
    fn svg_lays_out_clients_services_and_backends_in_columns() {
        let g = sample_graph();
        let text = svg(&g);
        assert_eq!(text, svg(&g), "deterministic");
        let (at, w, _) = layout(&g);
        assert!((at["workload:demo/client"].0 - MARGIN).abs() < 1e-9);
        assert!((at["unknown"].0 - MARGIN).abs() < 1e-9);
        let middle = MARGIN + NODE_W + COLUMN_GAP;
        assert!((at["service:demo/whoami"].0 - middle).abs() < 1e-9);
        assert!((at["workload:demo/whoami-2"].0 - 2.0 * middle + MARGIN).abs() < 1e-9);
        assert!((w - (2.0 * MARGIN + 3.0 * NODE_W + 2.0 * COLUMN_GAP)).abs() < 1e-9);
        assert_eq!(text.matches("<g class=\"node\"").count(), 5);
        assert_eq!(text.matches("<g class=\"edge\"").count(), 5);
        // The three HTTP edges are mTLS, the two plaintext TCP ones are not.
        assert_eq!(text.matches("class=\"lock\"").count(), 3, "{text}");
        assert!(text.contains("data-source=\"workload:demo/client\" data-target=\"service:demo/whoami\" data-protocol=\"http\" data-rps=\"26.000\""));
        assert!(
            text.contains(">http 26.0 rps · 3.8% err · p99 4.9ms</text>"),
            "{text}"
        );
        assert!(text.ends_with("</svg>\n"));
    }

    #[test]
    fn names_are_escaped_and_an_empty_graph_says_so() {
        let mut g = sample_graph();
        g.nodes[0].name = "a<b>&\"c\"".into();
        let text = svg(&g);
        assert!(
            text.contains(">a&lt;b&gt;&amp;&quot;c&quot;</text>"),
            "{text}"
        );
        let empty = svg(&Graph::default());
        assert!(empty.contains("no traffic in the last window") && empty.contains("no node yet"));
    }

    #[test]
    fn the_page_embeds_the_svg_and_redraws_it() {
        let page = html(&sample_graph(), "/graph.svg", 5);
        assert!(page.contains("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"mesh-graph\""));
        assert!(page.contains("fetch(\"/graph.svg\""));
        assert!(page.contains("setInterval(redraw, 5000)"));
        assert!(page.contains("redrawn every 5 s"));
    }

    #[test]
    fn json_round_trips_the_numbers() {
        let v: serde_json::Value = serde_json::from_str(&json(&sample_graph())).expect("JSON");
        assert_eq!(v["nodes"].as_array().map(Vec::len), Some(5));
        let e = &v["edges"].as_array().expect("edges")[0];
        assert!(e["source"].is_string() && e["rps"].is_number() && e["mtls"].is_boolean());
        assert!(v["windowSeconds"].is_number());
    }
}
