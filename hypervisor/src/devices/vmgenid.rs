//! VM generation IDs: the 16-byte values a fork writes into a Linux
//! guest's generation-ID buffer (`shared_abi::VM_FLAG_VMGENID`), one for
//! the parent and one for each child.
//!
//! What a guest needs of them is that no two sides of any fork ever see the
//! same ID; Linux mixes the new ID into its random pool and reseeds, so two
//! clones with equal IDs would go on drawing the same numbers. Randomness
//! alone makes that only likely, and the source may be weak (no RDRAND: the
//! TSC). So an ID is two halves:
//!
//! - the low 8 bytes are a counter, one per ID this hypervisor ever made,
//!   passed through a bijection of 64-bit words keyed at the first ID.
//!   Distinct counters give distinct words whatever the key: IDs made by
//!   one hypervisor load never repeat;
//! - the high 8 bytes are fresh entropy, so that IDs of different loads (a
//!   reloaded hypervisor counts from 0 again, with a new key) differ too,
//!   and so that an ID cannot be guessed from the last one.
//!
//! The model is plain data; `hv/linux.rs` keeps the one generator and
//! feeds it RDRAND, or the TSC where the CPU has no RDRAND.

/// splitmix64's finaliser: xor-shifts and multiplications by odd
/// constants, each invertible, so the whole is a bijection of `u64`.
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Makes generation IDs: never the same twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generator {
    /// IDs made so far.
    count: u64,
    /// Set from the first ID's entropy.
    key: u64,
}

impl Generator {
    pub const fn new() -> Self {
        Generator { count: 0, key: 0 }
    }

    /// A new ID, with `entropy` (a random word, or the best the caller has)
    /// in its high half.
    pub fn next(&mut self, entropy: u64) -> [u8; 16] {
        if self.count == 0 {
            self.key = mix(entropy ^ 0x9e37_79b9_7f4a_7c15);
        }
        let low = mix(self.count.wrapping_add(self.key));
        self.count = self.count.wrapping_add(1);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&low.to_le_bytes());
        id[8..].copy_from_slice(&mix(entropy).to_le_bytes());
        id
    }

    /// IDs made so far.
    pub const fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_never_repeat_even_without_entropy() {
        for entropy in [0u64, u64::MAX, 0x1234] {
            let mut g = Generator::new();
            let ids: HashSet<[u8; 16]> = (0..10_000).map(|_| g.next(entropy)).collect();
            assert_eq!(ids.len(), 10_000);
            // The counter halves alone are distinct.
            let mut g = Generator::new();
            let lows: HashSet<[u8; 8]> = (0..10_000).map(|_| g.next(entropy)[..8].try_into().unwrap()).collect();
            assert_eq!(lows.len(), 10_000);
            assert_eq!(g.count(), 10_000);
        }
    }

    #[test]
    fn entropy_fills_the_high_half_and_keys_the_low_one() {
        let (mut a, mut b) = (Generator::new(), Generator::new());
        let (x, y) = (a.next(1), b.next(2));
        assert_ne!(x[8..], y[8..]);
        // Two hypervisor loads, keyed differently, count through different
        // words.
        assert_ne!(x[..8], y[..8]);
        // Later entropy does not re-key.
        let (x2, y2) = (a.next(7), b.next(7));
        assert_eq!(x2[8..], y2[8..]);
        assert_ne!(x2[..8], y2[..8]);
        // Never all zeros, which a guest could take for "no ID".
        assert_ne!(Generator::new().next(0), [0; 16]);
    }

    #[test]
    fn mix_is_invertible_on_samples() {
        let xs: HashSet<u64> = (0..100_000u64).map(|i| mix(i.wrapping_mul(0x9e37_79b9))).collect();
        assert_eq!(xs.len(), 100_000);
        assert_eq!(mix(0), 0);
    }
}
