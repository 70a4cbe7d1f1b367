//! Probes of the CPU as the host sees it.

use std::io;

pub type Result = std::result::Result<(), String>;

/// Waits until the serial console has sent everything (`tcdrain`).
pub fn drain() -> Result {
    // SAFETY: tcdrain on stdout has no memory-safety preconditions.
    unsafe { libc::tcdrain(1) };
    Ok(())
}

pub fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x") { u64::from_str_radix(h, 16) } else { s.parse() };
    r.map_err(|_| format!("not a number: {s}"))
}

/// `cpuid LEAF [SUBLEAF]`: prints `eax ebx ecx edx text`.
pub fn cpuid(args: &[String]) -> Result {
    let leaf = parse_u64(args.first().ok_or("cpuid needs a leaf")?)? as u32;
    let sub = args.get(1).map(|s| parse_u64(s)).transpose()?.unwrap_or(0) as u32;
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    let mut text = Vec::new();
    for reg in [r.ebx, r.ecx, r.edx] {
        text.extend_from_slice(&reg.to_le_bytes());
    }
    let text: String = text.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
    println!("{:08x} {:08x} {:08x} {:08x} {}", r.eax, r.ebx, r.ecx, r.edx, text);
    let _ = io::Write::flush(&mut io::stdout());
    Ok(())
}

/// Loads a module with `finit_module` and reports the exact errno.
pub fn modload(args: &[String]) -> Result {
    use std::os::fd::AsRawFd;
    let path = args.first().ok_or("modload needs a path")?;
    let params = std::ffi::CString::new(args[1..].join(" ")).map_err(|e| e.to_string())?;
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: finit_module reads the open file and the NUL-terminated params.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        println!("errno={} ({})", e.raw_os_error().unwrap_or(0), e);
        return Err(format!("{path}: {e}"));
    }
    println!("loaded");
    Ok(())
}
