//! Everything the emulated machines boot: the module, the CLI, the in-guest
//! tools, the test guests, the Linux guest, the initramfs and the Bochs boot
//! ISOs.

use crate::util::{self, step};
use crate::{image, kernel};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `build` produced.
pub struct Artifacts {
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
}

/// Debian's busybox-static, the userland of the host and of the Linux guest.
const BUSYBOX: &str = "/bin/busybox";

/// The Linux guest that runs under `uxenctl run --kernel`, in
/// `target/uxen/linux-guest/`.
pub struct LinuxGuest {
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
}

pub fn build_all() -> Result<Artifacts> {
    let out = util::out();
    std::fs::create_dir_all(&out)?;
    let kb = kernel::HOST.build()?;
    util::copy(&kb.join("arch/x86/boot/bzImage"), &out.join("bzImage"))?;
    // For the debugger's dump of a hung run (`runner::hang_dump`).
    util::copy(&kb.join("System.map"), &out.join("System.map"))?;
    let guest = build_linux_guest()?;
    let flat = image::build()?;
    let flat_bytes = std::fs::read(&flat)?;
    step("module: building uxen.ko");
    build_module(&kb, &flat_bytes, &util::work().join("module"), &out.join("uxen.ko"))?;
    build_module(&kb, &image::corrupt(&flat_bytes), &util::work().join("module-corrupt"), &out.join("test/uxen-corrupt.ko"))?;
    build_kbuild(&kb, &util::root().join("tests/probe"), &util::work().join("probe"), "uxen_probe.ko", &out.join("test/uxen_probe.ko"))?;
    step("uxenctl and the in-guest test tools (static)");
    build_static("uxenctl", "uxenctl", &out.join("uxenctl"))?;
    build_static("uxen-tests", "uxtest", &out.join("test/uxtest"))?;
    build_guests()?;
    step("initramfs");
    let initramfs = build_initramfs(&kb, &guest)?;
    Ok(Artifacts { bzimage: out.join("bzImage"), initramfs })
}

/// The artifacts of an earlier `build_all`, without rebuilding.
pub fn existing() -> Result<Artifacts> {
    let out = util::out();
    let a = Artifacts { bzimage: out.join("bzImage"), initramfs: out.join("initramfs.cpio.gz") };
    anyhow::ensure!(a.bzimage.exists() && a.initramfs.exists(), "no artifacts yet: run `cargo xtask build`");
    Ok(a)
}

/// Stages the module sources with `shared-abi` beside them (the module takes
/// it in by `#[path]`) and the image to embed, then runs Kbuild.
pub fn build_module(kb: &Path, image: &[u8], stage: &Path, dest: &Path) -> Result<()> {
    let src = util::root();
    let drv = stage.join("host-driver");
    std::fs::create_dir_all(&drv)?;
    std::fs::create_dir_all(stage.join("shared-abi/src"))?;
    for e in std::fs::read_dir(src.join("host-driver"))? {
        let p = e?.path();
        if matches!(p.extension().and_then(|x| x.to_str()), Some("rs" | "c" | "h")) || p.file_name() == Some("Kbuild".as_ref()) {
            copy_if_changed(&p, &drv.join(p.file_name().unwrap()))?;
        }
    }
    for f in ["abi.rs", "validate.rs"] {
        copy_if_changed(&src.join("shared-abi/src").join(f), &stage.join("shared-abi/src").join(f))?;
    }
    write_if_changed(&drv.join("hypervisor.bin"), image)?;
    util::run_logged(
        kernel::make().arg("-C").arg(kb).arg(format!("M={}", drv.display())).arg("modules"),
        &stage.join("build.log"),
    )?;
    util::copy(&drv.join("uxen.ko"), dest)
}

/// Builds a plain Kbuild module directory (the test probe) out of tree.
fn build_kbuild(kb: &Path, src: &Path, stage: &Path, ko: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(stage)?;
    for e in std::fs::read_dir(src)? {
        let p = e?.path();
        copy_if_changed(&p, &stage.join(p.file_name().unwrap()))?;
    }
    util::run_logged(
        kernel::make().arg("-C").arg(kb).arg(format!("M={}", stage.display())).arg("modules"),
        &stage.join("build.log"),
    )?;
    util::copy(&stage.join(ko), dest)
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    write_if_changed(to, &std::fs::read(from)?)
}

/// Keeps mtimes stable so that Kbuild rebuilds only what changed.
fn write_if_changed(to: &Path, data: &[u8]) -> Result<()> {
    if std::fs::read(to).map(|d| d == data).unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(to, data).with_context(|| format!("write {}", to.display()))
}

/// Builds a workspace binary statically linked, for the emulated machines.
fn build_static(package: &str, bin: &str, dest: &Path) -> Result<()> {
    let target = "x86_64-unknown-linux-gnu";
    util::run_logged(
        Command::new("cargo")
            .current_dir(util::root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "--target", target, "-p", package, "--bin", bin]),
        &util::work().join(format!("logs/{bin}.log")),
    )?;
    util::copy(&util::root().join(format!("target/{target}/release/{bin}")), dest)
}

/// The test guests: static no_std ELF executables in `target/uxen/guests/`.
pub fn build_guests() -> Result<()> {
    let dir = util::root().join("tests/guests");
    if !dir.join("Cargo.toml").exists() {
        return Ok(());
    }
    step("test guests");
    let target = util::root().join("target/guests");
    util::run_logged(
        image::bare_cargo(&dir, &target).env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Clinker=ld.lld", "-Crelocation-model=static", &format!("-Clink-arg=-T{}", dir.join("guest.ld").display())].join("\x1f"),
        ),
        &util::work().join("logs/guests.log"),
    )?;
    let out = util::out().join("guests");
    std::fs::create_dir_all(&out)?;
    for e in std::fs::read_dir(dir.join("src/bin"))? {
        let p = e?.path();
        let name = p.file_stem().unwrap().to_str().unwrap().to_string();
        util::copy(&target.join("x86_64-unknown-none/release").join(&name), &out.join(&name))?;
    }
    Ok(())
}

/// The Linux guest: the guest kernel (with its `vmlinux` and `System.map`,
/// to read a guest's crash) and a busybox initramfs whose `/init` is
/// `tests/linux-guest/init`.
fn build_linux_guest() -> Result<LinuxGuest> {
    let kb = kernel::GUEST.build()?;
    let dir = util::out().join("linux-guest");
    let bzimage = dir.join("bzImage");
    util::copy(&kb.join("arch/x86/boot/bzImage"), &bzimage)?;
    util::copy(&kb.join("vmlinux"), &dir.join("vmlinux"))?;
    util::copy(&kb.join("System.map"), &dir.join("System.map"))?;
    step("linux guest: initramfs");
    let mut list = String::new();
    for d in ["/dev", "/proc", "/sys", "/bin", "/tmp", "/root", "/etc"] {
        list += &format!("dir {d} 0755 0 0\n");
    }
    list += &busybox_entries();
    list += &format!("file /init {} 0755 0 0\n", util::root().join("tests/linux-guest/init").display());
    let initramfs = dir.join("initramfs.cpio.gz");
    pack_cpio(&kb, &list, "linux-guest-initramfs", &initramfs)?;
    Ok(LinuxGuest { bzimage, initramfs })
}

/// The console node, which the kernel opens before devtmpfs is mounted, and
/// busybox with the `/bin/sh` that `/init`'s `#!` line needs before
/// `busybox --install` has run.
fn busybox_entries() -> String {
    format!(
        "nod /dev/console 0600 0 0 c 5 1\n\
         file /bin/busybox {BUSYBOX} 0755 0 0\n\
         slink /bin/sh busybox 0777 0 0\n"
    )
}

/// Packs a `gen_init_cpio` list into a gzip-compressed newc archive at
/// `dest`, with the `gen_init_cpio` of the kernel build `kb`; the list and the
/// raw archive stay in the work directory as `<stem>.list` and `<stem>.cpio`.
fn pack_cpio(kb: &Path, list: &str, stem: &str, dest: &Path) -> Result<()> {
    let list_path = util::work().join(format!("{stem}.list"));
    std::fs::create_dir_all(util::work())?;
    std::fs::write(&list_path, list)?;
    let raw = util::work().join(format!("{stem}.cpio"));
    let f = std::fs::File::create(&raw)?;
    util::run(Command::new(kb.join("usr/gen_init_cpio")).arg(&list_path).stdout(f))?;
    std::fs::create_dir_all(dest.parent().unwrap())?;
    let f = std::fs::File::create(dest)?;
    util::run(Command::new("gzip").args(["-6", "-n", "-c"]).arg(&raw).stdout(f))
}

/// The initramfs: busybox, the module, `uxenctl`, the in-guest tools and
/// scripts, the test guests, and the Linux guest in `/linux-guest/`.
fn build_initramfs(kb: &Path, guest: &LinuxGuest) -> Result<PathBuf> {
    let out = util::out();
    let root = util::root();
    let mut list = String::new();
    let dirs = ["/dev", "/proc", "/sys", "/bin", "/sbin", "/tmp", "/run", "/lib", "/lib/modules", "/tests", "/guests", "/etc", "/linux-guest"];
    for d in dirs {
        list += &format!("dir {d} 0755 0 0\n");
    }
    list += &busybox_entries();
    list += &format!("file /init {} 0755 0 0\n", root.join("tests/scripts/init").display());
    list += &format!("file /lib/modules/uxen.ko {} 0644 0 0\n", out.join("uxen.ko").display());
    list += &format!("file /lib/modules/uxen-corrupt.ko {} 0644 0 0\n", out.join("test/uxen-corrupt.ko").display());
    list += &format!("file /lib/modules/uxen_probe.ko {} 0644 0 0\n", out.join("test/uxen_probe.ko").display());
    list += &format!("file /bin/uxenctl {} 0755 0 0\n", out.join("uxenctl").display());
    list += &format!("file /bin/uxtest {} 0755 0 0\n", out.join("test/uxtest").display());
    for e in std::fs::read_dir(root.join("tests/scripts"))? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some("sh") {
            list += &format!("file /tests/{} {} 0755 0 0\n", p.file_name().unwrap().to_str().unwrap(), p.display());
        }
    }
    let guests = out.join("guests");
    if guests.exists() {
        for e in std::fs::read_dir(&guests)? {
            let p = e?.path();
            list += &format!("file /guests/{} {} 0755 0 0\n", p.file_name().unwrap().to_str().unwrap(), p.display());
        }
    }
    list += &format!("file /linux-guest/bzImage {} 0644 0 0\n", guest.bzimage.display());
    list += &format!("file /linux-guest/initramfs.cpio.gz {} 0644 0 0\n", guest.initramfs.display());
    let gz = out.join("initramfs.cpio.gz");
    pack_cpio(kb, &list, "initramfs", &gz)?;
    Ok(gz)
}

/// A boot ISO for Bochs whose kernel command line runs `suite`.
pub fn iso(a: &Artifacts, suite: &str, extra_args: &str) -> Result<PathBuf> {
    let dir = util::work().join(format!("iso/{suite}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("boot/grub"))?;
    util::copy(&a.bzimage, &dir.join("boot/bzImage"))?;
    util::copy(&a.initramfs, &dir.join("boot/initramfs.cpio.gz"))?;
    std::fs::write(
        dir.join("boot/grub/grub.cfg"),
        format!(
            "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n\
             set timeout=0\nset default=0\nmenuentry 'uxen-rs {suite}' {{\n  \
             linux /boot/bzImage {}\n  initrd /boot/initramfs.cpio.gz\n}}\n",
            kernel_cmdline(suite, extra_args)
        ),
    )?;
    let iso = util::out().join(format!("iso/{suite}.iso"));
    std::fs::create_dir_all(iso.parent().unwrap())?;
    util::run_logged(
        Command::new("grub-mkrescue").arg("-o").arg(&iso).arg(&dir),
        &util::work().join(format!("logs/iso-{suite}.log")),
    )?;
    Ok(iso)
}

/// The kernel command line of every test machine.
pub fn kernel_cmdline(suite: &str, extra: &str) -> String {
    format!("console=ttyS0,115200 quiet loglevel=4 uxen.suite={suite} {extra}").trim().to_string()
}
