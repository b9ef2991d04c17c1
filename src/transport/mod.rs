//! The boundary between rill and a message log.
//!
//! A [`Transport`] is a partitioned, offset-addressed log with consumer groups: the embedded
//! `memory` transport implements it in-process, and the Kafka transport on a cluster. Agents,
//! streams and commits are written against these traits only, so an app runs unchanged on
//! either. The `remote` transport (`remote://HOST:PORT`) reaches the embedded broker of a
//! worker running in another process, through that worker's web server: what the command
//! line of an embedded app uses when a worker of the app runs (see
//! [`Settings::datadir`](crate::Settings::datadir)).
//!
//! # Idempotent writers
//!
//! A client may send a record again when it did not hear whether the first try arrived. The
//! remote transport numbers its records so that the broker keeps only one copy: each record
//! carries two headers,
//!
//! - [`PRODUCER_ID_HEADER`] (`rill-producer-id`): the writer's id, random per connection (16
//!   hexadecimal digits);
//! - [`PRODUCER_SEQ_HEADER`] (`rill-producer-seq`): the record's sequence number, in decimal
//!   ASCII, rising with each record the writer sends.
//!
//! For each partition, the embedded broker ([`MemoryBroker`]) remembers each writer's latest
//! sequence numbers (its last 1024 records, for a day after its last write) and the offsets
//! they got; a record whose sequence number it has seen is not appended again, and is answered
//! with the offset of the first write, as Kafka answers its idempotent producer. The headers
//! stay on the stored record, so a log rebuilt by appending its records again learns the same.
//! Agents see them in [`Message::headers`] only.

use crate::error::TransportError;
use bytes::Bytes;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub(crate) mod file;
#[cfg(feature = "kafka")]
pub(crate) mod kafka;
pub(crate) mod memory;
pub(crate) mod remote;

#[doc(inline)]
pub use file::{FileBroker, FileTransport, Fsync};
#[doc(inline)]
pub use memory::MemoryBroker;

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number, from 0.
    pub partition: u32,
}

impl TopicPartition {
    /// A topic partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// The header naming the writer of a record, for idempotent appends (see
/// [idempotent writers](self#idempotent-writers)).
pub const PRODUCER_ID_HEADER: &str = "rill-producer-id";

/// The header numbering a writer's records, for idempotent appends (see
/// [idempotent writers](self#idempotent-writers)).
pub const PRODUCER_SEQ_HEADER: &str = "rill-producer-seq";

/// Message headers: ordered name/value pairs, as in Kafka.
pub type Headers = Vec<(String, Bytes)>;

/// A record to append to a topic partition. rill picks the partition before the transport sees
/// the record, so keyed records land in the same partition on every transport.
#[derive(Debug, Clone)]
pub struct OutgoingRecord {
    /// Destination topic.
    pub topic: Arc<str>,
    /// Destination partition.
    pub partition: u32,
    /// Encoded key, if any.
    pub key: Option<Bytes>,
    /// Encoded value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Headers,
    /// Timestamp in milliseconds since the Unix epoch; the transport fills in "now" when `None`.
    pub timestamp: Option<i64>,
}

/// Where a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPosition {
    /// Partition written to.
    pub partition: u32,
    /// Offset of the record.
    pub offset: i64,
}

/// A record read from a topic partition.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic it was read from.
    pub topic: Arc<str>,
    /// Partition it was read from.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Timestamp in milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Encoded key.
    pub key: Option<Bytes>,
    /// Encoded value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Headers,
}

impl Message {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find_map(|(k, v)| (k == name).then_some(v))
    }
}

/// What a consumer's [`poll`](Consumer::poll) returns.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// Records, in offset order within each partition.
    Messages(Vec<Message>),
    /// The group gave this consumer these partitions.
    Assigned(Vec<TopicPartition>),
    /// The group took these partitions away; commit what was processed of them.
    Revoked(Vec<TopicPartition>),
    /// The group took these partitions without a handover (this member's session expired, so
    /// other members may own them already): nothing may be committed or written for them any
    /// more, and what was processed of them since the last commit is given up (their next
    /// owner processes it again). The transport has thrown away records it had not delivered.
    Lost(Vec<TopicPartition>),
    /// A reader reached the end of these partitions (for read-committed readers of
    /// transactional topics: their last committed record). Only readers report it.
    Ended(Vec<TopicPartition>),
    /// The consumer has read each partition up to this offset (the next one it will read),
    /// after the records it delivered before this event. It moves past what is never
    /// delivered: Kafka's transaction markers, records of aborted transactions. Once what was
    /// delivered is processed, everything below the offset is, and the commit may say so (a
    /// committed offset stuck on a marker would show lag that is not there). Logs of records
    /// only never need it.
    Passed(Vec<(TopicPartition, i64)>),
}

/// Where a manually assigned consumer starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first record still in the log.
    Earliest,
    /// Only records appended from now on.
    Latest,
}

/// A topic the app needs, with the shape it needs it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Replication factor (ignored by the embedded transport).
    pub replication_factor: i16,
    /// Whether the topic is compacted (changelogs).
    pub compacted: bool,
    /// How long the topic keeps records, where the app set it.
    pub retention: Retention,
}

/// How much of a topic's past is kept: Kafka's `retention.ms` and `retention.bytes`.
///
/// A limit left unset is the transport's default: on Kafka the broker's (`log.retention.hours`,
/// `log.retention.bytes`), on the embedded transport [`MemoryBroker::DEFAULT_RETENTION_TIME`]
/// and [`MemoryBroker::DEFAULT_RETENTION_BYTES`]. Set them per topic with
/// [`Topic::retention_time`](crate::Topic::retention_time) and
/// [`Topic::retention_bytes`](crate::Topic::retention_bytes); Kafka receives them as the
/// topic's configuration when rill creates it.
///
/// On the embedded transport the limits only apply to records no consumer group still needs:
/// a record a group has not committed is kept whatever its age or the partition's size (see
/// [`MemoryBroker`]). Compacted topics (changelogs) are not trimmed by age or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Records older than this may be removed (`retention.ms`).
    pub time: Option<Duration>,
    /// A partition may be trimmed, oldest records first, to about this many bytes
    /// (`retention.bytes`, per partition).
    pub bytes: Option<u64>,
}

/// A message log rill can run on.
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Short name for logs and the start-up banner, e.g. `memory`.
    fn kind(&self) -> &'static str;

    /// Whether every worker of the app runs in this process (the embedded transports,
    /// `memory://` and `file://`): nobody else reads or writes its log.
    fn embedded(&self) -> bool {
        false
    }

    /// Whether the app's group divides partitions with range assignment (per topic, over the
    /// members in a fixed order), so that who takes a partition over when a worker leaves can
    /// be predicted: standby replicas are placed on that worker.
    fn range_assignment(&self) -> bool {
        true
    }

    /// Creates the topic if missing. An existing topic with another partition count is
    /// [`TransportError::PartitionMismatch`]. Returns the partition count.
    fn ensure_topic(&self, spec: TopicSpec) -> BoxFuture<'_, Result<u32, TransportError>>;

    /// Deletes a topic this worker made for itself (its temporary reply topic); a topic that
    /// does not exist is not an error. `memory://` keeps its topics (they end with the
    /// process); `file://` deletes them from its log.
    fn delete_topic(&self, name: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let _ = name;
        Box::pin(async { Ok(()) })
    }

    /// Partition count of an existing topic, or `None` if it does not exist.
    fn partition_count(&self, topic: &str) -> BoxFuture<'_, Result<Option<u32>, TransportError>>;

    /// Appends a record and resolves once the log has it.
    fn send(&self, record: OutgoingRecord)
        -> BoxFuture<'_, Result<RecordPosition, TransportError>>;

    /// Queues a record without waiting for the log to acknowledge it; it is durable once
    /// [`flush`](Transport::flush) returns. Failures are reported by the next flush.
    fn enqueue(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Queues a record as [`enqueue`](Transport::enqueue) does, without waiting: the record
    /// comes back when that would need to wait (a full queue, say); the default always gives
    /// it back. The hot path of sinks, which saves a future per record.
    // The record comes back by value: boxing it would cost the allocation this saves.
    #[allow(clippy::result_large_err)]
    fn try_enqueue(
        &self,
        record: OutgoingRecord,
    ) -> Result<Result<(), TransportError>, OutgoingRecord> {
        Err(record)
    }

    /// Waits until every record sent or queued so far is durable in the log.
    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Throws away the records sent or queued so far that the log does not have yet (their
    /// senders hear of a failure), when this worker's partitions were lost (see
    /// [`ConsumerEvent::Lost`]). Transactional and embedded logs need not: an aborted
    /// transaction discards its records, and the embedded log has no other writer.
    fn discard_undelivered(&self) {}

    /// The end offset (high watermark: the offset the next record will get) of every partition
    /// of `topic`, by partition.
    fn end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>>;

    /// The end offsets of `topic` once no transaction is open on it: what a table restore
    /// must read up to. A transaction that just committed may not have its markers written
    /// yet, and until they are, a read-committed reader ends before its records (a restore
    /// ending there would miss the last changes of the partition's previous owner, whose
    /// input offsets are committed). Transports without transactions answer
    /// [`end_offsets`](Transport::end_offsets).
    fn settled_end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>> {
        self.end_offsets(topic)
    }

    /// A consumer in the consumer group `group`. It receives partitions once it subscribes.
    fn group_consumer(&self, group: &str) -> Result<Box<dyn Consumer>, TransportError>;

    /// A consumer outside any group, reading every partition of `topic`.
    fn topic_consumer(
        &self,
        topic: &str,
        start: StartAt,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>>;

    /// A consumer outside any group, reading the given partitions of `topic`, each from the
    /// given offset (table recovery reads changelog partitions this way).
    fn partitions_consumer(
        &self,
        topic: &str,
        starts: Vec<(u32, i64)>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>>;

    /// The offsets `group` has committed: the next offset to read, per partition.
    fn committed(
        &self,
        group: &str,
    ) -> BoxFuture<'_, Result<Vec<(TopicPartition, i64)>, TransportError>>;
}

/// Told what a transport learns of its group consumer's lag: the group, a partition, and how
/// many records it lags behind the partition's end. The layer above installs it (to feed its
/// metrics); a transport reports through it and knows nothing of what listens.
#[cfg(feature = "kafka")]
pub(crate) type LagReport = Arc<dyn Fn(&str, TopicPartition, i64) + Send + Sync>;

/// Reads records from a transport.
pub trait Consumer: Send + fmt::Debug {
    /// Replaces the consumer's subscription with `topics` (group consumers only).
    fn subscribe(&mut self, topics: &[String]) -> Result<(), TransportError>;

    /// The next batch of records or the next rebalance.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, no record is lost; the next
    /// call returns it.
    fn poll(&mut self) -> BoxFuture<'_, Result<ConsumerEvent, TransportError>>;

    /// Commits, for each partition, the next offset to read. With exactly-once on Kafka this
    /// commits the producer's transaction with the offsets in it (with no offsets, only what
    /// was produced); a failed one is aborted and reported as
    /// [`TransportError::TransactionAborted`].
    fn commit(
        &mut self,
        offsets: Vec<(TopicPartition, i64)>,
    ) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Discards what was produced since the last commit, where the transport can (an
    /// exactly-once Kafka worker aborts its transaction); elsewhere nothing happens.
    fn abort(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    /// Stops fetching records of `partitions` (group consumers): records already fetched may
    /// still come; rebalances are still reported. How a worker holds back a topic whose agent
    /// is busy without leaving the group.
    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError>;

    /// Fetches records of `partitions` again, from the first one not yet returned.
    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError>;

    /// Holds reading back (`on`) while the worker's agents are behind, or lets it go on;
    /// `partitions` are those assigned. Records already read may still come, and rebalances
    /// are still reported. By default the partitions are paused and resumed; a transport can
    /// slow its polling down instead, which keeps what it fetched ahead (the Kafka consumer:
    /// librdkafka drops a paused partition's prefetched records and fetches them again).
    fn hold_back(&mut self, on: bool, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        if on {
            self.pause(partitions)
        } else {
            self.resume(partitions)
        }
    }

    /// Leaves the group and joins it again, so every partition is revoked and assigned anew
    /// from the committed offsets: how a worker rolls back to its last commit. A consumer that
    /// cannot (the embedded transport's, where nothing needs it) returns `false`.
    fn rejoin(&mut self) -> bool {
        false
    }

    /// Whether the group took this consumer's partitions without a handover and the worker
    /// has not let them go yet (a [`ConsumerEvent::Lost`] is on its way): until then nothing
    /// may be committed, nor table changes written, since the partitions' new owners may be
    /// writing already.
    fn assignment_lost(&self) -> bool {
        false
    }
}
