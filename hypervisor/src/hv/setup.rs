//! Late launch: every CPU enters through `uxen_entry`, they meet at
//! barriers, the first does the global set-up, each does its own, and all
//! launch the host VM together, or all roll back. See `docs/bootstrap.md`.

use super::memory::{self, HeapFrames, RegionMem};
use super::{install, GlobalStats, Hv};
use crate::addr::{Hpa, PhysRange};
use crate::arch::x86::cpu::{self, PerCpu};
use crate::arch::x86::instr;
use crate::arch::x86::msr::IA32_GS_BASE;
use crate::arch::x86::vmx::{self, VmxCaps, VmxError};
use crate::ept::{build_host_ept, host_map_top, HostMap};
use crate::layout;
use crate::policy;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use shared_abi::{errno::*, BootInfo, ImageHeader, ABI_REVISION, IMAGE_MAGIC, MAX_CPUS, VERSION};

/// The image header. The build fills the layout fields after linking.
#[used]
#[no_mangle]
#[link_section = ".uxen_header"]
static UXEN_IMAGE_HEADER: ImageHeader = ImageHeader {
    magic: IMAGE_MAGIC,
    abi_revision: ABI_REVISION,
    header_size: core::mem::size_of::<ImageHeader>() as u32,
    version: VERSION,
    file_size: 0,
    mem_size: 0,
    entry_offset: 0,
    rela_offset: 0,
    rela_count: 0,
    heap_size: layout::HEAP_SIZE,
    percpu_size: layout::PERCPU_SIZE,
    max_cpus: layout::MAX_CPUS,
    reserved0: 0,
    call_offset: 0,
    reserved: [0; 3],
};

extern "C" {
    /// End of the code and read-only data (`layout.ld`).
    static __ro_end: u8;
}

static IMAGE_HASH: AtomicU64 = AtomicU64::new(0);

/// FNV-1a of the image's code and read-only data, as loaded.
pub fn image_hash() -> u64 {
    let start = &UXEN_IMAGE_HEADER as *const ImageHeader as *const u8;
    // SAFETY: taking the address of a linker symbol.
    let end = unsafe { &__ro_end as *const u8 };
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut p = start;
    while p < end {
        // SAFETY: `[start, end)` is the image's loaded code and data.
        h = (h ^ unsafe { p.read_volatile() } as u64).wrapping_mul(0x100_0000_01b3);
        // SAFETY: stays within `[start, end]`.
        p = unsafe { p.add(1) };
    }
    h
}

/// Whether the code and read-only data still hash as at start-up.
pub fn image_intact() -> bool {
    image_hash() == IMAGE_HASH.load(Ordering::Relaxed)
}

/// The header as loaded (the packer rewrote it after compilation).
fn header() -> ImageHeader {
    // SAFETY: the static is always readable; volatile because its bytes
    // differ from the initialiser the compiler saw.
    unsafe { core::ptr::read_volatile(&UXEN_IMAGE_HEADER) }
}

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// The heap's size and free bytes.
pub fn heap_usage() -> (u64, u64) {
    let h = HEAP.lock();
    (h.size() as u64, h.free() as u64)
}

/// Results published by CPU 0: 1 while pending, then 0 or `-errno`.
static TABLES: AtomicI64 = AtomicI64::new(1);
static GLOBAL: AtomicI64 = AtomicI64::new(1);
/// The hypervisor's page tables, once built.
static FINAL_CR3: AtomicU64 = AtomicU64::new(0);
static ARRIVED: AtomicU32 = AtomicU32::new(0);
static READY: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Long enough for any emulator; short enough to report a lost CPU.
const BARRIER_TSC: u64 = 1 << 36;

/// Waits until `counter` reaches `n`; false after a long timeout.
fn barrier(counter: &AtomicU32, n: u32) -> bool {
    counter.fetch_add(1, Ordering::AcqRel);
    let t0 = instr::rdtsc();
    while counter.load(Ordering::Acquire) < n {
        if instr::rdtsc().wrapping_sub(t0) > BARRIER_TSC {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Waits for CPU 0 to publish a result.
fn wait_for(flag: &AtomicI64) -> i64 {
    let t0 = instr::rdtsc();
    loop {
        let v = flag.load(Ordering::Acquire);
        if v != 1 {
            return v;
        }
        if instr::rdtsc().wrapping_sub(t0) > BARRIER_TSC {
            return -ETIMEDOUT;
        }
        core::hint::spin_loop();
    }
}

fn valid(info: &BootInfo, index: u32) -> bool {
    let h = header();
    info.abi_revision == ABI_REVISION
        && info.num_cpus >= 1
        && info.num_cpus as usize <= MAX_CPUS
        && index < info.num_cpus
        && info.num_ram as usize <= info.ram.len()
        && info.region_virt == info.direct_map_base.wrapping_add(info.region_phys)
        && h.layout(info.region_size, info.num_cpus as u64).is_some()
}

/// The image entry (see `shared_abi::EntryFn`): on this CPU's hypervisor
/// stack and the boot page tables. Returns only on failure.
#[no_mangle]
#[link_section = ".text.uxen_entry"]
extern "sysv64" fn uxen_entry(index: u32, info: *const BootInfo, rip: u64, rsp: u64, linux_cr3: u64) -> i64 {
    // SAFETY: the driver passes the boot-info page of the region.
    let info = unsafe { &*info };
    if !valid(info, index) {
        return -EINVAL;
    }
    let n = info.num_cpus;
    let i = index as usize;
    let h = header();
    let l = h.layout(info.region_size, n as u64).unwrap();
    memory::init(info.direct_map_base, info.region_virt, info.region_phys, info.region_size);
    cpu::set_percpu_base(info.region_virt + l.percpu_start, h.percpu_size);
    cpu::set_nmi_hook(super::exits::nmi_in_root);
    let linux = vmx::save_linux_state(linux_cr3);
    // SAFETY: each CPU initialises its own area once.
    let pc = unsafe { PerCpu::init(i, info.cpus[i].linux_id) };
    pc.linux = linux;
    // Our IDT and per-CPU GS from here; Linux's are restored on failure.
    // SAFETY: the IDT is valid; interrupts are off.
    unsafe {
        instr::lidt(&pc.idtr());
        instr::wrmsr(IA32_GS_BASE, pc.self_ptr);
    }

    if !barrier(&ARRIVED, n) {
        return leave(pc, -ETIMEDOUT);
    }
    if i == 0 {
        let r = match build_tables(info, &l) {
            Some(cr3) => {
                FINAL_CR3.store(cr3, Ordering::Release);
                0
            }
            None => -ENOMEM,
        };
        TABLES.store(r, Ordering::Release);
    }
    let r = wait_for(&TABLES);
    if r != 0 {
        return leave(pc, r);
    }
    switch_tables(FINAL_CR3.load(Ordering::Acquire));

    if i == 0 {
        let r = match global_setup(info, &h, &l) {
            Ok(()) => 0,
            Err(e) => e,
        };
        GLOBAL.store(r, Ordering::Release);
    }
    let r = wait_for(&GLOBAL);
    if r != 0 {
        return leave(pc, r);
    }
    let hv = super::hv();
    if hv.iommu_only() {
        return iommu_only_finish(pc, info, n);
    }

    let r = percpu_setup(pc, hv, info, rip, rsp);
    if let Err(e) = r {
        log::error!("cpu{i}: {e}");
        FAILED.fetch_add(1, Ordering::AcqRel);
    }
    let synced = barrier(&READY, n);
    if r.is_err() || !synced || FAILED.load(Ordering::Acquire) != 0 {
        if r.is_ok() {
            // SAFETY: this CPU entered VMX operation in `percpu_setup`.
            unsafe { vmx::vmxoff(pc) };
            log::info!("cpu{i}: rolled back");
        }
        if i == 0 {
            roll_back_global();
        }
        return leave(
            pc,
            match r {
                Err(e) => e.errno(),
                Ok(()) if !synced => -ETIMEDOUT,
                Ok(()) => -EAGAIN,
            },
        );
    }
    pc.virtualized.store(1, Ordering::Release);
    // SAFETY: the VMCS is complete; on success the CPU continues as the host
    // VM at `rip` and never comes back here.
    let err = unsafe { vmx::launch() };
    pc.virtualized.store(0, Ordering::Release);
    log::error!("cpu{i}: VMLAUNCH of the host VM failed: VM-instruction error {err}");
    super::exits::dump_vmcs();
    // SAFETY: in VMX operation.
    unsafe { vmx::vmxoff(pc) };
    // The load fails: devices must not keep walking tables in a region the
    // driver frees (another CPU's unload would do it too; it is idempotent).
    roll_back_global();
    leave(pc, -EIO)
}

/// Without VMX (`iommu_only=1`) each CPU only prepared its area for direct
/// calls; after the last barrier it goes back to Linux, which keeps running
/// natively. `fail_cpu` fails a CPU here as it fails a VMX set-up.
fn iommu_only_finish(pc: &PerCpu, info: &BootInfo, n: u32) -> i64 {
    let i = pc.index;
    let r = if info.fail_cpu >= 0 && info.fail_cpu as u32 == i {
        log::error!("cpu{i}: {}", VmxError::Injected);
        FAILED.fetch_add(1, Ordering::AcqRel);
        Err(VmxError::Injected.errno())
    } else {
        Ok(())
    };
    let synced = barrier(&READY, n);
    if r.is_err() || !synced || FAILED.load(Ordering::Acquire) != 0 {
        if i == 0 {
            roll_back_global();
        }
        return leave(
            pc,
            match r {
                Err(e) => e,
                Ok(()) if !synced => -ETIMEDOUT,
                Ok(()) => -EAGAIN,
            },
        );
    }
    if i == 0 {
        log::info!("DMA protection only (iommu_only=1): no VMX; the host keeps running natively on {n} CPUs");
    }
    leave(pc, 0)
}

/// Undoes what the global set-up turned on in hardware when the load fails
/// after it: DMA remapping.
fn roll_back_global() {
    if super::iommu::teardown().is_err() {
        log::error!("DMA remapping is still on after a failed load: the region's tables must stay");
    }
}

/// The direct-call entry (`shared_abi::CallFn`): the driver's way in when
/// there is no VMX to VMCALL (`iommu_only=1`). It arrives on the boot page
/// tables and CPU `index`'s stack, with interrupts off; switches to the
/// hypervisor's page tables, IDT and per-CPU GS for the call; serves the
/// hypercalls that need no VMX; and puts Linux's IDT and GS base back. The
/// trampoline restores CR3 and the stack. See `docs/vtd.md`.
#[no_mangle]
#[link_section = ".text.uxen_call"]
extern "sysv64" fn uxen_call(index: u32, nr: u64, arg: u64, len: u64) -> shared_abi::CallResult {
    let refuse = |e: i64| shared_abi::CallResult { status: e, aux: 0 };
    let Some(h) = super::try_hv() else { return refuse(-ENODEV) };
    if !h.iommu_only() {
        // With VMX the host is demoted and must use VMCALL.
        return refuse(-EPERM);
    }
    if index >= h.boot.num_cpus {
        return refuse(-EINVAL);
    }
    switch_tables(h.cr3);
    let pc = h.percpu(index as usize);
    let linux_idt = instr::sidt();
    // SAFETY: GS base exists on every x86-64 CPU.
    let linux_gs = unsafe { instr::rdmsr(IA32_GS_BASE) };
    // SAFETY: this CPU's IDT and `PerCpu`, initialised at entry; interrupts
    // are off, and NMIs now reach the hypervisor's handler.
    unsafe {
        instr::lidt(&pc.idtr());
        instr::wrmsr(IA32_GS_BASE, pc.self_ptr);
    }
    let (status, aux) = super::hypercall::direct(nr, arg, len);
    if pc.host_nmi_pending.swap(0, Ordering::AcqRel) != 0 {
        log::warn!("cpu{index}: an NMI arrived during a direct call; the host does not see it");
    }
    // SAFETY: Linux's own values, read above on this CPU.
    unsafe {
        instr::lidt(&linux_idt);
        instr::wrmsr(IA32_GS_BASE, linux_gs);
    }
    shared_abi::CallResult { status, aux }
}

/// Gives the CPU back to Linux after a failure: its IDT and GS base. The
/// trampoline restores CR3.
fn leave(pc: &PerCpu, err: i64) -> i64 {
    let l = &pc.linux;
    // SAFETY: the values are Linux's own, saved at entry on this CPU.
    unsafe {
        instr::lidt(&l.idtr);
        instr::wrmsr(IA32_GS_BASE, l.gs_base);
    }
    err
}

/// Loads the hypervisor's page tables and drops every translation left
/// from the host's (global ones included).
fn switch_tables(cr3: u64) {
    // SAFETY: the new tables map the region (this code, the stack) and the
    // trampoline page exactly as the boot tables did.
    unsafe {
        instr::write_cr3(cr3);
        let cr4 = instr::read_cr4();
        instr::write_cr4(cr4 & !(1 << 7));
        instr::write_cr4(cr4);
    }
}

fn percpu_setup(pc: &mut PerCpu, hv: &Hv, info: &BootInfo, rip: u64, rsp: u64) -> Result<(), VmxError> {
    vmx::check_and_enable()?;
    if info.fail_cpu >= 0 && info.fail_cpu as u32 == pc.index {
        return Err(VmxError::Injected);
    }
    // SAFETY: once on this CPU, with its area initialised.
    unsafe { vmx::vmxon(pc, &hv.caps)? };
    let linux = pc.linux;
    // SAFETY: the VMCS is current; `linux` is this CPU's state.
    let r = unsafe {
        vmx::setup_host_vm(pc, &hv.caps, &linux, rip, rsp, hv.cr3, hv.host_eptp, hv.msr_bitmap.0, [hv.io_bitmaps[0].0, hv.io_bitmaps[1].0])
    };
    if let Err(e) = r {
        // SAFETY: in VMX operation.
        unsafe { vmx::vmxoff(pc) };
        return Err(e);
    }
    // SAFETY: in VMX operation; start with no stale translations.
    unsafe {
        let _ = instr::invept(2, 0);
        let _ = instr::invvpid(2, 0);
    }
    Ok(())
}

/// CPU 0, on the boot tables: the heap and the hypervisor's page tables.
fn build_tables(info: &BootInfo, l: &shared_abi::RegionLayout) -> Option<u64> {
    // SAFETY: the heap range is the region's, unused by anything else.
    unsafe { HEAP.lock().init((info.region_virt + l.heap_start) as *mut u8, (l.heap_end - l.heap_start) as usize) };
    let ram = &info.ram[..info.num_ram as usize];
    let huge = instr::cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    memory::build_page_tables(info.direct_map_base, host_map_top(ram), info.tramp_virt, info.tramp_phys, huge)
}

/// CPU 0, on the hypervisor's tables: the log, VMX capabilities, the host
/// VM's EPT and the bitmaps.
fn global_setup(info: &BootInfo, _h: &ImageHeader, l: &shared_abi::RegionLayout) -> Result<(), i64> {
    super::logger::E9.store(info.flags & shared_abi::BOOT_FLAG_LOG_E9 != 0, Ordering::Relaxed);
    if info.log_phys != 0 && info.log_size >= 4096 {
        // SAFETY: the driver's log ring, reachable through the direct map.
        unsafe { super::logger::init(memory::phys_ptr(info.log_phys), info.log_size as usize) };
    }
    log::info!(
        "uxen-rs {} starting on {} CPUs; region {:#x}+{:#x} (heap {} KiB)",
        core::str::from_utf8(shared_abi::cstr_bytes(&VERSION)).unwrap_or("?"),
        info.num_cpus,
        info.region_phys,
        info.region_size,
        (l.heap_end - l.heap_start) >> 10
    );
    let iommu_only = info.flags & shared_abi::BOOT_FLAG_IOMMU_ONLY != 0;
    let caps = if iommu_only {
        VmxCaps::default()
    } else {
        vmx::check_and_enable().map_err(|e| {
            log::error!("{e}");
            e.errno()
        })?;
        VmxCaps::read().map_err(|e| {
            log::error!("{e}");
            e.errno()
        })?
    };

    let ram: Vec<shared_abi::MemRange> = info.ram[..info.num_ram as usize].to_vec();
    let top = host_map_top(&ram);
    let region = PhysRange::new(info.region_phys, info.region_size);
    // The remapping units, their tables built but not yet on. Their
    // register pages are hidden from the host like the region.
    let iommu = super::iommu::discover(info, &ram, region)?;
    let mut holes = alloc::vec![region];
    if let Some(f) = &iommu {
        holes.extend_from_slice(f.registers());
    }
    // Without VMX this map is never walked by a CPU: it stays the record of
    // which pages the host owns, which the hypercalls check.
    let map = HostMap { ram: &ram, top, holes: &holes, huge_pages: caps.ept_huge_pages() };
    let mut ept = build_host_ept(&RegionMem, &mut HeapFrames, &map).ok_or(-ENOMEM)?;
    // The local APIC page: the host's, but in a 4 KiB leaf of its own, so
    // that CPU hotplug can write-protect it alone (`ipi::host_cpu`).
    // SAFETY: the APIC base MSR exists.
    let apic_page = unsafe { instr::rdmsr(crate::arch::x86::msr::IA32_APIC_BASE) } & 0x000f_ffff_ffff_f000;
    let rw = crate::arch::x86::ept_entry::EptEntry::leaf(apic_page, crate::arch::x86::ept_entry::EptFlags::RWX, crate::arch::x86::ept_entry::MT_UC, false);
    ept.set(&RegionMem, &mut HeapFrames, crate::addr::Gpa(apic_page), 1, rw).ok_or(-ENOMEM)?;
    let eptp = crate::arch::x86::ept_entry::eptp(ept.root.0, false);
    let counts = ept.counts(&RegionMem);
    log::info!(
        "host EPT: {:#x} bytes identity-mapped in {} 1G + {} 2M + {} 4K pages, less the region{}",
        top,
        counts.huge,
        counts.large,
        counts.small,
        if holes.len() > 1 { " and the VT-d registers" } else { "" }
    );

    let (msr_bitmap, msr_ptr) = memory::alloc_page().ok_or(-ENOMEM)?;
    // SAFETY: a fresh, zeroed heap page.
    let bm = unsafe { &mut *(msr_ptr as *mut [u8; 4096]) };
    policy::build_msr_bitmap(bm, policy::host_guarded_msrs());
    let (io_a, _) = memory::alloc_page().ok_or(-ENOMEM)?;
    let (io_b, _) = memory::alloc_page().ok_or(-ENOMEM)?;

    // Last, so that nothing after it can fail: DMA remapping on.
    if let Some(f) = iommu {
        super::iommu::enable(f)?;
    }
    IMAGE_HASH.store(image_hash(), Ordering::Relaxed);
    install(Hv {
        boot: *info,
        region,
        region_virt: info.region_virt,
        dm_base: info.direct_map_base,
        cr3: FINAL_CR3.load(Ordering::Acquire),
        ram,
        caps,
        host_ept: spin::Mutex::new(ept),
        host_eptp: eptp,
        host_ept_top: top,
        host_ept_huge: caps.ept_huge_pages(),
        msr_bitmap: Hpa(msr_bitmap),
        apic_page,
        io_bitmaps: [Hpa(io_a), Hpa(io_b)],
        stats: GlobalStats::default(),
        unloading: core::sync::atomic::AtomicBool::new(false),
    });
    Ok(())
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    log::error!("PANIC: {info}");
    loop {
        // SAFETY: nothing is left to run on this CPU.
        unsafe {
            instr::cli();
            instr::hlt();
        }
    }
}

const _: () = assert!(layout::PERCPU_SIZE == crate::arch::x86::cpu::area::STACK_TOP);
