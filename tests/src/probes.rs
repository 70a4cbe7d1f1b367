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

/// `modunload NAME`: `delete_module` as `rmmod` does; prints `unloaded` or
/// `errno=N (text)` (exit 1).
pub fn modunload(args: &[String]) -> Result {
    let name = std::ffi::CString::new(args.first().ok_or("modunload needs a module name")?.as_str()).map_err(|e| e.to_string())?;
    // SAFETY: delete_module reads the NUL-terminated name.
    let r = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if r != 0 {
        let e = io::Error::last_os_error();
        println!("errno={} ({})", e.raw_os_error().unwrap_or(0), e);
        return Err(format!("{}: {e}", name.to_string_lossy()));
    }
    println!("unloaded");
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

fn open_rw(path: &str) -> std::result::Result<std::fs::File, String> {
    std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| format!("{path}: {e}"))
}

/// `msr read CPU MSR` / `msr write CPU MSR VALUE` through /dev/cpu/N/msr.
/// Prints the value, or `errno=N` and fails.
pub fn msr(args: &[String]) -> Result {
    use std::os::unix::fs::FileExt;
    let op = args.first().ok_or("msr read|write CPU MSR [VALUE]")?;
    let cpu = parse_u64(args.get(1).ok_or("missing CPU")?)?;
    let msr = parse_u64(args.get(2).ok_or("missing MSR")?)?;
    let f = open_rw(&format!("/dev/cpu/{cpu}/msr"))?;
    match op.as_str() {
        "read" => {
            let mut b = [0u8; 8];
            match f.read_at(&mut b, msr) {
                Ok(8) => {
                    println!("{:#x}", u64::from_le_bytes(b));
                    Ok(())
                }
                Ok(n) => Err(format!("short read {n}")),
                Err(e) => {
                    println!("errno={}", e.raw_os_error().unwrap_or(0));
                    Err(format!("rdmsr {msr:#x}: {e}"))
                }
            }
        }
        "write" => {
            let v = parse_u64(args.get(3).ok_or("missing value")?)?;
            match f.write_at(&v.to_le_bytes(), msr) {
                Ok(8) => {
                    println!("written");
                    Ok(())
                }
                Ok(n) => Err(format!("short write {n}")),
                Err(e) => {
                    println!("errno={}", e.raw_os_error().unwrap_or(0));
                    Err(format!("wrmsr {msr:#x}: {e}"))
                }
            }
        }
        _ => Err("msr read|write".into()),
    }
}

/// `devmem read PHYS LEN` (pread), `devmem mmap PHYS LEN` (loads through a
/// mapping), `devmem write PHYS LEN BYTE` (pwrite): prints how many bytes
/// read back non-zero and an FNV-1a hash.
pub fn devmem(args: &[String]) -> Result {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let op = args.first().ok_or("devmem read|mmap|write PHYS LEN [BYTE]")?;
    let pa = parse_u64(args.get(1).ok_or("missing address")?)?;
    let len = parse_u64(args.get(2).ok_or("missing length")?)? as usize;
    let f = open_rw("/dev/mem")?;
    let mut buf = vec![0u8; len];
    match op.as_str() {
        "read" => {
            let n = f.read_at(&mut buf, pa).map_err(|e| format!("read {pa:#x}: {e}"))?;
            buf.truncate(n);
        }
        "mmap" => {
            let base = pa & !4095;
            let off = (pa - base) as usize;
            let maplen = (off + len + 4095) & !4095;
            // SAFETY: a shared read-only mapping of /dev/mem; unmapped below.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), maplen, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), base as libc::off_t)
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap {base:#x}: {}", io::Error::last_os_error()));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                // SAFETY: within the mapping.
                *b = unsafe { std::ptr::read_volatile((p as *const u8).add(off + i)) };
            }
            // SAFETY: unmapping what was mapped.
            unsafe { libc::munmap(p, maplen) };
        }
        "write" => {
            let byte = parse_u64(args.get(3).ok_or("missing byte")?)? as u8;
            buf.fill(byte);
            let n = f.write_at(&buf, pa).map_err(|e| format!("write {pa:#x}: {e}"))?;
            println!("written={n}");
            return Ok(());
        }
        "mmapw" => {
            // Stores from user mode through a shared mapping (each one a
            // CPL 3 instruction for the hypervisor to decode), then loads.
            let byte = parse_u64(args.get(3).ok_or("missing byte")?)? as u8;
            let base = pa & !4095;
            let off = (pa - base) as usize;
            let maplen = (off + len + 4095) & !4095;
            // SAFETY: a shared read-write mapping of /dev/mem; unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    maplen,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    base as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap {base:#x}: {}", io::Error::last_os_error()));
            }
            for i in 0..len {
                // SAFETY: within the mapping.
                unsafe { std::ptr::write_volatile((p as *mut u8).add(off + i), byte) };
            }
            for (i, b) in buf.iter_mut().enumerate() {
                // SAFETY: within the mapping.
                *b = unsafe { std::ptr::read_volatile((p as *const u8).add(off + i)) };
            }
            // SAFETY: unmapping what was mapped.
            unsafe { libc::munmap(p, maplen) };
            let same = buf.iter().filter(|&&b| b == byte).count();
            println!("stored={len} reads_back={same}");
            return Ok(());
        }
        _ => return Err("devmem read|mmap|mmapw|write".into()),
    }
    let nonzero = buf.iter().filter(|&&b| b != 0).count();
    println!("bytes={} nonzero={} hash={:016x}", buf.len(), nonzero, fnv(&buf));
    Ok(())
}

pub fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

/// `ring3 INSN [NR]`: runs a VMX instruction in user mode in a child
/// process (VMCALL with RAX = NR, default 1); prints the signal that ended
/// it (SIGILL for #UD), or `none`.
pub fn ring3(args: &[String]) -> Result {
    let insn = args.first().ok_or("ring3 vmxon|vmcall|invept|invvpid|vmread|vmwrite|vmptrld|vmclear|vmlaunch|vmresume|vmxoff|vmfunc|getsec [NR]")?.clone();
    let nr = args.get(1).map(|s| parse_u64(s)).transpose()?.unwrap_or(1);
    // SAFETY: fork in a single-threaded tool; the child only runs `insn`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let page = [0u64; 512];
        let desc = [0u64; 2];
        // SAFETY: each of these raises #UD (or a VM exit reflected as #UD) in
        // user mode; the child then dies of SIGILL, which is the point.
        unsafe {
            match insn.as_str() {
                "vmxon" => core::arch::asm!("vmxon [{}]", in(reg) &page),
                "vmcall" => core::arch::asm!("vmcall", inout("rax") nr => _, in("rdi") &page, in("rsi") 4096u64),
                "invept" => core::arch::asm!("invept {}, [{}]", in(reg) 2u64, in(reg) &desc),
                "vmread" => core::arch::asm!("vmread {}, {}", out(reg) _, in(reg) 0x681eu64),
                "vmxoff" => core::arch::asm!("vmxoff"),
                "vmfunc" => core::arch::asm!("vmfunc", in("eax") 0u32, in("ecx") 0u32),
                "invvpid" => core::arch::asm!("invvpid {}, [{}]", in(reg) 2u64, in(reg) &desc),
                "vmwrite" => core::arch::asm!("vmwrite {}, {}", in(reg) 0x681eu64, in(reg) 0u64),
                "vmptrld" => core::arch::asm!("vmptrld [{}]", in(reg) &page),
                "vmclear" => core::arch::asm!("vmclear [{}]", in(reg) &page),
                "vmlaunch" => core::arch::asm!("vmlaunch"),
                "vmresume" => core::arch::asm!("vmresume"),
                "getsec" => core::arch::asm!("getsec", inout("eax") 0u32 => _),
                _ => libc::_exit(3),
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        println!("{}", if sig == libc::SIGILL { "SIGILL".to_string() } else { format!("signal {sig}") });
    } else {
        println!("none (exit {})", libc::WEXITSTATUS(status));
    }
    Ok(())
}

/// `checksum MIB`: hashes MIB MiB of generated data, touching every byte.
pub fn checksum(args: &[String]) -> Result {
    let mib = parse_u64(args.first().map(String::as_str).unwrap_or("4"))? as usize;
    let mut buf = vec![0u64; mib << 17];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let h = buf.iter().fold(0u64, |h, &w| h.rotate_left(5) ^ w);
    println!("{h:016x}");
    Ok(())
}

/// `forkstorm N`: forks and execs `/bin/true` N times; fails unless all
/// exit 0.
pub fn forkstorm(args: &[String]) -> Result {
    let n = parse_u64(args.first().map(String::as_str).unwrap_or("100"))?;
    let mut ok = 0;
    for _ in 0..n {
        match std::process::Command::new("/bin/true").status() {
            Ok(s) if s.success() => ok += 1,
            _ => {}
        }
    }
    println!("{ok}/{n}");
    if ok == n {
        Ok(())
    } else {
        Err(format!("{} of {n} children failed", n - ok))
    }
}

/// `cpuid-cost N`: TSC cycles per CPUID of the hypervisor leaf, against a
/// loop of plain instructions (the baseline).
/// Prints the TSC.
pub fn rdtsc() -> Result {
    // SAFETY: RDTSC has no side effects.
    println!("{}", unsafe { core::arch::x86_64::_rdtsc() });
    Ok(())
}

pub fn cpuid_cost(args: &[String]) -> Result {
    let n = parse_u64(args.first().map(String::as_str).unwrap_or("1000"))?;
    // SAFETY: RDTSC has no side effects.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    for _ in 0..n {
        std::hint::black_box(core::arch::x86_64::__cpuid_count(0x4000_0000, 0));
    }
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    let mut acc = 0u64;
    for i in 0..n {
        acc = std::hint::black_box(acc.wrapping_add(i));
    }
    // SAFETY: as above.
    let t2 = unsafe { core::arch::x86_64::_rdtsc() };
    println!("cpuid_tsc={} loop_tsc={} n={}", (t1 - t0) / n, (t2 - t1) / n, n);
    Ok(())
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> std::result::Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!("cannot pin a thread to CPU {cpu}: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `irqstorm ROUNDS SLEEPS USEC`: the host's interrupt path under load.
/// Two threads, pinned to CPUs 0 and 1, pass a byte back and forth ROUNDS
/// times through two pipes: each side sleeps until the other wakes it,
/// with a rescheduling IPI when its CPU idles. Meanwhile a thread on each
/// CPU sleeps USEC microseconds SLEEPS times, which programs the local
/// APIC timer at that rate. Prints `rounds=N sleeps=N`.
pub fn irqstorm(args: &[String]) -> Result {
    let num = |i: usize, d: &str| parse_u64(args.get(i).map(String::as_str).unwrap_or(d));
    let (rounds, sleeps, usec) = (num(0, "20000")?, num(1, "20000")?, num(2, "100")?);
    let mut fds = [[0i32; 2]; 2];
    for p in &mut fds {
        // SAFETY: pipe writes two descriptors into the array.
        if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
            return Err(format!("pipe: {}", io::Error::last_os_error()));
        }
    }
    let xfer = |read: i32, write: i32, first: bool| -> std::result::Result<u64, String> {
        let mut b = [0u8; 1];
        let mut n = 0;
        for i in 0..rounds {
            if !(first && i == 0) {
                // SAFETY: a one-byte read into `b` from our pipe.
                if unsafe { libc::read(read, b.as_mut_ptr().cast(), 1) } != 1 {
                    return Err(format!("pipe read: {}", io::Error::last_os_error()));
                }
            }
            // SAFETY: a one-byte write from `b` to our pipe.
            if unsafe { libc::write(write, b.as_ptr().cast(), 1) } != 1 {
                return Err(format!("pipe write: {}", io::Error::last_os_error()));
            }
            n += 1;
        }
        Ok(n)
    };
    let sleeper = move |cpu: usize| -> std::result::Result<u64, String> {
        pin(cpu)?;
        for _ in 0..sleeps {
            std::thread::sleep(std::time::Duration::from_micros(usec));
        }
        Ok(sleeps)
    };
    let (a, b) = (fds[0], fds[1]);
    let (r0, r1, s0, s1) = std::thread::scope(|s| {
        let p0 = s.spawn(move || pin(0).and_then(|_| xfer(b[0], a[1], true)));
        let p1 = s.spawn(move || pin(1).and_then(|_| xfer(a[0], b[1], false)));
        let t0 = s.spawn(move || sleeper(0));
        let t1 = s.spawn(move || sleeper(1));
        let j = |h: std::thread::ScopedJoinHandle<'_, std::result::Result<u64, String>>| h.join().unwrap_or(Err("a thread panicked".into()));
        (j(p0), j(p1), j(t0), j(t1))
    });
    let (r0, r1, s0, s1) = (r0?, r1?, s0?, s1?);
    if r0 != rounds || r1 != rounds {
        return Err(format!("{r0} and {r1} of {rounds} rounds"));
    }
    println!("rounds={r0} sleeps={}", s0 + s1);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The ring-0 probe (C, no Cargo dependencies) names the size of
    /// `HvStats` by hand: it must follow the ABI.
    #[test]
    fn probe_knows_the_stats_size() {
        let c = include_str!("../probe/uxen_probe.c");
        let line = c.lines().find(|l| l.starts_with("#define STATS_SIZE ")).expect("STATS_SIZE in uxen_probe.c");
        let n: usize = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(n, core::mem::size_of::<shared_abi::HvStats>());
    }
}
