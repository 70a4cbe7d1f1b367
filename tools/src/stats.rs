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
}

#[derive(Serialize)]
pub struct StatsJson {
    pub cpus: Vec<CpuJson>,
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

/// Names of the SDM's basic exit reasons, by number.
pub fn reason_name(n: usize) -> String {
    const NAMES: [&str; 78] = [
        "EXCEPTION_NMI", "EXTERNAL_INTERRUPT", "TRIPLE_FAULT", "INIT", "SIPI", "IO_SMI", "OTHER_SMI",
        "INTERRUPT_WINDOW", "NMI_WINDOW", "TASK_SWITCH", "CPUID", "GETSEC", "HLT", "INVD", "INVLPG",
        "RDPMC", "RDTSC", "RSM", "VMCALL", "VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD",
        "VMRESUME", "VMWRITE", "VMXOFF", "VMXON", "CR_ACCESS", "DR_ACCESS", "IO_INSTRUCTION", "RDMSR",
        "WRMSR", "ENTRY_FAIL_GUEST_STATE", "ENTRY_FAIL_MSR_LOAD", "REASON_35", "MWAIT", "MONITOR_TRAP_FLAG",
        "REASON_38", "MONITOR", "PAUSE", "ENTRY_FAIL_MCE", "REASON_42", "TPR_BELOW_THRESHOLD",
        "APIC_ACCESS", "VIRTUALIZED_EOI", "GDTR_IDTR", "LDTR_TR", "EPT_VIOLATION", "EPT_MISCONFIG",
        "INVEPT", "RDTSCP", "PREEMPTION_TIMER", "INVVPID", "WBINVD", "XSETBV", "APIC_WRITE", "RDRAND",
        "INVPCID", "VMFUNC", "ENCLS", "RDSEED", "PML_FULL", "XSAVES", "XRSTORS", "PCONFIG", "SPP",
        "UMWAIT", "TPAUSE", "LOADIWKEY", "ENCLV", "REASON_71", "ENQCMD_PASID", "ENQCMDS_PASID",
        "BUS_LOCK", "INSTRUCTION_TIMEOUT", "SEAMCALL", "TDCALL",
    ];
    if n == abi::EXIT_REASON_SLOTS - 1 {
        return "OTHER".into();
    }
    NAMES.get(n).map(|s| s.to_string()).unwrap_or_else(|| format!("REASON_{n}"))
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
    StatsJson {
        cpus,
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
        merge: Merge { scanned: s.merge_scanned, merged: s.merge_merged, zero: s.merge_zero },
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
}
