//! Partitioning on the embedded transport: keyed records keep their order per key and land
//! where Kafka's Java client would put them; records without a key are spread round-robin.

mod common;

use common::{
    assert_committed_to_end, java_murmur2, kafka_partition, wait_until_state, Recorder, WAIT,
};
use rill::prelude::*;
use rill::{Bytes, Error, TransportError};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ev {
    key: String,
    seq: u32,
}

#[test]
fn murmur2_helper_matches_java_reference_vectors() {
    // Known outputs of Kafka's `Utils.murmur2`, so the expectations below are Kafka's.
    assert_eq!(java_murmur2(b"21"), -973932308);
    assert_eq!(java_murmur2(b"foobar"), -790332482);
    assert_eq!(java_murmur2(b"a-little-bit-long-string"), -985981536);
    assert_eq!(java_murmur2(b"a-little-bit-longer-string"), -1486304829);
    assert_eq!(
        java_murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
        -58897971
    );
    assert_eq!(java_murmur2(b"abc"), 479470107);
    // toPositive(-790332482) % 8
    assert_eq!(kafka_partition(b"foobar", 8), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sends_keep_per_key_order_in_one_partition_nothing_lost_or_duplicated(
) -> anyhow::Result<()> {
    const KEYS: u32 = 50;
    const EVENTS: u32 = 2000;

    let app = App::new("partition-order");
    let topic = app.topic("events").partitions(8).value_type::<Ev>();
    let seen: Recorder<(String, u32, u32)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |stream: Stream<Ev>| {
        let rec = rec.clone();
        async move {
            let mut events = stream.events();
            while let Some(event) = events.next().await {
                rec.push((event.value.key.clone(), event.value.seq, event.partition()));
            }
        }
    })
    .named("recorder")
    .channel(&topic);

    let worker = app.start().await?;
    let mut next_seq: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..EVENTS {
        let key = format!("key-{}", (i * 7919) % KEYS);
        let seq = next_seq.entry(key.clone()).or_default();
        let ev = Ev {
            key: key.clone(),
            seq: *seq,
        };
        *seq += 1;
        let pos = topic
            .send(ev)
            .key(Bytes::from(key.clone().into_bytes()))
            .await?;
        assert_eq!(
            pos.partition,
            kafka_partition(key.as_bytes(), 8),
            "send of {key:?} went to the wrong partition"
        );
    }
    wait_until_state(
        WAIT,
        "the agent saw every event",
        || seen.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;

    let seen = seen.snapshot();
    assert_eq!(
        seen.len(),
        EVENTS as usize,
        "events processed more than once"
    );
    let mut per_key: BTreeMap<String, (Vec<u32>, BTreeSet<u32>)> = BTreeMap::new();
    for (key, seq, partition) in &seen {
        let entry = per_key.entry(key.clone()).or_default();
        entry.0.push(*seq);
        entry.1.insert(*partition);
    }
    assert_eq!(per_key.len(), KEYS as usize);
    for (key, (seqs, partitions)) in &per_key {
        let expected: Vec<u32> = (0..next_seq[key]).collect();
        assert_eq!(
            seqs, &expected,
            "events of {key:?} out of order, lost or duplicated"
        );
        let want = kafka_partition(key.as_bytes(), 8);
        assert_eq!(
            partitions,
            &BTreeSet::from([want]),
            "events of {key:?} were read from more than one partition, or not from Kafka's"
        );
    }
    let total: i64 = common::end_offsets(&app, "events").iter().sum();
    assert_eq!(total, i64::from(EVENTS));
    assert_committed_to_end(&app, "events");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_partition_is_the_one_kafkas_java_client_picks() -> anyhow::Result<()> {
    let app = App::new("partition-java");
    let topic = app.topic("keyed").partitions(8).value_type::<u32>();
    let worker = app.start().await?;

    // "foobar": murmur2 = -790332482, toPositive(..) % 8 = 6.
    let pos = topic.send(1).key(Bytes::from_static(b"foobar")).await?;
    assert_eq!(pos.partition, 6);
    let keys: [&[u8]; 6] = [
        b"21",
        b"abc",
        b"a-little-bit-long-string",
        b"a-little-bit-longer-string",
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
        b"",
    ];
    for key in keys {
        let pos = topic.send(2).key(Bytes::copy_from_slice(key)).await?;
        assert_eq!(
            pos.partition,
            kafka_partition(key, 8),
            "key {:?}",
            String::from_utf8_lossy(key)
        );
        let stored = app
            .memory_broker()
            .read("keyed", pos.partition, pos.offset, 1);
        assert_eq!(stored.len(), 1, "record not where the send said it went");
        assert_eq!(stored[0].key.as_deref(), Some(key));
    }

    // The same key with another partition count follows the same formula.
    let three = app.topic("keyed-3").partitions(3).value_type::<u32>();
    let pos = three.send(3).key(Bytes::from_static(b"foobar")).await?;
    assert_eq!(pos.partition, kafka_partition(b"foobar", 3));

    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_sends_spread_evenly_round_robin() -> anyhow::Result<()> {
    const PARTITIONS: u32 = 8;
    const PER_PARTITION: u32 = 25;

    let app = App::new("partition-round-robin");
    let topic = app
        .topic("spread")
        .partitions(PARTITIONS)
        .value_type::<u32>();
    let worker = app.start().await?;
    for v in 0..PARTITIONS * PER_PARTITION {
        topic.send(v).await?;
    }
    worker.shutdown().await?;

    assert_eq!(
        common::end_offsets(&app, "spread"),
        vec![i64::from(PER_PARTITION); PARTITIONS as usize],
        "unkeyed records are not spread evenly"
    );
    let mut values: Vec<u32> = common::read_all(&app, "spread")
        .iter()
        .map(|m| serde_json::from_slice(m.value.as_deref().unwrap_or_default()).unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..PARTITIONS * PER_PARTITION).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_partition_wins_over_key_and_must_exist() -> anyhow::Result<()> {
    let app = App::new("partition-explicit");
    let topic = app.topic("explicit").partitions(4).value_type::<u32>();
    let worker = app.start().await?;

    let key = Bytes::from_static(b"foobar");
    let natural = kafka_partition(&key, 4);
    let other = (natural + 1) % 4;
    let pos = topic.send(1).key(key.clone()).partition(other).await?;
    assert_eq!(pos.partition, other);
    assert_eq!(app.memory_broker().end_offset("explicit", other), Some(1));

    let err = topic.send(2).partition(4).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Transport(TransportError::UnknownPartition {
                partition: 4,
                partitions: 4,
                ..
            })
        ),
        "unexpected error: {err:?}"
    );
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_can_be_read_back_from_any_offset_to_its_end() -> anyhow::Result<()> {
    let app = App::new("partition-read");
    let topic = app.topic("log").partitions(1).value_type::<u32>();
    let worker = app.start().await?;
    for v in 0..5 {
        topic.send(v).await?;
    }
    worker.shutdown().await?;

    let broker = app.memory_broker();
    let offsets = |from: i64, max: usize| -> Vec<i64> {
        broker
            .read("log", 0, from, max)
            .iter()
            .map(|m| m.offset)
            .collect()
    };
    assert_eq!(offsets(0, usize::MAX), vec![0, 1, 2, 3, 4]);
    assert_eq!(offsets(3, 1), vec![3]);
    assert_eq!(offsets(5, 10), Vec::<i64>::new());
    assert_eq!(
        offsets(2, usize::MAX),
        vec![2, 3, 4],
        "no limit: read to the end"
    );
    Ok(())
}
