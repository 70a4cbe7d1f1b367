//! `cargo xtask bench`: figures measured inside Bochs, where the emulated
//! TSC (`clock: sync=none`) advances with emulated instructions, so runs
//! repeat. Each bench is a script, `tests/scripts/bench-<name>.sh`, that
//! prints `UXEN-BENCH: <name> key=value ...` lines; every figure is set
//! against a baseline measured in the same run.

use crate::runner::{self, Backend, RunSpec};
use crate::{artifacts, util};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

const MARK: &str = "UXEN-BENCH: ";

/// One result line: the bench's name and its values.
type Row = BTreeMap<String, String>;

pub const NAMES: &[&str] = &["exits", "fork", "linux", "merge"];

pub fn bench(args: &[String]) -> Result<()> {
    let names: Vec<&str> = match args.first().map(String::as_str) {
        None | Some("all") => NAMES.to_vec(),
        Some(n) if NAMES.contains(&n) => vec![n],
        Some(n) => bail!("unknown bench `{n}`; benches: {}", NAMES.join(", ")),
    };
    crate::setup::setup()?;
    let a = if args.iter().any(|a| a == "--no-build") { artifacts::existing()? } else { artifacts::build_all()? };
    let dir = util::out().join("bench");
    std::fs::create_dir_all(&dir)?;
    for name in names {
        let spec = RunSpec {
            suite: format!("bench-{name}"),
            timeout: Duration::from_secs(1800),
            cmdline: String::new(),
            cpus: 2,
            mem_mib: 1536,
            qemu_devices: runner::QEMU_DEVICES,
            live: args.iter().any(|a| a == "--live"),
            stall: None,
        };
        util::step(&format!("bench {name} in Bochs"));
        let o = runner::run(Backend::Bochs.machine().as_ref(), &spec, &a)?;
        let text = std::fs::read_to_string(&o.serial).with_context(|| format!("no serial log at {}", o.serial.display()))?;
        if let Some(why) = &o.skipped {
            bail!("bench {name} was skipped: {why}");
        }
        if !o.passed() {
            bail!("bench {name} failed (serial log: {}): {:?}", o.serial.display(), o.problems);
        }
        let table = match name {
            "fork" => fork_table(&rows(&text, "fork"))?,
            "exits" => exits_table(&rows(&text, "cpuid"), &rows(&text, "exits"))?,
            "linux" => linux_table(&text, &o.marks)?,
            "merge" => merge_table(&rows(&text, "merge"))?,
            _ => unreachable!(),
        };
        print!("\n{table}");
        let out = dir.join(format!("{name}.md"));
        std::fs::write(&out, &table)?;
        println!("written to {}", out.strip_prefix(util::root()).unwrap_or(&out).display());
    }
    Ok(())
}

/// The `UXEN-BENCH: <name> k=v ...` lines of `name`.
fn rows(text: &str, name: &str) -> Vec<Row> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(MARK).map(|(_, r)| r))
        .filter_map(|r| r.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .map(|r| r.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
        .collect()
}

fn num(r: &Row, k: &str) -> Result<u64> {
    r.get(k).and_then(|v| v.parse().ok()).with_context(|| format!("bench line without a number for `{k}`: {r:?}"))
}

/// Fork cost against VM size, against a full copy of the same memory.
fn fork_table(rows: &[Row]) -> Result<String> {
    let mut t = String::new();
    writeln!(t, "fork: the hypervisor's cost of one fork, in emulated TSC ticks (median of the runs)")?;
    writeln!(t, "baseline: the same VM copied in full (FORK_COPY), in the same run\n")?;
    writeln!(t, "| touched | CoW fork | full copy | copy / fork | fork per MiB |")?;
    writeln!(t, "|---:|---:|---:|---:|---:|")?;
    for r in rows {
        let (mib, cow, copy) = (num(r, "mib")?, num(r, "cow")?, num(r, "copy")?);
        writeln!(t, "| {mib} MiB | {cow} | {copy} | {:.1}x | {} |", copy as f64 / cow.max(1) as f64, cow / mib.max(1))?;
    }
    Ok(t)
}

/// Re-merging: instructions (emulated TSC ticks) per page examined, first
/// and second pass, against a full copy's per page; pages reclaimed
/// against the ideal; the background thread's CPU share at its defaults.
fn merge_table(rows: &[Row]) -> Result<String> {
    let mut t = String::new();
    writeln!(t, "merge: eight separately created guests, 2 MiB of identical touched memory each")?;
    writeln!(t, "baseline: one full copy (FORK_COPY) of such a guest, per page, in the same run
")?;
    writeln!(t, "| pass | pages examined | ticks | per page examined | per guest page | goal | copy per page | merged | ideal | of ideal |")?;
    writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut auto = None;
    for r in rows {
        if r.contains_key("auto") {
            auto = Some(r);
            continue;
        }
        let (pass, scanned, tsc, merged, ideal) = (num(r, "pass")?, num(r, "scanned")?, num(r, "tsc")?, num(r, "merged")?, num(r, "ideal")?);
        let pages = num(r, "copy_pages")?.max(1);
        let copy = num(r, "copy_tsc")? / pages;
        let of = if ideal == 0 { "-".to_string() } else { format!("{:.1}%", merged as f64 * 100.0 / ideal as f64) };
        let goal = if pass == 1 { 3000 } else { 500 };
        // Eight guests of `pages` frames each.
        writeln!(t, "| {pass} | {scanned} | {tsc} | {} | {} | {goal} | {copy} | {merged} | {ideal} | {of} |", tsc / scanned.max(1), tsc / (8 * pages))?;
    }
    if let Some(r) = auto {
        let (cs, el, hv, khz) = (num(r, "thread_cs")?, num(r, "elapsed_cs")?, num(r, "hv_tsc")?, num(r, "tsc_khz")?);
        let hv_share = hv as f64 * 100.0 / (el as f64 * 10.0 * khz as f64);
        writeln!(t, "
background merging at its defaults (interval {} ms, batch {}), host busy on both CPUs:", num(r, "interval_ms")?, num(r, "batch")?)?;
        writeln!(t, "- the merge thread's CPU time: {:.2}% of one CPU ({} of {} centiseconds; goal: at most 2%)", cs as f64 * 100.0 / el.max(1) as f64, cs, el)?;
        writeln!(t, "- of which in the hypervisor: {hv_share:.2}% ({hv} ticks)")?;
        writeln!(t, "- pages shared at the end: {}", num(r, "shared")?)?;
    }
    Ok(t)
}

/// Reasons and counts of a `k=v` row, less the given keys.
fn by_reason<'a>(r: &'a Row, skip: &[&str]) -> impl Iterator<Item = (&'a str, u64)> + 'a {
    let skip: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
    r.iter().filter(move |(k, _)| !skip.contains(k)).filter_map(|(k, v)| Some((k.as_str(), v.parse().ok()?)))
}

/// A Linux guest's boot against the goal, and its idle exits by reason,
/// with the host's exits alone and beside it in the same run.
fn linux_table(text: &str, marks: &[(String, Duration)]) -> Result<String> {
    let one = |name: &str| rows(text, name).into_iter().next().with_context(|| format!("the linux bench printed no `{name}` line"));
    let (boot, guest, host0, host1) = (one("linux-boot")?, one("linux-guest-idle")?, one("linux-host-idle")?, one("linux-host-with-guest")?);
    let (ticks, khz, mib) = (num(&boot, "ticks")?, num(&boot, "tsc_khz")?, num(&boot, "mem_mib")?);
    let secs = |r: &Row| num(r, "secs").map(|s| s.max(1) as f64);
    let wall = |m: &str| marks.iter().find(|(n, _)| n == m).map(|(_, t)| *t);
    let wall_boot = match (wall("boot-start"), wall("boot-end")) {
        (Some(a), Some(b)) => format!("{:.1}", b.saturating_sub(a).as_secs_f64()),
        _ => "-".into(),
    };
    let total = |r: &Row| by_reason(r, &["secs"]).map(|(_, n)| n).sum::<u64>();
    let (gs, h0s, h1s) = (secs(&guest)?, secs(&host0)?, secs(&host1)?);
    let mut t = String::new();
    writeln!(t, "linux: a {mib} MiB Linux guest (the project's guest kernel and busybox initramfs)")?;
    writeln!(t, "emulated TSC ticks at {khz} kHz (Bochs advances the TSC with emulated instructions)\n")?;
    writeln!(t, "| figure | measured | goal |")?;
    writeln!(t, "|---|---:|---:|")?;
    writeln!(t, "| boot to the shell prompt, emulated ticks | {ticks} ({:.2} emulated s) | < 1,500,000,000 |", ticks as f64 / (khz.max(1) as f64 * 1000.0))?;
    writeln!(t, "| boot to the shell prompt, wall seconds (to 0.25 s) | {wall_boot} | |")?;
    writeln!(t, "| idle guest, exits per emulated second | {:.1} | < 300 |", total(&guest) as f64 / gs)?;
    writeln!(t, "| host VM, exits per emulated second, beside the idle guest (baseline: the host alone, idle) | {:.1} | {:.1} |", total(&host1) as f64 / h1s, total(&host0) as f64 / h0s)?;
    writeln!(t, "\n| exit reason | idle guest, per s | host beside it, per s | host alone, per s |")?;
    writeln!(t, "|---|---:|---:|---:|")?;
    let mut names: Vec<&str> = by_reason(&guest, &["secs"]).chain(by_reason(&host0, &["secs"])).chain(by_reason(&host1, &["secs"])).map(|(k, _)| k).collect();
    names.sort();
    names.dedup();
    let rate = |r: &Row, k: &str, s: f64| r.get(k).and_then(|v| v.parse::<u64>().ok()).map_or("0".to_string(), |n| format!("{:.1}", n as f64 / s));
    for k in names {
        writeln!(t, "| {k} | {} | {} | {} |", rate(&guest, k, gs), rate(&host1, k, h1s), rate(&host0, k, h0s))?;
    }
    Ok(t)
}

/// CPUID round trips against the bare machine; host exits per million TSC
/// ticks while working against idle.
fn exits_table(cpuid: &[Row], exits: &[Row]) -> Result<String> {
    let (Some(c), Some(e)) = (cpuid.first(), exits.first()) else {
        bail!("the exits bench printed no figures");
    };
    let (native, virt) = (num(c, "native")?, num(c, "virtualized")?);
    let per_m = |n: u64, t: u64| n as f64 * 1e6 / t.max(1) as f64;
    let idle = per_m(num(e, "idle_exits")?, num(e, "idle_tsc")?);
    let work = per_m(num(e, "work_exits")?, num(e, "work_tsc")?);
    let mut t = String::new();
    writeln!(t, "exits: emulated TSC ticks (Bochs advances the TSC with emulated instructions)\n")?;
    writeln!(t, "| figure | measured | baseline | ratio |")?;
    writeln!(t, "|---|---:|---:|---:|")?;
    writeln!(t, "| CPUID 0x40000000, ticks each (baseline: bare CPU) | {virt} | {native} | {:.1}x |", virt as f64 / native.max(1) as f64)?;
    writeln!(t, "| exit round trip, ticks (virtualized - bare) | {} | | |", virt.saturating_sub(native))?;
    writeln!(t, "| host exits per million ticks, workload (baseline: idle) | {work:.1} | {idle:.1} | {:.2}x |", work / idle.max(1e-9))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_table_has_ratios() {
        let text = "UXEN-BENCH: merge pass=1 scanned=4000 tsc=12000000 merged=3584 ideal=3584 copy_tsc=2000000 copy_pages=520\n\
                    UXEN-BENCH: merge pass=2 scanned=400 tsc=100000 merged=0 ideal=0 copy_tsc=2000000 copy_pages=520\n\
                    UXEN-BENCH: merge auto=1 thread_cs=20 elapsed_cs=2000 hv_tsc=10000000 tsc_khz=50000 interval_ms=100 batch=32 shared=3600\n";
        let t = merge_table(&rows(text, "merge")).unwrap();
        assert!(t.contains("| 1 | 4000 | 12000000 | 3000 | 2884 | 3000 | 3846 | 3584 | 3584 | 100.0% |"), "{t}");
        assert!(t.contains("| 2 | 400 | 100000 | 250 | 24 | 500 |"), "{t}");
        assert!(t.contains("1.00% of one CPU"), "{t}");
        assert!(t.contains("1.00% (10000000 ticks)"), "{t}");
    }

    #[test]
    fn parses_bench_lines() {
        let text = "noise\r\nUXEN-BENCH: fork mib=16 cow=100 copy=5000\r\nUXEN-BENCH: forkx mib=1\n[  1.0] UXEN-BENCH: fork mib=64 cow=110 copy=20000\n";
        let r = rows(text, "fork");
        assert_eq!(r.len(), 2);
        assert_eq!(num(&r[1], "copy").unwrap(), 20000);
        let t = fork_table(&r).unwrap();
        assert!(t.contains("| 16 MiB | 100 | 5000 | 50.0x | 6 |"), "{t}");
        assert!(num(&r[0], "nope").is_err());
    }

    #[test]
    fn linux_table_rates_by_reason() {
        let text = "UXEN-BENCH: linux-host-idle secs=10 hlt=20 vmcall=10\n\
                    UXEN-BENCH: linux-boot mem_mib=64 ticks=150000000 tsc_khz=50000\n\
                    UXEN-BENCH: linux-guest-idle secs=10 hlt=1000 msr_write=500 \n\
                    UXEN-BENCH: linux-host-with-guest secs=10 hlt=30 vmcall=40\n";
        let marks = vec![("boot-start".to_string(), Duration::from_millis(1000)), ("boot-end".to_string(), Duration::from_millis(4500))];
        let t = linux_table(text, &marks).unwrap();
        assert!(t.contains("| 150000000 (3.00 emulated s) |"), "{t}");
        assert!(t.contains("| 3.5 |"), "{t}");
        assert!(t.contains("| idle guest, exits per emulated second | 150.0 |"), "{t}");
        assert!(t.contains("| 7.0 | 3.0 |"), "{t}");
        assert!(t.contains("| hlt | 100.0 | 3.0 | 2.0 |"), "{t}");
        assert!(t.contains("| msr_write | 50.0 | 0 | 0 |"), "{t}");
        assert!(linux_table("UXEN-BENCH: linux-boot ticks=1\n", &[]).is_err());
    }

    #[test]
    fn exits_table_has_ratios() {
        let text = "UXEN-BENCH: cpuid native=40 virtualized=4040\nUXEN-BENCH: exits idle_exits=10 idle_tsc=1000000 work_exits=300 work_tsc=2000000\n";
        let t = exits_table(&rows(text, "cpuid"), &rows(text, "exits")).unwrap();
        assert!(t.contains("| 4040 | 40 | 101.0x |"), "{t}");
        assert!(t.contains("| 4000 |"), "{t}");
        assert!(t.contains("| 150.0 | 10.0 | 15.00x |"), "{t}");
        assert!(exits_table(&[], &[]).is_err());
    }
}
