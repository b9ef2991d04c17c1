//! State consistency under the restarts a deployment goes through: a model-based test.
//!
//! An app keeps two tables from a keyed topic of operations: `latest` (the last value written
//! to each key; a negative value deletes the key) and `counts` (how many operations each key
//! has seen). The test drives one or two workers of the app through a random sequence of
//! steps — writes, graceful restarts on the same local store, restarts on a new empty store,
//! switching the store between `memory://` and `fjall://`, `reset`, a second worker joining
//! and leaving (its standby copies promoted, or its partitions handed back) — and after each
//! step compares every key of both tables, read over HTTP from a running worker (which
//! forwards to the owner), with an oracle it keeps from the operations it sent.
//!
//! Each run prints its seed; set `RILL_STATE_SEED` to replay it, `RILL_STATE_SEQUENCES` and
//! `RILL_STATE_STEPS` for longer runs. One summary line per transport:
//! `scenario=state_consistency transport=... sequences=N steps=N keys_checked=N mismatches=0`.
//!
//! Workers here stop gracefully (a stop commits); crashes (SIGKILL) are in the fault harness,
//! whose workers are separate processes.

mod common;

use rill::prelude::*;
use rill::Worker;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Keys the operations write (every one is checked after every step).
const KEYS: u64 = 48;
const PARTITIONS: u32 = 4;

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One worker's app and its handles.
struct Node {
    app: App,
    ops: Topic<u64, i64>,
    worker: Option<Worker>,
    /// The store it starts on: `memory://` or `fjall://DIR`.
    store: String,
}

impl Node {
    fn web(&self) -> Option<SocketAddr> {
        self.worker.as_ref().and_then(Worker::web_addr)
    }
}

fn build(id: &str, broker: &str, store: &str) -> Node {
    let app = App::new(id);
    let (broker, store_url) = (broker.to_owned(), store.to_owned());
    app.configure(|s| {
        if broker.starts_with("kafka:") {
            s.kafka.insert("session.timeout.ms".into(), "6000".into());
            s.kafka.insert("heartbeat.interval.ms".into(), "500".into());
        }
        s.broker = broker;
        s.topic_partitions = PARTITIONS;
        s.commit_interval = Duration::from_millis(50);
        s.store = store_url;
        s.web_port = Some(0);
        s.table_standby_replicas = Some(1);
    });
    let latest = app.table::<u64, i64>("latest");
    let counts = app.table::<u64, u64>("counts");
    let ops = app.topic("ops").key_type::<u64>().value_type::<i64>();
    let (l, c) = (latest.clone(), counts.clone());
    app.agent(move |ops: Stream<i64, u64>| {
        let (latest, counts) = (l.clone(), c.clone());
        async move {
            let mut ops = ops.items();
            while let Some((key, value)) = ops.next().await {
                let Some(key) = key else { continue };
                if value < 0 {
                    latest.remove(&key);
                } else {
                    latest.insert(key, value);
                }
                counts.update(key, |n| *n += 1);
            }
        }
    })
    .named("apply")
    .channel(&ops);
    Node {
        app,
        ops,
        worker: None,
        store: store.to_owned(),
    }
}

/// The steps of a sequence.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Sends this many operations through a running worker.
    Write(u64),
    /// Stops worker `i` gracefully and starts it again on the same store.
    Restart(usize),
    /// Stops worker `i` and starts it on a new, empty fjall store.
    RestartOnEmptyStore(usize),
    /// Stops worker `i` and starts it on the other kind of store (memory ↔ fjall).
    SwitchStore(usize),
    /// Stops worker `i`, runs `reset --yes` (removes its local table state), starts it.
    Reset(usize),
    /// Starts worker `i` (it joins the group; partitions move to it).
    Join(usize),
    /// Stops worker `i` (the other takes its partitions, from its standby copies).
    Leave(usize),
}

struct Run {
    transport: &'static str,
    broker: String,
    id: String,
    dirs: PathBuf,
    fresh: u32,
    nodes: Vec<Node>,
    latest: BTreeMap<u64, i64>,
    counts: BTreeMap<u64, u64>,
    history: String,
    keys_checked: u64,
    settle: Duration,
}

impl Run {
    fn new_store(&mut self) -> String {
        self.fresh += 1;
        format!(
            "fjall://{}",
            self.dirs.join(format!("store-{}", self.fresh)).display()
        )
    }

    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].worker.is_some())
            .collect()
    }

    /// A new app on `store` for worker `i` (a restarted process), started.
    async fn start(&mut self, i: usize, store: String) {
        let node = build(&self.id, &self.broker, &store);
        let worker = common::within(Duration::from_secs(120), "a worker start", node.app.start())
            .await
            .expect("start");
        self.nodes[i] = Node {
            worker: Some(worker),
            ..node
        };
    }

    async fn stop(&mut self, i: usize) {
        if let Some(w) = self.nodes[i].worker.take() {
            common::within(Duration::from_secs(120), "a worker stop", w.shutdown())
                .await
                .expect("stop");
        }
    }

    /// Picks a step that can be taken now.
    fn pick(&self, rng: &mut Rng) -> Step {
        let running = self.running();
        let i = running[rng.below(running.len() as u64) as usize];
        let other = 1 - i;
        match rng.below(20) {
            0..=6 => Step::Write(1 + rng.below(150)),
            7..=10 => Step::Restart(i),
            11 | 12 => Step::RestartOnEmptyStore(i),
            13 | 14 => Step::SwitchStore(i),
            15 => Step::Reset(i),
            _ if self.nodes[other].worker.is_none() => Step::Join(other),
            _ if running.len() == 2 => Step::Leave(i),
            _ => Step::Write(1 + rng.below(150)),
        }
    }

    async fn take(&mut self, step: Step, rng: &mut Rng) {
        match step {
            Step::Write(n) => {
                let i = self.running()[0];
                for _ in 0..n {
                    let key = rng.below(KEYS);
                    // About one in twelve deletes the key.
                    let value = rng.below(1200) as i64 - 100;
                    let value = if value < 0 { -1 } else { value };
                    self.nodes[i].ops.send(value).key(key).await.expect("send");
                    if value < 0 {
                        self.latest.remove(&key);
                    } else {
                        self.latest.insert(key, value);
                    }
                    *self.counts.entry(key).or_insert(0) += 1;
                }
            }
            Step::Restart(i) => {
                self.stop(i).await;
                let store = self.nodes[i].store.clone();
                self.start(i, store).await;
            }
            Step::RestartOnEmptyStore(i) => {
                self.stop(i).await;
                let store = self.new_store();
                self.start(i, store).await;
            }
            Step::SwitchStore(i) => {
                self.stop(i).await;
                let store = if self.nodes[i].store.starts_with("memory:") {
                    self.new_store()
                } else {
                    "memory://".to_owned()
                };
                self.start(i, store).await;
            }
            Step::Reset(i) => {
                self.stop(i).await;
                let node = build(&self.id, &self.broker, &self.nodes[i].store);
                // As a user would: `app reset --yes` in a process of its own (no runtime).
                std::thread::spawn(move || node.app.main_from(["harness", "reset", "--yes"]))
                    .join()
                    .expect("reset runs")
                    .expect("reset");
                let store = self.nodes[i].store.clone();
                self.start(i, store).await;
            }
            Step::Join(i) => {
                let store = if self.nodes[i].store.starts_with("fjall:") {
                    self.nodes[i].store.clone()
                } else {
                    self.new_store()
                };
                self.start(i, store).await;
            }
            Step::Leave(i) => self.stop(i).await,
        }
    }

    /// Waits until every key of both tables, read over HTTP, equals the oracle; returns the
    /// keys that still differ when the wait is over (with what was read).
    async fn check(&mut self) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + self.settle;
        loop {
            let webs: Vec<SocketAddr> = self.nodes.iter().filter_map(Node::web).collect();
            let (latest, counts) = (self.latest.clone(), self.counts.clone());
            let diffs = tokio::task::spawn_blocking(move || differences(&webs, &latest, &counts))
                .await
                .expect("check runs");
            if diffs.is_empty() {
                self.keys_checked += 2 * KEYS;
                return diffs;
            }
            if tokio::time::Instant::now() >= deadline {
                self.keys_checked += 2 * KEYS;
                return diffs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The keys whose value over HTTP differs from the oracle, each with what was read. Every
/// running worker is asked for every key (a worker forwards keys it does not own).
fn differences(
    webs: &[SocketAddr],
    latest: &BTreeMap<u64, i64>,
    counts: &BTreeMap<u64, u64>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for web in webs {
        for key in 0..KEYS {
            let want_latest = latest.get(&key).map(|v| v.to_string());
            let want_count = counts.get(&key).map(|v| v.to_string());
            for (table, want) in [("latest", want_latest), ("counts", want_count)] {
                let got = lookup(*web, table, key);
                if got.as_ref() != Some(&want) {
                    diffs.push(format!(
                        "{table}[{key}] on {web}: want {want:?}, got {got:?}"
                    ));
                }
            }
        }
    }
    diffs
}

/// A table's value over HTTP: `Some(Some(json))` when found, `Some(None)` when missing,
/// `None` when the worker cannot answer yet (a partition being restored, a rebalance).
fn lookup(web: SocketAddr, table: &str, key: u64) -> Option<Option<String>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(web).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /tables/{table}/{key} HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    match head.split_whitespace().nth(1)? {
        "200" => Some(Some(body.to_owned())),
        "404" if !body.contains("no table") => Some(None),
        _ => None,
    }
}

struct Summary {
    sequences: u64,
    steps: u64,
    keys_checked: u64,
    mismatches: u64,
}

/// Runs `sequences` random sequences of `steps` steps from `seed`; fails with the seed, the
/// steps taken and the differences at the first step after which the tables disagree with
/// the oracle.
async fn run(
    transport: &'static str,
    broker: impl Fn(&str) -> String,
    settle: Duration,
    default_sequences: u64,
) -> Summary {
    let seed = env_u64("RILL_STATE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    }) | 1;
    let sequences = env_u64("RILL_STATE_SEQUENCES").unwrap_or(default_sequences);
    let steps = env_u64("RILL_STATE_STEPS").unwrap_or(14);
    println!("state consistency on {transport}: seed {seed} (replay with RILL_STATE_SEED={seed})");
    let mut summary = Summary {
        sequences,
        steps: 0,
        keys_checked: 0,
        mismatches: 0,
    };
    for s in 0..sequences {
        let mut rng = Rng(seed.wrapping_add(s.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        let id = format!("state-{transport}-{seed:x}-{s}");
        let dirs = std::env::temp_dir().join(format!("rill-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dirs);
        let broker = broker(&id);
        let mut r = Run {
            transport,
            id: id.clone(),
            broker: broker.clone(),
            dirs: dirs.clone(),
            fresh: 0,
            nodes: vec![
                build(&id, &broker, "memory://"),
                build(&id, &broker, "memory://"),
            ],
            latest: BTreeMap::new(),
            counts: BTreeMap::new(),
            history: String::new(),
            keys_checked: 0,
            settle,
        };
        // Every sequence starts with one worker on a fjall store, and writes.
        let store = r.new_store();
        r.start(0, store).await;
        let mut plan = vec![Step::Write(100)];
        for _ in 0..steps {
            let step = r.pick(&mut rng);
            plan.push(step);
            r.take(step, &mut rng).await;
            let _ = writeln!(r.history, "  {step:?}");
            summary.steps += 1;
            let diffs = r.check().await;
            if !diffs.is_empty() {
                summary.mismatches += diffs.len() as u64;
                summary.keys_checked += r.keys_checked;
                println!(
                    "scenario=state_consistency transport={} sequences={} steps={} keys_checked={} mismatches={}",
                    r.transport, s + 1, summary.steps, summary.keys_checked, summary.mismatches
                );
                panic!(
                    "sequence {s} of seed {seed} on {transport} (replay with RILL_STATE_SEED={seed}): \
                     the tables differ from the operations sent after these steps:\n{}{} keys differ, e.g.:\n  {}",
                    r.history,
                    diffs.len(),
                    diffs.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ")
                );
            }
        }
        summary.keys_checked += r.keys_checked;
        if std::env::var_os("RILL_STATE_VERBOSE").is_some() {
            println!("sequence {s}:\n{}", r.history);
        }
        for i in 0..r.nodes.len() {
            r.stop(i).await;
        }
        let _ = std::fs::remove_dir_all(&dirs);
    }
    println!(
        "scenario=state_consistency transport={transport} sequences={} steps={} keys_checked={} mismatches={}",
        summary.sequences, summary.steps, summary.keys_checked, summary.mismatches
    );
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_match_the_operations_sent_through_any_restart_sequence_embedded() {
    let s = run("memory", |id| format!("memory://{id}"), common::WAIT, 4).await;
    assert_eq!(s.mismatches, 0);
    assert!(s.keys_checked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_match_the_operations_sent_through_any_restart_sequence_on_kafka() {
    let clusters: std::sync::Mutex<Vec<rdkafka::mocking::MockCluster<'static, _>>> =
        Default::default();
    let s = run(
        "kafka",
        |id| {
            let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            // Created up front: the mock cluster would create them on first sight with its
            // default partition count.
            for (topic, partitions) in [
                ("ops".to_owned(), PARTITIONS as i32),
                (format!("{id}-latest-changelog"), PARTITIONS as i32),
                (format!("{id}-counts-changelog"), PARTITIONS as i32),
                (format!("{id}-workers"), 1),
            ] {
                cluster
                    .create_topic(&topic, partitions, 1)
                    .expect("create topic");
            }
            let url = format!("kafka://{}", cluster.bootstrap_servers());
            clusters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(cluster);
            url
        },
        Duration::from_secs(60),
        2,
    )
    .await;
    assert_eq!(s.mismatches, 0);
    assert!(s.keys_checked > 0);
}
