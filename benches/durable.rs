//! The durable embedded transport (`file://`) against the in-memory one (`memory://`) and a
//! bare loop of the same fjall writes, in the same run.
//!
//! ```console
//! $ cargo bench --bench durable
//! ```
//!
//! - produce: a million records queued (`enqueue`) and flushed, against a bare loop making
//!   the same fjall writes (a value per partition per batch of records);
//! - the seed's `adding` agent reading a million pre-filled records (4 partitions), from its
//!   first event to its last, on `memory://` and on `file://` (commits every 10,000 records:
//!   the offsets synced, the committed records removed from disk), against a bare loop that
//!   reads the records from fjall, decodes and adds them, and about every 10,000 removes what
//!   it read and writes an offset, synced;
//! - restart: from `App::start` to the first event with a million records in the log.
//!
//! Each figure is the median of a few rounds; ratios are of medians of the same run.

use rill::prelude::*;
use rill::transport::{FileBroker, Fsync, OutgoingRecord, Retention, TopicSpec, Transport};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const EVENTS: u64 = 1_000_000;
const PARTITIONS: u32 = 4;
const ROUNDS: usize = 3;
/// Records per commit of the agent (the embedded transports' default), and per batch of the
/// bare consume loop.
const COMMIT_EVERY: usize = 10_000;
const APP: &str = "bench-durable";

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Key, value and partition of each event.
fn payloads() -> Vec<(Bytes, Bytes, u32)> {
    (0..EVENTS)
        .map(|i| {
            let key = Bytes::from(format!("k{}", i % 1000));
            let value = serde_json::to_vec(&Add { a: i as i64, b: 1 }).expect("encode");
            (key, Bytes::from(value), (i % u64::from(PARTITIONS)) as u32)
        })
        .collect()
}

fn dir(name: &str, round: usize) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rill-bench-durable-{name}-{round}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn spec() -> TopicSpec {
    TopicSpec {
        name: "adding".into(),
        partitions: PARTITIONS,
        replication_factor: 1,
        compacted: false,
        // Kept whole until the agent's group reads it.
        retention: Retention {
            time: None,
            bytes: Some(u64::MAX),
        },
    }
}

/// Queues every record on `file://` and flushes; returns the time taken.
async fn file_produce(data: &[(Bytes, Bytes, u32)], dir: &Path) -> Duration {
    let broker = FileBroker::open(dir, APP).expect("open the log");
    let t = broker.transport(Fsync::Commit, false);
    t.ensure_topic(spec()).await.expect("topic");
    let topic: Arc<str> = Arc::from("adding");
    let start = Instant::now();
    for (k, v, p) in data {
        let record = OutgoingRecord {
            topic: topic.clone(),
            partition: *p,
            key: Some(k.clone()),
            value: Some(v.clone()),
            headers: Vec::new(),
            timestamp: None,
        };
        t.enqueue(record).await.expect("enqueue");
    }
    t.flush().await.expect("flush");
    start.elapsed()
}

fn record_key(partition: u32, offset: u64) -> Vec<u8> {
    [
        b"adding\0".as_slice(),
        &partition.to_be_bytes(),
        &offset.to_be_bytes(),
    ]
    .concat()
}

/// The same fjall writes as the log's, without rill: per batch of 16,384 records, one value
/// per partition holding its records (offset, length, key, value, timestamp), synced at the
/// end.
fn bare_produce(data: &[(Bytes, Bytes, u32)], dir: &Path) -> Duration {
    let keyspace = fjall::Config::new(dir).open().expect("keyspace");
    let records = keyspace
        .open_partition("records", Default::default())
        .expect("partition");
    let start = Instant::now();
    let mut next = [0u64; PARTITIONS as usize];
    for batch_data in data.chunks(16 * 1024) {
        let mut chunks: Vec<Vec<u8>> = vec![Vec::new(); PARTITIONS as usize];
        let mut firsts = next;
        for (k, v, p) in batch_data {
            let p = *p as usize;
            let chunk = &mut chunks[p];
            if chunk.is_empty() {
                firsts[p] = next[p];
            }
            let len = 1 + k.len() + v.len() + 8;
            chunk.extend_from_slice(&next[p].to_be_bytes());
            chunk.extend_from_slice(&(len as u32).to_be_bytes());
            chunk.push(k.len() as u8);
            chunk.extend_from_slice(k);
            chunk.extend_from_slice(v);
            chunk.extend_from_slice(&[0u8; 8]);
            next[p] += 1;
        }
        let mut batch = keyspace
            .batch()
            .durability(Some(fjall::PersistMode::Buffer));
        for (p, chunk) in chunks.into_iter().enumerate() {
            if !chunk.is_empty() {
                batch.insert(&records, record_key(p as u32, firsts[p]), chunk);
            }
        }
        batch.commit().expect("write");
    }
    keyspace
        .persist(fjall::PersistMode::SyncData)
        .expect("sync");
    start.elapsed()
}

/// Reads the chunks back in order, decodes and adds each record, and about every
/// `COMMIT_EVERY` records removes the chunks read and writes an offset, synced: what the
/// agent's commits make the log do, without rill.
fn bare_consume(dir: &Path) -> Duration {
    let keyspace = fjall::Config::new(dir).open().expect("keyspace");
    let records = keyspace
        .open_partition("records", Default::default())
        .expect("partition");
    let meta = keyspace
        .open_partition("meta", Default::default())
        .expect("partition");
    let start = Instant::now();
    let mut sum = 0i64;
    let mut read: Vec<Vec<u8>> = Vec::new();
    let (mut n, mut since) = (0u64, 0usize);
    let commit = |read: &mut Vec<Vec<u8>>, n: u64| {
        let mut batch = keyspace
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for k in read.drain(..) {
            batch.remove(&records, k);
        }
        batch.insert(&meta, b"offset", n.to_be_bytes());
        batch.commit().expect("commit");
    };
    for kv in records.iter() {
        let (k, v) = kv.expect("read");
        let mut rest = &v[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[8..12].try_into().expect("length")) as usize;
            let record = &rest[12..12 + len];
            let json = &record[1 + usize::from(record[0])..record.len() - 8];
            let add: Add = serde_json::from_slice(json).expect("decode");
            sum = sum.wrapping_add(add.a + add.b);
            rest = &rest[12 + len..];
            n += 1;
            since += 1;
        }
        read.push(k.to_vec());
        if since >= COMMIT_EVERY {
            commit(&mut read, n);
            since = 0;
        }
    }
    commit(&mut read, n);
    assert_eq!(n, EVENTS);
    std::hint::black_box(sum);
    start.elapsed()
}

/// What one agent run measured.
struct AgentRun {
    /// From `App::start` to the first event.
    first: Duration,
    /// From the first event to the last.
    events: Duration,
}

/// The adding agent reading the pre-filled topic of `broker`.
async fn agent(broker: &str) -> AgentRun {
    let app = App::new(APP);
    app.configure(|s| s.broker = broker.to_owned());
    let topic = app
        .topic("adding")
        .value_type::<Add>()
        .partitions(PARTITIONS)
        .retention_bytes(u64::MAX);
    let done = Arc::new(Notify::new());
    let count = Arc::new(AtomicU64::new(0));
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (c, d, f) = (count.clone(), done.clone(), first.clone());
    let _adding = app.agent(adding).channel(&topic).sink(move |v: i64| {
        std::hint::black_box(v);
        let n = c.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            *f.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        if n == EVENTS {
            d.notify_one();
        }
    });
    let start = Instant::now();
    let worker = app.start().await.expect("start");
    tokio::time::timeout(Duration::from_secs(600), done.notified())
        .await
        .expect("all events processed");
    let end = Instant::now();
    worker.shutdown().await.expect("shutdown");
    assert_eq!(count.load(Ordering::Relaxed), EVENTS);
    let first = first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expect("a first event");
    AgentRun {
        first: first - start,
        events: end - first,
    }
}

/// Fills `memory://NAME` from an app with no agents.
async fn memory_fill(data: &[(Bytes, Bytes, u32)], broker: &str) {
    let producer = App::new(APP);
    producer.configure(|s| s.broker = broker.to_owned());
    let topic = producer
        .topic("adding")
        .value_type::<Add>()
        .partitions(PARTITIONS)
        .retention_bytes(u64::MAX);
    let w = producer.start().await.expect("start producer");
    for (k, v, _) in data {
        topic
            .send_raw(Some(k.clone()), Some(v.clone()), None)
            .await
            .expect("send");
    }
    w.shutdown().await.expect("stop producer");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rate(d: Duration) -> f64 {
    EVENTS as f64 / d.as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let data = payloads();
        let (mut produce_file, mut produce_bare) = (Vec::new(), Vec::new());
        let (mut agent_memory, mut agent_file, mut consume_bare) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut restart = Vec::new();
        for round in 0..ROUNDS {
            let bare_dir = dir("bare", round);
            let pb = bare_produce(&data, &bare_dir);
            let cb = bare_consume(&bare_dir);
            let _ = std::fs::remove_dir_all(&bare_dir);

            let file_dir = dir("file", round);
            let pf = file_produce(&data, &file_dir).await;
            let file = agent(&format!("file://{}", file_dir.display())).await;
            let _ = std::fs::remove_dir_all(&file_dir);

            let name = format!("memory://bench-durable-{round}");
            memory_fill(&data, &name).await;
            let memory = agent(&name).await;

            println!(
                "round {round}: produce file {:>9.0}/s bare {:>9.0}/s | agent memory {:>9.0}/s \
                 file {:>9.0}/s bare {:>9.0}/s | restart to first event {:>6.0} ms",
                rate(pf),
                rate(pb),
                rate(memory.events),
                rate(file.events),
                rate(cb),
                file.first.as_secs_f64() * 1e3
            );
            produce_file.push(rate(pf));
            produce_bare.push(rate(pb));
            agent_memory.push(rate(memory.events));
            agent_file.push(rate(file.events));
            consume_bare.push(rate(cb));
            restart.push(file.first.as_secs_f64() * 1e3);
        }
        let (pf, pb) = (median(produce_file), median(produce_bare));
        let (am, af, cb) = (
            median(agent_memory),
            median(agent_file),
            median(consume_bare),
        );
        println!(
            "durable transport, {EVENTS} events, {PARTITIONS} partitions (median of {ROUNDS}):"
        );
        println!("  produce (enqueue + flush), file://:           {pf:>12.0} events/s");
        println!("  produce, bare fjall batches:                  {pb:>12.0} events/s");
        println!(
            "  ratio file:// / bare:                         {:>12.2}",
            pf / pb
        );
        println!("  adding agent, memory://:                      {am:>12.0} events/s");
        println!("  adding agent, file://:                        {af:>12.0} events/s");
        println!("  consume, bare fjall (read, decode, trim, sync): {cb:>10.0} events/s");
        println!(
            "  ratio file:// / memory://:                    {:>12.2}",
            af / am
        );
        println!(
            "  ratio file:// / bare:                         {:>12.2}",
            af / cb
        );
        println!(
            "  restart to first event with {EVENTS} records in the log: {:.0} ms",
            median(restart)
        );
    });
}
