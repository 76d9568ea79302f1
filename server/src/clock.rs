//! Time for the shard loops: the only clock in tally. The engine never reads one.

use tally_engine::Timestamp;

/// A source of wall-clock time.
pub trait Clock: Send + 'static {
    /// Now, in microseconds since the Unix epoch.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since.as_micros() as i64)
    }
}
