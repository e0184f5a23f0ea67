//! Call affinity in the fast path: the call's entry in `sd_affinity_v1` or the slot
//! table, by the rules of `sip_dispatch_common::affinity::choose`, and the To-tag scan
//! those rules ask for now and then.
use super::*;

/// The backend for a message with call affinity: the call's entry or the table, as
/// `choose` says, and the entry written as it says. Entries are updated in place (an
/// LRU update allocates a node, as Katran notes); a new one is inserted only for a
/// request without one.
#[inline(always)]
pub(super) fn pick_with_affinity<const LOOP: LoopKind>(
    scratch: *mut Scratch,
    service_id: u32,
    hash: u64,
) -> Result<u32, Counter> {
    let job = job_of(scratch);
    let len = unsafe { (*job).len };
    let complete = unsafe { (*job).complete };
    let first_word = Window(scratch).aligned_word_at(0);
    let class = classify_word(first_word, len);
    let key = AffinityKey {
        hash,
        service: service_id,
        _zero: 0,
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let slot = AFFINITY.get_ptr_mut(&key);
    // The id and generation as the one aligned word writers store (see the rewrite).
    let entry = slot.map(|p| unsafe {
        let target = core::ptr::read_volatile(p.cast::<u64>());
        AffinityEntry {
            backend: target as u32,
            generation: (target >> 32) as u32,
            last_seen_ns: (*p).last_seen_ns,
            flags: (*p).flags,
            _zero: 0,
        }
    });
    let flags = match &entry {
        Some(e) => backend_flags(e.backend),
        None => BackendFlags::default(),
    };
    let choice = choose(class, entry.as_ref(), flags, now, || {
        has_to_tag::<LOOP>(scratch, len, complete)
    });
    if entry.is_none() {
        count(Counter::AffinityMiss);
    }
    if let Route::Follow(id) = choice.route {
        count(Counter::AffinityHit);
        if let (EntryWrite::Touch { set_flags }, Some(p)) = (choice.write, slot) {
            unsafe {
                (*p).last_seen_ns = now;
                (*p).flags |= set_flags;
            }
        }
        return Ok(id);
    }
    let id = table_pick(service_id, hash)?;
    let generation = backend_flags(id).generation;
    match (choice.write, slot) {
        (EntryWrite::Rewrite { flags }, Some(p)) => {
            count(Counter::AffinityOverridden);
            // One aligned store of id and generation: no CPU sees one without the other.
            unsafe {
                core::ptr::write_volatile(
                    p.cast::<u64>(),
                    AffinityEntry::target_word(id, generation),
                );
                (*p).last_seen_ns = now;
                (*p).flags = flags | created_flags(first_word, len);
            }
        }
        (EntryWrite::Insert, _) => {
            let fresh = AffinityEntry {
                backend: id,
                generation,
                last_seen_ns: now,
                flags: created_flags(first_word, len),
                _zero: 0,
            };
            // BPF_NOEXIST: another CPU may have created it since the lookup; its entry
            // names the same table pick.
            if AFFINITY.insert(&key, &fresh, BPF_NOEXIST).is_ok() {
                count(Counter::AffinityInsert);
            } else if AFFINITY.get_ptr(&key).is_none() {
                count(Counter::AffinityInsertFailed);
            }
        }
        _ => {}
    }
    Ok(id)
}

const BPF_NOEXIST: u64 = 1;

/// Whether the message's To header has a tag: a second pass over the scratch copy, only
/// for a request whose call has an entry that is neither a retransmission's nor ended.
/// Beyond the window counts as no tag (the table decides, as without affinity).
#[inline(always)]
fn has_to_tag<const LOOP: LoopKind>(scratch: *mut Scratch, len: usize, complete: bool) -> bool {
    let job = tag_job_of(scratch);
    unsafe {
        (*job).scanner = ToTagScanner::new();
        (*job).at = 0;
        (*job).len = len;
        (*job).done = ToTag::BeyondWindow as u64;
        (*job).finished = 0;
    }
    // Verifier constraint: as for the Call-ID scan (`call_id_hash`), a plain loop is
    // too branchy; every step takes at least one byte, so `len` steps suffice.
    if LOOP == MAY_GOTO {
        loop {
            if !to_tag_once(scratch) || may_goto_exhausted() {
                break;
            }
        }
    } else {
        unsafe {
            bpf_loop(
                (len as u32).div_ceil(STEPS_PER_CALL as u32),
                to_tag_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            )
        };
    }
    let tag = unsafe {
        if (*job).finished != 0 {
            (*job).done
        } else {
            (*job).scanner.finish(complete) as u64
        }
    };
    tag == ToTag::Tagged as u64
}

/// One step of the To-tag scan; false once it is over (see `scan_once`).
#[inline(always)]
fn to_tag_once(scratch: *mut Scratch) -> bool {
    let job = unsafe { &mut *tag_job_of(scratch) };
    let at = unsafe { core::ptr::read_volatile(&job.at) };
    let len = unsafe { core::ptr::read_volatile(&job.len) };
    if at >= len {
        return false;
    }
    match job.scanner.step(&Window(scratch), at, len) {
        ToTagStep::Done(tag) => {
            job.done = tag as u64;
            job.finished = 1;
            false
        }
        ToTagStep::Next(next) => {
            unsafe { core::ptr::write_volatile(&mut job.at, next) };
            true
        }
    }
}

/// `bpf_loop` callback: [`STEPS_PER_CALL`] steps of the To-tag scan; 0 continues, 1
/// stops (see `scan_step`).
#[inline(never)]
extern "C" fn to_tag_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    for _ in 0..STEPS_PER_CALL {
        if !to_tag_once(scratch) {
            return 1;
        }
    }
    0
}

/// The state of one To-tag scan. Plain words: the answer is a `ToTag` value.
pub(super) struct ToTagJob {
    scanner: ToTagScanner,
    at: usize,
    len: usize,
    done: u64,
    finished: u64,
}

#[inline(always)]
fn tag_job_of(scratch: *mut Scratch) -> *mut ToTagJob {
    unsafe { &raw mut (*private(scratch)).tag }
}
