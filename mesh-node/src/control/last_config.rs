//! The last config this node applied, kept on disk so that a restarted daemon enforces it at once
//! (policies, STRICT, Services in the kernel and the proxy) even while the control plane is
//! unreachable, instead of starting empty and running open until the first update. It holds the
//! resources as the controller sent them (no keys: certificates are requested again), as one
//! protobuf `ConfigUpdate` with `full = true`, replaced atomically after every applied update.

use std::{
    io::Write as _,
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

/// Writes `resources` (each an encoded `Resource`) at `version` to `path` (a temporary file
/// renamed over it, so a crash leaves the old or the new file, never half of one). The
/// `ConfigUpdate` is written field by field around the encoded resources (each an `upserts`
/// element), so nothing is decoded or copied whole to save it.
pub fn save<'a>(path: &Path, version: u64, resources: impl IntoIterator<Item = &'a [u8]>) -> Result<(), Error> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let head = pb::ConfigUpdate { version, full: true, more: false, upserts: Vec::new(), removals: Vec::new() };
    let mut bytes = head.encode_to_vec();
    for r in resources {
        encode_key(UPSERTS, WireType::LengthDelimited, &mut bytes);
        encode_varint(r.len() as u64, &mut bytes);
        bytes.extend_from_slice(r);
    }
    let io = |source| Error::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
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
        save(&path, 7, [policy.encode_to_vec().as_slice()]).expect("save");
        let (version, resources) = load(&path).expect("load").expect("a file");
        assert_eq!((version, resources), (7, vec![policy]));
        std::fs::write(&path, b"\xff\xff not protobuf").expect("corrupt it");
        assert!(matches!(load(&path), Err(Error::Decode { .. })));
    }
}
