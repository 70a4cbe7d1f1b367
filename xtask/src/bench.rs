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
use std::process::Command;
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
            uefi: false,
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
            "fork" => fork_table(&rows(&text, "fork"))? + "\n" + &cow_table(&rows(&text, "cow"))?,
            "exits" => exits_table(&rows(&text, "cpuid"), &text)?,
            "linux" => {
                let mut t = linux_table(&text, &o.marks)?;
                t += "\n";
                t += &clones_table(&text)?;
                let svg = dir.join("linux-frames.svg");
                frames_chart(&svg, &series(&text, "linux-clones")?, &series(&text, "linux-separate")?, &series(&text, "linux-merged")?)?;
                writeln!(t, "\nchart: {}", svg.strip_prefix(util::root()).unwrap_or(&svg).display())?;
                t
            }
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
    let (mut auto, mut index) = (None, None);
    for r in rows {
        if r.contains_key("auto") {
            auto = Some(r);
            continue;
        }
        if r.contains_key("index") {
            index = Some(r);
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
    if let Some(r) = index {
        let f = |k| num(r, k);
        writeln!(t, "\nafter the second pass: {} pages skipped unread (mapped onto a stable frame); the index holds {} frames ({} stable) in {} pool frames, {} heap bytes", f("skipped")?, f("indexed")?, f("stable")?, f("index_frames")?, f("index_heap_bytes")?)?;
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

/// The `N:FRAMES` pairs of the bench line `name`, in order.
fn series(text: &str, name: &str) -> Result<Vec<(u64, u64)>> {
    let line = text
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(MARK).map(|(_, r)| r))
        .find_map(|r| r.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .with_context(|| format!("the bench printed no `{name}` line"))?;
    let v: Vec<(u64, u64)> = line
        .split_whitespace()
        .map(|w| {
            let (n, f) = w.split_once(':').with_context(|| format!("`{w}` in `{name}` is not N:FRAMES"))?;
            Ok((n.parse().with_context(|| format!("`{w}` in `{name}`"))?, f.parse().with_context(|| format!("`{w}` in `{name}`"))?))
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        bail!("the `{name}` line has no figures");
    }
    Ok(v)
}

/// Forks of a booted Linux guest against its boot; frames for clones and
/// for separately booted guests with and without a merge; the goals.
fn clones_table(text: &str) -> Result<String> {
    let forks = rows(text, "linux-fork");
    if forks.len() != 2 {
        bail!("the linux bench printed {} fork lines, not 2 (64 and 256 MiB)", forks.len());
    }
    let (clones, sep, merged) = (series(text, "linux-clones")?, series(text, "linux-separate")?, series(text, "linux-merged")?);
    let mut t = String::new();
    writeln!(t, "clones of a booted Linux guest, emulated TSC ticks (baseline: booting the same guest, in the same run)\n")?;
    writeln!(t, "| guest | fork | boot | boot / fork | goal: fork < 20,000 |")?;
    writeln!(t, "|---|---:|---:|---:|---|")?;
    let mut first = None;
    for r in &forks {
        let (mib, fork, boot) = (num(r, "mem_mib")?, num(r, "fork")?, num(r, "boot")?);
        writeln!(t, "| {mib} MiB | {fork} | {boot} | {:.0}x | {} |", boot as f64 / fork.max(1) as f64, if fork < 20_000 { "met" } else { "missed" })?;
        if let Some(a) = r.get("first_answer") {
            first = Some((a.parse::<u64>().context("first_answer")?, boot));
        }
    }
    if let Some((a, boot)) = first {
        writeln!(t, "\n| the clone's first answer, from the fork (`uxenctl fork`, `console --send`, the shell's echo) | {a} ticks | {:.1}% of a boot | goal < 1% |", a as f64 * 100.0 / boot.max(1) as f64)?;
    }
    let at = |v: &[(u64, u64)], n: u64| v.iter().find(|(k, _)| *k == n).map(|(_, f)| *f);
    let one = at(&clones, 1).context("no frames for the guest alone")?;
    writeln!(t, "\nframes in use against the number of guests (each after running a command)\n")?;
    writeln!(t, "| guests | clones | separately booted | separately booted, merged |")?;
    writeln!(t, "|---:|---:|---:|---:|")?;
    let mut ns: Vec<u64> = clones.iter().chain(&sep).chain(&merged).map(|(n, _)| *n).collect();
    ns.sort_unstable();
    ns.dedup();
    let cell = |v: &[(u64, u64)], n: u64| at(v, n).map_or("".to_string(), |f| f.to_string());
    for n in ns {
        writeln!(t, "| {n} | {} | {} | {} |", cell(&clones, n), cell(&sep, n), cell(&merged, n))?;
    }
    if let Some(c) = clones.last() {
        writeln!(t, "\n{} guests as clones: {:.2}x the frames of one (goal < 1.5x)", c.0, c.1 as f64 / one.max(1) as f64)?;
    }
    if let (Some(b), Some(a)) = (sep.iter().max(), merged.iter().max()) {
        writeln!(t, "{} separately booted guests: {} frames, {} after a merge: {:.0}% recovered (goal >= 60%)", b.0, b.1, a.1, (b.1.saturating_sub(a.1)) as f64 * 100.0 / b.1.max(1) as f64)?;
    }
    Ok(t)
}

/// The frames chart: frames in use against the number of guests, for
/// clones, separately booted guests, and those merged; an SVG at `path`,
/// titled with the commit it was measured on.
fn frames_chart(path: &std::path::Path, clones: &[(u64, u64)], sep: &[(u64, u64)], merged: &[(u64, u64)]) -> Result<()> {
    use plotters::prelude::*;
    let commit = util::output(Command::new("git").current_dir(util::root()).args(["describe", "--always", "--dirty"])).unwrap_or_else(|_| "unknown".into());
    let max_n = clones.iter().chain(sep).chain(merged).map(|(n, _)| *n).max().unwrap_or(1);
    let max_f = clones.iter().chain(sep).chain(merged).map(|(_, f)| *f).max().unwrap_or(1);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the chart: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Linux guests (64 MiB): frames in use, commit {}", commit.trim()), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..max_n + 1, 0u64..max_f + max_f / 10 + 1)
        .map_err(e)?;
    chart.configure_mesh().x_desc("guests").y_desc("frames in use (4 KiB)").draw().map_err(e)?;
    for (data, color, label) in [(sep, RED, "separately booted"), (merged, BLUE, "separately booted, merged"), (clones, GREEN, "clones of one booted guest")] {
        let mut d = data.to_vec();
        d.sort_unstable();
        chart.draw_series(LineSeries::new(d.iter().copied(), color.stroke_width(2))).map_err(e)?.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(d.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(e)?;
    }
    chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// The first write to a shared page after a fork, in the parent and the
/// child, against a plain 4 KiB copy in the same guest.
fn cow_table(rows: &[Row]) -> Result<String> {
    if rows.len() != 2 {
        bail!("the fork bench printed {} copy-on-write lines, not 2 (parent and child)", rows.len());
    }
    let mut t = String::new();
    writeln!(t, "copy-on-write: the first write to a page shared since a fork, as the guest times it (TSC ticks, median of 8)")?;
    writeln!(t, "baseline: a plain 4 KiB copy between two of the guest's own pages, in the same run\n")?;
    writeln!(t, "| side | first write in a 2 MiB range (page + EPT tables) | next page in that range | 4 KiB copy | first / copy | next / copy |")?;
    writeln!(t, "|---|---:|---:|---:|---:|---:|")?;
    for r in rows {
        let side = r.get("side").context("a copy-on-write line without its side")?;
        let (first, next, copy) = (num(r, "first")?, num(r, "next")?, num(r, "copy4k")?);
        let x = |n: u64| n as f64 / copy.max(1) as f64;
        writeln!(t, "| {side} | {first} | {next} | {copy} | {:.1}x | {:.1}x |", x(first), x(next))?;
    }
    Ok(t)
}

/// The host's exits in one bench window: per CPU, by reason, and the
/// TSC ticks the window lasted.
#[derive(Debug, PartialEq)]
struct Window {
    name: String,
    ticks: u64,
    cpus: Vec<BTreeMap<String, u64>>,
}

const EXITS_MARK: &str = "UXEN-EXITS: ";

/// `exits.host.cpus` of a stats JSON text: each CPU's exits by reason.
fn host_exits(json: &str) -> Result<Vec<BTreeMap<String, u64>>> {
    let v: serde_json::Value = serde_json::from_str(json).context("the stats are not JSON")?;
    let cpus = v.pointer("/exits/host/cpus").and_then(|c| c.as_array()).context("the stats have no exits.host.cpus")?;
    cpus.iter()
        .map(|c| {
            let m = c.as_object().context("a CPU's exits are not an object")?;
            m.iter().map(|(k, n)| Ok((k.clone(), n.as_u64().with_context(|| format!("exits.{k} is not a count"))?))).collect()
        })
        .collect()
}

/// The `UXEN-EXITS: NAME before|after tsc=T JSON` pairs of the bench's
/// output, as windows, in order.
fn windows(text: &str) -> Result<Vec<Window>> {
    let mut open: Option<(String, u64, Vec<BTreeMap<String, u64>>)> = None;
    let mut out = Vec::new();
    for l in text.lines().filter_map(|l| l.trim_end_matches('\r').split_once(EXITS_MARK).map(|(_, r)| r)) {
        let mut w = l.splitn(4, ' ');
        let (Some(name), Some(side), Some(tsc), Some(json)) = (w.next(), w.next(), w.next(), w.next()) else {
            bail!("a short exits line: {l}");
        };
        let tsc: u64 = tsc.strip_prefix("tsc=").and_then(|t| t.parse().ok()).with_context(|| format!("no TSC in: {l}"))?;
        let cpus = host_exits(json)?;
        match (side, open.take()) {
            ("before", None) => open = Some((name.to_string(), tsc, cpus)),
            ("after", Some((n, t0, c0))) if n == name => {
                if c0.len() != cpus.len() || tsc <= t0 {
                    bail!("window {name}: the CPUs or the TSC do not match up");
                }
                let cpus = c0
                    .iter()
                    .zip(&cpus)
                    .map(|(b, a)| a.iter().map(|(k, n)| (k.clone(), n.saturating_sub(*b.get(k).unwrap_or(&0)))).filter(|(_, n)| *n > 0).collect())
                    .collect();
                out.push(Window { name: name.to_string(), ticks: tsc - t0, cpus });
            }
            _ => bail!("exits lines out of order at: {name} {side}"),
        }
    }
    if open.is_some() {
        bail!("an exits window that never closed");
    }
    Ok(out)
}

/// The goal of issue "the host at native speed": at most this many host
/// exits per million ticks on each CPU, in every workload.
const EXITS_GOAL: f64 = 1.0;

/// CPUID round trips against the bare machine; the host's exits per CPU and
/// reason per million TSC ticks in each workload window.
fn exits_table(cpuid: &[Row], text: &str) -> Result<String> {
    let Some(c) = cpuid.first() else {
        bail!("the exits bench printed no CPUID figures");
    };
    let ws = windows(text)?;
    if ws.is_empty() {
        bail!("the exits bench printed no windows");
    }
    let (native, virt) = (num(c, "native")?, num(c, "virtualized")?);
    let per_m = |n: u64, t: u64| n as f64 * 1e6 / t.max(1) as f64;
    let mut t = String::new();
    writeln!(t, "exits: emulated TSC ticks (Bochs advances the TSC with emulated instructions)\n")?;
    writeln!(t, "| figure | measured | baseline | ratio |")?;
    writeln!(t, "|---|---:|---:|---:|")?;
    writeln!(t, "| CPUID 0x40000000, ticks each (baseline: bare CPU) | {virt} | {native} | {:.1}x |", virt as f64 / native.max(1) as f64)?;
    writeln!(t, "| exit round trip, ticks (virtualized - bare) | {} | | |", virt.saturating_sub(native))?;
    writeln!(t, "\nhost exits per million ticks, per CPU, by reason (goal: at most {EXITS_GOAL} on each CPU in each workload)\n")?;
    let mut head = String::from("| reason |");
    let mut rule = String::from("|---|");
    for w in &ws {
        for i in 0..w.cpus.len() {
            write!(head, " {} cpu{i} |", w.name)?;
            rule.push_str("---:|");
        }
    }
    writeln!(t, "{head}\n{rule}")?;
    let mut reasons: Vec<&str> = ws.iter().flat_map(|w| w.cpus.iter().flat_map(|c| c.keys().map(String::as_str))).collect();
    reasons.sort();
    reasons.dedup();
    let mut row = |label: &str, f: &dyn Fn(&BTreeMap<String, u64>) -> u64| -> Result<()> {
        write!(t, "| {label} |")?;
        for w in &ws {
            for c in &w.cpus {
                write!(t, " {:.2} |", per_m(f(c), w.ticks))?;
            }
        }
        writeln!(t)?;
        Ok(())
    };
    row("**all**", &|c| c.values().sum())?;
    for r in &reasons {
        row(r, &|c| c.get(*r).copied().unwrap_or(0))?;
    }
    writeln!(t, "\n| workload | emulated ticks | worst CPU, exits per million ticks | goal met |")?;
    writeln!(t, "|---|---:|---:|---|")?;
    for w in &ws {
        let worst = w.cpus.iter().map(|c| per_m(c.values().sum(), w.ticks)).fold(0.0, f64::max);
        writeln!(t, "| {} | {} | {worst:.2} | {} |", w.name, w.ticks, if worst <= EXITS_GOAL { "yes" } else { "no" })?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_table_has_ratios() {
        let text = "UXEN-BENCH: merge pass=1 scanned=4000 tsc=12000000 merged=3584 ideal=3584 copy_tsc=2000000 copy_pages=520\n\
                    UXEN-BENCH: merge pass=2 scanned=400 tsc=100000 merged=0 ideal=0 copy_tsc=2000000 copy_pages=520\n\
                    UXEN-BENCH: merge index=1 skipped=3584 indexed=512 stable=512 index_frames=4 index_heap_bytes=32\n\
                    UXEN-BENCH: merge auto=1 thread_cs=20 elapsed_cs=2000 hv_tsc=10000000 tsc_khz=50000 interval_ms=100 batch=32 shared=3600\n";
        let t = merge_table(&rows(text, "merge")).unwrap();
        assert!(t.contains("| 1 | 4000 | 12000000 | 3000 | 2884 | 3000 | 3846 | 3584 | 3584 | 100.0% |"), "{t}");
        assert!(t.contains("| 2 | 400 | 100000 | 250 | 24 | 500 |"), "{t}");
        assert!(t.contains("1.00% of one CPU"), "{t}");
        assert!(t.contains("1.00% (10000000 ticks)"), "{t}");
        assert!(t.contains("3584 pages skipped unread"), "{t}");
        assert!(t.contains("512 frames (512 stable) in 4 pool frames, 32 heap bytes"), "{t}");
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
        let cow = "UXEN-BENCH: cow side=parent first=9000 next=6000 copy4k=300\nUXEN-BENCH: cow side=child first=9300 next=6100 copy4k=300\n";
        let t = cow_table(&rows(cow, "cow")).unwrap();
        assert!(t.contains("| parent | 9000 | 6000 | 300 | 30.0x | 20.0x |"), "{t}");
        assert!(cow_table(&rows(cow, "cow")[..1]).is_err());
    }

    #[test]
    fn clones_table_and_chart() {
        let text = "UXEN-BENCH: linux-fork mem_mib=64 fork=10300 boot=150000000 first_answer=18000000\n\
                    UXEN-BENCH: linux-fork mem_mib=256 fork=11000 boot=160000000\n\
                    UXEN-BENCH: linux-clones 1:5000 2:5100 33:6000\n\
                    UXEN-BENCH: linux-separate  1:5000 2:10000 8:40000\n\
                    UXEN-BENCH: linux-merged 1:5000 2:6000 8:12000\n";
        let t = clones_table(text).unwrap();
        assert!(t.contains("| 64 MiB | 10300 | 150000000 | 14563x | met |"), "{t}");
        assert!(t.contains("| 18000000 ticks | 12.0% of a boot |"), "{t}");
        assert!(t.contains("| 2 | 5100 | 10000 | 6000 |"), "{t}");
        assert!(t.contains("| 33 | 6000 |  |  |"), "{t}");
        assert!(t.contains("33 guests as clones: 1.20x"), "{t}");
        assert!(t.contains("40000 frames, 12000 after a merge: 70% recovered"), "{t}");
        let svg = std::env::temp_dir().join(format!("uxen-chart-{}.svg", std::process::id()));
        frames_chart(&svg, &series(text, "linux-clones").unwrap(), &series(text, "linux-separate").unwrap(), &series(text, "linux-merged").unwrap()).unwrap();
        let body = std::fs::read_to_string(&svg).unwrap();
        std::fs::remove_file(&svg).ok();
        assert!(body.starts_with("<svg") && body.contains("separately booted, merged"), "{}", &body[..200.min(body.len())]);
        // Lines missing or garbled: errors, not an empty chart.
        assert!(series("UXEN-BENCH: linux-clones 1:5 x\n", "linux-clones").is_err());
        assert!(series("", "linux-clones").is_err());
        assert!(clones_table("UXEN-BENCH: linux-fork mem_mib=64 fork=1 boot=2\n").is_err());
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
    fn exits_table_by_cpu_and_reason() {
        let j = |a: u64, b: u64, c: u64| format!(r#"{{"exits":{{"host":{{"total":{{}},"cpus":[{{"cpuid":{a},"vmcall":{b}}},{{"ept_violation":{c}}}]}},"guest":{{"total":{{}},"cpus":[]}}}}}}"#);
        let text = format!(
            "UXEN-BENCH: cpuid native=40 virtualized=4040\n\
             UXEN-EXITS: idle before tsc=1000000 {}\r\n\
             UXEN-EXITS: idle after tsc=3000000 {}\n\
             UXEN-EXITS: irqs before tsc=3000000 {}\n\
             UXEN-EXITS: irqs after tsc=4000000 {}\n",
            j(10, 5, 0),
            j(11, 5, 1),
            j(11, 5, 1),
            j(20, 7, 1)
        );
        let ws = windows(&text).unwrap();
        assert_eq!(ws[0], Window { name: "idle".into(), ticks: 2_000_000, cpus: vec![[("cpuid".to_string(), 1)].into(), [("ept_violation".to_string(), 1)].into()] });
        let t = exits_table(&rows(&text, "cpuid"), &text).unwrap();
        assert!(t.contains("| 4040 | 40 | 101.0x |"), "{t}");
        assert!(t.contains("| 4000 |"), "{t}");
        assert!(t.contains("| reason | idle cpu0 | idle cpu1 | irqs cpu0 | irqs cpu1 |"), "{t}");
        assert!(t.contains("| **all** | 0.50 | 0.50 | 11.00 | 0.00 |"), "{t}");
        assert!(t.contains("| cpuid | 0.50 | 0.00 | 9.00 | 0.00 |"), "{t}");
        assert!(t.contains("| idle | 2000000 | 0.50 | yes |"), "{t}");
        assert!(t.contains("| irqs | 1000000 | 11.00 | no |"), "{t}");
        // Nothing measured, a window left open, or lines out of order: errors.
        assert!(exits_table(&rows(&text, "cpuid"), "").is_err());
        assert!(windows(&format!("UXEN-EXITS: idle before tsc=1 {}\n", j(0, 0, 0))).is_err());
        assert!(windows(&format!("UXEN-EXITS: idle after tsc=1 {}\n", j(0, 0, 0))).is_err());
        assert!(windows("UXEN-EXITS: idle before tsc=1 {\"exits\":{}}\n").is_err());
    }
}
