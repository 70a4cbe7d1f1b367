//! EPT violations of the host VM: the host touched memory it no longer owns
//! (the hypervisor region, a donated frame). The instruction is decoded and
//! emulated with the protected part neutralised: reads see zeros, writes are
//! dropped. Each one is counted; each new (page, instruction) pair is logged.

use super::{inject_exception, inject_ud, GuestRegs};
use crate::addr::{Gpa, Hpa};
use crate::arch::x86::cpu::this_cpu;
use crate::arch::x86::ept_entry::{EptFlags, EptViolation};
use crate::arch::x86::instr;
use crate::arch::x86::vmcs_fields::*;
use crate::arch::x86::vmx;
use crate::emulate::{emulate, Access, EmuError, EmuRegs, GuestMemory};
use crate::ept::Ept;
use crate::hv::memory::DirectMap;
use crate::mem::PhysMem;
use crate::paging::{translate, AccessKind, PageFault, PagingMode};
use core::sync::atomic::{AtomicU64, Ordering};

/// The host VM's memory as its own page tables and the host EPT show it.
struct HostView<'a> {
    ept: &'a Ept,
    mode: PagingMode,
    user: bool,
}

impl HostView<'_> {
    /// Whether the host may access `gpa` (`write` for a store).
    fn allowed(&self, gpa: u64, write: bool) -> bool {
        match self.ept.translate(&DirectMap, Gpa(gpa)) {
            Some((hpa, f)) => hpa.0 == gpa && (!write || f.contains(EptFlags::WRITE)),
            None => false,
        }
    }

    fn walk(&self, la: u64, write: bool) -> Result<u64, PageFault> {
        let kind = AccessKind { write, user: self.user };
        // Page tables in protected memory read as zeros: not present.
        translate(&DirectMap, &self.mode, la, kind, |g| self.allowed(g.0, false).then_some(Hpa(g.0)))
            .map(|t| t.gpa.0)
            .map_err(|e| e.unwrap_or(PageFault { addr: la, error_code: (write as u32) << 1 | (self.user as u32) << 2 }))
    }

    fn access(&mut self, la: u64, len: usize, write: bool, mut f: impl FnMut(u64, core::ops::Range<usize>, bool)) -> Result<Access, PageFault> {
        let mut done = 0usize;
        let mut blocked = false;
        while done < len {
            let a = la.wrapping_add(done as u64);
            let n = ((4096 - (a & 4095)) as usize).min(len - done);
            let gpa = self.walk(a, write)?;
            let ok = self.allowed(gpa, write);
            blocked |= !ok;
            f(gpa, done..done + n, ok);
            done += n;
        }
        Ok(if blocked { Access::Blocked } else { Access::Normal })
    }
}

impl GuestMemory for HostView<'_> {
    fn read(&mut self, la: u64, buf: &mut [u8]) -> Result<Access, PageFault> {
        let len = buf.len();
        self.access(la, len, false, |gpa, r, ok| {
            if ok {
                DirectMap.read(Hpa(gpa), &mut buf[r]);
            } else {
                buf[r].fill(0);
            }
        })
    }

    fn write(&mut self, la: u64, buf: &[u8]) -> Result<Access, PageFault> {
        // Check every page first so that a fault leaves memory untouched.
        self.access(la, buf.len(), true, |_, _, _| {})?;
        self.access(la, buf.len(), true, |gpa, r, ok| {
            if ok {
                DirectMap.write(Hpa(gpa), &buf[r]);
            }
        })
    }
}

/// The last (page, RIP) logged, to log each new kind of access once.
static LAST_LOGGED: AtomicU64 = AtomicU64::new(u64::MAX);

fn note(gpa: u64, rip: u64, reads: u32, writes: u32, how: &str) {
    crate::hv::count_blocked(gpa, reads, writes);
    let key = (gpa >> 12) ^ rip.rotate_left(32);
    if LAST_LOGGED.swap(key, Ordering::Relaxed) != key {
        log::info!(
            "cpu{}: blocked host {} of protected {:#x} at rip {:#x} ({})",
            this_cpu().index,
            if writes > 0 { "write" } else { "read" },
            gpa,
            rip,
            how
        );
    }
}

pub fn handle(regs: &mut GuestRegs) {
    let gpa = vmx::read(GUEST_PHYSICAL_ADDRESS);
    let q = EptViolation::from_qualification(vmx::read(EXIT_QUALIFICATION));
    let rip = vmx::read(GUEST_RIP);
    let hv = crate::hv::hv();
    let ept = hv.host_ept.lock();
    let mode = PagingMode {
        cr0: vmx::read(GUEST_CR0),
        cr3: vmx::read(GUEST_CR3),
        cr4: vmx::read(CR4_READ_SHADOW),
        efer: vmx::read(GUEST_IA32_EFER),
    };
    let user = super::guest_cpl() == 3;
    let mut view = HostView { ept: &ept, mode, user };
    // Mapped since (a page returned to the host): just retry.
    if view.allowed(gpa, q.write) {
        return;
    }
    if gpa & !0xfff == hv.apic_page && q.write && !q.fetch {
        return apic_write(&mut view, regs, gpa, rip);
    }
    if q.fetch {
        note(gpa, rip, 1, 0, "instruction fetch, #UD");
        inject_ud();
        return;
    }
    if !q.final_translation {
        // The host's page tables point into protected memory, which reads
        // as zeros: the translation is not present.
        let la = vmx::read(GUEST_LINEAR_ADDRESS);
        note(gpa, rip, 1, 0, "page walk, #PF");
        inject_page_fault(PageFault { addr: la, error_code: (q.write as u32) << 1 | (user as u32) << 2 });
        return;
    }
    let cs_ar = vmx::read(GUEST_CS_AR);
    let bitness = if cs_ar & (1 << 13) != 0 {
        64
    } else if cs_ar & (1 << 14) != 0 {
        32
    } else {
        16
    };
    let mut bytes = [0u8; 15];
    let mut n = 15usize;
    let in_page = (4096 - (rip & 4095)) as usize;
    let fetched = match view.read(rip, &mut bytes) {
        Ok(a) => Ok(a),
        Err(_) if in_page < 15 => {
            n = in_page;
            view.read(rip, &mut bytes[..n])
        }
        Err(e) => Err(e),
    };
    match fetched {
        Ok(Access::Normal) => {}
        Ok(Access::Blocked) | Err(_) => {
            note(gpa, rip, 1, 0, "unreadable instruction, #UD");
            inject_ud();
            return;
        }
    }
    let mut er = EmuRegs {
        gpr: *regs,
        rip,
        rflags: vmx::read(GUEST_RFLAGS),
        fs_base: vmx::read(GUEST_FS_BASE),
        gs_base: vmx::read(GUEST_GS_BASE),
    };
    er.gpr[4] = vmx::read(GUEST_RSP);
    match emulate(&bytes[..n], bitness, &mut er, &mut view) {
        Ok(out) => {
            let rsp = er.gpr[4];
            *regs = er.gpr;
            vmx::set(GUEST_RSP, rsp);
            if er.rip != rip {
                vmx::set(GUEST_RIP, er.rip);
                let i = vmx::read(GUEST_INTERRUPTIBILITY);
                vmx::set(GUEST_INTERRUPTIBILITY, i & !3);
            }
            note(gpa, rip, out.blocked_reads, out.blocked_writes, "emulated");
        }
        Err(EmuError::PageFault(pf)) => inject_page_fault(pf),
        Err(EmuError::Unsupported(_)) | Err(EmuError::Decode) => {
            let mut dec = iced_x86::Decoder::with_ip(bitness, &bytes[..n], rip, 0);
            let ins = dec.decode();
            if ins.is_invalid() {
                note(gpa, rip, 1, 0, "undecodable, #UD");
                inject_ud();
            } else {
                vmx::set(GUEST_RIP, ins.next_ip());
                note(gpa, rip, !q.write as u32, q.write as u32, "skipped");
            }
        }
    }
}

/// A host write to its local APIC page: carried out on the real APIC,
/// except INIT and SIPI to CPUs under the hypervisor (`hv::ipi`).
fn apic_write(view: &mut HostView, regs: &mut GuestRegs, gpa: u64, rip: u64) {
    let mut bytes = [0u8; 15];
    let in_page = ((4096 - (rip & 4095)) as usize).min(15);
    if !matches!(view.read(rip, &mut bytes[..in_page]), Ok(Access::Normal)) {
        return inject_ud();
    }
    let er = EmuRegs { gpr: *regs, rip, ..Default::default() };
    let Some(op) = crate::emulate::decode_mmio(&bytes[..in_page], 64, &er) else {
        log::warn!("unemulated APIC write at rip {rip:#x}");
        return inject_ud();
    };
    let off = gpa & 0xfff;
    let reg = crate::hv::memory::phys_ptr(gpa & !3) as *mut u32;
    let take = off == 0x300 && {
        // SAFETY: the APIC's ICR high half, 32-bit read.
        let high = unsafe { (crate::hv::memory::phys_ptr((gpa & !0xfff) + 0x310) as *const u32).read_volatile() };
        crate::hv::ipi::icr_write(op.data as u32, high >> 24)
    };
    if !take {
        // SAFETY: a 32-bit APIC register write, as the host asked.
        unsafe { reg.write_volatile(op.data as u32) };
    }
    vmx::set(GUEST_RIP, op.next_rip);
}

fn inject_page_fault(pf: PageFault) {
    // SAFETY: CR2 is not switched by VMX; the value is the guest's for the
    // #PF injected next. The hypervisor never takes page faults itself.
    unsafe { instr::write_cr2(pf.addr) };
    inject_exception(intr::VECTOR_PF, Some(pf.error_code));
}
