//! The seed's `adding` agent on Kafka against a bare rdkafka loop on the same broker and data,
//! and `ask` round trips against a bare produce → consume round trip.
//!
//! ```console
//! $ cargo bench --bench kafka                       # starts Apache Kafka (one KRaft node)
//! $ RILL_BENCH_BROKER=127.0.0.1:9092 cargo bench --bench kafka   # or use a running broker
//! $ RILL_BENCH_ONLY=guarantees cargo bench --bench kafka   # only at-least-once vs exactly-once
//! $ RILL_BENCH_ONLY=adding cargo bench --bench kafka       # only the adding throughput
//! ```
//!
//! The broker is started as the tests start it (`tests/common/kafka.rs`), from the jars
//! `scripts/kafka-jars` fetches (`RILL_TEST_KAFKA_LIBS`).

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::Message;
use rill::prelude::*;
use rill::ProcessingGuarantee;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const EVENTS: u64 = 200_000;
const PARTITIONS: u32 = 4;
const ROUNDS: usize = 9;
/// Rounds of the at-least-once against exactly-once comparison.
const GUARANTEE_ROUNDS: usize = 5;
const ASKS: usize = 300;

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

#[path = "../tests/common/kafka.rs"]
#[allow(dead_code)]
mod kafka;

/// The broker the bench runs against: one it starts, or `RILL_BENCH_BROKER`.
struct Broker {
    addr: String,
    _kafka: Option<kafka::Kafka>,
}

fn broker() -> Broker {
    if let Ok(addr) = std::env::var("RILL_BENCH_BROKER") {
        return Broker { addr, _kafka: None };
    }
    let dir = kafka::scratch_dir("bench-kafka");
    // The tests' broker starts fast (the client compiler only, a small heap); the bench's
    // runs at full speed, as a deployed one.
    let k = kafka::Kafka::single_with_jvm_flags(&dir, &["-XX:TieredStopAtLevel=4", "-Xmx1g"]);
    Broker {
        addr: k.addr(),
        _kafka: Some(k),
    }
}

fn producer(addr: &str) -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Creates `topic` through a rill app (so both loops read the same kind of topic) and fills
/// it with keyed JSON `Add` records.
async fn fill(addr: &str, topic: &str, outputs: &[&str]) {
    let app = App::new(format!("bench-setup-{topic}"));
    app.configure(|s| s.broker = format!("kafka://{addr}"));
    let _t = app.topic(topic).partitions(PARTITIONS);
    // The outputs too: a producer writing to a missing topic waits for it to appear.
    let _o: Vec<_> = outputs
        .iter()
        .map(|o| app.topic(*o).partitions(PARTITIONS))
        .collect();
    let w = app.start_client().await.expect("create topic");
    w.shutdown().await.expect("stop");
    let p = producer(addr);
    for i in 0..EVENTS {
        let key = format!("k{}", i % 1000);
        let value = serde_json::to_vec(&Add { a: i as i64, b: 1 }).expect("encode");
        let mut record = BaseRecord::to(topic).key(&key).payload(&value);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
    eprintln!("filled {topic}");
}

/// How long one loop took: from its start (before joining the group) until its first record,
/// until its last output was queued, and its stop (flush, or a rill worker's whole shutdown).
struct Timing {
    first: Duration,
    last: Duration,
    stop: Duration,
}

impl Timing {
    /// Events per second from start until the last output was queued.
    fn rate(&self) -> f64 {
        EVENTS as f64 / self.last.as_secs_f64()
    }

    /// Events per second from the first record read until the last output was queued.
    fn processing_rate(&self) -> f64 {
        EVENTS as f64 / (self.last - self.first).as_secs_f64()
    }
}

/// consume → decode → a + b → produce, with rdkafka alone.
fn bare_loop(addr: &str, input: &str, output: &str, group: &str) -> Timing {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        // As rill's consumers: a broker holds a fetch for up to this long when it has nothing
        // new (Kafka's default of 500 ms would cap the loop at a few fetches a second).
        .set("fetch.wait.max.ms", "20")
        // As rill's consumers: librdkafka's default (1 s) stalls a consumer reading a backlog.
        .set("fetch.queue.backoff.ms", "10")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    consumer.subscribe(&[input]).expect("subscribe");
    let p = producer(addr);
    let start = Instant::now();
    let mut first = None;
    let mut n = 0u64;
    while n < EVENTS {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "bare loop stalled"
            );
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => panic!("bare consumer: {e}"),
        };
        first.get_or_insert_with(|| start.elapsed());
        let add: Add = serde_json::from_slice(m.payload().unwrap_or_default()).expect("decode");
        let sum = (add.a + add.b).to_string();
        let mut record = BaseRecord::<(), _>::to(output).payload(&sum);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    p.poll(Duration::from_millis(1));
                }
            }
        }
        n += 1;
    }
    let last = start.elapsed();
    p.flush(Duration::from_secs(60)).expect("flush");
    Timing {
        first: first.unwrap_or(last),
        last,
        stop: start.elapsed() - last,
    }
}

/// The seed's adding agent with a topic sink, counted by a function sink.
async fn rill_agent(
    addr: &str,
    input: &str,
    output: &str,
    group: &str,
    guarantee: ProcessingGuarantee,
) -> Timing {
    let app = App::new(group);
    app.configure(|s| {
        s.broker = format!("kafka://{addr}");
        s.processing_guarantee = guarantee;
    });
    let topic = app.topic(input).value_type::<Add>().partitions(PARTITIONS);
    let out = app.topic(output).value_type::<i64>().partitions(PARTITIONS);
    let done = Arc::new(Notify::new());
    let count = Arc::new(AtomicU64::new(0));
    let first = Arc::new(OnceLock::new());
    let start = Instant::now();
    let (c, d, f) = (count.clone(), done.clone(), first.clone());
    // Sinks run in order: this one sees a value after the topic sink has queued it.
    let _adding = app
        .agent(adding)
        .channel(&topic)
        .sink(&out)
        .sink(move |_: i64| {
            f.get_or_init(|| start.elapsed());
            if c.fetch_add(1, Ordering::Relaxed) + 1 == EVENTS {
                d.notify_one();
            }
        });
    let worker = app.start().await.expect("start");
    tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .expect("all events processed");
    let last = start.elapsed();
    worker
        .shutdown()
        .await
        .expect("shutdown (flushes the output)");
    Timing {
        first: first.get().copied().unwrap_or(last),
        last,
        stop: start.elapsed() - last,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // RUST_LOG=rill=debug shows where a worker's time goes (start-up, rebalances, commits).
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let broker = broker();
    let addr = broker.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let run = std::process::id();
        if std::env::var("RILL_BENCH_ONLY").as_deref() == Ok("guarantees") {
            exactly_once_overhead(&addr, run).await;
            return;
        }
        let (mut bare, mut rill) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let input = format!("bench-in-{run}-{round}");
            let bare_out = format!("bench-bare-out-{run}-{round}");
            let rill_out = format!("bench-rill-out-{run}-{round}");
            fill(&addr, &input, &[&bare_out, &rill_out]).await;
            let a = addr.clone();
            let (i, o, g) = (input.clone(), bare_out.clone(), format!("bench-bare-{run}-{round}"));
            let b = tokio::task::spawn_blocking(move || bare_loop(&a, &i, &o, &g))
                .await
                .expect("bare loop");
            let group = format!("bench-rill-{run}-{round}");
            let r = rill_agent(&addr, &input, &rill_out, &group, ProcessingGuarantee::AtLeastOnce).await;
            println!(
                "round {round}: bare {:>9.0} events/s (first record {:>4} ms, flush {:>4} ms)   rill {:>9.0} events/s (first record {:>4} ms, shutdown {:>4} ms)",
                b.rate(), b.first.as_millis(), b.stop.as_millis(),
                r.rate(), r.first.as_millis(), r.stop.as_millis(),
            );
            bare.push(b);
            rill.push(r);
        }
        let med = |v: &[Timing], f: &dyn Fn(&Timing) -> f64| median(v.iter().map(f).collect());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (b, r) = (med(&bare, &Timing::rate), med(&rill, &Timing::rate));
        let (bp, rp) = (med(&bare, &Timing::processing_rate), med(&rill, &Timing::processing_rate));
        println!("adding on Kafka ({addr}), {EVENTS} keyed JSON events, {PARTITIONS} partitions, median of {ROUNDS} rounds:");
        println!("  start (joining the group) until the last output is queued:");
        println!("    bare rdkafka consume → decode → a + b → produce: {b:>10.0} events/s");
        println!("    rill adding agent + topic sink:                  {r:>10.0} events/s");
        // Each round runs the two loops one after the other: the ratio within a round is
        // less exposed to the machine's drift than the ratio of the medians.
        let ratios = |f: &dyn Fn(&Timing) -> f64| {
            median(bare.iter().zip(&rill).map(|(b, r)| f(r) / f(b)).collect())
        };
        println!(
            "    ratio rill / bare: {:.2} (median of the rounds' ratios; of the medians: {:.2})",
            ratios(&Timing::rate),
            r / b
        );
        println!("  first record until the last output is queued:");
        println!(
            "    bare {bp:>10.0} events/s   rill {rp:>10.0} events/s   ratio {:.2} (of the medians: {:.2})",
            ratios(&Timing::processing_rate),
            rp / bp
        );
        println!(
            "  start until the first record: bare {:.0} ms, rill {:.0} ms; bare flush {:.0} ms; rill shutdown (drain, flush, commit, leave the group) {:.0} ms",
            med(&bare, &|t| ms(t.first)), med(&rill, &|t| ms(t.first)),
            med(&bare, &|t| ms(t.stop)), med(&rill, &|t| ms(t.stop)),
        );

        if std::env::var("RILL_BENCH_ONLY").as_deref() == Ok("adding") {
            return;
        }

        // ask round trips.
        let app = App::new(format!("bench-ask-{run}"));
        app.configure(|s| s.broker = format!("kafka://{addr}"));
        let topic = app.topic(format!("bench-ask-in-{run}")).value_type::<Add>().partitions(PARTITIONS);
        let adding = app.agent(adding).channel(&topic);
        let worker = app.start().await.expect("start");
        adding.ask(Add { a: 0, b: 0 }).await.expect("first ask");
        let mut samples = Vec::with_capacity(ASKS);
        for i in 0..ASKS {
            let start = Instant::now();
            let v = adding.ask(Add { a: i as i64, b: 1 }).await.expect("ask");
            samples.push(start.elapsed());
            assert_eq!(v, i as i64 + 1);
        }
        worker.shutdown().await.expect("shutdown");
        let a = addr.clone();
        let mut bare_samples = tokio::task::spawn_blocking(move || bare_round_trips(&a, run))
            .await
            .expect("bare round trips");
        samples.sort();
        bare_samples.sort();
        let pct = |s: &[Duration], p: f64| s[((s.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3;
        println!("ask round trip on Kafka, {ASKS} sequential:");
        println!("  bare produce → consume:  p50 {:>7.2} ms   p99 {:>7.2} ms", pct(&bare_samples, 0.5), pct(&bare_samples, 0.99));
        println!("  rill adding.ask:         p50 {:>7.2} ms   p99 {:>7.2} ms", pct(&samples, 0.5), pct(&samples, 0.99));

        exactly_once_overhead(&addr, run).await;
    });
}

/// The adding agent with each processing guarantee on the same broker, alternating.
async fn exactly_once_overhead(addr: &str, run: u32) {
    let (mut alo, mut eos) = (Vec::new(), Vec::new());
    for round in 0..GUARANTEE_ROUNDS {
        for (guarantee, rates) in [
            (ProcessingGuarantee::AtLeastOnce, &mut alo),
            (ProcessingGuarantee::ExactlyOnce, &mut eos),
        ] {
            let name = format!("{run}-{round}-{guarantee}");
            let (input, output) = (format!("bench-g-in-{name}"), format!("bench-g-out-{name}"));
            fill(addr, &input, &[&output]).await;
            let t = rill_agent(addr, &input, &output, &format!("bench-g-{name}"), guarantee).await;
            println!("round {round}: {guarantee:<13} {:>9.0} events/s", t.rate());
            rates.push(t.rate());
        }
    }
    let (a, e) = (median(alo), median(eos));
    println!("adding on Kafka ({addr}), {EVENTS} keyed JSON events, {PARTITIONS} partitions, median of {GUARANTEE_ROUNDS} rounds:");
    println!(
        "  at-least-once {a:>10.0} events/s   exactly-once {e:>10.0} events/s   ratio {:.2}",
        e / a
    );
}

/// One record produced and consumed back, per sample.
fn bare_round_trips(addr: &str, run: u32) -> Vec<Duration> {
    let topic = format!("bench-rt-{run}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let app = App::new(format!("bench-rt-setup-{run}"));
        app.configure(|s| s.broker = format!("kafka://{addr}"));
        let _t = app.topic(topic.as_str()).partitions(1);
        let w = app.start_client().await.expect("create topic");
        w.shutdown().await.expect("stop");
    });
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", format!("bench-rt-{run}"))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "20")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    // The topic is new: read it from the start, so no record is missed while the consumer
    // looks up where the end is.
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let p = producer(addr);
    let mut out = Vec::with_capacity(ASKS);
    for i in 0..=ASKS {
        let payload = i.to_string();
        let start = Instant::now();
        p.send(
            BaseRecord::<(), _>::to(&topic)
                .payload(&payload)
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .expect("send");
        // No flush: ThreadedProducer's flush waits in 100 ms steps. The producer sends after
        // its linger (5 ms, as rill's), and the sample ends when the record is read back.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "round trip {i} got no record back"
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_secs(1)) {
                if m.payload() == Some(payload.as_bytes()) {
                    break;
                }
            }
        }
        if i > 0 {
            out.push(start.elapsed());
        }
    }
    out
}
