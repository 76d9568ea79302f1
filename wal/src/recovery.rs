//! Opening a log: validate every segment, tell a torn tail from corruption, cut the tail.
//!
//! The walk reads segments oldest first and follows records while each is valid and carries the
//! next LSN. Where that stops (the "stop point"), two cases remain:
//!
//! * Some valid record anywhere after the stop point *attests* (through its `durable_distance`
//!   field) that an LSN at or after the cut was already durable when it was written. Then bytes
//!   that were durable are unreadable: that is corruption, and opening fails with
//!   [`Error::Corrupt`] naming the segment and offset.
//! * Otherwise everything from the start of the last unfinished batch on was never durable:
//!   a torn tail. It is zeroed (and later segments holding only it are removed), reported in
//!   [`Truncation`], and the log continues from there.
//!
//! The attestation, rather than "any valid record after a bad one", is the rule because with
//! group commit the writer fills batch N+1 while batch N syncs, and a crash then may persist
//! pages of N+1 but not of N. Those valid N+1 records were never acknowledged; refusing to
//! start over them would turn a power cut into an outage. A record written after N was
//! durable says so, and only such a record turns a bad spot into corruption.
//!
//! This module does not append; it hands the positioned segments to `wal.rs`.

use crate::{
    error::{Error, Result},
    format::{
        decode_segment_header, read_slot, Slot, FLAG_BATCH_END, RECORD_ALIGN, RECORD_HEADER_BYTES,
        RECORD_VERSION, SEGMENT_HEADER_BYTES,
    },
    storage::{Segment, Storage},
    wal::{
        create_segment, describe_slot, NamedSegment, Options, Recovery, SegmentSlot, Truncation,
    },
};
use std::sync::Arc;

pub(crate) struct Recovered<G> {
    pub(crate) segments: Vec<SegmentSlot<G>>,
    pub(crate) recovery: Recovery,
}

/// A position in the log: segment index and byte offset.
#[derive(Debug, Clone, Copy)]
struct Position {
    segment: usize,
    offset: usize,
}

pub(crate) fn recover<S: Storage>(storage: &S, options: &Options) -> Result<Recovered<S::Segment>> {
    let first_lsns = storage.list().map_err(|source| Error::Io {
        operation: "list the segments of",
        target: "the WAL directory".to_string(),
        source,
    })?;
    if first_lsns.is_empty() {
        let segment = create_segment(storage, options.first_lsn, options.segment_bytes)?;
        return Ok(Recovered {
            segments: vec![SegmentSlot {
                segment: Arc::new(segment),
                end: SEGMENT_HEADER_BYTES as u64,
            }],
            recovery: Recovery {
                first_lsn: options.first_lsn,
                next_lsn: options.first_lsn,
                segment_count: 1,
                truncated: None,
            },
        });
    }

    let mut segments = Vec::with_capacity(first_lsns.len());
    for &first_lsn in &first_lsns {
        segments.push(open_segment(storage, first_lsn)?);
    }

    // Walk the valid records.
    let mut buffer = Vec::new();
    let mut loaded = usize::MAX;
    let mut expected = segments[0].first_lsn;
    let mut ends = vec![SEGMENT_HEADER_BYTES; segments.len()];
    // Start and first LSN of the batch whose end record has not been seen yet.
    let mut batch_start: Option<(Position, u64)> = None;
    let mut batch_records = 0u64;
    let mut stop: Option<(Position, String)> = None;
    'walk: for index in 0..segments.len() {
        if index > 0 && segments[index].first_lsn != expected {
            stop = Some((
                Position {
                    segment: index - 1,
                    offset: ends[index - 1],
                },
                format!(
                    "records end before LSN {expected}, but the next segment {} starts at LSN {}",
                    segments[index].name, segments[index].first_lsn
                ),
            ));
            break;
        }
        load(&segments[index], &mut buffer)?;
        loaded = index;
        let mut offset = SEGMENT_HEADER_BYTES;
        loop {
            match read_slot(&buffer, offset) {
                Slot::End => break,
                // No log reaches LSN u64::MAX (it would take 2^64 records): a record claiming
                // it is damage, and stopping before it keeps `expected` from overflowing.
                Slot::Valid {
                    header,
                    next_offset,
                    ..
                } if header.lsn == expected && expected != u64::MAX => {
                    if batch_start.is_none() {
                        batch_start = Some((
                            Position {
                                segment: index,
                                offset,
                            },
                            expected,
                        ));
                        batch_records = 0;
                    }
                    batch_records += 1;
                    expected += 1;
                    offset = next_offset;
                    if header.flags & FLAG_BATCH_END != 0 {
                        batch_start = None;
                    }
                }
                other => {
                    let detail = match other {
                        Slot::Valid { header, .. } if header.lsn == u64::MAX => {
                            format!("record LSN {} is past the last LSN a log uses", header.lsn)
                        }
                        Slot::Valid { header, .. } => {
                            format!("expected LSN {expected}, found LSN {}", header.lsn)
                        }
                        other => describe_slot(&other),
                    };
                    ends[index] = offset;
                    stop = Some((
                        Position {
                            segment: index,
                            offset,
                        },
                        detail,
                    ));
                    break 'walk;
                }
            }
        }
        ends[index] = offset;
    }
    let (stop, reason) = stop.unwrap_or_else(|| {
        let segment = segments.len() - 1;
        let reason = if batch_start.is_some() {
            "the last batch has no end record".to_string()
        } else {
            "end of records".to_string()
        };
        (
            Position {
                segment,
                offset: ends[segment],
            },
            reason,
        )
    });
    let (cut, cut_lsn, dropped_records) = match batch_start {
        Some((position, lsn)) => (position, lsn, batch_records),
        None => (stop, expected, 0),
    };

    // Does anything after the stop point prove that the cut would lose durable records?
    for index in stop.segment..segments.len() {
        if loaded != index {
            load(&segments[index], &mut buffer)?;
            loaded = index;
        }
        let start = if index == stop.segment {
            stop.offset
        } else {
            SEGMENT_HEADER_BYTES
        };
        if let Some((offset, lsn, attested)) = find_attesting_record(&buffer, start, cut_lsn) {
            return Err(Error::Corrupt {
                segment: segments[stop.segment].name.clone(),
                offset: stop.offset as u64,
                detail: format!(
                    "{reason}; yet record LSN {lsn} at byte offset {offset} of {} was written \
                     after LSN {attested} was durable",
                    segments[index].name
                ),
            });
        }
    }

    // A torn tail (possibly empty): zero it in the cut segment and drop later segments.
    let mut bytes_cut = 0u64;
    for (index, segment) in segments.iter().enumerate().skip(cut.segment) {
        if loaded != index {
            load(segment, &mut buffer)?;
            loaded = index;
        }
        let start = if index == cut.segment {
            cut.offset
        } else {
            SEGMENT_HEADER_BYTES
        };
        let written_end = buffer
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |last| last + 1)
            .max(start);
        bytes_cut += (written_end - start) as u64;
        if index == cut.segment && written_end > start {
            let zeroes = vec![0u8; written_end - start];
            // SAFETY: no writer exists yet; this thread is the only one touching the segment.
            unsafe { segment.segment.write_at(start as u64, &zeroes) }.map_err(|source| {
                Error::Io {
                    operation: "cut the torn tail of",
                    target: segment.name.clone(),
                    source,
                }
            })?;
        }
    }
    let removed: Vec<u64> = segments[cut.segment + 1..]
        .iter()
        .map(|s| s.first_lsn)
        .collect();
    let truncated = (bytes_cut > 0 || !removed.is_empty()).then(|| Truncation {
        segment: segments[cut.segment].name.clone(),
        offset: cut.offset as u64,
        bytes: bytes_cut,
        records: dropped_records,
        segments_removed: removed.len(),
        reason: reason.clone(),
    });
    segments.truncate(cut.segment + 1);
    ends[cut.segment] = cut.offset;

    // Whatever was read back may still be only in the page cache (the writer died between
    // write and sync): make it durable before anything is built on it.
    for segment in &segments {
        segment.segment.sync().map_err(|source| Error::SyncFailed {
            segment: segment.name.clone(),
            source,
        })?;
    }
    storage.remove(&removed).map_err(|source| Error::Io {
        operation: "remove torn-tail segments after",
        target: segments[cut.segment].name.clone(),
        source,
    })?;

    let first_lsn = segments[0].first_lsn;
    let segments: Vec<SegmentSlot<S::Segment>> = segments
        .into_iter()
        .zip(ends)
        .map(|(segment, end)| SegmentSlot {
            segment: Arc::new(segment),
            end: end as u64,
        })
        .collect();
    Ok(Recovered {
        recovery: Recovery {
            first_lsn,
            next_lsn: cut_lsn,
            segment_count: segments.len(),
            truncated,
        },
        segments,
    })
}

fn open_segment<S: Storage>(storage: &S, first_lsn: u64) -> Result<NamedSegment<S::Segment>> {
    let name = storage.describe(first_lsn);
    // LSNs start at 1 (0 means "nothing" in `durable_lsn`), and `Options` refuse u64::MAX as a
    // first LSN: a segment named so is damage or a stranger, and opening it would overflow.
    if first_lsn == 0 || first_lsn == u64::MAX {
        return Err(Error::BadSegment {
            segment: name,
            detail: format!("first LSN {first_lsn} is outside the LSNs a log uses"),
        });
    }
    let segment = storage.open(first_lsn).map_err(|source| Error::Io {
        operation: "open segment",
        target: name.clone(),
        source,
    })?;
    if segment.capacity() < (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64 {
        return Err(Error::BadSegment {
            segment: name,
            detail: format!("only {} bytes long", segment.capacity()),
        });
    }
    // Segments are created at their full size, a multiple of the alignment, so every record's
    // padding fits and the walk never ends past the last byte. Any other size is damage.
    if segment.capacity() % RECORD_ALIGN as u64 != 0 {
        return Err(Error::BadSegment {
            segment: name,
            detail: format!(
                "{} bytes long, not a multiple of {RECORD_ALIGN}: cut short or not a segment",
                segment.capacity()
            ),
        });
    }
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    // SAFETY: no writer exists during recovery.
    unsafe { segment.read_at(0, &mut header) }.map_err(|source| Error::Io {
        operation: "read the header of segment",
        target: name.clone(),
        source,
    })?;
    let header_lsn = decode_segment_header(&header).map_err(|detail| Error::BadSegment {
        segment: name.clone(),
        detail,
    })?;
    if header_lsn != first_lsn {
        return Err(Error::BadSegment {
            segment: name,
            detail: format!("file name says first LSN {first_lsn}, header says {header_lsn}"),
        });
    }
    Ok(NamedSegment {
        first_lsn,
        name,
        segment,
    })
}

fn load<G: Segment>(segment: &NamedSegment<G>, buffer: &mut Vec<u8>) -> Result<()> {
    let len = usize::try_from(segment.segment.capacity()).map_err(|_| Error::BadSegment {
        segment: segment.name.clone(),
        detail: "too large to map".to_string(),
    })?;
    buffer.resize(len, 0);
    // SAFETY: no writer exists during recovery.
    unsafe { segment.segment.read_at(0, buffer) }.map_err(|source| Error::Io {
        operation: "read",
        target: segment.name.clone(),
        source,
    })
}

/// The first valid record at or after `start` whose header proves some LSN ≥ `cut_lsn` was
/// durable before it was written: `(offset, its lsn, attested durable lsn)`.
fn find_attesting_record(segment: &[u8], start: usize, cut_lsn: u64) -> Option<(usize, u64, u64)> {
    let aligned_start = start.next_multiple_of(RECORD_ALIGN);
    let last = segment.len().checked_sub(RECORD_HEADER_BYTES)?;
    (aligned_start..=last)
        .step_by(RECORD_ALIGN)
        // Cheap filter first: a valid header has the version byte set.
        .filter(|&offset| segment[offset + 20] == RECORD_VERSION)
        .find_map(|offset| match read_slot(segment, offset) {
            Slot::Valid { header, .. } => header
                .attested_durable_lsn()
                .filter(|&attested| attested >= cut_lsn)
                .map(|attested| (offset, header.lsn, attested)),
            _ => None,
        })
}
