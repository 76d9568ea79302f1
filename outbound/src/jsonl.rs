//! The JSON-lines sink (optional, `--export-jsonl`): one file per stream (`journal`, `margin`,
//! `topups`, `alerts`, `wallets`) in `<data-dir>/outbound/`. Its progress is the file itself: at start the
//! sink reads the tags of the lines after the last checkpointed offset (in `progress.json`) and
//! drops a torn last line, so a line is never written twice and a torn write is never kept.
//!
//! Rotation and retention: when a stream's file reaches [`Rotation::bytes`] or has been open for
//! [`Rotation::age`] since its first line (wall-clock time, kept in `progress.json` across
//! restarts; a clock set back restarts it), it is synced and renamed `<stream>.<NNNNNN>.jsonl` (sealed, numbered
//! from one) and a new file begins; only the newest [`Rotation::keep`] sealed files per stream
//! are kept. A crash between the rename and the progress update is recognised at the next start (the
//! next sealed file exists): nothing is lost or written twice, because which tags a stream holds
//! is kept in `progress.json`, not derived from the files that remain.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tally_engine::Effect;

use crate::{Error, Sink, Tagged};

/// The streams, one file each.
pub const STREAMS: [&str; 5] = ["journal", "margin", "topups", "alerts", "wallets"];

fn stream_of(effect: &Effect) -> usize {
    match effect {
        Effect::Journal(_) => 0,
        Effect::Margin(_) => 1,
        Effect::TopUpRequested(_) => 2,
        Effect::TopUpExhausted { .. }
        | Effect::WalletFrozen { .. }
        | Effect::BalanceAlert { .. }
        | Effect::GrantExpiring { .. } => 3,
        Effect::WalletCreated { .. } => 4,
    }
}

/// Checkpoint of a sink: bytes of each stream file known to be whole and the last tag per shard.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Progress {
    offsets: BTreeMap<String, u64>,
    last: BTreeMap<String, BTreeMap<u32, (u64, u32)>>,
    /// Sealed files per stream (the newest is `<stream>.<sealed>.jsonl`).
    #[serde(default)]
    sealed: BTreeMap<String, u64>,
    /// When each stream's current file began (microseconds since the Unix epoch), so that a
    /// server restarted more often than [`Rotation::age`] still seals its files by age.
    #[serde(default)]
    opened: BTreeMap<String, i64>,
}

/// When stream files are sealed and how many are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Seal a file once it holds this many bytes.
    pub bytes: u64,
    /// Seal a non-empty file once it has been open this long.
    pub age: std::time::Duration,
    /// Sealed files kept per stream (older ones are deleted).
    pub keep: u64,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            bytes: 64 * 1024 * 1024,
            age: std::time::Duration::from_secs(3600),
            keep: 24,
        }
    }
}

struct Stream {
    name: &'static str,
    writer: BufWriter<File>,
    offset: u64,
    last: BTreeMap<u32, (u64, u32)>,
    sealed: u64,
    /// When the current file began, in microseconds since the Unix epoch.
    opened_at: i64,
}

/// JSON-lines sinks for all streams.
pub struct FileSinks {
    dir: PathBuf,
    streams: Vec<Stream>,
    unflushed: usize,
    rotation: Rotation,
}

/// The wall clock in microseconds since the Unix epoch (file ages survive restarts).
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The path of sealed file `n` of `stream`.
pub fn sealed_path(dir: &Path, stream: &str, n: u64) -> PathBuf {
    dir.join(format!("{stream}.{n:06}.jsonl"))
}

/// Reads the whole lines of `file` from `offset`, recording their tags in `last`; returns the
/// offset after the last whole line.
fn scan(
    file: &File,
    path: &Path,
    mut offset: u64,
    last: &mut BTreeMap<u32, (u64, u32)>,
) -> Result<u64, Error> {
    let mut file = file;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| io("seek", path, e))?;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| io("read", path, e))?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        let tag: LineTag = serde_json::from_str(&line).map_err(|e| {
            Error(format!(
                "{} has a bad line at byte {offset}: {e}",
                path.display()
            ))
        })?;
        last.insert(tag.shard, (tag.lsn, tag.index));
        offset += n as u64;
    }
    Ok(offset)
}

impl std::fmt::Debug for FileSinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSinks")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error(format!("cannot {what} {}: {e}", path.display()))
}

#[derive(Deserialize)]
struct LineTag {
    shard: u32,
    lsn: u64,
    index: u32,
}

impl FileSinks {
    /// Opens (creating) the sink files in `dir` and recovers their progress, with the default
    /// rotation.
    pub fn open(dir: &Path) -> Result<FileSinks, Error> {
        Self::open_with(dir, Rotation::default())
    }

    /// [`FileSinks::open`] with a rotation of its own.
    pub fn open_with(dir: &Path, rotation: Rotation) -> Result<FileSinks, Error> {
        std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        let progress_path = dir.join("progress.json");
        let progress: Progress = match std::fs::read(&progress_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error(format!("{} is unreadable: {e}", progress_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Progress::default(),
            Err(e) => return Err(io("read", &progress_path, e)),
        };
        let mut streams = Vec::new();
        for name in STREAMS {
            let path = dir.join(format!("{name}.jsonl"));
            let mut offset = progress.offsets.get(name).copied().unwrap_or(0);
            let mut last = progress.last.get(name).cloned().unwrap_or_default();
            let mut sealed = progress.sealed.get(name).copied().unwrap_or(0);
            // A rotation that stopped after its rename, before its progress: the file it sealed
            // holds what the progress counted, and maybe more (synced before the rename).
            let next = sealed_path(dir, name, sealed + 1);
            if next.exists() {
                let file = File::open(&next).map_err(|e| io("open", &next, e))?;
                scan(&file, &next, offset, &mut last)?;
                sealed += 1;
                offset = 0;
            }
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| io("open", &path, e))?;
            let length = file.metadata().map_err(|e| io("stat", &path, e))?.len();
            if offset > length {
                return Err(Error(format!(
                    "{} is shorter than its recorded progress: it was truncated or replaced",
                    path.display()
                )));
            }
            // Lines written after the last checkpoint still count; a torn last line does not.
            let offset = scan(&file, &path, offset, &mut last)?;
            if offset < length {
                file.set_len(offset)
                    .map_err(|e| io("truncate the torn tail of", &path, e))?;
            }
            streams.push(Stream {
                name,
                writer: BufWriter::new(file),
                offset,
                last,
                sealed,
                // A file sealed at this start begins now; so does one the progress never dated.
                opened_at: match progress.opened.get(name) {
                    Some(at) if !next.exists() => *at,
                    _ => now_us(),
                },
            });
        }
        let mut sinks = FileSinks {
            dir: dir.to_path_buf(),
            streams,
            unflushed: 0,
            rotation,
        };
        sinks.checkpoint()?;
        Ok(sinks)
    }

    /// The last tag written for `shard` in each stream.
    pub fn progress(&self, shard: u32) -> Vec<Option<(u64, u32)>> {
        self.streams
            .iter()
            .map(|s| s.last.get(&shard).copied())
            .collect()
    }

    fn write_line(&mut self, tagged: &Tagged) -> Result<bool, Error> {
        let stream = &mut self.streams[stream_of(&tagged.effect)];
        if stream
            .last
            .get(&tagged.shard)
            .is_some_and(|&p| tagged.position() <= p)
        {
            return Ok(false);
        }
        let mut line = serde_json::to_vec(tagged).map_err(|e| Error(format!("encode: {e}")))?;
        line.push(b'\n');
        if stream.offset == 0 {
            // A file's age counts from its first line: a quiet stream is not sealed one line at
            // a time.
            stream.opened_at = now_us();
        }
        stream
            .writer
            .write_all(&line)
            .map_err(|e| Error(format!("write {}: {e}", stream.name)))?;
        stream.offset += line.len() as u64;
        stream.last.insert(tagged.shard, tagged.position());
        self.unflushed += 1;
        Ok(true)
    }

    fn flush_files(&mut self) -> Result<(), Error> {
        if self.unflushed == 0 {
            return Ok(());
        }
        for stream in &mut self.streams {
            stream
                .writer
                .flush()
                .map_err(|e| Error(format!("flush {}: {e}", stream.name)))?;
            stream
                .writer
                .get_ref()
                .sync_data()
                .map_err(|e| Error(format!("sync {}: {e}", stream.name)))?;
        }
        self.unflushed = 0;
        self.rotate()?;
        self.checkpoint()
    }

    /// Seals the streams due for it (their data is synced), then writes the progress, then
    /// deletes sealed files beyond the retention.
    fn rotate(&mut self) -> Result<(), Error> {
        let mut rotated = false;
        for stream in &mut self.streams {
            let now = now_us();
            // A clock set back restarts the age rather than stopping it for as long.
            stream.opened_at = stream.opened_at.min(now);
            let age = i64::try_from(self.rotation.age.as_micros()).unwrap_or(i64::MAX);
            let due = stream.offset >= self.rotation.bytes
                || (stream.offset > 0 && now.saturating_sub(stream.opened_at) >= age);
            if !due {
                continue;
            }
            let path = self.dir.join(format!("{}.jsonl", stream.name));
            let sealed = sealed_path(&self.dir, stream.name, stream.sealed + 1);
            std::fs::rename(&path, &sealed).map_err(|e| io("seal", &path, e))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("sync", &self.dir, e))?;
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| io("open", &path, e))?;
            stream.writer = BufWriter::new(file);
            stream.offset = 0;
            stream.sealed += 1;
            stream.opened_at = now_us();
            rotated = true;
        }
        if !rotated {
            return Ok(());
        }
        self.checkpoint()?;
        for stream in &self.streams {
            let mut n = stream.sealed.saturating_sub(self.rotation.keep);
            while n > 0 {
                let old = sealed_path(&self.dir, stream.name, n);
                match std::fs::remove_file(&old) {
                    Ok(()) => n -= 1,
                    // Deleted before: so are all older ones.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => return Err(io("delete", &old, e)),
                }
            }
        }
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), Error> {
        let mut progress = Progress::default();
        for s in &self.streams {
            progress.offsets.insert(s.name.to_string(), s.offset);
            progress.last.insert(s.name.to_string(), s.last.clone());
            progress.sealed.insert(s.name.to_string(), s.sealed);
            progress.opened.insert(s.name.to_string(), s.opened_at);
        }
        let path = self.dir.join("progress.json");
        let temp = self.dir.join("progress.json.tmp");
        let bytes = serde_json::to_vec(&progress).map_err(|e| Error(format!("encode: {e}")))?;
        let mut file = File::create(&temp).map_err(|e| io("create", &temp, e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io("write", &temp, e))?;
        std::fs::rename(&temp, &path).map_err(|e| io("rename", &temp, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync", &self.dir, e))
    }
}

impl Sink for FileSinks {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn write(&mut self, tagged: &Tagged) -> Result<bool, Error> {
        self.write_line(tagged)
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.flush_files()
    }

    fn unflushed(&self) -> usize {
        self.unflushed
    }
}
