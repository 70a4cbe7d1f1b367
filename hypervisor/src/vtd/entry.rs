//! VT-d in-memory formats: root and context entries (legacy mode),
//! second-level paging entries, invalidation descriptors and fault records.
//!
//! See: VT-d spec, chapter 9 (Translation Structure Formats) and 6.5.2
//! (Queued Invalidation); section numbers follow revision 3.x.

use bitflags::bitflags;
use core::fmt;

/// Address bits of every table pointer and leaf (51:12). Bits above the
/// unit's host address width must be zero; the builder checks the widest
/// address it maps against the tables' width instead of masking here.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A root entry: one per bus, pointing to that bus's context table.
/// See: VT-d spec, 9.1.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[repr(C)]
pub struct RootEntry {
    pub lo: u64,
    /// Reserved (zero) in legacy mode.
    pub hi: u64,
}
const _: () = assert!(core::mem::size_of::<RootEntry>() == 16);

impl RootEntry {
    /// P, bit 0.
    const PRESENT: u64 = 1;

    pub const fn new(context_table: u64) -> Self {
        RootEntry { lo: (context_table & ADDR_MASK) | Self::PRESENT, hi: 0 }
    }
    pub const fn present(self) -> bool {
        self.lo & Self::PRESENT != 0
    }
    pub const fn context_table(self) -> u64 {
        self.lo & ADDR_MASK
    }
}

/// How a context entry translates requests (TT, 3:2). See: VT-d spec, 9.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum TranslationType {
    /// Untranslated requests walk the second-level tables; translated
    /// requests and translation requests (ATS) are blocked. What we want:
    /// no device can bypass the tables with ATS.
    Untranslated = 0,
    /// As above, and device-TLBs (ATS) allowed.
    WithDeviceTlb = 1,
    /// Untranslated requests pass through unmapped (ECAP.PT).
    PassThrough = 2,
}

/// The adjusted guest address width of a second-level hierarchy, as the
/// context entry's AW field (2:0) and CAP.SAGAW encode it.
/// See: VT-d spec, 9.3 and 10.4.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// 39-bit, 3-level tables (QEMU's default).
    Three,
    /// 48-bit, 4-level tables.
    Four,
}

impl Levels {
    pub const fn count(self) -> u32 {
        match self {
            Levels::Three => 3,
            Levels::Four => 4,
        }
    }
    pub const fn address_bits(self) -> u32 {
        12 + 9 * self.count()
    }
    /// The context entry's AW encoding (1 = 39 bits, 2 = 48 bits).
    pub const fn aw(self) -> u64 {
        self.count() as u64 - 2
    }
    /// The CAP.SAGAW bit that says a unit walks such tables.
    pub const fn sagaw_bit(self) -> u32 {
        1 << self.aw()
    }
}

/// A legacy-mode context entry: one per device (bus, device, function).
/// See: VT-d spec, 9.3.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[repr(C)]
pub struct ContextEntry {
    pub lo: u64,
    pub hi: u64,
}
const _: () = assert!(core::mem::size_of::<ContextEntry>() == 16);

impl ContextEntry {
    /// P, bit 0 of the low half.
    const PRESENT: u64 = 1;
    /// FPD, bit 1: fault processing disable. We leave it clear so that
    /// every blocked DMA is recorded.
    pub const FPD: u64 = 1 << 1;

    /// A present entry that translates through the second-level tables at
    /// `slptptr` in domain `did`.
    pub const fn new(slptptr: u64, levels: Levels, did: u16, tt: TranslationType) -> Self {
        ContextEntry { lo: (slptptr & ADDR_MASK) | ((tt as u64) << 2) | Self::PRESENT, hi: levels.aw() | ((did as u64) << 8) }
    }
    pub const fn present(self) -> bool {
        self.lo & Self::PRESENT != 0
    }
    pub const fn slptptr(self) -> u64 {
        self.lo & ADDR_MASK
    }
    pub const fn translation_type(self) -> u64 {
        (self.lo >> 2) & 3
    }
    pub const fn aw(self) -> u64 {
        self.hi & 7
    }
    pub const fn domain(self) -> u16 {
        (self.hi >> 8) as u16
    }
}

bitflags! {
    /// Bits of a second-level paging entry. See: VT-d spec, 9.8.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SlFlags: u64 {
        /// Reads allowed (at every level, ANDed along the walk).
        const READ = 1 << 0;
        /// Writes allowed.
        const WRITE = 1 << 1;
        /// Execute (only with ECAP.SLEE/ERS; never set here).
        const EXEC = 1 << 2;
        /// PS: a leaf at the PDPT (1 GiB) or PD (2 MiB) level.
        const PAGE_SIZE = 1 << 7;
        /// SNP: snoop, only with ECAP.SC (never set here).
        const SNOOP = 1 << 11;
    }
}

impl SlFlags {
    pub const RW: SlFlags = SlFlags::READ.union(SlFlags::WRITE);
}

/// A second-level paging entry at any level.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct SlEntry(pub u64);
const _: () = assert!(core::mem::size_of::<SlEntry>() == 8);

impl SlEntry {
    pub const fn empty() -> Self {
        SlEntry(0)
    }
    /// A pointer to the next-level table: read and write, the leaves decide.
    pub const fn table(pa: u64) -> Self {
        SlEntry((pa & ADDR_MASK) | SlFlags::RW.bits())
    }
    /// A leaf; `large` for 2 MiB / 1 GiB leaves.
    pub const fn leaf(pa: u64, perms: SlFlags, large: bool) -> Self {
        let ps = if large { SlFlags::PAGE_SIZE.bits() } else { 0 };
        SlEntry((pa & ADDR_MASK) | perms.bits() | ps)
    }
    /// Present when readable or writable. See: VT-d spec, 3.7 (a second-level
    /// entry with R and W clear is not present).
    pub const fn present(self) -> bool {
        self.0 & SlFlags::RW.bits() != 0
    }
    pub const fn addr(self) -> u64 {
        self.0 & ADDR_MASK
    }
    pub const fn flags(self) -> SlFlags {
        SlFlags::from_bits_truncate(self.0)
    }
    pub const fn is_large(self) -> bool {
        self.0 & SlFlags::PAGE_SIZE.bits() != 0
    }
    pub const fn writable(self) -> bool {
        self.0 & SlFlags::WRITE.bits() != 0
    }
}

// Second-level entries for the radix engine. See: VT-d spec, 9.8: an
// entry with R and W clear is not present (3.7); PS (bit 7) makes a PDPE or
// a PDE a leaf; a table entry grants R and W so the leaves decide.
crate::radix::entry_format!(SlEntry: present SlFlags::RW.bits(), address ADDR_MASK,
    large SlFlags::PAGE_SIZE.bits(), levels crate::radix::PDPT_AND_PD, table SlFlags::RW.bits());

impl fmt::Debug for SlEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlEntry({:#x} {:?})", self.addr(), self.flags())
    }
}

/// A 128-bit invalidation descriptor. See: VT-d spec, 6.5.2.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[repr(C)]
pub struct InvDesc {
    pub lo: u64,
    pub hi: u64,
}
const _: () = assert!(core::mem::size_of::<InvDesc>() == 16);

/// Descriptor types (3:0 of the low half).
pub mod desc_type {
    /// Context-cache invalidate. See: VT-d spec, 6.5.2.1.
    pub const CONTEXT: u64 = 1;
    /// IOTLB invalidate. See: VT-d spec, 6.5.2.3.
    pub const IOTLB: u64 = 2;
    /// Invalidation wait. See: VT-d spec, 6.5.2.8.
    pub const WAIT: u64 = 5;
}

impl InvDesc {
    /// Wait: IF (bit 4) interrupt, SW (bit 5) status write, FN (bit 6)
    /// fence.
    pub const WAIT_IF: u64 = 1 << 4;
    pub const WAIT_SW: u64 = 1 << 5;
    pub const WAIT_FN: u64 = 1 << 6;
    /// IOTLB: DW (bit 6) / DR (bit 7) drain writes / reads.
    pub const IOTLB_DW: u64 = 1 << 6;
    pub const IOTLB_DR: u64 = 1 << 7;

    pub const fn kind(self) -> u64 {
        self.lo & 0xf
    }
    /// The granularity field (5:4) of a context-cache or IOTLB descriptor.
    pub const fn granularity(self) -> u64 {
        (self.lo >> 4) & 3
    }
    /// The domain id field (31:16) of a context-cache or IOTLB descriptor.
    pub const fn domain(self) -> u16 {
        (self.lo >> 16) as u16
    }

    /// Global context-cache invalidation: G (5:4) = 1.
    pub const fn context_global() -> Self {
        InvDesc { lo: desc_type::CONTEXT | (1 << 4), hi: 0 }
    }
    /// Global IOTLB invalidation: G (5:4) = 1.
    pub const fn iotlb_global(drain: u64) -> Self {
        InvDesc { lo: desc_type::IOTLB | (1 << 4) | drain, hi: 0 }
    }
    /// Domain-selective IOTLB invalidation: G = 2, DID in 31:16.
    pub const fn iotlb_domain(did: u16, drain: u64) -> Self {
        InvDesc { lo: desc_type::IOTLB | (2 << 4) | ((did as u64) << 16) | drain, hi: 0 }
    }
    /// Page-selective IOTLB invalidation: G = 3, DID in 31:16; the high
    /// half holds the address (63:12), IH (bit 6, left clear so that
    /// paging-structure caches go too) and AM (5:0, here 0: one page).
    pub const fn iotlb_page(did: u16, addr: u64, drain: u64) -> Self {
        InvDesc { lo: desc_type::IOTLB | (3 << 4) | ((did as u64) << 16) | drain, hi: addr & !0xfff }
    }
    /// An invalidation wait that writes `data` to the 4-byte aligned
    /// `status` address once every earlier descriptor has completed.
    pub const fn wait(status: u64, data: u32) -> Self {
        InvDesc { lo: desc_type::WAIT | Self::WAIT_SW | Self::WAIT_FN | ((data as u64) << 32), hi: status & !3 }
    }
}

/// A PCI requester id: bus in 15:8, device in 7:3, function in 2:0.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u16);

impl SourceId {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        SourceId(((bus as u16) << 8) | (((device & 0x1f) as u16) << 3) | (function & 7) as u16)
    }
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// Device and function as one byte (the context table index).
    pub const fn devfn(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus(), self.device(), self.function())
    }
}

impl fmt::Debug for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceId({self})")
    }
}

/// What kind of request faulted: T1 (bit 126) and T2 (bit 92) of the record.
/// Before revision 3.0 only T1 existed (0 write, 1 read); T2 adds page
/// requests and atomics. See: VT-d spec, 10.4.14.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Write,
    Read,
    PageRequest,
    AtomicOp,
}

/// A fault reason code (FR). See: VT-d spec, 7.1.3 (the table of
/// non-recoverable fault conditions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultReason(pub u8);

impl FaultReason {
    /// Why the unit blocked the request, in words.
    pub const fn describe(self) -> &'static str {
        match self.0 {
            0x01 => "root entry not present",
            0x02 => "context entry not present",
            0x03 => "invalid context entry",
            0x04 => "address beyond the address width",
            0x05 => "write to a page that is not writable",
            0x06 => "read from a page that is not readable",
            0x07 => "cannot access a second-level paging entry",
            0x08 => "cannot access the root table",
            0x09 => "cannot access the context table",
            0x0a => "reserved bit set in a root entry",
            0x0b => "reserved bit set in a context entry",
            0x0c => "reserved bit set in a second-level paging entry",
            0x0d => "request blocked by the context entry's translation type",
            0x20..=0x26 => "interrupt remapping fault",
            _ => "unknown fault reason",
        }
    }
    /// Whether the request reached a leaf that left its page out: what a
    /// device touching a hidden page (hypervisor or guest memory) produces.
    pub const fn is_blocked_page(self) -> bool {
        matches!(self.0, 0x05 | 0x06)
    }
}

/// One decoded primary fault record. See: VT-d spec, 10.4.14.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Which record register held it (0..NFR).
    pub index: u32,
    pub source: SourceId,
    /// The faulting DMA address, page-aligned (FI, 63:12).
    pub addr: u64,
    pub reason: FaultReason,
    pub kind: RequestKind,
}

impl FaultRecord {
    /// F, bit 127: the record holds a fault (write 1 to clear).
    pub const F: u64 = 1 << 63;
    /// The 32-bit view of F, for the clearing write to the record's last
    /// dword (offset 12), as Linux does.
    pub const F_DWORD: u32 = 1 << 31;

    /// Decodes a record from its low and high 64 bits; `None` if F is clear.
    pub fn decode(index: u32, lo: u64, hi: u64) -> Option<FaultRecord> {
        if hi & Self::F == 0 {
            return None;
        }
        let t1 = hi & (1 << 62) != 0;
        let t2 = hi & (1 << 28) != 0;
        let kind = match (t1, t2) {
            (false, false) => RequestKind::Write,
            (true, false) => RequestKind::Read,
            (false, true) => RequestKind::PageRequest,
            (true, true) => RequestKind::AtomicOp,
        };
        Some(FaultRecord { index, source: SourceId(hi as u16), addr: lo & !0xfff, reason: FaultReason((hi >> 32) as u8), kind })
    }

    /// The inverse of [`FaultRecord::decode`], for the mock register file.
    pub fn encode(&self) -> (u64, u64) {
        let (t1, t2) = match self.kind {
            RequestKind::Write => (0, 0),
            RequestKind::Read => (1, 0),
            RequestKind::PageRequest => (0, 1),
            RequestKind::AtomicOp => (1, 1),
        };
        let hi = Self::F | (t1 << 62) | ((self.reason.0 as u64) << 32) | (t2 << 28) | self.source.0 as u64;
        (self.addr & !0xfff, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_context_entries() {
        let r = RootEntry::new(0x1234_5000);
        assert_eq!((r.lo, r.hi), (0x1234_5001, 0));
        assert!(r.present() && r.context_table() == 0x1234_5000);
        let c = ContextEntry::new(0xabc_d000, Levels::Four, 1, TranslationType::Untranslated);
        assert_eq!(c.lo, 0xabc_d001);
        assert_eq!(c.hi, 2 | (1 << 8));
        assert!(c.present() && c.slptptr() == 0xabc_d000 && c.domain() == 1 && c.aw() == 2);
        assert_eq!(c.lo & ContextEntry::FPD, 0, "faults must be recorded");
        let c3 = ContextEntry::new(0x1000, Levels::Three, 7, TranslationType::PassThrough);
        assert_eq!((c3.aw(), c3.domain(), c3.translation_type()), (1, 7, 2));
    }

    #[test]
    fn levels() {
        assert_eq!((Levels::Three.address_bits(), Levels::Three.sagaw_bit()), (39, 2));
        assert_eq!((Levels::Four.address_bits(), Levels::Four.sagaw_bit()), (48, 4));
    }

    #[test]
    fn second_level_entries() {
        let l = SlEntry::leaf(0x4000_0000, SlFlags::RW, true);
        assert_eq!(l.0, 0x4000_0000 | 3 | (1 << 7));
        assert!(l.present() && l.is_large() && l.writable());
        let t = SlEntry::table(0x5000);
        assert_eq!(t.0, 0x5003);
        assert!(!t.is_large());
        let ro = SlEntry::leaf(0x6000, SlFlags::READ, false);
        assert!(ro.present() && !ro.writable());
        assert!(!SlEntry::empty().present());
    }

    #[test]
    fn descriptors() {
        assert_eq!(InvDesc::context_global(), InvDesc { lo: 0x11, hi: 0 });
        assert_eq!(InvDesc::iotlb_global(0), InvDesc { lo: 0x12, hi: 0 });
        let d = InvDesc::iotlb_page(1, 0x1234_5678, InvDesc::IOTLB_DR | InvDesc::IOTLB_DW);
        assert_eq!(d.lo, 0x32 | (1 << 16) | 0xc0);
        assert_eq!(d.hi, 0x1234_5000);
        assert_eq!((d.kind(), d.granularity(), d.domain()), (2, 3, 1));
        let w = InvDesc::wait(0x9000_0004, 0xdead_beef);
        assert_eq!(w.lo, 5 | (1 << 5) | (1 << 6) | (0xdead_beef << 32));
        assert_eq!(w.hi, 0x9000_0004);
        assert_eq!(InvDesc::iotlb_domain(3, 0).lo, 0x22 | (3 << 16));
    }

    #[test]
    fn source_ids() {
        let s = SourceId::new(0, 3, 0);
        assert_eq!(s.0, 0x18);
        assert_eq!(format!("{s}"), "00:03.0");
        let s = SourceId(0xff_fa);
        assert_eq!((s.bus(), s.device(), s.function(), s.devfn()), (0xff, 0x1f, 2, 0xfa));
    }

    #[test]
    fn fault_records() {
        // A read of 0x1234_5000 by 00:03.0 that hit a non-readable page.
        let hi = FaultRecord::F | (1 << 62) | (6 << 32) | 0x18;
        let r = FaultRecord::decode(0, 0x1234_5abc, hi).unwrap();
        assert_eq!(r.source, SourceId::new(0, 3, 0));
        assert_eq!(r.addr, 0x1234_5000);
        assert_eq!(r.reason, FaultReason(6));
        assert_eq!(r.kind, RequestKind::Read);
        assert!(r.reason.is_blocked_page());
        assert_eq!(r.reason.describe(), "read from a page that is not readable");
        assert!(FaultRecord::decode(0, 0x1000, hi & !FaultRecord::F).is_none());
        let w = FaultRecord { index: 2, source: SourceId(0x100), addr: 0x7000, reason: FaultReason(5), kind: RequestKind::Write };
        let (lo, hi) = w.encode();
        assert_eq!(FaultRecord::decode(2, lo, hi), Some(w));
        for kind in [RequestKind::PageRequest, RequestKind::AtomicOp] {
            let r = FaultRecord { kind, ..w };
            let (lo, hi) = r.encode();
            assert_eq!(FaultRecord::decode(2, lo, hi).unwrap().kind, kind);
        }
        assert_eq!(FaultReason(2).describe(), "context entry not present");
        assert_eq!(FaultReason(0x99).describe(), "unknown fault reason");
    }
}
