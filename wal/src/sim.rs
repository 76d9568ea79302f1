//! A simulated storage for tests: bytes in memory, with the faults a real disk can produce.
//!
//! Each segment keeps two images: `current` (what reads see, like the page cache) and `durable`
//! (what survives a crash). [`Segment::sync`] copies current to durable, or fails when a fault
//! is armed. [`SimStorage::crash`] returns a new storage holding only what a crash left: the
//! durable image, plus whichever unsynced bytes a predicate chooses to keep, which models torn
//! writes (a prefix of a batch reached the disk) and reordered writes (a later page did, an
//! earlier one did not). [`SimStorage::flip_bit`] models media corruption.
//!
//! Segment creation and removal are durable at once (the real storage syncs them before
//! returning). This module is deterministic: it has no clock and no randomness.

use crate::storage::{segment_file_name, Segment, Storage};
use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

/// In-memory [`Storage`] with fault injection. Cloning shares the same simulated disk.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
}

#[derive(Debug, Default)]
struct Disk {
    segments: BTreeMap<u64, Arc<SimSegment>>,
    faults: Arc<Mutex<Faults>>,
}

#[derive(Debug, Default)]
struct Faults {
    /// Syncs that succeed before one fails (`None`: no sync fails).
    syncs_until_failure: Option<u64>,
    /// The next `create` fails as a full disk.
    create_fails: bool,
    /// Successful syncs so far.
    sync_count: u64,
}

/// One simulated segment.
#[derive(Debug)]
pub struct SimSegment {
    capacity: u64,
    images: Mutex<Images>,
    faults: Arc<Mutex<Faults>>,
}

#[derive(Debug, Clone)]
struct Images {
    current: Vec<u8>,
    durable: Vec<u8>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimStorage {
    /// An empty simulated disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// After `successful` more syncs, every sync fails with an I/O error and leaves the durable
    /// image untouched (as Linux may drop the dirty pages after a failed writeback).
    pub fn fail_sync_after(&self, successful: u64) {
        let disk = lock(&self.disk);
        let mut faults = lock(&disk.faults);
        faults.syncs_until_failure = Some(successful);
    }

    /// The next segment creation fails as if the disk were full.
    pub fn fail_next_create(&self) {
        let disk = lock(&self.disk);
        lock(&disk.faults).create_fails = true;
    }

    /// Successful syncs so far.
    pub fn sync_count(&self) -> u64 {
        let disk = lock(&self.disk);
        let count = lock(&disk.faults).sync_count;
        count
    }

    /// Crashes: returns the disk as a restarted machine would find it. For every byte whose
    /// current value differs from its durable value, `keep(first_lsn, offset)` decides whether
    /// the unsynced write reached the disk. Faults are not carried over.
    pub fn crash(&self, mut keep: impl FnMut(u64, u64) -> bool) -> SimStorage {
        let disk = lock(&self.disk);
        let faults = Arc::new(Mutex::new(Faults::default()));
        let mut segments = BTreeMap::new();
        for (&first_lsn, segment) in &disk.segments {
            let images = lock(&segment.images);
            let mut survived = images.durable.clone();
            for (offset, (byte, durable)) in images.current.iter().zip(&images.durable).enumerate()
            {
                if byte != durable && keep(first_lsn, offset as u64) {
                    survived[offset] = *byte;
                }
            }
            segments.insert(
                first_lsn,
                Arc::new(SimSegment {
                    capacity: segment.capacity,
                    images: Mutex::new(Images {
                        current: survived.clone(),
                        durable: survived,
                    }),
                    faults: Arc::clone(&faults),
                }),
            );
        }
        SimStorage {
            disk: Arc::new(Mutex::new(Disk { segments, faults })),
        }
    }

    /// Crash that loses every unsynced byte.
    pub fn crash_losing_unsynced(&self) -> SimStorage {
        self.crash(|_, _| false)
    }

    /// Crash after which every written byte survives (a process crash: the page cache lives on).
    pub fn crash_keeping_unsynced(&self) -> SimStorage {
        self.crash(|_, _| true)
    }

    /// Flips one bit in both images of a segment (media corruption). Returns false if there is
    /// no such segment or offset.
    pub fn flip_bit(&self, first_lsn: u64, offset: u64, bit: u8) -> bool {
        let disk = lock(&self.disk);
        let Some(segment) = disk.segments.get(&first_lsn) else {
            return false;
        };
        let mut images = lock(&segment.images);
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        if offset >= images.current.len() {
            return false;
        }
        images.current[offset] ^= 1 << (bit % 8);
        images.durable[offset] ^= 1 << (bit % 8);
        true
    }

    /// The first LSNs of the segments and the bytes where current and durable images differ,
    /// as `(first_lsn, first_dirty_offset, end_dirty_offset)`; for tests that crash inside the
    /// last batch.
    pub fn unsynced_ranges(&self) -> Vec<(u64, u64, u64)> {
        let disk = lock(&self.disk);
        let mut ranges = Vec::new();
        for (&first_lsn, segment) in &disk.segments {
            let images = lock(&segment.images);
            let differs = |(a, b): (&u8, &u8)| a != b;
            let pairs = || images.current.iter().zip(&images.durable);
            if let Some(start) = pairs().position(differs) {
                let end = images.current.len() - pairs().rev().position(differs).unwrap_or(0);
                ranges.push((first_lsn, start as u64, end as u64));
            }
        }
        ranges
    }

    /// Current bytes of a segment (for tests that inspect the disk).
    pub fn segment_bytes(&self, first_lsn: u64) -> Option<Vec<u8>> {
        let disk = lock(&self.disk);
        let segment = disk.segments.get(&first_lsn)?;
        let bytes = lock(&segment.images).current.clone();
        Some(bytes)
    }
}

impl Storage for SimStorage {
    type Segment = Arc<SimSegment>;

    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(lock(&self.disk).segments.keys().copied().collect())
    }

    fn create(&self, first_lsn: u64, capacity: u64, header: &[u8]) -> io::Result<Arc<SimSegment>> {
        let mut disk = lock(&self.disk);
        if std::mem::take(&mut lock(&disk.faults).create_fails) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if disk.segments.contains_key(&first_lsn) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                segment_file_name(first_lsn),
            ));
        }
        let len = usize::try_from(capacity)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        let mut image = vec![0u8; len];
        let header_len = header.len().min(len);
        image[..header_len].copy_from_slice(&header[..header_len]);
        let segment = Arc::new(SimSegment {
            capacity,
            images: Mutex::new(Images {
                current: image.clone(),
                durable: image,
            }),
            faults: Arc::clone(&disk.faults),
        });
        disk.segments.insert(first_lsn, Arc::clone(&segment));
        Ok(segment)
    }

    fn open(&self, first_lsn: u64) -> io::Result<Arc<SimSegment>> {
        lock(&self.disk)
            .segments
            .get(&first_lsn)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, segment_file_name(first_lsn)))
    }

    fn remove(&self, first_lsns: &[u64]) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        for lsn in first_lsns {
            disk.segments.remove(lsn);
        }
        Ok(())
    }

    fn describe(&self, first_lsn: u64) -> String {
        format!("sim:{}", segment_file_name(first_lsn))
    }
}

impl SimSegment {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.capacity => Ok(offset as usize..end as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access past segment end",
            )),
        }
    }
}

impl Segment for Arc<SimSegment> {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    unsafe fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&lock(&self.images).current[range]);
        Ok(())
    }

    unsafe fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let range = self.range(offset, bytes.len())?;
        lock(&self.images).current[range].copy_from_slice(bytes);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        {
            let mut faults = lock(&self.faults);
            match &mut faults.syncs_until_failure {
                Some(0) => {
                    return Err(io::Error::other("simulated sync failure (EIO)"));
                }
                Some(remaining) => *remaining -= 1,
                None => {}
            }
            faults.sync_count += 1;
        }
        let mut images = lock(&self.images);
        let Images { current, durable } = &mut *images;
        durable.copy_from_slice(current);
        Ok(())
    }
}
