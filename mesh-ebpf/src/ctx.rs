//! Field loads and stores on kernel-owned structs (contexts, `bpf_sock`).
//!
//! The verifier only accepts context and socket accesses of the form `*(base + constant)`.
//! LLVM happily hoists `base + offset` into a register and loads through it later ("dereference
//! of modified ctx ptr ... disallowed"), even for volatile accesses. Inline asm pins the exact
//! instruction: one load or store at a constant offset from the unmodified base pointer.

use core::arch::asm;

/// Loads the u32 at byte `OFF` of `*base`.
#[inline(always)]
pub unsafe fn load_u32<const OFF: usize, T>(base: *const T) -> u32 {
    let value: u64;
    // SAFETY: caller guarantees `base` is a valid kernel struct with a u32 at `OFF`.
    unsafe { asm!("{v} = *(u32 *)({b} + {off})", v = out(reg) value, b = in(reg) base, off = const OFF, options(readonly, nostack)) };
    #[allow(clippy::cast_possible_truncation, reason = "a 32-bit load zero-extends")]
    let value = value as u32;
    value
}

/// Stores a u32 at byte `OFF` of `*base`.
#[inline(always)]
pub unsafe fn store_u32<const OFF: usize, T>(base: *mut T, value: u32) {
    // SAFETY: caller guarantees `base` is a valid, writable kernel struct field at `OFF`.
    unsafe { asm!("*(u32 *)({b} + {off}) = {v}", b = in(reg) base, v = in(reg) u64::from(value), off = const OFF, options(nostack)) };
}

/// Loads the four u32 words of an IPv6 address field: `load_ip6!(ptr, Type, field)`.
macro_rules! load_ip6 {
    ($base:expr, $ty:ty, $field:ident) => {{
        const OFF: usize = core::mem::offset_of!($ty, $field);
        [
            $crate::ctx::load_u32::<{ OFF }, _>($base),
            $crate::ctx::load_u32::<{ OFF + 4 }, _>($base),
            $crate::ctx::load_u32::<{ OFF + 8 }, _>($base),
            $crate::ctx::load_u32::<{ OFF + 12 }, _>($base),
        ]
    }};
}

/// Stores four u32 words of an IPv6 address field: `store_ip6!(ptr, Type, field, words)`.
macro_rules! store_ip6 {
    ($base:expr, $ty:ty, $field:ident, $w:expr) => {{
        const OFF: usize = core::mem::offset_of!($ty, $field);
        let w: [u32; 4] = $w;
        $crate::ctx::store_u32::<{ OFF }, _>($base, w[0]);
        $crate::ctx::store_u32::<{ OFF + 4 }, _>($base, w[1]);
        $crate::ctx::store_u32::<{ OFF + 8 }, _>($base, w[2]);
        $crate::ctx::store_u32::<{ OFF + 12 }, _>($base, w[3]);
    }};
}

pub(crate) use {load_ip6, store_ip6};
