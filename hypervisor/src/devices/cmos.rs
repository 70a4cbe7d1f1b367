//! The CMOS clock of a Linux guest's PC, read-only and stopped.
//!
//! Linux reads the wall-clock time from the MC146818 at ports 0x70/0x71
//! whatever its configuration (`mach_get_cmos_time`). A port that reads all
//! ones looks like a clock forever in an update cycle (register A's UIP bit),
//! and Linux waits a full second for it to end before it gives up: a second
//! of boot time under emulation. This model answers with a valid, fixed
//! time, 2000-01-01 00:00:00 UTC, in BCD and 24-hour mode, never updating.
//! A guest that needs the real time gets it from its own means (the VMM
//! does not pass one in). Writes go nowhere, except that port 0x70 selects
//! the register (bit 7, the NMI mask, is ignored).

/// The index port and the data port.
pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    /// An OUT to port 0x70.
    pub fn select(&mut self, v: u8) {
        self.index = v & 0x7f;
    }

    /// An IN from port 0x71.
    pub fn read(&self) -> u8 {
        match self.index {
            // Seconds, minutes, hours.
            0x00 | 0x02 | 0x04 => 0x00,
            // Day of the week (Saturday), day of the month, month, year.
            0x06 => 0x07,
            0x07 | 0x08 => 0x01,
            0x09 => 0x00,
            // Register A: no update in progress, the usual 32 kHz divider.
            0x0a => 0x26,
            // Register B: 24-hour mode, BCD, no interrupts.
            0x0b => 0x02,
            // Register D: the time is valid (the battery is good).
            0x0d => 0x80,
            // The century (the register PC firmware reports in its FADT;
            // Linux reads it only through ACPI).
            0x32 => 0x20,
            // Alarms, register C and the CMOS RAM.
            _ => 0x00,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.select(reg);
        c.read()
    }

    #[test]
    fn a_valid_clock_that_never_updates() {
        let mut c = Cmos::default();
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0, "UIP clear: Linux reads at once");
        assert_eq!(read(&mut c, 0x0b) & 0x06, 0x02, "24-hour, BCD");
        assert_eq!(read(&mut c, 0x0d), 0x80);
        assert_eq!([read(&mut c, 0x09), read(&mut c, 0x08), read(&mut c, 0x07)], [0x00, 0x01, 0x01]);
        assert_eq!([read(&mut c, 0x04), read(&mut c, 0x02), read(&mut c, 0x00)], [0, 0, 0]);
        // The NMI-mask bit of the index does not change the register.
        assert_eq!(read(&mut c, 0x80 | 0x0b), 0x02);
        // Reads do not move the index.
        c.select(0x07);
        assert_eq!((c.read(), c.read()), (0x01, 0x01));
    }
}
