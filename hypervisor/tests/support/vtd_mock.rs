//! A mock remapping unit for tests: a register file that behaves enough
//! like QEMU's intel-iommu to run the sequences. GSTS follows GCMD,
//! context-cache and IOTLB invalidations complete, the invalidation queue
//! processes descriptors from mock memory and writes wait status, and
//! fault records can be injected. Knobs make parts of it hang or fail, to
//! test the timeout and error paths. Any access to a register it does not
//! model panics, so a wrong offset fails the test.

use super::entry::{desc_type, FaultRecord, InvDesc};
use super::regs::{off, Fsts, Gcmd, Gsts, VtdRegs};
use crate::addr::Hpa;
use crate::mem::mock::MockMem;
use crate::mem::PhysMem;
use std::cell::RefCell;

/// QEMU 7.2 `-device intel-iommu` defaults: 39-bit 3-level tables, MGAW 39,
/// FRO 0x220 with one record, 2M/1G pages, PSI, MAMV 18, read/write
/// draining, 64K domains; IOTLB registers at 0xf0, queued invalidation,
/// pass-through; page walks not flagged coherent.
pub const QEMU_CAP: u64 = 6 | (2 << 8) | (38 << 16) | (0x22 << 24) | (3 << 34) | (1 << 39) | (18 << 48) | (1 << 54) | (1 << 55);
pub const QEMU_ECAP: u64 = 2 | (1 << 6) | (0xf << 8);

/// Something the unit under test did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Gcmd(u32),
    Rtaddr(u64),
    Fectl(u32),
    Pmen(u32),
    Ccmd(u64),
    Iva(u64),
    Iotlb(u64),
    Iqa(u64),
    Iqt(u64),
    /// A descriptor the queue processed.
    Desc(InvDesc),
    /// A register-based invalidation while queued invalidation was on,
    /// which the spec forbids (and QEMU rejects).
    RegisterInvalidationWithQueue,
    FaultCleared(u32),
    FstsWrite(u32),
    Sync(Hpa),
}

#[derive(Default)]
pub struct State {
    pub ver: u32,
    pub cap: u64,
    pub ecap: u64,
    pub gsts: u32,
    pub rtaddr: u64,
    pub latched_root: Option<u64>,
    pub ccmd: u64,
    pub fsts: u32,
    pub fectl: u32,
    pub pmen: u32,
    /// PMEN.PRS never clears.
    pub pmen_stuck: bool,
    pub iva: u64,
    pub iotlb: u64,
    pub iqa: u64,
    pub iqh: u64,
    pub iqt: u64,
    /// (low, high) of each fault recording register.
    pub records: Vec<(u64, u64)>,

    /// GSTS bits that never follow GCMD (a hung unit).
    pub stuck: u32,
    /// CCMD.ICC / IOTLB.IVT never clear.
    pub ccmd_stuck: bool,
    pub iotlb_stuck: bool,
    /// Invalidations complete with actual granularity 0 (refused).
    pub reject: bool,
    /// The queue processes descriptors but never writes wait status.
    pub queue_silent: bool,
    /// The queue stops with IQE on the next submission.
    pub queue_error: bool,
    /// The queue fetches nothing at all: IQH stays where it is.
    pub queue_stalled: bool,
    /// The type of the last descriptor the queue ran (QEMU keeps it).
    pub last_desc_type: u64,

    pub log: Vec<Event>,
}

pub struct MockRegs<'m> {
    pub mem: &'m MockMem,
    pub st: RefCell<State>,
}

impl<'m> MockRegs<'m> {
    pub fn new(mem: &'m MockMem, cap: u64, ecap: u64) -> Self {
        let nfr = (((cap >> 40) & 0xff) + 1) as usize;
        let st = State { ver: 0x10, cap, ecap, records: vec![(0, 0); nfr], ..Default::default() };
        MockRegs { mem, st: RefCell::new(st) }
    }

    /// A unit like QEMU's.
    pub fn qemu(mem: &'m MockMem) -> Self {
        Self::new(mem, QEMU_CAP, QEMU_ECAP)
    }

    /// A unit like QEMU's without queued invalidation.
    pub fn registers_only(mem: &'m MockMem) -> Self {
        Self::new(mem, QEMU_CAP, QEMU_ECAP & !2)
    }

    pub fn with(self, f: impl FnOnce(&mut State)) -> Self {
        f(&mut self.st.borrow_mut());
        self
    }

    pub fn log(&self) -> Vec<Event> {
        self.st.borrow().log.clone()
    }
    pub fn clear_log(&self) {
        self.st.borrow_mut().log.clear();
    }
    pub fn gsts(&self) -> Gsts {
        Gsts::from_bits_retain(self.st.borrow().gsts)
    }

    /// Records a fault in register `index`, as hardware would.
    pub fn inject_fault(&self, index: usize, rec: FaultRecord) {
        self.st.borrow_mut().records[index] = rec.encode();
    }

    fn iro(st: &State) -> u32 {
        (((st.ecap >> 8) & 0x3ff) as u32) * 16
    }
    fn fro(st: &State) -> u32 {
        (((st.cap >> 24) & 0x3ff) as u32) * 16
    }

    fn fsts(st: &State) -> u32 {
        let mut v = st.fsts & !(Fsts::PPF.bits() | 0xff00);
        if let Some(i) = st.records.iter().position(|r| r.1 & FaultRecord::F != 0) {
            v |= Fsts::PPF.bits() | ((i as u32) << 8);
        }
        v
    }

    fn gcmd(&self, st: &mut State, v: u32) {
        st.log.push(Event::Gcmd(v));
        let cmd = Gcmd::from_bits_retain(v);
        let mut g = st.gsts;
        let stuck = st.stuck;
        let follow = |g: &mut u32, bit: u32, on: bool| {
            if stuck & bit == 0 {
                if on {
                    *g |= bit;
                } else {
                    *g &= !bit;
                }
            }
        };
        if cmd.contains(Gcmd::SRTP) {
            follow(&mut g, Gsts::RTPS.bits(), true);
            st.latched_root = Some(st.rtaddr);
        }
        if cmd.contains(Gcmd::WBF) {
            // Completes at once unless stuck.
            if stuck & Gsts::WBFS.bits() != 0 {
                g |= Gsts::WBFS.bits();
            }
        }
        follow(&mut g, Gsts::TES.bits(), cmd.contains(Gcmd::TE));
        follow(&mut g, Gsts::IRES.bits(), cmd.contains(Gcmd::IRE));
        let qie = cmd.contains(Gcmd::QIE);
        let was = st.gsts & Gsts::QIES.bits() != 0;
        if qie && !was {
            follow(&mut g, Gsts::QIES.bits(), true);
            st.iqh = 0;
        } else if !qie && was {
            // QEMU refuses to turn the queue off unless it is empty and the
            // last descriptor it ran was a wait.
            if st.iqh == st.iqt && st.last_desc_type == desc_type::WAIT {
                follow(&mut g, Gsts::QIES.bits(), false);
                st.iqh = 0;
            }
        }
        st.gsts = g;
    }

    fn run_queue(&self, st: &mut State) {
        if st.gsts & Gsts::QIES.bits() == 0 || st.queue_stalled {
            return;
        }
        if st.queue_error {
            st.fsts |= Fsts::IQE.bits();
            return;
        }
        let base = st.iqa & !0xfff;
        let mut head = (st.iqh >> 4) & 0xff;
        let tail = (st.iqt >> 4) & 0xff;
        let mut guard = 0;
        while head != tail && guard < 256 {
            let at = Hpa(base + head * 16);
            let d = InvDesc { lo: self.mem.read_u64(at), hi: self.mem.read_u64(Hpa(at.0 + 8)) };
            st.log.push(Event::Desc(d));
            st.last_desc_type = d.kind();
            if d.kind() == desc_type::WAIT && d.lo & InvDesc::WAIT_SW != 0 && !st.queue_silent {
                self.mem.write(Hpa(d.hi & !3), &((d.lo >> 32) as u32).to_le_bytes());
            }
            head = (head + 1) % 256;
            guard += 1;
        }
        st.iqh = head << 4;
    }
}

impl VtdRegs for MockRegs<'_> {
    fn read32(&self, o: u32) -> u32 {
        let st = self.st.borrow();
        match o {
            off::VER => st.ver,
            off::GSTS => st.gsts,
            off::FSTS => Self::fsts(&st),
            off::FECTL => st.fectl,
            off::PMEN => st.pmen,
            _ => panic!("mock VT-d: unexpected 32-bit read at {o:#x}"),
        }
    }

    fn read64(&self, o: u32) -> u64 {
        let st = self.st.borrow();
        let (iro, fro) = (Self::iro(&st), Self::fro(&st));
        match o {
            off::CAP => st.cap,
            off::ECAP => st.ecap,
            off::RTADDR => st.rtaddr,
            off::CCMD => st.ccmd,
            off::IQH => st.iqh,
            off::IQT => st.iqt,
            off::IQA => st.iqa,
            o if o == iro + off::IVA_IN_IOTLB => st.iva,
            o if o == iro + off::IOTLB_IN_IOTLB => st.iotlb,
            o if o >= fro && o < fro + 16 * st.records.len() as u32 && o % 8 == 0 => {
                let r = st.records[((o - fro) / 16) as usize];
                if (o - fro) % 16 == 0 {
                    r.0
                } else {
                    r.1
                }
            }
            _ => panic!("mock VT-d: unexpected 64-bit read at {o:#x}"),
        }
    }

    fn write32(&self, o: u32, v: u32) {
        let mut st = self.st.borrow_mut();
        let fro = Self::fro(&st);
        match o {
            off::GCMD => self.gcmd(&mut st, v),
            off::FECTL => {
                st.log.push(Event::Fectl(v));
                st.fectl = v & (1 << 31);
            }
            off::PMEN => {
                st.log.push(Event::Pmen(v));
                let epm = v & (1 << 31);
                st.pmen = epm | if epm != 0 || st.pmen_stuck { 1 } else { 0 };
            }
            off::FSTS => {
                st.log.push(Event::FstsWrite(v));
                // Write 1 to clear PFO, AFO, APF, IQE, ICE, ITE.
                st.fsts &= !(v & 0x7d);
            }
            o if o >= fro && o < fro + 16 * st.records.len() as u32 && (o - fro) % 16 == 12 => {
                let i = ((o - fro) / 16) as usize;
                if v & FaultRecord::F_DWORD != 0 {
                    st.records[i].1 &= !FaultRecord::F;
                    st.log.push(Event::FaultCleared(i as u32));
                }
            }
            _ => panic!("mock VT-d: unexpected 32-bit write of {v:#x} at {o:#x}"),
        }
    }

    fn write64(&self, o: u32, v: u64) {
        let mut st = self.st.borrow_mut();
        let iro = Self::iro(&st);
        let queue_on = st.gsts & Gsts::QIES.bits() != 0;
        match o {
            off::RTADDR => {
                st.log.push(Event::Rtaddr(v));
                st.rtaddr = v;
            }
            off::CCMD => {
                st.log.push(Event::Ccmd(v));
                if queue_on {
                    st.log.push(Event::RegisterInvalidationWithQueue);
                }
                let mut r = v;
                if !st.ccmd_stuck {
                    let actual = if st.reject { 0 } else { (v >> 61) & 3 };
                    r = (v & !(1 << 63) & !(3 << 59)) | (actual << 59);
                }
                st.ccmd = r;
            }
            off::IQT => {
                st.log.push(Event::Iqt(v));
                st.iqt = v;
                self.run_queue(&mut st);
            }
            off::IQA => {
                st.log.push(Event::Iqa(v));
                st.iqa = v;
            }
            o if o == iro + off::IVA_IN_IOTLB => {
                st.log.push(Event::Iva(v));
                st.iva = v;
            }
            o if o == iro + off::IOTLB_IN_IOTLB => {
                st.log.push(Event::Iotlb(v));
                if queue_on {
                    st.log.push(Event::RegisterInvalidationWithQueue);
                }
                let mut r = v;
                if !st.iotlb_stuck {
                    let actual = if st.reject { 0 } else { (v >> 60) & 3 };
                    r = (v & !(1 << 63) & !(3 << 57)) | (actual << 57);
                }
                st.iotlb = r;
            }
            _ => panic!("mock VT-d: unexpected 64-bit write of {v:#x} at {o:#x}"),
        }
    }

    fn sync_for_device(&self, page: Hpa) {
        self.st.borrow_mut().log.push(Event::Sync(page));
    }
}
