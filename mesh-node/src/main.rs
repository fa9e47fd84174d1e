//! `mesh-node`: parse config (exit 64 when invalid), load and attach the datapath, install the
//! configured Services, run until SIGTERM/SIGINT.
use std::process::ExitCode;

use anyhow::Context as _;
use mesh_node::{
    config::{self, Config},
    datapath::{Datapath, DatapathConfig},
    services_file,
};

/// sysexits.h EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let config = match Config::from_source(&config::Env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-node: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(config)?, "starting");
    let mut datapath = Datapath::load(DatapathConfig {
        cgroup: config.cgroup.clone(),
        pin_dir: Some(config.bpf_pin_dir.clone()),
    })?;
    datapath.attach()?;
    if let Some(path) = &config.services_file {
        for spec in services_file::load(path)? {
            datapath.upsert_service(&spec).with_context(|| format!("installing service {}:{}", spec.vip, spec.port))?;
        }
    }
    println!("mesh-node ready node={}", config.node_name);
    tracing::info!("datapath attached; waiting for SIGTERM");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        anyhow::Ok(())
    })?;
    tracing::info!("shutting down");
    Ok(())
}
