//! Assembly: the VM-exit stub and the exception stubs. (The entry and the
//! return to Linux are the driver's trampoline page: they must run on the
//! host's page tables, where the hypervisor's code is not executable.)

use super::cpu::LAUNCH_NEXT_OFFSET;

macro_rules! push_gprs {
    () => {
        "push r15\npush r14\npush r13\npush r12\npush r11\npush r10\npush r9\npush r8\n\
         push rdi\npush rsi\npush rbp\npush 0\npush rbx\npush rdx\npush rcx\npush rax\n"
    };
}

macro_rules! pop_gprs {
    () => {
        "pop rax\npop rcx\npop rdx\npop rbx\nadd rsp, 8\npop rbp\npop rsi\npop rdi\n\
         pop r8\npop r9\npop r10\npop r11\npop r12\npop r13\npop r14\npop r15\n"
    };
}

core::arch::global_asm!(
    // ------------------------------------------------------------------
    // VM exit: host RSP is this CPU's stack top, GS base its per-CPU area.
    // ------------------------------------------------------------------
    ".text",
    ".global uxen_vmexit",
    ".p2align 4",
    "uxen_vmexit:",
    push_gprs!(),
    "mov rdi, rsp",
    "call uxen_vmexit_handler",
    "3:",
    pop_gprs!(),
    "cmp qword ptr gs:[{launch}], 0",
    "jne 4f",
    "vmresume",
    "jmp 5f",
    "4:",
    "mov qword ptr gs:[{launch}], 0",
    "vmlaunch",
    "5:",
    // VM entry failed: report it with the registers as they were.
    push_gprs!(),
    "mov rdi, rsp",
    "call uxen_vmentry_failed",
    "jmp 3b",
    // ------------------------------------------------------------------
    // Exceptions in root operation: 256 stubs, 16 bytes apart.
    // ------------------------------------------------------------------
    ".p2align 4",
    ".global uxen_exception_stubs",
    "uxen_exception_stubs:",
    ".set vec, 0",
    ".rept 256",
    ".p2align 4",
    ".if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)",
    ".else",
    "push 0",
    ".endif",
    "push vec",
    "jmp uxen_exception_common",
    ".set vec, vec + 1",
    ".endr",
    ".p2align 4",
    "uxen_exception_common:",
    push_gprs!(),
    "mov rdi, rsp",
    "sub rsp, 8",
    "call uxen_exception",
    "add rsp, 8",
    pop_gprs!(),
    "add rsp, 16",
    "iretq",
    launch = const LAUNCH_NEXT_OFFSET,
);

extern "C" {
    pub fn uxen_vmexit();
}
