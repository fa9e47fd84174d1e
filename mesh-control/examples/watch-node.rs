//! Subscribes to mesh-control as a node and prints every update, acknowledging each: a debugging
//! tool for the lab and a reference for the node daemon's client.
//!
//! ```text
//! cargo run -p mesh-control --example watch-node -- \
//!     --addr https://127.0.0.1:15012 --node n1 --token-file lab/state/node-tokens/n1.token \
//!     --root lab/state/ca/root.crt [--server-name localhost]
//! ```

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use mesh_proto::config::v1::{self as pb, config_distribution_client::ConfigDistributionClient};
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig},
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    addr: String,
    #[arg(long)]
    node: String,
    #[arg(long)]
    token_file: PathBuf,
    /// The mesh root the controller's certificate chains to.
    #[arg(long)]
    root: PathBuf,
    /// Name to verify in the controller's certificate (one of its --tls-san).
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let root = std::fs::read_to_string(&args.root).with_context(|| format!("reading {}", args.root.display()))?;
    let token = std::fs::read_to_string(&args.token_file).with_context(|| format!("reading {}", args.token_file.display()))?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name(args.server_name);
    let channel = Channel::from_shared(args.addr)?.tls_config(tls)?.connect().await.context("connecting")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = pb::Subscribe { node_name: args.node.clone(), last_applied_version: 0 };
    tx.send(pb::NodeMessage { kind: Some(pb::node_message::Kind::Subscribe(subscribe)) }).await?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {}", token.trim()))?);
    req.metadata_mut().insert(mesh_proto::NODE_NAME_HEADER, MetadataValue::try_from(args.node.as_str())?);
    let mut updates = ConfigDistributionClient::new(channel).stream_config(req).await?.into_inner();
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
