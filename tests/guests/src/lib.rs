//! The runtime of the test guests: entry, console, exit, hypercalls.
//!
//! A guest starts in 64-bit mode at `_start` with RSP at the top of its
//! memory and RDI holding the memory size (docs/guest-abi.md). Each test
//! guest defines `guest_main(mem_bytes) -> u8`; its result is the VM's exit
//! code.
#![no_std]

use core::fmt::{self, Write};
use shared_abi::guest::{CMDLINE_GPA, CMDLINE_MAX, EXIT_PORT, UART_PORT};

core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "and rsp, -16",
    "call uxen_guest_start",
    "2: hlt",
    "jmp 2b",
);

extern "Rust" {
    fn guest_main(mem_bytes: u64) -> u8;
}

#[no_mangle]
extern "C" fn uxen_guest_start(mem_bytes: u64) -> ! {
    // SAFETY: provided by the guest binary.
    let code = unsafe { guest_main(mem_bytes) };
    exit(code)
}

/// Writes one byte to a port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O exits to the VMM; nothing else happens here.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

/// Reads one byte from a port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as `outb`.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Ends the VM with `code` (the exit port).
pub fn exit(code: u8) -> ! {
    outb(EXIT_PORT, code);
    loop {
        // SAFETY: never reached: the write above ends the VM.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// The console: the 16550 UART at 0x3f8.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                outb(UART_PORT, b'\r');
            }
            outb(UART_PORT, b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::Console, $($arg)*);
    }};
}

/// A guest hypercall: VMCALL with RAX = `nr` and up to three arguments.
pub fn hypercall(nr: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    let r: u64;
    // SAFETY: VMCALL traps to the hypervisor, which preserves every
    // register but RAX.
    unsafe {
        core::arch::asm!("vmcall", inout("rax") nr => r, in("rdi") a0, in("rsi") a1, in("rdx") a2, options(nostack))
    };
    r as i64
}

/// This VM's id.
pub fn vm_id() -> i64 {
    hypercall(shared_abi::ghc::VM_ID, 0, 0, 0)
}

/// fork(): the child's id in the parent, 0 in the child, or -errno.
pub fn fork() -> i64 {
    hypercall(shared_abi::ghc::FORK, 0, 0, 0)
}

/// Halts with interrupts enabled until the VMM or the hypervisor resumes
/// this vCPU (no interrupt is ever delivered to these guests).
pub fn halt() {
    // SAFETY: HLT with IF=1; the next instruction disables them again.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// The command line from `uxenctl --cmdline` (docs/guest-abi.md).
pub fn cmdline() -> &'static str {
    let p = CMDLINE_GPA as *const u8;
    let mut n = 0;
    // SAFETY: the command-line page is guest memory, identity-mapped.
    while n < CMDLINE_MAX && unsafe { p.add(n).read_volatile() } != 0 {
        n += 1;
    }
    // SAFETY: as above; `n` bytes were read.
    let bytes = unsafe { core::slice::from_raw_parts(p, n) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The value of `name=VALUE` on the command line (decimal or 0x-hex), or
/// `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    for w in cmdline().split(' ') {
        if let Some((k, v)) = w.split_once('=') {
            if k == name {
                let r = match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => v.parse(),
                };
                if let Ok(x) = r {
                    return x;
                }
            }
        }
    }
    default
}

/// Free memory: from the end of the image to `mem` less 64 KiB of stack.
pub fn free_memory(mem: u64) -> (u64, u64) {
    ((image_end() + 4095) & !4095, mem - (64 << 10))
}

/// Fills `[start, end)` with `pattern(addr, seed)` words.
pub fn fill(start: u64, end: u64, seed: u64) {
    let p = start as *mut u64;
    for i in 0..(end - start) / 8 {
        // SAFETY: the caller hands over its own free memory.
        unsafe { p.add(i as usize).write_volatile(pattern(start + 8 * i, seed)) };
    }
}

/// Checks `[start, end)` against `pattern(addr, seed)`, skipping the first
/// `skip` bytes of every page; returns a checksum, or the first address
/// that differs.
pub fn verify(start: u64, end: u64, seed: u64, skip: u64) -> Result<u64, u64> {
    let mut sum = 0u64;
    let mut a = start;
    while a < end {
        if a & 4095 < skip {
            a = (a & !4095) + skip;
            continue;
        }
        // SAFETY: as in `fill`.
        let v = unsafe { (a as *const u64).read_volatile() };
        if v != pattern(a, seed) {
            return Err(a);
        }
        sum = sum.rotate_left(5) ^ v;
        a += 8;
    }
    Ok(sum)
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

extern "C" {
    static __image_end: u8;
}

/// First byte after the loaded image.
pub fn image_end() -> u64 {
    // SAFETY: taking the address of a linker symbol.
    unsafe { &__image_end as *const u8 as u64 }
}

/// A deterministic pattern word for address `a`.
pub fn pattern(a: u64, seed: u64) -> u64 {
    (a ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ seed
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panic: {info}");
    exit(101)
}
