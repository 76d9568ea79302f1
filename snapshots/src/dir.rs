//! The snapshot directory: atomic writes, listing, verification, loading with fallback, and
//! pruning. Every file-system call of the crate is made here, through [`Storage`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tally_engine::{State, Timestamp};

use crate::error::{Error, Result};
use crate::format::{
    bincode_config, check_shard, decode_state, file_name, parse_name, temp_file_name,
    ChecksumReader, ChecksumWriter, Header, Named, HEADER_BYTES, PAYLOAD_BYTES_MAX,
};
use crate::storage::{FileStorage, ReadFile, Storage};

/// IO buffer for streaming payloads in and out.
const BUFFER_BYTES: usize = 64 * 1024;

/// A directory holding the snapshots of every shard of one deployment.
///
/// `SnapshotDir` is `Send + Sync`: shard threads may write their own snapshots through one
/// shared value while another thread lists or prunes. Temp files this value is writing are
/// never pruned. At most one thread writes a given shard at a time (its shard loop), and two
/// processes must not write to one directory (the server's data-dir lock ensures that).
#[derive(Debug)]
pub struct SnapshotDir {
    path: PathBuf,
    /// The file system: [`FileStorage`] unless a test opened the directory with
    /// [`SnapshotDir::open_in`].
    storage: Arc<dyn Storage>,
    /// Temp files being written right now through this value, which `prune` must not delete.
    writing: Mutex<BTreeSet<PathBuf>>,
}

/// One snapshot file, as found by [`SnapshotDir::list`] or made by [`SnapshotDir::write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The file.
    pub path: PathBuf,
    /// The shard, from the file name.
    pub shard: u32,
    /// The last WAL LSN applied to the state, from the file name.
    pub lsn: u64,
    /// File size in bytes.
    pub size_bytes: u64,
    /// The header, if it could be read and checked; `None` means the file is unusable, and
    /// [`SnapshotDir::verify`] says why.
    pub header: Option<Header>,
}

impl SnapshotInfo {
    /// When the snapshot was taken, if its header is readable.
    pub fn created_at(&self) -> Option<Timestamp> {
        self.header.map(|h| h.created_at)
    }
}

/// A snapshot that recovery skipped because it was unusable.
#[derive(Debug)]
pub struct Warning {
    /// The skipped file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub error: Error,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "skipped unusable snapshot {}: {}",
            self.path.display(),
            self.error
        )
    }
}

/// What [`SnapshotDir::load_newest`] found for one shard.
#[derive(Debug)]
pub struct Recovered {
    /// The newest usable snapshot and its state; `None` if the shard has no usable snapshot
    /// (then the whole WAL must be replayed from its first LSN).
    pub newest: Option<(SnapshotInfo, State)>,
    /// Newer snapshots that were skipped, newest first, each naming its file and the reason.
    /// Non-empty means recovery fell back; log every one.
    pub warnings: Vec<Warning>,
}

impl SnapshotDir {
    /// Opens a snapshot directory, creating it and any missing parents if it does not exist
    /// (and syncing the parent of each directory it created, so they survive a power loss).
    /// Opening touches no file in it: temp files left by a crash are removed by
    /// [`SnapshotDir::prune`], so a read-only tool can open the directory of a running server.
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotDir> {
        SnapshotDir::open_in(FileStorage, path)
    }

    /// [`SnapshotDir::open`] on another [`Storage`], such as the simulated disk of
    /// [`crate::sim::SimStorage`] in power-loss tests.
    pub fn open_in(storage: impl Storage, path: impl AsRef<Path>) -> Result<SnapshotDir> {
        let path = path.as_ref().to_path_buf();
        match storage.is_dir(&path) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Io {
                    operation: "open snapshot directory",
                    source: std::io::Error::other("it exists but is not a directory"),
                    path,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The directories this call creates, deepest first.
                let mut created = vec![path.as_path()];
                for ancestor in path.ancestors().skip(1).map(or_current) {
                    match storage.is_dir(ancestor) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            created.push(ancestor)
                        }
                        _ => break,
                    }
                }
                storage
                    .create_dir(&path)
                    .map_err(Error::io("create snapshot directory", &path))?;
                // Each new directory is an entry of its parent: durable once the parent is synced
                // (syncing only the nearest parent left new grandparents, and so the whole
                // directory, to chance).
                for dir in created.into_iter().rev() {
                    if let Some(parent) = dir.parent().map(or_current) {
                        sync_dir(&storage, parent)?;
                    }
                }
            }
            Err(e) => return Err(Error::io("open snapshot directory", &path)(e)),
        }
        Ok(SnapshotDir {
            path,
            storage: Arc::new(storage),
            writing: Mutex::new(BTreeSet::new()),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the state of `shard` (of `shard_count`) after applying WAL records up to and
    /// including `lsn`, durably and atomically: a temp file in the same directory is written,
    /// `fsync`ed, renamed to its final name, and the directory is `fsync`ed.
    ///
    /// The payload is streamed: it passes through a 64 KiB buffer and a checksumming writer
    /// and is never held in memory whole. On success the snapshot survives a crash. On error
    /// the temp file is removed (best effort) and earlier snapshots are untouched, but a
    /// failure after the rename (the directory sync) leaves it unknown whether the new file
    /// survives a crash: do not delete WAL below `lsn` on the strength of a failed write.
    /// Writing the same shard and LSN again replaces the file atomically.
    pub fn write(
        &self,
        shard: u32,
        shard_count: u32,
        lsn: u64,
        created_at: Timestamp,
        state: &State,
    ) -> Result<SnapshotInfo> {
        check_shard(shard, shard_count).map_err(Error::InvalidArgument)?;
        let path = self.path.join(file_name(shard, lsn));
        let temp = TempFile::register(self, self.path.join(temp_file_name(shard, lsn)));

        let mut file = self
            .storage
            .create(&temp.path)
            .map_err(Error::io("create temp file", &temp.path))?;
        // The header is written last, once the payload's length and checksum are known.
        file.write_all(&[0; HEADER_BYTES])
            .map_err(Error::io("write", &temp.path))?;
        let mut out = BufWriter::with_capacity(BUFFER_BYTES, ChecksumWriter::new(&mut file));
        let encoded = bincode::serde::encode_into_std_write(state, &mut out, bincode_config());
        let flushed = out.flush();
        // After a failed flush the unwritten bytes do not matter: the temp file is dropped.
        let (sink, _) = out.into_parts();
        if sink.too_large {
            return Err(Error::TooLarge {
                path: temp.path.clone(),
                payload_bytes_max: PAYLOAD_BYTES_MAX,
            });
        }
        match encoded {
            Ok(_) => {}
            Err(bincode::error::EncodeError::Io { inner, .. }) => {
                return Err(Error::io("write", &temp.path)(inner))
            }
            Err(e) => {
                return Err(Error::Encode {
                    path: temp.path.clone(),
                    detail: e.to_string(),
                })
            }
        }
        flushed.map_err(Error::io("write", &temp.path))?;
        let header = Header {
            version: crate::format::FORMAT_VERSION,
            shard,
            shard_count,
            lsn,
            created_at,
            payload_bytes: sink.bytes,
            payload_crc32c: sink.crc,
        };
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header.to_bytes()))
            .map_err(Error::io("write header of", &temp.path))?;
        file.sync()
            .map_err(Error::io("sync temp file", &temp.path))?;
        drop(file);
        self.storage
            .rename(&temp.path, &path)
            .map_err(Error::io("rename temp file into", &path))?;
        temp.renamed();
        sync_dir(&*self.storage, &self.path)?;
        Ok(SnapshotInfo {
            path,
            shard,
            lsn,
            size_bytes: header.file_bytes(),
            header: Some(header),
        })
    }

    /// Every snapshot in the directory, sorted by shard, then LSN (oldest first). Each header
    /// is read and checked (64 bytes per file); payloads are not read. Temp files and files
    /// whose names this crate did not write are not listed.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let mut infos = Vec::new();
        for (shard, lsn, path) in self.scan()?.snapshots {
            let size_bytes = match self.storage.size_bytes(&path) {
                Ok(len) => len,
                // Pruned by someone else between the scan and now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("read metadata of", &path)(e)),
            };
            let header = read_header_in(&*self.storage, &path).ok();
            infos.push(SnapshotInfo {
                path,
                shard,
                lsn,
                size_bytes,
                header,
            });
        }
        Ok(infos)
    }

    /// Every snapshot of one shard, oldest first (see [`SnapshotDir::list`]).
    pub fn list_shard(&self, shard: u32) -> Result<Vec<SnapshotInfo>> {
        let mut all = self.list()?;
        all.retain(|info| info.shard == shard);
        Ok(all)
    }

    /// Checks a snapshot completely without decoding it: header, name, size and payload
    /// checksum. Returns the header.
    pub fn verify(&self, info: &SnapshotInfo) -> Result<Header> {
        let mut file = open_checked(&*self.storage, info)?;
        let header = file.header;
        check_payload(&mut *file.file, &info.path, &header)?;
        Ok(header)
    }

    /// Reads a snapshot back into a shard state, checking everything [`SnapshotDir::verify`]
    /// checks before decoding, and that the payload decodes to exactly its length.
    ///
    /// The file is read twice, in 64 KiB pieces: once to check the checksum, so the decoder
    /// never sees damaged bytes, then to decode (checksummed again, so what is returned is
    /// what was checked). Peak memory is the state plus the buffer, not the state plus a copy
    /// of the payload. The caller rebuilds the engine with `Engine::from_state`, which checks
    /// the state's own invariants.
    pub fn load(&self, info: &SnapshotInfo) -> Result<State> {
        load_checked(&*self.storage, info).map(|(_, state)| state)
    }

    /// Recovery for one shard: the newest snapshot that loads, falling back past unusable
    /// newer ones. Each skipped file becomes a [`Warning`] naming it. Any per-file error
    /// (corruption, an unsupported version, an unreadable file) causes a fallback; only
    /// failing to list the directory is an error.
    ///
    /// The header's shard count is returned in the info; checking it against the configured
    /// shard count is the caller's business (a mismatch is a configuration error, not damage).
    pub fn load_newest(&self, shard: u32) -> Result<Recovered> {
        let mut warnings = Vec::new();
        let mut candidates: Vec<(u64, PathBuf)> = self
            .scan()?
            .snapshots
            .into_iter()
            .filter(|(s, _, _)| *s == shard)
            .map(|(_, lsn, path)| (lsn, path))
            .collect();
        candidates.reverse(); // newest first; the scan sorts by shard, then LSN
        for (lsn, path) in candidates {
            let mut info = SnapshotInfo {
                path: path.clone(),
                shard,
                lsn,
                size_bytes: 0,
                header: None,
            };
            match load_checked(&*self.storage, &info) {
                Ok((header, state)) => {
                    info.header = Some(header);
                    info.size_bytes = header.file_bytes();
                    return Ok(Recovered {
                        newest: Some((info, state)),
                        warnings,
                    });
                }
                Err(error) => warnings.push(Warning { path, error }),
            }
        }
        Ok(Recovered {
            newest: None,
            warnings,
        })
    }

    /// Deletes all but the newest `keep` snapshots of every shard, and temp files left by a
    /// crash (never one this value is writing). Returns the deleted paths; syncs the directory
    /// once if it deleted anything.
    ///
    /// Safety net: the newest snapshot of a shard that verifies is never deleted, even when
    /// `keep` newer ones exist (they are all damaged), so pruning cannot leave a shard with
    /// nothing to recover from. Finding it reads the newest snapshot of each shard in full.
    pub fn prune(&self, keep: usize) -> Result<Vec<PathBuf>> {
        if keep == 0 {
            return Err(Error::InvalidArgument(
                "prune must keep at least one snapshot per shard".into(),
            ));
        }
        let scan = self.scan()?;
        let mut doomed = Vec::new();
        {
            let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            doomed.extend(scan.temps.into_iter().filter(|t| !writing.contains(t)));
        }
        let mut per_shard: BTreeMap<u32, Vec<(u64, PathBuf)>> = BTreeMap::new();
        for (shard, lsn, path) in scan.snapshots {
            per_shard.entry(shard).or_default().push((lsn, path));
        }
        for (shard, mut snapshots) in per_shard {
            snapshots.reverse(); // newest first; the scan sorts by shard, then LSN
            let newest_valid = snapshots.iter().position(|(lsn, path)| {
                let info = SnapshotInfo {
                    path: path.clone(),
                    shard,
                    lsn: *lsn,
                    size_bytes: 0,
                    header: None,
                };
                self.verify(&info).is_ok()
            });
            for (index, (_, path)) in snapshots.into_iter().enumerate() {
                if index >= keep && Some(index) != newest_valid {
                    doomed.push(path);
                }
            }
        }
        let mut removed = Vec::new();
        for path in doomed {
            match self.storage.remove(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("delete", &path)(e)),
            }
        }
        if !removed.is_empty() {
            sync_dir(&*self.storage, &self.path)?;
        }
        Ok(removed)
    }

    /// The LSN of the oldest snapshot kept for `shard`, or `None` if it has none. Recovery
    /// may fall back to any kept snapshot and replays from its LSN + 1, so WAL records at or
    /// below this LSN are no longer needed (`tally_wal::Wal::delete_below(lsn + 1)`). Call it
    /// after [`SnapshotDir::prune`].
    pub fn oldest_kept_lsn(&self, shard: u32) -> Result<Option<u64>> {
        Ok(self
            .scan()?
            .snapshots
            .into_iter()
            .filter(|(s, _, _)| *s == shard)
            .map(|(_, lsn, _)| lsn)
            .min())
    }

    /// Reads the directory's names (no file contents).
    fn scan(&self) -> Result<Scan> {
        let mut scan = Scan::default();
        let entries = self
            .storage
            .list(&self.path)
            .map_err(Error::io("list snapshot directory", &self.path))?;
        for (name, is_file) in entries {
            let Some(named) = name.to_str().and_then(parse_name) else {
                continue;
            };
            if !is_file {
                continue;
            }
            let path = self.path.join(&name);
            match named {
                Named::Snapshot { shard, lsn } => scan.snapshots.push((shard, lsn, path)),
                Named::Temp => scan.temps.push(path),
            }
        }
        scan.snapshots.sort_unstable();
        scan.temps.sort_unstable();
        Ok(scan)
    }
}

/// The directory's names.
#[derive(Default)]
struct Scan {
    /// Snapshots as (shard, lsn, path), sorted.
    snapshots: Vec<(u32, u64, PathBuf)>,
    /// Temp files.
    temps: Vec<PathBuf>,
}

/// A temp file registered with its directory while it is written; removed from the disk
/// unless renamed, and unregistered either way.
struct TempFile<'a> {
    dir: &'a SnapshotDir,
    path: PathBuf,
    renamed: bool,
}

impl<'a> TempFile<'a> {
    fn register(dir: &'a SnapshotDir, path: PathBuf) -> TempFile<'a> {
        dir.writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone());
        TempFile {
            dir,
            path,
            renamed: false,
        }
    }

    fn renamed(mut self) {
        self.renamed = true;
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if !self.renamed {
            // Best effort: a leftover temp file is harmless (never listed, pruned later).
            let _ = self.dir.storage.remove(&self.path);
        }
        self.dir
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.path);
    }
}

/// [`SnapshotDir::load`], also returning the checked header.
fn load_checked(storage: &dyn Storage, info: &SnapshotInfo) -> Result<(Header, State)> {
    let OpenFile { mut file, header } = open_checked(storage, info)?;

    check_payload(&mut *file, &info.path, &header)?;
    file.seek(SeekFrom::Start(HEADER_BYTES as u64))
        .map_err(Error::io("seek in", &info.path))?;
    let mut reader = BufReader::with_capacity(
        BUFFER_BYTES,
        ChecksumReader {
            inner: (&mut file).take(header.payload_bytes),
            crc: 0,
        },
    );
    let state =
        decode_state(&mut reader, header.payload_bytes, header.version).map_err(|e| match e {
            bincode::error::DecodeError::Io { inner, .. }
                if inner.kind() != std::io::ErrorKind::UnexpectedEof =>
            {
                Error::io("read", &info.path)(inner)
            }
            e => Error::malformed(
                &info.path,
                format!("the payload does not decode as a shard state: {e}"),
            ),
        })?;
    let unread = reader.buffer().len() as u64 + reader.get_ref().inner.limit();
    if unread != 0 {
        return Err(Error::malformed(
            &info.path,
            format!("{unread} payload bytes follow the encoded shard state"),
        ));
    }
    let computed = reader.get_ref().crc;
    if computed != header.payload_crc32c {
        // The file changed between the two reads.
        return Err(Error::PayloadChecksum {
            path: info.path.clone(),
            stored: header.payload_crc32c,
            computed,
        });
    }
    Ok((header, state))
}

/// A snapshot file opened, with its header checked against its name and its size.
struct OpenFile {
    file: Box<dyn ReadFile>,
    header: Header,
}

fn open_checked(storage: &dyn Storage, info: &SnapshotInfo) -> Result<OpenFile> {
    let path = &info.path;
    let mut file = storage.open(path).map_err(Error::io("open", path))?;
    let header = read_header_from(&mut *file, path)?;
    if header.shard != info.shard || header.lsn != info.lsn {
        return Err(Error::malformed(
            path,
            format!(
                "its name says shard {} at LSN {}, its header says shard {} at LSN {}",
                info.shard, info.lsn, header.shard, header.lsn
            ),
        ));
    }
    let size = file
        .size_bytes()
        .map_err(Error::io("read metadata of", path))?;
    let expected = header.file_bytes();
    if size < expected {
        return Err(Error::Truncated {
            path: path.clone(),
            bytes_expected: expected,
            bytes_found: size,
        });
    }
    if size > expected {
        return Err(Error::malformed(
            path,
            format!(
                "{} bytes follow the {}-byte payload",
                size - expected,
                header.payload_bytes
            ),
        ));
    }
    Ok(OpenFile { file, header })
}

/// Streams the payload (the reader is positioned right after the header) through CRC32C.
fn check_payload(file: &mut dyn ReadFile, path: &Path, header: &Header) -> Result<()> {
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut crc = 0u32;
    let mut left = header.payload_bytes;
    while left > 0 {
        let want = left.min(BUFFER_BYTES as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    bytes_expected: header.file_bytes(),
                    bytes_found: header.file_bytes() - left,
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", path)(e)),
        };
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        left -= n as u64;
    }
    if crc != header.payload_crc32c {
        return Err(Error::PayloadChecksum {
            path: path.to_path_buf(),
            stored: header.payload_crc32c,
            computed: crc,
        });
    }
    Ok(())
}

/// Reads and checks the header of the file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    read_header_in(&FileStorage, path)
}

fn read_header_in(storage: &dyn Storage, path: &Path) -> Result<Header> {
    let mut file = storage.open(path).map_err(Error::io("open", path))?;
    read_header_from(&mut *file, path)
}

fn read_header_from(file: &mut dyn ReadFile, path: &Path) -> Result<Header> {
    let mut bytes = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read header of", path)(e)),
        }
    }
    Header::parse(&bytes[..filled], path)
}

/// `fsync` on a directory makes renames, creations and deletions in it durable.
fn sync_dir(storage: &dyn Storage, path: &Path) -> Result<()> {
    storage
        .sync_dir(path)
        .map_err(Error::io("sync directory", path))
}

/// A relative path's parent is `""`: the current directory.
fn or_current(path: &Path) -> &Path {
    if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<SnapshotDir>();
};
