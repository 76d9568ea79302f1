//! The idempotency table: a compact record of every request applied within the retention
//! window, and of every charge a refund may still name.
//!
//! A request is remembered as a 40-byte [`Remembered`]: a 96-bit digest of its scope and id, the
//! second it was applied, a 64-bit fingerprint of its body, and its reply packed into two
//! integers. The index over them is a table of 4-byte positions (with hashbrown's control byte
//! and load factor, 5–10 bytes per id), so a remembered id costs about 48 bytes in all. A reply
//! whose numbers do not fit the packed form is kept whole in a side map: refunds, and replies
//! with a second amount (a charge's new debt, a hold's amount, a grant's debt paid) of more
//! than 9 significant digits, or a first one of more than 18. What the reply said about the wallet's *available*
//! balance (charges and holds) is not kept: a repeat gets the first reply's outcome and amounts,
//! and the balance as it is now (a reply kept whole is repeated whole).
//!
//! Records live in a FIFO of fixed-size chunks shared copy-on-write with checkpoints (copying the
//! table copies chunk pointers; the engine copies a chunk only when it changes one that a
//! checkpoint still holds). Every chunk but the last is full, and a chunk freed from the front is
//! reused, so a steady stream of requests allocates nothing.

use std::collections::VecDeque;
use std::hash::Hasher;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::code::ResultCode;
use crate::command::{Reply, ReplyValue};
use crate::hash::StableHasher;
use crate::types::{AssetCode, GrantId, HoldId, RequestId, Timestamp};

/// The 96-bit key of a request: a digest of its idempotency scope and its id. Two different
/// requests share a key with a chance of about 2^-96 per pair; if they ever did, the second would
/// be refused as a conflict (or answered as the first), never applied twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key(pub [u32; 3]);

impl Key {
    /// The key of request `id` in `scope` ([`crate::hash::scope_of`]).
    pub fn of(scope: u64, id: RequestId) -> Key {
        let digest = |seed: u64| {
            let mut h = StableHasher::new(seed);
            h.write_u64(scope);
            h.write_u64(id.0 as u64);
            h.write_u64((id.0 >> 64) as u64);
            h.finish()
        };
        let (x, y) = (digest(0x1de4_7a11), digest(0x5c09_e6a1));
        Key([x as u32, (x >> 32) as u32, y as u32])
    }

    /// The hash the index files it under (already uniform: a slice of the digest).
    pub fn hash(self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }
}

/// Whole seconds since the Unix epoch (saturating to `u32`: until 2106).
pub fn seconds(t: Timestamp) -> u32 {
    (t.0.div_euclid(Timestamp::SECOND_US)).clamp(0, i64::from(u32::MAX)) as u32
}

/// The length of a [`tick`]: 10 ms.
pub const TICK_US: i64 = 10_000;

/// The 10-ms tick of `t` (floor), the full number.
pub fn tick(t: Timestamp) -> i64 {
    t.0.div_euclid(TICK_US)
}

/// Whether a record made in tick `at` (its low 32 bits, as stored) has left the window at
/// `now`: its tick is before the tick of `now − retention`. The low 32 bits of a tick wrap every
/// 497 days, more than the longest retention (366 days), so the age read from them is exact.
pub fn forgotten(at: u32, now: Timestamp, retention_us: i64) -> bool {
    let now_tick = tick(now);
    let age = u64::from((now_tick as u32).wrapping_sub(at));
    let limit = (now_tick - tick(Timestamp(now.0.saturating_sub(retention_us)))) as u64;
    age > limit
}

/// What the packed reply holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Tag {
    None = 0,
    Grant = 1,
    Charge = 2,
    Hold = 3,
    Dispute = 4,
    Version = 5,
    Shortfall = 6,
    /// Kept whole in the side map under the record's sequence number.
    Spilled = 7,
}

/// A remembered request: 40 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Digest of its scope and id.
    pub key: Key,
    /// When it was applied: the low 32 bits of its 10-ms [`tick`].
    pub at: u32,
    /// The 64-bit fingerprint of its body, as two halves (keeps the record 4-byte aligned).
    pub fingerprint: [u32; 2],
    /// The reply's first number: an id or a decimal mantissa.
    pub a: [u32; 2],
    /// The reply's second number: a decimal mantissa.
    pub b: i32,
    /// Packed: result code (7 bits), tag (3), scale of `a` (5), scale of `b` (5), asset index
    /// (10).
    pub packed: u32,
}

impl Remembered {
    /// The body fingerprint.
    pub fn fingerprint(&self) -> u64 {
        u64::from(self.fingerprint[0]) | (u64::from(self.fingerprint[1]) << 32)
    }

    fn code(&self) -> Option<ResultCode> {
        ResultCode::from_u16((self.packed & 0x7f) as u16)
    }

    fn tag(&self) -> u8 {
        ((self.packed >> 7) & 0x7) as u8
    }

    /// True when the reply is kept whole in the side map.
    pub fn spilled(&self) -> bool {
        self.tag() == Tag::Spilled as u8
    }

    /// Whether the record can be unpacked: a known result code, and an asset index below
    /// `assets` where the reply names an asset (checked when a state is restored).
    pub fn is_valid(&self, assets: usize) -> bool {
        let names_asset = [Tag::Charge as u8, Tag::Hold as u8, Tag::Shortfall as u8];
        self.code().is_some()
            && (!names_asset.contains(&self.tag()) || ((self.packed >> 20) as usize) < assets)
    }

    fn a(&self) -> i64 {
        (u64::from(self.a[0]) | (u64::from(self.a[1]) << 32)) as i64
    }

    fn dec_a(&self) -> Decimal {
        Decimal::from_i128_with_scale(i128::from(self.a()), (self.packed >> 10) & 0x1f)
    }

    fn dec_b(&self) -> Decimal {
        Decimal::from_i128_with_scale(i128::from(self.b), (self.packed >> 15) & 0x1f)
    }

    /// Packs `reply` for request `key` with body `fingerprint` applied at `at`. `asset_index`
    /// gives the index of an asset code the reply names. `None` when the reply does not fit the
    /// packed form (keep it whole with tag `Spilled`).
    fn pack(
        key: Key,
        at: u32,
        fingerprint: u64,
        reply: &Reply,
        asset_index: impl Fn(&AssetCode) -> Option<u32>,
    ) -> Option<Remembered> {
        let code = reply.code as u16;
        if code > 0x7f {
            return None;
        }
        let mantissa = |d: Decimal| (d.mantissa(), d.scale());
        let fit_a = |d: Decimal| {
            let (m, s) = mantissa(d);
            i64::try_from(m).ok().map(|m| (m, s))
        };
        let fit_b = |d: Decimal| {
            let (m, s) = mantissa(d);
            i32::try_from(m).ok().map(|m| (m, s))
        };
        let id = |n: u64| i64::try_from(n).ok().map(|n| (n, 0));
        let ((a, sa), (b, sb), asset, tag) = match reply.value {
            ReplyValue::None => ((0, 0), (0, 0), 0, Tag::None),
            ReplyValue::Grant { grant, debt_paid } => {
                (id(grant.0)?, fit_b(debt_paid)?, 0, Tag::Grant)
            }
            ReplyValue::Charge {
                asset,
                charged,
                debt_added,
                ..
            } => (
                fit_a(charged)?,
                fit_b(debt_added)?,
                asset_index(&asset)?,
                Tag::Charge,
            ),
            ReplyValue::Hold {
                hold,
                asset,
                amount,
                ..
            } => (id(hold.0)?, fit_b(amount)?, asset_index(&asset)?, Tag::Hold),
            ReplyValue::Dispute {
                clawed_back,
                debt_added,
            } => (fit_a(clawed_back)?, fit_b(debt_added)?, 0, Tag::Dispute),
            ReplyValue::Version { version } => ((i64::from(version), 0), (0, 0), 0, Tag::Version),
            ReplyValue::Shortfall {
                asset,
                spendable,
                required,
            } => (
                fit_a(spendable)?,
                fit_b(required)?,
                asset_index(&asset)?,
                Tag::Shortfall,
            ),
            ReplyValue::Refund { .. } => return None,
        };
        if asset >= 1 << 10 {
            return None;
        }
        Some(Remembered {
            key,
            at,
            fingerprint: [fingerprint as u32, (fingerprint >> 32) as u32],
            a: [a as u32, ((a as u64) >> 32) as u32],
            b,
            packed: u32::from(code) | (tag as u32) << 7 | sa << 10 | sb << 15 | asset << 20,
        })
    }

    /// A record whose reply is kept whole in the side map.
    fn spilled_record(key: Key, at: u32, fingerprint: u64, code: ResultCode) -> Remembered {
        Remembered {
            key,
            at,
            fingerprint: [fingerprint as u32, (fingerprint >> 32) as u32],
            a: [0, 0],
            b: 0,
            packed: (code as u32 & 0x7f) | (Tag::Spilled as u32) << 7,
        }
    }

    /// The reply this record packs (not for spilled records). `asset` maps an asset index back
    /// to its code; `available` gives the available balance of an asset now, which a repeat of a
    /// charge or hold reports.
    pub fn unpack(
        &self,
        asset: impl Fn(u32) -> AssetCode,
        available: impl Fn(AssetCode) -> Decimal,
    ) -> Reply {
        let code = self.code().expect("remembered codes are valid");
        let asset_index = self.packed >> 20;
        let value = match self.tag() {
            t if t == Tag::Grant as u8 => ReplyValue::Grant {
                grant: GrantId(self.a() as u64),
                debt_paid: self.dec_b(),
            },
            t if t == Tag::Charge as u8 => {
                let asset = asset(asset_index);
                ReplyValue::Charge {
                    asset,
                    charged: self.dec_a(),
                    debt_added: self.dec_b(),
                    available: available(asset),
                }
            }
            t if t == Tag::Hold as u8 => {
                let asset = asset(asset_index);
                ReplyValue::Hold {
                    hold: HoldId(self.a() as u64),
                    asset,
                    amount: self.dec_b(),
                    available: available(asset),
                }
            }
            t if t == Tag::Dispute as u8 => ReplyValue::Dispute {
                clawed_back: self.dec_a(),
                debt_added: self.dec_b(),
            },
            t if t == Tag::Version as u8 => ReplyValue::Version {
                version: self.a() as u32,
            },
            t if t == Tag::Shortfall as u8 => ReplyValue::Shortfall {
                asset: asset(asset_index),
                spendable: self.dec_a(),
                required: self.dec_b(),
            },
            _ => ReplyValue::None,
        };
        Reply { code, value }
    }
}

/// Packs `reply` into a record, or a spilled record plus the reply to keep whole.
pub(crate) fn remember(
    key: Key,
    at: u32,
    fingerprint: u64,
    reply: &Reply,
    asset_index: impl Fn(&AssetCode) -> Option<u32>,
) -> (Remembered, Option<Reply>) {
    match Remembered::pack(key, at, fingerprint, reply, asset_index) {
        Some(record) => (record, None),
        None => (
            Remembered::spilled_record(key, at, fingerprint, reply.code),
            Some(*reply),
        ),
    }
}

/// Entries per chunk of a [`Fifo`].
const CHUNK: usize = 4096;

/// A FIFO of records in chunks shared copy-on-write (see the module docs).
pub struct Fifo<T: Clone> {
    chunks: VecDeque<Arc<Vec<T>>>,
    /// Entries of `chunks[0]` already forgotten.
    skip: usize,
    len: usize,
    /// Emptied chunks kept for reuse (at most [`Fifo::spares_max`]).
    spares: Vec<Arc<Vec<T>>>,
}

impl<T: Clone> Clone for Fifo<T> {
    /// Copies the chunk pointers; the spare chunks stay with the original (a copy sharing them
    /// would make every reuse a copy).
    fn clone(&self) -> Self {
        Fifo {
            chunks: self.chunks.clone(),
            skip: self.skip,
            len: self.len,
            spares: Vec::new(),
        }
    }
}

impl<T: Clone> Default for Fifo<T> {
    fn default() -> Self {
        Fifo {
            chunks: VecDeque::new(),
            skip: 0,
            len: 0,
            spares: Vec::new(),
        }
    }
}

impl<T: Clone> Fifo<T> {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn locate(&self, i: usize) -> Option<(usize, usize)> {
        (i < self.len).then(|| {
            let at = self.skip + i;
            (at / CHUNK, at % CHUNK)
        })
    }

    /// The `i`-th oldest entry.
    pub fn get(&self, i: usize) -> Option<&T> {
        let (chunk, offset) = self.locate(i)?;
        self.chunks[chunk].get(offset)
    }

    /// The `i`-th oldest entry, for changing (its chunk is copied first if shared).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let (chunk, offset) = self.locate(i)?;
        Arc::make_mut(&mut self.chunks[chunk]).get_mut(offset)
    }

    /// The oldest entry.
    pub fn front(&self) -> Option<&T> {
        self.get(0)
    }

    /// Appends the newest entry.
    pub fn push_back(&mut self, entry: T) {
        if self.chunks.back().is_none_or(|c| c.len() == CHUNK) {
            let chunk = self
                .spares
                .pop()
                .unwrap_or_else(|| Arc::new(Vec::with_capacity(CHUNK)));
            self.chunks.push_back(chunk);
        }
        let last = self.chunks.back_mut().expect("a chunk was just ensured");
        Arc::make_mut(last).push(entry);
        self.len += 1;
    }

    /// Forgets the oldest entry.
    pub fn pop_front(&mut self) {
        if self.len == 0 {
            return;
        }
        self.len -= 1;
        self.skip += 1;
        if self.skip == CHUNK {
            let mut chunk = self.chunks.pop_front().expect("skip counts into a chunk");
            self.skip = 0;
            // Reuse the chunk (and its `Arc`) unless a checkpoint still holds it.
            if let Some(entries) = Arc::get_mut(&mut chunk) {
                if self.spares.len() < self.spares_max() {
                    entries.clear();
                    self.spares.push(chunk);
                }
            }
        }
    }

    /// How many emptied chunks are kept: an eighth of those in use (at least 16), so that
    /// entries forgotten in bursts and added steadily reuse memory instead of allocating, and a
    /// table that shrinks gives most of it back.
    fn spares_max(&self) -> usize {
        (self.chunks.len() / 8).max(16)
    }

    /// Entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .flat_map(move |(i, c)| c[if i == 0 { self.skip } else { 0 }..].iter())
    }
}

impl<T: Clone + PartialEq> PartialEq for Fifo<T> {
    fn eq(&self, other: &Fifo<T>) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<T: Clone + Eq> Eq for Fifo<T> {}

impl<T: Clone> std::fmt::Debug for Fifo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fifo")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T: Clone + Serialize> Serialize for Fifo<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.len))?;
        for entry in self.iter() {
            seq.serialize_element(entry)?;
        }
        seq.end()
    }
}

impl<'de, T: Clone + Deserialize<'de>> Deserialize<'de> for Fifo<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Fifo<T>, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Clone + Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = Fifo<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence of records")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Fifo<T>, A::Error> {
                let mut fifo = Fifo::default();
                while let Some(entry) = seq.next_element()? {
                    fifo.push_back(entry);
                }
                Ok(fifo)
            }
        }
        deserializer.deserialize_seq(Visitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn a_remembered_request_is_40_bytes() {
        assert_eq!(std::mem::size_of::<Remembered>(), 40);
    }

    #[test]
    fn replies_round_trip_through_the_packed_form() {
        let usd = crate::asset("USD");
        let assets = |c: &AssetCode| (*c == usd).then_some(3);
        let back = |i: u32| {
            assert_eq!(i, 3);
            usd
        };
        let now = |_| d("41.5");
        let key = Key::of(7, RequestId(9));
        let cases = [
            Reply::ok(ReplyValue::None),
            Reply::rejected(ResultCode::UnknownWallet),
            Reply::ok(ReplyValue::Grant {
                grant: GrantId(1 << 40),
                debt_paid: d("0.25"),
            }),
            Reply::ok(ReplyValue::Charge {
                asset: usd,
                charged: d("0.001234500"),
                debt_added: d("-0"),
                available: d("41.5"),
            }),
            Reply::ok(ReplyValue::Hold {
                hold: HoldId(77),
                asset: usd,
                amount: d("4.000000"),
                available: d("41.5"),
            }),
            Reply::ok(ReplyValue::Dispute {
                clawed_back: d("6"),
                debt_added: d("4"),
            }),
            Reply::ok(ReplyValue::Version { version: 12 }),
            Reply {
                code: ResultCode::InsufficientFunds,
                value: ReplyValue::Shortfall {
                    asset: usd,
                    spendable: d("-3.5"),
                    required: d("7"),
                },
            },
        ];
        for reply in cases {
            let (record, spilled) = remember(key, 5, 0xfeed_f00d_dead_beef, &reply, assets);
            assert!(spilled.is_none(), "{reply:?} spilled");
            assert_eq!(record.fingerprint(), 0xfeed_f00d_dead_beef);
            let unpacked = record.unpack(back, now);
            assert_eq!(unpacked, reply);
            // Same numbers, same scales: the repeat prints like the first reply.
            let text = |r: &Reply| format!("{r:?}");
            assert_eq!(text(&unpacked), text(&reply));
        }
        // What does not fit is kept whole.
        for reply in [
            Reply::ok(ReplyValue::Charge {
                asset: usd,
                charged: d("1"),
                debt_added: d("123456789012.5"),
                available: d("0"),
            }),
            Reply::ok(ReplyValue::Refund {
                grant: GrantId(1),
                refunded: d("1"),
                refundable: d("0"),
            }),
        ] {
            let (record, spilled) = remember(key, 5, 1, &reply, assets);
            assert!(record.spilled());
            assert_eq!(spilled, Some(reply));
        }
    }

    #[test]
    fn keys_separate_scopes_and_ids() {
        let k = Key::of(1, RequestId(2));
        assert_eq!(k, Key::of(1, RequestId(2)));
        assert_ne!(k, Key::of(2, RequestId(2)));
        assert_ne!(k, Key::of(1, RequestId(3)));
        assert_ne!(k, Key::of(1, RequestId(2 | 1 << 64)));
    }

    #[test]
    fn the_fifo_is_chunked_copy_on_write() {
        let mut fifo: Fifo<u64> = Fifo::default();
        let n = CHUNK * 2 + 10;
        for i in 0..n as u64 {
            fifo.push_back(i);
        }
        let snapshot = fifo.clone();
        for _ in 0..CHUNK + 5 {
            fifo.pop_front();
        }
        *fifo.get_mut(0).unwrap() = 7;
        fifo.push_back(99_999);
        assert_eq!(snapshot.len(), n);
        assert_eq!(snapshot.get(CHUNK + 5), Some(&(CHUNK as u64 + 5)));
        assert_eq!(fifo.len(), n - CHUNK - 5 + 1);
        assert_eq!(fifo.front(), Some(&7));
        let all: Vec<u64> = fifo.iter().copied().collect();
        assert_eq!(all.len(), fifo.len());
        assert_eq!(all.last(), Some(&99_999));
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&fifo, config).unwrap();
        let (back, _): (Fifo<u64>, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, fifo);
        while !fifo.is_empty() {
            fifo.pop_front();
        }
        assert_eq!(fifo.front(), None);
    }
}
