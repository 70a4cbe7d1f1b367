//! Everything the emulated machines boot: the module, the CLI, the in-guest
//! tools, the test guests, the Linux guest, the initramfs and the Bochs boot
//! ISOs.

use crate::util::{self, step};
use crate::{image, kernel};
use anyhow::{bail, Context, Result};
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
    std::fs::create_dir_all(stage.join("shared-abi/src/abi"))?;
    for e in std::fs::read_dir(src.join("host-driver"))? {
        let p = e?.path();
        if matches!(p.extension().and_then(|x| x.to_str()), Some("rs" | "c" | "h")) || p.file_name() == Some("Kbuild".as_ref()) {
            copy_if_changed(&p, &drv.join(p.file_name().unwrap()))?;
        }
    }
    copy_if_changed(&src.join("shared-abi/src/validate.rs"), &stage.join("shared-abi/src/validate.rs"))?;
    for e in std::fs::read_dir(src.join("shared-abi/src/abi"))? {
        let p = e?.path();
        if p.extension() == Some("rs".as_ref()) {
            copy_if_changed(&p, &stage.join("shared-abi/src/abi").join(p.file_name().unwrap()))?;
        }
    }
    write_if_changed(&drv.join("hypervisor.bin"), image)?;
    util::run_logged(
        kernel::make_for(kb).arg("-C").arg(kb).arg(format!("M={}", drv.display())).arg("modules"),
        &stage.join("build.log"),
    )?;
    util::copy(&drv.join("uxen.ko"), dest)
}

/// Where `cargo xtask module` writes uxen.ko built for another kernel (the
/// test machines' module is `target/uxen/uxen.ko`).
pub fn kdir_module_path() -> PathBuf {
    util::out().join("module/uxen.ko")
}

/// The build tree of the running kernel, `cargo xtask module`'s default.
pub fn default_kdir() -> PathBuf {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    PathBuf::from(format!("/lib/modules/{}/build", release.trim()))
}

/// What `cargo xtask module` needs to know of a kernel build tree.
#[derive(Debug, PartialEq, Eq)]
pub struct KernelTree {
    /// `include/config/kernel.release`.
    pub release: String,
    /// `CONFIG_RUSTC_VERSION_TEXT`: the `rustc --version` of the compiler
    /// the kernel was built with.
    pub rustc: String,
}

/// The value of `key` in a `.config` or `auto.conf` text, without quotes.
fn config_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Checks that `dir` is a kernel build tree uxen.ko can be built against:
/// configured with `CONFIG_RUST=y`, prepared, Linux 6.12 or later, and
/// recording the rustc it was built with. Each failure is one line, said
/// before anything is built.
pub fn check_kernel_tree(dir: &Path) -> Result<KernelTree> {
    let d = dir.display();
    if !dir.is_dir() {
        bail!("{d}: no such kernel build tree; install the kernel's headers, or give --kdir DIR");
    }
    let Ok(config) = std::fs::read_to_string(dir.join(".config")) else {
        bail!("{d}: no .config, so CONFIG_RUST is not set; uxen.ko needs a Rust-enabled kernel");
    };
    if config_value(&config, "CONFIG_RUST").as_deref() != Some("y") {
        bail!("{d}: CONFIG_RUST is not set; uxen.ko needs a Rust-enabled kernel");
    }
    let auto = std::fs::read_to_string(dir.join("include/config/auto.conf")).unwrap_or_default();
    let Some(rustc) = config_value(&auto, "CONFIG_RUSTC_VERSION_TEXT").or_else(|| config_value(&config, "CONFIG_RUSTC_VERSION_TEXT")) else {
        bail!("{d}: the rustc the kernel was built with is unknown (no CONFIG_RUSTC_VERSION_TEXT in include/config/auto.conf or .config)");
    };
    let Ok(release) = std::fs::read_to_string(dir.join("include/config/kernel.release")) else {
        bail!("{d}: no include/config/kernel.release; prepare the tree first (make modules_prepare)");
    };
    let release = release.trim().to_string();
    let mut nums = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    if (nums.next().unwrap_or(0), nums.next().unwrap_or(0)) < (6, 12) {
        bail!("{d}: Linux {release}; uxen.ko needs Linux 6.12 or later");
    }
    Ok(KernelTree { release, rustc })
}

/// A Rust module must be built by the rustc that built its kernel: the
/// kernel's crates are only readable by that compiler.
pub fn check_rustc(dir: &Path, tree: &KernelTree, ours: &str) -> Result<()> {
    if ours != tree.rustc {
        bail!(
            "{}: the kernel was built with {}, but {} is {ours}; build uxen.ko with the kernel's rustc",
            dir.display(),
            tree.rustc,
            util::SYS_RUSTC
        );
    }
    Ok(())
}

/// The rustc every module is built with, as `rustc --version` says.
pub fn rustc_version() -> String {
    util::version_of(Command::new(util::SYS_RUSTC).arg("--version"))
}

/// `cargo xtask module`: uxen.ko, with the image embedded, built against
/// the kernel build tree `kdir` into [`kdir_module_path`], and `uxenctl`
/// beside it in `target/uxen/`, where `uxenctl check` finds the module.
pub fn build_kdir_module(kdir: &Path) -> Result<PathBuf> {
    let tree = check_kernel_tree(kdir)?;
    crate::setup::setup()?;
    let flat = std::fs::read(image::build()?)?;
    let dest = kdir_module_path();
    module_for_tree(kdir, &tree, &flat, &dest)?;
    step("uxenctl (static)");
    build_static("uxenctl", "uxenctl", &util::out().join("uxenctl"))?;
    Ok(dest)
}

/// Builds uxen.ko with the image `flat` against the checked tree `kdir`.
pub fn module_for_tree(kdir: &Path, tree: &KernelTree, flat: &[u8], dest: &Path) -> Result<()> {
    check_rustc(kdir, tree, &rustc_version())?;
    step(&format!("module: building uxen.ko against {} (Linux {})", kdir.display(), tree.release));
    // One staging directory per tree, so that Kbuild never mixes objects
    // built against different kernels.
    let key = util::sha256_hex(kdir.as_os_str().as_encoded_bytes());
    build_module(kdir, flat, &util::work().join(format!("module-kdir/{}", &key[..12])), dest)
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
/// `tests/linux-guest/init`, with `uxen-fork` in `/bin`.
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
    // The guest's own tool: `uxen-fork` forks the VM from a shell.
    build_static("uxenctl", "uxen-fork", &dir.join("uxen-fork"))?;
    list += &format!("file /bin/uxen-fork {} 0755 0 0\n", dir.join("uxen-fork").display());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up kernel build tree in a fresh temporary directory.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let d = std::env::temp_dir().join(format!("uxen-kdir-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("include/config")).unwrap();
            Tree(d)
        }

        fn file(self, path: &str, text: &str) -> Tree {
            std::fs::write(self.0.join(path), text).unwrap();
            self
        }

        fn check(&self) -> std::result::Result<KernelTree, String> {
            check_kernel_tree(&self.0).map_err(|e| e.to_string())
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const RUSTC: &str = "rustc 1.96.0 (ac68faa20 2026-05-25)";

    fn rust_tree(name: &str) -> Tree {
        Tree::new(name)
            .file(".config", &format!("CONFIG_CC_IS_CLANG=y\nCONFIG_RUSTC_VERSION=109600\nCONFIG_RUST=y\nCONFIG_RUSTC_VERSION_TEXT=\"{RUSTC}\"\n"))
            .file("include/config/auto.conf", &format!("CONFIG_RUST=y\nCONFIG_RUSTC_VERSION_TEXT={RUSTC}\n"))
            .file("include/config/kernel.release", "6.12.118\n")
    }

    #[test]
    fn a_rust_enabled_tree_passes() {
        let t = rust_tree("good");
        let k = t.check().unwrap();
        assert_eq!(k, KernelTree { release: "6.12.118".into(), rustc: RUSTC.into() });
        assert!(check_rustc(&t.0, &k, RUSTC).is_ok());
        // Later kernels too, distribution suffixes and all.
        let t = rust_tree("later").file("include/config/kernel.release", "6.15.0-3-amd64\n");
        assert_eq!(t.check().unwrap().release, "6.15.0-3-amd64");
        let t = rust_tree("seven").file("include/config/kernel.release", "7.0.1\n");
        assert!(t.check().is_ok());
        // The version text from .config when auto.conf lacks it.
        let t = rust_tree("dotconfig").file("include/config/auto.conf", "CONFIG_RUST=y\n");
        assert_eq!(t.check().unwrap().rustc, RUSTC);
    }

    #[test]
    fn trees_without_rust_fail_with_one_line() {
        let t = Tree::new("norust").file(".config", "CONFIG_RUSTC_VERSION=109600\n# CONFIG_RUST is not set\nCONFIG_RUSTC_VERSION_TEXT_X=1\n");
        let want = format!("{}: CONFIG_RUST is not set; uxen.ko needs a Rust-enabled kernel", t.0.display());
        assert_eq!(t.check().unwrap_err(), want);
        let t = Tree::new("rustm").file(".config", "CONFIG_RUST=m\n");
        assert!(t.check().unwrap_err().ends_with(": CONFIG_RUST is not set; uxen.ko needs a Rust-enabled kernel"));
        let t = Tree::new("noconfig");
        let e = t.check().unwrap_err();
        assert!(e.starts_with(&format!("{}: no .config", t.0.display())), "{e}");
        assert!(!e.contains('\n'));
        let e = check_kernel_tree(Path::new("/nonexistent/build")).unwrap_err().to_string();
        assert_eq!(e, "/nonexistent/build: no such kernel build tree; install the kernel's headers, or give --kdir DIR");
    }

    #[test]
    fn the_kernels_rustc_must_be_known_and_ours() {
        let t = rust_tree("norustc").file(".config", "CONFIG_RUST=y\n").file("include/config/auto.conf", "CONFIG_RUST=y\n");
        let e = t.check().unwrap_err();
        assert!(e.ends_with(": the rustc the kernel was built with is unknown (no CONFIG_RUSTC_VERSION_TEXT in include/config/auto.conf or .config)"), "{e}");
        let t = rust_tree("otherrustc");
        let k = t.check().unwrap();
        let e = check_rustc(&t.0, &k, "rustc 1.80.0 (x 2024-07-21)").unwrap_err().to_string();
        assert!(e.contains(&format!("the kernel was built with {RUSTC}, but /usr/bin/rustc is rustc 1.80.0 (x 2024-07-21)")), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn old_or_unprepared_trees_fail() {
        let t = rust_tree("old").file("include/config/kernel.release", "6.11.9\n");
        assert!(t.check().unwrap_err().ends_with(": Linux 6.11.9; uxen.ko needs Linux 6.12 or later"));
        let t = rust_tree("five").file("include/config/kernel.release", "5.19.0\n");
        assert!(t.check().is_err());
        let t = rust_tree("unprepared");
        std::fs::remove_file(t.0.join("include/config/kernel.release")).unwrap();
        assert!(t.check().unwrap_err().contains("make modules_prepare"));
    }

    #[test]
    fn config_values() {
        let c = "CONFIG_A=y\nCONFIG_AB=\"x y\"\n# CONFIG_C is not set\n";
        assert_eq!(config_value(c, "CONFIG_A").as_deref(), Some("y"));
        assert_eq!(config_value(c, "CONFIG_AB").as_deref(), Some("x y"));
        assert_eq!(config_value(c, "CONFIG_C"), None);
    }
}
