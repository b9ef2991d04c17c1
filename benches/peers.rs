//! rill against its peers on one Apache Kafka broker, in one run: a bare rdkafka loop, rill's
//! `adding` agent and the same job on Kafka Streams 4.4 (`benches/peers/kafka-streams`), each
//! in its own process, at-least-once and exactly-once.
//!
//! ```console
//! $ scripts/bench-peers                  # builds the Kafka Streams app, then runs this
//! $ cargo bench --bench peers            # the same, once the app is built
//! $ RILL_BENCH_BROKER=127.0.0.1:9092 cargo bench --bench peers   # on a running broker
//! $ RILL_PEERS_FAUST=1 scripts/bench-peers   # Faust (faust-streaming 0.15.3) too
//! ```
//!
//! Every system does the seed's adding job: JSON `{"a": .., "b": ..}` in, `a + b` out. Each
//! is timed by one observer, a read-committed consumer of the system's output topic in this
//! process, so an exactly-once output counts once its transaction is committed:
//!
//! - **throughput**: `RILL_PEERS_EVENTS` records (default 2,000,000) are written to a topic before the system starts; its
//!   rate is the events over the time from its first output to its last. Its **start-up** is
//!   the time from spawning the process to the first output.
//! - **CPU per event**: the CPU time (user and system, from Linux's `/proc`) the system's
//!   process and the broker's spent from the first output to the last, over the events. On a
//!   machine the broker, the system and the observer share, it is what sets the throughput.
//! - **latency**: records are offered at a fixed rate (`RILL_PEERS_RATE`, default 20k/s) to an
//!   empty topic with `a` = the time they were sent, in µs since the epoch, and `b` = 1; the
//!   output `a + b` says when its input was sent. The first seconds after the first output are
//!   a warm-up; the next are measured.
//!
//! Rounds alternate the systems (their order turns each round); the figures are medians, and
//! the ratios are medians of the ratios within a round. `RILL_PEERS_OUT=DIR` writes the results
//! as `DIR/peers.md` (a table) and `DIR/peers.svg` (a chart).
//!
//! The bench binary is also its own worker: `peers worker bare|rill ...` runs one system until
//! SIGTERM.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rill::prelude::*;
use rill::ProcessingGuarantee;
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Events of a throughput round (`RILL_PEERS_EVENTS`, default 2,000,000): longer rounds weigh
/// start-up (a group join, a first transaction) less.
fn events() -> u64 {
    static EVENTS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *EVENTS.get_or_init(|| env_or("RILL_PEERS_EVENTS", 2_000_000))
}
const PARTITIONS: i32 = 4;
/// How long a system may take to process a round's events, or to stop.
const ROUND_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const WARMUP: Duration = Duration::from_secs(2);
const MEASURED: Duration = Duration::from_secs(8);

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

#[path = "peers/rebalance.rs"]
mod rebalance;

#[path = "../tests/common/kafka.rs"]
#[allow(dead_code)]
mod kafka;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Bare,
    Rill,
    KafkaStreams,
    Faust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    system: System,
    exactly_once: bool,
}

impl Peer {
    const fn new(system: System, exactly_once: bool) -> Self {
        Peer {
            system,
            exactly_once,
        }
    }

    fn label(&self) -> String {
        let system = match self.system {
            System::Bare => "bare rdkafka loop",
            System::Rill => "rill",
            System::KafkaStreams => "Kafka Streams 4.4",
            System::Faust => "Faust 0.15.3",
        };
        let guarantee = if self.exactly_once {
            "exactly-once"
        } else {
            "at-least-once"
        };
        format!("{system}, {guarantee}")
    }

    fn slug(&self) -> String {
        let system = match self.system {
            System::Bare => "bare",
            System::Rill => "rill",
            System::KafkaStreams => "streams",
            System::Faust => "faust",
        };
        format!("{system}-{}", if self.exactly_once { "eos" } else { "alo" })
    }
}

const BARE: Peer = Peer::new(System::Bare, false);
const RILL: Peer = Peer::new(System::Rill, false);
const RILL_EOS: Peer = Peer::new(System::Rill, true);
const STREAMS: Peer = Peer::new(System::KafkaStreams, false);
const STREAMS_EOS: Peer = Peer::new(System::KafkaStreams, true);
const FAUST: Peer = Peer::new(System::Faust, false);
const FAUST_EOS: Peer = Peer::new(System::Faust, true);
const ALL: [Peer; 7] = [BARE, RILL, RILL_EOS, STREAMS, STREAMS_EOS, FAUST, FAUST_EOS];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        if let Err(e) = worker(&args[2..]) {
            eprintln!("worker: {e}");
            std::process::exit(1);
        }
        return;
    }
    if args.iter().any(|a| a == "rebalance") {
        if let Err(e) = rebalance::run() {
            eprintln!("rebalance bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = compare() {
        eprintln!("peers bench: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The workers: each system in its own process, until SIGTERM.

/// `worker bare|rill BROKER INPUT OUTPUT GROUP alo|eos`.
fn worker(args: &[String]) -> BoxResult<()> {
    let [system, broker, input, output, group, guarantee] = args else {
        return Err("usage: peers worker bare|rill BROKER INPUT OUTPUT GROUP alo|eos".into());
    };
    // RUST_LOG=rill=debug shows where a worker's time goes; its log is kept with
    // RILL_PEERS_KEEP=1.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match system.as_str() {
        "bare" => {
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            rt.spawn(async move {
                if let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    term.recv().await;
                }
                s.store(true, Ordering::Relaxed);
            });
            bare_worker(broker, input, output, group, &stop)
        }
        "rill" => {
            let guarantee = match guarantee.as_str() {
                "eos" => ProcessingGuarantee::ExactlyOnce,
                _ => ProcessingGuarantee::AtLeastOnce,
            };
            rt.block_on(rill_worker(broker, input, output, group, guarantee))
        }
        other => Err(format!("no such worker: {other}").into()),
    }
}

/// consume → decode → a + b → produce, with rdkafka alone (as `benches/kafka.rs`'s loop).
fn bare_worker(
    broker: &str,
    input: &str,
    output: &str,
    group: &str,
    stop: &AtomicBool,
) -> BoxResult<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("fetch.wait.max.ms", "20")
        .set("isolation.level", "read_committed")
        // As rill's consumer: librdkafka's default (1 s) stalls a consumer that reads a
        // backlog faster than it handles it.
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    consumer.subscribe(&[input])?;
    // rill's producer settings: idempotent (per-key order across retries), 5 ms linger.
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("max.in.flight.requests.per.connection", "5")
        .create()?;
    while !stop.load(Ordering::Relaxed) {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let add: Add = match serde_json::from_slice(m.payload().unwrap_or_default()) {
            Ok(add) => add,
            Err(e) => {
                eprintln!("bare loop: skipping an unreadable record: {e}");
                continue;
            }
        };
        let sum = (add.a + add.b).to_string();
        let mut record = BaseRecord::<(), _>::to(output).payload(&sum);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

/// The seed's adding agent with a topic sink.
async fn rill_worker(
    broker: &str,
    input: &str,
    output: &str,
    group: &str,
    guarantee: ProcessingGuarantee,
) -> BoxResult<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The rebalance measurement's workers read 24 partitions.
    let partitions: u32 = env_or("RILL_PEERS_PARTITIONS", PARTITIONS as u32);
    let app = App::new(group);
    app.configure(|s| {
        s.broker = format!("kafka://{broker}");
        s.processing_guarantee = guarantee;
        // A diagnostic: the agents' queue capacity (reading pauses while one is full).
        if let Some(n) = std::env::var("RILL_PEERS_BUFFER")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            s.stream_buffer_maxsize = n;
        }
    });
    let topic = app.topic(input).value_type::<Add>().partitions(partitions);
    let out = app.topic(output).value_type::<i64>().partitions(partitions);
    let _adding = app.agent(adding).channel(&topic).sink(&out);
    let worker = app.start().await?;
    term.recv().await;
    worker.shutdown().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The comparison.

/// What one system did in one throughput round.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// From spawning the process until its first output was read.
    start_up: Duration,
    /// Events per second from its first output to its last.
    rate: f64,
    /// CPU time per event (µs) from its first output to its last: the system's process, and
    /// the broker's (`None` where `/proc` is not readable, or the broker is not ours).
    cpu_us: Option<f64>,
    broker_cpu_us: Option<f64>,
    /// The same for this process, which observes the output.
    observer_cpu_us: Option<f64>,
}

/// What one system did in one latency round: end-to-end latencies in µs, sorted.
#[derive(Debug, Clone)]
struct Latency {
    samples: Vec<u64>,
    /// Events offered in the measured part of the round, per second.
    offered: f64,
}

impl Latency {
    fn pct(&self, p: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        self.samples[((self.samples.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
    }
}

#[derive(Default)]
struct Results {
    throughput: Vec<(Peer, Vec<Throughput>)>,
    latency: Vec<(Peer, Vec<Latency>)>,
}

impl Results {
    fn throughputs(&mut self, peer: Peer) -> &mut Vec<Throughput> {
        let i = match self.throughput.iter().position(|(p, _)| *p == peer) {
            Some(i) => i,
            None => {
                self.throughput.push((peer, Vec::new()));
                self.throughput.len() - 1
            }
        };
        &mut self.throughput[i].1
    }

    fn latencies(&mut self, peer: Peer) -> &mut Vec<Latency> {
        let i = match self.latency.iter().position(|(p, _)| *p == peer) {
            Some(i) => i,
            None => {
                self.latency.push((peer, Vec::new()));
                self.latency.len() - 1
            }
        };
        &mut self.latency[i].1
    }

    /// The systems measured, in the order of [`ALL`].
    fn peers(&self) -> Vec<Peer> {
        ALL.into_iter()
            .filter(|p| self.throughput.iter().any(|(q, _)| q == p))
            .collect()
    }

    fn throughput_of(&self, peer: Peer) -> &[Throughput] {
        self.throughput
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(&[], |(_, v)| v)
    }

    fn latency_of(&self, peer: Peer) -> &[Latency] {
        self.latency
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(&[], |(_, v)| v)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The broker the bench runs against: one it starts, or `RILL_BENCH_BROKER`.
struct Broker {
    addr: String,
    _kafka: Option<kafka::Kafka>,
}

impl Broker {
    fn pid(&self) -> Option<u32> {
        self._kafka.as_ref().and_then(|k| k.pid(0))
    }
}

/// User + system CPU time of process `pid`, all its threads (Linux `/proc`).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: utime and stime
    // are the 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks))
}

fn broker(dir: &Path) -> Broker {
    if let Ok(addr) = std::env::var("RILL_BENCH_BROKER") {
        return Broker { addr, _kafka: None };
    }
    // As benches/kafka.rs: the broker runs at full speed, as a deployed one.
    let k = kafka::Kafka::single_with_jvm_flags(dir, &["-XX:TieredStopAtLevel=4", "-Xmx1g"]);
    Broker {
        addr: k.addr(),
        _kafka: Some(k),
    }
}

/// Where the Kafka Streams app was built (`target/classes` and `target/dependency`).
fn streams_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("RILL_PEERS_STREAMS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/kafka-streams"),
        PathBuf::from,
    );
    let built = dir.join("target/classes/rill/peers/Adding.class").is_file()
        && dir.join("target/dependency").is_dir();
    built.then_some(dir)
}

fn compare() -> BoxResult<()> {
    let rounds: usize = env_or("RILL_PEERS_ROUNDS", 5);
    let latency_rounds: usize = env_or("RILL_PEERS_LATENCY_ROUNDS", 3);
    let rate: u64 = env_or("RILL_PEERS_RATE", 20_000);
    let dir = kafka::scratch_dir("bench-peers");
    let streams = streams_dir();
    let mut peers = vec![BARE, RILL, RILL_EOS];
    if streams.is_some() {
        peers.extend([STREAMS, STREAMS_EOS]);
    } else {
        eprintln!(
            "the Kafka Streams app is not built: run scripts/bench-peers (or mvn package \
             dependency:copy-dependencies in benches/peers/kafka-streams); measuring without it"
        );
    }
    // The optional Faust peer: scripts/bench-peers installs it with RILL_PEERS_FAUST=1.
    let faust = std::env::var_os("RILL_PEERS_FAUST_PYTHON").map(PathBuf::from);
    if faust.is_some() {
        peers.extend([FAUST, FAUST_EOS]);
    }
    // RILL_PEERS_ONLY=bare,rill,streams,faust measures only those systems.
    if let Ok(only) = std::env::var("RILL_PEERS_ONLY") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        peers.retain(|p| only.iter().any(|o| p.slug().starts_with(o)));
    }
    let broker = broker(&dir);
    let ctx = Ctx {
        addr: broker.addr.clone(),
        broker_pid: broker.pid(),
        dir: dir.clone(),
        streams,
        faust,
        run: std::process::id(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = Results::default();

    println!(
        "throughput: {} keyed JSON events on {PARTITIONS} partitions, written before \
         each system starts; {rounds} rounds",
        events()
    );
    // The first round warms the broker up (its JIT, the offsets and transaction topics it
    // creates on first use) and is not counted.
    for round in 0..=rounds {
        let input = format!("peers-in-{}-{round}", ctx.run);
        let outputs: Vec<String> = peers
            .iter()
            .map(|p| format!("peers-out-{}-{round}-{}", ctx.run, p.slug()))
            .collect();
        let mut topics = outputs.clone();
        topics.push(input.clone());
        rt.block_on(create_topics(&ctx.addr, &topics, PARTITIONS))?;
        fill(&ctx.addr, &input)?;
        for k in 0..peers.len() {
            let i = (k + round) % peers.len();
            let peer = peers[i];
            let group = format!("peers-{}-{round}-{}", ctx.run, peer.slug());
            let t = ctx.throughput(peer, &input, &outputs[i], &group)?;
            let name = if round == 0 {
                "warm-up".to_owned()
            } else {
                format!("round {round}")
            };
            let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
            println!(
                "  {name}: {:<34} {:>9.0} events/s   start-up {:>5.0} ms   CPU/event {:>5} µs (broker {:>5} µs, observer {:>5} µs)",
                peer.label(),
                t.rate,
                t.start_up.as_secs_f64() * 1e3,
                us(t.cpu_us),
                us(t.broker_cpu_us),
                us(t.observer_cpu_us),
            );
            if round > 0 {
                results.throughputs(peer).push(t);
            }
        }
    }

    println!(
        "latency: {rate} events/s offered; {} s warm-up after the first output, {} s measured; \
         {latency_rounds} rounds",
        WARMUP.as_secs(),
        MEASURED.as_secs()
    );
    for round in 0..latency_rounds {
        for k in 0..peers.len() {
            let peer = peers[(k + round) % peers.len()];
            let name = format!("{}-{round}-{}", ctx.run, peer.slug());
            let (input, output) = (format!("peers-lin-{name}"), format!("peers-lout-{name}"));
            rt.block_on(create_topics(
                &ctx.addr,
                &[input.clone(), output.clone()],
                PARTITIONS,
            ))?;
            let l = ctx.latency(peer, &input, &output, &format!("peers-l-{name}"), rate)?;
            println!(
                "  round {round}: {:<34} p50 {:>7.1} ms   p99 {:>7.1} ms   ({} samples, {:.0} events/s offered)",
                peer.label(),
                l.pct(0.5),
                l.pct(0.99),
                l.samples.len(),
                l.offered
            );
            results.latencies(peer).push(l);
        }
    }

    let report = report(&results, rounds, latency_rounds, rate);
    println!("\n{report}");
    if let Some(out) = std::env::var_os("RILL_PEERS_OUT") {
        let out = PathBuf::from(out);
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("peers.md"), &report)?;
        std::fs::write(out.join("peers.svg"), chart(&results, rate))?;
        println!(
            "wrote {} and {}",
            out.join("peers.md").display(),
            out.join("peers.svg").display()
        );
    }
    drop(broker);
    if std::env::var_os("RILL_PEERS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

struct Ctx {
    addr: String,
    broker_pid: Option<u32>,
    dir: PathBuf,
    streams: Option<PathBuf>,
    /// The Python that has faust-streaming installed.
    faust: Option<PathBuf>,
    run: u32,
}

impl Ctx {
    /// Starts `peer` on `input` → `output` in its own process.
    fn spawn(&self, peer: Peer, input: &str, output: &str, group: &str) -> BoxResult<Running> {
        self.spawn_with(peer, input, output, group, &[])
    }

    /// As [`Ctx::spawn`], with more environment variables for the process.
    fn spawn_with(
        &self,
        peer: Peer,
        input: &str,
        output: &str,
        group: &str,
        env: &[(&str, String)],
    ) -> BoxResult<Running> {
        // Several processes of one group (the rebalance measurement) each get a log.
        static SPAWNED: AtomicU64 = AtomicU64::new(0);
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.join(format!("{group}.{n}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let guarantee = if peer.exactly_once { "eos" } else { "alo" };
        let mut cmd = match peer.system {
            System::Bare | System::Rill => {
                let mut cmd = Command::new(std::env::current_exe()?);
                let system = if peer.system == System::Bare {
                    "bare"
                } else {
                    "rill"
                };
                cmd.args([
                    "worker", system, &self.addr, input, output, group, guarantee,
                ]);
                cmd
            }
            System::KafkaStreams => {
                let dir = self
                    .streams
                    .as_ref()
                    .ok_or("the Kafka Streams app is not built")?;
                let java = std::env::var_os("JAVA_HOME")
                    .map(|h| Path::new(&h).join("bin/java"))
                    .filter(|j| j.is_file())
                    .unwrap_or_else(|| PathBuf::from("java"));
                let mut cmd = Command::new(java);
                let classpath = format!(
                    "{}:{}/*",
                    dir.join("target/classes").display(),
                    dir.join("target/dependency").display()
                );
                let guarantee = if peer.exactly_once {
                    "exactly_once_v2"
                } else {
                    "at_least_once"
                };
                cmd.arg(format!("-Djava.io.tmpdir={}", self.dir.display()))
                    .args(["-cp", &classpath, "rill.peers.Adding"])
                    .args([&self.addr, input, output, group, guarantee]);
                cmd
            }
            System::Faust => {
                let python = self
                    .faust
                    .as_ref()
                    .ok_or("faust-streaming is not installed")?;
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/faust/adding.py");
                let guarantee = if peer.exactly_once {
                    "exactly_once"
                } else {
                    "at_least_once"
                };
                let mut cmd = Command::new(python);
                // Faust keeps its data directory in the working directory.
                cmd.current_dir(&self.dir)
                    .arg(script)
                    .args([&self.addr, input, output, group, guarantee]);
                cmd
            }
        };
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        Ok(Running {
            child: Some(child),
            log,
        })
    }

    fn throughput(
        &self,
        peer: Peer,
        input: &str,
        output: &str,
        group: &str,
    ) -> BoxResult<Throughput> {
        // The observer is ready (assigned, connecting) before the system starts.
        let observer = observer(&self.addr, output, PARTITIONS)?;
        let mut running = self.spawn(peer, input, output, group)?;
        let spawned = Instant::now();
        let pid = running.child.as_ref().map(Child::id);
        let cpu = || {
            (
                pid.and_then(cpu_time),
                self.broker_pid.and_then(cpu_time),
                cpu_time(std::process::id()),
            )
        };
        let (mut first, mut n) = (None, 0u64);
        let mut cpu_at_first = (None, None, None);
        while n < events() {
            if spawned.elapsed() > ROUND_TIMEOUT {
                return Err(running.failed(&format!("{n} of {} outputs", events())));
            }
            if running.exited() {
                return Err(running.failed("the process exited"));
            }
            match observer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => {
                    if first.is_none() {
                        first = Some(Instant::now());
                        cpu_at_first = cpu();
                    }
                    n += 1;
                }
                Some(Err(e)) => return Err(running.failed(&format!("observer: {e}"))),
                None => {}
            }
        }
        let last = Instant::now();
        let cpu_at_last = cpu();
        running.stop()?;
        let first = first.unwrap_or(last);
        let per_event = |a: Option<Duration>, b: Option<Duration>| {
            Some((b? - a?).as_secs_f64() * 1e6 / (events() - 1).max(1) as f64)
        };
        Ok(Throughput {
            start_up: first - spawned,
            rate: (events() - 1) as f64 / (last - first).as_secs_f64().max(1e-6),
            cpu_us: per_event(cpu_at_first.0, cpu_at_last.0),
            broker_cpu_us: per_event(cpu_at_first.1, cpu_at_last.1),
            observer_cpu_us: per_event(cpu_at_first.2, cpu_at_last.2),
        })
    }

    fn latency(
        &self,
        peer: Peer,
        input: &str,
        output: &str,
        group: &str,
        rate: u64,
    ) -> BoxResult<Latency> {
        let observer = observer(&self.addr, output, PARTITIONS)?;
        let mut running = self.spawn(peer, input, output, group)?;
        let spawned = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let generator = {
            let (addr, input) = (self.addr.clone(), input.to_owned());
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || offer(&addr, &input, rate, &stop, &sent))
        };
        let result = (|| {
            let mut samples = Vec::new();
            // Inputs sent in [from, to) (µs since the epoch) are measured.
            let mut window: Option<(u64, u64)> = None;
            let mut n = 0u64;
            loop {
                if spawned.elapsed() > ROUND_TIMEOUT {
                    return Err(running.failed(&format!("{n} outputs")));
                }
                if running.exited() {
                    return Err(running.failed("the process exited"));
                }
                if let Some((_, to)) = window {
                    if epoch_micros() >= to {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                // After the load stops: until every record sent has come out.
                if generator.is_finished() && n >= sent.load(Ordering::Relaxed) {
                    break;
                }
                match observer.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let received = epoch_micros();
                        n += 1;
                        let (from, to) = *window.get_or_insert_with(|| {
                            let from = received + WARMUP.as_micros() as u64;
                            (from, from + MEASURED.as_micros() as u64)
                        });
                        let Some(sum) = m
                            .payload()
                            .and_then(|p| std::str::from_utf8(p).ok())
                            .and_then(|s| s.trim().parse::<i64>().ok())
                        else {
                            return Err(running.failed("an output that is not a number"));
                        };
                        let sent_at = sum.saturating_sub(1).max(0) as u64;
                        if (from..to).contains(&sent_at) {
                            samples.push(received.saturating_sub(sent_at));
                        }
                    }
                    Some(Err(e)) => return Err(running.failed(&format!("observer: {e}"))),
                    None => {}
                }
            }
            samples.sort_unstable();
            Ok(samples)
        })();
        stop.store(true, Ordering::Relaxed);
        let offered = generator
            .join()
            .map_err(|_| "the load generator panicked")??;
        running.stop()?;
        let samples = result?;
        Ok(Latency {
            offered: offered.min(rate as f64),
            samples,
        })
    }
}

/// A system's process; SIGTERMed (then SIGKILLed after [`STOP_TIMEOUT`]) when dropped.
struct Running {
    child: Option<Child>,
    log: PathBuf,
}

impl Running {
    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn failed(&mut self, what: &str) -> Box<dyn Error + Send + Sync> {
        let _ = self.stop();
        format!(
            "{what}; its log ({}):\n{}",
            self.log.display(),
            kafka::tail(&self.log, 30)
        )
        .into()
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
    fn stop(&mut self) -> BoxResult<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        kafka::signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not stop within {STOP_TIMEOUT:?}; its log ({}):\n{}",
                    self.log.display(),
                    kafka::tail(&self.log, 30)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Running {
    /// SIGTERM, without waiting.
    fn terminate(&self) {
        if let Some(c) = &self.child {
            kafka::signal(c.id(), "TERM");
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A read-committed consumer of every partition of `topic`, from its start.
fn observer(addr: &str, topic: &str, partitions: i32) -> BoxResult<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", format!("observer-{topic}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        // librdkafka's default (1 s) stalls a consumer whose prefetch queue filled once: it
        // would bound the rate it can observe (see the transport's consumer settings).
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

async fn create_topics(addr: &str, names: &[String], partitions: i32) -> BoxResult<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((topic, e)) = result {
            return Err(format!("creating {topic}: {e}").into());
        }
    }
    // A topic just created is not in every metadata answer at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()?;
    for name in names {
        loop {
            let md = client.fetch_metadata(Some(name), Duration::from_secs(5))?;
            let ready = md.topics().iter().any(|t| {
                t.name() == name
                    && t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{name} has no leaders after 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn producer(
    addr: &str,
    linger_ms: &str,
) -> BoxResult<ThreadedProducer<rdkafka::producer::DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger_ms)
        .create()?)
}

fn send_one(
    p: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    value: &[u8],
) {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
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

/// Writes [`events`] keyed JSON `Add` records to `topic`.
fn fill(addr: &str, topic: &str) -> BoxResult<()> {
    let p = producer(addr, "5")?;
    for i in 0..events() {
        let key = format!("k{}", i % 1000);
        let value = serde_json::to_vec(&Add { a: i as i64, b: 1 })?;
        send_one(&p, topic, None, &key, &value);
    }
    p.flush(Duration::from_secs(60))?;
    Ok(())
}

/// Offers `rate` records a second to `topic` until `stop`, each `{"a": <sent, µs since the
/// epoch>, "b": 1}`; returns the rate it achieved.
fn offer(
    addr: &str,
    topic: &str,
    rate: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> BoxResult<f64> {
    let p = producer(addr, "1")?;
    let start = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while i < due {
            let key = format!("k{}", i % 1000);
            let value = serde_json::to_vec(&Add {
                a: epoch_micros() as i64,
                b: 1,
            })?;
            send_one(&p, topic, None, &key, &value);
            i += 1;
            sent.store(i, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.flush(Duration::from_secs(30))?;
    Ok(i as f64 / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Reporting.

fn report(results: &Results, rounds: usize, latency_rounds: usize, rate: u64) -> String {
    let mut s = String::new();
    let broker = if std::env::var_os("RILL_BENCH_BROKER").is_some() {
        "a running broker"
    } else {
        "started by the bench"
    };
    let tp = |peer: Peer, f: &dyn Fn(&Throughput) -> f64| {
        median(results.throughput_of(peer).iter().map(f).collect())
    };
    let lat =
        |peer: Peer, p: f64| median(results.latency_of(peer).iter().map(|l| l.pct(p)).collect());
    let _ = writeln!(
        s,
        "Apache Kafka 4.4 ({broker}), one KRaft node on the same machine; {events} keyed JSON \
         events on {PARTITIONS} partitions; medians of {rounds} throughput rounds and \
         {latency_rounds} latency rounds ({rate} events/s offered).\n",
        events = events()
    );
    let _ = writeln!(
        s,
        "| system | throughput (events/s) | start-up to first output (ms) | latency p50 (ms) | latency p99 (ms) | CPU per event (µs): system / broker |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let cpu = |v: f64| {
        if v.is_nan() {
            "-".to_owned()
        } else {
            format!("{v:.2}")
        }
    };
    for peer in &results.peers() {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {} / {} |",
            peer.label(),
            tp(*peer, &|t| t.rate),
            tp(*peer, &|t| t.start_up.as_secs_f64() * 1e3),
            lat(*peer, 0.5),
            lat(*peer, 0.99),
            cpu(tp(*peer, &|t| t.cpu_us.unwrap_or(f64::NAN))),
            cpu(tp(*peer, &|t| t.broker_cpu_us.unwrap_or(f64::NAN))),
        );
    }
    // Ratios within a round, then their median.
    let ratio = |a: Peer, b: Peer| {
        let (x, y) = (results.throughput_of(a), results.throughput_of(b));
        median(x.iter().zip(y).map(|(x, y)| x.rate / y.rate).collect())
    };
    let lat_ratio = |a: Peer, b: Peer, p: f64| {
        let (x, y) = (results.latency_of(a), results.latency_of(b));
        median(x.iter().zip(y).map(|(x, y)| x.pct(p) / y.pct(p)).collect())
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        s,
        "\n| rill's ratio (median of the rounds' ratios) | value | goal | |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    let r = ratio(RILL, BARE);
    let _ = writeln!(
        s,
        "| throughput, rill / bare loop, at-least-once | {r:.2}× | ≥ 0.95× | {} |",
        verdict(r >= 0.95)
    );
    if !results.throughput_of(STREAMS).is_empty() {
        let r = ratio(RILL, STREAMS);
        let _ = writeln!(
            s,
            "| throughput, rill / Kafka Streams, at-least-once | {r:.2}× | ≥ 1.5× | {} |",
            verdict(r >= 1.5)
        );
        let r = ratio(RILL_EOS, STREAMS_EOS);
        let _ = writeln!(
            s,
            "| throughput, rill / Kafka Streams, exactly-once | {r:.2}× | | |"
        );
    }
    let r = ratio(RILL_EOS, RILL);
    let _ = writeln!(
        s,
        "| throughput, rill exactly-once / at-least-once | {r:.2}× | ≥ 0.7× | {} |",
        verdict(r >= 0.7)
    );
    if !results.throughput_of(STREAMS).is_empty() {
        let r = ratio(STREAMS_EOS, STREAMS);
        let _ = writeln!(
            s,
            "| (Kafka Streams exactly-once / at-least-once) | {r:.2}× | | |"
        );
        let r = lat_ratio(RILL, STREAMS, 0.99);
        let _ = writeln!(
            s,
            "| latency p99, rill / Kafka Streams, at-least-once | {r:.2}× | < 1× | {} |",
            verdict(r < 1.0)
        );
        let r = lat_ratio(RILL_EOS, STREAMS_EOS, 0.99);
        let _ = writeln!(
            s,
            "| latency p99, rill / Kafka Streams, exactly-once | {r:.2}× | | |"
        );
        let r = median(
            results
                .throughput_of(RILL)
                .iter()
                .zip(results.throughput_of(STREAMS))
                .map(|(x, y)| x.start_up.as_secs_f64() / y.start_up.as_secs_f64())
                .collect(),
        );
        let _ = writeln!(
            s,
            "| start-up, rill / Kafka Streams, at-least-once | {r:.2}× | | |"
        );
    }
    if !results.throughput_of(FAUST).is_empty() {
        let r = ratio(RILL, FAUST);
        let _ = writeln!(
            s,
            "| throughput, rill / Faust, at-least-once | {r:.2}× | | |"
        );
        let r = ratio(RILL_EOS, FAUST_EOS);
        let _ = writeln!(
            s,
            "| throughput, rill / Faust, exactly-once | {r:.2}× | | |"
        );
        let r = lat_ratio(RILL, FAUST, 0.99);
        let _ = writeln!(
            s,
            "| latency p99, rill / Faust, at-least-once | {r:.2}× | | |"
        );
    }
    let r = lat_ratio(RILL, BARE, 0.99);
    let _ = writeln!(
        s,
        "| latency p99, rill / bare loop, at-least-once | {r:.2}× | | |"
    );
    s
}

/// Two bar charts side by side: throughput, and latency p50/p99, per system.
fn chart(results: &Results, rate: u64) -> String {
    let peers = results.peers();
    let tp: Vec<f64> = peers
        .iter()
        .map(|p| median(results.throughput_of(*p).iter().map(|t| t.rate).collect()))
        .collect();
    let lat: Vec<(f64, f64)> = peers
        .iter()
        .map(|p| {
            let l = results.latency_of(*p);
            (
                median(l.iter().map(|l| l.pct(0.5)).collect()),
                median(l.iter().map(|l| l.pct(0.99)).collect()),
            )
        })
        .collect();
    let (label_w, bar_w, row_h, top) = (190.0, 250.0, 34.0, 56.0);
    let panel_w = label_w + bar_w + 90.0;
    let width = 2.0 * panel_w + 20.0;
    let height = top + row_h * peers.len() as f64 + 40.0;
    let colour = |p: &Peer| match p.system {
        System::Bare => "#8c8c8c",
        System::Rill => "#d9541e",
        System::KafkaStreams => "#2f6db5",
        System::Faust => "#3f8f4f",
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let max_tp = tp
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(1.0, f64::max);
    let max_lat = lat
        .iter()
        .map(|l| l.1)
        .filter(|x| x.is_finite())
        .fold(1.0, f64::max);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">Throughput (events/s, higher is better)</text>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-size="14" font-weight="bold">End-to-end latency at {rate} events/s (ms, log scale, lower is better)</text>"#,
        panel_w + 20.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="40" fill="#555">light: p50, dark: p99 (medians of the rounds)</text>"##,
        panel_w + 20.0
    );
    for (i, peer) in peers.iter().enumerate() {
        let y = top + row_h * i as f64;
        for x0 in [10.0, panel_w + 20.0] {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                x0 + label_w - 8.0,
                y + 17.0,
                peer.label()
            );
        }
        if tp[i].is_finite() {
            let w = bar_w * tp[i] / max_tp;
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{y}" width="{w:.1}" height="24" fill="{}"/><text x="{:.1}" y="{}">{:.0}k</text>"#,
                10.0 + label_w,
                colour(peer),
                10.0 + label_w + w + 5.0,
                y + 17.0,
                tp[i] / 1e3
            );
        }
        let (p50, p99) = lat[i];
        if p50.is_finite() && p99.is_finite() {
            let x = panel_w + 20.0 + label_w;
            // Log scale: the latencies span three orders of magnitude.
            let scale = |ms: f64| bar_w * (1.0 + ms).ln() / (1.0 + max_lat).ln();
            let (w50, w99) = (scale(p50), scale(p99));
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{y}" width="{w99:.1}" height="24" fill="{c}"/><rect x="{x}" y="{y}" width="{w50:.1}" height="24" fill="white" fill-opacity="0.55"/><text x="{:.1}" y="{}">{p50:.1} / {p99:.1}</text>"#,
                x + w99 + 5.0,
                y + 17.0,
                c = colour(peer)
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#555">Medians over alternated rounds on one Apache Kafka 4.4 broker; scripts/bench-peers</text>"##,
        height - 12.0
    );
    s.push_str("</svg>\n");
    s
}
