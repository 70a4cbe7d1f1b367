// SPDX-License-Identifier: GPL-2.0
//! The hypervisor's lifecycle as the driver sees it once loaded: the
//! trampoline, VMCALL and direct calls, the log, and the unload. The load
//! and the entry on every CPU are `launch.rs`.

use crate::abi;
use crate::launch::{BootTables, EntryCtx};
use crate::shim::{self, Kthread, Pages};
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use kernel::prelude::*;

/// Bytes of the log ring.
const LOG_ORDER: u32 = 2;

use core::mem::offset_of;

// The trampoline page: the only code that runs across a switch between the
// host's page tables and the hypervisor's. It lies within one page of this
// module's text, which both map at the same address (the host executable, as
// module text; the hypervisor maps it too). The hypervisor's own code is not
// executable in the host's page tables.
core::arch::global_asm!(
    ".section .text.uxen_tramp, \"ax\"",
    ".p2align 12",
    ".global uxen_tramp_start",
    "uxen_tramp_start:",
    // uxen_tramp_enter(entry, cpu, info, boot_cr3, stack_top) -> i64
    //
    // Saves what the host needs, switches to the boot page tables and this
    // CPU's hypervisor stack, and calls the image's entry. On success the
    // CPU comes back as the host VM at uxen_tramp_resume, on this stack.
    ".global uxen_tramp_enter",
    "uxen_tramp_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "pushfq",
    "mov rax, rdi",
    "mov r12, cr3",
    "mov r13, rsp",
    "mov r14, r8",
    "mov r15, rcx",
    "mov edi, esi",
    "mov rsi, rdx",
    "lea rdx, [rip + uxen_tramp_resume]",
    "mov rcx, r13",
    "mov r8, r12",
    "mov cr3, r15",
    "mov rsp, r14",
    "call rax",
    // The entry failed: back to the host's page tables and stack.
    "mov cr3, r12",
    "mov rsp, r13",
    "jmp 2f",
    "uxen_tramp_resume:",
    "xor eax, eax",
    "2:",
    "popfq",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // uxen_tramp_call(func, boot_cr3, stack_top, cpu, nr, arg, len) -> CallResult
    //
    // A direct call into the image when there is no VMX to VMCALL
    // (iommu_only=1): the same switch as uxen_tramp_enter, then
    // func(cpu, nr, arg, len) on the hypervisor's stack, whose 16-byte
    // result comes back in RAX:RDX, and back to the host's page tables and
    // stack. Interrupts are off (the caller's contract).
    ".global uxen_tramp_call",
    "uxen_tramp_call:",
    "mov rax, [rsp + 8]",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "pushfq",
    "mov r12, cr3",
    "mov r13, rsp",
    "mov rbx, rdi",
    "mov r14, rax",
    "mov cr3, rsi",
    "mov rsp, rdx",
    "mov edi, ecx",
    "mov rsi, r8",
    "mov rdx, r9",
    "mov rcx, r14",
    "call rbx",
    "mov cr3, r12",
    "mov rsp, r13",
    "popfq",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // uxen_tramp_return(state: &ReturnState) -> !
    //
    // Jumped to by the hypervisor after VMXOFF, on its page tables: load the
    // host's CR3 first (`state` stays readable through the host's direct
    // map), then everything else, and continue where the host VM stood.
    ".global uxen_tramp_return",
    "uxen_tramp_return:",
    "mov rbx, rdi",
    "mov rax, [rbx + {cr3}]",
    "mov cr3, rax",
    "lgdt [rbx + {gdtr_rw}]",
    "lidt [rbx + {idtr}]",
    "mov rax, [rbx + {cr0}]",
    "mov cr0, rax",
    "mov rax, [rbx + {cr4}]",
    "mov cr4, rax",
    "movzx eax, word ptr [rbx + {tr}]",
    "ltr ax",
    "lgdt [rbx + {gdtr}]",
    "mov ax, [rbx + {ds}]",
    "mov ds, ax",
    "mov ax, [rbx + {es}]",
    "mov es, ax",
    "mov ax, [rbx + {ss}]",
    "mov ss, ax",
    "mov ax, [rbx + {fs}]",
    "mov fs, ax",
    "mov ax, [rbx + {gs}]",
    "mov gs, ax",
    "mov ecx, 0xc0000100",
    "mov eax, [rbx + {fs_base}]",
    "mov edx, [rbx + {fs_base} + 4]",
    "wrmsr",
    "mov ecx, 0xc0000101",
    "mov eax, [rbx + {gs_base}]",
    "mov edx, [rbx + {gs_base} + 4]",
    "wrmsr",
    "mov rsp, [rbx + {rsp}]",
    "push qword ptr [rbx + {rip}]",
    "push qword ptr [rbx + {rflags}]",
    "mov rax, [rbx + {gpr} + 0]",
    "mov rcx, [rbx + {gpr} + 8]",
    "mov rdx, [rbx + {gpr} + 16]",
    "mov rbp, [rbx + {gpr} + 40]",
    "mov rsi, [rbx + {gpr} + 48]",
    "mov rdi, [rbx + {gpr} + 56]",
    "mov r8, [rbx + {gpr} + 64]",
    "mov r9, [rbx + {gpr} + 72]",
    "mov r10, [rbx + {gpr} + 80]",
    "mov r11, [rbx + {gpr} + 88]",
    "mov r12, [rbx + {gpr} + 96]",
    "mov r13, [rbx + {gpr} + 104]",
    "mov r14, [rbx + {gpr} + 112]",
    "mov r15, [rbx + {gpr} + 120]",
    "mov rbx, [rbx + {gpr} + 24]",
    "popfq",
    "ret",
    ".global uxen_tramp_end",
    "uxen_tramp_end:",
    ".text",
    cr3 = const offset_of!(abi::ReturnState, cr3),
    gdtr = const offset_of!(abi::ReturnState, gdtr),
    gdtr_rw = const offset_of!(abi::ReturnState, gdtr_rw),
    idtr = const offset_of!(abi::ReturnState, idtr),
    cr0 = const offset_of!(abi::ReturnState, cr0),
    cr4 = const offset_of!(abi::ReturnState, cr4),
    tr = const offset_of!(abi::ReturnState, tr),
    ds = const offset_of!(abi::ReturnState, ds),
    es = const offset_of!(abi::ReturnState, es),
    ss = const offset_of!(abi::ReturnState, ss),
    fs = const offset_of!(abi::ReturnState, fs),
    gs = const offset_of!(abi::ReturnState, gs),
    fs_base = const offset_of!(abi::ReturnState, fs_base),
    gs_base = const offset_of!(abi::ReturnState, gs_base),
    rsp = const offset_of!(abi::ReturnState, rsp),
    rip = const offset_of!(abi::ReturnState, rip),
    rflags = const offset_of!(abi::ReturnState, rflags),
    gpr = const offset_of!(abi::ReturnState, gpr),
);

extern "C" {
    static uxen_tramp_start: u8;
    static uxen_tramp_end: u8;
    pub(crate) fn uxen_tramp_enter(entry: u64, cpu: u32, info: *const abi::BootInfo, boot_cr3: u64, stack_top: u64) -> i64;
    fn uxen_tramp_call(func: u64, boot_cr3: u64, stack_top: u64, cpu: u32, nr: u64, arg: u64, len: u64) -> abi::CallResult;
    pub(crate) fn uxen_tramp_return();
}

/// The trampoline page: (virtual, physical) addresses.
pub(crate) fn trampoline() -> Result<(u64, u64)> {
    // SAFETY: taking the addresses of assembler symbols.
    let (start, end) = unsafe { (&uxen_tramp_start as *const u8, &uxen_tramp_end as *const u8) };
    let v = start as u64;
    if v & 0xfff != 0 || end as u64 - v > 4096 {
        pr_err!("the trampoline is not page aligned\n");
        return Err(EINVAL);
    }
    Ok((v, shim::module_addr_to_phys(start)))
}

/// Whether the CPU hotplug callbacks are registered: the hypervisor runs
/// with VMX and hears of every CPU that goes offline or comes back.
pub(crate) static HOTPLUG: AtomicBool = AtomicBool::new(false);

/// The CPU hotplug callback (from the C shim), on the CPU concerned: tells
/// the hypervisor this CPU is going offline (`online` 0) or is back (1).
#[no_mangle]
pub extern "C" fn uxen_host_cpu_changed(online: i32) {
    if HOTPLUG.load(Ordering::Acquire) {
        let (s, _) = vmcall(abi::hc::HOST_CPU, (online != 0) as u64, 0);
        if s < 0 {
            pr_err!("the hypervisor refused a CPU hotplug notice ({})\n", s);
        }
    }
}

/// VMCALL into the hypervisor: `(status, aux)`.
pub(crate) fn vmcall(nr: u64, arg: u64, len: u64) -> (i64, u64) {
    let status: u64;
    let aux: u64;
    // SAFETY: VMCALL from ring 0 of the host VM; the hypervisor preserves
    // every register but RAX and RDX.
    unsafe {
        core::arch::asm!(
            "vmcall",
            inout("rax") nr => status,
            inout("rdi") arg => _,
            inout("rsi") len => _,
            out("rdx") aux,
            options(nostack),
        )
    };
    (status as i64, aux)
}

pub(crate) fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Turns a hypercall status into a result.
pub(crate) fn status(s: i64) -> Result<i64> {
    if s < 0 {
        Err(Error::from_errno(s as i32))
    } else {
        Ok(s)
    }
}

pub(crate) unsafe extern "C" fn unload_on_cpu(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `EntryCtx` that the caller keeps alive across
    // `on_each_cpu`.
    let ctx = unsafe { &*(ctx as *const EntryCtx) };
    let Some(i) = ctx.index_of(shim::this_cpu()) else {
        return;
    };
    if ctx.results[i].load(Ordering::Acquire) != 0 {
        return;
    }
    let (s, _) = vmcall(abi::hc::UNLOAD, 0, 0);
    ctx.results[i].store(if s == 0 { 1 } else { s }, Ordering::Release);
}

/// Direct calls, when the image runs without VMX (`iommu_only=1`): there is
/// no VMCALL, so the driver calls the image's call entry through the
/// trampoline, on the boot page tables (kept for this) and the calling
/// CPU's hypervisor stack. See `docs/vtd.md`.
pub(crate) struct Direct {
    /// The image's `uxen_call` (`ImageHeader::call_offset`).
    pub(crate) call: u64,
    pub(crate) boot: BootTables,
    pub(crate) stacks: [u64; abi::MAX_CPUS],
    pub(crate) cpus: [i32; abi::MAX_CPUS],
    pub(crate) ncpus: usize,
}

impl Direct {
    /// Issues hypercall `nr` on this CPU, with interrupts off.
    pub(crate) fn call(&self, nr: u64, arg: u64, len: u64) -> (i64, u64) {
        let _irqs = shim::irq_save();
        let cpu = shim::this_cpu();
        let Some(i) = self.cpus[..self.ncpus].iter().position(|&c| c == cpu) else {
            return (-(abi::errno::ENODEV), 0);
        };
        // SAFETY: the image is loaded, relocated and entered on every CPU;
        // this CPU's hypervisor stack is free (interrupts are off, and
        // only this CPU uses it); the boot tables map the region and the
        // trampoline.
        let r = unsafe { uxen_tramp_call(self.call, self.boot.cr3(), self.stacks[i], i as u32, nr, arg, len) };
        (r.status, r.aux)
    }
}

/// Issues hypercall `nr`: VMCALL from the demoted host, or a direct call.
pub(crate) fn hypercall(direct: Option<&Direct>, nr: u64, arg: u64, len: u64) -> (i64, u64) {
    match direct {
        Some(d) => d.call(nr, arg, len),
        None => vmcall(nr, arg, len),
    }
}

/// What the `uxen-log` thread works with: it drains the log and, when the
/// IOMMU is on, has the hypervisor read its fault records, so that a fault
/// is logged within a poll period even if nobody asks for statistics.
pub(crate) struct PollerData {
    pub(crate) log: *const Log,
    /// Null with VMX.
    pub(crate) direct: *const Direct,
    pub(crate) iommu: bool,
}

/// The log ring and the driver's position in it.
pub(crate) struct Log {
    pub(crate) pages: Pages,
    pos: AtomicU64,
    lock: AtomicBool,
}

impl Log {
    pub(crate) fn new() -> Result<Self> {
        Ok(Log { pages: Pages::alloc(LOG_ORDER)?, pos: AtomicU64::new(0), lock: AtomicBool::new(false) })
    }

    /// Prints every complete line written since the last drain.
    pub(crate) fn drain(&self) {
        if self.lock.swap(true, Ordering::Acquire) {
            return;
        }
        let base = self.pages.virt();
        let hdr = core::mem::size_of::<abi::LogRing>();
        // SAFETY: the ring header is at the start of our pages.
        let h = unsafe { core::ptr::read_volatile(base as *const abi::LogRing) };
        if h.magic == abi::LOG_MAGIC && h.size > 0 {
            let size = h.size as u64;
            let mut pos = self.pos.load(Ordering::Relaxed);
            if h.head.saturating_sub(pos) > size {
                pr_warn!("hv: {} bytes of log lost\n", h.head - size - pos);
                pos = h.head - size;
            }
            let mut line = [0u8; 256];
            let mut n = 0usize;
            while pos < h.head {
                // SAFETY: the offset is inside the ring's text.
                let b = unsafe { base.add(hdr + (pos % size) as usize).read_volatile() };
                pos += 1;
                if b == b'\n' || n == line.len() {
                    let text = core::str::from_utf8(&line[..n]).unwrap_or("(invalid log text)");
                    pr_info!("{}\n", text);
                    n = 0;
                    if b != b'\n' {
                        line[0] = b;
                        n = 1;
                    }
                } else {
                    line[n] = b;
                    n += 1;
                }
            }
            // Keep a partial line for the next drain.
            self.pos.store(pos - n as u64, Ordering::Relaxed);
        }
        self.lock.store(false, Ordering::Release);
    }
}

/// The hypervisor, from load to unload.
pub(crate) struct Hypervisor {
    pub(crate) active: AtomicBool,
    pub(crate) region: Option<Pages>,
    /// The hypervisor writes the log ring and reads the entry context for
    /// as long as it runs on any CPU: both are dropped by hand, and kept if
    /// it could not leave every CPU.
    pub(crate) log: core::mem::ManuallyDrop<KBox<Log>>,
    pub(crate) ctx: core::mem::ManuallyDrop<KBox<EntryCtx>>,
    pub(crate) poller: Option<Kthread>,
    pub(crate) poller_data: Option<KBox<PollerData>>,
    /// Direct calls (`iommu_only=1`); `None` with VMX.
    pub(crate) direct: Option<KBox<Direct>>,
    pub(crate) num_cpus: u32,
}

pub(crate) unsafe extern "C" fn log_poller(data: *mut c_void) -> i32 {
    // SAFETY: `data` is the `PollerData`, which with the log and the direct
    // calls it points to outlives this thread (stopped first in
    // `Hypervisor::drop`).
    let p = unsafe { &*(data as *const PollerData) };
    // SAFETY: as above.
    let (log, direct) = unsafe { (&*p.log, p.direct.as_ref()) };
    while !shim::kthread_should_stop() {
        if p.iommu {
            hypercall(direct, abi::hc::POLL, 0, 0);
        }
        log.drain();
        shim::msleep_interruptible(200);
    }
    0
}

impl Hypervisor {
    /// Whether the host runs demoted under the hypervisor.
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn num_cpus(&self) -> u32 {
        self.num_cpus
    }

    pub(crate) fn drain_log(&self) {
        self.log.drain();
    }

    /// Gives every free pool frame back once no VM is left.
    pub(crate) fn reclaim_if_idle(&self) {
        let Ok(mut list) = KVec::<u8>::from_elem(0, core::mem::size_of::<abi::VmInfo>(), GFP_KERNEL) else { return };
        let pa = shim::virt_to_phys(list.as_mut_ptr());
        let (n, _) = self.call(abi::hc::VM_LIST, pa, core::mem::size_of::<abi::VmInfo>() as u64);
        if n == 0 {
            self.reclaim_all();
        }
    }

    /// Issues a hypercall and forwards any log it produced.
    pub(crate) fn call(&self, nr: u64, arg: u64, len: u64) -> (i64, u64) {
        let r = hypercall(self.direct.as_deref(), nr, arg, len);
        self.log.drain();
        r
    }

    /// Issues a hypercall, donating pages whenever the hypervisor asks for
    /// them, and returns its status.
    pub(crate) fn call_donating(&self, nr: u64, arg: u64, len: u64) -> Result<i64> {
        for _ in 0..64 {
            let (s, aux) = self.call(nr, arg, len);
            if s != abi::HC_NEED_PAGES {
                return status(s);
            }
            self.donate(aux)?;
        }
        Err(ENOMEM)
    }

    /// Gives the hypervisor at least `pages` pages, in 2 MiB blocks where
    /// the allocator has them. Returns the first page and how many went.
    pub(crate) fn donate(&self, pages: u64) -> Result<(u64, u64)> {
        let want = pages.max(512).min(1 << 16);
        let mut ranges = KVec::<abi::MemRange>::with_capacity(256, GFP_KERNEL)?;
        let mut got = 0u64;
        while got < want && ranges.len() < 256 {
            let (order, phys) = match shim::alloc_split(9) {
                Some(p) => (9, p),
                None => match shim::alloc_split(0) {
                    Some(p) => (0, p),
                    None => break,
                },
            };
            ranges.push(abi::MemRange { base: phys, size: 4096 << order }, GFP_KERNEL)?;
            got += 1 << order;
        }
        if ranges.is_empty() {
            pr_err!("out of memory: cannot donate {} pages to the hypervisor\n", pages);
            return Err(ENOMEM);
        }
        // The range list itself must be host memory in one piece.
        let pa = shim::virt_to_phys(ranges.as_ptr().cast());
        let len = (ranges.len() * core::mem::size_of::<abi::MemRange>()) as u64;
        let (s, _) = self.call(abi::hc::DONATE, pa, len);
        if s < 0 {
            pr_err!("the hypervisor refused a donation ({})\n", s);
            for r in ranges.iter() {
                for p in 0..r.size / 4096 {
                    // SAFETY: our pages; the donation did not happen.
                    unsafe { shim::free_page_phys(r.base + p * 4096) };
                }
            }
            return Err(Error::from_errno(s as i32));
        }
        Ok((ranges[0].base, got))
    }

    /// Takes back every free pool frame and frees it.
    pub(crate) fn reclaim_all(&self) -> u64 {
        self.reclaim(u64::MAX)
    }

    /// Takes up to `max` free pool frames back for the host.
    pub(crate) fn reclaim(&self, max: u64) -> u64 {
        let Ok(buf) = KVec::<u64>::from_elem(0, 512, GFP_KERNEL) else {
            return 0;
        };
        let mut total = 0;
        while total < max {
            let pa = shim::virt_to_phys(buf.as_ptr().cast());
            let (n, _) = self.call(abi::hc::RECLAIM, pa, (max - total).min(512) * 8);
            if n <= 0 {
                break;
            }
            for &p in buf.iter().take(n as usize) {
                // SAFETY: the hypervisor gave the page back, scrubbed and
                // mapped for the host again.
                unsafe { shim::free_page_phys(p) };
            }
            total += n as u64;
        }
        total
    }
}

impl Hypervisor {
    /// The hypervisor may still run somewhere: its region, the log ring
    /// and the entry context it points into stay allocated for good.
    fn keep_memory(&mut self) {
        if let Some(r) = self.region.take() {
            r.leak();
        }
    }

    /// The hypervisor runs nowhere any more: frees what it used.
    fn free_memory(&mut self) {
        self.region.take();
        // SAFETY: called once, from `drop`, when no CPU runs the
        // hypervisor; neither is used after this.
        unsafe {
            core::mem::ManuallyDrop::drop(&mut self.log);
            core::mem::ManuallyDrop::drop(&mut self.ctx);
        }
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        if HOTPLUG.swap(false, Ordering::AcqRel) {
            shim::cpuhp_unregister();
        }
        self.poller.take();
        self.poller_data.take();
        if self.active() {
            let n = self.reclaim_all();
            pr_info!("{} pages returned by the hypervisor\n", n);
            if let Some(d) = self.direct.take() {
                // Without VMX there is nothing to leave: one call turns DMA
                // remapping off, after which the region may go.
                let (s, _) = d.call(abi::hc::UNLOAD, 0, 0);
                self.log.drain();
                if s != 0 {
                    pr_err!("the hypervisor could not turn DMA remapping off ({}); its memory is kept\n", s);
                    self.keep_memory();
                    return;
                }
                self.active.store(false, Ordering::Release);
                pr_info!("DMA protection is off; devices reach memory untranslated again\n");
                self.free_memory();
                return;
            }
            // Every CPU that entered must leave; bring offline ones back.
            for i in 0..self.ctx.ncpus {
                let cpu = self.ctx.cpus[i];
                if !shim::cpu_online(cpu) {
                    pr_info!("bringing cpu{} online to take it out of the hypervisor\n", cpu);
                    let _ = shim::add_cpu(cpu);
                }
            }
            let _hotplug = shim::cpus_read_lock();
            // SAFETY: the context is alive; unload runs on each CPU.
            unsafe { shim::on_each_cpu(unload_on_cpu, &**self.ctx as *const EntryCtx as *mut c_void) };
            self.log.drain();
            let left = (0..self.ctx.ncpus).filter(|&i| self.ctx.results[i].load(Ordering::Acquire) != 1).count();
            if left != 0 {
                // The hypervisor still runs somewhere: its memory must stay.
                pr_err!("{} CPUs did not leave the hypervisor; its memory is kept\n", left);
                self.keep_memory();
                return;
            }
            self.active.store(false, Ordering::Release);
            pr_info!("the hypervisor has left every CPU\n");
        }
        self.free_memory();
    }
}
