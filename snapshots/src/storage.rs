//! The small trait the snapshot directory reaches the file system through, so tests can swap
//! the disk for a simulation that loses unsynced writes ([`crate::sim::SimStorage`]).
//!
//! [`FileStorage`] is the real one ([`std::fs`]) and the default of [`crate::SnapshotDir::open`].
//! The trait has only the calls the directory makes: create, write, sync, rename, remove, read
//! and list files, and create and sync directories. Paths are whole paths, as the directory
//! builds them.

use std::{
    ffi::OsString,
    fmt::Debug,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, Write},
    path::Path,
};

/// Where snapshot files live.
pub trait Storage: Send + Sync + Debug + 'static {
    /// Whether `path` is a directory (`Ok(false)`: it exists but is something else); an error of
    /// kind `NotFound` if it does not exist.
    fn is_dir(&self, path: &Path) -> io::Result<bool>;

    /// Creates a directory and its missing parents. Not durable until each new directory's
    /// parent is synced ([`Storage::sync_dir`]).
    fn create_dir(&self, path: &Path) -> io::Result<()>;

    /// Creates (or truncates) a file for writing. Its name is not durable until the directory
    /// is synced, its bytes not until [`WriteFile::sync`].
    fn create(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;

    /// Opens a file for reading.
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadFile>>;

    /// The size of a file in bytes.
    fn size_bytes(&self, path: &Path) -> io::Result<u64>;

    /// Renames a file, replacing `to` if it exists. Durable once the directory is synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Deletes a file. Durable once the directory is synced.
    fn remove(&self, path: &Path) -> io::Result<()>;

    /// Makes the creations, renames and deletions in a directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// The names in a directory, each with whether it is a regular file.
    fn list(&self, dir: &Path) -> io::Result<Vec<(OsString, bool)>>;
}

/// A file open for writing.
pub trait WriteFile: Write + Seek + Send {
    /// Makes every byte written so far durable (`fsync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// A file open for reading.
pub trait ReadFile: Read + Seek + Send {
    /// The file's size in bytes.
    fn size_bytes(&self) -> io::Result<u64>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileStorage;

impl Storage for FileStorage {
    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        fs::metadata(path).map(|meta| meta.is_dir())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(file))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadFile>> {
        Ok(Box::new(File::open(path)?))
    }

    fn size_bytes(&self, path: &Path) -> io::Result<u64> {
        fs::metadata(path).map(|meta| meta.len())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(OsString, bool)>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            names.push((entry.file_name(), entry.file_type()?.is_file()));
        }
        Ok(names)
    }
}

impl WriteFile for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

impl ReadFile for File {
    fn size_bytes(&self) -> io::Result<u64> {
        self.metadata().map(|meta| meta.len())
    }
}
