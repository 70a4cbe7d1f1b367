//! Reads guest-physical memory past its RAM, through a mapping it adds to
//! its own page tables. The VMM sees an MMIO access; no host data comes back.
#![no_std]
#![no_main]

use shared_abi::guest::PD_GPA;
use uxen_test_guests::println;

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    // Map the 2 MiB just past memory at the same virtual address.
    let slot = (mem >> 21) as usize;
    let pd = PD_GPA as *mut u64;
    // SAFETY: the boot page directories are ours; the new entry maps an
    // address past our memory, 2 MiB page, present and writable.
    unsafe {
        pd.add(slot).write_volatile(mem | 0x83);
        core::arch::asm!("mov rax, cr3", "mov cr3, rax", out("rax") _);
    }
    println!("faulty: reading {:#x}, past {} MiB of memory", mem + 0x100, mem >> 20);
    // SAFETY: the access exits to the VMM.
    let v = unsafe { ((mem + 0x100) as *const u64).read_volatile() };
    println!("faulty: read {:#x}", v);
    0
}
