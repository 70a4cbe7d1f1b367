//! DMA protection in the running hypervisor: the remapping units come from
//! the ACPI DMAR table, the shared tables (`crate::vtd`) are built from the
//! heap and kept in step with the pages the host donates and takes back,
//! faults are read and logged, and translation goes off again at unload.
//! See `docs/vtd.md`.
//!
//! The same code runs with VMX (the host demoted) and without it, in the
//! `iommu_only` mode that tests DMA protection on machines without VT-x.

use super::memory::{self, DirectMap, HeapFrames};
use crate::addr::PhysRange;
use crate::arch::x86::iommu::MmioRegs;
use crate::ept::host_map_top;
use crate::mem::PhysMem;
use crate::vtd::{self, DmaMap, Unit, Vtd, VtdSummary};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use shared_abi::{errno::*, BootInfo, MemRange, BOOT_FLAG_REQUIRE_IOMMU};

/// Polls of a register or a status word before a wait gives up: seconds of
/// MMIO reads even under emulation, where one unit answers in a few.
const SPIN_BUDGET: u32 = 1 << 22;

/// The units and their tables while translation is on.
static VTD: spin::Mutex<Option<Vtd<MmioRegs>>> = spin::Mutex::new(None);

/// Remapping hardware found and its tables built, not yet turned on.
pub struct Found {
    vtd: Vtd<MmioRegs>,
    registers: Vec<PhysRange>,
}

impl Found {
    /// The units' register pages, which the host must not reach.
    pub fn registers(&self) -> &[PhysRange] {
        &self.registers
    }
}

/// Finds the remapping units and builds the tables for them, without
/// turning anything on (it only reads registers). `Ok(None)`: there is no
/// usable remapping hardware, which is logged; `Err(-errno)`: the load must
/// fail. A unit that someone else drives always fails the load; no unit at
/// all fails it only with `require_iommu=1`.
pub fn discover(info: &BootInfo, ram: &[MemRange], region: PhysRange) -> Result<Option<Found>, i64> {
    let require = info.flags & BOOT_FLAG_REQUIRE_IOMMU != 0;
    let unavailable = |why: String| -> Result<Option<Found>, i64> {
        if require {
            log::error!("DMA protection is unavailable: {why}; refusing to start (require_iommu=1)");
            Err(-EOPNOTSUPP)
        } else {
            log::warn!("DMA protection is unavailable: {why}; devices can reach all memory");
            Ok(None)
        }
    };
    let top = host_map_top(ram);
    let (bytes, source) = match find_dmar(info, top) {
        Ok(b) => b,
        Err(why) => return unavailable(why),
    };
    let dmar = match vtd::parse_dmar(&bytes) {
        Ok(d) => d,
        Err(e) => return unavailable(format!("the ACPI DMAR table is malformed ({e})")),
    };
    if !dmar.checksum_ok {
        log::warn!("VT-d: the DMAR table's checksum is wrong; using it all the same");
    }
    log::info!(
        "VT-d: DMAR: {} remapping unit(s), {} reserved region(s) (RMRR), host address width {}; {source}",
        dmar.units.len(),
        dmar.rmrrs.len(),
        dmar.host_address_width
    );
    let mut units = Vec::new();
    let mut registers = Vec::new();
    for (i, d) in dmar.units.iter().enumerate() {
        let r = d.register_range();
        if r.end.0 > top {
            return unavailable(format!("unit {i}'s registers at {:#x} lie beyond the mapped {top:#x}", r.base.0));
        }
        // SAFETY: the direct map covers `[0, top)` for the hypervisor's
        // lifetime, the registers and the heap's table pages included.
        let regs = unsafe { MmioRegs::new(memory::phys_ptr(r.base.0) as u64, r.size() as u32, memory::phys_ptr(0) as u64) };
        let u = Unit::new(regs, d.base, d.segment, SPIN_BUDGET);
        log::info!(
            "VT-d: unit {i} at {:#x}, segment {}: version {}.{}, cap {:#x}, ecap {:#x}, {} device scope(s){}",
            d.base.0,
            d.segment,
            u.version().major(),
            u.version().minor(),
            u.cap().0,
            u.ecap().0,
            d.scopes.len(),
            if d.include_pci_all() { ", every other PCI device" } else { "" }
        );
        units.push(u);
        registers.push(r);
    }
    for rm in &dmar.rmrrs {
        log::info!("VT-d: RMRR {:#x}-{:#x} for {} device(s): kept mapped 1:1", rm.base.0, rm.limit.0, rm.scopes.len());
    }
    let mut v = match Vtd::new(units) {
        Ok(v) => v,
        Err(e) => return unavailable(format!("{e}")),
    };
    // Linux (booted with intel_iommu=on) or firmware drives a unit: taking
    // it over would pull its tables out from under it.
    if let Err(e) = v.check_free() {
        log::error!("{e}");
        return Err(e.errno());
    }
    let mut holes = Vec::with_capacity(registers.len() + 1);
    holes.push(region);
    holes.extend_from_slice(&registers);
    let rmrrs = dmar.rmrr_ranges();
    match v.build(&DirectMap, &mut HeapFrames, &DmaMap { ram, holes: &holes, rmrrs: &rmrrs }) {
        Ok(()) => Ok(Some(Found { vtd: v, registers })),
        Err(vtd::Error::NoFrames) => {
            log::error!("VT-d: out of heap for the DMA tables");
            Err(-ENOMEM)
        }
        Err(e) => unavailable(format!("{e}")),
    }
}

/// Turns translation on in every unit (or in none).
pub fn enable(found: Found) -> Result<(), i64> {
    let mut v = found.vtd;
    if let Err(e) = v.enable(&DirectMap, &mut HeapFrames) {
        log::error!("VT-d: cannot turn DMA remapping on: {e}");
        return Err(e.errno());
    }
    let queued = v.units().iter().filter(|u| u.uses_queue()).count();
    if let Some(t) = v.tables() {
        let c = t.counts(&DirectMap);
        log::info!(
            "VT-d: DMA remapping on in {} unit(s) ({} with queued invalidation): {:#x} bytes mapped 1:1 for devices in {} 1G + {} 2M + {} 4K pages ({}-level tables), less the hypervisor region and the unit registers",
            v.units().len(),
            queued,
            t.top,
            c.huge,
            c.large,
            c.small,
            t.config.levels.count()
        );
    }
    *VTD.lock() = Some(v);
    Ok(())
}

/// Whether translation is on.
pub fn enabled() -> bool {
    VTD.lock().as_ref().is_some_and(Vtd::enabled)
}

/// Takes pages out of every device's view (donated to the pool). Returns
/// once no unit can reach them; on an error they may still be reachable.
pub fn remove(ranges: &[PhysRange]) -> Result<(), vtd::Error> {
    let mut g = VTD.lock();
    let Some(v) = g.as_mut() else { return Ok(()) };
    v.remove_ranges(&DirectMap, &mut HeapFrames, ranges).inspect_err(|e| log::error!("VT-d: cannot take donated pages out of the DMA map: {e}"))
}

/// Puts pages back into every device's view (given back to the host).
pub fn restore(ranges: &[PhysRange]) -> Result<(), vtd::Error> {
    let mut g = VTD.lock();
    let Some(v) = g.as_mut() else { return Ok(()) };
    v.restore_ranges(&DirectMap, &mut HeapFrames, ranges).inspect_err(|e| log::error!("VT-d: cannot give returned pages back to devices: {e}"))
}

/// Reads every unit's fault records, logs each fault, and returns how many
/// were new.
pub fn poll() -> u64 {
    let mut g = VTD.lock();
    let Some(v) = g.as_mut() else { return 0 };
    let before = v.summary().overflows;
    let faults = v.poll_faults();
    for f in &faults {
        let r = &f.record;
        log::warn!(
            "VT-d: blocked DMA {:?} by {:04x}:{} at {:#x}: {} (reason {:#x}, unit {})",
            r.kind,
            f.segment,
            r.source,
            r.addr,
            r.reason.describe(),
            r.reason.0,
            f.unit
        );
    }
    if v.summary().overflows != before {
        log::warn!("VT-d: fault records overflowed; some faults were not recorded");
    }
    faults.len() as u64
}

/// The counters for the stats hypercall (all zero without remapping units).
pub fn summary() -> VtdSummary {
    VTD.lock().as_ref().map(Vtd::summary).unwrap_or_default()
}

/// Turns translation off in every unit and frees the tables: devices reach
/// memory untranslated again. Idempotent. If a unit does not answer, the
/// units and their tables are kept (a unit may still walk them) and the
/// error is returned: the region must then not be freed.
pub fn teardown() -> Result<(), vtd::Error> {
    let mut g = VTD.lock();
    let Some(v) = g.as_mut() else { return Ok(()) };
    drop(v.poll_faults());
    match v.teardown(&DirectMap, &mut HeapFrames) {
        Ok(()) => {
            let s = v.summary();
            log::info!("VT-d: DMA remapping off in {} unit(s) ({} faults recorded)", s.units, s.faults);
            *g = None;
            Ok(())
        }
        Err(e) => {
            log::error!("VT-d: cannot turn DMA remapping off: {e}");
            Err(e)
        }
    }
}

/// The DMAR table's bytes, copied out and bounded for `vtd::dmar` to parse,
/// and a phrase for the log saying where they came from. In order:
///
/// - `rsdp_phys` (module parameter `rsdp`, an override): the RSDP there;
/// - `dmar_phys`: the copy of the table that the host kernel found through
///   its own ACPI, which works on UEFI and BIOS machines alike;
/// - else the RSDP in the BIOS areas (a kernel without ACPI).
///
/// Through an RSDP, the `acpi` crate walks the XSDT or RSDT to `ACPI_SIG_DMAR`
/// and checks every signature and checksum on the way; the kernel's copy is
/// checked by `vtd::dmar` (signature, length; its checksum is reported).
fn find_dmar(info: &BootInfo, top: u64) -> Result<(Vec<u8>, String), String> {
    if info.rsdp_phys == 0 && info.dmar_phys != 0 {
        let (phys, len) = (info.dmar_phys, info.dmar_len);
        if len as usize > vtd::dmar::MAX_TABLE_LEN || phys.checked_add(len).is_none_or(|end| end > top) {
            return Err(format!("the host kernel's DMAR table at {phys:#x} (+{len:#x}) is out of bounds"));
        }
        let mut bytes = alloc::vec![0u8; len as usize];
        DirectMap.read(crate::addr::Hpa(phys), &mut bytes);
        return Ok((bytes, format!("the host kernel's ACPI table ({len} bytes)")));
    }
    let rsdp = info.rsdp_phys;
    let h = AcpiMap { top };
    // SAFETY: the handler maps physical memory through the direct map and
    // refuses what lies beyond it; the RSDP search reads only the BIOS
    // areas below 1 MiB.
    let tables = unsafe {
        if rsdp != 0 {
            acpi::AcpiTables::from_rsdp(h, rsdp as usize)
        } else {
            acpi::AcpiTables::search_for_rsdp_bios(h)
        }
    }
    .map_err(|e| format!("no ACPI tables ({e:?})"))?;
    let dmar = tables.find_table::<DmarTable>().map_err(|_| String::from("no ACPI DMAR table (no VT-d remapping hardware)"))?;
    let len = dmar.header.length as usize;
    if len > vtd::dmar::MAX_TABLE_LEN {
        return Err(format!("the DMAR table claims {len} bytes"));
    }
    let mut bytes = alloc::vec![0u8; len];
    DirectMap.read(crate::addr::Hpa(dmar.physical_start() as u64), &mut bytes);
    let source = if rsdp != 0 {
        format!("found through the RSDP at {rsdp:#x} (rsdp=)")
    } else {
        String::from("found through the RSDP in the BIOS areas")
    };
    Ok((bytes, source))
}

/// The DMAR as the `acpi` crate sees it: a header; the body is ours.
#[repr(transparent)]
struct DmarTable {
    header: acpi::sdt::SdtHeader,
}

// SAFETY: `DmarTable` is exactly an SDT header, and the signature is the
// DMAR's.
unsafe impl acpi::AcpiTable for DmarTable {
    const SIGNATURE: acpi::sdt::Signature = acpi::sdt::Signature::DMAR;
    fn header(&self) -> &acpi::sdt::SdtHeader {
        &self.header
    }
}

/// A page of zeros that stands in for memory beyond the direct map: no
/// table signature matches it, so the `acpi` crate stops there.
#[repr(C, align(4096))]
struct ZeroPage([u8; 4096]);
static ZERO_PAGE: ZeroPage = ZeroPage([0; 4096]);

/// ACPI tables through the direct map, which covers `[0, top)`.
#[derive(Clone, Copy)]
struct AcpiMap {
    top: u64,
}

impl acpi::AcpiHandler for AcpiMap {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> acpi::PhysicalMapping<Self, T> {
        let inside = (pa as u64).checked_add(size as u64).is_some_and(|end| end <= self.top);
        let (virt, len) = if inside {
            (memory::phys_ptr(pa as u64), size)
        } else {
            log::warn!("ACPI: a table at {pa:#x} lies beyond the mapped {:#x}; ignored", self.top);
            (ZERO_PAGE.0.as_ptr() as *mut u8, size.min(ZERO_PAGE.0.len()))
        };
        // SAFETY: `virt` is mapped for `len` bytes (the direct map, or the
        // zero page); the ACPI structures are packed, so any address is
        // aligned for them.
        unsafe { acpi::PhysicalMapping::new(pa, NonNull::new(virt as *mut T).expect("direct map at 0"), len, len, *self) }
    }

    fn unmap_physical_region<T>(_region: &acpi::PhysicalMapping<Self, T>) {}
}
