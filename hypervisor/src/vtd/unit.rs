//! One remapping unit: taking it over, enabling and disabling translation,
//! invalidating its caches (queued or through registers), and reading its
//! fault records.
//!
//! Every wait on the hardware is bounded by the spin budget given to
//! [`Unit::new`] and ends in [`Error::Timeout`] rather than a hang: a unit
//! that stops answering must fail the load (or the donation), not wedge the
//! CPU that holds every other CPU at a barrier.

use super::entry::{FaultRecord, InvDesc};
use super::regs::{
    iqa, off, queue_index, rtaddr_legacy, Cap, Ccmd, Ecap, Fectl, Fsts, Gcmd, Granularity, Gsts, IotlbCmd, Pmen, Ver, VtdRegs,
    QUEUE_ENTRIES,
};
use super::tables::TableConfig;
use super::{Error, Iova, Result};
use crate::addr::Hpa;
use crate::mem::{FrameAlloc, PhysMem};
use alloc::vec::Vec;

/// What an invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidate {
    /// Every context-cache and IOTLB entry (after the root table changes).
    Global,
    /// Every IOTLB entry of one domain, and its paging-structure caches
    /// (after a large leaf was split).
    Domain(u16),
    /// The IOTLB entries for one 4 KiB page of one domain (after a leaf was
    /// cleared). Falls back to [`Invalidate::Domain`] without CAP.PSI.
    Page { domain: u16, addr: Iova },
}

/// Which wait ran out of budget, for the error and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// GSTS.RTPS after GCMD.SRTP.
    RootTable,
    /// GSTS.WBFS clearing after GCMD.WBF.
    WriteBuffer,
    /// CCMD.ICC clearing.
    ContextCache,
    /// IOTLB.IVT clearing.
    Iotlb,
    /// GSTS.TES after setting / clearing GCMD.TE.
    TranslationOn,
    TranslationOff,
    /// GSTS.QIES after setting / clearing GCMD.QIE.
    QueueOn,
    QueueOff,
    /// PMEN.PRS clearing after the protected memory regions are turned off.
    ProtectedMemory,
    /// IQH reaching IQT before queued invalidation is turned off.
    QueueDrain,
    /// The status write of an invalidation wait descriptor.
    QueueWait,
}

/// The invalidation queue: one page of 256 descriptors, and a page whose
/// first word the wait descriptors write their status to.
#[derive(Debug)]
struct Queue {
    page: Hpa,
    status: Hpa,
    /// The next free slot (what IQT says).
    tail: u32,
    /// The status value of the last wait descriptor submitted.
    token: u32,
}

/// What [`Unit::drain_faults`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultScan {
    pub records: Vec<FaultRecord>,
    /// FSTS.PFO was set: faults arrived while every record was full and
    /// were lost.
    pub overflow: bool,
}

/// One DMA remapping unit, driven through its registers.
pub struct Unit<R: VtdRegs> {
    regs: R,
    /// The register base from the DRHD (for logs and errors).
    pub base: Hpa,
    pub segment: u16,
    ver: Ver,
    cap: Cap,
    ecap: Ecap,
    spin_budget: u32,
    enabled: bool,
    queue: Option<Queue>,
}

impl<R: VtdRegs> Unit<R> {
    /// Wraps a unit's registers; reads VER, CAP and ECAP, changes nothing.
    /// `spin_budget` bounds every wait (in polls of the register or status
    /// word); the image picks it from the TSC rate, tests pick it small.
    pub fn new(regs: R, base: Hpa, segment: u16, spin_budget: u32) -> Self {
        let ver = Ver(regs.read32(off::VER));
        let cap = Cap(regs.read64(off::CAP));
        let ecap = Ecap(regs.read64(off::ECAP));
        Unit { regs, base, segment, ver, cap, ecap, spin_budget, enabled: false, queue: None }
    }

    pub fn regs(&self) -> &R {
        &self.regs
    }
    pub fn version(&self) -> Ver {
        self.ver
    }
    pub fn cap(&self) -> Cap {
        self.cap
    }
    pub fn ecap(&self) -> Ecap {
        self.ecap
    }
    pub fn gsts(&self) -> Gsts {
        Gsts::from_bits_retain(self.regs.read32(off::GSTS))
    }
    /// Whether we turned translation on (and have not turned it off).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
    /// Whether invalidations go through the queue.
    pub fn uses_queue(&self) -> bool {
        self.queue.is_some()
    }
    /// Whether the unit's page walks snoop the CPU caches (ECAP.C).
    pub fn coherent(&self) -> bool {
        self.ecap.coherent()
    }

    /// Refuses a unit that someone else already drives: translation,
    /// queued invalidation or interrupt remapping on means Linux (booted
    /// with `intel_iommu=on`) or firmware owns it, and taking it over would
    /// pull its tables out from under it.
    pub fn check_free(&self) -> Result<()> {
        let gsts = self.gsts();
        if gsts.in_use() && !self.enabled {
            return Err(Error::InUse { unit: self.base, gsts: gsts.bits() });
        }
        Ok(())
    }

    /// Whether this unit can walk tables built with `config`.
    pub fn check_config(&self, config: &TableConfig) -> Result<()> {
        if self.cap.sagaw() & config.levels.sagaw_bit() == 0 {
            return Err(Error::Unsupported("the unit cannot walk tables of this depth (CAP.SAGAW)"));
        }
        if self.cap.mgaw_bits() < config.address_bits {
            return Err(Error::Unsupported("the unit's address width is too narrow (CAP.MGAW)"));
        }
        if (config.pages_2m && !self.cap.pages_2m()) || (config.pages_1g && !self.cap.pages_1g()) {
            return Err(Error::Unsupported("the unit lacks the large pages the tables use (CAP.SLLPS)"));
        }
        Ok(())
    }

    /// Polls `done` up to the spin budget.
    fn wait(&self, what: Wait, mut done: impl FnMut(&R) -> bool) -> Result<()> {
        for _ in 0..=self.spin_budget {
            if done(&self.regs) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout { unit: self.base, wait: what })
    }

    /// Issues a one-shot command (SRTP, WBF), keeping the persistent
    /// enables as they are. See: VT-d spec, 10.4.4.
    fn command(&self, cmd: Gcmd) {
        self.regs.write32(off::GCMD, (self.gsts().persistent() | cmd).bits());
    }

    /// Turns a persistent enable (TE, QIE) on or off and waits until GSTS
    /// follows.
    fn set_enable(&self, cmd: Gcmd, on: bool, what: Wait) -> Result<()> {
        let mut v = self.gsts().persistent();
        v.set(cmd, on);
        self.regs.write32(off::GCMD, v.bits());
        let status = Gsts::from_bits_retain(cmd.bits());
        self.wait(what, |r| Gsts::from_bits_retain(r.read32(off::GSTS)).contains(status) == on)
    }

    /// Takes the unit over and turns translation on through `root`.
    ///
    /// The order is the spec's (10.4.4, TE): tables in memory, write buffer
    /// flushed, root pointer latched, context cache and IOTLB invalidated
    /// globally, then TE. Queued invalidation is set up afterwards when the
    /// unit has it. On failure the unit is turned off again (best effort).
    pub fn enable(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, root: Hpa, config: &TableConfig) -> Result<()> {
        if self.enabled {
            return Ok(());
        }
        self.check_free()?;
        self.check_config(config)?;
        let r = self.enable_inner(mem, alloc, root);
        if r.is_err() {
            let _ = self.disable(mem, alloc);
        }
        r
    }

    fn enable_inner(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc, root: Hpa) -> Result<()> {
        // Faults are polled, not signalled: the host's MSI set-up is not
        // ours to use.
        self.regs.write32(off::FECTL, Fectl::IM.bits());
        self.regs.write64(off::RTADDR, rtaddr_legacy(root.0));
        self.command(Gcmd::SRTP);
        self.wait(Wait::RootTable, |r| Gsts::from_bits_retain(r.read32(off::GSTS)).contains(Gsts::RTPS))?;
        self.flush_write_buffer()?;
        self.invalidate_registers(Invalidate::Global)?;
        self.set_enable(Gcmd::TE, true, Wait::TranslationOn)?;
        self.enabled = true;
        self.disable_protected_memory()?;
        if self.ecap.queued_invalidation() {
            self.enable_queue(mem, alloc)?;
        }
        Ok(())
    }

    /// Turns translation off, then queued invalidation, and frees the queue.
    /// Devices then reach memory untranslated, as before we took over.
    ///
    /// If the unit does not answer, the queue frames are kept (the unit may
    /// still read them) and the error is returned.
    pub fn disable(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Result<()> {
        if self.gsts().contains(Gsts::TES) {
            self.set_enable(Gcmd::TE, false, Wait::TranslationOff)?;
        }
        self.enabled = false;
        if self.gsts().contains(Gsts::QIES) {
            // The queue must be empty, and idle, before QIE is cleared
            // (10.4.4, QIE). A last wait descriptor proves it; QEMU also
            // refuses to turn the queue off unless the last descriptor it
            // ran was a wait, which a queue never used would not satisfy.
            if self.queue.is_some() {
                self.submit(mem, &[])?;
            }
            self.wait(Wait::QueueDrain, |r| queue_index(r.read64(off::IQH)) == queue_index(r.read64(off::IQT)))?;
            self.set_enable(Gcmd::QIE, false, Wait::QueueOff)?;
        }
        if let Some(q) = self.queue.take() {
            alloc.free_frame(q.page);
            alloc.free_frame(q.status);
        }
        Ok(())
    }

    /// Turns off the protected memory regions firmware may have left on: with
    /// translation on, the tables protect memory, and a stale region would
    /// block DMA the tables allow. As Linux does, only after TE is set, so
    /// that there is no window without protection. See: VT-d spec, 10.4.16
    /// (PMEN).
    fn disable_protected_memory(&self) -> Result<()> {
        if !self.cap.protected_memory() {
            return Ok(());
        }
        let pmen = Pmen::from_bits_retain(self.regs.read32(off::PMEN));
        if !pmen.intersects(Pmen::EPM | Pmen::PRS) {
            return Ok(());
        }
        self.regs.write32(off::PMEN, (pmen - Pmen::EPM - Pmen::PRS).bits());
        self.wait(Wait::ProtectedMemory, |r| !Pmen::from_bits_retain(r.read32(off::PMEN)).contains(Pmen::PRS))
    }

    /// Flushes the write buffer where CAP.RWBF asks for it, so that table
    /// writes reach memory before the unit re-reads them. See: VT-d spec,
    /// 6.8.
    fn flush_write_buffer(&self) -> Result<()> {
        if !self.cap.rwbf() {
            return Ok(());
        }
        self.command(Gcmd::WBF);
        self.wait(Wait::WriteBuffer, |r| !Gsts::from_bits_retain(r.read32(off::GSTS)).contains(Gsts::WBFS))
    }

    /// Invalidates what a table change left stale, through the queue when
    /// it is on (the spec forbids register-based invalidation then) and the
    /// registers otherwise. A unit that is not enabled caches nothing of
    /// ours and is skipped.
    pub fn invalidate(&mut self, mem: &impl PhysMem, what: Invalidate) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.flush_write_buffer()?;
        if self.queue.is_some() {
            self.invalidate_queued(mem, what)
        } else {
            self.invalidate_registers(what)
        }
    }

    /// Register-based invalidation. See: VT-d spec, 6.5.1 and 10.4.7-8.
    pub fn invalidate_registers(&self, what: Invalidate) -> Result<()> {
        match what {
            Invalidate::Global => {
                self.context_command(Granularity::Global, 0)?;
                self.iotlb_command(Granularity::Global, 0, None)
            }
            Invalidate::Domain(did) => self.iotlb_command(Granularity::Domain, did, None),
            Invalidate::Page { domain, addr } if self.cap.psi() => self.iotlb_command(Granularity::Fine, domain, Some(addr)),
            Invalidate::Page { domain, .. } => self.iotlb_command(Granularity::Domain, domain, None),
        }
    }

    fn context_command(&self, g: Granularity, did: u16) -> Result<()> {
        self.regs.write64(off::CCMD, Ccmd::request(g, did).0);
        self.wait(Wait::ContextCache, |r| !Ccmd(r.read64(off::CCMD)).busy())?;
        if Ccmd(self.regs.read64(off::CCMD)).actual() == 0 {
            return Err(Error::InvalidationRejected { unit: self.base, wait: Wait::ContextCache });
        }
        Ok(())
    }

    fn iotlb_command(&self, g: Granularity, did: u16, addr: Option<Iova>) -> Result<()> {
        let at = self.ecap.iotlb_offset();
        if let Some(a) = addr {
            // IVA: the page address; AM (5:0) = 0, one page; IH (6) = 0, so
            // paging-structure caches for it go too.
            self.regs.write64(at + off::IVA_IN_IOTLB, a.0 & !0xfff);
        }
        let reg = at + off::IOTLB_IN_IOTLB;
        self.regs.write64(reg, IotlbCmd::request(g, did, self.cap).0);
        self.wait(Wait::Iotlb, |r| !IotlbCmd(r.read64(reg)).busy())?;
        if IotlbCmd(self.regs.read64(reg)).actual() == 0 {
            return Err(Error::InvalidationRejected { unit: self.base, wait: Wait::Iotlb });
        }
        Ok(())
    }

    /// Sets up the invalidation queue and turns it on. See: VT-d spec,
    /// 6.5.2 and 10.4.22-24.
    fn enable_queue(&mut self, mem: &impl PhysMem, alloc: &mut impl FrameAlloc) -> Result<()> {
        let page = alloc.alloc_frame().ok_or(Error::NoFrames)?;
        let Some(status) = alloc.alloc_frame() else {
            alloc.free_frame(page);
            return Err(Error::NoFrames);
        };
        mem.zero_page(page);
        mem.zero_page(status);
        if !self.coherent() {
            self.regs.sync_for_device(page);
            self.regs.sync_for_device(status);
        }
        // Stale queue errors from whoever ran the unit before would stop it.
        self.regs.write32(off::FSTS, Fsts::QUEUE_ERRORS.bits());
        self.regs.write64(off::IQT, 0);
        self.regs.write64(off::IQA, iqa(page.0));
        self.queue = Some(Queue { page, status, tail: 0, token: 0 });
        self.set_enable(Gcmd::QIE, true, Wait::QueueOn)
    }

    /// Queued invalidation: the descriptors for `what`, then a wait
    /// descriptor whose status write says they all completed.
    pub fn invalidate_queued(&mut self, mem: &impl PhysMem, what: Invalidate) -> Result<()> {
        let mut drain = 0;
        if self.cap.drain_reads() {
            drain |= InvDesc::IOTLB_DR;
        }
        if self.cap.drain_writes() {
            drain |= InvDesc::IOTLB_DW;
        }
        let mut descs = [InvDesc::default(); 2];
        let n = match what {
            Invalidate::Global => {
                descs[0] = InvDesc::context_global();
                descs[1] = InvDesc::iotlb_global(drain);
                2
            }
            Invalidate::Page { domain, addr } if self.cap.psi() => {
                descs[0] = InvDesc::iotlb_page(domain, addr.0, drain);
                1
            }
            Invalidate::Domain(domain) | Invalidate::Page { domain, .. } => {
                descs[0] = InvDesc::iotlb_domain(domain, drain);
                1
            }
        };
        self.submit(mem, &descs[..n])
    }

    /// Queues `descs` and a wait descriptor, and polls its status word.
    fn submit(&mut self, mem: &impl PhysMem, descs: &[InvDesc]) -> Result<()> {
        let coherent = self.coherent();
        let (unit, budget) = (self.base, self.spin_budget);
        let q = self.queue.as_mut().ok_or(Error::Unsupported("queued invalidation is not on"))?;
        let head = queue_index(self.regs.read64(off::IQH)) % QUEUE_ENTRIES;
        let free = (head + QUEUE_ENTRIES - q.tail - 1) % QUEUE_ENTRIES;
        if (free as usize) < descs.len() + 1 {
            return Err(Error::QueueFull { unit });
        }
        q.token = q.token.wrapping_add(1).max(1);
        let wait = InvDesc::wait(q.status.0, q.token);
        for d in descs.iter().chain(core::iter::once(&wait)) {
            let at = Hpa(q.page.0 + q.tail as u64 * 16);
            mem.write_u64(at, d.lo);
            mem.write_u64(Hpa(at.0 + 8), d.hi);
            q.tail = (q.tail + 1) % QUEUE_ENTRIES;
        }
        if !coherent {
            self.regs.sync_for_device(q.page);
        }
        self.regs.write64(off::IQT, (q.tail as u64) << 4);
        let (status, token) = (q.status, q.token);
        for _ in 0..=budget {
            let mut b = [0u8; 4];
            mem.read(status, &mut b);
            if u32::from_le_bytes(b) == token {
                return Ok(());
            }
            let fsts = Fsts::from_bits_retain(self.regs.read32(off::FSTS));
            if fsts.intersects(Fsts::QUEUE_ERRORS) {
                return Err(Error::QueueError { unit, fsts: fsts.bits() });
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout { unit, wait: Wait::QueueWait })
    }

    /// Reads, decodes and clears every pending primary fault record, then
    /// the overflow bit. Bounded by the number of records (CAP.NFR).
    /// See: VT-d spec, 7.2.1 (primary fault logging) and 10.4.14.
    pub fn drain_faults(&mut self) -> FaultScan {
        let fsts = Fsts::from_bits_retain(self.regs.read32(off::FSTS));
        let mut scan = FaultScan::default();
        if fsts.contains(Fsts::PPF) {
            let n = self.cap.fault_records();
            let fro = self.cap.fault_record_offset();
            let mut i = fsts.fault_record_index();
            if i >= n {
                i = 0;
            }
            for _ in 0..n {
                let at = fro + i * off::FRCD_LEN;
                // F lives in the high half; the rest is valid only when set.
                let hi = self.regs.read64(at + 8);
                let Some(rec) = FaultRecord::decode(i, self.regs.read64(at), hi) else { break };
                scan.records.push(rec);
                self.regs.write32(at + 12, FaultRecord::F_DWORD);
                i = (i + 1) % n;
            }
        }
        if fsts.contains(Fsts::PFO) {
            scan.overflow = true;
            self.regs.write32(off::FSTS, Fsts::PFO.bits());
        }
        scan
    }
}
