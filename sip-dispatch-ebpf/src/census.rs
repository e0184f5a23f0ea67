//! The held-call census program (graceful drain).
use super::*;

/// The held-call census (graceful drain): loaded, never attached; userspace runs it
/// through BPF_PROG_TEST_RUN with a [`CensusInput`] as the frame. It zeroes `sd_held_v1`,
/// then walks the affinity map in the kernel (one helper call, where userspace needs two
/// syscalls per entry) and counts per backend id the entries that hold a call
/// (`census::holds_call`), all entries, and those that hold none. XDP_PASS when done,
/// XDP_DROP when the input is short or the walk failed.
#[xdp]
pub fn affinity_census(ctx: XdpContext) -> u32 {
    let Some(input) = ptr_at::<CensusInput>(&ctx, 0) else {
        return XDP_DROP;
    };
    let mut walk = CensusWalk {
        idle_ns: unsafe { (*input).idle_ns },
        now_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    // Verifier constraint: a plain loop over 4098 slots is too long to unroll or
    // verify; bpf_loop runs the callback that many times as one instruction.
    unsafe {
        bpf_loop(
            HELD_SLOTS,
            zero_held_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let walked = unsafe {
        bpf_for_each_map_elem(
            core::ptr::from_ref(&AFFINITY).cast_mut().cast(),
            census_step as *mut c_void,
            core::ptr::from_mut(&mut walk).cast(),
            0,
        )
    };
    if walked < 0 { XDP_DROP } else { XDP_PASS }
}

/// What the census callback needs (on the census program's stack).
#[repr(C)]
struct CensusWalk {
    idle_ns: u64,
    now_ns: u64,
}

#[inline(never)]
extern "C" fn zero_held_step(index: u64, _ctx: *mut c_void) -> i64 {
    if let Some(p) = HELD.get_ptr_mut(index as u32) {
        unsafe { *p = 0 };
    }
    0
}

#[inline(always)]
fn held_add(index: u32) {
    if let Some(p) = HELD.get_ptr_mut(index) {
        unsafe { *p += 1 };
    }
}

/// One entry of the census walk; 0 continues.
#[inline(never)]
extern "C" fn census_step(
    _map: *mut c_void,
    _key: *const AffinityKey,
    value: *const AffinityEntry,
    ctx: *const CensusWalk,
) -> i64 {
    let (entry, walk) = unsafe { (*value, &*ctx) };
    held_add(HELD_ENTRIES);
    if entry.backend < MAX_BACKENDS
        && holds_call(
            &entry,
            backend_flags(entry.backend),
            walk.now_ns,
            walk.idle_ns,
        )
    {
        held_add(entry.backend);
    } else {
        held_add(HELD_STALE);
    }
    0
}
