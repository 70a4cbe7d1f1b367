//! The IOAPIC of a Linux guest: an 82093AA-style part with
//! [`shared_abi::IOAPIC_PINS`] inputs, seen through its MMIO page at
//! [`shared_abi::linux::IOAPIC_BASE`].
//!
//! The page has three registers: IOREGSEL (offset 0x00) selects an internal
//! register, IOWIN (0x10) reads and writes it, and the EOI register (0x40)
//! of later (version 0x20) parts lets software end a level-triggered
//! interrupt by vector. The internal registers are the ID (0x00), version
//! (0x01), arbitration ID (0x02) and two dwords per redirection entry
//! (0x10 + 2n low, 0x11 + 2n high). See: 82093AA datasheet, 3.0 and 3.2.
//!
//! An input is a wire: the caller says where it is ([`Ioapic::set_irq`])
//! and gets back the interrupt message, if the change sends one. Sending it
//! to the local APICs is the caller's job: there is no interrupt remapping,
//! so the message is the entry's vector, trigger mode and 8-bit
//! destination as written.

use super::lapic::DeliveryMode;
use shared_abi::IOAPIC_PINS;

/// Offsets of the registers in the MMIO page.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const IOEOI: u64 = 0x40;

/// Internal register indices (IOREGSEL values).
pub const REG_ID: u32 = 0x00;
pub const REG_VERSION: u32 = 0x01;
pub const REG_ARB: u32 = 0x02;
pub const REG_REDIR0: u32 = 0x10;

const PINS: usize = IOAPIC_PINS as usize;

/// The version register: version 0x11 and the highest redirection entry.
/// Linux sees a version below 0x20 and so never uses the EOI register: it
/// relies on the local APICs' broadcast EOI (the APIC offers no
/// EOI-broadcast suppression). See: 82093AA datasheet, 3.2.2.
pub const VERSION: u32 = 0x11 | ((IOAPIC_PINS - 1) << 16);

/// Redirection entry bits. See: 82093AA datasheet, 3.2.4.
pub const RTE_VECTOR: u64 = 0xff;
pub const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
pub const RTE_LOGICAL: u64 = 1 << 11;
pub const RTE_DELIVERY_STATUS: u64 = 1 << 12;
pub const RTE_ACTIVE_LOW: u64 = 1 << 13;
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
pub const RTE_LEVEL: u64 = 1 << 15;
pub const RTE_MASKED: u64 = 1 << 16;
pub const RTE_DEST_SHIFT: u32 = 56;
/// What software may write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask and destination. Delivery status and remote
/// IRR are read-only; bits 55:17 are reserved and read as zero.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An interrupt message from the IOAPIC, for the local APICs it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub vector: u8,
    /// The entry's destination (bits 63:56): an APIC id in physical mode,
    /// a set of APICs in logical mode. See [`Delivery::apic_dest`].
    pub dest: u32,
    pub logical: bool,
    /// Level-triggered: the local APIC sets TMR and reports the EOI.
    pub level: bool,
    pub mode: DeliveryMode,
}

impl Delivery {
    const NONE: Self = Self { vector: 0, dest: 0, logical: false, level: false, mode: DeliveryMode::Fixed };

    /// The destination as x2APIC [`super::lapic::Lapic::matches`] takes it.
    /// The 8-bit xAPIC physical broadcast (0xff) is the x2APIC broadcast; an
    /// 8-bit logical destination falls in cluster 0, where its bit `n`
    /// names x2APIC id `n`: the same CPUs flat logical mode would name, for
    /// up to 8 vCPUs.
    pub fn apic_dest(&self) -> u32 {
        if !self.logical && self.dest == 0xff {
            u32::MAX
        } else {
            self.dest
        }
    }
}

/// The interrupt messages one event sends: at most one per pin. Fixed
/// storage, so the model needs no allocator; iterate it, or see
/// [`Deliveries::as_slice`].
#[derive(Clone, Copy, Debug)]
pub struct Deliveries {
    list: [Delivery; PINS],
    len: usize,
}

impl Deliveries {
    const fn new() -> Self {
        Self { list: [Delivery::NONE; PINS], len: 0 }
    }

    fn push(&mut self, d: Option<Delivery>) {
        if let Some(d) = d {
            self.list[self.len] = d;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[Delivery] {
        &self.list[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> core::slice::Iter<'_, Delivery> {
        self.as_slice().iter()
    }
}

impl IntoIterator for Deliveries {
    type Item = Delivery;
    type IntoIter = core::iter::Take<core::array::IntoIter<Delivery, PINS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.into_iter().take(self.len)
    }
}

impl<'a> IntoIterator for &'a Deliveries {
    type Item = &'a Delivery;
    type IntoIter = core::slice::Iter<'a, Delivery>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The IOAPIC: plain data, copied when a VM is forked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ioapic {
    id: u8,
    regsel: u8,
    /// The redirection entries: the writable bits and remote IRR. Delivery
    /// status is computed when read.
    redir: [u64; PINS],
    /// The level of each input wire, bit `n` for pin `n`, before polarity.
    lines: u32,
}

impl Ioapic {
    /// An IOAPIC after reset: every entry masked (and otherwise zero), every
    /// line low. See: 82093AA datasheet, 3.2.4.
    pub fn new(id: u8) -> Self {
        Self { id, regsel: 0, redir: [RTE_MASKED; PINS], lines: 0 }
    }

    /// A 32-bit read at `offset` in the MMIO page. IOREGSEL reads back;
    /// IOWIN reads the selected register. The EOI register is write-only,
    /// and other offsets are not registers: they read 0. The caller handles
    /// sizes other than 4 bytes (the 82093AA defines only dword accesses).
    pub fn mmio_read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => u32::from(self.regsel),
            IOWIN => self.read_reg(u32::from(self.regsel)),
            _ => 0,
        }
    }

    /// A 32-bit write at `offset` in the MMIO page; other offsets are
    /// ignored. Returns the messages the write sends: unmasking (or making
    /// level-triggered) an asserted level-triggered pin with remote IRR clear
    /// sends it, and an EOI-register write re-sends every pin it clears that
    /// is still asserted (possibly several sharing the vector).
    pub fn mmio_write(&mut self, offset: u64, value: u32) -> Deliveries {
        let mut out = Deliveries::new();
        match offset {
            // IOREGSEL bits 31:8 are reserved.
            IOREGSEL => self.regsel = value as u8,
            IOWIN => out.push(self.write_reg(u32::from(self.regsel), value)),
            // The EOI register of version 0x20 parts takes the vector in
            // bits 7:0 (as in the ICH I/O APIC).
            IOEOI => out = self.eoi(value as u8),
            _ => {}
        }
        out
    }

    fn read_reg(&self, reg: u32) -> u32 {
        match reg {
            // The ID is 8 bits (31:24) as on later parts and as Linux's
            // `IO_APIC_reg_00` reads it: the 82093AA's 4 bits (27:24) cannot
            // hold `shared_abi::linux::IOAPIC_ID`.
            REG_ID => u32::from(self.id) << 24,
            REG_VERSION => VERSION,
            REG_ARB => u32::from(self.id) << 24,
            r if (REG_REDIR0..REG_REDIR0 + 2 * IOAPIC_PINS).contains(&r) => {
                let e = self.entry((r - REG_REDIR0) / 2);
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u32, value: u32) -> Option<Delivery> {
        match reg {
            REG_ID => {
                self.id = (value >> 24) as u8;
                None
            }
            r if (REG_REDIR0..REG_REDIR0 + 2 * IOAPIC_PINS).contains(&r) => {
                let pin = ((r - REG_REDIR0) / 2) as usize;
                let old = self.redir[pin];
                let (keep, new) = if r & 1 == 0 {
                    (0xffff_ffff_0000_0000, u64::from(value))
                } else {
                    (0x0000_0000_ffff_ffff, u64::from(value) << 32)
                };
                let mut e = (old & keep) | (new & RTE_WRITABLE & !keep) | (old & RTE_REMOTE_IRR);
                // Remote IRR belongs to level-triggered interrupts: making
                // the entry edge-triggered clears it, which Linux uses to
                // unstick a pin on parts without the EOI register
                // (`__eoi_ioapic_pin`).
                if e & RTE_LEVEL == 0 {
                    e &= !RTE_REMOTE_IRR;
                }
                self.redir[pin] = e;
                self.service(pin)
            }
            // Version and arbitration ID are read-only; the rest is not a
            // register.
            _ => None,
        }
    }

    /// Redirection entry `pin` as software reads it (0 for pins that do not
    /// exist). Delivery status is set while a level-triggered pin is
    /// asserted but masked: the message waits. Edge-triggered messages are
    /// sent or dropped at once, so theirs is always clear.
    pub fn entry(&self, pin: u32) -> u64 {
        let Some(&e) = self.redir.get(pin as usize) else {
            return 0;
        };
        let waiting = e & RTE_LEVEL != 0 && e & RTE_MASKED != 0 && self.asserted(pin as usize);
        e | if waiting { RTE_DELIVERY_STATUS } else { 0 }
    }

    /// The IOAPIC id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether input `pin` is asserted, after the entry's polarity.
    fn asserted(&self, pin: usize) -> bool {
        let high = self.lines & (1 << pin) != 0;
        high != (self.redir[pin] & RTE_ACTIVE_LOW != 0)
    }

    /// The message entry `e` sends, or `None` for the reserved delivery
    /// modes (011 and 110), which send nothing.
    fn message(e: u64) -> Option<Delivery> {
        let mode = match (e >> RTE_DELIVERY_MODE_SHIFT) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        };
        Some(Delivery {
            vector: (e & RTE_VECTOR) as u8,
            dest: (e >> RTE_DEST_SHIFT) as u32,
            logical: e & RTE_LOGICAL != 0,
            level: e & RTE_LEVEL != 0,
            mode,
        })
    }

    /// Sends the message of level-triggered `pin` if it is asserted,
    /// unmasked and not already waiting for its EOI, and marks it waiting.
    fn service(&mut self, pin: usize) -> Option<Delivery> {
        let e = self.redir[pin];
        if e & RTE_LEVEL == 0 || e & (RTE_MASKED | RTE_REMOTE_IRR) != 0 || !self.asserted(pin) {
            return None;
        }
        let d = Self::message(e)?;
        self.redir[pin] |= RTE_REMOTE_IRR;
        Some(d)
    }

    /// Input `pin` goes to `level` (high or low on the wire; an active-low
    /// entry is asserted while the wire is low).
    ///
    /// An edge-triggered pin sends its message on the transition to
    /// asserted, once, if unmasked: an edge on a masked pin is lost, and a
    /// pin held asserted sends nothing more. A level-triggered pin sends
    /// while asserted and unmasked whenever remote IRR is clear, and then
    /// sets remote IRR until the EOI. Pins that do not exist are ignored.
    pub fn set_irq(&mut self, pin: u32, level: bool) -> Option<Delivery> {
        let p = pin as usize;
        if p >= PINS {
            return None;
        }
        let was = self.asserted(p);
        if level {
            self.lines |= 1 << p;
        } else {
            self.lines &= !(1 << p);
        }
        let e = self.redir[p];
        if e & RTE_LEVEL != 0 {
            return self.service(p);
        }
        if !was && self.asserted(p) && e & RTE_MASKED == 0 {
            return Self::message(e);
        }
        None
    }

    /// An edge: the wire goes high, then low. Either half may send (the
    /// falling half on an active-low pin), never both.
    pub fn pulse(&mut self, pin: u32) -> Option<Delivery> {
        let rise = self.set_irq(pin, true);
        let fall = self.set_irq(pin, false);
        rise.or(fall)
    }

    /// A local APIC retired level-triggered `vector` (broadcast EOI, or the
    /// EOI register): clears remote IRR of every level-triggered entry with
    /// that vector, and re-sends those whose pin is still asserted. Entries
    /// sharing a vector each send, hence a list.
    pub fn eoi(&mut self, vector: u8) -> Deliveries {
        let mut out = Deliveries::new();
        for pin in 0..PINS {
            let e = self.redir[pin];
            if e & RTE_LEVEL != 0 && e & RTE_REMOTE_IRR != 0 && (e & RTE_VECTOR) as u8 == vector {
                self.redir[pin] &= !RTE_REMOTE_IRR;
                out.push(self.service(pin));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: u8 = shared_abi::linux::IOAPIC_ID;

    fn read(io: &Ioapic, reg: u32) -> u32 {
        let mut io = *io;
        assert!(io.mmio_write(IOREGSEL, reg).is_empty());
        io.mmio_read(IOWIN)
    }

    fn write(io: &mut Ioapic, reg: u32, v: u32) -> Deliveries {
        assert!(io.mmio_write(IOREGSEL, reg).is_empty());
        io.mmio_write(IOWIN, v)
    }

    /// Programs entry `pin` as Linux does: high dword, then low.
    fn program(io: &mut Ioapic, pin: u32, e: u64) -> Deliveries {
        write(io, REG_REDIR0 + 2 * pin + 1, (e >> 32) as u32);
        write(io, REG_REDIR0 + 2 * pin, e as u32)
    }

    fn fixed(vector: u8, dest: u32, level: bool) -> Delivery {
        Delivery { vector, dest, logical: false, level, mode: DeliveryMode::Fixed }
    }

    const EDGE_31: u64 = (1 << 56) | 0x31;
    const LEVEL_41: u64 = (2 << 56) | RTE_LEVEL | 0x41;

    #[test]
    fn id_version_and_arbitration_registers() {
        let mut io = Ioapic::new(ID);
        assert_eq!(read(&io, REG_ID), 0x1000_0000);
        assert_eq!(read(&io, REG_VERSION), 0x0017_0011);
        assert_eq!(read(&io, REG_ARB), 0x1000_0000);
        assert_eq!(io.id(), ID);
        // The ID is writable, version and arbitration are not.
        write(&mut io, REG_ID, 0x0200_0000);
        write(&mut io, REG_VERSION, 0);
        write(&mut io, REG_ARB, 0);
        assert_eq!(read(&io, REG_ID), 0x0200_0000);
        assert_eq!(read(&io, REG_VERSION), 0x0017_0011);
        assert_eq!(read(&io, REG_ARB), 0x0200_0000);
    }

    #[test]
    fn register_select_reads_back_and_unknown_registers_are_zero() {
        let mut io = Ioapic::new(ID);
        io.mmio_write(IOREGSEL, 0x1234_5613);
        assert_eq!(io.mmio_read(IOREGSEL), 0x13, "bits 31:8 are reserved");
        for r in [0x03, 0x0f, 0x40, 0xff] {
            assert_eq!(read(&io, r), 0, "register {r:#x}");
            assert!(write(&mut io, r, u32::MAX).is_empty());
        }
        io.mmio_write(IOREGSEL, 0);
        assert_eq!(io, Ioapic::new(ID), "writes to non-registers change nothing");
        // Offsets that are not registers read 0 and ignore writes.
        io.mmio_write(IOREGSEL, REG_VERSION);
        for off in [0x04, 0x08, 0x14, 0x20, 0x30, 0x44, 0xffc] {
            assert_eq!(io.mmio_read(off), 0, "offset {off:#x}");
            assert!(io.mmio_write(off, 0).is_empty());
        }
        assert_eq!(io.mmio_read(IOEOI), 0, "EOI is write-only");
        assert_eq!(io.mmio_read(IOREGSEL), REG_VERSION);
    }

    #[test]
    fn every_entry_starts_masked() {
        let io = Ioapic::new(ID);
        for pin in 0..IOAPIC_PINS {
            assert_eq!(read(&io, REG_REDIR0 + 2 * pin), 0x1_0000, "pin {pin}");
            assert_eq!(read(&io, REG_REDIR0 + 2 * pin + 1), 0, "pin {pin}");
        }
        assert_eq!(io.entry(IOAPIC_PINS), 0);
    }

    #[test]
    fn redirection_entry_round_trip() {
        let mut io = Ioapic::new(ID);
        let e = (0xa5 << 56) | RTE_MASKED | RTE_LEVEL | RTE_ACTIVE_LOW | RTE_LOGICAL | (1 << 8) | 0x7b;
        program(&mut io, 23, e);
        // The wire is low and the entry active-low, level and masked: the
        // message waits, which delivery status shows.
        assert_eq!(read(&io, REG_REDIR0 + 46), (e | RTE_DELIVERY_STATUS) as u32);
        assert_eq!(read(&io, REG_REDIR0 + 47), (e >> 32) as u32);
        io.set_irq(23, true);
        assert_eq!(io.entry(23), e);
        assert_eq!(io.entry(22), RTE_MASKED, "neighbours untouched");
        // Reserved bits are dropped: 31:17 of the low dword and 23:0 of the
        // high one.
        write(&mut io, REG_REDIR0 + 2 * 5, 0xfffe_0000 | 0x55);
        write(&mut io, REG_REDIR0 + 2 * 5 + 1, 0x12ff_ffff);
        assert_eq!(io.entry(5), (0x12 << 56) | 0x55);
        // Half writes keep the other half.
        write(&mut io, REG_REDIR0 + 2 * 5 + 1, 0x3400_0000);
        assert_eq!(io.entry(5), (0x34 << 56) | 0x55);
    }

    #[test]
    fn masked_pins_do_not_deliver() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 1, RTE_MASKED | EDGE_31);
        program(&mut io, 2, RTE_MASKED | LEVEL_41);
        assert_eq!(io.pulse(1), None);
        assert_eq!(io.set_irq(1, true), None);
        assert_eq!(io.set_irq(2, true), None);
        assert_eq!(io.entry(2) & RTE_REMOTE_IRR, 0);
        // The edge was lost: unmasking while held high sends nothing.
        assert!(program(&mut io, 1, EDGE_31).is_empty());
        assert_eq!(io.set_irq(1, true), None);
    }

    #[test]
    fn edge_pin_delivers_once_per_rising_edge() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 4, EDGE_31);
        assert_eq!(io.set_irq(4, true), Some(fixed(0x31, 1, false)));
        assert_eq!(io.set_irq(4, true), None, "held high");
        assert_eq!(io.set_irq(4, false), None, "falling edge");
        assert_eq!(io.set_irq(4, false), None);
        assert_eq!(io.set_irq(4, true), Some(fixed(0x31, 1, false)));
        io.set_irq(4, false);
        assert_eq!(io.pulse(4), Some(fixed(0x31, 1, false)));
        assert_eq!(io.pulse(4), Some(fixed(0x31, 1, false)));
        assert_eq!(io.entry(4) & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS), 0);
        // An EOI for the vector means nothing to an edge pin.
        assert!(io.eoi(0x31).is_empty());
    }

    #[test]
    fn level_pin_delivers_once_until_eoi() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 9, LEVEL_41);
        assert_eq!(io.set_irq(9, true), Some(fixed(0x41, 2, true)));
        assert_eq!(io.entry(9) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
        assert_eq!(read(&io, REG_REDIR0 + 18) & (1 << 14), 1 << 14, "remote IRR visible through IOWIN");
        assert_eq!(io.set_irq(9, true), None, "waiting for EOI");
        assert!(io.eoi(0x42).is_empty(), "another vector");
        assert_ne!(io.entry(9) & RTE_REMOTE_IRR, 0);
        // Still asserted at the EOI: sent again.
        assert_eq!(io.eoi(0x41).as_slice(), &[fixed(0x41, 2, true)]);
        assert_ne!(io.entry(9) & RTE_REMOTE_IRR, 0);
        // Deasserted before the EOI: the EOI clears remote IRR only.
        assert_eq!(io.set_irq(9, false), None);
        assert!(io.eoi(0x41).is_empty());
        assert_eq!(io.entry(9) & RTE_REMOTE_IRR, 0);
        assert!(io.eoi(0x41).is_empty());
        assert_eq!(io.set_irq(9, true), Some(fixed(0x41, 2, true)));
    }

    #[test]
    fn eoi_resends_every_pin_sharing_the_vector() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 10, LEVEL_41);
        program(&mut io, 11, LEVEL_41);
        program(&mut io, 12, LEVEL_41);
        assert!(io.set_irq(10, true).is_some());
        assert!(io.set_irq(11, true).is_some());
        assert!(io.set_irq(12, true).is_some());
        io.set_irq(12, false);
        let out = io.eoi(0x41);
        assert_eq!(out.len(), 2);
        assert_eq!(out.iter().count(), 2);
        assert_eq!(out.into_iter().collect::<std::vec::Vec<_>>(), [fixed(0x41, 2, true); 2]);
        assert_eq!(io.entry(12) & RTE_REMOTE_IRR, 0);
        // Through the EOI register of version 0x20 parts.
        let out = io.mmio_write(IOEOI, 0x41);
        assert_eq!(out.len(), 2);
        io.set_irq(10, false);
        io.set_irq(11, false);
        assert!(io.mmio_write(IOEOI, 0x142).is_empty());
        assert_ne!(io.entry(10) & RTE_REMOTE_IRR, 0, "another vector");
        assert!(io.mmio_write(IOEOI, 0x141).is_empty(), "deasserted: nothing to resend");
        assert_eq!((io.entry(10) | io.entry(11)) & RTE_REMOTE_IRR, 0, "the vector is bits 7:0");
    }

    #[test]
    fn remote_irr_and_delivery_status_are_read_only() {
        let mut io = Ioapic::new(ID);
        // Writing them as 1 sets nothing.
        program(&mut io, 3, RTE_MASKED | RTE_REMOTE_IRR | RTE_DELIVERY_STATUS | LEVEL_41);
        assert_eq!(io.entry(3) & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS), 0);
        // Writing 0 over a set remote IRR keeps it (still level-triggered).
        program(&mut io, 3, LEVEL_41);
        assert!(io.set_irq(3, true).is_some());
        assert!(program(&mut io, 3, LEVEL_41 | (0x43 << 56)).is_empty());
        assert_eq!(io.entry(3) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
        assert_eq!(io.entry(3) >> 56, 0x43);
        // Masking keeps it too, and shows the asserted line as waiting.
        program(&mut io, 3, RTE_MASKED | LEVEL_41);
        assert_eq!(io.entry(3) & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS), RTE_REMOTE_IRR | RTE_DELIVERY_STATUS);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 6, LEVEL_41);
        io.set_irq(6, true);
        // Linux's `__eoi_ioapic_pin` for pre-0x20 parts: masked edge, then
        // back to the saved entry.
        assert!(program(&mut io, 6, RTE_MASKED | 0x41).is_empty());
        assert_eq!(io.entry(6) & RTE_REMOTE_IRR, 0);
        let out = program(&mut io, 6, LEVEL_41);
        assert_eq!(out.as_slice(), &[fixed(0x41, 2, true)], "still asserted: sent again");
    }

    #[test]
    fn active_low_polarity_inverts() {
        let mut io = Ioapic::new(ID);
        // Level, active low: asserted while the wire is low.
        program(&mut io, 7, RTE_MASKED | RTE_ACTIVE_LOW | LEVEL_41);
        assert_eq!(io.entry(7) & RTE_DELIVERY_STATUS, RTE_DELIVERY_STATUS, "wire low = asserted, masked");
        assert_eq!(io.set_irq(7, true), None, "deasserted");
        assert_eq!(io.entry(7) & RTE_DELIVERY_STATUS, 0);
        program(&mut io, 7, RTE_ACTIVE_LOW | LEVEL_41);
        assert_eq!(io.set_irq(7, false), Some(fixed(0x41, 2, true)));
        // Edge, active low: the falling edge sends.
        program(&mut io, 8, RTE_ACTIVE_LOW | EDGE_31);
        assert_eq!(io.set_irq(8, true), None);
        assert_eq!(io.set_irq(8, false), Some(fixed(0x31, 1, false)));
        assert_eq!(io.set_irq(8, false), None);
        assert_eq!(io.pulse(8), Some(fixed(0x31, 1, false)), "on the falling half");
        // Active high, for contrast: the falling edge does not.
        program(&mut io, 8, EDGE_31);
        assert_eq!(io.set_irq(8, true), Some(fixed(0x31, 1, false)));
        assert_eq!(io.set_irq(8, false), None);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 20, RTE_MASKED | LEVEL_41);
        assert_eq!(io.set_irq(20, true), None);
        assert_eq!(io.entry(20) & RTE_DELIVERY_STATUS, RTE_DELIVERY_STATUS);
        let out = program(&mut io, 20, LEVEL_41);
        assert_eq!(out.as_slice(), &[fixed(0x41, 2, true)]);
        assert_eq!(io.entry(20) & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS), RTE_REMOTE_IRR);
        // Masking and unmasking again while waiting for EOI sends nothing.
        program(&mut io, 20, RTE_MASKED | LEVEL_41);
        assert!(program(&mut io, 20, LEVEL_41).is_empty());
        // The high dword write alone sends nothing either.
        assert!(write(&mut io, REG_REDIR0 + 41, 0).is_empty());
    }

    #[test]
    fn message_fields() {
        let mut io = Ioapic::new(ID);
        let msg = |vector, dest, logical, level, mode| Delivery { vector, dest, logical, level, mode };
        let cases = [
            ((3 << 56) | RTE_LOGICAL | (1 << 8) | 0x51, msg(0x51, 3, true, false, DeliveryMode::LowestPriority)),
            ((0xff << 56) | (2 << 8), msg(0, 0xff, false, false, DeliveryMode::Smi)),
            ((1 << 56) | (4 << 8), msg(0, 1, false, false, DeliveryMode::Nmi)),
            (5 << 8, msg(0, 0, false, false, DeliveryMode::Init)),
            ((7 << 8) | 0x20, msg(0x20, 0, false, false, DeliveryMode::ExtInt)),
            ((0x80 << 56) | RTE_LEVEL | 0xa0, msg(0xa0, 0x80, false, true, DeliveryMode::Fixed)),
        ];
        for (pin, (e, want)) in cases.into_iter().enumerate() {
            program(&mut io, pin as u32, e);
            assert_eq!(io.set_irq(pin as u32, true), Some(want), "entry {e:#x}");
        }
        // Reserved delivery modes send nothing and leave remote IRR clear.
        program(&mut io, 15, (3 << 8) | 0x30);
        assert_eq!(io.pulse(15), None);
        program(&mut io, 16, RTE_LEVEL | (6 << 8) | 0x30);
        assert_eq!(io.set_irq(16, true), None);
        assert_eq!(io.entry(16) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn apic_destinations() {
        let d = |dest, logical| Delivery { vector: 0x30, dest, logical, level: false, mode: DeliveryMode::Fixed };
        assert_eq!(d(0xff, false).apic_dest(), u32::MAX, "physical broadcast");
        assert_eq!(d(3, false).apic_dest(), 3);
        assert_eq!(d(0xff, true).apic_dest(), 0xff, "logical: cluster 0, ids 0-7");
        let lapic = super::super::lapic::Lapic::new(3, false, 1);
        assert!(lapic.matches(d(3, false).apic_dest(), false));
        assert!(lapic.matches(d(0xff, false).apic_dest(), false));
        assert!(lapic.matches(d(0x08, true).apic_dest(), true));
        assert!(!lapic.matches(d(0x04, true).apic_dest(), true));
    }

    #[test]
    fn pins_out_of_range_are_ignored() {
        let mut io = Ioapic::new(ID);
        assert_eq!(io.set_irq(IOAPIC_PINS, true), None);
        assert_eq!(io.pulse(u32::MAX), None);
        assert_eq!(io, Ioapic::new(ID));
    }

    #[test]
    fn a_copy_is_independent() {
        let mut io = Ioapic::new(ID);
        program(&mut io, 0, LEVEL_41);
        let fork = io;
        io.set_irq(0, true);
        assert_eq!(fork.entry(0) & RTE_REMOTE_IRR, 0);
    }

    proptest::proptest! {
        /// No MMIO or wire traffic panics; remote IRR is only ever set on
        /// level-triggered entries, and reserved bits always read 0.
        #[test]
        fn random_traffic(ops in proptest::collection::vec((0u8..4, proptest::num::u32::ANY, proptest::num::u32::ANY), 0..128)) {
            let mut io = Ioapic::new(ID);
            for (kind, a, b) in ops {
                match kind {
                    0 => { io.mmio_write(IOREGSEL, a % 0x48); }
                    1 => { io.mmio_write(u64::from(a % 0x50) & !3, b); }
                    2 => { io.set_irq(a % 30, b & 1 != 0); }
                    _ => { io.eoi(b as u8); }
                }
                let _ = io.mmio_read(u64::from(a % 0x50));
                for pin in 0..IOAPIC_PINS {
                    let e = io.entry(pin);
                    proptest::prop_assert!(e & RTE_LEVEL != 0 || e & RTE_REMOTE_IRR == 0);
                    proptest::prop_assert_eq!(e & 0x00ff_ffff_fffe_0000, 0);
                }
            }
        }
    }
}
