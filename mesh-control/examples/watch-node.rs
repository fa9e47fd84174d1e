//! Subscribes to mesh-control as a node and prints every update, acknowledging each: a debugging
//! tool for the lab and a reference for the node daemon's client. It obtains a node certificate
//! with the node's token first, then subscribes over mutual TLS with it.
//!
//! ```text
//! cargo run -p mesh-control --example watch-node -- \
//!     --addr https://127.0.0.1:15012 --node n1 --token-file lab/state/node-tokens/n1.token \
//!     --root lab/state/ca/root.crt [--server-name localhost]
//! ```

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use mesh_control::client;
use mesh_proto::config::v1::{self as pb, config_distribution_client::ConfigDistributionClient};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    addr: String,
    #[arg(long)]
    node: String,
    #[arg(long)]
    token_file: PathBuf,
    /// The mesh root(s) the controller's certificate chains to.
    #[arg(long)]
    root: PathBuf,
    /// Name to verify in the controller's certificate (one of its --tls-san).
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let roots_pem = std::fs::read_to_string(&args.root).with_context(|| format!("reading {}", args.root.display()))?;
    let token = std::fs::read_to_string(&args.token_file).with_context(|| format!("reading {}", args.token_file.display()))?;
    let server = client::Server { address: args.addr, name: args.server_name, roots_pem };
    let cert = server.node_certificate(&args.node, &token, 0).await.context("obtaining a node certificate")?;
    println!("node certificate for {} valid until {} (unix)", args.node, cert.not_after_unix);
    let channel = server.connect(Some(&cert)).await.context("connecting with the node certificate")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = pb::Subscribe { node_name: args.node.clone(), last_applied_version: 0 };
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Subscribe(subscribe)) }).await?;
    let mut updates = ConfigDistributionClient::new(channel).stream_config(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    while let Some(u) = updates.message().await? {
        println!("version {} ({}): {} upserts, {} removals", u.version, if u.full { "full" } else { "incremental" }, u.upserts.len(), u.removals.len());
        for r in &u.upserts {
            println!("  + {r:?}");
        }
        for k in &u.removals {
            println!("  - {:?} {}", pb::ResourceKind::try_from(k.kind).unwrap_or_default(), k.key);
        }
        tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Ack(pb::Ack { version: u.version })) }).await?;
    }
    Ok(())
}
