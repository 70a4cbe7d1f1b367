//! `uxenctl stats`: the hypervisor's counters, as text or one JSON object.

use serde::Serialize;
use shared_abi as abi;
use std::collections::BTreeMap;

#[derive(Serialize)]
pub struct CpuJson {
    pub id: u32,
    pub apic_id: u32,
    pub virtualized: bool,
    pub exits: u64,
    pub host_exits: u64,
    pub exit_tsc: u64,
    pub exits_by_reason: BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct Region {
    pub base: u64,
    pub size: u64,
}

#[derive(Serialize)]
pub struct Iommu {
    pub enabled: bool,
    pub units: u32,
    pub faults: u64,
    pub last_fault_source: u64,
    pub last_fault_addr: u64,
}

#[derive(Serialize)]
pub struct Pool {
    pub frames_total: u64,
    pub frames_free: u64,
}

#[derive(Serialize)]
pub struct HostEpt {
    pub pages_1g: u64,
    pub pages_2m: u64,
    pub pages_4k: u64,
}

#[derive(Serialize)]
pub struct Heap {
    pub bytes_total: u64,
    pub bytes_free: u64,
}

#[derive(Serialize)]
pub struct Merge {
    pub scanned: u64,
    pub merged: u64,
    pub zero: u64,
    /// Passes completed.
    pub passes: u64,
    /// Chunks abandoned, every page as it was, because a TLB shootdown was
    /// not acknowledged.
    pub aborted: u64,
    /// Guest mappings beyond the first of each frame: pages that sharing
    /// saves right now.
    pub pages_shared_now: u64,
    /// Frames the merge index holds (a pass's, or its stable part between
    /// passes), those of them that are merged (stable), the pool frames its
    /// table takes and its heap bytes.
    pub indexed: u64,
    pub stable: u64,
    pub index_frames: u64,
    pub index_heap_bytes: u64,
    /// Pages passes skipped, unread, as mapped onto a stable frame already
    /// (counted in `scanned`).
    pub skipped: u64,
    /// Shootdowns not acknowledged in time, and what waits for a later one.
    pub shootdowns_unacked: u64,
    pub shootdown_deferred: u64,
    /// TSC ticks the hypervisor spent merging, over every pass.
    pub tsc: u64,
}

/// Exits of one side (the host VM, or the guests) by reason: over every
/// CPU, and per CPU in `cpus` order.
#[derive(Serialize, Default)]
pub struct SideExits {
    pub total: BTreeMap<String, u64>,
    pub cpus: Vec<BTreeMap<String, u64>>,
}

#[derive(Serialize, Default)]
pub struct Exits {
    pub host: SideExits,
    pub guest: SideExits,
}

#[derive(Serialize)]
pub struct StatsJson {
    pub cpus: Vec<CpuJson>,
    /// Exits by reason, the host VM's and the guests' apart, with the
    /// SDM's names in lower case (`ept_violation`, `cpuid`).
    pub exits: Exits,
    pub hv_region: Region,
    pub blocked_host_accesses: u64,
    pub blocked_host_reads: u64,
    pub blocked_host_writes: u64,
    pub last_blocked_gpa: u64,
    pub image_intact: bool,
    pub iommu: Iommu,
    pub pool: Pool,
    pub frames_shared: u64,
    pub cow_copies: u64,
    pub merge: Merge,
    pub vms: u32,
    pub host_ept: HostEpt,
    pub heap: Heap,
}

/// The name of an exit-reason slot (`shared_abi::exit_reason`).
pub fn reason_name(n: usize) -> String {
    abi::exit_reason::slot_name(n).to_string()
}

/// The lower-case name of an exit-reason slot, the key in `exits`.
fn json_reason(n: usize) -> String {
    let b = abi::exit_reason::json_name(n);
    String::from_utf8_lossy(abi::cstr_bytes(&b)).into_owned()
}

pub fn to_json(s: &abi::HvStats) -> StatsJson {
    let cpus = (0..s.num_cpus as usize)
        .map(|i| {
            let c = &s.cpus[i];
            let by = c
                .exits_by_reason
                .iter()
                .enumerate()
                .filter(|(_, &n)| n != 0)
                .map(|(r, &n)| (reason_name(r), n))
                .collect();
            CpuJson {
                id: c.cpu_id,
                apic_id: c.apic_id,
                virtualized: c.virtualized != 0,
                exits: c.exits,
                host_exits: c.host_exits,
                exit_tsc: c.exit_tsc,
                exits_by_reason: by,
            }
        })
        .collect();
    let mut exits = Exits::default();
    for c in &s.cpus[..s.num_cpus as usize] {
        let (mut host, mut guest) = (BTreeMap::new(), BTreeMap::new());
        for r in 0..abi::EXIT_REASON_SLOTS {
            let (all, g) = (c.exits_by_reason[r], c.guest_exits_by_reason[r]);
            for (side, n) in [(&mut host, all.saturating_sub(g)), (&mut guest, g)] {
                if n != 0 {
                    side.insert(json_reason(r), n);
                }
            }
        }
        for (side, per) in [(&mut exits.host, host), (&mut exits.guest, guest)] {
            for (k, n) in &per {
                *side.total.entry(k.clone()).or_default() += n;
            }
            side.cpus.push(per);
        }
    }
    StatsJson {
        cpus,
        exits,
        hv_region: Region { base: s.hv_region_base, size: s.hv_region_size },
        blocked_host_accesses: s.blocked_host_reads + s.blocked_host_writes,
        blocked_host_reads: s.blocked_host_reads,
        blocked_host_writes: s.blocked_host_writes,
        last_blocked_gpa: s.last_blocked_gpa,
        image_intact: s.image_intact != 0,
        iommu: Iommu {
            enabled: s.iommu_enabled != 0,
            units: s.iommu_units,
            faults: s.iommu_faults,
            last_fault_source: s.iommu_last_fault_source,
            last_fault_addr: s.iommu_last_fault_addr,
        },
        pool: Pool { frames_total: s.pool_frames_total, frames_free: s.pool_frames_free },
        frames_shared: s.frames_shared,
        cow_copies: s.cow_copies,
        merge: Merge {
            scanned: s.merge_scanned,
            merged: s.merge_merged,
            zero: s.merge_zero,
            passes: s.merge_passes,
            aborted: s.merge_aborted,
            pages_shared_now: s.merge_pages_shared_now,
            indexed: s.merge_indexed,
            stable: s.merge_stable,
            index_frames: s.merge_index_frames,
            index_heap_bytes: s.merge_index_heap_bytes,
            skipped: s.merge_skipped,
            shootdowns_unacked: s.shootdowns_unacked,
            shootdown_deferred: s.shootdown_deferred,
            tsc: s.merge_tsc,
        },
        vms: s.vms,
        host_ept: HostEpt { pages_1g: s.host_ept_1g, pages_2m: s.host_ept_2m, pages_4k: s.host_ept_4k },
        heap: Heap { bytes_total: s.heap_bytes_total, bytes_free: s.heap_bytes_free },
    }
}

pub fn print_text(s: &abi::HvStats) {
    let j = to_json(s);
    println!("hypervisor region  {:#x} + {} KiB, image intact: {}", j.hv_region.base, j.hv_region.size >> 10, j.image_intact);
    println!(
        "blocked host accesses  {} ({} reads, {} writes; last at {:#x})",
        j.blocked_host_accesses, j.blocked_host_reads, j.blocked_host_writes, j.last_blocked_gpa
    );
    println!(
        "host EPT           {} x 1G, {} x 2M, {} x 4K pages",
        j.host_ept.pages_1g, j.host_ept.pages_2m, j.host_ept.pages_4k
    );
    println!("hypervisor heap    {} KiB, {} KiB free", j.heap.bytes_total >> 10, j.heap.bytes_free >> 10);
    if j.iommu.enabled {
        println!("DMA protection     on: {} remapping units, {} faults", j.iommu.units, j.iommu.faults);
    } else {
        println!("DMA protection     unavailable (no VT-d remapping unit)");
    }
    println!("frame pool         {} frames, {} free; {} shared, {} copy-on-write copies", j.pool.frames_total, j.pool.frames_free, j.frames_shared, j.cow_copies);
    println!(
        "re-merging         {} passes, {} pages scanned ({} skipped as stable), {} merged, {} zero; {} shared now; {} chunks aborted; index {} frames ({} stable) in {} pool frames, {} heap bytes",
        j.merge.passes,
        j.merge.scanned,
        j.merge.skipped,
        j.merge.merged,
        j.merge.zero,
        j.merge.pages_shared_now,
        j.merge.aborted,
        j.merge.indexed,
        j.merge.stable,
        j.merge.index_frames,
        j.merge.index_heap_bytes
    );
    println!("VMs                {}", j.vms);
    for c in &j.cpus {
        println!(
            "cpu{:<3} {}  exits {:>10} (host {})",
            c.id,
            if c.virtualized { "virtualized" } else { "native     " },
            c.exits,
            c.host_exits
        );
        let mut by: Vec<_> = c.exits_by_reason.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1));
        for (name, n) in by {
            println!("         {name:<22} {n:>10}");
        }
    }
    for (what, side) in [("host VM", &j.exits.host), ("guests", &j.exits.guest)] {
        let mut by: Vec<_> = side.total.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = by.iter().take(5).map(|(k, n)| format!("{k} {n}")).collect();
        println!("exits, {what:<8} {}", if top.is_empty() { "none".to_string() } else { top.join(", ") });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_split_host_and_guests_by_reason() {
        // SAFETY: HvStats is plain integers and byte arrays; zero is valid.
        let mut s: abi::HvStats = unsafe { std::mem::zeroed() };
        s.num_cpus = 2;
        s.cpus[0].exits_by_reason[10] = 7; // CPUID: 5 of them a guest's
        s.cpus[0].guest_exits_by_reason[10] = 5;
        s.cpus[1].exits_by_reason[48] = 3; // EPT violations, all the host's
        s.cpus[1].exits_by_reason[abi::EXIT_REASON_SLOTS - 1] = 1;
        s.cpus[1].guest_exits_by_reason[abi::EXIT_REASON_SLOTS - 1] = 1;
        let j = serde_json::to_value(to_json(&s).exits).unwrap();
        assert_eq!(j["host"]["total"]["cpuid"], 2);
        assert_eq!(j["guest"]["total"]["cpuid"], 5);
        assert_eq!(j["host"]["total"]["ept_violation"], 3);
        assert!(j["guest"]["total"].get("ept_violation").is_none());
        assert_eq!(j["guest"]["cpus"][1]["other"], 1);
        assert_eq!(j["host"]["cpus"].as_array().unwrap().len(), 2);
        assert_eq!(j["guest"]["cpus"][0]["cpuid"], 5);
    }
}
