//! Hostile hypercalls. Every defined guest hypercall is called with huge
//! and negative arguments and must answer as `docs/hypercalls.md` says; the
//! VMM's range gets garbage too. Then an undefined number (command line
//! `nr=N`, default 0xdead_beef) with hostile arguments must stop the VM
//! with `bad-hypercall`: it never returns here.
//!
//! With `mode=user` the guest goes to ring 3 instead (user pages, user
//! segments, IOPL 3 for its console) and calls FORK there: VMCALL at CPL 3
//! is #UD, which without an IDT is a triple fault. A VMCALL that returned
//! would end the VM with exit code 3.
#![no_std]
#![no_main]

use shared_abi::{errno, ghc, guest, ABI_REVISION};
use uxen_test_guests::{arg, cmdline, exit, hypercall, println, vm_id};

const HOSTILE: [u64; 6] = [u64::MAX, 1 << 63, 0x7fff_ffff_ffff_ffff, 0xffff_ffff, 0x1_0000_0020, 0];

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let id = vm_id();
    if cmdline().split(' ').any(|w| w == "mode=user") {
        to_ring3(mem);
    }
    let (mut ok, mut bad) = (0, 0);
    let mut expect = |what: &str, a: u64, got: i64, want: i64| {
        if got == want {
            ok += 1;
        } else {
            bad += 1;
            println!("hypercall: FAIL {what}({a:#x}) = {got}, want {want}");
        }
    };
    for &a in &HOSTILE {
        expect("VERSION", a, hypercall(ghc::VERSION, a, !a, a >> 1), ABI_REVISION as i64);
        expect("VM_ID", a, hypercall(ghc::VM_ID, a, !a, a), id);
        let k = hypercall(ghc::TSC_KHZ, a, a, a);
        expect("TSC_KHZ >= 0", a, k.min(0), 0);
        // A deadline with a vector outside 32..=255 is refused.
        for v in [0, 1, 31, 256, a | 0x1_0000_0000] {
            expect("SET_TIMER vector", v, hypercall(ghc::SET_TIMER, a | 1, v, a), -errno::EINVAL);
        }
        // A deadline of 0 cancels, whatever the vector.
        expect("SET_TIMER cancel", a, hypercall(ghc::SET_TIMER, 0, a, a), 0);
        // The VMM's range: uxenctl answers the first number, refuses the rest.
        expect("VMM_FIRST", a, hypercall(ghc::VMM_FIRST, a, a, a), ABI_REVISION as i64);
        for n in [ghc::VMM_FIRST + 1, 0x1abc, ghc::VMM_LAST] {
            expect("VMM range", n, hypercall(n, a, !a, a), -errno::ENOSYS);
        }
    }
    // A deadline that never comes, then cancelled: no interrupt arrives
    // (there is no IDT to take it).
    expect("SET_TIMER far", 0, hypercall(ghc::SET_TIMER, u64::MAX, 255, 0), 0);
    expect("SET_TIMER cancel", 0, hypercall(ghc::SET_TIMER, 0, 0, 0), 0);
    println!("hypercall: vm{id}: {ok} checks ok, {bad} failed");
    if bad != 0 {
        return 1;
    }
    let nr = arg("nr", 0xdead_beef);
    println!("hypercall: calling {nr:#x}");
    let r = hypercall(nr, u64::MAX, 1 << 63, u64::MAX);
    println!("hypercall: FAIL: still running after hypercall {nr:#x} returned {r}");
    2
}

/// null, kernel code 0x08, kernel data 0x10, user data 0x18, user code 0x20.
static GDT: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff];

/// Makes every page a user page, loads a GDT with user segments and
/// returns to ring 3 at `user_main`, with IOPL 3.
fn to_ring3(mem: u64) -> ! {
    let gigs = mem.div_ceil(1 << 30);
    // SAFETY: the boot page tables are this guest's own memory; setting the
    // user bit on present entries changes no mapping.
    unsafe {
        let set = |p: *mut u64| p.write_volatile(p.read_volatile() | 4);
        set(guest::PML4_GPA as *mut u64);
        for g in 0..gigs {
            set((guest::PDPT_GPA + 8 * g) as *mut u64);
        }
        for i in 0..mem >> 21 {
            set((guest::PD_GPA + 8 * i) as *mut u64);
        }
    }
    let gdtr: [u16; 5] = {
        let base = GDT.as_ptr() as u64;
        [39, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16]
    };
    let stack = mem - (256 << 10);
    println!("hypercall: going to ring 3 to call FORK");
    // SAFETY: the new GDT keeps the selectors in use (0x08, 0x10) as they
    // were; IRETQ then enters `user_main` at CPL 3 on a stack of our memory.
    unsafe {
        core::arch::asm!(
            "lgdt [{g}]",
            "mov rax, cr3",
            "mov cr3, rax",
            "push 0x1b",
            "push {sp}",
            "push 0x3002",
            "push 0x23",
            "push {ip}",
            "iretq",
            g = in(reg) gdtr.as_ptr(),
            sp = in(reg) stack,
            ip = in(reg) user_main as *const () as u64,
            in("rax") 0u64,
            options(noreturn)
        )
    }
}

extern "C" fn user_main() -> ! {
    println!("hypercall: in ring 3");
    let r = hypercall(ghc::FORK, 0, 0, 0);
    println!("hypercall: FAIL: VMCALL from ring 3 returned {r}");
    exit(3)
}
