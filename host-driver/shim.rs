// SPDX-License-Identifier: GPL-2.0
//! Safe wrappers over `shim.c`, the one place that calls it.

use core::ffi::c_void;
use kernel::prelude::*;

extern "C" {
    fn uxen_param_fail_cpu() -> i32;
    fn uxen_param_require_iommu() -> bool;
    fn uxen_param_debug() -> bool;
    fn uxen_param_iommu_only() -> bool;
    fn uxen_param_log_e9() -> bool;
    fn uxen_param_rsdp() -> core::ffi::c_ulong;
    fn uxen_host_iommu_enabled() -> bool;
    fn uxen_shim_acpi_dmar(buf: *mut c_void, max: core::ffi::c_ulong) -> core::ffi::c_ulong;
    fn uxen_shim_la57() -> bool;
    fn uxen_shim_misc_register() -> i32;
    fn uxen_shim_misc_deregister();
    fn uxen_shim_vm_fd(private: *mut c_void) -> i32;
    fn uxen_shim_on_each_cpu(f: unsafe extern "C" fn(*mut c_void), info: *mut c_void);
    fn uxen_shim_num_online_cpus() -> u32;
    fn uxen_shim_num_present_cpus() -> u32;
    fn uxen_shim_cpu_online(cpu: i32) -> i32;
    fn uxen_shim_nr_cpu_ids() -> i32;
    fn uxen_shim_this_cpu() -> i32;
    fn uxen_shim_irq_save() -> core::ffi::c_ulong;
    fn uxen_shim_irq_restore(flags: core::ffi::c_ulong);
    fn uxen_shim_cpus_read_lock();
    fn uxen_shim_cpus_read_unlock();
    fn uxen_shim_alloc_pages(order: u32) -> *mut c_void;
    fn uxen_shim_free_pages(addr: *mut c_void, order: u32);
    fn uxen_shim_virt_to_phys(addr: *const c_void) -> u64;
    fn uxen_shim_page_offset() -> core::ffi::c_ulong;
    fn uxen_shim_ram_ranges(out: *mut u64, max: i32) -> i32;
    fn uxen_shim_kthread_run(
        f: unsafe extern "C" fn(*mut c_void) -> i32,
        data: *mut c_void,
        name: *const u8,
    ) -> *mut c_void;
    fn uxen_shim_kthread_stop(task: *mut c_void) -> i32;
    fn uxen_shim_kthread_should_stop() -> bool;
    fn uxen_shim_msleep_interruptible(ms: u32);
    fn uxen_shim_signal_pending() -> bool;
    fn uxen_shim_cond_resched();
    fn uxen_shim_waitq_new() -> *mut c_void;
    fn uxen_shim_waitq_free(wq: *mut c_void);
    fn uxen_shim_waitq_wake(wq: *mut c_void);
    fn uxen_shim_waitq_wait(wq: *mut c_void, word: *const i32, old: i32, timeout_ms: u32) -> i64;
    fn uxen_shim_usecs_to_jiffies(us: u32) -> core::ffi::c_ulong;
    fn uxen_shim_vmalloc_to_phys(addr: *const c_void) -> u64;
    fn uxen_shim_add_cpu(cpu: i32) -> i32;
    fn uxen_shim_cpuhp_register() -> i32;
    fn uxen_shim_cpuhp_unregister();
    fn uxen_shim_alloc_split(order: u32) -> *mut c_void;
    fn uxen_shim_free_page_phys(phys: u64);
    fn uxen_shim_fpu_begin();
    fn uxen_shim_fpu_end();
    fn uxen_shim_tsc_khz() -> u32;
}

/// Module parameters.
pub(crate) struct Params {
    pub(crate) fail_cpu: i32,
    pub(crate) require_iommu: bool,
    pub(crate) debug: bool,
    pub(crate) iommu_only: bool,
    pub(crate) log_e9: bool,
    pub(crate) rsdp: u64,
}

pub(crate) fn params() -> Params {
    // SAFETY: the accessors only read module parameters, which the module
    // loader set before `init` ran.
    unsafe {
        Params {
            fail_cpu: uxen_param_fail_cpu(),
            require_iommu: uxen_param_require_iommu(),
            debug: uxen_param_debug(),
            iommu_only: uxen_param_iommu_only(),
            log_e9: uxen_param_log_e9(),
            rsdp: uxen_param_rsdp() as u64,
        }
    }
}

/// Whether Linux itself drives an Intel IOMMU (booted with `intel_iommu=on`).
pub(crate) fn host_iommu_enabled() -> bool {
    // SAFETY: reads an exported integer.
    unsafe { uxen_host_iommu_enabled() }
}

/// A copy of the ACPI DMAR table that the kernel found through its own ACPI,
/// in pages of the direct map, and its length; `Ok(None)` when the kernel
/// has none.
pub(crate) fn acpi_dmar() -> Result<Option<(Pages, usize)>> {
    // SAFETY: with a null buffer the shim only reads the table's length.
    let len = unsafe { uxen_shim_acpi_dmar(core::ptr::null_mut(), 0) } as usize;
    if len == 0 {
        return Ok(None);
    }
    let mut order = 0u32;
    while (4096usize << order) < len {
        order += 1;
        if order > 8 {
            pr_err!("the kernel's ACPI DMAR table claims {} bytes\n", len);
            return Err(EINVAL);
        }
    }
    let pages = Pages::alloc(order)?;
    // SAFETY: `pages` holds `pages.len()` writable bytes; the shim copies
    // at most that many.
    let got = unsafe { uxen_shim_acpi_dmar(pages.virt().cast(), pages.len() as core::ffi::c_ulong) } as usize;
    if got != len {
        return Err(EINVAL);
    }
    Ok(Some((pages, len)))
}

/// Whether Linux runs with 5-level paging, which the boot page tables and
/// the hypervisor's own (4-level) cannot follow.
pub(crate) fn la57() -> bool {
    // SAFETY: reads a paging-mode flag.
    unsafe { uxen_shim_la57() }
}

fn to_result(ret: i32) -> Result<i32> {
    if ret < 0 {
        Err(Error::from_errno(ret))
    } else {
        Ok(ret)
    }
}

/// Registers `/dev/uxen`. Its callbacks are `dev::uxen_dev_*`.
pub(crate) fn misc_register() -> Result {
    // SAFETY: registers a static miscdevice once; `misc_deregister` undoes it.
    to_result(unsafe { uxen_shim_misc_register() }).map(|_| ())
}

pub(crate) fn misc_deregister() {
    // SAFETY: only called after a successful `misc_register`.
    unsafe { uxen_shim_misc_deregister() }
}

/// Installs a descriptor whose release calls `uxen_vm_release(private)`.
///
/// # Safety
/// `private` must stay valid until that release.
pub(crate) unsafe fn vm_fd(private: *mut c_void) -> Result<i32> {
    // SAFETY: the caller keeps `private` alive until the release callback.
    to_result(unsafe { uxen_shim_vm_fd(private) })
}

/// Runs `f(info)` on every online CPU at once and waits for all of them.
///
/// # Safety
/// `f` must be safe to run in IPI context with `info`.
pub(crate) unsafe fn on_each_cpu(f: unsafe extern "C" fn(*mut c_void), info: *mut c_void) {
    // SAFETY: per the caller's contract.
    unsafe { uxen_shim_on_each_cpu(f, info) }
}

pub(crate) fn num_online_cpus() -> u32 {
    // SAFETY: reads a counter.
    unsafe { uxen_shim_num_online_cpus() }
}

pub(crate) fn num_present_cpus() -> u32 {
    // SAFETY: reads a counter.
    unsafe { uxen_shim_num_present_cpus() }
}

pub(crate) fn cpu_online(cpu: i32) -> bool {
    // SAFETY: reads a CPU mask.
    unsafe { uxen_shim_cpu_online(cpu) != 0 }
}

pub(crate) fn nr_cpu_ids() -> i32 {
    // SAFETY: reads a constant.
    unsafe { uxen_shim_nr_cpu_ids() }
}

pub(crate) fn this_cpu() -> i32 {
    // SAFETY: reads the current CPU number.
    unsafe { uxen_shim_this_cpu() }
}

/// Holds interrupts off on this CPU while alive (which also pins the
/// thread to it).
pub(crate) struct IrqGuard(core::ffi::c_ulong);

pub(crate) fn irq_save() -> IrqGuard {
    // SAFETY: paired with the restore in `Drop`, on the same CPU (nothing
    // can move the thread while interrupts are off).
    IrqGuard(unsafe { uxen_shim_irq_save() })
}

impl Drop for IrqGuard {
    fn drop(&mut self) {
        // SAFETY: the flags `irq_save` returned, on the same CPU.
        unsafe { uxen_shim_irq_restore(self.0) }
    }
}

/// Holds CPU hotplug off while alive.
pub(crate) struct CpusReadGuard(());

pub(crate) fn cpus_read_lock() -> CpusReadGuard {
    // SAFETY: paired with the unlock in `Drop`.
    unsafe { uxen_shim_cpus_read_lock() };
    CpusReadGuard(())
}

impl Drop for CpusReadGuard {
    fn drop(&mut self) {
        // SAFETY: the lock was taken in `cpus_read_lock`.
        unsafe { uxen_shim_cpus_read_unlock() }
    }
}

/// `2^order` physically contiguous, zeroed pages from the direct map.
pub(crate) struct Pages {
    virt: *mut u8,
    order: u32,
}

// SAFETY: the pages are plain memory owned by this value.
unsafe impl Send for Pages {}
// SAFETY: shared access only hands out addresses.
unsafe impl Sync for Pages {}

impl Pages {
    pub(crate) fn alloc(order: u32) -> Result<Self> {
        // SAFETY: allocation has no preconditions.
        let virt = unsafe { uxen_shim_alloc_pages(order) } as *mut u8;
        if virt.is_null() {
            return Err(ENOMEM);
        }
        Ok(Pages { virt, order })
    }

    pub(crate) fn virt(&self) -> *mut u8 {
        self.virt
    }

    pub(crate) fn phys(&self) -> u64 {
        virt_to_phys(self.virt)
    }

    pub(crate) fn len(&self) -> usize {
        4096usize << self.order
    }

    pub(crate) fn order(&self) -> u32 {
        self.order
    }

    /// Gives up ownership without freeing (the pages are donated or lost).
    pub(crate) fn leak(self) -> u64 {
        let phys = self.phys();
        core::mem::forget(self);
        phys
    }

    /// Takes back ownership of pages given up with [`Pages::leak`].
    ///
    /// # Safety
    /// `phys` must come from `leak` of pages of this `order`, and must not be
    /// in use by anyone else.
    pub(crate) unsafe fn from_phys(phys: u64, order: u32) -> Self {
        Pages { virt: phys_to_virt(phys), order }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: `virt` came from `uxen_shim_alloc_pages(order)`.
        unsafe { uxen_shim_free_pages(self.virt.cast(), self.order) }
    }
}

pub(crate) fn virt_to_phys(p: *const u8) -> u64 {
    // SAFETY: translation of a direct-map address has no side effects.
    unsafe { uxen_shim_virt_to_phys(p.cast()) }
}

pub(crate) fn phys_to_virt(phys: u64) -> *mut u8 {
    (page_offset() + phys) as *mut u8
}

/// Virtual address of physical 0 in the direct map.
pub(crate) fn page_offset() -> u64 {
    // SAFETY: reads a constant.
    unsafe { uxen_shim_page_offset() as u64 }
}

/// System RAM as `(base, size)` ranges; returns the total number of ranges,
/// which may exceed `out.len()`.
pub(crate) fn ram_ranges(out: &mut [(u64, u64)]) -> usize {
    // SAFETY: `out` is `out.len()` pairs of `u64`, laid out contiguously.
    let n = unsafe { uxen_shim_ram_ranges(out.as_mut_ptr().cast(), out.len() as i32) };
    n.max(0) as usize
}

/// A kernel thread running `f(data)`.
pub(crate) struct Kthread(*mut c_void);

// SAFETY: a task pointer may be stopped from any thread.
unsafe impl Send for Kthread {}
// SAFETY: as above.
unsafe impl Sync for Kthread {}

impl Kthread {
    /// # Safety
    /// `data` must stay valid until the thread is stopped.
    pub(crate) unsafe fn run(
        f: unsafe extern "C" fn(*mut c_void) -> i32,
        data: *mut c_void,
        name: &CStr,
    ) -> Result<Self> {
        // SAFETY: per the caller's contract; `name` is NUL-terminated.
        let t = unsafe { uxen_shim_kthread_run(f, data, name.as_char_ptr().cast()) };
        if t.is_null() {
            return Err(ENOMEM);
        }
        Ok(Kthread(t))
    }
}

impl Drop for Kthread {
    fn drop(&mut self) {
        // SAFETY: the task was started by `run` and is stopped once.
        unsafe { uxen_shim_kthread_stop(self.0) };
    }
}

pub(crate) fn kthread_should_stop() -> bool {
    // SAFETY: called from the kthread itself.
    unsafe { uxen_shim_kthread_should_stop() }
}

pub(crate) fn msleep_interruptible(ms: u32) {
    // SAFETY: sleeping in process context.
    unsafe { uxen_shim_msleep_interruptible(ms) }
}

pub(crate) fn signal_pending() -> bool {
    // SAFETY: reads the current task's flags.
    unsafe { uxen_shim_signal_pending() }
}

pub(crate) fn cond_resched() {
    // SAFETY: process context.
    unsafe { uxen_shim_cond_resched() }
}

pub(crate) fn usecs_to_jiffies(us: u32) -> i64 {
    // SAFETY: pure conversion.
    unsafe { uxen_shim_usecs_to_jiffies(us) as i64 }
}

/// A wait queue with a wake flag.
pub(crate) struct WaitQueue(*mut c_void);

// SAFETY: wait queues are designed for cross-thread use.
unsafe impl Send for WaitQueue {}
// SAFETY: as above.
unsafe impl Sync for WaitQueue {}

impl WaitQueue {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: allocation and initialisation only.
        let wq = unsafe { uxen_shim_waitq_new() };
        if wq.is_null() {
            return Err(ENOMEM);
        }
        Ok(WaitQueue(wq))
    }

    pub(crate) fn wake(&self) {
        // SAFETY: `self.0` is a live wait queue.
        unsafe { uxen_shim_waitq_wake(self.0) }
    }

    /// Sleeps until `*word != old`, a signal, or `timeout_ms`. Returns the
    /// kernel's result (negative on a signal).
    pub(crate) fn wait(&self, word: &core::sync::atomic::AtomicI32, old: i32, timeout_ms: u32) -> i64 {
        // SAFETY: `self.0` is live and `word` outlives the wait.
        unsafe { uxen_shim_waitq_wait(self.0, word.as_ptr(), old, timeout_ms) }
    }
}

impl Drop for WaitQueue {
    fn drop(&mut self) {
        // SAFETY: allocated by `new`, nobody waits on it any more.
        unsafe { uxen_shim_waitq_free(self.0) }
    }
}

/// Physical address of module memory (code or data of this module).
pub(crate) fn module_addr_to_phys(p: *const u8) -> u64 {
    // SAFETY: `p` points into this module's own mapping.
    unsafe { uxen_shim_vmalloc_to_phys(p.cast()) }
}

/// Brings an offline CPU online.
pub(crate) fn add_cpu(cpu: i32) -> Result {
    // SAFETY: process context, no locks held.
    to_result(unsafe { uxen_shim_add_cpu(cpu) }).map(|_| ())
}

/// Registers the CPU hotplug callbacks (`uxen_host_cpu_changed` on each
/// CPU going offline or coming back). The caller holds [`cpus_read_lock`].
pub(crate) fn cpuhp_register(_hotplug: &CpusReadGuard) -> Result {
    // SAFETY: the hotplug lock is held, as the `_cpuslocked` call needs.
    to_result(unsafe { uxen_shim_cpuhp_register() }).map(|_| ())
}

/// Removes the callbacks of [`cpuhp_register`], if registered. Takes the
/// hotplug lock itself: the caller must not hold it.
pub(crate) fn cpuhp_unregister() {
    // SAFETY: process context, the hotplug lock not held.
    unsafe { uxen_shim_cpuhp_unregister() }
}

/// `2^order` pages that can later be freed one by one with
/// [`free_page_phys`]; their physical address.
pub(crate) fn alloc_split(order: u32) -> Option<u64> {
    // SAFETY: allocation only.
    let v = unsafe { uxen_shim_alloc_split(order) };
    (!v.is_null()).then(|| virt_to_phys(v as *const u8))
}

/// Frees one page from [`alloc_split`].
///
/// # Safety
/// `phys` must be such a page, owned by the caller, no longer used.
pub(crate) unsafe fn free_page_phys(phys: u64) {
    // SAFETY: per the caller's contract.
    unsafe { uxen_shim_free_page_phys(phys) }
}

/// Runs `f` with the vector registers saved for the kernel (a guest may
/// clobber them).
pub(crate) fn with_fpu<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: paired begin/end in process context.
    unsafe { uxen_shim_fpu_begin() };
    let r = f();
    // SAFETY: as above.
    unsafe { uxen_shim_fpu_end() };
    r
}

pub(crate) fn tsc_khz() -> u32 {
    // SAFETY: reads a kernel variable.
    unsafe { uxen_shim_tsc_khz() }
}

extern "C" {
    fn uxen_param_merge_interval_ms() -> u32;
    fn uxen_param_merge_batch() -> u32;
    fn uxen_param_debug_drop_shootdown_acks() -> bool;
}

/// The run-time module parameters of background re-merging
/// (`merge_params.c`), as they stand.
pub(crate) struct MergeParams {
    pub(crate) interval_ms: u32,
    pub(crate) batch: u32,
    pub(crate) drop_shootdown_acks: bool,
}

pub(crate) fn merge_params() -> MergeParams {
    // SAFETY: the accessors read plain integers with READ_ONCE.
    unsafe {
        MergeParams {
            interval_ms: uxen_param_merge_interval_ms(),
            batch: uxen_param_merge_batch(),
            drop_shootdown_acks: uxen_param_debug_drop_shootdown_acks(),
        }
    }
}
