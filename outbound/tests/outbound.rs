//! The outbound loop: it waits for work instead of spinning while idle, and answers a flush
//! barrier only after every sink flushed what was queued before it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tally_engine::{name, Effect, Timestamp};
use tally_outbound::{Error, Lag, Sink, Tagged};

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
    let (tx, rx) = tally_outbound::queue(16);
    let thread = tally_outbound::spawn(vec![Box::new(sink)], rx, vec![Lag::new("counting")]);
    // Idle for a while: the loop wakes about every flush interval (100 ms), not continuously.
    std::thread::sleep(Duration::from_millis(600));
    let idle_polls = polls.load(Ordering::SeqCst);
    assert!(
        idle_polls < 200,
        "the idle loop polled its sink {idle_polls} times"
    );
    // Effects, then a barrier: when it returns they are durable.
    tx.send((1..=10).map(effect).collect()).unwrap();
    tx.flush().unwrap();
    assert_eq!(written.load(Ordering::SeqCst), 10);
    assert_eq!(durable.load(Ordering::SeqCst), 10);
    drop(tx);
    thread.join().unwrap().unwrap();
}

/// A sink whose writes wait for a permit each.
struct Gated {
    permits: crossbeam_channel::Receiver<()>,
}

impl Sink for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn write(&mut self, _: &Tagged) -> Result<bool, Error> {
        self.permits.recv().map_err(|_| Error("closed".into()))?;
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn unflushed(&self) -> usize {
        0
    }
}

#[test]
fn the_queue_is_bounded_in_effects_not_messages_and_senders_wait_for_room() {
    let (permits_tx, permits) = crossbeam_channel::unbounded();
    let (tx, rx) = tally_outbound::queue(100);
    let thread = tally_outbound::spawn(
        vec![Box::new(Gated { permits })],
        rx,
        vec![Lag::new("gated")],
    );
    // One message larger than the bound fits an empty queue; the thread takes it and waits in
    // its first write, still counting all 150 effects as queued.
    tx.send((1..=150).map(effect).collect()).unwrap();
    assert_eq!(tx.queued(), 150);
    // A single further effect must wait: a bound in messages would have let it in.
    let (sent_tx, sent) = crossbeam_channel::bounded(1);
    let sender = {
        let tx = tx.clone();
        std::thread::spawn(move || {
            tx.send(vec![effect(151)]).unwrap();
            sent_tx.send(()).unwrap();
        })
    };
    assert!(
        sent.recv_timeout(Duration::from_millis(300)).is_err(),
        "a sender passed a full queue"
    );
    // Written, the first message frees its room and the waiting sender gets in.
    for _ in 0..150 {
        permits_tx.send(()).unwrap();
    }
    sent.recv_timeout(Duration::from_secs(10))
        .expect("the sender did not get in once there was room");
    sender.join().unwrap();
    permits_tx.send(()).unwrap();
    tx.flush().unwrap();
    assert_eq!(tx.queued(), 0);
    // When the thread ends (here: its sink fails), waiting senders get an error instead of
    // waiting for ever.
    tx.send((1..=100).map(effect).collect()).unwrap();
    let waiting = {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(vec![effect(1)]))
    };
    drop(permits_tx);
    assert!(thread.join().unwrap().is_err());
    assert!(waiting.join().unwrap().is_err());
    assert!(tx.send(vec![effect(1)]).is_err());
}

#[test]
fn senders_get_in_in_the_order_they_came_so_a_large_message_is_not_starved() {
    let (permits_tx, permits) = crossbeam_channel::unbounded();
    let (tx, rx) = tally_outbound::queue(100);
    let thread = tally_outbound::spawn(
        vec![Box::new(Gated { permits })],
        rx,
        vec![Lag::new("gated")],
    );
    tx.send((1..=60).map(effect).collect()).unwrap();
    let (done_tx, done) = crossbeam_channel::unbounded();
    let sender = |n: u64, name: &'static str| {
        let (tx, done_tx) = (tx.clone(), done_tx.clone());
        std::thread::spawn(move || {
            tx.send((1..=n).map(effect).collect()).unwrap();
            done_tx.send(name).unwrap();
        })
    };
    // A message larger than the bound waits for an empty queue...
    let large = sender(150, "large");
    // Time for it to take its turn and wait (it cannot get in: 60 effects are queued).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tx.queued(), 60);
    // ... and a small one that would fit now waits behind it instead of overtaking it.
    let small = sender(10, "small");
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "a sender got in while the queue was held"
    );
    for _ in 0..60 + 150 + 10 {
        permits_tx.send(()).unwrap();
    }
    let order: Vec<&str> = (0..2)
        .map(|_| done.recv_timeout(Duration::from_secs(10)).unwrap())
        .collect();
    assert_eq!(order, ["large", "small"]);
    large.join().unwrap();
    small.join().unwrap();
    tx.flush().unwrap();
    drop(tx);
    drop(permits_tx);
    thread.join().unwrap().unwrap();
}
