//! The two Linux 6.12 kernels, each built from `tinyconfig` plus a fragment
//! and cached outside the repository by the hash of the fragment and of the
//! toolchain: the host kernel with `CONFIG_RUST=y` (`xtask/kernel/uxen.config`)
//! that loads the module, and the small guest kernel that runs inside a VM
//! (`xtask/kernel/guest.config`).

use crate::util::{self, step};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// One kernel configuration and how it is built and cached.
pub struct Flavour {
    /// Shown in progress lines.
    name: &'static str,
    /// The configuration fragment, relative to the repository root.
    fragment: &'static str,
    /// The cache directory is `<prefix>-<key>`; the log is `logs/<prefix>.log`.
    prefix: &'static str,
    /// The `make` targets.
    targets: &'static [&'static str],
    /// Whether the configuration has `CONFIG_RUST=y`, so that the toolchain
    /// must pass `make rustavailable` first.
    rust: bool,
}

/// The host kernel: Rust, modules, PCI, ACPI and the IOMMU.
pub const HOST: Flavour = Flavour {
    name: "kernel",
    fragment: "xtask/kernel/uxen.config",
    prefix: "kernel",
    targets: &["bzImage", "modules"],
    rust: true,
};

/// The guest kernel: no modules, no ACPI, no PCI.
pub const GUEST: Flavour = Flavour {
    name: "guest kernel",
    fragment: "xtask/kernel/guest.config",
    prefix: "kernel-guest",
    targets: &["bzImage"],
    rust: false,
};

/// `make` with the variables the kernel and every module must share.
pub fn make() -> Command {
    let mut c = Command::new("make");
    c.arg("LLVM=1")
        .arg(format!("RUSTC={}", util::SYS_RUSTC))
        .arg(format!("BINDGEN={}", util::bindgen().display()));
    c
}

/// `make` for building modules against the tree `kb`: with `LLVM=1` only
/// where that kernel was built with clang, as Kbuild wants one compiler for
/// a kernel and its modules.
pub fn make_for(kb: &Path) -> Command {
    let clang = std::fs::read_to_string(kb.join(".config")).map(|c| c.lines().any(|l| l == "CONFIG_CC_IS_CLANG=y")).unwrap_or(true);
    let mut c = Command::new("make");
    if clang {
        c.arg("LLVM=1");
    }
    c.arg(format!("RUSTC={}", util::SYS_RUSTC)).arg(format!("BINDGEN={}", util::bindgen().display()));
    c
}

/// The kernel source tree (extracted once into the cache).
pub fn source_dir() -> PathBuf {
    util::cache().join("linux-source-6.12")
}

/// The host kernel's cache key (`cargo xtask kernel-key`).
pub fn key() -> Result<String> {
    HOST.key()
}

impl Flavour {
    fn fragment(&self) -> PathBuf {
        util::root().join(self.fragment)
    }

    /// The cache key: the fragment and every tool that shapes the build.
    pub fn key(&self) -> Result<String> {
        let mut k = std::fs::read(self.fragment()).with_context(|| format!("{} fragment", self.name))?;
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
    pub fn build_dir(&self) -> Result<PathBuf> {
        Ok(util::cache().join(format!("{}-{}", self.prefix, self.key()?)))
    }

    /// Builds the kernel unless the cache has it; returns the build directory.
    pub fn build(&self) -> Result<PathBuf> {
        let kb = self.build_dir()?;
        let done = kb.join(".uxen-done");
        if done.exists() && kb.join("arch/x86/boot/bzImage").exists() {
            eprintln!("    {}: cached in {}", self.name, kb.display());
            return Ok(kb);
        }
        step(&format!("{}: building Linux 6.12 into {} (a few minutes)", self.name, kb.display()));
        let src = source_dir();
        if !src.join("Makefile").exists() {
            std::fs::create_dir_all(util::cache())?;
            util::run(Command::new("tar").args(["-xf", SOURCE_TARBALL, "-C"]).arg(util::cache()))?;
        }
        let log = util::cache().join(format!("logs/{}.log", self.prefix));
        if self.rust {
            util::run_logged(make().current_dir(&src).arg("rustavailable"), &log)
                .context("the kernel says Rust is not available with this toolchain")?;
        }
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
                .arg(self.fragment()),
            &log,
        )?;
        util::run_logged(make().current_dir(&src).arg(&o).arg("olddefconfig"), &log)?;
        check_config(&self.fragment(), &kb.join(".config"))?;
        util::timed(&format!("{} build", self.name), || {
            util::run_logged(
                make().current_dir(&src).arg(&o).arg(format!("-j{}", util::jobs())).args(self.targets),
                &log,
            )
        })?;
        std::fs::write(&done, b"")?;
        Ok(kb)
    }
}

/// Fails unless the final `.config` has every setting of the fragment:
/// Kconfig drops a symbol whose dependencies are missing without a word, and
/// the kernel would then build and fail only when it boots.
fn check_config(fragment: &Path, config: &Path) -> Result<()> {
    let lost = lost_settings(
        &std::fs::read_to_string(fragment).with_context(|| format!("read {}", fragment.display()))?,
        &std::fs::read_to_string(config).with_context(|| format!("read {}", config.display()))?,
    );
    if !lost.is_empty() {
        bail!(
            "the kernel config lost these settings of {} (missing dependencies?): {}",
            fragment.display(),
            lost.join(", ")
        );
    }
    Ok(())
}

/// The settings of `fragment` that `config` does not have: a `CONFIG_X=v`
/// whose value is absent or different, or a `# CONFIG_X is not set` whose
/// symbol is set. A symbol that is off need not be listed as `is not set`:
/// Kconfig leaves out the symbols it does not offer at all.
fn lost_settings(fragment: &str, config: &str) -> Vec<String> {
    let have: HashMap<&str, &str> = config
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| {
            if let Some(off) = l.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
                off.starts_with("CONFIG_") && have.contains_key(off)
            } else if let Some((sym, val)) = l.split_once('=').filter(|_| l.starts_with("CONFIG_")) {
                have.get(sym) != Some(&val)
            } else {
                false
            }
        })
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::lost_settings;

    const CONFIG: &str = "\
# comment
CONFIG_SMP=y
CONFIG_NR_CPUS=8
CONFIG_CMDLINE=\"a b\"
# CONFIG_PCI is not set
";

    #[test]
    fn kept_settings_pass() {
        let frag = "# heading\nCONFIG_SMP=y\nCONFIG_NR_CPUS=8\nCONFIG_CMDLINE=\"a b\"\n# CONFIG_PCI is not set\n";
        assert!(lost_settings(frag, CONFIG).is_empty());
    }

    #[test]
    fn dropped_or_changed_values_are_lost() {
        let frag = "CONFIG_X86_X2APIC=y\nCONFIG_NR_CPUS=4\nCONFIG_SMP=y\n";
        assert_eq!(lost_settings(frag, CONFIG), ["CONFIG_X86_X2APIC=y", "CONFIG_NR_CPUS=4"]);
    }

    #[test]
    fn not_set_means_absent_or_off() {
        // ACPI is not offered at all in CONFIG, which is as good as off.
        let frag = "# CONFIG_ACPI is not set\n# CONFIG_PCI is not set\n# CONFIG_SMP is not set\n";
        assert_eq!(lost_settings(frag, CONFIG), ["# CONFIG_SMP is not set"]);
    }
}
