//! File mode: the config folder (`--config-dir`) is the source of truth instead of Kubernetes.
//!
//! Every `*.yaml`/`*.yml` file below the folder (sorted by path, hidden files and folders skipped)
//! holds documents of [`crate::manifest`]. The folder is polled (default every 200 ms: a change is
//! seen well within the one-second budget the lab has, with no inotify limits to worry about), and
//! any change rebuilds the whole state, validates it and publishes it if it differs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::{
    manifest::{self, Document},
    model::{self, Inventory, Labels},
    routing,
    snapshot::{FileError, Publisher},
    validate,
    view::State,
};

/// Reads and validates the whole folder. Never fails: problems are returned with the state.
pub fn load(dir: &Path, root_namespace: &str) -> (State, Vec<FileError>) {
    load_keeping(dir, root_namespace, &mut LastGood::new())
}

/// Each file's documents from its last successful parse, with the file's length and mtime then.
/// A file whose length and mtime have not changed since is not parsed again (a folder of
/// 100,000 workloads, 26 MiB in 113 files, takes seconds to parse: not for each change of one
/// file); a file that stops parsing (say, caught half-written) keeps its documents.
#[derive(Default)]
pub struct LastGood(BTreeMap<PathBuf, Parsed>);

impl LastGood {
    pub fn new() -> Self {
        Self::default()
    }
}

struct Parsed {
    stamp: Stamp,
    docs: Vec<Document>,
    /// Its documents that did not parse (index, why): reported again at every load.
    refused: Vec<(usize, String)>,
}

impl Parsed {
    /// Adds the file's documents and its refused ones' errors to a load's.
    fn report(&self, file: &Path, docs: &mut Vec<Document>, errors: &mut Vec<FileError>) {
        docs.extend(self.docs.iter().cloned());
        errors.extend(self.refused.iter().map(|(i, message)| FileError { file: file.to_path_buf(), document: Some(*i), message: message.clone() }));
    }
}

/// What tells a file changed: its length and mtime (as the watcher's [`fingerprint`]).
type Stamp = (u64, Option<SystemTime>);

fn stamp(file: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.len(), m.modified().ok()))
}

/// Like [`load`], but a file that does not parse as YAML (say, caught half-written) keeps the
/// documents of its last good version instead of vanishing, and the error is still reported;
/// and a file unchanged since `last_good` saw it is not parsed again.
/// Writers should still replace files atomically (write, then rename).
pub fn load_keeping(dir: &Path, root_namespace: &str, last_good: &mut LastGood) -> (State, Vec<FileError>) {
    let mut errors = Vec::new();
    let mut docs = Vec::new();
    let files = yaml_files(dir, &mut errors);
    last_good.0.retain(|f, _| files.contains(f));
    for file in files {
        // Taken before the read: a write in between makes the next poll read it again.
        let stamp = stamp(&file);
        if let Some(seen) = last_good.0.get(&file).filter(|p| stamp.is_some_and(|s| s == p.stamp)) {
            seen.report(&file, &mut docs, &mut errors);
            continue;
        }
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(FileError { file, document: None, message: e.to_string() });
                continue;
            }
        };
        match manifest::parse(&text) {
            Err(e) => {
                docs.extend(last_good.0.get(&file).into_iter().flat_map(|p| p.docs.iter().cloned()));
                errors.push(FileError { file, document: None, message: e.to_string() });
            }
            Ok(parsed) => {
                let (mut good, mut refused) = (Vec::new(), Vec::new());
                for (i, d) in parsed.into_iter().enumerate() {
                    match d {
                        Ok(d) => good.push(d),
                        Err(e) => refused.push((i, e.to_string())),
                    }
                }
                let parsed = Parsed { stamp: stamp.unwrap_or_default(), docs: good, refused };
                parsed.report(&file, &mut docs, &mut errors);
                match stamp {
                    Some(_) => last_good.0.insert(file, parsed),
                    None => last_good.0.remove(&file),
                };
            }
        }
    }
    (build(docs, root_namespace), errors)
}

/// Documents → validated state (sans-IO).
pub fn build(docs: Vec<Document>, root_namespace: &str) -> State {
    let mut inv = Inventory::default();
    let mut ns_labels: BTreeMap<String, Labels> = BTreeMap::new();
    let (mut authz, mut peer, mut request_authn, mut services) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut objects = routing::Objects::default();
    let (mut telemetry, mut mesh_config) = (Vec::new(), None);
    for d in docs {
        match d {
            Document::AuthorizationPolicy(p) => authz.push(*p),
            Document::PeerAuthentication(p) => peer.push(*p),
            Document::RequestAuthentication(r) => request_authn.push(*r),
            Document::Telemetry(t) => telemetry.push(*t),
            Document::MeshConfig { namespace, config } => {
                if namespace == root_namespace {
                    mesh_config = Some(config);
                } else {
                    tracing::warn!(namespace, "ConfigMap {} outside the root namespace {root_namespace} ignored", crate::crd::telemetry::MESH_CONFIG_MAP);
                }
            }
            Document::HttpRoute(r) => objects.http_routes.push(*r),
            Document::GrpcRoute(r) => objects.grpc_routes.push(*r),
            Document::ReferenceGrant(g) => objects.reference_grants.push(*g),
            Document::VirtualService(v) => objects.virtual_services.push(*v),
            Document::DestinationRule(d) => objects.destination_rules.push(*d),
            Document::LocalRateLimit(d) => objects.local_rate_limits.push(*d),
            Document::Node { name, address, labels } => {
                if let Some(l) = model::locality(&labels) {
                    inv.localities.insert(name.clone(), l);
                }
                inv.nodes.insert(name, address);
            }
            Document::Namespace { name, labels } => {
                ns_labels.insert(name, labels);
            }
            Document::Workload(w) => {
                inv.workloads.insert(w.uid.clone(), w);
            }
            Document::Service(s) => services.push(s),
        }
    }
    for problem in inv.drop_shared_addresses() {
        tracing::warn!("Workload {problem}");
    }
    for w in inv.workloads.values_mut() {
        w.meshed = model::meshed(ns_labels.get(&w.namespace), &w.labels);
    }
    let selectable = manifest::WorkloadIndex::new(&inv.workloads);
    for s in services {
        let endpoints = manifest::endpoints(&s, &selectable);
        let svc = model::Service { name: s.key.name.clone(), namespace: s.key.namespace.clone(), vips: s.vips, ports: s.ports, endpoints };
        inv.services.insert(s.key, svc);
    }
    let routes = routing::build(&objects, &inv);
    let mut policies = validate::policies(&authz, &peer, &request_authn, root_namespace);
    let mesh = validate::telemetry::mesh_config(&mesh_config.unwrap_or_default());
    validate::telemetry::apply(&mut policies, &telemetry, &mesh, root_namespace);
    State { inventory: inv, policies, routes }
}

fn yaml_files(dir: &Path, errors: &mut Vec<FileError>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                errors.push(FileError { file: d, document: None, message: e.to_string() });
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// What the watcher compares between polls: every YAML file's path, length and mtime.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<Stamp>)> {
    yaml_files(dir, &mut Vec::new()).into_iter().map(|f| {
        let stamp = stamp(&f);
        (f, stamp)
    }).collect()
}

/// Loads the folder, publishes, and republishes on every change until the task is dropped.
pub async fn watch(dir: PathBuf, root_namespace: String, interval: Duration, publisher: Publisher) {
    let mut last = None;
    let mut last_good = LastGood::new();
    loop {
        let now = fingerprint(&dir);
        if last.as_ref() != Some(&now) {
            let (state, errors) = load_keeping(&dir, &root_namespace, &mut last_good);
            if let Some(version) = publisher.publish(state, errors.clone()) {
                let snap = publisher.current();
                tracing::info!(version, workloads = snap.state.inventory.workloads.len(), services = snap.state.inventory.services.len(), "config folder changed");
                for e in &errors {
                    tracing::warn!(file = %e.file.display(), document = e.document, "{}", e.message);
                }
                for v in &snap.state.policies.verdicts {
                    if let Err(e) = &v.result {
                        tracing::warn!(kind = v.kind.as_str(), policy = %v.key, reason = e.reason(), "policy rejected: {}", v.message());
                    }
                }
                routing::log_verdicts(&snap.state.routes.verdicts);
            }
            last = Some(now);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
#[path = "filemode_tests.rs"]
mod tests;
