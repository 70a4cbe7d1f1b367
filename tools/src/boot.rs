//! Putting a guest image into a new VM (docs/guest-abi.md): the ELF's load
//! segments at their physical addresses, the boot GDT and identity page
//! tables, and vCPU 0's registers.

use crate::dev::Vm;
use anyhow::{bail, Context, Result};
use linux_loader::loader::{elf::Elf, KernelLoader};
use shared_abi::{guest, Regs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A guest ready to upload: its non-zero pages and where it starts.
#[derive(Debug)]
pub struct Prepared {
    /// `(gpa, page)` for every 4 KiB page below the image's end that is not
    /// all zeros (guest memory starts zeroed).
    pub pages: Vec<(u64, Vec<u8>)>,
    pub entry: u64,
}

/// Lays out `image` in a staging copy of guest memory of `mem_bytes` bytes
/// with the boot structures and the command line (docs/guest-abi.md).
pub fn prepare(image: &std::path::Path, mem_bytes: u64, cmdline: &str) -> Result<Prepared> {
    check_cmdline(cmdline)?;
    let mut f = std::fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    // The image goes into a staging copy of guest memory first (the host
    // never maps the guest's own frames), then through the hypervisor.
    let staging: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes as usize)]).context("cannot map staging memory")?;
    let r = Elf::load(&staging, None, &mut f, None)
        .map_err(|e| anyhow::anyhow!("{} is not a loadable static ELF64 x86-64 executable: {e}", image.display()))?;
    let entry = r.kernel_load.0;
    let end = r.kernel_end;
    if end > mem_bytes {
        bail!("{} needs {} bytes of memory; the VM has {}", image.display(), end, mem_bytes);
    }
    // Nothing may load below 1 MiB: the boot structures live there.
    let mut low = vec![0u8; guest::IMAGE_MIN_GPA as usize];
    staging.read_slice(&mut low, GuestAddress(0)).ok();
    if low.iter().any(|&b| b != 0) {
        bail!("{} loads below {:#x}, where the boot page tables live", image.display(), guest::IMAGE_MIN_GPA);
    }
    if !(guest::IMAGE_MIN_GPA..end).contains(&entry) {
        bail!("entry point {entry:#x} is outside the image");
    }
    write_boot_structures(&staging, mem_bytes)?;
    staging.write_slice(cmdline.as_bytes(), GuestAddress(guest::CMDLINE_GPA)).context("staging write")?;
    let pages = nonzero_pages(&staging, &[(0, end)])?;
    Ok(Prepared { pages, entry })
}

/// The registers vCPU `cpu` starts with.
pub fn start_regs(entry: u64, mem_bytes: u64, cpu: u32) -> Regs {
    Regs {
        rip: entry,
        rsp: mem_bytes,
        rdi: mem_bytes,
        rsi: cpu as u64,
        rdx: guest::CMDLINE_GPA,
        rflags: 2,
        cr3: guest::PML4_GPA,
        ..Default::default()
    }
}

/// A guest command line: printable ASCII, at most `CMDLINE_MAX` bytes.
pub fn check_cmdline(s: &str) -> Result<()> {
    if s.len() > guest::CMDLINE_MAX {
        bail!("the command line is {} bytes; at most {}", s.len(), guest::CMDLINE_MAX);
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        bail!("the command line may hold printable ASCII only, not {c:?}");
    }
    Ok(())
}

/// A flat 64-bit code segment (L = 1, present, execute/read).
pub const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
/// A flat data segment (present, read/write, 4 GiB).
pub const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;

/// Writes the descriptors `entries` as a GDT at `gpa`.
pub fn write_gdt(m: &GuestMemoryMmap<()>, gpa: u64, entries: &[u64]) -> Result<()> {
    for (i, d) in entries.iter().enumerate() {
        m.write_obj(*d, GuestAddress(gpa + 8 * i as u64))?;
    }
    Ok(())
}

/// Where the identity page tables go: one PML4, one PDPT, and up to four
/// consecutive page directories starting at `pd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTables {
    pub pml4: u64,
    pub pdpt: u64,
    pub pd: u64,
}

/// The test guests' tables (docs/guest-abi.md, part 1).
pub const TEST_TABLES: PageTables = PageTables { pml4: guest::PML4_GPA, pdpt: guest::PDPT_GPA, pd: guest::PD_GPA };

/// Page tables at `t` that identity-map `[0, mem_bytes)` with 2 MiB pages
/// (present, writable, supervisor); at most 4 GiB, one page directory per
/// started GiB.
pub fn write_identity_map(m: &GuestMemoryMmap<()>, t: PageTables, mem_bytes: u64) -> Result<()> {
    const P_RW: u64 = 3;
    const PS: u64 = 0x80;
    let gigs = mem_bytes.div_ceil(1 << 30);
    if gigs > 4 {
        bail!("at most 4 GiB of guest memory");
    }
    m.write_obj(t.pdpt | P_RW, GuestAddress(t.pml4))?;
    for g in 0..gigs {
        m.write_obj((t.pd + g * 4096) | P_RW, GuestAddress(t.pdpt + 8 * g))?;
    }
    let mut a = 0;
    while a < mem_bytes {
        m.write_obj(a | P_RW | PS, GuestAddress(t.pd + 8 * (a >> 21)))?;
        a += 2 << 20;
    }
    Ok(())
}

/// The GDT and page tables of a test guest.
fn write_boot_structures(m: &GuestMemoryMmap<()>, mem_bytes: u64) -> Result<()> {
    write_gdt(m, guest::GDT_GPA, &[0, GDT_CODE64, GDT_DATA])?;
    write_identity_map(m, TEST_TABLES, mem_bytes)
}

/// Every 4 KiB page of `ranges` (page-aligned outwards) in `m` that is not
/// all zeros, in address order: guest memory starts zeroed, so only these
/// need uploading.
pub fn nonzero_pages(m: &GuestMemoryMmap<()>, ranges: &[(u64, u64)]) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut pages = Vec::new();
    let mut starts: Vec<u64> = Vec::new();
    for &(start, end) in ranges {
        let mut a = start & !4095;
        while a < end {
            starts.push(a);
            a += 4096;
        }
    }
    starts.sort_unstable();
    starts.dedup();
    for a in starts {
        let mut page = vec![0u8; 4096];
        m.read_slice(&mut page, GuestAddress(a)).context("staging read")?;
        if page.iter().any(|&b| b != 0) {
            pages.push((a, page));
        }
    }
    Ok(pages)
}

/// Copies `pages` into `vm`'s memory.
pub fn upload(vm: &Vm, pages: &[(u64, Vec<u8>)], what: &str) -> Result<()> {
    for (gpa, page) in pages {
        vm.load(*gpa, page).map_err(|e| anyhow::anyhow!("cannot load the {what}: {e}"))?;
    }
    Ok(())
}

/// What `uxenctl run` or `create` puts into a new VM, prepared (and so
/// checked) before the VM exists.
pub enum Guest {
    /// A test guest (docs/guest-abi.md, part 1).
    Test(Prepared),
    /// A Linux kernel (docs/guest-abi.md, part 2).
    Linux(Box<crate::linux::Prepared>),
}

impl Guest {
    /// `VmCreate::flags` for this guest.
    pub fn vm_flags(&self) -> u32 {
        match self {
            Guest::Test(_) => 0,
            Guest::Linux(_) => shared_abi::VM_FLAG_LINUX | shared_abi::VM_FLAG_VMGENID,
        }
    }

    /// Loads the guest into `vm` (of `mem_bytes` bytes and `vcpus` vCPUs)
    /// and sets the registers of the vCPUs that start at once.
    pub fn install(&self, vm: &Vm, mem_bytes: u64, vcpus: u32) -> Result<()> {
        match self {
            Guest::Test(p) => {
                upload(vm, &p.pages, "image")?;
                for cpu in 0..vcpus {
                    vm.set_regs(cpu, &start_regs(p.entry, mem_bytes, cpu))
                        .map_err(|e| anyhow::anyhow!("cannot set vCPU {cpu}'s registers: {e}"))?;
                }
                Ok(())
            }
            Guest::Linux(p) => crate::linux::install(vm, p),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal static ELF64 x86-64 executable: one PT_LOAD of `code` at
    /// physical `paddr`, entry at its start, `memsz` bytes in memory.
    pub(crate) fn elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut e[64..];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&4096u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    fn write_tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("uxenctl-test-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn page(p: &Prepared, gpa: u64) -> Option<&[u8]> {
        p.pages.iter().find(|(a, _)| *a == gpa).map(|(_, b)| b.as_slice())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn lays_out_image_page_tables_and_cmdline() {
        let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp $-1
        let img = write_tmp("ok", &elf(0x10_0000, &code, 0x3000));
        let p = prepare(&img, 6 << 20, "n=4 touch=2").unwrap();
        assert_eq!(p.entry, 0x10_0000);
        assert_eq!(&page(&p, 0x10_0000).unwrap()[..3], &code);
        // The GDT, the page tables and the command line; nothing else low.
        let gdt = page(&p, guest::GDT_GPA).unwrap();
        assert_eq!(u64_at(gdt, 8), 0x00af_9b00_0000_ffff);
        assert_eq!(u64_at(page(&p, guest::PML4_GPA).unwrap(), 0), guest::PDPT_GPA | 3);
        assert_eq!(u64_at(page(&p, guest::PDPT_GPA).unwrap(), 0), guest::PD_GPA | 3);
        let pd = page(&p, guest::PD_GPA).unwrap();
        assert_eq!(u64_at(pd, 0), 0x83);
        assert_eq!(u64_at(pd, 16), (4 << 20) | 0x83);
        assert_eq!(u64_at(pd, 24), 0, "6 MiB: three 2 MiB pages");
        assert_eq!(&page(&p, guest::CMDLINE_GPA).unwrap()[..12], b"n=4 touch=2\0");
        assert_eq!(p.pages.len(), 6);
        let r = start_regs(p.entry, 6 << 20, 1);
        assert_eq!((r.rip, r.rsp, r.rdi, r.rsi, r.rdx, r.cr3), (0x10_0000, 6 << 20, 6 << 20, 1, 0x8000, 0x2000));
        std::fs::remove_file(img).ok();
    }

    #[test]
    fn refuses_bad_images_and_command_lines() {
        let low = write_tmp("low", &elf(0x8_0000, &[0xf4], 0x1000));
        assert!(prepare(&low, 4 << 20, "").unwrap_err().to_string().contains("loads below 0x100000"));
        let big = write_tmp("big", &elf(0x10_0000, &[0xf4], 8 << 20));
        assert!(prepare(&big, 4 << 20, "").unwrap_err().to_string().contains("needs"));
        let junk = write_tmp("junk", b"#!/bin/sh\necho hi\n");
        assert!(prepare(&junk, 4 << 20, "").unwrap_err().to_string().contains("not a loadable static ELF64"));
        assert!(prepare(std::path::Path::new("/nonexistent/guest"), 4 << 20, "").unwrap_err().to_string().contains("cannot open"));
        assert!(check_cmdline(&"x".repeat(guest::CMDLINE_MAX)).is_ok());
        assert!(check_cmdline(&"x".repeat(guest::CMDLINE_MAX + 1)).is_err());
        assert!(check_cmdline("a\nb").is_err());
        assert!(check_cmdline("caf\u{e9}").is_err());
        for f in [low, big, junk] {
            std::fs::remove_file(f).ok();
        }
    }
}
