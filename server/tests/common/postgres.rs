//! A PostgreSQL server of a test's own, through `scripts/postgres` (which installs it with
//! apt-get when it is missing).

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

/// A PostgreSQL server of the test's own, removed when dropped.
pub struct Postgres {
    dir: PathBuf,
    pub url: String,
}

impl Postgres {
    fn script(action: &str, dir: &Path) -> String {
        let out = Process::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres"))
            .arg(action)
            .arg(dir)
            .output()
            .expect("running scripts/postgres");
        assert!(
            out.status.success(),
            "scripts/postgres {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn start(dir: &Path) -> Postgres {
        let url = Self::script("start", dir);
        Postgres {
            dir: dir.to_path_buf(),
            url,
        }
    }

    pub fn stop(&self) {
        Self::script("stop", &self.dir);
    }

    pub fn restart(&self) {
        Self::script("start", &self.dir);
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        Self::script("remove", &self.dir);
    }
}

/// Waits until PostgreSQL holds `rows` usage events (the export trails the store). It fails
/// when the export stops making progress for 60 s, not after a fixed time: a long crash run
/// leaves a backlog of hundreds of thousands of rows, copied at some 10–25 k rows/s.
pub fn wait_for_usage(pg: &mut postgres::Client, rows: i64) {
    let (mut last, mut progress_at) = (-1, Instant::now());
    loop {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM tally.usage_events", &[])
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n == rows {
            return;
        }
        assert!(n < rows, "{n} usage rows, more than the {rows} applied");
        if n > last {
            (last, progress_at) = (n, Instant::now());
        }
        assert!(
            progress_at.elapsed() < Duration::from_secs(60),
            "PostgreSQL has {n} of {rows} usage rows, and no more for 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
