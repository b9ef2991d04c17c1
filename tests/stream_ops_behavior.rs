//! Stream operators: `filter`, `map`, `enumerate`, `items`, `events`, `take`, `through` and
//! `echo`, as an agent sees their output.

mod common;

use common::{
    assert_committed_to_end, kafka_partition, read_all, wait_until_state, Recorder, WAIT,
};
use rill::prelude::*;
use rill::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn decode<T: serde::de::DeserializeOwned>(bytes: Option<&Bytes>) -> T {
    serde_json::from_slice(bytes.map(|b| b.as_ref()).unwrap_or_default()).expect("valid JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_map_and_enumerate_transform_values_in_order() -> anyhow::Result<()> {
    let app = App::new("ops-filter-map");
    let topic = app.topic("numbers").partitions(1).value_type::<u64>();
    let filtered: Recorder<u64> = Recorder::new();
    let numbered: Recorder<(usize, String)> = Recorder::new();

    let rec = filtered.clone();
    app.agent(move |s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            let mut s = s.filter(|v| v % 3 != 0);
            while let Some(v) = s.next().await {
                rec.push(v);
            }
        }
    })
    .named("filter")
    .channel(&topic);

    let rec = numbered.clone();
    app.agent(move |s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            let mut s = s
                .filter(|v| v % 2 == 0)
                .map(|v| format!("#{v}"))
                .enumerate();
            while let Some(pair) = s.next().await {
                rec.push(pair);
            }
        }
    })
    .named("map-enumerate")
    .channel(&topic);

    let worker = app.start().await?;
    for v in 0..60 {
        topic.send(v).await?;
    }
    wait_until_state(
        WAIT,
        "both agents reached the last value",
        || {
            (
                filtered.snapshot().last().copied(),
                numbered.snapshot().last().cloned(),
            )
        },
        |(f, n)| *f == Some(59) && n.as_ref().map(|(_, v)| v.as_str()) == Some("#58"),
    )
    .await;
    worker.shutdown().await?;

    assert_eq!(
        filtered.snapshot(),
        (0..60).filter(|v| v % 3 != 0).collect::<Vec<_>>()
    );
    assert_eq!(
        numbered.snapshot(),
        (0..60)
            .filter(|v| v % 2 == 0)
            .enumerate()
            .map(|(i, v)| (i, format!("#{v}")))
            .collect::<Vec<_>>()
    );
    // Dropped values count as processed.
    assert_committed_to_end(&app, "numbers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_gives_typed_keys_with_their_values() -> anyhow::Result<()> {
    let app = App::new("ops-items");
    let topic = app
        .topic("scores")
        .partitions(1)
        .key_type::<String>()
        .value_type::<u32>();
    let seen: Recorder<(Option<String>, u32)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<u32, String>| {
        let rec = rec.clone();
        async move {
            let mut items = s.items();
            while let Some(item) = items.next().await {
                rec.push(item);
            }
        }
    })
    .named("scores")
    .channel(&topic);

    let worker = app.start().await?;
    topic.send(10).key("alice".to_owned()).await?;
    topic.send(20).key("bob".to_owned()).await?;
    topic.send(30).await?;
    topic.send(40).key("alice".to_owned()).await?;
    wait_until_state(WAIT, "four items", || seen.len(), |n| *n >= 4).await;
    worker.shutdown().await?;

    assert_eq!(
        seen.snapshot(),
        vec![
            (Some("alice".to_owned()), 10),
            (Some("bob".to_owned()), 20),
            (None, 30),
            (Some("alice".to_owned()), 40),
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_topic_partition_offset_timestamp_key_and_headers() -> anyhow::Result<()> {
    let app = App::new("ops-events");
    let topic = app.topic("orders").partitions(4).value_type::<u32>();
    let seen: Recorder<Event<u32>> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<u32>| {
        let rec = rec.clone();
        async move {
            let mut events = s.events();
            while let Some(event) = events.next().await {
                rec.push(event);
            }
        }
    })
    .named("orders")
    .channel(&topic);

    let worker = app.start().await?;
    let before = now_millis();
    let first = topic
        .send(7)
        .key(Bytes::from_static(b"order-7"))
        .partition(2)
        .header("trace-id", "abc")
        .header("source", Bytes::from_static(b"test"))
        .await?;
    let second = topic.send(8).partition(2).await?;
    let after = now_millis();
    wait_until_state(WAIT, "two events", || seen.len(), |n| *n >= 2).await;
    worker.shutdown().await?;

    let seen = seen.snapshot();
    assert_eq!(seen.len(), 2);
    let (e7, e8) = (&seen[0], &seen[1]);
    assert_eq!(e7.value, 7);
    assert_eq!(e7.topic(), "orders");
    assert_eq!(e7.partition(), 2);
    assert_eq!(e7.offset(), first.offset);
    assert_eq!(e8.offset(), second.offset);
    assert_eq!(e8.offset(), e7.offset() + 1);
    assert!(
        (before..=after).contains(&e7.timestamp()),
        "timestamp {} not within the send ({before}..={after})",
        e7.timestamp()
    );
    assert_eq!(e7.key().map(|k| k.as_ref()), Some(&b"order-7"[..]));
    assert_eq!(
        e7.headers(),
        &[
            ("trace-id".to_owned(), Bytes::from_static(b"abc")),
            ("source".to_owned(), Bytes::from_static(b"test")),
        ]
    );
    assert_eq!(e8.value, 8);
    assert_eq!(e8.key(), None);
    assert!(e8.headers().is_empty());
    Ok(())
}

// Virtual time: `within` is measured on the paused clock.
#[tokio::test(start_paused = true)]
async fn take_batches_up_to_n_values_or_what_arrived_within_the_window() -> anyhow::Result<()> {
    let within = Duration::from_millis(100);
    let app = App::new("ops-take");
    let topic = app.topic("ticks").partitions(1).value_type::<u32>();
    let batches: Recorder<(Vec<u32>, tokio::time::Instant)> = Recorder::new();
    let rec = batches.clone();
    app.agent(move |s: Stream<u32>| {
        let rec = rec.clone();
        async move {
            let mut s = s.take(3, within);
            while let Some(batch) = s.next().await {
                rec.push((batch, tokio::time::Instant::now()));
            }
        }
    })
    .named("ticks")
    .channel(&topic);

    let worker = app.start().await?;
    // Seven at once: two full batches at once, then the last value alone after `within`.
    let t0 = tokio::time::Instant::now();
    for v in 0..7 {
        topic.send(v).await?;
    }
    wait_until_state(WAIT, "three batches", || batches.len(), |n| *n >= 3).await;
    let got = batches.snapshot();
    let values: Vec<Vec<u32>> = got.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(values, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    assert!(got[0].1 - t0 < within, "a full batch waited for the window");
    assert!(got[1].1 - t0 < within, "a full batch waited for the window");
    let partial = got[2].1 - t0;
    assert!(
        partial >= within && partial < within * 2,
        "the partial batch came after {partial:?}, not after the {within:?} window"
    );

    // The window starts at a batch's first value: 20 and 21 arrive 60 ms apart and share a
    // batch; 22 arrives after that batch's window closed and starts the next one.
    let t1 = tokio::time::Instant::now();
    topic.send(20).await?;
    tokio::time::sleep(Duration::from_millis(60)).await;
    topic.send(21).await?;
    wait_until_state(WAIT, "the fourth batch", || batches.len(), |n| *n >= 4).await;
    let fourth = batches.snapshot()[3].clone();
    assert_eq!(fourth.0, vec![20, 21]);
    let waited = fourth.1 - t1;
    assert!(
        waited >= within && waited < within + Duration::from_millis(60),
        "the batch closed after {waited:?}; the window runs from its first value"
    );
    topic.send(22).await?;
    wait_until_state(WAIT, "the fifth batch", || batches.len(), |n| *n >= 5).await;
    assert_eq!(batches.snapshot()[4].0, vec![22]);

    worker.shutdown().await?;
    assert_eq!(batches.len(), 5, "no batch after the last value");
    assert_committed_to_end(&app, "ticks");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sends_every_value_on_and_reads_it_back_with_the_new_partitioning(
) -> anyhow::Result<()> {
    const EVENTS: u32 = 300;
    let app = App::new("ops-through");
    let source = app.topic("raw").partitions(8).value_type::<(String, u32)>();
    let middle = app
        .topic("cleaned")
        .partitions(3)
        .value_type::<(String, u32)>();
    // (key, seq, topic read from, partition read from, message key)
    let seen: Recorder<(String, u32, String, u32, Option<Bytes>)> = Recorder::new();
    let rec = seen.clone();
    let to = middle.clone();
    app.agent(move |s: Stream<(String, u32)>| {
        let (rec, to) = (rec.clone(), to.clone());
        async move {
            let mut s = s.through(&to);
            while let Some((key, seq)) = s.next().await {
                let m = s.current_event().expect("a value comes with its event");
                rec.push((key, seq, m.topic.to_string(), m.partition, m.key.clone()));
            }
        }
    })
    .named("cleaner")
    .channel(&source);

    let worker = app.start().await?;
    let mut next: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..EVENTS {
        let key = format!("user-{}", i % 17);
        let seq = next.entry(key.clone()).or_default();
        source
            .send((key.clone(), *seq))
            .key(Bytes::from(key.into_bytes()))
            .await?;
        *seq += 1;
    }
    wait_until_state(
        WAIT,
        "every value came back through",
        || seen.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;

    let seen = seen.snapshot();
    assert_eq!(seen.len(), EVENTS as usize, "a value came through twice");
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (key, seq, topic, partition, msg_key) in &seen {
        assert_eq!(
            topic, "cleaned",
            "value not read back from the through topic"
        );
        assert_eq!(
            msg_key.as_deref(),
            Some(key.as_bytes()),
            "the key was not kept"
        );
        assert_eq!(*partition, kafka_partition(key.as_bytes(), 3));
        per_key.entry(key.clone()).or_default().push(*seq);
    }
    for (key, seqs) in &per_key {
        assert_eq!(seqs, &(0..next[key]).collect::<Vec<_>>(), "order of {key}");
    }
    assert_eq!(
        common::end_offsets(&app, "cleaned").iter().sum::<i64>(),
        i64::from(EVENTS)
    );
    assert_committed_to_end(&app, "raw");
    assert_committed_to_end(&app, "cleaned");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_copies_every_value_to_each_topic_and_passes_it_on() -> anyhow::Result<()> {
    const EVENTS: u32 = 100;
    let app = App::new("ops-echo");
    let source = app.topic("in").partitions(1).value_type::<u32>();
    let copy_a = app.topic("copy-a").partitions(1).value_type::<u32>();
    let copy_b = app.topic("copy-b").partitions(2).value_type::<u32>();
    let seen: Recorder<u32> = Recorder::new();
    let (rec, a, b) = (seen.clone(), copy_a.clone(), copy_b.clone());
    app.agent(move |s: Stream<u32>| {
        let (rec, a, b) = (rec.clone(), a.clone(), b.clone());
        async move {
            let mut s = s.echo(&[&a, &b]);
            while let Some(v) = s.next().await {
                rec.push(v);
            }
        }
    })
    .named("echo")
    .channel(&source);

    let worker = app.start().await?;
    for v in 0..EVENTS {
        source
            .send(v)
            .key(Bytes::from(format!("k{}", v % 5).into_bytes()))
            .await?;
    }
    wait_until_state(
        WAIT,
        "every value passed on",
        || seen.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;

    assert_eq!(
        seen.snapshot(),
        (0..EVENTS).collect::<Vec<_>>(),
        "echo changed the stream"
    );
    let a: Vec<(u32, Option<Bytes>)> = read_all(&app, "copy-a")
        .iter()
        .map(|m| (decode(m.value.as_ref()), m.key.clone()))
        .collect();
    let expected: Vec<(u32, Option<Bytes>)> = (0..EVENTS)
        .map(|v| (v, Some(Bytes::from(format!("k{}", v % 5).into_bytes()))))
        .collect();
    assert_eq!(
        a, expected,
        "copy-a: every value once, in order, with its key"
    );
    let b: BTreeSet<(u32, Option<Bytes>)> = read_all(&app, "copy-b")
        .iter()
        .map(|m| (decode(m.value.as_ref()), m.key.clone()))
        .collect();
    assert_eq!(
        b,
        expected.iter().cloned().collect(),
        "copy-b: every value, with its key"
    );
    assert_eq!(
        common::end_offsets(&app, "copy-b").iter().sum::<i64>(),
        i64::from(EVENTS)
    );
    assert_committed_to_end(&app, "in");
    Ok(())
}
