//! Project tasks. `cargo xtask --help` lists them.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod k8s;
mod lab;
mod test;

#[derive(Parser)]
#[command(about = "Tasks of the mesh project: setup, build-ebpf, test, lab, clean")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools from the package registries (idempotent; root).
    Setup,
    /// Build the kernel programs (mesh-ebpf) with Debian's rustc-web + bpf-linker.
    BuildEbpf,
    /// Run every test: unit tests, then the privileged kernel and namespace suites (root).
    Test {
        /// Run one privileged suite only (a test target of `tests/`: e2e, k8s, kernel, node,
        /// interop), skipping the unit tests, fuzzing and the apiserver suite.
        suite: Option<String>,
        /// Run only the privileged tests whose name contains this string.
        #[arg(long)]
        filter: Option<String>,
    },
    /// The local mesh lab in network namespaces.
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// Benchmarks against the no-mesh baseline in the same run; results in bench/results/.
    Bench {
        /// Run one benchmark group only (datapath, node, node-l7, l7-policies, tracing, plaintext,
        /// memory, soak).
        #[arg(long)]
        only: Option<String>,
    },
    /// Fuzz the parsers and the config chain (cargo-fuzz, nightly) from the committed corpus.
    Fuzz {
        /// One target only (config_chain, hbone_forwarded, cert_identity, route_path).
        #[arg(long)]
        target: Option<String>,
        /// Executions per target (default: 60 seconds each).
        #[arg(long)]
        runs: Option<u64>,
    },
    /// Remove leftovers (namespaces, cgroups, pinned objects, processes) of crashed runs.
    Clean,
    /// Regenerate the CRDs (deploy/10-crds.yaml and the Helm chart's copy) from mesh-control's types.
    Crds,
    /// Build the container images (mesh-node, mesh-control, mesh-whoami, mesh-pause) as OCI
    /// archives in <target>/images/, for `ctr -n k8s.io images import` (no registry needed).
    Images,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Test { suite, filter } => test::run(suite.as_deref(), filter.as_deref()),
        Task::Lab { action } => lab::run(action),
        Task::Bench { only } => bench::run(only.as_deref()),
        Task::Crds => k8s::write_crds(),
        Task::Fuzz { target, runs } => {
            let targets: Vec<&str> = match target.as_deref() {
                Some(t) if fuzz::TARGETS.contains(&t) => vec![t],
                Some(t) => anyhow::bail!("no fuzz target {t:?}: one of {}", fuzz::TARGETS.join(", ")),
                None => fuzz::TARGETS.to_vec(),
            };
            fuzz::run(&targets, 60, runs)
        }
        Task::Images => images().map(drop),
        Task::Clean => {
            require_root("clean")?;
            for what in mesh_tests::clean::clean_all() {
                println!("removed {what}");
            }
            Ok(())
        }
    }
}

pub fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is one level down").to_path_buf()
}

/// cargo's target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root_dir().join("target"), PathBuf::from)
}

/// `cargo xtask images`: the binaries (debug profile, as the tests use them), then one OCI
/// archive per image.
pub fn images() -> Result<Vec<PathBuf>> {
    lab::build_binaries(lab::Profile::Debug)?;
    step("images: OCI archives from the binaries and the shared libraries they need");
    let out = target_dir().join("images");
    let mut written = Vec::new();
    for spec in mesh_tests::image::project_images(&target_dir().join("debug"), env!("CARGO_PKG_VERSION")) {
        let path = mesh_tests::image::build(&spec, &out).with_context(|| format!("building image {}", spec.reference))?;
        println!("    {:<22} {} ({} MiB)", spec.reference, path.display(), std::fs::metadata(&path)?.len() >> 20);
        written.push(path);
    }
    println!("    import on a node: ctr -n k8s.io images import <archive> (the manifests use imagePullPolicy IfNotPresent)");
    Ok(written)
}

pub fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("`cargo xtask {what}` needs root (network namespaces, cgroups, eBPF): run it as root, e.g. with sudo -E");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY-free: read our euid from /proc instead of calling libc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Runs a command in the project root, failing with its name when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.current_dir_if_unset().status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

trait CurrentDir {
    fn current_dir_if_unset(&mut self) -> &mut Self;
}

impl CurrentDir for Command {
    fn current_dir_if_unset(&mut self) -> &mut Self {
        if self.get_current_dir().is_none() {
            self.current_dir(root_dir());
        }
        self
    }
}

pub fn step(what: &str) {
    println!("\x1b[1m==> {what}\x1b[0m");
}

fn setup() -> Result<()> {
    step("setup: toolchain and tools");
    sh(Command::new("bash").arg(root_dir().join("scripts/setup.sh")))
}

/// Path of the built kernel object, as `mesh-node/build.rs` expects it.
pub fn ebpf_object() -> PathBuf {
    root_dir().join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
}

fn build_ebpf() -> Result<()> {
    step("build-ebpf: mesh-ebpf for bpfel-unknown-none (Debian rustc-web + bpf-linker)");
    let started = Instant::now();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = format!("{home}/.cargo/bin:{}", std::env::var("PATH").unwrap_or_default());
    // mesh-ebpf/.cargo/config.toml selects the target, /usr/bin/rustc and the BTF flags; it is
    // read only because we run cargo from inside mesh-ebpf/.
    sh(Command::new("cargo")
        .args(["build", "--release", "--locked", "--target-dir", "../target/ebpf"])
        .current_dir(root_dir().join("mesh-ebpf"))
        .env("PATH", path)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS"))
    .context("building mesh-ebpf (is the toolchain installed? run `cargo xtask setup`)")?;
    let object = ebpf_object();
    if !object.exists() {
        bail!("build succeeded but {} is missing", object.display());
    }
    println!("    {} ({} KiB) in {:.1?}", object.display(), std::fs::metadata(&object)?.len() / 1024, started.elapsed());
    Ok(())
}

pub fn setup_and_build() -> Result<()> {
    setup()?;
    build_ebpf()
}
