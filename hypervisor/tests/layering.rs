//! The hypervisor's layers (`docs/design.md`, "Layers"), checked over the
//! source: dependencies run one way, `shared-abi` <- the portable core <-
//! `hv` <- `arch/x86`, where `arch` is the bottom. `launch` (the late
//! launch, which sets `hv` up) is at the level of `hv`. `arch` names
//! nothing of `hv` or `launch`; the core names neither of them nor
//! `arch::x86::instr` (the privileged instructions), so that it builds and
//! runs on the host.

use std::path::{Path, PathBuf};

/// Which layer a source file (relative to `src/`) belongs to.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Layer {
    Arch,
    Hv,
    Core,
    /// The crate roots: they wire the layers together.
    Root,
}

fn layer(rel: &Path) -> Layer {
    let s = rel.to_string_lossy().replace('\\', "/");
    if s.starts_with("arch/") {
        Layer::Arch
    } else if s.starts_with("hv/") || s.starts_with("launch/") {
        Layer::Hv
    } else if s == "lib.rs" || s == "main.rs" {
        Layer::Root
    } else {
        Layer::Core
    }
}

/// The code of `text`, without `//` comments (doc comments included).
fn code(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.split("//").next().unwrap_or(""))).filter(|(_, l)| !l.trim().is_empty())
}

/// The paths a file of `layer` must not name.
fn forbidden(layer: Layer) -> &'static [&'static str] {
    match layer {
        Layer::Arch => &["crate::hv", "super::super::hv", "hv::run", "hv::memory", "hv::exits", "crate::launch"],
        Layer::Core => &["crate::hv", "super::hv", "crate::launch", "x86::instr", "x86::vmx", "x86::cpu"],
        Layer::Hv | Layer::Root => &[],
    }
}

/// The layering violations of one file: `file:line: names PATH`.
fn violations(rel: &Path, text: &str) -> Vec<String> {
    let bad = forbidden(layer(rel));
    code(text)
        .flat_map(|(n, l)| bad.iter().filter(move |b| l.contains(*b)).map(move |b| format!("{}:{n}: names {b}", rel.display())))
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_layers_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let mut bad = Vec::new();
    let mut counted = [0usize; 3];
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        match layer(rel) {
            Layer::Arch => counted[0] += 1,
            Layer::Hv => counted[1] += 1,
            Layer::Core => counted[2] += 1,
            Layer::Root => {}
        }
        bad.extend(violations(rel, &std::fs::read_to_string(f).unwrap()));
    }
    assert!(counted.iter().all(|&c| c > 0), "a layer has no files: {counted:?}");
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn the_check_catches_each_kind_of_violation() {
    // arch reaching up into hv, as cpu.rs once held hv::run::Running.
    let v = violations(Path::new("arch/x86/cpu.rs"), "pub guest: Option<Box<crate::hv::run::Running>>,\n");
    assert_eq!(v, ["arch/x86/cpu.rs:1: names crate::hv", "arch/x86/cpu.rs:1: names hv::run"]);
    // The core using a privileged instruction or hv.
    assert_eq!(violations(Path::new("ept.rs"), "use crate::arch::x86::instr;\n").len(), 1);
    assert_eq!(violations(Path::new("policy/mod.rs"), "fn f() { crate::hv::hv(); }\n").len(), 1);
    // Either reaching into the launch code, which only `hv` may name.
    assert_eq!(violations(Path::new("arch/x86/vmx.rs"), "crate::launch::image::heap_usage();\n").len(), 1);
    assert_eq!(violations(Path::new("ept.rs"), "use crate::launch::image;\n").len(), 1);
    // Comments and the layers allowed to are not violations.
    assert!(violations(Path::new("arch/x86/apic.rs"), "/// see `crate::hv::tlb`\n// crate::hv\n").is_empty());
    assert!(violations(Path::new("hv/run.rs"), "use crate::arch::x86::instr;\n").is_empty());
    assert!(violations(Path::new("launch/percpu.rs"), "use crate::arch::x86::instr;\nuse crate::hv::Hv;\n").is_empty());
    assert!(violations(Path::new("ept.rs"), "use crate::arch::x86::ept_entry::EptEntry;\n").is_empty());
}
