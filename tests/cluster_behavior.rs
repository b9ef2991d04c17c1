//! Several worker processes of one app on Apache Kafka (a KRaft broker in a separate
//! process): they share the partitions of a topic, survive a worker killed with SIGKILL and a
//! worker joining, stop gracefully without duplicates, and ride out a broker restart.
//!
//! The broker is started by `tests/common/kafka.rs` from the jars `scripts/kafka-jars` fetches
//! (`scripts/test` does). Workers are
//! `tests/support/test_worker.rs`, built by `cargo test` as the `test_worker` example.

mod common;

use common::kafka::{scratch_dir, Kafka};
use common::{wait_until_state, Recorder};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message as _};
use rill::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 12;
const KEYS: u64 = 200;

/// The tests here run one at a time: each starts a broker and worker processes (a lot for a
/// 2-core machine), and two brokers started at once can be handed the same free port, after
/// which both tests' workers share one broker.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    key: u64,
    seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Processed {
    instance: String,
    n: u64,
    key: u64,
    seq: u64,
    partition: u32,
    offset: i64,
}

/// A `test_worker` process.
struct WorkerProcess {
    name: String,
    log: PathBuf,
    child: Child,
}

fn test_worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join("examples")
        .join("test_worker");
    // `cargo test` builds it with the examples; `cargo test --test cluster_behavior` alone
    // does not.
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --example test_worker`",
        binary.display()
    );
    binary
}

impl WorkerProcess {
    fn start(dir: &Path, broker: &str, name: &str) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(test_worker_binary())
            .args([
                "worker",
                "--broker",
                &format!("kafka://{broker}"),
                "-l",
                "info",
            ])
            .env("RILL_TEST_INSTANCE", name)
            // Several workers on one machine: each serves its web interface on a free port.
            .env("RILL_WEB_PORT", "0")
            .env("RILL_KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("RILL_KAFKA_HEARTBEAT_INTERVAL_MS", "500")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .spawn()
            .expect("start test_worker");
        WorkerProcess {
            name: name.to_owned(),
            log,
            child,
        }
    }

    /// Partitions of `events` this worker holds now, from its assignment log lines.
    fn assignment(&self) -> BTreeSet<u32> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut held = BTreeSet::new();
        for line in text.lines() {
            let assigned = line.contains("partitions assigned");
            if !assigned && !line.contains("partitions revoked") {
                continue;
            }
            let Some(list) = line.split("partitions=").nth(1) else {
                continue;
            };
            let list = list.split_whitespace().next().unwrap_or("");
            for tp in list.split(',') {
                let Some(p) = tp
                    .strip_prefix("events[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if assigned {
                    held.insert(p);
                } else {
                    held.remove(&p);
                }
            }
        }
        held
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(
            sent.map(|s| s.success()).unwrap_or(false),
            "kill -TERM {pid}"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 60 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
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
            *self.last_failure.lock().unwrap() =
                Some(format!("{}[{}]: {e}", m.topic(), m.partition()));
        }
    }
}

/// Produces keyed events from an independent rdkafka producer (Java-compatible partitioner).
struct EventProducer {
    producer: ThreadedProducer<Deliveries>,
}

impl EventProducer {
    fn new(broker: &str) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", broker)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create_with_context(Deliveries::default())
            .expect("producer");
        EventProducer { producer }
    }

    fn send(&self, seqs: std::ops::Range<u64>) {
        for seq in seqs {
            let key = (seq % KEYS).to_string();
            let value = serde_json::to_vec(&Numbered {
                key: seq % KEYS,
                seq,
            })
            .expect("encode");
            let mut record = BaseRecord::to("events").key(&key).payload(&value);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }

    /// Waits until every event sent is in the log.
    fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(120))
            .expect("flush events");
        let deliveries = self.producer.context();
        let failed = deliveries.failed.load(Ordering::Relaxed);
        assert_eq!(
            failed,
            0,
            "{failed} events could not be produced; last: {:?}",
            deliveries.last_failure.lock().unwrap()
        );
    }
}

/// Creates the topics, then reads `processed` back into a recorder.
async fn checker(broker: &str, seen: &Recorder<Processed>) -> rill::Worker {
    let app = App::new("rill-test-checker");
    app.configure(|s| s.broker = format!("kafka://{broker}"));
    let _events = app
        .topic("events")
        .value_type::<Numbered>()
        .partitions(PARTITIONS);
    let processed = app
        .topic("processed")
        .value_type::<Processed>()
        .partitions(PARTITIONS);
    let seen = seen.clone();
    app.agent(move |mut stream: Stream<Processed>| {
        let seen = seen.clone();
        async move {
            while let Some(p) = stream.next().await {
                seen.push(p);
            }
        }
    })
    .named("check")
    .channel(&processed);
    app.start().await.expect("start checker")
}

/// Waits until every event below `sent` was processed. On timeout the state printed has the
/// count, the first event missing, and per partition of `events` the last offset each worker
/// processed.
async fn wait_for_seqs(seen: &Recorder<Processed>, sent: u64, timeout: Duration) {
    wait_until_state(
        timeout,
        &format!("all {sent} events are processed"),
        || {
            let snapshot = seen.snapshot();
            let got: BTreeSet<u64> = snapshot.iter().map(|p| p.seq).collect();
            let done = got.len() as u64 >= sent;
            let mut last: BTreeMap<u32, BTreeMap<&str, i64>> = BTreeMap::new();
            if !done {
                for p in &snapshot {
                    let o = last.entry(p.partition).or_default();
                    let o = o.entry(p.instance.as_str()).or_insert(p.offset);
                    *o = (*o).max(p.offset);
                }
            }
            (
                got.len() as u64,
                (0..sent).find(|s| !got.contains(s)),
                format!("{last:?}"),
            )
        },
        |(n, _, _)| *n >= sent,
    )
    .await;
}

async fn wait_for_assignment(workers: &[&WorkerProcess]) {
    wait_until_state(
        Duration::from_secs(120),
        "each worker holds some partitions, all are held, none twice",
        || workers.iter().map(|w| w.assignment()).collect::<Vec<_>>(),
        |sets| {
            let total: usize = sets.iter().map(BTreeSet::len).sum();
            let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
            sets.iter().all(|s| !s.is_empty())
                && total == PARTITIONS as usize
                && union.len() == PARTITIONS as usize
        },
    )
    .await;
}

/// Per instance and key, sequence numbers strictly increase (order kept, nothing twice within
/// a worker's run). Returns the sequence numbers processed by more than one instance.
fn check_order_and_duplicates(seen: &[Processed]) -> BTreeMap<u64, Vec<String>> {
    // `processed` is read across partitions: restore each instance's processing order.
    let mut seen: Vec<&Processed> = seen.iter().collect();
    seen.sort_by(|a, b| (&a.instance, a.n).cmp(&(&b.instance, b.n)));
    let mut last: BTreeMap<(&str, u64), u64> = BTreeMap::new();
    let mut by_seq: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for p in seen {
        if let Some(prev) = last.insert((&p.instance, p.key), p.seq) {
            assert!(
                prev < p.seq,
                "{}: key {} went from seq {prev} to {}",
                p.instance,
                p.key,
                p.seq
            );
        }
        by_seq.entry(p.seq).or_default().push(p.instance.clone());
    }
    by_seq.into_iter().filter(|(_, v)| v.len() > 1).collect()
}

/// Kafka's group coordinator completes a rebalance only once every member has rejoined (and so
/// handed its partitions over): no handoff grace is set here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_partitions_survive_sigkill_and_stop_gracefully() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = scratch_dir("cluster");
    let kafka = Kafka::single(&dir);
    let broker = kafka.addr();
    let seen = Recorder::new();
    let check = checker(&broker, &seen).await;

    // Three workers share the twelve partitions: each holds some, none is held twice.
    let w1 = WorkerProcess::start(&dir, &broker, "w1");
    let mut w2 = WorkerProcess::start(&dir, &broker, "w2");
    let w3 = WorkerProcess::start(&dir, &broker, "w3");
    wait_for_assignment(&[&w1, &w2, &w3]).await;

    // 50k keyed events while w2 is killed with SIGKILL and w4 joins.
    let producer = EventProducer::new(&broker);
    let total = 50_000u64;
    let step = 5_000u64;
    let mut w4 = None;
    for chunk in 0..total / step {
        producer.send(chunk * step..(chunk + 1) * step);
        producer.flush();
        match chunk {
            2 => w2.kill(),
            5 => w4 = Some(WorkerProcess::start(&dir, &broker, "w4")),
            _ => {}
        }
    }
    wait_for_seqs(&seen, total, Duration::from_secs(240)).await;
    let snapshot = seen.snapshot();
    let duplicated = check_order_and_duplicates(&snapshot);
    println!(
        "50000 events: {} processings, {} events processed more than once",
        snapshot.len(),
        duplicated.len()
    );
    for (seq, instances) in &duplicated {
        assert!(
            instances.iter().any(|i| i == "w2"),
            "seq {seq} processed by {instances:?}: only the killed worker's uncommitted work may be redone"
        );
    }

    // A graceful stop hands partitions over without processing anything twice.
    let w4 = w4.expect("w4 started");
    wait_for_assignment(&[&w1, &w3, &w4]).await;
    let before = seen.len();
    let mut w1 = w1;
    producer.send(total..total + 5_000);
    producer.flush();
    let status = w1.terminate();
    assert!(status.success(), "w1 exited with {status}");
    producer.send(total + 5_000..total + 10_000);
    producer.flush();
    wait_for_seqs(&seen, total + 10_000, Duration::from_secs(240)).await;
    let tail: Vec<Processed> = seen.snapshot().split_off(before);
    let mut by_seq: BTreeMap<u64, Vec<(String, u32, i64)>> = BTreeMap::new();
    for p in &tail {
        by_seq
            .entry(p.seq)
            .or_default()
            .push((p.instance.clone(), p.partition, p.offset));
    }
    let twice: Vec<_> = by_seq.iter().filter(|(_, v)| v.len() > 1).collect();
    println!(
        "graceful stop: {} processings of 10000 events, {} twice",
        tail.len(),
        twice.len()
    );
    assert!(
        twice.is_empty(),
        "{} events processed twice after a graceful stop, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    drop((w3, w4));
    check.shutdown().await.expect("stop checker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rides_out_a_20_second_broker_restart() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let dir = scratch_dir("restart");
    // The broker's log directories outlive its process: the data survives a restart.
    let mut kafka = Kafka::single(&dir);
    let broker = kafka.addr();
    let seen = Recorder::new();
    let check = checker(&broker, &seen).await;
    let w = WorkerProcess::start(&dir, &broker, "solo");
    wait_for_assignment(&[&w]).await;

    let producer = EventProducer::new(&broker);
    producer.send(0..2_000);
    producer.flush();
    wait_for_seqs(&seen, 2_000, Duration::from_secs(120)).await;

    // The broker goes away for 20 s (the scenario itself, not a wait for a condition); events
    // produced meanwhile wait in the producer.
    kafka.stop(0);
    producer.send(2_000..3_000);
    tokio::time::sleep(Duration::from_secs(20)).await;
    tokio::task::block_in_place(|| kafka.restart(0));
    producer.send(3_000..5_000);
    producer.flush();
    wait_for_seqs(&seen, 5_000, Duration::from_secs(240)).await;
    let snapshot = seen.snapshot();
    let seqs: BTreeSet<u64> = snapshot.iter().map(|p| p.seq).collect();
    assert_eq!(seqs.len(), 5_000, "events lost across the broker restart");
    println!(
        "broker restart: 5000 events, {} processings",
        snapshot.len()
    );
    drop(w);
    check.shutdown().await.expect("stop checker");
}
