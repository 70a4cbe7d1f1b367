// SPDX-License-Identifier: GPL-2.0
//! The hypervisor's lifecycle as the driver sees it: load the image, enter
//! it on every CPU, talk to it with VMCALL, forward its log, unload it.

use crate::abi;
use crate::shim::{self, Kthread, Pages};
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use kernel::c_str;
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
    fn uxen_tramp_enter(entry: u64, cpu: u32, info: *const abi::BootInfo, boot_cr3: u64, stack_top: u64) -> i64;
    fn uxen_tramp_call(func: u64, boot_cr3: u64, stack_top: u64, cpu: u32, nr: u64, arg: u64, len: u64) -> abi::CallResult;
    fn uxen_tramp_return();
}

/// The trampoline page: (virtual, physical) addresses.
fn trampoline() -> Result<(u64, u64)> {
    // SAFETY: taking the addresses of assembler symbols.
    let (start, end) = unsafe { (&uxen_tramp_start as *const u8, &uxen_tramp_end as *const u8) };
    let v = start as u64;
    if v & 0xfff != 0 || end as u64 - v > 4096 {
        pr_err!("the trampoline is not page aligned\n");
        return Err(EINVAL);
    }
    Ok((v, shim::module_addr_to_phys(start)))
}

/// The boot page tables: the region at its direct-map address and the
/// trampoline page, in 4 KiB pages. Used by the entry only, until the
/// hypervisor switches to page tables of its own.
struct BootTables {
    pages: Pages,
    used: usize,
}

const PT_P: u64 = 1;
const PT_RW: u64 = 2;

impl BootTables {
    fn new() -> Result<Self> {
        Ok(BootTables { pages: Pages::alloc(3)?, used: 1 })
    }

    fn cr3(&self) -> u64 {
        self.pages.phys()
    }

    fn table(&self, i: usize) -> *mut u64 {
        // SAFETY: `i` < 8, within the allocation.
        unsafe { self.pages.virt().add(i * 4096).cast() }
    }

    fn index_of(&self, pa: u64) -> usize {
        ((pa - self.pages.phys()) / 4096) as usize
    }

    fn map(&mut self, va: u64, pa: u64, flags: u64) -> Result {
        let mut t = 0usize;
        for level in (1..=3).rev() {
            let idx = ((va >> (12 + 9 * level)) & 511) as usize;
            // SAFETY: `t` indexes one of our table pages.
            let e = unsafe { self.table(t).add(idx) };
            // SAFETY: as above.
            let v = unsafe { e.read() };
            t = if v & PT_P != 0 {
                self.index_of(v & !0xfff)
            } else {
                if self.used == 8 {
                    return Err(ENOMEM);
                }
                let n = self.used;
                self.used += 1;
                // SAFETY: as above.
                unsafe { e.write((self.pages.phys() + n as u64 * 4096) | PT_P | PT_RW) };
                n
            };
        }
        // SAFETY: as above.
        unsafe { self.table(t).add(((va >> 12) & 511) as usize).write(pa | flags) };
        Ok(())
    }
}

/// Whether the CPU hotplug callbacks are registered: the hypervisor runs
/// with VMX and hears of every CPU that goes offline or comes back.
static HOTPLUG: AtomicBool = AtomicBool::new(false);

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

/// What every CPU's entry call shares.
struct EntryCtx {
    entry: u64,
    info: *const abi::BootInfo,
    boot_cr3: u64,
    stacks: [u64; abi::MAX_CPUS],
    cpus: [i32; abi::MAX_CPUS],
    ncpus: usize,
    results: [AtomicI64; abi::MAX_CPUS],
}

impl EntryCtx {
    fn index_of(&self, cpu: i32) -> Option<usize> {
        self.cpus[..self.ncpus].iter().position(|&c| c == cpu)
    }
}

unsafe extern "C" fn enter_on_cpu(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `EntryCtx` that `start` keeps alive across
    // `on_each_cpu`.
    let ctx = unsafe { &*(ctx as *const EntryCtx) };
    let Some(i) = ctx.index_of(shim::this_cpu()) else {
        return;
    };
    // SAFETY: the image is loaded and relocated; this is its entry, called
    // through the trampoline with the boot tables and this CPU's stack.
    let r = unsafe { uxen_tramp_enter(ctx.entry, i as u32, ctx.info, ctx.boot_cr3, ctx.stacks[i]) };
    ctx.results[i].store(r, Ordering::Release);
}

unsafe extern "C" fn unload_on_cpu(ctx: *mut c_void) {
    // SAFETY: as in `enter_on_cpu`.
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
struct Direct {
    /// The image's `uxen_call` (`ImageHeader::call_offset`).
    call: u64,
    boot: BootTables,
    stacks: [u64; abi::MAX_CPUS],
    cpus: [i32; abi::MAX_CPUS],
    ncpus: usize,
}

impl Direct {
    /// Issues hypercall `nr` on this CPU, with interrupts off.
    fn call(&self, nr: u64, arg: u64, len: u64) -> (i64, u64) {
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
fn hypercall(direct: Option<&Direct>, nr: u64, arg: u64, len: u64) -> (i64, u64) {
    match direct {
        Some(d) => d.call(nr, arg, len),
        None => vmcall(nr, arg, len),
    }
}

/// What the `uxen-log` thread works with: it drains the log and, when the
/// IOMMU is on, has the hypervisor read its fault records, so that a fault
/// is logged within a poll period even if nobody asks for statistics.
struct PollerData {
    log: *const Log,
    /// Null with VMX.
    direct: *const Direct,
    iommu: bool,
}

/// The log ring and the driver's position in it.
struct Log {
    pages: Pages,
    pos: AtomicU64,
    lock: AtomicBool,
}

impl Log {
    fn new() -> Result<Self> {
        Ok(Log { pages: Pages::alloc(LOG_ORDER)?, pos: AtomicU64::new(0), lock: AtomicBool::new(false) })
    }

    /// Prints every complete line written since the last drain.
    fn drain(&self) {
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
    active: AtomicBool,
    region: Option<Pages>,
    /// The hypervisor writes the log ring and reads the entry context for
    /// as long as it runs on any CPU: both are dropped by hand, and kept if
    /// it could not leave every CPU.
    log: core::mem::ManuallyDrop<KBox<Log>>,
    ctx: core::mem::ManuallyDrop<KBox<EntryCtx>>,
    poller: Option<Kthread>,
    poller_data: Option<KBox<PollerData>>,
    /// Direct calls (`iommu_only=1`); `None` with VMX.
    direct: Option<KBox<Direct>>,
    num_cpus: u32,
}

unsafe extern "C" fn log_poller(data: *mut c_void) -> i32 {
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
    /// Loads the image and enters it on every CPU.
    pub(crate) fn start(header: &abi::ImageHeader) -> Result<Self> {
        let params = shim::params();
        if shim::host_iommu_enabled() {
            pr_err!("Linux itself drives the Intel IOMMU (booted with intel_iommu=on); boot with intel_iommu=off so that the hypervisor can own it\n");
            return Err(EBUSY);
        }
        if shim::la57() {
            pr_err!("Linux runs with 5-level paging, which the hypervisor does not support; boot with no5lvl\n");
            return Err(Error::from_errno(-(abi::errno::EOPNOTSUPP as i32)));
        }
        if params.iommu_only && header.call_offset == 0 {
            pr_err!("the hypervisor image has no direct-call entry, which iommu_only=1 needs\n");
            return Err(ENOEXEC);
        }
        let (tramp_virt, tramp_phys) = trampoline()?;
        let log = KBox::new(Log::new()?, GFP_KERNEL)?;
        let _hotplug = shim::cpus_read_lock();
        let online = shim::num_online_cpus();
        let present = shim::num_present_cpus();
        if online != present {
            pr_err!("{} of {} CPUs are offline; bring every CPU online before loading\n", present - online, present);
            return Err(EBUSY);
        }
        let mut cpus = [0i32; abi::MAX_CPUS];
        let mut n = 0usize;
        for cpu in 0..shim::nr_cpu_ids() {
            if shim::cpu_online(cpu) {
                if n == abi::MAX_CPUS || n as u32 == header.max_cpus {
                    pr_err!("more CPUs than the hypervisor supports ({})\n", header.max_cpus);
                    return Err(EINVAL);
                }
                cpus[n] = cpu;
                n += 1;
            }
        }

        // The region: image, boot info, heap and per-CPU areas, contiguous,
        // used at its direct-map address.
        let min = header.region_min(n as u64);
        let mut order = 0u32;
        while (4096u64 << order) < min {
            order += 1;
        }
        if order > 10 {
            pr_err!("the hypervisor needs {} KiB of contiguous memory, more than one allocation gives\n", min >> 10);
            return Err(ENOMEM);
        }
        let region = Pages::alloc(order).inspect_err(|_| pr_err!("cannot allocate {} KiB for the hypervisor\n", 4u64 << order))?;
        let size = region.len() as u64;
        let layout = header.layout(size, n as u64).ok_or(EINVAL)?;
        let base = region.virt();
        let image = crate::IMAGE;
        // SAFETY: the region is larger than the image, and ours alone.
        unsafe { core::ptr::copy_nonoverlapping(image.as_ptr(), base, header.file_size as usize) };
        relocate(header, image, base)?;

        let mut boot = BootTables::new()?;
        let mut off = 0;
        while off < size {
            boot.map(base as u64 + off, region.phys() + off, PT_P | PT_RW)?;
            off += 4096;
        }
        boot.map(tramp_virt, tramp_phys, PT_P)?;

        // The DMAR, for DMA protection: `rsdp=` overrides; else the table
        // the kernel's own ACPI found, which works under UEFI too, where no
        // RSDP lies in the BIOS areas. The hypervisor copies it during its
        // global set-up; the copy here is freed once every CPU has entered.
        let dmar = if params.rsdp != 0 {
            pr_info!("rsdp={:#x}: the hypervisor finds the ACPI DMAR table through it\n", params.rsdp);
            None
        } else {
            let d = shim::acpi_dmar()?;
            match &d {
                Some((p, len)) => pr_info!("the kernel's ACPI DMAR table ({} bytes) goes to the hypervisor at {:#x}\n", len, p.phys()),
                None => pr_info!("the kernel's ACPI has no DMAR table; the hypervisor searches the BIOS areas\n"),
            }
            d
        };

        // SAFETY: the boot-info page lies inside the region, zeroed.
        let info = unsafe { &mut *(base.add(layout.boot_info as usize) as *mut abi::BootInfo) };
        *info = abi::BootInfo {
            abi_revision: abi::ABI_REVISION,
            num_cpus: n as u32,
            flags: if params.require_iommu { abi::BOOT_FLAG_REQUIRE_IOMMU } else { 0 }
                | if params.debug { abi::BOOT_FLAG_DEBUG } else { 0 }
                | if params.iommu_only { abi::BOOT_FLAG_IOMMU_ONLY } else { 0 }
                | if params.log_e9 { abi::BOOT_FLAG_LOG_E9 } else { 0 },
            region_phys: region.phys(),
            region_virt: base as u64,
            region_size: size,
            direct_map_base: shim::page_offset(),
            rsdp_phys: params.rsdp,
            dmar_phys: dmar.as_ref().map_or(0, |(p, _)| p.phys()),
            dmar_len: dmar.as_ref().map_or(0, |(_, len)| *len as u64),
            tramp_virt,
            tramp_phys,
            tramp_return: uxen_tramp_return as *const () as u64,
            log_phys: log.pages.phys(),
            log_size: log.pages.len() as u64,
            fail_cpu: params.fail_cpu,
            num_ram: 0,
            ram: [abi::MemRange::default(); abi::MAX_RAM_RANGES],
            cpus: [abi::BootCpu::default(); abi::MAX_CPUS],
        };
        let mut ram = [(0u64, 0u64); abi::MAX_RAM_RANGES];
        let nram = shim::ram_ranges(&mut ram);
        if nram > abi::MAX_RAM_RANGES {
            pr_err!("too many RAM ranges ({})\n", nram);
            return Err(EINVAL);
        }
        for (i, (b, s)) in ram[..nram].iter().enumerate() {
            info.ram[i] = abi::MemRange { base: *b, size: *s };
        }
        info.num_ram = nram as u32;
        let mut stacks = [0u64; abi::MAX_CPUS];
        for i in 0..n {
            info.cpus[i].linux_id = cpus[i] as u32;
            stacks[i] = base as u64 + header.stack_top(&layout, i as u64);
        }

        let ctx = KBox::new(
            EntryCtx {
                entry: base as u64 + header.entry_offset,
                info,
                boot_cr3: boot.cr3(),
                stacks,
                cpus,
                ncpus: n,
                results: [const { AtomicI64::new(i64::MIN) }; abi::MAX_CPUS],
            },
            GFP_KERNEL,
        )?;
        pr_info!("entering the hypervisor on {} CPUs (region {:#x}, {} KiB)\n", n, region.phys(), size >> 10);
        // SAFETY: `ctx` outlives the call; the entry runs with interrupts off.
        unsafe { shim::on_each_cpu(enter_on_cpu, &*ctx as *const EntryCtx as *mut c_void) };
        drop(dmar);
        // Without VMX the boot tables stay: direct calls enter on them.
        let direct = if params.iommu_only {
            Some(KBox::new(
                Direct { call: base as u64 + header.call_offset, boot, stacks, cpus, ncpus: n },
                GFP_KERNEL,
            )?)
        } else {
            drop(boot);
            None
        };
        log.drain();

        let mut first_err = 0i64;
        let mut entered = 0;
        for i in 0..n {
            match ctx.results[i].load(Ordering::Acquire) {
                0 => entered += 1,
                e => {
                    // The CPUs that rolled back because another failed say
                    // EAGAIN; report the cause.
                    if first_err == 0 || first_err == -(abi::errno::EAGAIN) {
                        first_err = e;
                    }
                    pr_err!("cpu{}: hypervisor entry failed ({})\n", cpus[i], e);
                }
            }
        }
        if entered != n {
            if entered > 0 {
                if let Some(d) = &direct {
                    // Without VMX one call turns the hypervisor off.
                    d.call(abi::hc::UNLOAD, 0, 0);
                } else {
                    // Some CPUs were launched before another failed: take them out.
                    // SAFETY: as above.
                    unsafe { shim::on_each_cpu(unload_on_cpu, &*ctx as *const EntryCtx as *mut c_void) };
                }
                log.drain();
            }
            let e = if first_err < -4095 || first_err >= 0 { -(abi::errno::EIO) } else { first_err };
            let why = match -e {
                abi::errno::ENODEV => "VT-x is unavailable or unusable on this machine",
                abi::errno::ETIMEDOUT => "the CPUs did not meet in time",
                abi::errno::EOPNOTSUPP => "DMA protection (VT-d) is unavailable and require_iommu=1 asks for it",
                abi::errno::EBUSY => "the IOMMU is already in use; boot the host with intel_iommu=off",
                _ => "see the hypervisor's messages above",
            };
            pr_err!("cannot start the hypervisor: {} (errno {}); every CPU rolled back\n", why, -e);
            return Err(Error::from_errno(e as i32));
        }
        let iommu = {
            let mut v = KBox::new(abi::HvVersion::default(), GFP_KERNEL)?;
            let pa = shim::virt_to_phys((&mut *v as *mut abi::HvVersion).cast());
            let (s, _) = hypercall(direct.as_deref(), abi::hc::VERSION, pa, core::mem::size_of::<abi::HvVersion>() as u64);
            s == 0 && v.features & abi::HV_FEATURE_IOMMU != 0
        };
        let poller_data = KBox::new(
            PollerData {
                log: &*log as *const Log,
                direct: direct.as_deref().map_or(core::ptr::null(), |d| d as *const Direct),
                iommu,
            },
            GFP_KERNEL,
        )?;
        let poller = {
            let data = &*poller_data as *const PollerData as *mut c_void;
            // SAFETY: the data outlives the thread (see `log_poller`).
            unsafe { Kthread::run(log_poller, data, c_str!("uxen-log")) }.ok()
        };
        log.drain();
        if direct.is_none() {
            // Without the callbacks the hypervisor never hears of a CPU
            // going offline, and the INIT that brings it back reaches it.
            match shim::cpuhp_register(&_hotplug) {
                Ok(()) => HOTPLUG.store(true, Ordering::Release),
                Err(e) => pr_warn!("cannot register the CPU hotplug callbacks ({:?}): do not take CPUs offline while loaded\n", e),
            }
        }
        if direct.is_some() {
            pr_info!(
                "DMA protection {} without VMX on {} CPUs (iommu_only=1): the host is not demoted\n",
                if iommu { "on" } else { "unavailable" },
                n
            );
        } else {
            pr_info!("the host now runs as a VM on {} CPUs\n", n);
        }
        Ok(Hypervisor {
            active: AtomicBool::new(true),
            region: Some(region),
            log: core::mem::ManuallyDrop::new(log),
            ctx: core::mem::ManuallyDrop::new(ctx),
            poller,
            poller_data: Some(poller_data),
            direct,
            num_cpus: n as u32,
        })
    }

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

/// Applies the image's `R_X86_64_RELATIVE` records for load address `base`.
fn relocate(h: &abi::ImageHeader, image: &[u8], base: *mut u8) -> Result {
    let size = core::mem::size_of::<abi::ElfRela>();
    for i in 0..h.rela_count as usize {
        let off = h.rela_offset as usize + i * size;
        // SAFETY: `parse` checked that the records lie inside the image.
        let r: abi::ElfRela = unsafe { core::ptr::read_unaligned(image.as_ptr().add(off).cast()) };
        if r.info & 0xffff_ffff != abi::R_X86_64_RELATIVE || r.offset + 8 > h.file_size {
            pr_err!("refusing the embedded hypervisor image: bad relocation {}\n", i);
            return Err(ENOEXEC);
        }
        let v = (base as u64).wrapping_add(r.addend as u64);
        // SAFETY: the target lies inside the loaded image.
        unsafe { core::ptr::write_unaligned(base.add(r.offset as usize).cast::<u64>(), v) };
    }
    Ok(())
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
