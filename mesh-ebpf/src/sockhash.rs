//! A BTF-defined SOCKHASH with 8-byte values.
//!
//! aya-ebpf's `SockHash` declares 4-byte values; for those the kernel cannot return socket
//! cookies on lookup, so `bpftool map dump` prints an error per entry. With 8-byte values the
//! dump shows each socket's cookie. Layout follows the libbpf BTF map convention: pointer fields
//! whose pointee types encode type, key, value and max_entries.

use core::ptr;

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SOCKHASH, bpf_sock_ops},
    helpers::generated::{bpf_msg_redirect_hash, bpf_sock_hash_update},
    programs::SkMsgContext,
};

#[repr(C)]
pub struct SockHash64<K, const MAX_ENTRIES: usize> {
    r#type: *const [i32; BPF_MAP_TYPE_SOCKHASH as usize],
    key: *const K,
    value: *const u64,
    max_entries: *const [i32; MAX_ENTRIES],
    map_flags: *const [i32; 0],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced from Rust.
unsafe impl<K, const M: usize> Sync for SockHash64<K, M> {}

impl<K, const M: usize> SockHash64<K, M> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    fn as_ptr(&self) -> *mut core::ffi::c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// Adds the socket of a sock_ops context under `key`.
    #[inline(always)]
    pub fn update(&self, key: &mut K, ops: *mut bpf_sock_ops, flags: u64) -> i64 {
        // SAFETY: helper contract: valid map, key pointer, sock_ops context.
        unsafe { bpf_sock_hash_update(ops, self.as_ptr().cast(), ptr::from_mut(key).cast(), flags) }
    }

    /// Redirects the message to the socket stored under `key` (SK_PASS on success).
    #[inline(always)]
    pub fn redirect_msg(&self, ctx: &SkMsgContext, key: &mut K, flags: u64) -> i64 {
        // SAFETY: helper contract: valid sk_msg context, map and key pointer.
        unsafe { bpf_msg_redirect_hash(ctx.msg, self.as_ptr().cast(), ptr::from_mut(key).cast(), flags) }
    }
}
