//! The Kafka transport, on librdkafka (through `rdkafka`).
//!
//! - One consumer per worker joins the app's consumer group. It is polled on a thread of its
//!   own, which hands batches of records and rebalances to the dispatcher through a bounded
//!   channel; rebalance callbacks only hand work over. When partitions are revoked, the
//!   callback waits (bounded) until the dispatcher has committed what was processed of them,
//!   so a graceful rebalance does not hand processed records to another worker.
//! - Assignment strategy: `range` by default. It gives partition `p` of every topic the app
//!   reads with the same partition count to the same worker (co-partitioning), which tables
//!   and joins over several topics rely on. `cooperative-sticky` (set
//!   `partition.assignment.strategy` in the Kafka settings) avoids stop-the-world rebalances but
//!   does not co-partition.
//! - The producer is shared by the worker. Records sent on behalf of agents are queued
//!   without waiting for each acknowledgement; before offsets are committed the producer is
//!   flushed, so no input is committed before its outputs are durable.
//! - rill picks partitions itself (murmur2 of the key, as Kafka's Java client), so librdkafka's
//!   own partitioner is never used.

use super::{
    Consumer, ConsumerEvent, LagReport, Message, OutgoingRecord, RecordPosition, StartAt,
    TopicPartition, TopicSpec, Transport,
};
use crate::error::TransportError;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::IntoOpaque;
use rdkafka::{ClientContext, Message as _};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long start-up waits for the brokers to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of metadata and admin requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CreateTopics request may take before the brokers are taken not to support it.
const CREATE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most records the poll thread hands over at once.
const MAX_BATCH: usize = 500;
/// How often the poll thread polls while the worker holds reading back (see
/// [`Consumer::hold_back`]): rebalances are still served within this, and a few records read.
const HELD_BACK_POLL: Duration = Duration::from_millis(50);
/// How long librdkafka waits before fetching a partition again once its prefetch queue was
/// full (`fetch.queue.backoff.ms`). Its default, 1 s, stalls a consumer that reads a backlog
/// faster than it processes it: the queue drains well within the second and the partition
/// sits idle for the rest, which capped a worker catching up (or a table recovery) at about
/// 150k records/s. Deciding again every 10 ms costs no requests: a fetch is sent only once
/// the queue is below its thresholds.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";
/// How long the poll thread waits for records before it looks at its other duties (the stop
/// flag among them: a consumer's drop waits up to this long for the thread).
const POLL_WAIT: Duration = Duration::from_millis(20);
/// How often, at most, the poll thread tells the worker how far its consumer has read (see
/// [`ConsumerEvent::Passed`]), when it has handed over everything read.
const PASSED_CHECK: Duration = Duration::from_millis(100);
/// How long a flush waits for the producer's queue to drain.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

fn err(e: impl fmt::Display) -> TransportError {
    TransportError::Other(e.to_string())
}

/// rill's own Kafka setting (not passed to librdkafka): how long, in milliseconds, a worker
/// waits after a rebalance before reading partitions that another worker may still hold (0,
/// the default, does not wait).
///
/// A Kafka coordinator completes a rebalance only once every member has rejoined, that is once
/// every member has given its partitions up (and rill has committed what was processed of
/// them). Brokers without that barrier (tansu 0.6.0 completes it as soon as the leader
/// rejoins; the others hear of it on their next heartbeat) let a worker start on a partition
/// while its previous owner still processes it, and events are processed twice. Waiting
/// `heartbeat.interval.ms` plus the time a revocation takes avoids that.
const HANDOFF_GRACE: &str = "rill.handoff.grace.ms";

/// Settings common to every client: brokers, then the user's pass-through settings.
#[derive(Clone)]
pub(crate) struct KafkaConfig {
    brokers: String,
    /// librdkafka settings.
    extra: BTreeMap<String, String>,
    /// See [`HANDOFF_GRACE`].
    handoff_grace: Duration,
    /// With exactly-once processing: the producer's transactional id.
    transactional_id: Option<String>,
    /// How long a revocation waits for the worker to commit the revoked partitions (see
    /// [`KafkaConfig::revocations_within`]).
    revoke_timeout: Duration,
    /// Told the lag librdkafka's statistics report for the group consumer's partitions.
    lag_report: Option<LagReport>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets (SASL passwords, keys): only their names are shown.
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("settings", &self.extra.keys().collect::<Vec<_>>())
            .field("handoff_grace", &self.handoff_grace)
            .field("transactional_id", &self.transactional_id)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("lag_report", &self.lag_report.is_some())
            .finish()
    }
}

impl KafkaConfig {
    /// Lets a revocation wait as long as the worker may take to hand its partitions over:
    /// `shutdown_timeout` for the agents to finish their events, plus a transaction's commit;
    /// but less than `max.poll.interval.ms`, past which the group would drop this member.
    pub(crate) fn revocations_within(mut self, shutdown_timeout: Duration) -> Self {
        let max_poll = self
            .extra
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(300), Duration::from_millis);
        let wanted = shutdown_timeout + TXN_TIMEOUT;
        self.revoke_timeout = wanted.min(max_poll.saturating_sub(Duration::from_secs(5)));
        self
    }

    /// Parses `kafka://host:port[,host:port]` and merges settings from the app and from
    /// `RILL_KAFKA_*` environment variables (`RILL_KAFKA_SASL_USERNAME` → `sasl.username`).
    pub(crate) fn from_url(
        url: &str,
        settings: &BTreeMap<String, String>,
    ) -> Result<Self, TransportError> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| TransportError::UnsupportedUrl(url.to_owned()))?;
        let hosts: Vec<&str> = rest
            .split(',')
            .map(|h| {
                h.trim()
                    .trim_start_matches("kafka://")
                    .trim_end_matches('/')
            })
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            return Err(TransportError::UnsupportedUrl(url.to_owned()));
        }
        let mut extra = settings.clone();
        for (k, v) in std::env::vars() {
            if let Some(name) = k.strip_prefix("RILL_KAFKA_") {
                extra.insert(name.to_ascii_lowercase().replace('_', "."), v);
            }
        }
        let mut handoff_grace = Duration::ZERO;
        // Settings named `rill.*` are rill's own; librdkafka would reject them.
        for (k, v) in std::mem::take(&mut extra) {
            if k == HANDOFF_GRACE {
                let ms: u64 = v.trim().parse().map_err(|_| {
                    TransportError::Other(format!(
                        "Kafka setting {HANDOFF_GRACE}: expected milliseconds, got {v:?}"
                    ))
                })?;
                handoff_grace = Duration::from_millis(ms);
            } else if k.starts_with("rill.") {
                return Err(TransportError::Other(format!(
                    "unknown Kafka setting {k:?}"
                )));
            } else {
                extra.insert(k, v);
            }
        }
        Ok(Self {
            brokers: hosts.join(","),
            extra,
            handoff_grace,
            revoke_timeout: Duration::from_secs(60),
            transactional_id: None,
            lag_report: None,
        })
    }

    /// Makes the producer transactional (exactly-once processing): what it sends between two
    /// commits is one Kafka transaction, with the consumed offsets in it.
    pub(crate) fn transactional(mut self, id: String) -> Self {
        self.transactional_id = Some(id);
        self
    }

    /// Reports the lag of the group consumer's partitions to `report` (see [`LagReport`]).
    pub(crate) fn report_lag(mut self, report: LagReport) -> Self {
        self.lag_report = Some(report);
        self
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("allow.auto.create.topics", "false")
            // A new client learns the brokers' ids from its bootstrap connection and replaces
            // it; a request sent on it meanwhile fails and waits half the reconnect backoff
            // (50 ms at librdkafka's default of 100 ms) before it is sent again. Each of a
            // worker's clients paid that at start; 10 ms (backing off exponentially up to
            // `reconnect.backoff.max.ms` while a broker is down) makes it 11 ms.
            .set("reconnect.backoff.ms", "10")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        // librdkafka's `debug` contexts log at debug level: let them through, as librdkafka
        // itself does when `debug` is set.
        if self.extra.contains_key("debug") {
            c.set_log_level(RDKafkaLogLevel::Debug);
        }
        c
    }
}

/// Routes librdkafka's logs and errors to `tracing`.
#[derive(Clone, Default)]
struct Ctx;

impl ConsumerContext for Ctx {}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Settings pass through to every client; one that only applies to consumers (or
        // producers) is expected to be ignored by the others.
        if fac == "CONFWARN" && message.contains("will be ignored by this") {
            tracing::debug!(target: "rill::kafka", fac, "{message}");
            return;
        }
        let important = !matches!(level, RDKafkaLogLevel::Debug);
        if important && !first_in_a_while(message) {
            tracing::debug!(target: "rill::kafka", fac, repeated = true, "{message}");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "rill::kafka", fac, "{message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "rill::kafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "rill::kafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "rill::kafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Mostly the same event as a log line (above): said once.
        if first_in_a_while(reason) {
            tracing::warn!(target: "rill::kafka", error = %error, "{reason}");
        } else {
            tracing::debug!(target: "rill::kafka", error = %error, repeated = true, "{reason}");
        }
    }
}

/// How long a condition librdkafka reports again and again (a broker it cannot reach: every
/// reconnection attempt of every client, and `1/1 brokers are down` after each) is logged
/// once; its repeats go to the debug level.
const REPEATS_QUIET: Duration = Duration::from_secs(60);

/// Whether `message` says something not said in the last [`REPEATS_QUIET`]. Messages are
/// compared without their thread prefix (`[thrd:main]: `; the error callback reports the same
/// event as the log line without it) and their timing suffix (`(after 0ms in state CONNECT, 1
/// identical error(s) suppressed)`).
fn first_in_a_while(message: &str) -> bool {
    static SAID: Mutex<BTreeMap<String, Instant>> = Mutex::new(BTreeMap::new());
    let message = match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map_or(message, |(_, m)| m),
        None => message,
    };
    let key = message.split(" (after ").next().unwrap_or(message);
    let now = Instant::now();
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.len() > 1_000 {
        said.retain(|_, at| now.duration_since(*at) < REPEATS_QUIET);
    }
    match said.get_mut(key) {
        Some(at) if now.duration_since(*at) < REPEATS_QUIET => false,
        Some(at) => {
            *at = now;
            true
        }
        None => {
            said.insert(key.to_owned(), now);
            true
        }
    }
}

type DeliveryTx = oneshot::Sender<Result<RecordPosition, TransportError>>;

/// Where a record's delivery report goes: to a sender waiting for it, or nowhere (records
/// queued with `enqueue`, the hot path), which needs no allocation: its pointer is null.
struct Delivery(Option<Box<DeliveryTx>>);

impl IntoOpaque for Delivery {
    fn into_ptr(self) -> *mut c_void {
        match self.0 {
            Some(tx) => Box::into_raw(tx).cast(),
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn from_ptr(ptr: *mut c_void) -> Self {
        if ptr.is_null() {
            Delivery(None)
        } else {
            // SAFETY: a non-null pointer came from `into_ptr` above, which leaked a
            // `Box<DeliveryTx>`; librdkafka hands each opaque back exactly once.
            Delivery(Some(unsafe { Box::from_raw(ptr.cast()) }))
        }
    }
}

/// Whether the broker or librdkafka refuses a record for good: sending it again gives the same
/// error (too large for `message.max.bytes`, or malformed).
fn refused(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Reports deliveries: to the sender that waits for one, and failures to the log.
struct ProducerCtx {
    failures: Arc<AtomicU64>,
    /// The last failed delivery of an enqueued record, and whether it can never succeed.
    last_failure: Arc<Mutex<Option<(String, bool)>>>,
    /// Which producer of the transport this is, and which is current: the records of a
    /// producer that was replaced (see [`replace_producer`]) belong to a transaction the
    /// brokers aborted, so their failures are not lost outputs either.
    generation: u64,
    current: Arc<AtomicU64>,
}

impl ClientContext for ProducerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        Ctx.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        Ctx.error(error, reason)
    }
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Delivery;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => Ok(RecordPosition {
                partition: m.partition() as u32,
                offset: m.offset(),
            }),
            Err((e, m)) => {
                let text = format!(
                    "cannot deliver a record to {}[{}]: {e}",
                    m.topic(),
                    m.partition()
                );
                // Records purged by an aborted transaction (rill purges nothing else, but for
                // a dropped producer) were discarded on purpose: not a lost output to report.
                let purged = matches!(
                    e,
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
                    )
                ) || self.current.load(Ordering::Relaxed) != self.generation;
                // A `send` hands its failure to its caller; an enqueued record's failure is
                // reported by the next flush.
                if purged {
                    tracing::debug!(target: "rill::kafka", "{text}");
                } else if opaque.0.is_none() {
                    tracing::error!(target: "rill::kafka", "{text}");
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    let mut last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
                    // A permanent failure is kept until a flush reports it.
                    if !last.as_ref().is_some_and(|(_, permanent)| *permanent) {
                        *last = Some((text.clone(), refused(e)));
                    }
                }
                if refused(e) {
                    Err(TransportError::Rejected(text))
                } else {
                    Err(TransportError::Other(text))
                }
            }
        };
        if let Some(tx) = opaque.0 {
            let _ = tx.send(outcome);
        }
    }
}

struct Inner {
    config: KafkaConfig,
    /// The producer. With exactly-once processing, a producer the brokers fence is replaced
    /// by a new one (see [`renew_producer`]); otherwise it lives as long as the transport.
    producer: RwLock<Arc<ThreadedProducer<ProducerCtx>>>,
    /// What a producer is made from.
    producer_config: ClientConfig,
    /// Which producer is current (see [`ProducerCtx`]).
    generation: Arc<AtomicU64>,
    /// When the brokers fenced this worker's producers, within the last [`FENCED_WINDOW`]
    /// (see [`renew_producer`]).
    fenced: Mutex<VecDeque<Instant>>,
    admin: AdminClient<DefaultClientContext>,
    failures: Arc<AtomicU64>,
    /// The last failed delivery of an enqueued record, and whether it can never succeed.
    last_failure: Arc<Mutex<Option<(String, bool)>>>,
    /// Delivery failures already reported by a flush.
    reported_failures: AtomicU64,
    /// Set when the brokers do not answer CreateTopics (librdkafka's mock cluster, some
    /// proxies): topics are then created by a metadata request, with the broker's defaults.
    no_create_topics: AtomicBool,
    /// With exactly-once processing, the gate of the open transaction: records are produced
    /// under its read side, and a transaction ends under its write side, since librdkafka
    /// refuses records while a transaction commits or aborts.
    txn: Option<Arc<tokio::sync::RwLock<()>>>,
    /// Two handles, made when first needed, that ask for the end offsets of partitions as a
    /// read_committed and a read_uncommitted reader sees them (see [`settled_ends`]).
    end_readers: Mutex<Option<Arc<EndReaders>>>,
}

/// See [`Inner::end_readers`].
struct EndReaders {
    committed: BaseConsumer,
    uncommitted: BaseConsumer,
}

impl Inner {
    fn end_readers(&self) -> Result<Arc<EndReaders>, TransportError> {
        let mut slot = self.end_readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(readers) = &*slot {
            return Ok(readers.clone());
        }
        let reader = |isolation: &str| -> Result<BaseConsumer, TransportError> {
            let mut c = self.config.client();
            for (k, v) in &self.config.extra {
                c.set(k, v);
            }
            // Only this handle's purpose decides its isolation level.
            c.set("isolation.level", isolation)
                .create()
                .map_err(|e| err(format!("cannot create a Kafka client: {e}")))
        };
        let readers = Arc::new(EndReaders {
            committed: reader("read_committed")?,
            uncommitted: reader("read_uncommitted")?,
        });
        *slot = Some(readers.clone());
        Ok(readers)
    }

    /// Drops the end readers; the next question makes new ones.
    fn forget_end_readers(&self) {
        let readers = self
            .end_readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(readers);
    }
}

/// How long a transaction's end (offsets, commit, abort) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long rill waits for a transaction's end before it gives the producer up (librdkafka
/// does not always keep to [`TXN_TIMEOUT`]). Twice the producer's `transaction.timeout.ms`: the
/// brokers have aborted the transaction by then.
const TXN_END_LIMIT: Duration = Duration::from_secs(20);

/// Ends the open transaction, with `offsets` consumed by `consumer` in it (none: only what
/// was produced), and begins the next. A transaction that cannot be committed is aborted.
fn commit_transaction(
    inner: &Inner,
    consumer: &BaseConsumer<GroupCtx>,
    offsets: &TopicPartitionList,
) -> Result<(), TransportError> {
    let producer = inner.producer();
    let started = Instant::now();
    let mut offsets_sent = Duration::ZERO;
    // Lingering records go out now, and are delivered while the offsets are sent.
    let _ = producer.flush(Duration::ZERO);
    let committed = (|| {
        if offsets.count() > 0 {
            let group = consumer
                .group_metadata()
                .ok_or("the consumer has no group metadata")?;
            producer
                .send_offsets_to_transaction(offsets, &group, TXN_TIMEOUT)
                .map_err(|e| e.to_string())?;
            offsets_sent = started.elapsed();
        }
        // `commit_transaction` flushes the producer first, and librdkafka's flush, while
        // another thread serves the delivery reports (the threaded producer's), checks in
        // steps of 100 ms: every commit took over 100 ms. Waiting here for the records to be
        // delivered leaves it nothing to wait for. (No record joins meanwhile: the
        // transaction's gate is closed.)
        let deadline = Instant::now() + TXN_TIMEOUT;
        while producer.in_flight_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
        }
        producer
            .commit_transaction(TXN_TIMEOUT)
            .map_err(|e| e.to_string())
    })();
    tracing::debug!(
        target: "rill::kafka",
        offsets_ms = offsets_sent.as_secs_f64() * 1e3,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        in_flight = producer.in_flight_count(),
        "transaction committed"
    );
    match committed {
        Ok(()) => begin_transaction(&producer),
        // A producer in a fatal state cannot abort either: its transaction is gone.
        Err(e) if producer.client().fatal_error().is_some() => {
            renew_producer(inner, &producer)?;
            Err(TransportError::TransactionAborted(e))
        }
        Err(e) => {
            tracing::error!(target: "rill::kafka", error = %e, "cannot commit the transaction; aborting it");
            abort_with(inner, &producer)?;
            Err(TransportError::TransactionAborted(e))
        }
    }
}

/// Aborts the open transaction and begins the next.
fn abort_transaction(inner: &Inner) -> Result<(), TransportError> {
    abort_with(inner, &inner.producer())
}

/// Aborts the open transaction of `producer` and begins its next.
fn abort_with(
    inner: &Inner,
    producer: &Arc<ThreadedProducer<ProducerCtx>>,
) -> Result<(), TransportError> {
    if let Err(e) = producer.abort_transaction(TXN_TIMEOUT) {
        if producer.client().fatal_error().is_some() {
            // The brokers ended the transaction themselves; a new producer begins the next.
            return renew_producer(inner, producer);
        }
        return Err(err(format!(
            "cannot abort the transaction ({e}); the producer cannot go on: restart the worker"
        )));
    }
    // Every record is produced in a transaction: those that failed so far belong to the one
    // just aborted, whose events are processed again, so no flush reports them as lost.
    inner
        .reported_failures
        .store(inner.failures.load(Ordering::Relaxed), Ordering::Relaxed);
    begin_transaction(producer)
}

/// How many times within [`FENCED_WINDOW`] a worker's producer may be fenced before the worker
/// takes it that another live worker has its `worker_id`. A broker failure fences a worker's
/// producer once or twice; two workers with one transactional id fence each other every few
/// seconds.
const FENCED_LIMIT: usize = 5;
/// See [`FENCED_LIMIT`].
const FENCED_WINDOW: Duration = Duration::from_secs(600);

/// Replaces a producer the brokers fenced by a new one with the same transactional id, with its
/// first transaction begun; the worker then rolls back to its last commit.
///
/// The brokers fence a producer in two cases they do not tell apart (librdkafka reports both
/// as `Fenced`): its transaction outlived `transaction.timeout.ms` (the coordinator aborted it
/// and bumped the producer's epoch; this happens when partition leaders or the coordinator move
/// in a broker failure, or when the worker was paused), or another producer with the same
/// transactional id started (a newer worker with this `worker_id`). As Kafka Streams does, the
/// worker goes on with a new producer: the aborted transaction's records are never visible to
/// `read_committed` readers, and a worker that lost its partitions meanwhile is fenced by its
/// stale group generation when it sends offsets. Two live workers with one `worker_id` would
/// fence each other for ever, so after [`FENCED_LIMIT`] fencings within [`FENCED_WINDOW`] the
/// worker stops with an error that says so. Other fatal producer errors stop the worker.
fn renew_producer(
    inner: &Inner,
    fenced: &Arc<ThreadedProducer<ProducerCtx>>,
) -> Result<(), TransportError> {
    if !Arc::ptr_eq(&inner.producer(), fenced) {
        // Given up already (see `end_transaction`): another producer has taken over.
        return Ok(());
    }
    let Some((code, reason)) = fenced.client().fatal_error() else {
        return Err(fatal_error(fenced, 0));
    };
    if !matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::ProducerFenced
    ) {
        return Err(fatal_error(fenced, 0));
    }
    let times = {
        let mut times = inner.fenced.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > FENCED_WINDOW)
        {
            times.pop_front();
        }
        times.push_back(now);
        times.len()
    };
    if times >= FENCED_LIMIT {
        return Err(fatal_error(fenced, times));
    }
    tracing::warn!(
        target: "rill::kafka",
        reason = %reason,
        "the brokers fenced this worker's transactional producer (its transaction outlived \
         transaction.timeout.ms, or another producer with its transactional id started); \
         the transaction is aborted, a new producer takes over"
    );
    replace_producer(inner)
}

/// Makes a new producer with the same transactional id (which fences the current one), begins
/// its first transaction and puts it in the current one's place.
fn replace_producer(inner: &Inner) -> Result<(), TransportError> {
    // From now on the current producer's failures are those of an aborted transaction.
    let generation = inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let fresh = new_producer(inner, generation)?;
    fresh
        .init_transactions(TXN_TIMEOUT)
        .map_err(|e| err(format!("cannot start Kafka transactions again: {e}")))?;
    begin_transaction(&fresh)?;
    let old = std::mem::replace(
        &mut *inner.producer.write().unwrap_or_else(|e| e.into_inner()),
        Arc::new(fresh),
    );
    // Dropped here, off the async threads, unless a call still holds it: it purges what it
    // still holds.
    drop(old);
    Ok(())
}

/// A producer of the transport, the `generation`-th (see [`ProducerCtx`]).
fn new_producer(
    inner: &Inner,
    generation: u64,
) -> Result<ThreadedProducer<ProducerCtx>, TransportError> {
    inner
        .producer_config
        .create_with_context(ProducerCtx {
            failures: inner.failures.clone(),
            last_failure: inner.last_failure.clone(),
            generation,
            current: inner.generation.clone(),
        })
        .map_err(|e| err(format!("cannot create a new Kafka producer: {e}")))
}

/// Throws away every record the (non-transactional) producer has not delivered yet, and puts a
/// new producer in its place for what comes next. Called when the group took this worker's
/// partitions without a handover (its session expired): what it had queued for them (table
/// changes above all) must not reach the brokers after their new owners' writes, where it
/// would overwrite newer state. Their events are processed again by the new owners.
fn discard_undelivered(inner: &Inner) -> Result<(), TransportError> {
    // The purged records fail as records of a replaced producer: not lost outputs.
    let generation = inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let fresh = new_producer(inner, generation)?;
    let old = std::mem::replace(
        &mut *inner.producer.write().unwrap_or_else(|e| e.into_inner()),
        Arc::new(fresh),
    );
    // Purged now, not when the last holder drops it: a flush waiting on it returns, and a
    // broker that comes back gets none of it.
    old.purge(PurgeConfig::default().queue().inflight());
    Ok(())
}

/// Says why a transactional producer in a fatal state cannot go on, fenced `times` times
/// within [`FENCED_WINDOW`].
fn fatal_error(producer: &ThreadedProducer<ProducerCtx>, times: usize) -> TransportError {
    match producer.client().fatal_error() {
        Some((_, reason)) if times > 0 => err(format!(
            "this worker was fenced {times} times in {} minutes: another worker with the same \
             worker_id (transactional id) is running ({reason}); give each worker its own \
             worker_id",
            FENCED_WINDOW.as_secs() / 60
        )),
        Some((code, reason)) => err(format!(
            "the transactional producer cannot go on ({code}: {reason}): restart the worker"
        )),
        None => err("the transactional producer cannot go on: restart the worker"),
    }
}

fn begin_transaction(producer: &ThreadedProducer<ProducerCtx>) -> Result<(), TransportError> {
    producer.begin_transaction().map_err(|e| {
        err(format!(
            "cannot begin a transaction ({e}); the producer cannot go on: restart the worker"
        ))
    })
}

impl Inner {
    /// The current producer.
    fn producer(&self) -> Arc<ThreadedProducer<ProducerCtx>> {
        self.producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The Kafka transport: one producer and an admin client, and consumers on demand.
#[derive(Clone)]
pub(crate) struct KafkaTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<R: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner) -> R + Send + 'static,
) -> Result<R, TransportError> {
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(|e| err(format!("blocking Kafka call failed: {e}")))
}

/// Partition count of `topic`, or `None` when it does not exist. With `auto_create`, the
/// request asks the broker to create a missing topic with its default settings.
fn partitions_of(inner: &Inner, topic: &str) -> Result<Option<u32>, TransportError> {
    lookup(inner, topic, false)
}

/// How long a topic that should exist may stay unknown to the broker asked before it is taken
/// not to exist (see [`partitions_of_known`]).
const METADATA_PROPAGATION: Duration = Duration::from_secs(3);

/// The partition count of `topic`, which should exist (rill created or checked it a moment
/// ago). In a cluster of several brokers each answers metadata from its own cache, which learns
/// of a new topic a moment after the controller: a worker that created its reply topic through
/// one broker could be told by another that it does not exist. So an unknown topic is asked
/// about again, for up to [`METADATA_PROPAGATION`], before it is taken not to exist.
fn partitions_of_known(inner: &Inner, topic: &str) -> Result<u32, TransportError> {
    let deadline = Instant::now() + METADATA_PROPAGATION;
    loop {
        if let Some(n) = partitions_of(inner, topic)? {
            return Ok(n);
        }
        if Instant::now() >= deadline {
            return Err(TransportError::UnknownTopic(topic.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a table restore waits for the transactions open on its changelog to end (see
/// [`Transport::settled_end_offsets`]): a little over the producers' `transaction.timeout.ms`,
/// after which the brokers abort a transaction whose producer went away.
const SETTLE_WAIT: Duration = Duration::from_secs(15);
/// Timeout of each question of [`settled_ends`].
const SETTLE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The end offsets of `topic` once its last stable offsets (what read-committed readers read
/// up to) have caught up with its high watermarks: no transaction is open on it.
fn settled_ends(inner: &Inner, topic: &str) -> Result<Vec<i64>, TransportError> {
    Ok(match ends_after_settling(inner, topic)? {
        Ends::Settled(ends) | Ends::Stable(ends) => ends,
    })
}

/// What [`ends_after_settling`] could tell.
#[derive(Debug, PartialEq)]
enum Ends {
    /// The last stable offsets, equal to the high watermarks (or, after [`SETTLE_WAIT`], with a
    /// transaction still open).
    Settled(Vec<i64>),
    /// The ends read-committed readers read up to, not compared with the high watermarks: the
    /// brokers could not be asked for both within [`SETTLE_WAIT`].
    Stable(Vec<i64>),
}

fn ends_after_settling(inner: &Inner, topic: &str) -> Result<Ends, TransportError> {
    let n = partitions_of_known(inner, topic)?;
    let ends = |reader: &BaseConsumer| {
        (0..n as i32)
            .map(|p| {
                reader
                    .fetch_watermarks(topic, p, SETTLE_REQUEST_TIMEOUT)
                    .map(|(_, high)| high)
            })
            .collect::<Result<Vec<i64>, _>>()
    };
    let started = Instant::now();
    loop {
        let readers = inner.end_readers()?;
        // The last stable offsets first: a transaction ending between the two questions
        // makes them differ once more, never agree too early.
        let asked = ends(&readers.committed)
            .and_then(|stable| ends(&readers.uncommitted).map(|high| (stable, high)));
        match asked {
            Ok((stable, high)) => {
                if stable.iter().zip(&high).all(|(s, h)| s >= h) {
                    return Ok(Ends::Settled(stable));
                }
                if started.elapsed() >= SETTLE_WAIT {
                    tracing::warn!(
                        target: "rill::kafka",
                        topic,
                        waited = ?SETTLE_WAIT,
                        "a transaction is still open on the changelog; restoring what is committed"
                    );
                    return Ok(Ends::Settled(stable));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                // These handles are never polled, and librdkafka does not look up the new
                // leaders of such a handle when a broker goes away: it asks the dead broker
                // until the next periodic metadata refresh (minutes). New handles learn the
                // leaders as they connect; until the cluster has elected them, they fail too.
                inner.forget_end_readers();
                if started.elapsed() >= SETTLE_WAIT {
                    // What a restore reads up to when the brokers cannot tell: the ends
                    // read-committed readers read up to, asked through the producer's handle.
                    tracing::warn!(
                        target: "rill::kafka",
                        topic,
                        error = %e,
                        "cannot compare the stable and high ends of the changelog; restoring up to the stable ones"
                    );
                    return (0..n as i32)
                        .map(|p| high_watermark(inner, topic, p))
                        .collect::<Result<Vec<i64>, _>>()
                        .map(Ends::Stable);
                }
                tracing::debug!(target: "rill::kafka", topic, error = %e, "cannot compare the stable and high ends yet");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The end offset of a partition of `topic`, which exists. A partition created a moment ago
/// may be unknown for a moment to the broker asked, or have no leader yet: it is asked about
/// again for up to [`METADATA_PROPAGATION`].
fn high_watermark(inner: &Inner, topic: &str, partition: i32) -> Result<i64, TransportError> {
    let deadline = Instant::now() + METADATA_PROPAGATION;
    loop {
        match inner
            .producer()
            .client()
            .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
        {
            Ok((_, high)) => return Ok(high),
            Err(e) => {
                let propagating = matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::LeaderNotAvailable
                            | RDKafkaErrorCode::NotLeaderForPartition
                    )
                );
                if !propagating || Instant::now() >= deadline {
                    return Err(err(format!(
                        "cannot read offsets of {topic}[{partition}]: {e}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn lookup(inner: &Inner, topic: &str, auto_create: bool) -> Result<Option<u32>, TransportError> {
    let md = if auto_create {
        inner
            .producer()
            .client()
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
    } else {
        inner
            .admin
            .inner()
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
    }
    .map_err(|e| err(format!("cannot read metadata of topic {topic:?}: {e}")))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None if !t.partitions().is_empty() => Ok(Some(t.partitions().len() as u32)),
        None => Ok(None),
        Some(code) => {
            let code: RDKafkaErrorCode = code.into();
            if code == RDKafkaErrorCode::UnknownTopicOrPartition
                || code == RDKafkaErrorCode::UnknownTopic
                || code == RDKafkaErrorCode::LeaderNotAvailable
            {
                Ok(None)
            } else {
                Err(err(format!("metadata of topic {topic:?}: {code}")))
            }
        }
    }
}

impl KafkaTransport {
    /// Connects, failing with a clear error when no broker answers within 10 s.
    pub(crate) async fn connect(config: KafkaConfig) -> Result<Self, TransportError> {
        let failures = Arc::new(AtomicU64::new(0));
        let last_failure = Arc::new(Mutex::new(None));
        let mut pc = config.client();
        // The idempotent producer (the Java client's default since Kafka 3.0) keeps each
        // partition's records in order and without duplicates across retries with up to 5
        // requests in flight per connection; without it, order would need one at a time.
        pc.set("allow.auto.create.topics", "true")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("max.in.flight.requests.per.connection", "5");
        if let Some(id) = &config.transactional_id {
            // As Kafka Streams: a crashed worker's open transaction blocks read-committed
            // consumers of its partitions until the broker aborts it after this long.
            pc.set("transactional.id", id)
                .set("enable.idempotence", "true")
                .set("transaction.timeout.ms", "10000")
                // Right after a commit the coordinator answers the next transaction's first
                // requests with CONCURRENT_TRANSACTIONS until the last one's markers are
                // written; librdkafka retries after `retry.backoff.ms` (100 ms by default),
                // which held a commit (and records of partitions new to the transaction) for
                // 100 ms every few commits. The Java client retries those after 20 ms.
                .set("retry.backoff.ms", "20");
        }
        for (k, v) in &config.extra {
            pc.set(k, v);
        }
        let generation = Arc::new(AtomicU64::new(0));
        let producer: ThreadedProducer<ProducerCtx> = pc
            .clone()
            .create_with_context(ProducerCtx {
                failures: failures.clone(),
                last_failure: last_failure.clone(),
                generation: 0,
                current: generation.clone(),
            })
            .map_err(|e| err(format!("cannot create Kafka producer: {e}")))?;
        let admin: AdminClient<DefaultClientContext> = config
            .client()
            .create()
            .map_err(|e| err(format!("cannot create Kafka admin client: {e}")))?;
        let brokers = config.brokers.clone();
        let txn = config
            .transactional_id
            .is_some()
            .then(|| Arc::new(tokio::sync::RwLock::new(())));
        let inner = Arc::new(Inner {
            config,
            producer: RwLock::new(Arc::new(producer)),
            producer_config: pc,
            generation,
            fenced: Mutex::new(VecDeque::new()),
            admin,
            failures,
            last_failure,
            reported_failures: AtomicU64::new(0),
            no_create_topics: AtomicBool::new(false),
            txn,
            end_readers: Mutex::new(None),
        });
        let reached = blocking(&inner, |i| brokers_reached(&i.producer(), CONNECT_TIMEOUT)).await?;
        if let Err(e) = reached {
            return Err(err(format!(
                "cannot reach Kafka at {brokers} within {CONNECT_TIMEOUT:?}: {e}"
            )));
        }
        if inner.txn.is_some() {
            // Fences an earlier producer with the same transactional id (aborting what it
            // left open), then opens the first transaction.
            blocking(&inner, |i| {
                let producer = i.producer();
                producer
                    .init_transactions(TXN_TIMEOUT)
                    .map_err(|e| err(format!("cannot start Kafka transactions: {e}")))?;
                begin_transaction(&producer)
            })
            .await??;
        }
        Ok(Self { inner })
    }

    fn record<'a>(
        record: &'a OutgoingRecord,
        opaque: Delivery,
    ) -> BaseRecord<'a, [u8], [u8], Delivery> {
        let mut r =
            BaseRecord::with_opaque_to(&record.topic, opaque).partition(record.partition as i32);
        if let Some(k) = &record.key {
            r = r.key(&k[..]);
        }
        if let Some(v) = &record.value {
            r = r.payload(&v[..]);
        }
        if let Some(ts) = record.timestamp {
            r = r.timestamp(ts);
        }
        if !record.headers.is_empty() {
            let mut h = OwnedHeaders::new_with_capacity(record.headers.len());
            for (k, v) in &record.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(&v[..]),
                });
            }
            r = r.headers(h);
        }
        r
    }

    /// Creates a topic by asking for its metadata with auto-creation allowed.
    async fn auto_create(&self, spec: TopicSpec) -> Result<u32, TransportError> {
        let name = spec.name.clone();
        match blocking(&self.inner, move |i| lookup(i, &name, true)).await?? {
            Some(actual) => check_partitions(&spec, actual),
            None => {
                // The first request may only trigger creation; ask once more.
                let name = spec.name.clone();
                let found = blocking(&self.inner, move |i| {
                    std::thread::sleep(Duration::from_millis(100));
                    lookup(i, &name, true)
                })
                .await??;
                match found {
                    Some(actual) => check_partitions(&spec, actual),
                    None => Err(err(format!("cannot create topic {:?}", spec.name))),
                }
            }
        }
    }

    /// A consumer outside any group, for partitions assigned by hand; `settings` add to the
    /// common ones.
    fn reader(&self, settings: &[(&str, &str)]) -> Result<KafkaConsumer, TransportError> {
        let mut c = self.inner.config.client();
        c.set("group.id", format!("rill-reader-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            // Table recovery ends at the end of each partition (see `ConsumerEvent::Ended`).
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "20")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("isolation.level", "read_committed");
        for (k, v) in settings {
            c.set(*k, *v);
        }
        for (k, v) in &self.inner.config.extra {
            c.set(k, v);
        }
        KafkaConsumer::new(c, None, Duration::ZERO, Duration::ZERO, None)
    }

    /// Queues a record, waiting while librdkafka's queue is full.
    async fn produce(
        &self,
        record: OutgoingRecord,
        tx: Option<DeliveryTx>,
    ) -> Result<(), TransportError> {
        // Records join the open transaction; none are sent while one ends.
        let _txn = match &self.inner.txn {
            Some(gate) => Some(gate.read().await),
            None => None,
        };
        let mut opaque = Delivery(tx.map(Box::new));
        loop {
            match self.send_now(&record, opaque) {
                Ok(result) => return result,
                Err(full) => {
                    opaque = full;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Hands a record to librdkafka; the opaque comes back when its queue is full.
    fn send_now(
        &self,
        record: &OutgoingRecord,
        opaque: Delivery,
    ) -> Result<Result<(), TransportError>, Delivery> {
        let producer = self
            .inner
            .producer
            .read()
            .unwrap_or_else(|e| e.into_inner());
        match producer.send(Self::record(record, opaque)) {
            Ok(()) => Ok(Ok(())),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                Err(r.delivery_opaque)
            }
            Err((e, _)) => {
                let text = format!("cannot send to {}[{}]: {e}", record.topic, record.partition);
                Ok(Err(if refused(&e) {
                    TransportError::Rejected(text)
                } else {
                    err(text)
                }))
            }
        }
    }
}

impl Transport for KafkaTransport {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn range_assignment(&self) -> bool {
        self.inner
            .config
            .extra
            .get("partition.assignment.strategy")
            .is_none_or(|s| s.trim() == "range")
    }

    fn ensure_topic(&self, spec: TopicSpec) -> BoxFuture<'_, Result<u32, TransportError>> {
        async move {
            let inner = self.inner.clone();
            let name = spec.name.clone();
            if let Some(actual) = blocking(&inner, move |i| partitions_of(i, &name)).await?? {
                return check_partitions(&spec, actual);
            }
            let mut topic = NewTopic::new(
                &spec.name,
                spec.partitions as i32,
                TopicReplication::Fixed(i32::from(spec.replication_factor)),
            );
            if spec.compacted {
                topic = topic.set("cleanup.policy", "compact");
            }
            // Kafka's limits are Java longs; past them is "no limit" (-1).
            let retention_ms = spec
                .retention
                .time
                .map(|t| i64::try_from(t.as_millis()).unwrap_or(-1).to_string());
            if let Some(ms) = &retention_ms {
                topic = topic.set("retention.ms", ms);
            }
            let retention_bytes = spec
                .retention
                .bytes
                .map(|b| i64::try_from(b).unwrap_or(-1).to_string());
            if let Some(bytes) = &retention_bytes {
                topic = topic.set("retention.bytes", bytes);
            }
            if self.inner.no_create_topics.load(Ordering::Relaxed) {
                return self.auto_create(spec).await;
            }
            let opts = AdminOptions::new()
                .operation_timeout(Some(REQUEST_TIMEOUT))
                .request_timeout(Some(CREATE_TIMEOUT));
            let results = match self.inner.admin.create_topics([&topic], &opts).await {
                Ok(r) => r,
                Err(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut)) => {
                    tracing::warn!(
                        topic = %spec.name,
                        "the brokers do not answer CreateTopics; creating topics through \
                         metadata requests with the broker's default settings"
                    );
                    self.inner.no_create_topics.store(true, Ordering::Relaxed);
                    return self.auto_create(spec).await;
                }
                Err(e) => return Err(err(format!("cannot create topic {:?}: {e}", spec.name))),
            };
            for r in results {
                match r {
                    Ok(_) => {}
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => {
                        return Err(err(format!("cannot create topic {name:?}: {code}")))
                    }
                }
            }
            // Wait (bounded) until the new topic shows in metadata with its partitions.
            let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
            loop {
                let name = spec.name.clone();
                if let Some(actual) = blocking(&inner, move |i| partitions_of(i, &name)).await?? {
                    return check_partitions(&spec, actual);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(err(format!(
                        "topic {:?} was created but does not show in metadata",
                        spec.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        .boxed()
    }

    fn delete_topic(&self, name: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let name = name.to_owned();
        async move {
            if self.inner.no_create_topics.load(Ordering::Relaxed) {
                // Brokers without CreateTopics (the mock cluster) have no DeleteTopics either.
                return Ok(());
            }
            let opts = AdminOptions::new()
                .operation_timeout(Some(REQUEST_TIMEOUT))
                .request_timeout(Some(CREATE_TIMEOUT));
            let results = self
                .inner
                .admin
                .delete_topics(&[name.as_str()], &opts)
                .await
                .map_err(|e| err(format!("cannot delete topic {name:?}: {e}")))?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                    Err((topic, code)) => {
                        return Err(err(format!("cannot delete topic {topic:?}: {code}")))
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn partition_count(&self, topic: &str) -> BoxFuture<'_, Result<Option<u32>, TransportError>> {
        let topic = topic.to_owned();
        async move { blocking(&self.inner, move |i| partitions_of(i, &topic)).await? }.boxed()
    }

    fn send(
        &self,
        record: OutgoingRecord,
    ) -> BoxFuture<'_, Result<RecordPosition, TransportError>> {
        async move {
            let (tx, rx) = oneshot::channel();
            self.produce(record, Some(tx)).await?;
            rx.await
                .map_err(|_| err("the producer stopped before the record was delivered"))?
        }
        .boxed()
    }

    fn enqueue(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<(), TransportError>> {
        self.produce(record, None).boxed()
    }

    #[allow(clippy::result_large_err)]
    fn try_enqueue(
        &self,
        record: OutgoingRecord,
    ) -> Result<Result<(), TransportError>, OutgoingRecord> {
        // Records join the open transaction; none are sent while one ends.
        let _txn = match &self.inner.txn {
            Some(gate) => match gate.try_read() {
                Ok(guard) => Some(guard),
                Err(_) => return Err(record),
            },
            None => None,
        };
        match self.send_now(&record, Delivery(None)) {
            Ok(result) => Ok(result),
            Err(_) => Err(record),
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        async move {
            // librdkafka's flush waits in steps of 100 ms when another thread (the threaded
            // producer's) serves the delivery reports, and every commit waits for a flush:
            // ask librdkafka to send what lingers, then watch the queue drain.
            let producer = self.inner.producer();
            let _ = producer.flush(Duration::ZERO);
            let deadline = Instant::now() + FLUSH_TIMEOUT;
            while producer.in_flight_count() > 0 {
                if Instant::now() >= deadline {
                    return Err(err(format!(
                        "cannot flush the producer: {} record(s) still undelivered after {FLUSH_TIMEOUT:?}",
                        producer.in_flight_count()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let failures = self.inner.failures.load(Ordering::Relaxed);
            let reported = self
                .inner
                .reported_failures
                .swap(failures, Ordering::Relaxed);
            if failures > reported {
                let (last, permanent) = self
                    .inner
                    .last_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default();
                let text = format!(
                    "{} record(s) could not be delivered; last: {last}",
                    failures - reported
                );
                return Err(if permanent {
                    TransportError::Rejected(text)
                } else {
                    err(text)
                });
            }
            Ok(())
        }
        .boxed()
    }

    fn settled_end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>> {
        let topic = topic.to_owned();
        async move { blocking(&self.inner, move |i| settled_ends(i, &topic)).await? }.boxed()
    }

    fn end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>> {
        let topic = topic.to_owned();
        async move {
            blocking(&self.inner, move |i| {
                let n = partitions_of_known(i, &topic)?;
                (0..n as i32)
                    .map(|p| high_watermark(i, &topic, p))
                    .collect()
            })
            .await?
        }
        .boxed()
    }

    fn discard_undelivered(&self) {
        if self.inner.txn.is_some() {
            return;
        }
        if let Err(error) = discard_undelivered(&self.inner) {
            tracing::error!(target: "rill::kafka", %error, "cannot throw away the records queued for lost partitions");
        }
    }

    fn group_consumer(&self, group: &str) -> Result<Box<dyn Consumer>, TransportError> {
        let mut c = self.inner.config.client();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            // Brokers answer a fetch as soon as data arrives; the cap bounds latency on
            // brokers that hold fetches for the whole wait (the mock cluster does).
            .set("fetch.wait.max.ms", "20")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("isolation.level", "read_committed")
            // The consumer lag metric comes from librdkafka's statistics (`GroupCtx::stats`).
            .set("statistics.interval.ms", "5000");
        for (k, v) in &self.inner.config.extra {
            c.set(k, v);
        }
        let mut consumer = KafkaConsumer::new(
            c,
            Some(group.to_owned()),
            self.inner.config.handoff_grace,
            self.inner.config.revoke_timeout,
            self.inner.config.lag_report.clone(),
        )?;
        if self.inner.txn.is_some() {
            consumer.txn = Some(self.inner.clone());
        } else {
            let _ = consumer
                .consumer
                .context()
                .undelivered
                .set(self.inner.clone());
        }
        Ok(Box::new(consumer))
    }

    fn topic_consumer(
        &self,
        topic: &str,
        start: StartAt,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        let topic = topic.to_owned();
        async move {
            let consumer = self.reader(&[])?;
            let t = topic.clone();
            let tpl = blocking(&self.inner, move |i| -> Result<_, TransportError> {
                let n = partitions_of_known(i, &t)?;
                let mut tpl = TopicPartitionList::new();
                for p in 0..n as i32 {
                    let offset = match start {
                        StartAt::Earliest => Offset::Beginning,
                        StartAt::Latest => Offset::Offset(high_watermark(i, &t, p)?),
                    };
                    tpl.add_partition_offset(&t, p, offset).map_err(err)?;
                }
                Ok(tpl)
            })
            .await??;
            consumer.assign(&tpl)?;
            Ok(Box::new(consumer) as Box<dyn Consumer>)
        }
        .boxed()
    }

    fn partitions_consumer(
        &self,
        topic: &str,
        starts: Vec<(u32, i64)>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        let topic = topic.to_owned();
        async move {
            let consumer = self.reader(&[("auto.offset.reset", "earliest")])?;
            let mut tpl = TopicPartitionList::new();
            for (p, offset) in starts {
                tpl.add_partition_offset(&topic, p as i32, Offset::Offset(offset))
                    .map_err(err)?;
            }
            consumer.assign(&tpl)?;
            Ok(Box::new(consumer) as Box<dyn Consumer>)
        }
        .boxed()
    }

    fn committed(
        &self,
        group: &str,
    ) -> BoxFuture<'_, Result<Vec<(TopicPartition, i64)>, TransportError>> {
        let group = group.to_owned();
        async move {
            let mut c = self.inner.config.client();
            c.set("group.id", &group).set("enable.auto.commit", "false");
            blocking(&self.inner, move |i| {
                let consumer: BaseConsumer<Ctx> = c.create_with_context(Ctx).map_err(err)?;
                let md = i
                    .producer()
                    .client()
                    .fetch_metadata(None, REQUEST_TIMEOUT)
                    .map_err(err)?;
                let mut tpl = TopicPartitionList::new();
                for t in md.topics() {
                    for p in t.partitions() {
                        tpl.add_partition(t.name(), p.id());
                    }
                }
                let committed = consumer
                    .committed_offsets(tpl, REQUEST_TIMEOUT)
                    .map_err(err)?;
                Ok(committed
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => {
                            Some((TopicPartition::new(e.topic(), e.partition() as u32), o))
                        }
                        _ => None,
                    })
                    .collect())
            })
            .await?
        }
        .boxed()
    }
}

fn check_partitions(spec: &TopicSpec, actual: u32) -> Result<u32, TransportError> {
    if actual != spec.partitions {
        return Err(TransportError::PartitionMismatch {
            topic: spec.name.clone(),
            declared: spec.partitions,
            actual,
        });
    }
    Ok(actual)
}

/// What the poll thread hands to the consumer.
enum Polled {
    Event(ConsumerEvent),
    /// Partitions are being revoked; the callback waits on the sender until they are committed.
    Revoking(Vec<TopicPartition>, std::sync::mpsc::SyncSender<()>),
    /// Partitions were lost (see [`ConsumerEvent::Lost`]); the callback waits on the sender
    /// until the worker has let them go.
    Losing(Vec<TopicPartition>, std::sync::mpsc::SyncSender<()>),
    Error(TransportError),
}

/// What a group consumer remembers of its last assignment.
#[derive(Default)]
struct Membership {
    /// Generation of the group when partitions were last assigned.
    generation: Option<i32>,
    /// Partitions of the last assignment.
    assigned: BTreeSet<(String, i32)>,
}

/// Forwards rebalances from librdkafka's callbacks to the dispatcher.
struct GroupCtx {
    events: mpsc::Sender<Polled>,
    revoke_timeout: Duration,
    /// How long to wait before reading partitions another member may still hold (see
    /// `HANDOFF_GRACE`); zero by default.
    handoff_grace: Duration,
    /// The topics the consumer is subscribed to (the poll thread subscribes again with them
    /// when it rejoins the group).
    topics: Mutex<Vec<String>>,
    membership: Mutex<Membership>,
    /// Set when the group must be rejoined as a new member (see `on_assign`).
    rejoin: AtomicBool,
    /// Set while the worker's agents are behind (see [`Consumer::hold_back`]): the poll
    /// thread polls only every [`HELD_BACK_POLL`].
    throttled: AtomicBool,
    /// Assigned partitions kept paused until the handoff grace is over (see `on_assign`).
    held_back: Mutex<Option<HeldBack>>,
    /// Whether the consumer is a static member of its group (`group.instance.id`).
    static_member: bool,
    /// Records polled and not yet handed to the dispatcher.
    unsent: Mutex<Vec<Message>>,
    /// The consumer group (the app id), for the lag metric; `None` for readers.
    group: Option<String>,
    /// Set when the group took the partitions without a handover, until the worker has let
    /// them go (see [`Consumer::assignment_lost`]).
    lost: Arc<AtomicBool>,
    /// With at-least-once processing, the transport whose undelivered records are thrown away
    /// when partitions are lost (see [`discard_undelivered`]).
    undelivered: std::sync::OnceLock<Arc<Inner>>,
    /// Told the lag of each partition (see [`KafkaConfig::report_lag`]).
    lag_report: Option<LagReport>,
}

/// Assigned partitions that are not read yet: another member may still hold them.
struct HeldBack {
    until: Instant,
    partitions: Vec<(String, i32)>,
}

/// Sends an event from a librdkafka callback: waiting for room on the poll thread, without a
/// wait on a runtime's thread (where a consumer dropped inside async code closes). Whether
/// it was sent.
fn send_from_callback(tx: &mpsc::Sender<Polled>, event: Polled) -> bool {
    if tokio::runtime::Handle::try_current().is_ok() {
        tx.try_send(event).is_ok()
    } else {
        tx.blocking_send(event).is_ok()
    }
}

fn partition_list(partitions: &[(String, i32)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    tpl
}

/// The generation of the consumer group `consumer` is a member of, as librdkafka knows it.
fn group_generation(consumer: &BaseConsumer<GroupCtx>) -> Option<i32> {
    use rdkafka::bindings as rd;
    // librdkafka has no getter for the generation; its serialized group metadata starts with
    // this magic and the generation (native byte order).
    const MAGIC: &[u8] = b"CGMDv2:";
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is a live consumer handle for the duration of the call (borrowed from
    // `consumer`). The group metadata and its serialized copy are allocated by librdkafka,
    // read only within their bounds here, and freed with librdkafka's own functions before
    // returning; no pointer escapes.
    unsafe {
        let md = rd::rd_kafka_consumer_group_metadata(rk);
        if md.is_null() {
            return None;
        }
        let mut buf: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut size = 0usize;
        let error = rd::rd_kafka_consumer_group_metadata_write(md, &mut buf, &mut size);
        rd::rd_kafka_consumer_group_metadata_destroy(md);
        if !error.is_null() {
            rd::rd_kafka_error_destroy(error);
            return None;
        }
        if buf.is_null() {
            return None;
        }
        let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), size);
        let generation = bytes
            .strip_prefix(MAGIC)
            .and_then(|rest| rest.get(..4))
            .and_then(|g| g.try_into().ok())
            .map(i32::from_ne_bytes);
        rd::rd_kafka_mem_free(rk, buf);
        generation
    }
}

impl ClientContext for GroupCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        Ctx.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // A reader reaching the end of a partition is news, not an error: the poll thread
        // reports it as `ConsumerEvent::Ended`.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        Ctx.error(error, reason)
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): the lag of each partition.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let (Some(group), Some(report)) = (&self.group, &self.lag_report) else {
            return;
        };
        for (topic, t) in &statistics.topics {
            for (&p, partition) in &t.partitions {
                // Partition -1 is librdkafka's own; a lag of -1 is not known yet; partitions
                // not assigned here are not desired.
                if p >= 0 && partition.desired && partition.consumer_lag >= 0 {
                    let tp = TopicPartition::new(topic.as_str(), p as u32);
                    report(group, tp, partition.consumer_lag);
                }
            }
        }
    }
}

fn tps(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition() as u32))
        .collect()
}

impl GroupCtx {
    fn membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held_back(&self) -> std::sync::MutexGuard<'_, Option<HeldBack>> {
        self.held_back.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unsent(&self) -> std::sync::MutexGuard<'_, Vec<Message>> {
        self.unsent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the records polled so far to the dispatcher; false once it is gone.
    fn send_unsent(&self) -> bool {
        let batch = std::mem::take(&mut *self.unsent());
        batch.is_empty()
            || self
                .events
                .blocking_send(Polled::Event(ConsumerEvent::Messages(batch)))
                .is_ok()
    }

    /// Runs when partitions were assigned (librdkafka is looking up their committed offsets).
    ///
    /// Asks for a rejoin as a new member when partitions are assigned again in the generation
    /// of the previous assignment. With the eager protocol every assignment follows a
    /// JoinGroup, and a Kafka coordinator answers each JoinGroup of a rebalance with a new
    /// generation. tansu 0.6.0 does not: when a member's session expires (a worker killed with
    /// SIGKILL), it drops the member without starting a new generation, tells only the member
    /// whose heartbeat noticed to rejoin, and answers that rejoin with the same generation and
    /// its old assignment. The other members are never told, and the dead member's partitions
    /// stay unowned. Leaving the group and joining again as a new member starts a new
    /// generation there, which every member is told about on its next heartbeat: the group
    /// rebalances for real. On a broker that behaves, this never happens. (A static member,
    /// with `group.instance.id`, may legitimately get its assignment back in the same
    /// generation: it is not checked.)
    ///
    /// With a handoff grace, partitions this member did not hold in the generation before
    /// (another member may still hold them) are paused and returned; the poll thread hands
    /// them to the dispatcher and reads them from their committed offset once the grace is
    /// over (`release_held_back`).
    ///
    /// Both apply to the eager protocol (`range`, `roundrobin`) only: with the cooperative
    /// one, assignments and revocations are increments.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        list: &TopicPartitionList,
    ) -> Vec<(String, i32)> {
        if !matches!(consumer.rebalance_protocol(), RebalanceProtocol::Eager) {
            return Vec::new();
        }
        let generation = group_generation(consumer);
        let assigned: BTreeSet<(String, i32)> = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let (stalled, taken_over) = {
            let mut m = self.membership();
            let stalled = !self.static_member
                && generation.is_some_and(|g| g >= 0 && m.generation == Some(g));
            let next = m.generation.and_then(|g| g.checked_add(1));
            let kept = |tp: &(String, i32)| generation == next && m.assigned.contains(tp);
            let taken_over: Vec<(String, i32)> =
                assigned.iter().filter(|tp| !kept(tp)).cloned().collect();
            m.generation = generation;
            m.assigned = assigned;
            (stalled, taken_over)
        };
        if stalled {
            tracing::warn!(
                target: "rill::kafka",
                generation,
                "the group coordinator assigned partitions again without a new generation \
                 (a member's session expired without a rebalance); rejoining the group as a \
                 new member so that the whole group rebalances"
            );
            self.rejoin.store(true, Ordering::SeqCst);
        } else if !taken_over.is_empty() && !self.handoff_grace.is_zero() {
            // Pausing discards whatever was fetched of them already.
            match consumer.pause(&partition_list(&taken_over)) {
                Ok(()) => {
                    tracing::debug!(
                        target: "rill::kafka",
                        partitions = taken_over.len(),
                        grace = ?self.handoff_grace,
                        "holding back partitions other members may still hold"
                    );
                    *self.held_back() = Some(HeldBack {
                        until: Instant::now() + self.handoff_grace,
                        partitions: taken_over.clone(),
                    });
                    return taken_over;
                }
                Err(e) => {
                    tracing::warn!(target: "rill::kafka", error = %e, "cannot pause partitions")
                }
            }
        }
        Vec::new()
    }

    /// Forgets held-back partitions that are no longer assigned, resuming them so that they do
    /// not stay paused when they are assigned again.
    fn drop_held_back(&self, consumer: &BaseConsumer<Self>) {
        if let Some(h) = self.held_back().take() {
            let _ = consumer.resume(&partition_list(&h.partitions));
        }
    }
}

/// Hands the held-back partitions to the dispatcher and reads them, from their committed
/// offsets, once the grace is over.
fn release_held_back(consumer: &BaseConsumer<GroupCtx>, tx: &mpsc::Sender<Polled>) {
    let partitions = {
        let mut held = consumer.context().held_back();
        match &*held {
            Some(h) if Instant::now() >= h.until => match held.take() {
                Some(h) => h.partitions,
                None => return,
            },
            _ => return,
        }
    };
    let assigned = partitions
        .iter()
        .map(|(t, p)| TopicPartition::new(t.as_str(), *p as u32))
        .collect();
    if !send_from_callback(tx, Polled::Event(ConsumerEvent::Assigned(assigned))) {
        return;
    }
    let tpl = partition_list(&partitions);
    // The previous owners had the grace to commit: start where they did, not where the group
    // was when the partitions were assigned.
    match consumer.committed_offsets(tpl.clone(), REQUEST_TIMEOUT) {
        Ok(committed) => {
            let mut seek = TopicPartitionList::new();
            for e in committed.elements() {
                if let Offset::Offset(o) = e.offset() {
                    let _ = seek.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
                }
            }
            if seek.count() > 0 {
                tracing::debug!(
                    target: "rill::kafka",
                    offsets = %seek
                        .elements()
                        .iter()
                        .map(|e| format!("{}[{}]={:?}", e.topic(), e.partition(), e.offset()))
                        .collect::<Vec<_>>()
                        .join(","),
                    "reading held-back partitions from their committed offsets"
                );
                match consumer.seek_partitions(seek, REQUEST_TIMEOUT) {
                    Ok(result) => {
                        for e in result.elements() {
                            if let Err(error) = e.error() {
                                tracing::warn!(
                                    target: "rill::kafka",
                                    topic = e.topic(),
                                    partition = e.partition(),
                                    %error,
                                    "cannot seek to the committed offset"
                                );
                            }
                        }
                    }
                    Err(error) => tracing::warn!(
                        target: "rill::kafka",
                        %error,
                        "cannot seek to the committed offsets"
                    ),
                }
            }
        }
        Err(error) => tracing::warn!(
            target: "rill::kafka",
            %error,
            "cannot read the committed offsets of held-back partitions"
        ),
    }
    if let Err(error) = consumer.resume(&tpl) {
        tracing::error!(target: "rill::kafka", %error, "cannot resume held-back partitions");
    }
}

/// Leaves the consumer group and joins it again as a new member, with the same topics.
fn rejoin(consumer: &BaseConsumer<GroupCtx>) {
    let topics = consumer
        .context()
        .topics
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if topics.is_empty() {
        return;
    }
    *consumer.context().membership() = Membership::default();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    // Unsubscribing revokes the partitions (through the callback, which waits for their
    // commit) and leaves the group; subscribing again joins with a new member id.
    consumer.unsubscribe();
    if let Err(e) = consumer.subscribe(&names) {
        tracing::error!(target: "rill::kafka", error = %e, "cannot rejoin the consumer group");
    }
}

impl GroupCtx {
    /// Hands revoked partitions to the worker and waits (bounded) until it has committed them;
    /// or, when they were `lost` (the group gave them to others without a handover: this
    /// member's session expired), until it has let them go without committing.
    fn revoke(&self, revoked: Vec<TopicPartition>, lost: bool) {
        if !lost {
            // Records polled before the revocation are processed (and committed) before the
            // partitions are handed over, not after.
            self.send_unsent();
        }
        if revoked.is_empty() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let event = if lost {
            // Their new owners process these records (and everything since the last commit)
            // again; this worker must not write anything for them from now on.
            self.unsent().clear();
            self.lost.store(true, Ordering::SeqCst);
            tracing::warn!(
                target: "rill::kafka",
                partitions = %names(&revoked),
                "partitions lost: this worker's session in the consumer group expired, so the \
                 group may have given them to other workers; nothing more is committed or \
                 written for them here, and their events since the last commit are processed \
                 again by their next owner"
            );
            if let Some(inner) = self.undelivered.get() {
                if let Err(error) = discard_undelivered(inner) {
                    tracing::error!(target: "rill::kafka", %error, "cannot throw away the records queued for lost partitions");
                }
            }
            Polled::Losing(revoked, tx)
        } else {
            Polled::Revoking(revoked, tx)
        };
        // Dropped on a runtime's thread (a worker dropped without a shutdown), the consumer
        // closes there: nothing may block it, so the worker is told without a wait.
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        if in_runtime {
            let _ = self.events.try_send(event);
        } else if self.events.blocking_send(event).is_ok()
            && rx.recv_timeout(self.revoke_timeout).is_err()
        {
            tracing::warn!(
                "revoked partitions were not committed within {:?}",
                self.revoke_timeout
            );
        }
    }
}

impl ConsumerContext for GroupCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => self.revoke(tps(list), consumer.assignment_lost()),
            Rebalance::Assign(_) => {}
            Rebalance::Error(_) => {
                *self.membership() = Membership::default();
                // The whole assignment is dropped after a failed rebalance: the worker hears
                // of it as a revocation, commits what it can and lets its tables go, instead
                // of going on with partitions it no longer has.
                if let Ok(list) = consumer.assignment() {
                    self.revoke(tps(&list), consumer.assignment_lost());
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let held = self.on_assign(consumer, list);
                let assigned: Vec<TopicPartition> = list
                    .elements()
                    .iter()
                    .filter(|e| {
                        !held
                            .iter()
                            .any(|(t, p)| t == e.topic() && *p == e.partition())
                    })
                    .map(|e| TopicPartition::new(e.topic(), e.partition() as u32))
                    .collect();
                // An empty assignment (more members than partitions) is said too: the worker
                // is then settled, with nothing to do.
                if !assigned.is_empty() || list.count() == 0 {
                    send_from_callback(
                        &self.events,
                        Polled::Event(ConsumerEvent::Assigned(assigned)),
                    );
                }
            }
            Rebalance::Error(e) => {
                self.drop_held_back(consumer);
                send_from_callback(
                    &self.events,
                    Polled::Error(err(format!("rebalance failed: {e}"))),
                );
            }
            Rebalance::Revoke(_) => self.drop_held_back(consumer),
        }
    }
}

/// A Kafka consumer polled on a thread of its own.
struct KafkaConsumer {
    consumer: Arc<BaseConsumer<GroupCtx>>,
    group: Option<String>,
    events: mpsc::Receiver<Polled>,
    tx: Option<mpsc::Sender<Polled>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Releases the revocation callback once the revoked partitions are committed.
    revoking: Option<std::sync::mpsc::SyncSender<()>>,
    /// Whether the revocation being released was of lost partitions.
    losing: bool,
    /// Shared with [`GroupCtx::lost`].
    lost: Arc<AtomicBool>,
    /// With exactly-once processing (group consumers only), the transport whose producer's
    /// transactions commit this consumer's offsets.
    txn: Option<Arc<Inner>>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group", &self.group)
            .finish()
    }
}

impl KafkaConsumer {
    fn new(
        config: ClientConfig,
        group: Option<String>,
        handoff_grace: Duration,
        revoke_timeout: Duration,
        lag_report: Option<LagReport>,
    ) -> Result<Self, TransportError> {
        let (tx, events) = mpsc::channel(8);
        let lost = Arc::new(AtomicBool::new(false));
        let consumer: BaseConsumer<GroupCtx> = config
            .create_with_context(GroupCtx {
                events: tx.clone(),
                revoke_timeout,
                handoff_grace,
                topics: Mutex::new(Vec::new()),
                membership: Mutex::new(Membership::default()),
                rejoin: AtomicBool::new(false),
                throttled: AtomicBool::new(false),
                held_back: Mutex::new(None),
                static_member: config.get("group.instance.id").is_some(),
                unsent: Mutex::new(Vec::new()),
                group: group.clone(),
                lost: lost.clone(),
                undelivered: std::sync::OnceLock::new(),
                lag_report,
            })
            .map_err(|e| err(format!("cannot create Kafka consumer: {e}")))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            group,
            events,
            tx: Some(tx),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            revoking: None,
            losing: false,
            lost,
            txn: None,
        })
    }

    fn assign(&self, tpl: &TopicPartitionList) -> Result<(), TransportError> {
        self.consumer
            .assign(tpl)
            .map_err(|e| err(format!("cannot assign partitions: {e}")))
    }

    /// Starts the poll thread (once).
    fn start(&mut self) -> Result<(), TransportError> {
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        let consumer = self.consumer.clone();
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("rill-kafka-poll".into())
            .spawn(move || poll_loop(consumer, tx, stop))
            .map_err(|e| err(format!("cannot start the Kafka poll thread: {e}")))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Ends the open transaction with `end`, while no record is being produced.
    async fn end_transaction(
        &self,
        end: impl FnOnce(&Inner) -> Result<(), TransportError> + Send + 'static,
    ) -> Result<(), TransportError> {
        let Some(inner) = self.txn.clone() else {
            return Ok(());
        };
        let Some(gate) = inner.txn.clone() else {
            return Ok(());
        };
        let _closed = gate.write_owned().await;
        let ending = tokio::task::spawn_blocking({
            let inner = inner.clone();
            move || end(&inner)
        });
        match tokio::time::timeout(TXN_END_LIMIT, ending).await {
            Ok(ended) => ended.map_err(|e| err(format!("transaction task failed: {e}")))?,
            Err(_) => {
                // librdkafka can block past the timeout it was given, for good when the group
                // coordinator's broker went away (confluentinc/librdkafka#5456, #5511). By now
                // the brokers have aborted the transaction (it outlived transaction.timeout.ms):
                // a new producer takes over, which fences the stuck one; the call left behind
                // ends when librdkafka lets it, and the old producer is dropped then.
                tracing::warn!(
                    target: "rill::kafka",
                    limit = ?TXN_END_LIMIT,
                    "the transaction did not end in time; a new producer takes over"
                );
                tokio::task::spawn_blocking(move || replace_producer(&inner))
                    .await
                    .map_err(|e| err(format!("transaction task failed: {e}")))??;
                Err(TransportError::TransactionAborted(format!(
                    "the transaction did not end within {TXN_END_LIMIT:?}"
                )))
            }
        }
    }

    fn release_revocation(&mut self) {
        if let Some(tx) = self.revoking.take() {
            if std::mem::take(&mut self.losing) {
                self.lost.store(false, Ordering::SeqCst);
            }
            let _ = tx.try_send(());
        }
    }
}

/// Asks the cluster for its brokers (a metadata request for no topic: unlike
/// `fetch_metadata(None, ..)`, which lists every topic of the cluster, its cost does not grow
/// with the cluster's topics). Returns how many brokers answered.
fn brokers_reached(
    producer: &ThreadedProducer<ProducerCtx>,
    timeout: Duration,
) -> Result<usize, String> {
    use rdkafka::bindings as rd;
    let rk = producer.client().native_ptr();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `rk` is a live client handle for the duration of the call (borrowed from
    // `producer`). librdkafka allocates the metadata it returns; it is read within its bounds
    // and freed with librdkafka's own function before returning; no pointer escapes.
    unsafe {
        let mut md: *const rd::rd_kafka_metadata = std::ptr::null();
        let code = rd::rd_kafka_metadata(rk, 0, std::ptr::null_mut(), &mut md, timeout_ms);
        if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let reason = std::ffi::CStr::from_ptr(rd::rd_kafka_err2str(code))
                .to_string_lossy()
                .into_owned();
            return Err(reason);
        }
        if md.is_null() {
            return Err("no metadata".to_owned());
        }
        let brokers = usize::try_from((*md).broker_cnt).unwrap_or(0);
        rd::rd_kafka_metadata_destroy(md);
        Ok(brokers)
    }
}

/// Copies polled records out of librdkafka's buffers: small keys and values into shared
/// chunks of memory (one allocation for many records instead of two per record), and each
/// topic's name once.
#[derive(Default)]
struct Copier {
    topic: Option<Arc<str>>,
    chunk: BytesMut,
}

/// Size of the chunks small keys and values are copied into; larger ones get their own.
const COPY_CHUNK: usize = 64 * 1024;

impl Copier {
    fn bytes(&mut self, data: &[u8]) -> Bytes {
        if data.is_empty() {
            return Bytes::new();
        }
        if data.len() > COPY_CHUNK / 16 {
            return Bytes::copy_from_slice(data);
        }
        if self.chunk.capacity() < data.len() {
            self.chunk = BytesMut::with_capacity(COPY_CHUNK);
        }
        self.chunk.extend_from_slice(data);
        self.chunk.split().freeze()
    }

    fn message(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), self.bytes(h.value.unwrap_or_default())))
                    .collect()
            })
            .unwrap_or_default();
        let name = match &self.topic {
            Some(t) if **t == *m.topic() => t.clone(),
            _ => self.topic.insert(Arc::from(m.topic())).clone(),
        };
        Message {
            topic: name,
            partition: m.partition() as u32,
            offset: m.offset(),
            timestamp: m.timestamp().to_millis().unwrap_or(0),
            key: m.key().map(|k| self.bytes(k)),
            value: m.payload().map(|v| self.bytes(v)),
            headers,
        }
    }
}

/// How far a consumer has read, as last told to the worker (see [`ConsumerEvent::Passed`]).
#[derive(Default)]
struct Positions {
    told: std::collections::HashMap<(String, i32), i64>,
    checked: Option<Instant>,
}

impl Positions {
    /// The partitions whose position moved since the last look, at most every
    /// [`PASSED_CHECK`]. Called once every record polled was handed over: librdkafka moves a
    /// position past a transaction marker or an aborted record when a poll skips it.
    fn moved(&mut self, consumer: &BaseConsumer<GroupCtx>) -> Option<ConsumerEvent> {
        if self.checked.is_some_and(|at| at.elapsed() < PASSED_CHECK) {
            return None;
        }
        self.checked = Some(Instant::now());
        let positions = consumer.position().ok()?;
        let mut moved = Vec::new();
        let mut told = std::collections::HashMap::with_capacity(positions.count());
        for e in positions.elements() {
            let (Offset::Offset(offset), Ok(partition)) =
                (e.offset(), u32::try_from(e.partition()))
            else {
                continue;
            };
            let key = (e.topic().to_owned(), e.partition());
            if self.told.get(&key) != Some(&offset) {
                moved.push((TopicPartition::new(e.topic(), partition), offset));
            }
            told.insert(key, offset);
        }
        self.told = told;
        (!moved.is_empty()).then_some(ConsumerEvent::Passed(moved))
    }
}

fn poll_loop(
    consumer: Arc<BaseConsumer<GroupCtx>>,
    tx: mpsc::Sender<Polled>,
    stop: Arc<AtomicBool>,
) {
    let ctx = consumer.context();
    let mut copier = Copier::default();
    let mut positions = Positions::default();
    while !stop.load(Ordering::Relaxed) {
        if ctx.throttled.load(Ordering::SeqCst) {
            // The agents are behind: poll (for rebalances, and a few records) only now and
            // then, until the worker lets reading go on.
            let until = Instant::now() + HELD_BACK_POLL;
            while ctx.throttled.load(Ordering::SeqCst)
                && Instant::now() < until
                && !stop.load(Ordering::Relaxed)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Records wait in `ctx.unsent` (not locked across `poll`, whose rebalance callbacks
        // send them first).
        let mut next = consumer.poll(POLL_WAIT);
        // Whether every record librdkafka had was polled (no early break).
        let mut drained = true;
        while let Some(polled) = next.take() {
            match polled {
                Ok(m) => {
                    let mut unsent = ctx.unsent();
                    unsent.push(copier.message(&m));
                    if unsent.len() >= MAX_BATCH {
                        drained = false;
                        break;
                    }
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    // A reader (one topic) reached the end of a partition: after the records
                    // before it, say so.
                    let topic = consumer.assignment().ok().and_then(|a| {
                        a.elements()
                            .iter()
                            .find(|e| e.partition() == p)
                            .map(|e| e.topic().to_owned())
                    });
                    if let Some(topic) = topic {
                        let ended =
                            ConsumerEvent::Ended(vec![TopicPartition::new(topic, p as u32)]);
                        if !ctx.send_unsent() || tx.blocking_send(Polled::Event(ended)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    // librdkafka reports a broker that is away on every poll: once a minute
                    // at warn, the repeats at debug.
                    let text = e.to_string();
                    if first_in_a_while(&format!("consumer error: {text}")) {
                        tracing::warn!(target: "rill::kafka", error = %text, "consumer error");
                    } else {
                        tracing::debug!(target: "rill::kafka", error = %text, "consumer error");
                    }
                    drained = false;
                    break;
                }
            }
            next = consumer.poll(Duration::ZERO);
        }
        if !ctx.send_unsent() {
            break;
        }
        if drained {
            // After the records it covers.
            if let Some(moved) = positions.moved(&consumer) {
                if tx.blocking_send(Polled::Event(moved)).is_err() {
                    break;
                }
            }
        }
        if ctx.rejoin.swap(false, Ordering::SeqCst) {
            rejoin(&consumer);
        }
        release_held_back(&consumer, &tx);
    }
    // Dropping the last handle here closes the consumer on this thread, where its
    // callbacks may block.
    drop(tx);
    drop(consumer);
}

impl Consumer for KafkaConsumer {
    fn subscribe(&mut self, topics: &[String]) -> Result<(), TransportError> {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        {
            // Held while subscribing, so a rejoin on the poll thread uses the latest topics.
            let mut current = self
                .consumer
                .context()
                .topics
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.consumer
                .subscribe(&names)
                .map_err(|e| err(format!("cannot subscribe to {topics:?}: {e}")))?;
            *current = topics.to_vec();
        }
        self.start()
    }

    fn poll(&mut self) -> BoxFuture<'_, Result<ConsumerEvent, TransportError>> {
        async move {
            self.release_revocation();
            if self.thread.is_none() {
                self.start()?;
            }
            match self.events.recv().await {
                Some(Polled::Event(e)) => Ok(e),
                Some(Polled::Revoking(tps, ack)) => {
                    self.revoking = Some(ack);
                    Ok(ConsumerEvent::Revoked(tps))
                }
                Some(Polled::Losing(tps, ack)) => {
                    self.revoking = Some(ack);
                    self.losing = true;
                    Ok(ConsumerEvent::Lost(tps))
                }
                Some(Polled::Error(e)) => Err(e),
                None => Err(err("the Kafka poll thread stopped")),
            }
        }
        .boxed()
    }

    fn commit(
        &mut self,
        offsets: Vec<(TopicPartition, i64)>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        async move {
            let mut tpl = TopicPartitionList::new();
            for (tp, o) in &offsets {
                tpl.add_partition_offset(&tp.topic, tp.partition as i32, Offset::Offset(*o))
                    .map_err(err)?;
            }
            let consumer = self.consumer.clone();
            let result = match self.txn.clone() {
                Some(_) => {
                    self.end_transaction(move |i| commit_transaction(i, &consumer, &tpl))
                        .await
                }
                None if offsets.is_empty() => Ok(()),
                None => {
                    tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                        .await
                        .map_err(|e| err(format!("commit task failed: {e}")))?
                        .map_err(|e| err(format!("commit failed: {e}")))
                }
            };
            self.release_revocation();
            result
        }
        .boxed()
    }

    fn abort(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        async move {
            if self.txn.is_none() {
                return Ok(());
            }
            match self.end_transaction(abort_transaction).await {
                // Gone either way.
                Err(TransportError::TransactionAborted(_)) => Ok(()),
                ended => ended,
            }
        }
        .boxed()
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        let tpl = tp_list(partitions);
        self.consumer
            .pause(&tpl)
            .map_err(|e| err(format!("cannot pause {}: {e}", names(partitions))))
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        let tpl = tp_list(partitions);
        self.consumer
            .resume(&tpl)
            .map_err(|e| err(format!("cannot resume {}: {e}", names(partitions))))
    }

    fn hold_back(&mut self, on: bool, _: &[TopicPartition]) -> Result<(), TransportError> {
        // Not a pause: librdkafka would drop what it fetched ahead of the paused partitions
        // (up to `queued.max.messages.kbytes`) and fetch it again after the resume, so a
        // worker catching up would read much of its input twice and stall at every resume.
        // Polling less leaves the prefetch queue full, and librdkafka stops fetching by
        // itself.
        self.consumer
            .context()
            .throttled
            .store(on, Ordering::SeqCst);
        Ok(())
    }

    fn rejoin(&mut self) -> bool {
        if self.group.is_none() {
            return false;
        }
        self.consumer.context().rejoin.store(true, Ordering::SeqCst);
        true
    }

    fn assignment_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

fn tp_list(partitions: &[TopicPartition]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for tp in partitions {
        tpl.add_partition(&tp.topic, tp.partition as i32);
    }
    tpl
}

fn names(partitions: &[TopicPartition]) -> String {
    partitions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.release_revocation();
        self.stop.store(true, Ordering::Relaxed);
        // Unblock a callback waiting to hand an event over.
        self.events.close();
        if let Some(t) = self.thread.take() {
            // The poll thread notices `stop` within `POLL_WAIT`.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    fn record(value: &str) -> OutgoingRecord {
        OutgoingRecord {
            topic: Arc::from("changes"),
            partition: 0,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            headers: Default::default(),
            timestamp: None,
        }
    }

    /// The values of topic `changes`, read from the start until `last` arrives (bounded).
    fn read_until(bootstrap: &str, last: &str) -> Vec<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "reader")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("changes", 0, Offset::Beginning)
            .expect("partition");
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut values = Vec::new();
        while Instant::now() < deadline && values.last().map(String::as_str) != Some(last) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                values.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
        }
        values
    }

    /// The handles a restore asks for end offsets with are made once and never polled, so
    /// librdkafka does not look up new partition leaders for them: after a leader's broker
    /// went away they asked it until they gave up, and a restore read only up to the stable
    /// ends, back to the race those handles are there to close. New handles are made until
    /// the ends can be compared.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn end_offsets_are_compared_again_after_a_leader_moves() {
        let cluster = MockCluster::new(3).expect("mock cluster");
        cluster.create_topic("changes", 3, 3).expect("topic");
        for p in 0..3 {
            cluster
                .partition_leader("changes", p, Some(p + 1))
                .expect("leader");
        }
        let bootstrap = cluster.bootstrap_servers();
        let config = KafkaConfig::from_url(&format!("kafka://{bootstrap}"), &BTreeMap::new())
            .expect("config");
        let transport = KafkaTransport::connect(config).await.expect("connect");
        for p in 0..3 {
            let mut r = record("v");
            r.partition = p;
            transport.enqueue(r).await.expect("queued");
        }
        transport.flush().await.expect("delivered");
        let inner = transport.inner.clone();
        let first = tokio::task::spawn_blocking(move || ends_after_settling(&inner, "changes"))
            .await
            .expect("task")
            .expect("ends");
        assert_eq!(first, Ends::Settled(vec![1, 1, 1]));

        // Broker 1, the leader of partition 0, goes away; broker 2 leads it now.
        cluster
            .partition_leader("changes", 0, Some(2))
            .expect("new leader");
        cluster.broker_down(1).expect("broker down");
        let inner = transport.inner.clone();
        let asked = Instant::now();
        let second = tokio::task::spawn_blocking(move || ends_after_settling(&inner, "changes"))
            .await
            .expect("task")
            .expect("ends");
        assert_eq!(
            second,
            Ends::Settled(vec![1, 1, 1]),
            "the ends were not compared after the leader moved"
        );
        assert!(
            asked.elapsed() < SETTLE_WAIT,
            "comparing took {:?}",
            asked.elapsed()
        );
    }

    /// What a worker had queued when its partitions were lost (table changes above all) never
    /// reaches the log, where it would land after the partitions' new owner's writes; what is
    /// sent afterwards is delivered as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_undelivered_when_partitions_are_lost_never_reach_the_log() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("changes", 1, 1).expect("topic");
        let bootstrap = cluster.bootstrap_servers();
        let config = KafkaConfig::from_url(&format!("kafka://{bootstrap}"), &BTreeMap::new())
            .expect("config");
        let transport = KafkaTransport::connect(config).await.expect("connect");
        transport.enqueue(record("first")).await.expect("queued");
        transport.flush().await.expect("delivered");

        // The broker is away: what is queued now waits in the producer.
        cluster.broker_down(1).expect("broker down");
        transport.enqueue(record("stale")).await.expect("queued");
        let flushing = transport.clone();
        let waiting = tokio::spawn(async move { flushing.flush().await });
        transport.discard_undelivered();
        // A flush waiting on the thrown-away records returns, and reports no lost output.
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the flush returns once the records are thrown away")
            .expect("flush task")
            .expect("thrown-away records are not lost outputs");
        cluster.broker_up(1).expect("broker up");

        transport.enqueue(record("fresh")).await.expect("queued");
        tokio::time::timeout(Duration::from_secs(30), transport.flush())
            .await
            .expect("delivered in time")
            .expect("delivered");
        let values = tokio::task::spawn_blocking(move || read_until(&bootstrap, "fresh"))
            .await
            .expect("reader");
        assert_eq!(values, ["first", "fresh"]);
    }
}
