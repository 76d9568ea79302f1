//! The small trait the key store reaches the file system through, so tests can swap the disk
//! for a simulation that loses unsynced writes ([`super::sim::SimStorage`]).
//!
//! [`FileStorage`] is the real one ([`std::fs`]) and the default of [`super::KeyStore::open`].
//! The trait has only the calls the store makes: read a file, create (mode 0600), write and sync
//! one, rename, and sync a directory.

use std::{
    fmt::Debug,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

/// Where the key files live.
pub trait Storage: Send + Sync + Debug + 'static {
    /// A whole file; an error of kind `NotFound` if it does not exist.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;

    /// Creates (or truncates) a file only its owner may read (mode 0600), for writing. Its name
    /// is not durable until the directory is synced, its bytes not until [`WriteFile::sync`].
    fn create_private(&self, path: &Path) -> io::Result<Box<dyn WriteFile>>;

    /// Renames a file, replacing `to`. Durable once the directory is synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Makes the creations and renames in a directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// A file open for writing.
pub trait WriteFile: Write + Send {
    /// Makes every byte written so far durable (`fsync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileStorage;

impl Storage for FileStorage {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn create_private(&self, path: &Path) -> io::Result<Box<dyn WriteFile>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Box::new(file))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

impl WriteFile for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}
