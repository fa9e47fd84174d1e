//! Hitless upgrade: a running daemon hands its listening sockets to its successor over a Unix
//! socket (`SCM_RIGHTS`), as Envoy's hot restart and HAProxy's seamless reload do, so that no
//! connection attempt meets a closed port while one process replaces the other.
//!
//! The exchange on `MESH_HANDOFF_SOCKET`, one successor at a time:
//!
//! ```text
//! successor                          running daemon (predecessor)
//!   connect ───────────────────────▶ accept
//!           ◀─────────────── "mesh-node <version> <node> outbound,inbound,...\n" + the fds
//!   (builds its state on the same sockets, not accepting yet; waits until ready)
//!   starts accepting
//!   "ready\n" ─────────────────────▶ stops accepting, drains its open connections, exits
//!           ◀─────────────────────── "draining\n"
//!   binds its own hand-off socket (rename over the path)
//! ```
//!
//! Both processes hold the same listening sockets throughout: until "ready" the predecessor
//! accepts, from then on the successor does, and the kernel's accept queue carries connections
//! across the switch. A successor that finds no predecessor (no socket file, or nobody behind
//! it) binds fresh. The node name is checked: a daemon of another node (two nodes sharing a
//! filesystem, as test clusters do) must never hand over sockets of its network namespace.

use std::{
    collections::HashMap,
    io::{self, BufRead as _, BufReader, IoSlice, IoSliceMut, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// How long either side waits for the other's next message before giving up. The successor's
/// "ready" is sent once it is ready, which takes longer: the predecessor waits for it without
/// this bound (a successor that dies closes the connection, which ends the wait).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most listeners one hand-over carries (the daemon has five).
const MAX_FDS: usize = 16;
/// Longest first line (version and listener names).
const MAX_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hand-off socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hand-over with the running daemon: {0}")]
    Exchange(io::Error),
    #[error("hand-over with the running daemon: {0}")]
    Protocol(String),
}

fn protocol(what: impl Into<String>) -> Error {
    Error::Protocol(what.into())
}

/// Listening sockets received from the predecessor, by name, until each is taken.
#[derive(Debug, Default)]
pub struct Inherited(HashMap<String, OwnedFd>);

impl From<HashMap<String, OwnedFd>> for Inherited {
    fn from(sockets: HashMap<String, OwnedFd>) -> Self {
        Self(sockets)
    }
}

impl Inherited {
    /// The listener named `name`, if the predecessor sent one bound to `addr` (a listener whose
    /// address changed in the new configuration is dropped: the caller binds afresh).
    pub fn take(&mut self, name: &str, addr: std::net::SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.0.remove(name)?;
        let listener = std::net::TcpListener::from(fd);
        let bound = listener.local_addr().ok()?;
        // Port 0 (tests) asks for any port: the inherited one is it.
        if bound == addr || addr.port() == 0 && bound.ip() == addr.ip() {
            Some(listener)
        } else {
            tracing::info!(listener = name, inherited = %bound, configured = %addr, "the listener's address changed: binding the configured one");
            None
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names of the listeners not taken yet.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// The successor's end of a hand-over in progress.
pub struct Successor {
    stream: UnixStream,
    predecessor: String,
    listeners: Inherited,
}

impl Successor {
    /// Asks the daemon of node `node` behind `path` for its listeners. `Ok(None)`: nobody is
    /// there (first start, or the previous daemon is gone), bind fresh.
    pub fn connect(path: &Path, node: &str) -> Result<Option<Self>, Error> {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
            Err(source) => return Err(Error::Socket { path: path.to_path_buf(), source }),
        };
        stream.set_read_timeout(Some(MESSAGE_TIMEOUT)).map_err(Error::Exchange)?;
        let (line, fds) = receive_line(stream.as_fd())?;
        let mut words = line.split_whitespace();
        let (Some("mesh-node"), Some(version), Some(theirs)) = (words.next(), words.next(), words.next()) else {
            return Err(protocol(format!("unexpected greeting {line:?}")));
        };
        if theirs != node {
            return Err(protocol(format!("the daemon behind {} serves node {theirs:?}, not {node:?}: each node needs its own hand-off socket", path.display())));
        }
        let names: Vec<&str> = words.next().map_or_else(Vec::new, |w| w.split(',').filter(|n| !n.is_empty()).collect());
        if names.len() != fds.len() {
            return Err(protocol(format!("{} listener names for {} descriptors", names.len(), fds.len())));
        }
        let predecessor = version.to_owned();
        let listeners = Inherited(names.into_iter().map(str::to_owned).zip(fds).collect());
        Ok(Some(Self { stream, predecessor, listeners }))
    }

    /// The predecessor's version (`CARGO_PKG_VERSION`).
    pub fn predecessor(&self) -> &str {
        &self.predecessor
    }

    pub fn listeners(&mut self) -> &mut Inherited {
        &mut self.listeners
    }

    /// Tells the predecessor this process now accepts: it stops accepting and drains. Waits for
    /// its acknowledgement.
    pub fn take_over(self) -> Result<(), Error> {
        let mut stream = self.stream;
        stream.write_all(b"ready\n").map_err(Error::Exchange)?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(Error::Exchange)?;
        match line.trim_end() {
            "draining" => Ok(()),
            other => Err(protocol(format!("expected \"draining\", got {other:?}"))),
        }
    }
}

/// The running daemon's end: offers its listeners to the next daemon.
pub struct Server {
    listener: UnixListener,
    node: String,
    listeners: Offer,
}

/// The listeners on offer, until [`Offer::withdraw`].
#[derive(Clone)]
pub struct Offer(Arc<Mutex<Vec<(&'static str, OwnedFd)>>>);

impl Offer {
    /// Closes this process's duplicates of the listeners: a daemon that drains without a
    /// successor must not keep its ports listening (connections would queue where nobody
    /// accepts). A successor that asks later gets nothing and binds afresh.
    pub fn withdraw(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

impl Server {
    /// Binds the hand-off socket at `path` (replacing a predecessor's atomically: bound beside
    /// it, then renamed over it) and keeps duplicates of `listeners` to send.
    pub fn new(path: &Path, node: &str, listeners: Vec<(&'static str, OwnedFd)>) -> Result<Self, Error> {
        let socket_error = |source| Error::Socket { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(socket_error)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(socket_error)?;
        std::fs::rename(&tmp, path).map_err(socket_error)?;
        Ok(Self { listener, node: node.to_owned(), listeners: Offer(Arc::new(Mutex::new(listeners))) })
    }

    /// A handle that withdraws the offer (drain without a successor).
    pub fn offer(&self) -> Offer {
        self.listeners.clone()
    }

    /// Serves successors until one takes over, then calls `drain` and returns. Blocking: run it
    /// on its own thread. A successor that fails or goes away mid-way is logged, and the next
    /// one is served.
    pub fn run(self, drain: impl FnOnce()) {
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off socket: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match self.hand_over(&stream) {
                Ok(()) => {
                    tracing::info!("a successor took over: draining");
                    drain();
                    let _ = (&stream).write_all(b"draining\n");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "hand-over failed: still serving"),
            }
        }
    }

    fn hand_over(&self, stream: &UnixStream) -> Result<(), Error> {
        stream.set_write_timeout(Some(MESSAGE_TIMEOUT)).map_err(Error::Exchange)?;
        let names = {
            let listeners = self.listeners.0.lock().unwrap_or_else(PoisonError::into_inner);
            if listeners.is_empty() {
                return Err(protocol("draining without a successor: nothing to hand over"));
            }
            let names: Vec<&str> = listeners.iter().map(|(n, _)| *n).collect();
            let line = format!("mesh-node {} {} {}\n", env!("CARGO_PKG_VERSION"), self.node, names.join(","));
            let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            send_line(stream.as_fd(), line.as_bytes(), &fds)?;
            names
        };
        tracing::info!(listeners = %names.join(","), "listeners sent to a successor; serving until it is ready");
        let mut ready = String::new();
        // No timeout: the successor answers once it is ready (config, certificates, datapath);
        // if it dies, the connection closes and this read ends.
        BufReader::new(stream).read_line(&mut ready).map_err(Error::Exchange)?;
        match ready.trim_end() {
            "ready" => Ok(()),
            "" => Err(protocol("the successor went away before it was ready")),
            other => Err(protocol(format!("expected \"ready\", got {other:?}"))),
        }
    }
}

/// Sends one line and descriptors with it in one `sendmsg`. Public for the lab, which stands in
/// for systemd's socket activation with the same exchange.
pub fn send_line(stream: BorrowedFd<'_>, line: &[u8], fds: &[RawFd]) -> Result<(), Error> {
    let iov = [IoSlice::new(line)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, if fds.is_empty() { &[] } else { &cmsg }, MsgFlags::MSG_NOSIGNAL, None).map_err(|e| Error::Exchange(e.into()))?;
    if sent != line.len() {
        return Err(protocol(format!("sent {sent} of {} bytes", line.len())));
    }
    Ok(())
}

/// Reads the first line (without its newline) and the descriptors that came with it (one
/// `recvmsg`: [`send_line`] writes the line in one `sendmsg`, well under a socket buffer).
pub fn receive_line(stream: BorrowedFd<'_>) -> Result<(String, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; MAX_LINE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).map_err(|e| Error::Exchange(e.into()))?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(|e| Error::Exchange(e.into()))? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now; nothing
            // else owns them.
            #[expect(unsafe_code, reason = "taking ownership of descriptors received with SCM_RIGHTS")]
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(protocol("more descriptors than expected (truncated)"));
    }
    let n = msg.bytes;
    let line = std::str::from_utf8(&buf[..n]).map_err(|_| protocol("greeting is not UTF-8"))?;
    let Some(line) = line.strip_suffix('\n') else {
        return Err(protocol(if n == 0 { "the running daemon closed the connection".to_owned() } else { format!("incomplete greeting {line:?}") }));
    };
    Ok((line.to_owned(), fds))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    };

    use super::*;

    /// A daemon of `node` offering one listener ("outbound") on a hand-off socket, served on
    /// its own thread; `drain` runs on take-over.
    fn offering(node: &str, drain: impl FnOnce() + Send + 'static) -> (tempfile::TempDir, PathBuf, TcpListener, Offer) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("handoff.sock");
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let server = Server::new(&path, node, vec![("outbound", tcp.try_clone().expect("dup").into())]).expect("server");
        let offer = server.offer();
        std::thread::spawn(move || server.run(drain));
        (dir, path, tcp, offer)
    }

    #[test]
    fn a_successor_accepts_on_the_predecessors_listener_and_the_predecessor_drains() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("handoff.sock");
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let admin = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let listeners = vec![("outbound", tcp.try_clone().expect("dup").into()), ("admin", admin.into())];
        let server = Server::new(&path, "n1", listeners).expect("server");
        let (drained_tx, drained_rx) = std::sync::mpsc::channel();
        let old = std::thread::spawn(move || server.run(move || drained_tx.send(()).expect("send")));

        // A client connects before the hand-over: queued on the shared socket.
        let mut early = TcpStream::connect(addr).expect("connect");
        let mut successor = Successor::connect(&path, "n1").expect("exchange").expect("someone is there");
        assert_eq!(successor.predecessor(), env!("CARGO_PKG_VERSION"));
        assert!(successor.listeners().take("admin", SocketAddr::from((Ipv4Addr::LOCALHOST, 1))).is_none(), "configured elsewhere now: not reused");
        assert!(successor.listeners().take("metrics", addr).is_none(), "not sent");
        let inherited = successor.listeners().take("outbound", addr).expect("the same socket");
        assert!(successor.listeners().is_empty());
        drop(tcp); // the predecessor closes its own descriptor: the socket lives on in the successor
        let (mut conn, _) = inherited.accept().expect("the queued connection is the successor's");
        conn.write_all(b"hi").expect("write");
        let mut got = [0u8; 2];
        early.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
        assert!(drained_rx.try_recv().is_err(), "not draining before the successor is ready");
        successor.take_over().expect("take over");
        drained_rx.recv_timeout(Duration::from_secs(5)).expect("the predecessor drains");
        old.join().expect("server thread");
    }

    #[test]
    fn a_daemon_draining_without_a_successor_hands_nothing_over() {
        let (_dir, path, tcp, offer) = offering("n1", || panic!("no take-over"));
        offer.withdraw();
        drop(tcp);
        let err = Successor::connect(&path, "n1").err().expect("nothing to take over");
        assert!(err.to_string().contains("closed the connection"), "{err}");
    }

    #[test]
    fn a_daemon_of_another_node_is_refused() {
        let (_dir, path, _tcp, _) = offering("n2", || panic!("no take-over"));
        let err = Successor::connect(&path, "n1").err().expect("refused");
        assert!(err.to_string().contains("serves node \"n2\""), "{err}");
    }

    #[test]
    fn nobody_there_means_bind_fresh() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(Successor::connect(&dir.path().join("none.sock"), "n1").expect("no error").is_none());
        // A stale socket file from a daemon that is gone.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind"));
        assert!(Successor::connect(&stale, "n1").expect("no error").is_none());
    }

    #[test]
    fn a_successor_that_dies_before_ready_leaves_the_predecessor_serving() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("handoff.sock");
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let server = Server::new(&path, "n1", vec![("inbound", tcp.try_clone().expect("dup").into())]).expect("server");
        let (drained_tx, drained_rx) = std::sync::mpsc::channel();
        let old = std::thread::spawn(move || server.run(move || drained_tx.send(()).expect("send")));
        let dead = Successor::connect(&path, "n1").expect("exchange").expect("someone is there");
        drop(dead);
        std::thread::sleep(Duration::from_millis(100));
        assert!(drained_rx.try_recv().is_err(), "still serving");
        let next = Successor::connect(&path, "n1").expect("a second successor is served").expect("someone is there");
        next.take_over().expect("take over");
        drained_rx.recv_timeout(Duration::from_secs(5)).expect("drains");
        old.join().expect("server thread");
    }
}
