//! A simulated file system for the key store's power-loss tests: files and directories in
//! memory, with what reads see kept apart from what survives a power loss.
//!
//! Every file keeps two images: `current` (what reads see, like the page cache) and `durable`
//! (what survives). [`WriteFile::sync`] copies current to durable. Every directory keeps its
//! current entries and its durable entries: a creation or a rename changes the current entries
//! at once and the durable ones only at the directory's [`Storage::sync_dir`].
//! [`SimStorage::power_loss`] returns the disk a restarted machine finds: durable entries,
//! durable bytes. [`SimStorage::power_loss_with`] lets the test decide, for each directory, how
//! many of its unsynced changes (oldest first, each rename whole) reached the disk, and for each
//! file with unsynced bytes whether they were lost, kept or torn (the first half of the current
//! bytes, zeros after), as writeback before the crash may do.
//!
//! [`SimStorage::crash_after`] arms a crash point: after that many more mutating operations
//! (create a file or directory, write, sync, rename, sync a directory) the next one fails (a
//! write first copies half its bytes), and so does every call after it, reads too.
//!
//! Paths are absolute; `/` always exists. Renames stay inside one directory. This module is
//! deterministic: no clock, no randomness; the test makes the choices. (`tally-snapshots` has
//! the same model with the few more calls its directory makes.)

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use super::storage::{Storage, WriteFile};

/// In-memory [`Storage`] that loses unsynced writes at a power loss. Cloning shares the disk.
#[derive(Debug, Clone)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
}

impl Default for SimStorage {
    fn default() -> Self {
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::from("/"), Dir::default());
        SimStorage {
            disk: Arc::new(Mutex::new(Disk {
                dirs,
                files: BTreeMap::new(),
                next_file: 0,
                ops: 0,
                crash_at: None,
                crashed: false,
            })),
        }
    }
}

#[derive(Debug)]
struct Disk {
    /// Every directory that exists now, by path.
    dirs: BTreeMap<PathBuf, Dir>,
    /// File contents by file number (an inode: renames move names, not contents).
    files: BTreeMap<u64, Data>,
    next_file: u64,
    /// Mutating operations so far.
    ops: u64,
    /// The operation with this number (counted like `ops`) and everything after it fail.
    crash_at: Option<u64>,
    crashed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

/// One atomic change to a directory's entries: names set (`Some`) or removed (`None`).
type Change = Vec<(OsString, Option<Node>)>;

#[derive(Debug, Default, Clone)]
struct Dir {
    current: BTreeMap<OsString, Node>,
    durable: BTreeMap<OsString, Node>,
    /// Changes since the last sync, oldest first: `durable` plus all of them is `current`.
    pending: Vec<Change>,
}

impl Dir {
    fn change(&mut self, change: Change) {
        apply(&mut self.current, &change);
        self.pending.push(change);
    }
}

fn apply(entries: &mut BTreeMap<OsString, Node>, change: &Change) {
    for (name, node) in change {
        match node {
            Some(node) => entries.insert(name.clone(), *node),
            None => entries.remove(name),
        };
    }
}

#[derive(Debug, Default, Clone)]
struct Data {
    current: Vec<u8>,
    durable: Vec<u8>,
}

fn lock(disk: &Mutex<Disk>) -> MutexGuard<'_, Disk> {
    disk.lock().unwrap_or_else(PoisonError::into_inner)
}

fn crash_error() -> io::Error {
    io::Error::other("simulated power loss")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
}

fn is_a_directory(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::IsADirectory, path.display().to_string())
}

/// A path's directory and name.
fn split(path: &Path) -> io::Result<(PathBuf, OsString)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if path.is_absolute() => {
            Ok((parent.to_path_buf(), name.to_os_string()))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an absolute file path: {}", path.display()),
        )),
    }
}

impl Disk {
    /// Counts a mutating operation; fails it if it is the crash point or after it.
    fn step(&mut self) -> io::Result<()> {
        self.alive()?;
        self.ops += 1;
        if self.crash_at.is_some_and(|at| self.ops >= at) {
            self.crashed = true;
            return Err(crash_error());
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.crashed {
            return Err(crash_error());
        }
        Ok(())
    }

    fn dir_mut(&mut self, path: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(path).ok_or_else(|| not_found(path))
    }

    fn lookup(&self, path: &Path) -> io::Result<Node> {
        if self.dirs.contains_key(path) {
            return Ok(Node::Dir);
        }
        let (parent, name) = split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|dir| dir.current.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }

    fn file(&self, path: &Path) -> io::Result<u64> {
        match self.lookup(path)? {
            Node::File(number) => Ok(number),
            Node::Dir => Err(is_a_directory(path)),
        }
    }
}

impl SimStorage {
    /// An empty disk: only `/`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a directory and its missing parents (each durable once its parent is synced).
    /// Counts as one mutating operation.
    pub fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        disk.step()?;
        let mut missing = Vec::new();
        let mut at = path;
        while !disk.dirs.contains_key(at) {
            let (parent, name) = split(at)?;
            if disk.lookup(at).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    at.display().to_string(),
                ));
            }
            missing.push((at.to_path_buf(), parent, name));
            at = at.parent().unwrap_or(Path::new("/"));
        }
        for (dir, parent, name) in missing.into_iter().rev() {
            disk.dir_mut(&parent)?.change(vec![(name, Some(Node::Dir))]);
            disk.dirs.insert(dir, Dir::default());
        }
        Ok(())
    }

    /// After `ops` more mutating operations succeed, the next one fails as a power loss would
    /// interrupt it, and every call after it fails too. Call [`SimStorage::power_loss`] then.
    pub fn crash_after(&self, ops: u64) {
        let mut disk = lock(&self.disk);
        disk.crash_at = Some(disk.ops + ops + 1);
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        lock(&self.disk).ops
    }

    /// Whether the armed crash point was reached.
    pub fn crashed(&self) -> bool {
        lock(&self.disk).crashed
    }

    /// The names in a directory now, files and directories (no file contents).
    pub fn list(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let disk = lock(&self.disk);
        disk.alive()?;
        let dir = disk.dirs.get(path).ok_or_else(|| not_found(path))?;
        Ok(dir.current.keys().cloned().collect())
    }

    /// The disk after a power loss: only what was synced.
    pub fn power_loss(&self) -> SimStorage {
        self.power_loss_with(|_| 0)
    }

    /// The disk after a power loss in which some unsynced writes reached it anyway. For each
    /// directory with `n` unsynced changes (in path order), `pick(n)` is how many of them, oldest
    /// first, survive. Then for each surviving file with unsynced bytes, `pick(2)` says what
    /// survives: 0 the synced bytes, 1 the current bytes, 2 the first half of the current bytes
    /// followed by zeros (its size reached the disk, not all its data). Larger answers are
    /// clamped.
    pub fn power_loss_with(&self, mut pick: impl FnMut(usize) -> usize) -> SimStorage {
        let disk = lock(&self.disk);
        let mut dirs: BTreeMap<PathBuf, Dir> = BTreeMap::new();
        // Parents sort before their children, so each directory's own survival is known.
        for (path, dir) in &disk.dirs {
            let survives = match split(path) {
                Err(_) => true, // the root
                Ok((parent, name)) => dirs
                    .get(&parent)
                    .is_some_and(|p| p.current.get(&name) == Some(&Node::Dir)),
            };
            if !survives {
                continue;
            }
            let mut entries = dir.durable.clone();
            if !dir.pending.is_empty() {
                let kept = pick(dir.pending.len()).min(dir.pending.len());
                for change in &dir.pending[..kept] {
                    apply(&mut entries, change);
                }
            }
            dirs.insert(
                path.clone(),
                Dir {
                    current: entries.clone(),
                    durable: entries,
                    pending: Vec::new(),
                },
            );
        }
        let live: BTreeSet<u64> = dirs
            .values()
            .flat_map(|dir| dir.current.values())
            .filter_map(|node| match node {
                Node::File(number) => Some(*number),
                Node::Dir => None,
            })
            .collect();
        let mut files = BTreeMap::new();
        for number in live {
            let data = &disk.files[&number];
            let survived = if data.current == data.durable {
                data.durable.clone()
            } else {
                match pick(2) {
                    0 => data.durable.clone(),
                    1 => data.current.clone(),
                    _ => {
                        let mut torn = vec![0; data.current.len()];
                        let half = data.current.len() / 2;
                        torn[..half].copy_from_slice(&data.current[..half]);
                        torn
                    }
                }
            };
            files.insert(
                number,
                Data {
                    current: survived.clone(),
                    durable: survived,
                },
            );
        }
        SimStorage {
            disk: Arc::new(Mutex::new(Disk {
                dirs,
                files,
                next_file: disk.next_file,
                ops: 0,
                crash_at: None,
                crashed: false,
            })),
        }
    }
}

impl Storage for SimStorage {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let disk = lock(&self.disk);
        disk.alive()?;
        let number = disk.file(path)?;
        Ok(disk.files[&number].current.clone())
    }

    fn create_private(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let mut disk = lock(&self.disk);
        disk.step()?;
        let number = match disk.lookup(path) {
            Ok(Node::File(number)) => {
                disk.files.get_mut(&number).expect("linked").current.clear();
                number
            }
            Ok(Node::Dir) => return Err(is_a_directory(path)),
            Err(_) => {
                let (parent, name) = split(path)?;
                let number = disk.next_file;
                disk.dir_mut(&parent)?
                    .change(vec![(name, Some(Node::File(number)))]);
                disk.next_file += 1;
                disk.files.insert(number, Data::default());
                number
            }
        };
        Ok(Box::new(SimFile {
            disk: Arc::clone(&self.disk),
            number,
            position: 0,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        disk.step()?;
        let number = disk.file(from)?;
        let (dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        if dir != to_dir {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the simulation renames only within one directory",
            ));
        }
        if matches!(disk.lookup(to), Ok(Node::Dir)) {
            return Err(is_a_directory(to));
        }
        if from_name != to_name {
            disk.dir_mut(&dir)?
                .change(vec![(to_name, Some(Node::File(number))), (from_name, None)]);
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        disk.step()?;
        let dir = disk.dir_mut(path)?;
        dir.durable = dir.current.clone();
        dir.pending.clear();
        Ok(())
    }
}

/// A simulated file open for writing.
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    number: u64,
    position: u64,
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut disk = lock(&self.disk);
        disk.alive()?;
        let crashed = disk.step();
        // The write the power loss interrupts gets halfway.
        let bytes = if crashed.is_ok() {
            buf
        } else {
            &buf[..buf.len() / 2]
        };
        let data = &mut disk.files.get_mut(&self.number).expect("open").current;
        let start = usize::try_from(self.position).map_err(io::Error::other)?;
        let end = start + bytes.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(bytes);
        self.position = end as u64;
        crashed.map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WriteFile for SimFile {
    fn sync(&mut self) -> io::Result<()> {
        let mut disk = lock(&self.disk);
        disk.step()?;
        let data = disk.files.get_mut(&self.number).expect("open");
        data.durable = data.current.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(sim: &SimStorage, path: &str, bytes: &[u8], sync: bool) {
        let mut file = sim.create_private(Path::new(path)).unwrap();
        file.write_all(bytes).unwrap();
        if sync {
            file.sync().unwrap();
        }
    }

    #[test]
    fn only_synced_bytes_and_synced_names_survive_a_power_loss() {
        let sim = SimStorage::new();
        sim.create_dir(Path::new("/d")).unwrap();
        sim.sync_dir(Path::new("/")).unwrap();
        write(&sim, "/d/a", b"old", true);
        sim.sync_dir(Path::new("/d")).unwrap();
        write(&sim, "/d/a.tmp", b"new", true);
        sim.rename(Path::new("/d/a.tmp"), Path::new("/d/a"))
            .unwrap();
        write(&sim, "/d/b", b"unsynced", false);
        assert_eq!(sim.read(Path::new("/d/a")).unwrap(), b"new");

        let after = sim.power_loss();
        assert_eq!(after.read(Path::new("/d/a")).unwrap(), b"old");
        assert_eq!(after.list(Path::new("/d")).unwrap(), ["a"]);

        let lucky = sim.power_loss_with(|n| n);
        assert_eq!(lucky.read(Path::new("/d/a")).unwrap(), b"new");
        assert_eq!(lucky.read(Path::new("/d/b")).unwrap(), b"unsy\0\0\0\0");
    }

    #[test]
    fn a_crash_point_fails_that_operation_and_every_later_call() {
        let sim = SimStorage::new();
        sim.crash_after(2);
        let mut file = sim.create_private(Path::new("/f")).unwrap();
        file.write_all(b"abcd").unwrap();
        assert!(file.write_all(b"efgh").is_err());
        assert!(sim.crashed());
        assert!(file.sync().is_err());
        assert!(sim.read(Path::new("/f")).is_err());
        assert_eq!(sim.ops(), 3);
        let kept = sim.power_loss_with(|n| n.min(1));
        assert_eq!(kept.read(Path::new("/f")).unwrap(), b"abcdef");
        assert!(sim.power_loss().read(Path::new("/f")).is_err());
    }
}
