//! WAL append + group commit throughput and sync latency, against plain `pwrite` + `fdatasync`.
//!
//! Run with `cargo bench -p tally-wal` (see `docs/benchmarks.md` for the figures). For each batch
//! size (1, 64, 1,024, 8,192 records of 128 bytes) it measures, in the same run and on the same
//! file system, three writers doing the same work:
//!
//! * `wal fdatasync`: `Wal::append` × batch, then `Wal::commit` (the default sync method);
//! * `wal msync`: the same with `SyncMethod::Msync`;
//! * `pwrite+fdatasync`: one `pwrite` of the same encoded bytes into a preallocated file, then
//!   `fdatasync`: the floor any durable log on this disk pays.
//!
//! Each case runs several times and the median run is printed, with the ratio of the WAL to the
//! baseline. Before that, a calibration measures one dirty 4 KiB page synced with
//! `msync(MS_SYNC)` versus `fdatasync`, and a 4 KiB `pwrite` + `fdatasync`.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs a tiny version that only
//! checks that every path works, so CI stays fast. Set `TALLY_BENCH_DIR` to measure another
//! file system than the temporary directory's.

use hdrhistogram::Histogram;
use std::{
    fs::{File, OpenOptions},
    os::unix::{fs::FileExt, io::AsRawFd},
    path::Path,
    time::{Duration, Instant},
};
use tally_wal::{record_bytes, FileStorage, Options, SyncMethod, Wal};

const PAYLOAD_BYTES: usize = 128;
const BATCH_SIZES: [usize; 4] = [1, 64, 1_024, 8_192];

struct Plan {
    runs: usize,
    /// Records written per run of one case; batches = records / batch size, clamped.
    records_per_run: usize,
    batches_min: usize,
    batches_max: usize,
    calibration_syncs: usize,
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    records_per_second: f64,
    megabytes_per_second: f64,
    sync_us_p50: u64,
    sync_us_p99: u64,
    /// Minor page faults of the process per batch (the cost of storing into a shared mapping).
    faults_per_batch: f64,
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let plan = if full {
        Plan {
            runs: 5,
            records_per_run: 300_000,
            batches_min: 30,
            batches_max: 2_000,
            calibration_syncs: 500,
        }
    } else {
        Plan {
            runs: 1,
            records_per_run: 64,
            batches_min: 2,
            batches_max: 4,
            calibration_syncs: 3,
        }
    };
    let base = std::env::var_os("TALLY_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("bench directory");
    println!(
        "tally-wal append bench ({} mode), directory {}",
        if full { "full" } else { "quick" },
        dir.path().display()
    );

    calibrate(dir.path(), plan.calibration_syncs);

    println!(
        "\n{:>6} {:<18} {:>12} {:>9} {:>9} {:>9} {:>10} {:>13}",
        "batch", "writer", "records/s", "MB/s", "sync p50", "sync p99", "vs pwrite", "faults/batch"
    );
    for batch in BATCH_SIZES {
        let batches = (plan.records_per_run / batch).clamp(plan.batches_min, plan.batches_max);
        let mut wal_fdatasync = Vec::new();
        let mut wal_msync = Vec::new();
        let mut baseline = Vec::new();
        for run in 0..plan.runs {
            let run_dir = dir.path().join(format!("b{batch}-r{run}"));
            baseline.push(run_baseline(&run_dir.join("raw"), batch, batches));
            wal_fdatasync.push(run_wal(
                &run_dir.join("fdatasync"),
                SyncMethod::Fdatasync,
                batch,
                batches,
            ));
            wal_msync.push(run_wal(
                &run_dir.join("msync"),
                SyncMethod::Msync,
                batch,
                batches,
            ));
            std::fs::remove_dir_all(&run_dir).expect("clean run directory");
        }
        let baseline = median(baseline);
        for (name, outcomes) in [("wal fdatasync", wal_fdatasync), ("wal msync", wal_msync)] {
            let outcome = median(outcomes);
            print_row(batch, name, &outcome, Some(&baseline));
        }
        print_row(batch, "pwrite+fdatasync", &baseline, None);
    }
}

fn print_row(batch: usize, name: &str, outcome: &Outcome, baseline: Option<&Outcome>) {
    let ratio = baseline.map_or_else(
        || "1.00".to_string(),
        |b| format!("{:.2}", outcome.records_per_second / b.records_per_second),
    );
    println!(
        "{batch:>6} {name:<18} {:>12.0} {:>9.1} {:>7}us {:>7}us {:>10} {:>13.1}",
        outcome.records_per_second,
        outcome.megabytes_per_second,
        outcome.sync_us_p50,
        outcome.sync_us_p99,
        ratio,
        outcome.faults_per_batch
    );
}

/// The run with the median throughput (its latency figures come with it).
fn median(mut outcomes: Vec<Outcome>) -> Outcome {
    outcomes.sort_by(|a, b| a.records_per_second.total_cmp(&b.records_per_second));
    outcomes[outcomes.len() / 2]
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn minor_faults() -> u64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    usage.ru_minflt as u64
}

fn outcome(
    records: usize,
    batches: usize,
    faults: u64,
    elapsed: Duration,
    syncs: &Histogram<u64>,
) -> Outcome {
    let seconds = elapsed.as_secs_f64();
    Outcome {
        faults_per_batch: faults as f64 / batches as f64,
        records_per_second: records as f64 / seconds,
        megabytes_per_second: (records * PAYLOAD_BYTES) as f64 / seconds / 1e6,
        sync_us_p50: syncs.value_at_quantile(0.5),
        sync_us_p99: syncs.value_at_quantile(0.99),
    }
}

fn run_wal(dir: &Path, sync_method: SyncMethod, batch: usize, batches: usize) -> Outcome {
    let storage = FileStorage::open(dir)
        .expect("storage")
        .with_sync_method(sync_method);
    let mut wal = Wal::open(storage, Options::default()).expect("open wal");
    let mut payload = [0u8; PAYLOAD_BYTES];
    let mut syncs = histogram();
    let faults_before = minor_faults();
    let start = Instant::now();
    for _ in 0..batches {
        for _ in 0..batch {
            payload[..8].copy_from_slice(&wal.next_lsn().to_le_bytes());
            wal.append(&payload).expect("append");
        }
        let sync_start = Instant::now();
        wal.commit().expect("commit");
        syncs
            .record(micros(sync_start.elapsed()))
            .expect("record latency");
    }
    let elapsed = start.elapsed();
    let faults = minor_faults() - faults_before;
    assert_eq!(wal.durable_lsn(), (batch * batches) as u64);
    outcome(batch * batches, batches, faults, elapsed, &syncs)
}

fn run_baseline(dir: &Path, batch: usize, batches: usize) -> Outcome {
    std::fs::create_dir_all(dir).expect("baseline dir");
    let batch_bytes = record_bytes(PAYLOAD_BYTES) * batch;
    let file = preallocated(&dir.join("raw.log"), (batch_bytes * batches) as u64);
    let bytes = vec![0x5au8; batch_bytes];
    let mut syncs = histogram();
    let faults_before = minor_faults();
    let start = Instant::now();
    for index in 0..batches {
        file.write_all_at(&bytes, (index * batch_bytes) as u64)
            .expect("pwrite");
        let sync_start = Instant::now();
        file.sync_data().expect("fdatasync");
        syncs
            .record(micros(sync_start.elapsed()))
            .expect("record latency");
    }
    let elapsed = start.elapsed();
    let faults = minor_faults() - faults_before;
    outcome(batch * batches, batches, faults, elapsed, &syncs)
}

fn preallocated(path: &Path, len: u64) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create file");
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    file.sync_all().expect("sync preallocated file");
    file
}

/// One dirty 4 KiB page, made durable three ways, on fresh (preallocated, never written) pages
/// of the same kind of file the WAL uses.
fn calibrate(dir: &Path, syncs: usize) {
    const PAGE: usize = 4096;
    let len = (PAGE * syncs) as u64;
    let page = vec![0xa5u8; PAGE];

    let file = preallocated(&dir.join("calibrate-pwrite"), len);
    let mut pwrite = histogram();
    for index in 0..syncs {
        let start = Instant::now();
        file.write_all_at(&page, (index * PAGE) as u64)
            .expect("pwrite");
        file.sync_data().expect("fdatasync");
        pwrite.record(micros(start.elapsed())).expect("record");
    }

    let mut mapped = [histogram(), histogram()];
    for (method, histogram) in mapped.iter_mut().enumerate() {
        let file = preallocated(&dir.join(format!("calibrate-map-{method}")), len);
        let map = memmap2::MmapOptions::new()
            .len(len as usize)
            .map_raw(&file)
            .expect("map");
        for index in 0..syncs {
            let start = Instant::now();
            // SAFETY: in bounds; only this thread touches the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    page.as_ptr(),
                    map.as_mut_ptr().add(index * PAGE),
                    PAGE,
                );
            }
            if method == 0 {
                map.flush_range(index * PAGE, PAGE).expect("msync");
            } else {
                file.sync_data().expect("fdatasync");
            }
            histogram.record(micros(start.elapsed())).expect("record");
        }
    }
    println!("\ncalibration: one dirty 4 KiB page made durable ({syncs} times)");
    for (name, histogram) in [
        ("pwrite + fdatasync", &pwrite),
        ("mmap store + msync(MS_SYNC)", &mapped[0]),
        ("mmap store + fdatasync", &mapped[1]),
    ] {
        println!(
            "  {name:<28} p50 {:>6}us  p99 {:>6}us",
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99)
        );
    }
}
