//! `uxtest edu ...`: drives QEMU's `edu` PCI device (1234:11e8) from user
//! space, so that a suite can show what device DMA reaches once the
//! hypervisor owns the IOMMU: ordinary RAM yes, hypervisor and guest pages
//! no.
//!
//! The device (QEMU `hw/misc/edu.c`) has a 1 MiB MMIO BAR and a 4 KiB
//! buffer that DMA addresses 0x40000..0x41000 name. A DMA copies between
//! that buffer and RAM: command bit 1 clear is RAM to device, set is device
//! to RAM. QEMU runs it from a timer (about 100 ms of virtual time later)
//! and clears the start bit when done, so we poll with a timeout.
//!
//! Output is one line per command, `key=value` where there are values, for
//! the shell scripts to match.

use crate::probes::{fnv, parse_u64, Result};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x11e8;
const BAR_SIZE: usize = 1 << 20;
const PAGE: usize = 4096;

/// MMIO registers. Offsets below 0x80 take 32-bit accesses only, the DMA
/// registers 32 or 64 bits.
const REG_ID: usize = 0x00;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_CNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
/// The identification register: major 1, minor 0, then 0xed.
const ID: u32 = 0x0100_00ed;

const CMD_START: u64 = 1 << 0;
/// Device to RAM; clear means RAM to device.
const CMD_TO_RAM: u64 = 1 << 1;

/// The device buffer as DMA addresses name it.
const BUF_ADDR: u64 = 0x4_0000;
const BUF_SIZE: u64 = 4096;
/// The longest DMA: QEMU 7.2's range check wants the end of a transfer
/// strictly inside the buffer, so a whole 4096-byte transfer is refused
/// (with a "hardware error" that stops the whole VM).
const MAX_LEN: u64 = BUF_SIZE - 1;
/// edu masks DMA addresses with its `dma_mask`, 28 bits by default: a
/// higher address would silently land 256 MiB lower.
const DMA_LIMIT: u64 = 1 << 28;
/// Far longer than QEMU's 100 ms timer; short enough for a suite.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The device, found, enabled and mapped.
struct Edu {
    bdf: String,
    regs: *mut u8,
}

impl Edu {
    fn open() -> std::result::Result<Edu, String> {
        let bdf = find()?;
        let dir = format!("/sys/bus/pci/devices/{bdf}");
        // Memory space (bit 1) and bus mastering (bit 2) in the PCI command
        // register, through the config file: Linux has no driver bound to
        // edu to do it.
        let cfg_path = format!("{dir}/config");
        let cfg = fs::OpenOptions::new().read(true).write(true).open(&cfg_path).map_err(|e| format!("{cfg_path}: {e}"))?;
        let mut cmd = [0u8; 2];
        cfg.read_exact_at(&mut cmd, 4).map_err(|e| format!("{cfg_path}: read command: {e}"))?;
        let v = u16::from_le_bytes(cmd) | (1 << 1) | (1 << 2);
        cfg.write_all_at(&v.to_le_bytes(), 4).map_err(|e| format!("{cfg_path}: write command: {e}"))?;
        let bar_path = format!("{dir}/resource0");
        let bar = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&bar_path)
            .map_err(|e| format!("{bar_path}: {e}"))?;
        // SAFETY: a shared mapping of the BAR's sysfs resource file, which
        // is BAR_SIZE long; unmapped in Drop. The file may close after mmap.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), BAR_SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, bar.as_raw_fd(), 0)
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {bar_path}: {}", io::Error::last_os_error()));
        }
        Ok(Edu { bdf, regs: p as *mut u8 })
    }

    fn read32(&self, off: usize) -> u32 {
        // SAFETY: `off` is a register offset within the mapped BAR, 4-aligned.
        unsafe { std::ptr::read_volatile(self.regs.add(off) as *const u32) }
    }
    fn read64(&self, off: usize) -> u64 {
        // SAFETY: as above, 8-aligned; edu takes 64-bit DMA register reads.
        unsafe { std::ptr::read_volatile(self.regs.add(off) as *const u64) }
    }
    fn write64(&self, off: usize, v: u64) {
        // SAFETY: as above, a 64-bit DMA register write.
        unsafe { std::ptr::write_volatile(self.regs.add(off) as *mut u64, v) }
    }

    /// One DMA of `len` bytes between `ram` and the device buffer; waits
    /// until the device clears the start bit.
    fn dma(&self, ram: u64, len: u64, to_ram: bool) -> std::result::Result<(), String> {
        if self.read64(REG_DMA_CMD) & CMD_START != 0 {
            return Err("a DMA is already running".into());
        }
        let (src, dst) = if to_ram { (BUF_ADDR, ram) } else { (ram, BUF_ADDR) };
        self.write64(REG_DMA_SRC, src);
        self.write64(REG_DMA_DST, dst);
        self.write64(REG_DMA_CNT, len);
        self.write64(REG_DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
        let t0 = Instant::now();
        loop {
            let cmd = self.read64(REG_DMA_CMD);
            if cmd & CMD_START == 0 {
                return Ok(());
            }
            if t0.elapsed() > TIMEOUT {
                return Err(format!("DMA timed out after {}s (cmd={cmd:#x})", TIMEOUT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        // SAFETY: unmapping what open() mapped.
        unsafe { libc::munmap(self.regs as *mut libc::c_void, BAR_SIZE) };
    }
}

fn read_id(path: &str) -> Option<u16> {
    let s = fs::read_to_string(path).ok()?;
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The first edu device under /sys/bus/pci/devices, by BDF.
fn find() -> std::result::Result<String, String> {
    let dir = "/sys/bus/pci/devices";
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|n| read_id(&format!("{dir}/{n}/vendor")) == Some(VENDOR) && read_id(&format!("{dir}/{n}/device")) == Some(DEVICE))
        .ok_or_else(|| format!("no edu device ({VENDOR:04x}:{DEVICE:04x}) under {dir}"))
}

/// A locked user page and its physical address.
struct DmaPage {
    ptr: *mut u8,
    pa: u64,
}

impl DmaPage {
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a mapped, locked page that lives until exit.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, PAGE) }
    }
    /// What the page holds now, read with volatile loads: the device wrote
    /// it behind the compiler's back.
    fn snapshot(&self) -> Vec<u8> {
        // SAFETY: within the mapped, locked page.
        (0..PAGE).map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(i)) }).collect()
    }
}

/// The physical address of a resident page, through /proc/self/pagemap
/// (bit 63 present, bits 54:0 the frame; the frame reads as 0 unless root).
fn phys_of(pagemap: &fs::File, va: usize) -> std::result::Result<u64, String> {
    let mut e = [0u8; 8];
    pagemap.read_exact_at(&mut e, (va / PAGE * 8) as u64).map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let e = u64::from_le_bytes(e);
    let pfn = e & ((1 << 55) - 1);
    if e & (1 << 63) == 0 {
        return Err(format!("page {va:#x} is not resident"));
    }
    if pfn == 0 {
        return Err("pagemap hides frame numbers: run as root".into());
    }
    Ok(pfn * PAGE as u64)
}

/// `n` locked user pages below edu's DMA limit. Memory is taken in locked
/// chunks and kept (the process is short-lived) so that the kernel does not
/// hand the same unsuitable frames back.
fn dma_pages(n: usize) -> std::result::Result<Vec<DmaPage>, String> {
    const CHUNK: usize = 4 << 20;
    const MAX_CHUNKS: usize = 32;
    let pagemap = fs::File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut found = Vec::new();
    for _ in 0..MAX_CHUNKS {
        // SAFETY: a fresh private anonymous mapping; never unmapped, so the
        // pages stay valid for the DmaPage pointers into it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", io::Error::last_os_error()));
        }
        // SAFETY: locking the mapping just made, so its frames stay put
        // while the device reads and writes them.
        if unsafe { libc::mlock(p, CHUNK) } != 0 {
            return Err(format!("mlock: {}", io::Error::last_os_error()));
        }
        for off in (0..CHUNK).step_by(PAGE) {
            let va = p as usize + off;
            // SAFETY: within the locked mapping; touching makes it resident.
            unsafe { std::ptr::write_volatile(va as *mut u8, 0) };
            let pa = phys_of(&pagemap, va)?;
            if pa + PAGE as u64 <= DMA_LIMIT {
                found.push(DmaPage { ptr: va as *mut u8, pa });
                if found.len() == n {
                    return Ok(found);
                }
            }
        }
    }
    Err(format!("no free page below {} MiB (edu's DMA mask) in {} MiB of tries", DMA_LIMIT >> 20, (CHUNK * MAX_CHUNKS) >> 20))
}

fn check_len(len: u64) -> std::result::Result<u64, String> {
    // QEMU 7.2 aborts the whole VM on a DMA outside the device buffer.
    if len == 0 || len > MAX_LEN {
        return Err(format!("length must be 1..={MAX_LEN}, not {len}"));
    }
    Ok(len)
}

fn check_target(pa: u64, len: u64) -> std::result::Result<(), String> {
    if pa.checked_add(len).is_none_or(|end| end > DMA_LIMIT) {
        return Err(format!("{pa:#x}+{len:#x} is beyond edu's {}-bit DMA mask", DMA_LIMIT.trailing_zeros()));
    }
    Ok(())
}

/// `edu info|dma-to|dma-from|roundtrip`.
pub fn edu(args: &[String]) -> Result {
    let usage = "edu info | dma-to PHYS LEN BYTE | dma-from PHYS LEN | roundtrip";
    match args.first().map(String::as_str) {
        Some("info") => info(),
        Some("dma-to") => dma_to(&args[1..]),
        Some("dma-from") => dma_from(&args[1..]),
        Some("roundtrip") => roundtrip(),
        _ => Err(usage.into()),
    }
}

/// `edu info`: `bdf=0000:00:03.0 id=0x010000ed`.
fn info() -> Result {
    let edu = Edu::open()?;
    let id = edu.read32(REG_ID);
    println!("bdf={} id={id:#010x}", edu.bdf);
    if id != ID {
        return Err(format!("unexpected identification {id:#010x} (want {ID:#010x})"));
    }
    Ok(())
}

/// `edu dma-to PHYS LEN BYTE`: LEN bytes of BYTE from a locked user page
/// into the device, then from the device to PHYS. Prints `done`; whether
/// PHYS changed is for the caller to check (a hidden page must not).
fn dma_to(args: &[String]) -> Result {
    let pa = parse_u64(args.first().ok_or("dma-to PHYS LEN BYTE")?)?;
    let len = check_len(parse_u64(args.get(1).ok_or("missing length")?)?)?;
    let byte = parse_u64(args.get(2).ok_or("missing byte")?)? as u8;
    check_target(pa, len)?;
    let edu = Edu::open()?;
    let mut src = dma_pages(1)?.remove(0);
    src.bytes().fill(byte);
    edu.dma(src.pa, len, false)?;
    edu.dma(pa, len, true)?;
    println!("done");
    Ok(())
}

/// `edu dma-from PHYS LEN`: LEN bytes from PHYS into the device (whose
/// buffer is zeroed first), then into a locked user page. Prints
/// `bytes=N nonzero=M hash=H` like `devmem`: a hidden page reads as
/// nothing, so its bytes stay zero.
fn dma_from(args: &[String]) -> Result {
    let pa = parse_u64(args.first().ok_or("dma-from PHYS LEN")?)?;
    let len = check_len(parse_u64(args.get(1).ok_or("missing length")?)?)?;
    check_target(pa, len)?;
    let edu = Edu::open()?;
    let mut pages = dma_pages(2)?;
    pages[0].bytes().fill(0);
    pages[1].bytes().fill(0xa5);
    edu.dma(pages[0].pa, MAX_LEN, false)?;
    edu.dma(pa, len, false)?;
    edu.dma(pages[1].pa, len, true)?;
    let got = &pages[1].snapshot()[..len as usize];
    let nonzero = got.iter().filter(|&&b| b != 0).count();
    println!("bytes={} nonzero={} hash={:016x}", got.len(), nonzero, fnv(got));
    Ok(())
}

/// `edu roundtrip`: a pattern from one locked page to the device and back
/// into another; every byte must match. Prints `ok` or the first mismatch.
fn roundtrip() -> Result {
    let edu = Edu::open()?;
    let mut pages = dma_pages(2)?;
    for (i, b) in pages[0].bytes().iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add((i >> 8) as u8) ^ 0x5a;
    }
    pages[1].bytes().fill(0);
    edu.dma(pages[0].pa, MAX_LEN, false)?;
    edu.dma(pages[1].pa, MAX_LEN, true)?;
    let want = &pages[0].snapshot()[..MAX_LEN as usize];
    let got = &pages[1].snapshot()[..MAX_LEN as usize];
    match want.iter().zip(got.iter()).position(|(w, g)| w != g) {
        None => {
            println!("ok");
            Ok(())
        }
        Some(i) => {
            println!("mismatch at={i} got={:#04x} want={:#04x} src={:#x} dst={:#x}", got[i], want[i], pages[0].pa, pages[1].pa);
            Err("roundtrip mismatch".into())
        }
    }
}

/// `mmio read32 PHYS` / `mmio write32 PHYS VALUE`: one 32-bit access to a
/// device register through /dev/mem (uncached). The VT-d suite reads and
/// writes the remapping unit's registers with it, as firmware or another
/// kernel would. Prints the value read (`0x%08x`), or `written`.
pub fn mmio(args: &[String]) -> Result {
    let usage = "mmio read32 PHYS | write32 PHYS VALUE";
    let op = args.first().ok_or(usage)?;
    let pa = parse_u64(args.get(1).ok_or(usage)?)?;
    if pa % 4 != 0 {
        return Err(format!("{pa:#x} is not 4-byte aligned"));
    }
    let f = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_SYNC).open("/dev/mem").map_err(|e| format!("/dev/mem: {e}"))?;
    let base = pa & !(PAGE as u64 - 1);
    // SAFETY: a shared mapping of one page of /dev/mem; unmapped below.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), base as libc::off_t)
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {base:#x}: {}", io::Error::last_os_error()));
    }
    // SAFETY: an aligned register inside the mapped page.
    let reg = unsafe { (p as *mut u8).add((pa - base) as usize) as *mut u32 };
    let r = match op.as_str() {
        "read32" => {
            // SAFETY: as above.
            println!("{:#010x}", unsafe { reg.read_volatile() });
            Ok(())
        }
        "write32" => match args.get(2).map(|v| parse_u64(v)) {
            Some(Ok(v)) if v <= u32::MAX as u64 => {
                // SAFETY: as above.
                unsafe { reg.write_volatile(v as u32) };
                println!("written");
                Ok(())
            }
            Some(Err(e)) => Err(e),
            _ => Err(usage.into()),
        },
        _ => Err(usage.into()),
    };
    // SAFETY: unmapping what was mapped.
    unsafe { libc::munmap(p, PAGE) };
    r
}
