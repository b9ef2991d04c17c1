//! Tables on Apache Kafka (a KRaft broker in a separate process) with several worker
//! processes of `examples/word_count.rs`: counts stay exact when a worker is killed with
//! SIGKILL and its partitions fail over, and when a worker joins and partitions move; every
//! worker answers `GET /tables/word_counts/<word>` with the same count.

mod common;

use common::kafka::{scratch_dir, Kafka};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rill::prelude::*;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const APP: &str = "word_count";

fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join("examples")
        .join("word_count")
}

/// A `word_count worker` process and the address its web server announced.
struct WordCountWorker {
    name: String,
    child: Child,
    web: SocketAddr,
}

impl WordCountWorker {
    fn start(dir: &Path, broker: &str, name: &str) -> Self {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let mut child = Command::new(example_binary())
            .args(["worker", "--broker", &format!("kafka://{broker}")])
            .args(["--web-port", "0", "-l", "info"])
            .env("RILL_KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("RILL_KAFKA_HEARTBEAT_INTERVAL_MS", "500")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start word_count worker");
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
        let web = rx
            .recv_timeout(common::WAIT * 2)
            .unwrap_or_else(|_| panic!("{name} did not print its web address"))
            .parse()
            .expect("a web address");
        WordCountWorker {
            name: name.to_owned(),
            child,
            web,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn held(&self) -> usize {
        let (_, body) = common::http_get(self.web, "/tables");
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v[0]["local_partitions"].as_array().map(Vec::len))
            .unwrap_or(0)
    }
}

impl Drop for WordCountWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

const SENTENCES: [&str; 3] = [
    "the quick brown fox jumps over the lazy dog",
    "a dog barks at a cat",
    "the cat sleeps",
];

fn add_counts(counts: &mut BTreeMap<String, i64>, rounds: usize) {
    for _ in 0..rounds {
        for s in SENTENCES {
            for w in s.split_whitespace() {
                *counts.entry(w.to_owned()).or_default() += 1;
            }
        }
    }
}

fn send_sentences(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    rounds: usize,
) {
    for _ in 0..rounds {
        for s in SENTENCES {
            let mut record = BaseRecord::<(), str>::to("sentences").payload(s);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("flush sentences");
}

/// Waits until every worker answers every word with its expected count.
async fn wait_for_counts(workers: &[&WordCountWorker], want: &BTreeMap<String, i64>) {
    let addrs: Vec<(String, SocketAddr)> =
        workers.iter().map(|w| (w.name.clone(), w.web)).collect();
    common::wait_until_state(
        Duration::from_secs(120),
        "every worker answers every word's count",
        || {
            let mut wrong = Vec::new();
            for (name, addr) in &addrs {
                let w = Lookup(*addr);
                for (word, n) in want {
                    let got = w.count(word);
                    if got != Some(*n) {
                        wrong.push(format!("{name}: {word}={got:?} (want {n})"));
                    }
                }
            }
            wrong
        },
        Vec::is_empty,
    )
    .await;
}

struct Lookup(SocketAddr);

impl Lookup {
    fn count(&self, word: &str) -> Option<i64> {
        let (status, body) = common::http_get(self.0, &format!("/tables/word_counts/{word}"));
        (status == 200).then(|| body.trim().parse().ok()).flatten()
    }
}

/// Waits until the app's group has committed everything in its input and internal topics, so
/// that a worker killed now has no uncommitted work to redo (which at-least-once would count
/// twice).
async fn wait_for_commits(broker: &str) {
    let app = App::new(APP);
    app.configure(|s| s.broker = format!("kafka://{broker}"));
    let topics = [
        "sentences".to_owned(),
        "words".to_owned(),
        format!("{APP}-words-word-repartition"),
    ];
    let mut lag = Vec::new();
    for _ in 0..600 {
        lag.clear();
        let committed: BTreeMap<(String, u32), i64> = app
            .committed_offsets()
            .await
            .expect("committed offsets")
            .into_iter()
            .map(|(tp, o)| ((tp.topic.to_string(), tp.partition), o))
            .collect();
        for t in &topics {
            for (p, end) in app
                .end_offsets(t)
                .await
                .expect("end offsets")
                .iter()
                .enumerate()
            {
                let c = committed.get(&(t.clone(), p as u32)).copied().unwrap_or(0);
                if c < *end {
                    lag.push(format!("{t}[{p}] {c}/{end}"));
                }
            }
        }
        if lag.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the group did not commit its input within 120 s: {lag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_counts_stay_exact_through_failover_and_rebalance() {
    let dir = scratch_dir("table-cluster");
    let kafka = Kafka::single(&dir);
    let broker = kafka.addr();
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("linger.ms", "5")
        .create()
        .expect("producer");

    let mut w1 = WordCountWorker::start(&dir, &broker, "w1");
    let w2 = WordCountWorker::start(&dir, &broker, "w2");
    common::wait_until_state(
        Duration::from_secs(120),
        "both workers hold table partitions",
        || (w1.held(), w2.held()),
        |(a, b)| *a > 0 && *b > 0 && a + b == 8,
    )
    .await;

    let mut want = BTreeMap::new();
    send_sentences(&producer, 40);
    add_counts(&mut want, 40);
    wait_for_counts(&[&w1, &w2], &want).await;
    wait_for_commits(&broker).await;

    // w1 dies: w2 takes its partitions over, restoring them from the changelog.
    w1.kill();
    common::wait_until_state(
        Duration::from_secs(120),
        "w2 holds every table partition",
        || w2.held(),
        |n| *n == 8,
    )
    .await;
    wait_for_counts(&[&w2], &want).await;
    send_sentences(&producer, 20);
    add_counts(&mut want, 20);
    wait_for_counts(&[&w2], &want).await;
    wait_for_commits(&broker).await;

    // w3 joins: partitions move to it, with their counts.
    let w3 = WordCountWorker::start(&dir, &broker, "w3");
    common::wait_until_state(
        Duration::from_secs(120),
        "w2 and w3 share the table partitions",
        || (w2.held(), w3.held()),
        |(a, b)| *a > 0 && *b > 0 && a + b == 8,
    )
    .await;
    send_sentences(&producer, 10);
    add_counts(&mut want, 10);
    wait_for_counts(&[&w2, &w3], &want).await;
    println!(
        "word counts exact through a SIGKILL failover and a join: {} words, 'the' = {}",
        want.len(),
        want["the"]
    );
}

/// The counting app of [`a_restore_reads_a_changelog_transaction_that_commits_while_it_waits`].
fn totals_app(broker: &str) -> (App, Topic<String, i64>, Table<String, i64>) {
    let app = App::new("open-txn");
    let url = format!("kafka://{broker}");
    app.configure(|s| {
        s.broker = url;
        s.topic_partitions = 1;
        s.processing_guarantee = rill::ProcessingGuarantee::ExactlyOnce;
    });
    let adds = app.topic("adds").key_type::<String>().value_type::<i64>();
    let totals = app.table::<String, i64>("totals");
    let t = totals.clone();
    app.agent(move |adds: Stream<i64, String>| {
        let totals = t.clone();
        async move {
            let mut adds = adds.items();
            while let Some((key, n)) = adds.next().await {
                if let Some(key) = key {
                    totals.update(key, |v| *v += n);
                }
            }
        }
    })
    .named("add")
    .channel(&adds);
    (app, adds, totals)
}

/// A table restore reads up to where no transaction is open on the changelog. The previous
/// owner's last commit may not have its markers written when the next owner restores; a
/// read-committed restore that stopped at the last stable offset would miss those changes
/// for good, since their input offsets are committed (the fault harness saw counts one short
/// after a rebalance under exactly-once). Here a transaction of another producer holds a
/// change to the changelog open while a worker starts, and commits meanwhile: the restored
/// table has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reads_a_changelog_transaction_that_commits_while_it_waits() {
    let dir = scratch_dir("table-open-txn");
    let kafka = Kafka::single(&dir);
    let broker = kafka.bootstrap();
    // A first run counts k = 1 and commits it.
    {
        let (app, adds, totals) = totals_app(&broker);
        let worker = app.start().await.expect("start");
        adds.send(1).key("k".to_owned()).await.expect("send");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while totals.get(&"k".to_owned()) != Some(1) {
            assert!(
                std::time::Instant::now() < deadline,
                "k was not counted within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The stop commits the change.
        worker.shutdown().await.expect("stop");
    }
    // Another producer writes k = 5 to the changelog in a transaction it leaves open.
    let changelog = "open-txn-totals-changelog";
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("transactional.id", "open-txn-writer")
        .create()
        .expect("transactional producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init transactions");
    producer.begin_transaction().expect("begin");
    producer
        .send(BaseRecord::to(changelog).key("\"k\"").payload("5"))
        .map_err(|(e, _)| e)
        .expect("produce");
    producer.flush(Duration::from_secs(10)).expect("flush");
    // The next worker restores the table while the transaction is open; it commits a moment
    // after the worker started (the scenario's schedule, not a wait for a condition).
    let (app, _, totals) = totals_app(&broker);
    let worker = app.start().await.expect("start again");
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        producer
            .commit_transaction(Duration::from_secs(30))
            .expect("commit");
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(60), worker.ready())
            .await
            .unwrap_or(false),
        "the worker did not get ready"
    );
    committer.join().expect("committer");
    assert_eq!(
        totals.get(&"k".to_owned()),
        Some(5),
        "the restore ended before the open transaction's committed change"
    );
    worker.shutdown().await.expect("stop");
}

/// `Worker::processed` on Kafka with exactly-once, where every topic the worker reads is
/// written in transactions (the app's own sends join its transaction, and so do the records
/// its `group_by` writes to the repartition topic): a transaction's commit marker takes an
/// offset after its last record, so a commit that stopped at the last record processed never
/// reached the end of the log, and `processed` never answered. The worker commits past the
/// markers its consumer read past, as Kafka Streams does; the counts are exact when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_answers_with_exactly_once_when_the_topics_read_are_transactional() {
    const WORDS: usize = 300;
    let dir = scratch_dir("processed-eos");
    let kafka = Kafka::single(&dir);
    let app = App::new("processed-eos");
    let url = format!("kafka://{}", kafka.bootstrap());
    app.configure(|s| {
        s.broker = url;
        s.topic_partitions = 2;
        s.processing_guarantee = rill::ProcessingGuarantee::ExactlyOnce;
    });
    let words = app.topic("words").value_type::<String>();
    let counts = app.table::<String, i64>("counts");
    common::count_words(&app, &words, &counts);
    let worker = app.start().await.expect("start");
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..WORDS {
        let word = format!("w{}", i % 7);
        *want.entry(word.clone()).or_default() += 1;
        words.send(word).await.expect("send");
    }
    worker
        .processed(Duration::from_secs(60))
        .await
        .expect("processed() did not answer: the commit never reached the end of the logs");
    for (word, n) in &want {
        assert_eq!(
            counts.get(word),
            Some(*n),
            "processed() answered before {word} was counted"
        );
    }
    worker.shutdown().await.expect("stop");
}
