//! Apache Kafka brokers for the tests that need a real broker process: KRaft nodes (each a
//! combined broker and controller) started with `java -cp '<libs>/*' kafka.Kafka` on free
//! loopback ports in a scratch directory, stopped by pid when dropped.
//!
//! The broker's jars come from `RILL_TEST_KAFKA_LIBS`, else from the cache that
//! `scripts/kafka-jars` fills (`${XDG_CACHE_HOME:-$HOME/.cache}/rill/kafka-4.4.0/libs`);
//! `scripts/test` runs it.
//! Java is `$JAVA_HOME/bin/java`, else `java` on PATH.
//!
//! [`Kafka::single`] is one node (replication factor 1, for most tests);
//! [`Kafka::cluster`] is three (replication factor 3, `min.insync.replicas=2`), for the
//! broker-failure tests, which [`Kafka::kill`] and [`Kafka::restart`] one node at a time.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Kafka version `kafka/pom.xml` fetches.
pub(crate) const KAFKA_VERSION: &str = "4.4.0";

/// How long a node may take to start and be seen in the cluster's metadata. A node is ready
/// in 3-5 s on an idle 2-core machine; this allows for a loaded one.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a SIGTERMed node may take to stop before it is SIGKILLed (a controlled shutdown
/// moves its leaderships to the other nodes first).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The directory holding the broker's jars.
pub(crate) fn kafka_libs() -> PathBuf {
    let dir = std::env::var_os("RILL_TEST_KAFKA_LIBS")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
            Some(cache.join(format!("rill/kafka-{KAFKA_VERSION}/libs")))
        })
        .expect("neither RILL_TEST_KAFKA_LIBS nor HOME is set");
    assert!(
        dir.join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
            .is_file(),
        "Apache Kafka {KAFKA_VERSION}'s jars are not in {}: fetch them with scripts/kafka-jars \
         (scripts/test does) or set RILL_TEST_KAFKA_LIBS",
        dir.display()
    );
    dir
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|h| Path::new(&h).join("bin/java"))
        .filter(|j| j.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`) to the process `pid`. A process that has
/// exited already is not an error here.
pub(crate) fn signal(pid: u32, signal: &str) {
    Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
}

/// The last `lines` lines of a file, for failure messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The JVM's flags: a small heap (several brokers and builds share the machine) and a cheap
/// start-up (serial GC, the client compiler only, the class-data archive when there is one).
const JVM_FLAGS: [&str; 7] = [
    "-Xms64m",
    "-Xmx384m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Xshare:auto",
    "-Djava.awt.headless=true",
    "-Dlog4j2.shutdownHookEnabled=false",
];

/// One KRaft node: broker and controller in one process.
struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn properties(&self, voters: &str, replicas: usize) -> String {
        let rf = replicas.to_string();
        let min_isr = if replicas >= 3 { "2" } else { "1" };
        let (id, port, cport) = (self.id, self.port, self.controller_port);
        let data = self.dir.join("data");
        format!(
            "process.roles=broker,controller\n\
             node.id={id}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             inter.broker.listener.name=PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             default.replication.factor={rf}\n\
             min.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={rf}\n\
             offsets.topic.num.partitions=6\n\
             transaction.state.log.replication.factor={rf}\n\
             transaction.state.log.min.isr={min_isr}\n\
             transaction.state.log.num.partitions=6\n\
             share.coordinator.state.topic.replication.factor={rf}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n\
             group.min.session.timeout.ms=1000\n\
             auto.create.topics.enable=true\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             background.threads=2\n\
             log.segment.bytes=16777216\n\
             log.flush.interval.ms=9223372036854775807\n\
             replica.lag.time.max.ms=10000\n\
             controller.quorum.election.timeout.ms=1000\n\
             controller.quorum.fetch.timeout.ms=2000\n\
             broker.heartbeat.interval.ms=500\n\
             broker.session.timeout.ms=4000\n\
             transaction.remove.expired.transaction.cleanup.interval.ms=60000\n\
             transaction.abort.timed.out.transaction.cleanup.interval.ms=2000\n",
            data = data.display(),
        )
    }

    fn log4j(&self) -> String {
        format!(
            "status = warn\n\
             appender.file.type = File\n\
             appender.file.name = file\n\
             appender.file.fileName = {}\n\
             appender.file.layout.type = PatternLayout\n\
             appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = info\n\
             rootLogger.appenderRef.file.ref = file\n\
             logger.kafka.name = org.apache.kafka\n\
             logger.kafka.level = info\n",
            self.log().display()
        )
    }

    fn java(&self, libs: &Path, jvm_flags: &[String]) -> Command {
        let mut cmd = Command::new(java());
        cmd.args(JVM_FLAGS)
            .args(jvm_flags)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    /// Writes the configuration and formats the storage of a new node.
    fn format(&self, libs: &Path, cluster_id: &str, voters: &str, replicas: usize) {
        let jvm_flags: &[String] = &[];
        std::fs::create_dir_all(&self.dir).expect("node dir");
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        std::fs::write(
            self.dir.join("server.properties"),
            self.properties(voters, replicas),
        )
        .expect("server.properties");
        std::fs::write(self.dir.join("log4j2.properties"), self.log4j()).expect("log4j2");
        let out = self
            .java(libs, jvm_flags)
            .args(["kafka.tools.StorageTool", "format", "--cluster-id"])
            .arg(cluster_id)
            .args(["--config", "server.properties", "--ignore-formatted"])
            .output()
            .expect("run Kafka's storage tool");
        assert!(
            out.status.success(),
            "formatting node {} failed ({}):\n{}{}",
            self.id,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn(&mut self, libs: &Path, jvm_flags: &[String]) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .expect("stdout.log");
        let err = out.try_clone().expect("stdout.log");
        let child = self
            .java(libs, jvm_flags)
            .args(["kafka.Kafka", "server.properties"])
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start java (Java 17 or later is needed for Kafka)");
        self.child = Some(child);
    }

    /// Whether the process has exited (or was never started).
    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a controlled shutdown), then SIGKILL if it takes longer than `STOP_TIMEOUT`.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        signal(c.id(), "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    fn describe(&self) -> String {
        format!(
            "node {} ({}), log {}:\n{}\n-- stdout/stderr:\n{}",
            self.id,
            self.addr(),
            self.log().display(),
            tail(&self.log(), 40),
            tail(&self.dir.join("stdout.log"), 20)
        )
    }
}

/// A KRaft cluster of Apache Kafka nodes on loopback ports.
pub(crate) struct Kafka {
    libs: PathBuf,
    /// JVM flags after [`JVM_FLAGS`] (later flags win).
    jvm_flags: Vec<String>,
    nodes: Vec<Node>,
}

impl Kafka {
    /// One node, replication factor 1.
    pub(crate) fn single(dir: &Path) -> Self {
        Self::start(dir, 1, &[])
    }

    /// One node with `jvm_flags` after the tests' own: the bench gives the broker the full JIT
    /// compiler and a larger heap, so that the broker does not bound what it measures.
    pub(crate) fn single_with_jvm_flags(dir: &Path, jvm_flags: &[&str]) -> Self {
        Self::start(dir, 1, jvm_flags)
    }

    /// Three nodes, replication factor 3, `min.insync.replicas=2`.
    pub(crate) fn cluster(dir: &Path) -> Self {
        Self::start(dir, 3, &[])
    }

    fn start(dir: &Path, n: usize, jvm_flags: &[&str]) -> Self {
        let jvm_flags: Vec<String> = jvm_flags.iter().map(|f| f.to_string()).collect();
        let libs = kafka_libs();
        let started = Instant::now();
        // Free ports are found by binding and releasing them, so another process can take one
        // before the broker binds it: then the cluster starts again on other ports.
        for attempt in 1..=3 {
            let mut kafka = Kafka {
                libs: libs.clone(),
                jvm_flags: jvm_flags.clone(),
                nodes: (0..n)
                    .map(|i| Node {
                        id: i as u32 + 1,
                        port: free_port(),
                        controller_port: free_port(),
                        dir: dir.join(format!("kafka-{}", i + 1)),
                        child: None,
                    })
                    .collect(),
            };
            let voters = kafka
                .nodes
                .iter()
                .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
                .collect::<Vec<_>>()
                .join(",");
            // A cluster id is 16 bytes in URL-safe base64 without padding (22 characters).
            let cluster_id = format!("rill{:018}", std::process::id());
            for node in &kafka.nodes {
                std::fs::create_dir_all(&node.dir).expect("node dir");
                let _ = std::fs::remove_file(node.log());
                node.format(&libs, &cluster_id, &voters, n);
            }
            for node in &mut kafka.nodes {
                node.spawn(&libs, &jvm_flags);
            }
            match kafka.wait_ready(START_TIMEOUT) {
                Ok(()) => {
                    eprintln!(
                        "kafka: {n} node(s) ready at {} in {:.1} s",
                        kafka.bootstrap(),
                        started.elapsed().as_secs_f64()
                    );
                    return kafka;
                }
                Err(e) => {
                    let port_taken = kafka.nodes.iter().any(|n| {
                        std::fs::read_to_string(n.log())
                            .unwrap_or_default()
                            .contains("Address already in use")
                    });
                    if port_taken && attempt < 3 {
                        eprintln!("kafka: a port was taken; starting again on other ports");
                        continue;
                    }
                    panic!("{e}");
                }
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// `host:port,...` of every node.
    pub(crate) fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(Node::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The address of the first node (all of them for a single node).
    pub(crate) fn addr(&self) -> String {
        self.nodes[0].addr()
    }

    /// How many nodes the cluster has.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Waits until every running node is up and seen by the others in the metadata; `Err`
    /// with the nodes' logs if that takes longer than `timeout`.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut want = Vec::new();
        for node in &mut self.nodes {
            if !node.exited() {
                want.push(node.id as i32);
            }
        }
        let mut last = String::from("no answer yet");
        loop {
            for node in &mut self.nodes {
                if node.child.is_some() && node.exited() {
                    return Err(format!(
                        "a Kafka node exited while starting; {}",
                        node.describe()
                    ));
                }
            }
            // Asked of every running node: each must answer, and know all the others.
            let mut all = true;
            for node in self.nodes.iter().filter(|n| want.contains(&(n.id as i32))) {
                match brokers_seen_by(&node.addr()) {
                    Ok(seen) if want.iter().all(|id| seen.contains(id)) => {}
                    Ok(seen) => {
                        last = format!("node {} sees brokers {seen:?}", node.id);
                        all = false;
                    }
                    Err(e) => {
                        last = format!("node {}: {e}", node.id);
                        all = false;
                    }
                }
                if !all {
                    break;
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self.nodes.iter().map(Node::describe).collect();
                return Err(format!(
                    "Kafka did not get ready within {timeout:?} ({last}); {}",
                    logs.join("\n\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the node with broker id `id`.
    pub(crate) fn index_of(&self, id: i32) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id as i32 == id)
            .unwrap_or_else(|| panic!("no node with id {id}"))
    }

    /// The process id of node `i`, while it runs.
    pub(crate) fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid()
    }

    /// SIGKILLs node `i`.
    pub(crate) fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGTERMs node `i` (a controlled shutdown that moves its leaderships away), SIGKILLing
    /// it after a few seconds.
    pub(crate) fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports and data (after [`Kafka::kill`] or
    /// [`Kafka::stop`]), and waits until the cluster sees it.
    pub(crate) fn restart(&mut self, i: usize) {
        let started = Instant::now();
        let (libs, jvm_flags) = (self.libs.clone(), self.jvm_flags.clone());
        self.nodes[i].spawn(&libs, &jvm_flags);
        if let Err(e) = self.wait_ready(START_TIMEOUT) {
            panic!("{e}");
        }
        eprintln!(
            "kafka: node {} restarted in {:.1} s",
            self.nodes[i].id,
            started.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        // All SIGTERMed at once, then SIGKILLed after one bound: the last nodes of a cluster
        // stopping one by one would wait for a quorum that is gone.
        for node in &self.nodes {
            if let Some(pid) = node.pid() {
                signal(pid, "TERM");
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.nodes.iter_mut().any(|n| !n.exited()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for node in &mut self.nodes {
            node.kill();
        }
        if !std::thread::panicking() {
            for node in &self.nodes {
                let _ = std::fs::remove_dir_all(node.dir.join("data"));
            }
        }
    }
}

impl Kafka {
    /// Waits until every partition of `topics` has all the cluster's nodes in sync (after a
    /// node came back); `Err` with the partitions still behind after `timeout`.
    pub(crate) fn wait_in_sync(&self, topics: &[String], timeout: Duration) -> Result<(), String> {
        let want = self.nodes.len();
        let deadline = Instant::now() + timeout;
        loop {
            let mut behind = Vec::new();
            for topic in topics {
                match in_sync_replicas(&self.bootstrap(), topic) {
                    Ok(isrs) => behind.extend(
                        isrs.into_iter()
                            .filter(|(_, isr)| *isr < want)
                            .map(|(p, isr)| format!("{topic}[{p}] {isr} of {want} in sync")),
                    ),
                    Err(e) => behind.push(format!("{topic}: {e}")),
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(behind.join(", "));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// How many replicas of each partition of `topic` are in sync.
fn in_sync_replicas(bootstrap: &str, topic: &str) -> Result<Vec<(i32, usize)>, String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create()
        .map_err(|e| e.to_string())?;
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or("no such topic")?;
    if t.partitions().is_empty() {
        return Err("no partitions".into());
    }
    Ok(t.partitions()
        .iter()
        .map(|p| (p.id(), p.isr().len()))
        .collect())
}

/// The broker ids in the metadata the broker at `addr` answers.
fn brokers_seen_by(addr: &str) -> Result<Vec<i32>, String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("log_level", "0")
        .create()
        .map_err(|e| e.to_string())?;
    let md = client
        .fetch_metadata(None, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    Ok(md.brokers().iter().map(|b| b.id()).collect())
}

/// The broker id of the leader of `topic`'s partition `partition`, from the metadata of any
/// node that answers.
pub(crate) fn leader_of(bootstrap: &str, topic: &str, partition: i32) -> Option<i32> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create()
        .ok()?;
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    let p = t.partitions().iter().find(|p| p.id() == partition)?;
    (p.leader() >= 0).then_some(p.leader())
}

/// The Python the interop tests run their clients with: `RILL_PYTHON`, else `python3`.
pub(crate) fn python() -> String {
    std::env::var("RILL_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Bound on stopping what a failed test left running on its runtime.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(30);

/// Runs a test body on a runtime of its own that is shut down, bounded, before the caller
/// stops the broker. If the body fails with the rill worker still running, dropping the worker
/// closes its Kafka consumer, and librdkafka's consumer close waits for the group coordinator
/// without a bound: with the broker already gone (as when the broker is a local of the failing
/// body), the test would hang instead of failing.
pub(crate) fn run_with_broker_alive(body: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the test's runtime starts");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(body)));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
