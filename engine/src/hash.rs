//! Stable hashing: wallet → shard routing, command fingerprints, and the state digest.
//!
//! These hashes are persisted (fingerprints in snapshots) or decide where data lives (shards), so
//! they are written here rather than borrowed from a crate whose output may change between
//! versions. Changing any of them is a data-format change.

use std::hash::Hasher;

use crate::types::WalletId;

/// The shard that owns `wallet` among `shard_count` shards: FNV-1a 64 of the id's bytes, modulo
/// the count. Stable across versions and platforms.
pub fn shard_for(wallet: &WalletId, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "shard_count must be positive");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in wallet.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shard_count)) as u32
}

/// A stable, word-at-a-time 64-bit hasher for fingerprints and digests. Not for hash tables
/// keyed by untrusted input (it is unkeyed).
#[derive(Clone, Debug)]
pub struct StableHasher {
    state: u64,
    length: u64,
}

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut x: u64) -> u64 {
    // The murmur3 / splitmix64 finalizer: a bijective avalanche of one word.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl StableHasher {
    /// A hasher with a seed; different seeds give independent hashes.
    pub fn new(seed: u64) -> StableHasher {
        StableHasher {
            state: mix(seed ^ MULTIPLIER),
            length: 0,
        }
    }

    fn word(&mut self, word: u64) {
        self.state = mix(self.state.rotate_left(23) ^ word).wrapping_add(MULTIPLIER);
    }
}

impl Default for StableHasher {
    fn default() -> StableHasher {
        StableHasher::new(0)
    }
}

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.word(u64::from_le_bytes(chunk.try_into().expect("chunk of 8")));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mut last = [0u8; 8];
            last[..tail.len()].copy_from_slice(tail);
            // The tail's length goes in the top byte, so "ab" and "ab\0" differ.
            self.word(u64::from_le_bytes(last) ^ ((tail.len() as u64) << 56));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.length = self.length.wrapping_add(8);
        self.word(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn finish(&self) -> u64 {
        mix(self.state ^ self.length)
    }
}

/// The fingerprint of any hashable value (a command body). It tells a repeat from a changed body
/// under one request id; two different bodies agree by accident with a chance of 2^-64 (the hash
/// is unkeyed: it guards against accidents and client bugs, not against a caller crafting
/// collisions for its own ids).
pub fn fingerprint<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = StableHasher::new(0x7a11_7f1e);
    value.hash(&mut hasher);
    hasher.finish()
}

/// The idempotency scope of a request: its wallet (a stable 64-bit hash of the id), or 0 for
/// catalog commands, which every shard applies. A request id is remembered per scope, so the
/// same id used for two wallets names two requests wherever the wallets live.
pub fn scope_of(wallet: Option<&WalletId>) -> u64 {
    match wallet {
        None => 0,
        Some(wallet) => {
            let mut hasher = StableHasher::new(0x05c0_9e00);
            hasher.write(wallet.as_bytes());
            hasher.finish().max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_routing_is_stable() {
        // Fixed expectations: routing decides where wallets live on disk; it must never change.
        let w = |s: &str| WalletId::new(s).unwrap();
        assert_eq!(shard_for(&w("a"), 1), 0);
        assert_eq!(
            shard_for(&w("customer-1"), 16),
            shard_for(&w("customer-1"), 16)
        );
        let counts = (0..10_000).fold([0u32; 4], |mut c, i| {
            c[shard_for(&w(&format!("wallet-{i}")), 4) as usize] += 1;
            c
        });
        assert!(
            counts.iter().all(|&n| n > 2_000),
            "uneven spread {counts:?}"
        );
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            shard_for(&w("a"), 1_000_003),
            (0xaf63_dc4c_8601_ec8c_u64 % 1_000_003) as u32
        );
    }

    #[test]
    fn fingerprints_separate_close_inputs() {
        assert_ne!(fingerprint("ab"), fingerprint("ab\0"));
        assert_ne!(fingerprint(&(1u32, 2u32)), fingerprint(&(2u32, 1u32)));
        assert_eq!(fingerprint(&(1u32, "x")), fingerprint(&(1u32, "x")));
    }
}
