//! `xtask setup`: installs and checks everything the build and the
//! emulators need. Idempotent: it installs only what is missing.

use crate::util::{self, step};
use anyhow::{bail, Result};
use std::process::Command;

/// Debian packages, with why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 with rust-src, for the kernel, the module and the image"),
    ("cargo-web", "cargo for the bare-metal image"),
    ("rust-web-src", "core/alloc sources for -Zbuild-std"),
    ("libstd-rust-web-dev", "std for the Debian rustc"),
    ("clang", "the kernel is built with LLVM=1"),
    ("lld", "ld.lld links the kernel and the image"),
    ("llvm", "llvm-objcopy, llvm-objdump, llvm-ar"),
    ("libclang-dev", "libclang for bindgen"),
    ("linux-source-6.12", "the Linux 6.12 sources"),
    ("make", "kernel build"),
    ("bc", "kernel build"),
    ("flex", "kernel build"),
    ("bison", "kernel build"),
    ("libelf-dev", "kernel build (objtool)"),
    ("libssl-dev", "kernel build"),
    ("cpio", "initramfs"),
    ("kmod", "modinfo"),
    ("xz-utils", "unpacking the kernel sources"),
    ("lz4", "CONFIG_KERNEL_LZ4"),
    ("gcc", "static C runtime for the in-guest tools"),
    ("libc6-dev", "static C runtime for the in-guest tools"),
    ("busybox-static", "the initramfs userland"),
    ("grub-pc-bin", "the Bochs boot ISO"),
    ("grub-common", "grub-mkrescue"),
    ("xorriso", "the Bochs boot ISO"),
    ("mtools", "the Bochs boot ISO"),
    ("qemu-system-x86", "QEMU TCG runner (VT-d tests)"),
    ("ovmf", "UEFI firmware for QEMU (the vtd-uefi suite)"),
    ("bochs", "Bochs runner (VMX tests)"),
    ("bochs-term", "Bochs terminal display"),
    ("bochsbios", "Bochs BIOS"),
    ("vgabios", "Bochs VGA BIOS"),
];

pub const BINDGEN_VERSION: &str = "0.69.5";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn setup() -> Result<()> {
    step("setup: checking the toolchain and the emulators");
    let missing: Vec<&str> = PACKAGES.iter().map(|p| p.0).filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("    installing: {}", missing.join(" "));
        if !is_root() {
            bail!(
                "missing Debian packages: {}. Run as root, or install them with: \
                 sudo apt-get install {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        let log = util::cache().join("logs/apt.log");
        util::run_logged(Command::new("apt-get").arg("update"), &log)
            .map_err(|e| anyhow::anyhow!("apt-get update failed ({e}); check the network and /etc/apt/sources.list"))?;
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing);
        util::run_logged(&mut cmd, &log).map_err(|e| {
            anyhow::anyhow!(
                "apt-get install failed ({e}). The packages come from Debian 12 \
                 (bookworm and bookworm-security); rustc-web 1.96 is in bookworm-security."
            )
        })?;
        let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
        if !still.is_empty() {
            let why: Vec<String> = PACKAGES
                .iter()
                .filter(|p| still.contains(&p.0))
                .map(|p| format!("{} ({})", p.0, p.1))
                .collect();
            bail!("could not install: {}", why.join(", "));
        }
    }
    if !util::bindgen().exists()
        || !util::version_of(Command::new(util::bindgen()).arg("--version")).contains(BINDGEN_VERSION)
    {
        eprintln!("    installing bindgen-cli {BINDGEN_VERSION} from crates.io");
        let log = util::cache().join("logs/bindgen.log");
        util::run_logged(
            Command::new("cargo").args([
                "install",
                "--locked",
                "bindgen-cli",
                "--version",
                BINDGEN_VERSION,
                "--root",
                util::cache().join("tools").to_str().unwrap(),
            ]),
            &log,
        )
        .map_err(|e| anyhow::anyhow!("cannot install bindgen-cli from crates.io: {e}"))?;
    }
    report()?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Prints the versions found; fails when the Debian rustc is not 1.96.
pub fn report() -> Result<()> {
    let rustc = util::version_of(Command::new(util::SYS_RUSTC).arg("--version"));
    let pkgver = |p: &str| {
        util::version_of(Command::new("dpkg-query").args(["-W", "-f=${Version}", p]))
    };
    eprintln!("    rustc (kernel, image): {rustc}");
    eprintln!("    rustc (host tools):    {}", util::version_of(Command::new("rustc").arg("--version")));
    eprintln!("    bindgen:               {}", util::version_of(Command::new(util::bindgen()).arg("--version")));
    eprintln!("    clang:                 {}", util::version_of(Command::new("clang").arg("--version")));
    eprintln!("    ld.lld:                {}", util::version_of(Command::new("ld.lld").arg("--version")));
    eprintln!("    linux-source-6.12:     {}", pkgver("linux-source-6.12"));
    eprintln!("    bochs:                 {}", pkgver("bochs"));
    eprintln!("    qemu-system-x86:       {}", pkgver("qemu-system-x86"));
    eprintln!("    ovmf:                  {}", pkgver("ovmf"));
    eprintln!("    busybox-static:        {}", pkgver("busybox-static"));
    eprintln!("    grub-pc-bin:           {}", pkgver("grub-pc-bin"));
    if !rustc.contains("1.96") {
        bail!("{} is not rustc 1.96 (found: {rustc}); install rustc-web from bookworm-security", util::SYS_RUSTC);
    }
    Ok(())
}
