//! Socket activation: listening sockets passed in by a service manager (systemd's
//! `sd_listen_fds(3)` protocol: `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from 3).
//!
//! The manager binds the ports once and keeps them open while the daemon stops, crashes and
//! starts again: connection attempts in between wait in the kernel's accept queue instead of
//! being refused, and the next daemon accepts them. Each descriptor is named after the listener
//! it replaces (`FileDescriptorName=` in the socket unit); the daemon binds the ones not passed.

use std::{
    collections::HashMap,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
};

use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    sys::socket::{getsockopt, sockopt},
};

use crate::handoff::Inherited;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;
/// The daemon's listeners, by the names sockets are passed under.
const NAMES: [&str; 5] = crate::app::listener::ALL;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket activation: {var}={value:?}: {reason}")]
    Invalid { var: &'static str, value: String, reason: String },
    #[error("socket activation: descriptor {fd} ({name}) is not a listening TCP socket: {reason}")]
    NotListening { fd: RawFd, name: String, reason: String },
}

/// What the environment says was passed: (name, descriptor) pairs, or `None` when nothing was
/// passed to this process (no `LISTEN_PID`, or another process's).
pub fn parse(listen_pid: Option<&str>, listen_fds: Option<&str>, names: Option<&str>, own_pid: u32) -> Result<Option<Vec<(String, RawFd)>>, Error> {
    let Some(pid) = listen_pid else { return Ok(None) };
    let invalid = |var, value: &str, reason: &str| Error::Invalid { var, value: value.to_owned(), reason: reason.to_owned() };
    if pid.parse::<u32>().map_err(|_| invalid("LISTEN_PID", pid, "not a process id"))? != own_pid {
        return Ok(None);
    }
    let count = listen_fds.unwrap_or_default();
    let n: usize = count.parse().map_err(|_| invalid("LISTEN_FDS", count, "not a count"))?;
    if n == 0 || n > NAMES.len() {
        return Err(invalid("LISTEN_FDS", count, &format!("between 1 and {} sockets", NAMES.len())));
    }
    let listed = names.ok_or_else(|| invalid("LISTEN_FDNAMES", "", "name each socket after the listener it is: FileDescriptorName= in the socket unit"))?;
    let names: Vec<&str> = listed.split(':').collect();
    if names.len() != n {
        return Err(invalid("LISTEN_FDNAMES", listed, &format!("{} names for {n} sockets", names.len())));
    }
    let mut out: Vec<(String, RawFd)> = Vec::with_capacity(n);
    for (i, name) in names.into_iter().enumerate() {
        if !NAMES.contains(&name) {
            return Err(invalid("LISTEN_FDNAMES", listed, &format!("{name:?} is no listener of the daemon (one of {})", NAMES.join(", "))));
        }
        if out.iter().any(|(seen, _)| seen == name) {
            return Err(invalid("LISTEN_FDNAMES", listed, &format!("{name:?} is passed twice")));
        }
        out.push((name.to_owned(), FIRST_FD + RawFd::try_from(i).expect("at most five")));
    }
    Ok(Some(out))
}

/// The listeners the service manager passed to this process, if any. Takes ownership of the
/// descriptors (close-on-exec from now on). The variables stay: `LISTEN_PID` names this
/// process, so nothing it might start would take them for its own.
pub fn listeners() -> Result<Option<Inherited>, Error> {
    let var = |name| std::env::var(name).ok();
    let passed = parse(var("LISTEN_PID").as_deref(), var("LISTEN_FDS").as_deref(), var("LISTEN_FDNAMES").as_deref(), std::process::id());
    let Some(passed) = passed? else { return Ok(None) };
    let mut sockets = HashMap::new();
    for (name, fd) in passed {
        let not_listening = |reason: String| Error::NotListening { fd, name: name.clone(), reason };
        #[expect(unsafe_code, reason = "taking ownership of the descriptors the service manager passed")]
        // SAFETY: the protocol hands descriptors 3.. to this process, once; nothing else owns them.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| not_listening(e.to_string()))?;
        match getsockopt(&owned, sockopt::AcceptConn) {
            Ok(true) => {}
            Ok(false) => return Err(not_listening("not listening".into())),
            Err(e) => return Err(not_listening(e.to_string())),
        }
        sockets.insert(name, owned);
    }
    Ok(Some(Inherited::from(sockets)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_sockets_are_named_listeners_from_descriptor_3() {
        let parsed = parse(Some("42"), Some("2"), Some("outbound:inbound"), 42).expect("valid");
        assert_eq!(parsed, Some(vec![("outbound".into(), 3), ("inbound".into(), 4)]));
        assert_eq!(parse(None, Some("2"), Some("outbound:inbound"), 42).expect("valid"), None, "not activated");
        assert_eq!(parse(Some("7"), Some("2"), Some("outbound:inbound"), 42).expect("valid"), None, "meant for another process");
    }

    #[test]
    fn what_cannot_be_served_is_named() {
        for (fds, names, needle) in [
            (Some("x"), Some("outbound"), "LISTEN_FDS=\"x\": not a count"),
            (Some("0"), Some(""), "between 1 and 5"),
            (Some("2"), None, "FileDescriptorName="),
            (Some("2"), Some("outbound"), "1 names for 2 sockets"),
            (Some("1"), Some("mesh-node.socket"), "\"mesh-node.socket\" is no listener of the daemon"),
            (Some("2"), Some("inbound:inbound"), "\"inbound\" is passed twice"),
        ] {
            let err = parse(Some("42"), fds, names, 42).expect_err(needle);
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
