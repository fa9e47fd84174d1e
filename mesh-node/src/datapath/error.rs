use std::{io, path::PathBuf};

/// Everything that can go wrong between the daemon and the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the eBPF object was not built into this binary: run `cargo xtask build-ebpf`, then rebuild mesh-node"
    )]
    ObjectNotBuilt,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("parsing the embedded eBPF object: {0}")]
    Object(#[source] aya_obj::ParseError),
    #[error(
        "map {name} pinned at {path} has another layout ({found}) than this binary's ({expected}): \
         a build that changed the map without renaming it, or not ours. Nothing was loaded: the \
         kernel keeps the programs and maps it runs. Remove that pin to start with an empty map, \
         or `mesh-node --uninstall` to remove the whole datapath"
    )]
    IncompatiblePin {
        name: &'static str,
        path: PathBuf,
        found: super::pins::MapLayout,
        expected: super::pins::MapLayout,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: link: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("attaching {name} to cgroup {cgroup}: {source}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching {name} to the network namespace {netns}: {source}")]
    AttachNetns {
        name: &'static str,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinned link {path}: {source}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Syscall {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("pod {pod}: {reason}")]
    InvalidPod { pod: String, reason: String },
    #[error("service {service}: {reason}")]
    InvalidService { service: String, reason: String },
    #[error("map {name} is full (capacity {capacity}) while writing {item}")]
    MapFull {
        name: &'static str,
        capacity: u32,
        item: String,
    },
}
