//! Fuzz harnesses for the two host boundaries, run against the [`model`].
//!
//! Each harness reads arbitrary bytes as a script, runs it, and panics as
//! soon as an invariant breaks:
//!
//! - [`hypercalls`]: raw host hypercalls, with any number, block address,
//!   block size and block contents, into [`Model::dispatch`];
//! - [`ioctls`]: ioctls into a model of the driver's ioctl handler, which
//!   validates with [`shared_abi::validate`] as `host-driver/dev.rs` does,
//!   donates on `HC_NEED_PAGES`, keeps VM descriptors and gives the pool
//!   back once no VM is left;
//! - [`guestmem_ops`]: guest memory operations (writes, forks, full copies,
//!   write protection, re-merging, destroys) on a small frame pool.
//!
//! The invariants, checked after every step (`docs/fuzzing.md`):
//!
//! - nothing panics, and every failure is a documented errno of that call
//!   (or `HC_NEED_PAGES` with a page count, where documented);
//! - a hypercall touches only host memory the host owns;
//! - a failed call changes no VM and no pool frame, but for a LOAD short of
//!   frames, which may have written its first page;
//! - pool accounting: every frame in use is reachable from a VM, and its
//!   reference count is the number of EPT entries (and VM roots and VMCS
//!   pages) that point to it; an entry that grants write access points to a
//!   frame with exactly one reference; free frames are zero; no pool frame
//!   is host owned;
//! - guest memory reads back what was loaded, and a fork's memory equals
//!   its parent's at fork time;
//! - destroying every VM frees every frame, and reclaiming returns every
//!   donated page to the host, zeroed;
//! - what the driver's validation accepts, the hypervisor does not refuse
//!   as malformed (`EINVAL`).

use super::decode::{self, from_bytes, Block, HostMem};
use super::model::{Call, Faults, Model, RAM};
use super::vmops::Limits;
use crate::addr::{Gpa, Hpa, PAGE_SIZE};
use crate::arch::x86::ept_entry::{EptEntry, EptFlags};
use crate::guestmem::{GuestMem, MemError};
use crate::mem::mock::MockMem;
use crate::mem::PhysMem;
use crate::pool::FramePool;
use std::boxed::Box;
use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;
use shared_abi::errno::*;
use shared_abi::validate;
use shared_abi::{
    exit, hc, ioctl, DebugTranslate, ExitRecord, HvStats, HvVersion, IocBuf, IocLoad, IocVersion, MemRange, Regs, VmCreate,
    VmFork, VmId, VmInfo, VmLoad, VmRegs, VmRun, ABI_REVISION, FORK_COPY, HC_NEED_PAGES,
};

// ---------------------------------------------------------------------------
// Scripts.
// ---------------------------------------------------------------------------

/// Reads a script: little-endian integers; past the end, zeros.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }
    fn int<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let s = self.bytes(N);
        b[..s.len()].copy_from_slice(s);
        b
    }
    pub fn u8(&mut self) -> u8 {
        self.int::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.int())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.int())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.int())
    }
}

/// Writes a script (the seed corpus and the proptest strategies build
/// scripts with it).
#[derive(Default)]
pub struct Writer {
    pub out: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }
}

/// The model's limits from a script's flags byte: 2 to 9 VMs, 1 to 4 live
/// children.
fn limits(flags: u8) -> Limits {
    Limits { vms: 2 + (flags as u32 >> 1 & 7), children: 1 + (flags as u32 >> 4 & 3) }
}

/// Script flags: DEBUG_TRANSLATE enabled (the module's `debug=1`).
pub const FLAG_DEBUG: u8 = 1;
/// Script flags for the most generous limits: 9 VMs, 4 children.
pub const FLAG_ROOMY: u8 = 0x3e;

/// The largest block a hypercall script writes before a call.
pub const MAX_BLOCK: usize = 8192;
/// Steps a script may have; the rest is ignored.
pub const MAX_STEPS: usize = 96;

// ---------------------------------------------------------------------------
// Invariants of the model.
// ---------------------------------------------------------------------------

/// The reference count every pool frame in use must have: one per root in
/// `roots`, one per page in `pages` (VMCS frames), and one per EPT entry
/// that points to it (tables shared by several roots are walked once).
/// Checks on the way that every entry points to a pool frame, that there
/// are no large pages, and that writable entries point to frames with one
/// reference.
fn ept_refs(mem: &impl PhysMem, pool: &FramePool, roots: &[u64], pages: &[u64]) -> BTreeMap<u64, u32> {
    let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
    let mut writable: Vec<(u64, u64)> = Vec::new();
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut todo: Vec<(u64, u32)> = roots.iter().map(|&r| (r, 4)).collect();
    for &f in roots.iter().chain(pages) {
        *refs.entry(f).or_default() += 1;
    }
    let mut page = [0u8; PAGE_SIZE as usize];
    while let Some((t, level)) = todo.pop() {
        if !seen.insert(t) {
            continue;
        }
        assert!(pool.contains(Hpa(t)), "EPT table {t:#x} is not a pool frame");
        mem.read(Hpa(t), &mut page);
        for (i, raw) in page.chunks_exact(8).enumerate() {
            let e = EptEntry(u64::from_le_bytes(raw.try_into().unwrap()));
            if !e.present() {
                continue;
            }
            let child = e.addr();
            assert!(pool.contains(Hpa(child)), "EPT entry {i} of table {t:#x} (level {level}) points outside the pool: {child:#x}");
            assert!(!e.is_large(), "a guest EPT maps a large page");
            *refs.entry(child).or_default() += 1;
            if e.flags().contains(EptFlags::WRITE) {
                writable.push((t, child));
            }
            if level > 1 {
                todo.push((child, level - 1));
            }
        }
    }
    for (t, child) in writable {
        assert_eq!(refs[&child], 1, "a writable entry in table {t:#x} points to frame {child:#x}, which is shared");
    }
    refs
}

/// [`ept_refs`] of every VM of the model.
fn expected_refs(m: &Model) -> BTreeMap<u64, u32> {
    let roots: Vec<u64> = m.vms.values().map(|v| v.mem.ept.root.0).collect();
    let vmcs: Vec<u64> = m.vms.values().flat_map(|v| v.vmcs.iter().map(|f| f.0)).collect();
    ept_refs(&m.host.mem, &m.pool, &roots, &vmcs)
}

/// Frames in use are exactly those `refs` names, with those counts.
fn check_refs(pool: &FramePool, refs: &BTreeMap<u64, u32>) {
    let used = pool.frames_total() - pool.frames_free();
    assert_eq!(refs.len() as u64, used, "frames in use ({used}) differ from frames the VMs reach ({})", refs.len());
    for (&f, &n) in refs {
        assert_eq!(pool.refs(Hpa(f)), Some(n), "frame {f:#x}: reference count");
    }
}

/// Every frame in use is reachable and has the reference count the EPTs
/// give it.
fn check_accounting(m: &Model) -> BTreeMap<u64, u32> {
    let refs = expected_refs(m);
    check_refs(&m.pool, &refs);
    refs
}

/// [`check_accounting`], and for every pool frame (`pool_pages`): free
/// frames are zero, and no pool frame is host owned.
fn check_pool(m: &Model, pool_pages: &BTreeSet<u64>) {
    let refs = check_accounting(m);
    assert_eq!(pool_pages.len() as u64, m.pool.frames_total(), "pool size");
    let mut free = 0;
    for &p in pool_pages {
        assert!(m.pool.contains(Hpa(p)), "donated page {p:#x} left the pool");
        assert!(!m.host.owned(p, PAGE_SIZE), "pool frame {p:#x} is host owned");
        let r = m.pool.refs(Hpa(p)).unwrap();
        assert_eq!(r, refs.get(&p).copied().unwrap_or(0), "frame {p:#x}: reference count");
        if r == 0 {
            free += 1;
            assert!(m.host.mem.page_is_zero(Hpa(p)), "free frame {p:#x} is not scrubbed");
        }
    }
    assert_eq!(free, m.pool.frames_free(), "free frames");
}

/// Guest memory as the harness expects it: page -> contents; pages not
/// here read as zeros.
type Shadow = BTreeMap<u64, Box<[u8; PAGE_SIZE as usize]>>;

fn shadow_write(s: &mut Shadow, gpa: u64, data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        let a = gpa + i as u64;
        s.entry(a & !(PAGE_SIZE - 1)).or_insert_with(|| Box::new([0; PAGE_SIZE as usize]))[(a & (PAGE_SIZE - 1)) as usize] = b;
    }
}

fn shadow_byte(s: &Shadow, gpa: u64) -> u8 {
    s.get(&(gpa & !(PAGE_SIZE - 1))).map(|p| p[(gpa & (PAGE_SIZE - 1)) as usize]).unwrap_or(0)
}

/// The pages `g` maps, and those `extra` names.
fn pages_of(mem: &impl PhysMem, g: &GuestMem, extra: &Shadow) -> BTreeSet<u64> {
    let mut pages: BTreeSet<u64> = extra.keys().copied().collect();
    g.for_each_page(mem, |gpa, _, _| {
        pages.insert(gpa.0);
    });
    pages
}

/// Guest memory equals `shadow`, on every page either knows of.
fn check_memory(mem: &impl PhysMem, g: &GuestMem, shadow: &Shadow, what: &str) {
    let mut buf = [0u8; PAGE_SIZE as usize];
    for page in pages_of(mem, g, shadow) {
        g.read(mem, Gpa(page), &mut buf).unwrap();
        let want: &[u8] = shadow.get(&page).map(|p| &p[..]).unwrap_or(&[0u8; PAGE_SIZE as usize]);
        if buf[..] != want[..] {
            let at = (0..buf.len()).find(|&i| buf[i] != want[i]).unwrap();
            panic!("{what}: guest memory at {:#x} reads {:#x}, expected {:#x}", page + at as u64, buf[at], want[at]);
        }
    }
}

// ---------------------------------------------------------------------------
// Hypercalls.
// ---------------------------------------------------------------------------

/// One step of a hypercall script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Host hypercall `nr` with block `arg`, `len` bytes; `block` is written
    /// at `arg` first, if the host owns that memory.
    Call { nr: u64, arg: u64, len: u64, block: Vec<u8> },
    /// The host writes its own memory (ignored where it does not own it).
    Poke { pa: u64, bytes: Vec<u8> },
    /// Every invariant, in full.
    Check,
    /// From now on the machine fails as `faults` says (bit 0: no CPU
    /// acknowledges a TLB shootdown; bit 1: the IOMMU does not answer;
    /// bit 2: the heap cannot split a host EPT page), until the next such
    /// step.
    Faults(u8),
}

/// A hypercall script: flags (bit 0: debug; bits 1-3 and 4-5: the model's
/// VM and children limits), then steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub flags: u8,
    pub steps: Vec<Step>,
}

impl Script {
    /// Reads a script. Tags: 0, 5, 6: a call with an 8-bit number and a
    /// 16-bit size; 1: a call with a 64-bit size; 2: a call with a 64-bit
    /// number and size; 3: a poke; 4: a check; 7: the machine's faults.
    pub fn decode(data: &[u8]) -> Script {
        let mut r = Reader::new(data);
        let flags = r.u8();
        let mut steps = Vec::new();
        while !r.done() && steps.len() < MAX_STEPS {
            let tag = r.u8() % 8;
            steps.push(match tag {
                3 => {
                    let pa = r.u64();
                    let n = r.u16() as usize % (MAX_BLOCK + 1);
                    Step::Poke { pa, bytes: r.bytes(n).to_vec() }
                }
                4 => Step::Check,
                7 => Step::Faults(r.u8()),
                _ => {
                    let nr = if tag == 2 { r.u64() } else { r.u8() as u64 };
                    let arg = r.u64();
                    let len = if tag == 1 || tag == 2 { r.u64() } else { r.u16() as u64 };
                    let n = r.u16() as usize % (MAX_BLOCK + 1);
                    Step::Call { nr, arg, len, block: r.bytes(n).to_vec() }
                }
            });
        }
        Script { flags, steps }
    }

    /// The bytes [`Script::decode`] reads back as this script.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.flags);
        for s in &self.steps {
            match s {
                Step::Poke { pa, bytes } => {
                    w.u8(3);
                    w.u64(*pa);
                    w.u16(bytes.len().min(MAX_BLOCK) as u16);
                    w.bytes(&bytes[..bytes.len().min(MAX_BLOCK)]);
                }
                Step::Check => w.u8(4),
                Step::Faults(f) => {
                    w.u8(7);
                    w.u8(*f);
                }
                Step::Call { nr, arg, len, block } => {
                    let tag = if *nr > 0xff { 2 } else if *len > 0xffff { 1 } else { 0 };
                    w.u8(tag);
                    if tag == 2 {
                        w.u64(*nr);
                    } else {
                        w.u8(*nr as u8);
                    }
                    w.u64(*arg);
                    if tag == 0 {
                        w.u16(*len as u16);
                    } else {
                        w.u64(*len);
                    }
                    w.u16(block.len().min(MAX_BLOCK) as u16);
                    w.bytes(&block[..block.len().min(MAX_BLOCK)]);
                }
            }
        }
        w.out
    }
}

/// The errno values (positive) `docs/hypercalls.md` gives each hypercall.
pub fn documented(nr: u64) -> &'static [i64] {
    match nr {
        hc::VERSION | hc::STATS => &[EINVAL, EFAULT],
        hc::UNLOAD => &[EBUSY],
        // EBUSY: a shootdown was not acknowledged; EIO: the IOMMU did not
        // answer.
        hc::DONATE => &[EINVAL, EFAULT, ENOMEM, EBUSY, EIO],
        hc::RECLAIM => &[EINVAL, EFAULT, ENOMEM],
        hc::VM_CREATE => &[EINVAL, ENOSPC, EFAULT],
        hc::VM_DESTROY => &[ENOENT, EINVAL, EFAULT],
        hc::VM_LOAD => &[EINVAL, EFAULT, ENOENT, EBUSY, EOVERFLOW],
        hc::VM_GET_REGS | hc::VM_SET_REGS => &[ENOENT, EBUSY, EINVAL, EFAULT],
        hc::VM_RUN => &[EINVAL, EFAULT, ENOENT, EBUSY, EIO],
        hc::VM_FORK => &[ENOENT, EINVAL, EBUSY, EAGAIN, ENOSPC, EOVERFLOW, EFAULT],
        hc::VM_LIST => &[EFAULT],
        hc::DEBUG_TRANSLATE => &[ENOSYS, ENOENT, EINVAL, EFAULT],
        _ => &[ENOSYS],
    }
}

/// Whether a hypercall may answer `HC_NEED_PAGES`.
pub fn may_need_pages(nr: u64) -> bool {
    matches!(nr, hc::VM_CREATE | hc::VM_LOAD | hc::VM_FORK | hc::VM_RUN)
}

/// What a script did, for tests that check the seeds reach deep.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Calls issued.
    pub calls: u64,
    /// Successful calls, by hypercall number (or ioctl command).
    pub ok: BTreeMap<u64, u64>,
    /// Failures, by errno (`HC_NEED_PAGES` as 4096).
    pub errors: BTreeMap<i64, u64>,
}

impl Report {
    fn count(&mut self, what: u64, status: i64) {
        self.calls += 1;
        if status >= 0 {
            *self.ok.entry(what).or_default() += 1;
        } else {
            *self.errors.entry(-status).or_default() += 1;
        }
    }
    /// Successes of `what`.
    pub fn ok(&self, what: u64) -> u64 {
        self.ok.get(&what).copied().unwrap_or(0)
    }
}

/// Runs a hypercall script from bytes. The `hypercall` fuzz target.
pub fn hypercalls(data: &[u8]) -> Report {
    run_script(&Script::decode(data))
}

/// Runs a hypercall script.
pub fn run_script(s: &Script) -> Report {
    let mut h = Hyper {
        m: Model::new(limits(s.flags), s.flags & FLAG_DEBUG != 0),
        shadow: BTreeMap::new(),
        given: BTreeMap::new(),
        pool_pages: BTreeSet::new(),
        report: Report::default(),
    };
    for step in s.steps.iter().take(MAX_STEPS) {
        match step {
            Step::Call { nr, arg, len, block } => {
                if !block.is_empty() && h.m.host.owned(*arg, block.len() as u64) {
                    h.m.host.mem.write(Hpa(*arg), block);
                }
                h.call(*nr, *arg, *len);
            }
            Step::Poke { pa, bytes } => {
                if !bytes.is_empty() && h.m.host.owned(*pa, bytes.len() as u64) {
                    h.m.host.mem.write(Hpa(*pa), bytes);
                }
            }
            Step::Check => h.check_all(),
            Step::Faults(f) => h.m.faults = Faults { shootdown: f & 1 != 0, iommu: f & 2 != 0, heap: f & 4 != 0 },
        }
    }
    h.finish();
    h.report
}

struct Hyper {
    m: Model,
    shadow: BTreeMap<u32, Shadow>,
    /// Register files set with VM_SET_REGS, by (VM, vCPU).
    given: BTreeMap<(u32, u32), Regs>,
    /// Pages in the pool: donated and not reclaimed.
    pool_pages: BTreeSet<u64>,
    report: Report,
}

fn read_host<T: Block>(m: &Model, pa: u64) -> T {
    let mut b = vec![0u8; core::mem::size_of::<T>()];
    m.host.mem.read(Hpa(pa), &mut b);
    from_bytes(&b).unwrap()
}

impl Hyper {
    fn call(&mut self, nr: u64, arg: u64, len: u64) {
        // The block as it is before the call (DONATE scrubs its own block
        // when the block lies in a donated range).
        let mut pre = vec![0u8; (len.min(MAX_BLOCK as u64 * 2)) as usize];
        if arg.checked_add(pre.len() as u64).is_some() {
            self.m.host.mem.read(Hpa(arg), &mut pre);
        }
        let ids: Vec<u32> = self.m.vms.keys().copied().collect();
        let (total, free) = (self.m.pool.frames_total(), self.m.pool.frames_free());
        // The host's pages a DONATE names, which stay the host's if it fails.
        let owned: Vec<u64> = match nr {
            hc::DONATE => pre
                .chunks_exact(16)
                .take((len / 16).min(256) as usize)
                .filter_map(from_bytes::<MemRange>)
                .flat_map(|r| (r.base..r.base.saturating_add(r.size.min(1 << 30))).step_by(PAGE_SIZE as usize))
                .filter(|&p| self.m.host.owned(p, PAGE_SIZE))
                .collect(),
            _ => Vec::new(),
        };

        let (s, aux) = self.m.dispatch(nr, arg, len);
        self.report.count(nr, if s == HC_NEED_PAGES { -4096 } else { s });

        let ids_after: Vec<u32> = self.m.vms.keys().copied().collect();
        if s < 0 {
            if s == HC_NEED_PAGES {
                assert!(aux > 0, "hypercall {nr:#x}: HC_NEED_PAGES for 0 pages");
                assert!(may_need_pages(nr), "hypercall {nr:#x} answered HC_NEED_PAGES");
            } else {
                assert!(documented(nr).contains(&-s), "hypercall {nr:#x} failed with errno {}, not documented for it", -s);
            }
            assert_eq!(ids, ids_after, "hypercall {nr:#x} failed ({s}) but changed the VMs");
            assert_eq!(total, self.m.pool.frames_total(), "hypercall {nr:#x} failed ({s}) but changed the pool");
            for &p in &owned {
                assert!(self.m.host.owned(p, PAGE_SIZE), "a failed DONATE ({s}) kept page {p:#x} from the host");
            }
            assert!(!self.m.calls.iter().any(|c| matches!(c, Call::Scrub(_))), "hypercall {nr:#x} failed ({s}) but scrubbed host pages");
            if nr == hc::VM_LOAD {
                self.after_failed_load(&pre);
            } else {
                assert_eq!(free, self.m.pool.frames_free(), "hypercall {nr:#x} failed ({s}) but took or freed frames");
            }
            if nr == hc::VM_SET_REGS && s == -EINVAL {
                if let Some(r) = from_bytes::<VmRegs>(&pre) {
                    assert!(validate::regs(&r.regs).is_err() || len < core::mem::size_of::<VmRegs>() as u64, "SET_REGS refused registers validate accepts");
                }
            }
        } else {
            self.after_ok(nr, arg, len, s, &pre, &ids, total, free);
        }
        check_accounting(&self.m);
    }

    /// A LOAD that failed may have written its first page (when it was
    /// short of frames for the second): every byte is the old one or the
    /// new one, and the shadow follows what was written.
    fn after_failed_load(&mut self, pre: &[u8]) {
        let Some(l) = from_bytes::<VmLoad>(pre) else { return };
        let Some(vm) = self.m.vms.get(&l.vm) else { return };
        if validate::vm_load(&l).is_err() || l.gpa.checked_add(l.len).map(|e| e > vm.mem_bytes).unwrap_or(true) {
            return;
        }
        let mut src = vec![0u8; l.len as usize];
        self.m.host.mem.read(Hpa(l.src), &mut src);
        let mut now = vec![0u8; l.len as usize];
        vm.mem.read(&self.m.host.mem, Gpa(l.gpa), &mut now).unwrap();
        let sh = self.shadow.entry(l.vm).or_default();
        for i in 0..now.len() {
            let old = shadow_byte(sh, l.gpa + i as u64);
            assert!(now[i] == old || now[i] == src[i], "a failed LOAD left byte {:#x} of vm{} neither old nor new", l.gpa + i as u64, l.vm);
        }
        shadow_write(sh, l.gpa, &now);
    }

    #[allow(clippy::too_many_arguments)]
    fn after_ok(&mut self, nr: u64, arg: u64, len: u64, s: i64, pre: &[u8], ids: &[u32], total: u64, free: u64) {
        let m = &self.m;
        match nr {
            hc::VERSION => {
                let v: HvVersion = read_host(m, arg);
                assert_eq!(v.abi_revision, ABI_REVISION);
            }
            hc::STATS => {
                let st: Box<HvStats> = {
                    let mut b = vec![0u8; core::mem::size_of::<HvStats>()];
                    m.host.mem.read(Hpa(arg), &mut b);
                    Box::new(from_bytes(&b).unwrap())
                };
                assert_eq!((st.pool_frames_total, st.pool_frames_free), (m.pool.frames_total(), m.pool.frames_free()));
                assert_eq!(st.vms as usize, m.vms.len());
            }
            hc::UNLOAD => assert!(m.vms.is_empty(), "UNLOAD succeeded while VMs exist"),
            hc::DONATE => {
                let ranges: Vec<MemRange> = pre.chunks_exact(16).take((len / 16) as usize).map(|c| from_bytes(c).unwrap()).collect();
                let pages: u64 = ranges.iter().map(|r| r.size / PAGE_SIZE).sum();
                assert_eq!(s as u64, pages, "DONATE's count");
                assert_eq!(m.pool.frames_total(), total + pages);
                // No CPU and no device reaches a page when it is scrubbed,
                // and it is scrubbed before the pool has it.
                let at = |what: fn(&Call) -> bool| m.calls.iter().position(what);
                let scrubs: Vec<usize> = (0..m.calls.len()).filter(|&i| matches!(m.calls[i], Call::Scrub(_))).collect();
                let order = [
                    at(|c| matches!(c, Call::HostUnmap(_))),
                    at(|c| matches!(c, Call::Shootdown)),
                    at(|c| matches!(c, Call::IommuUnmap(_))),
                    scrubs.first().copied(),
                    scrubs.last().copied(),
                    m.calls.iter().rposition(|c| matches!(c, Call::Pool)),
                ];
                assert!(order.iter().all(Option::is_some) && order.is_sorted(), "DONATE's steps out of order: {:?}", m.calls);
                for r in &ranges {
                    for p in (r.base..r.base + r.size).step_by(PAGE_SIZE as usize) {
                        assert!(m.pool.contains(Hpa(p)) && !m.host.owned(p, PAGE_SIZE), "donated page {p:#x}");
                        assert!(m.host.mem.page_is_zero(Hpa(p)), "donated page {p:#x} is not scrubbed");
                        assert!(self.pool_pages.insert(p), "page {p:#x} donated twice");
                    }
                }
            }
            hc::RECLAIM => {
                let max = validate::reclaim_count(len).unwrap();
                assert!(s as u64 <= max);
                assert_eq!(m.pool.frames_total(), total - s as u64);
                assert_eq!(m.pool.frames_free(), free - s as u64, "RECLAIM gave back a frame in use");
                let mut back = BTreeSet::new();
                for i in 0..s as u64 {
                    let p: u64 = read_host(m, arg + 8 * i);
                    assert!(p % PAGE_SIZE == 0 && back.insert(p), "RECLAIM returned {p:#x} twice or unaligned");
                    assert!(self.pool_pages.remove(&p), "RECLAIM returned {p:#x}, not a pool page");
                    assert!(!m.pool.contains(Hpa(p)) && m.host.owned(p, PAGE_SIZE), "reclaimed page {p:#x} is not the host's");
                    assert!(m.host.mem.page_is_zero(Hpa(p)), "reclaimed page {p:#x} is not zero");
                }
            }
            hc::VM_CREATE => {
                let req: VmCreate = from_bytes(pre).unwrap();
                let out: VmCreate = read_host(m, arg);
                let id = s as u32;
                assert!(!ids.contains(&id) && m.vms.contains_key(&id) && m.vms.len() == ids.len() + 1);
                assert_eq!(out.id, id, "VM_CREATE wrote another id");
                assert_eq!(out.name[31], 0);
                let vm = &m.vms[&id];
                assert_eq!((vm.mem_bytes, vm.init.len() as u32), (req.mem_bytes, req.vcpus));
                assert_eq!(free - m.pool.frames_free(), 1 + req.vcpus as u64, "VM_CREATE takes its root and VMCS frames");
                self.shadow.insert(id, Shadow::new());
            }
            hc::VM_DESTROY => {
                let v: VmId = from_bytes(pre).unwrap();
                assert!(ids.contains(&v.id) && !m.vms.contains_key(&v.id) && m.vms.len() + 1 == ids.len());
                self.shadow.remove(&v.id);
            }
            hc::VM_LOAD => {
                let l: VmLoad = from_bytes(pre).unwrap();
                let mut src = vec![0u8; l.len as usize];
                m.host.mem.read(Hpa(l.src), &mut src);
                let mut now = vec![0u8; l.len as usize];
                m.vms[&l.vm].mem.read(&m.host.mem, Gpa(l.gpa), &mut now).unwrap();
                assert_eq!(now, src, "vm{} does not read back what LOAD wrote", l.vm);
                shadow_write(self.shadow.entry(l.vm).or_default(), l.gpa, &src);
            }
            hc::VM_SET_REGS => {
                let r: VmRegs = from_bytes(pre).unwrap();
                assert!(validate::regs(&r.regs).is_ok());
                self.given.insert((r.vm, r.vcpu), r.regs);
            }
            hc::VM_GET_REGS => {
                let r: VmRegs = read_host(m, arg);
                let mem_bytes = m.vms[&r.vm].mem_bytes;
                let g = r.regs;
                assert_eq!((g.cr0, g.cr4, g.efer), (0x8001_0033, 0x20, 0x500), "CR0, CR4 and EFER are fixed");
                assert_eq!(g.rflags & 2, 2);
                match self.given.get(&(r.vm, r.vcpu)) {
                    Some(set) => {
                        assert_eq!(Regs { cr0: g.cr0, cr4: g.cr4, efer: g.efer, rflags: set.rflags | 2, ..*set }, g, "GET_REGS after SET_REGS");
                    }
                    None => {
                        assert_eq!((g.rip, g.rsp, g.rdi, g.cr3), (0, mem_bytes, mem_bytes, shared_abi::guest::PML4_GPA), "initial registers");
                    }
                }
            }
            hc::VM_RUN => {
                let rec: ExitRecord = read_host(m, arg + core::mem::offset_of!(VmRun, exit) as u64);
                assert_eq!(rec.kind, exit::INTR);
            }
            hc::VM_FORK => {
                let f: VmFork = from_bytes(pre).unwrap();
                let out: VmFork = read_host(m, arg);
                let child = s as u32;
                assert_eq!(out.child, child);
                assert!(!ids.contains(&child) && m.vms.contains_key(&child));
                let (p, c) = (&m.vms[&f.vm], &m.vms[&child]);
                assert_eq!((c.parent, c.mem_bytes, c.init.len()), (f.vm, p.mem_bytes, p.init.len()));
                // A fork's memory equals its parent's at fork time.
                let sh = self.shadow.get(&f.vm).cloned().unwrap_or_default();
                check_memory(&m.host.mem, &p.mem, &sh, "fork parent");
                check_memory(&m.host.mem, &c.mem, &sh, "fork child");
                let st = c.mem.stats(&m.host.mem, &m.pool);
                if f.flags & FORK_COPY != 0 {
                    assert_eq!(st.shared, 0, "a full copy shares no frame");
                } else {
                    assert_eq!((st.private, st.tables), (0, 1), "a fork shares every frame and all tables but its root");
                }
                self.shadow.insert(child, sh);
                let inherited: Vec<((u32, u32), Regs)> = self.given.iter().filter(|((v, _), _)| *v == f.vm).map(|((_, c), r)| ((child, *c), *r)).collect();
                self.given.extend(inherited);
            }
            hc::VM_LIST => {
                assert_eq!(s as usize, m.vms.len());
                let n = ((len / 88) as usize).min(m.vms.len());
                for (i, id) in m.vms.keys().take(n).enumerate() {
                    let rec: VmInfo = read_host(m, arg + 88 * i as u64);
                    let vm = &m.vms[id];
                    assert_eq!((rec.id, rec.parent, rec.vcpus, rec.mem_bytes), (*id, vm.parent, vm.init.len() as u32, vm.mem_bytes));
                }
                let private: u64 = m.vms.values().map(|v| m.info(v).frames_private).sum();
                assert!(private <= m.pool.frames_total() - m.pool.frames_free(), "private frames counted twice");
            }
            hc::DEBUG_TRANSLATE => {
                let t: DebugTranslate = read_host(m, arg);
                let vm = &m.vms[&t.vm];
                assert!(t.gpa < vm.mem_bytes);
                if t.hpa != 0 {
                    assert_eq!(t.hpa & (PAGE_SIZE - 1), t.gpa & (PAGE_SIZE - 1));
                    assert!(m.pool.refs(Hpa(t.hpa & !(PAGE_SIZE - 1))).unwrap_or(0) > 0, "DEBUG_TRANSLATE named a free frame");
                    let mut b = [0u8];
                    m.host.mem.read(Hpa(t.hpa), &mut b);
                    assert_eq!(b[0], shadow_byte(&self.shadow[&t.vm], t.gpa), "DEBUG_TRANSLATE named the wrong frame");
                }
            }
            _ => panic!("hypercall {nr:#x} succeeded, but it does not exist"),
        }
        if !matches!(nr, hc::VM_CREATE | hc::VM_FORK | hc::VM_DESTROY) {
            assert_eq!(ids, self.m.vms.keys().copied().collect::<Vec<_>>(), "hypercall {nr:#x} changed the VMs");
        }
    }

    /// Every invariant in full.
    fn check_all(&self) {
        check_pool(&self.m, &self.pool_pages);
        for (id, vm) in &self.m.vms {
            check_memory(&self.m.host.mem, &vm.mem, &self.shadow[id], "guest memory");
        }
    }

    /// A page of host memory the host still owns, for blocks.
    fn scratch(&self) -> Option<u64> {
        RAM.iter().flat_map(|r| (r.base..r.base + r.size).step_by(PAGE_SIZE as usize)).find(|&p| self.m.host.owned(p, PAGE_SIZE))
    }

    /// Destroys every VM and reclaims the pool: nothing may be left.
    fn finish(&mut self) {
        self.check_all();
        let ids: Vec<u32> = self.m.vms.keys().copied().collect();
        for id in ids {
            match self.scratch() {
                Some(p) => {
                    self.m.host.mem.write(Hpa(p), decode::as_bytes(&VmId { id, reserved0: 0 }));
                    assert_eq!(self.m.dispatch(hc::VM_DESTROY, p, 8), (0, 0), "VM_DESTROY of vm{id}");
                }
                // The host donated all it had: no block is left to call with.
                None => self.m.destroy(id).unwrap(),
            }
            self.shadow.remove(&id);
        }
        assert_eq!(self.m.pool.frames_free(), self.m.pool.frames_total(), "frames leaked after every VM was destroyed");
        check_pool(&self.m, &self.pool_pages);
        loop {
            let p = self.scratch().unwrap_or(RAM[0].base);
            let total = self.m.pool.frames_total();
            if self.scratch().is_none() {
                // Hand one frame back by hand, so that the host has a block.
                let f = self.m.pool.reclaim(1);
                self.m.host.taken.remove(&f[0].pfn());
                self.pool_pages.remove(&f[0].0);
                continue;
            }
            let (n, _) = self.m.dispatch(hc::RECLAIM, p, 4096);
            assert!(n >= 0, "RECLAIM failed: {n}");
            for i in 0..n as u64 {
                let f: u64 = read_host(&self.m, p + 8 * i);
                assert!(self.pool_pages.remove(&f), "RECLAIM returned {f:#x}, not a pool page");
                assert!(self.m.host.mem.page_is_zero(Hpa(f)) || f == p, "reclaimed page {f:#x} is not zero");
            }
            assert_eq!(self.m.pool.frames_total(), total - n as u64);
            if n == 0 {
                break;
            }
        }
        assert_eq!(self.m.pool.frames_total(), 0, "pool frames left after RECLAIM");
        assert!(self.pool_pages.is_empty() && self.m.host.taken.is_empty(), "donated pages not returned to the host");
    }
}

// ---------------------------------------------------------------------------
// ioctls, through a model of the driver.
// ---------------------------------------------------------------------------

/// User memory of the modelled process.
pub const USER_BASE: u64 = 0x7f00_0000_0000;
pub const USER_SIZE: usize = 128 << 10;
/// Where a script puts an ioctl's argument.
pub const USER_ARG: u64 = USER_BASE;
/// Kernel buffers for hypercall blocks, in host RAM the driver model never
/// donates (it donates from the second RAM range only).
const KBLOCK: u64 = 0x10_0000;
const KPAGE: u64 = 0x11_0000;
const KDONATE: u64 = 0x12_0000;
const KRECLAIM: u64 = 0x13_0000;
const KLARGE: u64 = 0x20_0000;
/// Descriptors the process may hold.
pub const MAX_FDS: usize = 16;
/// `EMFILE`: the process has no descriptor left.
const EMFILE: i64 = 24;

/// The ioctl commands a script picks from, by index; the last is a raw
/// command read from the script.
pub const IOCTLS: [u32; 12] = [
    ioctl::VERSION,
    ioctl::STATS,
    ioctl::CREATE_VM,
    ioctl::LIST,
    ioctl::DESTROY,
    ioctl::DEBUG_TRANSLATE,
    ioctl::VM_LOAD,
    ioctl::VM_GET_REGS,
    ioctl::VM_SET_REGS,
    ioctl::VM_RUN,
    ioctl::VM_FORK,
    ioctl::VM_ID,
];

/// The errno values (positive) `docs/ioctl.md` gives each command, beyond
/// those every ioctl may return (`ENOTTY`, `EFAULT`, `ENODEV`, `ENOMEM`).
pub fn ioctl_documented(cmd: u32) -> &'static [i64] {
    match cmd {
        ioctl::STATS => &[EINVAL],
        ioctl::CREATE_VM => &[EINVAL, ENOSPC, EMFILE],
        ioctl::DESTROY => &[ENOENT, EINVAL],
        ioctl::DEBUG_TRANSLATE => &[EPERM, ENOENT, EINVAL],
        ioctl::VM_LOAD => &[EINVAL, EBUSY, ENOENT, EOVERFLOW],
        ioctl::VM_GET_REGS | ioctl::VM_SET_REGS => &[ENOENT, EBUSY, EINVAL],
        ioctl::VM_RUN => &[EINVAL, EBUSY, EIO, EINTR],
        ioctl::VM_FORK => &[ENOENT, EINVAL, EBUSY, EAGAIN, ENOSPC, EOVERFLOW, EMFILE],
        _ => &[],
    }
}

/// One step of an ioctl script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoStep {
    /// ioctl `cmd` on descriptor `fd` (`None`: `/dev/uxen`, `Some(i)`: the
    /// `i`-th VM descriptor, modulo how many there are), its argument at
    /// `ptr` (`None`: [`USER_ARG`], holding `arg`).
    Ioctl { cmd: u32, fd: Option<u8>, ptr: Option<u64>, arg: Vec<u8> },
    /// The process writes its own memory at `USER_BASE + off`.
    Poke { off: u16, bytes: Vec<u8> },
    /// The process closes a VM descriptor.
    Close { fd: u8 },
}

/// An ioctl script: flags (as for hypercalls; bit 0 is the module's
/// `debug=1`), then steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoScript {
    pub flags: u8,
    pub steps: Vec<IoStep>,
}

impl IoScript {
    /// Reads a script. Tags: 0, 1: an ioctl (command index, descriptor,
    /// pointer mode, the argument's bytes, as many as the command's size);
    /// 2: a poke; 3: a close.
    pub fn decode(data: &[u8]) -> IoScript {
        let mut r = Reader::new(data);
        let flags = r.u8();
        let mut steps = Vec::new();
        while !r.done() && steps.len() < MAX_STEPS {
            let tag = r.u8() % 4;
            steps.push(match tag {
                2 => {
                    let off = r.u16();
                    let n = r.u16() as usize % (MAX_BLOCK + 1);
                    IoStep::Poke { off, bytes: r.bytes(n).to_vec() }
                }
                3 => IoStep::Close { fd: r.u8() },
                _ => {
                    let sel = r.u8();
                    let cmd = match IOCTLS.get(sel as usize % (IOCTLS.len() + 1)) {
                        Some(&c) => c,
                        None => r.u32(),
                    };
                    let fd = r.u8();
                    let fd = (fd != 0xff).then_some(fd);
                    let mode = r.u8();
                    let ptr = (mode & 1 != 0).then(|| r.u64());
                    let size = ((cmd >> 16) & 0x3fff) as usize;
                    let mut arg = r.bytes(size).to_vec();
                    arg.resize(size, 0);
                    IoStep::Ioctl { cmd, fd, ptr, arg }
                }
            });
        }
        IoScript { flags, steps }
    }

    /// The bytes [`IoScript::decode`] reads back as this script.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.flags);
        for s in &self.steps {
            match s {
                IoStep::Poke { off, bytes } => {
                    w.u8(2);
                    w.u16(*off);
                    w.u16(bytes.len().min(MAX_BLOCK) as u16);
                    w.bytes(&bytes[..bytes.len().min(MAX_BLOCK)]);
                }
                IoStep::Close { fd } => {
                    w.u8(3);
                    w.u8(*fd);
                }
                IoStep::Ioctl { cmd, fd, ptr, arg } => {
                    w.u8(0);
                    match IOCTLS.iter().position(|c| c == cmd) {
                        Some(i) => w.u8(i as u8),
                        None => {
                            w.u8(IOCTLS.len() as u8);
                            w.u32(*cmd);
                        }
                    }
                    w.u8(fd.unwrap_or(0xff));
                    match ptr {
                        Some(p) => {
                            w.u8(1);
                            w.u64(*p);
                        }
                        None => w.u8(0),
                    }
                    let size = ((cmd >> 16) & 0x3fff) as usize;
                    let mut a = arg.clone();
                    a.resize(size, 0);
                    w.bytes(&a);
                }
            }
        }
        w.out
    }
}

/// Runs an ioctl script from bytes. The `ioctl_args` fuzz target.
pub fn ioctls(data: &[u8]) -> Report {
    run_io_script(&IoScript::decode(data))
}

/// Runs an ioctl script.
pub fn run_io_script(s: &IoScript) -> Report {
    let mut d = Drv::new(s.flags);
    for step in s.steps.iter().take(MAX_STEPS) {
        match step {
            IoStep::Poke { off, bytes } => {
                let off = *off as usize;
                let n = bytes.len().min(USER_SIZE - off);
                d.user[off..off + n].copy_from_slice(&bytes[..n]);
            }
            IoStep::Close { fd } => d.close(*fd),
            IoStep::Ioctl { cmd, fd, ptr, arg } => {
                let ptr = match ptr {
                    Some(p) => *p,
                    None => {
                        d.user[..arg.len()].copy_from_slice(arg);
                        USER_ARG
                    }
                };
                d.ioctl(*cmd, *fd, ptr);
            }
        }
        d.check();
    }
    d.finish();
    d.report
}

type IoResult = Result<i64, i64>;

/// The driver's state, as `host-driver/` keeps it, over the model.
struct Drv {
    m: Model,
    debug: bool,
    user: Vec<u8>,
    /// VM descriptors: the VM id of each.
    fds: Vec<u32>,
    /// Host pages the driver may allocate and donate.
    free_pages: BTreeSet<u64>,
    /// Pages the driver donated and has not had back.
    donated: BTreeSet<u64>,
    /// A hypercall answered `EINVAL` although the driver validated its
    /// argument: the two boundaries disagree.
    hv_einval: bool,
    report: Report,
}

impl Drv {
    fn new(flags: u8) -> Self {
        let free_pages = (RAM[1].base..RAM[1].base + RAM[1].size).step_by(PAGE_SIZE as usize).collect();
        Drv {
            m: Model::new(limits(flags), flags & FLAG_DEBUG != 0),
            debug: flags & FLAG_DEBUG != 0,
            user: vec![0; USER_SIZE],
            fds: Vec::new(),
            free_pages,
            donated: BTreeSet::new(),
            hv_einval: false,
            report: Report::default(),
        }
    }

    fn read_user<T: Block>(&self, ptr: u64) -> Result<T, i64> {
        let size = core::mem::size_of::<T>() as u64;
        let off = ptr.checked_sub(USER_BASE).filter(|o| o.checked_add(size).map(|e| e <= USER_SIZE as u64).unwrap_or(false)).ok_or(EFAULT)?;
        Ok(from_bytes(&self.user[off as usize..]).unwrap())
    }

    fn write_user(&mut self, ptr: u64, bytes: &[u8]) -> Result<(), i64> {
        let off = ptr
            .checked_sub(USER_BASE)
            .filter(|o| o.checked_add(bytes.len() as u64).map(|e| e <= USER_SIZE as u64).unwrap_or(false))
            .ok_or(EFAULT)?;
        self.user[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// A hypercall on a kernel block holding `v`; `v` is read back.
    fn call<T: Block>(&mut self, nr: u64, v: &mut T) -> (i64, u64) {
        self.m.host.mem.write(Hpa(KBLOCK), decode::as_bytes(v));
        let r = self.m.dispatch(nr, KBLOCK, core::mem::size_of::<T>() as u64);
        let mut b = vec![0u8; core::mem::size_of::<T>()];
        self.m.host.mem.read(Hpa(KBLOCK), &mut b);
        *v = from_bytes(&b).unwrap();
        if r.0 == -EINVAL {
            self.hv_einval = true;
        }
        r
    }

    fn status(s: i64) -> IoResult {
        if s >= 0 {
            Ok(s)
        } else {
            Err(-s)
        }
    }

    /// `Hypervisor::call_donating`.
    fn call_donating<T: Block>(&mut self, nr: u64, v: &mut T) -> IoResult {
        for _ in 0..64 {
            let (s, aux) = self.call(nr, v);
            if s != HC_NEED_PAGES {
                return Self::status(s);
            }
            self.donate(aux)?;
        }
        Err(ENOMEM)
    }

    /// `Hypervisor::donate`: 2 MiB blocks where there are, pages otherwise.
    fn donate(&mut self, pages: u64) -> Result<(), i64> {
        let want = pages.clamp(512, 1 << 16);
        let mut ranges: Vec<MemRange> = Vec::new();
        let mut got = 0;
        while got < want && ranges.len() < 256 {
            let block = (RAM[1].base..RAM[1].base + RAM[1].size)
                .step_by(2 << 20)
                .find(|&b| (b..b + (2 << 20)).step_by(PAGE_SIZE as usize).all(|p| self.free_pages.contains(&p)));
            let r = match block {
                Some(b) => MemRange { base: b, size: 2 << 20 },
                None => match self.free_pages.first() {
                    Some(&p) => MemRange { base: p, size: PAGE_SIZE },
                    None => break,
                },
            };
            for p in (r.base..r.base + r.size).step_by(PAGE_SIZE as usize) {
                self.free_pages.remove(&p);
            }
            got += r.size / PAGE_SIZE;
            ranges.push(r);
        }
        if ranges.is_empty() {
            return Err(ENOMEM);
        }
        for (i, r) in ranges.iter().enumerate() {
            self.m.host.mem.write(Hpa(KDONATE + 16 * i as u64), decode::as_bytes(r));
        }
        let (s, _) = self.m.dispatch(hc::DONATE, KDONATE, 16 * ranges.len() as u64);
        assert!(s >= 0, "the hypervisor refused the driver's donation: {s}");
        for r in &ranges {
            self.donated.extend((r.base..r.base + r.size).step_by(PAGE_SIZE as usize));
        }
        Ok(())
    }

    /// `Hypervisor::reclaim_all`.
    fn reclaim_all(&mut self) {
        loop {
            let (n, _) = self.m.dispatch(hc::RECLAIM, KRECLAIM, 512 * 8);
            if n <= 0 {
                break;
            }
            for i in 0..n as u64 {
                let p: u64 = read_host(&self.m, KRECLAIM + 8 * i);
                assert!(self.donated.remove(&p), "RECLAIM returned {p:#x}, which the driver did not donate");
                self.free_pages.insert(p);
            }
        }
    }

    /// `Hypervisor::reclaim_if_idle`.
    fn reclaim_if_idle(&mut self) {
        let (n, _) = self.m.dispatch(hc::VM_LIST, KLARGE, 88);
        if n == 0 {
            self.reclaim_all();
        }
    }

    fn destroy_id(&mut self, id: u32) {
        let mut v = VmId { id, reserved0: 0 };
        let (s, _) = self.call(hc::VM_DESTROY, &mut v);
        assert!(s == 0 || s == -ENOENT, "destroying vm{id}: {s}");
        self.reclaim_if_idle();
    }

    /// Installs a descriptor for VM `id`; destroys it if none is left.
    fn vm_fd(&mut self, id: u32) -> Result<i64, i64> {
        if self.fds.len() >= MAX_FDS {
            self.destroy_id(id);
            return Err(EMFILE);
        }
        self.fds.push(id);
        Ok(self.fds.len() as i64 - 1)
    }

    fn close(&mut self, fd: u8) {
        if self.fds.is_empty() {
            return;
        }
        let id = self.fds.remove(fd as usize % self.fds.len());
        self.destroy_id(id);
    }

    fn ioctl(&mut self, cmd: u32, fd: Option<u8>, ptr: u64) {
        self.hv_einval = false;
        let vm = match fd {
            Some(i) if !self.fds.is_empty() => Some(self.fds[i as usize % self.fds.len()]),
            // A VM command on /dev/uxen when no VM descriptor is open.
            _ => None,
        };
        let (r, validated) = match vm {
            None => self.dev_ioctl(cmd, ptr),
            Some(id) => self.vm_ioctl(cmd, id, ptr),
        };
        let status = match r {
            Ok(v) => {
                assert!(v >= 0);
                v
            }
            Err(e) => {
                assert!(
                    [ENOTTY, EFAULT, ENODEV, ENOMEM].contains(&e) || ioctl_documented(cmd).contains(&e),
                    "ioctl {cmd:#x} failed with errno {e}, not documented for it"
                );
                -e
            }
        };
        assert!(!(validated && self.hv_einval), "ioctl {cmd:#x}: the driver accepted an argument the hypervisor refused with EINVAL");
        self.report.count(cmd as u64, status);
    }

    /// Commands of `/dev/uxen`; returns the result and whether the
    /// argument passed the driver's validation.
    fn dev_ioctl(&mut self, cmd: u32, ptr: u64) -> (IoResult, bool) {
        match cmd {
            ioctl::VERSION => {
                let mut v = HvVersion::default();
                let r = Self::status(self.call(hc::VERSION, &mut v).0).and_then(|_| {
                    let out = IocVersion { driver_abi: ABI_REVISION, image_abi: ABI_REVISION, hv_active: 1, num_cpus: v.num_cpus, hv_features: v.features, ..Default::default() };
                    self.write_user(ptr, decode::as_bytes(&out)).map(|_| 0)
                });
                (r, true)
            }
            ioctl::STATS => {
                let req: IocBuf = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                if validate::stats_buf(&req).is_err() {
                    return (Err(EINVAL), false);
                }
                let size = core::mem::size_of::<HvStats>();
                let r = Self::status(self.m.dispatch(hc::STATS, KLARGE, size as u64).0).and_then(|_| {
                    let mut b = vec![0u8; size];
                    self.m.host.mem.read(Hpa(KLARGE), &mut b);
                    self.write_user(req.ptr, &b).map(|_| size as i64)
                });
                (r, true)
            }
            ioctl::CREATE_VM => {
                let mut req: VmCreate = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                if validate::vm_create(&req).is_err() {
                    return (Err(EINVAL), false);
                }
                let r = self.call_donating(hc::VM_CREATE, &mut req).and_then(|id| {
                    let fd = self.vm_fd(id as u32)?;
                    assert!(self.m.vms.contains_key(&(id as u32)) && req.id == id as u32);
                    // The descriptor stays even if the copy-out fails.
                    self.write_user(ptr, decode::as_bytes(&req)).map(|_| fd)
                });
                (r, true)
            }
            ioctl::LIST => {
                let req: IocBuf = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                let n = validate::list_records(req.len);
                let (s, _) = self.m.dispatch(hc::VM_LIST, KLARGE, n * 88);
                let r = Self::status(s).and_then(|total| {
                    assert_eq!(total as usize, self.m.vms.len());
                    let k = n.min(total as u64) as usize * 88;
                    let mut b = vec![0u8; k];
                    self.m.host.mem.read(Hpa(KLARGE), &mut b);
                    self.write_user(req.ptr, &b).map(|_| total)
                });
                (r, true)
            }
            ioctl::DESTROY => {
                let mut v: VmId = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                if validate::vm_id(&v).is_err() {
                    return (Err(EINVAL), false);
                }
                let r = Self::status(self.call(hc::VM_DESTROY, &mut v).0).map(|_| 0);
                self.reclaim_if_idle();
                (r, true)
            }
            ioctl::DEBUG_TRANSLATE => {
                if !self.debug {
                    return (Err(EPERM), false);
                }
                let mut t: DebugTranslate = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                if validate::debug_translate(&t).is_err() {
                    return (Err(EINVAL), false);
                }
                let r = Self::status(self.call(hc::DEBUG_TRANSLATE, &mut t).0).and_then(|_| self.write_user(ptr, decode::as_bytes(&t)).map(|_| 0));
                (r, true)
            }
            _ => (Err(ENOTTY), false),
        }
    }

    /// Commands of a VM descriptor for VM `id`.
    fn vm_ioctl(&mut self, cmd: u32, id: u32, ptr: u64) -> (IoResult, bool) {
        match cmd {
            ioctl::VM_LOAD => {
                let req: IocLoad = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                if validate::ioc_load(&req).is_err() {
                    return (Err(EINVAL), false);
                }
                for c in validate::load_chunks(&req) {
                    let Some(off) = req.data.checked_add(c.offset).and_then(|a| a.checked_sub(USER_BASE)).filter(|o| o + c.len <= USER_SIZE as u64) else {
                        return (Err(EFAULT), true);
                    };
                    let bytes = self.user[off as usize..(off + c.len) as usize].to_vec();
                    self.m.host.mem.write(Hpa(KPAGE), &bytes);
                    let mut l = VmLoad { vm: id, reserved0: 0, gpa: c.gpa, src: KPAGE, len: c.len };
                    if let Err(e) = self.call_donating(hc::VM_LOAD, &mut l) {
                        return (Err(e), true);
                    }
                    let mut now = vec![0u8; c.len as usize];
                    self.m.vms[&id].mem.read(&self.m.host.mem, Gpa(c.gpa), &mut now).unwrap();
                    assert_eq!(now, bytes, "vm{id} does not read back what VM_LOAD wrote");
                }
                (Ok(0), true)
            }
            ioctl::VM_GET_REGS | ioctl::VM_SET_REGS => {
                let set = cmd == ioctl::VM_SET_REGS;
                let mut r: VmRegs = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                r.vm = id;
                if set && validate::regs(&r.regs).is_err() {
                    return (Err(EINVAL), false);
                }
                let res = Self::status(self.call(if set { hc::VM_SET_REGS } else { hc::VM_GET_REGS }, &mut r).0);
                let res = res.and_then(|_| if set { Ok(0) } else { self.write_user(ptr, decode::as_bytes(&r)).map(|_| 0) });
                (res, true)
            }
            ioctl::VM_RUN => {
                let mut req: VmRun = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                req.vm = id;
                if validate::vm_run(&req).is_err() {
                    return (Err(EINVAL), false);
                }
                // A vCPU index the VM lacks is EINVAL from the hypervisor;
                // the driver cannot know it.
                let checked = self.m.vms.get(&id).map(|v| (req.vcpu as usize) < v.init.len()).unwrap_or(false);
                loop {
                    let (s, aux) = self.call(hc::VM_RUN, &mut req);
                    if s == HC_NEED_PAGES {
                        if let Err(e) = self.donate(aux) {
                            return (Err(e), true);
                        }
                        continue;
                    }
                    if s == -ENOENT {
                        req.exit = ExitRecord { kind: exit::SHUTDOWN, reason: shared_abi::stop::DESTROYED, ..Default::default() };
                        break;
                    }
                    if let Err(e) = Self::status(s) {
                        return (Err(e), checked);
                    }
                    if req.exit.kind == exit::INTR {
                        // The modelled thread always has a signal pending.
                        return (Err(EINTR), true);
                    }
                    break;
                }
                (self.write_user(ptr, decode::as_bytes(&req)).map(|_| 0), true)
            }
            ioctl::VM_FORK => {
                let req: VmFork = match self.read_user(ptr) {
                    Ok(r) => r,
                    Err(e) => return (Err(e), false),
                };
                if validate::vm_fork(&req).is_err() {
                    return (Err(EINVAL), false);
                }
                let mut b = VmFork { vm: id, child: 0, flags: req.flags, reserved0: 0, tsc: 0 };
                let r = self.call_donating(hc::VM_FORK, &mut b).and_then(|child| {
                    let child = child as u32;
                    let fd = self.vm_fd(child)?;
                    let (p, c) = (&self.m.vms[&id], &self.m.vms[&child]);
                    let mut a = [0u8; PAGE_SIZE as usize];
                    let mut bb = [0u8; PAGE_SIZE as usize];
                    for page in pages_of(&self.m.host.mem, &p.mem, &Shadow::new()).union(&pages_of(&self.m.host.mem, &c.mem, &Shadow::new())) {
                        p.mem.read(&self.m.host.mem, Gpa(*page), &mut a).unwrap();
                        c.mem.read(&self.m.host.mem, Gpa(*page), &mut bb).unwrap();
                        assert!(a == bb, "vm{child}'s memory differs from its parent's at {page:#x} after FORK");
                    }
                    let out = VmFork { vm: id, child, flags: req.flags, reserved0: 0, tsc: b.tsc };
                    self.write_user(ptr, decode::as_bytes(&out)).map(|_| fd)
                });
                (r, true)
            }
            ioctl::VM_ID => (self.write_user(ptr, decode::as_bytes(&VmId { id, reserved0: 0 })).map(|_| 0), true),
            _ => (Err(ENOTTY), false),
        }
    }

    /// After every ioctl: the pool accounting, and the pages out of the
    /// host's reach are exactly those the driver donated and did not get
    /// back.
    fn check(&self) {
        check_accounting(&self.m);
        assert!(self.m.host.taken.iter().map(|p| p * PAGE_SIZE).eq(self.donated.iter().copied()), "the host's pages and the driver's donations differ");
        for id in &self.fds {
            // A descriptor's VM may be gone (DESTROY), never replaced.
            assert!(self.m.vms.get(id).map(|v| v.id == *id).unwrap_or(true));
        }
    }

    /// Closes every descriptor: every VM is destroyed, and the driver has
    /// every page back.
    fn finish(&mut self) {
        while !self.fds.is_empty() {
            self.close(0);
        }
        // VMs whose descriptor was never installed do not exist; any left
        // here has leaked.
        assert!(self.m.vms.is_empty(), "VMs left after every descriptor was closed: {:?}", self.m.vms.keys().collect::<Vec<_>>());
        self.reclaim_if_idle();
        assert_eq!(self.m.pool.frames_total(), 0, "pool frames left after every VM was destroyed");
        assert!(self.donated.is_empty() && self.m.host.taken.is_empty(), "donated pages not given back");
        assert_eq!(self.free_pages.len() as u64, RAM[1].size / PAGE_SIZE);
    }
}

// ---------------------------------------------------------------------------
// Guest memory operations.
// ---------------------------------------------------------------------------

/// One operation of a guest-memory script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemOp {
    /// `len` bytes of `byte` at page `page` (see [`mem_gpa`]) + `offset`.
    Write { vm: u8, page: u16, offset: u16, len: u16, byte: u8 },
    /// Fork (`copy`: full copy).
    Fork { vm: u8, copy: bool },
    Destroy { vm: u8 },
    /// Take write access from a page, as a merge's first step does.
    Protect { vm: u8, page: u16 },
    /// A whole re-merging pass over every VM.
    Merge,
    /// `pages` more pages into the pool.
    Donate { pages: u8 },
    /// Every invariant, in full.
    Check,
}

/// Pages of a guest-memory script spread over several tables at every
/// level of a 1 GiB guest.
pub fn mem_gpa(page: u16) -> u64 {
    let p = page as u64 % 512;
    (p % 8) * PAGE_SIZE + (p / 8) * (2 << 20) * 37 % (1 << 30)
}

/// Guest memory size of the guest-memory harness.
const MEM_SIZE: u64 = 1 << 30;
/// Base of the frames the guest-memory harness donates.
const MEM_POOL_BASE: u64 = 0x1_0000_0000;

/// A guest-memory script: the initial pool size, then operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemScript {
    pub frames: u16,
    pub ops: Vec<MemOp>,
}

impl MemScript {
    pub fn decode(data: &[u8]) -> MemScript {
        let mut r = Reader::new(data);
        let frames = r.u16();
        let mut ops = Vec::new();
        while !r.done() && ops.len() < MAX_STEPS {
            ops.push(match r.u8() % 8 {
                0 | 7 => MemOp::Write { vm: r.u8(), page: r.u16(), offset: r.u16(), len: r.u16(), byte: r.u8() },
                1 => {
                    let vm = r.u8();
                    MemOp::Fork { vm: vm >> 1, copy: vm & 1 != 0 }
                }
                2 => MemOp::Destroy { vm: r.u8() },
                3 => MemOp::Protect { vm: r.u8(), page: r.u16() },
                4 => MemOp::Merge,
                5 => MemOp::Donate { pages: r.u8() },
                _ => MemOp::Check,
            });
        }
        MemScript { frames, ops }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(self.frames);
        for o in &self.ops {
            match *o {
                MemOp::Write { vm, page, offset, len, byte } => {
                    w.u8(0);
                    w.u8(vm);
                    w.u16(page);
                    w.u16(offset);
                    w.u16(len);
                    w.u8(byte);
                }
                MemOp::Fork { vm, copy } => {
                    w.u8(1);
                    w.u8(vm << 1 | copy as u8);
                }
                MemOp::Destroy { vm } => {
                    w.u8(2);
                    w.u8(vm);
                }
                MemOp::Protect { vm, page } => {
                    w.u8(3);
                    w.u8(vm);
                    w.u16(page);
                }
                MemOp::Merge => w.u8(4),
                MemOp::Donate { pages } => {
                    w.u8(5);
                    w.u8(pages);
                }
                MemOp::Check => w.u8(6),
            }
        }
        w.out
    }
}

/// Runs a guest-memory script from bytes. The `guestmem_ops` fuzz target.
pub fn guestmem_ops(data: &[u8]) -> Report {
    run_mem_script(&MemScript::decode(data))
}

/// The pool's reference counts are what the guests' EPTs say; with `full`,
/// free frames are zero and guest memory matches the shadows.
fn check_guests(mem: &MockMem, pool: &FramePool, vms: &[(GuestMem, Shadow)], donated: u64, full: bool) {
    let roots: Vec<u64> = vms.iter().map(|(g, _)| g.ept.root.0).collect();
    check_refs(pool, &ept_refs(mem, pool, &roots, &[]));
    if full {
        for p in 0..donated {
            let f = Hpa(MEM_POOL_BASE + p * PAGE_SIZE);
            if pool.refs(f) == Some(0) {
                assert!(mem.page_is_zero(f), "free frame {f:?} is not scrubbed");
            }
        }
        for (g, sh) in vms {
            check_memory(mem, g, sh, "guest memory");
        }
    }
}

/// Runs a guest-memory script.
pub fn run_mem_script(s: &MemScript) -> Report {
    let mem = MockMem::new();
    let mut pool = FramePool::new();
    let mut donated = 1 + s.frames as u64 % 2048;
    pool.donate(Hpa(MEM_POOL_BASE), donated as usize).unwrap();
    let mut report = Report::default();
    let mut vms: Vec<(GuestMem, Shadow)> = Vec::new();
    if let Ok(g) = GuestMem::new(&mem, &mut pool, MEM_SIZE) {
        vms.push((g, Shadow::new()));
    }
    for op in s.ops.iter().take(MAX_STEPS) {
        let free = pool.frames_free();
        let pick = |vm: u8, n: usize| (n > 0).then(|| vm as usize % n);
        let r: Result<(), MemError> = match *op {
            MemOp::Write { vm, page, offset, len, byte } => match pick(vm, vms.len()) {
                Some(i) => {
                    let gpa = mem_gpa(page) + offset as u64 % PAGE_SIZE;
                    let data = vec![byte; len as usize % 5000];
                    let (g, sh) = &mut vms[i];
                    let r = g.write(&mem, &mut pool, Gpa(gpa), &data);
                    match r {
                        Ok(()) => shadow_write(sh, gpa, &data),
                        Err(MemError::NeedPages(_)) => {
                            // The first page may be written: every byte is
                            // the old or the new one.
                            let mut now = vec![0u8; data.len()];
                            g.read(&mem, Gpa(gpa), &mut now).unwrap();
                            for (k, &b) in now.iter().enumerate() {
                                assert!(b == byte || b == shadow_byte(sh, gpa + k as u64), "a failed write left garbage");
                            }
                            shadow_write(sh, gpa, &now);
                        }
                        Err(e) => panic!("write of {} bytes at {gpa:#x}: {e:?}", data.len()),
                    }
                    r
                }
                None => Ok(()),
            },
            MemOp::Fork { vm, copy } => match pick(vm, vms.len()) {
                Some(i) => {
                    let r = if copy { vms[i].0.copy(&mem, &mut pool) } else { vms[i].0.fork(&mem, &mut pool) };
                    match r {
                        Ok(c) => {
                            let sh = vms[i].1.clone();
                            check_memory(&mem, &c, &sh, "fork child");
                            vms.push((c, sh));
                            Ok(())
                        }
                        Err(e) => {
                            assert_eq!(pool.frames_free(), free, "a failed fork took frames");
                            Err(e)
                        }
                    }
                }
                None => Ok(()),
            },
            MemOp::Destroy { vm } => {
                if let Some(i) = pick(vm, vms.len()) {
                    vms.remove(i).0.destroy(&mem, &mut pool);
                }
                Ok(())
            }
            MemOp::Protect { vm, page } => match pick(vm, vms.len()) {
                Some(i) => vms[i].0.write_protect(&mem, &mut pool, Gpa(mem_gpa(page))).map(|_| ()),
                None => Ok(()),
            },
            MemOp::Merge => {
                let mut all: Vec<&mut GuestMem> = vms.iter_mut().map(|(g, _)| g).collect();
                let (st, freed) = crate::merge::merge_all(&mem, &mut pool, &mut all);
                assert!(st.merged + st.zero <= st.scanned);
                assert_eq!(pool.frames_free(), free + freed, "a merge pass freed other frames than it says");
                // Merging changes where pages live, never what they hold.
                for (g, sh) in &vms {
                    check_memory(&mem, g, sh, "guest memory after a merge");
                }
                Ok(())
            }
            MemOp::Donate { pages } => {
                pool.donate(Hpa(MEM_POOL_BASE + donated * PAGE_SIZE), pages as usize + 1).unwrap();
                donated += pages as u64 + 1;
                Ok(())
            }
            MemOp::Check => {
                check_guests(&mem, &pool, &vms, donated, true);
                Ok(())
            }
        };
        report.count(0, if r.is_ok() { 0 } else { -1 });
        if let Err(e) = r {
            assert!(matches!(e, MemError::NeedPages(n) if n > 0), "{op:?}: {e:?}");
        }
        check_guests(&mem, &pool, &vms, donated, false);
    }
    check_guests(&mem, &pool, &vms, donated, true);
    for (g, _) in vms.drain(..) {
        g.destroy(&mem, &mut pool);
    }
    assert_eq!(pool.frames_free(), pool.frames_total(), "frames leaked after every guest was destroyed");
    check_guests(&mem, &pool, &vms, donated, true);
    report
}

// ---------------------------------------------------------------------------
// The seed corpus: scripts built from valid requests (and a few invalid
// ones next to them), checked in under `fuzz/corpus/<target>/`.
// ---------------------------------------------------------------------------

pub mod seeds {
    //! Seed scripts. `cargo test` checks that the checked-in corpus holds
    //! them (`UXEN_BLESS_CORPUS=1` rewrites them) and that they reach the
    //! success paths they are built for.
    use super::*;

    /// Where seed scripts put their blocks: host RAM, below the region.
    pub const BLOCK: u64 = 0x10_0000;
    /// A host page seed scripts load guest data from.
    pub const DATA: u64 = 0x18_0000;
    /// The first 2 MiB of the second RAM range, which seeds donate.
    pub const POOL: u64 = 0x100_0000;

    /// A call with `v` as its block at `arg`.
    pub fn call<T: Block>(nr: u64, arg: u64, v: &T) -> Step {
        Step::Call { nr, arg, len: core::mem::size_of::<T>() as u64, block: decode::as_bytes(v).to_vec() }
    }

    fn donate(base: u64, size: u64) -> Step {
        call(hc::DONATE, BLOCK, &MemRange { base, size })
    }

    fn create(mem_bytes: u64, vcpus: u32) -> Step {
        call(hc::VM_CREATE, BLOCK, &VmCreate { mem_bytes, vcpus, name: shared_abi::padded(b"seed"), ..Default::default() })
    }

    fn load(vm: u32, gpa: u64, src: u64, len: u64) -> Step {
        call(hc::VM_LOAD, BLOCK, &VmLoad { vm, reserved0: 0, gpa, src, len })
    }

    fn fork(vm: u32, flags: u32) -> Step {
        call(hc::VM_FORK, BLOCK, &VmFork { vm, flags, ..Default::default() })
    }

    fn data(bytes: &[u8]) -> Step {
        Step::Poke { pa: DATA, bytes: bytes.to_vec() }
    }

    /// A VM's whole life: donate, create, load, registers, forks (shared
    /// and full copies), list, translate, run, stats, destroy, reclaim.
    pub fn lifecycle() -> Script {
        let text: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
        let regs = Regs { rip: 0x10_0000, rsp: 0x20_0000, rflags: 0x202 & !0x200, cr3: 0x2000, rax: 42, ..Default::default() };
        Script {
            flags: FLAG_DEBUG | FLAG_ROOMY,
            steps: vec![
                call(hc::VERSION, BLOCK, &HvVersion::default()),
                donate(POOL, 2 << 20),
                create(16 << 20, 2),
                data(&text),
                load(1, 0x10_0000, DATA, 4096),
                load(1, 0x1ff0, DATA + 0x100, 64),
                call(hc::VM_SET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 1, regs }),
                call(hc::VM_GET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 1, regs: Regs::default() }),
                call(hc::VM_GET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 0, regs: Regs::default() }),
                fork(1, 0),
                load(2, 0x10_0010, DATA + 0x800, 32),
                fork(2, FORK_COPY),
                fork(1, 0),
                Step::Check,
                Step::Call { nr: hc::VM_LIST, arg: BLOCK, len: 88 * 4, block: Vec::new() },
                call(hc::DEBUG_TRANSLATE, BLOCK, &DebugTranslate { vm: 2, reserved0: 0, gpa: 0x10_0010, hpa: 0 }),
                call(hc::DEBUG_TRANSLATE, BLOCK, &DebugTranslate { vm: 3, reserved0: 0, gpa: 0x50_0000, hpa: 0 }),
                call(hc::VM_RUN, BLOCK, &VmRun { vm: 2, vcpu: 1, ..Default::default() }),
                Step::Call { nr: hc::STATS, arg: 0x20_0000, len: core::mem::size_of::<HvStats>() as u64, block: Vec::new() },
                call(hc::VM_DESTROY, BLOCK, &VmId { id: 2, reserved0: 0 }),
                load(3, 0x10_0000, DATA, 16),
                call(hc::VM_DESTROY, BLOCK, &VmId { id: 1, reserved0: 0 }),
                Step::Check,
                Step::Call { nr: hc::RECLAIM, arg: BLOCK, len: 4096, block: Vec::new() },
            ],
        }
    }

    /// Every kind of refusal next to the valid call it spoils.
    pub fn refusals() -> Script {
        let short = |nr: u64| Step::Call { nr, arg: BLOCK, len: 4, block: vec![0; 4] };
        Script {
            flags: 0,
            steps: vec![
                Step::Call { nr: 0x99, arg: BLOCK, len: 8, block: Vec::new() },
                Step::Call { nr: u64::MAX, arg: 0, len: 0, block: Vec::new() },
                short(hc::VERSION),
                call(hc::VERSION, REGION_BLOCK, &HvVersion::default()),
                call(hc::VERSION, u64::MAX - 7, &HvVersion::default()),
                Step::Call { nr: hc::DONATE, arg: BLOCK, len: 15, block: Vec::new() },
                Step::Call { nr: hc::DONATE, arg: BLOCK, len: 16 * 257, block: Vec::new() },
                donate(POOL + 1, 4096),
                donate(POOL, 0),
                donate(POOL, 2 << 30),
                donate(0x40_0000, 4096),
                donate(0xffff_ffff_ffff_f000, 0x2000),
                Step::Call { nr: hc::DONATE, arg: BLOCK, len: 32, block: [decode::as_bytes(&MemRange { base: POOL, size: 8192 }), decode::as_bytes(&MemRange { base: POOL + 4096, size: 4096 })].concat() },
                donate(POOL, 1 << 20),
                donate(POOL, 4096),
                Step::Call { nr: hc::RECLAIM, arg: BLOCK, len: 7, block: Vec::new() },
                Step::Call { nr: hc::RECLAIM, arg: POOL, len: 8, block: Vec::new() },
                create(0, 1),
                create(3 << 20, 1),
                create(2 << 20, 9),
                call(hc::VM_CREATE, BLOCK, &VmCreate { mem_bytes: 2 << 20, vcpus: 1, flags: 2, ..Default::default() }),
                create(2 << 20, 1),
                call(hc::VM_DESTROY, BLOCK, &VmId { id: 9, reserved0: 0 }),
                call(hc::VM_DESTROY, BLOCK, &VmId { id: 1, reserved0: 1 }),
                load(1, 0, DATA + 1, 4096),
                load(1, 0, DATA, 0),
                load(1, 2 << 20, DATA, 1),
                load(1, u64::MAX, DATA, 2),
                load(1, 0, 0x40_0000, 8),
                load(7, 0, DATA, 8),
                call(hc::VM_SET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 0, regs: Regs { rflags: 1 << 15, ..Default::default() } }),
                call(hc::VM_SET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 0, regs: Regs { rip: 1 << 47, ..Default::default() } }),
                call(hc::VM_SET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 0, regs: Regs { cr3: 0x2001, ..Default::default() } }),
                call(hc::VM_GET_REGS, BLOCK, &VmRegs { vm: 1, vcpu: 1, regs: Regs::default() }),
                Step::Call { nr: hc::VM_RUN, arg: BLOCK, len: 135, block: Vec::new() },
                call(hc::VM_RUN, BLOCK, &VmRun { vm: 1, vcpu: 0, flags: 2, ..Default::default() }),
                call(hc::VM_RUN, BLOCK, &VmRun { vm: 1, vcpu: 5, ..Default::default() }),
                fork(1, 2),
                call(hc::VM_FORK, BLOCK, &VmFork { vm: 1, reserved0: 1, ..Default::default() }),
                fork(1, 0),
                fork(1, 0),
                fork(1, 0),
                Step::Call { nr: hc::VM_LIST, arg: 0x40_0000, len: 88, block: Vec::new() },
                Step::Call { nr: hc::VM_LIST, arg: 0, len: 87, block: Vec::new() },
                call(hc::DEBUG_TRANSLATE, BLOCK, &DebugTranslate { vm: 1, ..Default::default() }),
                Step::Call { nr: hc::STATS, arg: BLOCK, len: 64, block: Vec::new() },
                Step::Call { nr: hc::UNLOAD, arg: 0, len: 0, block: Vec::new() },
            ],
        }
    }

    /// Short of frames: every call that can answer HC_NEED_PAGES does, and
    /// then succeeds once the host has donated just enough, one page at a
    /// time (as a driver without 2 MiB blocks would). The counts are exact:
    /// a VM_CREATE needs 6 free frames and takes 2 (root and VMCS), a first
    /// touch needs 4 (three tables and the page).
    pub fn need_pages() -> Script {
        let mut next = 0;
        let mut pages = |n: u64| -> Vec<Step> {
            let v = (next..next + n).map(|i| donate(POOL + i * 4096, 4096)).collect();
            next += n;
            v
        };
        let mut steps = Vec::new();
        steps.extend(pages(1));
        steps.push(create(4 << 20, 1)); // needs 5 more
        steps.extend(pages(5));
        steps.push(create(4 << 20, 1)); // vm1; 4 free
        steps.push(data(&[0x5a; 4096]));
        steps.push(load(1, 0x1000, DATA, 4096)); // 0 free
        steps.push(load(1, 0x20_0ff0, DATA, 64)); // needs 4
        steps.extend(pages(9));
        // The copy (4 tables and a page) fits in 9 frames; the child's VMCS
        // then does not (6 needed, 4 left): the copy goes back and 2 more
        // pages are asked for.
        steps.push(fork(1, FORK_COPY));
        steps.extend(pages(2));
        steps.push(fork(1, FORK_COPY)); // vm2; 5 free
        steps.push(fork(1, 0)); // needs 9
        steps.extend(pages(4));
        steps.push(fork(1, 0)); // vm3
        steps.push(load(3, 0x1000, DATA, 8));
        steps.push(load(1, 0x20_0ff0, DATA, 64));
        steps.extend(pages(16));
        steps.push(load(1, 0x20_0ff0, DATA, 64));
        steps.push(Step::Check);
        Script { flags: FLAG_DEBUG | FLAG_ROOMY, steps }
    }

    /// The limits: VMs until ENOSPC, children until EAGAIN, destroy the
    /// parent first.
    pub fn limits() -> Script {
        let mut steps = vec![donate(POOL, 2 << 20)];
        steps.extend((0..3).map(|_| create(2 << 20, 1)));
        steps.extend((0..3).map(|_| fork(1, 0)));
        steps.push(call(hc::VM_DESTROY, BLOCK, &VmId { id: 1, reserved0: 0 }));
        steps.push(fork(4, 0));
        steps.push(fork(2, 0));
        steps.push(Step::Check);
        // 4 VMs at most, 1 child each.
        Script { flags: 2 << 1, steps }
    }

    /// The machine failing under the dispatcher: a DONATE without a
    /// shootdown, then one the IOMMU does not follow, then one the heap
    /// cannot split a page for, all refused and undone; the same pages
    /// given once it recovers; a RECLAIM the IOMMU does not follow (the
    /// host gets the pages anyway).
    pub fn faults() -> Script {
        Script {
            flags: FLAG_ROOMY,
            steps: vec![
                Step::Faults(1),
                donate(POOL, 2 << 20),
                Step::Faults(2),
                donate(POOL, 2 << 20),
                donate(POOL + (2 << 20), 4096),
                Step::Faults(4),
                Step::Call {
                    nr: hc::DONATE,
                    arg: BLOCK,
                    len: 32,
                    block: [decode::as_bytes(&MemRange { base: POOL, size: 4096 }), decode::as_bytes(&MemRange { base: POOL + 8192, size: 4096 })].concat(),
                },
                Step::Faults(0),
                donate(POOL, 2 << 20),
                create(2 << 20, 1),
                Step::Faults(3),
                Step::Call { nr: hc::RECLAIM, arg: BLOCK, len: 64, block: Vec::new() },
                Step::Check,
            ],
        }
    }

    /// A block inside the hypervisor region.
    const REGION_BLOCK: u64 = 0x40_0000;

    /// An ioctl on `/dev/uxen` (or a VM descriptor), argument at USER_ARG.
    pub fn io<T: Block>(cmd: u32, fd: Option<u8>, v: &T) -> IoStep {
        IoStep::Ioctl { cmd, fd, ptr: None, arg: decode::as_bytes(v).to_vec() }
    }

    /// The driver's view of a VM's life, with user buffers.
    pub fn io_lifecycle() -> IoScript {
        let buf = USER_BASE + 0x1000;
        let text: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
        IoScript {
            flags: FLAG_DEBUG | FLAG_ROOMY,
            steps: vec![
                io(ioctl::VERSION, None, &IocVersion::default()),
                io(ioctl::CREATE_VM, None, &VmCreate { mem_bytes: 8 << 20, vcpus: 1, name: shared_abi::padded(b"io"), ..Default::default() }),
                IoStep::Poke { off: 0x1000, bytes: text.clone() },
                io(ioctl::VM_LOAD, Some(0), &IocLoad { gpa: 0x10_0000, data: buf, len: text.len() as u64 }),
                io(ioctl::VM_SET_REGS, Some(0), &VmRegs { vm: 0, vcpu: 0, regs: Regs { rip: 0x10_0000, cr3: 0x2000, ..Default::default() } }),
                io(ioctl::VM_GET_REGS, Some(0), &VmRegs::default()),
                io(ioctl::VM_FORK, Some(0), &VmFork::default()),
                io(ioctl::VM_FORK, Some(1), &VmFork { flags: FORK_COPY, ..Default::default() }),
                io(ioctl::VM_ID, Some(2), &VmId::default()),
                io(ioctl::LIST, None, &IocBuf { ptr: buf, len: 88 * 8 }),
                io(ioctl::STATS, None, &IocBuf { ptr: buf, len: core::mem::size_of::<HvStats>() as u64 }),
                io(ioctl::DEBUG_TRANSLATE, None, &DebugTranslate { vm: 2, gpa: 0x10_0000, ..Default::default() }),
                io(ioctl::VM_RUN, Some(1), &VmRun { vcpu: 0, flags: shared_abi::VMRUN_NO_WAIT, ..Default::default() }),
                io(ioctl::DESTROY, None, &VmId { id: 1, reserved0: 0 }),
                io(ioctl::VM_RUN, Some(0), &VmRun::default()),
                IoStep::Close { fd: 0 },
                IoStep::Close { fd: 0 },
                io(ioctl::CREATE_VM, None, &VmCreate { mem_bytes: 2 << 20, vcpus: 8, ..Default::default() }),
            ],
        }
    }

    /// The driver's refusals: bad sizes, flags, reserved fields, pointers,
    /// commands on the wrong descriptor, unknown commands.
    pub fn io_refusals() -> IoScript {
        IoScript {
            flags: 0,
            steps: vec![
                io(ioctl::CREATE_VM, None, &VmCreate { mem_bytes: 1 << 20, vcpus: 1, ..Default::default() }),
                io(ioctl::CREATE_VM, None, &VmCreate { mem_bytes: 2 << 20, vcpus: 1, tsc_khz: 5, flags: 8, ..Default::default() }),
                IoStep::Ioctl { cmd: ioctl::CREATE_VM, fd: None, ptr: Some(8), arg: Vec::new() },
                io(ioctl::CREATE_VM, None, &VmCreate { mem_bytes: 2 << 20, vcpus: 1, ..Default::default() }),
                io(ioctl::VM_LOAD, Some(0), &IocLoad { gpa: 0, data: USER_BASE, len: 0 }),
                io(ioctl::VM_LOAD, Some(0), &IocLoad { gpa: u64::MAX, data: USER_BASE, len: 2 }),
                io(ioctl::VM_LOAD, Some(0), &IocLoad { gpa: 0, data: USER_BASE, len: 1 << 20 }),
                io(ioctl::VM_LOAD, Some(0), &IocLoad { gpa: 4 << 20, data: USER_BASE, len: 16 }),
                io(ioctl::VM_SET_REGS, Some(0), &VmRegs { vm: 0, vcpu: 0, regs: Regs { rflags: 1 << 17, ..Default::default() } }),
                io(ioctl::VM_SET_REGS, Some(0), &VmRegs { vm: 0, vcpu: 3, regs: Regs::default() }),
                io(ioctl::VM_RUN, Some(0), &VmRun { flags: 4, ..Default::default() }),
                io(ioctl::VM_RUN, Some(0), &VmRun { reserved0: 4, ..Default::default() }),
                io(ioctl::VM_FORK, Some(0), &VmFork { flags: 8, ..Default::default() }),
                io(ioctl::VM_FORK, Some(0), &VmFork { reserved0: 8, ..Default::default() }),
                io(ioctl::DESTROY, None, &VmId { id: 1, reserved0: 1 }),
                io(ioctl::DESTROY, None, &VmId { id: 77, reserved0: 0 }),
                io(ioctl::DEBUG_TRANSLATE, None, &DebugTranslate::default()),
                io(ioctl::STATS, None, &IocBuf { ptr: USER_BASE, len: 100 }),
                io(ioctl::LIST, None, &IocBuf { ptr: 16, len: 88 }),
                io(ioctl::VM_LOAD, None, &IocLoad::default()),
                io(ioctl::CREATE_VM, Some(0), &VmCreate::default()),
                IoStep::Ioctl { cmd: 0xdead_beef, fd: None, ptr: None, arg: Vec::new() },
                IoStep::Close { fd: 3 },
            ],
        }
    }

    /// Guest memory: writes across pages, forks, copies, write protection
    /// and merges on a pool that runs short.
    pub fn mem_mixed() -> MemScript {
        let w = |vm, page, offset, len, byte| MemOp::Write { vm, page, offset, len, byte };
        MemScript {
            frames: 40,
            ops: vec![
                w(0, 0, 0, 4096, 7),
                w(0, 1, 4000, 200, 7),
                w(0, 9, 0, 4096, 7),
                w(0, 64, 0, 0, 0),
                MemOp::Fork { vm: 0, copy: false },
                w(1, 0, 10, 10, 1),
                MemOp::Fork { vm: 1, copy: true },
                MemOp::Protect { vm: 0, page: 9 },
                w(2, 0, 10, 10, 7),
                MemOp::Merge,
                MemOp::Check,
                w(2, 200, 0, 4096, 0),
                MemOp::Donate { pages: 64 },
                w(2, 300, 100, 4999, 3),
                MemOp::Destroy { vm: 0 },
                MemOp::Merge,
                MemOp::Check,
            ],
        }
    }

    /// Every seed: (fuzz target, file name, bytes).
    pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        vec![
            ("hypercall", "seed-lifecycle", lifecycle().encode()),
            ("hypercall", "seed-refusals", refusals().encode()),
            ("hypercall", "seed-need-pages", need_pages().encode()),
            ("hypercall", "seed-limits", limits().encode()),
            ("hypercall", "seed-faults", faults().encode()),
            ("ioctl_args", "seed-lifecycle", io_lifecycle().encode()),
            ("ioctl_args", "seed-refusals", io_refusals().encode()),
            ("guestmem_ops", "seed-mixed", mem_mixed().encode()),
        ]
    }
}
