//! Address newtypes. Nothing passes a bare `u64` address between modules.

use core::fmt;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
pub const HUGE_PAGE_SIZE: u64 = 1 << 30;

macro_rules! address {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const fn new(v: u64) -> Self {
                $name(v)
            }
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// Adds `n`, or `None` on overflow.
            pub fn checked_add(self, n: u64) -> Option<Self> {
                self.0.checked_add(n).map($name)
            }
            pub const fn page_base(self) -> Self {
                $name(self.0 & !(PAGE_SIZE - 1))
            }
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
            pub const fn pfn(self) -> u64 {
                self.0 >> PAGE_SHIFT
            }
            pub const fn from_pfn(pfn: u64) -> Self {
                $name(pfn << PAGE_SHIFT)
            }
            pub const fn is_page_aligned(self) -> bool {
                self.0 & (PAGE_SIZE - 1) == 0
            }
            pub const fn align_down(self, a: u64) -> Self {
                $name(self.0 & !(a - 1))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address!(
    /// Host-physical address.
    Hpa
);
address!(
    /// Guest-physical address (for the host VM it equals the host-physical one).
    Gpa
);
address!(
    /// Guest-virtual (linear) address.
    Gva
);
address!(
    /// Hypervisor-virtual address.
    Hva
);

/// A half-open physical range `[base, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub base: Hpa,
    pub end: Hpa,
}

impl PhysRange {
    pub const fn new(base: u64, size: u64) -> Self {
        PhysRange { base: Hpa(base), end: Hpa(base + size) }
    }
    pub const fn size(&self) -> u64 {
        self.end.0 - self.base.0
    }
    pub const fn contains(&self, a: Hpa) -> bool {
        a.0 >= self.base.0 && a.0 < self.end.0
    }
    /// Whether `[a, a+len)` overlaps this range.
    pub const fn overlaps(&self, a: u64, len: u64) -> bool {
        a < self.end.0 && a.saturating_add(len) > self.base.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_math() {
        let a = Hpa::new(0x1234_5678);
        assert_eq!(a.page_base(), Hpa::new(0x1234_5000));
        assert_eq!(a.page_offset(), 0x678);
        assert_eq!(Hpa::from_pfn(a.pfn()), a.page_base());
        assert_eq!(Hpa::new(u64::MAX).checked_add(1), None);
    }

    #[test]
    fn ranges() {
        let r = PhysRange::new(0x1000, 0x2000);
        assert!(r.contains(Hpa(0x1000)) && r.contains(Hpa(0x2fff)) && !r.contains(Hpa(0x3000)));
        assert!(r.overlaps(0, 0x1001) && !r.overlaps(0, 0x1000) && r.overlaps(0x2fff, 10));
    }
}
