//! The durable transport under `kill -9`: an exactly-once worker on `file://` (the
//! `durable_worker` example) reads numbered events from `numbers` (4 partitions), forwards each
//! to `out` and totals them per key in a table. It is SIGKILLed 10 times at random points (after
//! a random number of processed events, or a random delay, whichever comes first) and
//! restarted, while another process (this test's feeder thread) sends it the numbers over the
//! running worker's ingest path (`POST /transport/records` on its web server, found through
//! its `worker.json`): batches with a producer id and sequence numbers, sent again after a
//! kill until a worker answers for them, so that a batch the killed worker wrote before it
//! could answer lands once. After the last restart and a clean stop, `out` and the table are
//! read back from disk: every number is in `out` exactly once, and the table's totals are
//! exact.
//!
//! `RILL_DURABLE_SEED` replays a run's kill schedule (each run prints its seed).

use base64::Engine as _;
use rill::transport::FileBroker;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const PARTITIONS: u32 = 4;
const KEYS: u64 = 8;
const KILLS: usize = 10;
/// Numbers released to the feeder at each start of a worker: (KILLS + 1) * CHUNK in all.
const CHUNK: u64 = 2_000;
/// Numbers per request of the feeder.
const BATCH: u64 = 50;
/// The longest a worker runs before it is killed, if it has not processed its quota by then.
const MAX_RUN: Duration = Duration::from_secs(4);
/// The bound on any one process's start, feed or drain.
const WAIT: Duration = Duration::from_secs(120);
const APP: &str = "durable-sigkill";

/// A small deterministic RNG (SplitMix64): the kill schedule is replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `target/<profile>/examples/durable_worker`, built once per test process.
fn worker_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .to_path_buf();
    BUILT.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", "durable_worker"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the harness's worker");
        assert!(
            status.success(),
            "cargo build --example durable_worker failed"
        );
    });
    let binary = profile_dir.join("examples").join("durable_worker");
    assert!(binary.is_file(), "{} is missing", binary.display());
    binary
}

/// Runs the worker program in `mode` to its end; returns its exit success, stdout and stderr.
fn run(dir: &Path, mode: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(worker_binary())
        .arg(mode)
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start durable_worker");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        };
        let err = std::thread::spawn(move || read(Box::new(stderr)));
        let out = read(Box::new(stdout));
        let _ = tx.send((out, err.join().unwrap_or_default()));
    });
    let (out, err) = match rx.recv_timeout(WAIT) {
        Ok(o) => o,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("durable_worker {mode} {args:?} did not finish within {WAIT:?}");
        }
    };
    let status = child.wait().expect("wait for durable_worker");
    (status.success(), out, err)
}

/// An HTTP/1.1 POST of a JSON body: the status and body, or why there was none (the worker
/// was killed, or is not up yet).
fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status code"))?;
    Ok((status, body.to_owned()))
}

/// The web address of the running worker, from the `worker.json` it wrote (a killed worker's
/// stays until the next one replaces it: requests to it fail and are sent again).
fn worker_addr(dir: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(dir.join("datadir").join("worker.json")).ok()?;
    let announced: serde_json::Value = serde_json::from_str(&text).ok()?;
    announced["web"]
        .as_str()?
        .strip_prefix("http://")?
        .parse()
        .ok()
}

/// The body of `POST /transport/records` for the numbers `from..to`: each keyed `n % KEYS`,
/// in partition `key % PARTITIONS`, from producer `producer` with sequence number `n`.
fn records(producer: &str, from: u64, to: u64) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let records: Vec<serde_json::Value> = (from..to)
        .map(|n| {
            let key = n % KEYS;
            serde_json::json!({
                "topic": "numbers",
                "partition": key % u64::from(PARTITIONS),
                "key": b64(key.to_string().as_bytes()),
                "value": b64(serde_json::json!({ "n": n }).to_string().as_bytes()),
                "headers": [
                    ["rill-producer-id", b64(producer.as_bytes())],
                    ["rill-producer-seq", b64(n.to_string().as_bytes())],
                ],
            })
        })
        .collect();
    serde_json::json!({ "records": records }).to_string()
}

/// Feeds the running worker, from this process (independent of the worker's): sends every
/// number released through `released`, [`BATCH`] at a time, each batch again until a worker
/// acknowledges all of it. Returns how many requests had to be sent again.
fn feeder(dir: PathBuf, released: mpsc::Receiver<u64>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let producer = format!("sigkill-harness-{}", std::process::id());
        let (mut next, mut until, mut retries) = (0, 0, 0);
        loop {
            if next == until {
                match released.recv() {
                    Ok(to) => until = to,
                    Err(_) => return retries,
                }
                continue;
            }
            let to = (next + BATCH).min(until);
            let body = records(&producer, next, to);
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let answer = worker_addr(&dir)
                    .ok_or_else(|| std::io::Error::other("no worker.json yet"))
                    .and_then(|addr| post(addr, "/transport/records", &body));
                if let Ok((200, text)) = &answer {
                    let written: serde_json::Value =
                        serde_json::from_str(text).expect("the answer is JSON");
                    let results = written["results"].as_array().expect("results");
                    assert_eq!(results.len() as u64, to - next, "one result per record");
                    if results.iter().all(|r| r["offset"].is_i64()) {
                        break;
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no worker took numbers {next}..{to} within {WAIT:?}: {answer:?}"
                );
                retries += 1;
                // The worker is down or starting: try again shortly.
                std::thread::sleep(Duration::from_millis(20));
            }
            next = to;
        }
    })
}

/// A running `work` process and the count of events it printed as processed.
struct Running {
    child: Child,
    processed: mpsc::Receiver<()>,
}

impl Running {
    fn start(dir: &Path) -> Self {
        // Its log (warnings and errors) goes to DIR/worker.log, kept when the test fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("worker.log"))
            .expect("the worker's log file");
        let mut child = Command::new(worker_binary())
            .arg("work")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start durable_worker work");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, processed) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("processed ") && tx.send(()).is_err() {
                    break;
                }
            }
        });
        Self { child, processed }
    }

    /// Waits until it has processed `events` more, or `limit` passed; returns how many it did.
    fn run_for(&self, events: u64, limit: Duration) -> u64 {
        let deadline = std::time::Instant::now() + limit;
        let mut n = 0;
        while n < events {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.processed.recv_timeout(left) {
                Ok(()) => n += 1,
                Err(_) => break,
            }
        }
        n
    }

    /// SIGKILL, and reap.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the worker");
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    /// A worker the test did not kill (it failed first) is killed too.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Decodes a JSON record value.
fn number(value: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(value).expect("a JSON event");
    v["n"].as_u64().expect("an event number")
}

#[test]
fn an_exactly_once_worker_on_file_survives_ten_sigkills() {
    let seed = std::env::var("RILL_DURABLE_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("scenario=embedded_durable_sigkill seed={seed}");
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!("rill-durable-sigkill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");

    let (release, released) = mpsc::channel();
    let feeding = feeder(dir.clone(), released);
    let mut sent = 0;
    for round in 0..KILLS {
        let worker = Running::start(&dir);
        // The next numbers go to this worker while it runs, and while it is killed.
        sent += CHUNK;
        release.send(sent).expect("the feeder runs");
        if round == 0 {
            // Once the worker has the log open (it processes events), it is the worker's: a
            // second process is refused, with the directory named.
            assert_eq!(worker.run_for(1, WAIT), 1, "the worker processes events");
            let (ok, _, err) = run(&dir, "feed", &["0", "1"]);
            assert!(!ok, "a second process opened the worker's log");
            let app_dir = dir.canonicalize().expect("dir").join(APP);
            assert!(
                err.contains("in use by another process")
                    && err.contains(&app_dir.display().to_string()),
                "the error names the locked log: {err}"
            );
        }
        let quota = 1 + rng.below(2 * CHUNK);
        let limit = Duration::from_millis(200 + rng.below(MAX_RUN.as_millis() as u64));
        let done = worker.run_for(quota, limit);
        worker.kill();
        println!(
            "scenario=embedded_durable_sigkill round {round}: SIGKILLed after {done} events \
             (quota {quota}, limit {limit:?})"
        );
    }
    // The last numbers go to a worker that lives until the feeder is done with them.
    let worker = Running::start(&dir);
    sent += CHUNK;
    release.send(sent).expect("the feeder runs");
    drop(release);
    let retries = feeding.join().expect("the feeder finishes");
    worker.kill();
    println!("scenario=embedded_durable_sigkill feeder requests sent again: {retries}");
    let (ok, out, err) = run(&dir, "drain", &[]);
    assert!(
        ok && out.contains("drained"),
        "the last worker failed: {err}"
    );

    // Read back what is on disk.
    let broker = FileBroker::open(&dir, APP).expect("open the log");
    let memory = broker.memory();
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for p in 0..PARTITIONS {
        for m in memory.read("out", p, 0, usize::MAX) {
            *seen
                .entry(number(m.value.as_deref().expect("a value")))
                .or_default() += 1;
        }
    }
    let received = seen.len() as u64;
    let lost = (0..sent).filter(|n| !seen.contains_key(n)).count();
    let duplicated: u64 = seen.values().map(|c| c - 1).sum();
    let mut table: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let changelog = format!("{APP}-totals-changelog");
    for p in 0..PARTITIONS {
        for m in memory.read(&changelog, p, 0, usize::MAX) {
            let key: u64 = serde_json::from_slice(m.key.as_deref().expect("a key")).expect("key");
            match m.value.as_deref() {
                Some(v) => {
                    let t: serde_json::Value = serde_json::from_slice(v).expect("totals");
                    let totals = (
                        t["count"].as_u64().expect("count"),
                        t["sum"].as_u64().expect("sum"),
                    );
                    table.insert(key, totals);
                }
                None => {
                    table.remove(&key);
                }
            }
        }
    }
    let mismatches = (0..KEYS)
        .filter(|k| {
            let numbers = (0..sent).filter(|n| n % KEYS == *k);
            let expected = (numbers.clone().count() as u64, numbers.sum::<u64>());
            table.get(k) != Some(&expected)
        })
        .count();
    println!(
        "scenario=embedded_durable_sigkill sent={sent} received={received} lost={lost} \
         duplicated={duplicated} table_mismatches={mismatches}"
    );
    assert_eq!(lost, 0, "numbers lost");
    assert_eq!(duplicated, 0, "numbers forwarded more than once");
    assert_eq!(mismatches, 0, "table totals: {table:?}");
    assert!(sent >= 20_000);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
