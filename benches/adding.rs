//! Throughput of the seed's `adding` agent on the embedded transport against a bare loop, and
//! `ask` round-trip latency against a bare request/reply between two tasks.
//!
//! ```console
//! $ cargo bench --bench adding
//! $ RILL_BENCH_METRICS=1 cargo bench --bench adding   # the agent's worker serves /metrics
//! ```
//!
//! Each measurement runs several rounds; the medians are printed, with the ratio of rill to
//! the baseline measured in the same run.

use rill::prelude::*;
use rill::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const EVENTS: u64 = 1_000_000;
const PARTITIONS: u32 = 4;
const ROUNDS: usize = 5;
const ASKS: usize = 20_000;

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

fn payloads() -> Vec<(Bytes, Bytes)> {
    (0..EVENTS)
        .map(|i| {
            let key = Bytes::from(format!("k{}", i % 1000));
            let value = serde_json::to_vec(&Add { a: i as i64, b: 1 }).expect("encode");
            (key, Bytes::from(value))
        })
        .collect()
}

/// tokio bounded channel + serde_json decode + a + b.
async fn bare_loop(data: &[(Bytes, Bytes)]) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4096);
    let values: Vec<Bytes> = data.iter().map(|(_, v)| v.clone()).collect();
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for v in values {
            if tx.send(v).await.is_err() {
                break;
            }
        }
    });
    let consumer = tokio::spawn(async move {
        let mut sum = 0i64;
        let mut n = 0u64;
        while let Some(bytes) = rx.recv().await {
            let add: Add = serde_json::from_slice(&bytes).expect("decode");
            sum = sum.wrapping_add(add.a + add.b);
            n += 1;
        }
        (n, sum)
    });
    producer.await.expect("producer");
    let (n, sum) = consumer.await.expect("consumer");
    let elapsed = start.elapsed();
    assert_eq!(n, EVENTS);
    std::hint::black_box(sum);
    elapsed
}

/// The `adding` agent reading a pre-filled 4-partition topic; a sink counts the yields.
async fn rill_agent(data: &[(Bytes, Bytes)], round: usize) -> Duration {
    let broker = format!("memory://bench-adding-{round}");
    let settings = Settings {
        broker: broker.clone(),
        ..Settings::default()
    };
    // Fill the topic first, from an app with no agents. Until the agent's group joins nobody
    // reads it, so it must keep every record (by default the broker keeps a few MiB of a
    // topic nobody reads).
    let producer = App::with_settings("bench-producer", settings.clone());
    let topic = producer
        .topic("adding")
        .value_type::<Add>()
        .partitions(PARTITIONS)
        .retention_bytes(u64::MAX);
    let w = producer.start().await.expect("start producer");
    for (k, v) in data {
        topic
            .send_raw(Some(k.clone()), Some(v.clone()), None)
            .await
            .expect("send");
    }
    w.shutdown().await.expect("stop producer");

    let app = App::with_settings("bench-agent-example", settings);
    if metrics_on() {
        // A worker serving the web records metrics (Prometheus recorder), as in production.
        app.configure(|s| s.web_port = Some(0));
    }
    let topic = app
        .topic("adding")
        .value_type::<Add>()
        .partitions(PARTITIONS);
    let done = Arc::new(Notify::new());
    let count = Arc::new(AtomicU64::new(0));
    let (c, d) = (count.clone(), done.clone());
    let _adding = app.agent(adding).channel(&topic).sink(move |v: i64| {
        std::hint::black_box(v);
        if c.fetch_add(1, Ordering::Relaxed) + 1 == EVENTS {
            d.notify_one();
        }
    });
    let start = Instant::now();
    let worker = app.start().await.expect("start");
    tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .expect("all events processed");
    let elapsed = start.elapsed();
    worker.shutdown().await.expect("shutdown");
    assert_eq!(count.load(Ordering::Relaxed), EVENTS);
    elapsed
}

/// Request/reply between two tasks with a bounded channel and a oneshot.
async fn bare_round_trips() -> Vec<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Add, tokio::sync::oneshot::Sender<i64>)>(64);
    tokio::spawn(async move {
        while let Some((add, reply)) = rx.recv().await {
            let _ = reply.send(add.a + add.b);
        }
    });
    let mut out = Vec::with_capacity(ASKS);
    for i in 0..ASKS {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let start = Instant::now();
        tx.send((Add { a: i as i64, b: 1 }, rtx))
            .await
            .expect("send");
        let v = rrx.await.expect("reply");
        out.push(start.elapsed());
        assert_eq!(v, i as i64 + 1);
    }
    out
}

async fn rill_round_trips() -> Vec<Duration> {
    let app = App::new("bench-ask");
    let topic = app
        .topic("adding")
        .value_type::<Add>()
        .partitions(PARTITIONS);
    let adding = app.agent(adding).channel(&topic);
    let worker = app.start().await.expect("start");
    let mut out = Vec::with_capacity(ASKS);
    for i in 0..ASKS {
        let start = Instant::now();
        let v = adding.ask(Add { a: i as i64, b: 1 }).await.expect("ask");
        out.push(start.elapsed());
        assert_eq!(v, i as i64 + 1);
    }
    worker.shutdown().await.expect("shutdown");
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// Whether the agent's worker records metrics (`RILL_BENCH_METRICS=1`).
fn metrics_on() -> bool {
    std::env::var_os("RILL_BENCH_METRICS").is_some_and(|v| v != "0")
}

fn main() {
    println!("metrics: {}", if metrics_on() { "on" } else { "off" });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let data = payloads();
        let mut bare = Vec::new();
        let mut rill = Vec::new();
        for round in 0..ROUNDS {
            let b = bare_loop(&data).await;
            let r = rill_agent(&data, round).await;
            bare.push(EVENTS as f64 / b.as_secs_f64());
            rill.push(EVENTS as f64 / r.as_secs_f64());
            println!(
                "round {round}: bare {:>12.0} events/s   rill {:>12.0} events/s",
                bare[round], rill[round]
            );
        }
        let (b, r) = (median(bare), median(rill));
        println!(
            "adding agent, {EVENTS} keyed events, {PARTITIONS} partitions (median of {ROUNDS}):"
        );
        println!("  bare loop (tokio channel + serde_json + a + b): {b:>12.0} events/s");
        println!("  rill adding agent (embedded transport):        {r:>12.0} events/s");
        println!("  ratio rill / bare: {:.2}", r / b);

        let mut bare = Vec::new();
        let mut rill = Vec::new();
        for _ in 0..3 {
            bare.push(bare_round_trips().await);
            rill.push(rill_round_trips().await);
        }
        let stats = |runs: Vec<Vec<Duration>>| {
            let mut p50 = Vec::new();
            let mut p99 = Vec::new();
            for mut s in runs {
                p50.push(percentile(&mut s, 0.50).as_secs_f64() * 1e6);
                p99.push(percentile(&mut s, 0.99).as_secs_f64() * 1e6);
            }
            (median(p50), median(p99))
        };
        let (b50, b99) = stats(bare);
        let (r50, r99) = stats(rill);
        println!("ask round trip, {ASKS} sequential asks (median of 3 runs):");
        println!("  bare request/reply between tasks: p50 {b50:>8.1} µs   p99 {b99:>8.1} µs");
        println!("  rill adding.ask (embedded):       p50 {r50:>8.1} µs   p99 {r99:>8.1} µs");
        println!(
            "  ratio rill / bare: p50 {:.1}x   p99 {:.1}x",
            r50 / b50,
            r99 / b99
        );
    });
}
