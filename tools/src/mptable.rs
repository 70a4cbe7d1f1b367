//! The Intel MultiProcessor Specification 1.4 tables of a Linux guest: how
//! the guest learns its CPUs, its IOAPIC and how ISA interrupts reach it,
//! without ACPI.
//!
//! The floating pointer structure and the configuration table go together
//! at `linux::MPTABLE_GPA`, in the last KiB of base memory, which Linux
//! scans for the `_MP_` signature. The entries are, in the order the
//! specification requires (by entry type):
//!
//! - one processor per vCPU: local APIC id = vCPU index, version 0x14,
//!   enabled, vCPU 0 the bootstrap processor;
//! - one bus, `ISA`, id 0;
//! - the IOAPIC: id `linux::IOAPIC_ID`, version 0x11, at `linux::IOAPIC_BASE`;
//! - I/O interrupts for the ISA IRQs, conforming (edge-triggered, active
//!   high, as ISA is): ISA IRQ 0 goes to IOAPIC pin 2 and IRQs 1 and 3 to 15
//!   to the pin of the same number; IRQ 2 (the cascade of the two 8259s on
//!   a PC) has no entry. This is the routing of PC firmware (and of QEMU's),
//!   which Linux knows best: its "IRQ0 override". Pin 0 is left unrouted.
//! - local interrupts: ExtINT to LINT0 and NMI to LINT1 of every local
//!   APIC (destination 0xff).

use anyhow::{bail, Result};
use shared_abi::linux;

/// The specification revision both structures report (1.4).
const SPEC_REV: u8 = 4;
/// Version of the local APICs (an integrated APIC).
pub const LAPIC_VERSION: u8 = 0x14;
/// Version of the IOAPIC (an 82093AA-style IOAPIC).
pub const IOAPIC_VERSION: u8 = 0x11;
/// The one bus.
pub const ISA_BUS_ID: u8 = 0;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

/// The IOAPIC pin of ISA IRQ `irq`, or `None` for IRQ 2 (see the module
/// comment).
pub const fn isa_irq_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        i => Some(i),
    }
}

/// Sum of `b` modulo 256.
fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn entry(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
}

/// An I/O or local interrupt entry.
fn interrupt(kind: u8, int_type: u8, bus_irq: u8, dest: u8, dest_pin: u8) -> [u8; SHORT_ENTRY_LEN] {
    // Flags 0: polarity and trigger mode "conform to the bus".
    [kind, int_type, 0, 0, ISA_BUS_ID, bus_irq, dest, dest_pin]
}

/// The floating pointer and the configuration table for `vcpus` vCPUs, as
/// they go at guest-physical `base`.
pub fn build(base: u64, vcpus: u32) -> Result<Vec<u8>> {
    if vcpus == 0 || vcpus > shared_abi::VM_MAX_VCPUS {
        bail!("an MP table for {vcpus} vCPUs: between 1 and {}", shared_abi::VM_MAX_VCPUS);
    }
    let table = base + FLOATING_LEN as u64;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        let mut p = [0u8; PROCESSOR_LEN];
        p[0] = ENTRY_PROCESSOR;
        p[1] = cpu as u8;
        p[2] = LAPIC_VERSION;
        p[3] = flags;
        // CPU signature and feature flags stay 0: Linux takes both from
        // CPUID.
        entry(&mut entries, &p);
        count += 1;
    }
    entry(&mut entries, &[ENTRY_BUS, ISA_BUS_ID, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let ioapic = (linux::IOAPIC_BASE as u32).to_le_bytes();
    entry(&mut entries, &[ENTRY_IOAPIC, linux::IOAPIC_ID, IOAPIC_VERSION, 1, ioapic[0], ioapic[1], ioapic[2], ioapic[3]]);
    count += 1;
    for irq in 0..16u8 {
        if let Some(pin) = isa_irq_pin(irq) {
            entry(&mut entries, &interrupt(ENTRY_IO_INTERRUPT, INT_TYPE_INT, irq, linux::IOAPIC_ID, pin));
            count += 1;
        }
    }
    entry(&mut entries, &interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0xff, 0));
    entry(&mut entries, &interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0xff, 1));
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"PCMP");
    h[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    h[6] = SPEC_REV;
    h[8..16].copy_from_slice(b"UXENRS  ");
    h[16..28].copy_from_slice(b"LINUX VM    ");
    h[34..36].copy_from_slice(&count.to_le_bytes());
    h[36..40].copy_from_slice(&(linux::LAPIC_BASE as u32).to_le_bytes());
    let mut cfg = h.to_vec();
    cfg.extend_from_slice(&entries);
    cfg[7] = sum(&cfg).wrapping_neg();

    let mut f = [0u8; FLOATING_LEN];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&(table as u32).to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REV;
    // Feature byte 1 = 0: the configuration table is present. Feature
    // byte 2 = 0: no IMCR, so the PIC is in virtual-wire mode and Linux
    // leaves ports 0x22/0x23 alone.
    f[10] = sum(&f).wrapping_neg();

    let mut out = f.to_vec();
    out.extend_from_slice(&cfg);
    if base + out.len() as u64 > 0xa_0000 {
        bail!("the MP table ({} bytes at {base:#x}) does not fit below 0xa0000", out.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    /// The entries of a table as (type, bytes), walked as Linux walks them.
    fn parse(t: &[u8], base: u64) -> (Vec<(u8, Vec<u8>)>, u16) {
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        assert_eq!((t[8], t[9], t[11], t[12]), (1, 4, 0, 0));
        let cfg_off = (u32_at(t, 4) as u64 - base) as usize;
        let cfg = &t[cfg_off..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16_at(cfg, 4) as usize;
        assert_eq!(cfg_off + len, t.len(), "the table is all there is");
        assert_eq!(sum(&cfg[..len]), 0, "configuration table checksum");
        assert_eq!(cfg[6], 4);
        assert_eq!(u32_at(cfg, 36) as u64, linux::LAPIC_BASE);
        assert_eq!((u16_at(cfg, 40), cfg[42]), (0, 0), "no extended table");
        let count = u16_at(cfg, 34);
        let mut out = Vec::new();
        let mut o = HEADER_LEN;
        for _ in 0..count {
            let n = if cfg[o] == ENTRY_PROCESSOR { PROCESSOR_LEN } else { SHORT_ENTRY_LEN };
            out.push((cfg[o], cfg[o..o + n].to_vec()));
            o += n;
        }
        assert_eq!(o, len, "entry count and length agree");
        (out, count)
    }

    #[test]
    fn tables_parse_back_with_good_checksums() {
        for vcpus in 1..=shared_abi::VM_MAX_VCPUS {
            let t = build(linux::MPTABLE_GPA, vcpus).unwrap();
            assert!(linux::MPTABLE_GPA + t.len() as u64 <= 0xa_0000);
            assert_eq!(t.len() as u32, 16 + 44 + 20 * vcpus + 8 + 8 + 15 * 8 + 2 * 8);
            let (entries, count) = parse(&t, linux::MPTABLE_GPA);
            assert_eq!(count as u32, vcpus + 1 + 1 + 15 + 2);
            // Sorted by entry type, as the specification requires.
            assert!(entries.windows(2).all(|w| w[0].0 <= w[1].0));
            let cpus: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_PROCESSOR).collect();
            assert_eq!(cpus.len() as u32, vcpus);
            for (i, (_, c)) in cpus.iter().enumerate() {
                assert_eq!(c[1] as usize, i, "APIC id = vCPU index");
                assert_eq!(c[2], LAPIC_VERSION);
                assert_eq!(c[3], if i == 0 { 3 } else { 1 }, "enabled; bootstrap on vCPU 0 only");
            }
            let bus: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_BUS).collect();
            assert_eq!(bus.len(), 1);
            assert_eq!(&bus[0].1[1..8], b"\0ISA   ");
            let io: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_IOAPIC).collect();
            assert_eq!(io.len(), 1);
            assert_eq!((io[0].1[1], io[0].1[2], io[0].1[3]), (linux::IOAPIC_ID, IOAPIC_VERSION, 1));
            assert_eq!(u32_at(&io[0].1, 4) as u64, linux::IOAPIC_BASE);
            let ints: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_IO_INTERRUPT).map(|e| e.1.clone()).collect();
            let routes: Vec<(u8, u8)> = ints.iter().map(|e| (e[5], e[7])).collect();
            let mut want = vec![(0, 2), (1, 1)];
            want.extend((3..16).map(|i| (i, i)));
            assert_eq!(routes, want);
            for e in &ints {
                assert_eq!((e[1], u16_at(e, 2), e[4], e[6]), (INT_TYPE_INT, 0, ISA_BUS_ID, linux::IOAPIC_ID));
            }
            let locals: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_LOCAL_INTERRUPT).map(|e| e.1.clone()).collect();
            assert_eq!(locals.len(), 2);
            assert_eq!((locals[0][1], locals[0][6], locals[0][7]), (INT_TYPE_EXTINT, 0xff, 0));
            assert_eq!((locals[1][1], locals[1][6], locals[1][7]), (INT_TYPE_NMI, 0xff, 1));
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert!(build(linux::MPTABLE_GPA, 0).is_err());
        assert!(build(linux::MPTABLE_GPA, shared_abi::VM_MAX_VCPUS + 1).is_err());
        assert!(build(0x9_ff00, 8).unwrap_err().to_string().contains("does not fit below 0xa0000"));
        assert_eq!(isa_irq_pin(0), Some(2));
        assert_eq!(isa_irq_pin(2), None);
        assert_eq!(isa_irq_pin(4), Some(linux::UART_GSI as u8));
    }
}
