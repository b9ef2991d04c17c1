//! The runtime context: what the parts of a running app share (settings, the transport, the
//! topics it knows, the agents' subscriptions, the failures of outputs), and how records are
//! addressed to partitions.

use super::queue::{queue, Queue, Route};
use super::reply::Replies;
use super::state::PartitionedState;
use crate::error::{Error, Result, TransportError};
use crate::partitioner::partition_for_key;
use crate::settings::Settings;
use crate::transport::{Headers, OutgoingRecord, RecordPosition, TopicSpec, Transport};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct TopicMeta {
    name: Arc<str>,
    partitions: u32,
    round_robin: AtomicU32,
}

/// Counters a worker keeps about what went wrong.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) decode_errors: Mutex<BTreeMap<String, u64>>,
    pub(crate) agent_errors: Mutex<BTreeMap<String, u64>>,
    pub(crate) table_replayed: Mutex<BTreeMap<String, u64>>,
    /// Records each agent sent to its dead-letter topic.
    pub(crate) dead_letters: Mutex<BTreeMap<String, u64>>,
    /// The last error: when, where, and what.
    pub(crate) last_error: Mutex<Option<LastError>>,
}

/// The last error a worker met, for the status page.
#[derive(Debug, Clone)]
pub(crate) struct LastError {
    pub(crate) at: std::time::Instant,
    /// The agent, or the topic of bad input.
    pub(crate) source: String,
    pub(crate) message: String,
}

impl Stats {
    pub(crate) fn decode_error(&self, topic: &str, message: String) {
        self.error(format!("bad input in {topic}"), message);
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

    pub(crate) fn agent_error(&self, agent: &str, message: String) -> u64 {
        self.error(format!("agent {agent}"), message);
        let mut m = self.agent_errors.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(agent.to_owned()).or_default();
        *n += 1;
        *n
    }

    /// Counts a record `agent` wrote to its dead-letter topic.
    pub(crate) fn dead_lettered(&self, agent: &str) {
        *self
            .dead_letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent.to_owned())
            .or_default() += 1;
    }

    fn error(&self, source: String, message: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastError {
            at: std::time::Instant::now(),
            source,
            message,
        });
    }

    /// A copy of a counter map.
    pub(crate) fn read(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
        map.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
    pub(crate) tables: Vec<Arc<dyn PartitionedState>>,
    /// This worker's id among the app's workers.
    pub(crate) instance: String,
    /// The app's workers, from the membership topic.
    pub(crate) members: super::membership::Members,
    /// `http://host:port` of this worker's web server, once it listens.
    web: Mutex<Option<String>>,
    /// Whether this worker reads and publishes to the membership topic.
    pub(crate) membership: std::sync::atomic::AtomicBool,
    /// Whether this worker is the app's leader (it runs the `on_leader` timers).
    pub(crate) leadership: crate::engine::leader::Leadership,
    /// Holds the actors between two events while a commit takes its offsets.
    pub(crate) barrier: crate::engine::ack::Barrier,
    /// Told when an agent takes a chunk from its queue (room for chunks held back).
    pub(crate) room: tokio::sync::Notify,
    /// The first output of a processed event that could not be written (see
    /// [`Runtime::output_failed`]); taken by the dispatcher.
    failure: Mutex<Option<Failure>>,
    pub(super) failed: tokio::sync::Notify,
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
    /// Whether the worker serves (`GET /ready`, [`Worker::is_ready`](crate::Worker::is_ready)):
    /// it runs with its partitions and no table partition of it is being restored; if not,
    /// why, as JSON.
    pub(crate) fn readiness(&self) -> std::result::Result<(), serde_json::Value> {
        let health = self.ops.health(self.stop.is_cancelled());
        if health != crate::metrics::Health::Running {
            return Err(serde_json::json!({ "status": health.as_str() }));
        }
        let restoring: serde_json::Map<String, serde_json::Value> = self
            .tables
            .iter()
            .filter_map(|t| {
                let partitions = t.restoring();
                (!partitions.is_empty())
                    .then(|| (t.name().to_owned(), serde_json::json!(partitions)))
            })
            .collect();
        if restoring.is_empty() {
            Ok(())
        } else {
            Err(serde_json::json!({ "status": "restoring", "tables": restoring }))
        }
    }

    pub(crate) fn new(
        app_id: Arc<str>,
        settings: Settings,
        transport: Arc<dyn Transport>,
        control: mpsc::Sender<Control>,
        tables: Vec<Arc<dyn PartitionedState>>,
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
    pub(super) fn abort_actors(&self) {
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
            retention: Default::default(),
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
            retention: Default::default(),
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
