//! What a commit covers: nothing is committed that is not durable.
//!
//! - A table change or a sink record the broker refuses for good (larger than it accepts)
//!   stops the worker with an error naming it, before anything after it is committed: after a
//!   restart with the cause fixed, nothing is missing (librdkafka's mock cluster).
//! - A commit never takes the table changes of an event without its offset: it waits, behind
//!   a barrier, for the agents to finish the events they are in the middle of.
//! - A full agent queue does not hold commits back: the dispatcher pauses reading instead of
//!   waiting on the queue, and a revocation while records wait for the queue loses nothing.

mod common;

use common::{wait_until, Recorder, WAIT};
use rdkafka::mocking::MockCluster;
use rill::prelude::*;
use rill::transport::TopicPartition;
use rill::Worker;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bound for waits that include joining a consumer group on the mock cluster.
const KAFKA_WAIT: Duration = Duration::from_secs(90);

/// An input event: `id` numbers the events, `size` is the length of the text it makes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sized {
    id: u64,
    size: usize,
}

/// Larger than the 1,000,000 bytes librdkafka's producer accepts by default.
const TOO_LARGE: usize = 1_200_000;

/// 51 events for partition 0: ids 0..=50, all small but id 25.
fn events() -> Vec<Sized> {
    (0..=50)
        .map(|id| Sized {
            id,
            size: if id == 25 { TOO_LARGE } else { 10 },
        })
        .collect()
}

fn mock_cluster(
    topics: &[(&str, i32)],
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for (topic, partitions) in topics {
        cluster
            .create_topic(topic, *partitions, 1)
            .expect("create topic");
    }
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    (cluster, url)
}

/// The events' app: texts of each event's size, capped at `cap` bytes (the fix a user makes
/// after the worker stopped), into a table (`texts`) or to a sink topic (`out`).
struct Sizes {
    app: App,
    input: Topic<u64, Sized>,
    texts: Table<u64, String>,
}

fn sizes(id: &str, url: &str, cap: usize, to_table: bool) -> Sizes {
    let app = App::new(id);
    let url = url.to_owned();
    app.configure(|s| {
        s.broker = url;
        s.topic_partitions = 1;
        // Every event is processed before the first commit.
        s.commit_interval = Duration::from_secs(2);
        s.kafka.insert("session.timeout.ms".into(), "6000".into());
    });
    let input = app.topic("sizes").key_type::<u64>().value_type::<Sized>();
    let out = app.topic("texts-out").value_type::<String>();
    let texts = app.table::<u64, String>("texts");
    let table = texts.clone();
    let agent = app.agent(move |mut events: Stream<Sized, u64>| {
        let texts = table.clone();
        stream! {
            while let Some(e) = events.next().await {
                let text = format!("{}:{}", e.id, "x".repeat(e.size.min(cap)));
                if to_table {
                    texts.insert(e.id, text);
                } else {
                    yield text;
                }
            }
        }
    });
    agent.named("texts").channel(&input).sink(&out);
    Sizes { app, input, texts }
}

async fn send_events(s: &Sizes) {
    for e in events() {
        s.input
            .send(e.clone())
            .key(e.id)
            .partition(0)
            .await
            .expect("send");
    }
}

/// Waits until the worker stops by itself, and returns why.
async fn stopped_fatally(worker: &Worker) -> String {
    common::within(KAFKA_WAIT, "the worker to stop", worker.stopped()).await;
    worker
        .fatal_error()
        .expect("the worker says why it stopped")
}

async fn committed(app: &App, topic: &str) -> i64 {
    let committed: BTreeMap<TopicPartition, i64> = app
        .committed_offsets()
        .await
        .expect("committed offsets")
        .into_iter()
        .collect();
    committed
        .get(&TopicPartition::new(topic, 0))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_value_the_changelog_refuses_stops_the_worker_and_loses_no_other_change() {
    let id = "refused-change";
    let (_cluster, url) = mock_cluster(&[
        ("sizes", 1),
        ("texts-out", 1),
        ("refused-change-texts-changelog", 1),
        ("refused-change-workers", 1),
    ]);
    let s = sizes(id, &url, usize::MAX, true);
    let worker = s.app.start().await.expect("start");
    send_events(&s).await;
    let why = stopped_fatally(&worker).await;
    assert!(why.contains("texts"), "names the table: {why}");
    assert!(why.to_lowercase().contains("too large"), "says why: {why}");
    worker.shutdown().await.expect("stop");
    assert_eq!(
        committed(&s.app, "sizes").await,
        0,
        "nothing is committed: the changes of the first commit never reached the changelog"
    );

    // With the value capped, a new worker processes the events again: every change is there.
    let s = sizes(id, &url, 1000, true);
    let worker = s.app.start().await.expect("restart");
    wait_until(KAFKA_WAIT, "all 51 texts", || s.texts.len() == 51).await;
    for e in events() {
        let want = format!("{}:{}", e.id, "x".repeat(e.size.min(1000)));
        assert_eq!(
            s.texts.get(&e.id).as_deref(),
            Some(want.as_str()),
            "text {}",
            e.id
        );
    }
    worker.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_record_the_broker_refuses_stops_the_worker_with_its_event_uncommitted() {
    let id = "refused-output";
    let (_cluster, url) = mock_cluster(&[
        ("sizes", 1),
        ("texts-out", 1),
        ("refused-output-texts-changelog", 1),
        ("refused-output-workers", 1),
    ]);
    let s = sizes(id, &url, usize::MAX, false);
    let worker = s.app.start().await.expect("start");
    send_events(&s).await;
    let why = stopped_fatally(&worker).await;
    assert!(why.contains("texts-out"), "names the sink: {why}");
    assert!(why.to_lowercase().contains("too large"), "says why: {why}");
    worker.shutdown().await.expect("stop");
    let at = committed(&s.app, "sizes").await;
    assert!(
        at <= 25,
        "event 25's output was never written, but offset {at} is committed"
    );

    // With the text capped, a new worker redoes the rest: no event is without its output.
    let s = sizes(id, &url, 1000, false);
    let outputs: Recorder<u64> = Recorder::new();
    let reader = App::new(format!("{id}-reader"));
    let url2 = url.clone();
    reader.configure(|c| {
        c.broker = url2;
        c.topic_partitions = 1;
        c.kafka.insert("session.timeout.ms".into(), "6000".into());
    });
    let out = reader.topic("texts-out").value_type::<String>();
    let seen = outputs.clone();
    reader
        .agent(move |mut texts: Stream<String>| {
            let seen = seen.clone();
            async move {
                while let Some(t) = texts.next().await {
                    if let Some(Ok(id)) = t.split(':').next().map(str::parse) {
                        seen.push(id);
                    }
                }
            }
        })
        .named("read")
        .channel(&out);
    let worker = s.app.start().await.expect("restart");
    let reading = reader.start().await.expect("reader");
    wait_until(KAFKA_WAIT, "an output for every event", || {
        outputs
            .snapshot()
            .into_iter()
            .collect::<BTreeSet<u64>>()
            .len()
            == 51
    })
    .await;
    reading.shutdown().await.expect("stop reader");
    worker.shutdown().await.expect("stop");
}

/// A counting app on the embedded transport whose agent can be held in the middle of an event
/// (after its table change, before it asks for the next event).
struct Held {
    app: App,
    input: Topic<u64, u64>,
    /// The event the agent stops in the middle of.
    hold_at: u64,
    /// Set by the agent when it is held; the test releases it.
    held: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    processed: Arc<AtomicU64>,
}

fn held(id: &str, hold_at: u64, guarantee: rill::ProcessingGuarantee) -> Held {
    let app = App::new(id);
    let broker = format!("memory://{id}");
    app.configure(|s| {
        s.processing_guarantee = guarantee;
        s.broker = broker;
        s.topic_partitions = 1;
        s.commit_interval = Duration::from_millis(20);
    });
    let input = app.topic("numbers").key_type::<u64>().value_type::<u64>();
    let seen = app.table::<u64, u64>("seen");
    let (held, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let processed = Arc::new(AtomicU64::new(0));
    let (h, r, p, t) = (
        held.clone(),
        release.clone(),
        processed.clone(),
        seen.clone(),
    );
    app.agent(move |mut numbers: Stream<u64, u64>| {
        let (held, release, processed, seen) = (h.clone(), r.clone(), p.clone(), t.clone());
        async move {
            while let Some(n) = numbers.next().await {
                seen.insert(n, n);
                processed.fetch_add(1, Ordering::SeqCst);
                if n == hold_at {
                    held.notify_one();
                    release.notified().await;
                }
            }
        }
    })
    .named("count")
    .channel(&input);
    Held {
        app,
        input,
        hold_at,
        held,
        release,
        processed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_takes_an_events_table_change_without_its_offset() {
    commit_waits_for_the_event_in_progress("barrier", rill::ProcessingGuarantee::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_once_commit_never_takes_an_events_table_change_without_its_offset() {
    commit_waits_for_the_event_in_progress("barrier-eos", rill::ProcessingGuarantee::ExactlyOnce)
        .await;
}

async fn commit_waits_for_the_event_in_progress(id: &str, guarantee: rill::ProcessingGuarantee) {
    let h = held(id, 10, guarantee);
    let worker = h.app.start().await.expect("start");
    let held = h.held.notified();
    for n in 0..20u64 {
        h.input.send(n).key(n).await.expect("send");
    }
    held.await;
    // The agent is in the middle of event 10: its table change is made, its offset is not
    // done. For a while (many commit intervals), no commit may write that change to the
    // changelog while leaving its offset uncommitted.
    let changelog = format!("{id}-seen-changelog");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    while tokio::time::Instant::now() < deadline {
        let committed = committed(&h.app, "numbers").await;
        let written: BTreeSet<u64> = common::read_all(&h.app, &changelog)
            .iter()
            .filter_map(|m| serde_json::from_slice(m.key.as_deref()?).ok())
            .collect();
        assert!(
            !written.contains(&h.hold_at) || committed > h.hold_at as i64,
            "the changelog has event {}'s change but the committed offset is {committed}",
            h.hold_at
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.release.notify_one();
    wait_until(WAIT, "all 20 processed", || {
        h.processed.load(Ordering::SeqCst) == 20
    })
    .await;
    worker.shutdown().await.expect("stop");
    assert_eq!(committed(&h.app, "numbers").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_agent_queue_does_not_hold_commits_back() {
    let id = "full-queue";
    let app = App::new(id);
    app.configure(|s| {
        s.broker = format!("memory://{id}");
        s.topic_partitions = 1;
        s.commit_interval = Duration::from_millis(20);
        s.stream_buffer_maxsize = 4;
    });
    let input = app.topic("slow").key_type::<u64>().value_type::<u64>();
    let processed = Arc::new(AtomicU64::new(0));
    let p = processed.clone();
    app.agent(move |mut numbers: Stream<u64, u64>| {
        let processed = p.clone();
        async move {
            while numbers.next().await.is_some() {
                // A slow agent: its queue fills at once.
                tokio::time::sleep(Duration::from_millis(10)).await;
                processed.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .named("slow")
    .channel(&input);
    // All 200 events are in the log before the worker starts: the dispatcher reads more than
    // the queue holds in its first poll.
    let producer = App::new(format!("{id}-producer"));
    producer.configure(|s| s.broker = format!("memory://{id}"));
    let t = producer
        .topic("slow")
        .partitions(1)
        .key_type::<u64>()
        .value_type::<u64>();
    let pw = producer.start().await.expect("producer");
    for n in 0..200u64 {
        t.send(n).key(n).await.expect("send");
    }
    pw.shutdown().await.expect("producer stops");

    let worker = app.start().await.expect("start");
    let deadline = tokio::time::Instant::now() + WAIT;
    while committed(&app, "slow").await < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no commit past event 20 within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = processed.load(Ordering::SeqCst);
    assert!(
        done < 150,
        "commits waited for the queue to drain: the first commit past 20 came after {done} of \
         200 events were processed"
    );
    wait_until(WAIT, "all 200 processed", || {
        processed.load(Ordering::SeqCst) == 200
    })
    .await;
    worker.shutdown().await.expect("stop");
    assert_eq!(committed(&app, "slow").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_records_wait_for_a_full_queue_loses_nothing() {
    let id = "full-queue-revoke";
    revocation_while_held_back(id, &format!("memory://{id}"), 50).await;
}

/// On Kafka a worker whose agents are behind polls less instead of pausing its partitions
/// (librdkafka would drop what it fetched ahead): a rebalance is still served meanwhile, so a
/// worker that joins gets partitions while the first one is still far behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_worker_joins_while_the_first_holds_reading_back_and_nothing_is_lost() {
    let (_cluster, url) = mock_cluster(&[("events", 4)]);
    revocation_while_held_back("full-queue-revoke-kafka", &url, 1000).await;
}

/// Worker a reads 8 keys × `per_key` events with a slow agent and a queue of 4, so records
/// wait for it and reading is held back; b joins meanwhile. Every event is processed, each
/// worker went through each key in order, and b took part.
async fn revocation_while_held_back(id: &str, url: &str, per_key: u64) {
    let build = |seen: Recorder<(u64, u64)>| {
        let app = App::new(id);
        let url = url.to_owned();
        app.configure(|s| {
            s.broker = url;
            s.topic_partitions = 4;
            s.commit_interval = Duration::from_millis(20);
            s.stream_buffer_maxsize = 4;
            s.kafka.insert("session.timeout.ms".into(), "6000".into());
            // The test's sends wait for each record: none lingers.
            s.kafka.insert("linger.ms".into(), "0".into());
        });
        let input = app.topic("events").key_type::<u64>().value_type::<u64>();
        app.agent(move |numbers: Stream<u64, u64>| {
            let seen = seen.clone();
            async move {
                let mut numbers = numbers.items();
                while let Some((key, seq)) = numbers.next().await {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    seen.push((key.unwrap_or(u64::MAX), seq));
                }
            }
        })
        .named("slow")
        .channel(&input);
        (app, input)
    };
    let (seen_a, seen_b) = (Recorder::new(), Recorder::new());
    let (a, input) = build(seen_a.clone());
    let wa = a.start().await.expect("start a");
    // 8 keys, `per_key` events each, in order per key.
    for seq in 0..per_key {
        for key in 0..8u64 {
            input.send(seq).key(key).await.expect("send");
        }
    }
    let total = 8 * per_key as usize;
    // b joins while a's queue is full and records wait for it: half of a's partitions move.
    wait_until(WAIT, "a processing", || seen_a.len() > 10).await;
    let (b, _) = build(seen_b.clone());
    let wb = b.start().await.expect("start b");
    let all = || {
        let mut all = seen_a.snapshot();
        all.extend(seen_b.snapshot());
        all
    };
    common::wait_until_state(
        KAFKA_WAIT,
        "every event processed",
        || {
            let got: BTreeSet<(u64, u64)> = all().into_iter().collect();
            let missing: Vec<(u64, u64)> = (0..8u64)
                .flat_map(|k| (0..per_key).map(move |s| (k, s)))
                .filter(|e| !got.contains(e))
                .take(20)
                .collect();
            (got.len(), missing)
        },
        |(n, _)| *n == total,
    )
    .await;
    wa.shutdown().await.expect("stop a");
    wb.shutdown().await.expect("stop b");
    assert!(
        !seen_b.is_empty(),
        "the worker that joined processed nothing: the rebalance waited for the first to catch up"
    );
    // Per key, each worker went through the events in order: the next one, or back to an
    // earlier one (read again from the last commit after a rebalance), never past one.
    for (worker, seen) in [("a", seen_a.snapshot()), ("b", seen_b.snapshot())] {
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for (key, seq) in seen {
            if let Some(prev) = last.insert(key, seq) {
                assert!(
                    seq <= prev + 1,
                    "worker {worker} skipped from event {prev} to {seq} of key {key}"
                );
            }
        }
    }
}

/// Faust's `broker_commit_every`: with `commit_every`, a worker commits once that many records
/// are read, without waiting for the interval; without it (`Some(0)`), only the interval
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_every_commits_after_that_many_records_without_waiting_for_the_interval() {
    for (every, expect_commit) in [(Some(100), true), (Some(0), false)] {
        let app = App::new(format!("commit-every-{}", every.unwrap_or_default()));
        app.configure(|s| {
            s.topic_partitions = 1;
            // Far beyond the test: only the record count can commit.
            s.commit_interval = Duration::from_secs(3600);
            s.commit_every = every;
        });
        let topic = app.topic("numbers").value_type::<u64>();
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        app.agent(move |mut stream: Stream<u64>| {
            let seen = s.clone();
            async move {
                while stream.next().await.is_some() {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .named("count")
        .channel(&topic);
        let worker = app.start().await.expect("start");
        // Each batch is read, and counted towards the next commit, before the next is sent.
        for batch in 0..5u64 {
            for n in 0..50 {
                topic.send(batch * 50 + n).await.expect("send");
            }
            let want = (batch + 1) * 50;
            wait_until(WAIT, "the batch to be processed", || {
                seen.load(Ordering::Relaxed) >= want
            })
            .await;
        }
        if expect_commit {
            // The fourth batch's records make 200 read since the start: that commit takes
            // at least the three batches processed before it was sent.
            wait_until(WAIT, "a commit of at least 150 records", || {
                common::committed(&app)
                    .get(&TopicPartition::new("numbers", 0))
                    .is_some_and(|o| *o >= 150)
            })
            .await;
        } else {
            // Processed, and nothing read since the start commits it before the interval.
            assert_eq!(seen.load(Ordering::Relaxed), 250);
            assert_eq!(
                common::committed(&app).get(&TopicPartition::new("numbers", 0)),
                None,
                "committed by count with commit_every Some(0)"
            );
        }
        worker.shutdown().await.expect("stop");
        assert_eq!(
            common::committed(&app).get(&TopicPartition::new("numbers", 0)),
            Some(&250),
            "the last commit at shutdown takes everything"
        );
    }
}
