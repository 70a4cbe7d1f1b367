//! EPT paging-structure entries. See: SDM Vol. 3C, 29.3.2 (formats) and
//! 29.3.7 (memory types).

use bitflags::bitflags;

bitflags! {
    /// Bits of an EPT entry at any level.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EptFlags: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        /// Memory type, bits 5:3 of a leaf.
        const MT_MASK = 7 << 3;
        /// Ignore PAT memory type (leaf).
        const IGNORE_PAT = 1 << 6;
        /// Leaf at the PDPT (1 GiB) or PD (2 MiB) level.
        const LARGE = 1 << 7;
        const ACCESSED = 1 << 8;
        const DIRTY = 1 << 9;
        /// Software bit (ignored by the CPU): the frame is shared
        /// copy-on-write; writes must copy it first.
        const SW_COW = 1 << 52;
        /// Software bit: the leaf maps a frame of the frame pool.
        const SW_POOL = 1 << 53;
        /// Software bit: a merge mapped the leaf (read-only) onto a frame
        /// its index holds as merged, so that later passes may skip it.
        const SW_MERGED = 1 << 54;
    }
}

impl EptFlags {
    pub const RWX: EptFlags = EptFlags::READ.union(EptFlags::WRITE).union(EptFlags::EXEC);
    pub const RX: EptFlags = EptFlags::READ.union(EptFlags::EXEC);
}

/// Physical-address bits of an entry (bits 51:12).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// EPT memory types.
pub const MT_UC: u64 = 0;
pub const MT_WC: u64 = 1;
pub const MT_WB: u64 = 6;

/// An EPT entry.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct EptEntry(pub u64);

impl EptEntry {
    pub const fn empty() -> Self {
        EptEntry(0)
    }
    /// A pointer to a next-level table: full permissions, the leaves decide.
    pub const fn table(pa: u64) -> Self {
        EptEntry((pa & ADDR_MASK) | EptFlags::RWX.bits())
    }
    /// A leaf; `large` for 2 MiB / 1 GiB leaves.
    pub fn leaf(pa: u64, perms: EptFlags, mem_type: u64, large: bool) -> Self {
        let mut v = (pa & ADDR_MASK) | perms.bits() | (mem_type << 3);
        if large {
            v |= EptFlags::LARGE.bits();
        }
        EptEntry(v)
    }
    pub const fn present(self) -> bool {
        self.0 & 7 != 0
    }
    pub const fn addr(self) -> u64 {
        self.0 & ADDR_MASK
    }
    pub fn flags(self) -> EptFlags {
        EptFlags::from_bits_retain(self.0)
    }
    pub fn is_large(self) -> bool {
        self.flags().contains(EptFlags::LARGE)
    }
    pub fn mem_type(self) -> u64 {
        (self.0 >> 3) & 7
    }
    pub fn with_flags(self, set: EptFlags, clear: EptFlags) -> Self {
        EptEntry((self.0 & !clear.bits()) | set.bits())
    }
}

impl core::fmt::Debug for EptEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "EptEntry({:#x} {:?})", self.addr(), self.flags() - EptFlags::from_bits_retain(ADDR_MASK))
    }
}

/// The EPT pointer (VMCS field). See: SDM Vol. 3C, 25.6.11.
pub fn eptp(pml4: u64, ad_bits: bool) -> u64 {
    let mut v = (pml4 & ADDR_MASK) | MT_WB | ((4 - 1) << 3);
    if ad_bits {
        v |= 1 << 6;
    }
    v
}

/// What an EPT-violation exit qualification says. See: SDM Vol. 3C, Table 28-7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolation {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// The entry allowed reads / writes / fetches.
    pub was_readable: bool,
    pub was_writable: bool,
    pub was_executable: bool,
    pub linear_valid: bool,
    /// The access was to the final translation, not a paging structure.
    pub final_translation: bool,
    pub nmi_unblocking: bool,
}

impl EptViolation {
    pub fn from_qualification(q: u64) -> Self {
        EptViolation {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            was_readable: q & 8 != 0,
            was_writable: q & 16 != 0,
            was_executable: q & 32 != 0,
            linear_valid: q & 128 != 0,
            final_translation: q & 256 != 0,
            nmi_unblocking: q & 4096 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bits() {
        let e = EptEntry::leaf(0x20_0000, EptFlags::RWX, MT_WB, true);
        assert!(e.present() && e.is_large());
        assert_eq!(e.addr(), 0x20_0000);
        assert_eq!(e.mem_type(), MT_WB);
        assert_eq!(e.0, 0x20_0000 | 7 | (6 << 3) | (1 << 7));
        let ro = e.with_flags(EptFlags::SW_COW, EptFlags::WRITE);
        assert!(!ro.flags().contains(EptFlags::WRITE) && ro.flags().contains(EptFlags::SW_COW));
        assert_eq!(ro.addr(), 0x20_0000);
    }

    #[test]
    fn eptp_format() {
        assert_eq!(eptp(0x1000, true), 0x1000 | 6 | (3 << 3) | (1 << 6));
    }

    #[test]
    fn violation_decode() {
        let v = EptViolation::from_qualification(0x182);
        assert!(v.write && !v.read && v.linear_valid && v.final_translation);
    }
}
