//! Paths, command running and small helpers shared by the xtask commands.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `target/uxen`: where every artifact lands.
pub fn out() -> PathBuf {
    root().join("target/uxen")
}

/// Build products that are not contract artifacts.
pub fn work() -> PathBuf {
    out().join("build")
}

/// The cache outside the repository (kernel build, bindgen).
pub fn cache() -> PathBuf {
    if let Some(d) = std::env::var_os("UXEN_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("uxen-rs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/uxen-rs")
}

/// Debian's rustc, which ships `rust-src` (the kernel and the image need it).
pub const SYS_RUSTC: &str = "/usr/bin/rustc";
pub const SYS_CARGO: &str = "/usr/bin/cargo";

pub fn bindgen() -> PathBuf {
    cache().join("tools/bin/bindgen")
}

/// Number of parallel jobs for make.
pub fn jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// Prints a step heading.
pub fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

/// Runs a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// Runs a command with its output going to `log`; on failure prints the
/// log's tail.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    std::fs::create_dir_all(log.parent().unwrap())?;
    let f = std::fs::File::create(log)?;
    let status = cmd
        .stdout(f.try_clone()?)
        .stderr(f)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for l in tail.iter().rev() {
            eprintln!("    {l}");
        }
        bail!("command failed ({status}), log in {}: {cmd:?}", log.display());
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.stderr(Stdio::null()).output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !o.status.success() {
        bail!("command failed ({}): {cmd:?}", o.status);
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// First line of `cmd`'s output, or "not found".
pub fn version_of(cmd: &mut Command) -> String {
    match cmd.stderr(Stdio::null()).output() {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            s.lines().next().unwrap_or("").trim().to_string()
        }
        _ => "not found".to_string(),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Times a closure and reports it.
pub fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = Instant::now();
    let r = f();
    eprintln!("    {what}: {:.1}s", t0.elapsed().as_secs_f64());
    r
}

/// Copies a file, creating the destination's directory.
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().unwrap())?;
    std::fs::copy(from, to).with_context(|| format!("copy {} -> {}", from.display(), to.display()))?;
    Ok(())
}
