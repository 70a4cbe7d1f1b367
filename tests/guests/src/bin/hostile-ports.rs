//! Every I/O port. Writes to each of 0..=0xffff (all but the exit port
//! 0xf4) with a value made from the port, the UART put back in order, then
//! a read of each; word and doubleword accesses on a stride; the PCI
//! configuration ports; and the classic reset ports (0x64 <- 0xfe, 0xcf9 <-
//! 0x06, 0x92 <- 0x01). Each access exits to the VMM: none may reach a real
//! device, so every port but the UART's must read as all ones, and the
//! machine must still be there afterwards.
//!
//! Command line: `step=N` visits every N-th port (default 1); `mode=outs`
//! tries string I/O instead, which stops the VM (`bad-instruction`).
#![no_std]
#![no_main]

use shared_abi::guest::{EXIT_PORT, UART_PORT};
use uxen_test_guests::{arg, cmdline, inb, outb, println};

fn outw(port: u16, v: u16) {
    // SAFETY: port I/O exits to the VMM.
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}

fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as `outw`.
    unsafe { core::arch::asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack)) };
    v
}

fn outl(port: u16, v: u32) {
    // SAFETY: as `outw`.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as `outw`.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

fn is_uart(p: u32, width: u32) -> bool {
    p + width > UART_PORT as u32 && p < UART_PORT as u32 + 8
}

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    if cmdline().split(' ').any(|w| w == "mode=outs") {
        println!("ports: string output to port 0x80");
        let buf = [0x55u8; 16];
        // SAFETY: OUTS reads our buffer; the VM stops at the first one.
        unsafe { core::arch::asm!("rep outsb", in("dx") 0x80u16, inout("rsi") buf.as_ptr() => _, inout("rcx") 16u64 => _) };
        println!("ports: FAIL: string I/O ran");
        return 1;
    }
    let step = arg("step", 1).max(1) as usize;
    let mut writes = 0u32;
    for p in (0..=0xffffu32).step_by(step) {
        if p != EXIT_PORT as u32 {
            outb(p as u16, (p ^ (p >> 8)) as u8);
            writes += 1;
        }
    }
    // The UART took whatever came: 8N1, no divisor latch, no loopback.
    outb(UART_PORT + 3, 0x03);
    outb(UART_PORT + 1, 0x00);
    outb(UART_PORT + 4, 0x00);
    let (mut reads, mut bad) = (0u32, 0u32);
    for p in (0..=0xffffu32).step_by(step) {
        let v = inb(p as u16);
        reads += 1;
        if !is_uart(p, 1) && v != 0xff {
            bad += 1;
            if bad <= 8 {
                println!("ports: FAIL: port {p:#x} reads {v:#x}");
            }
        }
    }
    let mut wide = 0u32;
    for p in (0..0xfffdu32).step_by(257) {
        if (EXIT_PORT as u32).wrapping_sub(p) < 4 {
            continue;
        }
        outw(p as u16, 0xbeef);
        outl(p as u16, 0xdead_beef);
        let (w, l) = (inw(p as u16), inl(p as u16));
        wide += 4;
        if !is_uart(p, 4) && (w != 0xffff || l != 0xffff_ffff) {
            bad += 1;
            println!("ports: FAIL: port {p:#x} reads word {w:#x} doubleword {l:#x}");
        }
    }
    // PCI configuration mechanism 1: host bridge, vendor and device id.
    outl(0xcf8, 0x8000_0000);
    let pci = inl(0xcfc);
    // The reset ports, with the values that reset a PC.
    outb(0x64, 0xfe);
    outb(0xcf9, 0x06);
    outb(0x92, 0x01);
    println!("ports: wrote {writes} ports, read {reads}, {wide} word and doubleword accesses; {bad} reads were not all ones; pci config {pci:#x}");
    if bad == 0 && pci == 0xffff_ffff {
        println!("ports: ok");
        0
    } else {
        1
    }
}
