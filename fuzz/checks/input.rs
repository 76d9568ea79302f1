//! Reading structured choices out of fuzz input: every read succeeds, giving zeroes once the
//! bytes run out, so any byte string is a valid input. Shared by the checks in this directory.

/// A cursor over fuzz input.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        taken
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next `N` bytes, zero-filled at the end.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut array = [0u8; N];
        let taken = self.bytes(N);
        array[..taken.len()].copy_from_slice(taken);
        array
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Applies up to `max` edits read from the input to `bytes`: each is an offset and a non-zero
    /// xor mask (a zero mask byte ends the list). Returns whether anything changed.
    pub fn damage(&mut self, bytes: &mut [u8], max: usize) -> bool {
        let mut changed = false;
        for _ in 0..max {
            let mask = self.u8();
            if mask == 0 || bytes.is_empty() {
                break;
            }
            let at = usize::from(self.u16()) % bytes.len();
            bytes[at] ^= mask;
            changed = true;
        }
        changed
    }
}

/// Runs `check` on `cases` seeded pseudo-random inputs of up to `max_len` bytes (SplitMix64: the
/// same seed gives the same inputs on every machine), for the `cargo test` runs of a check. A
/// failing case panics again with its number and bytes, which reproduce it under the fuzz target
/// (`cargo +nightly fuzz run <target> <file holding the bytes>`).
#[allow(dead_code)] // the fuzz targets do not use it
pub fn run_seeded(seed: u64, cases: usize, max_len: usize, check: impl Fn(&[u8])) {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for case in 0..cases {
        let len = (next() % (max_len as u64 + 1)) as usize;
        let input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if outcome.is_err() {
            panic!("seeded case {case} (seed {seed:#x}) failed; its input: {input:02x?}");
        }
    }
}
