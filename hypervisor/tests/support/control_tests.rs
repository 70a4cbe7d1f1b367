//! Tests of the control layer: the decoders and VM operations on their
//! own, the seed corpus and its replay, and short proptest runs of the fuzz
//! harnesses.

use super::fuzz::{self, seeds, IoScript, MemScript, Script, Step};
use shared_abi::errno::*;
use shared_abi::hc;
use std::path::PathBuf;

/// `fuzz/corpus/<target>/` in the repository.
fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

/// The checked-in corpus holds every seed, byte for byte. With
/// `UXEN_BLESS_CORPUS=1` the seeds are written instead.
#[test]
fn seed_corpus_is_checked_in() {
    let bless = std::env::var_os("UXEN_BLESS_CORPUS").is_some();
    for (target, name, bytes) in seeds::all() {
        let path = corpus_dir(target).join(name);
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (UXEN_BLESS_CORPUS=1 writes it)", path.display()));
        assert!(on_disk == bytes, "{} differs from its seed (UXEN_BLESS_CORPUS=1 rewrites it)", path.display());
    }
}

/// Every file of the corpus runs clean: the seeds, and every input the
/// fuzzer once failed on (`regress-*`), kept as regression tests.
#[test]
fn corpus_replays() {
    let mut files = 0;
    for (target, run) in [
        ("hypercall", fuzz::hypercalls as fn(&[u8]) -> fuzz::Report),
        ("ioctl_args", fuzz::ioctls),
        ("guestmem_ops", fuzz::guestmem_ops),
    ] {
        let dir = corpus_dir(target);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{} fails its target", p.display());
            files += 1;
        }
    }
    assert!(files >= seeds::all().len());
}

#[test]
fn scripts_round_trip() {
    for (target, _, bytes) in seeds::all() {
        match target {
            "hypercall" => assert_eq!(Script::decode(&bytes).encode(), bytes),
            "ioctl_args" => assert_eq!(IoScript::decode(&bytes).encode(), bytes),
            _ => assert_eq!(MemScript::decode(&bytes).encode(), bytes),
        }
    }
}

/// The seeds reach what they are built for, so that the fuzzer starts
/// deep.
#[test]
fn seeds_reach_their_paths() {
    let r = fuzz::run_script(&seeds::lifecycle());
    for nr in [
        hc::VERSION,
        hc::STATS,
        hc::DONATE,
        hc::RECLAIM,
        hc::VM_CREATE,
        hc::VM_DESTROY,
        hc::VM_LOAD,
        hc::VM_GET_REGS,
        hc::VM_SET_REGS,
        hc::VM_RUN,
        hc::VM_FORK,
        hc::VM_LIST,
        hc::DEBUG_TRANSLATE,
    ] {
        assert!(r.ok(nr) > 0, "the lifecycle seed never succeeds at hypercall {nr:#x}: {r:?}");
    }
    assert_eq!(r.ok(hc::VM_FORK), 3);
    assert!(r.errors.is_empty(), "{r:?}");

    let r = fuzz::run_script(&seeds::need_pages());
    assert_eq!(r.errors.get(&4096), Some(&5), "HC_NEED_PAGES answers: {r:?}");
    assert_eq!((r.ok(hc::VM_CREATE), r.ok(hc::VM_FORK)), (1, 2), "{r:?}");

    let r = fuzz::run_script(&seeds::limits());
    assert_eq!((r.errors.get(&ENOSPC), r.errors.get(&EAGAIN)), (Some(&1), Some(&2)), "{r:?}");

    let r = fuzz::run_script(&seeds::faults());
    assert_eq!((r.errors.get(&EBUSY), r.errors.get(&EIO), r.errors.get(&ENOMEM)), (Some(&1), Some(&2), Some(&1)), "{r:?}");
    assert_eq!((r.ok(hc::DONATE), r.ok(hc::VM_CREATE), r.ok(hc::RECLAIM)), (1, 1, 1), "{r:?}");

    let r = fuzz::run_script(&seeds::refusals());
    for e in [EINVAL, EFAULT, ENOENT, ENOSYS, EAGAIN, EBUSY] {
        assert!(r.errors.contains_key(&e), "the refusals seed never gets errno {e}: {r:?}");
    }

    let r = fuzz::run_io_script(&seeds::io_lifecycle());
    assert!(r.errors.keys().all(|&e| e == EINTR || e == EINVAL), "{r:?}");
    assert!(r.ok(shared_abi::ioctl::VM_FORK as u64) == 2 && r.ok(shared_abi::ioctl::VM_LOAD as u64) == 1, "{r:?}");
    let r = fuzz::run_io_script(&seeds::io_refusals());
    assert!(r.errors[&EINVAL] >= 10 && r.errors.contains_key(&ENOTTY) && r.errors.contains_key(&EFAULT), "{r:?}");
}

#[test]
fn unknown_numbers_are_enosys() {
    let s = Script { flags: 0, steps: vec![Step::Call { nr: hc::MERGE + 1, arg: seeds::BLOCK, len: 8, block: Vec::new() }] };
    let r = fuzz::run_script(&s);
    assert_eq!(r.errors.get(&ENOSYS), Some(&1));
}

mod prop {
    //! The fuzz harnesses under proptest: the short budget `cargo test`
    //! runs on every commit. Scripts are generated structured (known
    //! numbers, plausible addresses and fields, so most calls get deep)
    //! and as mutations of the seeds (so that anything else can happen).
    //! `UXEN_FUZZ_CASES` sets the number of cases per harness (`cargo
    //! xtask fuzz` raises it when cargo-fuzz is missing). A failing case,
    //! once shrunk, is written to `target/uxen/fuzz/proptest/` in the
    //! corpus format: add it to `fuzz/corpus/<target>/` as `regress-*`
    //! once fixed.
    use super::super::fuzz::{self, seeds, IoScript, IoStep, MemOp, MemScript, Script, Step, USER_BASE};
    use proptest::prelude::*;
    use shared_abi::*;

    /// `UXEN_FUZZ_CASES` scales every harness's default (96 cases): 960
    /// gives ten times as many everywhere.
    fn cases(default: u32) -> u32 {
        let scale: Option<u64> = std::env::var("UXEN_FUZZ_CASES").ok().and_then(|v| v.parse().ok());
        scale.map(|n| (n * default as u64 / 96).max(1) as u32).unwrap_or(default)
    }

    fn config(default: u32) -> ProptestConfig {
        ProptestConfig { cases: cases(default), failure_persistence: None, max_shrink_iters: 4096, ..ProptestConfig::default() }
    }

    /// Runs `run` on `bytes`; if it panics, keeps the bytes for the corpus.
    fn keep_failure(target: &str, bytes: &[u8], run: fn(&[u8]) -> fuzz::Report) {
        if let Err(e) = std::panic::catch_unwind(|| run(bytes)) {
            let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/uxen/fuzz/proptest");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("{target}-failure")), bytes);
            std::panic::resume_unwind(e);
        }
    }

    const RAM1: u64 = 0x100_0000;

    fn vm_id() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 1..6u32, 1 => Just(0), 1 => any::<u32>()]
    }

    fn zero_mostly<T: Arbitrary + Default + Clone + 'static>() -> impl Strategy<Value = T> {
        prop_oneof![9 => Just(T::default()), 1 => any::<T>()]
    }

    fn gpa() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => (0..1024u64).prop_map(|p| p * 4096),
            3 => 0..(2u64 << 20),
            1 => 0..(16u64 << 20),
            1 => (0..64u64).prop_map(|i| (2 << 20) - 32 + i),
            1 => any::<u64>(),
        ]
    }

    fn block_addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            24 => Just(seeds::BLOCK),
            2 => (1..512u64).prop_map(|i| seeds::BLOCK + i * 8),
            1 => Just(0x40_0000),
            1 => Just(0x80_0000 - 8),
            1 => (0..4096u64).prop_map(|p| RAM1 + p * 4096),
            1 => Just(0),
            1 => any::<u64>(),
        ]
    }

    /// A LOAD source: mostly within one page of the data area.
    fn load_src() -> impl Strategy<Value = (u64, u64)> {
        prop_oneof![
            8 => (1..=4096u64).prop_flat_map(|len| (0..=4096 - len, Just(len))).prop_map(|(off, len)| (seeds::DATA + off, len)),
            1 => (0..4096u64, 0..4200u64).prop_map(|(off, len)| (seeds::DATA + off, len)),
            1 => (any::<u64>(), 0..4200u64),
        ]
    }

    fn regs() -> impl Strategy<Value = Regs> {
        (any::<[u64; 16]>(), prop_oneof![Just(2u64), Just(0x202), any::<u64>()], prop_oneof![Just(0x10_0000u64), any::<u64>()], prop_oneof![Just(0x2000u64), any::<u64>()])
            .prop_map(|(g, rflags, rip, cr3)| Regs {
                rax: g[0],
                rbx: g[1],
                rcx: g[2],
                rdx: g[3],
                rsi: g[4],
                rdi: g[5],
                rbp: g[6],
                rsp: g[7],
                r8: g[8],
                r15: g[9],
                rip,
                rflags,
                cr3,
                cr0: g[10],
                cr4: g[11],
                efer: g[12],
                ..Default::default()
            })
    }

    fn bytes<T: fuzz_block::B>(v: T) -> Vec<u8> {
        v.bytes()
    }

    mod fuzz_block {
        use super::super::super::decode::{as_bytes, Block};
        pub trait B {
            fn bytes(&self) -> Vec<u8>;
        }
        impl<T: Block> B for T {
            fn bytes(&self) -> Vec<u8> {
                as_bytes(self).to_vec()
            }
        }
    }

    /// A hypercall with a block that mostly makes sense for its number.
    fn call() -> impl Strategy<Value = Step> {
        let block = prop_oneof![
            // Mostly a few pages at a time, so that the pool runs short and
            // the HC_NEED_PAGES paths are taken.
            4 => proptest::collection::vec((0..4096u64, prop_oneof![4 => 1..4u64, 2 => 4..16u64, 1 => Just(512u64), 1 => 0..600u64], zero_mostly::<u64>()), 1..3)
                .prop_map(|v| (hc::DONATE, v.into_iter().flat_map(|(p, n, junk)| bytes(MemRange { base: RAM1 + p * 4096 + (junk & 0xfff), size: n * 4096 })).collect::<Vec<u8>>())),
            1 => Just((hc::RECLAIM, Vec::new())),
            4 => (
                prop_oneof![8 => prop_oneof![Just(2u64 << 20), Just(4 << 20), Just(16 << 20), Just(VM_MAX_MEM)], 1 => prop_oneof![Just(0u64), Just(3 << 20), Just(VM_MAX_MEM * 2)], 1 => any::<u64>()],
                prop_oneof![8 => 1..4u32, 1 => 0..10u32, 1 => any::<u32>()],
                zero_mostly::<u32>(),
                zero_mostly::<u32>(),
                any::<[u8; 32]>(),
            )
                .prop_map(|(mem_bytes, vcpus, flags, reserved0, name)| (hc::VM_CREATE, bytes(VmCreate { mem_bytes, vcpus, flags, name, id: 0, tsc_khz: reserved0 }))),
            2 => (vm_id(), zero_mostly::<u32>()).prop_map(|(id, reserved0)| (hc::VM_DESTROY, bytes(VmId { id, reserved0 }))),
            6 => (vm_id(), gpa(), load_src(), zero_mostly::<u32>())
                .prop_map(|(vm, gpa, (src, len), reserved0)| (hc::VM_LOAD, bytes(VmLoad { vm, reserved0, gpa, src, len }))),
            2 => (vm_id(), 0..9u32, regs(), any::<bool>()).prop_map(|(vm, vcpu, regs, set)| (if set { hc::VM_SET_REGS } else { hc::VM_GET_REGS }, bytes(VmRegs { vm, vcpu, regs }))),
            1 => (vm_id(), 0..9u32, 0..3u32, zero_mostly::<u32>()).prop_map(|(vm, vcpu, flags, reserved0)| (hc::VM_RUN, bytes(VmRun { vm, vcpu, flags, reserved0, ..Default::default() }))),
            4 => (vm_id(), 0..3u32, zero_mostly::<u32>()).prop_map(|(vm, flags, reserved0)| (hc::VM_FORK, bytes(VmFork { vm, flags, reserved0, ..Default::default() }))),
            1 => Just((hc::VM_LIST, Vec::new())),
            2 => (vm_id(), gpa(), zero_mostly::<u32>()).prop_map(|(vm, gpa, reserved0)| (hc::DEBUG_TRANSLATE, bytes(DebugTranslate { vm, reserved0, gpa, hpa: 0 }))),
            1 => prop_oneof![Just(hc::VERSION), Just(hc::STATS), Just(hc::UNLOAD), Just(hc::MERGE), any::<u64>()].prop_map(|nr| (nr, Vec::new())),
        ];
        (block, block_addr(), prop_oneof![16 => Just(None), 1 => (0..200u64).prop_map(Some), 1 => any::<u64>().prop_map(Some)]).prop_map(|((nr, block), arg, len)| {
            let len = match (nr, len) {
                (_, Some(l)) => l,
                (hc::RECLAIM, None) => 4096,
                (hc::VM_LIST, None) => 88 * 8,
                (hc::STATS, None) => core::mem::size_of::<HvStats>() as u64,
                (hc::VERSION, None) => 32,
                (_, None) => block.len() as u64,
            };
            Step::Call { nr, arg, len, block }
        })
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            12 => call(),
            1 => (0..4096u64, proptest::collection::vec(any::<u8>(), 1..64)).prop_map(|(o, bytes)| Step::Poke { pa: seeds::DATA + o, bytes }),
            1 => Just(Step::Check),
            1 => (0..8u8).prop_map(Step::Faults),
        ]
    }

    /// A script that starts with a few pages donated and a VM or two, then
    /// goes anywhere.
    fn script() -> impl Strategy<Value = Script> {
        (any::<u8>(), 1..48u64, 0..3usize, proptest::collection::vec(step(), 1..48)).prop_map(|(flags, pages, vms, rest)| {
            let mut steps = vec![seeds::call(hc::DONATE, seeds::BLOCK, &MemRange { base: seeds::POOL + (1 << 20), size: pages * 4096 })];
            for _ in 0..vms {
                steps.push(seeds::call(hc::VM_CREATE, seeds::BLOCK, &VmCreate { mem_bytes: 4 << 20, vcpus: 1, ..Default::default() }));
            }
            steps.extend(rest);
            Script { flags, steps }
        })
    }

    /// A seed, mutated: bytes overwritten, inserted, removed, or another
    /// seed's tail spliced in.
    fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
        let pool: Vec<Vec<u8>> = seeds::all().into_iter().filter(|s| s.0 == target).map(|s| s.2).collect();
        let n = pool.len();
        (0..n, 0..n, proptest::collection::vec((0..3u8, any::<prop::sample::Index>(), any::<u64>(), 1..16usize), 1..8)).prop_map(move |(a, b, muts)| {
            let mut d = pool[a].clone();
            for (kind, at, v, len) in muts {
                if d.is_empty() {
                    break;
                }
                let i = at.index(d.len());
                match kind {
                    0 => {
                        for (k, byte) in v.to_le_bytes().iter().take(len).enumerate() {
                            if i + k < d.len() {
                                d[i + k] = *byte;
                            }
                        }
                    }
                    1 => {
                        let end = (i + len).min(d.len());
                        d.drain(i..end);
                    }
                    _ => {
                        let other = &pool[b];
                        let j = at.index(other.len());
                        d.truncate(i);
                        d.extend_from_slice(&other[j..]);
                    }
                }
            }
            d
        })
    }

    fn io_step() -> impl Strategy<Value = IoStep> {
        let arg = prop_oneof![
            3 => (prop_oneof![Just(2u64 << 20), Just(8 << 20), Just(0), Just(1 << 20), any::<u64>()], 0..10u32, zero_mostly::<u32>(), zero_mostly::<u32>())
                .prop_map(|(mem_bytes, vcpus, flags, reserved0)| (ioctl::CREATE_VM, bytes(VmCreate { mem_bytes, vcpus, flags, tsc_khz: reserved0, ..Default::default() }))),
            3 => (gpa(), prop_oneof![Just(USER_BASE), any::<u64>()], prop_oneof![1..9000u64, any::<u64>()])
                .prop_map(|(gpa, data, len)| (ioctl::VM_LOAD, bytes(IocLoad { gpa, data, len }))),
            2 => (0..3u32, zero_mostly::<u32>()).prop_map(|(flags, reserved0)| (ioctl::VM_FORK, bytes(VmFork { flags, reserved0, ..Default::default() }))),
            1 => (0..9u32, regs(), any::<bool>()).prop_map(|(vcpu, regs, set)| (if set { ioctl::VM_SET_REGS } else { ioctl::VM_GET_REGS }, bytes(VmRegs { vm: 0, vcpu, regs }))),
            1 => (0..3u32, 0..9u32, zero_mostly::<u32>()).prop_map(|(flags, vcpu, reserved0)| (ioctl::VM_RUN, bytes(VmRun { vcpu, flags, reserved0, ..Default::default() }))),
            1 => (vm_id(), zero_mostly::<u32>()).prop_map(|(id, reserved0)| (ioctl::DESTROY, bytes(VmId { id, reserved0 }))),
            1 => (prop_oneof![Just(USER_BASE + 0x1000), any::<u64>()], prop_oneof![0..2000u64, any::<u64>()]).prop_map(|(ptr, len)| (ioctl::LIST, bytes(IocBuf { ptr, len }))),
            1 => (prop_oneof![Just(USER_BASE + 0x1000), any::<u64>()], prop_oneof![Just(core::mem::size_of::<HvStats>() as u64), any::<u64>()]).prop_map(|(ptr, len)| (ioctl::STATS, bytes(IocBuf { ptr, len }))),
            1 => (vm_id(), gpa(), zero_mostly::<u32>()).prop_map(|(vm, gpa, reserved0)| (ioctl::DEBUG_TRANSLATE, bytes(DebugTranslate { vm, gpa, reserved0, hpa: 0 }))),
            1 => prop_oneof![Just(ioctl::VERSION), Just(ioctl::VM_ID), any::<u32>()].prop_map(|c| (c, Vec::new())),
        ];
        prop_oneof![
            10 => (arg, prop_oneof![3 => Just(None), 6 => (0..4u8).prop_map(Some)], prop_oneof![9 => Just(None), 1 => any::<u64>().prop_map(Some)])
                .prop_map(|((cmd, arg), fd, ptr)| IoStep::Ioctl { cmd, fd, ptr, arg }),
            1 => (0..60000u16, proptest::collection::vec(any::<u8>(), 1..300)).prop_map(|(off, bytes)| IoStep::Poke { off, bytes }),
            1 => any::<u8>().prop_map(|fd| IoStep::Close { fd }),
        ]
    }

    fn mem_op() -> impl Strategy<Value = MemOp> {
        prop_oneof![
            8 => (0..6u8, 0..48u16, 0..4096u16, prop_oneof![1..64u16, 4000..4999u16], any::<u8>()).prop_map(|(vm, page, offset, len, byte)| MemOp::Write { vm, page, offset, len, byte }),
            2 => (0..6u8, any::<bool>()).prop_map(|(vm, copy)| MemOp::Fork { vm, copy }),
            1 => (0..6u8).prop_map(|vm| MemOp::Destroy { vm }),
            2 => (0..6u8, 0..48u16).prop_map(|(vm, page)| MemOp::Protect { vm, page }),
            1 => Just(MemOp::Merge),
            1 => (0..64u8).prop_map(|pages| MemOp::Donate { pages }),
            1 => Just(MemOp::Check),
        ]
    }

    proptest! {
        #![proptest_config(config(96))]

        #[test]
        fn hypercalls_structured(s in script()) {
            keep_failure("hypercall", &s.encode(), fuzz::hypercalls);
        }

        #[test]
        fn hypercalls_mutated(d in mutated("hypercall")) {
            keep_failure("hypercall", &d, fuzz::hypercalls);
        }

        #[test]
        fn ioctls_structured(flags in any::<u8>(), steps in proptest::collection::vec(io_step(), 1..40)) {
            keep_failure("ioctl_args", &IoScript { flags, steps }.encode(), fuzz::ioctls);
        }

        #[test]
        fn ioctls_mutated(d in mutated("ioctl_args")) {
            keep_failure("ioctl_args", &d, fuzz::ioctls);
        }

    }

    // The guest-memory scripts cost the most (1 GiB guests, merges, full
    // checks): fewer cases, for the same wall time.
    proptest! {
        #![proptest_config(config(48))]

        #[test]
        fn guestmem_structured(frames in 0..400u16, ops in proptest::collection::vec(mem_op(), 1..64)) {
            keep_failure("guestmem_ops", &MemScript { frames, ops }.encode(), fuzz::guestmem_ops);
        }

        #[test]
        fn any_bytes(d in proptest::collection::vec(any::<u8>(), 0..600)) {
            keep_failure("hypercall", &d, fuzz::hypercalls);
            keep_failure("ioctl_args", &d, fuzz::ioctls);
            keep_failure("guestmem_ops", &d, fuzz::guestmem_ops);
        }
    }
}

mod units {
    //! The decoders and VM operations one by one, and regression tests of
    //! the bugs the harnesses found.
    use super::super::decode::{self, as_bytes, HostMem};
    use super::super::model::{Model, REGION};
    use super::super::vmops::{self, Limits, LIMITS};
    use super::super::{HcError, VmError};
    use crate::addr::{Gpa, Hpa};
    use crate::guestmem::{GuestMem, MemError};
    use crate::mem::mock::MockMem;
    use crate::mem::PhysMem;
    use crate::pool::FramePool;
    use shared_abi::errno::*;
    use shared_abi::*;

    const BLOCK: u64 = 0x10_0000;
    const POOL: u64 = 0x100_0000;

    fn model() -> Model {
        Model::new(Limits { vms: 4, children: 2 }, true)
    }

    fn call<T: super::super::Block>(m: &mut Model, nr: u64, v: &T) -> (i64, u64) {
        m.host.mem.write(Hpa(BLOCK), as_bytes(v));
        m.dispatch(nr, BLOCK, core::mem::size_of::<T>() as u64)
    }

    fn donate(m: &mut Model, base: u64, pages: u64) -> i64 {
        call(m, hc::DONATE, &MemRange { base, size: pages * 4096 }).0
    }

    fn create(m: &mut Model) -> i64 {
        call(m, hc::VM_CREATE, &VmCreate { mem_bytes: 4 << 20, vcpus: 1, ..Default::default() }).0
    }

    fn setup(mem: &MockMem, frames: usize) -> FramePool {
        let _ = mem;
        let mut pool = FramePool::new();
        pool.donate(Hpa(0x1_0000_0000), frames).unwrap();
        pool
    }

    #[test]
    fn blocks_short_or_not_owned() {
        let m = model();
        assert_eq!(decode::copy_in::<VmId>(&m.host, BLOCK, 7).unwrap_err(), HcError::Invalid);
        assert_eq!(decode::copy_in::<VmId>(&m.host, REGION.base, 8).unwrap_err(), HcError::Fault);
        assert_eq!(decode::copy_in::<VmId>(&m.host, u64::MAX - 3, 8).unwrap_err(), HcError::Fault);
        assert_eq!(decode::copy_in::<VmId>(&m.host, 0x80_0000 - 4, 8).unwrap_err(), HcError::Fault, "a block across the end of RAM");
        assert!(decode::copy_in::<VmId>(&m.host, BLOCK + 3, 8).is_ok(), "blocks need no alignment");
        // RUN's short block is EFAULT, as documented.
        assert_eq!(decode::vm_run(&m.host, BLOCK, 135).unwrap_err(), HcError::Fault);
        assert!(!m.host.owned(BLOCK, 0), "an empty range is not owned");
    }

    #[test]
    fn donate_refuses_overlaps_and_pages_already_given() {
        let mut m = model();
        let two = [MemRange { base: POOL, size: 8192 }, MemRange { base: POOL + 4096, size: 4096 }];
        m.host.mem.write(Hpa(BLOCK), as_bytes(&two[0]));
        m.host.mem.write(Hpa(BLOCK + 16), as_bytes(&two[1]));
        assert_eq!(m.dispatch(hc::DONATE, BLOCK, 32), (-EFAULT, 0));
        assert_eq!(m.pool.frames_total(), 0);
        assert_eq!(donate(&mut m, POOL, 4), 4);
        assert_eq!(donate(&mut m, POOL + 3 * 4096, 1), -EFAULT, "already donated");
        assert_eq!(donate(&mut m, REGION.base, 1), -EFAULT, "the hypervisor's own region");
        assert_eq!(donate(&mut m, POOL + 8 * 4096 + 1, 1), -EINVAL);
        assert_eq!(m.dispatch(hc::DONATE, BLOCK, 15), (-EINVAL, 0));
        // The block itself may be donated: it is read before anything moves.
        assert_eq!(call(&mut m, hc::DONATE, &MemRange { base: BLOCK, size: 4096 }).0, 1);
        assert!(!m.host.owned(BLOCK, 8) && m.host.mem.page_is_zero(Hpa(BLOCK)));
    }

    #[test]
    fn create_load_fork_destroy_reclaim() {
        let mut m = model();
        assert_eq!(create(&mut m), HC_NEED_PAGES);
        assert_eq!(m.dispatch(hc::VM_CREATE, BLOCK, 56).1, vmops::create_need(1));
        assert_eq!(donate(&mut m, POOL, 64), 64);
        assert_eq!(create(&mut m), 1);
        m.host.mem.write(Hpa(0x18_0000), b"hello");
        assert_eq!(call(&mut m, hc::VM_LOAD, &VmLoad { vm: 1, reserved0: 0, gpa: 0x1000, src: 0x18_0000, len: 5 }).0, 0);
        assert_eq!(call(&mut m, hc::VM_FORK, &VmFork { vm: 1, ..Default::default() }).0, 2);
        let mut b = [0u8; 5];
        m.vms[&2].mem.read(&m.host.mem, Gpa(0x1000), &mut b).unwrap();
        assert_eq!(&b, b"hello");
        for id in [1, 2] {
            assert_eq!(call(&mut m, hc::VM_DESTROY, &VmId { id, reserved0: 0 }).0, 0);
        }
        assert_eq!(m.pool.frames_free(), 64);
        assert_eq!(m.dispatch(hc::RECLAIM, BLOCK, 8 * 100), (64, 0));
        assert!(m.host.taken.is_empty());
    }

    /// Regression: a full-copy fork whose copy fits the pool but whose
    /// child then lacks its VMCS frames gave its copy back first and then
    /// counted the shortfall against the larger free count: `need - free`
    /// underflowed (a panic with overflow checks, else a request for 2^64
    /// pages). The shortfall is now counted before the copy goes back.
    #[test]
    fn full_copy_short_of_frames_asks_for_the_shortfall() {
        let mem = MockMem::new();
        let mut pool = setup(&mem, 12);
        let mut g = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        g.write(&mem, &mut pool, Gpa(0), &[1]).unwrap();
        // 12 - root - 3 tables - 1 page = 7 free... donate to 9 free, the
        // fork's minimum; the copy takes 5 and leaves 4 < 6.
        pool.donate(Hpa(0x2_0000_0000), 2).unwrap();
        assert_eq!(pool.frames_free(), 9);
        let copy = vmops::fork_memory(&mem, &mut pool, &LIMITS, 1, 0, &mut g, 1, true).unwrap();
        assert_eq!(pool.frames_free(), 4);
        let r = vmops::take_frames(&mem, &mut pool, &LIMITS, 1, 4 << 20, 1, Some(copy));
        assert_eq!(r.err(), Some(VmError::Mem(MemError::NeedPages(2))));
        assert_eq!(pool.frames_free(), 9, "the copy went back to the pool");
        g.destroy(&mem, &mut pool);
        assert_eq!(pool.frames_free(), pool.frames_total());
    }

    /// Regression: a fork refused for the VM limit (or any reason after
    /// the child's memory was made) left that memory, and the references
    /// it held on the parent's tables, in the pool for good.
    #[test]
    fn a_fork_refused_at_the_vm_limit_leaks_nothing() {
        let mem = MockMem::new();
        let mut pool = setup(&mem, 64);
        let mut g = GuestMem::new(&mem, &mut pool, 4 << 20).unwrap();
        g.write(&mem, &mut pool, Gpa(0x3000), &[9; 100]).unwrap();
        let free = pool.frames_free();
        let child = g.fork(&mem, &mut pool).unwrap();
        let r = vmops::take_frames(&mem, &mut pool, &Limits { vms: 1, children: 8 }, 1, 4 << 20, 1, Some(child));
        assert_eq!(r.err(), Some(VmError::TooMany));
        assert_eq!(pool.frames_free(), free);
        // The parent takes its tables back in place: nothing is copied.
        g.write(&mem, &mut pool, Gpa(0x3000), &[1]).unwrap();
        assert_eq!(pool.frames_free(), free);
        assert_eq!(vmops::fork_memory(&mem, &mut pool, &Limits { vms: 1, children: 8 }, 1, 0, &mut g, 1, false).err(), Some(VmError::TooMany));
        assert_eq!(vmops::fork_memory(&mem, &mut pool, &LIMITS, 1, 64, &mut g, 1, false).err(), Some(VmError::Limit));
        g.destroy(&mem, &mut pool);
        assert_eq!(pool.frames_free(), pool.frames_total());
    }

    /// Regression: DEBUG_TRANSLATE walked the EPT with bits 12-47 of the
    /// address only, so a GPA at or above 2^48 named the frame of its alias
    /// below. Addresses beyond guest memory are now EFAULT.
    #[test]
    fn translate_beyond_guest_memory() {
        let mut m = model();
        donate(&mut m, POOL, 64);
        create(&mut m);
        m.host.mem.write(Hpa(0x18_0000), &[7]);
        call(&mut m, hc::VM_LOAD, &VmLoad { vm: 1, reserved0: 0, gpa: 0x5000, src: 0x18_0000, len: 1 });
        let t = |m: &mut Model, gpa: u64| {
            let r = call(m, hc::DEBUG_TRANSLATE, &DebugTranslate { vm: 1, reserved0: 0, gpa, hpa: 0 });
            (r.0, decode::from_bytes::<DebugTranslate>(&{
                let mut b = [0u8; 24];
                m.host.mem.read(Hpa(BLOCK), &mut b);
                b
            })
            .unwrap()
            .hpa)
        };
        let (s, hpa) = t(&mut m, 0x5123);
        assert_eq!(s, 0);
        assert_eq!(hpa & 0xfff, 0x123);
        assert!(m.pool.contains(Hpa(hpa & !0xfff)));
        assert_eq!(t(&mut m, 0x6000), (0, 0), "an untouched page has no frame");
        assert_eq!(t(&mut m, (1 << 48) + 0x5123).0, -EFAULT);
        assert_eq!(t(&mut m, 4 << 20).0, -EFAULT);
        m.debug = false;
        assert_eq!(t(&mut m, 0x5123).0, -ENOSYS);
    }

    #[test]
    fn set_regs_forces_the_fixed_registers() {
        let mut m = model();
        donate(&mut m, POOL, 64);
        create(&mut m);
        let given = Regs { rip: 0x10_0000, rflags: 0x200, cr0: 1, cr4: 2, efer: 3, rax: 5, ..Default::default() };
        assert_eq!(call(&mut m, hc::VM_SET_REGS, &VmRegs { vm: 1, vcpu: 0, regs: given }).0, 0);
        assert_eq!(call(&mut m, hc::VM_SET_REGS, &VmRegs { vm: 1, vcpu: 1, regs: given }).0, -ENOENT);
        assert_eq!(call(&mut m, hc::VM_SET_REGS, &VmRegs { vm: 1, vcpu: 0, regs: Regs { rflags: 1 << 17, ..given } }).0, -EINVAL);
        assert_eq!(call(&mut m, hc::VM_GET_REGS, &VmRegs { vm: 1, vcpu: 0, regs: Regs::default() }).0, 0);
        let mut b = [0u8; core::mem::size_of::<VmRegs>()];
        m.host.mem.read(Hpa(BLOCK), &mut b);
        let r: VmRegs = decode::from_bytes(&b).unwrap();
        assert_eq!(r.regs, Regs { cr0: 0x8001_0033, cr4: 0x20, efer: 0x500, rflags: 0x202, ..given });
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(HcError::from(VmError::Mem(MemError::NeedPages(3))), HcError::NeedPages(3));
        assert_eq!(super::super::status(Err(HcError::NeedPages(3))), (HC_NEED_PAGES, 3));
        assert_eq!(super::super::status(Err(VmError::Limit.into())), (-EAGAIN, 0));
        assert_eq!(super::super::status(Err(HcError::from(shared_abi::validate::Invalid::Reserved))), (-EINVAL, 0));
        assert_eq!(super::super::status(Ok(7)), (7, 0));
        assert_eq!(VmError::Mem(MemError::OutOfRange).errno(), -EFAULT);
        assert_eq!(HcError::NoVmx.errno(), -ENODEV);
    }
}

mod dispatch {
    //! The steps the dispatcher asks of the machine, in order, as the model
    //! records them ([`Call`]): the orders that keep the host's pages from
    //! a guest and a guest's memory from the host are checks only the
    //! dispatcher makes.
    use super::super::decode::{as_bytes, HostMem};
    use super::super::model::{Call, Faults, Model};
    use super::super::vmops::Limits;
    use crate::addr::{Hpa, PhysRange};
    use crate::mem::PhysMem;
    use shared_abi::errno::*;
    use shared_abi::*;

    const BLOCK: u64 = 0x10_0000;
    /// Two pages the host donates.
    const PAGES: MemRange = MemRange { base: 0x100_0000, size: 0x2000 };

    fn model() -> Model {
        Model::new(Limits { vms: 4, children: 2 }, true)
    }

    fn call<T: super::super::Block>(m: &mut Model, nr: u64, v: &T) -> (i64, u64) {
        m.host.mem.write(Hpa(BLOCK), as_bytes(v));
        m.dispatch(nr, BLOCK, core::mem::size_of::<T>() as u64)
    }

    /// Host data in the pages to donate, which only a scrub may clear.
    fn host_data(m: &Model) {
        m.host.mem.write(Hpa(PAGES.base + 0x10), b"host secret");
        m.host.mem.write(Hpa(PAGES.base + 0x1ff0), b"host secret");
    }

    fn phys() -> alloc::vec::Vec<PhysRange> {
        alloc::vec![PhysRange::new(PAGES.base, PAGES.size)]
    }

    /// A failed donation: the pages are the host's as before, unscrubbed,
    /// and the pool is as it was.
    fn unchanged(m: &Model) {
        assert!(m.host.owned(PAGES.base, PAGES.size), "the pages are the host's again");
        assert!(m.pool.frames_total() == 0 && !m.pool.contains(Hpa(PAGES.base)), "nothing was pooled");
        let mut b = [0u8; 11];
        m.host.mem.read(Hpa(PAGES.base + 0x1ff0), &mut b);
        assert_eq!(&b, b"host secret", "nothing was scrubbed");
    }

    #[test]
    fn donate_unmaps_shoots_down_unmaps_dma_scrubs_then_pools() {
        let mut m = model();
        host_data(&m);
        assert_eq!(call(&mut m, hc::DONATE, &PAGES), (2, 0));
        assert_eq!(m.calls, [Call::HostUnmap(alloc::vec![PAGES]), Call::Shootdown, Call::IommuUnmap(phys()), Call::Scrub(PAGES), Call::Pool]);
        assert!(m.host.mem.page_is_zero(Hpa(PAGES.base)) && m.host.mem.page_is_zero(Hpa(PAGES.base + 0x1000)));
        assert_eq!(m.pool.frames_free(), 2);
    }

    /// A DONATE the machine fails as `faults` says: it answers `status`,
    /// after exactly `steps`, and the pages stay the host's.
    fn refused(faults: Faults, status: i64, steps: &[Call]) -> Model {
        let mut m = model();
        host_data(&m);
        m.faults = faults;
        assert_eq!(call(&mut m, hc::DONATE, &PAGES), (status, 0));
        assert_eq!(m.calls, steps);
        unchanged(&m);
        m
    }

    #[test]
    fn a_donation_without_a_shootdown_scrubs_and_pools_nothing() {
        let steps = [Call::HostUnmap(alloc::vec![PAGES]), Call::Shootdown, Call::HostMap(phys())];
        let mut m = refused(Faults { shootdown: true, ..Faults::default() }, -EBUSY, &steps);
        // Once the CPUs answer again, the same pages can be given.
        m.faults.shootdown = false;
        assert_eq!(call(&mut m, hc::DONATE, &PAGES), (2, 0));
    }

    #[test]
    fn a_donation_the_iommu_cannot_follow_stays_the_hosts() {
        let steps = [Call::HostUnmap(alloc::vec![PAGES]), Call::Shootdown, Call::IommuUnmap(phys()), Call::IommuMap(phys()), Call::HostMap(phys())];
        refused(Faults { iommu: true, ..Faults::default() }, -EIO, &steps);
    }

    #[test]
    fn a_donation_the_host_ept_cannot_follow_stays_the_hosts() {
        let steps = [Call::HostUnmap(alloc::vec![PAGES]), Call::Shootdown, Call::HostMap(phys())];
        refused(Faults { heap: true, ..Faults::default() }, -ENOMEM, &steps);
    }

    #[test]
    fn reclaim_gives_pages_to_devices_then_to_the_host() {
        let mut m = model();
        assert_eq!(call(&mut m, hc::DONATE, &PAGES), (2, 0));
        // The block has room for two addresses.
        assert_eq!(m.dispatch(hc::RECLAIM, BLOCK, 16), (2, 0));
        assert_eq!(m.calls, [Call::Pool, Call::IommuMap(phys()), Call::HostMap(phys())]);
        assert!(m.host.owned(PAGES.base, PAGES.size));
    }

    /// A VM with memory to load into, and a page the host loads from.
    fn vm(m: &mut Model) -> u32 {
        assert_eq!(call(m, hc::DONATE, &PAGES).0, 2);
        assert_eq!(call(m, hc::DONATE, &MemRange { base: 0x110_0000, size: 0x10_0000 }).0, 256);
        let id = call(m, hc::VM_CREATE, &VmCreate { mem_bytes: 4 << 20, vcpus: 1, ..Default::default() }).0;
        assert!(id > 0);
        m.host.mem.write(Hpa(0x18_0000), b"new");
        id as u32
    }

    #[test]
    fn vm_load_refuses_a_vm_whose_vcpu_runs() {
        let mut m = model();
        let id = vm(&mut m);
        let load = VmLoad { vm: id, reserved0: 0, gpa: 0x1000, src: 0x18_0000, len: 3 };
        m.running.insert(id);
        let free = m.pool.frames_free();
        assert_eq!(call(&mut m, hc::VM_LOAD, &load), (-EBUSY, 0));
        assert!(!m.calls.contains(&Call::Pool), "guest memory was not touched");
        assert_eq!(m.pool.frames_free(), free);
        m.running.remove(&id);
        assert_eq!(call(&mut m, hc::VM_LOAD, &load), (0, 0));
    }

    #[test]
    fn vm_fork_refuses_a_vm_whose_vcpu_runs() {
        let mut m = model();
        let id = vm(&mut m);
        m.running.insert(id);
        assert_eq!(call(&mut m, hc::VM_FORK, &VmFork { vm: id, ..Default::default() }).0, -EBUSY);
        assert_eq!(m.vms.len(), 1);
        m.running.remove(&id);
        assert!(call(&mut m, hc::VM_FORK, &VmFork { vm: id, ..Default::default() }).0 > 0);
    }
}
