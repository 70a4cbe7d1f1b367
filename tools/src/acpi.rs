//! The ACPI tables of a Linux guest (docs/guest-abi.md, part 2): the
//! smallest hardware-reduced ACPI that carries a VM generation ID.
//!
//! ACPI is here for one device, the VM generation ID that Linux's
//! `vmgenid` driver reads and that the hypervisor changes at every fork
//! (`shared_abi::VM_FLAG_VMGENID`). Hardware-reduced ACPI (FADT flag
//! HW_REDUCED_ACPI) has no fixed hardware at all: no PM timer, no SCI, no
//! GPE blocks, no sleep registers; events come through a Generic Event
//! Device, whose interrupt is an ordinary IOAPIC input. The tables, built
//! with the rust-vmm `acpi_tables` crate, go together at
//! `linux::ACPI_GPA`, 16-byte aligned, in this order:
//!
//! - RSDP (revision 2, OEM `UXENRS`), pointing at the XSDT; the zero page's
//!   `acpi_rsdp_addr` points at it, and it lies where Linux scans for one
//!   without that field (0xe_0000-0xf_ffff);
//! - XSDT: the FADT and the MADT;
//! - FADT (revision 6.5): HW_REDUCED_ACPI and physical APIC destination
//!   mode; IA-PC boot flags "no VGA" and "no MSI"; no FACS; the DSDT by its
//!   64-bit address; hypervisor vendor `UXENRS`;
//! - MADT: local APIC address `linux::LAPIC_BASE`, no 8259s (flags 0); a
//!   processor local APIC per vCPU (ACPI processor UID and APIC id = vCPU
//!   index, enabled); the IOAPIC (id `linux::IOAPIC_ID`, at
//!   `linux::IOAPIC_BASE`, GSI base 0); an interrupt source override of
//!   ISA IRQ 0 to GSI 2, as the MP table routes it; NMI on LINT1 of every
//!   local APIC, as the MP table says too;
//! - DSDT, whose AML is:
//!
//! ```text
//! Scope (\_SB) {
//!     Device (COM1) {
//!         Name (_HID, EisaId ("PNP0501"))
//!         Name (_UID, 1)
//!         Name (_CRS, ResourceTemplate () {
//!             IO (Decode16, 0x3f8, 0x3f8, 8, 8)
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { UART_GSI }
//!         })
//!     }
//!     Device (VGEN) {
//!         Name (_HID, "VMGENCTR")
//!         Name (_CID, "VM_Gen_Counter")
//!         Name (_DDN, "VM_Gen_Counter")
//!         Method (ADDR, 0) { Return (Package () { LOW, HIGH }) }
//!     }
//!     Device (GED) {
//!         Name (_HID, "ACPI0013")
//!         Name (_UID, 0)
//!         Name (_CRS, ResourceTemplate () {
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { VMGENID_GSI }
//!         })
//!         Method (_EVT, 1, Serialized) {
//!             If (Arg0 == VMGENID_GSI) { Notify (VGEN, 0x80) }
//!         }
//!     }
//! }
//! ```
//!
//! `ADDR` gives the generation ID's address (`linux::VMGENID_GPA`) as its
//! low and high 32 bits, the form of Microsoft's specification. When the
//! hypervisor pulses IOAPIC input `linux::VMGENID_GSI` after a fork,
//! Linux's GED driver runs `_EVT` with that GSI, which notifies the device
//! (0x80, "the ID changed"), and `vmgenid` reads the new ID and reseeds the
//! kernel's random number generator with it. There is no `_S5`, so Linux
//! has no ACPI power-off and still halts to power off; no `\_PIC` or PCI.
//!
//! `COM1` is there for its interrupt. A hardware-reduced platform has no
//! 8259s, and then Linux numbers the IOAPIC's inputs dynamically and maps
//! no ISA IRQ by itself (with the MP table it took them from its entries):
//! only an interrupt a device's `_CRS` names is mapped, under a number of
//! Linux's choosing. The 8250 driver takes the port and its interrupt from
//! `COM1` (through PnP); without it, it would ask for IRQ 4, which is not
//! the UART's, fail to start the port, and the console's reads would fail,
//! so that the first shell exits at once.

use acpi_tables::{aml, Aml};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use anyhow::{bail, Result};
use shared_abi::linux;
use zerocopy::{Immutable, IntoBytes};

pub const OEM_ID: [u8; 6] = *b"UXENRS";
pub const OEM_TABLE_ID: [u8; 8] = *b"UXENVM  ";
const OEM_REVISION: u32 = 1;
/// FADT `hypervisor_vendor_identity` (ACPI 6.0 and later).
const HYPERVISOR_VENDOR: [u8; 8] = *b"UXENRS\0\0";
/// IA-PC boot architecture flags (ACPI 6.5, table 5.11): VGA not present,
/// MSI not supported.
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_MSI: u16 = 1 << 3;
/// DSDT revision 2: 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
/// The notification value "the generation ID changed" (Microsoft's VM
/// generation ID specification).
pub const NOTIFY_GENERATION: u8 = 0x80;
/// Every table starts at a multiple of this.
const ALIGN: usize = 16;

/// MADT interrupt source override (ACPI 6.5, 5.2.12.5): ISA IRQ `source`
/// reaches `gsi`, with `flags` (0: as the bus says, edge and active high
/// for ISA).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}
const _: () = assert!(core::mem::size_of::<InterruptSourceOverride>() == 10);

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT local APIC NMI (ACPI 6.5, 5.2.12.7): the NMI pin `lint` of the
/// processor with UID `uid` (0xff: all).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    uid: u8,
    flags: u16,
    lint: u8,
}
const _: () = assert!(core::mem::size_of::<LocalApicNmi>() == 6);

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Where each table went, as guest-physical addresses, and the bytes from
/// the first table's address on. The addresses are for the checks of
/// each table's place and links; the VMM writes `bytes` only.
#[derive(Debug)]
#[allow(dead_code)]
pub struct Tables {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
    pub bytes: Vec<u8>,
}

/// The DSDT's AML (the module comment's ASL) for a generation ID at
/// `genid_gpa`, interrupting through `gsi`.
pub fn dsdt_aml(genid_gpa: u64, gsi: u32) -> Vec<u8> {
    let (low, high) = (genid_gpa as u32, (genid_gpa >> 32) as u32);
    let addr = aml::Package::new(vec![&low, &high]);
    let ret = aml::Return::new(&addr);
    let (hid, cid, ddn) = (aml::Name::new("_HID".into(), &"VMGENCTR"), aml::Name::new("_CID".into(), &"VM_Gen_Counter"), aml::Name::new("_DDN".into(), &"VM_Gen_Counter"));
    let addr_method = aml::Method::new("ADDR".into(), 0, false, vec![&ret]);
    let vgen = aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr_method]);

    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let target = aml::Path::new("VGEN");
    let notify = aml::Notify::new(&target, &NOTIFY_GENERATION);
    let arg0 = aml::Arg(0);
    let is_ours = aml::Equal::new(&arg0, &gsi);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let (ged_hid, ged_uid, ged_crs) = (aml::Name::new("_HID".into(), &"ACPI0013"), aml::Name::new("_UID".into(), &aml::ZERO), aml::Name::new("_CRS".into(), &crs));
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    let ged = aml::Device::new("GED_".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt]);

    let uart_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uart_uid = aml::Name::new("_UID".into(), &aml::ONE);
    let (ports, uart_irq) = (aml::IO::new(linux::UART_PORT_FIRST, linux::UART_PORT_FIRST, 8, 8), aml::Interrupt::new(true, true, false, false, linux::UART_GSI));
    let uart_res = aml::ResourceTemplate::new(vec![&ports, &uart_irq]);
    let uart_crs = aml::Name::new("_CRS".into(), &uart_res);
    let com1 = aml::Device::new("COM1".into(), vec![&uart_hid, &uart_uid, &uart_crs]);

    let mut out = Vec::new();
    aml::Scope::new("\\_SB_".into(), vec![&com1, &vgen, &ged]).to_aml_bytes(&mut out);
    out
}

fn align(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(ALIGN) * ALIGN, 0);
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The tables for `vcpus` vCPUs, laid out from guest-physical `base`, with
/// the generation ID at `genid_gpa`.
pub fn build(base: u64, vcpus: u32, genid_gpa: u64) -> Result<Tables> {
    if vcpus == 0 || vcpus > shared_abi::VM_MAX_VCPUS {
        bail!("{vcpus} vCPUs: the ACPI tables describe 1 to {}", shared_abi::VM_MAX_VCPUS);
    }
    if base % ALIGN as u64 != 0 {
        bail!("the ACPI tables must start 16-byte aligned, not at {base:#x}");
    }
    // The RSDP, then each table 16-byte aligned; the XSDT's length is
    // known before the addresses it holds.
    let mut out = vec![0u8; Rsdp::len()];
    align(&mut out);
    let xsdt_at = out.len();
    let xsdt_len = 36 + 2 * 8;
    out.resize(xsdt_at + xsdt_len, 0);
    align(&mut out);

    let dsdt = {
        let body = dsdt_aml(genid_gpa, linux::VMGENID_GSI);
        let mut t = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        t.append_slice(&body);
        t
    };
    let dsdt_at = out.len();
    out.extend_from_slice(dsdt.as_slice());
    align(&mut out);

    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ForceApicPhysicalDestinationMode)
        .dsdt_64(base + dsdt_at as u64);
    let mut fadt = fadt;
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_MSI).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let fadt_at = out.len();
    out.extend_from_slice(&bytes(&fadt.finalize()));
    align(&mut out);

    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(linux::LAPIC_BASE as u32));
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(i as u8, i as u8, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(linux::IOAPIC_ID, linux::IOAPIC_BASE as u32, 0));
    madt.add_structure(InterruptSourceOverride { kind: 2, length: 10, bus: 0, source: 0, gsi: 2, flags: 0 });
    madt.add_structure(LocalApicNmi { kind: 4, length: 6, uid: 0xff, flags: 0, lint: 1 });
    let madt_at = out.len();
    out.extend_from_slice(&bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(base + fadt_at as u64);
    xsdt.add_entry(base + madt_at as u64);
    let x = bytes(&xsdt);
    assert_eq!(x.len(), xsdt_len);
    out[xsdt_at..xsdt_at + xsdt_len].copy_from_slice(&x);
    let rsdp = Rsdp::new(OEM_ID, base + xsdt_at as u64);
    out[..Rsdp::len()].copy_from_slice(rsdp.as_bytes());

    if out.len() as u64 > linux::ACPI_MAX {
        bail!("the ACPI tables take {} bytes, more than the {} reserved for them", out.len(), linux::ACPI_MAX);
    }
    let at = |o: usize| base + o as u64;
    Ok(Tables { rsdp: base, xsdt: at(xsdt_at), fadt: at(fadt_at), madt: at(madt_at), dsdt: at(dsdt_at), bytes: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// The table at guest-physical `gpa`: checks its signature and
    /// checksum, returns its bytes.
    fn table<'a>(t: &'a Tables, gpa: u64, sig: &[u8; 4]) -> &'a [u8] {
        let o = (gpa - t.rsdp) as usize;
        assert_eq!(&t.bytes[o..o + 4], sig);
        let len = u32_at(&t.bytes, o + 4) as usize;
        let b = &t.bytes[o..o + len];
        assert_eq!(sum(b), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&b[10..16], b"UXENRS");
        assert_eq!(o % 16, 0);
        b
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn rsdp_xsdt_and_checksums() {
        let t = build(linux::ACPI_GPA, 2, linux::VMGENID_GPA).unwrap();
        let r = &t.bytes[..36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
        assert_eq!(sum(r), 0, "RSDP extended checksum");
        assert_eq!((r[15], u32_at(r, 20)), (2, 36));
        assert_eq!(u64_at(r, 24), t.xsdt);
        let x = table(&t, t.xsdt, b"XSDT");
        assert_eq!(x.len(), 36 + 16);
        assert_eq!((u64_at(x, 36), u64_at(x, 44)), (t.fadt, t.madt));
        table(&t, t.dsdt, b"DSDT");
        // Everything within what the layout reserves, and below the ID's
        // page.
        assert!(t.bytes.len() as u64 <= linux::ACPI_MAX);
        const { assert!(linux::ACPI_GPA + linux::ACPI_MAX <= linux::VMGENID_GPA) };
    }

    #[test]
    fn fadt_is_hardware_reduced() {
        let t = build(linux::ACPI_GPA, 1, linux::VMGENID_GPA).unwrap();
        let f = table(&t, t.fadt, b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!((f[8], f[131]), (6, 5), "revision 6.5");
        let flags = u32_at(f, 112);
        assert_eq!(flags, (1 << 20) | (1 << 19), "HW_REDUCED_ACPI and APIC physical mode only");
        assert_eq!(u16::from_le_bytes([f[109], f[110]]), IAPC_NO_VGA | IAPC_NO_MSI);
        // No FACS, the DSDT by its 64-bit address only.
        assert_eq!((u32_at(f, 36), u32_at(f, 40), u64_at(f, 132)), (0, 0, 0));
        assert_eq!(u64_at(f, 140), t.dsdt);
        assert_eq!(&f[268..276], b"UXENRS\0\0");
    }

    #[test]
    fn madt_lists_cpus_ioapic_and_overrides() {
        for vcpus in [1, 2, 8] {
            let t = build(linux::ACPI_GPA, vcpus, linux::VMGENID_GPA).unwrap();
            let m = table(&t, t.madt, b"APIC");
            assert_eq!((u32_at(m, 36), u32_at(m, 40)), (0xfee0_0000, 0), "LAPIC address; no 8259s");
            let mut entries = Vec::new();
            let mut o = 44;
            while o < m.len() {
                entries.push(m[o..o + m[o + 1] as usize].to_vec());
                o += m[o + 1] as usize;
            }
            assert_eq!(o, m.len());
            assert_eq!(entries.len(), vcpus as usize + 3);
            for (i, e) in entries.iter().take(vcpus as usize).enumerate() {
                assert_eq!(e[..], [0, 8, i as u8, i as u8, 1, 0, 0, 0], "vCPU {i}");
            }
            let io = &entries[vcpus as usize];
            assert_eq!(io[..4], [1, 12, linux::IOAPIC_ID, 0]);
            assert_eq!((u32_at(io, 4) as u64, u32_at(io, 8)), (linux::IOAPIC_BASE, 0));
            assert_eq!(entries[vcpus as usize + 1][..], [2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
            assert_eq!(entries[vcpus as usize + 2][..], [4, 6, 0xff, 0, 0, 1]);
        }
    }

    #[test]
    fn dsdt_describes_the_generation_id_and_its_event() {
        let t = build(linux::ACPI_GPA, 1, linux::VMGENID_GPA).unwrap();
        let d = table(&t, t.dsdt, b"DSDT");
        assert_eq!(d[8], 2, "revision 2: 64-bit integers");
        let a = &d[36..];
        assert_eq!(a, &dsdt_aml(linux::VMGENID_GPA, linux::VMGENID_GSI)[..]);
        // Scope (\_SB), with the three devices in it.
        assert_eq!(a[0], 0x10);
        assert!(find(a, b"\\_SB_").is_some());
        for dev in [&b"COM1"[..], b"VGEN", b"GED_"] {
            let at = find(a, dev).unwrap_or_else(|| panic!("{dev:?}"));
            // DeviceOp (ExtOpPrefix 0x5b, 0x82), then its length, then the name.
            assert!(a[..at].windows(2).any(|w| w == [0x5b, 0x82]));
        }
        // The IDs, as AML strings (StringPrefix 0x0d ... NUL).
        for s in [&b"\x0dVMGENCTR\0"[..], b"\x0dVM_Gen_Counter\0", b"\x0dACPI0013\0"] {
            assert!(find(a, s).is_some(), "{}", String::from_utf8_lossy(s));
        }
        // Method (ADDR, 0) { Return (Package (2) { 0xe1000, 0 }) }:
        // MethodOp, length, name, flags 0, ReturnOp, PackageOp, length 6,
        // 2 elements, DWordPrefix 0x000e1000, ZeroOp.
        let addr = find(a, b"ADDR").unwrap();
        assert_eq!(a[addr - 2], 0x14);
        assert_eq!(a[addr + 4..addr + 15], [0x00, 0xa4, 0x12, 0x08, 0x02, 0x0c, 0x00, 0x10, 0x0e, 0x00, 0x00]);
        // The GED's interrupt: an extended IRQ descriptor (0x89), length 6,
        // consumer, edge, active high, exclusive (flags 0b0011), one GSI.
        let gsi = linux::VMGENID_GSI.to_le_bytes();
        let irq = [0x89, 6, 0, 0x03, 1, gsi[0], gsi[1], gsi[2], gsi[3]];
        assert!(find(a, &irq).is_some());
        // _EVT (1 argument, serialized: flags 0x09) compares Arg0 with the
        // GSI and notifies VGEN with 0x80: If (LEqual (Arg0, 5)) { Notify
        // (VGEN, 0x80) }.
        let evt = find(a, b"_EVT").unwrap();
        assert_eq!(a[evt + 4], 0x09);
        let body = &a[evt + 5..];
        assert_eq!(body[0], 0xa0, "IfOp");
        let cond = [0x93, 0x68, 0x0a, linux::VMGENID_GSI as u8];
        assert_eq!(body[2..6], cond);
        assert_eq!(body[6..12], [0x86, b'V', b'G', b'E', b'N', 0x0a]);
        assert_eq!(body[12], NOTIFY_GENERATION);
        // COM1: EisaId ("PNP0501") (DWordPrefix 0x0c, then 0x0105d041),
        // its eight ports from 0x3f8 (an I/O descriptor, 0x47) and IRQ 4.
        assert!(find(a, &[0x0c, 0x41, 0xd0, 0x05, 0x01]).is_some());
        assert!(find(a, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x08, 0x08]).is_some());
        let uart = linux::UART_GSI.to_le_bytes();
        assert!(find(a, &[0x89, 6, 0, 0x03, 1, uart[0], uart[1], uart[2], uart[3]]).is_some());
        // An address above 4 GiB splits into its halves.
        let hi = dsdt_aml(0x1_2345_6000, 5);
        assert!(find(&hi, &[0x12, 0x08, 0x02, 0x0c, 0x00, 0x60, 0x45, 0x23, 0x01]).is_some());
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(build(linux::ACPI_GPA, 0, linux::VMGENID_GPA).unwrap_err().to_string().contains("1 to 8"));
        assert!(build(linux::ACPI_GPA, 9, linux::VMGENID_GPA).is_err());
        assert!(build(linux::ACPI_GPA + 8, 1, linux::VMGENID_GPA).unwrap_err().to_string().contains("aligned"));
    }
}
