//! The hypervisor image: built for `x86_64-unknown-none` with Debian's rustc
//! and `-Zbuild-std`, then packed: the flat image is laid out from the ELF's
//! load segments and the header's layout fields are filled in.

use crate::util::{self, step};
use anyhow::{bail, ensure, Context, Result};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
use shared_abi::{ElfRela, ImageHeader, R_X86_64_RELATIVE};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `cargo build` for the bare-metal target with the Debian toolchain.
pub fn bare_cargo(manifest_dir: &Path, target_dir: &Path) -> Command {
    let mut c = Command::new(util::SYS_CARGO);
    c.current_dir(manifest_dir)
        .env("RUSTC", util::SYS_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir)
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Clinker=ld.lld")
        .args(["build", "--release", "--target", "x86_64-unknown-none"])
        .args(["-Zbuild-std=core,alloc", "-Zbuild-std-features=compiler-builtins-mem"]);
    c
}

/// Builds and packs the image; returns the flat image's path.
pub fn build() -> Result<PathBuf> {
    step("image: building the hypervisor for x86_64-unknown-none");
    let target = util::root().join("target/image");
    util::run_logged(
        bare_cargo(&util::root(), &target).args(["-p", "hypervisor", "--features", "image", "--bin", "hypervisor"]),
        &util::work().join("logs/image.log"),
    )?;
    let elf_path = target.join("x86_64-unknown-none/release/hypervisor");
    let elf = std::fs::read(&elf_path).with_context(|| format!("read {}", elf_path.display()))?;
    let (flat, elf_patched) = pack(&elf)?;
    let out = util::out();
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("hypervisor.elf"), &elf_patched)?;
    std::fs::write(util::work().join("hypervisor.bin"), &flat)?;
    check_no_vector_instructions(&out.join("hypervisor.elf"))?;
    let h = ImageHeader::parse(&flat).map_err(|e| anyhow::anyhow!("packed image is invalid: {}", e.message()))?;
    eprintln!(
        "    hypervisor.elf: {} bytes loaded ({} in file), entry at {:#x}, direct calls at {:#x}, {} relocations",
        h.mem_size, h.file_size, h.entry_offset, h.call_offset, h.rela_count
    );
    Ok(util::work().join("hypervisor.bin"))
}

/// Lays out the image and fills its header. Returns the flat image and the
/// ELF with the same header written into its `.uxen_header` section.
pub fn pack(elf_bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let elf = object::File::parse(elf_bytes).context("hypervisor is not an ELF file")?;
    let hsec = elf.section_by_name(".uxen_header").context("no .uxen_header section")?;
    ensure!(hsec.address() == 0, ".uxen_header must be linked at 0");
    let hsize = core::mem::size_of::<ImageHeader>();
    ensure!(hsec.size() as usize == hsize, ".uxen_header has the wrong size");

    let mut file_end = 0u64;
    let mut mem_end = 0u64;
    for seg in elf.segments() {
        let (_, fsize) = seg.file_range();
        file_end = file_end.max(seg.address() + fsize);
        mem_end = mem_end.max(seg.address() + seg.size());
    }
    ensure!(file_end > 0, "no load segments");
    let mut flat = vec![0u8; file_end as usize];
    for seg in elf.segments() {
        let data = seg.data().context("segment data")?;
        let a = seg.address() as usize;
        flat[a..a + data.len()].copy_from_slice(data);
    }
    let mem_size = (mem_end + 4095) & !4095;

    let entry = elf
        .symbols()
        .find(|s| s.name() == Ok("uxen_entry"))
        .context("no uxen_entry symbol")?
        .address();

    let call = elf
        .symbols()
        .find(|s| s.name() == Ok("uxen_call"))
        .context("no uxen_call symbol")?
        .address();

    let (rela_offset, rela_count) = match elf.section_by_name(".rela.dyn") {
        Some(s) if s.size() > 0 => {
            ensure!(s.size() % 24 == 0, ".rela.dyn size");
            (s.address(), s.size() / 24)
        }
        _ => (0, 0),
    };
    for i in 0..rela_count as usize {
        let o = rela_offset as usize + i * 24;
        // SAFETY: `ElfRela` is plain data and the range is inside `flat`.
        let r: ElfRela = unsafe { std::ptr::read_unaligned(flat[o..o + 24].as_ptr().cast()) };
        if r.info & 0xffff_ffff != R_X86_64_RELATIVE {
            bail!("relocation {i} has type {}; only R_X86_64_RELATIVE is supported", r.info & 0xffff_ffff);
        }
        ensure!(r.offset + 8 <= file_end, "relocation {i} outside the image file");
    }

    // SAFETY: the section holds exactly one `ImageHeader`, plain data.
    let mut h: ImageHeader = unsafe { std::ptr::read_unaligned(flat[..hsize].as_ptr().cast()) };
    h.file_size = file_end;
    h.mem_size = mem_size;
    h.entry_offset = entry;
    h.call_offset = call;
    h.rela_offset = rela_offset;
    h.rela_count = rela_count;
    // SAFETY: writes one plain-data header into a buffer at least that long.
    unsafe { std::ptr::write_unaligned(flat[..hsize].as_mut_ptr().cast(), h) };

    let mut elf_patched = elf_bytes.to_vec();
    let (off, _) = hsec.file_range().context("header file range")?;
    elf_patched[off as usize..off as usize + hsize].copy_from_slice(&flat[..hsize]);
    Ok((flat, elf_patched))
}

/// The image runs between guest instructions and must never compute with
/// vector registers: refuse any SSE/AVX/x87 instruction, except the
/// FXSAVE64/FXRSTOR64 that move a guest's whole x87/SSE state in and out
/// (the switch between a guest and the host, `hv/run.rs`), and only a few.
pub fn check_no_vector_instructions(elf: &Path) -> Result<()> {
    let dis = util::output(Command::new("llvm-objdump").args(["-d", "--no-show-raw-insn"]).arg(elf))?;
    // Instruction lines are indented; the mnemonic follows the first tab.
    // x87 mnemonics start with `f`.
    let op = |l: &str| {
        if !l.starts_with(' ') {
            return String::new();
        }
        l.split('\t').nth(1).unwrap_or("").split_whitespace().next().unwrap_or("").to_string()
    };
    let vector = |l: &&str| {
        ["%xmm", "%ymm", "%zmm", "%st", "mxcsr", "xsave", "xrstor"].iter().any(|p| l.contains(p)) || op(l).starts_with('f')
    };
    let switch = |l: &&str| matches!(op(l).as_str(), "fxsave64" | "fxrstor64");
    let (switches, bad): (Vec<&str>, Vec<&str>) = dis.lines().filter(vector).partition(switch);
    if !bad.is_empty() {
        bail!("hypervisor.elf uses vector registers ({} instructions), e.g. {}", bad.len(), bad[0]);
    }
    if switches.len() > 8 {
        bail!("hypervisor.elf has {} FXSAVE64/FXRSTOR64: only the guest state switch may use them", switches.len());
    }
    Ok(())
}

/// Writes a copy of the image with a corrupted header signature, for the
/// test that the driver refuses it.
pub fn corrupt(flat: &[u8]) -> Vec<u8> {
    let mut bad = flat.to_vec();
    bad[0] ^= 0xff;
    bad
}
