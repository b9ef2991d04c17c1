//! Consumer groups on the embedded transport: workers of one app (same id, one shared
//! `memory://NAME` broker) divide the partitions between them, and a worker joining or leaving
//! moves partitions without any event being processed twice.

mod common;

use common::{wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const PARTITIONS: u32 = 8;
const KEYS: u64 = 40;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    key: u64,
    seq: u64,
}

/// (worker, key, seq, partition) for every event a worker processed.
type Seen = Recorder<(&'static str, u64, u64, u32)>;

fn worker_app(broker: &str, name: &'static str, seen: &Seen) -> (App, Topic<Bytes, Numbered>) {
    let app = App::new("group-app");
    app.configure(|s| s.broker = broker.to_owned());
    let topic = app
        .topic("numbers")
        .value_type::<Numbered>()
        .partitions(PARTITIONS);
    let seen = seen.clone();
    app.agent(move |mut stream: Stream<Numbered>| {
        let seen = seen.clone();
        async move {
            while let Some(n) = stream.next().await {
                // Slow enough that a worker holds a backlog when the group changes.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let partition = stream
                    .current_event()
                    .map(|m| m.partition)
                    .unwrap_or(u32::MAX);
                seen.push((name, n.key, n.seq, partition));
            }
        }
    })
    .named("count")
    .channel(&topic);
    (app, topic)
}

async fn send(topic: &Topic<Bytes, Numbered>, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        let key = seq % KEYS;
        topic
            .send(Numbered { key, seq })
            .key(Bytes::from(key.to_string()))
            .await
            .expect("send");
    }
}

async fn wait_for(seen: &Seen, count: usize) {
    wait_until_state(
        WAIT,
        &format!("{count} events are processed"),
        || seen.len(),
        |n| *n >= count,
    )
    .await;
}

/// Nothing lost, nothing twice, each key's events in order.
fn check_exactly_once(seen: &Seen, sent: u64) {
    let events = seen.snapshot();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for (worker, key, seq, _) in &events {
        *counts.entry(*seq).or_default() += 1;
        if let Some(prev) = last.insert(*key, *seq) {
            assert!(
                prev < *seq,
                "key {key}: seq {seq} after {prev} (on {worker})"
            );
        }
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "processed twice: {duplicated:?}");
    let missing: Vec<_> = (0..sent).filter(|s| !counts.contains_key(s)).collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
}

fn partitions_of(seen: &[(&'static str, u64, u64, u32)], worker: &str) -> BTreeSet<u32> {
    seen.iter().filter(|e| e.0 == worker).map(|e| e.3).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_partitions_and_hand_them_over_without_duplicates() {
    let broker = "memory://group-behavior-share";
    let seen = Seen::new();
    let (a, topic_a) = worker_app(broker, "a", &seen);
    let worker_a = a.start().await.expect("start a");
    send(&topic_a, 0..400).await;
    wait_for(&seen, 400).await;
    assert_eq!(
        partitions_of(&seen.snapshot(), "a").len(),
        PARTITIONS as usize
    );

    // A second worker joins while the first holds a backlog: the partitions are divided,
    // none is read by both, and the backlog of moved partitions is finished and committed by
    // the first worker before the second reads them.
    let before = seen.len();
    send(&topic_a, 400..2400).await;
    let (b, _) = worker_app(broker, "b", &seen);
    let worker_b = b.start().await.expect("start b");
    send(&topic_a, 2400..3400).await;
    wait_for(&seen, 3400).await;
    let after_join = seen.snapshot().split_off(before);
    let on_a = partitions_of(&after_join, "a");
    let on_b = partitions_of(&after_join, "b");
    assert!(!on_b.is_empty(), "the joining worker got no partition");
    assert!(!on_a.is_empty(), "the first worker kept no partition");
    // Each moved partition was handed over once: everything the first worker processed of it
    // comes before everything the second did.
    for p in on_a.intersection(&on_b) {
        let last_a = after_join
            .iter()
            .filter(|e| e.0 == "a" && e.3 == *p)
            .map(|e| e.2)
            .max();
        let first_b = after_join
            .iter()
            .filter(|e| e.0 == "b" && e.3 == *p)
            .map(|e| e.2)
            .min();
        assert!(
            last_a < first_b,
            "partition {p}: worker a processed seq {last_a:?} after worker b started at {first_b:?}"
        );
    }
    check_exactly_once(&seen, 3400);

    // The first worker stops gracefully: the second takes everything over, nothing twice.
    worker_a.shutdown().await.expect("stop a");
    let before = seen.len();
    send_via(&b, 3400..4200).await;
    wait_for(&seen, 4200).await;
    let tail = seen.snapshot().split_off(before);
    assert!(
        tail.iter().all(|e| e.0 == "b"),
        "a stopped worker processed events"
    );
    assert_eq!(partitions_of(&tail, "b").len(), PARTITIONS as usize);
    check_exactly_once(&seen, 4200);
    worker_b.shutdown().await.expect("stop b");
}

/// Sends through a running app's own topic handle.
async fn send_via(app: &App, seqs: std::ops::Range<u64>) {
    let topic = app
        .topic("numbers")
        .value_type::<Numbered>()
        .partitions(PARTITIONS);
    send(&topic, seqs).await;
}
