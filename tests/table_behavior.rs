//! Tables on the embedded transport: counts are exact, survive restarts (from the changelog
//! with the memory store, from local state plus the changelog tail with the fjall store), are
//! restored before an agent sees an event, and cannot be written by concurrent actors.

mod common;

use common::{read_all, wait_until, Recorder, WAIT};
use rill::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The word count of `examples/word_count.rs`: sentences → words (a sink) → `group_by` word →
/// the `word_counts` table.
struct WordCount {
    app: App,
    sentences: Topic<Bytes, String>,
    counts: Table<String, i64>,
}

fn word_count(id: &str, broker: &str, store: Option<&str>) -> WordCount {
    let app = App::new(id);
    let (broker, store) = (broker.to_owned(), store.map(str::to_owned));
    app.configure(|s| {
        s.broker = broker;
        s.topic_partitions = 4;
        s.commit_interval = Duration::from_millis(50);
        if let Some(store) = store {
            s.store = store;
        }
    });
    let sentences = app.topic("sentences").value_codec(Utf8);
    let words = app.topic("words").value_type::<String>();
    let counts = app.table::<String, i64>("word_counts");
    app.agent(|mut sentences: Stream<String>| {
        stream! {
            while let Some(sentence) = sentences.next().await {
                for word in sentence.split_whitespace() {
                    yield word.to_lowercase();
                }
            }
        }
    })
    .named("split")
    .channel(&sentences)
    .sink(&words);
    common::count_words(&app, &words, &counts);
    WordCount {
        app,
        sentences,
        counts,
    }
}

const SENTENCES: [&str; 4] = [
    "the quick brown fox",
    "jumps over the lazy dog",
    "The dog sleeps",
    "a fox a dog a cat",
];

fn expected(rounds: usize) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for _ in 0..rounds {
        for s in SENTENCES {
            for w in s.split_whitespace() {
                *m.entry(w.to_lowercase()).or_insert(0) += 1;
            }
        }
    }
    m
}

fn snapshot(t: &Table<String, i64>) -> BTreeMap<String, i64> {
    t.items().into_iter().collect()
}

async fn send_rounds(wc: &WordCount, rounds: usize) {
    for _ in 0..rounds {
        for s in SENTENCES {
            wc.sentences.send(s.to_owned()).await.expect("send");
        }
    }
}

async fn wait_for_counts(t: &Table<String, i64>, want: &BTreeMap<String, i64>) {
    common::wait_until_state(WAIT, "the word counts", || snapshot(t), |got| got == want).await;
}

fn store_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rill-table-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_counts_are_exact_and_the_changelog_holds_them() {
    let wc = word_count("wc-exact", "memory://", None);
    let worker = wc.app.start().await.expect("start");
    send_rounds(&wc, 25).await;
    wait_for_counts(&wc.counts, &expected(25)).await;
    assert_eq!(wc.counts.value(&"the".to_owned()), 75);
    assert_eq!(wc.counts.value(&"unseen".to_owned()), 0, "default value");
    assert_eq!(wc.counts.get(&"unseen".to_owned()), None);
    worker.shutdown().await.expect("stop");

    // The changelog's last record per key is the count (compacted topic semantics), and each
    // key is in the partition Kafka's Java client would pick for it.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for m in read_all(&wc.app, "wc-exact-word_counts-changelog") {
        let key: String = serde_json::from_slice(m.key.as_deref().expect("key")).expect("key");
        let value: i64 = serde_json::from_slice(m.value.as_deref().expect("value")).expect("v");
        assert_eq!(
            m.partition,
            common::kafka_partition(m.key.as_deref().expect("key"), 4),
            "changelog partition of {key}"
        );
        last.insert(key, value);
    }
    assert_eq!(last, expected(25));
}

/// The changelog records `worker` replayed to restore `table`, once its restore is over (the
/// counts show as records are replayed; the replay is counted at its end).
async fn replayed(worker: &rill::Worker, table: &str) -> u64 {
    assert!(
        common::within(WAIT, "the worker to be ready", worker.ready()).await,
        "the worker stopped"
    );
    worker.table_records_replayed(table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_tables_are_rebuilt_from_the_changelog_on_restart() {
    let wc = word_count("wc-restart", "memory://wc-restart", None);
    let worker = wc.app.start().await.expect("start");
    send_rounds(&wc, 10).await;
    wait_for_counts(&wc.counts, &expected(10)).await;
    worker.shutdown().await.expect("stop");
    assert!(wc.counts.is_empty(), "a stopped worker holds no partitions");

    // A new process (a new app on the same broker) rebuilds the table from the changelog.
    let wc = word_count("wc-restart", "memory://wc-restart", None);
    let worker = wc.app.start().await.expect("restart");
    wait_for_counts(&wc.counts, &expected(10)).await;
    // The counts show as the changelog is replayed; the restore is over (and counted) once
    // the worker is ready.
    assert!(
        common::within(WAIT, "the worker to be ready", worker.ready()).await,
        "the worker stopped"
    );
    assert!(worker.table_records_replayed("word_counts") > 0);
    send_rounds(&wc, 5).await;
    wait_for_counts(&wc.counts, &expected(15)).await;
    worker.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_store_keeps_counts_across_restarts_and_replays_only_the_tail() {
    let dir = store_dir("fjall");
    let store = format!("fjall://{}", dir.display());

    // Embedded broker of its own: after the restart the changelog is gone, the store is not.
    let wc = word_count("wc-fjall", "memory://", Some(&store));
    let worker = wc.app.start().await.expect("start");
    send_rounds(&wc, 10).await;
    wait_for_counts(&wc.counts, &expected(10)).await;
    worker.shutdown().await.expect("stop");

    let wc = word_count("wc-fjall", "memory://", Some(&store));
    let worker = wc.app.start().await.expect("restart");
    wait_for_counts(&wc.counts, &expected(10)).await;
    assert_eq!(worker.table_records_replayed("word_counts"), 0);
    send_rounds(&wc, 3).await;
    wait_for_counts(&wc.counts, &expected(13)).await;
    worker.shutdown().await.expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_store_replays_the_changelog_written_since_its_checkpoint() {
    let dir = store_dir("tail");
    let store = format!("fjall://{}", dir.display());
    let broker = "memory://wc-tail";

    // Worker A counts with a local store, then stops.
    let a = word_count("wc-tail", broker, Some(&store));
    let worker = a.app.start().await.expect("start a");
    send_rounds(&a, 10).await;
    wait_for_counts(&a.counts, &expected(10)).await;
    worker.shutdown().await.expect("stop a");
    let changelog = "wc-tail-word_counts-changelog";
    let before = read_all(&a.app, changelog).len();

    // Meanwhile another worker (its own, empty store) takes over and counts more.
    let other = store_dir("tail-other");
    let b = word_count(
        "wc-tail",
        broker,
        Some(&format!("fjall://{}", other.display())),
    );
    let worker = b.app.start().await.expect("start b");
    wait_for_counts(&b.counts, &expected(10)).await;
    assert_eq!(
        replayed(&worker, "word_counts").await,
        before as u64,
        "an empty store replays the whole changelog"
    );
    send_rounds(&b, 2).await;
    wait_for_counts(&b.counts, &expected(12)).await;
    worker.shutdown().await.expect("stop b");
    let tail = read_all(&b.app, changelog).len() - before;
    assert!(tail > 0);

    // A comes back: its store has the first 10 rounds, the changelog tail the rest.
    let a = word_count("wc-tail", broker, Some(&store));
    let worker = a.app.start().await.expect("restart a");
    wait_for_counts(&a.counts, &expected(12)).await;
    assert_eq!(
        replayed(&worker, "word_counts").await,
        tail as u64,
        "only the changelog written since the store's checkpoint is replayed"
    );
    worker.shutdown().await.expect("stop a");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_sees_a_fully_restored_table() {
    let broker = "memory://restore-first";
    let build = || {
        let app = App::new("restore-first");
        app.configure(|s| {
            s.broker = broker.to_owned();
            s.topic_partitions = 1;
        });
        let totals = app.table::<String, i64>("totals");
        let adds = app.topic("adds").value_type::<i64>();
        let seen = Recorder::new();
        let (t, r) = (totals.clone(), seen.clone());
        app.agent(move |mut adds: Stream<i64>| {
            let (totals, seen) = (t.clone(), r.clone());
            async move {
                while let Some(n) = adds.next().await {
                    // What the agent sees before it writes.
                    seen.push(totals.value(&"sum".to_owned()));
                    totals.update("sum".to_owned(), |s| *s += n);
                }
            }
        })
        .named("sum")
        .channel(&adds);
        (app, totals, adds, seen)
    };

    // 20k updates of one key, committed to the changelog.
    let (app, totals, adds, _) = build();
    app.configure(|s| s.commit_interval = Duration::from_millis(10));
    let worker = app.start().await.expect("start");
    for _ in 0..20_000 {
        adds.send(1).await.expect("send");
    }
    wait_until(WAIT, "20000 adds", || {
        totals.value(&"sum".to_owned()) == 20_000
    })
    .await;
    worker.shutdown().await.expect("stop");

    // After a restart the first event already sees the whole sum.
    let (app, totals, adds, seen) = build();
    let worker = app.start().await.expect("restart");
    adds.send(5).await.expect("send");
    wait_until(WAIT, "the new add", || !seen.is_empty()).await;
    assert_eq!(
        seen.snapshot()[0],
        20_000,
        "the agent saw a partly restored table"
    );
    wait_until(WAIT, "sum", || totals.value(&"sum".to_owned()) == 20_005).await;
    worker.shutdown().await.expect("stop");
}

/// An agent named `name` counting the words it reads from `words` in `counts`.
fn count_words(
    app: &App,
    name: &str,
    counts: &Table<String, i64>,
    words: &Topic<Bytes, String>,
) -> Agent<String> {
    let t = counts.clone();
    app.agent(move |mut words: Stream<String>| {
        let counts = t.clone();
        async move {
            while let Some(word) = words.next().await {
                counts.update(word, |n| *n += 1);
            }
        }
    })
    .named(name)
    .channel(words)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_concurrency_above_one_and_a_writable_table_does_not_start() {
    let app = App::new("concurrent-writer");
    let counts = app.table::<String, i64>("counts");
    let words = app.topic("words").value_type::<String>();
    count_words(&app, "racy", &counts, &words).concurrency(3);
    let err = app
        .start()
        .await
        .expect_err("the worker must refuse to start");
    let message = err.to_string();
    for part in [
        "table \"counts\"",
        "agent \"racy\" has concurrency 3",
        "table.reader()",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    assert!(counts.is_empty(), "nothing may run");
    // The app can be started again once the agent is fixed: no worker was left behind.
    assert!(app.start().await.is_err(), "still refused on a second try");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_table_needs_a_reader_in_an_agent_with_concurrency_above_one() {
    let build = |reader: bool| {
        let app = App::new("concurrent-windows");
        let views = app
            .table::<(String, i64), u64>("views")
            .tumbling(Duration::from_secs(60), None);
        let pages = app.topic("pages").value_type::<String>();
        let (writable, read_only) = (views.clone(), views.reader());
        app.agent(move |mut pages: Stream<String>| {
            // Either handle only reads here; taking the writable one is what is refused.
            let views = reader.then(|| read_only.clone());
            let writable = (!reader).then(|| writable.clone());
            async move {
                while let Some(page) = pages.next().await {
                    let n = match (&views, &writable) {
                        (Some(v), _) => v.get(&page).now(),
                        (_, Some(w)) => w.get(&page).now(),
                        _ => 0,
                    };
                    let _ = n;
                }
            }
        })
        .named("pageviews")
        .concurrency(2)
        .channel(&pages);
        app
    };
    let err = build(false)
        .start()
        .await
        .expect_err("a writable windowed handle is refused");
    assert!(
        err.to_string().contains("table \"views\"") && err.to_string().contains("concurrency 2"),
        "{err}"
    );
    let worker = build(true).start().await.expect("a reader is fine");
    worker.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_concurrency_above_one_reads_a_table_through_a_reader() {
    let app = App::new("concurrent-reader");
    let counts = app.table::<String, i64>("counts");
    let words = app.topic("words").value_type::<String>();
    let lookups = app.channel::<String>();
    // One writer with concurrency 1 ...
    count_words(&app, "count", &counts, &words);
    // ... and three readers.
    let reader = counts.reader();
    let reads = Recorder::new();
    let r = reads.clone();
    app.agent(move |mut lookups: Stream<String>| {
        let (counts, reads) = (reader.clone(), r.clone());
        async move {
            while let Some(word) = lookups.next().await {
                reads.push(counts.value(&word));
            }
        }
    })
    .named("lookups")
    .concurrency(3)
    .channel(&lookups);
    let worker = app.start().await.expect("start");
    for _ in 0..5 {
        words.send("x".to_owned()).partition(0).await.expect("send");
    }
    wait_until(WAIT, "five counted", || counts.value(&"x".to_owned()) == 5).await;
    for _ in 0..6 {
        lookups.send("x".to_owned()).await.expect("send");
    }
    wait_until(WAIT, "six lookups", || reads.snapshot().len() == 6).await;
    assert_eq!(reads.snapshot(), vec![5; 6]);
    assert_eq!(worker.agent_errors("lookups"), 0);
    worker.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_values_are_served_over_http() {
    let wc = word_count("wc-http", "memory://", None);
    wc.app.configure(|s| s.web_port = Some(0));
    let worker = wc.app.start().await.expect("start");
    let addr = worker.web_addr().expect("a web server");
    send_rounds(&wc, 4).await;
    wait_for_counts(&wc.counts, &expected(4)).await;
    let get =
        |path: &'static str| tokio::task::spawn_blocking(move || common::http_get(addr, path));
    assert_eq!(
        get("/tables/word_counts/the").await.expect("get"),
        (200, "12".to_owned())
    );
    assert_eq!(
        get("/tables/word_counts/%22dog%22").await.expect("get"),
        (200, "12".to_owned())
    );
    let (status, body) = get("/tables/word_counts/zebra").await.expect("get");
    assert_eq!(status, 404, "{body}");
    let (status, body) = get("/tables/nope/the").await.expect("get");
    assert_eq!(status, 404);
    assert!(body.contains("no table named"), "{body}");
    let (status, body) = get("/tables").await.expect("get");
    assert_eq!(status, 200);
    let tables: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(tables[0]["name"], "word_counts");
    assert_eq!(tables[0]["changelog"], "wc-http-word_counts-changelog");
    assert_eq!(tables[0]["partitions"], 4);
    worker.shutdown().await.expect("stop");
}

/// A lookup's answer, once it is not 503 (the membership topic has not yet told the worker
/// where the key is).
async fn answered(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    common::within(WAIT, "a lookup's answer", async {
        loop {
            let p = path.to_owned();
            let r = tokio::task::spawn_blocking(move || common::http_get(addr, &p))
                .await
                .expect("get");
            if r.0 != 503 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_worker_answers_for_keys_another_worker_owns() {
    // Two workers of one app share the partitions (a consumer group on one embedded broker).
    let a = word_count("wc-fwd", "memory://wc-fwd", None);
    let b = word_count("wc-fwd", "memory://wc-fwd", None);
    a.app.configure(|s| s.web_port = Some(0));
    b.app.configure(|s| s.web_port = Some(0));
    let wa = a.app.start().await.expect("start a");
    let wb = b.app.start().await.expect("start b");
    common::wait_until(WAIT, "both workers hold partitions", || {
        !a.counts.local_partitions().is_empty()
            && !b.counts.local_partitions().is_empty()
            && a.counts.local_partitions().len() + b.counts.local_partitions().len() == 4
    })
    .await;
    send_rounds(&a, 6).await;
    let want = expected(6);
    common::wait_until_state(
        WAIT,
        "the counts, split over both workers",
        || {
            let mut all = snapshot(&a.counts);
            all.extend(snapshot(&b.counts));
            all
        },
        |all| *all == want,
    )
    .await;
    // Each worker misses some words: those lookups are forwarded.
    assert!(want.keys().any(|w| a.counts.get(w).is_none()));
    assert!(want.keys().any(|w| b.counts.get(w).is_none()));
    let (addr_a, addr_b) = (wa.web_addr().expect("web a"), wb.web_addr().expect("web b"));
    for (word, count) in &want {
        let path = format!("/tables/word_counts/{word}");
        let from_a = answered(addr_a, &path).await;
        let from_b = answered(addr_b, &path).await;
        assert_eq!(from_a, (200, count.to_string()), "{word} on a");
        assert_eq!(from_b, (200, count.to_string()), "{word} on b");
    }
    wa.shutdown().await.expect("stop a");
    wb.shutdown().await.expect("stop b");
}

/// One worker of app `id` on the shared embedded broker of that name: a `squares` table
/// (n → n²) written from the keyed topic `numbers`.
fn squares(id: &str, partitions: u32, standby: u32) -> (App, Table<u64, u64>, Topic<u64, u64>) {
    squares_on(&format!("memory://{id}"), id, partitions, standby)
}

/// [`squares`] on the broker at `url`.
fn squares_on(
    url: &str,
    id: &str,
    partitions: u32,
    standby: u32,
) -> (App, Table<u64, u64>, Topic<u64, u64>) {
    let app = App::new(id);
    let url = url.to_owned();
    app.configure(|s| {
        if url.starts_with("kafka:") {
            s.kafka.insert("session.timeout.ms".into(), "6000".into());
            s.kafka
                .insert("heartbeat.interval.ms".into(), "1000".into());
        }
        s.broker = url;
        s.topic_partitions = partitions;
        s.commit_interval = Duration::from_millis(50);
        s.table_standby_replicas = Some(standby);
    });
    let table = app.table::<u64, u64>("squares");
    let numbers = app.topic("numbers").key_type::<u64>().value_type::<u64>();
    let t = table.clone();
    app.agent(move |mut numbers: Stream<u64, u64>| {
        let table = t.clone();
        async move {
            while let Some(n) = numbers.next().await {
                table.insert(n, n * n);
            }
        }
    })
    .named("square")
    .channel(&numbers);
    (app, table, numbers)
}

/// Two workers of one app on a shared embedded broker, with `standby` replicas or not: fills a
/// table of `keys` keys, stops the first worker and returns how many changelog records the
/// second replayed to take its partitions over, after checking the table is complete.
async fn takeover(id: &str, standby: u32, keys: u64) -> u64 {
    let (a, ta, numbers) = squares(id, 4, standby);
    let (b, tb, _) = squares(id, 4, standby);
    let wa = a.start().await.expect("start a");
    let wb = b.start().await.expect("start b");
    wait_until(WAIT, "both workers hold partitions", || {
        ta.local_partitions().len() + tb.local_partitions().len() == 4
            && !ta.local_partitions().is_empty()
            && !tb.local_partitions().is_empty()
    })
    .await;
    for n in 0..keys {
        numbers.send(n).key(n).await.expect("send");
    }
    wait_until(WAIT, "every key in the table", || {
        (ta.len() + tb.len()) as u64 == keys
    })
    .await;
    if standby > 0 {
        wait_until(WAIT, "b's standby copies of a's partitions", || {
            tb.standby_len() == ta.len()
        })
        .await;
    }
    let before = wb.table_records_replayed("squares");
    wa.shutdown().await.expect("stop a");
    wait_until(WAIT, "b holds the whole table", || tb.len() as u64 == keys).await;
    for n in (0..keys).step_by(97) {
        assert_eq!(tb.get(&n), Some(n * n));
    }
    let replayed = wb.table_records_replayed("squares") - before;
    wb.shutdown().await.expect("stop b");
    replayed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_copy_makes_takeover_replay_only_what_it_lacks() {
    let keys = 5_000;
    let cold = takeover("takeover-cold", 0, keys).await;
    let warm = takeover("takeover-warm", 1, keys).await;
    // Without a standby, b replays all of a's partitions; with one, none (a committed before
    // it stopped, and b's copy had caught up).
    assert!(cold > 0, "a cold takeover replays a's partitions");
    assert_eq!(warm, 0, "a warm takeover replays nothing");
}

/// Which of `tables` (one per worker) holds each partition of `partitions`, if exactly one.
fn owners(tables: &[&Table<u64, u64>], partitions: u32) -> Option<Vec<usize>> {
    (0..partitions)
        .map(|p| {
            let holders: Vec<usize> = (0..tables.len())
                .filter(|&w| tables[w].local_partitions().contains(&p))
                .collect();
            (holders.len() == 1).then(|| holders[0])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_standby_copy_is_on_the_worker_that_takes_its_partition_over() {
    standby_placement("memory://placement", "placement", WAIT).await;
}

/// The same on Kafka (librdkafka's mock cluster): the placement predicts librdkafka's range
/// assignor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_standby_copy_is_on_the_worker_that_takes_its_partition_over_on_kafka() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let id = "placement-kafka";
    for (topic, partitions) in [
        ("numbers".to_owned(), 6),
        (format!("{id}-squares-changelog"), 6),
        (format!("{id}-workers"), 1),
    ] {
        cluster
            .create_topic(&topic, partitions, 1)
            .expect("create topic");
    }
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    standby_placement(&url, id, Duration::from_secs(90)).await;
}

/// Three workers share a 6-partition table with one standby replica: each partition has one
/// warm copy, not on its owner; when a worker stops, each of its partitions goes to the worker
/// with the copy, and nothing is replayed.
async fn standby_placement(url: &str, id: &str, wait: Duration) {
    const PARTITIONS: u32 = 6;
    const KEYS: u64 = 3_000;
    let workers: Vec<_> = (0..3).map(|_| squares_on(url, id, PARTITIONS, 1)).collect();
    let numbers = workers[0].2.clone();
    let mut running = Vec::new();
    for (app, _, _) in &workers {
        running.push(Some(app.start().await.expect("start")));
    }
    let tables: Vec<&Table<u64, u64>> = workers.iter().map(|(_, t, _)| t).collect();
    wait_until(wait, "each worker to hold two partitions", || {
        owners(&tables, PARTITIONS).is_some()
            && tables.iter().all(|t| t.local_partitions().len() == 2)
    })
    .await;
    for n in 0..KEYS {
        numbers.send(n).key(n).await.expect("send");
    }
    wait_until(wait, "every key in the table", || {
        tables.iter().map(|t| t.len() as u64).sum::<u64>() == KEYS
    })
    .await;
    // One warm copy of each partition, on a worker that does not own it: 3 000 keys in the
    // standby copies in all (not 6 000, as with a copy of everything on every worker).
    wait_until(wait, "one warm copy of each partition", || {
        let owner = owners(&tables, PARTITIONS).unwrap_or_default();
        let copies: usize = tables.iter().map(|t| t.standby_len()).sum();
        copies as u64 == KEYS
            && (0..PARTITIONS).all(|p| {
                let holders: Vec<usize> = (0..3)
                    .filter(|&w| tables[w].standby_partitions().contains(&p))
                    .collect();
                holders.len() == 1 && owner.get(p as usize) != Some(&holders[0])
            })
    })
    .await;
    let owner = owners(&tables, PARTITIONS).expect("owners");
    let holder = |p: u32| {
        (0..3)
            .find(|&w| tables[w].standby_partitions().contains(&p))
            .expect("a holder")
    };
    // The worker that owns partition 0 stops; each of its partitions must land where its copy
    // is, and nothing be replayed.
    let leaving = owner[0];
    let moved: Vec<(u32, usize)> = (0..PARTITIONS)
        .filter(|&p| owner[p as usize] == leaving)
        .map(|p| (p, holder(p)))
        .collect();
    let stopped = running[leaving].take().expect("running");
    stopped.shutdown().await.expect("stop");
    wait_until(wait, "the survivors to hold every partition", || {
        tables
            .iter()
            .map(|t| t.local_partitions().len())
            .sum::<usize>()
            == PARTITIONS as usize
            && (0..3).all(|w| w == leaving || !tables[w].local_partitions().is_empty())
    })
    .await;
    for (p, w) in &moved {
        assert!(
            tables[*w].local_partitions().contains(p),
            "partition {p} went to worker {w}, which held its copy? owners now: {:?}",
            owners(&tables, PARTITIONS)
        );
    }
    for w in (0..3).filter(|&w| w != leaving) {
        let worker = running[w].as_ref().expect("running");
        assert_eq!(
            worker.table_records_replayed("squares"),
            0,
            "worker {w} replayed changelog records to take partitions over"
        );
    }
    let survivors: u64 = tables.iter().map(|t| t.len() as u64).sum();
    assert_eq!(survivors, KEYS, "every key held by the survivors");
    for n in (0..KEYS).step_by(89) {
        assert!(
            tables.iter().any(|t| t.get(&n) == Some(n * n)),
            "key {n} lost"
        );
    }
    for worker in running.into_iter().flatten() {
        worker.shutdown().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_reads_the_whole_of_a_global_table() {
    let build = || {
        let app = App::new("global");
        app.configure(|s| {
            s.broker = "memory://global".into();
            s.topic_partitions = 4;
            s.commit_interval = Duration::from_millis(20);
        });
        let rates = app.global_table::<String, f64>("rates");
        let updates = app
            .topic("rate-updates")
            .key_type::<String>()
            .value_type::<f64>();
        let t = rates.clone();
        app.agent(move |updates: Stream<f64, String>| {
            let rates = t.clone();
            async move {
                let mut items = updates.items();
                while let Some((currency, rate)) = items.next().await {
                    if let Some(currency) = currency {
                        rates.insert(currency, rate);
                    }
                }
            }
        })
        .named("set_rate")
        .channel(&updates);
        (app, rates, updates)
    };
    let (a, ra, updates) = build();
    let (b, rb, _) = build();
    let wa = a.start().await.expect("start a");
    let wb = b.start().await.expect("start b");
    assert!(ra.is_global());
    let currencies = ["EUR", "USD", "GBP", "JPY", "CHF", "SEK", "NOK", "DKK"];
    for (i, c) in currencies.iter().enumerate() {
        updates
            .send(i as f64)
            .key(c.to_string())
            .await
            .expect("send");
    }
    for t in [&ra, &rb] {
        wait_until(WAIT, "every rate on every worker", || {
            currencies
                .iter()
                .enumerate()
                .all(|(i, c)| t.get(&c.to_string()) == Some(i as f64))
        })
        .await;
    }
    assert_eq!(ra.len(), currencies.len());
    assert_eq!(rb.len(), currencies.len());
    wa.shutdown().await.expect("stop a");
    wb.shutdown().await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_tables_add_and_discard_members() {
    let app = App::new("sets");
    app.configure(|s| s.topic_partitions = 1);
    let tags: rill::SetTable<String, String> = app.table("tags");
    let ops = app.topic("ops").value_type::<(String, String, bool)>();
    let t = tags.clone();
    app.agent(move |mut ops: Stream<(String, String, bool)>| {
        let tags = t.clone();
        async move {
            while let Some((key, member, add)) = ops.next().await {
                if add {
                    tags.add(key, member);
                } else {
                    tags.discard(key, &member);
                }
            }
        }
    })
    .named("tag")
    .channel(&ops);
    let worker = app.start().await.expect("start");
    for (k, m, add) in [
        ("post1", "rust", true),
        ("post1", "kafka", true),
        ("post2", "faust", true),
        ("post1", "rust", false),
        ("post1", "streams", true),
    ] {
        ops.send((k.into(), m.into(), add)).await.expect("send");
    }
    wait_until(WAIT, "the tag sets", || {
        tags.get(&"post1".to_owned())
            .is_some_and(|s| s.iter().map(String::as_str).eq(["kafka", "streams"]))
    })
    .await;
    assert!(tags.contains(&"post2".to_owned(), &"faust".to_owned()));
    assert!(!tags.contains(&"post1".to_owned(), &"rust".to_owned()));
    worker.shutdown().await.expect("stop");
}

/// The 24 distinct words of the restore regression tests (none is "apple" or "pie").
const WORDS_24: &str = "alpha banana cherry date elder fig grape hazel iris jade kiwi lemon \
                        mango nut olive papaya quince rose sage tangerine umber vanilla wheat yam";

/// A table restored from the changelog into a new, empty local store must be in that store
/// before the next commit moves the store's checkpoint to the end of the changelog: else the
/// start after that reads the few keys written since and skips the restored ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fjall_store_keeps_what_the_changelog_restored_into_it() {
    let broker = "memory://wc-new-store";
    let dir = store_dir("new-store");
    let store = format!("fjall://{}", dir.display());
    let mut want: BTreeMap<String, i64> = WORDS_24
        .split_whitespace()
        .map(|w| (w.to_owned(), 1))
        .collect();

    // 1. The default memory store: 24 keys, in the changelog only.
    let wc = word_count("wc-new-store", broker, None);
    let worker = wc.app.start().await.expect("start");
    wc.sentences.send(WORDS_24.to_owned()).await.expect("send");
    wait_for_counts(&wc.counts, &want).await;
    worker.shutdown().await.expect("stop");

    // 2. A new, empty fjall store: the changelog restores the 24 keys; one more sentence
    //    adds one key, and a graceful stop commits it.
    let wc = word_count("wc-new-store", broker, Some(&store));
    let worker = wc.app.start().await.expect("start on fjall");
    wait_for_counts(&wc.counts, &want).await;
    wc.sentences
        .send("apple pie".to_owned())
        .await
        .expect("send");
    want.insert("apple".into(), 1);
    want.insert("pie".into(), 1);
    wait_for_counts(&wc.counts, &want).await;
    worker.shutdown().await.expect("stop");

    // 3. The same store again: every key, from the store, with nothing left to replay.
    let wc = word_count("wc-new-store", broker, Some(&store));
    let worker = wc.app.start().await.expect("restart on fjall");
    wait_for_counts(&wc.counts, &want).await;
    assert_eq!(
        worker.table_records_replayed("word_counts"),
        0,
        "the store holds everything the changelog has"
    );
    worker.shutdown().await.expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An app that writes `KEYS_PER_EVENT` keys per event: `block` n sets keys
/// n·KEYS_PER_EVENT .. (n+1)·KEYS_PER_EVENT to `value`.
fn blocks(id: &str, broker: &str, store: Option<&str>) -> (App, Table<u64, u64>, Topic<u64, u64>) {
    let app = App::new(id);
    let (broker, store) = (broker.to_owned(), store.map(str::to_owned));
    app.configure(|s| {
        s.broker = broker;
        s.topic_partitions = 4;
        if let Some(store) = store {
            s.store = store;
        }
    });
    let table = app.table::<u64, u64>("blocks");
    let topic = app.topic("blocks").key_type::<u64>().value_type::<u64>();
    let t = table.clone();
    app.agent(move |blocks: Stream<u64, u64>| {
        let table = t.clone();
        async move {
            let mut blocks = blocks.items();
            while let Some((block, value)) = blocks.next().await {
                let Some(block) = block else {
                    continue;
                };
                for k in block * KEYS_PER_EVENT..(block + 1) * KEYS_PER_EVENT {
                    table.insert(k, value);
                }
            }
        }
    })
    .named("fill")
    .channel(&topic);
    (app, table, topic)
}

const KEYS_PER_EVENT: u64 = 10_000;

/// The same path at a million keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fjall_store_keeps_a_million_restored_keys() {
    const BLOCKS: u64 = 100;
    let keys = BLOCKS * KEYS_PER_EVENT;
    let broker = "memory://blocks-new-store";
    let dir = store_dir("blocks-new-store");
    let store = format!("fjall://{}", dir.display());
    let long = Duration::from_secs(240);

    let (app, table, topic) = blocks("blocks", broker, None);
    let worker = app.start().await.expect("start");
    for b in 0..BLOCKS {
        topic.send(7).key(b).await.expect("send");
    }
    wait_until(long, "a million keys", || table.len() as u64 == keys).await;
    worker.shutdown().await.expect("stop");

    let (app, table, topic) = blocks("blocks", broker, Some(&store));
    let worker = app.start().await.expect("start on fjall");
    wait_until(long, "a million keys restored", || {
        table.len() as u64 == keys
    })
    .await;
    topic.send(8).key(BLOCKS).await.expect("send");
    wait_until(long, "one more block", || {
        table.len() as u64 == keys + KEYS_PER_EVENT
    })
    .await;
    worker.shutdown().await.expect("stop");

    let (app, table, _) = blocks("blocks", broker, Some(&store));
    let worker = app.start().await.expect("restart on fjall");
    wait_until(long, "every key from the store", || {
        table.len() as u64 == keys + KEYS_PER_EVENT
    })
    .await;
    assert_eq!(worker.table_records_replayed("blocks"), 0);
    for k in (0..keys).step_by(997) {
        assert_eq!(table.get(&k), Some(7), "key {k}");
    }
    assert_eq!(table.get(&keys), Some(8));
    worker.shutdown().await.expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET /tables/squares` once no partition is being restored: the JSON and its text.
async fn restore_report(addr: std::net::SocketAddr) -> (serde_json::Value, String) {
    common::within(WAIT, "the restore to finish", async {
        loop {
            let (status, body) =
                tokio::task::spawn_blocking(move || common::http_get(addr, "/tables/squares"))
                    .await
                    .expect("get");
            assert_eq!(status, 200, "{body}");
            let detail: serde_json::Value = serde_json::from_str(&body).expect("json");
            if detail["recovering_partitions"]
                .as_array()
                .is_some_and(Vec::is_empty)
            {
                return (detail, body);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A standby copy promoted to active on a failover is written to the new owner's local store:
/// after one more commit and a restart on that store, every key the copy had is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_copy_taken_over_is_kept_in_the_local_store() {
    let id = "standby-store";
    let keys = 2_000u64;
    let (dir_a, dir_b) = (store_dir("standby-store-a"), store_dir("standby-store-b"));
    let with_store = |dir: &PathBuf| {
        let (app, table, numbers) = squares(id, 4, 1);
        let store = format!("fjall://{}", dir.display());
        app.configure(|s| {
            s.store = store;
            s.web_port = Some(0);
        });
        (app, table, numbers)
    };
    let (a, ta, numbers) = with_store(&dir_a);
    let (b, tb, numbers_b) = with_store(&dir_b);
    let wa = a.start().await.expect("start a");
    let wb = b.start().await.expect("start b");
    wait_until(WAIT, "both workers hold partitions", || {
        ta.local_partitions().len() + tb.local_partitions().len() == 4
            && !ta.local_partitions().is_empty()
            && !tb.local_partitions().is_empty()
    })
    .await;
    for n in 0..keys {
        numbers.send(n).key(n).await.expect("send");
    }
    wait_until(WAIT, "every key in the table", || {
        (ta.len() + tb.len()) as u64 == keys
    })
    .await;
    wait_until(WAIT, "b's standby copies of a's partitions", || {
        tb.standby_len() == ta.len()
    })
    .await;
    let taken_over = ta.local_partitions();
    let before = wb.table_records_replayed("squares");
    wa.shutdown().await.expect("stop a");
    wait_until(WAIT, "b holds the whole table", || tb.len() as u64 == keys).await;
    assert_eq!(
        wb.table_records_replayed("squares"),
        before,
        "the takeover used the warm copy"
    );

    // What b's web server says of the takeover, once it is over.
    let (detail, body) = restore_report(wb.web_addr().expect("web")).await;
    for p in &taken_over {
        let r = &detail["restored"][p.to_string()];
        assert_eq!(r["source"], "standby", "partition {p}: {body}");
        assert_eq!(r["changelog_records"], 0, "partition {p}: {body}");
        assert!(
            r["from_copy"].as_u64().unwrap_or(0) > 0,
            "partition {p}: {body}"
        );
    }

    // One more write, committed by the graceful stop.
    numbers_b.send(keys).key(keys).await.expect("send");
    wait_until(WAIT, "the last key", || tb.get(&keys).is_some()).await;
    wb.shutdown().await.expect("stop b");

    // b again, on its store: every key, nothing replayed.
    let (b, tb, _) = with_store(&dir_b);
    let wb = b.start().await.expect("restart b");
    wait_until(WAIT, "every key from b's store", || {
        tb.len() as u64 == keys + 1
    })
    .await;
    assert_eq!(wb.table_records_replayed("squares"), 0);
    for n in 0..=keys {
        assert_eq!(tb.get(&n), Some(n * n), "key {n}");
    }
    let (detail, body) = restore_report(wb.web_addr().expect("web")).await;
    for p in 0..4 {
        assert_eq!(
            detail["restored"][p.to_string()]["source"],
            "store",
            "{body}"
        );
    }
    wb.shutdown().await.expect("stop b");
    let _ = std::fs::remove_dir_all(&dir_a);
    let _ = std::fs::remove_dir_all(&dir_b);
}

/// A write from outside an agent (a timer, a task, the test itself) to a partition another
/// worker owns would race with the owner's writes in the changelog: it is refused, naming the
/// table and the partition; writes to the worker's own partitions go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_write_a_table_partition_another_worker_owns() {
    let (a, ta, _) = squares("foreign-write", 2, 0);
    let (b, tb, _) = squares("foreign-write", 2, 0);
    let wa = a.start().await.expect("start a");
    let wb = b.start().await.expect("start b");
    wait_until(WAIT, "each worker holds one partition", || {
        ta.local_partitions().len() == 1 && tb.local_partitions().len() == 1
    })
    .await;
    let mine = ta.local_partitions()[0];
    let key_in = |p: u32| {
        (0u64..)
            .find(|k| {
                let bytes = serde_json::to_vec(k).expect("json");
                common::kafka_partition(&bytes, 2) == p
            })
            .expect("a key")
    };
    let (own, foreign) = (key_in(mine), key_in(1 - mine));
    assert_eq!(ta.insert(own, 7), None);
    assert_eq!(ta.get(&own), Some(7));
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ta.insert(foreign, 9)))
        .expect_err("a write to the other worker's partition is refused");
    let message = refused
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("\"squares\"") && message.contains("not held by this worker"),
        "{message}"
    );
    assert_eq!(
        ta.local_partitions(),
        vec![mine],
        "no partition taken on the side"
    );
    wa.shutdown().await.expect("stop a");
    wb.shutdown().await.expect("stop b");
}
