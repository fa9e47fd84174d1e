//! Packet captures with tcpdump inside a namespace of the lab, for tests that look at the wire.
//!
//! A capture is usable only once tcpdump has opened the interface. A fixed sleep was not
//! enough: on a cold machine tcpdump took longer than 700 ms to start, the traffic went by
//! unseen, and an assertion about the wire failed. So [`Capture::start`] waits for tcpdump's
//! own "listening on" line. And without `--immediate-mode`, libpcap hands packets to tcpdump in
//! blocks, a block when it fills or after tcpdump's 1 s timeout: a capture stopped within a
//! second of the traffic lost it, now and then, whether stopped by SIGKILL or SIGINT (measured:
//! "8 packets received by filter, 0 captured"). Immediate mode delivers each packet at once.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::sys::Error;

/// How long tcpdump may take to open the interface.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// tcpdump writing every packet of one interface of one network namespace to a pcap file.
pub struct Capture {
    child: Child,
    file: PathBuf,
    stderr: mpsc::Receiver<String>,
}

impl Capture {
    /// Starts tcpdump on `iface` in the namespace mounted at `/run/netns/<netns>`, writing to
    /// `file`, with an optional filter expression; returns once tcpdump captures.
    pub fn start(netns: &str, iface: &str, file: &Path, filter: &[&str]) -> Result<Self, Error> {
        let net = format!("--net=/run/netns/{netns}");
        let mut child = Command::new("nsenter")
            .args([net.as_str(), "tcpdump", "--immediate-mode", "-i", iface, "-U", "-s", "0", "-w"])
            .arg(file)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn { program: "nsenter tcpdump".into(), source })?;
        let (lines, stderr) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        // Reads stderr to its end, so tcpdump never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut capture = Self { child, file: file.to_owned(), stderr };
        let mut said = Vec::new();
        loop {
            match capture.stderr.recv_timeout(START_TIMEOUT) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => said.push(line),
                Err(_) => {
                    let status = capture.child.try_wait().ok().flatten().map_or_else(|| "still running".to_owned(), |s| s.to_string());
                    capture.stop();
                    return Err(Error::Command {
                        command: format!("tcpdump -i {iface} in {netns}"),
                        status: format!("{status}, not capturing after {START_TIMEOUT:?}"),
                        stderr: said.join("\n"),
                    });
                }
            }
        }
    }

    /// The pcap file (removed when the capture is finished or dropped).
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT);
        }
        // tcpdump exits at once on SIGINT; a wedged one is killed rather than waited for.
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Lets the last packets arrive, stops tcpdump and returns the pcap file's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, Error> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop();
        std::fs::read(&self.file).map_err(|source| Error::Io { path: self.file.clone(), source })
    }

    /// Captures while `traffic` runs.
    pub fn around(netns: &str, iface: &str, file: &Path, traffic: impl FnOnce()) -> Result<Vec<u8>, Error> {
        let capture = Self::start(netns, iface, file, &[])?;
        traffic();
        capture.finish()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}
