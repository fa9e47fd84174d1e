//! The few bpf(2) commands aya 0.14 does not expose: attaching sk_msg to a sockhash whose values
//! are 8 bytes (aya's typed SockHash insists on 4), opening pinned objects by path, and swapping
//! the program behind an existing link (BPF_LINK_UPDATE) so a restarted daemon replaces its
//! programs without a moment of detachment.
#![expect(unsafe_code, reason = "raw bpf(2) syscalls with kernel-defined attr layouts")]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_attach_type`: BPF_SK_MSG_VERDICT.
pub const BPF_SK_MSG_VERDICT: u32 = 7;

/// `union bpf_attr` is at most a few hundred bytes; 128 zeroed bytes cover every command here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised bpf_attr-sized buffer filled per the kernel ABI for
    // `cmd`; the kernel reads at most `size` bytes of it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as libc::c_uint) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("file descriptors are non-negative")
}

/// BPF_PROG_ATTACH { target_fd, attach_bpf_fd, attach_type, attach_flags }: attaches a program
/// to a map (sk_msg → sockhash). Re-attaching replaces the map's current program.
pub fn prog_attach(target: BorrowedFd<'_>, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(target));
    attr.put_u32(4, fd_u32(prog));
    attr.put_u32(8, attach_type);
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// BPF_PROG_DETACH of a specific program from a map.
pub fn prog_detach(target: BorrowedFd<'_>, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(target));
    attr.put_u32(4, fd_u32(prog));
    attr.put_u32(8, attach_type);
    bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

/// BPF_OBJ_GET { pathname, bpf_fd = 0, file_flags = 0 }: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd fits i32")) })
}

/// BPF_LINK_CREATE { prog_fd, target_fd, attach_type, flags = 0 }: a bpf_link attaching a
/// program to a cgroup. Closing the last reference (fd or pin) detaches it.
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(prog));
    attr.put_u32(4, fd_u32(target));
    attr.put_u32(8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("fd fits i32")) })
}

/// BPF_OBJ_PIN { pathname, bpf_fd, file_flags = 0 }: pins an object in bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    attr.put_u32(8, fd_u32(fd));
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// BPF_LINK_UPDATE { link_fd, new_prog_fd, flags = 0 }: atomically replaces a link's program.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd_u32(link));
    attr.put_u32(4, fd_u32(new_prog));
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// A cgroup v2 id is its directory's inode number (what bpf_get_current_cgroup_id returns).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.ino())
}

/// `enum bpf_attach_type` values of the hooks we attach through links (include/uapi/linux/bpf.h).
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_UDP4_SENDMSG: u32 = 14;
    pub const CGROUP_UDP6_SENDMSG: u32 = 15;
    pub const CGROUP_UDP4_RECVMSG: u32 = 19;
    pub const CGROUP_UDP6_RECVMSG: u32 = 20;
    pub const CGROUP_GETSOCKOPT: u32 = 21;
    pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const CGROUP_INET6_GETPEERNAME: u32 = 30;
    /// Not a cgroup hook: `sk_lookup` attaches to a network namespace.
    pub const SK_LOOKUP: u32 = 36;
}
