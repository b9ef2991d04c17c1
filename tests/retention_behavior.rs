//! What the embedded broker keeps: records a consumer group has not committed are never
//! removed, however small the topic's retention, so a group that fell behind catches up with
//! nothing lost; a topic nobody reads keeps only its newest records, and a group that comes
//! later reads them from the log start; a table's changelog keeps the latest value of each key,
//! and a restart restores the same table from it.

mod common;

use common::{broker_of, wait_until, wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use rill::transport::{MemoryBroker, TopicPartition};
use std::collections::BTreeMap;
use std::time::Duration;

/// An app reading `events` (one partition, 1 KiB retention) in its own group, recording every
/// value it sees.
fn reader(id: &str, broker: &str, seen: &Recorder<u64>) -> (App, Topic<Bytes, u64>) {
    let app = App::new(id);
    let broker = broker.to_owned();
    app.configure(|s| {
        s.broker = broker;
        s.commit_interval = Duration::from_millis(20);
    });
    let events = app
        .topic("events")
        .value_type::<u64>()
        .partitions(1)
        .retention_bytes(1024);
    let seen = seen.clone();
    app.agent(move |mut values: Stream<u64>| {
        let seen = seen.clone();
        async move {
            while let Some(v) = values.next().await {
                seen.push(v);
            }
        }
    })
    .named("read")
    .channel(&events);
    (app, events)
}

fn committed(broker: &MemoryBroker, group: &str, tp: &TopicPartition) -> i64 {
    broker
        .committed(group)
        .into_iter()
        .find_map(|(t, o)| (t == *tp).then_some(o))
        .unwrap_or(0)
}

async fn wait_committed(broker: &MemoryBroker, group: &str, tp: &TopicPartition, offset: i64) {
    wait_until_state(
        WAIT,
        &format!("group {group} commits {tp} up to {offset}"),
        || committed(broker, group, tp),
        |c| *c == offset,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_fell_behind_catches_up_with_nothing_lost() {
    const FIRST: u64 = 100;
    const ALL: u64 = 3000;
    let url = "memory://retention-slow";
    let broker = MemoryBroker::named("retention-slow");
    let tp = TopicPartition::new("events", 0);

    // The slow group reads the first hundred values, commits them, and stops.
    let slow_seen = Recorder::new();
    let (slow, events) = reader("slow", url, &slow_seen);
    let worker = slow.start().await.expect("start slow");
    // The group must have joined: until then nobody reads the topic, and its 1 KiB is all
    // it keeps.
    assert!(
        common::within(WAIT, "the slow worker to be ready", worker.ready()).await,
        "the worker stopped"
    );
    for v in 0..FIRST {
        events.send(v).await.expect("send");
    }
    wait_until_state(
        WAIT,
        "the slow group reads the first values",
        || {
            (
                slow_seen.snapshot(),
                broker.start_offset("events", 0),
                broker.record_count("events", 0),
            )
        },
        |(seen, _, _)| seen.len() == FIRST as usize,
    )
    .await;
    worker.shutdown().await.expect("stop slow");
    assert_eq!(committed(&broker, "slow", &tp), FIRST as i64);

    // A fast group reads everything else, far past the 1 KiB the topic keeps for nobody.
    // Joining after the slow group's commit let the first hundred go: it starts at the log
    // start, as a Kafka consumer with `auto.offset.reset=earliest` does.
    let fast_seen = Recorder::new();
    let (fast, events) = reader("fast", url, &fast_seen);
    let worker = fast.start().await.expect("start fast");
    assert!(
        common::within(WAIT, "the fast worker to be ready", worker.ready()).await,
        "the worker stopped"
    );
    for v in FIRST..ALL {
        events.send(v).await.expect("send");
    }
    wait_until(WAIT, "the fast group reads every value", || {
        fast_seen.len() == (ALL - FIRST) as usize
    })
    .await;
    assert_eq!(fast_seen.snapshot(), (FIRST..ALL).collect::<Vec<_>>());
    wait_committed(&broker, "fast", &tp, ALL as i64).await;
    // Everything the slow group has not committed is still there.
    assert_eq!(broker.start_offset("events", 0), Some(FIRST as i64));
    assert_eq!(
        broker.record_count("events", 0),
        Some((ALL - FIRST) as usize)
    );
    worker.shutdown().await.expect("stop fast");

    // The slow group comes back and catches up: every value, in order, none twice.
    let caught_up = Recorder::new();
    let (slow, _) = reader("slow", url, &caught_up);
    let worker = slow.start().await.expect("restart slow");
    wait_until(WAIT, "the slow group catches up", || {
        caught_up.len() >= (ALL - FIRST) as usize
    })
    .await;
    let mut all = slow_seen.snapshot();
    all.extend(caught_up.snapshot());
    assert_eq!(all, (0..ALL).collect::<Vec<_>>());
    wait_committed(&broker, "slow", &tp, ALL as i64).await;
    worker.shutdown().await.expect("stop slow");
    // Both groups committed everything: the partition holds nothing, its offsets stay.
    assert_eq!(broker.record_count("events", 0), Some(0));
    assert_eq!(broker.start_offset("events", 0), Some(ALL as i64));
    assert_eq!(broker.end_offset("events", 0), Some(ALL as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_nobody_reads_keeps_its_newest_records_and_a_late_group_reads_them() {
    const SENT: u64 = 5000;
    let url = "memory://retention-unread";
    let producer = App::new("audit-producer");
    producer.configure(|s| s.broker = url.to_owned());
    let audit = producer
        .topic("audit")
        .value_type::<u64>()
        .partitions(1)
        .retention_bytes(16 * 1024);
    let worker = producer.start().await.expect("start producer");
    for v in 0..SENT {
        audit.send(v).await.expect("send");
    }
    worker.shutdown().await.expect("stop producer");

    let broker = broker_of(&producer);
    let start = broker.start_offset("audit", 0).expect("audit exists");
    let held = broker.record_count("audit", 0).expect("audit exists");
    assert!(start > 0, "nothing was removed from an unread topic");
    assert!(held > 0 && held < 1000, "{held} records held in 16 KiB");
    assert_eq!(
        start + held as i64,
        SENT as i64,
        "the newest records are kept"
    );

    // A group that starts now reads from the log start: the newest records, in order.
    let seen = Recorder::new();
    let app = App::new("audit-reader");
    app.configure(|s| s.broker = url.to_owned());
    let audit = app.topic("audit").value_type::<u64>().partitions(1);
    let s = seen.clone();
    app.agent(move |mut values: Stream<u64>| {
        let seen = s.clone();
        async move {
            while let Some(v) = values.next().await {
                seen.push(v);
            }
        }
    })
    .channel(&audit);
    let worker = app.start().await.expect("start reader");
    wait_until(WAIT, "the late group reads what is kept", || {
        seen.len() >= held
    })
    .await;
    worker.shutdown().await.expect("stop reader");
    assert_eq!(seen.snapshot(), (start as u64..SENT).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_topics_are_bounded_by_default() {
    const SENT: u64 = 60_000;
    // Every record counts for more than 100 bytes (its payload and the log's own fields).
    let most = (MemoryBroker::DEFAULT_RETENTION_BYTES / 100) as usize;
    let app = App::new("sink-only");
    let sink = app.topic("sink").value_type::<u64>().partitions(1);
    let worker = app.start().await.expect("start");
    for v in 0..SENT {
        sink.send(v).await.expect("send");
    }
    worker.shutdown().await.expect("stop");
    let broker = app.memory_broker();
    let held = broker.record_count("sink", 0).expect("sink exists");
    assert!(
        held < most,
        "{held} of {SENT} records held with the default retention"
    );
    assert_eq!(
        broker.start_offset("sink", 0).expect("sink exists") + held as i64,
        SENT as i64
    );
}

/// An update of the `latest` table: `value` for `key`, or a delete when `None`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Update {
    key: String,
    value: Option<i64>,
}

/// An app keeping the latest value of each key in a table, from `updates` (keyed by the
/// table's key, so each update reaches the table partition of its key).
fn latest(broker: &str) -> (App, Topic<String, Update>, Table<String, i64>) {
    let app = App::new("latest");
    let broker = broker.to_owned();
    app.configure(|s| {
        s.broker = broker;
        s.topic_partitions = 1;
        s.commit_interval = Duration::from_millis(10);
    });
    let updates = app
        .topic("updates")
        .key_type::<String>()
        .value_type::<Update>();
    let table = app.table::<String, i64>("latest");
    let t = table.clone();
    app.agent(move |mut updates: Stream<Update, String>| {
        let table = t.clone();
        async move {
            while let Some(u) = updates.next().await {
                match u.value {
                    Some(v) => {
                        table.insert(u.key, v);
                    }
                    None => {
                        table.remove(&u.key);
                    }
                }
            }
        }
    })
    .named("keep-latest")
    .channel(&updates);
    (app, updates, table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_changelog_restores_the_same_table() {
    const KEYS: i64 = 50;
    const ROUNDS: i64 = 50;
    const DELETED: i64 = 10;
    let url = "memory://retention-compact";
    let changelog = "latest-latest-changelog";
    let (app, updates, table) = latest(url);
    let worker = app.start().await.expect("start");
    let broker = broker_of(&app);
    let mut expected = BTreeMap::new();
    for round in 0..ROUNDS {
        for k in 0..KEYS {
            let key = format!("k{k}");
            // The last round deletes the first keys.
            let value = (round < ROUNDS - 1 || k >= DELETED).then_some(round * 1000 + k);
            match value {
                Some(v) => expected.insert(key.clone(), v),
                None => expected.remove(&key),
            };
            updates
                .send(Update {
                    key: key.clone(),
                    value,
                })
                .key(key)
                .await
                .expect("send");
        }
        // One changelog record per key and round: the round is committed before the next.
        let written = (round + 1) * KEYS;
        wait_until_state(
            WAIT,
            &format!("round {round} is in the changelog"),
            || broker.end_offset(changelog, 0).unwrap_or(0),
            |end| *end == written,
        )
        .await;
    }
    let items = |t: &Table<String, i64>| t.items().into_iter().collect::<BTreeMap<_, _>>();
    assert_eq!(items(&table), expected);
    worker.shutdown().await.expect("stop");

    let written = (ROUNDS * KEYS) as usize;
    let held = broker.record_count(changelog, 0).expect("changelog exists");
    assert!(
        held < written / 2,
        "the changelog holds {held} of the {written} records written"
    );

    // A new worker on the same broker restores the table from what compaction kept.
    let (app, _, table) = latest(url);
    let worker = app.start().await.expect("restart");
    wait_until_state(
        WAIT,
        "the table is restored",
        || items(&table),
        |t| *t == expected,
    )
    .await;
    assert!(
        common::within(WAIT, "the worker to be ready", worker.ready()).await,
        "the worker stopped"
    );
    assert_eq!(items(&table), expected);
    let replayed = worker.table_records_replayed("latest");
    assert!(
        replayed as usize <= held,
        "replayed {replayed} records, the changelog holds {held}"
    );
    worker.shutdown().await.expect("stop");
}
