//! Loading the embedded object, attaching its programs, and pinning what must outlive us.
//!
//! With a pin directory, maps and links live in bpffs: a restarted daemon re-opens the same maps
//! (their entries keep serving traffic while it is down) and swaps the program behind each
//! pinned link with BPF_LINK_UPDATE, so there is never a moment without the datapath.
//! `Datapath::uninstall` is the one explicit way to remove everything.

use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{Program, TcAttachType, links::FdLink, tc},
};
use mesh_common::names;

use super::{
    Error, OBJECT,
    endpoints::EndpointTable,
    pins,
    services::ServiceTable,
    steering::Steering,
    sys::{self, attach_type},
};

/// Where the datapath attaches and pins.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// cgroup v2 directory whose processes get the socket programs: the node's pods (and the
    /// daemon, which is never captured because only meshed pods are).
    pub cgroup: PathBuf,
    /// The network namespace whose socket lookups `sk_lookup` serves: the node's, where the
    /// daemon runs ([`DatapathConfig::OWN_NETNS`]).
    pub netns: PathBuf,
    /// bpffs directory for pinned maps (`<dir>/<MAP>`) and links (`<dir>/links/<prog>`);
    /// `None` keeps everything in this process and detaches on drop (tests).
    pub pin_dir: Option<PathBuf>,
}

impl DatapathConfig {
    /// This process's network namespace.
    pub const OWN_NETNS: &str = "/proc/self/ns/net";
}

/// Programs attached to the node cgroup with their attach types, in attach order (bookkeeping
/// hooks first, so no connection is rewritten before its reverse translation is in place).
const CGROUP_PROGRAMS: &[(&str, u32)] = &[
    (names::PROG_SOCKOPS, attach_type::CGROUP_SOCK_OPS),
    (names::PROG_GETSOCKOPT, attach_type::CGROUP_GETSOCKOPT),
    (names::PROG_GETPEERNAME4, attach_type::CGROUP_INET4_GETPEERNAME),
    (names::PROG_GETPEERNAME6, attach_type::CGROUP_INET6_GETPEERNAME),
    (names::PROG_RECVMSG4, attach_type::CGROUP_UDP4_RECVMSG),
    (names::PROG_RECVMSG6, attach_type::CGROUP_UDP6_RECVMSG),
    (names::PROG_SENDMSG4, attach_type::CGROUP_UDP4_SENDMSG),
    (names::PROG_SENDMSG6, attach_type::CGROUP_UDP6_SENDMSG),
    (names::PROG_CONNECT4, attach_type::CGROUP_INET4_CONNECT),
    (names::PROG_CONNECT6, attach_type::CGROUP_INET6_CONNECT),
];

/// The loaded kernel datapath. Dropping it detaches what is not pinned.
pub struct Datapath {
    pub(super) config: DatapathConfig,
    pub(super) ebpf: Ebpf,
    /// Unpinned links: closing them detaches.
    links: Vec<OwnedFd>,
    /// Unpinned tc links.
    tc_links: Vec<FdLink>,
    /// sk_msg attached to the sockhash by this process (detached on `detach` when unpinned).
    sk_msg_attached: bool,
    /// Pod interfaces that are bridge ports, by name, with their index (`MESH_PORT_V1`'s keys).
    pub(super) bridge_ports: std::collections::BTreeMap<String, u32>,
    pub(super) services: ServiceTable,
    pub(super) endpoints: EndpointTable,
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

/// Loads a program (once; the verifier runs here) and returns its fd.
fn load_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, Error> {
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
    macro_rules! load {
        ($p:expr) => {{
            if $p.fd().is_err() {
                $p.load().map_err(program_error(name))?;
            }
            $p.fd().map_err(program_error(name))?.as_fd()
        }};
    }
    Ok(match prog {
        Program::CgroupSockAddr(p) => load!(p),
        Program::SockOps(p) => load!(p),
        Program::CgroupSockopt(p) => load!(p),
        Program::SkMsg(p) => load!(p),
        Program::SchedClassifier(p) => load!(p),
        Program::SkLookup(p) => load!(p),
        _ => return Err(Error::MissingProgram { name }),
    })
}

/// Re-uses a pinned link if it still works; `false` when its attach point is gone (ENOLINK: the
/// cgroup or interface was removed, e.g. a kubelet restarted with another cgroup root) after
/// unpinning it, so the caller attaches afresh instead of failing forever.
fn adopt_pinned(path: &Path, prog: BorrowedFd<'_>) -> Result<bool, Error> {
    match update_pinned(path, prog) {
        Ok(()) => Ok(true),
        Err(Error::PinnedLink { source, .. }) if source.raw_os_error() == Some(libc::ENOLINK) => {
            tracing::warn!(pin = %path.display(), "pinned link's attach point is gone: attaching afresh");
            fs::remove_file(path).map_err(|source| Error::PinnedLink { path: path.to_path_buf(), source })?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Points an existing pinned link at a freshly loaded program (atomic: no detached moment).
fn update_pinned(path: &Path, prog: BorrowedFd<'_>) -> Result<(), Error> {
    let pinned = |source| Error::PinnedLink { path: path.to_path_buf(), source };
    let link = sys::obj_get(path).map_err(pinned)?;
    sys::link_update(link.as_fd(), prog).map_err(pinned)
}

impl Datapath {
    /// Loads the embedded object into the kernel, re-using maps pinned by an earlier run.
    pub fn load(config: DatapathConfig) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::ObjectNotBuilt);
        }
        Self::load_object(config, OBJECT)
    }

    /// [`Datapath::load`] of another object than the embedded one ([`embedded_object`]): the
    /// kernel suite loads a copy with a program the verifier refuses.
    ///
    /// [`embedded_object`]: super::embedded_object
    pub fn load_object(config: DatapathConfig, object: &[u8]) -> Result<Self, Error> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &config.pin_dir {
            let links = dir.join("links");
            fs::create_dir_all(&links).map_err(|source| Error::PinDir { path: links, source })?;
            pins::check(object, dir, names::ALL_MAPS)?;
            for name in names::ALL_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let ebpf = loader.load(object).map_err(Error::Load)?;
        let mut datapath = Self {
            config,
            ebpf,
            links: Vec::new(),
            tc_links: Vec::new(),
            sk_msg_attached: false,
            bridge_ports: std::collections::BTreeMap::new(),
            services: ServiceTable::default(),
            endpoints: EndpointTable::default(),
        };
        // After a restart the pinned maps hold what the previous run installed: adopt it, so
        // the first sync only touches what changed.
        datapath.adopt_services()?;
        datapath.adopt_endpoints()?;
        datapath.drop_stale_bridge_ports()?;
        if let Some(dir) = &datapath.config.pin_dir {
            pins::remove_retired(dir, names::ALL_MAPS);
        }
        Ok(datapath)
    }

    fn link_pin(&self, name: &str) -> Option<PathBuf> {
        self.config.pin_dir.as_ref().map(|d| d.join("links").join(name))
    }

    /// Verifies and attaches the socket programs to the configured cgroup, `sk_lookup` to this
    /// process's network namespace (the node's), and sk_msg to the sockhash. With a pin
    /// directory, links already pinned by an earlier run are kept and switched to this run's
    /// programs.
    pub fn attach(&mut self) -> Result<(), Error> {
        // The verifier sees every program before any link moves: a program it refuses leaves
        // every pinned link on the previous daemon's programs, never half of them on ours.
        let every = CGROUP_PROGRAMS.iter().map(|&(name, _)| name);
        for name in every.chain([names::PROG_SK_LOOKUP, names::PROG_SK_MSG, names::PROG_TC_TO_POD, names::PROG_TC_STEER]) {
            load_program(&mut self.ebpf, name)?;
        }
        let cgroup_path = self.config.cgroup.clone();
        let cgroup = fs::File::open(&cgroup_path).map_err(|source| Error::Cgroup { path: cgroup_path.clone(), source })?;
        for &(name, attach_type) in CGROUP_PROGRAMS {
            self.link(name, cgroup.as_fd(), attach_type, |source| Error::Attach { name, cgroup: cgroup_path.clone(), source })?;
        }
        let netns_path = self.config.netns.clone();
        let netns = fs::File::open(&netns_path).map_err(|source| Error::Netns { path: netns_path.clone(), source })?;
        let name = names::PROG_SK_LOOKUP;
        self.link(name, netns.as_fd(), attach_type::SK_LOOKUP, |source| Error::AttachNetns { name, netns: netns_path.clone(), source })?;
        self.attach_sk_msg()
    }

    /// Attaches the loaded program `name` to `target` through a link, or switches the link an
    /// earlier run pinned to it.
    fn link(&mut self, name: &'static str, target: BorrowedFd<'_>, attach_type: u32, refused: impl Fn(std::io::Error) -> Error) -> Result<(), Error> {
        let pin = self.link_pin(name);
        let prog = load_program(&mut self.ebpf, name)?;
        match pin {
            Some(path) if path.exists() && adopt_pinned(&path, prog)? => {}
            pin => {
                let link = sys::link_create(prog, target, attach_type).map_err(refused)?;
                match pin {
                    Some(path) => sys::obj_pin(link.as_fd(), &path).map_err(|source| Error::PinnedLink { path: path.clone(), source })?,
                    None => self.links.push(link),
                }
            }
        }
        Ok(())
    }

    /// The handle that points `mesh_sk_lookup` at the daemon's plaintext listener, once that
    /// listener exists. Takes the sockmap out of this `Datapath` (nothing else writes it).
    pub fn steering(&mut self) -> Result<Steering, Error> {
        Steering::new(&mut self.ebpf)
    }

    fn attach_sk_msg(&mut self) -> Result<(), Error> {
        let name = names::PROG_SK_MSG;
        load_program(&mut self.ebpf, name)?;
        let (Some(Program::SkMsg(prog)), Some(Map::SockHash(map))) =
            (self.ebpf.program(name), self.ebpf.map(names::MAP_SOCKETS))
        else {
            return Err(Error::MissingMap { name: names::MAP_SOCKETS });
        };
        let prog_fd = prog.fd().map_err(program_error(name))?.as_fd();
        // Attached to the map, not to a link: it lives as long as the (pinned) map and a
        // re-attach from a restarted daemon replaces it.
        sys::prog_attach(map.fd().as_fd(), prog_fd, sys::BPF_SK_MSG_VERDICT)
            .map_err(|source| Error::Syscall { what: "attach sk_msg to the sockhash", source })?;
        self.sk_msg_attached = true;
        Ok(())
    }

    /// Attaches the STRICT guard (tc egress) to a pod's host-side interface and, when that
    /// interface is a port of a bridge whose MAC is `bridge_mac`, the steering of the pod's
    /// plaintext to local meshed pods (tc ingress, `mesh_tc_steer`). Must run in the network
    /// namespace that owns `ifname`.
    pub fn attach_pod_interface(&mut self, ifname: &str, bridge_mac: Option<[u8; 6]>) -> Result<(), Error> {
        // TCX (kernel >= 6.6) needs no qdisc; older kernels need clsact (already-present is fine).
        let _ = tc::qdisc_add_clsact(ifname);
        self.attach_tc(names::PROG_TC_TO_POD, ifname, TcAttachType::Egress)?;
        if let Some(mac) = bridge_mac {
            self.set_bridge_port(ifname, mac)?;
            self.attach_tc(names::PROG_TC_STEER, ifname, TcAttachType::Ingress)?;
        }
        Ok(())
    }

    /// Attaches tc program `name` to `ifname` (pinned as `<name>@<ifname>`), or switches the link
    /// an earlier run pinned there to this run's program.
    fn attach_tc(&mut self, name: &'static str, ifname: &str, direction: TcAttachType) -> Result<(), Error> {
        let pin = self.link_pin(&format!("{name}@{ifname}"));
        let prog_fd = load_program(&mut self.ebpf, name)?;
        if let Some(path) = pin.as_deref().filter(|p| p.exists())
            && adopt_pinned(path, prog_fd)?
        {
            return Ok(());
        }
        let Some(Program::SchedClassifier(prog)) = self.ebpf.program_mut(name) else {
            return Err(Error::MissingProgram { name });
        };
        let id = prog.attach(ifname, direction).map_err(program_error(name))?;
        let link = prog.take_link(id).map_err(program_error(name))?;
        let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
        match pin {
            Some(path) => {
                link.pin(&path).map_err(|source| Error::Pin { what: name, path, source })?;
            }
            None => self.tc_links.push(link),
        }
        Ok(())
    }

    /// Removes the tc programs of every pod interface not in `keep` (pods that went away: their
    /// interface is gone and its links with it, but the pins would stay). Returns the interfaces
    /// whose STRICT guard was removed.
    pub fn prune_pod_interfaces(&mut self, keep: &std::collections::BTreeSet<String>) -> Vec<String> {
        let mut removed = Vec::new();
        if let Some(dir) = self.link_pin("") {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((program, ifname)) = name.split_once('@') else { continue };
                let ours = program == names::PROG_TC_TO_POD || program == names::PROG_TC_STEER;
                if !ours || keep.contains(ifname) || fs::remove_file(e.path()).is_err() {
                    continue;
                }
                // Named once per interface, by the guard every pod interface has.
                if program == names::PROG_TC_TO_POD {
                    removed.push(ifname.to_owned());
                }
            }
        }
        let gone: Vec<String> = self.bridge_ports.keys().filter(|i| !keep.contains(*i)).cloned().collect();
        for ifname in gone {
            self.forget_bridge_port(&ifname);
        }
        removed
    }

    /// Detaches every program attached by this process that is not pinned.
    pub fn detach(&mut self) {
        self.links.clear();
        self.tc_links.clear();
        if self.sk_msg_attached && self.config.pin_dir.is_none() {
            if let (Some(Program::SkMsg(prog)), Some(Map::SockHash(map))) =
                (self.ebpf.program(names::PROG_SK_MSG), self.ebpf.map(names::MAP_SOCKETS))
                && let Ok(fd) = prog.fd()
            {
                let _ = sys::prog_detach(map.fd().as_fd(), fd.as_fd(), sys::BPF_SK_MSG_VERDICT);
            }
            self.sk_msg_attached = false;
        }
    }

    /// Removes everything a daemon pinned under `pin_dir`: links (which detaches the programs
    /// once no process holds them) and maps. The explicit uninstall; a restart never does this.
    pub fn uninstall(pin_dir: &Path) -> Result<(), Error> {
        match fs::remove_dir_all(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::PinDir { path: pin_dir.to_path_buf(), source }),
        }
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }
}
