//! Loading the embedded object, attaching it to a cgroup, and pinning what must outlive us.

use std::{fs, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use mesh_common::names;

use super::{Error, OBJECT, services::ServiceTable};

/// Where the datapath attaches and pins.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// cgroup v2 directory whose processes (the pods of this node) get socket load balancing.
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps (`<dir>/<MAP>`); `None` keeps everything in this process.
    pub pin_dir: Option<PathBuf>,
}

/// The loaded kernel datapath. Dropping it detaches links that are not pinned.
pub struct Datapath {
    config: DatapathConfig,
    ebpf: Ebpf,
    links: Vec<FdLink>,
    services: ServiceTable,
}

impl Datapath {
    /// Loads the embedded object into the kernel (programs are verified at `attach`).
    pub fn load(config: DatapathConfig) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::ObjectNotBuilt);
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &config.pin_dir {
            fs::create_dir_all(dir).map_err(|source| Error::PinDir { path: dir.clone(), source })?;
            // Re-uses a map already pinned there (daemon restart), else creates and pins it.
            for name in names::ALL_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let ebpf = loader.load(OBJECT).map_err(Error::Load)?;
        Ok(Self { config, ebpf, links: Vec::new(), services: ServiceTable::default() })
    }

    /// Verifies and attaches the socket programs to the configured cgroup.
    pub fn attach(&mut self) -> Result<(), Error> {
        let name = names::PROG_CONNECT4;
        let cgroup = fs::File::open(&self.config.cgroup)
            .map_err(|source| Error::Cgroup { path: self.config.cgroup.clone(), source })?;
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram { name })?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        program.load().map_err(|source| Error::Program { name, source })?;
        // On kernels >= 5.7 aya attaches with bpf_link_create, whose cgroup links always behave
        // as multi-attach and which rejects any attach flag (EINVAL): so `Single` (flags 0).
        let link_id = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| Error::Program { name, source })?;
        let link = program.take_link(link_id).map_err(|source| Error::Program { name, source })?;
        // Kernels >= 5.7 attach cgroup programs as bpf_link, which can be pinned and updated.
        let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
        self.links.push(link);
        Ok(())
    }

    /// Detaches every program attached by this process.
    pub fn detach(&mut self) {
        self.links.clear();
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }

    pub(super) fn parts(&mut self) -> (&mut Ebpf, &mut ServiceTable) {
        (&mut self.ebpf, &mut self.services)
    }
}
