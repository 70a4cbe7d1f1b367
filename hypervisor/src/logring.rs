//! The log ring the driver forwards to dmesg (see `shared_abi::LogRing`).
//!
//! The ring lives in host memory: the log is not secret, and the host must be
//! able to read it while it cannot read anything of the hypervisor's.

use shared_abi::{LogRing, LOG_MAGIC};

/// A writer over a ring's header and text area.
pub struct RingWriter {
    header: *mut LogRing,
    data: *mut u8,
    size: u64,
}

// SAFETY: the writer is used under the logger's lock.
unsafe impl Send for RingWriter {}

impl RingWriter {
    /// # Safety
    /// `base` must point to `len` writable bytes that stay valid, aligned for
    /// `LogRing`; only this writer writes them.
    pub unsafe fn init(base: *mut u8, len: usize) -> Option<RingWriter> {
        let hdr = core::mem::size_of::<LogRing>();
        if len <= hdr + 64 || base as usize % 8 != 0 {
            return None;
        }
        let size = (len - hdr) as u64;
        let header = base.cast::<LogRing>();
        // SAFETY: per the contract, `base` holds at least a header.
        unsafe { header.write_volatile(LogRing { magic: LOG_MAGIC, size: size as u32, head: 0 }) };
        // SAFETY: the text follows the header within `len`.
        let data = unsafe { base.add(hdr) };
        Some(RingWriter { header, data, size })
    }

    /// Appends `bytes`; old text is overwritten when the ring is full.
    pub fn write(&mut self, bytes: &[u8]) {
        // SAFETY: `header` is valid per `init`.
        let mut head = unsafe { core::ptr::addr_of!((*self.header).head).read_volatile() };
        for &b in bytes {
            // SAFETY: the offset is below `size`.
            unsafe { self.data.add((head % self.size) as usize).write_volatile(b) };
            head += 1;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        // SAFETY: as above.
        unsafe { core::ptr::addr_of_mut!((*self.header).head).write_volatile(head) };
    }
}

/// A reader, as the driver implements it; here for the tests.
pub fn read_since(ring: &[u8], pos: u64) -> (u64, usize, alloc::vec::Vec<u8>) {
    let hdr = core::mem::size_of::<LogRing>();
    // SAFETY: the slice holds a header at its start.
    let h: LogRing = unsafe { core::ptr::read_unaligned(ring.as_ptr().cast()) };
    let size = h.size as u64;
    let start = pos.max(h.head.saturating_sub(size));
    let lost = (start - pos) as usize;
    let text = (start..h.head).map(|i| ring[hdr + (i % size) as usize]).collect();
    (h.head, lost, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_reports_loss() {
        let mut buf = vec![0u64; (16 + 80) / 8];
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` is 96 bytes, aligned, and outlives the writer.
        let mut w = unsafe { RingWriter::init(base, 96) }.unwrap();
        // SAFETY: reading the same buffer back as bytes.
        let view = || unsafe { std::slice::from_raw_parts(base, 96) }.to_vec();
        w.write(b"hello\n");
        let (head, lost, text) = read_since(&view(), 0);
        assert_eq!((head, lost, &text[..]), (6, 0, &b"hello\n"[..]));
        let line = [b'x'; 100];
        w.write(&line);
        let (head, lost, text) = read_since(&view(), 6);
        assert_eq!(head, 106);
        assert_eq!(lost, 20);
        assert_eq!(text.len(), 80);
    }
}
