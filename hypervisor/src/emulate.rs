//! Emulation of guest instructions that touch protected memory.
//!
//! When the host VM reads or writes a page it no longer owns (the hypervisor
//! region, a guest's frame), the access exits with an EPT violation. The
//! instruction is decoded with `iced-x86` and carried out here with the
//! protected part neutralised: reads see zeros, writes are dropped, and every
//! other part of the instruction (registers, unprotected memory, string
//! counters) behaves as the CPU would. Instructions this module does not
//! know are skipped, which is also a neutralisation.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

pub use crate::paging::PageFault;

/// The guest register state the emulator reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuRegs {
    /// GPRs in encoding order: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// How an access was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Ordinary guest memory: the bytes were really read or written.
    Normal,
    /// Protected memory: the read gave zeros or the write was dropped.
    Blocked,
}

/// Guest memory as seen through the guest's page tables.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at linear address `la`.
    fn read(&mut self, la: u64, buf: &mut [u8]) -> Result<Access, PageFault>;
    /// Writes `buf` at linear address `la`.
    fn write(&mut self, la: u64, buf: &[u8]) -> Result<Access, PageFault>;
}

/// What emulation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub blocked_reads: u32,
    pub blocked_writes: u32,
    /// Whether RIP moved past the instruction. A string instruction may stop
    /// early, with its registers updated, for the CPU to continue natively.
    pub completed: bool,
}

/// Why emulation did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmuError {
    /// The bytes are not a valid instruction.
    Decode,
    /// An instruction this module does not emulate.
    Unsupported(Mnemonic),
    /// A page fault on the unprotected side of the access: the guest must
    /// take it (the caller injects it) and the instruction is retried.
    PageFault(PageFault),
}

/// Most string-instruction elements emulated in one exit.
pub const MAX_REP: u64 = 1 << 16;

fn is_high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn reg_index(r: Register) -> usize {
    r.full_register().number()
}

/// Reads a general-purpose register with its size.
pub fn read_reg(regs: &EmuRegs, r: Register) -> u64 {
    let full = regs.gpr[reg_index(r)];
    if is_high_byte(r) {
        return (full >> 8) & 0xff;
    }
    match r.size() {
        1 => full & 0xff,
        2 => full & 0xffff,
        4 => full & 0xffff_ffff,
        _ => full,
    }
}

/// Writes a general-purpose register with x86 semantics: 32-bit writes
/// zero-extend, 8- and 16-bit writes merge.
pub fn write_reg(regs: &mut EmuRegs, r: Register, v: u64) {
    let i = reg_index(r);
    let old = regs.gpr[i];
    regs.gpr[i] = if is_high_byte(r) {
        (old & !0xff00) | ((v & 0xff) << 8)
    } else {
        match r.size() {
            1 => (old & !0xff) | (v & 0xff),
            2 => (old & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        }
    };
}

fn register_value(regs: &EmuRegs, r: Register) -> Option<u64> {
    match r {
        Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
        Register::FS => Some(regs.fs_base),
        Register::GS => Some(regs.gs_base),
        Register::RIP => Some(regs.rip),
        Register::EIP => Some(regs.rip & 0xffff_ffff),
        r if r.is_gpr() => Some(read_reg(regs, r)),
        _ => None,
    }
}

fn sign_extend(v: u64, bytes: usize) -> u64 {
    let shift = 64 - 8 * bytes as u32;
    (((v << shift) as i64) >> shift) as u64
}

/// Decodes the instruction at `regs.rip` from `bytes` (at most 15 bytes
/// fetched there) in a `bitness`-bit code segment and emulates it.
pub fn emulate(bytes: &[u8], bitness: u32, regs: &mut EmuRegs, mem: &mut impl GuestMemory) -> Result<Outcome, EmuError> {
    let mut dec = Decoder::with_ip(bitness, bytes, regs.rip, DecoderOptions::NONE);
    let ins = dec.decode();
    if ins.is_invalid() {
        return Err(EmuError::Decode);
    }
    let mut out = Outcome::default();
    let note = |out: &mut Outcome, a: Access, write: bool| {
        if a == Access::Blocked {
            if write {
                out.blocked_writes += 1;
            } else {
                out.blocked_reads += 1;
            }
        }
    };
    match ins.mnemonic() {
        Mnemonic::Mov if ins.op_count() == 2 && ins.op0_kind() == OpKind::Memory => {
            let size = ins.memory_size().size();
            let v = match ins.op1_kind() {
                OpKind::Register if ins.op1_register().is_gpr() => read_reg(regs, ins.op1_register()),
                OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64 => ins.immediate(1),
                _ => return Err(EmuError::Unsupported(ins.mnemonic())),
            };
            let la = address(&ins, 0, regs)?;
            let a = mem.write(la, &v.to_le_bytes()[..size]).map_err(EmuError::PageFault)?;
            note(&mut out, a, true);
        }
        Mnemonic::Mov | Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd
            if ins.op_count() == 2 && ins.op1_kind() == OpKind::Memory && ins.op0_register().is_gpr() =>
        {
            let size = ins.memory_size().size();
            let la = address(&ins, 1, regs)?;
            let mut b = [0u8; 8];
            let a = mem.read(la, &mut b[..size]).map_err(EmuError::PageFault)?;
            note(&mut out, a, false);
            let mut v = u64::from_le_bytes(b);
            if matches!(ins.mnemonic(), Mnemonic::Movsx | Mnemonic::Movsxd) {
                v = sign_extend(v, size);
            }
            write_reg(regs, ins.op0_register(), v);
        }
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
            if ins.op0_kind() == OpKind::MemoryESRDI || ins.op0_kind() == OpKind::MemoryESEDI =>
        {
            return string_op(&ins, regs, mem, StringKind::Movs);
        }
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
            return string_op(&ins, regs, mem, StringKind::Stos);
        }
        Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
            return string_op(&ins, regs, mem, StringKind::Lods);
        }
        other => return Err(EmuError::Unsupported(other)),
    }
    regs.rip = ins.next_ip();
    out.completed = true;
    Ok(out)
}

fn address(ins: &Instruction, op: u32, regs: &EmuRegs) -> Result<u64, EmuError> {
    ins.virtual_address(op, 0, |r, _, _| register_value(regs, r)).ok_or(EmuError::Unsupported(ins.mnemonic()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StringKind {
    Movs,
    Stos,
    Lods,
}

fn string_op(ins: &Instruction, regs: &mut EmuRegs, mem: &mut impl GuestMemory, kind: StringKind) -> Result<Outcome, EmuError> {
    let size = ins.memory_size().size() as u64;
    let rep = ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix();
    let a32 = matches!(ins.op0_kind(), OpKind::MemoryESEDI | OpKind::MemorySegESI)
        || matches!(ins.op1_kind(), OpKind::MemorySegESI);
    let mask = if a32 { 0xffff_ffffu64 } else { u64::MAX };
    let step = if regs.rflags & (1 << 10) != 0 { size.wrapping_neg() } else { size };
    let (rsi, rdi, rcx, rax) = (6usize, 7usize, 1usize, 0usize);
    let src_seg = match ins.memory_segment() {
        Register::FS => regs.fs_base,
        Register::GS => regs.gs_base,
        _ => 0,
    };
    let mut out = Outcome::default();
    let mut done = 0u64;
    loop {
        if rep && regs.gpr[rcx] & mask == 0 {
            break;
        }
        let mut buf = [0u8; 8];
        let mut any_blocked = false;
        if kind != StringKind::Stos {
            let la = src_seg.wrapping_add(regs.gpr[rsi] & mask);
            let a = mem.read(la, &mut buf[..size as usize]).map_err(EmuError::PageFault)?;
            any_blocked |= a == Access::Blocked;
            if a == Access::Blocked {
                out.blocked_reads += 1;
            }
        } else {
            buf = regs.gpr[rax].to_le_bytes();
        }
        match kind {
            StringKind::Movs | StringKind::Stos => {
                let la = regs.gpr[rdi] & mask;
                let a = mem.write(la, &buf[..size as usize]).map_err(EmuError::PageFault)?;
                any_blocked |= a == Access::Blocked;
                if a == Access::Blocked {
                    out.blocked_writes += 1;
                }
            }
            StringKind::Lods => {
                let v = u64::from_le_bytes(buf);
                let r = match size {
                    1 => Register::AL,
                    2 => Register::AX,
                    4 => Register::EAX,
                    _ => Register::RAX,
                };
                write_reg(regs, r, v);
            }
        }
        if kind != StringKind::Stos {
            regs.gpr[rsi] = (regs.gpr[rsi] & !mask) | (regs.gpr[rsi].wrapping_add(step) & mask);
        }
        if kind != StringKind::Lods {
            regs.gpr[rdi] = (regs.gpr[rdi] & !mask) | (regs.gpr[rdi].wrapping_add(step) & mask);
        }
        done += 1;
        if !rep {
            break;
        }
        regs.gpr[rcx] = (regs.gpr[rcx] & !mask) | (regs.gpr[rcx].wrapping_sub(1) & mask);
        // Once an element touched nothing protected, the CPU can carry on.
        if !any_blocked || done >= MAX_REP {
            if regs.gpr[rcx] & mask != 0 {
                return Ok(out);
            }
            break;
        }
    }
    regs.rip = ins.next_ip();
    out.completed = true;
    Ok(out)
}

/// A guest's access to guest-physical memory outside its RAM, decoded for
/// the VMM to emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioOp {
    pub is_write: bool,
    pub size: u8,
    /// The value written (for a store).
    pub data: u64,
    /// Destination GPR (encoding order) of a load, and whether it is a
    /// high-byte register (AH..BH).
    pub reg: u8,
    pub high_byte: bool,
    /// Zero- or sign-extension of a load: the destination's size.
    pub dest_size: u8,
    pub sign_extend: bool,
    pub next_rip: u64,
}

/// Decodes a MOV-family instruction that touches MMIO. Only plain moves
/// (and MOVZX/MOVSX) are emulated; anything else returns `None`.
pub fn decode_mmio(bytes: &[u8], bitness: u32, regs: &EmuRegs) -> Option<MmioOp> {
    let mut dec = Decoder::with_ip(bitness, bytes, regs.rip, DecoderOptions::NONE);
    let ins = dec.decode();
    if ins.is_invalid() {
        return None;
    }
    let size = ins.memory_size().size() as u8;
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    match ins.mnemonic() {
        Mnemonic::Mov if ins.op_count() == 2 && ins.op0_kind() == OpKind::Memory => {
            let data = match ins.op1_kind() {
                OpKind::Register if ins.op1_register().is_gpr() => read_reg(regs, ins.op1_register()),
                OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64 => ins.immediate(1),
                _ => return None,
            };
            Some(MmioOp { is_write: true, size, data, reg: 0, high_byte: false, dest_size: size, sign_extend: false, next_rip: ins.next_ip() })
        }
        Mnemonic::Mov | Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd
            if ins.op_count() == 2 && ins.op1_kind() == OpKind::Memory && ins.op0_register().is_gpr() =>
        {
            let r = ins.op0_register();
            Some(MmioOp {
                is_write: false,
                size,
                data: 0,
                reg: reg_index(r) as u8,
                high_byte: is_high_byte(r),
                dest_size: if is_high_byte(r) { 1 } else { r.size() as u8 },
                sign_extend: matches!(ins.mnemonic(), Mnemonic::Movsx | Mnemonic::Movsxd),
                next_rip: ins.next_ip(),
            })
        }
        _ => None,
    }
}

/// Completes an MMIO load: `value` (of `op.size` bytes) into the register.
pub fn complete_mmio_read(regs: &mut EmuRegs, op: &MmioOp, value: u64) {
    let mask = if op.size == 8 { u64::MAX } else { (1u64 << (8 * op.size as u32)) - 1 };
    let mut v = value & mask;
    if op.sign_extend {
        v = sign_extend(v, op.size as usize);
    }
    let i = op.reg as usize;
    let old = regs.gpr[i];
    regs.gpr[i] = if op.high_byte {
        (old & !0xff00) | ((v & 0xff) << 8)
    } else {
        match op.dest_size {
            1 => (old & !0xff) | (v & 0xff),
            2 => (old & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        }
    };
    regs.rip = op.next_rip;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Linear memory: protected pages read as zeros and drop writes; absent
    /// pages fault.
    #[derive(Default)]
    struct Mem {
        bytes: HashMap<u64, u8>,
        protected: Vec<(u64, u64)>,
        absent: Vec<(u64, u64)>,
    }

    impl Mem {
        fn is_protected(&self, la: u64, len: usize) -> bool {
            self.protected.iter().any(|&(b, e)| la < e && la + len as u64 > b)
        }
        fn check_absent(&self, la: u64, write: bool) -> Result<(), PageFault> {
            if self.absent.iter().any(|&(b, e)| la >= b && la < e) {
                return Err(PageFault { addr: la, error_code: (write as u32) << 1 });
            }
            Ok(())
        }
        fn get(&self, la: u64) -> u8 {
            *self.bytes.get(&la).unwrap_or(&0)
        }
    }

    impl GuestMemory for Mem {
        fn read(&mut self, la: u64, buf: &mut [u8]) -> Result<Access, PageFault> {
            self.check_absent(la, false)?;
            if self.is_protected(la, buf.len()) {
                buf.fill(0);
                return Ok(Access::Blocked);
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.get(la + i as u64);
            }
            Ok(Access::Normal)
        }
        fn write(&mut self, la: u64, buf: &[u8]) -> Result<Access, PageFault> {
            self.check_absent(la, true)?;
            if self.is_protected(la, buf.len()) {
                return Ok(Access::Blocked);
            }
            for (i, b) in buf.iter().enumerate() {
                self.bytes.insert(la + i as u64, *b);
            }
            Ok(Access::Normal)
        }
    }

    const PROT: u64 = 0x10_0000;

    fn mem() -> Mem {
        let mut m = Mem { protected: vec![(PROT, PROT + 0x2000)], ..Default::default() };
        for i in 0..0x3000u64 {
            m.bytes.insert(PROT + i, 0xaa); // the secret behind the protection
        }
        m
    }

    fn regs() -> EmuRegs {
        let mut r = EmuRegs { rip: 0x1000, rflags: 2, ..Default::default() };
        for i in 0..16 {
            r.gpr[i] = 0x1111_1111_1111_1111 * (i as u64 % 8 + 1);
        }
        r
    }

    #[test]
    fn loads_see_zeros_with_register_size_semantics() {
        let mut m = mem();
        // mov rax, [rbx] ; mov ecx, [rbx] ; mov dx, [rbx] ; mov bh, [rbx]
        for (code, reg, want) in [
            (&[0x48, 0x8b, 0x03][..], 0usize, 0u64),
            (&[0x8b, 0x0b][..], 1, 0),
            (&[0x66, 0x8b, 0x13][..], 2, 0x3333_3333_3333_0000),
            (&[0x8a, 0x3b][..], 3, 0),
        ] {
            let mut r = regs();
            r.gpr[3] = PROT + 0x10;
            let before_rbx = r.gpr[3];
            let out = emulate(code, 64, &mut r, &mut m).unwrap();
            assert_eq!(out, Outcome { blocked_reads: 1, blocked_writes: 0, completed: true });
            assert_eq!(r.rip, 0x1000 + code.len() as u64);
            if reg == 3 {
                // BH is bits 15:8 of RBX: only they change.
                assert_eq!(r.gpr[3], before_rbx & !0xff00);
            } else {
                assert_eq!(r.gpr[reg], want, "register {reg}");
            }
        }
    }

    #[test]
    fn movzx_movsx_from_protected() {
        let mut m = mem();
        let mut r = regs();
        r.gpr[6] = PROT; // rsi
        // movzx eax, byte [rsi]; movsx rcx, word [rsi+2]
        emulate(&[0x0f, 0xb6, 0x06], 64, &mut r, &mut m).unwrap();
        assert_eq!(r.gpr[0], 0);
        r.rip = 0x1000;
        emulate(&[0x48, 0x0f, 0xbf, 0x4e, 0x02], 64, &mut r, &mut m).unwrap();
        assert_eq!(r.gpr[1], 0);
    }

    #[test]
    fn loads_from_normal_memory_are_real() {
        let mut m = mem();
        m.bytes.insert(0x5000, 0x7f);
        m.bytes.insert(0x5001, 0x80);
        let mut r = regs();
        r.gpr[3] = 0x5000;
        // movsx eax, word [rbx]
        let out = emulate(&[0x0f, 0xbf, 0x03], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_reads, 0);
        assert_eq!(r.gpr[0], 0xffff_807f);
    }

    #[test]
    fn stores_are_dropped() {
        let mut m = mem();
        let mut r = regs();
        r.gpr[7] = PROT + 0x100; // rdi
        // mov [rdi], rax ; mov dword [rdi+8], 0x12345678
        let out = emulate(&[0x48, 0x89, 0x07], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_writes, 1);
        r.rip = 0x1000;
        let out = emulate(&[0xc7, 0x47, 0x08, 0x78, 0x56, 0x34, 0x12], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_writes, 1);
        assert!((0..16).all(|i| m.get(PROT + 0x100 + i) == 0xaa));
    }

    #[test]
    fn rep_movsb_out_of_protected_memory_copies_zeros() {
        // copy_to_user: source protected, destination ordinary memory.
        let mut m = mem();
        for i in 0..64 {
            m.bytes.insert(0x8000 + i, 0x55);
        }
        let mut r = regs();
        r.gpr[6] = PROT + 0x20; // rsi
        r.gpr[7] = 0x8000; // rdi
        r.gpr[1] = 64; // rcx
        let out = emulate(&[0xf3, 0xa4], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_reads, 64);
        assert!(out.completed);
        assert_eq!(r.gpr[1], 0);
        assert_eq!(r.gpr[6], PROT + 0x20 + 64);
        assert_eq!(r.gpr[7], 0x8000 + 64);
        assert!((0..64).all(|i| m.get(0x8000 + i) == 0));
        assert_eq!(r.rip, 0x1002);
    }

    #[test]
    fn rep_movsq_into_protected_memory_is_dropped() {
        // copy_from_user: source ordinary, destination protected.
        let mut m = mem();
        let mut r = regs();
        r.gpr[6] = 0x9000;
        r.gpr[7] = PROT;
        r.gpr[1] = 16;
        let out = emulate(&[0xf3, 0x48, 0xa5], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_writes, 16);
        assert!((0..128).all(|i| m.get(PROT + i) == 0xaa));
        assert_eq!(r.gpr[7], PROT + 128);
    }

    #[test]
    fn rep_stops_where_protection_ends() {
        // The copy runs from the last protected bytes into ordinary memory:
        // only the protected elements are emulated; the CPU does the rest.
        let mut m = mem();
        let mut r = regs();
        r.gpr[6] = PROT + 0x2000 - 4;
        r.gpr[7] = 0x8000;
        r.gpr[1] = 100;
        let out = emulate(&[0xf3, 0xa4], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_reads, 4);
        assert!(!out.completed);
        assert_eq!(r.rip, 0x1000, "the CPU resumes the same instruction");
        assert_eq!(r.gpr[1], 100 - 5);
        assert_eq!(r.gpr[6], PROT + 0x2000 + 1);
    }

    #[test]
    fn direction_flag_counts_down() {
        let mut m = mem();
        let mut r = regs();
        r.rflags |= 1 << 10;
        r.gpr[6] = PROT + 0x100;
        r.gpr[7] = 0x8100;
        r.gpr[1] = 4;
        emulate(&[0xf3, 0xa4], 64, &mut r, &mut m).unwrap();
        assert_eq!(r.gpr[6], PROT + 0x100 - 4);
        assert_eq!(r.gpr[7], 0x8100 - 4);
    }

    #[test]
    fn destination_fault_is_reported() {
        let mut m = mem();
        m.absent.push((0xa000, 0xb000));
        let mut r = regs();
        r.gpr[6] = PROT;
        r.gpr[7] = 0xa000;
        r.gpr[1] = 8;
        let err = emulate(&[0xf3, 0xa4], 64, &mut r, &mut m).unwrap_err();
        assert_eq!(err, EmuError::PageFault(PageFault { addr: 0xa000, error_code: 2 }));
        assert_eq!(r.gpr[1], 8, "nothing consumed before the fault");
        assert_eq!(r.rip, 0x1000);
    }

    #[test]
    fn stos_and_lods() {
        let mut m = mem();
        let mut r = regs();
        r.gpr[7] = PROT;
        r.gpr[1] = 3;
        let out = emulate(&[0xf3, 0x48, 0xab], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_writes, 3);
        r.rip = 0x1000;
        r.gpr[6] = PROT + 8;
        let out = emulate(&[0xac], 64, &mut r, &mut m).unwrap(); // lodsb
        assert_eq!(out.blocked_reads, 1);
        assert_eq!(r.gpr[0] & 0xff, 0);
    }

    #[test]
    fn segment_override_and_rip_relative() {
        let mut m = mem();
        let mut r = regs();
        r.gs_base = PROT;
        // mov rax, gs:[0x18]
        let out = emulate(&[0x65, 0x48, 0x8b, 0x04, 0x25, 0x18, 0, 0, 0], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_reads, 1);
        // mov rcx, [rip + 0x10] with rip such that the target is protected
        let mut r = regs();
        r.rip = PROT - 7 - 0x10;
        let out = emulate(&[0x48, 0x8b, 0x0d, 0x10, 0, 0, 0], 64, &mut r, &mut m).unwrap();
        assert_eq!(out.blocked_reads, 1);
        assert_eq!(r.gpr[1], 0);
    }

    #[test]
    fn mmio_decode_and_complete() {
        let mut r = regs();
        r.gpr[0] = 0x1122_3344_5566_7788;
        // mov [rbx], eax
        let op = decode_mmio(&[0x89, 0x03], 64, &r).unwrap();
        assert_eq!((op.is_write, op.size, op.data, op.next_rip), (true, 4, 0x5566_7788, 0x1002));
        // mov byte [rbx], 0x5a
        let op = decode_mmio(&[0xc6, 0x03, 0x5a], 64, &r).unwrap();
        assert_eq!((op.is_write, op.size, op.data), (true, 1, 0x5a));
        // movzx ecx, word [rbx] -> ecx = 0xbeef, upper cleared
        let op = decode_mmio(&[0x0f, 0xb7, 0x0b], 64, &r).unwrap();
        assert!(!op.is_write);
        complete_mmio_read(&mut r, &op, 0xffff_beef);
        assert_eq!(r.gpr[1], 0xbeef);
        assert_eq!(r.rip, 0x1003);
        // mov ah, [rbx]
        let op = decode_mmio(&[0x8a, 0x23], 64, &r).unwrap();
        complete_mmio_read(&mut r, &op, 0xab);
        assert_eq!(r.gpr[0], 0x1122_3344_5566_ab88);
        // add [rbx], eax is not an MMIO move
        assert_eq!(decode_mmio(&[0x01, 0x03], 64, &r), None);
    }

    #[test]
    fn unknown_instructions_are_reported() {
        let mut m = mem();
        let mut r = regs();
        r.gpr[3] = PROT;
        // add rax, [rbx]
        assert_eq!(emulate(&[0x48, 0x03, 0x03], 64, &mut r, &mut m), Err(EmuError::Unsupported(Mnemonic::Add)));
        assert_eq!(emulate(&[0x0f, 0xff], 64, &mut r, &mut m), Err(EmuError::Decode));
    }
}
