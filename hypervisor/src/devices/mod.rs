//! The devices of a Linux guest's PC platform (`docs/guest-abi.md`, part
//! 2) that the hypervisor emulates: a local APIC per vCPU, in x2APIC mode
//! with the TSC-deadline timer, one IOAPIC, and a read-only CMOS clock;
//! what it watches of the VMM's COM1 to batch console output (`uart`); and
//! the generator of VM generation IDs that forks write (`vmgenid`).
//!
//! These are models and nothing more: plain data with no clock, no locks,
//! no memory access and no `unsafe`, so they are portable and unit-tested on
//! the host, and a VM fork copies them. `hv/` drives them from VM exits: it
//! passes WRMSR/RDMSR of the APIC's MSRs and the IOAPIC page's MMIO
//! accesses in with the current TSC, routes the IPIs, EOIs and interrupt
//! messages they hand back to the right vCPU's APIC, polls the timer and
//! injects [`Lapic::pending_vector`] at VM entry.

pub mod cmos;
pub mod ioapic;
pub mod lapic;
pub mod uart;
pub mod vmgenid;

pub use cmos::Cmos;
pub use ioapic::{Deliveries, Delivery, Ioapic};
pub use lapic::{ApicError, DeliveryMode, Ipi, Lapic, Shorthand, WriteEffect};
