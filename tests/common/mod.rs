//! Helpers shared by the behaviour tests: bounded waits, recorders, and the checks on offsets
//! and partitions that several areas make.
//!
//! Every test file uses only part of this module.
#![allow(dead_code)]

pub(crate) mod bounded;
pub(crate) mod kafka;

use rill::transport::{MemoryBroker, TopicPartition};
use rill::App;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bound for waits on work that normally finishes in milliseconds. Generous, so that a
/// loaded 2-core machine does not fail a correct run; a broken run fails with a message.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// How often [`wait_until`] looks at its condition.
const STEP: Duration = Duration::from_millis(5);

/// Waits until `condition` holds, looking every few milliseconds, and fails the test with
/// `what` if it still does not hold after `timeout`.
///
/// Uses `tokio::time`, so under a paused clock (`start_paused = true`) the timeout is virtual.
pub(crate) async fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(STEP).await;
    }
}

/// As [`wait_until`], with the state the condition looked at printed on timeout.
pub(crate) async fn wait_until_state<S: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut state: impl FnMut() -> S,
    mut condition: impl FnMut(&S) -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = state();
        if condition(&s) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}; last state: {s:?}");
        }
        tokio::time::sleep(STEP).await;
    }
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `timeout`.
pub(crate) async fn within<F: std::future::Future>(
    timeout: Duration,
    what: &str,
    fut: F,
) -> F::Output {
    match tokio::time::timeout(timeout, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// A list that agents, sinks and the test share: agents push what they see, the test reads it.
#[derive(Debug)]
pub(crate) struct Recorder<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<T: Clone> Recorder<T> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn push(&self, value: T) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn snapshot(&self) -> Vec<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Murmur2 as Kafka's Java client computes it (`org.apache.kafka.common.utils.Utils.murmur2`),
/// written out here so the tests do not trust the library's own copy.
pub(crate) fn java_murmur2(data: &[u8]) -> i32 {
    let length = data.len() as i32;
    let seed: i32 = 0x9747_b28c_u32 as i32;
    let m: i32 = 0x5bd1_e995;
    let r = 24;
    let mut h: i32 = seed ^ length;
    let length4 = length / 4;
    for i in 0..length4 as usize {
        let i4 = i * 4;
        let mut k: i32 = (data[i4] as i32 & 0xff)
            + ((data[i4 + 1] as i32 & 0xff) << 8)
            + ((data[i4 + 2] as i32 & 0xff) << 16)
            + ((data[i4 + 3] as i32 & 0xff) << 24);
        k = k.wrapping_mul(m);
        k ^= ((k as u32) >> r) as i32;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let tail = (length4 * 4) as usize;
    let rest = length % 4;
    if rest == 3 {
        h ^= (data[tail + 2] as i32 & 0xff) << 16;
    }
    if rest >= 2 {
        h ^= (data[tail + 1] as i32 & 0xff) << 8;
    }
    if rest >= 1 {
        h ^= data[tail] as i32 & 0xff;
        h = h.wrapping_mul(m);
    }
    h ^= ((h as u32) >> 13) as i32;
    h = h.wrapping_mul(m);
    h ^= ((h as u32) >> 15) as i32;
    h
}

/// The partition Kafka's Java producer picks for an encoded key:
/// `Utils.toPositive(Utils.murmur2(key)) % partitions`.
pub(crate) fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    ((java_murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

/// The embedded broker the app uses: its own (`memory://`), or the named one
/// (`memory://NAME`).
pub(crate) fn broker_of(app: &App) -> Arc<MemoryBroker> {
    let url = app.settings().broker;
    match url
        .strip_prefix("memory://")
        .filter(|name| !name.is_empty())
    {
        Some(name) => MemoryBroker::named(name.trim_end_matches('/')),
        None => app.memory_broker(),
    }
}

/// The app's committed offsets (its consumer group is its id), by topic partition.
pub(crate) fn committed(app: &App) -> BTreeMap<TopicPartition, i64> {
    broker_of(app).committed(app.id()).into_iter().collect()
}

/// The end offset of every partition of `topic`.
pub(crate) fn end_offsets(app: &App, topic: &str) -> Vec<i64> {
    let broker = broker_of(app);
    let partitions = broker
        .partitions(topic)
        .unwrap_or_else(|| panic!("topic {topic:?} does not exist"));
    (0..partitions)
        .map(|p| broker.end_offset(topic, p).unwrap_or(0))
        .collect()
}

/// Asserts that the app's group committed every partition of `topic` up to its end: every
/// record was processed (or skipped) and nothing is left to redo after a restart.
pub(crate) fn assert_committed_to_end(app: &App, topic: &str) {
    let committed = committed(app);
    for (p, end) in end_offsets(app, topic).into_iter().enumerate() {
        let tp = TopicPartition::new(topic, p as u32);
        let got = committed.get(&tp).copied().unwrap_or(0);
        assert_eq!(
            got, end,
            "committed offset of {tp} is {got}, but the partition ends at {end}"
        );
    }
}

/// Asserts, through the app's public API (so on either transport), that its group committed
/// every partition of `topic` up to the partition's end: everything was processed (or
/// skipped), nothing is left to redo. Returns the topic's partition count.
pub(crate) async fn assert_group_committed_to_end(app: &App, topic: &str) -> anyhow::Result<usize> {
    let ends = app.end_offsets(topic).await?;
    let committed: BTreeMap<TopicPartition, i64> =
        app.committed_offsets().await?.into_iter().collect();
    for (p, &end) in ends.iter().enumerate() {
        let tp = TopicPartition::new(topic, p as u32);
        let got = committed.get(&tp).copied().unwrap_or(0);
        assert_eq!(
            got, end,
            "committed offset of {tp} is {got}, but the partition ends at {end}"
        );
    }
    Ok(ends.len())
}

/// Every record of every partition of `topic`, partition by partition.
pub(crate) fn read_all(app: &App, topic: &str) -> Vec<rill::transport::Message> {
    let broker = broker_of(app);
    let partitions = broker
        .partitions(topic)
        .unwrap_or_else(|| panic!("topic {topic:?} does not exist"));
    (0..partitions)
        .flat_map(|p| broker.read(topic, p, 0, usize::MAX))
        .collect()
}

/// Writes `values` to `topic` (with `partitions` partitions) on the process-wide embedded
/// broker `memory://{broker}`, from a separate producer app that has stopped by the time this
/// returns. An app on the same broker started afterwards finds them all already in the log.
pub(crate) async fn preload<T>(broker: &str, topic: &str, partitions: u32, values: &[T])
where
    T: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let producer = App::new(format!("{broker}-producer"));
    let url = format!("memory://{broker}");
    producer.configure(|s| s.broker = url);
    let t = producer
        .topic(topic)
        .partitions(partitions)
        .value_type::<T>();
    let worker = producer.start().await.expect("producer starts");
    for v in values {
        t.send(v.clone()).await.expect("producer sends");
    }
    worker.shutdown().await.expect("producer stops");
}

/// A blocking HTTP/1.1 GET against `addr`: status code and body. For tests of the web server.
pub(crate) fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the web server");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// A blocking HTTP/1.1 request with a JSON body against `addr`: status code and body. For
/// tests of the web server's POST and PUT routes.
pub(crate) fn http_send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the web server");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// A directory of its own under the system's temporary directory, removed with what is in it
/// when dropped. `create` makes it; otherwise only the path is reserved (for what a test
/// expects a program to make, or not to make).
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str, create: bool) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rill-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        if create {
            std::fs::create_dir_all(&path).expect("create a temporary directory");
        }
        Self(path)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of `program` (from the environment variable `env`, else from PATH), checked to
/// run with `--version`. Fails the test, saying how to install it, when it is missing: a test
/// that needs a tool does not pass without it.
pub(crate) fn require_program(program: &str, env: &str, install: &str) -> std::path::PathBuf {
    let hint = format!("{program} is needed: {install} (scripts/test does), or set {env}");
    let path = std::env::var_os(env)
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let dirs = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&dirs)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{program} not found. {hint}"));
    match std::process::Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => path,
        Ok(out) => panic!(
            "{} --version failed ({}). {hint}",
            path.display(),
            out.status
        ),
        Err(e) => panic!("cannot run {} ({e}). {hint}", path.display()),
    }
}

/// What the tests' tracing subscriber wrote, when it writes to [`LogCapture`].
pub(crate) static LOGS: Mutex<String> = Mutex::new(String::new());

/// A writer for a test's tracing subscriber (`.with_writer(|| LogCapture)`) that appends to
/// [`LOGS`], so tests can check what a user would read in the logs.
pub(crate) struct LogCapture;

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The package root, where the example binaries are built and run.
pub(crate) fn manifest_dir() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the example `name` once per test binary and returns the path cargo reports for it.
pub(crate) fn example_binary(name: &str) -> std::path::PathBuf {
    static BINARIES: std::sync::Mutex<std::collections::BTreeMap<String, std::path::PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut built = BINARIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(manifest_dir())
        .args([
            "build",
            "--quiet",
            "--message-format=json",
            "--example",
            name,
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo build --example {name} failed");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name)
        .find_map(|msg| msg["executable"].as_str().map(std::path::PathBuf::from))
        .expect("cargo reports the example's executable");
    built.insert(name.to_owned(), path.clone());
    path
}

/// Declares agent `count`: reads `words`, groups them by word (repartition topic `word`) and
/// counts each in `counts`.
pub(crate) fn count_words(
    app: &App,
    words: &rill::Topic<rill::Bytes, String>,
    counts: &rill::Table<String, i64>,
) {
    use rill::prelude::*;
    let table = counts.clone();
    app.agent(move |words: Stream<String>| {
        let counts = table.clone();
        async move {
            let mut words = words.group_by(GroupBy::new("word", |w: &String| w.clone()));
            while let Some(word) = words.next().await {
                counts.update(word, |n| *n += 1);
            }
        }
    })
    .named("count")
    .channel(words);
}
