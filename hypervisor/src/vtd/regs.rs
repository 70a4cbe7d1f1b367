//! The remapping unit's register file: offsets, bit layouts and the
//! [`VtdRegs`] trait that the portable core reads and writes it through.
//!
//! See: VT-d spec, chapter 10 (Register Descriptions), section 10.4 for
//! each register; section numbers follow revision 3.x of the spec. The
//! offsets and bit positions were checked against the Linux kernel's
//! `drivers/iommu/intel/iommu.h` and QEMU's `hw/i386/intel_iommu_internal.h`.

use bitflags::bitflags;

/// Access to one remapping unit's registers (one 4 KiB page, or more when
/// the DRHD's size field says so).
///
/// The image implements it with volatile loads and stores on the unit's
/// mapped register page; the tests implement it with a mock register file.
/// 64-bit registers are accessed with one 64-bit access, as the spec allows
/// on 64-bit hosts (section 10.2).
pub trait VtdRegs {
    fn read32(&self, off: u32) -> u32;
    fn read64(&self, off: u32) -> u64;
    fn write32(&self, off: u32, v: u32);
    fn write64(&self, off: u32, v: u64);

    /// Makes a page of paging structures that the CPU wrote visible to a
    /// unit whose page walks do not snoop the CPU caches (ECAP.C = 0).
    ///
    /// It is called for every table or queue page written, before the unit
    /// is told to look at it, and only for such units. The image implements
    /// it with CLFLUSH over the page (an arch hook, so it lives there); the
    /// default does nothing, which is right for coherent units.
    fn sync_for_device(&self, _page: crate::addr::Hpa) {}
}

/// Register offsets. See: VT-d spec, 10.4 (the register summary table).
pub mod off {
    /// Version (32 bits): major in 7:4, minor in 3:0.
    pub const VER: u32 = 0x00;
    /// Capability (64 bits).
    pub const CAP: u32 = 0x08;
    /// Extended capability (64 bits).
    pub const ECAP: u32 = 0x10;
    /// Global command (32 bits, write-only).
    pub const GCMD: u32 = 0x18;
    /// Global status (32 bits, read-only).
    pub const GSTS: u32 = 0x1c;
    /// Root table address (64 bits).
    pub const RTADDR: u32 = 0x20;
    /// Context command (64 bits).
    pub const CCMD: u32 = 0x28;
    /// Fault status (32 bits).
    pub const FSTS: u32 = 0x34;
    /// Fault event control (32 bits).
    pub const FECTL: u32 = 0x38;
    /// Fault event interrupt data / address / upper address (32 bits each).
    pub const FEDATA: u32 = 0x3c;
    pub const FEADDR: u32 = 0x40;
    pub const FEUADDR: u32 = 0x44;
    /// Protected memory enable (32 bits).
    pub const PMEN: u32 = 0x64;
    /// Invalidation queue head / tail / address (64 bits each).
    pub const IQH: u32 = 0x80;
    pub const IQT: u32 = 0x88;
    pub const IQA: u32 = 0x90;
    /// Invalidation completion status (32 bits).
    pub const ICS: u32 = 0x9c;
    /// Invalidation event control (32 bits).
    pub const IECTL: u32 = 0xa0;
    /// Invalidation queue error record (64 bits).
    pub const IQERCD: u32 = 0xb0;
    /// Relative to ECAP.IRO: the invalidate-address register (64 bits).
    pub const IVA_IN_IOTLB: u32 = 0x0;
    /// Relative to ECAP.IRO: the IOTLB invalidate register (64 bits).
    pub const IOTLB_IN_IOTLB: u32 = 0x8;
    /// Size of one fault recording register (128 bits), at CAP.FRO.
    pub const FRCD_LEN: u32 = 16;
}

/// The version register. See: VT-d spec, 10.4.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ver(pub u32);

impl Ver {
    pub const fn major(self) -> u32 {
        (self.0 >> 4) & 0xf
    }
    pub const fn minor(self) -> u32 {
        self.0 & 0xf
    }
}

/// The capability register. See: VT-d spec, 10.4.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// ND, 2:0: the unit supports `2^(4 + 2*ND)` domain ids.
    pub const fn domains(self) -> u32 {
        1 << (4 + 2 * (self.0 & 7) as u32)
    }
    /// RWBF, bit 4: the write buffer must be flushed after table changes.
    pub const fn rwbf(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// PLMR / PHMR, bits 5 / 6: protected low / high memory regions, which
    /// firmware (or tboot) may have turned on to block DMA during boot.
    pub const fn protected_memory(self) -> bool {
        self.0 & (3 << 5) != 0
    }
    /// CM, bit 7: caching mode; not-present entries may be cached too, so
    /// not-present-to-present changes need an invalidation as well.
    pub const fn caching_mode(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// SAGAW, 12:8: supported adjusted guest address widths. Bit 1 is a
    /// 39-bit, 3-level table; bit 2 a 48-bit, 4-level one; bit 3 57-bit.
    pub const fn sagaw(self) -> u32 {
        ((self.0 >> 8) & 0x1f) as u32
    }
    /// MGAW, 21:16, plus one: the widest input address the unit translates.
    pub const fn mgaw_bits(self) -> u32 {
        ((self.0 >> 16) & 0x3f) as u32 + 1
    }
    /// FRO, 33:24: byte offset of the first fault recording register (the
    /// field counts 16-byte units).
    pub const fn fault_record_offset(self) -> u32 {
        (((self.0 >> 24) & 0x3ff) as u32) * 16
    }
    /// SLLPS bit 34: 2 MiB second-level pages.
    pub const fn pages_2m(self) -> bool {
        self.0 & (1 << 34) != 0
    }
    /// SLLPS bit 35: 1 GiB second-level pages.
    pub const fn pages_1g(self) -> bool {
        self.0 & (1 << 35) != 0
    }
    /// PSI, bit 39: page-selective IOTLB invalidation.
    pub const fn psi(self) -> bool {
        self.0 & (1 << 39) != 0
    }
    /// NFR, 47:40, plus one: the number of fault recording registers.
    pub const fn fault_records(self) -> u32 {
        ((self.0 >> 40) & 0xff) as u32 + 1
    }
    /// MAMV, 53:48: the largest address mask for page-selective
    /// invalidation.
    pub const fn mamv(self) -> u32 {
        ((self.0 >> 48) & 0x3f) as u32
    }
    /// DWD, bit 54: write draining on IOTLB invalidation.
    pub const fn drain_writes(self) -> bool {
        self.0 & (1 << 54) != 0
    }
    /// DRD, bit 55: read draining on IOTLB invalidation.
    pub const fn drain_reads(self) -> bool {
        self.0 & (1 << 55) != 0
    }
}

/// The extended capability register. See: VT-d spec, 10.4.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ecap(pub u64);

impl Ecap {
    /// C, bit 0: page walks snoop the CPU caches. When clear, every table
    /// write must be flushed from the caches before the unit sees it.
    pub const fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    /// QI, bit 1: queued invalidation.
    pub const fn queued_invalidation(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// DT, bit 2: device-TLBs.
    pub const fn device_tlb(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// IR, bit 3: interrupt remapping.
    pub const fn interrupt_remapping(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// PT, bit 6: pass-through translation type.
    pub const fn pass_through(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// SC, bit 7: snoop control.
    pub const fn snoop_control(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// IRO, 17:8: byte offset of the IOTLB registers (the field counts
    /// 16-byte units).
    pub const fn iotlb_offset(self) -> u32 {
        (((self.0 >> 8) & 0x3ff) as u32) * 16
    }
}

bitflags! {
    /// The global command register. See: VT-d spec, 10.4.4.
    ///
    /// Software writes one command at a time, carrying over the persistent
    /// enables from GSTS (see [`Gsts::persistent`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Gcmd: u32 {
        /// Compatibility format interrupts.
        const CFI = 1 << 23;
        /// Set the interrupt remapping table pointer.
        const SIRTP = 1 << 24;
        /// Interrupt remapping enable.
        const IRE = 1 << 25;
        /// Queued invalidation enable.
        const QIE = 1 << 26;
        /// Write buffer flush.
        const WBF = 1 << 27;
        /// Enable advanced fault logging.
        const EAFL = 1 << 28;
        /// Set fault log.
        const SFL = 1 << 29;
        /// Set the root table pointer from RTADDR.
        const SRTP = 1 << 30;
        /// Translation enable.
        const TE = 1 << 31;
    }
}

bitflags! {
    /// The global status register. See: VT-d spec, 10.4.5.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Gsts: u32 {
        const CFIS = 1 << 23;
        const IRTPS = 1 << 24;
        /// Interrupt remapping is on.
        const IRES = 1 << 25;
        /// Queued invalidation is on.
        const QIES = 1 << 26;
        /// A write buffer flush is still running (clears when done).
        const WBFS = 1 << 27;
        const AFLS = 1 << 28;
        const FLS = 1 << 29;
        /// The root table pointer has been latched.
        const RTPS = 1 << 30;
        /// DMA remapping is on.
        const TES = 1 << 31;
    }
}

impl Gsts {
    /// The bits to carry into a GCMD write so that it changes nothing but
    /// the one command: GSTS with the one-shot status bits (RTPS, FLS, WBFS,
    /// IRTPS) masked off. See: VT-d spec, 10.4.4 (the 0x96FF_FFFF mask).
    pub const fn persistent(self) -> Gcmd {
        Gcmd::from_bits_retain(self.bits() & 0x96ff_ffff)
    }
    /// Whether someone (firmware or an OS) already drives this unit.
    pub const fn in_use(self) -> bool {
        self.intersects(Gsts::TES.union(Gsts::QIES).union(Gsts::IRES))
    }
}

bitflags! {
    /// The fault status register. See: VT-d spec, 10.4.9.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Fsts: u32 {
        /// Primary fault overflow: a fault arrived with every record full
        /// (write 1 to clear).
        const PFO = 1 << 0;
        /// Primary pending fault: some fault record has F set (read-only).
        const PPF = 1 << 1;
        const AFO = 1 << 2;
        const APF = 1 << 3;
        /// Invalidation queue error (write 1 to clear).
        const IQE = 1 << 4;
        /// Invalidation completion error (write 1 to clear).
        const ICE = 1 << 5;
        /// Invalidation time-out error (write 1 to clear).
        const ITE = 1 << 6;
    }
}

impl Fsts {
    /// FRI, 15:8: the first fault record to look at when PPF is set.
    pub const fn fault_record_index(self) -> u32 {
        (self.bits() >> 8) & 0xff
    }
    /// The queued-invalidation error bits.
    pub const QUEUE_ERRORS: Fsts = Fsts::IQE.union(Fsts::ICE).union(Fsts::ITE);
}

bitflags! {
    /// The fault event control register. See: VT-d spec, 10.4.10.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Fectl: u32 {
        const IP = 1 << 30;
        /// Interrupt mask: no fault event interrupts. The hypervisor polls
        /// the fault records instead, since the host's interrupt set-up is
        /// not its own.
        const IM = 1 << 31;
    }
}

bitflags! {
    /// The protected memory enable register. See: VT-d spec, 10.4.16.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Pmen: u32 {
        /// Protected region status: the regions still block DMA.
        const PRS = 1 << 0;
        /// Enable protected memory.
        const EPM = 1 << 31;
    }
}

/// Invalidation granularities, as the CCMD, IOTLB and descriptor fields
/// number them (1 global, 2 domain, 3 device or page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Granularity {
    Global = 1,
    Domain = 2,
    /// Device (context cache) or page (IOTLB).
    Fine = 3,
}

/// The context command register. See: VT-d spec, 10.4.7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ccmd(pub u64);

impl Ccmd {
    /// ICC, bit 63: set to start, hardware clears it when done.
    pub const ICC: u64 = 1 << 63;

    /// A request: CIRG in 62:61, DID in 15:0.
    pub const fn request(g: Granularity, did: u16) -> Ccmd {
        Ccmd(Self::ICC | ((g as u64) << 61) | did as u64)
    }
    pub const fn busy(self) -> bool {
        self.0 & Self::ICC != 0
    }
    /// CAIG, 60:59: what the unit actually did; 0 means it refused.
    pub const fn actual(self) -> u64 {
        (self.0 >> 59) & 3
    }
}

/// The IOTLB invalidate register (at ECAP.IRO + 8).
/// See: VT-d spec, 10.4.8.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbCmd(pub u64);

impl IotlbCmd {
    /// IVT, bit 63: set to start, hardware clears it when done.
    pub const IVT: u64 = 1 << 63;
    /// DR, bit 49 / DW, bit 48: drain reads / writes first.
    pub const DR: u64 = 1 << 49;
    pub const DW: u64 = 1 << 48;

    /// A request: IIRG in 61:60, DID in 47:32, draining as the unit allows.
    pub fn request(g: Granularity, did: u16, cap: Cap) -> IotlbCmd {
        let mut v = Self::IVT | ((g as u64) << 60) | ((did as u64) << 32);
        if cap.drain_reads() {
            v |= Self::DR;
        }
        if cap.drain_writes() {
            v |= Self::DW;
        }
        IotlbCmd(v)
    }
    pub const fn busy(self) -> bool {
        self.0 & Self::IVT != 0
    }
    /// IAIG, 58:57: what the unit actually did; 0 means it refused.
    pub const fn actual(self) -> u64 {
        (self.0 >> 57) & 3
    }
}

/// The invalidation queue address register. See: VT-d spec, 10.4.24.
pub const fn iqa(queue: u64) -> u64 {
    // QS (2:0) = 0: one 4 KiB page of 256 descriptors; DW (bit 11) = 0:
    // 128-bit descriptors, as legacy mode uses.
    queue & !0xfff
}

/// Descriptors in the one-page invalidation queue.
pub const QUEUE_ENTRIES: u32 = 256;

/// IQH/IQT hold the descriptor index in bits 18:4 (128-bit descriptors).
pub const fn queue_index(reg: u64) -> u32 {
    ((reg >> 4) & 0x7fff) as u32
}

/// RTADDR: the root table address with TTM (11:10) = 00, legacy mode.
/// See: VT-d spec, 10.4.6.
pub const fn rtaddr_legacy(root: u64) -> u64 {
    root & !0xfff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_fields() {
        // QEMU 7.2's defaults: 39-bit 3-level only, MGAW 39, FRO 0x220,
        // one fault record, 2M/1G pages, PSI, MAMV 18; IOTLB at 0xf0, QI.
        let cap = Cap((2 << 8) | (38 << 16) | (0x22 << 24) | (3 << 34) | (1 << 39) | (18 << 48) | 2);
        assert_eq!(cap.sagaw(), 2);
        assert_eq!(cap.mgaw_bits(), 39);
        assert_eq!(cap.fault_record_offset(), 0x220);
        assert_eq!(cap.fault_records(), 1);
        assert!(cap.pages_2m() && cap.pages_1g() && cap.psi());
        assert_eq!(cap.mamv(), 18);
        assert_eq!(cap.domains(), 256);
        assert!(!cap.caching_mode() && !cap.rwbf());
        let ecap = Ecap((0xf << 8) | 2);
        assert_eq!(ecap.iotlb_offset(), 0xf0);
        assert!(ecap.queued_invalidation() && !ecap.coherent());
        assert_eq!(Ver(0x10).major(), 1);
    }

    #[test]
    fn gcmd_carries_only_persistent_bits() {
        let s = Gsts::TES | Gsts::RTPS | Gsts::QIES | Gsts::WBFS | Gsts::IRTPS | Gsts::FLS;
        assert_eq!(s.persistent(), Gcmd::TE | Gcmd::QIE);
        assert!(Gsts::IRES.in_use() && !Gsts::RTPS.in_use());
    }

    #[test]
    fn command_encodings() {
        let c = Ccmd::request(Granularity::Global, 0);
        assert_eq!(c.0, (1 << 63) | (1 << 61));
        assert_eq!(Ccmd(c.0 & !Ccmd::ICC | (1 << 59)).actual(), 1);
        let cap = Cap((1 << 54) | (1 << 55));
        let t = IotlbCmd::request(Granularity::Fine, 1, cap);
        assert_eq!(t.0, (1 << 63) | (3 << 60) | (1 << 32) | (1 << 49) | (1 << 48));
        assert_eq!(IotlbCmd::request(Granularity::Global, 0, Cap(0)).0, (1 << 63) | (1 << 60));
        assert_eq!(queue_index(0x30), 3);
        assert_eq!(iqa(0x1234_5000), 0x1234_5000);
        assert_eq!(Fsts::from_bits_retain(0x0502).fault_record_index(), 5);
    }
}
