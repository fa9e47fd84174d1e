//! Container images without a registry or a container engine: one binary (debug info stripped)
//! plus the shared libraries `ldd` names, as a single uncompressed layer in an OCI image layout,
//! written as a tar that `ctr images import` reads. `cargo xtask images` and the `k8s` suite
//! build the project's images (mesh-node, mesh-control, the sample app and the pods' pause
//! process) with [`build`].
//!
//! Our binaries link glibc dynamically; bundling the loader and the libraries the binary names is
//! what makes the image self-contained (the layer is a scratch image: nothing else is in it).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::sys::{self, Error};

/// One image to build.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `name:tag` as manifests write it (`mesh-node:0.1.0`); stored as `docker.io/library/<ref>`,
    /// which is how the kubelet normalizes a short name.
    pub reference: String,
    /// The binary; it becomes `/usr/local/bin/<file name>` and the entrypoint.
    pub binary: PathBuf,
}

/// The full name containerd stores an image under (the kubelet asks for this one).
pub fn full_name(reference: &str) -> String {
    if reference.contains('/') { reference.to_owned() } else { format!("docker.io/library/{reference}") }
}

/// The images of the project for version `version`, from the binaries in `bin_dir`.
pub fn project_images(bin_dir: &Path, version: &str) -> Vec<Spec> {
    ["mesh-node", "mesh-control", "mesh-whoami", "mesh-pause"]
        .iter()
        .map(|b| Spec { reference: format!("{b}:{version}"), binary: bin_dir.join(b) })
        .collect()
}

/// Writes `<out_dir>/<name>.tar` (an OCI image layout) for `spec`; returns its path.
pub fn build(spec: &Spec, out_dir: &Path) -> Result<PathBuf, Error> {
    let name = spec.binary.file_name().and_then(|n| n.to_str()).ok_or_else(|| missing(&spec.binary))?.to_owned();
    if !spec.binary.exists() {
        return Err(missing(&spec.binary));
    }
    sys::mkdir(out_dir)?;
    let work = out_dir.join(format!("{name}.rootfs"));
    let _ = fs::remove_dir_all(&work);
    let entry = format!("/usr/local/bin/{name}");
    let stripped = work.join(entry.trim_start_matches('/'));
    sys::mkdir(stripped.parent().expect("has a parent"))?;
    sys::run("objcopy", &["--strip-debug", &path_str(&spec.binary), &path_str(&stripped)])?;
    let mut files = vec![(entry.clone(), stripped)];
    for lib in shared_libraries(&spec.binary)? {
        files.push((lib.display().to_string(), lib));
    }

    let layer = layer_tar(&files).map_err(|source| Error::Io { path: work.clone(), source })?;
    let _ = fs::remove_dir_all(&work);
    let (layer_digest, layer_size) = (sha256(&layer), layer.len());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": [entry], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha256(&config)), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer_size }],
    })
    .to_string()
    .into_bytes();
    let tag = spec.reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256(&manifest)),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": full_name(&spec.reference),
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    })
    .to_string()
    .into_bytes();

    let out = out_dir.join(format!("{name}.tar"));
    let io = |source| Error::Io { path: out.clone(), source };
    let mut archive = tar::Builder::new(fs::File::create(&out).map_err(io)?);
    let mut add = |path: String, data: &[u8]| archive_bytes(&mut archive, &path, data, 0o644);
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    add("index.json".into(), &index).map_err(io)?;
    for blob in [&config, &manifest, &layer] {
        add(format!("blobs/sha256/{}", sha256(blob)), blob).map_err(io)?;
    }
    archive.finish().map_err(io)?;
    Ok(out)
}

fn missing(path: &Path) -> Error {
    Error::Io { path: path.into(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "binary not built (cargo build --bins)") }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Absolute paths of the shared libraries (and the loader) `binary` needs, from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd").arg(binary).output().map_err(|source| Error::Spawn { program: "ldd".into(), source })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !text.contains("not a dynamic executable") {
        return Err(Error::Command { command: format!("ldd {}", binary.display()), status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).into() });
    }
    // Lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

/// The layer: every file at its path (symlinks followed: the layer holds real files), with the
/// directories above it.
fn layer_tar(files: &[(String, PathBuf)]) -> std::io::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _) in files {
        let mut parent = Path::new(path.trim_start_matches('/')).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    for dir in ["tmp", "etc"].map(PathBuf::from).into_iter().chain(dirs) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if dir == Path::new("tmp") { 0o1777 } else { 0o755 });
        h.set_size(0);
        h.set_mtime(0);
        archive.append_data(&mut h, format!("{}/", dir.display()), std::io::empty())?;
    }
    for (path, source) in files {
        let data = fs::read(source)?;
        archive_bytes(&mut archive, path.trim_start_matches('/'), &data, 0o755)?;
    }
    archive.into_inner()
}

fn archive_bytes<W: std::io::Write>(archive: &mut tar::Builder<W>, path: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    // A fixed time: the same binaries give the same digests.
    h.set_mtime(0);
    archive.append_data(&mut h, path, data)
}

fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
