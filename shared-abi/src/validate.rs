// SPDX-License-Identifier: GPL-2.0
//! Argument validation, defined once for both boundaries.
//!
//! The ioctl handler in the driver (`host-driver/dev.rs`) and the hypercall
//! dispatcher in the hypervisor (`hypervisor/src/control/`) check the same
//! structures by the same rules, so what the driver lets through the
//! hypervisor does not refuse as malformed. Every function here is pure: it
//! looks at a copy of the argument, never at memory it names. The callers
//! turn [`Invalid`] into `EINVAL` at their boundary.
//!
//! Like `abi/`, the kernel module takes this file in by `#[path]`; it
//! names the ABI through `crate::abi`, which both crates have.
#![allow(dead_code, unreachable_pub)]

use crate::abi::{
    errno, DebugTranslate, IocBuf, IocLoad, MemRange, Regs, VmCreate, VmFork, VmId, VmInfo, VmLoad, VmRun, FORK_COPY,
    MAX_VMS, VMRUN_NO_WAIT, VM_MAX_MEM, VM_MAX_VCPUS, VM_MEM_ALIGN, VmIrq, VM_FLAG_LINUX, VM_FLAG_VMGENID, IOAPIC_PINS, IRQ_PULSE,
};

/// Why an argument is refused. Every variant is `EINVAL` on the wire; the
/// variants say which rule, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// A size, count or length outside its range.
    Size,
    /// A flag bit that is not defined.
    Flags,
    /// A reserved field that is not zero.
    Reserved,
    /// An address range that is misaligned, overflows or crosses a page.
    Range,
    /// A register value a vCPU cannot start with.
    Register,
}

impl Invalid {
    /// The errno (positive) of every refusal.
    pub const fn errno(self) -> i64 {
        errno::EINVAL
    }
}

/// Most ranges in one `hc::DONATE`.
pub const DONATE_MAX_RANGES: u64 = 256;
/// Largest range in one `hc::DONATE`.
pub const DONATE_MAX_RANGE: u64 = 1 << 30;
/// Most addresses one `hc::RECLAIM` returns.
pub const RECLAIM_MAX: u64 = 512;
/// Most bytes in one `hc::VM_LOAD` (one host page).
pub const LOAD_CHUNK: u64 = 4096;

/// RFLAGS bits a vCPU may start with: every architectural flag (CF, PF,
/// AF, ZF, SF, TF, IF, DF, OF, IOPL, NT, RF, AC, VIF, VIP, ID) but VM
/// (17), and not the reserved bits 3, 5, 15 and 22-63, which VM entry
/// requires to be 0 (SDM Vol. 3C, 27.3.1.4). Bit 1 is forced on.
pub const RFLAGS_SETTABLE: u64 = 0x003f_7fd7 & !(1 << 17);

const fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// `VmCreate` (the ioctl and `hc::VM_CREATE`): guest memory a non-zero
/// multiple of 2 MiB up to 4 GiB, 1 to 8 vCPUs, no flags but
/// `VM_FLAG_LINUX` and (with it) `VM_FLAG_VMGENID`. `id` is an output and `name` any bytes.
pub const fn vm_create(c: &VmCreate) -> Result<(), Invalid> {
    if c.mem_bytes == 0 || c.mem_bytes % VM_MEM_ALIGN != 0 || c.mem_bytes > VM_MAX_MEM {
        return Err(Invalid::Size);
    }
    if c.vcpus == 0 || c.vcpus > VM_MAX_VCPUS {
        return Err(Invalid::Size);
    }
    if c.flags & !(VM_FLAG_LINUX | VM_FLAG_VMGENID) != 0 {
        return Err(Invalid::Flags);
    }
    // A generation ID lives in a Linux guest's platform.
    if c.flags & VM_FLAG_VMGENID != 0 && c.flags & VM_FLAG_LINUX == 0 {
        return Err(Invalid::Flags);
    }
    Ok(())
}

/// `VmIrq`: an IOAPIC input and a level, `reserved0` zero.
pub const fn vm_irq(q: &VmIrq) -> Result<(), Invalid> {
    if q.gsi >= IOAPIC_PINS {
        return Err(Invalid::Range);
    }
    if q.level > IRQ_PULSE {
        return Err(Invalid::Flags);
    }
    if q.reserved0 != 0 {
        return Err(Invalid::Reserved);
    }
    Ok(())
}

/// `VmId` (the `DESTROY` ioctl and `hc::VM_DESTROY`).
pub const fn vm_id(v: &VmId) -> Result<(), Invalid> {
    if v.reserved0 != 0 {
        return Err(Invalid::Reserved);
    }
    Ok(())
}

/// `DebugTranslate` (the ioctl and `hc::DEBUG_TRANSLATE`).
pub const fn debug_translate(t: &DebugTranslate) -> Result<(), Invalid> {
    if t.reserved0 != 0 {
        return Err(Invalid::Reserved);
    }
    Ok(())
}

/// How many `MemRange`s a `hc::DONATE` block of `len` bytes holds: 1 to
/// 256 (trailing bytes are ignored).
pub const fn donate_ranges(len: u64) -> Result<u64, Invalid> {
    let n = len / core::mem::size_of::<MemRange>() as u64;
    if n == 0 || n > DONATE_MAX_RANGES {
        return Err(Invalid::Size);
    }
    Ok(n)
}

/// One range of a `hc::DONATE`: page aligned, 4 KiB to 1 GiB, not wrapping.
pub const fn mem_range(r: &MemRange) -> Result<(), Invalid> {
    if r.base % 4096 != 0 || r.size % 4096 != 0 {
        return Err(Invalid::Range);
    }
    if r.size == 0 || r.size > DONATE_MAX_RANGE {
        return Err(Invalid::Size);
    }
    if r.base.checked_add(r.size).is_none() {
        return Err(Invalid::Range);
    }
    Ok(())
}

/// How many addresses a `hc::RECLAIM` block of `len` bytes takes: up to
/// 512, at least 1.
pub const fn reclaim_count(len: u64) -> Result<u64, Invalid> {
    let n = len / 8;
    if n == 0 {
        return Err(Invalid::Size);
    }
    Ok(if n > RECLAIM_MAX { RECLAIM_MAX } else { n })
}

/// `VmLoad` (`hc::VM_LOAD`): 1 to 4096 bytes within one host page,
/// `reserved0` zero. Where `gpa` may go is the VM's business.
pub const fn vm_load(l: &VmLoad) -> Result<(), Invalid> {
    if l.len == 0 || l.len > LOAD_CHUNK {
        return Err(Invalid::Size);
    }
    if l.src % LOAD_CHUNK + l.len > LOAD_CHUNK {
        return Err(Invalid::Range);
    }
    if l.reserved0 != 0 {
        return Err(Invalid::Reserved);
    }
    Ok(())
}

/// A vCPU's initial register file (`VM_SET_REGS`): RFLAGS within
/// [`RFLAGS_SETTABLE`] (bit 1 aside), RIP canonical, CR3 a page address
/// below 2^52. CR0, CR4 and EFER are not the caller's to choose (the
/// hypervisor forces them), so they are not checked.
pub const fn regs(r: &Regs) -> Result<(), Invalid> {
    if r.rflags & !RFLAGS_SETTABLE != 0 || !canonical(r.rip) || r.cr3 & 0xfff0_0000_0000_0fff != 0 {
        return Err(Invalid::Register);
    }
    Ok(())
}

/// `VmRun`: only `VMRUN_NO_WAIT`, `reserved0` zero. The exit record is
/// the completion of the previous exit and any bytes are accepted.
pub const fn vm_run(r: &VmRun) -> Result<(), Invalid> {
    if r.flags & !VMRUN_NO_WAIT != 0 {
        return Err(Invalid::Flags);
    }
    if r.reserved0 != 0 {
        return Err(Invalid::Reserved);
    }
    Ok(())
}

/// `VmFork`: only `FORK_COPY`, `reserved0` zero. `child` and `tsc` are
/// outputs.
pub const fn vm_fork(f: &VmFork) -> Result<(), Invalid> {
    if f.flags & !FORK_COPY != 0 {
        return Err(Invalid::Flags);
    }
    if f.reserved0 != 0 {
        return Err(Invalid::Reserved);
    }
    Ok(())
}

/// The `LIST` ioctl: how many `VmInfo` records fit in a user buffer of
/// `len` bytes, at most [`MAX_VMS`].
pub const fn list_records(len: u64) -> u64 {
    let n = len / core::mem::size_of::<VmInfo>() as u64;
    if n > MAX_VMS as u64 {
        MAX_VMS as u64
    } else {
        n
    }
}

/// The `STATS` ioctl: the user buffer holds a whole `HvStats`.
pub const fn stats_buf(b: &IocBuf) -> Result<(), Invalid> {
    if b.len < core::mem::size_of::<crate::abi::HvStats>() as u64 {
        return Err(Invalid::Size);
    }
    Ok(())
}

/// The `VM_LOAD` ioctl: 1 byte to 4 GiB, `gpa + len` not wrapping.
pub const fn ioc_load(l: &IocLoad) -> Result<(), Invalid> {
    if l.len == 0 || l.len > VM_MAX_MEM {
        return Err(Invalid::Size);
    }
    if l.gpa.checked_add(l.len).is_none() {
        return Err(Invalid::Range);
    }
    Ok(())
}

/// One `hc::VM_LOAD` of a `VM_LOAD` ioctl: `len` bytes from offset `offset`
/// of the user buffer to guest-physical `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadChunk {
    pub gpa: u64,
    pub offset: u64,
    pub len: u64,
}

/// The chunks of a `VM_LOAD` ioctl that [`ioc_load`] accepted, in order,
/// [`LOAD_CHUNK`] bytes each but the last.
pub const fn load_chunks(l: &IocLoad) -> LoadChunks {
    LoadChunks { gpa: l.gpa, len: l.len, done: 0 }
}

/// Iterator of [`load_chunks`].
#[derive(Clone, Debug)]
pub struct LoadChunks {
    gpa: u64,
    len: u64,
    done: u64,
}

impl Iterator for LoadChunks {
    type Item = LoadChunk;
    fn next(&mut self) -> Option<LoadChunk> {
        if self.done >= self.len {
            return None;
        }
        let n = if self.len - self.done < LOAD_CHUNK { self.len - self.done } else { LOAD_CHUNK };
        let c = LoadChunk { gpa: self.gpa.wrapping_add(self.done), offset: self.done, len: n };
        self.done += n;
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::HvStats;

    fn create(mem_bytes: u64, vcpus: u32) -> VmCreate {
        VmCreate { mem_bytes, vcpus, ..Default::default() }
    }

    #[test]
    fn vm_create_bounds() {
        assert_eq!(vm_create(&create(2 << 20, 1)), Ok(()));
        assert_eq!(vm_create(&create(VM_MAX_MEM, VM_MAX_VCPUS)), Ok(()));
        assert_eq!(vm_create(&create(0, 1)), Err(Invalid::Size));
        assert_eq!(vm_create(&create(VM_MAX_MEM + VM_MEM_ALIGN, 1)), Err(Invalid::Size));
        assert_eq!(vm_create(&create((2 << 20) + 4096, 1)), Err(Invalid::Size));
        assert_eq!(vm_create(&create(2 << 20, 0)), Err(Invalid::Size));
        assert_eq!(vm_create(&create(2 << 20, VM_MAX_VCPUS + 1)), Err(Invalid::Size));
        assert_eq!(vm_create(&VmCreate { flags: VM_FLAG_LINUX, ..create(2 << 20, 1) }), Ok(()));
        assert_eq!(vm_create(&VmCreate { flags: VM_FLAG_LINUX | VM_FLAG_VMGENID, ..create(2 << 20, 1) }), Ok(()));
        assert_eq!(vm_create(&VmCreate { flags: VM_FLAG_VMGENID, ..create(2 << 20, 1) }), Err(Invalid::Flags));
        assert_eq!(vm_create(&VmCreate { flags: 4, ..create(2 << 20, 1) }), Err(Invalid::Flags));
        // Outputs and the name are not checked.
        assert_eq!(vm_create(&VmCreate { id: 7, name: [0xff; 32], ..create(2 << 20, 1) }), Ok(()));
    }

    #[test]
    fn vm_irq_lines_and_levels() {
        let q = VmIrq { vm: 1, gsi: 4, level: IRQ_PULSE, reserved0: 0 };
        assert_eq!(vm_irq(&q), Ok(()));
        assert_eq!(vm_irq(&VmIrq { gsi: IOAPIC_PINS - 1, level: crate::abi::IRQ_LOW, ..q }), Ok(()));
        assert_eq!(vm_irq(&VmIrq { gsi: IOAPIC_PINS, ..q }), Err(Invalid::Range));
        assert_eq!(vm_irq(&VmIrq { level: 3, ..q }), Err(Invalid::Flags));
        assert_eq!(vm_irq(&VmIrq { reserved0: 1, ..q }), Err(Invalid::Reserved));
    }

    #[test]
    fn donate_and_reclaim_sizes() {
        assert_eq!(donate_ranges(15), Err(Invalid::Size));
        assert_eq!(donate_ranges(16), Ok(1));
        assert_eq!(donate_ranges(16 * 256 + 15), Ok(256));
        assert_eq!(donate_ranges(16 * 257), Err(Invalid::Size));
        assert_eq!(mem_range(&MemRange { base: 0x1000, size: 0x1000 }), Ok(()));
        assert_eq!(mem_range(&MemRange { base: 0x1001, size: 0x1000 }), Err(Invalid::Range));
        assert_eq!(mem_range(&MemRange { base: 0x1000, size: 0x1800 }), Err(Invalid::Range));
        assert_eq!(mem_range(&MemRange { base: 0x1000, size: 0 }), Err(Invalid::Size));
        assert_eq!(mem_range(&MemRange { base: 0, size: 2 << 30 }), Err(Invalid::Size));
        assert_eq!(mem_range(&MemRange { base: 0xffff_ffff_ffff_f000, size: 0x2000 }), Err(Invalid::Range));
        assert_eq!(reclaim_count(7), Err(Invalid::Size));
        assert_eq!(reclaim_count(8), Ok(1));
        assert_eq!(reclaim_count(u64::MAX), Ok(RECLAIM_MAX));
    }

    #[test]
    fn load_rules() {
        let l = VmLoad { vm: 1, reserved0: 0, gpa: 0, src: 0x1000, len: 4096 };
        assert_eq!(vm_load(&l), Ok(()));
        assert_eq!(vm_load(&VmLoad { len: 0, ..l }), Err(Invalid::Size));
        assert_eq!(vm_load(&VmLoad { len: 4097, ..l }), Err(Invalid::Size));
        assert_eq!(vm_load(&VmLoad { src: 0x1001, ..l }), Err(Invalid::Range));
        assert_eq!(vm_load(&VmLoad { src: u64::MAX, len: 1, ..l }), Ok(()), "the last byte of the last page");
        assert_eq!(vm_load(&VmLoad { reserved0: 3, ..l }), Err(Invalid::Reserved));
        let i = IocLoad { gpa: 0x10_0000, data: 0, len: 10_000 };
        assert_eq!(ioc_load(&i), Ok(()));
        assert_eq!(ioc_load(&IocLoad { len: 0, ..i }), Err(Invalid::Size));
        assert_eq!(ioc_load(&IocLoad { len: VM_MAX_MEM + 1, ..i }), Err(Invalid::Size));
        assert_eq!(ioc_load(&IocLoad { gpa: u64::MAX - 5, ..i }), Err(Invalid::Range));
        let c: [LoadChunk; 3] = {
            let mut it = load_chunks(&i);
            [it.next().unwrap(), it.next().unwrap(), it.next().unwrap()]
        };
        assert_eq!(c[0], LoadChunk { gpa: 0x10_0000, offset: 0, len: 4096 });
        assert_eq!(c[2], LoadChunk { gpa: 0x10_2000, offset: 8192, len: 10_000 - 8192 });
        assert_eq!(load_chunks(&i).count(), 3);
        assert_eq!(load_chunks(&i).map(|c| c.len).sum::<u64>(), i.len);
    }

    #[test]
    fn register_rules() {
        let ok = Regs { rflags: 2, rip: 0x10_0000, cr3: 0x2000, ..Default::default() };
        assert_eq!(regs(&ok), Ok(()));
        assert_eq!(regs(&Regs { rflags: 0, ..ok }), Ok(()), "bit 1 is forced, not required");
        for bit in [0, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 18, 19, 20, 21] {
            assert_eq!(regs(&Regs { rflags: 2 | 1 << bit, ..ok }), Ok(()), "RFLAGS bit {bit}");
        }
        for bit in [3, 5, 15, 17, 22, 23, 63] {
            assert_eq!(regs(&Regs { rflags: 2 | 1 << bit, ..ok }), Err(Invalid::Register), "RFLAGS bit {bit}");
        }
        assert_eq!(regs(&Regs { rip: 0x0000_8000_0000_0000, ..ok }), Err(Invalid::Register));
        assert_eq!(regs(&Regs { rip: 0xffff_8000_0000_0000, ..ok }), Ok(()));
        assert_eq!(regs(&Regs { cr3: 0x2008, ..ok }), Err(Invalid::Register));
        assert_eq!(regs(&Regs { cr3: 1 << 52, ..ok }), Err(Invalid::Register));
        assert_eq!(regs(&Regs { cr0: u64::MAX, cr4: u64::MAX, efer: u64::MAX, ..ok }), Ok(()));
    }

    #[test]
    fn flags_and_reserved() {
        assert_eq!(vm_run(&VmRun { flags: VMRUN_NO_WAIT, ..Default::default() }), Ok(()));
        assert_eq!(vm_run(&VmRun { flags: 2, ..Default::default() }), Err(Invalid::Flags));
        assert_eq!(vm_run(&VmRun { reserved0: 1, ..Default::default() }), Err(Invalid::Reserved));
        assert_eq!(vm_fork(&VmFork { flags: FORK_COPY, child: 9, tsc: 9, ..Default::default() }), Ok(()));
        assert_eq!(vm_fork(&VmFork { flags: 2, ..Default::default() }), Err(Invalid::Flags));
        assert_eq!(vm_fork(&VmFork { reserved0: 1, ..Default::default() }), Err(Invalid::Reserved));
        assert_eq!(vm_id(&VmId { id: 5, reserved0: 0 }), Ok(()));
        assert_eq!(vm_id(&VmId { id: 5, reserved0: 1 }), Err(Invalid::Reserved));
        assert_eq!(debug_translate(&DebugTranslate { reserved0: 1, ..Default::default() }), Err(Invalid::Reserved));
    }

    #[test]
    fn buffers() {
        let size = core::mem::size_of::<HvStats>() as u64;
        assert_eq!(stats_buf(&IocBuf { ptr: 0, len: size }), Ok(()));
        assert_eq!(stats_buf(&IocBuf { ptr: 0, len: size - 1 }), Err(Invalid::Size));
        assert_eq!(list_records(87), 0);
        assert_eq!(list_records(88 * 3 + 5), 3);
        assert_eq!(list_records(u64::MAX), MAX_VMS as u64);
        assert_eq!(Invalid::Flags.errno(), errno::EINVAL);
    }
}
