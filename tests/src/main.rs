//! `uxtest`: the in-guest test tool. The suites in `tests/scripts/` call it
//! for what a shell cannot do: CPUID on a pinned CPU, physical memory and
//! MSR probes, privileged instructions, workloads and ioctl fuzzing.

use std::process::ExitCode;

mod edu;
mod fuzz;
mod probes;

fn usage() -> ExitCode {
    eprintln!(
        "usage: uxtest <command>\n\
         \x20 drain                       wait until the console has sent everything\n\
         \x20 cpuid LEAF [SUBLEAF]        print eax ebx ecx edx and the vendor text of ebx,ecx,edx\n\
         \x20 modload PATH [PARAMS]       load a module; print the errno on failure (exit 1)\n\
         \x20 modunload NAME              unload a module; print the errno on failure (exit 1)\n\
         \x20 msr read|write CPU MSR [V]  access an MSR through /dev/cpu/N/msr\n\
         \x20 devmem read|mmap|mmapw|write PHYS LEN [BYTE]   access physical memory through /dev/mem\n\
         \x20 ring3 INSN [NR]             run a VMX instruction in user mode; print the signal\n\
         \x20 checksum MIB                hash generated data\n\
         \x20 forkstorm N                 fork/exec /bin/true N times\n\
         \x20 cpuid-cost N                TSC per CPUID of the hypervisor leaf\n\
         \x20 irqstorm [ROUNDS SLEEPS USEC]  IPI ping-pong between CPUs 0 and 1, and timers every USEC\n\
         \x20 rdtsc                       print the TSC\n\
         \x20 ioctl-fuzz --seed S --calls N   random valid, invalid and out-of-order ioctls, checked\n\
         \x20 vm-limit                    the live-children and total VM limits, and their errors\n\
         \x20 vm-churn --ops N --seed S   create, fork and destroy VMs at random; no frame leaks\n\
         \x20 edu info                    find QEMU's edu DMA device; print bdf=... id=...\n\
         \x20 edu dma-to PHYS LEN BYTE    DMA LEN bytes of BYTE to PHYS through edu; print done\n\
         \x20 edu dma-from PHYS LEN       DMA LEN bytes from PHYS through edu; print nonzero count and hash\n\
         \x20 edu roundtrip               DMA a page to edu and back; print ok or the first mismatch\n\
         \x20 mmio read32|write32 PHYS [V] one 32-bit device register access through /dev/mem"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { return usage() };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "drain" => probes::drain(),
        "cpuid" => probes::cpuid(rest),
        "modload" => probes::modload(rest),
        "modunload" => probes::modunload(rest),
        "msr" => probes::msr(rest),
        "devmem" => probes::devmem(rest),
        "ring3" => probes::ring3(rest),
        "checksum" => probes::checksum(rest),
        "forkstorm" => probes::forkstorm(rest),
        "cpuid-cost" => probes::cpuid_cost(rest),
        "irqstorm" => probes::irqstorm(rest),
        "rdtsc" => probes::rdtsc(),
        "ioctl-fuzz" => fuzz::ioctl_fuzz(rest),
        "vm-limit" => fuzz::vm_limit(rest),
        "vm-churn" => fuzz::vm_churn(rest),
        "edu" => edu::edu(rest),
        "mmio" => edu::mmio(rest),
        _ => return usage(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uxtest {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}
