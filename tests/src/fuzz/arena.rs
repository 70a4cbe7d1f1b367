//! The arena: where arguments live, with a guard page and a read-only page.

use super::*;

pub(super) const PAGE: usize = 4096;
/// Read-write pages: the argument at the start, data buffers after it.
pub(super) const RW_PAGES: usize = 32;
pub(super) const DATA_OFF: usize = PAGE;

pub(super) struct Arena {
    pub(super) base: *mut u8,
}

/// Where an argument is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ptr {
    Good,
    Misaligned,
    /// A read-only page: the driver can read it, not write it.
    ReadOnly,
    Null,
    Low,
    Kernel,
    KernelText,
    NonCanonical,
    Guard,
    /// Half in the last read-write page, half in the guard page.
    Straddle,
    UserTop,
    AllOnes,
}

impl Ptr {
    /// The errno a call through this pointer must give: EFAULT for a
    /// pointer to no usable memory, then the first of `refusals` (a
    /// condition and its errno) that holds, then EFAULT for a read-only
    /// page (the answer cannot be written back), else 0.
    pub(super) fn errno(self, refusals: &[(bool, i32)]) -> i32 {
        if self.bad() {
            return EFAULT;
        }
        if let Some(&(_, e)) = refusals.iter().find(|(c, _)| *c) {
            return e;
        }
        if self == Ptr::ReadOnly {
            EFAULT
        } else {
            0
        }
    }

    /// The kernel can neither read nor write it.
    pub(super) fn bad(self) -> bool {
        !matches!(self, Ptr::Good | Ptr::Misaligned | Ptr::ReadOnly)
    }
}

pub(super) const BAD_PTRS: [Ptr; 9] = [Ptr::Null, Ptr::Low, Ptr::Kernel, Ptr::KernelText, Ptr::NonCanonical, Ptr::Guard, Ptr::Straddle, Ptr::UserTop, Ptr::AllOnes];

impl Arena {
    pub(super) fn new() -> std::result::Result<Arena, String> {
        let len = (RW_PAGES + 2) * PAGE;
        // SAFETY: a fresh anonymous private mapping, owned by the arena.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let a = Arena { base: p.cast() };
        // SAFETY: changing the protection of pages of our own mapping.
        unsafe {
            libc::mprotect(a.base.add(RW_PAGES * PAGE).cast(), PAGE, libc::PROT_NONE);
            libc::mprotect(a.base.add((RW_PAGES + 1) * PAGE).cast(), PAGE, libc::PROT_READ);
        }
        Ok(a)
    }

    pub(super) fn addr(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }

    pub(super) fn guard(&self) -> u64 {
        self.addr(RW_PAGES * PAGE)
    }

    pub(super) fn ro(&self) -> u64 {
        self.addr((RW_PAGES + 1) * PAGE)
    }

    pub(super) fn write(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= RW_PAGES * PAGE);
        // SAFETY: within the read-write pages of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.base.add(off), b.len()) };
    }

    pub(super) fn read(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= RW_PAGES * PAGE);
        let mut v = vec![0u8; n];
        // SAFETY: as in `write`; the kernel wrote these bytes, if anything.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), v.as_mut_ptr(), n) };
        v
    }

    pub(super) fn set_ro(&self, b: &[u8]) {
        let ro = (RW_PAGES + 1) * PAGE;
        // SAFETY: our read-only page, made writable for the copy only.
        unsafe {
            libc::mprotect(self.base.add(ro).cast(), PAGE, libc::PROT_READ | libc::PROT_WRITE);
            std::ptr::copy_nonoverlapping(b.as_ptr(), self.base.add(ro), b.len().min(PAGE));
            libc::mprotect(self.base.add(ro).cast(), PAGE, libc::PROT_READ);
        }
    }

    /// Puts `b` where `p` says; returns the address and, for memory the
    /// test can read back, the arena offset.
    pub(super) fn place(&self, p: Ptr, b: &[u8], rng: &mut Rng) -> (u64, Option<usize>) {
        match p {
            Ptr::Good => {
                self.write(0, b);
                (self.addr(0), Some(0))
            }
            Ptr::Misaligned => {
                let off = 1 + rng.below(7) as usize;
                self.write(off, b);
                (self.addr(off), Some(off))
            }
            Ptr::ReadOnly => {
                self.set_ro(b);
                (self.ro(), None)
            }
            Ptr::Null => (0, None),
            Ptr::Low => (1 + rng.below(4095), None),
            Ptr::Kernel => (0xffff_8880_0010_0000 + rng.below(1 << 20), None),
            Ptr::KernelText => (0xffff_ffff_8100_0000, None),
            Ptr::NonCanonical => (rng.pick(&[0x0000_8000_0000_0000, 0x8000_0000_0000_0000, 0x1234_5678_9abc_d000]), None),
            Ptr::Guard => (self.guard(), None),
            Ptr::Straddle => {
                let half = b.len() / 2;
                let off = RW_PAGES * PAGE - half;
                self.write(off, &b[..half]);
                (self.addr(off), None)
            }
            Ptr::UserTop => (0x7fff_ffff_f000 - (b.len() as u64 / 2), None),
            Ptr::AllOnes => (u64::MAX - rng.below(64), None),
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping `new` made.
        unsafe { libc::munmap(self.base.cast(), (RW_PAGES + 2) * PAGE) };
    }
}
