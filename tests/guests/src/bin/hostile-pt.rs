//! Guest page tables that point outside guest memory (command line
//! `mode=`):
//!
//! - `pml4`: a PML4 entry names a PDPT past the end of memory;
//! - `pdpt`: a PDPT entry names a page directory past the end;
//! - `pd`: a page-directory entry names a page table past the end;
//! - `cr3`: CR3 itself points past the end;
//! - `rsvd`: a 2 MiB mapping with a reserved physical-address bit.
//!
//! A walk that leaves guest memory reaches nothing: the VM stops
//! (`bad-instruction`; for `rsvd` the CPU's #PF, which without an IDT is a
//! triple fault). Reaching the end of this program means a value came back.
#![no_std]
#![no_main]

use shared_abi::guest::{PDPT_GPA, PD_GPA, PML4_GPA};
use uxen_test_guests::{cmdline, println};

fn mode() -> &'static str {
    cmdline().split(' ').find_map(|w| w.strip_prefix("mode=")).unwrap_or("pd")
}

fn flush() {
    // SAFETY: reloading CR3 with its own value flushes the TLB.
    unsafe { core::arch::asm!("mov rax, cr3", "mov cr3, rax", out("rax") _) };
}

fn write(gpa: u64, v: u64) {
    // SAFETY: the boot page tables are this guest's own memory.
    unsafe { (gpa as *mut u64).write_volatile(v) };
    flush();
}

#[no_mangle]
fn guest_main(mem: u64) -> u8 {
    let m = mode();
    // The first 2 MiB slot past memory in the first page directory.
    let slot = mem >> 21;
    let (la, what) = match m {
        "pml4" => {
            write(PML4_GPA + 8, (mem + 0x10_0000) | 3);
            (1u64 << 39, mem + 0x10_0000)
        }
        "pdpt" => {
            write(PDPT_GPA + 8 * 3, (mem + 0x20_0000) | 3);
            (3u64 << 30, mem + 0x20_0000)
        }
        "cr3" => {
            println!("pt: mode=cr3: loading CR3 with {:#x}, past {} MiB of memory", mem + 0x1000, mem >> 20);
            // SAFETY: the next fetch walks tables outside memory: the VM
            // stops; nothing after this runs.
            unsafe { core::arch::asm!("mov cr3, {}", in(reg) mem + 0x1000) };
            println!("pt: FAIL: still running with CR3 past memory");
            return 1;
        }
        "rsvd" => {
            write(PD_GPA + 8 * slot, (1 << 51) | 0x83);
            (slot << 21, 1 << 51)
        }
        _ => {
            write(PD_GPA + 8 * slot, (mem + 0x30_0000) | 3);
            (slot << 21, mem + 0x30_0000)
        }
    };
    println!("pt: mode={m}: reading {la:#x} through a table at guest-physical {what:#x}, past {} MiB of memory", mem >> 20);
    // SAFETY: the access walks the tables set up above; it must stop the VM.
    let v = unsafe { (la as *const u64).read_volatile() };
    println!("pt: FAIL: read {v:#x} through a walk outside memory");
    1
}
