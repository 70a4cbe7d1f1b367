//! The local APIC of a Linux guest's vCPU, in x2APIC mode, with the
//! TSC-deadline timer.
//!
//! The guest sees an APIC that is already in x2APIC mode and cannot leave
//! it: there is no xAPIC page to fall back to, so every register is an MSR
//! in 0x800-0x8ff and every WRMSR is checked as strictly as the hardware
//! checks it (reserved bits, read-only and write-only registers raise #GP).
//! See: SDM Vol. 3A, 11.12 (x2APIC) and Table 11-6 (the register map).
//!
//! Time is what the caller says it is: every operation that depends on the
//! timer takes `now` as a TSC value, and the model never reads a clock. The
//! APIC timer counts TSC ticks divided by the Divide Configuration Register,
//! so the TSC is the only time base needed.
//!
//! Only fixed interrupts live here (IRR, ISR, TMR, the priorities and EOI).
//! NMI, INIT, SIPI and the routing of IPIs to other vCPUs belong to the
//! caller, which gets them back as [`WriteEffect::Ipi`].

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE. See: SDM Vol. 3A, 11.5.4.1.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC MSR range.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

/// IA32_APIC_BASE bits. See: SDM Vol. 3A, Figure 11-5.
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_EN: u64 = 1 << 11;
/// The xAPIC page address IA32_APIC_BASE reports. Nothing is mapped there:
/// the address is only reported, because Linux checks it.
pub const APIC_BASE_ADDR: u64 = shared_abi::linux::LAPIC_BASE;

/// The x2APIC register MSRs. See: SDM Vol. 3A, Table 11-6.
pub mod reg {
    pub const ID: u32 = 0x802;
    pub const VERSION: u32 = 0x803;
    pub const TPR: u32 = 0x808;
    pub const PPR: u32 = 0x80a;
    pub const EOI: u32 = 0x80b;
    pub const LDR: u32 = 0x80d;
    pub const SVR: u32 = 0x80f;
    /// ISR bits 31:0; bits `32 * i + 31 : 32 * i` are at `ISR0 + i`.
    pub const ISR0: u32 = 0x810;
    pub const TMR0: u32 = 0x818;
    pub const IRR0: u32 = 0x820;
    pub const ESR: u32 = 0x828;
    pub const LVT_CMCI: u32 = 0x82f;
    pub const ICR: u32 = 0x830;
    pub const LVT_TIMER: u32 = 0x832;
    pub const LVT_THERMAL: u32 = 0x833;
    pub const LVT_PMC: u32 = 0x834;
    pub const LVT_LINT0: u32 = 0x835;
    pub const LVT_LINT1: u32 = 0x836;
    pub const LVT_ERROR: u32 = 0x837;
    pub const TMICT: u32 = 0x838;
    pub const TMCCT: u32 = 0x839;
    pub const TDCR: u32 = 0x83e;
    pub const SELF_IPI: u32 = 0x83f;
}

/// LVT entries counted by the version register: timer, thermal, PMC,
/// LINT0, LINT1 and error. CMCI is not counted; its register is plain
/// storage (see [`Lapic::read_msr`]).
pub const LVT_COUNT: u32 = 6;
/// The version register: an integrated APIC (0x14) with `LVT_COUNT`
/// entries, and no EOI-broadcast suppression (bit 24 clear), so every EOI
/// of a level-triggered interrupt reaches the IOAPIC.
pub const VERSION: u32 = 0x14 | ((LVT_COUNT - 1) << 16);

/// SVR bits. See: SDM Vol. 3A, Figure 11-23.
pub const SVR_ENABLE: u32 = 1 << 8;
/// Writable SVR bits: the spurious vector, APIC enable and focus processor
/// checking. Bit 12 (EOI-broadcast suppression) is reserved because
/// [`VERSION`] does not offer it.
const SVR_WRITABLE: u64 = 0x3ff;
const SVR_RESET: u32 = 0xff;

/// LVT bits. See: SDM Vol. 3A, Figure 11-8.
pub const LVT_MASKED: u32 = 1 << 16;
const LVT_VECTOR: u32 = 0xff;
const LVT_DELIVERY_STATUS: u32 = 1 << 12;
const LVT_REMOTE_IRR: u32 = 1 << 14;
const LVT_TIMER_MODE_SHIFT: u32 = 17;
/// LVT timer modes (bits 18:17).
pub const TIMER_ONE_SHOT: u32 = 0;
pub const TIMER_PERIODIC: u32 = 1;
pub const TIMER_TSC_DEADLINE: u32 = 2;

/// ESR bits. See: SDM Vol. 3A, 11.5.3.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// Vectors 0-15 are reserved for exceptions; the APIC refuses them.
/// See: SDM Vol. 3A, 11.5.2.
const FIRST_LEGAL_VECTOR: u8 = 16;

// Indices into `Lapic::lvt`.
const LVT_I_CMCI: usize = 0;
const LVT_I_TIMER: usize = 1;
const LVT_I_ERROR: usize = 6;
const LVT_ENTRIES: usize = 7;

/// Which bits of each LVT software may set, by index: vector (7:0),
/// delivery mode (10:8), polarity (13), trigger mode (15), mask (16) and
/// timer mode (18:17), where the entry has them.
const LVT_WRITABLE: [u32; LVT_ENTRIES] = [
    0x0001_07ff, // CMCI: vector, delivery mode, mask
    0x0007_00ff, // timer: vector, mask, timer mode
    0x0001_07ff, // thermal
    0x0001_07ff, // performance counters
    0x0001_a7ff, // LINT0: also polarity and trigger mode
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
];

/// The read-only status bits of each LVT. A write that has them set is not
/// refused: they are not reserved, and a read-modify-write of an entry must
/// not fault. The model never sets them (interrupts are accepted at once).
const LVT_READ_ONLY: [u32; LVT_ENTRIES] = [
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS,
];

/// ICR bits software may set in x2APIC mode: vector, delivery mode,
/// destination mode, level, trigger mode, shorthand and the 32-bit
/// destination. Delivery status (12) does not exist in x2APIC mode and is
/// reserved with bits 13, 17:16 and 31:20. See: SDM Vol. 3A, 11.12.9.
const ICR_WRITABLE: u64 = 0xffff_ffff_000c_cfff;

/// Writable TDCR bits: the divide value is bits 3, 1 and 0.
const TDCR_WRITABLE: u64 = 0b1011;

/// An x2APIC register access the guest must see fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// Raise #GP(0) in the guest: a reserved or write-only register read, a
    /// read-only register written, or reserved bits set.
    Gp,
}

/// How an interrupt is delivered. See: SDM Vol. 3A, 11.6.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    /// From an IOAPIC entry only: the vector comes from an 8259A, which
    /// Linux guests do not have.
    ExtInt,
}

/// The destination shorthand of an IPI (ICR bits 19:18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field says who.
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An interprocessor interrupt the guest wrote to the ICR, decoded. The
/// caller routes it: to the vCPUs whose APIC [`Lapic::matches`] `dest`, or
/// to the shorthand's set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub mode: DeliveryMode,
    /// Destination mode: x2APIC logical (cluster and bitmap) rather than
    /// physical.
    pub logical: bool,
    /// Level (bit 14): clear only for an INIT level de-assert.
    pub level_assert: bool,
    /// Trigger mode (bit 15).
    pub level_triggered: bool,
    pub shorthand: Shorthand,
    /// The x2APIC destination (ICR bits 63:32).
    pub dest: u32,
}

impl Ipi {
    /// Whether this is an INIT level de-assert, which only synchronised
    /// arbitration IDs on the old APIC bus and must not reset a vCPU.
    /// Linux still sends it after the INIT assert. See: SDM Vol. 3A, 11.6.1.
    pub fn is_init_deassert(&self) -> bool {
        self.mode == DeliveryMode::Init && self.level_triggered && !self.level_assert
    }
}

/// What a register write asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// An EOI retired `vector`. When `level` (its TMR bit was set) the
    /// interrupt came from a level-triggered IOAPIC pin, which must see the
    /// EOI ([`super::ioapic::Ioapic::eoi`]).
    Eoi { vector: u8, level: bool },
    /// Send this IPI.
    Ipi(Ipi),
}

/// A 256-bit interrupt register: IRR, ISR or TMR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] |= 1 << (v & 31);
    }

    fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] &= !(1 << (v & 31));
    }

    fn test(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }

    fn highest(&self) -> Option<u8> {
        (0..8).rev().find(|&i| self.0[i] != 0).map(|i| (i * 32 + 31 - self.0[i].leading_zeros() as usize) as u8)
    }
}

/// The local APIC of one vCPU. It is plain data, copied when a VM is forked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lapic {
    id: u32,
    apic_base: u64,
    tsc_khz: u32,
    tpr: u8,
    svr: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    /// The ESR as software reads it: the errors logged up to its last write.
    esr: u32,
    /// Errors logged since the last ESR write, which a write makes visible.
    /// See: SDM Vol. 3A, 11.5.3.
    esr_pending: u32,
    lvt: [u32; LVT_ENTRIES],
    icr: u64,
    tmict: u32,
    tdcr: u32,
    /// The TSC at which the timer fires: where the current count reaches
    /// zero, or the TSC deadline. `None` when disarmed.
    expiry: Option<u64>,
}

impl Lapic {
    /// An APIC in its power-up state, already in x2APIC mode (Linux finds
    /// x2APIC enabled, as firmware with more than 255 CPUs leaves it).
    /// `tsc_khz` is the timer's input clock: the APIC timer counts at the
    /// TSC rate divided by the Divide Configuration Register.
    /// See: SDM Vol. 3A, 11.4.7.1.
    pub fn new(apic_id: u32, bsp: bool, tsc_khz: u32) -> Self {
        let bsp = if bsp { APIC_BASE_BSP } else { 0 };
        Self::reset(apic_id, APIC_BASE_ADDR | APIC_BASE_EN | APIC_BASE_EXTD | bsp, tsc_khz)
    }

    fn reset(id: u32, apic_base: u64, tsc_khz: u32) -> Self {
        Self {
            id,
            apic_base,
            tsc_khz,
            tpr: 0,
            svr: SVR_RESET,
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            irr: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            lvt: [LVT_MASKED; LVT_ENTRIES],
            icr: 0,
            tmict: 0,
            tdcr: 0,
            expiry: None,
        }
    }

    /// INIT: everything back to the power-up state except the APIC id and
    /// IA32_APIC_BASE, so the APIC stays in x2APIC mode.
    /// See: SDM Vol. 3A, 11.4.7.3 and 11.12.5.1.
    pub fn init(&mut self) {
        *self = Self::reset(self.id, self.apic_base, self.tsc_khz);
    }

    /// The x2APIC id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The timer's input clock in kHz, for the caller to report to the guest
    /// (every computation here is in TSC ticks).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// WRMSR IA32_APIC_BASE. The only accepted value keeps EN and EXTD set
    /// and the base at 0xfee00000: the guest cannot leave x2APIC mode, since
    /// there is no xAPIC page behind it. The BSP bit is read-only and its
    /// written value ignored, so a read-modify-write works on every vCPU.
    /// See: SDM Vol. 3A, 11.12.5 (x2APIC to xAPIC is an invalid transition).
    pub fn set_apic_base(&mut self, v: u64) -> Result<(), ApicError> {
        if v & !APIC_BASE_BSP != APIC_BASE_ADDR | APIC_BASE_EN | APIC_BASE_EXTD {
            return Err(ApicError::Gp);
        }
        Ok(())
    }

    /// Whether the SVR's software-enable bit is set.
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The task priority (CR8 is bits 7:4 of it).
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Sets the task priority, for MOV to CR8 (`cr8 << 4`).
    pub fn set_tpr(&mut self, v: u8) {
        self.tpr = v;
    }

    /// The processor priority: the task priority, or the class of the
    /// highest in-service vector if that is higher. See: SDM Vol. 3A, 11.8.3.1.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Whether `vector` is requested (its IRR bit is set).
    pub fn requested(&self, vector: u8) -> bool {
        self.irr.test(vector)
    }

    /// Whether `vector` is in service (its ISR bit is set).
    pub fn in_service(&self, vector: u8) -> bool {
        self.isr.test(vector)
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_I_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3
    }

    /// The timer's divisor from TDCR bits 3, 1, 0: 000 is 2, 001 is 4, ...
    /// 110 is 128 and 111 is 1. See: SDM Vol. 3A, Figure 11-10.
    fn divide(&self) -> u64 {
        let code = ((self.tdcr >> 1) & 0b100) | (self.tdcr & 0b11);
        1 << ((code + 1) & 7)
    }

    /// The timer's current count at `now`.
    fn current_count(&self, now: u64) -> u32 {
        // See: SDM Vol. 3A, 11.5.4.1 (in TSC-deadline mode it reads 0).
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            return 0;
        }
        let Some(mut expiry) = self.expiry else {
            return 0;
        };
        let divide = self.divide();
        if now >= expiry {
            if self.timer_mode() != TIMER_PERIODIC {
                return 0;
            }
            expiry = self.next_period(expiry, now);
        }
        // The count drops by one after each whole `divide` ticks, so it
        // reads the initial count until the first `divide` ticks have gone.
        (expiry - now).div_ceil(divide).min(u64::from(u32::MAX)) as u32
    }

    /// The first period boundary after `now`, for a periodic timer that was
    /// due at `expiry` (at or before `now`). Missed periods are skipped.
    fn next_period(&self, expiry: u64, now: u64) -> u64 {
        let period = (u64::from(self.tmict) * self.divide()).max(1);
        let periods = (now - expiry) / period + 1;
        expiry.saturating_add(periods.saturating_mul(period))
    }

    /// RDMSR of an APIC register: 0x800-0x8ff, and for convenience
    /// IA32_APIC_BASE and IA32_TSC_DEADLINE. Write-only (EOI, SELF IPI) and
    /// reserved registers raise #GP, as does any MSR outside those.
    pub fn read_msr(&self, msr: u32, now: u64) -> Result<u64, ApicError> {
        let v = match msr {
            MSR_APIC_BASE => return Ok(self.apic_base),
            // The hardware clears the MSR when the deadline passes, whether
            // or not the caller has polled the timer yet.
            MSR_TSC_DEADLINE => {
                return Ok(match self.tsc_deadline() {
                    d if d <= now => 0,
                    d => d,
                })
            }
            reg::ID => self.id,
            reg::VERSION => VERSION,
            reg::TPR => u32::from(self.tpr),
            reg::PPR => u32::from(self.ppr()),
            // The logical x2APIC id is derived from the x2APIC id: the
            // cluster (id[19:4]) in bits 31:16, and one bit of 16 for
            // id[3:0]. See: SDM Vol. 3A, 11.12.10.2.
            reg::LDR => ldr(self.id),
            reg::SVR => self.svr,
            m @ reg::ISR0..=0x817 => self.isr.0[(m - reg::ISR0) as usize],
            m @ reg::TMR0..=0x81f => self.tmr.0[(m - reg::TMR0) as usize],
            m @ reg::IRR0..=0x827 => self.irr.0[(m - reg::IRR0) as usize],
            reg::ESR => self.esr,
            // CMCI is not counted in the version register, but Linux may
            // still touch it when IA32_MCG_CAP reports CMCI; it reads and
            // writes as storage and never fires.
            reg::LVT_CMCI => self.lvt[LVT_I_CMCI],
            reg::ICR => return Ok(self.icr),
            m @ reg::LVT_TIMER..=reg::LVT_ERROR => self.lvt[lvt_index(m)],
            reg::TMICT => self.tmict,
            reg::TMCCT => self.current_count(now),
            reg::TDCR => self.tdcr,
            _ => return Err(ApicError::Gp),
        };
        Ok(u64::from(v))
    }

    /// WRMSR of an APIC register: 0x800-0x8ff, and for convenience
    /// IA32_APIC_BASE and IA32_TSC_DEADLINE.
    ///
    /// x2APIC checks every write: read-only registers, reserved registers
    /// and reserved bits raise #GP, and so does a non-zero EOI or ESR write.
    /// A refused write changes nothing. See: SDM Vol. 3A, 11.12.1.3 and
    /// Table 11-6.
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<WriteEffect, ApicError> {
        match msr {
            MSR_APIC_BASE => self.set_apic_base(value)?,
            MSR_TSC_DEADLINE => {
                self.poll_timer(now);
                self.set_tsc_deadline(value);
            }
            reg::TPR => self.tpr = checked(value, 0xff)? as u8,
            reg::EOI => {
                if value != 0 {
                    return Err(ApicError::Gp);
                }
                return Ok(self.eoi());
            }
            reg::SVR => {
                self.svr = checked(value, SVR_WRITABLE)?;
                if !self.software_enabled() {
                    // See: SDM Vol. 3A, 11.4.7.2.
                    for e in &mut self.lvt {
                        *e |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                if value != 0 {
                    return Err(ApicError::Gp);
                }
                // The write makes the errors logged since the previous
                // write visible and starts a new log. See: SDM Vol. 3A, 11.5.3.
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            reg::ICR => return self.write_icr(value),
            reg::LVT_CMCI => self.write_lvt(LVT_I_CMCI, value, now)?,
            m @ reg::LVT_TIMER..=reg::LVT_ERROR => self.write_lvt(lvt_index(m), value, now)?,
            reg::TMICT => {
                let count = checked(value, 0xffff_ffff)?;
                self.poll_timer(now);
                // See: SDM Vol. 3A, 11.5.4.1 (ignored in TSC-deadline mode).
                if self.timer_mode() != TIMER_TSC_DEADLINE {
                    self.tmict = count;
                    self.expiry = (count != 0).then(|| now.saturating_add(u64::from(count) * self.divide()));
                }
            }
            reg::TDCR => {
                let tdcr = checked(value, TDCR_WRITABLE)?;
                self.poll_timer(now);
                // The count reached so far carries on at the new rate.
                let count = self.current_count(now);
                self.tdcr = tdcr;
                if self.timer_mode() != TIMER_TSC_DEADLINE && self.expiry.is_some() {
                    self.expiry = Some(now.saturating_add(u64::from(count.max(1)) * self.divide()));
                }
            }
            reg::SELF_IPI => {
                let vector = checked(value, 0xff)? as u8;
                if vector < FIRST_LEGAL_VECTOR {
                    self.error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    self.accept(vector, false);
                }
            }
            // ID, VERSION, PPR, LDR, ISR, TMR, IRR and TMCCT are read-only;
            // everything else is reserved.
            _ => return Err(ApicError::Gp),
        }
        Ok(WriteEffect::None)
    }

    /// EOI: retires the highest in-service vector. See: SDM Vol. 3A, 11.8.5.
    fn eoi(&mut self) -> WriteEffect {
        match self.isr.highest() {
            Some(vector) => {
                self.isr.clear(vector);
                WriteEffect::Eoi { vector, level: self.tmr.test(vector) }
            }
            None => WriteEffect::None,
        }
    }

    fn write_icr(&mut self, value: u64) -> Result<WriteEffect, ApicError> {
        if value & !ICR_WRITABLE != 0 {
            return Err(ApicError::Gp);
        }
        let mode = match (value >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            // 011 and 111 are reserved in the ICR (ExtINT is an LVT and
            // IOAPIC mode only); a reserved encoding is refused like a
            // reserved bit.
            _ => return Err(ApicError::Gp),
        };
        let shorthand = match (value >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        self.icr = value;
        let ipi = Ipi {
            vector: value as u8,
            mode,
            logical: value & (1 << 11) != 0,
            level_assert: value & (1 << 14) != 0,
            level_triggered: value & (1 << 15) != 0,
            shorthand,
            dest: (value >> 32) as u32,
        };
        // A fixed interrupt with a vector under 16 is an error of the sender
        // and is not sent. See: SDM Vol. 3A, 11.5.3.
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && ipi.vector < FIRST_LEGAL_VECTOR {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
            return Ok(WriteEffect::None);
        }
        Ok(WriteEffect::Ipi(ipi))
    }

    fn write_lvt(&mut self, i: usize, value: u64, now: u64) -> Result<(), ApicError> {
        let mut v = checked(value, u64::from(LVT_WRITABLE[i] | LVT_READ_ONLY[i]))? & LVT_WRITABLE[i];
        if i == LVT_I_TIMER {
            let mode = (v >> LVT_TIMER_MODE_SHIFT) & 3;
            if mode == 3 {
                // The fourth timer mode is reserved.
                return Err(ApicError::Gp);
            }
            // Whatever fell due before this write happened under the old
            // settings.
            self.poll_timer(now);
            if mode != self.timer_mode() {
                // Changing the mode disarms the timer; the initial count
                // and the deadline start from zero in the new mode.
                // See: SDM Vol. 3A, 11.5.4.1.
                self.expiry = None;
                self.tmict = 0;
            }
        }
        // A software-disabled APIC keeps every LVT masked.
        // See: SDM Vol. 3A, 11.4.7.2.
        if !self.software_enabled() {
            v |= LVT_MASKED;
        }
        self.lvt[i] = v;
        Ok(())
    }

    /// Logs an APIC error and raises the error LVT's interrupt.
    /// See: SDM Vol. 3A, 11.5.3.
    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_I_ERROR];
        let vector = (lvt & LVT_VECTOR) as u8;
        // An illegal vector in the error LVT itself is dropped rather than
        // logged, which would loop.
        if lvt & LVT_MASKED == 0 && vector >= FIRST_LEGAL_VECTOR {
            self.irr.set(vector);
            self.tmr.clear(vector);
        }
    }

    /// IA32_TSC_DEADLINE: the armed deadline, 0 if none or not in
    /// TSC-deadline mode. A deadline that has passed reads here until the
    /// timer is polled ([`Lapic::read_msr`] hides it at once).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.expiry.unwrap_or(0)
        } else {
            0
        }
    }

    /// WRMSR IA32_TSC_DEADLINE: arms the timer at TSC `v`, or disarms it if
    /// `v` is 0. Ignored outside TSC-deadline mode. A deadline already past
    /// fires at the next poll. See: SDM Vol. 3A, 11.5.4.1.
    pub fn set_tsc_deadline(&mut self, v: u64) {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.expiry = (v != 0).then_some(v);
        }
    }

    /// Fires the timer if it is due at `now`. A masked timer still expires
    /// (one-shot and deadline disarm, periodic reloads) without setting IRR.
    /// A periodic timer polled late fires once and re-arms at the next
    /// period boundary after `now`: missed periods are lost rather than
    /// delivered as a burst, which a guest could not tell from one late
    /// interrupt anyway (IRR holds one request per vector).
    pub fn poll_timer(&mut self, now: u64) {
        let Some(expiry) = self.expiry else {
            return;
        };
        if now < expiry {
            return;
        }
        self.expiry = if self.timer_mode() == TIMER_PERIODIC && self.tmict != 0 {
            Some(self.next_period(expiry, now))
        } else {
            None
        };
        let lvt = self.lvt[LVT_I_TIMER];
        if lvt & LVT_MASKED == 0 {
            let vector = (lvt & LVT_VECTOR) as u8;
            if vector < FIRST_LEGAL_VECTOR {
                self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            } else {
                self.irr.set(vector);
                self.tmr.clear(vector);
            }
        }
    }

    /// The TSC at which the timer next fires, if it is armed and not masked:
    /// when the caller must wake the vCPU. A masked timer needs no wake-up:
    /// its state catches up at the next [`Lapic::poll_timer`] or read.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.lvt[LVT_I_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        self.expiry
    }

    /// Accepts a fixed or lowest-priority interrupt from the IOAPIC or
    /// another APIC: sets its IRR bit, and its TMR bit if `level` (cleared
    /// otherwise), so that its EOI is reported to the IOAPIC.
    ///
    /// A software-disabled APIC drops it: it responds only to NMI, SMI, INIT
    /// and SIPI (SDM Vol. 3A, 11.4.7.2), which the SDM leaves implicit for
    /// fixed interrupts; the IRR it already holds is kept. Vectors 0-15 are
    /// dropped and logged as "received illegal vector".
    pub fn accept(&mut self, vector: u8, level: bool) {
        if !self.software_enabled() {
            return;
        }
        if vector < FIRST_LEGAL_VECTOR {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        self.irr.set(vector);
        if level {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
    }

    /// The vector to deliver now, if any: the highest requested vector whose
    /// priority class is above the processor priority's. None while the APIC
    /// is software-disabled. See: SDM Vol. 3A, 11.8.3.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.software_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The vCPU takes `vector` (VM entry injects it): its IRR bit moves to
    /// the ISR. Nothing happens if it was not requested.
    pub fn ack(&mut self, vector: u8) {
        if self.irr.test(vector) {
            self.irr.clear(vector);
            self.isr.set(vector);
        }
    }

    /// Whether this APIC is a destination of `dest`, in physical mode (the
    /// x2APIC id) or x2APIC logical mode (a cluster in bits 31:16 and a
    /// bitmap of the 16 APICs in it in bits 15:0). 0xffff_ffff is broadcast
    /// in both. See: SDM Vol. 3A, 11.12.9 and 11.12.10.
    pub fn matches(&self, dest: u32, logical: bool) -> bool {
        if dest == u32::MAX {
            return true;
        }
        if !logical {
            return dest == self.id;
        }
        let ldr = ldr(self.id);
        dest >> 16 == ldr >> 16 && dest & ldr & 0xffff != 0
    }
}

/// The logical x2APIC id of x2APIC id `id`. See: SDM Vol. 3A, 11.12.10.2.
pub fn ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

/// The index in `Lapic::lvt` of LVT register `msr` (0x832-0x837).
fn lvt_index(msr: u32) -> usize {
    (msr - reg::LVT_TIMER) as usize + LVT_I_TIMER
}

/// `value` as a 32-bit register value, if it sets no bit outside `allowed`.
fn checked(value: u64, allowed: u64) -> Result<u32, ApicError> {
    if value & !allowed != 0 {
        return Err(ApicError::Gp);
    }
    Ok(value as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KHZ: u32 = 2_000_000;
    const TIMER_VECTOR: u64 = 0xec;

    /// A software-enabled APIC, as Linux leaves it after `setup_local_APIC`.
    fn enabled(id: u32) -> Lapic {
        let mut a = Lapic::new(id, id == 0, KHZ);
        a.write_msr(reg::SVR, 0x1ff, 0).unwrap();
        a
    }

    fn wr(a: &mut Lapic, msr: u32, v: u64) -> WriteEffect {
        a.write_msr(msr, v, 0).unwrap()
    }

    fn rd(a: &Lapic, msr: u32) -> u64 {
        a.read_msr(msr, 0).unwrap()
    }

    fn eoi(a: &mut Lapic) -> WriteEffect {
        a.write_msr(reg::EOI, 0, 0).unwrap()
    }

    /// Arms an unmasked one-shot timer with divide `tdcr` and count `count`
    /// at TSC `t0`.
    fn one_shot(tdcr: u64, count: u64, t0: u64) -> Lapic {
        let mut a = enabled(0);
        a.write_msr(reg::TDCR, tdcr, t0).unwrap();
        a.write_msr(reg::LVT_TIMER, TIMER_VECTOR, t0).unwrap();
        a.write_msr(reg::TMICT, count, t0).unwrap();
        a
    }

    #[test]
    fn reset_state() {
        let bsp = Lapic::new(0, true, KHZ);
        assert_eq!(bsp.apic_base(), 0xfee0_0d00);
        assert_eq!(bsp.read_msr(MSR_APIC_BASE, 0), Ok(0xfee0_0d00));
        let ap = Lapic::new(3, false, KHZ);
        assert_eq!(ap.apic_base(), 0xfee0_0c00);
        assert_eq!(ap.id(), 3);
        assert_eq!(rd(&ap, reg::ID), 3);
        assert_eq!(rd(&ap, reg::VERSION), 0x0005_0014);
        assert_eq!(rd(&ap, reg::SVR), 0xff);
        assert!(!ap.software_enabled());
        for m in [reg::LVT_CMCI, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837] {
            assert_eq!(rd(&ap, m), 0x1_0000, "LVT {m:#x} masked");
        }
        for m in [reg::TPR, reg::PPR, reg::ESR, reg::ICR, reg::TMICT, reg::TMCCT, reg::TDCR] {
            assert_eq!(rd(&ap, m), 0, "{m:#x}");
        }
        for m in 0x810..=0x827 {
            assert_eq!(rd(&ap, m), 0, "{m:#x}");
        }
        assert_eq!(ap.tsc_deadline(), 0);
        assert_eq!(ap.next_deadline(), None);
        assert_eq!(ap.tsc_khz(), KHZ);
    }

    #[test]
    fn ldr_is_derived_from_the_id() {
        for (id, want) in [(0, 0x1), (1, 0x2), (5, 0x20), (15, 0x8000), (16, 0x1_0001), (0x23, 0x2_0008), (0x1234, 0x123_0010)] {
            assert_eq!(rd(&Lapic::new(id, false, KHZ), reg::LDR), want, "id {id:#x}");
        }
    }

    #[test]
    fn apic_base_stays_in_x2apic_mode() {
        let mut a = Lapic::new(0, true, KHZ);
        assert_eq!(a.set_apic_base(0xfee0_0d00), Ok(()));
        // The BSP bit is read-only: an AP's value written on the BSP is fine
        // and leaves the bit set.
        assert_eq!(a.set_apic_base(0xfee0_0c00), Ok(()));
        assert_eq!(a.apic_base(), 0xfee0_0d00);
        for bad in [
            0xfee0_0900, // xAPIC mode
            0xfee0_0100, // disabled
            0xfee0_0500, // EXTD without EN
            0xfed0_0d00, // moved
            0x1_fee0_0d00,
            0xfee0_0f00, // bit 9
            0xfee0_0d01, // bit 0
        ] {
            assert_eq!(a.set_apic_base(bad), Err(ApicError::Gp), "{bad:#x}");
            assert_eq!(a.write_msr(MSR_APIC_BASE, bad, 0), Err(ApicError::Gp));
        }
        assert_eq!(a.apic_base(), 0xfee0_0d00);
        let mut ap = Lapic::new(1, false, KHZ);
        assert_eq!(ap.write_msr(MSR_APIC_BASE, 0xfee0_0d00, 0), Ok(WriteEffect::None));
        assert_eq!(ap.apic_base(), 0xfee0_0c00, "an AP cannot become the BSP");
    }

    #[test]
    fn unreadable_registers_fault() {
        let a = enabled(0);
        // EOI and SELF IPI are write-only; the rest are not x2APIC
        // registers (APR, DFR, ICR2 and the holes).
        for m in [0x800, 0x801, 0x804, 0x807, 0x809, 0x80b, 0x80c, 0x80e, 0x829, 0x82e, 0x831, 0x83a, 0x83d, 0x83f, 0x840, 0x8ff]
        {
            assert_eq!(a.read_msr(m, 0), Err(ApicError::Gp), "{m:#x}");
        }
        assert_eq!(a.read_msr(0x7ff, 0), Err(ApicError::Gp));
        assert_eq!(a.read_msr(0x900, 0), Err(ApicError::Gp));
    }

    #[test]
    fn read_only_and_reserved_registers_refuse_writes() {
        let mut a = enabled(7);
        a.accept(0x40, true);
        a.ack(0x40);
        a.accept(0x50, false);
        let before = a;
        for m in [reg::ID, reg::VERSION, reg::PPR, reg::LDR, reg::TMCCT, 0x800, 0x809, 0x80e, 0x831, 0x840, 0x8ff] {
            assert_eq!(a.write_msr(m, 0, 0), Err(ApicError::Gp), "{m:#x}");
            assert_eq!(a.write_msr(m, 1, 0), Err(ApicError::Gp), "{m:#x}");
        }
        for m in 0x810..=0x827 {
            assert_eq!(a.write_msr(m, 0, 0), Err(ApicError::Gp), "{m:#x}");
        }
        assert_eq!(a, before, "refused writes change nothing");
        assert_eq!(rd(&a, reg::ID), 7);
    }

    #[test]
    fn reserved_bits_fault() {
        let mut a = enabled(0);
        let before = a;
        for (m, v) in [
            (reg::TPR, 0x100),
            (reg::TPR, 1 << 32),
            (reg::SVR, 1 << 12), // EOI-broadcast suppression is not offered
            (reg::SVR, 0x1ff | (1 << 10)),
            (reg::LVT_TIMER, 1 << 19),
            (reg::LVT_TIMER, 3 << 17), // reserved timer mode
            (reg::LVT_TIMER, 1 << 8),  // no delivery mode in the timer LVT
            (reg::LVT_TIMER, 1 << 13),
            (reg::LVT_ERROR, 4 << 8),
            (reg::LVT_LINT0, 1 << 17),
            (reg::LVT_LINT1, 1 << 32),
            (reg::LVT_THERMAL, 1 << 13),
            (reg::LVT_PMC, 1 << 15),
            (reg::LVT_CMCI, 1 << 15),
            (reg::TMICT, 1 << 32),
            (reg::TDCR, 0b100),
            (reg::TDCR, 0x10),
            (reg::SELF_IPI, 0x100),
            (reg::ICR, 1 << 12), // delivery status does not exist in x2APIC
            (reg::ICR, 1 << 13),
            (reg::ICR, 1 << 16),
            (reg::ICR, 1 << 20),
            (reg::ICR, 1 << 31),
            (reg::ICR, 0x300 | 0x30), // reserved delivery mode 011
            (reg::ICR, 0x700 | 0x30), // reserved delivery mode 111
        ] {
            assert_eq!(a.write_msr(m, v, 0), Err(ApicError::Gp), "{m:#x} <- {v:#x}");
        }
        assert_eq!(a, before);
    }

    #[test]
    fn non_zero_eoi_and_esr_writes_fault() {
        let mut a = enabled(0);
        a.accept(0x30, false);
        a.ack(0x30);
        assert_eq!(a.write_msr(reg::EOI, 1, 0), Err(ApicError::Gp));
        assert!(a.in_service(0x30), "a refused EOI retires nothing");
        assert_eq!(a.write_msr(reg::ESR, 0x40, 0), Err(ApicError::Gp));
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x30, level: false });
    }

    #[test]
    fn read_only_lvt_status_bits_are_ignored_not_refused() {
        let mut a = enabled(0);
        let v = 0x1_0000 | LVT_REMOTE_IRR as u64 | LVT_DELIVERY_STATUS as u64 | 0x700;
        assert_eq!(a.write_msr(reg::LVT_LINT0, v, 0), Ok(WriteEffect::None));
        assert_eq!(rd(&a, reg::LVT_LINT0), 0x1_0700);
        assert_eq!(a.write_msr(reg::LVT_TIMER, 0x1000 | 0x20, 0), Ok(WriteEffect::None));
        assert_eq!(rd(&a, reg::LVT_TIMER), 0x20);
    }

    #[test]
    fn register_round_trips() {
        let mut a = enabled(0);
        for (m, v) in [
            (reg::TPR, 0x5a),
            (reg::SVR, 0x3ff),
            (reg::LVT_CMCI, 0x1_02f0),
            (reg::LVT_TIMER, 0x2_00ef),
            (reg::LVT_THERMAL, 0x4fa),
            (reg::LVT_PMC, 0x400),
            (reg::LVT_LINT0, 0x1_8700),
            (reg::LVT_LINT1, 0x400),
            (reg::LVT_ERROR, 0xfe),
            (reg::TDCR, 0xb),
        ] {
            wr(&mut a, m, v);
            assert_eq!(rd(&a, m), v, "{m:#x}");
        }
        assert_eq!(a.tpr(), 0x5a);
        a.set_tpr(0x20);
        assert_eq!(rd(&a, reg::TPR), 0x20);
    }

    #[test]
    fn tpr_holds_back_its_own_class_and_below() {
        let mut a = enabled(0);
        wr(&mut a, reg::TPR, 0x50);
        assert_eq!(rd(&a, reg::PPR), 0x50);
        a.accept(0x45, false);
        assert_eq!(a.pending_vector(), None, "lower class held");
        a.accept(0x5f, false);
        assert_eq!(a.pending_vector(), None, "same class as TPR held");
        a.accept(0x60, false);
        assert_eq!(a.pending_vector(), Some(0x60));
        wr(&mut a, reg::TPR, 0x60);
        assert_eq!(a.pending_vector(), None);
        wr(&mut a, reg::TPR, 0);
        assert_eq!(a.pending_vector(), Some(0x60));
        // The sub-class bits of TPR do not matter.
        wr(&mut a, reg::TPR, 0x4f);
        assert_eq!(a.pending_vector(), Some(0x60));
    }

    #[test]
    fn ppr_follows_the_highest_in_service_class() {
        let mut a = enabled(0);
        a.accept(0x82, false);
        a.ack(0x82);
        assert_eq!(rd(&a, reg::PPR), 0x80, "ISR class, sub-class cleared");
        a.accept(0x8f, false);
        assert_eq!(a.pending_vector(), None, "same class as the vector in service");
        a.accept(0x91, false);
        assert_eq!(a.pending_vector(), Some(0x91));
        wr(&mut a, reg::TPR, 0x7f);
        assert_eq!(a.ppr(), 0x80, "ISR class above TPR");
        wr(&mut a, reg::TPR, 0x93);
        assert_eq!(a.ppr(), 0x93, "TPR class above ISR: TPR itself");
        assert_eq!(a.pending_vector(), None);
        wr(&mut a, reg::TPR, 0x85);
        assert_eq!(a.ppr(), 0x85, "equal classes: TPR, sub-class kept");
        assert_eq!(a.pending_vector(), Some(0x91));
    }

    #[test]
    fn ack_moves_irr_to_isr() {
        let mut a = enabled(0);
        a.accept(0x41, false);
        assert_eq!(rd(&a, reg::IRR0 + 2), 1 << 1);
        assert!(a.requested(0x41));
        a.ack(0x41);
        assert_eq!(rd(&a, reg::IRR0 + 2), 0);
        assert_eq!(rd(&a, reg::ISR0 + 2), 1 << 1);
        assert_eq!(a.pending_vector(), None);
        // Acking something never requested changes nothing.
        a.ack(0x99);
        assert!(!a.in_service(0x99));
        // Vector 0xff lands in the last word, top bit.
        a.accept(0xff, false);
        assert_eq!(rd(&a, reg::IRR0 + 7), 1 << 31);
    }

    #[test]
    fn eoi_retires_the_highest_in_service_vector_first() {
        let mut a = enabled(0);
        a.accept(0x30, false);
        a.ack(0x30);
        a.accept(0x40, false);
        assert_eq!(a.pending_vector(), Some(0x40), "a higher class nests");
        a.ack(0x40);
        a.accept(0x35, false);
        assert_eq!(a.pending_vector(), None);
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x40, level: false });
        assert!(a.in_service(0x30));
        assert_eq!(a.pending_vector(), None, "0x35 still below the 0x30 in service");
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x30, level: false });
        assert_eq!(a.pending_vector(), Some(0x35));
        a.ack(0x35);
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x35, level: false });
        assert_eq!(eoi(&mut a), WriteEffect::None, "nothing in service");
    }

    #[test]
    fn level_eoi_only_when_tmr_was_set() {
        let mut a = enabled(0);
        a.accept(0x51, true);
        assert_eq!(rd(&a, reg::TMR0 + 2), 1 << 17);
        a.accept(0x60, false);
        a.ack(0x60);
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x60, level: false });
        a.ack(0x51);
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x51, level: true });
        // The same vector accepted edge-triggered clears its TMR bit.
        a.accept(0x51, false);
        assert_eq!(rd(&a, reg::TMR0 + 2), 0);
        a.ack(0x51);
        assert_eq!(eoi(&mut a), WriteEffect::Eoi { vector: 0x51, level: false });
    }

    #[test]
    fn illegal_vectors_are_dropped_and_logged() {
        let mut a = enabled(0);
        wr(&mut a, reg::LVT_ERROR, 0xfe);
        a.accept(15, false);
        assert!(!a.requested(15));
        assert_eq!(rd(&a, reg::ESR), 0, "not visible before the ESR write");
        wr(&mut a, reg::ESR, 0);
        assert_eq!(rd(&a, reg::ESR), u64::from(ESR_RECEIVE_ILLEGAL_VECTOR));
        assert_eq!(a.pending_vector(), Some(0xfe), "the error LVT fired");
        wr(&mut a, reg::ESR, 0);
        assert_eq!(rd(&a, reg::ESR), 0, "the next write clears it");
        // A vector of 16 is legal.
        a.accept(16, false);
        assert!(a.requested(16));
    }

    #[test]
    fn software_disabled_apic() {
        let mut a = enabled(0);
        wr(&mut a, reg::LVT_TIMER, TIMER_VECTOR);
        wr(&mut a, reg::LVT_LINT0, 0x700);
        a.accept(0x40, false);
        wr(&mut a, reg::SVR, 0xff);
        assert!(!a.software_enabled());
        assert_eq!(rd(&a, reg::LVT_TIMER), 0x1_0000 | TIMER_VECTOR, "disabling masks every LVT");
        assert_eq!(rd(&a, reg::LVT_LINT0), 0x1_0700);
        assert_eq!(a.pending_vector(), None, "IRR held, not delivered");
        a.accept(0x50, false);
        assert!(!a.requested(0x50), "fixed interrupts are dropped");
        wr(&mut a, reg::LVT_TIMER, TIMER_VECTOR);
        assert_eq!(rd(&a, reg::LVT_TIMER) & 0x1_0000, 0x1_0000, "mask cannot be cleared");
        wr(&mut a, reg::SELF_IPI, 0x60);
        assert!(!a.requested(0x60));
        wr(&mut a, reg::SVR, 0x1ff);
        assert_eq!(a.pending_vector(), Some(0x40), "held IRR delivered after re-enabling");
        assert_eq!(rd(&a, reg::LVT_TIMER) & 0x1_0000, 0x1_0000, "re-enabling does not unmask");
    }

    #[test]
    fn self_ipi() {
        let mut a = enabled(0);
        assert_eq!(a.write_msr(reg::SELF_IPI, 0x31, 0), Ok(WriteEffect::None));
        assert!(a.requested(0x31));
        assert!(!a.tmr.test(0x31));
        assert_eq!(a.pending_vector(), Some(0x31));
        wr(&mut a, reg::SELF_IPI, 5);
        assert!(!a.requested(5));
        wr(&mut a, reg::ESR, 0);
        assert_eq!(rd(&a, reg::ESR), u64::from(ESR_SEND_ILLEGAL_VECTOR));
    }

    fn ipi(a: &mut Lapic, icr: u64) -> Ipi {
        match a.write_msr(reg::ICR, icr, 0) {
            Ok(WriteEffect::Ipi(i)) => i,
            other => panic!("ICR {icr:#x}: {other:?}"),
        }
    }

    #[test]
    fn icr_decodes_linux_ipis() {
        let mut a = enabled(0);
        // INIT assert and de-assert to APIC 1, as `wakeup_secondary_cpu_via_init`.
        let init = ipi(&mut a, (1 << 32) | 0x4500);
        assert_eq!(
            init,
            Ipi {
                vector: 0,
                mode: DeliveryMode::Init,
                logical: false,
                level_assert: true,
                level_triggered: false,
                shorthand: Shorthand::None,
                dest: 1,
            }
        );
        assert!(!init.is_init_deassert());
        let deassert = ipi(&mut a, (1 << 32) | 0x8500);
        assert_eq!((deassert.mode, deassert.level_assert, deassert.level_triggered, deassert.dest), (DeliveryMode::Init, false, true, 1));
        assert!(deassert.is_init_deassert());
        let init_level = ipi(&mut a, (1 << 32) | 0xc500);
        assert!(init_level.level_assert && init_level.level_triggered && !init_level.is_init_deassert());
        assert_eq!(rd(&a, reg::ICR), (1 << 32) | 0xc500, "ICR reads back");
        // STARTUP with the trampoline page 0x9a.
        let sipi = ipi(&mut a, (1 << 32) | 0x0600 | 0x9a);
        assert_eq!((sipi.mode, sipi.vector, sipi.dest, sipi.shorthand), (DeliveryMode::StartUp, 0x9a, 1, Shorthand::None));
        // A fixed IPI to all but self (`apic->send_IPI_allbutself`).
        let all = ipi(&mut a, 0x000c_00fd);
        assert_eq!((all.mode, all.vector, all.shorthand, all.logical), (DeliveryMode::Fixed, 0xfd, Shorthand::AllExcludingSelf, false));
        assert_eq!(ipi(&mut a, 0x0004_00fb).shorthand, Shorthand::SelfOnly);
        assert_eq!(ipi(&mut a, 0x0008_00fb).shorthand, Shorthand::AllIncludingSelf);
        // A logical fixed IPI to cluster 1, APIC 2 (x2APIC id 0x12).
        let logical = ipi(&mut a, (0x0001_0004 << 32) | 0x0800 | 0xf3);
        assert_eq!((logical.logical, logical.dest, logical.vector), (true, 0x0001_0004, 0xf3));
        assert!(Lapic::new(0x12, false, KHZ).matches(logical.dest, true));
        assert_eq!(ipi(&mut a, (3 << 32) | 0x400).mode, DeliveryMode::Nmi);
        assert_eq!(ipi(&mut a, 0x200).mode, DeliveryMode::Smi);
        assert_eq!(ipi(&mut a, 0x130).mode, DeliveryMode::LowestPriority);
        assert_eq!(ipi(&mut a, u64::MAX << 32 | 0xf0).dest, u32::MAX);
    }

    #[test]
    fn fixed_ipi_with_illegal_vector_is_not_sent() {
        let mut a = enabled(0);
        assert_eq!(a.write_msr(reg::ICR, (1 << 32) | 0x0f, 0), Ok(WriteEffect::None));
        wr(&mut a, reg::ESR, 0);
        assert_eq!(rd(&a, reg::ESR), u64::from(ESR_SEND_ILLEGAL_VECTOR));
        // NMI and INIT carry no vector: 0 is fine.
        assert!(matches!(a.write_msr(reg::ICR, 0x400, 0), Ok(WriteEffect::Ipi(_))));
    }

    #[test]
    fn divide_encodings() {
        let mut a = enabled(0);
        for (tdcr, div) in [(0b0000, 2), (0b0001, 4), (0b0010, 8), (0b0011, 16), (0b1000, 32), (0b1001, 64), (0b1010, 128), (0b1011, 1)] {
            wr(&mut a, reg::TDCR, tdcr);
            assert_eq!(a.divide(), div, "TDCR {tdcr:#b}");
        }
    }

    #[test]
    fn one_shot_fires_exactly_at_count_times_divide() {
        for (tdcr, div) in [(0xb, 1), (0x3, 16), (0xa, 128)] {
            let t0 = 1_000_000;
            let mut a = one_shot(tdcr, 1000, t0);
            let due = t0 + 1000 * div;
            assert_eq!(a.next_deadline(), Some(due), "divide {div}");
            a.poll_timer(due - 1);
            assert_eq!(a.pending_vector(), None, "divide {div}: not one tick early");
            assert_eq!(a.read_msr(reg::TMCCT, due - 1), Ok(1));
            a.poll_timer(due);
            assert_eq!(a.pending_vector(), Some(TIMER_VECTOR as u8), "divide {div}");
            assert_eq!(a.next_deadline(), None, "one-shot disarms");
            assert_eq!(a.read_msr(reg::TMCCT, due), Ok(0));
            assert_eq!(rd(&a, reg::TMICT), 1000, "the initial count stays");
            a.ack(TIMER_VECTOR as u8);
            eoi(&mut a);
            a.poll_timer(due + 10 * 1000 * div);
            assert_eq!(a.pending_vector(), None, "fires once");
        }
    }

    #[test]
    fn current_count_counts_down() {
        let t0 = 1000;
        let a = one_shot(0x3, 100, t0); // divide by 16
        let tmcct = |now| a.read_msr(reg::TMCCT, now).unwrap();
        assert_eq!(tmcct(t0), 100);
        assert_eq!(tmcct(t0 + 1), 100);
        assert_eq!(tmcct(t0 + 15), 100);
        assert_eq!(tmcct(t0 + 16), 99);
        assert_eq!(tmcct(t0 + 16 * 50 + 3), 50);
        assert_eq!(tmcct(t0 + 16 * 100 - 1), 1);
        assert_eq!(tmcct(t0 + 16 * 100), 0);
        assert_eq!(tmcct(t0 + 16 * 1000), 0);
    }

    #[test]
    fn writing_zero_to_tmict_disarms() {
        let mut a = one_shot(0xb, 100, 0);
        a.write_msr(reg::TMICT, 0, 50).unwrap();
        assert_eq!(a.next_deadline(), None);
        a.poll_timer(100);
        assert_eq!(a.pending_vector(), None);
        // Re-writing restarts the count from the write.
        a.write_msr(reg::TMICT, 100, 200).unwrap();
        assert_eq!(a.next_deadline(), Some(300));
    }

    #[test]
    fn periodic_reloads_without_bursts() {
        let mut a = enabled(0);
        wr(&mut a, reg::TDCR, 0xb);
        wr(&mut a, reg::LVT_TIMER, (1 << 17) | TIMER_VECTOR);
        a.write_msr(reg::TMICT, 10, 0).unwrap();
        assert_eq!(a.next_deadline(), Some(10));
        a.poll_timer(9);
        assert_eq!(a.pending_vector(), None);
        a.poll_timer(10);
        assert_eq!(a.pending_vector(), Some(TIMER_VECTOR as u8));
        assert_eq!(a.next_deadline(), Some(20));
        assert_eq!(a.read_msr(reg::TMCCT, 10), Ok(10), "reloaded");
        a.ack(TIMER_VECTOR as u8);
        eoi(&mut a);
        // A long gap: one interrupt, then the next boundary after `now`.
        a.poll_timer(1_000_005);
        assert_eq!(a.pending_vector(), Some(TIMER_VECTOR as u8));
        assert_eq!(a.next_deadline(), Some(1_000_010));
        a.ack(TIMER_VECTOR as u8);
        eoi(&mut a);
        a.poll_timer(1_000_005);
        assert_eq!(a.pending_vector(), None, "no burst for the missed periods");
        assert_eq!(a.read_msr(reg::TMCCT, 1_000_005), Ok(5));
        // TMCCT is right even when the caller has not polled.
        assert_eq!(a.read_msr(reg::TMCCT, 1_000_033), Ok(7));
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut a = enabled(0);
        wr(&mut a, reg::LVT_TIMER, (2 << 17) | TIMER_VECTOR);
        a.write_msr(reg::TMICT, 1000, 0).unwrap();
        assert_eq!(rd(&a, reg::TMICT), 0, "TMICT writes are ignored");
        assert_eq!(a.next_deadline(), None);
        a.set_tsc_deadline(5000);
        assert_eq!(a.tsc_deadline(), 5000);
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE, 4000), Ok(5000));
        assert_eq!(a.next_deadline(), Some(5000));
        assert_eq!(a.read_msr(reg::TMCCT, 4000), Ok(0), "TMCCT reads 0");
        a.poll_timer(4999);
        assert_eq!(a.pending_vector(), None);
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE, 5000), Ok(0), "cleared once due, before a poll");
        a.poll_timer(5000);
        assert_eq!(a.pending_vector(), Some(TIMER_VECTOR as u8));
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.next_deadline(), None);
        a.ack(TIMER_VECTOR as u8);
        eoi(&mut a);
        a.poll_timer(1 << 40);
        assert_eq!(a.pending_vector(), None, "fires once");
        // Through WRMSR; 0 disarms.
        assert_eq!(a.write_msr(MSR_TSC_DEADLINE, 9000, 6000), Ok(WriteEffect::None));
        assert_eq!(a.next_deadline(), Some(9000));
        a.write_msr(MSR_TSC_DEADLINE, 0, 6000).unwrap();
        assert_eq!(a.next_deadline(), None);
        // A deadline in the past fires at the next poll.
        a.set_tsc_deadline(10);
        a.poll_timer(6000);
        assert_eq!(a.pending_vector(), Some(TIMER_VECTOR as u8));
    }

    #[test]
    fn tsc_deadline_writes_are_ignored_in_other_modes() {
        let mut a = enabled(0);
        wr(&mut a, reg::LVT_TIMER, TIMER_VECTOR);
        a.set_tsc_deadline(5000);
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.next_deadline(), None);
        a.write_msr(MSR_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE, 0), Ok(0));
        a.poll_timer(10_000);
        assert_eq!(a.pending_vector(), None);
        // Nor does it disturb a running one-shot count.
        a.write_msr(reg::TMICT, 100, 0).unwrap();
        a.set_tsc_deadline(0);
        assert_eq!(a.next_deadline(), Some(200), "default divide is 2");
    }

    #[test]
    fn masked_timer_expires_silently() {
        let mut a = enabled(0);
        wr(&mut a, reg::TDCR, 0xb);
        wr(&mut a, reg::LVT_TIMER, 0x1_0000 | TIMER_VECTOR);
        a.write_msr(reg::TMICT, 100, 0).unwrap();
        assert_eq!(a.next_deadline(), None, "no wake-up needed");
        assert_eq!(a.read_msr(reg::TMCCT, 40), Ok(60), "still counting");
        a.poll_timer(100);
        assert!(!a.requested(TIMER_VECTOR as u8));
        assert_eq!(a.read_msr(reg::TMCCT, 100), Ok(0));
        // Unmasking later does not deliver the expiry it missed.
        wr(&mut a, reg::LVT_TIMER, TIMER_VECTOR);
        a.poll_timer(200);
        assert_eq!(a.pending_vector(), None);
        // Masked in deadline mode too.
        wr(&mut a, reg::LVT_TIMER, 0x1_0000 | (2 << 17) | TIMER_VECTOR);
        a.set_tsc_deadline(300);
        a.poll_timer(300);
        assert!(!a.requested(TIMER_VECTOR as u8));
        assert_eq!(a.tsc_deadline(), 0);
    }

    #[test]
    fn changing_the_timer_mode_disarms() {
        let mut a = one_shot(0xb, 100, 0);
        // Same mode, new vector, unmasked: still armed.
        wr(&mut a, reg::LVT_TIMER, 0xed);
        assert_eq!(a.next_deadline(), Some(100));
        // One-shot to periodic.
        wr(&mut a, reg::LVT_TIMER, (1 << 17) | 0xed);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(rd(&a, reg::TMICT), 0);
        a.poll_timer(1000);
        assert_eq!(a.pending_vector(), None);
        // Deadline to one-shot.
        wr(&mut a, reg::LVT_TIMER, (2 << 17) | 0xed);
        a.set_tsc_deadline(5000);
        wr(&mut a, reg::LVT_TIMER, 0xed);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(a.tsc_deadline(), 0);
        // Periodic to deadline, and back: the deadline does not come back.
        wr(&mut a, reg::LVT_TIMER, (1 << 17) | 0xed);
        a.write_msr(reg::TMICT, 10, 0).unwrap();
        wr(&mut a, reg::LVT_TIMER, (2 << 17) | 0xed);
        assert_eq!(a.next_deadline(), None);
        a.set_tsc_deadline(7000);
        wr(&mut a, reg::LVT_TIMER, (1 << 17) | 0xed);
        assert_eq!(a.next_deadline(), None);
        a.poll_timer(8000);
        assert_eq!(a.pending_vector(), None);
    }

    #[test]
    fn a_timer_due_before_an_lvt_write_fires_under_the_old_settings() {
        let mut a = one_shot(0xb, 100, 0);
        // The caller has not polled; the guest masks the timer at 150.
        a.write_msr(reg::LVT_TIMER, 0x1_0000 | TIMER_VECTOR, 150).unwrap();
        assert_eq!(a.pending_vector(), Some(TIMER_VECTOR as u8));
    }

    #[test]
    fn changing_the_divide_keeps_the_count() {
        let mut a = one_shot(0xb, 100, 0);
        assert_eq!(a.read_msr(reg::TMCCT, 40), Ok(60));
        a.write_msr(reg::TDCR, 0x0, 40).unwrap(); // divide by 2
        assert_eq!(a.read_msr(reg::TMCCT, 40), Ok(60));
        assert_eq!(a.next_deadline(), Some(40 + 120));
    }

    #[test]
    fn illegal_timer_vector_is_an_error() {
        let mut a = one_shot(0xb, 10, 0);
        wr(&mut a, reg::LVT_TIMER, 0x0f);
        a.poll_timer(10);
        assert!(!a.requested(0x0f));
        wr(&mut a, reg::ESR, 0);
        assert_eq!(rd(&a, reg::ESR), u64::from(ESR_RECEIVE_ILLEGAL_VECTOR));
    }

    #[test]
    fn physical_logical_and_broadcast_destinations() {
        let a = Lapic::new(5, false, KHZ);
        assert!(a.matches(5, false));
        assert!(!a.matches(6, false));
        assert!(!a.matches(0x105, false));
        assert!(a.matches(u32::MAX, false));
        assert!(a.matches(u32::MAX, true));
        // Logical: cluster 0, bit 5.
        assert!(a.matches(0x0000_0020, true));
        assert!(a.matches(0x0000_ffff, true));
        assert!(!a.matches(0x0000_0010, true));
        assert!(!a.matches(0x0001_0020, true), "wrong cluster");
        assert!(!a.matches(5, true), "a physical id is not a logical destination");
        let b = Lapic::new(0x23, false, KHZ);
        assert!(b.matches(0x0002_0008, true));
        assert!(b.matches(0x0002_000c, true));
        assert!(!b.matches(0x0002_0004, true));
        assert!(!b.matches(0x0001_0008, true));
        assert!(!b.matches(0x0003_0008, true));
        assert!(Lapic::new(0, true, KHZ).matches(1, true));
        assert!(!Lapic::new(0, true, KHZ).matches(0, true), "empty bitmap");
    }

    #[test]
    fn init_resets_all_but_id_and_base() {
        let mut a = Lapic::new(2, false, KHZ);
        wr(&mut a, reg::SVR, 0x1ff);
        wr(&mut a, reg::TPR, 0x30);
        wr(&mut a, reg::LVT_TIMER, TIMER_VECTOR);
        wr(&mut a, reg::TDCR, 0xb);
        a.write_msr(reg::TMICT, 100, 0).unwrap();
        a.accept(0x40, true);
        a.ack(0x40);
        a.accept(0x50, false);
        a.accept(3, false);
        a.write_msr(reg::ICR, 0x4500, 0).unwrap();
        a.init();
        assert_eq!(a, Lapic::new(2, false, KHZ));
        assert_eq!(a.apic_base(), 0xfee0_0c00);
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn msrs_outside_the_apic_fault() {
        let mut a = enabled(0);
        for m in [0x10, 0x1a, 0x6df, 0x6e1, 0x7ff, 0x900] {
            assert_eq!(a.read_msr(m, 0), Err(ApicError::Gp), "{m:#x}");
            assert_eq!(a.write_msr(m, 0, 0), Err(ApicError::Gp), "{m:#x}");
        }
    }

    #[test]
    fn a_copy_is_independent() {
        let mut a = enabled(0);
        a.accept(0x40, false);
        let fork = a;
        a.ack(0x40);
        assert!(fork.requested(0x40) && !fork.in_service(0x40));
    }

    proptest::proptest! {
        /// A one-shot timer fires at `t0 + count * divide`, never earlier,
        /// and TMCCT never exceeds the initial count.
        #[test]
        fn one_shot_never_early(code in 0u64..8, count in 1u64..=u32::MAX as u64, t0 in 0u64..(1 << 60), before in 1u64..1 << 20) {
            let tdcr = ((code & 4) << 1) | (code & 3);
            let a = one_shot(tdcr, count, t0);
            let due = t0 + count * a.divide();
            proptest::prop_assert_eq!(a.next_deadline(), Some(due));
            let mut early = a;
            let probe = due - before.min(due - t0);
            early.poll_timer(probe);
            proptest::prop_assert_eq!(early.pending_vector(), None);
            proptest::prop_assert!(early.read_msr(reg::TMCCT, probe).unwrap() <= count);
            let mut late = a;
            late.poll_timer(due);
            proptest::prop_assert_eq!(late.pending_vector(), Some(TIMER_VECTOR as u8));
        }

        /// No sequence of MSR accesses panics, and PPR is never below TPR.
        #[test]
        fn random_msr_traffic(
            ops in proptest::collection::vec((0x7f0u32..0x850, proptest::num::u64::ANY, 0u64..1 << 16, proptest::bool::ANY), 0..64)
        ) {
            let mut a = Lapic::new(1, false, KHZ);
            let mut now = 0u64;
            for (msr, value, dt, narrow) in ops {
                now += dt;
                let value = if narrow { value & 0x3_ffff } else { value };
                let _ = a.write_msr(msr, value, now);
                let _ = a.read_msr(msr, now);
                a.poll_timer(now);
                if let Some(v) = a.pending_vector() {
                    a.ack(v);
                }
                proptest::prop_assert!(a.ppr() >= a.tpr());
            }
        }
    }
}
