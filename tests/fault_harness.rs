//! The fault-test harness: an independent producer writes N keyed events with per-key
//! sequence numbers to `fault-events`; three worker processes of `tests/support/fault_worker.rs`
//! forward each event to `fault-out` and count it in the table `counts`; faults are injected
//! while the events flow (workers SIGKILLed and restarted, the broker stopped); then an
//! independent checker reads `fault-out` from the start (plain rdkafka, `read_committed`) and
//! every key's count over HTTP, and prints one line per scenario:
//!
//! ```text
//! scenario=<name> sent=N received=N lost=N duplicated=N table_mismatches=N
//! ```
//!
//! `received` counts output records, `duplicated` the copies beyond the first, `lost` the
//! events sent that never reached the output, and `table_mismatches` the keys whose count is
//! wrong: below the number of events of the key (at-least-once), or different from it
//! (exactly-once).
//!
//! Every scenario runs against Apache Kafka brokers it starts (`tests/common/kafka.rs`): one
//! KRaft node, or three (replication factor 3, `min.insync.replicas=2`) for broker failures.
//!
//! - `at_least_once_on_kafka_survives_ten_sigkills`: nothing lost; duplicates printed.
//! - `exactly_once_survives_ten_sigkills`: nothing lost, nothing duplicated, every count exact,
//!   with the workers' `--processing-guarantee exactly_once` and a stable `--worker-id` per
//!   worker slot (a restarted worker fences the one it replaces).
//! - `a_worker_killed_between_producing_and_committing_is_redone_once`,
//!   `a_paused_zombie_worker_is_fenced` and `an_aborted_transaction_leaves_no_output`:
//!   exactly-once at the moments it is built for.
//! - `the_mock_cluster_does_not_implement_transaction_semantics` and
//!   `kafka_implements_transaction_semantics`: the same probe on both: records of aborted
//!   transactions hidden from `read_committed` readers, offsets sent to a transaction
//!   committed, and a second producer with the same transactional id fencing the first. The
//!   mock cluster (hosted in a process of its own, `tests/support/mock_cluster.rs`) implements
//!   none of them, so exactly-once is verified on Kafka only.
//! - `nothing_is_lost_when_kafka_restarts_after_20_seconds`: the broker is SIGKILLed and away
//!   for 20 s while events flow.
//! - `leader_broker_killed_*` and `rolling_broker_restart_*` (three brokers): the leader of the
//!   most partitions SIGKILLed mid-stream, and each broker restarted in turn under load, with
//!   at-least-once and with exactly-once.
//!
//! Run: `cargo test --test fault_harness -- --nocapture` (the scenarios run one at a time).
//! With `RILL_FAULT_SUPERVISE=1`, the scenarios on three brokers start a worker that stopped by
//! itself again, as a supervisor would, instead of failing: that checks their data alone. (No
//! worker should stop: one whose producer the brokers fence in a broker failure replaces it and
//! rolls back.)
//! The worker and mock-cluster binaries are built first if needed. `RILL_FAULT_SEED` replays
//! the kills of an earlier run (each scenario prints its seed).

mod common;

use common::kafka::{leader_of, scratch_dir, signal, Kafka};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const APP: &str = "rill-fault";
const EVENTS: &str = "fault-events";
const OUT: &str = "fault-out";
const TABLE: &str = "counts";
const PARTITIONS: u32 = 6;
const WORKERS: usize = 3;
const KEYS: u64 = 100;
const KILL_ROUNDS: usize = 10;

/// One scenario at a time: each runs a broker and three workers, a lot for a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// An input (and output) event: `seq` numbers the events of one key from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct FaultEvent {
    key: u64,
    seq: u64,
}

/// The `i`-th event produced: keys take turns, so every key's events span the whole run.
fn event(i: u64) -> FaultEvent {
    FaultEvent {
        key: i % KEYS,
        seq: i / KEYS,
    }
}

/// A small deterministic RNG (SplitMix64): the kill schedule is replayable from its seed.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Self {
        let seed = std::env::var("RILL_FAULT_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        Rng(seed)
    }

    fn seed(&self) -> u64 {
        self.0
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a scenario runs against.
#[derive(Clone)]
struct Setup {
    name: &'static str,
    dir: PathBuf,
    /// `host:port[,host:port]`.
    bootstrap: String,
    /// `at_least_once` or `exactly_once`, the workers' `--processing-guarantee`.
    guarantee: &'static str,
    /// Settings for the workers' Kafka clients and rill's own (`RILL_KAFKA_*`).
    env: Vec<(&'static str, &'static str)>,
    /// Whether the independent producer is idempotent (no duplicated input on retries).
    idempotent_producer: bool,
    events: u64,
    /// Appended to the app id and the topic names (the workers' `RILL_FAULT_NAMESPACE`): empty
    /// on a broker the scenario starts, unique per run on one that outlives it.
    namespace: String,
    /// Whether a worker may stop by itself (an exactly-once worker whose producer was fenced
    /// does): it is then started again, as its supervisor would. Otherwise that fails the test.
    restart_stopped: bool,
}

impl Setup {
    fn exactly_once(&self) -> bool {
        self.guarantee == "exactly_once"
    }

    /// The app id, which is also its consumer group.
    fn app(&self) -> String {
        format!("{APP}{}", self.namespace)
    }

    /// The input topic.
    fn events_topic(&self) -> String {
        format!("{EVENTS}{}", self.namespace)
    }

    /// The output topic.
    fn out_topic(&self) -> String {
        format!("{OUT}{}", self.namespace)
    }
}

/// `target/debug/examples/NAME`, built (once per test process) with the examples this file
/// needs: `cargo test` builds examples, but `cargo test --test fault_harness` alone does not.
fn example_binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    BUILT.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--example",
            "fault_worker",
            "--example",
            "mock_cluster",
        ]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the harness's examples");
        assert!(status.success(), "cargo build of the examples failed");
    });
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --example {name}`",
        binary.display()
    );
    binary
}

/// The last lines of a log file, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A `fault_worker` process and the address of its web server. Killed when dropped.
struct FaultWorker {
    name: String,
    log: PathBuf,
    child: Child,
    web: SocketAddr,
}

impl FaultWorker {
    fn start(setup: &Setup, name: &str, generation: usize) -> Self {
        let log = setup.dir.join(format!("{name}.{generation}.log"));
        let mut cmd = Command::new(example_binary("fault_worker"));
        cmd.args([
            "worker",
            "--broker",
            &format!("kafka://{}", setup.bootstrap),
        ])
        .args(["--web-port", "0", "-l", "info"])
        .args(["--processing-guarantee", setup.guarantee])
        // The same name for every process of a slot: with exactly-once, a restarted worker
        // fences the one it replaces (aborting the transaction it left open) at once.
        .args(["--worker-id", name])
        .env("RILL_FAULT_PARTITIONS", PARTITIONS.to_string())
        .env("RILL_FAULT_NAMESPACE", &setup.namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("worker log"));
        for (k, v) in &setup.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start fault_worker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.split("http://").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let web = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(url) => break url.parse().expect("a web address"),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                // stdout closed without an address: the worker is exiting.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "worker {name} exited with {status} before it was ready; {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "worker {name} did not print its web address within 60 s; {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                );
            }
        };
        FaultWorker {
            name: name.to_owned(),
            log,
            child,
            web,
        }
    }

    /// The exit status, if the worker exited without being killed.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails the test if the worker exited without being killed.
    fn check_alive(&mut self) {
        if let Some(status) = self.exited() {
            panic!(
                "worker {} exited by itself with {status}; {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FaultWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The three workers of a scenario.
struct Workers {
    setup: Setup,
    list: Vec<FaultWorker>,
    generations: Vec<usize>,
    /// Workers that stopped by themselves and were started again (`Setup::restart_stopped`).
    stopped_by_themselves: Vec<String>,
}

impl Workers {
    fn start(setup: &Setup) -> Self {
        let list = (0..WORKERS)
            .map(|i| FaultWorker::start(setup, &format!("w{i}"), 0))
            .collect();
        Workers {
            setup: setup.clone(),
            list,
            generations: vec![0; WORKERS],
            stopped_by_themselves: Vec::new(),
        }
    }

    /// Fails the test if a worker exited without being killed, unless the scenario lets
    /// workers stop by themselves: then starts it again.
    fn check_alive(&mut self) {
        for i in 0..self.list.len() {
            if !self.setup.restart_stopped {
                self.list[i].check_alive();
                continue;
            }
            if let Some(status) = self.list[i].exited() {
                let why = tail(&self.list[i].log, 3);
                println!(
                    "scenario={} w{i} stopped by itself ({status}), started again; its log \
                     ends with:\n{why}",
                    self.setup.name
                );
                self.stopped_by_themselves.push(format!("w{i}: {status}"));
                let setup = self.setup.clone();
                self.kill_and_restart(&setup, i);
            }
        }
    }

    /// SIGKILLs worker `i` and starts a new process in its place.
    fn kill_and_restart(&mut self, setup: &Setup, i: usize) {
        self.list[i].kill();
        self.generations[i] += 1;
        self.list[i] = FaultWorker::start(setup, &format!("w{i}"), self.generations[i]);
    }

    fn webs(&self) -> Vec<SocketAddr> {
        self.list.iter().map(|w| w.web).collect()
    }

    /// Waits until the workers hold every partition of the table between them.
    fn wait_until_all_partitions_held(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive();
            let held = holders(&self.webs());
            if held.len() == PARTITIONS as usize {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the workers did not hold all {PARTITIONS} partitions within {timeout:?}; \
                 held: {held:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A blocking HTTP/1.1 GET with timeouts: status and body, or `None` if the worker did not
/// answer.
fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Which worker (web address) holds each partition of the table, from `GET /tables`.
fn holders(webs: &[SocketAddr]) -> BTreeMap<u32, SocketAddr> {
    let mut held = BTreeMap::new();
    for &web in webs {
        let Some((200, body)) = try_http_get(web, "/tables") else {
            continue;
        };
        let Ok(tables) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        let Some(table) = tables
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == TABLE))
        else {
            continue;
        };
        for p in table["local_partitions"].as_array().into_iter().flatten() {
            if let Some(p) = p.as_u64() {
                held.insert(p as u32, web);
            }
        }
    }
    held
}

/// Counts the events the broker did not take.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("{}[{}]: {e}", m.topic(), m.partition()));
        }
    }
}

/// The independent producer: writes events `0..setup.events` to `fault-events`, spread
/// evenly over `over`, keyed by the key's decimal text with Kafka's Java partitioner (murmur2),
/// then waits until the log has them all. Stops early, without waiting, when `stop` is set.
/// Returns how many events were produced.
fn produce(setup: &Setup, over: Duration, stop: &AtomicBool) -> u64 {
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &setup.bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set(
            "enable.idempotence",
            if setup.idempotent_producer {
                "true"
            } else {
                "false"
            },
        )
        .create_with_context(Deliveries::default())
        .expect("producer");
    const STEPS: u64 = 200;
    let topic = setup.events_topic();
    let started = Instant::now();
    let total = setup.events;
    for step in 0..STEPS {
        for i in step * total / STEPS..(step + 1) * total / STEPS {
            let e = event(i);
            let key = e.key.to_string();
            let value = serde_json::to_vec(&e).expect("encode an event");
            let mut record = BaseRecord::to(&topic).key(&key).payload(&value);
            loop {
                if stop.load(Ordering::Relaxed) {
                    return i;
                }
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        // The pace of the scenario, not a wait for a condition.
        let due = started + over.mul_f64((step + 1) as f64 / STEPS as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return total;
        }
        producer.poll(Duration::from_millis(100));
    }
    producer
        .flush(Duration::from_secs(1))
        .expect("the producer's events are all in the log within 120 s");
    let deliveries = producer.context();
    let failed = deliveries.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "the independent producer could not write {failed} events; last: {:?}",
        deliveries
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    );
    total
}

/// Sets a flag when dropped, also on panic: stops the producer thread.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn client(setup: &Setup, group: &str) -> BaseConsumer {
    consumer(&setup.bootstrap, group)
}

/// A `read_committed` consumer in `group` that reports the end of each partition.
fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("checker consumer")
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> u32 {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as u32)
        .unwrap_or(0);
    assert!(n > 0, "topic {topic} does not exist");
    n
}

/// Waits until the app's group has committed every partition of `fault-events` up to its end:
/// every event is processed, its outputs and table changes are durable, and nothing will be
/// processed again. Returns the state seen last if that does not happen within `timeout`.
fn wait_until_committed(
    setup: &Setup,
    workers: &mut Workers,
    timeout: Duration,
) -> Result<(), String> {
    let consumer = client(setup, &setup.app());
    let events = setup.events_topic();
    let partitions = partition_count(&consumer, &events);
    let deadline = Instant::now() + timeout;
    loop {
        workers.check_alive();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&events, p as i32);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10));
        let mut behind = Vec::new();
        for p in 0..partitions {
            let end = consumer
                .fetch_watermarks(&events, p as i32, Duration::from_secs(10))
                .map(|(_, high)| high)
                .unwrap_or(-1);
            let at = committed
                .as_ref()
                .ok()
                .and_then(|c| c.find_partition(&events, p as i32))
                .map(|e| e.offset());
            let at = match at {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            if end < 0 || at < end {
                behind.push(format!("{events}[{p}] committed {at} of {end}"));
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(behind.join(", "));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every event in `topic`, read from the start with `read_committed` until each partition's
/// end; `Err` with what was read if that takes longer than `timeout`.
fn read_topic(
    setup: &Setup,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<FaultEvent>, Vec<FaultEvent>> {
    let consumer = client(setup, &format!("rill-fault-checker-{}", std::process::id()));
    let partitions = partition_count(&consumer, topic);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    let mut at_end = vec![false; partitions as usize];
    let mut events = Vec::new();
    let deadline = Instant::now() + timeout;
    while !at_end.iter().all(|&e| e) {
        if Instant::now() >= deadline {
            return Err(events);
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                at_end[m.partition() as usize] = false;
                let e: FaultEvent = m
                    .payload()
                    .and_then(|v| serde_json::from_slice(v).ok())
                    .unwrap_or_else(|| {
                        panic!(
                            "{topic}[{}]@{} is not an event: {:?}",
                            m.partition(),
                            m.offset(),
                            m.payload().map(String::from_utf8_lossy)
                        )
                    });
                events.push(e);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => at_end[p as usize] = true,
            Some(Err(e)) => eprintln!("checker: {topic}: {e}"),
            None => {}
        }
    }
    Ok(events)
}

/// Each key's count in the table, asked over HTTP of the worker that holds the key's
/// partition (`None`: no worker answered it within `timeout`).
fn table_counts(workers: &mut Workers, timeout: Duration) -> BTreeMap<u64, Option<u64>> {
    let mut counts: BTreeMap<u64, Option<u64>> = (0..KEYS).map(|k| (k, None)).collect();
    let deadline = Instant::now() + timeout;
    loop {
        workers.check_alive();
        let webs = workers.webs();
        let held = holders(&webs);
        for (key, count) in counts.iter_mut().filter(|(_, c)| c.is_none()) {
            let p = common::kafka_partition(key.to_string().as_bytes(), PARTITIONS);
            // The holder answers from its own copy; any other worker forwards to it.
            let web = held
                .get(&p)
                .copied()
                .unwrap_or(webs[*key as usize % webs.len()]);
            *count = match try_http_get(web, &format!("/tables/{TABLE}/{key}")) {
                Some((200, body)) => body.trim().parse().ok(),
                // The holder says it has no such key: nothing was counted.
                Some((404, _)) if held.get(&p) == Some(&web) => Some(0),
                _ => None,
            };
        }
        if counts.values().all(Option::is_some) || Instant::now() >= deadline {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the checker found.
#[derive(Debug, Default)]
struct Summary {
    sent: u64,
    received: u64,
    lost: u64,
    duplicated: u64,
    table_mismatches: u64,
    /// A few of each, for failure messages.
    lost_examples: Vec<FaultEvent>,
    mismatch_examples: Vec<String>,
    /// Output records that are no event the producer sent.
    unexpected: u64,
    /// Keys counted more often than they have events (allowed at-least-once).
    overcounted: u64,
    /// Events in `fault-events` more than once (the producer retried): not rill's duplicates.
    input_duplicates: u64,
    /// Where the checker gave up waiting, if it did.
    incomplete: Vec<String>,
    /// Workers that stopped by themselves and were started again.
    stopped_by_themselves: Vec<String>,
}

impl Summary {
    fn line(&self, name: &str) -> String {
        format!(
            "scenario={name} sent={} received={} lost={} duplicated={} table_mismatches={}",
            self.sent, self.received, self.lost, self.duplicated, self.table_mismatches
        )
    }

    fn details(&self) -> String {
        format!(
            "lost e.g. {:?}; table mismatches e.g. {:?}; unexpected outputs {}; keys \
             overcounted {}; input duplicates {}; incomplete: {:?}",
            self.lost_examples,
            self.mismatch_examples,
            self.unexpected,
            self.overcounted,
            self.input_duplicates,
            self.incomplete
        )
    }
}

/// Reads the output, the input and the table once the workers are done, and compares them
/// with the `sent` events produced.
fn check(setup: &Setup, workers: &mut Workers, sent: u64) -> Summary {
    let mut s = Summary {
        sent,
        ..Summary::default()
    };
    let started = Instant::now();
    if let Err(behind) = wait_until_committed(setup, workers, Duration::from_secs(90)) {
        s.incomplete
            .push(format!("the group did not commit to the end: {behind}"));
    }
    let (out, events) = (setup.out_topic(), setup.events_topic());
    let output = read_topic(setup, &out, Duration::from_secs(60)).unwrap_or_else(|partial| {
        s.incomplete
            .push(format!("{out} not read to its end within 60 s"));
        partial
    });
    let input = read_topic(setup, &events, Duration::from_secs(60)).unwrap_or_else(|partial| {
        s.incomplete
            .push(format!("{events} not read to its end within 60 s"));
        partial
    });
    let sent_events: BTreeSet<FaultEvent> = (0..sent).map(event).collect();
    s.input_duplicates = input.len() as u64 - input.iter().collect::<BTreeSet<_>>().len() as u64;

    let mut copies: BTreeMap<FaultEvent, u64> = BTreeMap::new();
    for e in &output {
        *copies.entry(*e).or_default() += 1;
    }
    s.received = output.len() as u64;
    s.duplicated = copies.values().map(|n| n - 1).sum();
    s.unexpected = copies.keys().filter(|e| !sent_events.contains(e)).count() as u64;
    let lost: Vec<FaultEvent> = sent_events
        .iter()
        .filter(|e| !copies.contains_key(e))
        .copied()
        .collect();
    s.lost = lost.len() as u64;
    s.lost_examples = lost.into_iter().take(10).collect();

    let mut per_key: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &sent_events {
        *per_key.entry(e.key).or_default() += 1;
    }
    let counts = table_counts(workers, Duration::from_secs(60));
    for (key, count) in counts {
        let want = per_key.get(&key).copied().unwrap_or(0);
        let wrong = match count {
            None => true,
            Some(n) if setup.exactly_once() => n != want,
            Some(n) => n < want,
        };
        if count.is_some_and(|n| n > want) {
            s.overcounted += 1;
        }
        if wrong {
            s.table_mismatches += 1;
            if s.mismatch_examples.len() < 10 {
                s.mismatch_examples
                    .push(format!("key {key}: count {count:?}, {want} events"));
            }
        }
    }
    println!(
        "scenario={} checked in {:.1} s; {}",
        setup.name,
        started.elapsed().as_secs_f64(),
        s.details()
    );
    s
}

/// Runs a scenario: three workers, the producer spreading the events over `produce_over`
/// while `faults` runs, then the checker. Prints the summary line.
fn run(setup: &Setup, produce_over: Duration, faults: impl FnOnce(&mut Workers)) -> Summary {
    let started = Instant::now();
    let mut workers = Workers::start(setup);
    workers.wait_until_all_partitions_held(Duration::from_secs(120));
    println!(
        "scenario={} workers ready in {:.1} s",
        setup.name,
        started.elapsed().as_secs_f64()
    );
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(setup, produce_over, &stop));
        let _stop = StopOnDrop(&stop);
        faults(&mut workers);
        producer
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    workers.check_alive();
    let mut summary = check(setup, &mut workers, sent);
    summary.stopped_by_themselves = workers.stopped_by_themselves.clone();
    println!(
        "{} ({:.1} s)",
        summary.line(setup.name),
        started.elapsed().as_secs_f64()
    );
    summary
}

/// SIGKILLs a random worker and starts it again, every `interval`, `KILL_ROUNDS` times.
fn kill_rounds(setup: &Setup, interval: Duration) -> impl FnOnce(&mut Workers) + '_ {
    move |workers| {
        let mut rng = Rng::from_env_or_clock();
        println!(
            "scenario={} seed={} (RILL_FAULT_SEED replays it)",
            setup.name,
            rng.seed()
        );
        for round in 1..=KILL_ROUNDS {
            // The scenario's schedule, not a wait for a condition.
            std::thread::sleep(interval);
            workers.check_alive();
            let i = rng.below(WORKERS as u64) as usize;
            let t = Instant::now();
            workers.kill_and_restart(setup, i);
            println!(
                "scenario={} round {round}: SIGKILLed w{i}, restarted in {:.1} s",
                setup.name,
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// The workers' client settings: a short session, so that the partitions of a SIGKILLed
/// worker move on after 6 s.
const KAFKA_ENV: [(&str, &str); 2] = [
    ("RILL_KAFKA_SESSION_TIMEOUT_MS", "6000"),
    ("RILL_KAFKA_HEARTBEAT_INTERVAL_MS", "500"),
];

fn assert_nothing_lost(setup: &Setup, s: &Summary) {
    assert_eq!(
        s.lost,
        0,
        "scenario {}: {} of {} events never reached {}; {} (logs in {})",
        setup.name,
        s.lost,
        s.sent,
        setup.out_topic(),
        s.details(),
        setup.dir.display()
    );
    assert_eq!(
        s.unexpected,
        0,
        "scenario {}: {} holds events nobody sent",
        setup.name,
        setup.out_topic()
    );
}

#[test]
fn at_least_once_on_kafka_survives_ten_sigkills() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("fault-alo");
    let kafka = Kafka::single(&dir);
    let setup = Setup {
        name: "at_least_once_kafka_sigkill",
        dir: dir.clone(),
        bootstrap: kafka.addr(),
        guarantee: "at_least_once",
        env: KAFKA_ENV.to_vec(),
        idempotent_producer: false,
        events: 30_000,
        namespace: String::new(),
        restart_stopped: false,
    };
    // Shorter than the session timeout (6 s): a worker may be killed while the group still
    // waits for the last one killed.
    let interval = Duration::from_secs(5);
    let s = run(
        &setup,
        interval * KILL_ROUNDS as u32,
        kill_rounds(&setup, interval),
    );
    assert_nothing_lost(&setup, &s);
    assert_eq!(
        s.table_mismatches,
        0,
        "scenario {}: keys counted fewer times than they have events; {} (logs in {})",
        setup.name,
        s.details(),
        dir.display()
    );
    drop(kafka);
}

/// A `mock_cluster` process (librdkafka's mock cluster, as a process of its own serves
/// workers in other processes); killed when dropped.
struct MockClusterProcess {
    child: Child,
    bootstrap: String,
}

impl MockClusterProcess {
    fn start(dir: &Path) -> Self {
        let log = dir.join("mock_cluster.log");
        let mut cmd = Command::new(example_binary("mock_cluster"));
        // The mock brokers do not answer CreateTopics: the probe's topic is made here.
        cmd.args(["--brokers", "3", "--topic", &format!("{PROBE_TOPIC}:1")]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("mock cluster log"))
            .spawn()
            .expect("start mock_cluster");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let bootstrap = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut process = MockClusterProcess { child, bootstrap };
        if process.bootstrap.is_empty() {
            process.kill();
            panic!(
                "the mock cluster did not print its address within 30 s:\n{}",
                tail(&log, 30)
            );
        }
        process
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MockClusterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

const PROBE_TOPIC: &str = "fault-txn-probe";

/// What the probe of a broker's transactions saw (`true`: as Kafka does).
#[derive(Debug, PartialEq, Eq)]
struct Transactions {
    /// A `read_committed` reader does not see the record of an aborted transaction.
    aborted_records_hidden: bool,
    /// Offsets sent to a committed transaction become the group's committed offsets.
    offsets_committed: bool,
    /// A producer that starts with the transactional id of another fences it: the other's
    /// next transaction fails.
    same_id_fences: bool,
}

/// Tries Kafka's transactions on the brokers at `bootstrap`, as a client of them: a record of
/// an aborted transaction must stay hidden from `read_committed` readers, offsets sent to a
/// committed transaction must become the group's committed offsets, and a second producer
/// with the same transactional id must fence the first. `Err` if a transaction fails.
fn probe_transactions(bootstrap: &str) -> Result<Transactions, String> {
    let transactional = || -> Result<BaseProducer, String> {
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", "fault-txn-probe")
            .create()
            .map_err(|e| format!("a transactional producer: {e}"))
    };
    let producer = transactional()?;
    let timeout = Duration::from_secs(30);
    let group = "fault-txn-probe-group";
    let consumer = consumer(bootstrap, group);
    let meta = consumer
        .group_metadata()
        .ok_or("the consumer has no group metadata")?;
    producer
        .init_transactions(timeout)
        .map_err(|e| e.to_string())?;
    producer.begin_transaction().map_err(|e| e.to_string())?;
    producer
        .send(BaseRecord::<str, str>::to(PROBE_TOPIC).payload("aborted"))
        .map_err(|(e, _)| e.to_string())?;
    producer.flush(timeout).map_err(|e| e.to_string())?;
    producer
        .abort_transaction(timeout)
        .map_err(|e| e.to_string())?;
    producer.begin_transaction().map_err(|e| e.to_string())?;
    producer
        .send(BaseRecord::<str, str>::to(PROBE_TOPIC).payload("committed"))
        .map_err(|(e, _)| e.to_string())?;
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(PROBE_TOPIC, 0, Offset::Offset(1))
        .map_err(|e| e.to_string())?;
    producer
        .send_offsets_to_transaction(&offsets, &meta, timeout)
        .map_err(|e| e.to_string())?;
    producer
        .commit_transaction(timeout)
        .map_err(|e| e.to_string())?;

    let reader = self::consumer(bootstrap, "fault-txn-probe-reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(PROBE_TOPIC, 0, Offset::Beginning)
        .map_err(|e| e.to_string())?;
    reader.assign(&tpl).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "{PROBE_TOPIC} not read to its end within 30 s; read {seen:?}"
            ));
        }
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    if !seen.iter().any(|v| v == "committed") {
        return Err(format!(
            "the committed record is not in {PROBE_TOPIC}: read {seen:?}"
        ));
    }

    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(PROBE_TOPIC, 0);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| e.to_string())?
        .find_partition(PROBE_TOPIC, 0)
        .map(|e| e.offset());

    // A newer producer with the same transactional id; then the first one's next transaction.
    let newer = transactional()?;
    newer
        .init_transactions(timeout)
        .map_err(|e| e.to_string())?;
    let old_goes_on = producer.begin_transaction().is_ok()
        && producer
            .send(BaseRecord::<str, str>::to(PROBE_TOPIC).payload("after the fence"))
            .is_ok()
        && producer.commit_transaction(timeout).is_ok();

    Ok(Transactions {
        aborted_records_hidden: !seen.iter().any(|v| v == "aborted"),
        offsets_committed: committed == Some(Offset::Offset(1)),
        same_id_fences: !old_goes_on,
    })
}

/// librdkafka's mock cluster (librdkafka 2.12.1) accepts the requests of transactions but
/// implements none of their effects: the records of aborted transactions stay visible to
/// `read_committed` readers, offsets sent to a transaction are dropped, and a producer with the
/// transactional id of another does not fence it. That is why the exactly-once scenario needs
/// a real broker, and why `tests/exactly_once_behavior.rs` injects the errors Kafka would
/// answer. If this fails, a newer librdkafka implements some of them: the exactly-once tests
/// may then run on the mock cluster.
#[test]
fn the_mock_cluster_does_not_implement_transaction_semantics() {
    let dir = scratch_dir("fault-txn-probe");
    let mock = MockClusterProcess::start(&dir);
    let seen = probe_transactions(&mock.bootstrap)
        .unwrap_or_else(|e| panic!("the mock cluster refuses a transaction: {e}"));
    assert_eq!(
        seen,
        Transactions {
            aborted_records_hidden: false,
            offsets_committed: false,
            same_id_fences: false,
        },
        "the mock cluster implements some of the transactions' effects now"
    );
    drop(mock);
}

/// Kafka implements what the mock cluster lacks (the same probe): the exactly-once scenarios
/// below check rill against transactions that take effect.
#[test]
fn kafka_implements_transaction_semantics() {
    let dir = scratch_dir("fault-txn-probe-kafka");
    let kafka = Kafka::single(&dir);
    let seen = probe_transactions(&kafka.addr())
        .unwrap_or_else(|e| panic!("Kafka refuses a transaction: {e}"));
    assert_eq!(
        seen,
        Transactions {
            aborted_records_hidden: true,
            offsets_committed: true,
            same_id_fences: true,
        },
        "Kafka does not implement the transactions' effects as expected"
    );
    drop(kafka);
}

/// The workers' settings with exactly-once: a short session (the partitions of a SIGKILLed
/// worker move on after 6 s).
const EOS_ENV: [(&str, &str); 2] = [
    ("RILL_KAFKA_SESSION_TIMEOUT_MS", "6000"),
    ("RILL_KAFKA_HEARTBEAT_INTERVAL_MS", "1000"),
];

/// Asserts the exactly-once outcome: nothing lost, nothing duplicated in what `read_committed`
/// readers see, every count exact.
fn assert_exactly_once(setup: &Setup, s: &Summary) {
    assert_nothing_lost(setup, s);
    assert_eq!(
        s.duplicated,
        0,
        "scenario {}: {} duplicated outputs under exactly-once; {} (logs in {})",
        setup.name,
        s.duplicated,
        s.details(),
        setup.dir.display()
    );
    assert_eq!(
        s.table_mismatches,
        0,
        "scenario {}: table counts differ from the events under exactly-once; {} (logs in {})",
        setup.name,
        s.details(),
        setup.dir.display()
    );
}

/// Exactly-once under SIGKILLs: nothing lost, nothing duplicated in what `read_committed`
/// readers see, every count exact.
#[test]
fn exactly_once_survives_ten_sigkills() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("fault-eos");
    let kafka = Kafka::single(&dir);
    let setup = Setup {
        name: "exactly_once_kafka_sigkill",
        dir: dir.clone(),
        bootstrap: kafka.addr(),
        guarantee: "exactly_once",
        env: EOS_ENV.to_vec(),
        idempotent_producer: true,
        events: 20_000,
        namespace: String::new(),
        restart_stopped: false,
    };
    let interval = Duration::from_secs(4);
    let s = run(
        &setup,
        interval * KILL_ROUNDS as u32,
        kill_rounds(&setup, interval),
    );
    assert_exactly_once(&setup, &s);
    drop(kafka);
}

/// Every worker's session expires during the outage, so the group takes their partitions
/// without a handover and, once the broker is back, gives them out again while some workers
/// are still rejoining (they move twice in a few seconds). What a worker had queued for its
/// lost partitions must never reach the changelog after their new owner's writes: it once did
/// (the broker took a worker's queued table changes from before the outage after another
/// worker had counted on; those keys came out counted short, e.g. 50 of 200).
#[test]
fn nothing_is_lost_when_kafka_restarts_after_20_seconds() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("fault-restart");
    // The broker's log directories outlive its process: the data survives the restart.
    let mut kafka = Kafka::single(&dir);
    let setup = Setup {
        name: "at_least_once_kafka_restart",
        dir: dir.clone(),
        bootstrap: kafka.addr(),
        guarantee: "at_least_once",
        env: KAFKA_ENV.to_vec(),
        idempotent_producer: false,
        events: 20_000,
        namespace: String::new(),
        restart_stopped: false,
    };
    let s = run(&setup, Duration::from_secs(40), |workers| {
        // The scenario's schedule: 10 s of events, the broker away for 20 s (events produced
        // meanwhile wait in the producer), then the rest.
        std::thread::sleep(Duration::from_secs(10));
        workers.check_alive();
        kafka.kill(0);
        println!("scenario={} broker SIGKILLed", setup.name);
        std::thread::sleep(Duration::from_secs(20));
        kafka.restart(0);
        println!("scenario={} broker restarted", setup.name);
    });
    assert_nothing_lost(&setup, &s);
    assert_eq!(
        s.table_mismatches,
        0,
        "scenario {}: keys counted fewer times than they have events; {} (logs in {})",
        setup.name,
        s.details(),
        dir.display()
    );
    drop(kafka);
}

/// Per partition of the output topic, how many offsets lie beyond its last stable offset:
/// records of transactions still open (what `read_uncommitted` readers see beyond what
/// `read_committed` readers may read yet).
fn open_transaction_offsets(setup: &Setup) -> BTreeMap<i32, i64> {
    let topic = setup.out_topic();
    let committed = client(setup, "rill-fault-lso");
    let uncommitted: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &setup.bootstrap)
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("read_uncommitted client");
    let Ok(md) = committed.fetch_metadata(Some(&topic), Duration::from_secs(5)) else {
        return BTreeMap::new();
    };
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    let mut open = BTreeMap::new();
    for p in 0..partitions {
        let timeout = Duration::from_secs(5);
        // ListOffsets answers the last stable offset to a `read_committed` client.
        let stable = committed.fetch_watermarks(&topic, p, timeout);
        let high = uncommitted.fetch_watermarks(&topic, p, timeout);
        if let (Ok((_, stable)), Ok((_, high))) = (stable, high) {
            if high > stable {
                open.insert(p, high - stable);
            }
        }
    }
    open
}

/// Waits (bounded) until records of an open transaction are in the output topic.
fn wait_for_open_transaction(setup: &Setup, workers: &mut Workers) -> BTreeMap<i32, i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        workers.check_alive();
        let open = open_transaction_offsets(setup);
        if !open.is_empty() {
            return open;
        }
        assert!(
            Instant::now() < deadline,
            "scenario {}: no open transaction with records in {} within 30 s",
            setup.name,
            setup.out_topic()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until records of an open transaction are in the output topic while every
/// worker is frozen (SIGSTOP), and returns them with the workers still frozen. Commits come
/// every 100 ms and take a few: a transaction seen open may be committed before the workers
/// are killed, so the workers are frozen first, and looked at again once what they had sent
/// before the freeze has reached the broker (two looks in a row agree).
fn freeze_with_open_transaction(setup: &Setup, workers: &mut Workers) -> BTreeMap<i32, i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        wait_for_open_transaction(setup, workers);
        let pids: Vec<u32> = workers.list.iter().map(|w| w.child.id()).collect();
        for pid in &pids {
            signal(*pid, "STOP");
        }
        let mut open = open_transaction_offsets(setup);
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            let again = open_transaction_offsets(setup);
            if again == open {
                break;
            }
            open = again;
        }
        if !open.is_empty() {
            return open;
        }
        for pid in &pids {
            signal(*pid, "CONT");
        }
        assert!(
            Instant::now() < deadline,
            "scenario {}: the workers were never frozen with a transaction open within 60 s",
            setup.name
        );
    }
}

/// A setup for the exactly-once scenarios on one broker.
fn exactly_once_setup(name: &'static str, dir: &Path, kafka: &Kafka, events: u64) -> Setup {
    Setup {
        name,
        dir: dir.to_owned(),
        bootstrap: kafka.bootstrap(),
        guarantee: "exactly_once",
        env: EOS_ENV.to_vec(),
        idempotent_producer: true,
        events,
        namespace: String::new(),
        restart_stopped: false,
    }
}

/// Workers SIGKILLed while a transaction of theirs has records in the output topic and is not
/// committed: the transaction stays open after the kill (it was never committed), the
/// restarted workers abort it, and its events are processed again exactly once.
#[test]
fn a_worker_killed_between_producing_and_committing_is_redone_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("fault-eos-uncommitted");
    let kafka = Kafka::single(&dir);
    let setup = exactly_once_setup(
        "exactly_once_kafka_kill_before_commit",
        &dir,
        &kafka,
        10_000,
    );
    let s = run(&setup, Duration::from_secs(30), |workers| {
        for round in 1..=3 {
            // The scenario's schedule, not a wait for a condition.
            std::thread::sleep(Duration::from_secs(5));
            let open = freeze_with_open_transaction(&setup, workers);
            for w in &mut workers.list {
                w.kill();
            }
            // Nobody can commit it now: still open means it was killed before committing.
            let still_open = open_transaction_offsets(&setup);
            println!(
                "scenario={} round {round}: SIGKILLed every worker with transactions open in \
                 {} (offsets per partition: {open:?}; after the kill: {still_open:?})",
                setup.name,
                setup.out_topic()
            );
            assert!(
                !still_open.is_empty(),
                "scenario {}: the open transaction was committed in the moment before the kill",
                setup.name
            );
            for i in 0..WORKERS {
                workers.generations[i] += 1;
                workers.list[i] =
                    FaultWorker::start(&setup, &format!("w{i}"), workers.generations[i]);
            }
        }
    });
    assert_exactly_once(&setup, &s);
    drop(kafka);
}

/// A worker paused (SIGSTOP) past its session timeout while its transaction is open: the
/// group moves its partitions to the others, which process its events; resumed (SIGCONT), the
/// zombie's transaction must not commit (it is fenced: its group generation is stale), so
/// nothing is duplicated. It may stop by itself when fenced; it is then started again.
#[test]
fn a_paused_zombie_worker_is_fenced() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("fault-eos-zombie");
    let kafka = Kafka::single(&dir);
    let mut setup = exactly_once_setup("exactly_once_kafka_zombie", &dir, &kafka, 10_000);
    setup.restart_stopped = true;
    let s = run(&setup, Duration::from_secs(30), |workers| {
        // The scenario's schedule, not a wait for a condition.
        std::thread::sleep(Duration::from_secs(6));
        wait_for_open_transaction(&setup, workers);
        let zombie = workers.list[0].child.id();
        signal(zombie, "STOP");
        let paused = Instant::now();
        println!("scenario={} SIGSTOPped w0 (pid {zombie})", setup.name);
        // Until the two others hold every partition: w0's session expired and the group
        // rebalanced without it.
        let others = workers.webs()[1..].to_vec();
        let deadline = Instant::now() + Duration::from_secs(90);
        while holders(&others).len() < PARTITIONS as usize {
            if Instant::now() >= deadline {
                signal(zombie, "CONT");
                panic!(
                    "scenario {}: the other workers did not take over w0's partitions within \
                     90 s",
                    setup.name
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "scenario={} w1 and w2 hold every partition {:.1} s after the pause; SIGCONT w0",
            setup.name,
            paused.elapsed().as_secs_f64()
        );
        signal(zombie, "CONT");
    });
    assert_exactly_once(&setup, &s);
    drop(kafka);
}

/// Transactions aborted mid-way by the broker: while they have records in the output topic,
/// producers with the workers' transactional ids (`<app id>-<worker id>`) start, which aborts
/// the open transactions and fences the workers. Their records must stay invisible to
/// `read_committed` readers and their events be processed again, once; the fenced workers
/// stop by themselves and are started again.
#[test]
fn an_aborted_transaction_leaves_no_output() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("fault-eos-abort");
    let kafka = Kafka::single(&dir);
    let mut setup = exactly_once_setup("exactly_once_kafka_aborted", &dir, &kafka, 10_000);
    setup.restart_stopped = true;
    let s = run(&setup, Duration::from_secs(30), |workers| {
        // The scenario's schedule, not a wait for a condition.
        std::thread::sleep(Duration::from_secs(8));
        let open = wait_for_open_transaction(&setup, workers);
        let fencers: Vec<BaseProducer> = (0..WORKERS)
            .map(|i| {
                let fencer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &setup.bootstrap)
                    .set("transactional.id", format!("{}-w{i}", setup.app()))
                    .create()
                    .expect("a transactional producer");
                fencer
                    .init_transactions(Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("fencing w{i}'s transactional id: {e}"));
                fencer
            })
            .collect();
        let after = open_transaction_offsets(&setup);
        println!(
            "scenario={} aborted the workers' open transactions (offsets per partition: \
             {open:?}; open after: {after:?})",
            setup.name
        );
        drop(fencers);
    });
    println!(
        "scenario={} workers that stopped by themselves: {:?}",
        setup.name, s.stopped_by_themselves
    );
    assert_exactly_once(&setup, &s);
    drop(kafka);
}

/// The setup of a scenario on the three-broker cluster.
fn cluster_setup(name: &'static str, dir: &Path, kafka: &Kafka, guarantee: &'static str) -> Setup {
    let mut env = if guarantee == "exactly_once" {
        EOS_ENV.to_vec()
    } else {
        KAFKA_ENV.to_vec()
    };
    env.push(("RILL_FAULT_REPLICATION", "3"));
    Setup {
        name,
        dir: dir.to_owned(),
        bootstrap: kafka.bootstrap(),
        guarantee,
        env,
        idempotent_producer: guarantee == "exactly_once",
        events: 20_000,
        namespace: String::new(),
        // A worker must not stop over a broker failure, unless asked to look at the data alone.
        restart_stopped: std::env::var_os("RILL_FAULT_SUPERVISE").is_some(),
    }
}

/// The broker id that leads the most partitions of the scenario's topics.
fn busiest_leader(setup: &Setup) -> i32 {
    let mut led: BTreeMap<i32, usize> = BTreeMap::new();
    for topic in [setup.events_topic(), setup.out_topic()] {
        for p in 0..PARTITIONS as i32 {
            if let Some(leader) = leader_of(&setup.bootstrap, &topic, p) {
                *led.entry(leader).or_default() += 1;
            }
        }
    }
    led.into_iter()
        .max_by_key(|&(_, n)| n)
        .map(|(id, _)| id)
        .expect("the topics have leaders")
}

/// Asserts the outcome for `guarantee`.
fn assert_guarantee(setup: &Setup, s: &Summary) {
    if setup.exactly_once() {
        assert_exactly_once(setup, s);
    } else {
        assert_nothing_lost(setup, s);
        assert_eq!(
            s.table_mismatches,
            0,
            "scenario {}: keys counted fewer times than they have events; {} (logs in {})",
            setup.name,
            s.details(),
            setup.dir.display()
        );
    }
}

/// The broker leading the most partitions is SIGKILLed mid-stream and stays down: the other
/// two (still `min.insync.replicas`) take over its leaderships and coordinators.
fn leader_broker_killed(name: &'static str, guarantee: &'static str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir(name);
    let mut kafka = Kafka::cluster(&dir);
    let setup = cluster_setup(name, &dir, &kafka, guarantee);
    let s = run(&setup, Duration::from_secs(30), |workers| {
        // The scenario's schedule, not a wait for a condition.
        std::thread::sleep(Duration::from_secs(10));
        workers.check_alive();
        let leader = busiest_leader(&setup);
        kafka.kill(kafka.index_of(leader));
        println!(
            "scenario={} SIGKILLed broker {leader}, the busiest leader",
            setup.name
        );
    });
    assert_guarantee(&setup, &s);
    drop(kafka);
}

#[test]
fn leader_broker_killed_at_least_once() {
    leader_broker_killed("leader_broker_killed", "at_least_once");
}

#[test]
fn leader_broker_killed_exactly_once() {
    leader_broker_killed("leader_broker_killed_exactly_once", "exactly_once");
}

/// Each broker in turn stopped (SIGTERM: a controlled shutdown) and started again under load,
/// the next one once every partition is back in sync, as operators roll a cluster.
fn rolling_broker_restart(name: &'static str, guarantee: &'static str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir(name);
    let mut kafka = Kafka::cluster(&dir);
    let setup = cluster_setup(name, &dir, &kafka, guarantee);
    let topics = [setup.events_topic(), setup.out_topic()];
    let s = run(&setup, Duration::from_secs(45), |workers| {
        for i in 0..kafka.len() {
            // The scenario's schedule, not a wait for a condition.
            std::thread::sleep(Duration::from_secs(3));
            workers.check_alive();
            let t = Instant::now();
            kafka.stop(i);
            kafka.restart(i);
            if let Err(behind) = kafka.wait_in_sync(&topics, Duration::from_secs(90)) {
                panic!(
                    "scenario {}: replicas not back in sync: {behind}",
                    setup.name
                );
            }
            println!(
                "scenario={} broker {} restarted and in sync in {:.1} s",
                setup.name,
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
    });
    assert_guarantee(&setup, &s);
    drop(kafka);
}

#[test]
fn rolling_broker_restart_at_least_once() {
    rolling_broker_restart("rolling_broker_restart", "at_least_once");
}

#[test]
fn rolling_broker_restart_exactly_once() {
    rolling_broker_restart("rolling_broker_restart_exactly_once", "exactly_once");
}
