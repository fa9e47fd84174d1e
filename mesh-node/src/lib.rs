//! The per-node mesh daemon as a library: the binary (`main.rs`) only parses config and calls in,
//! and the end-to-end suites drive the same code.
#![doc = include_str!("../README.md")]

pub mod activation;
pub mod admin;
pub mod app;
pub mod authn;
pub mod authz;
pub mod balance;
pub mod config;
pub mod control;
pub mod datapath;
pub mod drain;
pub mod explain;
pub mod handoff;
pub mod http_util;
pub mod identity;
pub mod kernel_sync;
pub mod kubepods;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod removal;
pub mod routing;
pub mod services_file;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod writers;
