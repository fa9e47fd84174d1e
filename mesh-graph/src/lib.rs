//! The live service graph and the metrics text it is built from, with no kernel or network
//! dependency, so mesh-control (which serves the graph) and meshctl (which prints it and runs
//! `top`) share one implementation:
//! - [`metrics`]: the Prometheus text parser, counter deltas, `histogram_quantile`;
//! - [`graph`]: workloads and Services as nodes, one window's traffic as edges (rps, error %,
//!   p99, TCP bytes and connections, mTLS);
//! - [`render`]: DOT, SVG, JSON and the self-refreshing HTML page.

pub mod graph;
pub mod metrics;
pub mod render;

pub use graph::{Edge, Graph, Node, NodeKind, Window};
