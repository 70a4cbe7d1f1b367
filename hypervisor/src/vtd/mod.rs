//! VT-d DMA remapping: the hypervisor owns the IOMMU, so that no device the
//! host drives can read or write hypervisor or guest memory.
//!
//! - [`dmar`] parses the ACPI DMAR table: the remapping units and the
//!   firmware-reserved memory (RMRRs).
//! - [`tables`] builds one root table, one context table and one
//!   second-level hierarchy that maps host memory 1:1 for every device,
//!   less the holes; pages are taken out and put back as they are donated
//!   and returned.
//! - [`unit`] programs one unit through the [`regs::VtdRegs`] trait: the
//!   take-over checks, the enable and disable sequences, invalidation
//!   (queued or register-based) and fault records.
//! - [`Vtd`] ties them together for every unit at once.
//!
//! All of it is portable: memory through [`crate::mem::PhysMem`], registers
//! through [`regs::VtdRegs`], so `cargo test` runs it against mocks. The
//! hardware formats live in [`regs`] and [`entry`]; they could move under
//! `arch::x86` with the other hardware formats.
//!
//! See: Intel Virtualization Technology for Directed I/O, Architecture
//! Specification ("VT-d spec"); section numbers follow revision 3.x.

pub mod dmar;
pub mod entry;
pub mod regs;
pub mod tables;
pub mod unit;

// Test code lives outside `src/` (`hypervisor/tests/support/`).
#[cfg(test)]
#[path = "../../tests/support/vtd_mock.rs"]
pub mod mock;
#[cfg(test)]
#[path = "../../tests/support/vtd_tests.rs"]
mod tests;

use crate::addr::{Hpa, PhysRange, PAGE_SIZE};
use crate::mem::{FrameAlloc, PhysMem};
use alloc::vec::Vec;
use core::fmt;

pub use dmar::{parse as parse_dmar, Dmar, Drhd, Rmrr};
pub use entry::{FaultReason, FaultRecord, Levels, RequestKind, SourceId};
pub use regs::VtdRegs;
pub use tables::{DmaMap, DmaTables, TableConfig, Unmapped};
pub use unit::{FaultScan, Invalidate, Unit, Wait};

/// The domain every device belongs to. Domain 0 is avoided: with CAP.CM set
/// it is reserved. See: VT-d spec, 10.4.2 (CM).
pub const HOST_DOMAIN: u16 = 1;

/// A DMA address as a device issues it (I/O virtual address). With the
/// identity map it equals the host-physical address it reaches, but the
/// type keeps "what the device said" apart from "where it lands".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Iova(pub u64);

impl fmt::Debug for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iova({:#x})", self.0)
    }
}

/// Everything that can go wrong in VT-d set-up and operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The DMAR is shorter than its header, or than its length field says.
    DmarTruncated,
    /// The table does not start with the `DMAR` signature.
    DmarSignature,
    /// The DMAR length field is shorter than the header or absurdly large.
    DmarLength,
    /// The remapping structure at this byte offset is malformed: a length
    /// of zero, too short for its fields or running past the table, or a
    /// DRHD/RMRR address that is unaligned or empty.
    DmarStructure { offset: u32 },
    /// The device scope at this byte offset is malformed (bad length, odd
    /// path, overrunning its structure, an absurdly long path).
    DmarScope { offset: u32 },
    /// More units, RMRRs or scopes than any real machine has.
    DmarTooMany,
    /// The DMAR lists no remapping unit.
    DmarNoUnits,
    /// No unit was given to drive.
    NoUnits,
    /// The frame allocator ran dry (the driver may donate and retry).
    NoFrames,
    /// Memory to be mapped ends at `end`, beyond what `bits`-bit tables
    /// (and every unit's MGAW) can address.
    AddressWidth { end: u64, bits: u32 },
    /// An RMRR starts at `base` inside a hole (the hypervisor region or a
    /// donated page): the devices firmware gave it to could reach our
    /// memory, so we refuse to start.
    RmrrInHole { base: Hpa },
    /// The page belongs to an RMRR; it is never taken out of the map.
    RmrrPage { addr: u64 },
    /// The address is unaligned or outside the map.
    OutOfRange { addr: u64 },
    /// The unit lacks something we need; the text says what.
    Unsupported(&'static str),
    /// Someone else drives the unit at `unit`: GSTS (`gsts`) shows
    /// translation, queued invalidation or interrupt remapping on. Linux
    /// was booted with `intel_iommu=on`; it must be booted with
    /// `intel_iommu=off` for the hypervisor to own the IOMMU.
    InUse { unit: Hpa, gsts: u32 },
    /// The unit did not finish `wait` within the spin budget.
    Timeout { unit: Hpa, wait: Wait },
    /// The unit reported an actual invalidation granularity of 0: it did
    /// not perform the invalidation.
    InvalidationRejected { unit: Hpa, wait: Wait },
    /// The invalidation queue stopped with an error (FSTS IQE/ICE/ITE).
    QueueError { unit: Hpa, fsts: u32 },
    /// The invalidation queue has no room (a previous wait timed out).
    QueueFull { unit: Hpa },
    /// The tables have not been built yet.
    NotBuilt,
    /// The tables were built already.
    AlreadyBuilt,
    /// A unit still translates through the tables, so they cannot go.
    StillEnabled,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::InUse { unit, gsts } if regs::Gsts::from_bits_retain(gsts).contains(regs::Gsts::IRES) => write!(
                f,
                "VT-d unit at {:#x} is already in use: interrupt remapping is on (GSTS {gsts:#x}); boot the host with intel_iommu=off intremap=off",
                unit.0
            ),
            Error::InUse { unit, gsts } => {
                write!(f, "VT-d unit at {:#x} is already in use (GSTS {gsts:#x}); boot the host with intel_iommu=off", unit.0)
            }
            Error::Timeout { unit, wait } => write!(f, "VT-d unit at {:#x} timed out waiting for {wait:?}", unit.0),
            Error::AddressWidth { end, bits } => write!(f, "memory up to {end:#x} does not fit {bits}-bit DMA tables"),
            Error::Unsupported(what) => write!(f, "VT-d: {what}"),
            e => write!(f, "VT-d: {e:?}"),
        }
    }
}

impl Error {
    /// The errno a failed load or hypercall reports for this error.
    pub fn errno(self) -> i64 {
        use shared_abi::errno::*;
        match self {
            Error::InUse { .. } => -EBUSY,
            Error::NoFrames => -ENOMEM,
            Error::Timeout { .. } | Error::InvalidationRejected { .. } | Error::QueueError { .. } | Error::QueueFull { .. } => -EIO,
            Error::RmrrPage { .. } | Error::OutOfRange { .. } => -EINVAL,
            Error::NotBuilt | Error::AlreadyBuilt | Error::StillEnabled => -EIO,
            Error::DmarTruncated
            | Error::DmarSignature
            | Error::DmarLength
            | Error::DmarStructure { .. }
            | Error::DmarScope { .. }
            | Error::DmarTooMany
            | Error::DmarNoUnits
            | Error::NoUnits
            | Error::AddressWidth { .. }
            | Error::RmrrInHole { .. }
            | Error::Unsupported(_) => -ENODEV,
        }
    }
}

pub type Result<T> = core::result::Result<T, Error>;

/// One fault as [`Vtd::poll_faults`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitFault {
    /// Index of the unit in [`Vtd::units`].
    pub unit: usize,
    pub segment: u16,
    pub record: FaultRecord,
}

/// The counters `uxenctl stats` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtdSummary {
    pub units: u32,
    /// Every unit translates.
    pub enabled: bool,
    pub faults: u64,
    /// Times a unit lost faults because its records were full.
    pub overflows: u64,
    /// `segment << 16 | bus << 8 | device << 3 | function` of the last
    /// fault, 0 if none.
    pub last_fault_source: u64,
    pub last_fault_addr: u64,
}

impl VtdSummary {
    /// Fills the IOMMU fields of the stats hypercall's output.
    pub fn fill(&self, s: &mut shared_abi::HvStats) {
        s.iommu_enabled = self.enabled as u32;
        s.iommu_units = self.units;
        s.iommu_faults = self.faults;
        s.iommu_last_fault_source = self.last_fault_source;
        s.iommu_last_fault_addr = self.last_fault_addr;
    }
}

/// Every remapping unit, and the tables they share.
pub struct Vtd<R: VtdRegs> {
    units: Vec<Unit<R>>,
    tables: Option<DmaTables>,
    faults: u64,
    overflows: u64,
    last_fault: Option<UnitFault>,
}

impl<R: VtdRegs> Vtd<R> {
    /// Takes the units (one per DRHD, in DMAR order). Touches no register
    /// beyond the reads [`Unit::new`] did.
    pub fn new(units: Vec<Unit<R>>) -> Result<Self> {
        if units.is_empty() {
            return Err(Error::NoUnits);
        }
        Ok(Vtd { units, tables: None, faults: 0, overflows: 0, last_fault: None })
    }

    pub fn units(&self) -> &[Unit<R>] {
        &self.units
    }
    pub fn tables(&self) -> Option<&DmaTables> {
        self.tables.as_ref()
    }

    /// Refuses if any unit is driven by someone else. Cheap and changes
    /// nothing: call it first, so the load fails before anything is built.
    pub fn check_free(&self) -> Result<()> {
        self.units.iter().try_for_each(Unit::check_free)
    }

    /// The table configuration every unit supports.
    pub fn config(&self) -> Result<TableConfig> {
        let c = TableConfig::common(self.units.iter().map(Unit::cap))?;
        self.units.iter().try_for_each(|u| u.check_config(&c))?;
        Ok(c)
    }

    /// Builds the shared tables for `map`.
    pub fn build(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, map: &DmaMap) -> Result<()> {
        if self.tables.is_some() {
            return Err(Error::AlreadyBuilt);
        }
        let config = self.config()?;
        self.tables = Some(DmaTables::build(mem, alloc, config, map)?);
        Ok(())
    }

    /// Makes the CPU's table writes visible to units that do not snoop.
    fn sync_dirty(&mut self) {
        let Some(t) = self.tables.as_mut() else { return };
        let dirty = t.take_dirty();
        for u in self.units.iter().filter(|u| !u.coherent()) {
            for &p in &dirty {
                u.regs().sync_for_device(p);
            }
        }
    }

    /// Turns translation on in every unit, or in none: a failure turns the
    /// units already enabled off again.
    pub fn enable(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Result<()> {
        let (root, config) = match &self.tables {
            Some(t) => (t.root, t.config),
            None => return Err(Error::NotBuilt),
        };
        self.check_free()?;
        self.sync_dirty();
        for i in 0..self.units.len() {
            if let Err(e) = self.units[i].enable(mem, alloc, root, &config) {
                for u in &mut self.units[..i] {
                    let _ = u.disable(mem, alloc);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Turns translation off in every unit (all are tried; the first error
    /// is returned).
    pub fn disable(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Result<()> {
        let mut r = Ok(());
        for u in &mut self.units {
            if let Err(e) = u.disable(mem, alloc) {
                r = r.and(Err(e));
            }
        }
        r
    }

    /// Whether every unit translates.
    pub fn enabled(&self) -> bool {
        self.units.iter().all(Unit::is_enabled)
    }

    /// Takes a 4 KiB page out of every device's view. See
    /// [`Vtd::remove_ranges`].
    pub fn remove_page(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, pa: Hpa) -> Result<()> {
        self.remove_ranges(mem, alloc, &[PhysRange::new(pa.0, PAGE_SIZE)])
    }

    /// Takes ranges out of every device's view (donated to the pool or a
    /// guest). Returns only once every enabled unit has invalidated its
    /// caches: page-selective for a lone page whose leaf was not split, for
    /// the whole domain otherwise (after a split the IOTLB may hold the old
    /// large translation, and the paging-structure caches the old walk).
    ///
    /// Every range is checked before anything changes. The ranges must be
    /// mapped in full, as donated host RAM is: if a later one fails (out of
    /// frames), the ones already taken out are mapped again. On any error
    /// the pages may still be reachable by DMA and must not be handed out.
    pub fn remove_ranges(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, ranges: &[PhysRange]) -> Result<()> {
        let t = self.tables.as_mut().ok_or(Error::NotBuilt)?;
        ranges.iter().try_for_each(|r| t.check_range(*r))?;
        let mut done = Unmapped { was_mapped: false, split: false };
        for (i, r) in ranges.iter().enumerate() {
            match t.unmap_range(mem, alloc, *r) {
                Ok(u) => {
                    done.was_mapped |= u.was_mapped;
                    done.split |= u.split;
                }
                Err(e) => {
                    for r in &ranges[..=i] {
                        let _ = t.map_range(mem, alloc, *r);
                    }
                    self.sync_dirty();
                    return Err(e);
                }
            }
        }
        if !done.was_mapped {
            return Ok(());
        }
        self.sync_dirty();
        let lone = ranges.len() == 1 && ranges[0].size() == PAGE_SIZE && !done.split;
        let what = if lone { Invalidate::Page { domain: HOST_DOMAIN, addr: Iova(ranges[0].base.0) } } else { Invalidate::Domain(HOST_DOMAIN) };
        for unit in &mut self.units {
            unit.invalidate(mem, what)?;
        }
        Ok(())
    }

    /// Puts a 4 KiB page back. See [`Vtd::restore_ranges`].
    pub fn restore_page(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, pa: Hpa) -> Result<()> {
        self.restore_ranges(mem, alloc, &[PhysRange::new(pa.0, PAGE_SIZE)])
    }

    /// Puts ranges back (returned to the host, scrubbed). Not-present to
    /// present needs no invalidation, except in units in caching mode
    /// (CAP.CM, e.g. emulated ones), which may cache not-present entries.
    pub fn restore_ranges(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, ranges: &[PhysRange]) -> Result<()> {
        let t = self.tables.as_mut().ok_or(Error::NotBuilt)?;
        ranges.iter().try_for_each(|r| t.check_range(*r))?;
        let mut r = Ok(());
        for range in ranges {
            r = t.map_range(mem, alloc, *range);
            if r.is_err() {
                break;
            }
        }
        self.sync_dirty();
        r?;
        let lone = ranges.len() == 1 && ranges[0].size() == PAGE_SIZE;
        let what = match ranges.first() {
            Some(first) if lone => Invalidate::Page { domain: HOST_DOMAIN, addr: Iova(first.base.0) },
            _ => Invalidate::Domain(HOST_DOMAIN),
        };
        for unit in self.units.iter_mut().filter(|u| u.cap().caching_mode()) {
            unit.invalidate(mem, what)?;
        }
        Ok(())
    }

    /// Where a device's DMA to `iova` lands, and whether it may write.
    pub fn translate(&self, mem: &impl PhysMem, iova: Iova) -> Option<(Hpa, bool)> {
        self.tables.as_ref()?.translate(mem, iova)
    }

    /// Reads and clears every unit's fault records; counts them.
    pub fn poll_faults(&mut self) -> Vec<UnitFault> {
        let mut out = Vec::new();
        for (i, u) in self.units.iter_mut().enumerate() {
            let scan = u.drain_faults();
            if scan.overflow {
                self.overflows += 1;
            }
            out.extend(scan.records.into_iter().map(|record| UnitFault { unit: i, segment: u.segment, record }));
        }
        self.faults += out.len() as u64;
        if let Some(last) = out.last() {
            self.last_fault = Some(*last);
        }
        out
    }

    pub fn summary(&self) -> VtdSummary {
        let (src, addr) = match self.last_fault {
            Some(f) => (((f.segment as u64) << 16) | f.record.source.0 as u64, f.record.addr),
            None => (0, 0),
        };
        VtdSummary {
            units: self.units.len() as u32,
            enabled: self.enabled(),
            faults: self.faults,
            overflows: self.overflows,
            last_fault_source: src,
            last_fault_addr: addr,
        }
    }

    /// Turns translation off in every unit and frees the tables: devices
    /// reach memory untranslated again, as before we took over. If a unit
    /// does not answer, the tables stay (it may still walk them) and the
    /// error is returned.
    pub fn teardown(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Result<()> {
        self.disable(mem, alloc)?;
        self.free_tables(mem, alloc)
    }

    /// Frees the tables. Every unit must be disabled first.
    pub fn free_tables(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Result<()> {
        if self.units.iter().any(|u| u.is_enabled() || u.uses_queue()) {
            return Err(Error::StillEnabled);
        }
        if let Some(t) = self.tables.take() {
            t.free(mem, alloc);
        }
        Ok(())
    }
}
