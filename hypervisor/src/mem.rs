//! Physical memory as the portable core sees it: behind [`PhysMem`], so the
//! page-table, emulation, fork and merge logic runs against a mock in
//! `cargo test`.

use crate::addr::{Hpa, PAGE_SIZE};

/// Access to host-physical memory.
pub trait PhysMem {
    fn read(&self, pa: Hpa, buf: &mut [u8]);
    fn write(&self, pa: Hpa, buf: &[u8]);

    fn read_u64(&self, pa: Hpa) -> u64 {
        let mut b = [0u8; 8];
        self.read(pa, &mut b);
        u64::from_le_bytes(b)
    }
    fn write_u64(&self, pa: Hpa, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }
    fn zero_page(&self, pa: Hpa) {
        self.write(pa, &[0u8; PAGE_SIZE as usize]);
    }
    fn copy_page(&self, dst: Hpa, src: Hpa) {
        let mut b = [0u8; PAGE_SIZE as usize];
        self.read(src, &mut b);
        self.write(dst, &b);
    }
    /// Whether two pages hold the same bytes.
    fn pages_equal(&self, a: Hpa, b: Hpa) -> bool {
        let mut x = [0u8; 512];
        let mut y = [0u8; 512];
        let mut off = 0;
        while off < PAGE_SIZE {
            self.read(Hpa(a.0 + off), &mut x);
            self.read(Hpa(b.0 + off), &mut y);
            if x != y {
                return false;
            }
            off += 512;
        }
        true
    }
    fn page_is_zero(&self, a: Hpa) -> bool {
        let mut x = [0u8; 512];
        let mut off = 0;
        while off < PAGE_SIZE {
            self.read(Hpa(a.0 + off), &mut x);
            if x.iter().any(|&b| b != 0) {
                return false;
            }
            off += 512;
        }
        true
    }
}

/// A source of zeroed 4 KiB frames for page tables.
pub trait FrameAlloc {
    fn alloc_frame(&mut self) -> Option<Hpa>;
    fn free_frame(&mut self, pa: Hpa);
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod mock {
    //! Sparse mock physical memory.
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct MockMem {
        pages: RefCell<HashMap<u64, Box<[u8; 4096]>>>,
    }

    impl MockMem {
        pub fn new() -> Self {
            Self::default()
        }
        pub fn pages_touched(&self) -> usize {
            self.pages.borrow().len()
        }
    }

    impl PhysMem for MockMem {
        fn read(&self, pa: Hpa, buf: &mut [u8]) {
            let mut done = 0;
            while done < buf.len() {
                let a = pa.0 + done as u64;
                let off = (a % 4096) as usize;
                let n = (4096 - off).min(buf.len() - done);
                match self.pages.borrow().get(&(a / 4096)) {
                    Some(p) => buf[done..done + n].copy_from_slice(&p[off..off + n]),
                    None => buf[done..done + n].fill(0),
                }
                done += n;
            }
        }
        fn write(&self, pa: Hpa, buf: &[u8]) {
            let mut done = 0;
            while done < buf.len() {
                let a = pa.0 + done as u64;
                let off = (a % 4096) as usize;
                let n = (4096 - off).min(buf.len() - done);
                let mut pages = self.pages.borrow_mut();
                let p = pages.entry(a / 4096).or_insert_with(|| Box::new([0u8; 4096]));
                p[off..off + n].copy_from_slice(&buf[done..done + n]);
                done += n;
            }
        }
        /// A zeroed page is an absent one: scrubbing stays cheap when the
        /// fuzz harnesses donate and free thousands of frames.
        fn zero_page(&self, pa: Hpa) {
            if pa.is_page_aligned() {
                self.pages.borrow_mut().remove(&pa.pfn());
            } else {
                self.write(pa, &[0u8; PAGE_SIZE as usize]);
            }
        }
        fn page_is_zero(&self, a: Hpa) -> bool {
            let pages = self.pages.borrow();
            match pages.get(&a.pfn()) {
                None if a.is_page_aligned() => true,
                Some(p) if a.is_page_aligned() => p.iter().all(|&b| b == 0),
                _ => {
                    drop(pages);
                    let mut x = [0u8; PAGE_SIZE as usize];
                    self.read(a, &mut x);
                    x.iter().all(|&b| b == 0)
                }
            }
        }
    }

    /// Hands out frames from a fixed physical window and checks frees.
    pub struct MockFrames {
        pub next: u64,
        pub end: u64,
        pub free: Vec<u64>,
        pub live: std::collections::HashSet<u64>,
    }

    impl MockFrames {
        pub fn new(base: u64, frames: u64) -> Self {
            MockFrames { next: base, end: base + frames * 4096, free: Vec::new(), live: Default::default() }
        }
    }

    impl FrameAlloc for MockFrames {
        fn alloc_frame(&mut self) -> Option<Hpa> {
            let a = if let Some(a) = self.free.pop() {
                a
            } else if self.next < self.end {
                self.next += 4096;
                self.next - 4096
            } else {
                return None;
            };
            assert!(self.live.insert(a), "frame handed out twice");
            Some(Hpa(a))
        }
        fn free_frame(&mut self, pa: Hpa) {
            assert!(self.live.remove(&pa.0), "freeing a frame that is not live: {pa:?}");
            self.free.push(pa.0);
        }
    }

    /// A PC's RAM: 0-640 KiB, 1 MiB - 3 GiB, 4 GiB - 6 GiB.
    pub fn pc_ram() -> Vec<shared_abi::MemRange> {
        use shared_abi::MemRange;
        vec![
            MemRange { base: 0, size: 0xa_0000 },
            MemRange { base: 0x10_0000, size: (3 << 30) - 0x10_0000 },
            MemRange { base: 4 << 30, size: 2 << 30 },
        ]
    }

    /// Mock memory and a pool of `frames` frames donated at 4 GiB.
    pub fn with_pool(frames: usize) -> (MockMem, crate::pool::FramePool) {
        let mut pool = crate::pool::FramePool::new();
        pool.donate(Hpa(0x1_0000_0000), frames).unwrap();
        (MockMem::new(), pool)
    }

    /// Pool frames in use.
    pub fn used(pool: &crate::pool::FramePool) -> u64 {
        pool.frames_total() - pool.frames_free()
    }
}
