//! What the hypervisor knows of a Linux guest's COM1, so that console
//! output does not cost a round trip to the VMM per byte.
//!
//! The UART itself is the VMM's (`vm-superio`), and every access that could
//! change its state still goes there. The hypervisor only watches the
//! writes on their way: the line control register (the divisor latch), the
//! interrupt enable register and the modem control register (loopback).
//! While the UART is in plain polled transmission, as Linux's console
//! writes are (no divisor latch, no loopback, no transmit interrupt), a
//! byte written to the transmit register is kept in a batch instead of
//! exiting, and a read of the line status register is answered "transmitter
//! empty" here, as `vm-superio` would answer it: its transmitter is always
//! empty. The batch goes to the VMM with the next RUN that returns
//! (`VmRun::console`), where it is written to the UART in order before
//! anything else.
//!
//! A read of the line status register must also show received data, which
//! only the VMM knows of: it is answered here only while the receive
//! interrupt is off too. Linux turns every UART interrupt off around its
//! console writes (`serial8250_console_write`), so they are batched
//! whether or not a shell is reading the port; with the receive interrupt
//! on, the interrupt handler's reads of the line status see the real
//! thing. (The VMM moves input into its UART only while the receive
//! interrupt is on, so none waits unseen meanwhile.)

use shared_abi::CONSOLE_BATCH;

/// Register offsets from the UART's base port.
const THR: u16 = 0;
const IER: u16 = 1;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LCR_DLAB: u8 = 1 << 7;
const IER_RDI: u8 = 1 << 0;
const IER_THRI: u8 = 1 << 1;
const MCR_LOOP: u8 = 1 << 4;
/// The line status `vm-superio` reports with nothing received:
/// transmitter holding register and transmitter empty.
const LSR_IDLE: u8 = 0x60;

/// What to do with an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Done here: for a read, this value.
    Done(u8),
    /// The VMM must see it (after the batch).
    Forward,
}

#[derive(Clone, Copy, Debug)]
pub struct UartShadow {
    lcr: u8,
    ier: u8,
    mcr: u8,
    batch: [u8; CONSOLE_BATCH],
    len: usize,
}

impl Default for UartShadow {
    fn default() -> Self {
        UartShadow { lcr: 0, ier: 0, mcr: 0, batch: [0; CONSOLE_BATCH], len: 0 }
    }
}

impl UartShadow {
    fn polled_tx(&self) -> bool {
        self.lcr & LCR_DLAB == 0 && self.mcr & MCR_LOOP == 0 && self.ier & IER_THRI == 0
    }

    /// An access to register `reg` (0 to 7): a write of `value`, or a read.
    pub fn access(&mut self, reg: u16, write: Option<u8>) -> Access {
        match (reg, write) {
            (THR, Some(v)) if self.polled_tx() && self.len < CONSOLE_BATCH => {
                self.batch[self.len] = v;
                self.len += 1;
                return Access::Done(0);
            }
            (LSR, None) if self.polled_tx() && self.ier & IER_RDI == 0 => return Access::Done(LSR_IDLE),
            (LCR, Some(v)) => self.lcr = v,
            (IER, Some(v)) if self.lcr & LCR_DLAB == 0 => self.ier = v,
            (MCR, Some(v)) => self.mcr = v,
            _ => {}
        }
        Access::Forward
    }

    /// What a forked child's VMM starts from: the same registers, and no
    /// batch (the bytes are the parent's output, handed to its VMM).
    pub fn forked(&self) -> Self {
        UartShadow { len: 0, ..*self }
    }

    /// Takes the batch: copies it into `out`, returns how many bytes.
    pub fn take(&mut self, out: &mut [u8; CONSOLE_BATCH]) -> usize {
        let n = self.len;
        out[..n].copy_from_slice(&self.batch[..n]);
        self.len = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> UartShadow {
        UartShadow::default()
    }

    #[test]
    fn polled_output_is_batched_in_order() {
        let mut u = idle();
        for b in b"hello" {
            assert_eq!(u.access(LSR, None), Access::Done(LSR_IDLE));
            assert_eq!(u.access(THR, Some(*b)), Access::Done(0));
        }
        let mut out = [0u8; CONSOLE_BATCH];
        assert_eq!(u.take(&mut out), 5);
        assert_eq!(&out[..5], b"hello");
        assert_eq!(u.take(&mut out), 0, "taken once");
    }

    #[test]
    fn a_full_batch_sends_the_next_byte_to_the_vmm() {
        let mut u = idle();
        for i in 0..CONSOLE_BATCH {
            assert_eq!(u.access(THR, Some(i as u8)), Access::Done(0));
        }
        assert_eq!(u.access(THR, Some(0xaa)), Access::Forward);
    }

    #[test]
    fn a_fork_keeps_the_mode_not_the_bytes() {
        let mut u = idle();
        u.access(IER, Some(IER_THRI));
        let mut p = idle();
        p.access(THR, Some(b'p'));
        let c = p.forked();
        let mut out = [0u8; CONSOLE_BATCH];
        assert_eq!(c.clone().take(&mut out), 0);
        let mut c2 = u.forked();
        assert_eq!(c2.access(THR, Some(b'c')), Access::Forward, "still the transmit interrupt's mode");
    }

    #[test]
    fn anything_but_plain_polled_transmission_goes_to_the_vmm() {
        // Divisor latch: THR is the divisor's low byte.
        let mut u = idle();
        assert_eq!(u.access(LCR, Some(LCR_DLAB | 3)), Access::Forward);
        assert_eq!(u.access(THR, Some(1)), Access::Forward);
        assert_eq!(u.access(IER, Some(IER_THRI)), Access::Forward, "the divisor's high byte, not IER");
        assert_eq!(u.access(LCR, Some(3)), Access::Forward);
        assert_eq!(u.access(THR, Some(b'x')), Access::Done(0), "the write above did not reach IER");
        // Loopback: what is sent is received.
        assert_eq!(u.access(MCR, Some(MCR_LOOP)), Access::Forward);
        assert_eq!(u.access(THR, Some(b'y')), Access::Forward);
        assert_eq!(u.access(LSR, None), Access::Forward);
        assert_eq!(u.access(MCR, Some(0)), Access::Forward);
        // The transmit interrupt: the VMM raises it for every byte.
        assert_eq!(u.access(IER, Some(IER_THRI)), Access::Forward);
        assert_eq!(u.access(THR, Some(b'z')), Access::Forward);
        assert_eq!(u.access(IER, Some(0)), Access::Forward);
        assert_eq!(u.access(THR, Some(b'w')), Access::Done(0));
        // Other registers always go.
        assert_eq!(u.access(0, None), Access::Forward, "RBR");
        assert_eq!(u.access(2, None), Access::Forward, "IIR");
        assert_eq!(u.access(6, None), Access::Forward, "MSR");
    }

    #[test]
    fn line_status_comes_from_the_vmm_while_input_may_arrive() {
        let mut u = UartShadow::default();
        assert_eq!(u.access(LSR, None), Access::Done(LSR_IDLE));
        // A shell reads the port: the receive interrupt is on.
        assert_eq!(u.access(IER, Some(IER_RDI)), Access::Forward);
        assert_eq!(u.access(LSR, None), Access::Forward);
        // Output is batched all the same.
        assert_eq!(u.access(THR, Some(b'a')), Access::Done(0));
        // Linux's console write turns the interrupts off around itself.
        assert_eq!(u.access(IER, Some(0)), Access::Forward);
        assert_eq!(u.access(LSR, None), Access::Done(LSR_IDLE));
    }
}
