//! A fork bomb through the fork hypercall: fork until the hypervisor says
//! no. Every child halts for good, so all stay alive; once the VM has
//! `VM_MAX_CHILDREN` live children the next fork must fail with EAGAIN, and
//! so must a retry. The parent then reports and exits.
#![no_std]
#![no_main]

use shared_abi::VM_MAX_CHILDREN;
use uxen_test_guests::{fork, halt, println, vm_id};

#[no_mangle]
fn guest_main(_mem: u64) -> u8 {
    let me = vm_id();
    let mut n = 0u32;
    let refused = loop {
        match fork() {
            0 => {
                println!("forkbomb: vm{} is a child of vm{me}", vm_id());
                loop {
                    halt();
                }
            }
            r if r > 0 => {
                n += 1;
                if n > 4 * VM_MAX_CHILDREN {
                    break 0;
                }
            }
            e => break e,
        }
    };
    let again = fork();
    if again == 0 {
        println!("forkbomb: vm{} is a child past the limit", vm_id());
        loop {
            halt();
        }
    }
    println!("forkbomb: vm{me} forked {n} children; fork {} refused with {refused}; again {again}", n + 1);
    0
}
