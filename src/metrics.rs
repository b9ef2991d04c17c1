//! What a worker reports about itself: metrics through the [`metrics`] facade (rendered in
//! Prometheus's text format by the web server's `GET /metrics`), and the state that
//! `GET /health` and the status page show.
//!
//! Hot paths hold metric handles and count per batch: the dispatcher per run of records of one
//! partition, an agent's processing time per batch of events it read without waiting. Gauges
//! (lag, table sizes) are refreshed when they are read and once a second.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `rill_events_in_total` | counter | `app`, `agent`, `topic` |
//! | `rill_events_out_total` | counter | `app`, `agent`, `topic` |
//! | `rill_agent_errors_total` | counter | `app`, `agent`, `topic` |
//! | `rill_decode_errors_total` | counter | `app`, `topic` (counted where bad input is handled) |
//! | `rill_dead_letter_errors_total` | counter | `app`, `agent` |
//! | `rill_agent_process_seconds` | histogram | `app`, `agent` |
//! | `rill_commit_seconds` | histogram | `app` |
//! | `rill_consumer_lag` | gauge | `app`, `topic`, `partition` |
//! | `rill_assigned_partitions` | gauge | `app` |
//! | `rill_rebalances_total` | counter | `app` |
//! | `rill_table_keys` | gauge | `app`, `table` |
//! | `rill_table_recovering_partitions` | gauge | `app`, `table` |
//! | `rill_table_recovery_records_total` | counter | `app`, `table` |
//! | `rill_table_recovery_remaining_records` | gauge | `app`, `table` |

use crate::transport::{TopicPartition, Transport};
use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const EVENTS_IN: &str = "rill_events_in_total";
const EVENTS_OUT: &str = "rill_events_out_total";
const AGENT_ERRORS: &str = "rill_agent_errors_total";
const DECODE_ERRORS: &str = "rill_decode_errors_total";
const DEAD_LETTER_ERRORS: &str = "rill_dead_letter_errors_total";
const PROCESS_SECONDS: &str = "rill_agent_process_seconds";
const COMMIT_SECONDS: &str = "rill_commit_seconds";
const CONSUMER_LAG: &str = "rill_consumer_lag";
const ASSIGNED: &str = "rill_assigned_partitions";
const REBALANCES: &str = "rill_rebalances_total";
const TABLE_KEYS: &str = "rill_table_keys";
const TABLE_RECOVERING: &str = "rill_table_recovering_partitions";
const TABLE_REPLAYED: &str = "rill_table_recovery_records_total";
const TABLE_REMAINING: &str = "rill_table_recovery_remaining_records";

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

const DESCRIPTIONS: [(&str, Kind, &str); 14] = [
    (EVENTS_IN, Kind::Counter, "Records handed to an agent, by source topic."),
    (EVENTS_OUT, Kind::Counter, "Values an agent yielded, by source topic."),
    (
        AGENT_ERRORS,
        Kind::Counter,
        "Times an agent raised an error or panicked, by the topic of the event it held.",
    ),
    (
        DECODE_ERRORS,
        Kind::Counter,
        "Messages an agent could not read (bad input), by topic.",
    ),
    (
        DEAD_LETTER_ERRORS,
        Kind::Counter,
        "Dead-letter copies that could not be written whole (too large, or refused for good): a truncated copy went instead, or none.",
    ),
    (
        PROCESS_SECONDS,
        Kind::Histogram,
        "Time an agent takes per event: the mean over each batch of events it reads without waiting.",
    ),
    (
        COMMIT_SECONDS,
        Kind::Histogram,
        "Time a commit takes: flushing outputs and table changes, then committing offsets.",
    ),
    (
        CONSUMER_LAG,
        Kind::Gauge,
        "Records of an assigned partition not committed yet (end offset minus committed offset).",
    ),
    (ASSIGNED, Kind::Gauge, "Partitions assigned to this worker."),
    (REBALANCES, Kind::Counter, "Partition assignments this worker received."),
    (TABLE_KEYS, Kind::Gauge, "Keys a table holds on this worker."),
    (TABLE_RECOVERING, Kind::Gauge, "Table partitions being restored."),
    (
        TABLE_REPLAYED,
        Kind::Counter,
        "Changelog records replayed to restore table partitions.",
    ),
    (
        TABLE_REMAINING,
        Kind::Gauge,
        "Changelog records left to replay in the current restore.",
    ),
];

/// Upper bounds of the histogram buckets, in seconds (10 µs to 10 s).
const BUCKETS: [f64; 13] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's metrics recorder, once. Handles made
/// before it is installed count nothing, so a worker that serves the web installs it before it
/// makes any. `None` when the program installed a recorder of its own (rill's metrics then go
/// to that one).
pub(crate) fn install() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(&BUCKETS).ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::info!(error = %e, "another metrics recorder is installed; GET /metrics serves nothing");
                    None
                }
            }
        })
        .as_ref()
}

/// The recorder [`install`] installed, if it did.
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS.get().and_then(Option::as_ref)
}

fn describe() {
    for (name, kind, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

fn labels(app: &str, pairs: &[(&'static str, &str)]) -> Vec<Label> {
    std::iter::once(Label::new("app", app.to_owned()))
        .chain(pairs.iter().map(|(k, v)| Label::new(*k, (*v).to_owned())))
        .collect()
}

/// The counter of values `agent` yields.
pub(crate) fn events_out(app: &str, agent: &str, topic: &str) -> Counter {
    metrics::counter!(
        EVENTS_OUT,
        labels(app, &[("agent", agent), ("topic", topic)])
    )
}

/// Counts an error (or panic) of `agent` while it held an event of `topic`.
pub(crate) fn agent_error(app: &str, agent: &str, topic: &str) {
    metrics::counter!(
        AGENT_ERRORS,
        labels(app, &[("agent", agent), ("topic", topic)])
    )
    .increment(1);
}

/// Counts a message of `topic` that an agent could not read (bad input).
pub(crate) fn decode_error(app: &str, topic: &str) {
    metrics::counter!(DECODE_ERRORS, labels(app, &[("topic", topic)])).increment(1);
}

/// Counts a dead-letter copy of `agent` that could not be written whole.
pub(crate) fn dead_letter_error(app: &str, agent: &str) {
    metrics::counter!(DEAD_LETTER_ERRORS, labels(app, &[("agent", agent)])).increment(1);
}

/// The histogram of an agent's processing time per event.
pub(crate) fn process_seconds(app: &str, agent: &str) -> Histogram {
    metrics::histogram!(PROCESS_SECONDS, labels(app, &[("agent", agent)]))
}

/// Progress of a table restore: `replayed` more records applied, `remaining` left.
pub(crate) fn recovery_progress(app: &str, table: &str, replayed: u64, remaining: u64) {
    let l = labels(app, &[("table", table)]);
    metrics::counter!(TABLE_REPLAYED, l.clone()).increment(replayed);
    metrics::gauge!(TABLE_REMAINING, l).set(remaining as f64);
}

fn lag_gauge(app: &str, tp: &TopicPartition) -> Gauge {
    let partition = tp.partition.to_string();
    metrics::gauge!(
        CONSUMER_LAG,
        labels(app, &[("topic", &tp.topic), ("partition", &partition)])
    )
}

/// Lag of Kafka consumer groups' partitions, from librdkafka's statistics, by group (the app
/// id) and partition.
static KAFKA_LAG: Mutex<BTreeMap<(String, TopicPartition), i64>> = Mutex::new(BTreeMap::new());

/// Records the lag librdkafka's statistics report for a partition of `group`'s consumer.
#[cfg(feature = "kafka")]
pub(crate) fn kafka_lag(group: &str, tp: TopicPartition, lag: i64) {
    lag_gauge(group, &tp).set(lag as f64);
    lock(&KAFKA_LAG).insert((group.to_owned(), tp), lag);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a worker stands, as `GET /health` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Started, waiting for its first partitions.
    Starting,
    /// Running with its partitions.
    Running,
    /// Partitions were revoked and the new assignment has not come yet.
    Rebalancing,
    /// Draining and committing before it exits.
    Stopping,
}

impl Health {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Running => "running",
            Health::Rebalancing => "rebalancing",
            Health::Stopping => "stopping",
        }
    }
}

/// What an agent is, for the `agents` command and the status page.
#[derive(Debug, Clone)]
pub(crate) struct AgentInfo {
    pub(crate) name: String,
    /// The topics it reads (none when it reads a channel).
    pub(crate) topics: Vec<String>,
    /// The channel it reads, if it reads one.
    pub(crate) channel: Option<String>,
    pub(crate) concurrency: usize,
    pub(crate) sinks: Vec<String>,
}

impl AgentInfo {
    /// The columns of [`row`](AgentInfo::row).
    pub(crate) const COLUMNS: [&'static str; 4] = ["agent", "source", "concurrency", "sinks"];

    /// Its source as one line: the topics, or the channel.
    pub(crate) fn source(&self) -> String {
        match &self.channel {
            Some(c) => format!("channel {c}"),
            None => self.topics.join(", "),
        }
    }

    /// Name, source, concurrency and sinks, as the `agents` command and the status page show
    /// them.
    pub(crate) fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.source(),
            self.concurrency.to_string(),
            list(&self.sinks),
        ]
    }
}

/// Items separated by commas, or `-` when there are none.
pub(crate) fn list<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records handed to one agent from one topic: the exported counter and the agent's total for
/// the status page. Counted once per run of records, not per record.
#[derive(Debug, Clone)]
pub(crate) struct EventsIn {
    metric: Counter,
    total: Arc<AtomicU64>,
}

impl EventsIn {
    pub(crate) fn add(&self, n: u64) {
        self.metric.increment(n);
        self.total.fetch_add(n, Ordering::Relaxed);
    }
}

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const REBALANCING: u8 = 2;

/// How many one-second samples of each agent's throughput and lag the status page charts:
/// the last five minutes.
pub(crate) const HISTORY: usize = 300;

/// One sample of an agent: records handed to it per second, and the records of the
/// partitions it reads not committed yet (unknown before the first lag reading).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    pub(crate) rate: f64,
    pub(crate) lag: Option<i64>,
}

/// What the status page shows of an agent.
#[derive(Debug, Clone)]
pub(crate) struct AgentStatus {
    pub(crate) info: AgentInfo,
    /// Records handed to it from its sources (the topics it was declared with).
    pub(crate) events: u64,
    /// Its samples, oldest first, one a second, at most [`HISTORY`].
    pub(crate) history: Vec<Point>,
}

/// An agent, as the worker counts it.
#[derive(Debug)]
struct AgentOps {
    info: AgentInfo,
    /// Records handed to it from its sources.
    total: Arc<AtomicU64>,
    /// The topics it reads besides its sources (the repartition topic of a `group_by`): their
    /// lag is its lag, their records are not counted again as events in.
    internal: BTreeSet<String>,
    /// `total` at the last sample.
    sampled: u64,
    history: std::collections::VecDeque<Point>,
}

impl AgentOps {
    fn new(info: AgentInfo) -> Self {
        Self {
            info,
            total: Arc::new(AtomicU64::new(0)),
            internal: BTreeSet::new(),
            sampled: 0,
            history: std::collections::VecDeque::new(),
        }
    }

    fn reads(&self, topic: &str) -> bool {
        self.info.topics.iter().any(|t| t == topic) || self.internal.contains(topic)
    }
}

/// A worker's operational state: health, assignment, lag and throughput.
#[derive(Debug)]
pub(crate) struct Ops {
    app: Arc<str>,
    state: AtomicU8,
    /// Set when revocations do not stop the worker from running (embedded transport, or
    /// nothing to be assigned).
    steady: AtomicBool,
    agents: Mutex<Vec<AgentOps>>,
    /// The topics the worker reads as a group member.
    topics: Mutex<Vec<String>>,
    assigned: Mutex<BTreeSet<TopicPartition>>,
    lag: Mutex<BTreeMap<TopicPartition, i64>>,
    /// Records read (all agents).
    events: AtomicU64,
    rate: Mutex<Rate>,
    /// When the worker was made.
    born: Instant,
    /// When the last commit of offsets ended, and how long it took.
    last_commit: Mutex<Option<(Instant, Duration)>>,
    rebalances: Counter,
    assigned_gauge: Gauge,
    commit_seconds: Histogram,
}

#[derive(Debug)]
struct Rate {
    at: Instant,
    events: u64,
    per_second: f64,
}

/// How long a throughput sample spans at least.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(1);

impl Ops {
    pub(crate) fn new(app: Arc<str>) -> Self {
        let l = labels(&app, &[]);
        Self {
            rebalances: metrics::counter!(REBALANCES, l.clone()),
            assigned_gauge: metrics::gauge!(ASSIGNED, l.clone()),
            commit_seconds: metrics::histogram!(COMMIT_SECONDS, l),
            app,
            state: AtomicU8::new(STARTING),
            steady: AtomicBool::new(false),
            agents: Mutex::new(Vec::new()),
            topics: Mutex::new(Vec::new()),
            assigned: Mutex::new(BTreeSet::new()),
            lag: Mutex::new(BTreeMap::new()),
            events: AtomicU64::new(0),
            rate: Mutex::new(Rate {
                at: Instant::now(),
                events: 0,
                per_second: 0.0,
            }),
            born: Instant::now(),
            last_commit: Mutex::new(None),
        }
    }

    /// The agents the worker runs (before their records are counted).
    pub(crate) fn set_agents(&self, agents: Vec<AgentInfo>) {
        *lock(&self.agents) = agents.into_iter().map(AgentOps::new).collect();
    }

    /// The worker has started. `steady`: it runs whatever it is assigned (embedded transport,
    /// or no topic to be assigned); else it runs once it has partitions.
    pub(crate) fn started(&self, steady: bool) {
        self.steady.store(steady, Ordering::Relaxed);
        if steady {
            self.state.store(RUNNING, Ordering::Relaxed);
        }
    }

    /// The counter of records handed to `agent` from `topic`. Records of a topic the agent
    /// was not declared with (its `group_by`'s repartition topic) are exported, but not added
    /// to the agent's events in, which already counted them once from the source.
    pub(crate) fn events_in(&self, agent: &str, topic: &str) -> EventsIn {
        let total = {
            let mut agents = lock(&self.agents);
            let index = match agents.iter().position(|a| a.info.name == agent) {
                Some(i) => i,
                None => {
                    // An agent the worker was not started with.
                    agents.push(AgentOps::new(AgentInfo {
                        name: agent.to_owned(),
                        topics: vec![topic.to_owned()],
                        channel: None,
                        concurrency: 1,
                        sinks: Vec::new(),
                    }));
                    agents.len() - 1
                }
            };
            let a = &mut agents[index];
            if a.info.topics.iter().any(|t| t == topic) {
                a.total.clone()
            } else {
                a.internal.insert(topic.to_owned());
                Arc::new(AtomicU64::new(0))
            }
        };
        EventsIn {
            metric: metrics::counter!(
                EVENTS_IN,
                labels(&self.app, &[("agent", agent), ("topic", topic)])
            ),
            total,
        }
    }

    /// The dispatcher read `n` records.
    pub(crate) fn read(&self, n: u64) {
        self.events.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set_topics(&self, topics: &[String]) {
        *lock(&self.topics) = topics.to_vec();
    }

    /// The topics the worker reads as a group member (agents' sources and internal topics).
    pub(crate) fn topics(&self) -> Vec<String> {
        lock(&self.topics).clone()
    }

    pub(crate) fn assigned(&self, tps: &[TopicPartition]) {
        let n = {
            let mut a = lock(&self.assigned);
            a.extend(tps.iter().cloned());
            a.len()
        };
        self.assigned_gauge.set(n as f64);
        self.rebalances.increment(1);
        self.state.store(RUNNING, Ordering::Relaxed);
    }

    /// A rebalance ended without giving this worker partitions: it runs, with nothing to do.
    pub(crate) fn settled(&self) {
        self.state.store(RUNNING, Ordering::Relaxed);
    }

    pub(crate) fn revoked(&self, tps: &[TopicPartition]) {
        let n = {
            let mut a = lock(&self.assigned);
            for tp in tps {
                a.remove(tp);
            }
            a.len()
        };
        lock(&self.lag).retain(|tp, _| !tps.contains(tp));
        self.assigned_gauge.set(n as f64);
        if !self.steady.load(Ordering::Relaxed) {
            self.state.store(REBALANCING, Ordering::Relaxed);
        }
    }

    pub(crate) fn committed(&self, took: Duration) {
        self.commit_seconds.record(took);
        *lock(&self.last_commit) = Some((Instant::now(), took));
    }

    /// How long ago the last commit of offsets ended, and how long it took.
    pub(crate) fn last_commit(&self) -> Option<(Duration, Duration)> {
        lock(&self.last_commit).map(|(at, took)| (at.elapsed(), took))
    }

    /// How long the worker has been up.
    pub(crate) fn uptime(&self) -> Duration {
        self.born.elapsed()
    }

    pub(crate) fn health(&self, stopping: bool) -> Health {
        if stopping {
            return Health::Stopping;
        }
        match self.state.load(Ordering::Relaxed) {
            RUNNING => Health::Running,
            REBALANCING => Health::Rebalancing,
            _ => Health::Starting,
        }
    }

    /// The assigned partitions with their lag, where known.
    pub(crate) fn partitions(&self) -> Vec<(TopicPartition, Option<i64>)> {
        let lag = lock(&self.lag);
        lock(&self.assigned)
            .iter()
            .map(|tp| (tp.clone(), lag.get(tp).copied()))
            .collect()
    }

    /// Each agent with its events in and its samples of the last minutes.
    pub(crate) fn agent_status(&self) -> Vec<AgentStatus> {
        lock(&self.agents)
            .iter()
            .map(|a| AgentStatus {
                info: a.info.clone(),
                events: a.total.load(Ordering::Relaxed),
                history: a.history.iter().copied().collect(),
            })
            .collect()
    }

    /// Records read per second over the last sample (at least a second long).
    pub(crate) fn events_per_second(&self) -> f64 {
        lock(&self.rate).per_second
    }

    /// Takes a throughput sample when the last one is at least [`RATE_WINDOW`] old: the
    /// seconds since it, else `None`.
    fn sample_rate(&self) -> Option<f64> {
        let events = self.events.load(Ordering::Relaxed);
        let mut r = lock(&self.rate);
        let elapsed = r.at.elapsed();
        if elapsed < RATE_WINDOW {
            return None;
        }
        let seconds = elapsed.as_secs_f64();
        r.per_second = events.saturating_sub(r.events) as f64 / seconds;
        r.at = Instant::now();
        r.events = events;
        Some(seconds)
    }

    /// Adds a sample to each agent's history: its rate over the last `seconds`, and the lag
    /// of the assigned partitions of the topics it reads.
    fn sample_agents(&self, seconds: f64, lag: &BTreeMap<TopicPartition, i64>) {
        let assigned = lock(&self.assigned);
        for a in lock(&self.agents).iter_mut() {
            let total = a.total.load(Ordering::Relaxed);
            let rate = total.saturating_sub(a.sampled) as f64 / seconds;
            a.sampled = total;
            let mut known = false;
            let mut sum = 0;
            for tp in assigned.iter().filter(|tp| a.reads(&tp.topic)) {
                if let Some(l) = lag.get(tp) {
                    known = true;
                    sum += l;
                }
            }
            if a.history.len() == HISTORY {
                a.history.pop_front();
            }
            a.history.push_back(Point {
                rate,
                lag: known.then_some(sum),
            });
        }
    }
}

/// What the gauges show of a table, as the layer that holds the tables reports it.
#[derive(Debug)]
pub(crate) struct TableSize<'a> {
    pub(crate) name: &'a str,
    /// Keys held.
    pub(crate) keys: usize,
    /// Partitions being restored.
    pub(crate) recovering: usize,
}

/// Brings the gauges and the status up to date: lag of the assigned partitions (embedded:
/// end offset minus committed offset; Kafka: librdkafka's statistics), table sizes and restore
/// state, and the throughput sample.
pub(crate) async fn refresh(
    app_id: &str,
    ops: &Ops,
    transport: &dyn Transport,
    tables: &[TableSize<'_>],
) {
    let sampled = ops.sample_rate();
    let assigned: Vec<TopicPartition> = lock(&ops.assigned).iter().cloned().collect();
    let lag = if transport.embedded() {
        embedded_lag(app_id, transport, &assigned).await
    } else {
        let known = lock(&KAFKA_LAG);
        assigned
            .iter()
            .filter_map(|tp| {
                known
                    .get(&(app_id.to_string(), tp.clone()))
                    .map(|l| (tp.clone(), *l))
            })
            .collect()
    };
    if let Some(seconds) = sampled {
        ops.sample_agents(seconds, &lag);
    }
    *lock(&ops.lag) = lag;
    for table in tables {
        let l = labels(app_id, &[("table", table.name)]);
        metrics::gauge!(TABLE_KEYS, l.clone()).set(table.keys as f64);
        metrics::gauge!(TABLE_RECOVERING, l).set(table.recovering as f64);
    }
}

async fn embedded_lag(
    app_id: &str,
    transport: &dyn Transport,
    assigned: &[TopicPartition],
) -> BTreeMap<TopicPartition, i64> {
    let mut lag = BTreeMap::new();
    let Ok(committed) = transport.committed(app_id).await else {
        return lag;
    };
    let committed: HashMap<TopicPartition, i64> = committed.into_iter().collect();
    let topics: BTreeSet<&str> = assigned.iter().map(|tp| &*tp.topic).collect();
    for topic in topics {
        let Ok(ends) = transport.end_offsets(topic).await else {
            continue;
        };
        for tp in assigned.iter().filter(|tp| &*tp.topic == topic) {
            let end = ends.get(tp.partition as usize).copied().unwrap_or(0);
            let n = (end - committed.get(tp).copied().unwrap_or(0)).max(0);
            lag_gauge(app_id, tp).set(n as f64);
            lag.insert(tp.clone(), n);
        }
    }
    lag
}

/// Events an agent reads in a row before their mean processing time is recorded.
const BATCH: u32 = 128;

/// An agent's input, timed: the time between handing out an event and being asked for the next
/// one is the time the agent spent on it. Recorded once per batch of events read without
/// waiting (at most [`BATCH`]), as the batch's mean, so the clock is read once per batch.
pub(crate) struct Timed<S> {
    inner: S,
    histogram: Histogram,
    /// When the current batch's first event was handed out.
    since: Option<Instant>,
    /// Events of the current batch finished.
    done: u32,
}

impl<S> Timed<S> {
    pub(crate) fn new(inner: S, histogram: Histogram) -> Self {
        Self {
            inner,
            histogram,
            since: None,
            done: 0,
        }
    }

    fn record(&mut self, now: Instant) {
        if let Some(since) = self.since {
            if self.done > 0 {
                let mean = now.duration_since(since) / self.done;
                self.histogram.record(mean);
            }
        }
        self.done = 0;
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Timed<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_next(cx);
        let busy = this.since.is_some();
        if busy {
            // Asked for the next event: the previous one is done.
            this.done += 1;
        }
        match &poll {
            Poll::Ready(Some(_)) if !busy => this.since = Some(Instant::now()),
            Poll::Ready(Some(_)) if this.done >= BATCH => {
                let now = Instant::now();
                this.record(now);
                this.since = Some(now);
            }
            Poll::Ready(Some(_)) => {}
            Poll::Ready(None) | Poll::Pending if busy => {
                this.record(Instant::now());
                this.since = None;
            }
            Poll::Ready(None) | Poll::Pending => {}
        }
        poll
    }
}
