//! Putting a guest image into a new VM (docs/guest-abi.md): the ELF's load
//! segments at their physical addresses, the boot GDT and identity page
//! tables, and vCPU 0's registers.

use crate::dev::Vm;
use anyhow::{bail, Context, Result};
use linux_loader::loader::{elf::Elf, KernelLoader};
use shared_abi::{guest, Regs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Loads `image` into `vm` (of `mem_bytes` bytes) with its command line and
/// sets vCPU registers; returns how many bytes went into guest memory.
pub fn load(vm: &Vm, image: &std::path::Path, mem_bytes: u64, vcpus: u32, cmdline: &str) -> Result<u64> {
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
    if !(guest::IMAGE_MIN_GPA..end).contains(&entry) {
        bail!("entry point {entry:#x} is outside the image");
    }
    // Nothing may load below 1 MiB: the boot structures live there.
    let mut low = vec![0u8; guest::IMAGE_MIN_GPA as usize];
    staging.read_slice(&mut low, GuestAddress(0)).ok();
    if low.iter().any(|&b| b != 0) {
        bail!("{} loads below {:#x}, where the boot page tables live", image.display(), guest::IMAGE_MIN_GPA);
    }
    write_boot_structures(&staging, mem_bytes)?;
    check_cmdline(cmdline)?;
    staging.write_slice(cmdline.as_bytes(), GuestAddress(guest::CMDLINE_GPA)).context("staging write")?;
    // Upload every page that is not all zeros (guest memory starts zeroed).
    let mut uploaded = 0;
    let mut page = vec![0u8; 4096];
    let mut a = 0u64;
    let top = (end + 4095) & !4095;
    while a < top {
        staging.read_slice(&mut page, GuestAddress(a)).context("staging read")?;
        if page.iter().any(|&b| b != 0) {
            vm.load(a, &page).map_err(|e| anyhow::anyhow!("cannot load the image: {e}"))?;
            uploaded += 4096;
        }
        a += 4096;
    }
    for cpu in 0..vcpus {
        let regs = Regs {
            rip: entry,
            rsp: mem_bytes,
            rdi: mem_bytes,
            rsi: cpu as u64,
            rdx: guest::CMDLINE_GPA,
            rflags: 2,
            cr3: guest::PML4_GPA,
            ..Default::default()
        };
        vm.set_regs(cpu, &regs).map_err(|e| anyhow::anyhow!("cannot set vCPU {cpu}'s registers: {e}"))?;
    }
    Ok(uploaded)
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

/// The GDT and page tables that identity-map guest memory with 2 MiB pages.
fn write_boot_structures(m: &GuestMemoryMmap<()>, mem_bytes: u64) -> Result<()> {
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        m.write_obj(*d, GuestAddress(guest::GDT_GPA + 8 * i as u64))?;
    }
    const P_RW: u64 = 3;
    m.write_obj(guest::PDPT_GPA | P_RW, GuestAddress(guest::PML4_GPA))?;
    let gigs = mem_bytes.div_ceil(1 << 30);
    if gigs > 4 {
        bail!("at most 4 GiB of guest memory");
    }
    for g in 0..gigs {
        m.write_obj((guest::PD_GPA + g * 4096) | P_RW, GuestAddress(guest::PDPT_GPA + 8 * g))?;
    }
    let mut a = 0;
    while a < mem_bytes {
        let entry = a | P_RW | 0x80;
        m.write_obj(entry, GuestAddress(guest::PD_GPA + 8 * (a >> 21)))?;
        a += 2 << 20;
    }
    Ok(())
}
