//! The durable embedded transport (`file://PATH`): what a worker leaves in its log is there
//! when it starts again — table state, unprocessed input, committed offsets — exactly-once
//! commits are all or nothing across a crash, and retention and compaction remove records from
//! the disk as from memory.

mod common;

use common::{wait_until_state, within, Recorder, WAIT};
use rill::prelude::*;
use rill::transport::{
    Consumer, ConsumerEvent, FileBroker, Fsync, OutgoingRecord, Retention, TopicPartition,
    TopicSpec, Transport,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A fresh temporary directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rill-durable-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Starts a worker and waits until it reads its topics.
async fn started(app: &App, what: &str) -> rill::Worker {
    let worker = app.start().await.expect(what);
    assert!(
        within(WAIT, "the worker to be ready", worker.ready()).await,
        "the worker stopped"
    );
    worker
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Splits sentences into lower-cased words.
fn split_sentences(mut sentences: Stream<String>) -> impl AsyncIterable<String> {
    stream! {
        while let Some(sentence) = sentences.next().await {
            for word in sentence.split_whitespace() {
                yield word.to_lowercase();
            }
        }
    }
}

async fn count_words(words: Stream<String>, word_counts: Table<String, i64>) {
    let mut words = words.group_by(GroupBy::new("word", |w: &String| w.clone()));
    while let Some(word) = words.next().await {
        word_counts.update(word, |n| *n += 1);
    }
}

/// The word count of `examples/word_count.rs`, on `file://dir`.
fn word_count(dir: &Path) -> (App, Topic<Bytes, String>, Table<String, i64>) {
    let app = App::new("durable-words");
    app.configure(|s| s.broker = file_url(dir));
    let sentences = app.topic("sentences").value_codec(Utf8);
    let words = app.topic("words").value_type::<String>();
    let word_counts = app.table::<String, i64>("word_counts");
    app.agent(split_sentences).channel(&sentences).sink(&words);
    app.agent_with(word_counts.clone(), count_words)
        .named("count_words")
        .channel(&words);
    (app, sentences, word_counts)
}

fn counts_of(table: &Table<String, i64>, words: &[&str]) -> BTreeMap<String, Option<i64>> {
    words
        .iter()
        .map(|w| (w.to_string(), table.get(&w.to_string())))
        .collect()
}

fn expected(pairs: &[(&str, i64)]) -> BTreeMap<String, Option<i64>> {
    pairs
        .iter()
        .map(|(w, n)| (w.to_string(), Some(*n)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_word_count_worker_keeps_its_counts_and_counts_only_new_words() {
    let dir = temp_dir("words");
    {
        let (app, sentences, word_counts) = word_count(&dir);
        let worker = started(&app, "start").await;
        sentences.send("the quick fox".into()).await.expect("send");
        sentences.send("the end".into()).await.expect("send");
        worker.processed(WAIT).await.expect("processed");
        assert_eq!(
            counts_of(&word_counts, &["the", "quick", "fox", "end"]),
            expected(&[("the", 2), ("quick", 1), ("fox", 1), ("end", 1)])
        );
        worker.shutdown().await.expect("stop");
    }
    // A new process would build the app again: so does the test.
    let (app, sentences, word_counts) = word_count(&dir);
    let worker = started(&app, "restart").await;
    // The counts come back (from the table's changelog in the log).
    wait_until_state(
        WAIT,
        "the table is restored",
        || counts_of(&word_counts, &["the", "quick", "fox", "end"]),
        |c| *c == expected(&[("the", 2), ("quick", 1), ("fox", 1), ("end", 1)]),
    )
    .await;
    // Nothing is counted twice (the committed offsets came back too), new words are counted.
    sentences.send("the lazy dog".into()).await.expect("send");
    worker.processed(WAIT).await.expect("processed");
    assert_eq!(
        counts_of(&word_counts, &["the", "quick", "fox", "end", "lazy", "dog"]),
        expected(&[
            ("the", 3),
            ("quick", 1),
            ("fox", 1),
            ("end", 1),
            ("lazy", 1),
            ("dog", 1)
        ])
    );
    worker.shutdown().await.expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An app whose agent records every number it reads from `numbers`.
fn recording(dir: &Path, seen: &Recorder<i64>) -> (App, Topic<Bytes, i64>) {
    let app = App::new("durable-numbers");
    app.configure(|s| {
        s.broker = file_url(dir);
        s.topic_partitions = 3;
    });
    let numbers = app.topic("numbers").value_type::<i64>();
    let seen = seen.clone();
    app.agent(|mut stream: Stream<i64>| {
        stream! {
            while let Some(n) = stream.next().await {
                yield n;
            }
        }
    })
    .channel(&numbers)
    .sink(move |n: i64| seen.push(n));
    (app, numbers)
}

fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_sent_while_the_worker_is_stopped_is_processed_once_after_it_restarts() {
    let dir = temp_dir("input");
    let before = Recorder::new();
    {
        let (app, numbers) = recording(&dir, &before);
        let worker = started(&app, "start").await;
        for n in 0..50 {
            numbers
                .send(n)
                .key(Bytes::from(n.to_string()))
                .await
                .expect("send");
        }
        worker.processed(WAIT).await.expect("processed");
        worker.shutdown().await.expect("stop");
    }
    assert_eq!(sorted(before.snapshot()), (0..50).collect::<Vec<_>>());
    {
        // Another program of the app sends while no worker runs.
        let (app, numbers) = recording(&dir, &Recorder::new());
        let client = app.start_client().await.expect("client");
        for n in 50..120 {
            numbers
                .send(n)
                .key(Bytes::from(n.to_string()))
                .await
                .expect("send");
        }
        client.shutdown().await.expect("stop the client");
    }
    let after = Recorder::new();
    let (app, _) = recording(&dir, &after);
    let worker = started(&app, "restart").await;
    worker.processed(WAIT).await.expect("processed");
    worker.shutdown().await.expect("stop");
    // What was committed before the stop is not read again; what was sent meanwhile is read
    // once.
    assert_eq!(sorted(after.snapshot()), (50..120).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

fn spec(name: &str, partitions: u32) -> TopicSpec {
    TopicSpec {
        name: name.into(),
        partitions,
        replication_factor: 1,
        compacted: false,
        retention: Retention::default(),
    }
}

fn record(topic: &str, value: &str) -> OutgoingRecord {
    OutgoingRecord {
        topic: Arc::from(topic),
        partition: 0,
        key: None,
        value: Some(Bytes::from(value.to_owned())),
        headers: Vec::new(),
        timestamp: None,
    }
}

fn values(broker: &FileBroker, topic: &str) -> Vec<String> {
    broker
        .memory()
        .read(topic, 0, 0, usize::MAX)
        .into_iter()
        .map(|m| String::from_utf8(m.value.expect("a value").to_vec()).expect("text"))
        .collect()
}

/// Joins `group` on `topic` and reads until it has `n` records.
async fn read_in_group(consumer: &mut Box<dyn Consumer>, topic: &str, n: usize) -> Vec<String> {
    consumer.subscribe(&[topic.to_owned()]).expect("subscribe");
    let mut got = Vec::new();
    while got.len() < n {
        match within(WAIT, "records", consumer.poll())
            .await
            .expect("poll")
        {
            ConsumerEvent::Messages(ms) => got.extend(
                ms.into_iter()
                    .map(|m| String::from_utf8(m.value.expect("value").to_vec()).expect("text")),
            ),
            _ => continue,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_once_commit_is_on_disk_whole_or_not_at_all() {
    let dir = temp_dir("eos");
    let tp = TopicPartition::new("in", 0);
    {
        let broker = FileBroker::open(&dir, "eos").expect("open");
        let direct = broker.transport(Fsync::Commit, false);
        direct.ensure_topic(spec("in", 1)).await.expect("in");
        direct.ensure_topic(spec("out", 1)).await.expect("out");
        for v in ["a", "b", "c"] {
            direct.send(record("in", v)).await.expect("send input");
        }
        let staged = broker.transport(Fsync::Commit, true);
        let mut consumer = staged.group_consumer("g").expect("consumer");
        assert_eq!(read_in_group(&mut consumer, "in", 3).await, ["a", "b", "c"]);
        // The first input processed and committed with its output.
        staged.send(record("out", "A")).await.expect("stage");
        consumer
            .commit(vec![(tp.clone(), 1)])
            .await
            .expect("commit");
        assert_eq!(values(&broker, "out"), ["A"]);
        // The other two processed, their outputs staged: invisible until committed...
        staged.send(record("out", "B")).await.expect("stage");
        staged.send(record("out", "C")).await.expect("stage");
        assert_eq!(
            values(&broker, "out"),
            ["A"],
            "staged records are not visible"
        );
        // ...and the process dies: no commit, no flush.
    }
    {
        let broker = FileBroker::open(&dir, "eos").expect("reopen");
        assert_eq!(values(&broker, "out"), ["A"], "nothing of the lost commit");
        assert_eq!(broker.memory().committed("g"), vec![(tp.clone(), 1)]);
        // Processed again, committed this time.
        let staged = broker.transport(Fsync::Commit, true);
        let mut consumer = staged.group_consumer("g").expect("consumer");
        assert_eq!(read_in_group(&mut consumer, "in", 2).await, ["b", "c"]);
        staged.send(record("out", "B")).await.expect("stage");
        staged.send(record("out", "C")).await.expect("stage");
        consumer
            .commit(vec![(tp.clone(), 3)])
            .await
            .expect("commit");
        // An abort drops what was staged since.
        staged.send(record("out", "never")).await.expect("stage");
        consumer.abort().await.expect("abort");
        consumer.commit(Vec::new()).await.expect("empty commit");
    }
    let broker = FileBroker::open(&dir, "eos").expect("reopen");
    assert_eq!(values(&broker, "out"), ["A", "B", "C"]);
    assert_eq!(broker.memory().committed("g"), vec![(tp.clone(), 3)]);
    // The inputs the group committed are gone, on disk too; their offsets stay.
    assert_eq!(broker.records_on_disk("in", 0).expect("count"), 0);
    assert_eq!(broker.memory().start_offset("in", 0), Some(3));
    assert_eq!(broker.memory().end_offset("in", 0), Some(3));
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_input_is_removed_from_disk_and_offsets_go_on_after_a_restart() {
    let dir = temp_dir("retention");
    let seen = Recorder::new();
    {
        let (app, numbers) = recording(&dir, &seen);
        let worker = started(&app, "start").await;
        for n in 0..3000 {
            numbers
                .send(n)
                .key(Bytes::from(n.to_string()))
                .await
                .expect("send");
        }
        worker.processed(WAIT).await.expect("processed");
        worker.shutdown().await.expect("stop");
    }
    let ends: Vec<i64> = {
        let broker = FileBroker::open(&dir, "durable-numbers").expect("open");
        let memory = broker.memory();
        let mut ends = Vec::new();
        for p in 0..3 {
            let end = memory.end_offset("numbers", p).expect("partition");
            assert!(end > 0, "partition {p} had records");
            // Nothing left of the partition on disk, and it starts where it ended.
            assert_eq!(broker.records_on_disk("numbers", p).expect("count"), 0);
            assert_eq!(memory.start_offset("numbers", p), Some(end));
            assert_eq!(memory.record_count("numbers", p), Some(0));
            ends.push(end);
        }
        assert_eq!(ends.iter().sum::<i64>(), 3000);
        ends
    };
    // A restarted worker goes on from those offsets.
    let after = Recorder::new();
    let (app, numbers) = recording(&dir, &after);
    let worker = started(&app, "restart").await;
    for n in 3000..3010 {
        numbers
            .send(n)
            .key(Bytes::from(n.to_string()))
            .await
            .expect("send");
    }
    worker.processed(WAIT).await.expect("processed");
    let offsets = app.end_offsets("numbers").await.expect("ends");
    assert_eq!(offsets.iter().sum::<i64>(), ends.iter().sum::<i64>() + 10);
    worker.shutdown().await.expect("stop");
    assert_eq!(sorted(after.snapshot()), (3000..3010).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts events per key in a table, with a commit (so a changelog record per key changed)
/// after every event.
fn per_key_counts(dir: &Path) -> (App, Topic<Bytes, u32>, Table<u32, u64>) {
    let app = App::new("durable-compact");
    app.configure(|s| {
        s.broker = format!("{}?fsync=never", file_url(dir));
        s.topic_partitions = 2;
        s.commit_every = Some(1);
    });
    let events = app.topic("events").value_type::<u32>();
    let counts = app.table::<u32, u64>("counts");
    app.agent_with(
        counts.clone(),
        |mut s: Stream<u32>, counts: Table<u32, u64>| async move {
            while let Some(k) = s.next().await {
                counts.update(k, |n| *n += 1);
            }
        },
    )
    .channel(&events);
    (app, events, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_changelog_is_compacted_on_disk_and_reloads_to_the_same_table() {
    const EVENTS: u32 = 6000;
    const KEYS: u32 = 5;
    let dir = temp_dir("compact");
    let table: BTreeMap<u32, u64> = {
        let (app, events, counts) = per_key_counts(&dir);
        let worker = started(&app, "start").await;
        for i in 0..EVENTS {
            let k = i % KEYS;
            events
                .send(k)
                .key(Bytes::from(k.to_string()))
                .await
                .expect("send");
        }
        worker.processed(WAIT).await.expect("processed");
        let table = counts.items().into_iter().collect();
        worker.shutdown().await.expect("stop");
        table
    };
    let expected: BTreeMap<u32, u64> = (0..KEYS).map(|k| (k, u64::from(EVENTS / KEYS))).collect();
    assert_eq!(table, expected);
    {
        let broker = FileBroker::open(&dir, "durable-compact").expect("open");
        let changelog = "durable-compact-counts-changelog";
        let (mut written, mut on_disk) = (0, 0);
        for p in 0..2 {
            written += broker.memory().end_offset(changelog, p).expect("partition");
            let n = broker.records_on_disk(changelog, p).expect("count");
            assert_eq!(Some(n), broker.memory().record_count(changelog, p));
            on_disk += n as i64;
        }
        assert!(
            written >= i64::from(EVENTS) / 2,
            "a changelog record per commit: {written}"
        );
        assert!(
            on_disk * 2 < written,
            "compaction removed replaced records from disk: {on_disk} of {written} left"
        );
    }
    // Rebuilt from the compacted changelog, the table is the same.
    let (app, _, counts) = per_key_counts(&dir);
    let worker = started(&app, "restart").await;
    wait_until_state(
        WAIT,
        "the table is restored",
        || counts.items().into_iter().collect::<BTreeMap<u32, u64>>(),
        |reloaded| *reloaded == expected,
    )
    .await;
    worker.processed(WAIT).await.expect("processed");
    let reloaded: BTreeMap<u32, u64> = counts.items().into_iter().collect();
    worker.shutdown().await.expect("stop");
    assert_eq!(reloaded, expected, "nothing counted again");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fjall_table_store_works_beside_the_file_log() {
    for guarantee in [
        rill::ProcessingGuarantee::AtLeastOnce,
        rill::ProcessingGuarantee::ExactlyOnce,
    ] {
        fjall_store_beside_the_log(guarantee).await;
    }
}

/// Two runs of the word count with a `fjall://` store in the log's directory: the second
/// counts on from the first.
async fn fjall_store_beside_the_log(guarantee: rill::ProcessingGuarantee) {
    let dir = temp_dir(&format!("store-{guarantee:?}"));
    for round in 0..2 {
        let (app, sentences, word_counts) = word_count(&dir);
        app.configure(|s| {
            s.store = format!("fjall://{}", dir.display());
            s.processing_guarantee = guarantee;
        });
        let worker = started(&app, "start").await;
        sentences.send("one two one".into()).await.expect("send");
        let n = 2 * (round + 1);
        let want = expected(&[("one", n), ("two", n / 2)]);
        // (Under exactly-once, `processed` can return before the repartitioned words are
        // counted: the counts are waited for, then checked again once all is processed.)
        wait_until_state(
            WAIT,
            "the words are counted",
            || counts_of(&word_counts, &["one", "two"]),
            |c| *c == want,
        )
        .await;
        worker.processed(WAIT).await.expect("processed");
        assert_eq!(counts_of(&word_counts, &["one", "two"]), want);
        worker.shutdown().await.expect("stop");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_file_urls_are_refused_with_what_is_wrong() {
    let app = App::new("durable-bad-url");
    app.configure(|s| s.broker = "file://".into());
    let e = app.start().await.expect_err("no directory");
    assert!(e.to_string().contains("names no directory"), "{e}");
    let app = App::new("durable-bad-url");
    app.configure(|s| s.broker = "file:///tmp/x?fsync=sometimes".into());
    let e = app.start().await.expect_err("bad fsync");
    assert!(
        e.to_string()
            .contains("fsync=\"sometimes\" is not one of commit, always, never"),
        "{e}"
    );
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Transfer {
    account_id: String,
    seq: u32,
}

/// `Worker::processed` with exactly-once on `file://`: the records a commit writes are
/// counted until the log's index has them, so "processed" is not answered while the sent
/// records, or the repartitioned ones, are on their way through a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_processed_waits_for_every_record_through_a_group_by() {
    const EVENTS: u32 = 2000;
    // The window was a commit's: several runs make it likely that one falls into it.
    for run in 0..5 {
        let dir = temp_dir(&format!("processed-eos-{run}"));
        let app = App::new("durable-processed");
        let url = file_url(&dir);
        app.configure(|s| {
            s.broker = url;
            s.processing_guarantee = rill::ProcessingGuarantee::ExactlyOnce;
            s.commit_interval = std::time::Duration::from_millis(100);
        });
        let topic = app
            .topic("transfers")
            .partitions(2)
            .value_type::<Transfer>();
        let seen: Recorder<u32> = Recorder::new();
        let rec = seen.clone();
        app.agent(move |s: Stream<Transfer>| {
            let rec = rec.clone();
            async move {
                let mut s = s.group_by(field!(Transfer.account_id));
                while let Some(t) = s.next().await {
                    rec.push(t.seq);
                }
            }
        })
        .named("by-account")
        .channel(&topic);
        let worker = started(&app, "start").await;
        for seq in 0..EVENTS {
            topic
                .send(Transfer {
                    account_id: format!("acct-{}", seq % 7),
                    seq,
                })
                .await
                .expect("send");
        }
        worker.processed(WAIT).await.expect("processed");
        let mut got = seen.snapshot();
        got.sort_unstable();
        assert_eq!(
            got,
            (0..EVENTS).collect::<Vec<_>>(),
            "run {run}: processed() answered before every transfer went through the repartition topic"
        );
        worker.shutdown().await.expect("stop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
