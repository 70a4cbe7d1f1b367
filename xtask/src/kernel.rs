//! The Linux 6.12 kernel with `CONFIG_RUST=y`, built from the fragment in
//! `xtask/kernel/uxen.config` and cached outside the repository by the hash of
//! the fragment and of the toolchain.

use crate::util::{self, step};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

fn fragment() -> PathBuf {
    util::root().join("xtask/kernel/uxen.config")
}

/// `make` with the variables the kernel and every module must share.
pub fn make() -> Command {
    let mut c = Command::new("make");
    c.arg("LLVM=1")
        .arg(format!("RUSTC={}", util::SYS_RUSTC))
        .arg(format!("BINDGEN={}", util::bindgen().display()));
    c
}

/// The kernel source tree (extracted once into the cache).
pub fn source_dir() -> PathBuf {
    util::cache().join("linux-source-6.12")
}

/// The cache key: the fragment and every tool that shapes the build.
pub fn key() -> Result<String> {
    let mut k = std::fs::read(fragment()).context("kernel fragment")?;
    for v in [
        util::version_of(Command::new(util::SYS_RUSTC).arg("--version")),
        util::version_of(Command::new(util::bindgen()).arg("--version")),
        util::version_of(Command::new("clang").arg("--version")),
        util::version_of(Command::new("dpkg-query").args(["-W", "-f=${Version}", "linux-source-6.12"])),
    ] {
        k.extend_from_slice(v.as_bytes());
        k.push(b'\n');
    }
    Ok(util::sha256_hex(&k)[..16].to_string())
}

/// The kernel build directory (`O=`) for the current key.
pub fn build_dir() -> Result<PathBuf> {
    Ok(util::cache().join(format!("kernel-{}", key()?)))
}

/// Builds the kernel unless the cache has it; returns the build directory.
pub fn build() -> Result<PathBuf> {
    let kb = build_dir()?;
    let done = kb.join(".uxen-done");
    if done.exists() && kb.join("arch/x86/boot/bzImage").exists() {
        eprintln!("    kernel: cached in {}", kb.display());
        return Ok(kb);
    }
    step(&format!("kernel: building Linux 6.12 into {} (a few minutes)", kb.display()));
    let src = source_dir();
    if !src.join("Makefile").exists() {
        std::fs::create_dir_all(util::cache())?;
        util::run(Command::new("tar").args(["-xf", SOURCE_TARBALL, "-C"]).arg(util::cache()))?;
    }
    let log = util::cache().join("logs/kernel.log");
    util::run_logged(make().current_dir(&src).arg("rustavailable"), &log)
        .context("the kernel says Rust is not available with this toolchain")?;
    std::fs::create_dir_all(&kb)?;
    let o = format!("O={}", kb.display());
    util::run_logged(make().current_dir(&src).arg(&o).arg("tinyconfig"), &log)?;
    util::run_logged(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(&src)
            .env("KCONFIG_CONFIG", kb.join(".config"))
            .args(["-m", "-O"])
            .arg(&kb)
            .arg(kb.join(".config"))
            .arg(fragment()),
        &log,
    )?;
    util::run_logged(make().current_dir(&src).arg(&o).arg("olddefconfig"), &log)?;
    let config = std::fs::read_to_string(kb.join(".config"))?;
    let have: std::collections::HashSet<&str> = config.lines().collect();
    let missing: Vec<String> = std::fs::read_to_string(fragment())?
        .lines()
        .filter(|l| l.starts_with("CONFIG_") || l.starts_with("# CONFIG_"))
        .filter(|l| !have.contains(l))
        .map(String::from)
        .collect();
    if !missing.is_empty() {
        bail!("kernel config lost these settings (missing dependencies?): {}", missing.join(", "));
    }
    util::timed("kernel build", || {
        util::run_logged(
            make()
                .current_dir(&src)
                .arg(&o)
                .arg(format!("-j{}", util::jobs()))
                .args(["bzImage", "modules"]),
            &log,
        )
    })?;
    std::fs::write(&done, b"")?;
    Ok(kb)
}
