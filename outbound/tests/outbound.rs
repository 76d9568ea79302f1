//! The outbound loop: it waits for work instead of spinning while idle, and answers a flush
//! barrier only after every sink flushed what was queued before it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tally_engine::{name, Effect, Timestamp};
use tally_outbound::{Error, Lag, Message, Sink, Tagged};

struct Counting {
    polls: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    durable: Arc<AtomicU64>,
    buffered: u64,
}

impl Sink for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn write(&mut self, _: &Tagged) -> Result<bool, Error> {
        self.buffered += 1;
        self.written.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.durable.fetch_add(self.buffered, Ordering::SeqCst);
        self.buffered = 0;
        Ok(())
    }

    fn unflushed(&self) -> usize {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.buffered as usize
    }
}

fn effect(lsn: u64) -> Tagged {
    Tagged {
        shard: 0,
        lsn,
        index: 0,
        applied_at: Timestamp(0),
        effect: Effect::WalletCreated { wallet: name("w") },
        cause: None,
    }
}

#[test]
fn an_idle_loop_sleeps_and_a_flush_barrier_covers_what_came_before() {
    let (polls, written, durable) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let sink = Counting {
        polls: Arc::clone(&polls),
        written: Arc::clone(&written),
        durable: Arc::clone(&durable),
        buffered: 0,
    };
    let (tx, rx) = crossbeam_channel::bounded(16);
    let thread = tally_outbound::spawn(vec![Box::new(sink)], rx, vec![Lag::new("counting")]);
    // Idle for a while: the loop wakes about every flush interval (100 ms), not continuously.
    std::thread::sleep(Duration::from_millis(600));
    let idle_polls = polls.load(Ordering::SeqCst);
    assert!(
        idle_polls < 200,
        "the idle loop polled its sink {idle_polls} times"
    );
    // Effects, then a barrier: when it returns they are durable.
    tx.send(Message::Effects((1..=10).map(effect).collect()))
        .unwrap();
    tally_outbound::flush(&tx).unwrap();
    assert_eq!(written.load(Ordering::SeqCst), 10);
    assert_eq!(durable.load(Ordering::SeqCst), 10);
    drop(tx);
    thread.join().unwrap().unwrap();
}
