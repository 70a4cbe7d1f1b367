//! Tiny guests: boot structures and a few bytes of code at 1 MiB, and the
//! model of what each VM and vCPU must do next.

use super::*;

pub(super) const CODE_GPA: u64 = guest::IMAGE_MIN_GPA;
/// Where loads that must not change the program go.
pub(super) const SCRATCH_GPA: u64 = 0x10_2000;
pub(super) const MIB: u64 = 1 << 20;

/// What a test VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prog {
    /// Nothing loaded: RIP 0 over zeroed page tables, a triple fault.
    None,
    /// `mov al, 42; out 0xf4, al`: exits with code 42.
    Exit42,
    /// `sti; hlt` in a loop.
    Halt,
    /// `in al, 0x80; out 0x80, al` in a loop: the value read comes back out.
    Io,
    /// VMM hypercall 0x1000, then `out 0x80, al` of its result.
    VmmCall,
    /// The fork hypercall, then `out 0x80, al` of its result.
    Fork,
    /// An undefined hypercall number with hostile arguments.
    BadCall(u64),
    /// `ud2` without an IDT.
    Ud2,
    /// `jmp $`.
    Spin,
    /// `inc qword [0x180000]; mov al, [0x180000]; out 0x80, al` in a loop:
    /// a counter in guest memory, seen through the port.
    Count,
    /// A tight loop that increments counters on two pages and compares
    /// them; every 64Ki rounds `out 0x80`; a difference ends the VM with
    /// code 1. Identical pages, written all the time: what a merge must
    /// not break.
    Twins,
    /// `mov rax, [rbx]; mov [rbx], rax` with RBX past the end of memory.
    Mmio,
    /// Any program, with CR3 beyond the end of guest memory.
    PtOob,
    /// State the model cannot predict (random registers or code).
    Unknown,
}

pub(super) const BAD_CALLS: [u64; 8] = [5, 0xfff, 0x2000, 0x2001, u64::MAX, 1 << 63, 0xdead_beef_0000_0001, 0x1_0000_0000];

pub(super) fn code(p: Prog) -> Vec<u8> {
    match p {
        Prog::Exit42 | Prog::PtOob => vec![0xb0, 0x2a, 0xe6, 0xf4, 0xeb, 0xfe],
        Prog::Halt => vec![0xfb, 0xf4, 0xeb, 0xfd],
        Prog::Io => vec![0xe4, 0x80, 0xe6, 0x80, 0xeb, 0xfa],
        Prog::VmmCall => vec![0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x01, 0xc1, 0xe6, 0x80, 0xeb, 0xf4],
        Prog::Fork => vec![0xb8, 0x02, 0x00, 0x00, 0x00, 0x0f, 0x01, 0xc1, 0xe6, 0x80, 0xeb, 0xf4],
        Prog::BadCall(nr) => {
            let mut c = vec![0x48, 0xb8];
            c.extend_from_slice(&nr.to_le_bytes());
            // mov rdi, -1; mov rsi, i64::MIN; mov rdx, u64::MAX
            c.extend_from_slice(&[0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff]);
            c.extend_from_slice(&[0x48, 0xbe]);
            c.extend_from_slice(&(1u64 << 63).to_le_bytes());
            c.extend_from_slice(&[0x48, 0xc7, 0xc2, 0xff, 0xff, 0xff, 0xff]);
            c.extend_from_slice(&[0x0f, 0x01, 0xc1, 0xeb, 0xfe]);
            c
        }
        Prog::Ud2 => vec![0x0f, 0x0b],
        Prog::Spin => vec![0xeb, 0xfe],
        Prog::Mmio => vec![0x48, 0x8b, 0x03, 0x48, 0x89, 0x03, 0xeb, 0xf8],
        Prog::Count => vec![
            0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // inc qword [0x180000]
            0x8a, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // mov al, [0x180000]
            0xe6, 0x80, // out 0x80, al
            0xeb, 0xed, // jmp 0
        ],
        Prog::Twins => vec![
            0x48, 0xc7, 0xc1, 0x00, 0x00, 0x01, 0x00, // 0: mov rcx, 0x10000
            0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // 7: inc qword [0x180000]
            0x48, 0xff, 0x04, 0x25, 0x00, 0x10, 0x18, 0x00, // 15: inc qword [0x181000]
            0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x18, 0x00, // 23: mov rax, [0x180000]
            0x48, 0x3b, 0x04, 0x25, 0x00, 0x10, 0x18, 0x00, // 31: cmp rax, [0x181000]
            0x75, 0x0b, // 39: jne 52
            0x48, 0xff, 0xc9, // 41: dec rcx
            0x75, 0xd9, // 44: jnz 7
            0xe6, 0x80, // 46: out 0x80, al
            0xeb, 0xce, // 48: jmp 0
            0x90, 0x90, // 50
            0xb0, 0x01, // 52: mov al, 1
            0xe6, 0xf4, // 54: out 0xf4, al
            0xeb, 0xfe, // 56: jmp $
        ],
        Prog::None | Prog::Unknown => vec![],
    }
}

/// The GDT, PML4, PDPT and page directories of `docs/guest-abi.md`, as one
/// block at `GDT_GPA`. With `mmio`, the 2 MiB just past memory is mapped too.
pub(super) fn boot_blob(mem: u64, mmio: bool) -> Vec<u8> {
    let gigs = mem.div_ceil(1 << 30);
    let mut b = vec![0u8; (0x3000 + gigs * 0x1000) as usize];
    let put = |b: &mut Vec<u8>, gpa: u64, v: u64| {
        let o = (gpa - guest::GDT_GPA) as usize;
        b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(&mut b, guest::GDT_GPA + 8, 0x00af_9b00_0000_ffff);
    put(&mut b, guest::GDT_GPA + 16, 0x00cf_9300_0000_ffff);
    put(&mut b, guest::PML4_GPA, guest::PDPT_GPA | 3);
    for g in 0..gigs {
        put(&mut b, guest::PDPT_GPA + 8 * g, (guest::PD_GPA + g * 4096) | 3);
    }
    let mut a = 0;
    while a < mem {
        put(&mut b, guest::PD_GPA + 8 * (a >> 21), a | 0x83);
        a += 2 * MIB;
    }
    if mmio {
        put(&mut b, guest::PD_GPA + 8 * (mem >> 21), mem | 0x83);
    }
    b
}

pub(super) fn prog_regs(p: Prog, mem: u64) -> Regs {
    Regs {
        rip: CODE_GPA,
        rsp: mem,
        rdi: mem,
        rbx: mem + 0x100,
        rflags: 2,
        cr3: if p == Prog::PtOob { mem + 0x1000 } else { guest::PML4_GPA },
        ..Default::default()
    }
}

/// What the next exit of a vCPU must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    Any,
    Exit42,
    Halt,
    Spin,
    /// A stop, with this reason if known.
    Shutdown(Option<u32>),
    In,
    /// A write of this byte (if known) to port 0x80.
    Out(Option<u8>),
    MmioRead,
    MmioWrite(Option<u64>),
    Call(u64),
    ForkCall,
}

pub(super) fn first_expect(p: Prog) -> Expect {
    match p {
        Prog::None => Expect::Shutdown(None),
        Prog::Exit42 => Expect::Exit42,
        Prog::Halt => Expect::Halt,
        Prog::Io => Expect::In,
        Prog::VmmCall => Expect::Call(abi::ghc::VMM_FIRST),
        Prog::Fork => Expect::ForkCall,
        Prog::BadCall(_) => Expect::Shutdown(Some(stop::BAD_HYPERCALL)),
        Prog::Ud2 => Expect::Shutdown(Some(stop::TRIPLE_FAULT)),
        Prog::Spin => Expect::Spin,
        Prog::Count => Expect::Out(Some(1)),
        Prog::Twins => Expect::Out(Some(0)),
        Prog::Mmio => Expect::MmioRead,
        Prog::PtOob => Expect::Shutdown(Some(stop::BAD_INSTRUCTION)),
        Prog::Unknown => Expect::Any,
    }
}

/// A completion the next RUN of a vCPU delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pend {
    In,
    MmioRead,
    /// A hypercall with this number waits for `hc_ret`.
    Call(u64),
}

#[derive(Clone, Copy, Debug)]
pub(super) struct VcpuM {
    /// Entered at least once: its initial registers are fixed.
    pub(super) ready: bool,
    /// Forked from a vCPU that had run: it starts where that one stood.
    pub(super) snap: bool,
    pub(super) expect: Expect,
    pub(super) pending: Option<Pend>,
}

/// The model of one VM.
#[derive(Clone, Debug)]
pub(super) struct VmM {
    pub(super) id: u32,
    pub(super) fds: Vec<i32>,
    pub(super) mem: u64,
    pub(super) vcpus: Vec<VcpuM>,
    pub(super) prog: Prog,
    pub(super) parent: u32,
    /// Live children, as the hypervisor counts them for the limit.
    pub(super) children: u32,
    /// Destroyed through DESTROY while descriptors remain.
    pub(super) destroyed: bool,
    /// The final record once the VM has ended: (kind, reason, data).
    pub(super) fin: Option<(u32, u32, u64)>,
    /// A RUN whose record was lost may have ended it.
    pub(super) fin_unknown: bool,
    pub(super) name: [u8; abi::VM_NAME_LEN],
}

impl VmM {
    pub(super) fn new(id: u32, fd: i32, mem: u64, vcpus: u32, parent: u32, name: [u8; abi::VM_NAME_LEN]) -> VmM {
        VmM {
            id,
            fds: vec![fd],
            mem,
            vcpus: vec![VcpuM { ready: false, snap: false, expect: Expect::Shutdown(None), pending: None }; vcpus as usize],
            prog: Prog::None,
            parent,
            children: 0,
            destroyed: false,
            fin: None,
            fin_unknown: false,
            name,
        }
    }

    pub(super) fn entered(&self) -> bool {
        self.vcpus.iter().any(|v| v.ready)
    }

    /// What follows an `out 0x80` in this VM's program.
    pub(super) fn after_out(&self) -> Expect {
        match self.prog {
            Prog::Io => Expect::In,
            Prog::VmmCall => Expect::Call(abi::ghc::VMM_FIRST),
            Prog::Fork => Expect::ForkCall,
            Prog::Twins => Expect::Out(Some(0)),
            _ => Expect::Any,
        }
    }

    pub(super) fn set_unknown(&mut self) {
        self.prog = Prog::Unknown;
        for v in &mut self.vcpus {
            v.expect = Expect::Any;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn programs_jump_back_to_their_start() {
        // The last two bytes of the looping programs are `jmp rel8` back to 0
        // (Twins: the jmp at 48 goes to 0 as well).
        for p in [Prog::Io, Prog::VmmCall, Prog::Fork, Prog::Count] {
            let c = code(p);
            let n = c.len() as i64;
            assert_eq!(c[c.len() - 2], 0xeb);
            assert_eq!(n + c[c.len() - 1] as i8 as i64, 0, "{p:?}");
        }
        let t = code(Prog::Twins);
        assert_eq!(50 + t[49] as i8 as i64, 0);
        assert_eq!(41 + t[40] as i8 as i64, 52);
        assert_eq!(46 + t[45] as i8 as i64, 7);
        assert_eq!(code(Prog::Halt), [0xfb, 0xf4, 0xeb, 0xfd]);
    }

    #[test]
    pub(super) fn boot_blob_maps_memory_and_the_mmio_page() {
        let b = boot_blob(4 * MIB, true);
        let at = |gpa: u64| u64::from_le_bytes(b[(gpa - guest::GDT_GPA) as usize..][..8].try_into().unwrap());
        assert_eq!(at(guest::PML4_GPA), guest::PDPT_GPA | 3);
        assert_eq!(at(guest::PD_GPA + 8), 2 * MIB | 0x83);
        assert_eq!(at(guest::PD_GPA + 16), 4 * MIB | 0x83);
        assert_eq!(at(guest::PD_GPA + 24), 0);
    }
}
