//! Interop with independent Kafka clients, separate processes with protocol code of their own:
//! keyed JSON records they produce are consumed by a rill agent, the agent's output topic is
//! read back by them, and a key lands in the same partition whichever client produced it.
//!
//! - aiokafka (Python, pinned to [`AIOKAFKA_VERSION`]) against an Apache Kafka broker process. Its
//!   default partitioner is murmur2 of the key bytes, as Kafka's Java client.
//! - kcat (librdkafka 2.0.2, Debian's package) against librdkafka's mock cluster, run in this
//!   test process on real loopback ports.
//!
//! `scripts/test` installs both when missing; a test whose client is missing fails saying how
//! to install it. `RILL_PYTHON` and `RILL_KCAT` override the programs run.

mod common;

use common::kafka::{python, run_with_broker_alive, scratch_dir, Kafka};
use common::{kafka_partition, wait_until_state, within, Recorder, WAIT};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rill::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The aiokafka release the tests are written against; `scripts/test` installs exactly this.
const AIOKAFKA_VERSION: &str = "0.14.0";

/// Partitions of the input and output topics.
const PARTITIONS: u32 = 6;

/// Keys of the records: lengths 1 to 43 bytes (every tail length of murmur2's 4-byte blocks),
/// and non-ASCII UTF-8.
const KEYS: &[&str] = &[
    "a",
    "bb",
    "acct-1",
    "acct-22",
    "acct-333",
    "acct-4444",
    "käse",
    "ключ-7",
    "account-with-a-long-key-0123456789abcdefghi",
];

/// Records per key from the independent client (sequence numbers 1..=N); rill itself first
/// sends sequence number 0 of every key.
const PER_KEY: u64 = 5;

/// Bound on one run of an independent client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on the agent processing every record, including joining the consumer group.
const PROCESSED: Duration = Duration::from_secs(120);

/// A transaction: the keyed JSON record the clients produce (the key is `account`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Txn {
    account: String,
    seq: u64,
    amount: i64,
    /// Which client produced it.
    origin: String,
}

/// What the agent derives from a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Booked {
    account: String,
    seq: u64,
    cents: i64,
    kind: String,
    origin: String,
}

fn book(t: &Txn) -> Booked {
    Booked {
        account: t.account.clone(),
        seq: t.seq,
        cents: t.amount * 100,
        kind: if t.amount < 0 { "debit" } else { "credit" }.to_owned(),
        origin: t.origin.clone(),
    }
}

fn txn(key_index: usize, seq: u64, origin: &str) -> Txn {
    Txn {
        account: KEYS[key_index].to_owned(),
        seq,
        // Some negative, all different within a key.
        amount: (seq as i64 * 37 + key_index as i64 * 11) % 100 - 40,
        origin: origin.to_owned(),
    }
}

/// The independent client's records, one round of every key after another, so that partitions
/// interleave.
fn client_records(origin: &str) -> Vec<Txn> {
    (1..=PER_KEY)
        .flat_map(|seq| (0..KEYS.len()).map(move |k| (k, seq)))
        .map(|(k, seq)| txn(k, seq, origin))
        .collect()
}

/// What the agent did with one record, as it saw it.
#[derive(Debug, Clone)]
struct Handled {
    key: Option<String>,
    input_partition: u32,
    output_partition: u32,
    booked: Booked,
}

/// A rill app whose agent books every transaction of `interop-txns` to `interop-booked`.
struct Pipeline {
    app: App,
    txns: Topic<String, Txn>,
    handled: Recorder<Handled>,
}

fn pipeline(id: &str, broker: String, kafka: &[(&str, &str)]) -> Pipeline {
    let app = App::new(id);
    app.configure(|s| {
        s.broker = broker;
        for (k, v) in kafka {
            s.kafka.insert((*k).to_owned(), (*v).to_owned());
        }
    });
    let txns = app
        .topic("interop-txns")
        .key_codec(Utf8)
        .value_type::<Txn>()
        .partitions(PARTITIONS);
    let booked = app
        .topic("interop-booked")
        .key_codec(Utf8)
        .value_type::<Booked>()
        .partitions(PARTITIONS);
    let handled = Recorder::new();
    let recorder = handled.clone();
    // A topic sink (`.sink(&booked)`) sends the yielded value without a key, so the derived
    // record would land in a round-robin partition. The agent sends it itself, with the key of
    // the transaction, so the account's records stay in one partition, in order.
    app.agent(move |stream: Stream<Txn, String>| {
        let (booked, handled) = (booked.clone(), recorder.clone());
        async move {
            let mut items = stream.items();
            while let Some((key, txn)) = items.next().await {
                let input_partition = items.current_event().map_or(u32::MAX, |e| e.partition);
                let derived = book(&txn);
                let send = booked.send(derived.clone());
                let position = match key.clone() {
                    Some(k) => send.key(k).await?,
                    None => send.await?,
                };
                handled.push(Handled {
                    key,
                    input_partition,
                    output_partition: position.partition,
                    booked: derived,
                });
            }
            Ok::<_, rill::Error>(())
        }
    })
    .named("book")
    .channel(&txns);
    Pipeline { app, txns, handled }
}

impl Pipeline {
    /// rill itself sends sequence number 0 of every key, first; each lands in Java's murmur2
    /// partition. Returns the partition of each key.
    async fn send_own_records(&self) -> BTreeMap<String, u32> {
        let mut partitions = BTreeMap::new();
        for k in 0..KEYS.len() {
            let t = txn(k, 0, "rill");
            let position = self
                .txns
                .send(t.clone())
                .key(t.account.clone())
                .await
                .expect("rill sends a transaction");
            assert_eq!(
                position.partition,
                kafka_partition(t.account.as_bytes(), PARTITIONS),
                "rill sent key {:?} to the wrong partition",
                t.account
            );
            partitions.insert(t.account, position.partition);
        }
        partitions
    }

    /// Waits (bounded) until the agent has booked `n` transactions.
    async fn wait_for_handled(&self, n: usize) {
        wait_until_state(
            PROCESSED,
            &format!("the agent booked all {n} transactions"),
            || self.handled.len(),
            |got| *got >= n,
        )
        .await;
    }
}

/// A record as an independent client read it back.
#[derive(Debug, Clone, Deserialize)]
struct Read {
    key: Option<String>,
    partition: u32,
    offset: i64,
    value: serde_json::Value,
}

/// Every record sent: rill's sequence number 0, then the independent client's records.
fn all_sent(client: &[Txn]) -> Vec<Txn> {
    (0..KEYS.len())
        .map(|k| txn(k, 0, "rill"))
        .chain(client.iter().cloned())
        .collect()
}

/// Checks what the independent client read back from both topics:
///
/// - the input topic: every record of a key, whoever produced it, is in the key's Java
///   murmur2 partition (and so in the partition the other producer used for it);
/// - the output topic: each key's derived records, exactly, in the order they were sent
///   (nothing lost or doubled), keyed and in the same partition as the key's input.
fn check_read_back(client: &str, sent: &[Txn], input: &[Read], output: &[Read]) {
    let expected_partition = |key: &str| -> u32 { kafka_partition(key.as_bytes(), PARTITIONS) };

    let mut input_partitions: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut inputs_read: BTreeSet<(String, u64, String)> = BTreeSet::new();
    for r in input {
        let key = r
            .key
            .clone()
            .unwrap_or_else(|| panic!("{client} read an input record without a key: {r:?}"));
        let t: Txn = serde_json::from_value(r.value.clone()).unwrap_or_else(|e| {
            panic!("{client} read an input record that is no Txn ({e}): {r:?}")
        });
        assert_eq!(
            key, t.account,
            "input record keyed by another account: {r:?}"
        );
        input_partitions.entry(key).or_default().insert(r.partition);
        inputs_read.insert((t.account, t.seq, t.origin));
    }
    let inputs_sent: BTreeSet<(String, u64, String)> = sent
        .iter()
        .map(|t| (t.account.clone(), t.seq, t.origin.clone()))
        .collect();
    assert_eq!(
        inputs_read, inputs_sent,
        "{client} did not read back exactly the input records sent"
    );
    assert_eq!(input.len(), sent.len(), "input records duplicated");
    for (key, partitions) in &input_partitions {
        assert_eq!(
            partitions,
            &BTreeSet::from([expected_partition(key)]),
            "input records of key {key:?} (produced by rill and {client}) are not all in its \
             Java murmur2 partition {}",
            expected_partition(key)
        );
    }

    // Per key, in log order (a key is in one partition: asserted below).
    let mut output = output.to_vec();
    output.sort_by_key(|r| (r.partition, r.offset));
    let mut got: BTreeMap<String, Vec<Booked>> = BTreeMap::new();
    for r in &output {
        let key = r
            .key
            .clone()
            .unwrap_or_else(|| panic!("{client} read an output record without a key: {r:?}"));
        let b: Booked = serde_json::from_value(r.value.clone()).unwrap_or_else(|e| {
            panic!("{client} read an output record that is no Booked ({e}): {r:?}")
        });
        assert_eq!(
            key, b.account,
            "output record keyed by another account: {r:?}"
        );
        assert_eq!(
            r.partition,
            expected_partition(&key),
            "{client} read key {key:?} of the output in partition {}, not in its Java murmur2 \
             partition (where its input is): {r:?}",
            r.partition
        );
        got.entry(key).or_default().push(b);
    }
    let mut expected: BTreeMap<String, Vec<Booked>> = BTreeMap::new();
    for t in sent {
        expected.entry(t.account.clone()).or_default().push(book(t));
    }
    for (key, want) in &expected {
        assert_eq!(
            got.get(key),
            Some(want),
            "the output of key {key:?}, as {client} read it, is not every derived record \
             exactly once in order"
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "output keys that were never sent: {:?}",
        got.keys()
            .filter(|k| !expected.contains_key(*k))
            .collect::<Vec<_>>()
    );
}

/// Checks what the agent itself saw: each record once, in order per key, from and to the
/// key's partition.
fn check_handled(handled: &[Handled], sent: &[Txn]) {
    assert_eq!(
        handled.len(),
        sent.len(),
        "the agent booked {} transactions, {} were sent",
        handled.len(),
        sent.len()
    );
    for h in handled {
        let key = h
            .key
            .as_deref()
            .expect("the agent saw a transaction without a key");
        let p = kafka_partition(key.as_bytes(), PARTITIONS);
        assert_eq!(
            (h.input_partition, h.output_partition),
            (p, p),
            "the agent read key {key:?} from, or wrote it to, another partition than its Java \
             murmur2 partition {p}: {h:?}"
        );
    }
    let mut booked: BTreeMap<&str, Vec<&Booked>> = BTreeMap::new();
    for h in handled {
        booked.entry(&h.booked.account).or_default().push(&h.booked);
    }
    for k in KEYS {
        let want: Vec<Booked> = sent.iter().filter(|t| t.account == *k).map(book).collect();
        let got: Vec<Booked> = booked
            .get(k)
            .map(|b| b.iter().map(|b| (*b).clone()).collect())
            .unwrap_or_default();
        assert_eq!(
            got, want,
            "the agent did not book key {k:?}'s transactions exactly once in order"
        );
    }
}

/// Runs an independent client to its end, bounded by [`CLIENT_TIMEOUT`] (killed by its handle
/// if it overruns), and returns its standard output. Fails the test if it fails.
async fn run_client(what: &str, mut cmd: tokio::process::Command, dir: &Path) -> String {
    let name: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("client stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("client stderr file"))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    match tokio::time::timeout(CLIENT_TIMEOUT, child.wait()).await {
        Ok(status) => {
            let status = status.unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
            assert!(
                status.success(),
                "{what} failed ({status})\n--- stderr:\n{}\n--- stdout:\n{}",
                read(&err_path),
                read(&out_path)
            );
            read(&out_path)
        }
        Err(_) => {
            let _ = child.kill().await;
            panic!(
                "{what} did not finish within {CLIENT_TIMEOUT:?} and was killed\n--- stderr:\n{}\n\
                 --- stdout:\n{}",
                read(&err_path),
                read(&out_path)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// aiokafka on Apache Kafka

/// The independent Python client: `produce BOOTSTRAP TOPIC FILE` sends the JSON lines of FILE
/// (`{"key": .., "value": ..}`) in order and prints where each went; `consume BOOTSTRAP TOPIC`
/// reads every partition from the beginning to its end offset and prints each record.
const AIOKAFKA_CLIENT: &str = r#"
import asyncio, json, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition


async def produce(bootstrap, topic, path):
    # No partitioner given: aiokafka's DefaultPartitioner, murmur2 of the key bytes as in
    # Kafka's Java client.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                meta = await producer.send_and_wait(
                    topic,
                    key=record["key"].encode(),
                    value=json.dumps(record["value"]).encode(),
                )
                print(json.dumps({"key": record["key"], "partition": meta.partition,
                                  "offset": meta.offset}), flush=True)
    finally:
        await producer.stop()


async def partitions_of(bootstrap, topic):
    # Asked of the cluster: a consumer's own metadata covers only the topics it subscribed to
    # or was assigned (`consumer.topics()` does not fill it).
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        while True:
            [t] = await admin.describe_topics([topic])
            if t["error_code"] == 0 and t["partitions"]:
                return sorted(p["partition"] for p in t["partitions"])
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def consume(bootstrap, topic):
    partitions = await partitions_of(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        left = {tp for tp in tps if end[tp] > 0}
        while left:
            batches = await consumer.getmany(*left, timeout_ms=500)
            for tp, messages in batches.items():
                for m in messages:
                    print(json.dumps({
                        "key": None if m.key is None else m.key.decode(),
                        "partition": m.partition,
                        "offset": m.offset,
                        "value": json.loads(m.value),
                    }), flush=True)
            for tp in list(left):
                if await consumer.position(tp) >= end[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()


mode, args = sys.argv[1], sys.argv[2:]
asyncio.run({"produce": produce, "consume": consume}[mode](*args))
"#;

/// Fails the test unless `python3` has aiokafka [`AIOKAFKA_VERSION`].
fn require_aiokafka() {
    let install = format!(
        "install it with `python3 -m pip install aiokafka=={AIOKAFKA_VERSION}` (scripts/test \
         does) or point RILL_PYTHON at a Python that has it"
    );
    let out = std::process::Command::new(python())
        .args(["-c", "import aiokafka; print(aiokafka.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): {install}", python()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python Kafka client aiokafka is missing from {} ({}): {install}",
        python(),
        stderr.lines().last().unwrap_or("").trim()
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        version, AIOKAFKA_VERSION,
        "aiokafka {version} is installed, the interop tests pin {AIOKAFKA_VERSION}: {install}"
    );
}

fn aiokafka(dir: &Path, args: &[&str]) -> tokio::process::Command {
    let script = dir.join("aiokafka_client.py");
    std::fs::write(&script, AIOKAFKA_CLIENT).expect("write the Python client");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(&script).args(args);
    cmd
}

/// Parses the JSON lines a client printed.
fn parse_lines<T: serde::de::DeserializeOwned>(client: &str, out: &str) -> Vec<T> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("{client} printed a line that is not a report ({e}): {l}")
            })
        })
        .collect()
}

/// Where the producer says a record went.
#[derive(Debug, Deserialize)]
struct Produced {
    key: String,
    partition: u32,
}

#[test]
fn aiokafka_on_kafka_produces_to_and_reads_back_from_an_agent() {
    require_aiokafka();
    let dir = scratch_dir("interop-aiokafka");
    let kafka = Kafka::single(&dir);
    run_with_broker_alive(aiokafka_on_kafka(&dir, kafka.addr()));
    drop(kafka);
}

async fn aiokafka_on_kafka(dir: &Path, broker: String) {
    let p = pipeline("rill-interop-aiokafka", format!("kafka://{broker}"), &[]);
    let worker = within(WAIT, "the worker to start on Kafka", p.app.start()).await;
    let worker = worker.expect("the worker starts on Kafka");
    let rill_partitions = p.send_own_records().await;

    // aiokafka produces its records, each key to the partition rill used for it.
    let records = client_records("aiokafka");
    let input_file = dir.join("txns.jsonl");
    let lines: String = records
        .iter()
        .map(|t| serde_json::json!({"key": t.account, "value": t}).to_string() + "\n")
        .collect();
    std::fs::write(&input_file, lines).expect("write the records to produce");
    let input_path = input_file.to_str().expect("a UTF-8 scratch path");
    let out = run_client(
        "aiokafka produce",
        aiokafka(dir, &["produce", &broker, "interop-txns", input_path]),
        dir,
    )
    .await;
    let produced: Vec<Produced> = parse_lines("aiokafka produce", &out);
    assert_eq!(
        produced.len(),
        records.len(),
        "aiokafka reported every send"
    );
    for r in &produced {
        assert_eq!(
            r.partition, rill_partitions[&r.key],
            "aiokafka put key {:?} in partition {}, rill in {}",
            r.key, r.partition, rill_partitions[&r.key]
        );
    }

    let sent = all_sent(&records);
    p.wait_for_handled(sent.len()).await;
    check_handled(&p.handled.snapshot(), &sent);

    // aiokafka reads both topics back.
    let input = run_client(
        "aiokafka consume input",
        aiokafka(dir, &["consume", &broker, "interop-txns"]),
        dir,
    )
    .await;
    let output = run_client(
        "aiokafka consume output",
        aiokafka(dir, &["consume", &broker, "interop-booked"]),
        dir,
    )
    .await;
    check_read_back(
        "aiokafka",
        &sent,
        &parse_lines("aiokafka consume input", &input),
        &parse_lines("aiokafka consume output", &output),
    );

    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops");
}

// ---------------------------------------------------------------------------------------------
// kcat on librdkafka's mock cluster

/// Fails the test unless kcat (from PATH, or `RILL_KCAT`) runs; returns its path.
fn require_kcat() -> PathBuf {
    let install = "install it with `apt-get install kcat` (scripts/test does) or set RILL_KCAT";
    let kcat = match std::env::var_os("RILL_KCAT") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.join("kcat"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("kcat not found: {install}")),
    };
    let out = std::process::Command::new(&kcat)
        .arg("-V")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): {install}", kcat.display()));
    assert!(
        out.status.success(),
        "{} -V failed: {install}",
        kcat.display()
    );
    kcat
}

/// kcat's report line format: key, partition, offset, value (compact JSON has no tabs).
const KCAT_FORMAT: &str = "%k\t%p\t%o\t%s\n";

/// kcat reads every partition of `topic` from the beginning and exits at their ends.
async fn kcat_consume(kcat: &Path, bootstrap: &str, topic: &str, dir: &Path) -> Vec<Read> {
    let mut cmd = tokio::process::Command::new(kcat);
    cmd.args([
        "-C",
        "-b",
        bootstrap,
        "-t",
        topic,
        "-o",
        "beginning",
        "-e",
        "-q",
        "-f",
        KCAT_FORMAT,
    ]);
    let what = format!("kcat consume {topic}");
    let out = run_client(&what, cmd, dir).await;
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let fields: Vec<&str> = l.splitn(4, '\t').collect();
            let [key, partition, offset, value] = fields[..] else {
                panic!("{what} printed a line that is not `key\\tpartition\\toffset\\tvalue`: {l}");
            };
            Read {
                key: Some(key.to_owned()).filter(|k| !k.is_empty()),
                partition: partition
                    .parse()
                    .unwrap_or_else(|e| panic!("{what}: bad partition ({e}): {l}")),
                offset: offset
                    .parse()
                    .unwrap_or_else(|e| panic!("{what}: bad offset ({e}): {l}")),
                value: serde_json::from_str(value)
                    .unwrap_or_else(|e| panic!("{what}: value is not JSON ({e}): {l}")),
            }
        })
        .collect()
}

#[test]
fn kcat_on_the_mock_cluster_produces_to_and_reads_back_from_an_agent() {
    let kcat = require_kcat();
    let dir = scratch_dir("interop-kcat");
    let cluster: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(3).expect("the mock cluster starts");
    run_with_broker_alive(kcat_on_the_mock_cluster(&kcat, &dir, &cluster));
    drop(cluster);
}

async fn kcat_on_the_mock_cluster(
    kcat: &Path,
    dir: &Path,
    cluster: &MockCluster<'static, DefaultProducerContext>,
) {
    let bootstrap = cluster.bootstrap_servers();
    // The mock cluster does not answer CreateTopics: the topics are made here, with the
    // partition count the app declares.
    for topic in ["interop-txns", "interop-booked"] {
        cluster
            .create_topic(topic, PARTITIONS as i32, 1)
            .expect("the mock cluster creates the topic");
    }

    // The mock's group coordinator completes a rebalance only when a timer of the session
    // timeout runs out; a short one keeps that quick (see tests/scenarios_kafka.rs).
    let p = pipeline(
        "rill-interop-kcat",
        format!("kafka://{bootstrap}"),
        &[
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
        ],
    );
    let worker = within(
        WAIT,
        "the worker to start on the mock cluster",
        p.app.start(),
    )
    .await;
    let worker = worker.expect("the worker starts on the mock cluster");
    p.send_own_records().await;

    // kcat produces its records, `key<TAB>value` per line (the JSON values hold colons).
    let records = client_records("kcat");
    let input_file = dir.join("txns.tsv");
    let lines: String = records
        .iter()
        .map(|t| {
            let value = serde_json::to_string(t).expect("encode a transaction");
            format!("{}\t{value}\n", t.account)
        })
        .collect();
    std::fs::write(&input_file, lines).expect("write the records to produce");
    let mut cmd = tokio::process::Command::new(kcat);
    cmd.args(["-P", "-b", &bootstrap, "-t", "interop-txns", "-K", "\\t"])
        // librdkafka's default partitioner is `consistent_random` (CRC32 of the key), not the
        // Java client's murmur2: `murmur2_random` is what makes kcat put a key where Kafka's
        // Java client, and rill, put it.
        .args(["-X", "partitioner=murmur2_random"])
        // One request in flight: the records of a key stay in the order of the file.
        .args(["-X", "max.in.flight=1"])
        .arg("-l")
        .arg(&input_file);
    run_client("kcat produce", cmd, dir).await;

    let sent = all_sent(&records);
    p.wait_for_handled(sent.len()).await;
    check_handled(&p.handled.snapshot(), &sent);

    // kcat reads both topics back: where its own records and rill's went, and the output.
    let input = kcat_consume(kcat, &bootstrap, "interop-txns", dir).await;
    let output = kcat_consume(kcat, &bootstrap, "interop-booked", dir).await;
    check_read_back("kcat", &sent, &input, &output);

    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops");
}
