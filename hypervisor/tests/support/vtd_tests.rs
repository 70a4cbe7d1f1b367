//! The register sequences and the whole [`Vtd`] against the mock unit.

use super::entry::{desc_type, InvDesc};
use super::mock::{Event, MockRegs, QEMU_CAP, QEMU_ECAP};
use super::regs::{Fsts, Gcmd, Gsts};
use super::*;
use crate::addr::{PhysRange, LARGE_PAGE_SIZE, PAGE_SIZE};
use crate::mem::mock::{MockFrames, MockMem};
use alloc::vec;
use shared_abi::MemRange;

const SPIN: u32 = 50;
const UNIT0: Hpa = Hpa(0xfed9_0000);
/// The hypervisor region: 4 MiB at 1 GiB + 4 MiB.
const HV: PhysRange = PhysRange::new(0x4040_0000, 4 << 20);
/// A page inside a 2 MiB leaf: the GiB that holds the hypervisor region is
/// mapped in 2 MiB leaves, the first of which this page is in.
const PAGE: Hpa = Hpa(0x4000_5000);
const DRAIN: u64 = (1 << 49) | (1 << 48);

fn ram() -> Vec<MemRange> {
    vec![MemRange { base: 0, size: 0xa_0000 }, MemRange { base: 0x10_0000, size: (2 << 30) - 0x10_0000 }]
}

fn frames() -> MockFrames {
    MockFrames::new(0x7_0000_0000, 4096)
}

fn vtd<'m>(regs: Vec<MockRegs<'m>>) -> Vtd<MockRegs<'m>> {
    let units = regs.into_iter().enumerate().map(|(i, r)| Unit::new(r, Hpa(UNIT0.0 + i as u64 * 0x1000), 0, SPIN)).collect();
    Vtd::new(units).unwrap()
}

fn built<'m>(mem: &'m MockMem, f: &mut MockFrames, regs: Vec<MockRegs<'m>>) -> Vtd<MockRegs<'m>> {
    let mut v = vtd(regs);
    let ram = ram();
    let holes = [HV, PhysRange::new(UNIT0.0, 0x2000)];
    v.build(mem, f, &DmaMap { ram: &ram, holes: &holes, rmrrs: &[] }).unwrap();
    v
}

fn enabled<'m>(mem: &'m MockMem, f: &mut MockFrames, regs: Vec<MockRegs<'m>>) -> Vtd<MockRegs<'m>> {
    let mut v = built(mem, f, regs);
    v.enable(mem, f).unwrap();
    for u in v.units() {
        u.regs().clear_log();
    }
    v
}

fn log(v: &Vtd<MockRegs>, i: usize) -> Vec<Event> {
    v.units()[i].regs().log()
}

fn without_syncs(l: &[Event]) -> Vec<Event> {
    l.iter().copied().filter(|e| !matches!(e, Event::Sync(_))).collect()
}

fn descs(l: &[Event]) -> Vec<InvDesc> {
    l.iter().filter_map(|e| if let Event::Desc(d) = e { Some(*d) } else { None }).collect()
}

fn register_invalidations(l: &[Event]) -> usize {
    l.iter().filter(|e| matches!(e, Event::Ccmd(_) | Event::Iotlb(_) | Event::Iva(_))).count()
}

fn timeout(wait: Wait) -> Error {
    Error::Timeout { unit: UNIT0, wait }
}

#[test]
fn enable_sequence_with_queued_invalidation() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    let root = v.tables().unwrap().root;
    let before = f.live.clone();
    v.enable(&mem, &mut f).unwrap();
    assert!(v.enabled());
    let u = &v.units()[0];
    assert!(u.uses_queue());
    assert_eq!(u.regs().gsts(), Gsts::TES | Gsts::RTPS | Gsts::QIES);
    assert_eq!(u.regs().st.borrow().latched_root, Some(root.0));
    let queue: Vec<u64> = f.live.difference(&before).copied().collect();
    assert_eq!(queue.len(), 2, "a queue page and a status page");
    let page = *queue.iter().min().unwrap();
    let l = log(&v, 0);
    // The spec's order: fault interrupts masked, root pointer latched,
    // global context-cache and IOTLB invalidation (with draining, which
    // QEMU offers), TE; then the queue, emptied and turned on.
    assert_eq!(
        without_syncs(&l),
        vec![
            Event::Fectl(1 << 31),
            Event::Rtaddr(root.0),
            Event::Gcmd(Gcmd::SRTP.bits()),
            Event::Ccmd((1 << 63) | (1 << 61)),
            Event::Iotlb((1 << 63) | (1 << 60) | DRAIN),
            Event::Gcmd(Gcmd::TE.bits()),
            Event::FstsWrite(Fsts::QUEUE_ERRORS.bits()),
            Event::Iqt(0),
            Event::Iqa(page),
            Event::Gcmd((Gcmd::TE | Gcmd::QIE).bits()),
        ]
    );
    // QEMU does not flag its walks coherent: every table page was flushed
    // before the root pointer was set, and the queue pages before use.
    let first_reg = l.iter().position(|e| !matches!(e, Event::Sync(_))).unwrap();
    let synced: Vec<u64> = l[..first_reg].iter().map(|e| if let Event::Sync(p) = e { p.0 } else { 0 }).collect();
    let mut tables: Vec<u64> = before.iter().copied().collect();
    tables.sort();
    assert_eq!(synced, tables);
    assert!(l.contains(&Event::Sync(Hpa(page))));
}

#[test]
fn enable_sequence_with_registers_only() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::registers_only(&mem).with(|s| s.ecap |= 1)]);
    let live = f.live.len();
    v.enable(&mem, &mut f).unwrap();
    let u = &v.units()[0];
    assert!(u.is_enabled() && !u.uses_queue() && u.coherent());
    assert_eq!(u.regs().gsts(), Gsts::TES | Gsts::RTPS);
    let l = log(&v, 0);
    assert!(!l.iter().any(|e| matches!(e, Event::Sync(_) | Event::Iqa(_) | Event::Iqt(_))), "coherent, no queue: {l:?}");
    assert_eq!(l.last(), Some(&Event::Gcmd(Gcmd::TE.bits())));
    assert_eq!(f.live.len(), live);
    // Enabling again is a no-op.
    v.enable(&mem, &mut f).unwrap();
}

#[test]
fn refuses_a_unit_someone_else_drives() {
    for busy in [Gsts::TES, Gsts::QIES, Gsts::IRES, Gsts::TES | Gsts::QIES | Gsts::RTPS] {
        let mem = MockMem::new();
        let mut f = frames();
        let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem).with(|s| s.gsts = busy.bits())]);
        assert_eq!(v.check_free(), Err(Error::InUse { unit: UNIT0, gsts: busy.bits() }));
        assert_eq!(v.enable(&mem, &mut f), Err(Error::InUse { unit: UNIT0, gsts: busy.bits() }));
        // Nothing was written to the unit.
        assert!(without_syncs(&log(&v, 0)).is_empty());
        assert!(log(&v, 0).is_empty());
        assert_eq!(v.units()[0].regs().gsts(), busy);
        assert!(format!("{}", Error::InUse { unit: UNIT0, gsts: busy.bits() }).contains("intel_iommu=off"));
    }
    // Leftover one-shot status (RTPS from firmware) is no reason to refuse.
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem).with(|s| s.gsts = Gsts::RTPS.bits())]);
    v.enable(&mem, &mut f).unwrap();
}

#[test]
fn a_busy_second_unit_stops_the_first_from_being_touched() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem), MockRegs::qemu(&mem).with(|s| s.gsts = Gsts::TES.bits())]);
    assert_eq!(v.enable(&mem, &mut f), Err(Error::InUse { unit: Hpa(UNIT0.0 + 0x1000), gsts: Gsts::TES.bits() }));
    assert!(log(&v, 0).is_empty());
    assert!(!v.units()[0].is_enabled());
}

/// A way to break the mock unit, and the error it must give.
type Breakage = (Box<dyn Fn(&mut mock::State)>, Error);

#[test]
fn timeouts_fail_cleanly_and_roll_back() {
    let cases: Vec<Breakage> = vec![
        (Box::new(|s| s.stuck = Gsts::RTPS.bits()), timeout(Wait::RootTable)),
        (Box::new(|s| s.ccmd_stuck = true), timeout(Wait::ContextCache)),
        (Box::new(|s| s.iotlb_stuck = true), timeout(Wait::Iotlb)),
        (Box::new(|s| s.stuck = Gsts::TES.bits()), timeout(Wait::TranslationOn)),
        (Box::new(|s| s.stuck = Gsts::QIES.bits()), timeout(Wait::QueueOn)),
        (Box::new(|s| s.reject = true), Error::InvalidationRejected { unit: UNIT0, wait: Wait::ContextCache }),
        (Box::new(|s| s.cap |= 1 << 4), Error::Timeout { unit: UNIT0, wait: Wait::WriteBuffer }),
    ];
    for (i, (knob, want)) in cases.into_iter().enumerate() {
        let mem = MockMem::new();
        let mut f = frames();
        let regs = MockRegs::qemu(&mem).with(|s| {
            knob(s);
            // The write-buffer case needs RWBF and a hung flush.
            if s.cap & (1 << 4) != 0 {
                s.stuck = Gsts::WBFS.bits();
            }
        });
        let mut v = built(&mem, &mut f, vec![regs]);
        let live = f.live.len();
        assert_eq!(v.enable(&mem, &mut f), Err(want), "case {i}");
        let u = &v.units()[0];
        assert!(!u.is_enabled() && !u.uses_queue(), "case {i}");
        // Translation is off again (unless the unit would not budge) and
        // no queue frame leaked.
        if want != timeout(Wait::TranslationOn) {
            assert!(!u.regs().gsts().contains(Gsts::TES), "case {i}");
        }
        assert_eq!(f.live.len(), live, "case {i}");
    }
}

#[test]
fn a_failing_unit_rolls_back_the_others() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem), MockRegs::qemu(&mem).with(|s| s.stuck = Gsts::TES.bits())]);
    let live = f.live.len();
    assert_eq!(v.enable(&mem, &mut f), Err(Error::Timeout { unit: Hpa(UNIT0.0 + 0x1000), wait: Wait::TranslationOn }));
    let first = &v.units()[0];
    assert!(!first.is_enabled() && !first.uses_queue());
    assert!(!first.regs().gsts().intersects(Gsts::TES | Gsts::QIES));
    assert_eq!(f.live.len(), live);
    assert!(!v.summary().enabled);
}

#[test]
fn protected_memory_regions_go_after_translation_is_on() {
    let mem = MockMem::new();
    let mut f = frames();
    // Firmware left the low protected region on.
    let regs = MockRegs::registers_only(&mem).with(|s| {
        s.cap |= 1 << 5;
        s.pmen = (1 << 31) | 1;
    });
    let mut v = built(&mem, &mut f, vec![regs]);
    v.enable(&mem, &mut f).unwrap();
    let l = without_syncs(&log(&v, 0));
    let te = l.iter().position(|e| *e == Event::Gcmd(Gcmd::TE.bits())).unwrap();
    assert_eq!(l[te + 1], Event::Pmen(0));
    assert_eq!(v.units()[0].regs().st.borrow().pmen, 0);

    // A region that will not turn off fails the load, translation off again.
    let mem = MockMem::new();
    let mut f = frames();
    let regs = MockRegs::registers_only(&mem).with(|s| {
        s.cap |= 1 << 6;
        s.pmen = (1 << 31) | 1;
        s.pmen_stuck = true;
    });
    let mut v = built(&mem, &mut f, vec![regs]);
    assert_eq!(v.enable(&mem, &mut f), Err(timeout(Wait::ProtectedMemory)));
    assert!(!v.units()[0].regs().gsts().contains(Gsts::TES));

    // Without PLMR/PHMR the register is left alone (QEMU has neither).
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.enable(&mem, &mut f).unwrap();
    assert!(!log(&v, 0).iter().any(|e| matches!(e, Event::Pmen(_))));
}

#[test]
fn write_buffer_flush_where_required() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::registers_only(&mem).with(|s| s.cap |= 1 << 4)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    let l = without_syncs(&log(&v, 0));
    assert_eq!(l[0], Event::Gcmd((Gcmd::TE | Gcmd::WBF).bits()));
    assert!(matches!(l[1], Event::Iotlb(_)));
}

#[test]
fn remove_page_with_queued_invalidation() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    assert_eq!(v.translate(&mem, Iova(PAGE.0)), Some((PAGE, true)));
    // The first page of a 2 MiB leaf: a split, so the whole domain goes.
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    assert_eq!(v.translate(&mem, Iova(PAGE.0)), None);
    let l = log(&v, 0);
    assert_eq!(register_invalidations(&l), 0);
    let d = descs(&l);
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].kind(), d[0].granularity(), d[0].domain()), (desc_type::IOTLB, 2, HOST_DOMAIN));
    assert_eq!(d[0].lo & (InvDesc::IOTLB_DR | InvDesc::IOTLB_DW), InvDesc::IOTLB_DR | InvDesc::IOTLB_DW);
    assert_eq!(d[1].kind(), desc_type::WAIT);
    assert_ne!(d[1].lo & InvDesc::WAIT_SW, 0);
    // The changed table pages were flushed before the queue tail moved.
    let first_iqt = l.iter().position(|e| matches!(e, Event::Iqt(_))).unwrap();
    assert!(l[..first_iqt].iter().filter(|e| matches!(e, Event::Sync(_))).count() >= 2);
    v.units()[0].regs().clear_log();
    // Its neighbour: a page-selective invalidation of just that page.
    let next = Hpa(PAGE.0 + PAGE_SIZE);
    v.remove_page(&mem, &mut f, next).unwrap();
    let d = descs(&log(&v, 0));
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].kind(), d[0].granularity(), d[0].domain(), d[0].hi), (desc_type::IOTLB, 3, HOST_DOMAIN, next.0));
    assert_eq!(v.translate(&mem, Iova(next.0 + 0x10)), None);
    assert_eq!(v.translate(&mem, Iova(next.0 + PAGE_SIZE)), Some((Hpa(next.0 + PAGE_SIZE), true)));
    // Removing it again changes nothing and invalidates nothing.
    v.units()[0].regs().clear_log();
    v.remove_page(&mem, &mut f, next).unwrap();
    assert!(log(&v, 0).is_empty());
}

#[test]
fn the_queue_wraps_around() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    // 300 removals, two descriptors each: the 256-entry queue wraps twice.
    for i in 0..300 {
        v.remove_page(&mem, &mut f, Hpa(0x5000_0000 + i * PAGE_SIZE)).unwrap();
    }
    let st = v.units()[0].regs().st.borrow();
    assert_eq!(st.iqh, st.iqt);
    assert_eq!((st.iqt >> 4) as u64, (600 % 256) as u64);
    assert_eq!(descs(&st.log).len(), 600);
}

#[test]
fn remove_page_with_register_invalidation() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::registers_only(&mem)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    // A split: domain-selective (IIRG 2, DID 1).
    let l = without_syncs(&log(&v, 0));
    assert_eq!(l, vec![Event::Iotlb((1 << 63) | (2 << 60) | (1 << 32) | DRAIN)]);
    v.units()[0].regs().clear_log();
    let next = Hpa(PAGE.0 + PAGE_SIZE);
    v.remove_page(&mem, &mut f, next).unwrap();
    // No split: page-selective (IVA first, then IIRG 3).
    let l = without_syncs(&log(&v, 0));
    assert_eq!(l, vec![Event::Iva(next.0), Event::Iotlb((1 << 63) | (3 << 60) | (1 << 32) | DRAIN)]);
}

#[test]
fn without_psi_pages_fall_back_to_the_domain() {
    let mem = MockMem::new();
    let mut f = frames();
    let no_psi = QEMU_CAP & !(1 << 39);
    let mut v = enabled(&mem, &mut f, vec![MockRegs::new(&mem, no_psi, QEMU_ECAP & !2), MockRegs::new(&mem, no_psi, QEMU_ECAP)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    v.remove_page(&mem, &mut f, Hpa(PAGE.0 + PAGE_SIZE)).unwrap();
    let regs = without_syncs(&log(&v, 0));
    assert!(regs.iter().all(|e| matches!(e, Event::Iotlb(v) if (v >> 60) & 3 == 2)), "{regs:?}");
    let d = descs(&log(&v, 1));
    assert!(d.iter().filter(|d| d.kind() == desc_type::IOTLB).all(|d| d.granularity() == 2));
}

#[test]
fn queued_invalidation_timeout_and_error() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.units()[0].regs().st.borrow_mut().queue_silent = true;
    assert_eq!(v.remove_page(&mem, &mut f, PAGE), Err(timeout(Wait::QueueWait)));
    // The page is out of the tables even so: the caller must not hand it out.
    assert_eq!(v.translate(&mem, Iova(PAGE.0)), None);

    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.units()[0].regs().st.borrow_mut().queue_error = true;
    assert_eq!(v.remove_page(&mem, &mut f, PAGE), Err(Error::QueueError { unit: UNIT0, fsts: Fsts::IQE.bits() }));
}

#[test]
fn a_stuck_queue_reports_full() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    // The unit stops fetching: IQH stays put while submissions time out.
    v.units()[0].regs().st.borrow_mut().queue_stalled = true;
    let mut last = Ok(());
    for i in 0..200 {
        last = v.remove_page(&mem, &mut f, Hpa(0x5000_0000 + i * PAGE_SIZE));
        if last == Err(Error::QueueFull { unit: UNIT0 }) {
            break;
        }
        assert_eq!(last, Err(timeout(Wait::QueueWait)));
    }
    assert_eq!(last, Err(Error::QueueFull { unit: UNIT0 }));
}

#[test]
fn register_invalidation_is_never_used_with_the_queue_on() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.enable(&mem, &mut f).unwrap();
    for i in 0..8 {
        v.remove_page(&mem, &mut f, Hpa(0x5000_0000 + i * LARGE_PAGE_SIZE)).unwrap();
        v.restore_page(&mem, &mut f, Hpa(0x5000_0000 + i * LARGE_PAGE_SIZE)).unwrap();
    }
    v.disable(&mem, &mut f).unwrap();
    assert!(!log(&v, 0).contains(&Event::RegisterInvalidationWithQueue));
}

#[test]
fn restore_page() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    v.units()[0].regs().clear_log();
    v.restore_page(&mem, &mut f, PAGE).unwrap();
    assert_eq!(v.translate(&mem, Iova(PAGE.0 + 0x234)), Some((Hpa(PAGE.0 + 0x234), true)));
    // Not-present to present needs no invalidation without caching mode.
    assert!(descs(&log(&v, 0)).is_empty());

    // In caching mode (QEMU's caching-mode=on) it does.
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::new(&mem, QEMU_CAP | (1 << 7), QEMU_ECAP)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    v.units()[0].regs().clear_log();
    v.restore_page(&mem, &mut f, PAGE).unwrap();
    let d = descs(&log(&v, 0));
    assert_eq!((d[0].kind(), d[0].granularity(), d[0].hi), (desc_type::IOTLB, 3, PAGE.0));
    // Pages beyond the map stay out.
    assert_eq!(v.restore_page(&mem, &mut f, Hpa(5 << 30)), Err(Error::OutOfRange { addr: 5 << 30 }));
}

#[test]
fn removals_before_enable_need_no_invalidation() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = built(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    assert!(without_syncs(&log(&v, 0)).is_empty());
    v.enable(&mem, &mut f).unwrap();
    assert_eq!(v.translate(&mem, Iova(PAGE.0)), None);
}

#[test]
fn faults_are_decoded_cleared_and_counted() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    assert!(v.poll_faults().is_empty());
    // The edu device (00:03.0) wrote to a hypervisor page.
    let rec = FaultRecord {
        index: 0,
        source: SourceId::new(0, 3, 0),
        addr: HV.base.0 + 0x3000,
        reason: FaultReason(5),
        kind: RequestKind::Write,
    };
    v.units()[0].regs().inject_fault(0, rec);
    let got = v.poll_faults();
    assert_eq!(got, vec![UnitFault { unit: 0, segment: 0, record: rec }]);
    assert!(log(&v, 0).contains(&Event::FaultCleared(0)));
    assert!(v.poll_faults().is_empty(), "cleared");
    let s = v.summary();
    assert_eq!((s.units, s.enabled, s.faults, s.overflows), (1, true, 1, 0));
    assert_eq!((s.last_fault_source, s.last_fault_addr), (0x18, HV.base.0 + 0x3000));
}

#[test]
fn fault_records_are_walked_from_fri_and_wrap() {
    let mem = MockMem::new();
    let mut f = frames();
    // Four records (NFR = 3), faults in 2, 3 and 0; FRI says start at 2.
    let cap = (QEMU_CAP & !(0xff << 40)) | (3 << 40);
    let mut v = enabled(&mem, &mut f, vec![MockRegs::new(&mem, cap, QEMU_ECAP).with(|s| s.fsts = Fsts::PFO.bits())]);
    let r = |i, bus, addr, kind| FaultRecord { index: i, source: SourceId::new(bus, 0, 0), addr, reason: FaultReason(6), kind };
    let recs = [r(2, 1, 0x1000, RequestKind::Read), r(3, 2, 0x2000, RequestKind::Write), r(0, 3, 0x3000, RequestKind::Read)];
    let u = v.units()[0].regs();
    for rec in recs {
        u.inject_fault(rec.index as usize, rec);
    }
    // The mock reports the first set record as FRI; make it 2.
    u.st.borrow_mut().records[0].1 &= !FaultRecord::F;
    let first = u.st.borrow().records[0];
    assert_eq!(first.1 & FaultRecord::F, 0);
    let got = v.poll_faults();
    assert_eq!(got.iter().map(|g| g.record).collect::<Vec<_>>(), recs[..2].to_vec());
    // Record 0 (set again) is found on the next poll, from FRI 0.
    v.units()[0].regs().inject_fault(0, recs[2]);
    let got = v.poll_faults();
    assert_eq!(got.iter().map(|g| g.record).collect::<Vec<_>>(), vec![recs[2]]);
    let s = v.summary();
    assert_eq!((s.faults, s.overflows), (3, 1));
    assert_eq!(s.last_fault_source, 0x300);
    assert!(log(&v, 0).contains(&Event::FstsWrite(Fsts::PFO.bits())));
}

#[test]
fn a_full_ring_of_faults_is_bounded() {
    let mem = MockMem::new();
    let mut f = frames();
    let cap = (QEMU_CAP & !(0xff << 40)) | (7 << 40);
    let mut v = enabled(&mem, &mut f, vec![MockRegs::new(&mem, cap, QEMU_ECAP)]);
    for i in 0..8 {
        let rec = FaultRecord {
            index: i,
            source: SourceId(i as u16),
            addr: 0x1000 * i as u64,
            reason: FaultReason(2),
            kind: RequestKind::Read,
        };
        v.units()[0].regs().inject_fault(i as usize, rec);
    }
    assert_eq!(v.poll_faults().len(), 8);
    assert_eq!(v.summary().faults, 8);
}

#[test]
fn disable_and_free() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem), MockRegs::registers_only(&mem)]);
    v.remove_page(&mem, &mut f, PAGE).unwrap();
    assert_eq!(v.free_tables(&mem, &mut f), Err(Error::StillEnabled));
    v.disable(&mem, &mut f).unwrap();
    for i in 0..2 {
        let u = &v.units()[i];
        assert!(!u.is_enabled() && !u.uses_queue());
        assert!(!u.regs().gsts().intersects(Gsts::TES | Gsts::QIES));
    }
    // TE goes first; then a last wait drains the queue, and the queue goes.
    let l = without_syncs(&log(&v, 0));
    let tail = &l[l.len() - 4..];
    assert_eq!(tail[0], Event::Gcmd(Gcmd::QIE.bits()));
    assert!(matches!(tail[1], Event::Iqt(_)));
    assert!(matches!(tail[2], Event::Desc(d) if d.kind() == desc_type::WAIT));
    assert_eq!(tail[3], Event::Gcmd(0));
    v.free_tables(&mem, &mut f).unwrap();
    assert!(f.live.is_empty(), "leaked {:?}", f.live);
    assert!(v.tables().is_none());
    // And again: load, unload, load.
    let ram = ram();
    v.build(&mem, &mut f, &DmaMap { ram: &ram, holes: &[HV], rmrrs: &[] }).unwrap();
    v.enable(&mem, &mut f).unwrap();
    assert!(v.enabled());
    v.disable(&mem, &mut f).unwrap();
    v.free_tables(&mem, &mut f).unwrap();
    assert!(f.live.is_empty());
}

#[test]
fn disable_timeouts_keep_the_queue() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.units()[0].regs().st.borrow_mut().stuck = Gsts::TES.bits();
    assert_eq!(v.disable(&mem, &mut f), Err(timeout(Wait::TranslationOff)));
    v.units()[0].regs().st.borrow_mut().stuck = Gsts::QIES.bits();
    assert_eq!(v.disable(&mem, &mut f), Err(timeout(Wait::QueueOff)));
    // The unit may still read the queue: its frames are not freed, and the
    // tables cannot go.
    assert!(v.units()[0].uses_queue());
    assert_eq!(v.free_tables(&mem, &mut f), Err(Error::StillEnabled));
}

#[test]
fn a_stopped_queue_is_not_turned_off() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.units()[0].regs().st.borrow_mut().queue_stalled = true;
    assert_eq!(v.disable(&mem, &mut f), Err(timeout(Wait::QueueWait)));
    assert!(v.units()[0].uses_queue());
    assert!(v.units()[0].regs().gsts().contains(Gsts::QIES));
}

#[test]
fn an_unused_queue_can_be_turned_off() {
    // QEMU turns the queue off only after a wait descriptor; a load and
    // unload with no donation in between never submitted one.
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.disable(&mem, &mut f).unwrap();
    assert!(!v.units()[0].regs().gsts().intersects(Gsts::TES | Gsts::QIES));
    let d = descs(&log(&v, 0));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].kind(), desc_type::WAIT);
    v.free_tables(&mem, &mut f).unwrap();
    assert!(f.live.is_empty());
}

#[test]
fn table_config_must_suit_every_unit() {
    let mem = MockMem::new();
    // One unit with 4-level tables and no large pages, one like QEMU's.
    let big = (6 << 8) | (47 << 16) | (0x22 << 24);
    let v = vtd(vec![MockRegs::new(&mem, big, QEMU_ECAP), MockRegs::qemu(&mem)]);
    let c = v.config().unwrap();
    assert_eq!((c.levels, c.address_bits, c.pages_2m, c.pages_1g), (Levels::Three, 39, false, false));
    // A unit told to walk tables it cannot.
    let u = Unit::new(MockRegs::qemu(&mem), UNIT0, 0, SPIN);
    let four = TableConfig { levels: Levels::Four, address_bits: 48, pages_2m: false, pages_1g: false };
    assert!(matches!(u.check_config(&four), Err(Error::Unsupported(_))));
    let wide = TableConfig { levels: Levels::Three, address_bits: 39, pages_2m: true, pages_1g: true };
    let small = Unit::new(MockRegs::new(&mem, QEMU_CAP & !(1 << 35), QEMU_ECAP), UNIT0, 0, SPIN);
    assert!(matches!(small.check_config(&wide), Err(Error::Unsupported(_))));
    assert!(matches!(Vtd::<MockRegs>::new(vec![]), Err(Error::NoUnits)));
}

#[test]
fn build_twice_and_enable_unbuilt() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = vtd(vec![MockRegs::qemu(&mem)]);
    assert_eq!(v.enable(&mem, &mut f), Err(Error::NotBuilt));
    assert_eq!(v.remove_page(&mem, &mut f, PAGE), Err(Error::NotBuilt));
    let ram = ram();
    v.build(&mem, &mut f, &DmaMap { ram: &ram, holes: &[], rmrrs: &[] }).unwrap();
    assert_eq!(v.build(&mem, &mut f, &DmaMap { ram: &ram, holes: &[], rmrrs: &[] }), Err(Error::AlreadyBuilt));
}

#[test]
fn qemu_end_to_end() {
    // The DMAR QEMU gives, one unit per DRHD, the map with the hypervisor
    // region and the register page left out.
    let dmar = parse_dmar(&dmar::build::qemu()).unwrap();
    let mem = MockMem::new();
    let mut f = frames();
    let units = dmar.units.iter().map(|d| Unit::new(MockRegs::qemu(&mem), d.base, d.segment, SPIN)).collect();
    let mut v = Vtd::new(units).unwrap();
    v.check_free().unwrap();
    let ram = ram();
    let mut holes = vec![HV];
    holes.extend(dmar.units.iter().map(Drhd::register_range));
    let rmrrs = dmar.rmrr_ranges();
    v.build(&mem, &mut f, &DmaMap { ram: &ram, holes: &holes, rmrrs: &rmrrs }).unwrap();
    v.enable(&mem, &mut f).unwrap();
    let t = v.tables().unwrap();
    assert_eq!(t.config.levels, Levels::Three);
    // The edu device sees RAM 1:1, not the hypervisor, not the IOMMU.
    let c = t.context_entry(&mem, 0, SourceId::new(0, 3, 0).devfn());
    assert_eq!((c.domain(), c.slptptr()), (HOST_DOMAIN, t.slpt.0));
    assert_eq!(v.translate(&mem, Iova(0x10_0000)), Some((Hpa(0x10_0000), true)));
    assert_eq!(v.translate(&mem, Iova(HV.base.0)), None);
    assert_eq!(v.translate(&mem, Iova(0xfed9_0000)), None);
    assert_eq!(v.translate(&mem, Iova(0xfed9_1000)), Some((Hpa(0xfed9_1000), true)));
    // Donate a page to a guest, then give it back.
    let p = Hpa(0x0800_0000);
    v.remove_page(&mem, &mut f, p).unwrap();
    assert_eq!(v.translate(&mem, Iova(p.0)), None);
    v.restore_page(&mem, &mut f, p).unwrap();
    assert_eq!(v.translate(&mem, Iova(p.0)), Some((p, true)));
    let s = v.summary();
    assert_eq!((s.units, s.enabled, s.faults), (1, true, 0));
}

#[test]
fn a_donation_is_one_invalidation() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem), MockRegs::registers_only(&mem)]);
    // What the driver donates: 2 MiB blocks and loose pages, in one call.
    let ranges = [PhysRange::new(0x1000_0000, LARGE_PAGE_SIZE), PhysRange::new(0x1020_0000, LARGE_PAGE_SIZE), PhysRange::new(0x0800_3000, PAGE_SIZE)];
    v.remove_ranges(&mem, &mut f, &ranges).unwrap();
    for r in ranges {
        assert_eq!(v.translate(&mem, Iova(r.base.0)), None);
        assert_eq!(v.translate(&mem, Iova(r.end.0 - 1)), None);
    }
    // One domain-wide invalidation and its wait, however many pages.
    let d = descs(&log(&v, 0));
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!((d[0].kind(), d[0].granularity(), d[0].domain()), (desc_type::IOTLB, 2, HOST_DOMAIN));
    assert_eq!(without_syncs(&log(&v, 1)), vec![Event::Iotlb((1 << 63) | (2 << 60) | (1 << 32) | DRAIN)]);
    // Returned: reachable again, and no invalidation is due.
    v.units()[0].regs().clear_log();
    v.units()[1].regs().clear_log();
    v.restore_ranges(&mem, &mut f, &ranges).unwrap();
    for r in ranges {
        assert_eq!(v.translate(&mem, Iova(r.base.0 + 0x10)), Some((Hpa(r.base.0 + 0x10), true)));
    }
    assert!(descs(&log(&v, 0)).is_empty());
    assert_eq!(register_invalidations(&log(&v, 1)), 0);
}

#[test]
fn a_bad_range_stops_a_donation_before_any_change() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = vtd(vec![MockRegs::qemu(&mem)]);
    let ram = ram();
    let rmrrs = [PhysRange::new(0x7b80_0000, 0x10_0000)];
    v.build(&mem, &mut f, &DmaMap { ram: &ram, holes: &[HV], rmrrs: &rmrrs }).unwrap();
    v.enable(&mem, &mut f).unwrap();
    v.units()[0].regs().clear_log();
    let ranges = [PhysRange::new(0x1000_0000, LARGE_PAGE_SIZE), PhysRange::new(0x7b80_0000, PAGE_SIZE)];
    assert_eq!(v.remove_ranges(&mem, &mut f, &ranges), Err(Error::RmrrPage { addr: 0x7b80_0000 }));
    assert_eq!(v.translate(&mem, Iova(0x1000_0000)), Some((Hpa(0x1000_0000), true)));
    assert!(log(&v, 0).is_empty());
}

#[test]
fn out_of_frames_half_way_puts_the_donation_back() {
    // The exact frames a build and enable take, and not one more.
    let count = {
        let mem = MockMem::new();
        let mut f = frames();
        let _v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
        f.live.len() as u64
    };
    let mem = MockMem::new();
    let mut f = MockFrames::new(0x7_0000_0000, count);
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    // The first block lies in the GiB already split around the hypervisor
    // region (no frame needed), the second inside a 1 GiB leaf (one needed).
    let a = PhysRange::new(HV.end.0, LARGE_PAGE_SIZE);
    let b = PhysRange::new(0x1000_0000, LARGE_PAGE_SIZE);
    assert_eq!(v.remove_ranges(&mem, &mut f, &[a, b]), Err(Error::NoFrames));
    assert_eq!(v.translate(&mem, Iova(a.base.0)), Some((a.base, true)));
    assert_eq!(v.translate(&mem, Iova(b.base.0)), Some((b.base, true)));
    // Alone, the first goes through.
    v.remove_ranges(&mem, &mut f, &[a]).unwrap();
    assert_eq!(v.translate(&mem, Iova(a.base.0)), None);
}

#[test]
fn caching_mode_units_hear_of_returned_ranges() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::new(&mem, QEMU_CAP | (1 << 7), QEMU_ECAP)]);
    let r = PhysRange::new(0x1000_0000, 4 * LARGE_PAGE_SIZE);
    v.remove_ranges(&mem, &mut f, &[r]).unwrap();
    v.units()[0].regs().clear_log();
    v.restore_ranges(&mem, &mut f, &[r]).unwrap();
    let d = descs(&log(&v, 0));
    assert_eq!((d[0].kind(), d[0].granularity()), (desc_type::IOTLB, 2));
}

#[test]
fn teardown_gives_devices_untranslated_memory_back() {
    let mem = MockMem::new();
    let mut f = frames();
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem), MockRegs::registers_only(&mem)]);
    v.remove_ranges(&mem, &mut f, &[PhysRange::new(0x1000_0000, LARGE_PAGE_SIZE)]).unwrap();
    v.teardown(&mem, &mut f).unwrap();
    assert!(!v.enabled());
    for u in v.units() {
        assert!(!u.regs().gsts().intersects(Gsts::TES | Gsts::QIES));
    }
    assert!(f.live.is_empty(), "leaked {:?}", f.live);
    assert_eq!(v.remove_page(&mem, &mut f, PAGE), Err(Error::NotBuilt));
    // A unit that does not answer keeps the tables.
    let mut v = enabled(&mem, &mut f, vec![MockRegs::qemu(&mem)]);
    v.units()[0].regs().st.borrow_mut().stuck = Gsts::TES.bits();
    assert_eq!(v.teardown(&mem, &mut f), Err(timeout(Wait::TranslationOff)));
    assert!(v.tables().is_some());
}

#[test]
fn errors_become_errnos_and_say_what_to_do() {
    use shared_abi::errno::*;
    let busy = Error::InUse { unit: UNIT0, gsts: Gsts::TES.bits() };
    assert_eq!(busy.errno(), -EBUSY);
    let text = alloc::format!("{busy}");
    assert!(text.contains("intel_iommu=off") && !text.contains("intremap"), "{text}");
    let ir = Error::InUse { unit: UNIT0, gsts: (Gsts::IRES | Gsts::QIES).bits() };
    assert!(alloc::format!("{ir}").contains("intremap=off"));
    assert_eq!(Error::NoFrames.errno(), -ENOMEM);
    assert_eq!(timeout(Wait::QueueWait).errno(), -EIO);
    assert_eq!(Error::DmarNoUnits.errno(), -ENODEV);
    assert_eq!(Error::RmrrPage { addr: 0 }.errno(), -EINVAL);
}
