//! The JSON-lines sink's rotation and retention: every effect in exactly one line across the
//! sealed and current files, old sealed files deleted, and a crash between a rotation's rename
//! and its progress neither loses nor repeats a line.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tally_engine::{asset, name, Effect, Timestamp};
use tally_outbound::jsonl::{sealed_path, Rotation};
use tally_outbound::{FileSinks, Sink, Tagged};

fn effect(lsn: u64) -> Tagged {
    Tagged {
        shard: 0,
        lsn,
        index: 0,
        applied_at: Timestamp(lsn as i64),
        effect: Effect::TopUpExhausted {
            wallet: name("w"),
            asset: asset("USD"),
        },
        cause: None,
    }
}

/// LSN → how many lines hold it, over every file of the `alerts` stream.
fn lines(dir: &Path) -> BTreeMap<u64, u32> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if !file.starts_with("alerts") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            *seen.entry(v["lsn"].as_u64().unwrap()).or_default() += 1;
        }
    }
    seen
}

fn small() -> Rotation {
    Rotation {
        bytes: 2_000,
        age: Duration::from_secs(3600),
        keep: 1_000,
    }
}

#[test]
fn rotation_by_size_keeps_every_line_once_and_retention_deletes_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let mut sinks = FileSinks::open_with(dir.path(), small()).unwrap();
    for lsn in 1..=300 {
        assert!(sinks.write(&effect(lsn)).unwrap());
        if lsn % 20 == 0 {
            sinks.flush().unwrap();
        }
    }
    sinks.flush().unwrap();
    assert!(
        sealed_path(dir.path(), "alerts", 3).exists(),
        "no rotation happened"
    );
    let seen = lines(dir.path());
    assert_eq!(seen.len(), 300);
    assert!(seen.values().all(|n| *n == 1));
    // Reopened, it knows what it holds, across the sealed files.
    drop(sinks);
    let mut sinks = FileSinks::open_with(dir.path(), small()).unwrap();
    assert!(!sinks.write(&effect(150)).unwrap());
    assert!(sinks.write(&effect(301)).unwrap());
    sinks.flush().unwrap();
    drop(sinks);
    // With a retention of 2 sealed files, the older ones go at the next rotation.
    let keep_two = Rotation { keep: 2, ..small() };
    let mut sinks = FileSinks::open_with(dir.path(), keep_two).unwrap();
    for lsn in 302..=400 {
        sinks.write(&effect(lsn)).unwrap();
        sinks.flush().unwrap();
    }
    let sealed: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .filter(|f| f.starts_with("alerts.") && f != "alerts.jsonl")
        .collect();
    assert_eq!(sealed.len(), 2, "{sealed:?}");
    // What is left holds each remaining line once.
    assert!(lines(dir.path()).values().all(|n| *n == 1));
}

#[test]
fn a_crash_between_the_rename_and_the_progress_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sinks = FileSinks::open_with(dir.path(), small()).unwrap();
    for lsn in 1..=10 {
        sinks.write(&effect(lsn)).unwrap();
    }
    sinks.flush().unwrap();
    drop(sinks);
    // Lines 11..=13 were written and synced, then the file was renamed for a rotation, and the
    // process died before the progress said so.
    let current = dir.path().join("alerts.jsonl");
    let mut text = std::fs::read_to_string(&current).unwrap();
    for lsn in 11..=13 {
        text += &serde_json::to_string(&effect(lsn)).unwrap();
        text.push('\n');
    }
    std::fs::write(&current, text).unwrap();
    std::fs::rename(&current, sealed_path(dir.path(), "alerts", 1)).unwrap();

    let mut sinks = FileSinks::open_with(dir.path(), small()).unwrap();
    // Replay re-sends 11..=15: the sealed ones are skipped, the rest written.
    for lsn in 11..=15 {
        assert_eq!(sinks.write(&effect(lsn)).unwrap(), lsn > 13, "lsn {lsn}");
    }
    sinks.flush().unwrap();
    let seen = lines(dir.path());
    assert_eq!(seen.len(), 15);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
}

#[test]
fn a_file_is_sealed_by_age_even_when_the_server_restarts_more_often_than_the_age() {
    let dir = tempfile::tempdir().unwrap();
    let by_age = Rotation {
        bytes: 1 << 30,
        age: Duration::from_secs(2),
        keep: 1_000,
    };
    // Each "process" lives shorter than the age; together they outlive it.
    let mut lsn = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2_500) {
        let mut sinks = FileSinks::open_with(dir.path(), by_age).unwrap();
        lsn += 1;
        sinks.write(&effect(lsn)).unwrap();
        sinks.flush().unwrap();
        drop(sinks);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        sealed_path(dir.path(), "alerts", 1).exists(),
        "a file open for longer than its age across restarts was not sealed"
    );
    let seen = lines(dir.path());
    assert_eq!(seen.len(), lsn as usize);
    assert!(seen.values().all(|n| *n == 1));
}
