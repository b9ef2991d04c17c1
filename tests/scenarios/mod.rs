//! Scenarios whose outcome depends on the transport, written once against a [`Harness`] and
//! run on the embedded transport (`scenarios_memory.rs`) and on librdkafka's in-process mock
//! cluster (`scenarios_kafka.rs`).
//!
//! Scenarios only look at what works the same on both transports: the values agents see (and
//! the events they came from), `Worker::decode_errors` / `Worker::agent_errors`, and the app's
//! `committed_offsets` and `end_offsets`. Every topic has 4 partitions, the only count the mock
//! cluster's auto-creation gives.

use crate::common::{kafka_partition, wait_until, wait_until_state, within, Recorder, WAIT};
use futures::StreamExt;
use rill::prelude::*;
use rill::{Error, Worker};
use std::collections::{BTreeMap, BTreeSet};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

/// Bound for waits on events to be processed. On Kafka it includes joining the consumer group:
/// about 3 s on the mock cluster, but when the group rebalances again because `group_by` or
/// `through` subscribe to their topic after the first join began, up to about 15 s.
const PROCESSED: Duration = Duration::from_secs(60);

/// Partitions of every topic in the scenarios (and the harnesses' `topic_partitions`).
pub(crate) const PARTITIONS: u32 = 4;

/// Where a scenario's apps run.
pub(crate) trait Harness {
    /// The transport's kind, as [`Worker::transport`] names it.
    fn transport(&self) -> &'static str;

    /// An app on this test's broker; `topic_partitions` is [`PARTITIONS`]. On the embedded
    /// transport it is the app's own broker (`memory://`).
    fn app(&self, id: &str) -> App;

    /// An app on the broker that every `shared_app` of this test uses, so that a second app
    /// with the same id is the first one restarted (in a new process, as far as the app can
    /// tell). On Kafka that is the test's cluster, as for [`app`](Harness::app).
    fn shared_app(&self, id: &str) -> App;
}

/// Declares one test per scenario, each running the scenario on `$harness` (a new one per
/// test). Attributes before a scenario's name (`#[ignore = "..."]`) go on its test.
macro_rules! scenario_tests {
    ($harness:expr; $($(#[$attr:meta])* $scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])*
            async fn $scenario() -> anyhow::Result<()> {
                let harness = $harness;
                scenarios::$scenario(&harness).await
            }
        )+
    };
}
pub(crate) use scenario_tests;

/// Logs go to the test's output (shown when it fails); `RUST_LOG` picks what is logged
/// (errors by default).
pub(crate) fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Starts the app (bounded) and checks it runs on the harness's transport.
async fn start<H: Harness>(h: &H, app: &App) -> anyhow::Result<Worker> {
    let worker = within(WAIT, "the worker to start", app.start()).await?;
    assert_eq!(
        worker.transport(),
        h.transport(),
        "the app runs on the wrong transport"
    );
    Ok(worker)
}

/// Stops the worker (bounded).
async fn stop(worker: Worker) -> anyhow::Result<()> {
    within(WAIT, "the worker to shut down", worker.shutdown()).await?;
    Ok(())
}

/// Asserts, through the app's public API, that its group committed every partition of `topic`
/// up to the partition's end: everything was processed (or skipped), nothing is left to redo.
async fn assert_committed_to_end(app: &App, topic: &str) -> anyhow::Result<()> {
    let partitions = crate::common::assert_group_committed_to_end(app, topic).await?;
    assert_eq!(
        partitions, PARTITIONS as usize,
        "topic {topic} has {partitions} partitions"
    );
    Ok(())
}

/// Declares an agent `name` that reads `topic` and records every event it sees.
fn reader<V>(app: &App, topic: &Topic<Bytes, V>, name: &str) -> (Agent<V>, Recorder<Event<V>>)
where
    V: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let seen: Recorder<Event<V>> = Recorder::new();
    let rec = seen.clone();
    let agent = app
        .agent(move |s: Stream<V>| {
            let rec = rec.clone();
            async move {
                let mut events = s.events();
                while let Some(event) = events.next().await {
                    rec.push(event);
                }
            }
        })
        .named(name)
        .channel(topic);
    (agent, seen)
}

fn key(k: &str) -> Bytes {
    Bytes::copy_from_slice(k.as_bytes())
}

fn sorted<T: Ord + Clone>(r: &Recorder<T>) -> Vec<T> {
    let mut v = r.snapshot();
    v.sort();
    v
}

/// Keeps the deliberate panics of the scenarios out of the test output; other panics (failed
/// assertions) are reported as usual.
fn quiet_deliberate_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.starts_with("deliberate") {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// 1. Keyed sends.

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Keyed {
    key: String,
    seq: u32,
}

/// Keyed records keep their order per key, each key in the partition Kafka's Java client picks,
/// nothing lost or duplicated, and everything committed.
pub(crate) async fn keyed_sends_keep_per_key_order_in_kafkas_partition<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const KEYS: u32 = 25;
    const ROUNDS: u32 = 20;
    const EVENTS: u32 = KEYS * ROUNDS;

    let app = h.app("keyed");
    let topic = app
        .topic("events")
        .partitions(PARTITIONS)
        .value_type::<Keyed>();
    let (_, seen) = reader(&app, &topic, "recorder");

    let worker = start(h, &app).await?;
    // One record per key at a time; a key's next record is sent once its previous one is in
    // the log, so each key's records are in order.
    for seq in 0..ROUNDS {
        let sends = (0..KEYS).map(|k| {
            let k = format!("key-{k}");
            topic
                .send(Keyed {
                    key: k.clone(),
                    seq,
                })
                .key(key(&k))
                .into_future()
        });
        for (k, pos) in futures::future::try_join_all(sends)
            .await?
            .into_iter()
            .enumerate()
        {
            let k = format!("key-{k}");
            assert_eq!(
                pos.partition,
                kafka_partition(k.as_bytes(), PARTITIONS),
                "send of {k:?} went to the wrong partition"
            );
        }
    }
    wait_until_state(
        PROCESSED,
        "the agent saw every event",
        || seen.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    stop(worker).await?;

    let seen = seen.snapshot();
    assert_eq!(
        seen.len(),
        EVENTS as usize,
        "events processed more than once"
    );
    let mut per_key: BTreeMap<String, (Vec<u32>, BTreeSet<u32>)> = BTreeMap::new();
    for e in &seen {
        assert_eq!(
            e.key().map(|k| k.as_ref()),
            Some(e.value.key.as_bytes()),
            "the event lost its key"
        );
        let entry = per_key.entry(e.value.key.clone()).or_default();
        entry.0.push(e.value.seq);
        entry.1.insert(e.partition());
    }
    assert_eq!(per_key.len(), KEYS as usize, "a key is missing");
    let mut per_partition = vec![0i64; PARTITIONS as usize];
    for (k, (seqs, partitions)) in &per_key {
        assert_eq!(
            seqs,
            &(0..ROUNDS).collect::<Vec<_>>(),
            "events of {k:?} out of order, lost or duplicated"
        );
        let want = kafka_partition(k.as_bytes(), PARTITIONS);
        assert_eq!(
            partitions,
            &BTreeSet::from([want]),
            "events of {k:?} were read from more than one partition, or not from Kafka's"
        );
        per_partition[want as usize] += i64::from(ROUNDS);
    }
    assert_eq!(
        app.end_offsets("events").await?,
        per_partition,
        "the log holds other records than those sent"
    );
    assert_committed_to_end(&app, "events").await
}

// ---------------------------------------------------------------------------------------------
// 2. group_by.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Transfer {
    account_id: String,
    amount: f64,
    seq: u32,
}

/// `group_by(field!(...))` routes each key through one partition of
/// `<app id>-<topic>-<key name>-repartition`: every event once, each key in order.
pub(crate) async fn group_by_routes_each_key_to_one_repartition_partition_once_and_in_order<
    H: Harness,
>(
    h: &H,
) -> anyhow::Result<()> {
    const ACCOUNTS: u32 = 20;
    const ROUNDS: u32 = 15;
    const TRANSFERS: u32 = ACCOUNTS * ROUNDS;
    const REPARTITION: &str = "groupby-transfers-Transfer.account_id-repartition";

    let app = h.app("groupby");
    let topic = app
        .topic("transfers")
        .partitions(PARTITIONS)
        .value_type::<Transfer>();
    // (account, seq, topic read from, partition read from, message key)
    let seen: Recorder<(String, u32, String, u32, Option<Bytes>)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<Transfer>| {
        let rec = rec.clone();
        async move {
            let mut s = s.group_by(field!(Transfer.account_id));
            while let Some(t) = s.next().await {
                let m = s.current_event().expect("a value comes with its event");
                rec.push((
                    t.account_id.clone(),
                    t.seq,
                    m.topic.to_string(),
                    m.partition,
                    m.key.clone(),
                ));
            }
        }
    })
    .named("by-account")
    .channel(&topic);

    let worker = start(h, &app).await?;
    // The source is keyed by branch: each account's transfers are in order in one source
    // partition, and several accounts share a partition, so group_by has to move them.
    for seq in 0..ROUNDS {
        let sends = (0..ACCOUNTS).map(|n| {
            topic
                .send(Transfer {
                    account_id: format!("acct-{n}"),
                    amount: f64::from(seq),
                    seq,
                })
                .key(key(&format!("branch-{}", n % 5)))
                .into_future()
        });
        futures::future::try_join_all(sends).await?;
    }
    wait_until_state(
        PROCESSED,
        "every transfer came out of group_by",
        || seen.len(),
        |n| *n >= TRANSFERS as usize,
    )
    .await;
    stop(worker).await?;

    let seen = seen.snapshot();
    assert_eq!(
        seen.len(),
        TRANSFERS as usize,
        "transfers arrived more than once"
    );
    let mut per_account: BTreeMap<String, (Vec<u32>, BTreeSet<u32>)> = BTreeMap::new();
    for (account, seq, topic, partition, msg_key) in &seen {
        assert_eq!(
            topic, REPARTITION,
            "value not read back from the repartition topic"
        );
        let json_key = serde_json::to_vec(account)?;
        assert_eq!(
            msg_key.as_deref(),
            Some(&json_key[..]),
            "the repartitioned event is not keyed by its account"
        );
        let entry = per_account.entry(account.clone()).or_default();
        entry.0.push(*seq);
        entry.1.insert(*partition);
    }
    assert_eq!(
        per_account.len(),
        ACCOUNTS as usize,
        "an account is missing"
    );
    let mut per_partition = vec![0i64; PARTITIONS as usize];
    for (account, (seqs, partitions)) in &per_account {
        assert_eq!(
            seqs,
            &(0..ROUNDS).collect::<Vec<_>>(),
            "transfers of {account} out of order, lost or duplicated"
        );
        // The new key is JSON-encoded, and partitioned as Kafka's Java client would.
        let want = kafka_partition(&serde_json::to_vec(account)?, PARTITIONS);
        assert_eq!(
            partitions,
            &BTreeSet::from([want]),
            "transfers of {account} read from the wrong partitions"
        );
        per_partition[want as usize] += i64::from(ROUNDS);
    }
    assert_eq!(
        app.end_offsets(REPARTITION).await?,
        per_partition,
        "the repartition topic holds each transfer once, in its account's partition"
    );
    assert_committed_to_end(&app, "transfers").await?;
    assert_committed_to_end(&app, REPARTITION).await
}

// ---------------------------------------------------------------------------------------------
// 3. Talking to agents.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// `ask` returns what the agent yields for the request, `cast` delivers without a reply, and
/// `send(..).reply_to(..)` forwards the result to another agent or a topic with the
/// correlation id.
pub(crate) async fn ask_cast_and_reply_to_deliver_each_result_where_asked<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    let app = h.app("ask");
    let adding_topic = app
        .topic("adding")
        .partitions(PARTITIONS)
        .value_type::<Add>();
    let adder = app.agent(adding).named("adder").channel(&adding_topic);

    let cast_topic = app.topic("cast").partitions(PARTITIONS).value_type::<i64>();
    let casts = Recorder::<(i64, usize)>::new();
    let rec = casts.clone();
    let caster = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            stream! {
                while let Some(v) = s.next().await {
                    let headers = s.current_event().map(|m| m.headers.len()).unwrap_or(usize::MAX);
                    rec.push((v, headers));
                    yield v;
                }
            }
        })
        .named("caster")
        .channel(&cast_topic);

    let results = app
        .topic("results")
        .partitions(PARTITIONS)
        .value_type::<i64>();
    let (collector, collected) = reader(&app, &results, "collector");
    let replies = app
        .topic("replies")
        .partitions(PARTITIONS)
        .value_type::<i64>();
    let (_, replied) = reader(&app, &replies, "replies");

    let worker = start(h, &app).await?;

    assert_eq!(adder.ask(Add { a: 2, b: 2 }).await?, 4);
    assert_eq!(adder.ask(Add { a: 4, b: 8 }).await?, 12);
    // Key and partition change where the request goes, not the answer.
    assert_eq!(
        adder.ask(Add { a: -1, b: 1 }).key(key("k")).await?,
        0,
        "keyed ask"
    );
    assert_eq!(
        adder.ask(Add { a: 5, b: 5 }).partition(3).await?,
        10,
        "ask to a partition"
    );
    // Many asks at once each get their own answer.
    let answers = futures::future::try_join_all(
        (0..50).map(|i| adder.ask(Add { a: i, b: 1000 }).into_future()),
    )
    .await?;
    assert_eq!(answers, (0..50).map(|i| i + 1000).collect::<Vec<_>>());

    // Casts with one key: in order, with no reply address or correlation id.
    for v in 0..20 {
        caster.cast(v).key(key("one-key")).await?;
    }

    // To another agent: the agent reads the results as its events.
    adder.send(Add { a: 2, b: 2 }).reply_to(&collector).await?;
    adder.send(Add { a: 3, b: 4 }).reply_to(&collector).await?;
    // To a topic, by value and by name, with the caller's correlation id.
    adder
        .send(Add { a: 10, b: 1 })
        .reply_to(&replies)
        .correlation_id("req-1")
        .await?;
    adder
        .send(Add { a: 20, b: 2 })
        .reply_to("replies")
        .correlation_id("req-2")
        .await?;

    wait_until_state(
        PROCESSED,
        "every cast and every forwarded result arrived",
        || (casts.len(), collected.len(), replied.len()),
        |(c, r, p)| *c >= 20 && *r >= 2 && *p >= 2,
    )
    .await;
    stop(worker).await?;

    assert_eq!(
        casts.snapshot(),
        (0..20).map(|v| (v, 0)).collect::<Vec<_>>(),
        "casts arrive once, in order, with no reply address or correlation id"
    );
    let mut got: Vec<i64> = collected.snapshot().iter().map(|e| e.value).collect();
    got.sort_unstable();
    assert_eq!(got, vec![4, 7], "results forwarded to the agent");
    let mut got: Vec<(i64, Option<Bytes>)> = replied
        .snapshot()
        .iter()
        .map(|e| {
            let id = e
                .headers()
                .iter()
                .find(|(name, _)| name.contains("correlation"))
                .map(|(_, v)| v.clone());
            (e.value, id)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (11, Some(Bytes::from_static(b"req-1"))),
            (22, Some(Bytes::from_static(b"req-2")))
        ],
        "each reply reaches the topic once, with its request's correlation id"
    );
    Ok(())
}

/// The key and partition of each request an agent got.
type Requests = Recorder<(Option<Bytes>, u32)>;

/// Squares each value after a delay that shrinks as the value grows, and records the key and
/// partition of each request; with a few actors, replies come back in reverse order.
fn slow_squares(app: &App, name: &str) -> (Agent<i64, i64>, Requests) {
    let seen = Requests::new();
    let rec = seen.clone();
    let topic = app.topic(name).partitions(PARTITIONS).value_type::<i64>();
    let agent = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            stream! {
                while let Some(v) = s.next().await {
                    let m = s.current_event().expect("a value comes with its event");
                    rec.push((m.key.clone(), m.partition));
                    tokio::time::sleep(Duration::from_millis(40 * (9 - v as u64))).await;
                    yield v * v;
                }
            }
        })
        .named(name)
        .concurrency(8)
        .channel(&topic);
    (agent, seen)
}

/// `map` and `kvmap` yield every reply as it comes, `join` and `kvjoin` put them back in input
/// order, and the `kv` forms send each request under its key.
pub(crate) async fn map_and_join_return_every_reply_and_join_keeps_input_order<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    let app = h.app("map-join");
    let (pow2, seen) = slow_squares(&app, "pow2");
    let worker = start(h, &app).await?;
    let input: Vec<i64> = (1..=8).collect();
    let squares: Vec<i64> = input.iter().map(|v| v * v).collect();

    let mapped: Vec<i64> = pow2
        .map(input.clone())
        .map(|r| r.expect("a reply"))
        .collect()
        .await;
    assert_ne!(
        mapped, squares,
        "precondition: replies should arrive out of order (larger values are faster)"
    );
    let mut got = mapped.clone();
    got.sort_unstable();
    assert_eq!(got, squares, "map lost or duplicated a reply");

    assert_eq!(
        pow2.join(input.clone()).await?,
        squares,
        "join keeps input order"
    );
    // An async stream of values works as well as an iterator.
    assert_eq!(
        pow2.join(futures::stream::iter(input.clone())).await?,
        squares,
        "join of a stream keeps input order"
    );
    let unkeyed = seen.len();

    let items: Vec<(Bytes, i64)> = input
        .iter()
        .map(|v| (key(&format!("key-{v}")), *v))
        .collect();
    let kvmapped: Vec<i64> = pow2
        .kvmap(items.clone())
        .map(|r| r.expect("a reply"))
        .collect()
        .await;
    assert_ne!(
        kvmapped, squares,
        "precondition: kvmap replies should arrive out of order"
    );
    let mut got = kvmapped;
    got.sort_unstable();
    assert_eq!(got, squares, "kvmap lost or duplicated a reply");
    assert_eq!(
        pow2.kvjoin(items.clone()).await?,
        squares,
        "kvjoin keeps input order"
    );
    stop(worker).await?;

    let seen = seen.snapshot();
    assert_eq!(
        seen.len(),
        5 * input.len(),
        "each request reached the agent once"
    );
    assert_eq!(unkeyed, 3 * input.len());
    assert!(
        seen[..unkeyed].iter().all(|(k, _)| k.is_none()),
        "map and join send without a key"
    );
    for (k, partition) in &seen[unkeyed..] {
        let k = k.as_deref().expect("kvmap and kvjoin send the key");
        assert!(k.starts_with(b"key-"), "request sent with the wrong key");
        assert_eq!(
            *partition,
            kafka_partition(k, PARTITIONS),
            "request not partitioned by its key"
        );
    }
    Ok(())
}

/// An agent that reads everything and never yields.
async fn silent(mut stream: Stream<i64>) {
    while stream.next().await.is_some() {}
}

/// With no reply, `ask` fails with `AskTimeout` after its timeout, and `join` and `map` after
/// the app's `ask_timeout`.
pub(crate) async fn ask_without_a_reply_fails_with_ask_timeout<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    let app_timeout = Duration::from_secs(1);
    let app = h.app("ask-timeout");
    app.configure(|s| s.ask_timeout = app_timeout);
    let topic = app
        .topic("silent")
        .partitions(PARTITIONS)
        .value_type::<i64>();
    let agent = app.agent(silent).named("silent").channel(&topic);
    let worker = start(h, &app).await?;

    let timeout = Duration::from_millis(500);
    let started = tokio::time::Instant::now();
    let err = within(
        WAIT,
        "ask to time out",
        agent.ask(1).timeout(timeout).into_future(),
    )
    .await
    .unwrap_err();
    let waited = started.elapsed();
    match &err {
        Error::AskTimeout {
            agent, timeout: t, ..
        } => {
            assert_eq!(agent, "silent");
            assert_eq!(*t, timeout);
        }
        other => panic!("expected AskTimeout, got {other:?}"),
    }
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(5),
        "ask gave up after {waited:?}, not after its {timeout:?} timeout"
    );
    assert!(
        err.to_string().contains("silent"),
        "the message names the agent: {err}"
    );

    let err = within(WAIT, "join to time out", agent.join([1, 2, 3]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::AskTimeout { timeout, .. } if timeout == app_timeout),
        "join: {err:?}"
    );
    let replies: Vec<_> = within(WAIT, "map to time out", agent.map([1, 2, 3]).collect()).await;
    assert_eq!(
        replies.len(),
        1,
        "map ends after its timeout error: {replies:?}"
    );
    assert!(
        matches!(&replies[0], Err(Error::AskTimeout { timeout, .. }) if *timeout == app_timeout),
        "map: {replies:?}"
    );
    stop(worker).await
}

// ---------------------------------------------------------------------------------------------
// 4. Sinks.

/// Every value an agent yields reaches each of its sinks: a function, an async function, a
/// topic (read back by another agent), a channel, another agent.
pub(crate) async fn every_sink_kind_receives_every_yielded_value<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const VALUES: i64 = 200;
    let expected: Vec<i64> = (0..VALUES).map(|v| v * 10).collect();

    let app = h.app("sinks");
    let input = app
        .topic("numbers")
        .partitions(PARTITIONS)
        .value_type::<i64>();
    let log_topic = app
        .topic("agent-log")
        .partitions(PARTITIONS)
        .value_type::<i64>();
    let b_topic = app
        .topic("agent-b")
        .partitions(PARTITIONS)
        .value_type::<i64>();
    let channel = app.channel::<i64>();
    let (_, logged) = reader(&app, &log_topic, "log-reader");
    let (agent_b, by_agent) = reader(&app, &b_topic, "agent-b");

    let yielded: Recorder<i64> = Recorder::new();
    let by_fn: Recorder<i64> = Recorder::new();
    let by_async_fn: Recorder<i64> = Recorder::new();
    let rec = yielded.clone();
    let sync_rec = by_fn.clone();
    let async_rec = by_async_fn.clone();
    app.agent(move |mut s: Stream<i64>| {
        let rec = rec.clone();
        stream! {
            while let Some(v) = s.next().await {
                rec.push(v * 10);
                yield v * 10;
            }
        }
    })
    .named("agent-a")
    .channel(&input)
    .sink(move |v: i64| sync_rec.push(v))
    .sink(move |v: i64| {
        let rec = async_rec.clone();
        async move {
            tokio::task::yield_now().await;
            rec.push(v);
        }
    })
    .sink(&log_topic)
    .sink(&channel)
    .sink(&agent_b);

    let worker = start(h, &app).await?;
    // All in one partition, so the agent yields in send order.
    for v in 0..VALUES {
        input.send(v).partition(1).await?;
    }
    let mut from_channel = Vec::new();
    for _ in 0..VALUES {
        let v = within(
            PROCESSED,
            "the next value on the sink channel",
            channel.recv(),
        )
        .await;
        from_channel.push(v.expect("the channel is open"));
    }
    wait_until_state(
        PROCESSED,
        "every sink has every value",
        || (by_fn.len(), by_async_fn.len(), logged.len(), by_agent.len()),
        |(f, a, log, b)| {
            let n = VALUES as usize;
            *f >= n && *a >= n && *log >= n && *b >= n
        },
    )
    .await;
    stop(worker).await?;

    assert_eq!(
        yielded.snapshot(),
        expected,
        "the agent saw the wrong values"
    );
    assert_eq!(by_fn.snapshot(), expected, "function sink");
    assert_eq!(by_async_fn.snapshot(), expected, "async function sink");
    assert_eq!(from_channel, expected, "channel sink");
    assert!(channel.is_empty(), "the channel sink got extra values");
    // The topic and agent sinks send without a key, spread over the partitions: every value
    // once, in no particular order.
    let mut got: Vec<i64> = logged.snapshot().iter().map(|e| e.value).collect();
    got.sort_unstable();
    assert_eq!(got, expected, "topic sink, read back by another agent");
    let mut got: Vec<i64> = by_agent.snapshot().iter().map(|e| e.value).collect();
    got.sort_unstable();
    assert_eq!(got, expected, "agent sink");
    assert_eq!(
        app.end_offsets("agent-log").await?.iter().sum::<i64>(),
        VALUES,
        "the topic sink wrote each value once"
    );
    assert_committed_to_end(&app, "numbers").await?;
    assert_committed_to_end(&app, "agent-log").await?;
    assert_committed_to_end(&app, "agent-b").await
}

// ---------------------------------------------------------------------------------------------
// 5. Concurrency.

/// `concurrency(4)`: four actors share the stream, and every event is processed exactly once
/// and committed.
pub(crate) async fn concurrent_actors_process_every_event_exactly_once<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const EVENTS: u64 = 400;
    let app = h.app("concurrency");
    let topic = app.topic("jobs").partitions(PARTITIONS).value_type::<u64>();
    let done: Recorder<u64> = Recorder::new();
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (rec, now_in, max_in) = (done.clone(), now.clone(), max.clone());
    app.agent(move |mut s: Stream<u64>| {
        let (rec, now, max) = (rec.clone(), now_in.clone(), max_in.clone());
        async move {
            while let Some(n) = s.next().await {
                let inside = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(inside, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1 + n % 4)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                rec.push(n);
            }
        }
    })
    .named("jobs")
    .concurrency(4)
    .channel(&topic);

    let worker = start(h, &app).await?;
    futures::future::try_join_all((0..EVENTS).map(|n| topic.send(n).into_future())).await?;
    wait_until_state(
        PROCESSED,
        "every job was processed",
        || done.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    stop(worker).await?;

    let mut done = done.snapshot();
    assert_eq!(done.len(), EVENTS as usize, "a job was processed twice");
    done.sort_unstable();
    assert_eq!(done, (0..EVENTS).collect::<Vec<_>>(), "a job was lost");
    let max = max.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&max),
        "concurrency(4) ran up to {max} jobs at once"
    );
    assert_eq!(
        app.end_offsets("jobs").await?,
        vec![EVENTS as i64 / 4; 4],
        "unkeyed jobs are spread evenly"
    );
    assert_committed_to_end(&app, "jobs").await
}

// ---------------------------------------------------------------------------------------------
// 6. Failing agents.

/// An agent that panics (or returns an error) on some events goes on with the rest; the
/// failures are counted, and the commit goes past the failed events.
pub(crate) async fn failing_agents_skip_the_bad_event_and_process_the_rest<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const EVENTS: u64 = 300;
    quiet_deliberate_panics();
    let panics_on = |v: u64| v % 5 == 0;
    let errs_on = |v: u64| v % 7 == 3;
    let good = |fails: fn(u64) -> bool| (0..EVENTS).filter(|v| !fails(*v)).collect::<Vec<_>>();

    let app = h.app("errors");
    let topic = app
        .topic("numbers")
        .partitions(PARTITIONS)
        .value_type::<u64>();

    let by_panicky: Recorder<u64> = Recorder::new();
    let rec = by_panicky.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                if panics_on(v) {
                    panic!("deliberate panic on {v}");
                }
                rec.push(v);
            }
        }
    })
    .named("panicky")
    .channel(&topic);

    let by_fallible: Recorder<u64> = Recorder::new();
    let rec = by_fallible.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                if errs_on(v) {
                    return Err(format!("deliberate error on {v}"));
                }
                rec.push(v);
            }
            Ok(())
        }
    })
    .named("fallible")
    .channel(&topic);

    // A healthy agent on the same topic: its neighbours' failures do not touch it.
    let (_, by_healthy) = reader(&app, &topic, "healthy");

    let worker = start(h, &app).await?;
    futures::future::try_join_all((0..EVENTS).map(|v| topic.send(v).into_future())).await?;
    let panics = (0..EVENTS).filter(|v| panics_on(*v)).count();
    let errors = (0..EVENTS).filter(|v| errs_on(*v)).count();
    wait_until_state(
        PROCESSED,
        "every agent got through the whole stream",
        || {
            (
                by_panicky.len(),
                by_fallible.len(),
                by_healthy.len(),
                worker.agent_errors("panicky") as usize,
                worker.agent_errors("fallible") as usize,
            )
        },
        |s| {
            *s == (
                EVENTS as usize - panics,
                EVENTS as usize - errors,
                EVENTS as usize,
                panics,
                errors,
            )
        },
    )
    .await;
    assert_eq!(worker.agent_errors("healthy"), 0);
    stop(worker).await?;

    assert_eq!(sorted(&by_panicky), good(panics_on), "panicky agent");
    assert_eq!(sorted(&by_fallible), good(errs_on), "failing agent");
    let mut healthy: Vec<u64> = by_healthy.snapshot().iter().map(|e| e.value).collect();
    healthy.sort_unstable();
    assert_eq!(healthy, (0..EVENTS).collect::<Vec<_>>(), "healthy agent");
    // The failed events are acked: the commit goes past them to the end of every partition.
    assert_committed_to_end(&app, "numbers").await
}

// ---------------------------------------------------------------------------------------------
// 7. Undecodable messages.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: u32,
}

fn encoded(value: u32) -> Bytes {
    let r = Reading {
        sensor: "s1".into(),
        value,
    };
    Bytes::from(serde_json::to_vec(&r).expect("a reading encodes"))
}

/// Messages the agent cannot decode are skipped and counted; every valid one around them is
/// processed, in order, and the commit goes past them.
pub(crate) async fn undecodable_messages_are_skipped_counted_and_committed_past<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const ROUNDS: u32 = 10;
    let bad: Vec<(&str, Option<Bytes>)> = vec![
        (
            "invalid json",
            Some(Bytes::from_static(b"{\"sensor\": \"s1\", ")),
        ),
        (
            "wrong types",
            Some(Bytes::from_static(b"{\"sensor\": 7, \"value\": \"high\"}")),
        ),
        ("empty payload", Some(Bytes::new())),
        ("no value", None),
    ];

    let app = h.app("decode");
    let topic = app
        .topic("readings")
        .partitions(PARTITIONS)
        .value_type::<Reading>();
    // (value, partition)
    let seen: Recorder<(u32, u32)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut s: Stream<Reading>| {
        let rec = rec.clone();
        async move {
            while let Some(r) = s.next().await {
                let partition = s.current_event().map(|m| m.partition).unwrap_or(u32::MAX);
                rec.push((r.value, partition));
            }
        }
    })
    .named("readings")
    .channel(&topic);

    let worker = start(h, &app).await?;
    // Two partitions of interleaved good and bad messages.
    let mut good = [Vec::new(), Vec::new()];
    let mut n = 0u32;
    for round in 0..ROUNDS {
        let (slot, partition) = if round % 2 == 0 { (0, 0) } else { (1, 3) };
        for (_, payload) in &bad {
            topic
                .send_raw(None, Some(encoded(n)), Some(partition))
                .await?;
            good[slot].push(n);
            n += 1;
            topic
                .send_raw(Some(key("k")), payload.clone(), Some(partition))
                .await?;
        }
        // A typed send between raw ones.
        topic
            .send(Reading {
                sensor: "s1".into(),
                value: n,
            })
            .partition(partition)
            .await?;
        good[slot].push(n);
        n += 1;
    }
    let bad_count = u64::from(ROUNDS) * bad.len() as u64;
    wait_until_state(
        PROCESSED,
        "every valid reading was processed and every bad one counted",
        || (seen.len(), worker.decode_errors("readings")),
        |(seen, errors)| *seen >= n as usize && *errors >= bad_count,
    )
    .await;
    assert_eq!(
        worker.decode_errors("readings"),
        bad_count,
        "each undecodable message is counted once"
    );
    stop(worker).await?;

    let seen = seen.snapshot();
    assert_eq!(
        seen.len(),
        n as usize,
        "a valid reading was processed twice"
    );
    for (slot, partition) in [(0, 0), (1, 3)] {
        let got: Vec<u32> = seen
            .iter()
            .filter(|(_, p)| *p == partition)
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(
            got, good[slot],
            "partition {partition}: every valid reading once, in order"
        );
    }
    let per_round = 2 * bad.len() as i64 + 1;
    assert_eq!(
        app.end_offsets("readings").await?,
        vec![per_round * 5, 0, 0, per_round * 5]
    );
    assert_committed_to_end(&app, "readings").await
}

// ---------------------------------------------------------------------------------------------
// 8. Shutdown and restart.

/// Declares the agent that records `(run, value)` on `app`.
fn recording_agent(app: &App, topic: &Topic<Bytes, u64>, log: &Recorder<(usize, u64)>, run: usize) {
    let log = log.clone();
    app.agent(move |mut s: Stream<u64>| {
        let log = log.clone();
        async move {
            while let Some(v) = s.next().await {
                log.push((run, v));
            }
        }
    })
    .named("recorder")
    .channel(topic);
}

/// Shutdown commits everything processed (the periodic commit never runs), and the same app
/// started again on the same broker resumes from the commit: nothing lost, nothing twice.
pub(crate) async fn shutdown_commits_everything_and_a_restarted_app_resumes_from_it<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const PER_RUN: u64 = 200;
    let log: Recorder<(usize, u64)> = Recorder::new();
    let hour = Duration::from_secs(3600);

    let first = h.shared_app("restart");
    first.configure(|s| s.commit_interval = hour);
    let topic = first
        .topic("events")
        .partitions(PARTITIONS)
        .value_type::<u64>();
    recording_agent(&first, &topic, &log, 1);
    let worker = start(h, &first).await?;
    // The worker's first periodic commit is an hour away: whatever is committed, shutdown
    // committed.
    topic.send(0).await?;
    wait_until(PROCESSED, "the first event was processed", || {
        !log.is_empty()
    })
    .await;
    futures::future::try_join_all((1..PER_RUN).map(|v| topic.send(v).into_future())).await?;
    wait_until_state(
        PROCESSED,
        "the first run processed everything",
        || log.len(),
        |n| *n >= PER_RUN as usize,
    )
    .await;
    let before: Vec<_> = first
        .committed_offsets()
        .await?
        .into_iter()
        .filter(|(tp, o)| &*tp.topic == "events" && *o > 0)
        .collect();
    assert!(
        before.is_empty(),
        "precondition: only shutdown commits the events, but before it {before:?} were committed"
    );
    stop(worker).await?;
    assert_committed_to_end(&first, "events").await?;

    // Another app with the same id, as a restarted process would make.
    let second = h.shared_app("restart");
    second.configure(|s| s.commit_interval = hour);
    let topic = second
        .topic("events")
        .partitions(PARTITIONS)
        .value_type::<u64>();
    recording_agent(&second, &topic, &log, 2);
    let worker = start(h, &second).await?;
    // New events in every partition: an old event read again would come before them.
    futures::future::try_join_all(
        (PER_RUN..2 * PER_RUN).map(|v| topic.send(v).partition((v % 4) as u32).into_future()),
    )
    .await?;
    let new: BTreeSet<u64> = (PER_RUN..2 * PER_RUN).collect();
    wait_until_state(
        PROCESSED,
        "the second run processed the new events",
        || {
            log.snapshot()
                .into_iter()
                .filter(|(r, _)| *r == 2)
                .map(|(_, v)| v)
                .collect::<BTreeSet<u64>>()
        },
        |seen| new.is_subset(seen),
    )
    .await;
    stop(worker).await?;

    let log = log.snapshot();
    let mut first_run: Vec<u64> = log
        .iter()
        .filter(|(r, _)| *r == 1)
        .map(|(_, v)| *v)
        .collect();
    first_run.sort_unstable();
    assert_eq!(first_run, (0..PER_RUN).collect::<Vec<_>>(), "first run");
    let mut second_run: Vec<u64> = log
        .iter()
        .filter(|(r, _)| *r == 2)
        .map(|(_, v)| *v)
        .collect();
    second_run.sort_unstable();
    assert_eq!(
        second_run,
        (PER_RUN..2 * PER_RUN).collect::<Vec<_>>(),
        "the restarted app processed old events again, or new ones twice"
    );
    assert_committed_to_end(&second, "events").await
}

// ---------------------------------------------------------------------------------------------
// 9. through and echo.

/// `through(topic)` sends every value on with its key and reads it back with the topic's
/// partitioning: each key in Kafka's partition for it, in order, once.
pub(crate) async fn through_keeps_the_key_and_repartitions<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const KEYS: u32 = 17;
    const ROUNDS: u32 = 15;
    const EVENTS: u32 = KEYS * ROUNDS;
    let app = h.app("through");
    let source = app
        .topic("raw")
        .partitions(PARTITIONS)
        .value_type::<(String, u32)>();
    let middle = app
        .topic("cleaned")
        .partitions(PARTITIONS)
        .value_type::<(String, u32)>();
    // (key, seq, topic read from, partition read from, message key)
    let seen: Recorder<(String, u32, String, u32, Option<Bytes>)> = Recorder::new();
    let (rec, to) = (seen.clone(), middle.clone());
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

    let worker = start(h, &app).await?;
    // Each key's values sit, in order, in a source partition that is not its own: through has
    // to move every one of them.
    for seq in 0..ROUNDS {
        let sends = (0..KEYS).map(|k| {
            let k = format!("user-{k}");
            let elsewhere = (kafka_partition(k.as_bytes(), PARTITIONS) + 1) % PARTITIONS;
            source
                .send((k.clone(), seq))
                .key(key(&k))
                .partition(elsewhere)
                .into_future()
        });
        futures::future::try_join_all(sends).await?;
    }
    wait_until_state(
        PROCESSED,
        "every value came back through",
        || seen.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    stop(worker).await?;

    let seen = seen.snapshot();
    assert_eq!(seen.len(), EVENTS as usize, "a value came through twice");
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (k, seq, topic, partition, msg_key) in &seen {
        assert_eq!(
            topic, "cleaned",
            "value not read back from the through topic"
        );
        assert_eq!(
            msg_key.as_deref(),
            Some(k.as_bytes()),
            "the key was not kept"
        );
        assert_eq!(
            *partition,
            kafka_partition(k.as_bytes(), PARTITIONS),
            "{k} read back from the wrong partition"
        );
        per_key.entry(k.clone()).or_default().push(*seq);
    }
    assert_eq!(per_key.len(), KEYS as usize, "a key is missing");
    for (k, seqs) in &per_key {
        assert_eq!(
            seqs,
            &(0..ROUNDS).collect::<Vec<_>>(),
            "values of {k} out of order, lost or duplicated"
        );
    }
    assert_eq!(
        app.end_offsets("cleaned").await?.iter().sum::<i64>(),
        i64::from(EVENTS),
        "the through topic holds each value once"
    );
    assert_committed_to_end(&app, "raw").await?;
    assert_committed_to_end(&app, "cleaned").await
}

/// `echo` copies every value, with its key, to each topic, and passes the stream on unchanged.
pub(crate) async fn echo_copies_every_value_to_each_topic_and_passes_it_on<H: Harness>(
    h: &H,
) -> anyhow::Result<()> {
    const EVENTS: u32 = 100;
    const KEYS: u32 = 5;
    let app = h.app("echo");
    let source = app.topic("in").partitions(PARTITIONS).value_type::<u32>();
    let copy_a = app
        .topic("copy-a")
        .partitions(PARTITIONS)
        .value_type::<u32>();
    let copy_b = app
        .topic("copy-b")
        .partitions(PARTITIONS)
        .value_type::<u32>();
    let (_, in_a) = reader(&app, &copy_a, "read-a");
    let (_, in_b) = reader(&app, &copy_b, "read-b");
    let passed: Recorder<(u32, Option<Bytes>)> = Recorder::new();
    let (rec, a, b) = (passed.clone(), copy_a.clone(), copy_b.clone());
    app.agent(move |s: Stream<u32>| {
        let (rec, a, b) = (rec.clone(), a.clone(), b.clone());
        async move {
            let mut s = s.echo(&[&a, &b]);
            while let Some(v) = s.next().await {
                rec.push((v, s.current_event().and_then(|m| m.key.clone())));
            }
        }
    })
    .named("echo")
    .channel(&source);

    let worker = start(h, &app).await?;
    let key_of = |v: u32| format!("k{}", v % KEYS);
    for v in 0..EVENTS {
        source.send(v).key(key(&key_of(v))).await?;
    }
    wait_until_state(
        PROCESSED,
        "every value passed on and copied to both topics",
        || (passed.len(), in_a.len(), in_b.len()),
        |(p, a, b)| *p >= EVENTS as usize && *a >= EVENTS as usize && *b >= EVENTS as usize,
    )
    .await;
    stop(worker).await?;

    // Per key, in send order.
    let expected: BTreeMap<Bytes, Vec<u32>> = (0..KEYS)
        .map(|k| {
            let values = (0..EVENTS).filter(|v| v % KEYS == k).collect();
            (key(&format!("k{k}")), values)
        })
        .collect();
    let mut by_key: BTreeMap<Bytes, Vec<u32>> = BTreeMap::new();
    for (v, k) in passed.snapshot() {
        by_key
            .entry(k.expect("the source event has its key"))
            .or_default()
            .push(v);
    }
    assert_eq!(by_key, expected, "echo changed the stream");
    for (name, copies) in [("copy-a", &in_a), ("copy-b", &in_b)] {
        let mut by_key: BTreeMap<Bytes, Vec<u32>> = BTreeMap::new();
        for e in copies.snapshot() {
            let k = e.key().cloned().expect("the copy has the key");
            assert_eq!(
                e.partition(),
                kafka_partition(&k, PARTITIONS),
                "{name}: a copy is not in its key's partition"
            );
            assert_eq!(k, key(&key_of(e.value)), "{name}: a copy has the wrong key");
            by_key.entry(k).or_default().push(e.value);
        }
        assert_eq!(
            by_key, expected,
            "{name}: every value once, with its key, in order per key"
        );
        assert_eq!(
            app.end_offsets(name).await?.iter().sum::<i64>(),
            i64::from(EVENTS),
            "{name} holds each value once"
        );
        assert_committed_to_end(&app, name).await?;
    }
    assert_committed_to_end(&app, "in").await
}
