//! Exactly-once processing (`ProcessingGuarantee::ExactlyOnce`), tested for what can be observed
//! without a broker that implements Kafka transactions.
//!
//! The Kafka tests run on librdkafka's mock cluster (librdkafka 2.12.1). It accepts every
//! transaction request but implements none of their effects: `read_committed` consumers see the
//! records of aborted transactions, offsets sent to a transaction never become the group's
//! committed offsets, and a producer that starts with the transactional id of another does not
//! fence it (`the_mock_cluster_does_not_implement_transaction_semantics` in
//! `tests/fault_harness.rs` checks all three). So these tests check the protocol flow (the
//! worker's requests to the brokers), the outputs and table of a clean run, and the failure
//! handling, with the brokers' errors injected as Kafka would answer them:
//!
//! - a clean run: every event's output exactly once, in per-key order, the table counts exact,
//!   and the offsets committed in transactions only;
//! - a worker fenced once replaces its producer, rolls back and goes on; one fenced again and
//!   again (another live worker with its `worker_id`) says so and stops, and a worker with the
//!   same `worker_id` takes over;
//! - an aborted transaction is rolled back: the worker says so, goes on, and processes the
//!   events of the aborted transaction again;
//! - the embedded transport accepts exactly-once and processes normally.
//!
//! What a `read_committed` consumer sees on a real broker is checked by the exactly-once
//! scenarios of `tests/fault_harness.rs`, on Apache Kafka.

mod common;

use common::{http_get, wait_until_state, within, LogCapture, Recorder, LOGS, WAIT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use rill::prelude::*;
use rill::{ProcessingGuarantee, Table, Worker};
use std::collections::BTreeMap;
use std::time::Duration;

/// Partitions of the input topic and the table: the mock cluster's default for topics it
/// creates itself.
const PARTITIONS: u32 = 4;
/// Keys of the events: event `i` has key `i % KEYS`.
const KEYS: u64 = 10;
/// Bound for waits on processing; on the mock cluster it includes joining the consumer group
/// (about 5 s per rebalance with the session timeout below).
const PROCESSED: Duration = Duration::from_secs(60);
const EVENTS: &str = "eos-events";
/// The output topic has one partition: its order is the order the outputs were produced in.
const OUT: &str = "eos-out";

/// One test at a time: the tests read the log lines the workers write, which every test of
/// this binary shares, and each runs a mock cluster and a worker, a lot for a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Logs: every line this test binary logs, so tests can check what a user reads.

/// Captures rill's logs from `info` on (the level of "processing resumes").
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,rill=info"))
        .with_ansi(false)
        .with_writer(|| LogCapture)
        .try_init();
}

/// Where the log lines written from now on start.
fn log_mark() -> usize {
    LOGS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// The log lines written since `mark` that contain every one of `parts`.
fn log_lines(mark: usize, parts: &[&str]) -> Vec<String> {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    logs[mark..]
        .lines()
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .map(str::to_owned)
        .collect()
}

/// The last lines logged since `mark`, for failure messages.
fn log_tail(mark: usize) -> String {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    let lines: Vec<&str> = logs[mark..].lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until a line containing every one of `parts` is logged after `mark`, and returns it.
async fn logged(mark: usize, parts: &[&str], what: &str) -> String {
    let deadline = tokio::time::Instant::now() + PROCESSED;
    loop {
        if let Some(line) = log_lines(mark, parts).into_iter().next() {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line says {what} (containing {parts:?}) within {PROCESSED:?}; the log:\n{}",
            log_tail(mark)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The events and the app.

/// An input (and output) event: `seq` numbers the events of one key from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
struct Keyed {
    key: u64,
    seq: u64,
}

/// The `i`-th event: keys take turns, so every key's events span the whole run.
fn event(i: u64) -> Keyed {
    Keyed {
        key: i % KEYS,
        seq: i / KEYS,
    }
}

/// An app whose agent forwards each event to [`OUT`] and counts it by key in the table
/// `counts`; what the agent saw is recorded. Exactly-once, serving the web on a free port.
struct EosApp {
    app: App,
    events: Topic<u64, Keyed>,
    counts: Table<u64, u64>,
    seen: Recorder<Keyed>,
}

impl EosApp {
    fn new(id: &str, broker: &str, worker_id: Option<&str>) -> Self {
        let app = App::new(id);
        let broker = broker.to_owned();
        let kafka = broker.starts_with("kafka://");
        app.configure(|s| {
            s.broker = broker;
            s.processing_guarantee = ProcessingGuarantee::ExactlyOnce;
            s.worker_id = worker_id.map(str::to_owned);
            s.topic_partitions = PARTITIONS;
            s.web_port = Some(0);
            if kafka {
                // The mock's coordinator completes a rebalance when a timer of the session
                // timeout less one second runs out (see scenarios_kafka.rs).
                s.kafka.insert("session.timeout.ms".into(), "6000".into());
                s.kafka
                    .insert("heartbeat.interval.ms".into(), "1000".into());
            }
        });
        let events = app
            .topic(EVENTS)
            .key_type::<u64>()
            .value_type::<Keyed>()
            .partitions(PARTITIONS);
        let out = app.topic(OUT).value_type::<Keyed>().partitions(1);
        let counts = app.table::<u64, u64>("counts").partitions(PARTITIONS);
        let seen = Recorder::new();
        let (table, recorder) = (counts.clone(), seen.clone());
        let input = events.clone();
        app.agent(move |mut stream: Stream<Keyed, u64>| {
            let (counts, seen) = (table.clone(), recorder.clone());
            stream! {
                while let Some(e) = stream.next().await {
                    counts.update(e.key, |n| *n += 1);
                    seen.push(e);
                    yield e;
                }
            }
        })
        .named("forward")
        .channel(&input)
        .sink(&out);
        Self {
            app,
            events,
            counts,
            seen,
        }
    }

    async fn start(&self) -> Worker {
        within(WAIT, "the worker to start", self.app.start())
            .await
            .expect("the worker starts")
    }

    /// Each key's count in the table, as the worker holding it says.
    fn counts(&self) -> BTreeMap<u64, u64> {
        (0..KEYS)
            .filter_map(|k| self.counts.get(&k).map(|n| (k, n)))
            .collect()
    }
}

/// How many events of each key are among `events`.
fn per_key(events: impl IntoIterator<Item = Keyed>) -> BTreeMap<u64, u64> {
    let mut counts = BTreeMap::new();
    for e in events {
        *counts.entry(e.key).or_default() += 1;
    }
    counts
}

/// How many times each event is among `events`.
fn copies(events: &[Keyed]) -> BTreeMap<Keyed, usize> {
    let mut copies = BTreeMap::new();
    for e in events {
        *copies.entry(*e).or_default() += 1;
    }
    copies
}

/// `GET /health` of a worker: status code and the `status` it reports.
async fn health(worker: &Worker) -> (u16, String) {
    let addr = worker.web_addr().expect("the worker serves the web");
    let (code, body) = tokio::task::spawn_blocking(move || http_get(addr, "/health"))
        .await
        .expect("the request runs");
    let status = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or(body);
    (code, status)
}

// ---------------------------------------------------------------------------------------------
// The mock cluster, hosted by a plain producer that also writes the input events.

/// librdkafka's mock cluster of one broker, created by a plain producer
/// (`test.mock.num.brokers`) so that its requests can be tracked (rdkafka's `MockCluster` does
/// not expose that). The producer writes the input events as any client would.
struct Cluster {
    producer: BaseProducer,
}

impl Cluster {
    /// A cluster for the app `app`.
    fn new(app: &str) -> Self {
        init_logging();
        let producer: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            // Kafka's Java partitioner, as rill's: a key's events land in the partition of its
            // table entry.
            .set("partitioner", "murmur2_random")
            .create()
            .expect("a producer hosting a mock cluster");
        let cluster = Self { producer };
        // SAFETY: the mock cluster lives as long as `cluster.producer`.
        unsafe { rdkafka::bindings::rd_kafka_mock_start_request_tracking(cluster.raw()) };
        // The mock brokers do not answer CreateTopics: the topics whose partition count is not
        // the mock's default are made here.
        {
            let mock = cluster.mock();
            mock.create_topic(EVENTS, PARTITIONS as i32, 1)
                .expect("the mock cluster creates the input topic");
            mock.create_topic(OUT, 1, 1)
                .expect("the mock cluster creates the output topic");
            // Where the workers publish their web addresses (compacted, one partition).
            mock.create_topic(&format!("{app}-workers"), 1, 1)
                .expect("the mock cluster creates the workers topic");
        }
        cluster
    }

    fn mock(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.producer
            .client()
            .mock_cluster()
            .expect("the producer hosts a mock cluster")
    }

    fn raw(&self) -> *mut rdkafka::bindings::rd_kafka_mock_cluster_t {
        // SAFETY: the client pointer is valid while `self.producer` lives.
        unsafe {
            rdkafka::bindings::rd_kafka_handle_mock_cluster(self.producer.client().native_ptr())
        }
    }

    fn url(&self) -> String {
        format!("kafka://{}", self.mock().bootstrap_servers())
    }

    /// How many requests of each API the brokers received since the cluster started.
    fn requests(&self) -> BTreeMap<i16, usize> {
        let mut counts = BTreeMap::new();
        let mut n = 0usize;
        // SAFETY: the cluster lives as long as `self.producer`; the array and the requests in
        // it are copies, freed here.
        unsafe {
            let requests = rdkafka::bindings::rd_kafka_mock_get_requests(self.raw(), &mut n);
            if !requests.is_null() {
                for i in 0..n {
                    let key = rdkafka::bindings::rd_kafka_mock_request_api_key(*requests.add(i));
                    *counts.entry(key).or_default() += 1;
                }
                rdkafka::bindings::rd_kafka_mock_request_destroy_array(requests, n);
            }
        }
        counts
    }

    fn count(&self, api: RDKafkaApiKey) -> usize {
        self.requests().get(&(api as i16)).copied().unwrap_or(0)
    }

    /// Writes events `range` to [`EVENTS`], keyed by the key's decimal text (its JSON), and
    /// waits until the broker has them all.
    fn send(&self, range: std::ops::Range<u64>) {
        for i in range {
            let e = event(i);
            let key = e.key.to_string();
            let value = serde_json::to_vec(&e).expect("encode an event");
            let mut record = BaseRecord::to(EVENTS).key(&key).payload(&value);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(_), r)) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => panic!("cannot send event {i}: {e}"),
                }
            }
        }
        self.producer
            .flush(WAIT)
            .expect("the mock cluster takes the events");
    }

    /// Every record of [`OUT`] from the start, in order, read by a plain consumer
    /// (`read_committed`, which the mock cluster ignores) until the partition's end.
    fn read_output(&self) -> Vec<Keyed> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.mock().bootstrap_servers())
            .set("group.id", "eos-checker")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()
            .expect("a checker consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(OUT, 0, Offset::Beginning)
            .expect("offset");
        consumer.assign(&tpl).expect("assign");
        let deadline = std::time::Instant::now() + WAIT;
        let mut events = Vec::new();
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{OUT} not read to its end within {WAIT:?}; read {} records",
                events.len()
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => events.push(
                    m.payload()
                        .and_then(|v| serde_json::from_slice(v).ok())
                        .unwrap_or_else(|| panic!("{OUT}@{} is not an event", m.offset())),
                ),
                Some(Err(KafkaError::PartitionEOF(_))) => return events,
                Some(Err(e)) => panic!("reading {OUT}: {e}"),
                None => {}
            }
        }
    }
}

/// Runs a blocking call of the cluster off the async threads.
async fn blocking<R: Send + 'static>(
    cluster: &std::sync::Arc<Cluster>,
    f: impl FnOnce(&Cluster) -> R + Send + 'static,
) -> R {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || f(&cluster))
        .await
        .expect("the blocking call runs")
}

/// Waits until `app`'s agent has seen every event of `range`.
/// Waits (bounded) until the output topic holds the outputs of `events`; returns all of it.
async fn wait_for_output(
    cluster: &std::sync::Arc<Cluster>,
    events: std::ops::Range<u64>,
    mark: usize,
) -> Vec<Keyed> {
    let deadline = tokio::time::Instant::now() + PROCESSED;
    loop {
        let range = events.clone();
        let output = blocking(cluster, |c| c.read_output()).await;
        if range.clone().all(|i| output.contains(&event(i))) {
            return output;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outputs of events {range:?} are not all in {OUT} within {PROCESSED:?}; the \
             log:\n{}",
            log_tail(mark)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until_seen(app: &EosApp, range: std::ops::Range<u64>, what: &str) {
    wait_until_state(
        PROCESSED,
        what,
        || {
            let seen: std::collections::BTreeSet<Keyed> = app.seen.snapshot().into_iter().collect();
            range.clone().filter(|i| !seen.contains(&event(*i))).count()
        },
        |missing| *missing == 0,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_outputs_each_event_once_in_key_order_counts_exactly_and_commits_in_transactions(
) {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = std::sync::Arc::new(Cluster::new("eos-clean"));
    let app = EosApp::new("eos-clean", &cluster.url(), Some("w1"));
    let worker = app.start().await;
    const N: u64 = 2_000;
    // In two halves, the first committed before the second is sent: at least two
    // transactions carry them.
    blocking(&cluster, |c| c.send(0..N / 2)).await;
    wait_until_seen(&app, 0..N / 2, "the first half is processed").await;
    wait_until_state(
        PROCESSED,
        "the first half's offsets are sent to a transaction",
        || cluster.count(RDKafkaApiKey::TxnOffsetCommit),
        |n| *n > 0,
    )
    .await;
    blocking(&cluster, |c| c.send(N / 2..N)).await;

    let want = per_key((0..N).map(event));
    wait_until_state(
        PROCESSED,
        "every key's count reaches its number of events",
        || app.counts(),
        |counts| counts.values().sum::<u64>() >= N,
    )
    .await;
    assert_eq!(app.counts(), want, "the table counts each event once");
    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");

    let output = blocking(&cluster, |c| c.read_output()).await;
    let duplicated: Vec<_> = copies(&output)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        duplicated.is_empty(),
        "outputs written more than once: {:?}",
        &duplicated[..duplicated.len().min(10)]
    );
    assert_eq!(output.len() as u64, N, "one output per event");
    for key in 0..KEYS {
        let seqs: Vec<u64> = output
            .iter()
            .filter(|e| e.key == key)
            .map(|e| e.seq)
            .collect();
        let expected: Vec<u64> = (0..want[&key]).collect();
        assert_eq!(seqs, expected, "the outputs of key {key} in order");
    }

    // The worker ran transactions: it asked for a transactional producer id, added partitions
    // and its group's offsets to transactions, committed them, and never committed offsets
    // outside a transaction.
    let requests = cluster.requests();
    let count = |api: RDKafkaApiKey| requests.get(&(api as i16)).copied().unwrap_or(0);
    for api in [
        RDKafkaApiKey::InitProducerId,
        RDKafkaApiKey::AddPartitionsToTxn,
        RDKafkaApiKey::AddOffsetsToTxn,
        RDKafkaApiKey::TxnOffsetCommit,
        RDKafkaApiKey::EndTxn,
    ] {
        assert!(
            count(api) > 0,
            "the brokers received no {api:?} request; requests by API key: {requests:?}"
        );
    }
    assert!(
        count(RDKafkaApiKey::TxnOffsetCommit) >= 2,
        "the second half's offsets were not committed in a transaction: {requests:?}"
    );
    assert_eq!(
        count(RDKafkaApiKey::OffsetCommit),
        0,
        "offsets were committed outside a transaction: {requests:?}"
    );
}

/// How many fencings within ten minutes make a worker stop (rill's `FENCED_LIMIT`).
const FENCED_LIMIT: usize = 5;

/// A producer fenced once (on Kafka: its transaction outlived `transaction.timeout.ms` while
/// partition leaders moved in a broker failure, and the coordinator bumped its epoch) is
/// replaced: the worker rolls back to its last commit and goes on, as Kafka Streams does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_takes_a_new_producer_rolls_back_and_goes_on() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = std::sync::Arc::new(Cluster::new("eos-fenced-once"));
    let mark = log_mark();
    let app = EosApp::new("eos-fenced-once", &cluster.url(), Some("w1"));
    let worker = app.start().await;
    blocking(&cluster, |c| c.send(0..100)).await;
    wait_until_seen(&app, 0..100, "the first events are processed").await;

    // What Kafka answers the next transaction request of a producer whose transaction the
    // coordinator timed out (librdkafka reports it as fenced, a fatal error of the producer).
    cluster.mock().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    blocking(&cluster, |c| c.send(100..200)).await;
    let renewed = logged(
        mark,
        &[
            "fenced this worker's transactional producer",
            "new producer",
        ],
        "that the worker replaces its fenced producer",
    )
    .await;
    assert!(
        renewed.contains("WARN") && renewed.contains("transaction.timeout.ms"),
        "the fence is reported with its likely causes: {renewed}"
    );
    logged(
        mark,
        &["rolled back to the last commit; processing resumes"],
        "that processing resumes after the fence",
    )
    .await;

    // The worker goes on with its new producer: later events are processed and output once.
    blocking(&cluster, |c| c.send(200..300)).await;
    let output = wait_for_output(&cluster, 0..300, mark).await;
    let copies = copies(&output);
    let twice: Vec<Keyed> = (200..300).map(event).filter(|e| copies[e] > 1).collect();
    assert!(
        twice.is_empty(),
        "events sent after the new producer took over were output more than once: {twice:?}"
    );
    assert_eq!(
        health(&worker).await,
        (200, "running".to_owned()),
        "the worker runs on"
    );
    assert!(
        log_lines(mark, &["stopping the worker"]).is_empty(),
        "a worker fenced once stopped: {}",
        log_tail(mark)
    );
    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
}

/// A transaction whose end hangs (librdkafka can block in `send_offsets_to_transaction` past
/// its timeout when the group coordinator's broker went away) is given up after 20 s: a new
/// producer takes over, the worker rolls back and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_does_not_end_is_given_up_for_a_new_producer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = std::sync::Arc::new(Cluster::new("eos-stuck"));
    let mark = log_mark();
    let app = EosApp::new("eos-stuck", &cluster.url(), Some("w1"));
    let worker = app.start().await;
    blocking(&cluster, |c| c.send(0..100)).await;
    wait_until_seen(&app, 0..100, "the first events are processed").await;

    blocking(&cluster, |c| c.send(100..200)).await;
    wait_until_seen(&app, 100..200, "the next events are processed").await;
    // The broker answers nothing for a minute: the transaction's end waits on it past the
    // 20 s rill allows it.
    cluster
        .mock()
        .broker_round_trip_time(1, Duration::from_secs(60))
        .expect("the mock broker slows down");
    logged(
        mark,
        &["a commit is slow", "the offsets' commit"],
        "that the slow commit says what it waits for",
    )
    .await;
    logged(
        mark,
        &["the transaction did not end in time", "new producer"],
        "that the worker gives the transaction up",
    )
    .await;
    cluster
        .mock()
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("the mock broker answers again");
    logged(
        mark,
        &["rolled back to the last commit; processing resumes"],
        "that processing resumes with the new producer",
    )
    .await;

    blocking(&cluster, |c| c.send(200..300)).await;
    wait_for_output(&cluster, 0..300, mark).await;
    assert_eq!(
        health(&worker).await,
        (200, "running".to_owned()),
        "the worker runs on"
    );
    if let Err(e) = within(WAIT, "the worker to stop", worker.shutdown()).await {
        panic!(
            "the worker does not stop cleanly: {e}; the log:\n{}",
            log_tail(mark)
        );
    }
}

/// Two live workers with one `worker_id` fence each other's producers again and again: after
/// `FENCED_LIMIT` fencings the worker says why and stops, and a worker with its `worker_id`
/// takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fenced_again_and_again_says_another_has_its_worker_id_and_stops() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = std::sync::Arc::new(Cluster::new("eos-fenced"));
    let mark = log_mark();
    let first = EosApp::new("eos-fenced", &cluster.url(), Some("w1"));
    let first_worker = first.start().await;
    blocking(&cluster, |c| c.send(0..100)).await;
    wait_until_seen(
        &first,
        0..100,
        "the first worker processes the first events",
    )
    .await;

    // On Kafka, a worker started with the same `worker_id` gets the same transactional id, and
    // its InitProducerId fences the first worker: the broker answers the first worker's next
    // transaction request with PRODUCER_FENCED. The mock cluster gives every producer a new id
    // and fences nobody, so those answers are injected here, one per transaction the worker
    // tries to end.
    cluster.mock().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED; FENCED_LIMIT],
    );
    blocking(&cluster, |c| c.send(100..200)).await;
    within(
        PROCESSED,
        "the fenced worker to stop by itself",
        first_worker.stopped(),
    )
    .await;
    let stopping = logged(
        mark,
        &["stopping the worker", "this worker was fenced"],
        "that the worker stops because it was fenced",
    )
    .await;
    assert!(
        stopping.contains("ERROR")
            && stopping.contains(&format!("fenced {FENCED_LIMIT} times"))
            && stopping.contains("worker_id"),
        "the fence is reported as an error naming its cause: {stopping}"
    );
    let (code, status) = health(&first_worker).await;
    assert_eq!(
        (code, status.as_str()),
        (503, "stopping"),
        "the fenced worker's health"
    );

    // A worker with the same worker_id (on Kafka, the one that fenced the first) takes the
    // partitions over and processes what comes next; the fenced one processes nothing more.
    let seen_by_first = first.seen.len();
    let second = EosApp::new("eos-fenced", &cluster.url(), Some("w1"));
    let second_worker = second.start().await;
    blocking(&cluster, |c| c.send(200..300)).await;
    wait_until_seen(
        &second,
        200..300,
        "the second worker processes later events",
    )
    .await;
    assert_eq!(
        first.seen.len(),
        seen_by_first,
        "the fenced worker went on processing"
    );
    assert_eq!(
        health(&second_worker).await.0,
        200,
        "the second worker runs"
    );
    within(WAIT, "the second worker to stop", second_worker.shutdown())
        .await
        .expect("the second worker stops cleanly");
    within(WAIT, "the fenced worker to stop", first_worker.shutdown())
        .await
        .expect("the fenced worker's shutdown");
}

/// The `worker` command of a worker that stops by itself exits with an error, so that whatever
/// runs it (systemd, Kubernetes) sees it and can act, rather than a process that serves
/// `/health` but processes nothing.
#[test]
fn a_fenced_worker_command_exits_with_an_error() {
    let _one = ONE_AT_A_TIME.blocking_lock();
    let cluster = Cluster::new("eos-cli");
    let mark = log_mark();
    // The transactions the worker ends are refused as they would be while another worker
    // with the same worker_id runs (see the test above).
    cluster.mock().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED; FENCED_LIMIT],
    );
    cluster.send(0..10);
    let app = EosApp::new("eos-cli", &cluster.url(), None);
    // The command line sets the guarantee and the worker id.
    app.app.configure(|s| {
        s.processing_guarantee = ProcessingGuarantee::AtLeastOnce;
        s.worker_id = None;
    });
    let url = cluster.url();
    let (tx, rx) = std::sync::mpsc::channel();
    let command = app.app.clone();
    std::thread::spawn(move || {
        let args = [
            "eos-cli",
            "worker",
            "--broker",
            &url,
            "--processing-guarantee",
            "exactly_once",
            "--worker-id",
            "w1",
            "--web-port",
            "0",
        ];
        let _ = tx.send(command.main_from(args).map_err(|e| e.to_string()));
    });
    let result = rx.recv_timeout(PROCESSED).unwrap_or_else(|_| {
        panic!(
            "the worker command did not exit within {PROCESSED:?}; the log:\n{}",
            log_tail(mark)
        )
    });
    let error = result.expect_err("the fenced worker command succeeded");
    assert!(
        error.contains("the worker stopped"),
        "the command's error says the worker stopped: {error}"
    );
    assert!(
        !log_lines(mark, &["this worker was fenced"]).is_empty(),
        "the log says why: {}",
        log_tail(mark)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_is_rolled_back_and_its_events_are_processed_again() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = std::sync::Arc::new(Cluster::new("eos-abort"));
    let mark = log_mark();
    let app = EosApp::new("eos-abort", &cluster.url(), Some("w1"));
    let worker = app.start().await;
    blocking(&cluster, |c| c.send(0..100)).await;
    wait_until_seen(&app, 0..100, "the first events are processed").await;
    let txn_offset_commits = cluster.count(RDKafkaApiKey::TxnOffsetCommit);
    wait_until_state(
        PROCESSED,
        "the first events' offsets are sent to a transaction",
        || cluster.count(RDKafkaApiKey::TxnOffsetCommit),
        |n| *n > txn_offset_commits,
    )
    .await;

    // The group coordinator refuses the next transaction's offsets as Kafka does when the
    // group has moved on (UNKNOWN_MEMBER_ID): librdkafka makes that an abortable error, and
    // the worker must abort the transaction and roll back to the last commit.
    cluster.mock().request_errors(
        RDKafkaApiKey::TxnOffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID],
    );
    blocking(&cluster, |c| c.send(100..200)).await;
    let rolling_back = logged(
        mark,
        &["rolling back to the last commit", "aborted"],
        "that the worker rolls back",
    )
    .await;
    assert!(
        rolling_back.contains("Unknown member"),
        "the rollback names the broker's error: {rolling_back}"
    );
    logged(
        mark,
        &["rolled back to the last commit; processing resumes"],
        "that processing resumes after the rollback",
    )
    .await;

    // The worker goes on: events sent after the rollback are processed once.
    blocking(&cluster, |c| c.send(200..300)).await;
    let output = wait_for_output(&cluster, 200..300, mark).await;
    assert_eq!(health(&worker).await.0, 200, "the worker runs");
    let copies = copies(&output);
    // The events of the aborted transaction (and any processed after it, before the rollback
    // took effect) are processed again: on the mock cluster both copies stay readable. On a
    // broker with transactions the first copy is aborted, invisible to `read_committed`
    // consumers, and each event is seen once.
    let once: Vec<Keyed> = (100..200)
        .map(event)
        .filter(|e| copies.get(e).copied().unwrap_or(0) < 2)
        .collect();
    assert!(
        once.is_empty(),
        "events of the aborted transaction not processed again: {:?}",
        &once[..once.len().min(10)]
    );
    // (On the mock cluster, offsets committed in transactions are dropped, so the rollback
    // starts over from the beginning and the first events are processed again too; on Kafka
    // it starts from the last commit.)
    let lost: Vec<u64> = (0..300)
        .filter(|i| !copies.contains_key(&event(*i)))
        .collect();
    assert!(lost.is_empty(), "events never output: {lost:?}");
    let twice: Vec<Keyed> = (200..300).map(event).filter(|e| copies[e] > 1).collect();
    assert!(
        twice.is_empty(),
        "events sent after the rollback were processed more than once: {twice:?}"
    );
    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_transport_accepts_exactly_once_and_processes_each_event_once() {
    init_logging();
    let app = EosApp::new("eos-embedded", "memory://", None);
    let worker = app.start().await;
    assert_eq!(worker.transport(), "memory");
    const N: u64 = 1_000;
    for i in 0..N {
        let e = event(i);
        app.events
            .send(e)
            .key(e.key)
            .await
            .expect("the embedded broker takes the event");
    }
    let want = per_key((0..N).map(event));
    wait_until_state(
        PROCESSED,
        "every key's count reaches its number of events",
        || app.counts(),
        |counts| counts.values().sum::<u64>() >= N,
    )
    .await;
    assert_eq!(app.counts(), want, "the table counts each event once");
    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
    let output: Vec<Keyed> = common::read_all(&app.app, OUT)
        .iter()
        .map(|m| serde_json::from_slice(m.value.as_deref().unwrap_or_default()).expect("an event"))
        .collect();
    assert_eq!(output.len() as u64, N, "one output per event");
    for key in 0..KEYS {
        let seqs: Vec<u64> = output
            .iter()
            .filter(|e| e.key == key)
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            seqs,
            (0..want[&key]).collect::<Vec<_>>(),
            "the outputs of key {key} in order"
        );
    }
    common::assert_committed_to_end(&app.app, EVENTS);
}
