//! The ACPI DMAR table: which remapping units exist, where their registers
//! are, which devices they cover, and which memory firmware reserved for
//! devices (RMRRs).
//!
//! The bytes come from firmware, so every length and count is checked before
//! it is used: a malformed table gives an [`Error`], never a panic or an
//! endless loop. See: VT-d spec, chapter 8 (BIOS Considerations).

use super::{Error, Result};
use crate::addr::{Hpa, PhysRange, PAGE_SIZE};
use alloc::vec::Vec;
use bitflags::bitflags;

/// The ACPI header (36 bytes) plus host address width, flags and 10
/// reserved bytes. See: VT-d spec, 8.1.
pub const HEADER_LEN: usize = 48;
/// Remapping structure types. See: VT-d spec, 8.2.
pub const TYPE_DRHD: u16 = 0;
pub const TYPE_RMRR: u16 = 1;
pub const TYPE_ATSR: u16 = 2;
pub const TYPE_RHSA: u16 = 3;
pub const TYPE_ANDD: u16 = 4;
pub const TYPE_SATC: u16 = 5;

/// More remapping units than any machine has (Linux allows as many as
/// I/O APICs, 128): a table claiming more is corrupt.
pub const MAX_UNITS: usize = 128;
/// More RMRRs than any sane firmware reports.
pub const MAX_RMRRS: usize = 256;
/// Device scopes per structure, and PCI path hops per scope.
pub const MAX_SCOPES: usize = 256;
pub const MAX_PATH: usize = 32;
/// A DMAR larger than this is corrupt (real ones are a few hundred bytes).
pub const MAX_TABLE_LEN: usize = 1 << 20;

bitflags! {
    /// DMAR flags. See: VT-d spec, 8.1.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DmarFlags: u8 {
        const INTR_REMAP = 1 << 0;
        const X2APIC_OPT_OUT = 1 << 1;
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }
}

bitflags! {
    /// DRHD flags. See: VT-d spec, 8.3.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DrhdFlags: u8 {
        /// The unit covers every PCI device of its segment not claimed by
        /// another unit (QEMU's single unit has it).
        const INCLUDE_PCI_ALL = 1 << 0;
    }
}

/// Device scope entry types. See: VT-d spec, 8.3.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    Endpoint,
    Bridge,
    IoApic,
    Hpet,
    Namespace,
    Other(u8),
}

impl From<u8> for ScopeKind {
    fn from(v: u8) -> Self {
        match v {
            1 => ScopeKind::Endpoint,
            2 => ScopeKind::Bridge,
            3 => ScopeKind::IoApic,
            4 => ScopeKind::Hpet,
            5 => ScopeKind::Namespace,
            v => ScopeKind::Other(v),
        }
    }
}

/// One hop of a device scope's path from its start bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciPath {
    pub device: u8,
    pub function: u8,
}

/// A device scope. See: VT-d spec, 8.3.1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    pub kind: ScopeKind,
    /// The I/O APIC id, HPET number or ACPI device number (by kind).
    pub enumeration_id: u8,
    pub start_bus: u8,
    pub path: Vec<PciPath>,
}

/// A DMA remapping hardware unit definition. See: VT-d spec, 8.3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    pub flags: DrhdFlags,
    /// Size field (3:0): the register set spans `2^size` pages; zero in
    /// tables older than revision 2.x, meaning one page.
    pub size: u8,
    pub segment: u16,
    /// The register page (page-aligned, checked).
    pub base: Hpa,
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    pub fn include_pci_all(&self) -> bool {
        self.flags.contains(DrhdFlags::INCLUDE_PCI_ALL)
    }
    /// The register pages, which EPT must hide from the host and the DMA
    /// map must leave out.
    pub fn register_range(&self) -> PhysRange {
        PhysRange::new(self.base.0, PAGE_SIZE << (self.size & 0xf))
    }
}

/// A reserved memory region: memory that firmware-owned DMA (USB legacy
/// emulation, integrated graphics) uses. It must stay mapped 1:1 for its
/// devices. See: VT-d spec, 8.4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    pub segment: u16,
    pub base: Hpa,
    /// The last byte (inclusive), as the table gives it.
    pub limit: Hpa,
    pub scopes: Vec<DeviceScope>,
}

impl Rmrr {
    pub fn range(&self) -> PhysRange {
        PhysRange { base: self.base, end: Hpa(self.limit.0 + 1) }
    }
}

/// The parsed DMAR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dmar {
    /// Host address width in bits (the field holds width - 1).
    pub host_address_width: u32,
    pub flags: DmarFlags,
    pub units: Vec<Drhd>,
    pub rmrrs: Vec<Rmrr>,
    /// Whether the ACPI checksum adds up. A bad checksum is logged, not
    /// fatal: Linux accepts such tables too, and every length is checked
    /// anyway.
    pub checksum_ok: bool,
}

impl Dmar {
    /// The RMRR ranges, for the DMA map.
    pub fn rmrr_ranges(&self) -> Vec<PhysRange> {
        self.rmrrs.iter().map(Rmrr::range).collect()
    }
}

fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Parses the raw bytes of the DMAR table (header included).
pub fn parse(bytes: &[u8]) -> Result<Dmar> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::DmarTruncated);
    }
    if &bytes[0..4] != b"DMAR" {
        return Err(Error::DmarSignature);
    }
    let len = u32_at(bytes, 4).ok_or(Error::DmarTruncated)? as usize;
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err(Error::DmarLength);
    }
    if len > bytes.len() {
        return Err(Error::DmarTruncated);
    }
    let table = &bytes[..len];
    let checksum_ok = table.iter().fold(0u8, |s, &b| s.wrapping_add(b)) == 0;
    let mut dmar = Dmar {
        host_address_width: table[36] as u32 + 1,
        flags: DmarFlags::from_bits_retain(table[37]),
        units: Vec::new(),
        rmrrs: Vec::new(),
        checksum_ok,
    };
    let mut off = HEADER_LEN;
    while off < len {
        let bad = Error::DmarStructure { offset: off as u32 };
        let kind = u16_at(table, off).ok_or(bad)?;
        let slen = u16_at(table, off + 2).ok_or(bad)? as usize;
        // A zero or short length would loop forever or read the next header.
        if slen < 4 || off + slen > len {
            return Err(bad);
        }
        let s = &table[off..off + slen];
        match kind {
            TYPE_DRHD => {
                if dmar.units.len() == MAX_UNITS {
                    return Err(Error::DmarTooMany);
                }
                dmar.units.push(parse_drhd(s, off)?);
            }
            TYPE_RMRR => {
                if dmar.rmrrs.len() == MAX_RMRRS {
                    return Err(Error::DmarTooMany);
                }
                dmar.rmrrs.push(parse_rmrr(s, off)?);
            }
            // ATSR, RHSA, ANDD, SATC and later types say nothing we need.
            _ => {}
        }
        off += slen;
    }
    if dmar.units.is_empty() {
        return Err(Error::DmarNoUnits);
    }
    Ok(dmar)
}

fn parse_drhd(s: &[u8], at: usize) -> Result<Drhd> {
    let bad = Error::DmarStructure { offset: at as u32 };
    if s.len() < 16 {
        return Err(bad);
    }
    let base = u64_at(s, 8).ok_or(bad)?;
    if base == 0 || base & (PAGE_SIZE - 1) != 0 {
        return Err(bad);
    }
    Ok(Drhd {
        flags: DrhdFlags::from_bits_retain(s[4]),
        size: s[5] & 0xf,
        segment: u16_at(s, 6).ok_or(bad)?,
        base: Hpa(base),
        scopes: parse_scopes(s, 16, at)?,
    })
}

fn parse_rmrr(s: &[u8], at: usize) -> Result<Rmrr> {
    let bad = Error::DmarStructure { offset: at as u32 };
    if s.len() < 24 {
        return Err(bad);
    }
    let base = u64_at(s, 8).ok_or(bad)?;
    let limit = u64_at(s, 16).ok_or(bad)?;
    // The base is 4 KiB aligned, the limit is the last byte of a 4 KiB
    // aligned end, and the range is not empty or wrapped.
    if base & (PAGE_SIZE - 1) != 0 || limit & (PAGE_SIZE - 1) != PAGE_SIZE - 1 || limit < base {
        return Err(bad);
    }
    Ok(Rmrr { segment: u16_at(s, 6).ok_or(bad)?, base: Hpa(base), limit: Hpa(limit), scopes: parse_scopes(s, 24, at)? })
}

/// Device scopes fill the structure from `first` to its end.
fn parse_scopes(s: &[u8], first: usize, at: usize) -> Result<Vec<DeviceScope>> {
    let mut scopes = Vec::new();
    let mut off = first;
    while off < s.len() {
        let bad = Error::DmarScope { offset: (at + off) as u32 };
        let kind = u8_at(s, off).ok_or(bad)?;
        let len = u8_at(s, off + 1).ok_or(bad)? as usize;
        // Six bytes of header, then (device, function) pairs.
        if len < 6 || !(len - 6).is_multiple_of(2) || off + len > s.len() || (len - 6) / 2 > MAX_PATH {
            return Err(bad);
        }
        if scopes.len() == MAX_SCOPES {
            return Err(Error::DmarTooMany);
        }
        let path = s[off + 6..off + len].chunks_exact(2).map(|p| PciPath { device: p[0], function: p[1] }).collect();
        scopes.push(DeviceScope { kind: ScopeKind::from(kind), enumeration_id: s[off + 4], start_bus: s[off + 5], path });
        off += len;
    }
    Ok(scopes)
}

#[cfg(test)]
pub(crate) mod build {
    //! Builds DMAR byte arrays for tests, like firmware (and QEMU) would.
    use alloc::vec::Vec;

    pub struct Table(pub Vec<u8>);

    impl Table {
        pub fn new(haw_bits: u8, flags: u8) -> Self {
            let mut b = Vec::new();
            b.extend_from_slice(b"DMAR");
            b.extend_from_slice(&0u32.to_le_bytes()); // length, fixed in finish()
            b.push(1); // revision
            b.push(0); // checksum, fixed in finish()
            b.extend_from_slice(b"BOCHS ");
            b.extend_from_slice(b"BXPC    ");
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(b"BXPC");
            b.extend_from_slice(&1u32.to_le_bytes());
            b.push(haw_bits - 1);
            b.push(flags);
            b.extend_from_slice(&[0u8; 10]);
            assert_eq!(b.len(), super::HEADER_LEN);
            Table(b)
        }

        pub fn scope(kind: u8, enum_id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
            let mut s = vec![kind, (6 + 2 * path.len()) as u8, 0, 0, enum_id, bus];
            for &(d, f) in path {
                s.push(d);
                s.push(f);
            }
            s
        }

        pub fn drhd(mut self, flags: u8, segment: u16, base: u64, scopes: &[Vec<u8>]) -> Self {
            let body: Vec<u8> = scopes.concat();
            self.0.extend_from_slice(&0u16.to_le_bytes());
            self.0.extend_from_slice(&((16 + body.len()) as u16).to_le_bytes());
            self.0.push(flags);
            self.0.push(0);
            self.0.extend_from_slice(&segment.to_le_bytes());
            self.0.extend_from_slice(&base.to_le_bytes());
            self.0.extend_from_slice(&body);
            self
        }

        pub fn rmrr(mut self, segment: u16, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Self {
            let body: Vec<u8> = scopes.concat();
            self.0.extend_from_slice(&1u16.to_le_bytes());
            self.0.extend_from_slice(&((24 + body.len()) as u16).to_le_bytes());
            self.0.extend_from_slice(&0u16.to_le_bytes());
            self.0.extend_from_slice(&segment.to_le_bytes());
            self.0.extend_from_slice(&base.to_le_bytes());
            self.0.extend_from_slice(&limit.to_le_bytes());
            self.0.extend_from_slice(&body);
            self
        }

        pub fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }

        /// Fixes the length and the checksum.
        pub fn finish(mut self) -> Vec<u8> {
            let len = self.0.len() as u32;
            self.0[4..8].copy_from_slice(&len.to_le_bytes());
            self.0[9] = 0;
            let sum = self.0.iter().fold(0u8, |s, &b| s.wrapping_add(b));
            self.0[9] = 0u8.wrapping_sub(sum);
            self.0
        }
    }

    /// QEMU 7.2's DMAR for `-M q35 -device intel-iommu`: a 39-bit host
    /// address width, interrupt remapping flagged, one DRHD at 0xfed90000
    /// with INCLUDE_PCI_ALL and the root-complex I/O APIC's scope (enumeration
    /// id 0, bus 0xff, path 1f.0).
    pub fn qemu() -> Vec<u8> {
        Table::new(39, 1).drhd(1, 0, 0xfed9_0000, &[Table::scope(3, 0, 0xff, &[(0x1f, 0)])]).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::build::{qemu, Table};
    use super::*;

    #[test]
    fn qemu_layout() {
        let d = parse(&qemu()).unwrap();
        assert!(d.checksum_ok);
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.flags, DmarFlags::INTR_REMAP);
        assert_eq!(d.units.len(), 1);
        let u = &d.units[0];
        assert!(u.include_pci_all());
        assert_eq!((u.segment, u.base), (0, Hpa(0xfed9_0000)));
        assert_eq!(u.register_range(), PhysRange::new(0xfed9_0000, 0x1000));
        assert_eq!(
            u.scopes,
            vec![DeviceScope {
                kind: ScopeKind::IoApic,
                enumeration_id: 0,
                start_bus: 0xff,
                path: vec![PciPath { device: 0x1f, function: 0 }]
            }]
        );
        assert!(d.rmrrs.is_empty());
    }

    #[test]
    fn several_units_and_rmrrs() {
        let t = Table::new(46, 0)
            .drhd(0, 0, 0xfed9_0000, &[Table::scope(1, 0, 0, &[(2, 0)])])
            .rmrr(0, 0x7b80_0000, 0x7fff_ffff, &[Table::scope(1, 0, 0, &[(2, 0)])])
            // An ATSR between them is skipped by its length.
            .raw(&[2, 0, 8, 0, 1, 0, 0, 0])
            .drhd(1, 0, 0xfed9_1000, &[Table::scope(3, 2, 0xf0, &[(0x1f, 0)]), Table::scope(2, 0, 0, &[(0x1c, 0), (0, 0)])])
            .rmrr(0, 0xe_8000, 0xe_ffff, &[Table::scope(1, 0, 0, &[(0x14, 0)]), Table::scope(1, 0, 0, &[(0x1a, 0)])])
            .finish();
        let d = parse(&t).unwrap();
        assert_eq!(d.host_address_width, 46);
        assert_eq!(d.units.len(), 2);
        assert!(!d.units[0].include_pci_all() && d.units[1].include_pci_all());
        assert_eq!(d.units[0].scopes[0].kind, ScopeKind::Endpoint);
        assert_eq!(d.units[1].scopes[1].kind, ScopeKind::Bridge);
        assert_eq!(d.units[1].scopes[1].path.len(), 2);
        assert_eq!(d.rmrrs.len(), 2);
        assert_eq!(d.rmrrs[0].range(), PhysRange::new(0x7b80_0000, 0x480_0000));
        assert_eq!(d.rmrrs[1].scopes.len(), 2);
        assert_eq!(d.rmrr_ranges()[1], PhysRange::new(0xe_8000, 0x8000));
    }

    #[test]
    fn bad_checksum_is_reported_not_fatal() {
        let mut t = qemu();
        t[9] = t[9].wrapping_add(1);
        assert!(!parse(&t).unwrap().checksum_ok);
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(parse(&[]), Err(Error::DmarTruncated));
        assert_eq!(parse(&qemu()[..47]), Err(Error::DmarTruncated));
        let mut t = qemu();
        t[0] = b'X';
        assert_eq!(parse(&t), Err(Error::DmarSignature));
        // The length claims more than there is.
        let mut t = qemu();
        let n = t.len() as u32 + 1;
        t[4..8].copy_from_slice(&n.to_le_bytes());
        assert_eq!(parse(&t), Err(Error::DmarTruncated));
        // The length is shorter than the header, or absurd.
        for n in [0u32, 47, u32::MAX] {
            let mut t = qemu();
            t[4..8].copy_from_slice(&n.to_le_bytes());
            assert_eq!(parse(&t), Err(Error::DmarLength), "length {n}");
        }
        // No remapping unit at all.
        assert_eq!(parse(&Table::new(39, 0).finish()), Err(Error::DmarNoUnits));
    }

    #[test]
    fn malformed_structures() {
        // A zero-length structure must not loop forever.
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[]).raw(&[0, 0, 0, 0]).finish();
        assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 64 }));
        // A structure that runs past the table.
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[]).raw(&[1, 0, 200, 0]).finish();
        assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 64 }));
        // A trailing fragment too short for a structure header.
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[]).raw(&[1, 0]).finish();
        assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 64 }));
        // A DRHD too short for its fields.
        let t = Table::new(39, 0).raw(&[0, 0, 8, 0, 1, 0, 0, 0]).finish();
        assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 48 }));
        // A DRHD whose registers are not page-aligned, or at 0.
        for base in [0xfed9_0800, 0] {
            let t = Table::new(39, 0).drhd(1, 0, base, &[]).finish();
            assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 48 }));
        }
        // RMRRs that are unaligned, empty-wrapped or too short.
        for (b, l) in [(0x1000u64, 0x1ffeu64), (0x1800, 0x1fff), (0x3000, 0x1fff)] {
            let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[]).rmrr(0, b, l, &[]).finish();
            assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 64 }), "rmrr {b:#x}..{l:#x}");
        }
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[]).raw(&[1, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).finish();
        assert_eq!(parse(&t), Err(Error::DmarStructure { offset: 64 }));
    }

    #[test]
    fn malformed_scopes() {
        // A scope with length 0 (would loop), odd path bytes, or overrunning
        // its structure.
        for bad in [vec![1u8, 0, 0, 0, 0, 0], vec![1, 7, 0, 0, 0, 0, 3], vec![1, 10, 0, 0, 0, 0, 3, 0]] {
            let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, core::slice::from_ref(&bad)).finish();
            assert_eq!(parse(&t), Err(Error::DmarScope { offset: 64 }), "scope {bad:?}");
        }
        // A trailing scope fragment shorter than a scope header.
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[vec![1, 6]]).finish();
        assert_eq!(parse(&t), Err(Error::DmarScope { offset: 64 }));
        // A path longer than any PCI hierarchy.
        let hops: Vec<(u8, u8)> = (0..40).map(|i| (i, 0)).collect();
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[Table::scope(2, 0, 0, &hops)]).finish();
        assert_eq!(parse(&t), Err(Error::DmarScope { offset: 64 }));
        // An unknown scope type is kept, not rejected.
        let t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[Table::scope(9, 0, 0, &[])]).finish();
        assert_eq!(parse(&t).unwrap().units[0].scopes[0].kind, ScopeKind::Other(9));
    }

    #[test]
    fn absurd_counts() {
        let mut t = Table::new(39, 0);
        for i in 0..=MAX_UNITS as u64 {
            t = t.drhd(0, 0, 0xf000_0000 + i * 0x1000, &[]);
        }
        assert_eq!(parse(&t.finish()), Err(Error::DmarTooMany));
        let mut t = Table::new(39, 0).drhd(1, 0, 0xfed9_0000, &[]);
        for _ in 0..=MAX_RMRRS {
            t = t.rmrr(0, 0x1000, 0x1fff, &[]);
        }
        assert_eq!(parse(&t.finish()), Err(Error::DmarTooMany));
    }

    #[test]
    fn never_panics_on_truncations_and_bit_flips() {
        let t = Table::new(39, 1)
            .drhd(1, 0, 0xfed9_0000, &[Table::scope(3, 0, 0xff, &[(0x1f, 0)])])
            .rmrr(0, 0xe_8000, 0xe_ffff, &[Table::scope(1, 0, 0, &[(0x14, 0)])])
            .finish();
        for n in 0..t.len() {
            let _ = parse(&t[..n]);
        }
        for i in 0..t.len() {
            for bit in 0..8 {
                let mut u = t.clone();
                u[i] ^= 1 << bit;
                let _ = parse(&u);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_random_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut t = Table::new(39, 0).raw(&body).finish();
            let _ = parse(&t);
            t.truncate(t.len() / 2);
            let _ = parse(&t);
        }
    }
}
