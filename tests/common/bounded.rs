//! A million events through a topic-reading agent in bounded memory: the body of the
//! bounded-memory tests of the embedded transports (`memory://` and `file://`), each in a test
//! binary of its own, so that the resident memory it measures is that agent's and no other
//! test's.

use super::{wait_until_state, WAIT};
use rill::prelude::*;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub(crate) const EVENTS: u64 = 1_000_000;
/// Events processed before the first reading of resident memory: queues, buffers and the
/// allocator's arenas have grown to their working size by then.
const WARM_UP: u64 = 100_000;
/// Most events sent and not yet processed: the test measures what the broker keeps, not how
/// far a producer that never waits can run ahead of the agent.
const IN_FLIGHT: u64 = 20_000;
/// The bound on growth after the warm-up, in KiB.
const MAX_GROWTH_KIB: u64 = 20 * 1024;
/// Partitions of the topic.
pub(crate) const PARTITIONS: u32 = 4;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            yield value.a + value.b;
        }
    }
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Sent, processed: the test's progress, printed when a wait times out.
fn progress(sent: u64, processed: &AtomicU64) -> (u64, u64) {
    (sent, processed.load(Ordering::Relaxed))
}

/// Sends [`EVENTS`] keyed events to the topic `adding` of `app` (already configured with its
/// broker), `at_once` sends awaited together, while the adding agent reads them; checks every
/// event was processed once, that `held` (the records the broker still holds of the topic)
/// drops to 0 once the group has committed everything, and that resident memory grew by less
/// than 20 MB after the warm-up.
pub(crate) async fn a_million_events_through_an_agent(
    app: &App,
    at_once: u64,
    held: impl Fn() -> usize,
) {
    app.configure(|s| {
        // Default commits: every 2.8 s, or every 10,000 records read on the embedded
        // transports.
        s.topic_partitions = PARTITIONS;
    });
    let topic = app.topic("adding").value_type::<Add>();
    let processed = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicI64::new(0));
    let (n, total) = (processed.clone(), sum.clone());
    app.agent(adding).channel(&topic).sink(move |v: i64| {
        total.fetch_add(v, Ordering::Relaxed);
        n.fetch_add(1, Ordering::Relaxed);
    });
    let worker = app.start().await.expect("start");
    assert!(
        super::within(WAIT, "the worker to be ready", worker.ready()).await,
        "the worker stopped"
    );

    let started = Instant::now();
    let mut before = None;
    for first in (0..EVENTS).step_by(at_once as usize) {
        let topic = &topic;
        let sends = (first..first + at_once).map(|i| async move {
            topic
                .send(Add { a: i as i64, b: 1 })
                .key(Bytes::from(format!("k{}", i % 1000)))
                .await
        });
        for sent in futures::future::join_all(sends).await {
            sent.expect("send");
        }
        let sent = first + at_once;
        if sent % 1000 == 0 && sent - processed.load(Ordering::Relaxed) > IN_FLIGHT {
            wait_until_state(
                WAIT,
                "the agent keeps up",
                || progress(sent, &processed),
                |(sent, done)| sent - done <= IN_FLIGHT,
            )
            .await;
        }
        if before.is_none() && processed.load(Ordering::Relaxed) >= WARM_UP {
            before = Some(rss_kib());
        }
    }
    wait_until_state(
        WAIT,
        "the agent processes every event",
        || progress(EVENTS, &processed),
        |(_, done)| *done == EVENTS,
    )
    .await;
    let elapsed = started.elapsed();
    // Every event was processed once, with its value.
    let expected: i64 = (0..EVENTS as i64).map(|i| i + 1).sum();
    assert_eq!(sum.load(Ordering::Relaxed), expected);
    // Once the group has committed everything, the broker holds nothing of the topic.
    wait_until_state(
        WAIT,
        "the group commits every event and the broker lets them go",
        &held,
        |held| *held == 0,
    )
    .await;
    let after = rss_kib();
    worker.shutdown().await.expect("stop");

    let before = before.expect("warm-up reached");
    let growth = after.saturating_sub(before);
    println!(
        "{EVENTS} events in {:.1} s ({:.0} events/s); VmRSS after warm-up {before} KiB, \
         at the end {after} KiB, growth {growth} KiB",
        elapsed.as_secs_f64(),
        EVENTS as f64 / elapsed.as_secs_f64()
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "resident memory grew by {growth} KiB (from {before} to {after}) over {EVENTS} events"
    );
}
