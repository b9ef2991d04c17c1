//! `Agent::concurrency(n)`: n actors share the agent's stream, finish events out of order, and
//! every event is still processed exactly once and committed.

mod common;

use common::{assert_committed_to_end, wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Tracks how many events are being processed at once, and the most seen.
#[derive(Debug, Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl InFlight {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

// Virtual time: the delays are exact, so the finishing order is known.
#[tokio::test(start_paused = true)]
async fn four_actors_finish_out_of_order_and_see_each_event_once() -> anyhow::Result<()> {
    const EVENTS: u64 = 40;

    let app = App::new("concurrency-order");
    let topic = app.topic("work").partitions(1).value_type::<u64>();
    let done: Recorder<u64> = Recorder::new();
    let in_flight = Arc::new(InFlight::default());
    let (rec, gauge) = (done.clone(), in_flight.clone());
    app.agent(move |mut s: Stream<u64>| {
        let (rec, gauge) = (rec.clone(), gauge.clone());
        async move {
            while let Some(n) = s.next().await {
                gauge.enter();
                // Earlier events take longer: 40 ms, 39 ms, ...
                tokio::time::sleep(Duration::from_millis(EVENTS - n)).await;
                gauge.leave();
                rec.push(n);
            }
        }
    })
    .named("worker")
    .concurrency(4)
    .channel(&topic);

    let worker = app.start().await?;
    for n in 0..EVENTS {
        topic.send(n).await?;
    }
    wait_until_state(
        WAIT,
        "every event was processed",
        || done.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;

    let done = done.snapshot();
    let sent: Vec<u64> = (0..EVENTS).collect();
    assert_ne!(
        done, sent,
        "4 actors with shrinking delays finished in send order"
    );
    assert_eq!(
        done[..4],
        [3, 2, 1, 0],
        "the first four events, taken at once by four actors, finish shortest delay first"
    );
    assert_eq!(
        in_flight.max.load(Ordering::SeqCst),
        4,
        "concurrency(4) should run exactly four events at once"
    );
    assert_eq!(done.len(), EVENTS as usize, "an event was processed twice");
    let unique: BTreeSet<u64> = done.iter().copied().collect();
    assert_eq!(unique, sent.into_iter().collect(), "an event was lost");
    assert_committed_to_end(&app, "work");
    Ok(())
}

// Real time on two threads, events over 8 partitions, delays varying per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_actors_process_every_event_exactly_once_and_commit_all() -> anyhow::Result<()> {
    const EVENTS: u64 = 600;

    let app = App::new("concurrency-exactly-once");
    let topic = app.topic("jobs").partitions(8).value_type::<u64>();
    let done: Recorder<u64> = Recorder::new();
    let in_flight = Arc::new(InFlight::default());
    let (rec, gauge) = (done.clone(), in_flight.clone());
    app.agent(move |mut s: Stream<u64>| {
        let (rec, gauge) = (rec.clone(), gauge.clone());
        async move {
            while let Some(n) = s.next().await {
                gauge.enter();
                if n % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(n % 5)).await;
                } else {
                    for _ in 0..n % 7 {
                        tokio::task::yield_now().await;
                    }
                }
                gauge.leave();
                rec.push(n);
            }
        }
    })
    .named("jobs")
    .concurrency(4)
    .channel(&topic);

    let worker = app.start().await?;
    for n in 0..EVENTS {
        topic.send(n).await?;
    }
    wait_until_state(
        WAIT,
        "every job was processed",
        || done.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;

    let mut done = done.snapshot();
    assert_eq!(done.len(), EVENTS as usize, "a job was processed twice");
    done.sort_unstable();
    assert_eq!(done, (0..EVENTS).collect::<Vec<_>>(), "a job was lost");
    assert!(
        in_flight.max.load(Ordering::SeqCst) <= 4,
        "more than four jobs ran at once"
    );
    // Actors ack out of order; the commit still reaches the end of every partition.
    assert_committed_to_end(&app, "jobs");
    Ok(())
}
