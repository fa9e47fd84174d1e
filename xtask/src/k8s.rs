//! The controller's Kubernetes checks inside `cargo xtask test`:
//! 1. `scripts/setup-k8s.sh`: kube-apiserver + kube-controller-manager built from Debian's source
//!    package (cached in /var/cache/mesh/k8s-<version>/, ~11 min the first time, niced), etcd,
//!    yamllint, kubernetes-validate. Runs outside the cargo lock: it builds Go, not Rust.
//! 2. Offline manifest checks: yamllint and `kubernetes-validate --strict` on deploy/, the
//!    chart's values.schema.json by Python's jsonschema (`scripts/check-values-schema.py`), and
//!    `promtool check config` on the Prometheus scrape jobs (deploy/prometheus/scrape.yaml).
//! 3. The integration suite against a real apiserver on loopback
//!    (`cargo test -p mesh-control --features apiserver-tests --test apiserver`).

use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};

use crate::{root_dir, sh, step};

/// Where setup-k8s.sh puts its venv (kubernetes-validate) and binaries.
fn cache() -> String {
    std::env::var("MESH_K8S_CACHE").unwrap_or_else(|_| "/var/cache/mesh".into())
}

/// The setup started by [`start_setup`], if any.
static SETUP: Mutex<Option<Child>> = Mutex::new(None);

fn setup_log() -> PathBuf {
    std::env::temp_dir().join("mesh-setup-k8s.log")
}

/// Starts `scripts/setup-k8s.sh` in the background (its Go build is niced), so that on a fresh
/// machine it overlaps with the Rust builds and tests instead of adding ~11 minutes after them.
pub fn start_setup() -> Result<()> {
    let log = std::fs::File::create(setup_log())?;
    let child = Command::new("bash")
        .arg(root_dir().join("scripts/setup-k8s.sh"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting scripts/setup-k8s.sh")?;
    *SETUP.lock().expect("not poisoned") = Some(child);
    Ok(())
}

/// Waits for the background setup (or runs it now if none was started).
pub fn setup() -> Result<()> {
    step("setup-k8s: kube-apiserver from Debian's source package, etcd, manifest linters (cached)");
    let started = SETUP.lock().expect("not poisoned").take();
    let Some(mut child) = started else {
        return sh(Command::new("bash").arg(root_dir().join("scripts/setup-k8s.sh"))).context("scripts/setup-k8s.sh");
    };
    let status = child.wait()?;
    print!("{}", std::fs::read_to_string(setup_log()).unwrap_or_default());
    if !status.success() {
        bail!("scripts/setup-k8s.sh failed ({status}); its output is above");
    }
    Ok(())
}

/// The manifests kubernetes-validate checks: every built-in kind we ship (the Helm templates are
/// checked by rendering them, in mesh-control's `deploy` test).
const MANIFESTS: [&str; 5] =
    ["deploy/00-namespace.yaml", "deploy/10-crds.yaml", "deploy/11-gateway-api-crds.yaml", "deploy/20-control.yaml", "deploy/30-node.yaml"];

pub fn manifest_checks() -> Result<()> {
    step("deploy/: yamllint, kubernetes-validate --strict (offline)");
    sh(Command::new("yamllint").args(["--strict", "-c", "scripts/yamllint.yaml", "deploy/"]))?;
    let validate = format!("{}/venv/bin/kubernetes-validate", cache());
    sh(Command::new(validate).args(["--strict", "--kubernetes-version", "1.33.0"]).args(MANIFESTS))?;
    // The chart's values schema, by Python's jsonschema (kubernetes-validate's dependency) too.
    step("deploy/helm/mesh/values.schema.json: jsonschema (draft 7) on the chart's values files");
    sh(Command::new(format!("{}/venv/bin/python", cache()))
        .arg(root_dir().join("scripts/check-values-schema.py"))
        .arg(root_dir().join("deploy/helm/mesh"))
        .arg(root_dir().join("mesh-control/tests/deploy/bad-values.yaml")))?;
    scrape_config_check()
}

/// `promtool check config` on deploy/prometheus/scrape.yaml. Debian's Prometheus is built without
/// Kubernetes discovery, so its promtool refuses `kubernetes_sd_configs`: the jobs are checked
/// with static (empty) targets in its place and everything else as shipped (relabelling).
fn scrape_config_check() -> Result<()> {
    step("deploy/prometheus/scrape.yaml: promtool check config (discovery swapped for static targets)");
    let shipped = std::fs::read_to_string(root_dir().join("deploy/prometheus/scrape.yaml"))?;
    let kubernetes = "kubernetes_sd_configs:\n      - role: pod\n";
    if shipped.matches(kubernetes).count() != 2 {
        bail!("deploy/prometheus/scrape.yaml: expected two jobs with `{kubernetes}`");
    }
    let checked = std::env::temp_dir().join("mesh-scrape-check.yaml");
    std::fs::write(&checked, shipped.replace(kubernetes, "static_configs:\n      - targets: []\n"))?;
    let result = sh(Command::new("promtool").args(["check", "config"]).arg(&checked));
    let _ = std::fs::remove_file(&checked);
    result
}

pub fn apiserver_suite() -> Result<()> {
    step("mesh-control against a real kube-apiserver + etcd on loopback");
    sh(Command::new("cargo").args(["test", "--locked", "-p", "mesh-control", "--features", "apiserver-tests", "--test", "apiserver"]))
}

pub fn run() -> Result<()> {
    setup()?;
    manifest_checks()?;
    apiserver_suite()
}

/// `cargo xtask crds`: writes crdgen's output where `mesh-control/tests/deploy.rs` expects it.
pub fn write_crds() -> Result<()> {
    // Ours, and the Gateway API kinds we read (a separate file: clusters with Gateway API skip it).
    let outputs: [(&[&str], [&str; 2]); 2] = [
        (&[], ["deploy/10-crds.yaml", "deploy/helm/mesh/crds/crds.yaml"]),
        (&["--gateway-api"], ["deploy/11-gateway-api-crds.yaml", "deploy/helm/mesh/crds/gateway-api-crds.yaml"]),
    ];
    for (args, paths) in outputs {
        step(&format!("crds: cargo run -p mesh-control --bin crdgen -- {}", args.join(" ")));
        let out = Command::new("cargo")
            .args(["run", "--quiet", "--locked", "-p", "mesh-control", "--bin", "crdgen", "--"])
            .args(args)
            .current_dir(root_dir())
            .output()
            .context("running crdgen")?;
        if !out.status.success() {
            bail!("crdgen failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        for path in paths {
            std::fs::write(root_dir().join(path), &out.stdout).with_context(|| format!("writing {path}"))?;
            println!("    wrote {path}");
        }
    }
    Ok(())
}
