//! The credential the admin port's mutations (`POST /logging`, `POST /quitquitquit`) need: a
//! bearer token in a file only the daemon's user (root) can read. Reading (`/config_dump`,
//! `/ready`, `/debug/explain`) stays open to localhost, as on Envoy's and ztunnel's admin ports;
//! changing the daemon does not, because every process of the node — `hostNetwork` pods too —
//! reaches 127.0.0.1:15000, and a shutdown there stops the node's mesh.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use http::{HeaderValue, StatusCode};

/// Where the token is: the variable every error names.
pub const ENV_ADMIN_TOKEN_FILE: &str = "MESH_ADMIN_TOKEN_FILE";

/// A token shorter than this was not made to be a secret.
const MIN_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source} ({ENV_ADMIN_TOKEN_FILE})")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} may be read or written by other users (mode {mode:o}): chmod 600 it ({ENV_ADMIN_TOKEN_FILE})")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} holds a token of {len} characters; at least {MIN_LEN} are needed ({ENV_ADMIN_TOKEN_FILE})")]
    Short { path: PathBuf, len: usize },
}

/// What admin mutations are checked against.
pub enum Credential {
    /// No token file configured: mutations are refused (SIGTERM still drains the daemon).
    Off,
    Token(Vec<u8>),
}

impl Credential {
    /// Reads the token at `path`, or creates the file (mode 0600, 32 random bytes as hex) when
    /// there is none: a successor daemon started by an upgrade finds the same token.
    pub fn load_or_create(path: Option<&Path>) -> Result<Self, Error> {
        let Some(path) = path else { return Ok(Self::Off) };
        let io = |source| Error::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(mut file) => {
                let token = random_hex().map_err(io)?;
                file.write_all(token.as_bytes()).and_then(|()| file.sync_all()).map_err(io)?;
                tracing::info!(path = %path.display(), "admin token created");
                return Ok(Self::Token(token.into_bytes()));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let mut file = fs::File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::Exposed { path: path.to_owned(), mode });
        }
        let mut token = String::new();
        file.read_to_string(&mut token).map_err(io)?;
        let token = token.trim();
        if token.len() < MIN_LEN {
            return Err(Error::Short { path: path.to_owned(), len: token.len() });
        }
        Ok(Self::Token(token.as_bytes().to_vec()))
    }

    /// Admits a mutation carrying `Authorization: Bearer <token>`; otherwise the status and the
    /// reason to answer with.
    pub fn check(&self, authorization: Option<&HeaderValue>) -> Result<(), (StatusCode, String)> {
        let Self::Token(token) = self else {
            return Err((StatusCode::FORBIDDEN, format!("admin mutations are off: start the daemon with {ENV_ADMIN_TOKEN_FILE}\n")));
        };
        let Some(given) = authorization.and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")) else {
            return Err((StatusCode::UNAUTHORIZED, format!("this needs Authorization: Bearer <the token in {ENV_ADMIN_TOKEN_FILE}>\n")));
        };
        if constant_time_eq(given.trim_ascii(), token) { Ok(()) } else { Err((StatusCode::FORBIDDEN, "wrong admin token\n".into())) }
    }
}

/// Compares without stopping at the first difference, so response times do not reveal how
/// much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().fold(String::with_capacity(64), |mut hex, b| {
        let _ = std::fmt::Write::write_fmt(&mut hex, format_args!("{b:02x}"));
        hex
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header")
    }

    #[test]
    fn a_token_file_is_created_private_and_found_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node-a/admin-token");
        let Credential::Token(first) = Credential::load_or_create(Some(&path)).expect("created") else { panic!("a token") };
        assert_eq!(first.len(), 64);
        assert_eq!(fs::metadata(&path).expect("file").permissions().mode() & 0o777, 0o600);
        let Credential::Token(again) = Credential::load_or_create(Some(&path)).expect("read") else { panic!("a token") };
        assert_eq!(first, again, "a successor reads the same token");
    }

    #[test]
    fn exposed_or_short_token_files_stop_the_daemon_naming_the_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin-token");
        fs::write(&path, "x".repeat(40)).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Credential::load_or_create(Some(&path)).err().expect("refused").to_string();
        assert!(err.contains("mode 644") && err.contains(ENV_ADMIN_TOKEN_FILE), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&path, "short\n").expect("write");
        let err = Credential::load_or_create(Some(&path)).err().expect("refused").to_string();
        assert!(err.contains("5 characters"), "{err}");
    }

    #[test]
    fn mutations_need_the_exact_token() {
        let token = "0123456789abcdef0123456789abcdef";
        let cred = Credential::Token(token.as_bytes().to_vec());
        assert!(cred.check(Some(&bearer(token))).is_ok());
        assert_eq!(cred.check(None).expect_err("no header").0, StatusCode::UNAUTHORIZED);
        assert_eq!(cred.check(Some(&HeaderValue::from_static("Basic abc"))).expect_err("not bearer").0, StatusCode::UNAUTHORIZED);
        assert_eq!(cred.check(Some(&bearer(&token[1..]))).expect_err("prefix").0, StatusCode::FORBIDDEN);
        assert_eq!(cred.check(Some(&bearer("0123456789abcdef0123456789abcdeF"))).expect_err("one byte").0, StatusCode::FORBIDDEN);
        let (code, why) = Credential::Off.check(Some(&bearer(token))).expect_err("off");
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert!(why.contains(ENV_ADMIN_TOKEN_FILE), "{why}");
    }
}
