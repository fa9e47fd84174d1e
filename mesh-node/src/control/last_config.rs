//! The last config this node applied, kept on disk so that a restarted daemon enforces it at once
//! (policies, STRICT, Services in the kernel and the proxy) even while the control plane is
//! unreachable, instead of starting empty and running open until the first update. It holds the
//! resources as the controller sent them (no keys: certificates are requested again), as one
//! protobuf `ConfigUpdate` with `full = true`, replaced atomically after every applied update.

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
};

use mesh_proto::config::v1 as pb;
use prost::Message as _;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a saved config: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: the saved config does not convert: {source}")]
    Convert {
        path: PathBuf,
        #[source]
        source: super::Error,
    },
}

/// The saving of one update: its resources are written to `<path>.parts` as its parts arrive
/// ([`Staging::add`]), and [`Staging::finish`] composes the new file once it is applied. The
/// node holds neither an encoded copy of its config nor of a whole update (`super::store`).
pub struct Staging {
    path: PathBuf,
    parts: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl Staging {
    /// Starts saving an update to `path`.
    pub fn new(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let parts = path.with_extension("parts");
        let out = std::io::BufWriter::new(std::fs::File::create(&parts).map_err(|source| Error::Io { path: parts.clone(), source })?);
        Ok(Self { path: path.to_owned(), parts, out })
    }

    /// Adds one resource of the update.
    pub fn add(&mut self, r: &pb::Resource) -> Result<(), Error> {
        write_resource(&mut self.out, &r.encode_to_vec()).map_err(|source| Error::Io { path: self.parts.clone(), source })
    }

    /// Writes the file for the update as applied at `version`: a `full` one is its resources
    /// alone; an incremental one keeps the old file's resources whose keys it did not replace
    /// or remove (`changed`), read back one at a time, and adds its own. Written beside and
    /// renamed over the old file, so a crash leaves the old or the new one.
    ///
    /// After a failed save the file no longer follows the updates: the caller removes it and
    /// saves again from the next full update.
    pub fn finish(self, version: u64, full: bool, changed: &HashSet<Key>) -> Result<(), Error> {
        let Self { path, parts, out } = self;
        let io = |source| Error::Io { path: path.clone(), source };
        out.into_inner().map_err(|e| Error::Io { path: parts.clone(), source: e.into_error() })?;
        let tmp = path.with_extension("tmp");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let head = pb::ConfigUpdate { version, full: true, more: false, upserts: Vec::new(), removals: Vec::new() };
        file.write_all(&head.encode_to_vec()).map_err(io)?;
        if !full {
            let old = std::fs::File::open(&path).map_err(io)?;
            for_each_resource(std::io::BufReader::new(old), |bytes| {
                let r = pb::Resource::decode(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                if super::store::key_of(&r).is_ok_and(|k| changed.contains(&k)) {
                    return Ok(());
                }
                write_resource(&mut file, bytes)
            })
            .map_err(io)?;
        }
        let mut added = std::fs::File::open(&parts).map_err(|source| Error::Io { path: parts.clone(), source })?;
        std::io::copy(&mut added, &mut file).map_err(io)?;
        drop(added);
        let file = file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::remove_file(&parts).map_err(|source| Error::Io { path: parts, source })
    }
}

/// A resource's kind and key (`super::store::Key`).
type Key = super::store::Key;

fn write_resource(out: &mut impl Write, r: &[u8]) -> std::io::Result<()> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut head = Vec::with_capacity(12);
    encode_key(UPSERTS, WireType::LengthDelimited, &mut head);
    encode_varint(r.len() as u64, &mut head);
    out.write_all(&head)?;
    out.write_all(r)
}

/// Calls `f` with each encoded resource of a saved `ConfigUpdate` read from `input`, one at a
/// time; the other fields are skipped.
fn for_each_resource(mut input: impl std::io::BufRead, mut f: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("saved config: {what}"));
    let mut buf = Vec::new();
    while !input.fill_buf()?.is_empty() {
        let tag = read_varint(&mut input)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            // varint (version, full, more)
            0 => drop(read_varint(&mut input)?),
            // length-delimited (upserts, removals)
            2 => {
                let len = usize::try_from(read_varint(&mut input)?).map_err(|_| invalid("length"))?;
                buf.resize(len, 0);
                input.read_exact(&mut buf)?;
                if field == u64::from(UPSERTS) {
                    f(&buf)?;
                }
            }
            _ => return Err(invalid("unexpected wire type")),
        }
    }
    Ok(())
}

fn read_varint(input: &mut impl std::io::Read) -> std::io::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8];
        input.read_exact(&mut byte)?;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "saved config: varint too long"))
}

/// The field number of `ConfigUpdate.upserts` (`mesh/config/v1/config.proto`).
const UPSERTS: u32 = 3;

/// The saved version and resources; `Ok(None)` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<(u64, Vec<pb::Resource>)>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Io { path: path.to_owned(), source }),
    };
    let update = pb::ConfigUpdate::decode(bytes.as_slice()).map_err(|source| Error::Decode { path: path.to_owned(), source })?;
    Ok(Some((update.version, update.upserts)))
}

/// [`load`], converted as a config update is (`convert::snapshot`, for `node` at `own_address`):
/// the saved version and the snapshot to start from.
pub fn load_snapshot(path: &Path, node: &str, own_address: std::net::IpAddr) -> Result<Option<(u64, crate::state::Snapshot)>, Error> {
    let Some((version, resources)) = load(path)? else { return Ok(None) };
    let snap = super::convert::snapshot(resources, node, own_address).map_err(|source| Error::Convert { path: path.to_owned(), source })?;
    Ok(Some((version, snap)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_resources_load_back_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("last-config.pb");
        assert!(load(&path).expect("no file").is_none());
        let policy = pb::Resource {
            kind: Some(pb::resource::Kind::AuthorizationPolicy(pb::AuthorizationPolicy { name: "deny".into(), namespace: "demo".into(), ..Default::default() })),
        };
        let save = |version, full, upserts: &[&pb::Resource], changed: &HashSet<Key>| {
            let mut staging = Staging::new(&path).expect("staging");
            for r in upserts {
                staging.add(r).expect("add");
            }
            staging.finish(version, full, changed).expect("save");
        };
        save(7, true, &[&policy], &HashSet::new());
        let (version, resources) = load(&path).expect("load").expect("a file");
        assert_eq!((version, resources), (7, vec![policy.clone()]));
        // An incremental update: the policy replaced, a workload added, then the workload removed.
        let changed = pb::Resource {
            kind: Some(pb::resource::Kind::AuthorizationPolicy(pb::AuthorizationPolicy { name: "deny".into(), namespace: "demo".into(), dry_run: true, ..Default::default() })),
        };
        let workload = pb::Resource { kind: Some(pb::resource::Kind::Workload(pb::Workload { uid: "w".into(), ..Default::default() })) };
        let keys = |rs: &[&pb::Resource]| rs.iter().map(|r| crate::control::store::key_of(r).expect("key")).collect::<HashSet<_>>();
        save(8, false, &[&changed, &workload], &keys(&[&changed, &workload]));
        assert_eq!(load(&path).expect("load").expect("a file"), (8, vec![changed.clone(), workload.clone()]));
        save(9, false, &[], &keys(&[&workload]));
        assert_eq!(load(&path).expect("load").expect("a file"), (9, vec![changed]), "the removed resource is gone, the rest kept");
        assert!(!path.with_extension("parts").exists(), "the staging file is removed");
        std::fs::write(&path, b"\xff\xff not protobuf").expect("corrupt it");
        assert!(matches!(load(&path), Err(Error::Decode { .. })));
    }
}
