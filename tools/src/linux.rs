//! Putting a Linux kernel into a `VM_FLAG_LINUX` VM (docs/guest-abi.md,
//! part 2): the kernel (a bzImage, entered through its 64-bit entry point,
//! or an uncompressed vmlinux), the initrd, the zero page with its e820
//! map, the command line, the boot GDT, the identity page tables, the MP
//! table, the ACPI tables with the VM generation ID, and vCPU 0's
//! registers.
//!
//! Everything is laid out in a staging copy of guest memory and checked
//! before the VM exists, so that bad input is refused with one line and no
//! VM is created for it; only the non-zero pages are uploaded.

use crate::boot::{self, PageTables};
use crate::dev::Vm;
use crate::{acpi, mptable};
use anyhow::{anyhow, bail, Context, Result};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use shared_abi::{linux, Regs};
use std::io::Cursor;
use std::path::Path;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// The command line when `--cmdline` is not given: the console on the
/// COM1 UART, few boot messages, and a TSC that Linux trusts without
/// watching it against other clocks (the VM has no other clock worth the
/// name) and no speculation mitigations (the guest is a throwaway VM, and
/// they slow it down).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet tsc=reliable mitigations=off";

/// Appended to every command line, `--cmdline` or not, because the
/// platform depends on it: `reboot=t` makes a reset a triple fault, which
/// the hypervisor sees, and `panic_warm` makes a panic's reset write the
/// warm-reset flag at 0x472, by which the hypervisor tells a kernel panic
/// (`stop::PANIC`) from a reboot (`stop::REBOOT`); `panic=-1` resets at
/// once on a panic instead of hanging; `x2apic_phys` keeps the x2APIC in
/// physical destination mode, the one the hypervisor's APIC delivers.
pub const PLATFORM_CMDLINE: &str = " reboot=t,panic_warm panic=-1 x2apic_phys";

/// `--mem` for `--kernel` when it is not given: room for a small kernel,
/// an initramfs and a shell (test guests keep 16).
pub const DEFAULT_MEM_MIB: u64 = 64;

/// `boot_flag` and `header` of a setup header: the signatures a kernel
/// checks for.
const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` given to a vmlinux, which has no setup header
/// (Firecracker's value).
const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Boot protocol 2.06: the first with `cmdline_size` in the header.
pub const MIN_PROTOCOL: u16 = 0x0206;
/// The 64-bit entry point's offset from a bzImage's load address.
const ENTRY_64: u64 = 0x200;
/// Where a vmlinux may have its initrd: below 2 GiB, as the setup header
/// of every 64-bit bzImage says in `initrd_addr_max`.
const ELF_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// e820 types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// Start of the RAM above the legacy holes; nothing of the kernel may load
/// below it.
const HIGH_RAM: u64 = 0x10_0000;
/// Initial CR0 (PE, MP, ET, NE, WP, PG), CR4 (PAE) and EFER (LME, LMA): the
/// 64-bit boot protocol's paged long mode.
const CR0: u64 = 0x8001_0033;
const CR4: u64 = 0x20;
const EFER: u64 = 0x500;

const MIB: u64 = 1 << 20;
/// Start of the upper half of the 48-bit address space, where a vmlinux is
/// linked (at 0xffff_ffff_8100_0000 by default) and user programs are not.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// The identity page tables of a Linux guest.
pub const TABLES: PageTables = PageTables { pml4: linux::PML4_GPA, pdpt: linux::PDPT_GPA, pd: linux::PD_GPA };

/// What a kernel file is.
#[derive(Clone, Copy)]
pub enum Format {
    /// A bzImage and its setup header.
    BzImage(setup_header),
    /// An x86-64 ELF (vmlinux): its lowest load address, the end of its
    /// loaded memory, and its entry point.
    Elf { low: u64, end: u64, entry: u64 },
}

/// A Linux guest ready to upload. Besides the pages and registers it
/// records where the parts went, which the tests check.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct Prepared {
    /// `(gpa, page)` for every non-zero 4 KiB page.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// vCPU 0's registers; the other vCPUs wait for INIT/SIPI.
    pub regs: Regs,
    /// The whole command line the kernel gets.
    pub cmdline: String,
    /// Where the kernel's file data went: `[start, end)`.
    pub kernel: (u64, u64),
    /// Where the initrd went: address and size.
    pub initrd: Option<(u64, u64)>,
}

/// What to boot.
pub struct Spec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// `--cmdline`; `None` for [`DEFAULT_CMDLINE`].
    pub cmdline: Option<&'a str>,
    pub mem_bytes: u64,
    pub vcpus: u32,
}

/// Guest memory to ask for, in MiB, for `bytes` bytes: a whole number of
/// 2 MiB (what `--mem` accepts).
fn mib_needed(bytes: u64) -> u64 {
    bytes.div_ceil(2 * MIB) * 2
}

const fn page_up(v: u64) -> u64 {
    (v + 4095) & !4095
}

/// The command line the kernel gets: `--cmdline` (or [`DEFAULT_CMDLINE`])
/// followed by [`PLATFORM_CMDLINE`].
pub fn assemble_cmdline(user: Option<&str>) -> String {
    format!("{}{PLATFORM_CMDLINE}", user.unwrap_or(DEFAULT_CMDLINE)).trim_start().to_string()
}

/// Refuses a command line (`full`, of which `user` is the `--cmdline`
/// part) with other than printable ASCII, or longer than `max` bytes.
pub fn check_cmdline(user: Option<&str>, full: &str, max: usize, who: &str) -> Result<()> {
    if let Some(c) = user.unwrap_or("").chars().find(|c| !(' '..='~').contains(c)) {
        bail!("the command line may hold printable ASCII only, not {c:?}");
    }
    if full.len() > max {
        bail!(
            "the command line is {} bytes with the platform's own options (`{}`); {who} takes at most {max}",
            full.len(),
            PLATFORM_CMDLINE.trim()
        );
    }
    Ok(())
}

/// Refuses a bzImage that this VMM cannot boot: one older than boot
/// protocol 2.06, one that does not load high, or one without the 64-bit
/// entry point.
pub fn check_bzimage(h: &setup_header, name: &str) -> Result<()> {
    // Copies: the header is packed, and its fields cannot be borrowed.
    let (version, loadflags, xloadflags) = (h.version, h.loadflags, h.xloadflags);
    if version < MIN_PROTOCOL {
        bail!("{name} uses boot protocol {}.{:02}; at least 2.06 is needed", version >> 8, version & 0xff);
    }
    if loadflags as u32 & LOADED_HIGH == 0 {
        bail!("{name} is a zImage that loads low; a bzImage is needed");
    }
    if xloadflags as u32 & XLF_KERNEL_64 == 0 {
        bail!("{name} is not a 64-bit kernel (its setup header has no XLF_KERNEL_64): an x86-64 kernel is needed");
    }
    Ok(())
}

/// Says what kind of kernel `bytes` (the file `name`) holds, with the
/// checks each kind needs.
pub fn identify(bytes: &[u8], name: &str) -> Result<Format> {
    let not_linux = || anyhow!("{name} is not a Linux bzImage or vmlinux");
    let hdr_at = 0x1f1;
    let hdr_len = std::mem::size_of::<setup_header>();
    if bytes.len() >= hdr_at + hdr_len && bytes[0x202..0x206] == HDR_MAGIC.to_le_bytes() {
        let h = *setup_header::from_slice(&bytes[hdr_at..hdr_at + hdr_len]).ok_or_else(not_linux)?;
        check_bzimage(&h, name)?;
        return Ok(Format::BzImage(h));
    }
    if bytes.len() < 64 || bytes[..4] != *b"\x7fELF" {
        return Err(not_linux());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    // 64-bit, little endian, x86-64.
    if bytes[4] != 2 || bytes[5] != 1 || u16_at(18) != 62 {
        return Err(not_linux());
    }
    let entry = u64_at(24).ok_or_else(not_linux)?;
    let phoff = u64_at(32).ok_or_else(not_linux)? as usize;
    let (phentsize, phnum) = (u16_at(54) as usize, u16_at(56) as usize);
    if phentsize != 56 {
        return Err(not_linux());
    }
    let (mut low, mut end, mut kernel_linked) = (u64::MAX, 0u64, false);
    for i in 0..phnum {
        let o = phoff.checked_add(i * 56).ok_or_else(not_linux)?;
        let ph = bytes.get(o..o + 56).ok_or_else(not_linux)?;
        let word = |at: usize| u64::from_le_bytes(ph[at..at + 8].try_into().unwrap());
        let (ptype, filesz, vaddr, paddr, memsz) = (u32::from_le_bytes(ph[0..4].try_into().unwrap()), word(32), word(16), word(24), word(40));
        // PT_LOAD segments with file data are what the loader copies.
        if ptype != 1 || filesz == 0 {
            continue;
        }
        kernel_linked |= vaddr >= KERNEL_HALF;
        low = low.min(paddr);
        end = end.max(paddr.checked_add(memsz).ok_or_else(not_linux)?);
    }
    // A program linked for user space (a static busybox, a test guest)
    // is an x86-64 ELF too; a kernel is linked in the upper half.
    if end == 0 || !kernel_linked {
        return Err(not_linux());
    }
    if low < HIGH_RAM {
        bail!("{name} loads at {low:#x}, below 1 MiB, where the boot structures live");
    }
    if !(low..end).contains(&entry) {
        bail!("{name}'s entry point {entry:#x} is outside what it loads ({low:#x}-{end:#x}): is it a vmlinux?");
    }
    Ok(Format::Elf { low, end, entry })
}

/// The end of the memory the kernel needs while it boots: for a bzImage,
/// `init_size` bytes from its load address (it decompresses there), or
/// its payload if that is larger; for a vmlinux, its loaded end.
pub fn kernel_top(f: &Format, payload_len: u64) -> u64 {
    match f {
        Format::BzImage(h) => {
            let init_size = h.init_size as u64;
            page_up(linux::KERNEL_GPA + init_size.max(payload_len))
        }
        Format::Elf { end, .. } => page_up(*end),
    }
}

/// Refuses `--mem` too small for the kernel alone.
pub fn check_kernel_fits(name: &str, f: &Format, top: u64, mem_bytes: u64) -> Result<()> {
    if top <= mem_bytes {
        return Ok(());
    }
    let mem_mib = mem_bytes / MIB;
    match f {
        Format::BzImage(h) => {
            let init_size = h.init_size;
            bail!(
                "{name} needs {} MiB of guest memory: it unpacks into {} MiB (its init_size) at {} MiB; --mem is {mem_mib}",
                mib_needed(top),
                (init_size as u64).div_ceil(MIB),
                linux::KERNEL_GPA / MIB
            )
        }
        Format::Elf { .. } => bail!("{name} needs {} MiB of guest memory: it loads up to {top:#x}; --mem is {mem_mib}", mib_needed(top)),
    }
}

/// Where an initrd of `len` bytes goes: page-aligned, as high as it fits
/// below `min(mem_bytes, initrd_addr_max + 1)` and not below `kernel_top`.
pub fn place_initrd(kernel_top: u64, len: u64, mem_bytes: u64, initrd_addr_max: u64) -> Result<u64> {
    let limit = mem_bytes.min(initrd_addr_max.saturating_add(1)) & !4095;
    let size = page_up(len);
    if size <= limit && limit - size >= kernel_top {
        return Ok(limit - size);
    }
    if limit == mem_bytes & !4095 {
        bail!("the kernel and initrd need {} MiB; --mem is {}", mib_needed(kernel_top + size), mem_bytes / MIB);
    }
    bail!(
        "the initrd ({} MiB) does not fit between the kernel's end ({kernel_top:#x}) and the highest address this kernel takes an initrd at ({initrd_addr_max:#x})",
        size.div_ceil(MIB)
    )
}

/// The e820 map of a VM of `mem_bytes` bytes: the low RAM, the legacy
/// area (the MP table, the ACPI tables, the generation ID, the BIOS holes)
/// reserved, and the RAM above 1 MiB.
pub fn e820(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let e = |addr: u64, end: u64, type_: u32| boot_e820_entry { addr, size: end - addr, type_ };
    vec![e(0, linux::LOW_RAM_END, E820_RAM), e(linux::LOW_RAM_END, HIGH_RAM, E820_RESERVED), e(HIGH_RAM, mem_bytes, E820_RAM)]
}

/// The zero page: the kernel's own setup header (`hdr`, a bzImage's) or
/// the fields a vmlinux needs, and what the loader fills in.
pub fn zero_page(hdr: Option<&setup_header>, cmdline_len: usize, initrd: Option<(u64, u64)>, mem_bytes: u64) -> boot_params {
    let mut p = boot_params::default();
    match hdr {
        Some(h) => p.hdr = *h,
        None => {
            p.hdr.boot_flag = BOOT_FLAG;
            p.hdr.header = HDR_MAGIC;
            p.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
        }
    }
    p.hdr.type_of_loader = LOADER_OTHER;
    // The kernel sits at 16 MiB (LOADED_HIGH). No heap is given
    // (CAN_USE_HEAP clear, heap_end_ptr 0): the 64-bit entry skips the
    // real-mode code that would use one. KASLR_FLAG is the kernel's to set
    // and QUIET_FLAG stays clear.
    p.hdr.loadflags = LOADED_HIGH as u8;
    p.hdr.heap_end_ptr = 0;
    p.hdr.cmd_line_ptr = linux::CMDLINE_GPA as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820(mem_bytes);
    for (i, e) in map.iter().enumerate() {
        p.e820_table[i] = *e;
    }
    p.e820_entries = map.len() as u8;
    p.acpi_rsdp_addr = linux::ACPI_GPA;
    p
}

/// A VM's first generation ID: 16 random bytes from the host, so that
/// guests booted apart differ too (the hypervisor writes the IDs of forks).
pub fn first_generation_id() -> Result<[u8; linux::VMGENID_LEN]> {
    let mut id = [0u8; linux::VMGENID_LEN];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        bail!("cannot draw the VM generation ID: {}", std::io::Error::last_os_error());
    }
    Ok(id)
}

/// vCPU 0's registers at the kernel's 64-bit entry point `entry`.
pub fn boot_regs(entry: u64) -> Regs {
    Regs {
        rip: entry,
        rsi: linux::ZERO_PAGE_GPA,
        rflags: 2,
        cr3: linux::PML4_GPA,
        cr0: CR0,
        cr4: CR4,
        efer: EFER,
        ..Default::default()
    }
}

fn read_file(p: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| anyhow!("cannot read the {what} {}: {e}", p.display()))
}

/// Reads the files of `spec` and lays the guest out (see
/// [`prepare_bytes`]).
pub fn prepare(spec: &Spec) -> Result<Prepared> {
    let kernel = read_file(spec.kernel, "kernel")?;
    let initrd = spec.initrd.map(|p| read_file(p, "initrd")).transpose()?;
    prepare_bytes(&spec.kernel.display().to_string(), &kernel, initrd.as_deref(), spec.cmdline, spec.mem_bytes, spec.vcpus)
}

/// Checks the kernel `kernel` (the file `name`), the initrd and the
/// command line against a VM of `mem_bytes` bytes and `vcpus` vCPUs, and
/// lays them out with the boot structures.
pub fn prepare_bytes(name: &str, kernel: &[u8], initrd: Option<&[u8]>, user_cmdline: Option<&str>, mem_bytes: u64, vcpus: u32) -> Result<Prepared> {
    let cmdline = assemble_cmdline(user_cmdline);
    let format = identify(kernel, name)?;
    let (cmdline_max, who, initrd_addr_max, payload_len) = match &format {
        Format::BzImage(h) => {
            let setup_sects = if h.setup_sects == 0 { 4 } else { h.setup_sects as u64 };
            let payload = (kernel.len() as u64).checked_sub((setup_sects + 1) * 512).ok_or_else(|| anyhow!("{name} is a truncated bzImage"))?;
            let (max, initrd_max) = (h.cmdline_size as usize, h.initrd_addr_max as u64);
            if max < linux::CMDLINE_MAX {
                (max, "this kernel", initrd_max, payload)
            } else {
                (linux::CMDLINE_MAX, "the VM", initrd_max, payload)
            }
        }
        Format::Elf { .. } => (linux::CMDLINE_MAX, "the VM", ELF_INITRD_ADDR_MAX, 0),
    };
    check_cmdline(user_cmdline, &cmdline, cmdline_max, who)?;
    let top = kernel_top(&format, payload_len);
    check_kernel_fits(name, &format, top, mem_bytes)?;
    let initrd = initrd.filter(|b| !b.is_empty());
    let initrd_at = initrd.map(|b| place_initrd(top, b.len() as u64, mem_bytes, initrd_addr_max)).transpose()?;

    // The host never maps the guest's own frames: everything is laid out
    // here first, then copied in through the hypervisor.
    let staging: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes as usize)]).context("cannot map staging memory")?;
    let (entry, hdr, loaded) = match format {
        Format::BzImage(_) => {
            let r = BzImage::load(&staging, Some(GuestAddress(linux::KERNEL_GPA)), &mut Cursor::new(kernel), None)
                .map_err(|e| anyhow!("cannot load {name}: {e}"))?;
            (linux::KERNEL_GPA + ENTRY_64, r.setup_header, (linux::KERNEL_GPA, r.kernel_end))
        }
        Format::Elf { low, entry, .. } => {
            let r = Elf::load(&staging, None, &mut Cursor::new(kernel), Some(GuestAddress(HIGH_RAM)))
                .map_err(|e| anyhow!("cannot load {name}: {e}"))?;
            (entry, None, (low, r.kernel_end))
        }
    };
    let initrd_range = match (initrd, initrd_at) {
        (Some(b), Some(at)) => {
            staging.write_slice(b, GuestAddress(at)).context("staging write")?;
            Some((at, b.len() as u64))
        }
        _ => None,
    };
    boot::write_gdt(&staging, linux::GDT_GPA, &[0, 0, boot::GDT_CODE64, boot::GDT_DATA])?;
    boot::write_identity_map(&staging, TABLES, mem_bytes)?;
    let params = zero_page(hdr.as_ref(), cmdline.len(), initrd_range, mem_bytes);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(linux::ZERO_PAGE_GPA)), &staging)
        .map_err(|e| anyhow!("cannot write the zero page: {e}"))?;
    let mut c = cmdline.clone().into_bytes();
    c.push(0);
    staging.write_slice(&c, GuestAddress(linux::CMDLINE_GPA)).context("staging write")?;
    staging.write_slice(&mptable::build(linux::MPTABLE_GPA, vcpus)?, GuestAddress(linux::MPTABLE_GPA)).context("staging write")?;
    let tables = acpi::build(linux::ACPI_GPA, vcpus, linux::VMGENID_GPA)?;
    staging.write_slice(&tables.bytes, GuestAddress(linux::ACPI_GPA)).context("staging write")?;
    staging.write_slice(&first_generation_id()?, GuestAddress(linux::VMGENID_GPA)).context("staging write")?;

    let mut ranges = vec![(0, HIGH_RAM), loaded];
    if let Some((at, len)) = initrd_range {
        ranges.push((at, at + len));
    }
    let pages = boot::nonzero_pages(&staging, &ranges)?;
    let regs = boot_regs(entry);
    // The hypervisor's own rule, checked here so that it cannot fail later.
    shared_abi::validate::regs(&regs).map_err(|e| anyhow!("vCPU 0's registers are refused: {e:?}"))?;
    Ok(Prepared { pages, regs, cmdline, kernel: loaded, initrd: initrd_range })
}

/// Uploads a prepared guest into `vm` and sets vCPU 0's registers.
pub fn install(vm: &Vm, p: &Prepared) -> Result<()> {
    boot::upload(vm, &p.pages, "kernel")?;
    vm.set_regs(0, &p.regs).map_err(|e| anyhow!("cannot set vCPU 0's registers: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bootparam::CAN_USE_HEAP;

    /// A bzImage with one setup sector, boot protocol `version`,
    /// `xloadflags`, `init_size`, and `payload` as its protected-mode
    /// kernel.
    fn bzimage(version: u16, xloadflags: u16, init_size: u32, payload: &[u8]) -> Vec<u8> {
        let h = setup_header {
            setup_sects: 1,
            boot_flag: BOOT_FLAG,
            header: HDR_MAGIC,
            version,
            loadflags: (LOADED_HIGH | CAN_USE_HEAP) as u8,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 2047,
            init_size,
            vid_mode: 0xffff,
            ..Default::default()
        };
        let mut f = vec![0u8; 1024];
        f[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(h.as_slice());
        f.extend_from_slice(payload);
        f
    }

    /// A vmlinux-like ELF: the test guests' ELF with its one segment linked
    /// at the kernel's usual virtual address.
    fn vmlinux(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut e = crate::boot::tests::elf(paddr, code, memsz);
        e[64 + 16..64 + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        e
    }

    fn good() -> Vec<u8> {
        bzimage(0x020f, XLF_KERNEL_64 as u16, 8 << 20, &[0x90; 5000])
    }

    fn page(p: &Prepared, gpa: u64) -> &[u8] {
        p.pages.iter().find(|(a, _)| *a == gpa & !4095).map(|(_, b)| &b[(gpa & 4095) as usize..]).expect("page uploaded")
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn params(p: &Prepared) -> boot_params {
        *boot_params::from_slice(&page(p, linux::ZERO_PAGE_GPA)[..4096]).unwrap()
    }

    #[test]
    fn command_line_assembly() {
        assert_eq!(
            assemble_cmdline(None),
            "console=ttyS0 quiet tsc=reliable mitigations=off reboot=t,panic_warm panic=-1 x2apic_phys"
        );
        assert_eq!(assemble_cmdline(Some("console=ttyS0 init=/bin/sh")), "console=ttyS0 init=/bin/sh reboot=t,panic_warm panic=-1 x2apic_phys");
        assert_eq!(assemble_cmdline(Some("")), "reboot=t,panic_warm panic=-1 x2apic_phys");
        let max = linux::CMDLINE_MAX;
        let fits = "x".repeat(max - PLATFORM_CMDLINE.len());
        assert!(check_cmdline(Some(&fits), &assemble_cmdline(Some(&fits)), max, "the VM").is_ok());
        let long = "x".repeat(max - PLATFORM_CMDLINE.len() + 1);
        let e = check_cmdline(Some(&long), &assemble_cmdline(Some(&long)), max, "the VM").unwrap_err().to_string();
        assert_eq!(e, format!("the command line is {} bytes with the platform's own options (`reboot=t,panic_warm panic=-1 x2apic_phys`); the VM takes at most {max}", max + 1));
        for bad in ["a\nb", "tab\there", "caf\u{e9}", "\x7f"] {
            assert!(check_cmdline(Some(bad), &assemble_cmdline(Some(bad)), max, "the VM").unwrap_err().to_string().contains("printable ASCII"), "{bad:?}");
        }
        // The kernel's own limit counts too.
        let k = bzimage(0x020f, 1, 8 << 20, &[1; 64]);
        let e = prepare_bytes("k", &k, None, Some(&"y".repeat(2100)), 64 << 20, 1).unwrap_err().to_string();
        assert!(e.contains("this kernel takes at most 2047"), "{e}");
    }

    #[test]
    fn bzimage_header_checks() {
        assert!(matches!(identify(&good(), "k").unwrap(), Format::BzImage(_)));
        let old = bzimage(0x0205, 1, 8 << 20, &[1; 64]);
        assert_eq!(identify(&old, "k").err().unwrap().to_string(), "k uses boot protocol 2.05; at least 2.06 is needed");
        let no64 = bzimage(0x020f, 0, 8 << 20, &[1; 64]);
        assert!(identify(&no64, "k").err().unwrap().to_string().contains("not a 64-bit kernel"));
        let mut low = good();
        low[0x211] = 0;
        assert!(identify(&low, "k").err().unwrap().to_string().contains("loads low"));
        for junk in [&b"#!/bin/sh\necho hi\n"[..], &[0u8; 4096][..], b""] {
            assert_eq!(identify(junk, "f").err().unwrap().to_string(), "f is not a Linux bzImage or vmlinux");
        }
        // An ELF for another machine, or a 32-bit one, is not a vmlinux either.
        let mut arm = vmlinux(0x100_0000, &[0x90], 0x1000);
        arm[18] = 183;
        assert_eq!(identify(&arm, "f").err().unwrap().to_string(), "f is not a Linux bzImage or vmlinux");
        let mut elf32 = vmlinux(0x100_0000, &[0x90], 0x1000);
        elf32[4] = 1;
        assert_eq!(identify(&elf32, "f").err().unwrap().to_string(), "f is not a Linux bzImage or vmlinux");
        let lowelf = vmlinux(0x8_0000, &[0x90], 0x1000);
        assert!(identify(&lowelf, "f").err().unwrap().to_string().contains("below 1 MiB"));
        // A static program (busybox, a test guest) is not a kernel.
        let user = crate::boot::tests::elf(0x40_0000, &[0x90], 0x1000);
        assert_eq!(identify(&user, "f").err().unwrap().to_string(), "f is not a Linux bzImage or vmlinux");
        assert!(matches!(identify(&vmlinux(0x100_0000, &[0x90], 0x1000), "f").unwrap(), Format::Elf { low: 0x100_0000, .. }));
        // A file that only claims to be a bzImage.
        let mut cut = good();
        cut.truncate(0x300);
        assert!(prepare_bytes("k", &cut, None, None, 64 << 20, 1).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn initrd_placement() {
        let top = linux::KERNEL_GPA + (8 << 20);
        // As high as possible, page-aligned.
        assert_eq!(place_initrd(top, 4096, 64 << 20, 0x7fff_ffff).unwrap(), (64 << 20) - 4096);
        assert_eq!(place_initrd(top, 5000, 64 << 20, 0x7fff_ffff).unwrap(), (64 << 20) - 8192);
        // Below initrd_addr_max + 1.
        assert_eq!(place_initrd(top, 4096, 4096 << 20, 0x7fff_ffff).unwrap(), 0x8000_0000 - 4096);
        // Exactly fitting, and one page too many.
        assert_eq!(place_initrd(top, (64 << 20) - top, 64 << 20, 0x7fff_ffff).unwrap(), top);
        let e = place_initrd(top, (64 << 20) - top + 1, 64 << 20, 0x7fff_ffff).unwrap_err().to_string();
        assert_eq!(e, "the kernel and initrd need 66 MiB; --mem is 64");
        let e = place_initrd(top, 0x1000_0000, 4096 << 20, 0x0fff_ffff).unwrap_err().to_string();
        assert!(e.contains("highest address this kernel takes an initrd at (0xfffffff)"), "{e}");
    }

    #[test]
    fn memory_checks() {
        let k = good();
        // 16 MiB + 8 MiB of init_size: 24 MiB is the least.
        assert!(prepare_bytes("k", &k, None, None, 24 << 20, 1).is_ok());
        let e = prepare_bytes("k", &k, None, None, 22 << 20, 1).unwrap_err().to_string();
        assert_eq!(e, "k needs 24 MiB of guest memory: it unpacks into 8 MiB (its init_size) at 16 MiB; --mem is 22");
        let e = prepare_bytes("k", &k, Some(&[7; 3 << 20]), None, 26 << 20, 1).unwrap_err().to_string();
        assert_eq!(e, "the kernel and initrd need 28 MiB; --mem is 26");
        let v = vmlinux(0x100_0000, &[0x90], 20 << 20);
        let e = prepare_bytes("v", &v, None, None, 32 << 20, 1).unwrap_err().to_string();
        assert_eq!(e, "v needs 36 MiB of guest memory: it loads up to 0x2400000; --mem is 32");
    }

    #[test]
    fn e820_layout() {
        let m = e820(64 << 20);
        let rows: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(
            rows,
            vec![(0, 0x9_fc00, E820_RAM), (0x9_fc00, 0x400 + 0x6_0000, E820_RESERVED), (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM)]
        );
        // Contiguous, and covering exactly the VM's memory.
        assert!(m.windows(2).all(|w| w[0].addr + w[0].size == w[1].addr));
        assert_eq!(m.last().map(|e| e.addr + e.size), Some(64 << 20));
        // The MP table is in the reserved part.
        assert!(linux::MPTABLE_GPA >= m[1].addr && linux::MPTABLE_GPA < m[1].addr + m[1].size);
    }

    #[test]
    fn bzimage_layout_zero_page_and_registers() {
        let initrd = vec![0xabu8; 10_000];
        let p = prepare_bytes("k", &good(), Some(&initrd), Some("console=ttyS0"), 64 << 20, 2).unwrap();
        // The payload at 16 MiB, entered at +0x200.
        assert_eq!(p.kernel, (linux::KERNEL_GPA, linux::KERNEL_GPA + 5000));
        assert_eq!(&page(&p, linux::KERNEL_GPA)[..4], &[0x90; 4]);
        assert_eq!(p.regs, Regs {
            rip: linux::KERNEL_GPA + 0x200,
            rsi: linux::ZERO_PAGE_GPA,
            rflags: 2,
            cr3: linux::PML4_GPA,
            cr0: 0x8001_0033,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        });
        assert!(shared_abi::validate::regs(&p.regs).is_ok());
        // The initrd at the top of memory.
        let at = (64 << 20) - 3 * 4096;
        assert_eq!(p.initrd, Some((at, 10_000)));
        assert_eq!(page(&p, at)[0], 0xab);
        assert_eq!(page(&p, at + 8192)[10_000 - 8192 - 1], 0xab);
        let z = params(&p);
        let h = z.hdr;
        assert_eq!((h.boot_flag, h.header, h.version), (BOOT_FLAG, HDR_MAGIC, 0x020f));
        assert_eq!((h.type_of_loader, h.loadflags, h.heap_end_ptr), (0xff, LOADED_HIGH as u8, 0));
        assert_eq!((h.cmd_line_ptr as u64, h.cmdline_size as usize), (linux::CMDLINE_GPA, p.cmdline.len()));
        assert_eq!((h.ramdisk_image as u64, h.ramdisk_size), (at, 10_000));
        assert_eq!(h.code32_start as u64, linux::KERNEL_GPA);
        assert_eq!(z.e820_entries, 3);
        let t = z.e820_table;
        assert_eq!((t[0].addr, t[0].size, t[0].type_), (0, linux::LOW_RAM_END, E820_RAM));
        assert_eq!((t[2].addr, t[2].size, t[2].type_), (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM));
        // The command line, NUL-terminated.
        let c = page(&p, linux::CMDLINE_GPA);
        assert_eq!(&c[..p.cmdline.len() + 1], format!("{}\0", p.cmdline).as_bytes());
        assert_eq!(p.cmdline, "console=ttyS0 reboot=t,panic_warm panic=-1 x2apic_phys");
        // The GDT: null, null, 0x10 code, 0x18 data.
        let g = page(&p, linux::GDT_GPA);
        assert_eq!([u64_at(g, 0), u64_at(g, 8), u64_at(g, 16), u64_at(g, 24)], [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]);
        // The MP table, for two vCPUs.
        assert_eq!(&page(&p, linux::MPTABLE_GPA)[..4], b"_MP_");
        let t = mptable::build(linux::MPTABLE_GPA, 2).unwrap();
        assert_eq!(&page(&p, linux::MPTABLE_GPA)[..t.len()], &t[..]);
        // The ACPI tables, for two vCPUs, which the zero page points at,
        // in the reserved part of the e820 map.
        assert_eq!({ z.acpi_rsdp_addr }, linux::ACPI_GPA);
        let t = acpi::build(linux::ACPI_GPA, 2, linux::VMGENID_GPA).unwrap();
        assert_eq!(&page(&p, linux::ACPI_GPA)[..t.bytes.len()], &t.bytes[..]);
        let r = &z.e820_table[1];
        assert!(r.type_ == E820_RESERVED && r.addr <= linux::ACPI_GPA && linux::VMGENID_GPA + 4096 <= r.addr + r.size);
        // The generation ID: random, so another boot's differs.
        let id = &page(&p, linux::VMGENID_GPA)[..linux::VMGENID_LEN];
        let again = prepare_bytes("k", &good(), None, None, 64 << 20, 2).unwrap();
        assert_ne!(id, &page(&again, linux::VMGENID_GPA)[..linux::VMGENID_LEN]);
        assert_ne!(id, &[0; linux::VMGENID_LEN]);
        // Nothing but the low structures, the kernel and the initrd.
        for (a, _) in &p.pages {
            assert!(*a < 0x10_0000 || (linux::KERNEL_GPA..linux::KERNEL_GPA + 8192).contains(a) || *a >= at, "{a:#x}");
        }
    }

    #[test]
    fn page_table_layout() {
        let p = prepare_bytes("k", &good(), None, None, 4096 << 20, 1).unwrap();
        assert_eq!(u64_at(page(&p, linux::PML4_GPA), 0), linux::PDPT_GPA | 3);
        let pdpt = page(&p, linux::PDPT_GPA);
        for g in 0..4 {
            assert_eq!(u64_at(pdpt, 8 * g), (linux::PD_GPA + 4096 * g as u64) | 3);
        }
        // Every 2 MiB page of the 4 GiB, identity-mapped.
        for i in [0u64, 1, 8, 511, 512, 2047] {
            let pd = page(&p, linux::PD_GPA + 4096 * (i / 512));
            assert_eq!(u64_at(pd, 8 * (i % 512) as usize), (i << 21) | 0x83, "entry {i}");
        }
        // The tables stay clear of the zero page and the command line.
        const { assert!(linux::PD_GPA + 4 * 4096 <= linux::CMDLINE_GPA) };
        const { assert!(linux::ZERO_PAGE_GPA + 4096 <= linux::PML4_GPA) };
        // A small VM maps only its own memory.
        let p = prepare_bytes("k", &good(), None, None, 26 << 20, 1).unwrap();
        let pd = page(&p, linux::PD_GPA);
        assert_eq!(u64_at(pd, 8 * 12), (12 << 21) | 0x83);
        assert_eq!(u64_at(pd, 8 * 13), 0);
        assert_eq!(u64_at(page(&p, linux::PDPT_GPA), 8), 0);
    }

    #[test]
    fn vmlinux_layout_and_zero_page() {
        let code = [0x48u8, 0x31, 0xc0, 0xf4];
        let v = vmlinux(0x100_0000, &code, 0x3000);
        let p = prepare_bytes("vmlinux", &v, Some(&[1; 100]), None, 32 << 20, 1).unwrap();
        assert_eq!(p.regs.rip, 0x100_0000);
        assert_eq!(p.kernel, (0x100_0000, 0x100_3000));
        assert_eq!(&page(&p, 0x100_0000)[..4], &code);
        let h = params(&p).hdr;
        assert_eq!((h.boot_flag, h.header, h.kernel_alignment), (0xaa55, 0x5372_6448, 0x0100_0000));
        assert_eq!((h.type_of_loader, h.cmd_line_ptr as u64), (0xff, linux::CMDLINE_GPA));
        assert_eq!((h.ramdisk_image as u64, h.ramdisk_size), ((32 << 20) - 4096, 100));
        assert_eq!(p.cmdline, assemble_cmdline(None));
    }

    #[test]
    fn files_that_cannot_be_read() {
        let spec = |k: &'static str, i: Option<&'static str>| Spec {
            kernel: Path::new(k),
            initrd: i.map(Path::new),
            cmdline: None,
            mem_bytes: 64 << 20,
            vcpus: 1,
        };
        let e = prepare(&spec("/nonexistent/bzImage", None)).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the kernel /nonexistent/bzImage: "), "{e}");
        let k = std::env::temp_dir().join(format!("uxenctl-test-{}-bz", std::process::id()));
        std::fs::write(&k, good()).unwrap();
        let ks: &'static str = Box::leak(k.display().to_string().into_boxed_str());
        let e = prepare(&spec(ks, Some("/nonexistent/initrd"))).unwrap_err().to_string();
        assert!(e.starts_with("cannot read the initrd /nonexistent/initrd: "), "{e}");
        assert!(prepare(&spec(ks, None)).is_ok());
        std::fs::remove_file(k).ok();
    }
}
