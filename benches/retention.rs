//! Memory and throughput of the seed's `adding` agent reading a topic on the embedded
//! transport while a producer writes to it, against a bare loop doing the same work through a
//! tokio channel: 10,000,000 events each, resident memory read before and after.
//!
//! ```console
//! $ cargo bench --bench retention
//! $ RILL_BENCH_EVENTS=1000000 cargo bench --bench retention   # fewer events
//! ```
//!
//! The broker forgets what the agent's group has committed, so once warmed up the agent's
//! memory should grow no more than the bare loop's. What it holds while running is what the
//! group has not committed yet: by default at most about 10,000 records (a commit every 2.8 s or
//! every 10,000 records read, `Settings::commit_every`); the agent also runs committing by time
//! only, every 100 ms and every 2.8 s. The producer keeps at most `IN_FLIGHT` events
//! ahead of the agent (the embedded broker, like Kafka, does not slow a producer down), so
//! what is measured is what the broker keeps, not how far a producer can run ahead.

use rill::prelude::*;
use rill::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const DEFAULT_EVENTS: u64 = 10_000_000;
const PARTITIONS: u32 = 4;
/// Most events written and not yet processed.
const IN_FLIGHT: u64 = 50_000;
/// Events processed before resident memory is first read.
const WARM_UP: u64 = 1_000_000;

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

/// This process's resident memory, in KiB (0 where `/proc` is missing).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How a run went: elapsed time, and resident memory after the warm-up and at the end.
struct Run {
    elapsed: Duration,
    warm_kib: u64,
    end_kib: u64,
}

impl Run {
    fn print(&self, what: &str, events: u64) {
        println!(
            "  {what:<47} {:>10.0} events/s   VmRSS after warm-up {:>7} KiB, at the end {:>7} \
             KiB, growth {:>6} KiB",
            events as f64 / self.elapsed.as_secs_f64(),
            self.warm_kib,
            self.end_kib,
            self.end_kib.saturating_sub(self.warm_kib)
        );
    }
}

/// Counts processed events and wakes the producer when it may write more.
#[derive(Default)]
struct Progress {
    processed: AtomicU64,
    wake: Notify,
}

impl Progress {
    fn done(&self) {
        let n = self.processed.fetch_add(1, Ordering::Relaxed) + 1;
        if n % 1024 == 0 {
            self.wake.notify_one();
        }
    }

    fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Waits until at most `IN_FLIGHT` of `sent` events are unprocessed.
    async fn keep_up(&self, sent: u64) {
        while sent - self.processed() > IN_FLIGHT {
            self.wake.notified().await;
        }
    }

    /// Waits until `events` were processed.
    async fn finish(&self, events: u64) {
        while self.processed() < events {
            // The last events may not reach a multiple of 1024: look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(1), self.wake.notified()).await;
        }
    }
}

fn encode(i: u64) -> Bytes {
    Bytes::from(serde_json::to_vec(&Add { a: i as i64, b: 1 }).expect("encode"))
}

/// A producer task writes JSON through a bounded tokio channel; a consumer decodes it and
/// adds.
async fn bare_loop(events: u64) -> Run {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4096);
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    tokio::spawn(async move {
        for i in 0..events {
            if tx.send(encode(i)).await.is_err() {
                break;
            }
        }
    });
    let p = progress.clone();
    let consumer = tokio::spawn(async move {
        let mut sum = 0i64;
        while let Some(bytes) = rx.recv().await {
            let add: Add = serde_json::from_slice(&bytes).expect("decode");
            sum = sum.wrapping_add(add.a + add.b);
            p.done();
        }
        sum
    });
    let warm_kib = loop {
        if progress.processed() >= WARM_UP.min(events) {
            break rss_kib();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    std::hint::black_box(consumer.await.expect("consumer"));
    Run {
        elapsed: start.elapsed(),
        warm_kib,
        end_kib: rss_kib(),
    }
}

/// The `adding` agent reads a 4-partition topic a producer writes keyed events to, committing
/// every `commit_interval` and, unless `commit_every` is `Some(0)`, every so many records.
async fn rill_agent(
    events: u64,
    commit_interval: Duration,
    commit_every: Option<u64>,
    durable: Option<&std::path::Path>,
) -> Run {
    let app = App::new("bench-retention");
    let broker = durable.map(|dir| format!("file://{}", dir.display()));
    app.configure(|s| {
        s.topic_partitions = PARTITIONS;
        s.commit_interval = commit_interval;
        s.commit_every = commit_every;
        if let Some(broker) = broker {
            s.broker = broker;
        }
    });
    let topic = app.topic("adding").value_type::<Add>();
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    app.agent(adding).channel(&topic).sink(move |v: i64| {
        std::hint::black_box(v);
        p.done();
    });
    let worker = app.start().await.expect("start");
    let start = Instant::now();
    let mut warm_kib = None;
    for i in 0..events {
        topic
            .send(Add { a: i as i64, b: 1 })
            .key(Bytes::from(format!("k{}", i % 1000)))
            .await
            .expect("send");
        if i % 1000 == 999 {
            progress.keep_up(i + 1).await;
            if warm_kib.is_none() && progress.processed() >= WARM_UP {
                warm_kib = Some(rss_kib());
            }
        }
    }
    progress.finish(events).await;
    let elapsed = start.elapsed();
    let end_kib = rss_kib();
    let memory = match durable {
        // The durable log's index (the process's one open log of this directory).
        Some(dir) => rill::transport::FileBroker::open(dir, "bench-retention")
            .expect("the durable log")
            .memory()
            .clone(),
        None => app.memory_broker(),
    };
    let held: usize = (0..PARTITIONS)
        .map(|p| memory.record_count("adding", p).unwrap_or(0))
        .sum();
    worker.shutdown().await.expect("shutdown");
    println!(
        "  (commits every {commit_interval:?}, commit_every {commit_every:?}: the broker held \
         {held} records when the last event was processed)"
    );
    Run {
        elapsed,
        warm_kib: warm_kib.unwrap_or(end_kib),
        end_kib,
    }
}

fn main() {
    let events = std::env::var("RILL_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_EVENTS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!(
            "{events} keyed events, {PARTITIONS} partitions, at most {IN_FLIGHT} in flight, \
             warm-up {WARM_UP} events:"
        );
        let bare = bare_loop(events).await;
        // Memory the allocator has once held stays resident: the run that holds less goes
        // first, so that each run's growth is its own.
        let interval = Settings::default().commit_interval;
        let default = rill_agent(events, interval, None, None).await;
        let dir = std::env::temp_dir().join(format!("rill-bench-retention-{}", std::process::id()));
        let durable = rill_agent(events, interval, None, Some(&dir)).await;
        let _ = std::fs::remove_dir_all(&dir);
        let short = rill_agent(events, Duration::from_millis(100), Some(0), None).await;
        let by_time = rill_agent(events, interval, Some(0), None).await;
        bare.print("bare loop (tokio channel + serde_json + a + b)", events);
        default.print(
            "rill adding agent, memory://, default settings (2.8 s or 10,000 records)",
            events,
        );
        durable.print(
            "rill adding agent, file:// (durable), default settings",
            events,
        );
        short.print(
            "rill adding agent, memory://, commits every 100 ms only",
            events,
        );
        by_time.print(
            "rill adding agent, memory://, commits every 2.8 s only",
            events,
        );
        let ratio = |r: &Run| bare.elapsed.as_secs_f64() / r.elapsed.as_secs_f64();
        println!(
            "  ratio rill / bare, throughput: {:.2} (default), {:.2} (file://), {:.2} (100 ms), \
             {:.2} (2.8 s only)",
            ratio(&default),
            ratio(&durable),
            ratio(&short),
            ratio(&by_time)
        );
    });
}
