//! Checks maps pinned by an earlier daemon before this one adopts them.
//!
//! aya re-opens a map pinned under its name without looking at it. A map whose layout differs
//! from this binary's (a build that changed a map but not its name, or an object that is not
//! ours) would then either fail in the verifier with a message naming no map, or, worse, load
//! and be read with the wrong layout. Map names carry a layout version (`MESH_EP_V2`) so that a
//! changed map gets a new pin; this check turns a breach of that rule into an error that names
//! the map, both layouts and the way out, before any program is loaded or any link touched: the
//! kernel keeps running the programs and maps it has (the last good state).

use std::{fmt, path::Path};

use aya::maps::MapInfo;
use aya_obj::generated::bpf_map_type;

use super::Error;

/// What the kernel fixes when a map is created and a program relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// `bpf_map_type`; `u32::MAX` when the kernel reports a type aya does not know.
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for MapLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match bpf_map_type::try_from(self.kind) {
            Ok(kind) => write!(f, "{kind:?}")?,
            Err(_) => write!(f, "map type {}", self.kind)?,
        }
        write!(
            f,
            ", key {} B, value {} B, {} entries, flags {:#x}",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

impl MapLayout {
    fn of_object(map: &aya_obj::Map) -> Self {
        Self {
            kind: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }

    fn of_kernel(info: &MapInfo) -> Self {
        Self {
            kind: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }
}

/// Every map of `object` named in `names` that is pinned under `dir` must have the layout the
/// object defines. Maps not pinned yet are fine (the loader creates them).
pub fn check(object: &[u8], dir: &Path, names: &[&'static str]) -> Result<(), Error> {
    let parsed = aya_obj::Object::parse(object).map_err(Error::Object)?;
    for &name in names {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let expected = parsed.maps.get(name).ok_or(Error::MissingMap { name })?;
        let expected = MapLayout::of_object(expected);
        let found = match MapInfo::from_pin(&path) {
            Ok(info) => MapLayout::of_kernel(&info),
            Err(source) => return Err(Error::Map { name, source }),
        };
        if found != expected {
            return Err(Error::IncompatiblePin { name, path, found, expected });
        }
    }
    Ok(())
}

/// Whether a file in the pin directory is a map an earlier version of the daemon pinned and
/// this one no longer uses: our naming (`MESH_<NAME>_V<n>`) but not one of `current`. A map
/// gets a new versioned name when its layout changes (`MESH_EP_V1` became `MESH_EP_V2` with a
/// larger capacity), so after an upgrade the old pin would hold its kernel memory until
/// uninstall.
pub fn retired(name: &str, current: &[&str]) -> bool {
    let versioned = name.starts_with("MESH_") && name.rsplit_once("_V").is_some_and(|(_, v)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
    versioned && !current.contains(&name)
}

/// Removes the pins in `dir` that [`retired`] names (programs still using such a map keep it;
/// the kernel frees it with them).
pub fn remove_retired(dir: &Path, current: &[&str]) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !retired(&name, current) || e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => tracing::info!(map = name, "removed the pin of a map this version no longer uses"),
            Err(e) => tracing::warn!(map = name, error = %e, "could not remove the pin of a map this version no longer uses"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_maps_of_another_version_are_retired() {
        let current = ["MESH_EP_V2", "MESH_SVC_V1"];
        assert!(retired("MESH_EP_V1", &current));
        assert!(!retired("MESH_EP_V2", &current));
        assert!(!retired("MESH_SVC_V1", &current));
        assert!(!retired("links", &current), "the links directory");
        assert!(!retired("MESH_NOTES", &current), "not versioned");
        assert!(!retired("MESH_X_V", &current));
        assert!(!retired("OTHER_EP_V1", &current), "not ours");
    }

    #[test]
    fn a_layout_reads_as_the_kernel_names_its_type() {
        let l = MapLayout { kind: 1, key_size: 16, value_size: 12, max_entries: 65_536, flags: 0 };
        assert_eq!(l.to_string(), "BPF_MAP_TYPE_HASH, key 16 B, value 12 B, 65536 entries, flags 0x0");
        let unknown = MapLayout { kind: u32::MAX, ..l };
        assert!(unknown.to_string().starts_with("map type 4294967295, key 16 B"), "{unknown}");
    }
}
