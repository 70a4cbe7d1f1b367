// SPDX-License-Identifier: GPL-2.0
//! Re-merging, on request (the MERGE ioctl) and in the background: a
//! kernel thread, like KSM's `ksmd`, that wakes every `merge_interval_ms`
//! and has the hypervisor examine up to `merge_batch` pages, in MERGE
//! hypercalls of at most that many pages, so that the host decides how
//! much CPU merging takes. Both knobs are module parameters, writable at
//! run time; an interval of 0 (the default) turns the thread's work off.
//!
//! One pass runs at a time: the ioctl and the thread take [`MERGING`] for
//! each stretch of hypercalls. The hypervisor keeps the pass between
//! calls; the thread goes on with its pass at its next wake-up, unless the
//! ioctl started one of its own meanwhile ([`PASS_GEN`]).

use crate::abi;
use crate::shim::{self, Kthread, WaitQueue};
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, Ordering};
use kernel::c_str;
use kernel::prelude::*;

/// Held for a stretch of MERGE hypercalls.
static MERGING: AtomicBool = AtomicBool::new(false);
/// Bumped whenever the ioctl starts a pass.
static PASS_GEN: AtomicU32 = AtomicU32::new(0);
/// Bumped whenever a parameter changes, or the thread must stop.
static PARAM_GEN: AtomicI32 = AtomicI32::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);
/// The thread's wait queue, while it runs.
static WQ: AtomicPtr<WaitQueue> = AtomicPtr::new(core::ptr::null_mut());

/// The background thread.
pub(crate) struct Background {
    thread: Option<Kthread>,
    wq: *mut WaitQueue,
}

// SAFETY: the pointers are only used by `stop`, once.
unsafe impl Send for Background {}
// SAFETY: as above.
unsafe impl Sync for Background {}

/// Called from the C shim whenever a merge or fault-injection parameter is
/// written, at load or at run time: the thread re-reads its knobs at once,
/// and the hypervisor gets the faults the tests ask for.
#[no_mangle]
extern "C" fn uxen_params_changed() {
    PARAM_GEN.fetch_add(1, Ordering::SeqCst);
    let wq = WQ.load(Ordering::Acquire);
    // SAFETY: `WQ` is cleared before the wait queue is freed, after the
    // thread stopped; a parameter write racing with unload sees either.
    if let Some(wq) = unsafe { wq.as_ref() } {
        wq.wake();
    }
    if let Some(drv) = crate::driver() {
        sync_faults(drv);
    }
}

/// Hands the fault-injection parameters to the hypervisor (debug loads
/// only; elsewhere the hypervisor refuses and nothing changes).
pub(crate) fn sync_faults(drv: &crate::Driver) {
    if !drv.hv.active() || !shim::params().debug {
        return;
    }
    let p = shim::merge_params();
    let Ok(mut f) = KBox::new(abi::DebugFaults::default(), GFP_KERNEL) else { return };
    if p.drop_shootdown_acks {
        f.faults |= abi::DEBUG_FAULT_DROP_SHOOTDOWN_ACKS;
    }
    let pa = shim::virt_to_phys((&mut *f as *mut abi::DebugFaults).cast());
    let (s, _) = drv.hv.call(abi::hc::DEBUG_FAULTS, pa, core::mem::size_of::<abi::DebugFaults>() as u64);
    if s < 0 {
        pr_warn!("fault injection refused by the hypervisor ({})\n", s);
    }
}

/// Starts the thread (it idles while `merge_interval_ms` is 0).
pub(crate) fn start() -> Result<Background> {
    STOPPING.store(false, Ordering::SeqCst);
    let wq = KBox::into_raw(KBox::new(WaitQueue::new()?, GFP_KERNEL)?);
    WQ.store(wq, Ordering::Release);
    // SAFETY: the thread uses only statics and the wait queue, which
    // `stop` frees after the thread is gone.
    match unsafe { Kthread::run(merge_thread, core::ptr::null_mut(), c_str!("uxen-merge")) } {
        Ok(t) => Ok(Background { thread: Some(t), wq }),
        Err(e) => {
            WQ.store(core::ptr::null_mut(), Ordering::Release);
            // SAFETY: from `into_raw` above; no thread saw it.
            drop(unsafe { KBox::from_raw(wq) });
            Err(e)
        }
    }
}

impl Background {
    /// Stops the thread; it finishes the hypercall it is in.
    pub(crate) fn stop(&mut self) {
        STOPPING.store(true, Ordering::SeqCst);
        PARAM_GEN.fetch_add(1, Ordering::SeqCst);
        // SAFETY: live until freed below.
        unsafe { (*self.wq).wake() };
        drop(self.thread.take());
        WQ.store(core::ptr::null_mut(), Ordering::Release);
        if !self.wq.is_null() {
            // SAFETY: from `into_raw` in `start`; the thread is gone and no
            // one else reaches it now that `WQ` is clear (a parameter write
            // that loaded it finished its wake under the parameter lock,
            // which module unload takes too).
            drop(unsafe { KBox::from_raw(self.wq) });
            self.wq = core::ptr::null_mut();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the thread's pass stands.
#[derive(Default)]
struct Own {
    /// `PASS_GEN` when it started; `None`: no pass of its own.
    gen: Option<u32>,
    /// The pass's figures after the last call.
    last: abi::MergeScan,
}

unsafe extern "C" fn merge_thread(_: *mut c_void) -> i32 {
    let mut own = Own::default();
    while !shim::kthread_should_stop() {
        let seen = PARAM_GEN.load(Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) {
            if let Some(drv) = crate::driver().filter(|d| d.hv.active()) {
                if own.gen.is_some() {
                    end_own(drv, &mut own);
                }
            }
            shim::msleep_interruptible(10);
            continue;
        }
        let p = shim::merge_params();
        if let Some(drv) = crate::driver().filter(|d| d.hv.active()) {
            if p.interval_ms != 0 {
                budget(drv, p.batch, &mut own);
            } else if own.gen.is_some() {
                // Turned off: the pass ends, so that its index lets go of
                // its frames.
                end_own(drv, &mut own);
            }
        }
        let wq = WQ.load(Ordering::Acquire);
        let wait = if p.interval_ms == 0 { 1000 } else { p.interval_ms };
        // SAFETY: freed only after this thread stopped.
        unsafe { (*wq).wait(&PARAM_GEN, seen, wait) };
    }
    if let Some(drv) = crate::driver().filter(|d| d.hv.active()) {
        if own.gen.is_some() {
            end_own(drv, &mut own);
        }
    }
    0
}

/// Ends the thread's pass in the hypervisor, unless the ioctl runs one.
fn end_own(drv: &crate::Driver, own: &mut Own) {
    if MERGING.swap(true, Ordering::AcqRel) {
        return;
    }
    if own.gen == Some(PASS_GEN.load(Ordering::Acquire)) {
        if let Ok(mut e) = KBox::new(abi::MergeScan { flags: abi::MERGE_END, ..Default::default() }, GFP_KERNEL) {
            let pa = shim::virt_to_phys((&mut *e as *mut abi::MergeScan).cast());
            drv.hv.call(abi::hc::MERGE, pa, core::mem::size_of::<abi::MergeScan>() as u64);
        }
    }
    *own = Own::default();
    MERGING.store(false, Ordering::Release);
}

/// One wake-up's work: up to `batch` pages of the thread's pass.
fn budget(drv: &crate::Driver, batch: u32, own: &mut Own) {
    if MERGING.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(mut b) = KBox::new(abi::MergeScan::default(), GFP_KERNEL) else {
        MERGING.store(false, Ordering::Release);
        return;
    };
    let gen = PASS_GEN.load(Ordering::Acquire);
    if own.gen != Some(gen) {
        *own = Own::default();
    }
    let mut left = batch.max(1) as u64;
    for _ in 0..64 {
        let go_on = own.gen.is_some();
        *b = abi::MergeScan {
            vm: 0,
            flags: if go_on { abi::MERGE_CONTINUE } else { 0 },
            max_pages: left.min(abi::MERGE_CHUNK as u64) as u32,
            ..Default::default()
        };
        let pa = shim::virt_to_phys((&mut *b as *mut abi::MergeScan).cast());
        let (s, _) = drv.hv.call(abi::hc::MERGE, pa, core::mem::size_of::<abi::MergeScan>() as u64);
        if s < 0 {
            // EINVAL on a pass that is gone (an ioctl's pass ran to its
            // end meanwhile): the next wake-up starts a new one.
            *own = Own::default();
            break;
        }
        let scanned = b.scanned.saturating_sub(own.last.scanned);
        let freed = b.frames_freed.saturating_sub(own.last.frames_freed);
        if freed != 0 {
            drv.hv.reclaim(freed);
        }
        own.gen = Some(gen);
        own.last = *b;
        left = left.saturating_sub(scanned);
        match s {
            // Over: the next wake-up starts the next pass.
            0 => {
                *own = Own::default();
                break;
            }
            // Abandoned (a shootdown went unacknowledged): the pass stays
            // where it was; try again at the next wake-up.
            2 => break,
            _ if left == 0 => break,
            _ => shim::cond_resched(),
        }
    }
    MERGING.store(false, Ordering::Release);
}

/// The MERGE ioctl: a whole pass over `vm` (0: every VM), chunk by chunk,
/// ending early at a chunk that was abandoned. The frames it freed go back
/// to the host.
pub(crate) fn pass(drv: &crate::Driver, vm: u32) -> Result<abi::MergeScan> {
    if MERGING.swap(true, Ordering::AcqRel) {
        return Err(EBUSY);
    }
    PASS_GEN.fetch_add(1, Ordering::AcqRel);
    let r = (|| -> Result<abi::MergeScan> {
        let mut b = KBox::new(abi::MergeScan { vm, ..Default::default() }, GFP_KERNEL)?;
        loop {
            let pa = shim::virt_to_phys((&mut *b as *mut abi::MergeScan).cast());
            let (s, _) = drv.hv.call(abi::hc::MERGE, pa, core::mem::size_of::<abi::MergeScan>() as u64);
            match crate::hv::status(s)? {
                1 => {
                    b.flags = abi::MERGE_CONTINUE;
                    b.max_pages = 0;
                    // The host runs between chunks.
                    shim::cond_resched();
                }
                2 => {
                    // Abandoned: end the pass, so that its index lets go
                    // of its frames (the thread starts its own).
                    let mut e = KBox::new(abi::MergeScan { flags: abi::MERGE_END, ..Default::default() }, GFP_KERNEL)?;
                    let pa = shim::virt_to_phys((&mut *e as *mut abi::MergeScan).cast());
                    drv.hv.call(abi::hc::MERGE, pa, core::mem::size_of::<abi::MergeScan>() as u64);
                    break;
                }
                _ => break,
            }
        }
        Ok(*b)
    })();
    MERGING.store(false, Ordering::Release);
    let mut out = r?;
    out.flags = 0;
    out.max_pages = 0;
    drv.hv.reclaim(out.frames_freed);
    Ok(out)
}
