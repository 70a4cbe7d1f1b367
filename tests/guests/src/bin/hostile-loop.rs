//! An endless loop with interrupts off whose instructions exit to the
//! hypervisor and come straight back, never to the VMM (command line
//! `mode=`): `cpuid`, `msr` (RDMSR of IA32_PAT), `cr8` (MOV to CR8), `mix`
//! (those and INVD), or `jmp` (no exit at all). The host must keep its CPUs
//! all the same: external interrupts still leave the guest.
#![no_std]
#![no_main]

use uxen_test_guests::{cmdline, println, vm_id};

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    let m = cmdline().split(' ').find_map(|w| w.strip_prefix("mode=")).unwrap_or("cpuid");
    println!("loop: vm{} spinning with interrupts off: {m}", vm_id());
    // SAFETY: endless loops of instructions the hypervisor handles; CLI
    // first, so no interrupt is ever taken.
    unsafe {
        core::arch::asm!("cli");
        match m {
            "cpuid" => core::arch::asm!("2:", "xor eax, eax", "cpuid", "jmp 2b", options(noreturn)),
            "msr" => core::arch::asm!("2:", "mov ecx, 0x277", "rdmsr", "jmp 2b", options(noreturn)),
            "cr8" => core::arch::asm!("2:", "mov cr8, rax", "jmp 2b", in("rax") 15u64, options(noreturn)),
            "mix" => core::arch::asm!(
                "2:",
                "xor eax, eax",
                "cpuid",
                "mov ecx, 0x277",
                "rdmsr",
                "mov cr8, rax",
                "invd",
                "jmp 2b",
                options(noreturn)
            ),
            _ => core::arch::asm!("2:", "jmp 2b", options(noreturn)),
        }
    }
}
