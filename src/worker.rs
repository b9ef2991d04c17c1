//! A running app: the dispatcher that feeds agents and commits offsets, the reply consumer,
//! and the [`Worker`] handle that stops them.

use crate::ack::{AckGuard, PartitionTracker};
use crate::app::AppCore;
use crate::error::{Error, Result, TransportError};
use crate::partitioner::partition_for_key;
use crate::reply::{Replies, CORRELATION_ID};
use crate::settings::Settings;
use crate::stream::{queue, Chunk, Delivery, Queue, Route};
use crate::table::TableRunner;
use crate::transport::{
    Consumer, ConsumerEvent, Headers, Message, OutgoingRecord, RecordPosition, TopicPartition,
    TopicSpec, Transport,
};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct TopicMeta {
    name: Arc<str>,
    partitions: u32,
    round_robin: AtomicU32,
}

/// Counters a worker keeps about what went wrong.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    decode_errors: Mutex<BTreeMap<String, u64>>,
    agent_errors: Mutex<BTreeMap<String, u64>>,
    table_replayed: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub(crate) fn decode_error(&self, topic: &str) {
        *self
            .decode_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(topic.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn table_replayed(&self, table: &str, records: u64) {
        *self
            .table_replayed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(table.to_owned())
            .or_default() += records;
    }

    pub(crate) fn agent_error(&self, agent: &str) -> u64 {
        let mut m = self.agent_errors.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(agent.to_owned()).or_default();
        *n += 1;
        *n
    }
}

pub(crate) enum Control {
    Subscribe {
        agent: String,
        topic: String,
        route: Route,
        done: oneshot::Sender<Result<(), TransportError>>,
    },
}

/// What the parts of a running app share.
pub(crate) struct Runtime {
    pub(crate) app_id: Arc<str>,
    pub(crate) settings: Settings,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) replies: Replies,
    /// Where agents send the answers to this worker's asks: `<app id>-reply-<worker_id>`, kept
    /// for the next run of the same worker, or, without a worker id, one of this run's own,
    /// deleted when it stops (see [`reply_topic`]).
    pub(crate) reply_topic: String,
    /// Whether [`reply_topic`](Runtime::reply_topic) is this run's own, to delete at the end.
    pub(crate) reply_topic_temporary: bool,
    pub(crate) stats: Stats,
    /// Health, assignment, lag and throughput, for `/health`, `/metrics` and the status page.
    pub(crate) ops: crate::metrics::Ops,
    /// Cancelled when the worker starts to stop: no more events are read.
    pub(crate) stop: CancellationToken,
    topics: RwLock<HashMap<String, Arc<TopicMeta>>>,
    control: mpsc::Sender<Control>,
    queues: tokio::sync::Mutex<HashMap<(String, String), Queue>>,
    actors: Mutex<Vec<tokio::task::AbortHandle>>,
    /// The app's tables, attached to this worker.
    pub(crate) tables: Vec<Arc<dyn TableRunner>>,
    /// This worker's id among the app's workers.
    pub(crate) instance: String,
    /// The app's workers, from the membership topic.
    pub(crate) members: crate::web::Members,
    /// `http://host:port` of this worker's web server, once it listens.
    web: Mutex<Option<String>>,
    /// Whether this worker reads and publishes to the membership topic.
    pub(crate) membership: std::sync::atomic::AtomicBool,
    /// The timers, crontabs and tasks this worker runs.
    pub(crate) timers: crate::timer::Running,
    /// Whether this worker is the app's leader (it runs the `on_leader` timers).
    pub(crate) leadership: crate::timer::Leadership,
    /// Holds the actors between two events while a commit takes its offsets.
    pub(crate) barrier: crate::ack::Barrier,
    /// Told when an agent takes a chunk from its queue (room for chunks held back).
    pub(crate) room: tokio::sync::Notify,
    /// The first output of a processed event that could not be written (see
    /// [`Runtime::output_failed`]); taken by the dispatcher.
    failure: Mutex<Option<Failure>>,
    failed: tokio::sync::Notify,
    /// Why the worker stopped by itself, if it did.
    pub(crate) fatal: Mutex<Option<String>>,
}

/// An output that could not be written: the event it came from must not be committed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    /// Writing it again cannot succeed (see [`TransportError::is_permanent`]).
    pub(crate) permanent: bool,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("app_id", &self.app_id)
            .field("transport", &self.transport.kind())
            .finish()
    }
}

impl Runtime {
    pub(crate) fn new(
        app_id: Arc<str>,
        settings: Settings,
        transport: Arc<dyn Transport>,
        control: mpsc::Sender<Control>,
        tables: Vec<Arc<dyn TableRunner>>,
    ) -> Self {
        let instance = random_id();
        let (reply_topic, reply_topic_temporary) =
            reply_topic(&app_id, settings.worker_id.as_deref(), instance);
        Self {
            reply_topic,
            reply_topic_temporary,
            replies: Replies::new(format!("{instance:016x}")),
            ops: crate::metrics::Ops::new(app_id.clone()),
            app_id,
            settings,
            transport,
            stats: Stats::default(),
            stop: CancellationToken::new(),
            topics: RwLock::new(HashMap::new()),
            control,
            queues: tokio::sync::Mutex::new(HashMap::new()),
            actors: Mutex::new(Vec::new()),
            tables,
            instance: format!("{instance:016x}"),
            members: Default::default(),
            web: Mutex::new(None),
            membership: Default::default(),
            timers: Default::default(),
            leadership: Default::default(),
            barrier: Default::default(),
            room: tokio::sync::Notify::new(),
            failure: Mutex::new(None),
            failed: tokio::sync::Notify::new(),
            fatal: Mutex::new(None),
        }
    }

    /// Records that an output of the event an actor is processing (a sink's record, a
    /// forward to an internal topic, a reply, a dead-letter copy) could not be written. Called
    /// before that event is acked, so no commit covers it: the dispatcher rolls back to the
    /// last commit (the events are processed again; with exactly-once, the transaction is
    /// aborted) or, when writing it again cannot succeed, stops the worker.
    pub(crate) fn output_failed(&self, what: &str, error: &TransportError) {
        let failure = Failure {
            reason: format!("{what}: {error}"),
            permanent: error.is_permanent(),
        };
        {
            let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(f) if f.permanent || !failure.permanent => {}
                _ => *slot = Some(failure),
            }
        }
        self.failed.notify_one();
    }

    /// As [`output_failed`](Runtime::output_failed), for any error: a transport error is a
    /// failed output; other errors (an encoding error, say) are the event's own and only
    /// logged by the caller. Returns whether it was a transport error.
    pub(crate) fn output_error(&self, what: &str, error: &Error) -> bool {
        match error {
            Error::Transport(e) => {
                self.output_failed(what, e);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn take_failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(crate) fn set_web(&self, url: String) {
        *self.web.lock().unwrap_or_else(|e| e.into_inner()) = Some(url);
    }

    pub(crate) fn web(&self) -> Option<String> {
        self.web.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Creates a topic if it is missing, and remembers its partition count.
    pub(crate) async fn ensure_topic(&self, spec: &TopicSpec) -> Result<u32> {
        let partitions = self.transport.ensure_topic(spec.clone()).await?;
        self.remember(&spec.name, partitions);
        Ok(partitions)
    }

    pub(crate) fn track_actor(&self, handle: tokio::task::AbortHandle) {
        self.actors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// Stops every actor where it is.
    fn abort_actors(&self) {
        for a in self
            .actors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            a.abort();
        }
    }

    /// Creates an internal topic of the app (a worker's reply topic, the leader topic, a
    /// dead-letter topic) with one partition if it is missing. Any partition count serves
    /// (brokers that only auto-create topics give them their default count).
    pub(crate) async fn ensure_internal_topic(&self, name: &str) -> Result<u32> {
        let spec = TopicSpec {
            name: name.to_owned(),
            partitions: 1,
            replication_factor: self.settings.topic_replication_factor,
            compacted: false,
        };
        match self.ensure_topic(&spec).await {
            Err(Error::Transport(TransportError::PartitionMismatch { actual, .. })) => {
                self.remember(name, actual);
                Ok(actual)
            }
            other => other,
        }
    }

    fn remember(&self, name: &str, partitions: u32) -> Arc<TopicMeta> {
        let meta = Arc::new(TopicMeta {
            name: Arc::from(name),
            partitions,
            round_robin: AtomicU32::new(0),
        });
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_insert(meta)
            .clone()
    }

    /// The partition count and round-robin cursor of a topic; `spec` (built only when the
    /// topic is not known yet) creates it when missing.
    async fn topic_meta(
        &self,
        name: &str,
        spec: impl FnOnce() -> TopicSpec,
    ) -> Result<Arc<TopicMeta>> {
        if let Some(m) = self.known_topic(name) {
            return Ok(m);
        }
        let partitions = match self.transport.partition_count(name).await? {
            Some(n) => n,
            None => self.transport.ensure_topic(spec()).await?,
        };
        Ok(self.remember(name, partitions))
    }

    fn known_topic(&self, name: &str) -> Option<Arc<TopicMeta>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The partition count of `spec`'s topic, which is created when missing.
    pub(crate) async fn partitions(&self, spec: &TopicSpec) -> Result<u32> {
        Ok(self
            .topic_meta(&spec.name, || spec.clone())
            .await?
            .partitions)
    }

    /// A spec for a topic the app did not declare (a reply-to address, say).
    pub(crate) fn default_spec(&self, name: &str) -> TopicSpec {
        TopicSpec {
            name: name.to_owned(),
            partitions: self.settings.topic_partitions,
            replication_factor: self.settings.topic_replication_factor,
            compacted: false,
        }
    }

    /// The record for a topic (created when missing); see [`record_for`].
    async fn record(
        &self,
        name: &str,
        spec: impl FnOnce() -> TopicSpec,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Headers,
    ) -> Result<OutgoingRecord> {
        let meta = self.topic_meta(name, spec).await?;
        record_for(&meta, partition, key, value, headers)
    }

    /// Queues a value for a sink without waiting, when the topic is known and the transport
    /// can take it now; otherwise the value comes back, to go through
    /// [`enqueue_to`](Runtime::enqueue_to).
    pub(crate) fn try_enqueue_value(
        &self,
        name: &str,
        value: Bytes,
    ) -> std::result::Result<Result<()>, Bytes> {
        let Some(meta) = self.known_topic(name) else {
            return Err(value);
        };
        let record = match record_for(&meta, None, None, Some(value), Vec::new()) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        match self.transport.try_enqueue(record) {
            Ok(result) => Ok(result.map_err(Into::into)),
            Err(record) => Err(record.value.unwrap_or_default()),
        }
    }

    /// Sends one record and waits until the log has it.
    pub(crate) async fn produce(
        &self,
        spec: &TopicSpec,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Headers,
    ) -> Result<RecordPosition> {
        let record = self
            .record(&spec.name, || spec.clone(), partition, key, value, headers)
            .await?;
        Ok(self.transport.send(record).await?)
    }

    /// Queues one record; it is durable once the transport is flushed (before every commit).
    pub(crate) async fn enqueue(
        &self,
        spec: &TopicSpec,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Headers,
    ) -> Result<()> {
        self.enqueue_to(&spec.name, || spec.clone(), partition, key, value, headers)
            .await
    }

    /// As [`Runtime::enqueue`], building the topic's spec only if the topic is not known yet
    /// (the hot path of sinks).
    pub(crate) async fn enqueue_to(
        &self,
        name: &str,
        spec: impl FnOnce() -> TopicSpec,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Headers,
    ) -> Result<()> {
        let record = self
            .record(name, spec, partition, key, value, headers)
            .await?;
        Ok(self.transport.enqueue(record).await?)
    }

    /// The queue of an agent's internal subscription to `spec` (created on first use and
    /// shared by the agent's actors).
    pub(crate) async fn subscribe(
        &self,
        agent: &str,
        concurrency: usize,
        spec: TopicSpec,
    ) -> Result<Queue> {
        let mut queues = self.queues.lock().await;
        let key = (agent.to_owned(), spec.name.clone());
        if let Some(rx) = queues.get(&key) {
            return Ok(rx.clone());
        }
        self.ensure_topic(&spec).await?;
        let (route, rx) = queue(concurrency, self.settings.stream_buffer_maxsize);
        let (done_tx, done_rx) = oneshot::channel();
        let shutting_down = || Error::ShuttingDown {
            app: self.app_id.to_string(),
        };
        self.control
            .send(Control::Subscribe {
                agent: agent.to_owned(),
                topic: spec.name.clone(),
                route,
                done: done_tx,
            })
            .await
            .map_err(|_| shutting_down())?;
        done_rx.await.map_err(|_| shutting_down())??;
        queues.insert(key, rx.clone());
        Ok(rx)
    }
}

/// The record for a topic: the partition is `partition` if given, else the one Kafka's Java
/// client picks for the key (murmur2), else the next one round-robin.
fn record_for(
    meta: &TopicMeta,
    partition: Option<u32>,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Headers,
) -> Result<OutgoingRecord> {
    let partition = match (partition, &key) {
        (Some(p), _) if p >= meta.partitions => {
            return Err(TransportError::UnknownPartition {
                topic: meta.name.to_string(),
                partition: p,
                partitions: meta.partitions,
            }
            .into())
        }
        (Some(p), _) => p,
        (None, Some(k)) => partition_for_key(k, meta.partitions),
        (None, None) => meta.round_robin.fetch_add(1, Ordering::Relaxed) % meta.partitions,
    };
    Ok(OutgoingRecord {
        topic: meta.name.clone(),
        partition,
        key,
        value,
        headers,
        timestamp: None,
    })
}

/// The reply topic of a worker (see [`Runtime::reply_topic`]), and whether it is temporary.
/// Every `send` or command run on Kafka is a worker of its own: with a topic per run kept for
/// ever, a shared cluster would fill with them.
fn reply_topic(app_id: &str, worker_id: Option<&str>, instance: u64) -> (String, bool) {
    match worker_id {
        Some(id) => {
            // Kafka topic names take letters, digits, `.`, `_` and `-`.
            let id: String = id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            (format!("{app_id}-reply-{id}"), false)
        }
        None => (format!("{app_id}-reply-{instance:016x}"), true),
    }
}

pub(crate) fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Reads the app's topics as a member of its consumer group, hands each record to the agents
/// reading that topic, and commits what they have processed.
pub(crate) struct Dispatcher {
    rt: Arc<Runtime>,
    consumer: Box<dyn Consumer>,
    routes: Vec<Route>,
    /// Indices into `routes` of the agents reading each topic.
    topics: HashMap<Arc<str>, Vec<usize>>,
    /// The counters of records handed out, per topic (in the order of `topics`).
    events_in: HashMap<Arc<str>, Vec<crate::metrics::EventsIn>>,
    trackers: HashMap<TopicPartition, Arc<PartitionTracker>>,
    committed: HashMap<TopicPartition, i64>,
    /// Partitions the group gave this worker.
    assigned: HashSet<TopicPartition>,
    /// Table partitions this worker holds (partition numbers of `assigned`).
    owned: BTreeSet<u32>,
    control: mpsc::Receiver<Control>,
    actors: TaskTracker,
    /// Set when a commit failed in a way that must not be retried (an aborted transaction,
    /// records that could not be delivered): nothing is committed, and the table partitions
    /// are dropped, until the group has assigned partitions again from the last commit.
    rolling_back: bool,
    /// Set once the partitions were revoked after a roll back began: the next assignment is
    /// the one from the last commit, and ends it (an assignment already on its way when the
    /// roll back began does not).
    rolled_back: bool,
    /// Set when the worker stops after an error it cannot go on from: nothing more is
    /// committed.
    fatal: bool,
    /// Per route, chunks waiting for room in the agent's full queue, in order. While any
    /// waits, the consumer's partitions are paused (`held_back`): the dispatcher goes on
    /// serving commits, rebalances and subscriptions instead of waiting on the queue.
    backlog: Vec<VecDeque<Chunk>>,
    held_back: bool,
}

/// How long a commit waits for the agents to finish the events they are in the middle of.
const BARRIER_WAIT: Duration = Duration::from_secs(5);

/// Lifts the barrier when dropped (on every way out of a commit).
struct Paused<'a>(Option<&'a crate::ack::Barrier>);

impl<'a> Paused<'a> {
    fn new(barrier: &'a crate::ack::Barrier) -> Self {
        Self(Some(barrier))
    }

    fn resume(&mut self) {
        if let Some(b) = self.0.take() {
            b.resume();
        }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.resume();
    }
}

/// The longest commit interval with exactly-once processing, as Kafka Streams': outputs are
/// visible to read-committed consumers only once committed.
const EXACTLY_ONCE_COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// With exactly-once processing, the next commit is at least this many times as far off as
/// the last one took...
const EXACTLY_ONCE_COMMIT_SHARE: u32 = 5;
/// ...but never further than this: a transaction must end well within the producer's
/// `transaction.timeout.ms` (10 s), or the brokers abort it and fence the producer. (A commit
/// that took 30 s while a broker restarted would otherwise put the next one 150 s off.)
const EXACTLY_ONCE_COMMIT_MAX_WAIT: Duration = Duration::from_secs(2);
/// A commit still waiting after this long says what for, and again every time as long.
const SLOW_COMMIT: Duration = Duration::from_secs(10);

impl Dispatcher {
    pub(crate) fn new(
        rt: Arc<Runtime>,
        consumer: Box<dyn Consumer>,
        routes: Vec<(String, Vec<String>, Route)>,
        control: mpsc::Receiver<Control>,
        actors: TaskTracker,
    ) -> Result<Self> {
        let mut d = Self {
            rt,
            consumer,
            routes: Vec::new(),
            topics: HashMap::new(),
            events_in: HashMap::new(),
            trackers: HashMap::new(),
            committed: HashMap::new(),
            assigned: HashSet::new(),
            owned: BTreeSet::new(),
            control,
            actors,
            rolling_back: false,
            rolled_back: false,
            fatal: false,
            backlog: Vec::new(),
            held_back: false,
        };
        for (agent, topics, route) in routes {
            d.add_route(&agent, topics, route);
        }
        d.resubscribe()?;
        Ok(d)
    }

    fn add_route(&mut self, agent: &str, topics: Vec<String>, route: Route) {
        let index = self.routes.len();
        self.routes.push(route);
        self.backlog.push(VecDeque::new());
        for t in topics {
            let topic: Arc<str> = Arc::from(t.as_str());
            self.events_in
                .entry(topic.clone())
                .or_default()
                .push(self.rt.ops.events_in(agent, &t));
            self.topics.entry(topic).or_default().push(index);
        }
    }

    /// Counts the records of `batch` handed to each agent: once per run of records of one
    /// topic, not per record.
    fn count_in(&self, batch: &[Message]) {
        self.rt.ops.read(batch.len() as u64);
        let mut rest = batch;
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .position(|m| m.topic != first.topic)
                .unwrap_or(rest.len());
            for c in self
                .events_in
                .get(&first.topic)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                c.add(n as u64);
            }
            rest = &rest[n..];
        }
    }

    fn resubscribe(&mut self) -> Result<(), TransportError> {
        let mut topics: Vec<String> = self.topics.keys().map(|t| t.to_string()).collect();
        self.rt.ops.set_topics(&topics);
        topics.extend(self.rt.leadership.topic().map(str::to_owned));
        if topics.is_empty() {
            return Ok(());
        }
        topics.sort();
        self.consumer.subscribe(&topics)
    }

    pub(crate) async fn run(mut self) {
        let mut interval = self.rt.settings.commit_interval;
        if self.exactly_once() {
            interval = interval.min(EXACTLY_ONCE_COMMIT_INTERVAL);
        }
        // The first commit comes one interval after the start (nothing is processed before).
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = self.rt.stop.cancelled() => break,
                Some(control) = self.control.recv() => self.on_control(control),
                _ = self.rt.room.notified(), if self.held_back => self.offer_backlog(),
                _ = self.rt.failed.notified() => {
                    if let Some(f) = self.rt.take_failure() {
                        self.on_failure(f).await;
                    }
                }
                _ = ticker.tick() => {
                    let started = tokio::time::Instant::now();
                    let _ = self.commit().await;
                    if self.exactly_once() {
                        // Processing stops while a transaction ends: keep that under a fifth
                        // of the time when the broker is slow to end them.
                        let took = started.elapsed();
                        let wait = (took * EXACTLY_ONCE_COMMIT_SHARE).min(EXACTLY_ONCE_COMMIT_MAX_WAIT);
                        ticker.reset_after(interval.max(wait));
                    }
                }
                event = self.consumer.poll() => match event {
                    Ok(event) => {
                        failures = 0;
                        self.on_event(event).await;
                    }
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                        tracing::warn!(error = %e, retry_in = ?wait, "consumer error; retrying");
                        tokio::time::sleep(wait).await;
                    }
                },
            }
        }
        self.drain().await;
    }

    /// Stops reading, lets the agents finish what they hold, and commits it.
    async fn drain(mut self) {
        self.retract_backlog(None);
        self.routes.clear();
        self.topics.clear();
        self.control.close();
        // Subscriptions asked for but not taken (a relay that started as the worker stopped)
        // are refused, so that their agents end instead of waiting for an answer.
        while self.control.try_recv().is_ok() {}
        self.actors.close();
        let timeout = self.rt.settings.shutdown_timeout;
        if tokio::time::timeout(timeout, self.actors.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "agents did not finish their in-flight events in time; stopping them and \
                 committing what is done"
            );
            // A stopped worker must not go on processing: after a restart its events are
            // processed again from the commit. Events dropped by the stopped actors are not
            // processed, so their acks must not count.
            for t in self.trackers.values() {
                t.freeze();
            }
            self.rt.abort_actors();
            self.actors.wait().await;
        }
        if !self.rt.tables.is_empty() {
            crate::web::publish(&self.rt, None).await;
        }
        let _ = self.commit().await;
        // Closing a Kafka consumer blocks while it leaves the group: do it off the async
        // threads.
        let consumer = self.consumer;
        self.rt.leadership.resign();
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Subscribe {
                agent,
                topic,
                route,
                done,
            } => {
                self.add_route(&agent, vec![topic], route);
                let _ = done.send(self.resubscribe());
            }
        }
    }

    async fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Messages(batch) => self.dispatch(batch).await,
            ConsumerEvent::Assigned(mut tps) => {
                self.rt.leadership.take_from(&mut tps, true);
                if tps.is_empty() {
                    if self.assigned.is_empty() {
                        tracing::info!("no partitions assigned to this worker (the group has more workers than partitions)");
                    }
                    self.rt.ops.settled();
                    return;
                }
                tracing::info!(partitions = %list(&tps), "partitions assigned");
                if self.rolling_back && std::mem::take(&mut self.rolled_back) {
                    self.rolling_back = false;
                    tracing::info!("rolled back to the last commit; processing resumes");
                }
                self.rt.ops.assigned(&tps);
                for tp in &tps {
                    self.trackers
                        .insert(tp.clone(), PartitionTracker::new(tp.clone()));
                    self.assigned.insert(tp.clone());
                }
                if self.held_back {
                    if let Err(e) = self.consumer.pause(&tps) {
                        tracing::warn!(error = %e, "cannot pause reading");
                    }
                }
                self.sync_tables().await;
            }
            ConsumerEvent::Revoked(mut tps) => {
                self.rt.leadership.take_from(&mut tps, false);
                if !tps.is_empty() {
                    self.revoke(tps).await;
                }
                // A roll back ends with the first assignment once the worker holds nothing,
                // whether the revocation came after the roll back began or the roll back began
                // in this revocation's commit.
                if self.rolling_back && self.assigned.is_empty() {
                    self.rolled_back = true;
                }
            }
            ConsumerEvent::Lost(mut tps) => {
                self.rt.leadership.take_from(&mut tps, false);
                if !tps.is_empty() {
                    self.lose(tps).await;
                }
                if self.rolling_back && self.assigned.is_empty() {
                    self.rolled_back = true;
                }
            }
            ConsumerEvent::Ended(_) => {}
        }
    }

    /// Lets `tps` go: waits (bounded) for the events in flight, commits what was processed of
    /// them, and sets their table partitions aside (dropped when rolling back).
    async fn revoke(&mut self, tps: Vec<TopicPartition>) {
        tracing::info!(partitions = %list(&tps), "partitions revoked");
        self.rt.ops.revoked(&tps);
        self.retract_backlog(Some(&tps));
        let trackers = tps
            .iter()
            .filter_map(|tp| self.trackers.get(tp).cloned())
            .collect();
        finish_in_flight(trackers, self.rt.settings.shutdown_timeout).await;
        // Read while the partitions are still this worker's: once the commit lets them
        // go, a new owner may write to their changelogs.
        let ends = changelog_ends(&self.rt).await;
        let committed = self.commit().await;
        for tp in &tps {
            self.trackers.remove(tp);
            self.committed.remove(tp);
            self.assigned.remove(tp);
        }
        if self.rolling_back || !committed {
            // Their state holds changes that were never committed (or, when the commit
            // failed, the group may have given the partitions to another worker already,
            // whose changelog writes the copy would not have): restore it from the changelog
            // when the partitions come back.
            self.drop_tables();
            crate::web::publish(&self.rt, Some(&self.owned)).await;
        } else {
            self.park_tables(ends).await;
        }
    }

    /// Lets `tps` go after the group took them without a handover (see
    /// [`ConsumerEvent::Lost`]): their new owner may be processing them already, so nothing
    /// is committed, what was processed of them since the last commit is given up (the
    /// transport threw away what it had not delivered; an exactly-once transaction is
    /// aborted), and their table partitions are dropped, to be restored from the changelog if
    /// they come back.
    async fn lose(&mut self, tps: Vec<TopicPartition>) {
        tracing::warn!(partitions = %list(&tps), "partitions lost; what was processed of them since the last commit is given up");
        self.rt.ops.revoked(&tps);
        self.retract_backlog(Some(&tps));
        let trackers = tps
            .iter()
            .filter_map(|tp| self.trackers.get(tp).cloned())
            .collect();
        // No agent may change a table partition once it is dropped.
        finish_in_flight(trackers, self.rt.settings.shutdown_timeout).await;
        for tp in &tps {
            self.trackers.remove(tp);
            self.committed.remove(tp);
            self.assigned.remove(tp);
        }
        // Outputs that failed meanwhile were thrown away with the partitions' undelivered
        // records: their events are processed again by the partitions' next owner.
        if let Some(f) = self.rt.take_failure() {
            if f.permanent {
                self.on_failure(f).await;
            } else {
                tracing::debug!(reason = %f.reason, "an output of a lost partition's event failed");
            }
        }
        if self.exactly_once() && !self.fatal {
            // The open transaction holds what was processed of them.
            if let Err(e) = self.consumer.abort().await {
                tracing::error!(error = %e, "stopping the worker");
                self.rt.stop.cancel();
            }
        }
        self.drop_tables();
        crate::web::publish(&self.rt, Some(&self.owned)).await;
    }

    /// Brings the table partitions in line with the assignment: restores those of newly
    /// assigned partitions before any of their events reach an agent (partitions set aside at
    /// the last revocation only replay the changelog written since), and drops the rest.
    async fn sync_tables(&mut self) {
        if self.rt.tables.is_empty() {
            return;
        }
        let wanted: BTreeSet<u32> = self.assigned.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self.owned.difference(&wanted).copied().collect();
        if !gone.is_empty() {
            for table in &self.rt.tables {
                table.release(&gone);
            }
        }
        let new: Vec<u32> = wanted.difference(&self.owned).copied().collect();
        for table in &self.rt.tables {
            if !new.is_empty() {
                if let Err(e) = table.recover(&new).await {
                    tracing::error!(table = table.name(), partitions = ?new, error = %e, "cannot recover table partitions");
                }
            }
            table.drop_parked();
        }
        self.owned = wanted;
        crate::web::publish(&self.rt, Some(&self.owned)).await;
    }

    /// Drops the table partitions no assigned partition needs any more, and any set aside.
    fn drop_tables(&mut self) {
        let wanted: BTreeSet<u32> = self.assigned.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self.owned.difference(&wanted).copied().collect();
        for table in &self.rt.tables {
            table.release(&gone);
            table.drop_parked();
        }
        self.owned = wanted;
    }

    fn exactly_once(&self) -> bool {
        self.rt.settings.processing_guarantee == crate::settings::ProcessingGuarantee::ExactlyOnce
    }

    /// Gives up everything since the last commit: the group is rejoined, so every partition
    /// is revoked (nothing more committed, table state dropped) and assigned again from the
    /// committed offsets, and its events are processed again.
    async fn roll_back(&mut self, why: &str) {
        if self.rolling_back {
            return;
        }
        if !self.consumer.rejoin() {
            tracing::error!(
                reason = why,
                "cannot roll back to the last commit on this transport; stopping the worker"
            );
            self.rt.stop.cancel();
            return;
        }
        tracing::error!(reason = why, "rolling back to the last commit: partitions are revoked and assigned again, and their events since that commit processed again");
        self.rolling_back = true;
        // With nothing assigned, no revocation comes before the next assignment.
        self.rolled_back = self.assigned.is_empty();
        if let Err(e) = self.consumer.abort().await {
            tracing::error!(error = %e, "stopping the worker");
            self.rt.stop.cancel();
        }
    }

    /// Sets aside the table partitions no assigned partition needs any more (just committed),
    /// with the changelog ends read before the commit.
    async fn park_tables(&mut self, ends: Vec<Option<Vec<i64>>>) {
        if self.rt.tables.is_empty() {
            return;
        }
        let wanted: BTreeSet<u32> = self.assigned.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self.owned.difference(&wanted).copied().collect();
        if gone.is_empty() {
            return;
        }
        for (table, ends) in self.rt.tables.iter().zip(ends) {
            let parked = match &ends {
                Some(ends) => table.park(&gone, ends).await,
                None => Err(Error::Store("no changelog end offsets".into())),
            };
            if let Err(e) = parked {
                tracing::warn!(table = table.name(), error = %e, "cannot set revoked table partitions aside; they will be restored in full");
                table.release(&gone);
            }
        }
        self.owned = wanted;
        crate::web::publish(&self.rt, Some(&self.owned)).await;
    }

    async fn dispatch(&mut self, batch: Vec<Message>) {
        self.count_in(&batch);
        let mut pending: Vec<Chunk> = self.routes.iter().map(|_| Vec::new()).collect();
        let mut last: Option<Arc<PartitionTracker>> = None;
        let mut full: Vec<(usize, Chunk)> = Vec::new();
        for msg in batch {
            let tracker = match &last {
                Some(t) if *t.tp.topic == *msg.topic && t.tp.partition == msg.partition => {
                    t.clone()
                }
                _ => {
                    let tp = TopicPartition::new(msg.topic.clone(), msg.partition);
                    let t = self
                        .trackers
                        .entry(tp.clone())
                        .or_insert_with(|| PartitionTracker::new(tp))
                        .clone();
                    last = Some(t.clone());
                    t
                }
            };
            let offset = msg.offset;
            let targets = self
                .topics
                .get(&msg.topic)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            tracker.register(offset, targets.len() as u32);
            let msg = Arc::new(msg);
            for &i in targets {
                pending[i].push(Delivery {
                    msg: msg.clone(),
                    ack: AckGuard::new(tracker.clone(), offset),
                });
                if pending[i].len() >= self.routes[i].chunk {
                    full.push((i, std::mem::take(&mut pending[i])));
                }
            }
            for (i, chunk) in full.drain(..) {
                self.offer(i, chunk);
            }
        }
        for (i, chunk) in pending.into_iter().enumerate() {
            if !chunk.is_empty() {
                self.offer(i, chunk);
            }
        }
    }

    /// Hands a chunk to an agent's queue or, when the queue is full (or chunks already wait
    /// for it), keeps it in the route's backlog and pauses the consumer: a busy agent holds
    /// back what is read, never the dispatcher.
    fn offer(&mut self, i: usize, chunk: Chunk) {
        if !self.backlog[i].is_empty() {
            self.backlog[i].push_back(chunk);
            return;
        }
        match self.routes[i].tx.try_send(chunk) {
            Ok(()) => {}
            Err(async_channel::TrySendError::Full(chunk)) => {
                self.backlog[i].push_back(chunk);
                self.hold_back();
            }
            // A closed queue (the agent stopped) hands the chunk back; dropping it acks its
            // records.
            Err(async_channel::TrySendError::Closed(_)) => {}
        }
    }

    /// Offers the backlog again; resumes the consumer once it is empty.
    fn offer_backlog(&mut self) {
        for (route, backlog) in self.routes.iter().zip(self.backlog.iter_mut()) {
            while let Some(chunk) = backlog.pop_front() {
                match route.tx.try_send(chunk) {
                    Ok(()) => {}
                    Err(async_channel::TrySendError::Full(chunk)) => {
                        backlog.push_front(chunk);
                        break;
                    }
                    Err(async_channel::TrySendError::Closed(_)) => {}
                }
            }
        }
        self.release_if_empty();
    }

    /// Resumes reading once no chunk waits for a queue.
    fn release_if_empty(&mut self) {
        if self.held_back && self.backlog.iter().all(VecDeque::is_empty) {
            self.held_back = false;
            let tps: Vec<TopicPartition> = self.assigned.iter().cloned().collect();
            if let Err(e) = self.consumer.resume(&tps) {
                tracing::warn!(error = %e, "cannot resume reading");
            }
        }
    }

    /// Pauses the consumer's partitions while chunks wait for a full agent queue.
    fn hold_back(&mut self) {
        if self.held_back {
            return;
        }
        self.held_back = true;
        let tps: Vec<TopicPartition> = self.assigned.iter().cloned().collect();
        tracing::debug!(partitions = %list(&tps), "an agent's queue is full; reading paused");
        if let Err(e) = self.consumer.pause(&tps) {
            tracing::warn!(error = %e, "cannot pause reading");
        }
    }

    /// Takes the records of `tps` (all, if `None`) out of the backlog: they never reached an
    /// agent, so they are not committed and not waited for (they are read again by the next
    /// owner of their partitions, or after a restart).
    fn retract_backlog(&mut self, tps: Option<&[TopicPartition]>) {
        let mut first: HashMap<TopicPartition, i64> = HashMap::new();
        for backlog in &mut self.backlog {
            for chunk in backlog.iter_mut() {
                chunk.retain(|d| {
                    let tp = TopicPartition::new(d.msg.topic.clone(), d.msg.partition);
                    if tps.is_some_and(|tps| !tps.contains(&tp)) {
                        return true;
                    }
                    let o = first.entry(tp).or_insert(d.msg.offset);
                    *o = (*o).min(d.msg.offset);
                    false
                });
            }
            backlog.retain(|c| !c.is_empty());
        }
        for (tp, offset) in first {
            if let Some(t) = self.trackers.get(&tp) {
                t.retract_from(offset);
            }
        }
        self.release_if_empty();
    }

    /// Commits what the agents have processed. Behind the barrier (see
    /// [`crate::ack::Barrier`]), no agent is in the middle of an event while the offsets are
    /// taken and the table changes written, so both cover the same events; with exactly-once
    /// the barrier stays up until the transaction is committed. Returns whether everything
    /// processed is committed (false when it could not be, or was not meant to be).
    async fn commit(&mut self) -> bool {
        if self.fatal {
            // Nothing after the failure counts; an open transaction is aborted.
            let _ = self.consumer.abort().await;
            return false;
        }
        if self.rolling_back {
            // Nothing since the last commit counts: what was produced meanwhile is discarded
            // where the transport can (an exactly-once transaction is aborted).
            if let Err(e) = self.consumer.abort().await {
                tracing::error!(error = %e, "stopping the worker");
                self.rt.stop.cancel();
            }
            return false;
        }
        if self.consumer.assignment_lost() {
            // The partitions' new owners may be writing: the loss is handled next (`lose`).
            return false;
        }
        let exactly_once = self.exactly_once();
        let started = std::time::Instant::now();
        let rt = self.rt.clone();
        let mut barrier = Paused::new(&rt.barrier);
        if !rt.barrier.pause(BARRIER_WAIT).await && exactly_once {
            // An agent is still in the middle of an event: its effects would be in the
            // transaction and its offset not. Try again at the next commit.
            tracing::warn!(wait = ?BARRIER_WAIT, "an agent is still in the middle of an event; commit postponed");
            return false;
        }
        let mut offsets = Vec::new();
        for (tp, tracker) in &self.trackers {
            if let Some(offset) = tracker.committable() {
                if self.committed.get(tp).is_none_or(|c| *c < offset) {
                    offsets.push((tp.clone(), offset));
                }
            }
        }
        let mut flushed = Vec::with_capacity(self.rt.tables.len());
        for table in &self.rt.tables {
            match watched("the changelog writes of a table", table.flush()).await {
                Ok(f) => flushed.push(f),
                Err(e) => {
                    // The changes stay to be written at the next commit; nothing is
                    // committed before they are.
                    drop(barrier);
                    let what = format!(
                        "cannot write the changes of table {} to its changelog",
                        table.name()
                    );
                    self.write_failed(&what, &e, false).await;
                    return false;
                }
            }
        }
        if self.consumer.assignment_lost() {
            // Lost while the changes were queued: those queued after the transport threw
            // away its undelivered records must not reach the changelog either.
            self.rt.transport.discard_undelivered();
            return false;
        }
        if !exactly_once {
            // What the offsets cover is written or queued: agents may go on.
            barrier.resume();
            // Outputs of processed events must be durable before their inputs are committed.
            // (A transaction's commit flushes them itself.) Records that could not be
            // delivered are lost outputs: their events must be processed again.
            if let Err(e) = watched(
                "produced records to be delivered",
                self.rt.transport.flush(),
            )
            .await
            {
                self.write_failed("cannot deliver produced records", &e.into(), true)
                    .await;
                return false;
            }
        }
        if self.consumer.assignment_lost() {
            return false;
        }
        if let Some(f) = self.rt.take_failure() {
            drop(barrier);
            self.on_failure(f).await;
            return false;
        }
        if !exactly_once {
            // The changelog has the table changes: the local stores may have them too.
            self.persist(std::mem::take(&mut flushed));
            if offsets.is_empty() {
                return true;
            }
        }
        offsets.sort();
        let result = watched("the offsets' commit", self.consumer.commit(offsets.clone())).await;
        drop(barrier);
        match result {
            Ok(()) => {
                if exactly_once {
                    // Only now are the table changes committed in the changelog.
                    self.persist(flushed);
                }
                if !offsets.is_empty() {
                    tracing::debug!(offsets = %offsets.iter().map(|(tp, o)| format!("{tp}={o}")).collect::<Vec<_>>().join(","), "committed");
                    self.committed.extend(offsets);
                    self.rt.ops.committed(started.elapsed());
                }
                true
            }
            Err(TransportError::TransactionAborted(e)) => {
                self.roll_back(&format!("the transaction was aborted: {e}"))
                    .await;
                false
            }
            Err(e) if exactly_once => {
                tracing::error!(error = %e, "cannot commit; stopping the worker");
                self.rt.stop.cancel();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "commit failed; will retry");
                false
            }
        }
    }

    /// A commit could not write what it covers. A record that can never be written stops the
    /// worker; otherwise the worker rolls back to the last commit, except when `retry` is
    /// false and processing is at-least-once: then the next commit writes it again.
    async fn write_failed(&mut self, what: &str, error: &Error, roll_back: bool) {
        let permanent = matches!(error, Error::Transport(e) if e.is_permanent());
        if permanent {
            self.stop_fatally(format!("{what}: {error}"));
        } else if roll_back || self.exactly_once() {
            self.roll_back(&format!("{what}: {error}")).await;
        } else {
            tracing::error!(error = %error, "{what}; not committing, trying again at the next commit");
        }
    }

    /// An agent's output could not be written (see [`Runtime::output_failed`]).
    async fn on_failure(&mut self, failure: Failure) {
        if !failure.permanent && self.consumer.assignment_lost() {
            // Thrown away with the lost partitions' undelivered records (see `lose`).
            tracing::debug!(reason = %failure.reason, "an output of a lost partition's event failed");
            return;
        }
        if failure.permanent {
            self.stop_fatally(failure.reason);
        } else {
            self.roll_back(&failure.reason).await;
        }
    }

    /// Stops the worker after an error it cannot go on from: nothing more is committed, so
    /// the events since the last commit are processed again by the next worker.
    fn stop_fatally(&mut self, reason: String) {
        if self.fatal {
            return;
        }
        self.fatal = true;
        tracing::error!(
            reason = %reason,
            "stopping the worker: an output cannot be written, and skipping it would lose it; \
             nothing after the last commit is committed"
        );
        *self.rt.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.rt.stop.cancel();
    }

    /// Stores in the tables' local stores what the changelog has now.
    fn persist(&self, flushed: Vec<Vec<crate::table::Flushed>>) {
        for (table, f) in self.rt.tables.iter().zip(flushed) {
            if let Err(e) = table.persist(f) {
                tracing::error!(table = table.name(), error = %e, "cannot store table changes locally; the changelog has them");
            }
        }
    }
}

/// The changelog end offsets of each table (`None` where they cannot be read).
async fn changelog_ends(rt: &Runtime) -> Vec<Option<Vec<i64>>> {
    let mut ends = Vec::with_capacity(rt.tables.len());
    for table in &rt.tables {
        ends.push(match table.changelog_ends().await {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(table = table.name(), error = %e, "cannot read the changelog's end offsets; revoked partitions will be restored in full");
                None
            }
        });
    }
    ends
}

/// Awaits `fut`, part of a commit, warning every [`SLOW_COMMIT`] that it still waits for `what`.
async fn watched<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    let started = tokio::time::Instant::now();
    tokio::pin!(fut);
    loop {
        match tokio::time::timeout(SLOW_COMMIT, &mut fut).await {
            Ok(out) => return out,
            Err(_) => tracing::warn!(
                waited = ?started.elapsed(),
                "a commit is slow: still waiting for {what}"
            ),
        }
    }
}

/// Lets the agents finish the events they hold from revoked partitions (bounded), so the
/// worker taking the partitions over does not process them again.
async fn finish_in_flight(trackers: Vec<Arc<PartitionTracker>>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while trackers.iter().any(|t| !t.is_idle()) {
        if tokio::time::Instant::now() >= deadline {
            let tps: Vec<_> = trackers.iter().map(|t| t.tp.clone()).collect();
            tracing::warn!(
                partitions = %list(&tps),
                "revoked partitions still have events in flight; committing what is done"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn list(tps: &[TopicPartition]) -> String {
    tps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads this worker's reply topic and hands replies to whoever asked.
pub(crate) async fn run_replies(
    rt: Arc<Runtime>,
    mut consumer: Box<dyn Consumer>,
    closed: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => break,
            event = consumer.poll() => match event {
                Ok(ConsumerEvent::Messages(batch)) => {
                    for m in batch {
                        let Some(id) = m.header(CORRELATION_ID) else {
                            tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, "reply without correlation id ignored");
                            continue;
                        };
                        let id = String::from_utf8_lossy(id);
                        if !rt.replies.complete(&id, m.value.clone().unwrap_or_default()) {
                            tracing::debug!(correlation_id = %id, "reply arrived after its request gave up");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reply consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

/// A running app. Stop it with [`shutdown`](Worker::shutdown): agents finish the events they
/// hold, offsets are committed, and the app can be started again.
pub struct Worker {
    pub(crate) core: Arc<AppCore>,
    pub(crate) rt: Arc<Runtime>,
    pub(crate) dispatcher: Option<JoinHandle<()>>,
    pub(crate) replies: Option<JoinHandle<()>>,
    pub(crate) web: Option<crate::web::Web>,
    /// Reads the membership topic (see [`crate::web::membership`]).
    pub(crate) membership: Option<JoinHandle<()>>,
    pub(crate) closed: CancellationToken,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("app", &self.rt.app_id)
            .field("transport", &self.rt.transport.kind())
            .finish()
    }
}

impl Worker {
    /// The transport's kind: `memory` or `kafka`.
    pub fn transport(&self) -> &'static str {
        self.rt.transport.kind()
    }

    /// How many messages of `topic` agents could not read (bad input: undecodable, or larger
    /// than `max_payload_bytes`), skipped or sent to a dead-letter topic.
    pub fn decode_errors(&self, topic: &str) -> u64 {
        self.rt
            .stats
            .decode_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied()
            .unwrap_or(0)
    }

    /// How many times the agent `agent` raised an error or panicked.
    pub fn agent_errors(&self, agent: &str) -> u64 {
        self.rt
            .stats
            .agent_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .copied()
            .unwrap_or(0)
    }

    /// The address of the worker's web server, if it serves one (see
    /// [`Settings::web_port`](crate::Settings::web_port)).
    pub fn web_addr(&self) -> Option<std::net::SocketAddr> {
        self.web.as_ref().map(|w| w.addr)
    }

    /// Whether the worker serves: it has its partitions (on Kafka, the consumer group has
    /// given it its share), and every table partition it owns is restored. What `GET /ready`
    /// answers 200 to.
    pub fn is_ready(&self) -> bool {
        crate::web::status::readiness(&self.rt).is_ok()
    }

    /// Waits until the worker [is ready](Worker::is_ready); returns `false` if it stopped
    /// first. Bound the wait with a timeout of your own: a group that never gives this worker
    /// partitions keeps it waiting.
    pub async fn ready(&self) -> bool {
        loop {
            if self.rt.stop.is_cancelled() {
                return false;
            }
            if self.is_ready() {
                return true;
            }
            tokio::select! {
                _ = self.rt.stop.cancelled() => return false,
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }
    }

    /// The URL this worker's web server is advertised under to the app's other workers
    /// (`http://host:port`; see [`Settings::web_host`](crate::Settings::web_host)).
    pub fn web_url(&self) -> Option<String> {
        self.web.as_ref().and_then(|_| self.rt.web())
    }

    /// Whether this worker is the app's leader, the one that runs its `on_leader` timers
    /// ([`Timer::on_leader`](crate::Timer::on_leader)). Workers elect a leader only when the
    /// app declares such a timer; otherwise this is `false`.
    pub fn is_leader(&self) -> bool {
        self.rt.leadership.is_leader()
    }

    /// Completes when the worker has stopped by itself, after an error it cannot go on from
    /// (logged when it happened): with exactly-once on Kafka, a producer fenced by a newer
    /// worker with the same `worker_id`, or a transaction that can be neither committed nor
    /// aborted. Its agents no longer get events; call [`shutdown`](Worker::shutdown).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing.
    pub async fn stopped(&self) {
        self.rt.stop.cancelled().await
    }

    /// Why the worker stopped by itself, when it stopped because an output of a processed
    /// event could not be written and never could be (a record larger than the broker
    /// accepts, say): skipping it would lose it, so the worker stops uncommitted.
    pub fn fatal_error(&self) -> Option<String> {
        self.rt
            .fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many changelog records this worker replayed to restore partitions of `table`.
    pub fn table_records_replayed(&self, table: &str) -> u64 {
        self.rt
            .stats
            .table_replayed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(table)
            .copied()
            .unwrap_or(0)
    }

    /// Waits for Ctrl-C or SIGTERM (listening from the moment it is called).
    pub async fn wait_for_signal() {
        match Signals::new() {
            Ok(mut s) => s.recv().await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for signals; waiting for Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }

    /// Stops the worker: no more events are read, agents finish the events they hold (up to
    /// `shutdown_timeout`), processed offsets are committed, and pending sends are flushed.
    pub async fn shutdown(mut self) -> Result<()> {
        tracing::info!(app = %self.rt.app_id, "worker stopping");
        self.rt.stop.cancel();
        self.rt.timers.stop(self.rt.settings.shutdown_timeout).await;
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.await;
        }
        self.closed.cancel();
        if let Some(replies) = self.replies.take() {
            let _ = replies.await;
        }
        if let Some(web) = self.web.take() {
            let _ = web.server.await;
        }
        if let Some(membership) = self.membership.take() {
            let _ = membership.await;
        }
        let flushed = self.rt.transport.flush().await;
        if self.rt.reply_topic_temporary {
            let topic = &self.rt.reply_topic;
            match tokio::time::timeout(REPLY_TOPIC_DELETE, self.rt.transport.delete_topic(topic))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%topic, error = %e, "cannot delete this run's reply topic; delete it by hand")
                }
                Err(_) => {
                    tracing::warn!(%topic, "this run's reply topic was not deleted in time; delete it by hand")
                }
            }
        }
        for table in &self.rt.tables {
            table.detach();
        }
        self.core.clear_runtime(&self.rt);
        tracing::info!(app = %self.rt.app_id, "worker stopped");
        Ok(flushed?)
    }
}

/// How often [`Worker::ready`] looks.
const READY_POLL: Duration = Duration::from_millis(10);

/// How long a stopping worker waits for the deletion of its temporary reply topic.
const REPLY_TOPIC_DELETE: Duration = Duration::from_secs(10);

/// Listens for Ctrl-C (SIGINT) and SIGTERM from the moment it is created, so a signal that
/// arrives early is not lost (or fatal).
pub(crate) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Waits for the next signal.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.rt.stop.cancel();
        self.closed.cancel();
    }
}
