// SPDX-License-Identifier: GPL-2.0
//! The late launch as the driver does it: check the host, load and
//! relocate the image into a region of its own, map it in the boot page
//! tables, write the boot info, enter the image on every CPU at once, and
//! either find every CPU entered and start what serves the running
//! hypervisor (the log poller, the hotplug callbacks), or take back the
//! CPUs that entered. See `docs/bootstrap.md`.
//!
//! [`Hypervisor::start`] is the sequence, one named step a line. The
//! trampoline that the entry goes through is in `hv.rs`, with the direct
//! calls and the unload, which use it too.

use crate::abi;
use crate::hv::{hypercall, log_poller, trampoline, unload_on_cpu, uxen_tramp_enter, uxen_tramp_return, Direct, Hypervisor, Log, PollerData, HOTPLUG};
use crate::shim::{self, CpusReadGuard, Kthread, Pages, Params};
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use kernel::c_str;
use kernel::prelude::*;

/// The boot page tables: the region at its direct-map address and the
/// trampoline page, in 4 KiB pages. Used by the entry only, until the
/// hypervisor switches to page tables of its own.
pub(crate) struct BootTables {
    pages: Pages,
    used: usize,
}

const PT_P: u64 = 1;
const PT_RW: u64 = 2;

impl BootTables {
    fn new() -> Result<Self> {
        Ok(BootTables { pages: Pages::alloc(3)?, used: 1 })
    }

    pub(crate) fn cr3(&self) -> u64 {
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

/// What every CPU's entry call shares.
pub(crate) struct EntryCtx {
    entry: u64,
    info: *const abi::BootInfo,
    boot_cr3: u64,
    stacks: [u64; abi::MAX_CPUS],
    pub(crate) cpus: [i32; abi::MAX_CPUS],
    pub(crate) ncpus: usize,
    pub(crate) results: [AtomicI64; abi::MAX_CPUS],
}

impl EntryCtx {
    pub(crate) fn index_of(&self, cpu: i32) -> Option<usize> {
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

impl Hypervisor {
    /// Loads the image and enters it on every CPU.
    pub(crate) fn start(header: &abi::ImageHeader) -> Result<Self> {
        let params = shim::params();
        check_host(header, &params)?;
        let (tramp_virt, tramp_phys) = trampoline()?;
        let log = KBox::new(Log::new()?, GFP_KERNEL)?;
        let hotplug = shim::cpus_read_lock();
        let (cpus, n) = online_cpus(header)?;
        let (region, layout) = load_image(header, n)?;
        let boot = map_boot_tables(&region, tramp_virt, tramp_phys)?;
        let dmar = find_dmar(&params)?;
        let (info, stacks) = write_boot_info(header, &region, &layout, &params, &log, dmar.as_ref(), (tramp_virt, tramp_phys), &cpus, n)?;
        let ctx = KBox::new(
            EntryCtx {
                entry: region.virt() as u64 + header.entry_offset,
                info,
                boot_cr3: boot.cr3(),
                stacks,
                cpus,
                ncpus: n,
                results: [const { AtomicI64::new(i64::MIN) }; abi::MAX_CPUS],
            },
            GFP_KERNEL,
        )?;
        enter_every_cpu(&ctx, &region);
        drop(dmar);
        let direct = direct_calls(&params, header, &region, boot, stacks, cpus, n)?;
        log.drain();
        check_entered(&ctx, &cpus, n, direct.as_deref(), &log)?;
        let (poller, poller_data) = serve(&log, direct.as_deref(), &hotplug, n)?;
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
}

/// Refuses a host the hypervisor cannot run under: one whose Linux drives
/// the Intel IOMMU or runs with 5-level paging, or an image without the
/// direct-call entry that `iommu_only=1` needs.
fn check_host(header: &abi::ImageHeader, params: &Params) -> Result {
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
    Ok(())
}

/// The CPUs to enter: every present CPU, all of which must be online, no
/// more than the image supports. Called with the hotplug lock held.
fn online_cpus(header: &abi::ImageHeader) -> Result<([i32; abi::MAX_CPUS], usize)> {
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
    Ok((cpus, n))
}

/// The region: image, boot info, heap and per-CPU areas, contiguous, used
/// at its direct-map address. Allocates it for `n` CPUs, copies the image
/// in and relocates it.
fn load_image(header: &abi::ImageHeader, n: usize) -> Result<(Pages, abi::RegionLayout)> {
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
    Ok((region, layout))
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

/// The boot page tables: the whole region, writable, and the trampoline
/// page, executable.
fn map_boot_tables(region: &Pages, tramp_virt: u64, tramp_phys: u64) -> Result<BootTables> {
    let base = region.virt();
    let size = region.len() as u64;
    let mut boot = BootTables::new()?;
    let mut off = 0;
    while off < size {
        boot.map(base as u64 + off, region.phys() + off, PT_P | PT_RW)?;
        off += 4096;
    }
    boot.map(tramp_virt, tramp_phys, PT_P)?;
    Ok(boot)
}

/// The DMAR, for DMA protection: `rsdp=` overrides; else the table the
/// kernel's own ACPI found, which works under UEFI too, where no RSDP lies
/// in the BIOS areas. The hypervisor copies it during its global set-up;
/// the copy here is freed once every CPU has entered.
fn find_dmar(params: &Params) -> Result<Option<(Pages, usize)>> {
    if params.rsdp != 0 {
        pr_info!("rsdp={:#x}: the hypervisor finds the ACPI DMAR table through it\n", params.rsdp);
        return Ok(None);
    }
    let d = shim::acpi_dmar()?;
    match &d {
        Some((p, len)) => pr_info!("the kernel's ACPI DMAR table ({} bytes) goes to the hypervisor at {:#x}\n", len, p.phys()),
        None => pr_info!("the kernel's ACPI has no DMAR table; the hypervisor searches the BIOS areas\n"),
    }
    Ok(d)
}

/// Writes the boot info into its page of the region; returns it and each
/// CPU's stack top.
#[allow(clippy::too_many_arguments)]
fn write_boot_info(
    header: &abi::ImageHeader,
    region: &Pages,
    layout: &abi::RegionLayout,
    params: &Params,
    log: &Log,
    dmar: Option<&(Pages, usize)>,
    (tramp_virt, tramp_phys): (u64, u64),
    cpus: &[i32; abi::MAX_CPUS],
    n: usize,
) -> Result<(*const abi::BootInfo, [u64; abi::MAX_CPUS])> {
    let base = region.virt();
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
        region_size: region.len() as u64,
        direct_map_base: shim::page_offset(),
        rsdp_phys: params.rsdp,
        dmar_phys: dmar.map_or(0, |(p, _)| p.phys()),
        dmar_len: dmar.map_or(0, |(_, len)| *len as u64),
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
        stacks[i] = base as u64 + header.stack_top(layout, i as u64);
    }
    Ok((info as *const abi::BootInfo, stacks))
}

/// Calls the image's entry on every CPU at once, with interrupts off; each
/// CPU's result lands in `ctx.results`.
fn enter_every_cpu(ctx: &EntryCtx, region: &Pages) {
    pr_info!("entering the hypervisor on {} CPUs (region {:#x}, {} KiB)\n", ctx.ncpus, region.phys(), region.len() as u64 >> 10);
    // SAFETY: `ctx` outlives the call; the entry runs with interrupts off.
    unsafe { shim::on_each_cpu(enter_on_cpu, ctx as *const EntryCtx as *mut c_void) };
}

/// Without VMX the boot tables stay: direct calls enter on them. With VMX
/// they go.
fn direct_calls(
    params: &Params,
    header: &abi::ImageHeader,
    region: &Pages,
    boot: BootTables,
    stacks: [u64; abi::MAX_CPUS],
    cpus: [i32; abi::MAX_CPUS],
    n: usize,
) -> Result<Option<KBox<Direct>>> {
    if params.iommu_only {
        Ok(Some(KBox::new(Direct { call: region.virt() as u64 + header.call_offset, boot, stacks, cpus, ncpus: n }, GFP_KERNEL)?))
    } else {
        drop(boot);
        Ok(None)
    }
}

/// Whether every CPU entered. If not, takes out the CPUs that did and
/// reports the cause.
fn check_entered(ctx: &EntryCtx, cpus: &[i32; abi::MAX_CPUS], n: usize, direct: Option<&Direct>, log: &Log) -> Result {
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
    if entered == n {
        return Ok(());
    }
    if entered > 0 {
        if let Some(d) = direct {
            // Without VMX one call turns the hypervisor off.
            d.call(abi::hc::UNLOAD, 0, 0);
        } else {
            // Some CPUs were launched before another failed: take them out.
            // SAFETY: `ctx` outlives the call.
            unsafe { shim::on_each_cpu(unload_on_cpu, ctx as *const EntryCtx as *mut c_void) };
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
    Err(Error::from_errno(e as i32))
}

/// What serves the running hypervisor: the `uxen-log` thread (which also
/// polls the IOMMU's faults when DMA protection is on) and, with VMX, the
/// CPU hotplug callbacks. Returns the thread and its data.
fn serve(log: &KBox<Log>, direct: Option<&Direct>, hotplug: &CpusReadGuard, n: usize) -> Result<(Option<Kthread>, KBox<PollerData>)> {
    let iommu = {
        let mut v = KBox::new(abi::HvVersion::default(), GFP_KERNEL)?;
        let pa = shim::virt_to_phys((&mut *v as *mut abi::HvVersion).cast());
        let (s, _) = hypercall(direct, abi::hc::VERSION, pa, core::mem::size_of::<abi::HvVersion>() as u64);
        s == 0 && v.features & abi::HV_FEATURE_IOMMU != 0
    };
    let poller_data = KBox::new(
        PollerData {
            log: &**log as *const Log,
            direct: direct.map_or(core::ptr::null(), |d| d as *const Direct),
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
        match shim::cpuhp_register(hotplug) {
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
    Ok((poller, poller_data))
}
