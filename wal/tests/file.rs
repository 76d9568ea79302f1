//! Real-file tests in a temporary directory, including a writer killed with SIGKILL.
//!
//! The kill tests re-execute this test binary with an environment variable naming a directory;
//! the child (the same test function) appends and commits until it is killed, printing each
//! durable LSN, and the parent reopens what it left behind.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::FileExt,
    process::{Command, Stdio},
};
use tally_wal::{
    Error, FileStorage, Options, SyncMethod, Wal, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};

const CHILD_DIR_ENV: &str = "TALLY_WAL_KILL_CHILD_DIR";
const CHILD_MODE_ENV: &str = "TALLY_WAL_KILL_CHILD_MODE";

fn options() -> Options {
    Options {
        segment_bytes: 64 << 10,
        ..Options::default()
    }
}

fn payload(lsn: u64) -> Vec<u8> {
    let len = (lsn % 200) as usize + 1;
    format!("<{lsn}>").bytes().cycle().take(len).collect()
}

/// Every record, checking each payload against its LSN.
fn check_records(wal: &Wal<FileStorage>) -> u64 {
    let mut scan = wal.scan(wal.first_lsn()).expect("scan");
    let mut count = 0;
    while let Some(record) = scan.next().expect("record") {
        assert_eq!(record.payload, payload(record.lsn), "LSN {}", record.lsn);
        count += 1;
    }
    count
}

fn append_batch(wal: &mut Wal<FileStorage>, count: u64) {
    for _ in 0..count {
        let lsn = wal.next_lsn();
        wal.append(&payload(lsn)).expect("append");
    }
}

#[test]
fn files_rotate_reopen_and_delete_below() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wal = Wal::open_dir(dir.path(), options()).expect("open");
    for batch in 0..400 {
        append_batch(&mut wal, batch % 17 + 1);
        wal.commit().expect("commit");
    }
    let last = wal.next_lsn() - 1;
    let firsts = wal.segment_first_lsns();
    assert!(firsts.len() > 3, "{firsts:?}");
    for &first in &firsts {
        let path = dir.path().join(tally_wal::segment_file_name(first));
        let len = std::fs::metadata(&path).expect("segment file").len();
        assert_eq!(len, 64 << 10, "segments are preallocated to full size");
    }
    drop(wal);

    let mut wal = Wal::open_dir(dir.path(), options()).expect("reopen");
    assert_eq!(wal.recovery().truncated, None);
    assert_eq!(wal.durable_lsn(), last);
    assert_eq!(check_records(&wal), last);
    assert_eq!(wal.delete_below(firsts[2]).expect("delete"), 2);
    assert!(!dir
        .path()
        .join(tally_wal::segment_file_name(firsts[0]))
        .exists());
    drop(wal);
    let wal = Wal::open_dir(dir.path(), options()).expect("reopen after delete");
    assert_eq!(wal.first_lsn(), firsts[2]);
    assert_eq!(check_records(&wal), last - firsts[2] + 1);
}

#[test]
fn leftover_temporary_segments_are_removed_and_strangers_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("00000000000000000009.wal.tmp"),
        b"half made",
    )
    .expect("tmp");
    std::fs::write(dir.path().join("notes.txt"), b"not a segment").expect("stranger");
    let mut wal = Wal::open_dir(dir.path(), options()).expect("open");
    append_batch(&mut wal, 3);
    wal.commit().expect("commit");
    assert!(!dir.path().join("00000000000000000009.wal.tmp").exists());
    assert!(dir.path().join("notes.txt").exists());
}

#[test]
fn an_unsealed_batch_left_in_the_file_is_cut_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wal = Wal::open_dir(dir.path(), options()).expect("open");
    append_batch(&mut wal, 10);
    wal.commit().expect("commit");
    append_batch(&mut wal, 5);
    drop(wal); // like a process crash: the bytes are in the page cache, never sealed
    let wal = Wal::open_dir(dir.path(), options()).expect("reopen");
    let truncation = wal.recovery().truncated.clone().expect("cut");
    assert_eq!(
        truncation.records, 4,
        "four records had headers, the fifth did not"
    );
    assert!(truncation.segment.ends_with("00000000000000000001.wal"));
    assert_eq!(wal.next_lsn(), 11);
    assert_eq!(check_records(&wal), 10);
}

#[test]
fn a_bit_flip_in_a_real_file_is_refused_with_path_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wal = Wal::open_dir(dir.path(), options()).expect("open");
    for _ in 0..20 {
        append_batch(&mut wal, 3);
        wal.commit().expect("commit");
    }
    drop(wal);
    let path = dir.path().join(tally_wal::segment_file_name(1));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("segment");
    // The first byte of the first record's payload (padding is not checksummed: it is no data).
    let offset = (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read");
    file.write_all_at(&[byte[0] ^ 0x10], offset).expect("write");
    match Wal::open_dir(dir.path(), options()) {
        Err(error @ Error::Corrupt { .. }) => {
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(
                message.contains(&format!("offset {SEGMENT_HEADER_BYTES}")),
                "{message}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn msync_works_as_the_sync_method_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FileStorage::open(dir.path())
        .expect("storage")
        .with_sync_method(SyncMethod::Msync);
    let mut wal = Wal::open(storage, options()).expect("open");
    append_batch(&mut wal, 100);
    assert_eq!(wal.commit().expect("commit"), 100);
    drop(wal);
    let wal = Wal::open_dir(dir.path(), options()).expect("reopen");
    assert_eq!(check_records(&wal), 100);
}

/// The child side of the kill tests: commits batches forever, printing each durable LSN.
/// In mode "half" it stops after a while with a half-written batch and waits to be killed.
fn run_child(dir: &str, mode: &str) -> ! {
    let mut wal = Wal::open_dir(dir, options()).expect("child open");
    for batch in 0u64.. {
        append_batch(&mut wal, batch % 13 + 1);
        let durable = wal.commit().expect("child commit");
        println!("committed {durable}");
        if mode == "half" && batch == 150 {
            append_batch(&mut wal, 7);
            println!("half-written");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
    unreachable!("the loop above never ends")
}

/// Spawns the child, kills it with SIGKILL once `stop_after` says so, and returns the last
/// durable LSN it reported.
fn kill_child(test_name: &str, dir: &std::path::Path, mode: &str) -> u64 {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_MODE_ENV, mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
    let mut durable = 0;
    let mut lines = 0;
    for line in stdout.lines() {
        let line = line.expect("child line");
        if let Some(lsn) = line.strip_prefix("committed ") {
            durable = lsn.parse().expect("lsn");
            lines += 1;
            if mode == "busy" && lines == 300 {
                break; // kill while it is in the middle of its next batch
            }
        } else if line == "half-written" {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap child");
    assert!(durable > 0, "child reported no commit");
    durable
}

#[test]
fn a_writer_killed_with_a_half_written_batch_reopens_with_every_committed_record() {
    if let (Ok(dir), Ok(mode)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_MODE_ENV)) {
        run_child(&dir, &mode);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let durable = kill_child(
        "a_writer_killed_with_a_half_written_batch_reopens_with_every_committed_record",
        dir.path(),
        "half",
    );
    let wal = Wal::open_dir(dir.path(), options()).expect("reopen");
    let truncation = wal
        .recovery()
        .truncated
        .clone()
        .expect("the half batch is cut");
    assert_eq!(truncation.records, 6);
    assert!(truncation.bytes > 0);
    assert_eq!(wal.next_lsn(), durable + 1);
    assert_eq!(check_records(&wal), durable);
}

#[test]
fn a_writer_killed_at_full_speed_loses_no_committed_record() {
    if let (Ok(dir), Ok(mode)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_MODE_ENV)) {
        run_child(&dir, &mode);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let durable = kill_child(
        "a_writer_killed_at_full_speed_loses_no_committed_record",
        dir.path(),
        "busy",
    );
    let wal = Wal::open_dir(dir.path(), options()).expect("reopen");
    assert!(wal.next_lsn() > durable, "{} <= {durable}", wal.next_lsn());
    assert_eq!(check_records(&wal), wal.next_lsn() - 1);
}
