//! The PC of a Linux guest (`VM_FLAG_LINUX`): what the run loop does with
//! the device models of `crate::devices` and the policy of
//! `crate::policy::linux` (docs/guest-abi.md, part 2).
//!
//! - Each vCPU has a local x2APIC, reached through RDMSR/WRMSR exits; its
//!   TSC-deadline or one-shot timer is served by the VMX-preemption timer
//!   while the vCPU runs, and by the driver's halt sleep while it halts.
//! - The IOAPIC is emulated here, on EPT violations in its page, and driven
//!   by the VMM through the `VM_IRQ` hypercall (the UART's IRQ 4).
//! - Before every VM entry, [`before_entry`] injects the highest interrupt
//!   the guest can take, or asks for an interrupt-window exit.
//! - Port I/O outside COM1 is answered here: the CMOS clock's ports by a
//!   read-only clock (`devices::cmos`); elsewhere reads float high (all
//!   ones) and writes go nowhere. Linux's probes of the PIT and the PIC find
//!   nothing, as `apic_needs_pit()` and `probe_8259A()` expect.
//! - A triple fault is a reset: Linux's reboot path (`reboot=t`). The
//!   warm-reset word at 0x472 says whether a panic caused it.
//! - A fork leaves each side a new VM generation ID and its interrupt,
//!   which the side writes as it next enters ([`pay_generation`]).

use super::memory::DirectMap;
use super::vm::{Start, Vm};
use crate::addr::Gpa;
use crate::arch::x86::cpu::this_cpu;
use crate::arch::x86::instr;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;
use crate::devices::cmos::{self, Cmos};
use crate::devices::ioapic::{Delivery, Ioapic};
use crate::devices::uart::{Access, UartShadow};
use crate::devices::vmgenid::{self, Generator};
use crate::devices::lapic::{DeliveryMode, Ipi, Shorthand, WriteEffect};
use crate::mem::PhysMem;
use core::sync::atomic::Ordering;
use shared_abi::{linux, stop, IRQ_HIGH, IRQ_LOW, IRQ_PULSE};

/// A Linux guest's platform state beyond its vCPUs.
pub struct Platform {
    /// The TSC rate the guest is told (CPUID 0x15/0x16), which is also its
    /// APIC timer's input clock.
    pub tsc_khz: u32,
    pub ioapic: spin::Mutex<Ioapic>,
    pub cmos: spin::Mutex<Cmos>,
    /// What is known of the VMM's COM1, and console bytes batched for it.
    pub uart: spin::Mutex<UartShadow>,
    /// The VM has a generation-ID buffer (`VM_FLAG_VMGENID`): forks write
    /// new IDs there ([`new_generation`]).
    pub vmgenid: bool,
    /// A fork left this VM a new generation ID to write before any of its
    /// vCPUs enters again ([`pay_generation`]). The lock makes the other
    /// vCPUs wait while one writes it.
    pub generation_owed: spin::Mutex<bool>,
    /// The lock-free look at `generation_owed` on every entry.
    pub generation_owed_hint: core::sync::atomic::AtomicBool,
}

impl Platform {
    pub fn new(tsc_khz: u32, vmgenid: bool) -> Self {
        Platform {
            tsc_khz,
            ioapic: spin::Mutex::new(Ioapic::new(linux::IOAPIC_ID)),
            cmos: spin::Mutex::new(Cmos::default()),
            uart: spin::Mutex::new(UartShadow::default()),
            vmgenid,
            generation_owed: spin::Mutex::new(false),
            generation_owed_hint: core::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A copy for a forked child.
    pub fn clone_state(&self) -> Self {
        Platform {
            tsc_khz: self.tsc_khz,
            ioapic: spin::Mutex::new(*self.ioapic.lock()),
            cmos: spin::Mutex::new(*self.cmos.lock()),
            uart: spin::Mutex::new(self.uart.lock().forked()),
            vmgenid: self.vmgenid,
            generation_owed: spin::Mutex::new(false),
            generation_owed_hint: core::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The one maker of VM generation IDs, for every VM.
static GENERATIONS: spin::Mutex<Generator> = spin::Mutex::new(Generator::new());

/// A fork leaves each side, its parent and its child, a new generation if
/// the VM has a generation ID (`VM_FLAG_VMGENID`), which that side writes
/// at its next entry ([`pay_generation`]). The fork itself stays a copy of
/// the EPT root: writing the ID copies the buffer's page and, before that,
/// every shared table on its path, a few hundred reference counts that
/// each side pays on its own CPU, as it pays its other first writes.
pub fn owe_generation(vm: &Vm) {
    if let Some(p) = vm.linux.as_ref().filter(|p| p.vmgenid) {
        *p.generation_owed.lock() = true;
        p.generation_owed_hint.store(true, Ordering::Release);
    }
}

/// Before a vCPU of `vm` enters: writes the generation a fork left owed,
/// if any. Every vCPU of the VM passes here before it enters, and waits
/// while another writes, so none runs guest code before the new ID and
/// its interrupt are in place. Fails only for want of pool frames (the
/// driver donates and runs the vCPU again).
pub fn pay_generation(vm: &Vm) -> Result<(), super::vm::VmError> {
    let Some(p) = vm.linux.as_ref() else { return Ok(()) };
    if !p.generation_owed_hint.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut owed = p.generation_owed.lock();
    if *owed {
        new_generation(vm)?;
        *owed = false;
        p.generation_owed_hint.store(false, Ordering::Release);
    }
    Ok(())
}

/// A new generation for `vm`: a new ID goes into the VM's own copy of the
/// buffer page (the write copies a page a fork shared), then the Generic
/// Event Device's input pulses, whose interrupt makes the guest's ACPI
/// notify its `vmgenid` driver. Fails only for want of pool frames for
/// that copy.
///
/// The interrupt is posted to the APICs without a kick: no vCPU of the VM
/// is in the guest ([`pay_generation`] runs before any enters), so each
/// takes it at its entry, before the guest runs anything else.
fn new_generation(vm: &Vm) -> Result<(), super::vm::VmError> {
    let Some(p) = vm.linux.as_ref().filter(|p| p.vmgenid) else { return Ok(()) };
    // Without RDRAND the TSC is all the entropy there is; the IDs stay
    // unique regardless (`devices::vmgenid`).
    let entropy = instr::rdrand64().unwrap_or_else(|| vmgenid::mix(instr::rdtsc() ^ ((vm.id as u64) << 40)));
    let id = GENERATIONS.lock().next(entropy);
    super::vm::load(vm, linux::VMGENID_GPA, &id)?;
    let d = p.ioapic.lock().pulse(linux::VMGENID_GSI);
    if let Some(d) = d {
        // No vCPU of the VM is in the guest, so nothing is kicked, and the
        // one that asks to be woken is entering now or takes the interrupt
        // when it next wakes.
        let _ = deliver(vm, &d);
    }
    Ok(())
}

/// Makes vCPU `i` notice an interrupt just posted to its APIC: a CPU that
/// runs it takes a kick NMI, whose exit re-evaluates what to inject. A vCPU
/// out of RUN sees it at its next entry, but one asleep in a halted RUN
/// must be woken by the driver: returns true then (the `VM_IRQ` ioctl
/// wakes halted vCPUs itself; a guest's IPI makes its RUN return
/// `exit::KICK`).
fn notify(vm: &Vm, i: usize) -> bool {
    let v = &vm.vcpus[i];
    if v.running.load(Ordering::Acquire) {
        let cpu = v.cpu.load(Ordering::Acquire) as usize;
        if cpu != this_cpu().index as usize {
            super::tlb::kick(cpu);
        }
        return false;
    }
    true
}

/// Routes an interrupt message (from the IOAPIC or an IPI) to the local
/// APICs it addresses. Lowest-priority delivery goes to the first match, which
/// Linux accepts (SDM 11.6.2.4 leaves the choice to the platform).
fn deliver(vm: &Vm, d: &Delivery) -> bool {
    let mut wake = false;
    for (i, v) in vm.vcpus.iter().enumerate() {
        let hit = {
            let mut l = v.lapic.lock();
            if !l.matches(d.apic_dest(), d.logical) {
                continue;
            }
            match d.mode {
                DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                    l.accept(d.vector, d.level);
                    true
                }
                // NMI, INIT, SMI and ExtINT messages from the IOAPIC are not
                // wired on this platform.
                _ => false,
            }
        };
        if hit {
            wake |= notify(vm, i);
            if d.mode == DeliveryMode::LowestPriority {
                break;
            }
        }
    }
    wake
}

/// The `VM_IRQ` hypercall: input `gsi` of the IOAPIC goes low, high, or
/// pulses. `None` if the VM has no IOAPIC.
pub fn irq(vm: &Vm, gsi: u32, level: u32) -> Option<()> {
    let p = vm.linux.as_ref()?;
    let d = {
        let mut io = p.ioapic.lock();
        match level {
            IRQ_LOW => io.set_irq(gsi, false),
            IRQ_HIGH => io.set_irq(gsi, true),
            IRQ_PULSE => io.pulse(gsi),
            _ => return None,
        }
    };
    if let Some(d) = d {
        deliver(vm, &d);
    }
    Some(())
}

/// INIT to vCPU `i`: its APIC is reset and it waits for a STARTUP IPI. Linux
/// sends it to application processors that have not started, or that it
/// took offline (they halt with interrupts off meanwhile).
fn init(vm: &Vm, i: usize) {
    vm.vcpus[i].lapic.lock().init();
    vm.vcpus[i].state.lock().start = Start::WaitSipi;
}

/// STARTUP to vCPU `i`: a vCPU waiting for one starts at `vector << 12` at
/// its next RUN; any other ignores it, as a CPU does (SDM Vol. 3A, 10.4.4.1:
/// the second STARTUP of Linux's INIT-SIPI-SIPI).
fn startup(vm: &Vm, i: usize, vector: u8) -> bool {
    let mut st = vm.vcpus[i].state.lock();
    if st.start != Start::WaitSipi {
        return false;
    }
    st.start = Start::Sipi(vector);
    true
}

/// Sends an IPI from vCPU `from`: fixed interrupts reach their targets'
/// APICs, INIT and STARTUP start application processors. Returns whether a
/// halted vCPU must be woken.
fn send_ipi(vm: &Vm, from: usize, ipi: &Ipi) -> bool {
    let mut wake = false;
    for (i, v) in vm.vcpus.iter().enumerate() {
        let target = match ipi.shorthand {
            Shorthand::None => v.lapic.lock().matches(ipi.dest, ipi.logical),
            Shorthand::SelfOnly => i == from,
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => i != from,
        };
        if !target {
            continue;
        }
        match ipi.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                v.lapic.lock().accept(ipi.vector, false);
                wake |= notify(vm, i);
            }
            DeliveryMode::Init if i != from && !ipi.is_init_deassert() => init(vm, i),
            DeliveryMode::Init => {}
            DeliveryMode::StartUp if i != from => wake |= startup(vm, i, ipi.vector),
            _ => log::warn!("vm{}: vCPU {from} sent an IPI of mode {:?}, which this platform does not deliver", vm.id, ipi.mode),
        }
    }
    wake
}

/// A level-triggered interrupt was acknowledged: the IOAPIC lets its line
/// deliver again.
fn eoi(vm: &Vm, vector: u8) -> bool {
    let Some(p) = vm.linux.as_ref() else { return false };
    let again = p.ioapic.lock().eoi(vector);
    again.iter().fold(false, |w, d| deliver(vm, d) | w)
}

/// RDMSR of an APIC MSR (IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC).
pub fn apic_rdmsr(vm: &Vm, idx: usize, msr: u32) -> Option<u64> {
    let l = vm.vcpus[idx].lapic.lock();
    match msr {
        0x1b => Some(l.apic_base()),
        0x6e0 => Some(l.tsc_deadline()),
        _ => l.read_msr(msr, instr::rdtsc()).ok(),
    }
}

/// WRMSR of an APIC MSR: `None` raises #GP; `Some(true)` when a halted
/// vCPU must be woken (an IPI to it).
pub fn apic_wrmsr(vm: &Vm, idx: usize, msr: u32, value: u64) -> Option<bool> {
    let effect = {
        let mut l = vm.vcpus[idx].lapic.lock();
        match msr {
            0x1b => return l.set_apic_base(value).ok().map(|_| false),
            0x6e0 => {
                l.set_tsc_deadline(value);
                return Some(false);
            }
            _ => l.write_msr(msr, value, instr::rdtsc()).ok()?,
        }
    };
    Some(match effect {
        WriteEffect::None => false,
        WriteEffect::Eoi { vector, level } => level && eoi(vm, vector),
        WriteEffect::Ipi(ipi) => send_ipi(vm, idx, &ipi),
    })
}

/// The TSC at which vCPU `idx`'s APIC timer next fires, if it is armed.
pub fn next_timer(vm: &Vm, idx: usize) -> Option<u64> {
    vm.vcpus[idx].lapic.lock().next_deadline()
}

/// Whether vCPU `idx` has an interrupt it could take now (for HLT).
pub fn has_pending(vm: &Vm, idx: usize) -> bool {
    let mut l = vm.vcpus[idx].lapic.lock();
    l.poll_timer(instr::rdtsc());
    l.pending_vector().is_some()
}

/// Called with the guest's VMCS current, right before it is entered:
/// fires a due APIC timer, then injects the highest interrupt the APIC
/// would deliver if the guest can take it now (RFLAGS.IF set, no STI or
/// MOV SS blocking, no event already queued), else asks for an exit as soon
/// as it can (interrupt-window exiting). See SDM Vol. 3C, 26.3.2.4 and 26.7.5.
pub fn before_entry(vm: &Vm, idx: usize) {
    let want = {
        let mut l = vm.vcpus[idx].lapic.lock();
        l.poll_timer(instr::rdtsc());
        let want = l.pending_vector();
        if let Some(v) = want {
            let queued = vmx::read(ENTRY_INTERRUPTION_INFO) & (intr::VALID as u64) != 0;
            let open = vmx::read(GUEST_RFLAGS) & (1 << 9) != 0 && vmx::read(GUEST_INTERRUPTIBILITY) & 3 == 0;
            if !queued && open {
                vmx::set(ENTRY_INTERRUPTION_INFO, (intr::VALID | intr::TYPE_EXTERNAL | v as u32) as u64);
                l.ack(v);
                // Taken: anything else pending waits for the next window.
                l.pending_vector().map(|_| ())
            } else {
                Some(())
            }
        } else {
            None
        }
    };
    let p = vmx::read(PRIMARY_PROC_CONTROLS);
    let w = proc1::INTERRUPT_WINDOW_EXITING as u64;
    let np = if want.is_some() { p | w } else { p & !w };
    if np != p {
        vmx::set(PRIMARY_PROC_CONTROLS, np);
    }
}

/// Re-queues an event whose delivery a VM exit interrupted (an EPT
/// violation on the guest's stack while it took an interrupt, say), so
/// that it is delivered at the next entry. SDM Vol. 3C, 28.2.4 ("IDT-
/// vectoring information") and 27.6.1.
pub fn requeue_interrupted_event() {
    let info = vmx::read(IDT_VECTORING_INFO) as u32;
    if info & intr::VALID == 0 {
        return;
    }
    // Bit 12 is undefined in the IDT-vectoring field and reserved in the
    // entry field.
    vmx::set(ENTRY_INTERRUPTION_INFO, (info & !(1 << 12)) as u64);
    if info & intr::DELIVER_ERROR_CODE != 0 {
        vmx::set(ENTRY_EXCEPTION_ERROR_CODE, vmx::read(IDT_VECTORING_ERROR_CODE));
    }
    // Software interrupts and exceptions (INT n, INT3, INTO, INT1) are
    // re-executed from their instruction length.
    if matches!((info >> 8) & 7, 4..=6) {
        vmx::set(ENTRY_INSTRUCTION_LENGTH, vmx::read(EXIT_INSTRUCTION_LENGTH));
    }
}

/// What a triple fault of a Linux guest means: a reboot, or the reset that
/// follows a panic (`reboot=panic_warm` makes Linux write the warm-reset
/// word 0x1234 at 0x472 before it resets after a panic, and 0 for an
/// ordinary reboot).
pub fn reset_reason(vm: &Vm) -> u32 {
    let mem = vm.mem.lock();
    let Some(g) = mem.as_ref() else { return stop::REBOOT };
    let page = Gpa(linux::RESET_FLAG_GPA & !0xfff);
    let Some((pa, _)) = g.lookup(&DirectMap, page) else { return stop::REBOOT };
    let mut w = [0u8; 2];
    DirectMap.read(crate::addr::Hpa(pa.0 + (linux::RESET_FLAG_GPA & 0xfff)), &mut w);
    if u16::from_le_bytes(w) == linux::RESET_FLAG_WARM {
        stop::PANIC
    } else {
        stop::REBOOT
    }
}

/// Whether `port` reaches the VMM (COM1); every other port is answered by
/// [`port_io`] here.
pub fn port_to_vmm(port: u16) -> bool {
    (linux::UART_PORT_FIRST..=linux::UART_PORT_LAST).contains(&port)
}

/// An IN or OUT of a port the hypervisor answers: the CMOS clock's two
/// ports; every other reads all ones, masked to the access size, and
/// ignores writes. Returns the value of an IN.
pub fn port_io(vm: &Vm, port: u16, write: Option<u64>, mask: u64) -> u64 {
    let Some(p) = vm.linux.as_ref() else { return mask };
    match (port, write) {
        (cmos::INDEX_PORT, Some(v)) => p.cmos.lock().select(v as u8),
        (cmos::DATA_PORT, None) => return p.cmos.lock().read() as u64,
        _ => {}
    }
    mask
}

/// An access to COM1 register `reg`: answered here while the UART is in
/// plain polled transmission (`devices::uart`), else for the VMM.
pub fn uart_access(vm: &Vm, reg: u16, write: Option<u8>) -> Access {
    match vm.linux.as_ref() {
        Some(p) => p.uart.lock().access(reg, write),
        None => Access::Forward,
    }
}

/// Takes the batched console bytes into `out`; returns how many.
pub fn take_console(vm: &Vm, out: &mut [u8; shared_abi::CONSOLE_BATCH]) -> usize {
    vm.linux.as_ref().map_or(0, |p| p.uart.lock().take(out))
}

/// Whether `gpa` lies in the IOAPIC's page.
pub fn is_ioapic(gpa: u64) -> bool {
    gpa & !0xfff == linux::IOAPIC_BASE
}

/// An access to the IOAPIC page: returns the value of a read, or delivers
/// what a write caused.
pub fn ioapic_access(vm: &Vm, gpa: u64, write: Option<u32>) -> u32 {
    let Some(p) = vm.linux.as_ref() else { return u32::MAX };
    let off = gpa & 0xfff;
    match write {
        None => p.ioapic.lock().mmio_read(off),
        Some(v) => {
            let ds = p.ioapic.lock().mmio_write(off, v);
            for d in ds.iter() {
                deliver(vm, d);
            }
            0
        }
    }
}
