//! The pod sandbox's "pause" process, for the test nodes' containerd (`sandbox_image`), built into
//! an image by `cargo xtask images`: it holds the pod's namespaces open and does nothing else.
//! As PID 1 it gets no default signal handlers, so it waits for SIGTERM/SIGINT itself (else a
//! sandbox stop would wait for SIGKILL) and reaps any zombie re-parented to it.

use nix::sys::{
    signal::{SigSet, Signal},
    wait::{WaitPidFlag, waitpid},
};

fn main() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    set.thread_block().expect("blocking signals");
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => while waitpid(None, Some(WaitPidFlag::WNOHANG)).is_ok_and(|s| s.pid().is_some()) {},
            Ok(_) => return,
            Err(e) => panic!("sigwait: {e}"),
        }
    }
}
