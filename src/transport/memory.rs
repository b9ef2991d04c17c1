//! The embedded transport: a partitioned in-memory log with consumer groups.
//!
//! Each topic partition is a queue of records addressed by offset. Consumer groups divide
//! partitions between their members with range assignment, per topic, and keep committed
//! offsets, so at-least-once semantics are the same as on Kafka: a restarted consumer resumes
//! from the last commit.
//!
//! Memory stays bounded as on a Kafka broker's disk: a partition forgets the records every
//! consumer group reading it has committed, trims what no group reads by size and age
//! ([`Retention`](super::Retention)), and a compacted topic keeps the latest record of each
//! key. Offsets never move: a partition keeps its log-start offset, and a read below it starts
//! there, as a Kafka consumer with `auto.offset.reset=earliest` does.
//!
//! Appends are idempotent for writers that number their records (the remote transport does,
//! see [`PRODUCER_ID_HEADER`](super::PRODUCER_ID_HEADER)): a record carrying a producer id and
//! a sequence number the partition already holds is not appended again; the append answers
//! with the position of the first write, as Kafka's idempotent producer is answered.

use super::{
    Consumer, ConsumerEvent, Message, OutgoingRecord, RecordPosition, StartAt, TopicPartition,
    TopicSpec, Transport,
};
use crate::error::TransportError;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Most records a consumer returns from one poll.
const MAX_POLL_RECORDS: usize = 1024;

/// How many of a producer's latest records each partition remembers (sequence number and
/// offset), so that a retried batch of up to this many records is answered from them.
const PRODUCER_WINDOW: usize = 1024;

/// How long a partition remembers a producer that wrote nothing since, in milliseconds (Kafka's
/// `producer.id.expiration.ms`, one day).
pub(crate) const PRODUCER_EXPIRY_MS: i64 = 24 * 3600 * 1000;

/// Records a compacted partition may hold that a later record of the same key replaced before
/// it is compacted (and at least as many as it holds live).
const COMPACT_AFTER: usize = 1024;

struct Stored {
    offset: i64,
    timestamp: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: super::Headers,
}

/// What a record is counted as against `retention.bytes`: its payload and what the log spends
/// on it besides.
const RECORD_OVERHEAD: u64 = std::mem::size_of::<Stored>() as u64;

impl Stored {
    fn size(&self) -> u64 {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
        let headers: u64 = self
            .headers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum();
        RECORD_OVERHEAD + len(&self.key) + len(&self.value) + headers
    }
}

/// What a topic keeps, with the defaults filled in.
#[derive(Debug, Clone, Copy)]
struct Policy {
    compacted: bool,
    /// `retention.ms`.
    time_ms: i64,
    /// `retention.bytes`, per partition.
    bytes: u64,
}

impl Policy {
    fn new(spec: &TopicSpec) -> Self {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self {
            compacted: spec.compacted,
            time_ms: ms(spec
                .retention
                .time
                .unwrap_or(MemoryBroker::DEFAULT_RETENTION_TIME)),
            bytes: spec
                .retention
                .bytes
                .unwrap_or(MemoryBroker::DEFAULT_RETENTION_BYTES),
        }
    }
}

/// One partition's records, oldest first, with the offsets around them.
#[derive(Default)]
struct Log {
    /// The log-start offset: records below it are gone; a read below it starts here.
    start: i64,
    /// The offset the next record gets (the high watermark).
    end: i64,
    /// The records kept, by offset; a compacted log has gaps.
    records: VecDeque<Stored>,
    /// What the records count for against `retention.bytes`.
    bytes: u64,
    /// The lowest offset a consumer group reading this partition has not committed, or `None`
    /// when no group reads it (then size and age decide what is kept).
    needed: Option<i64>,
    /// Compacted logs: the offset of each key's latest record.
    latest: HashMap<Bytes, i64>,
    /// Compacted logs: records kept that a later record replaced.
    replaced: usize,
    /// Idempotent writers: by producer id, the sequence numbers and offsets of their latest
    /// records here.
    producers: HashMap<Bytes, Produced>,
}

/// What a partition remembers of one idempotent writer.
#[derive(Default)]
struct Produced {
    /// Its latest records here, oldest first: sequence number and offset.
    recent: VecDeque<(u64, i64)>,
    /// When it last wrote here (milliseconds since the Unix epoch).
    at: i64,
    /// Its last sequence number here before the log was loaded (see
    /// [`MemoryBroker::restore_producer`]): records up to it are written, even those `recent`
    /// no longer has.
    known_below: Option<u64>,
}

/// The producer id and sequence number a record carries (headers
/// [`PRODUCER_ID_HEADER`](super::PRODUCER_ID_HEADER) and
/// [`PRODUCER_SEQ_HEADER`](super::PRODUCER_SEQ_HEADER)), if it carries a producer id; an error
/// says what is wrong with a sequence number that is missing or not a decimal number.
pub(crate) fn producer_of(headers: &super::Headers) -> Option<Result<(Bytes, u64), String>> {
    let id = headers
        .iter()
        .find_map(|(k, v)| (k == super::PRODUCER_ID_HEADER).then_some(v))?;
    let seq = headers
        .iter()
        .find_map(|(k, v)| (k == super::PRODUCER_SEQ_HEADER).then_some(v));
    let parsed = match seq {
        None => Err(format!(
            "a record with a {} header needs a {} header",
            super::PRODUCER_ID_HEADER,
            super::PRODUCER_SEQ_HEADER
        )),
        Some(seq) => std::str::from_utf8(seq)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                format!(
                    "header {} is {:?}, not a decimal sequence number",
                    super::PRODUCER_SEQ_HEADER,
                    String::from_utf8_lossy(seq)
                )
            }),
    };
    Some(parsed.map(|seq| (id.clone(), seq)))
}

impl Log {
    fn append(&mut self, record: Stored, policy: &Policy, now: i64) {
        self.end = record.offset + 1;
        self.bytes += record.size();
        if policy.compacted {
            let replaces = match &record.key {
                Some(k) => self.latest.insert(k.clone(), record.offset).is_some(),
                // Kafka refuses keyless records on a compacted topic; here the next one
                // replaces them.
                None => true,
            };
            self.replaced += usize::from(replaces);
        }
        self.records.push_back(record);
        if policy.compacted {
            if self.replaced >= COMPACT_AFTER && self.replaced * 2 >= self.records.len() {
                self.compact(now);
            }
        } else if self.needed.is_none() {
            self.expire(policy, now);
        }
    }

    /// The offset this partition gave the record `seq` of producer `id`, if it has it already:
    /// `Ok(None)` for a record it has not seen (a sequence number above the producer's last
    /// one here); an error for one below the last that it does not remember (older than the
    /// last [`PRODUCER_WINDOW`] records, or sent out of order).
    fn written(&self, id: &Bytes, seq: u64) -> Result<Option<i64>, String> {
        let Some(&(last, _)) = self.producers.get(id).and_then(|p| p.recent.back()) else {
            return Ok(None);
        };
        if seq > last {
            return Ok(None);
        }
        let recent = &self.producers[id].recent;
        match recent.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(i) => Ok(Some(recent[i].1)),
            // Written before the log was loaded, and removed since (committed by every group
            // reading it): a retry of it is answered as written, without its offset, as Kafka
            // answers a duplicate it no longer holds.
            Err(_) if self.producers[id].known_below.is_some_and(|k| seq <= k) => Ok(Some(-1)),
            Err(_) => Err(format!(
                "record {seq} of producer {} is below its last one here ({last}) and is not one \
                 of the last {PRODUCER_WINDOW} it wrote: an old duplicate, or records sent out \
                 of order",
                String::from_utf8_lossy(id)
            )),
        }
    }

    /// Remembers that record `seq` of producer `id` got `offset`. Every append of a record
    /// with a producer id goes through here, so a log rebuilt by appending its records again
    /// (a durable log read at start-up) rebuilds what it remembers too.
    fn wrote(&mut self, id: Bytes, seq: u64, offset: i64, now: i64) {
        if !self.producers.contains_key(&id) {
            // A new producer: forget the ones gone quiet, so their number stays bounded.
            self.producers
                .retain(|_, p| p.at >= now.saturating_sub(PRODUCER_EXPIRY_MS));
        }
        let p = self.producers.entry(id).or_default();
        p.recent.push_back((seq, offset));
        if p.recent.len() > PRODUCER_WINDOW {
            p.recent.pop_front();
        }
        p.at = now;
    }

    /// Removes records below `offset`, which every group reading the partition committed.
    fn forget_below(&mut self, offset: i64) {
        let offset = offset.min(self.end);
        while self.records.front().is_some_and(|r| r.offset < offset) {
            self.pop_front();
        }
        self.start = self.start.max(offset);
        self.shrink();
    }

    /// Removes the oldest records while the partition is over its size or they are over its
    /// age; the newest record stays (as Kafka keeps its active segment).
    fn expire(&mut self, policy: &Policy, now: i64) {
        let cutoff = now.saturating_sub(policy.time_ms);
        while self.records.len() > 1
            && self
                .records
                .front()
                .is_some_and(|r| self.bytes > policy.bytes || r.timestamp < cutoff)
        {
            self.pop_front();
        }
        self.shrink();
    }

    fn pop_front(&mut self) {
        if let Some(r) = self.records.pop_front() {
            self.bytes = self.bytes.saturating_sub(r.size());
            self.start = self.records.front().map_or(self.end, |n| n.offset);
        }
    }

    /// Keeps the latest record of each key, as Kafka's log cleaner does: a delete marker
    /// (tombstone) stays while it is the latest of its key for `delete.retention.ms`, so that
    /// a reader part-way through sees the delete; the newest record always stays.
    fn compact(&mut self, now: i64) {
        let last = self.end - 1;
        let cutoff = now.saturating_sub(MemoryBroker::DELETE_RETENTION_MS);
        let latest = &mut self.latest;
        let mut bytes = self.bytes;
        self.records.retain(|r| {
            let keep = r.offset == last
                || match &r.key {
                    Some(k) if latest.get(k) == Some(&r.offset) => {
                        let expired = r.value.is_none() && r.timestamp < cutoff;
                        if expired {
                            latest.remove(k);
                        }
                        !expired
                    }
                    _ => false,
                };
            if !keep {
                bytes = bytes.saturating_sub(r.size());
            }
            keep
        });
        self.bytes = bytes;
        self.replaced = 0;
        self.shrink();
    }

    /// Gives back what the queue grew to when it held many more records.
    fn shrink(&mut self) {
        let (len, cap) = (self.records.len(), self.records.capacity());
        if cap > 4096 && len < cap / 4 {
            self.records.shrink_to(len * 2);
        }
        if self.latest.capacity() > 4096 && self.latest.len() < self.latest.capacity() / 4 {
            self.latest.shrink_to(self.latest.len() * 2);
        }
    }
}

#[derive(Default)]
struct Partition {
    log: RwLock<Log>,
    watchers: Mutex<Vec<Arc<Notify>>>,
}

impl Partition {
    /// The high watermark: the offset the next record gets.
    fn end(&self) -> i64 {
        read(&self.log).end
    }

    /// The log-start offset.
    fn start(&self) -> i64 {
        read(&self.log).start
    }

    fn watch(&self, notify: &Arc<Notify>) {
        lock(&self.watchers).push(notify.clone());
    }

    fn unwatch(&self, notify: &Arc<Notify>) {
        lock(&self.watchers).retain(|w| !Arc::ptr_eq(w, notify));
    }
}

struct Topic {
    name: Arc<str>,
    policy: Policy,
    partitions: Vec<Partition>,
}

/// An in-memory broker: topics, consumer groups and their committed offsets.
///
/// `memory://` gives each [`App`](crate::App) a broker of its own; `memory://NAME` names a
/// broker shared by every app of the process that uses the same name.
///
/// # What is kept
///
/// The broker holds records in memory, so it keeps no more of them than Kafka would keep on
/// disk, and never loses one a consumer group still needs:
///
/// - A partition that consumer groups read (a group subscribes to its topic, or has committed
///   an offset of it) forgets the records below the lowest offset those groups committed. A
///   group that has not caught up loses nothing it has not committed, however far behind it
///   is; a group that subscribed without committing yet keeps the whole partition.
/// - A partition no group reads keeps its newest records up to the topic's
///   [`Retention`](super::Retention): about [`DEFAULT_RETENTION_BYTES`](Self::DEFAULT_RETENTION_BYTES) per
///   partition and [`DEFAULT_RETENTION_TIME`](Self::DEFAULT_RETENTION_TIME) unless the topic
///   says otherwise ([`Topic::retention_bytes`](crate::Topic::retention_bytes),
///   [`Topic::retention_time`](crate::Topic::retention_time)). A record counts its key, value
///   and headers and what the broker spends on it besides (about a hundred bytes).
/// - A compacted topic (a table's changelog) keeps the latest record of each key, and is not
///   trimmed by size or age, like Kafka's `cleanup.policy=compact`. A delete (tombstone) is
///   kept while it is its key's latest record for
///   [`DELETE_RETENTION_MS`](Self::DELETE_RETENTION_MS), then removed at the next compaction.
///
/// Offsets stay as they were: a partition's [`start_offset`](Self::start_offset) rises as
/// records are removed, and a consumer asked to read below it (a new group, a reader from the
/// beginning) starts there, as a Kafka consumer with `auto.offset.reset=earliest` does. A
/// compacted partition keeps its offsets with gaps between them.
///
/// Records are removed when the committed offsets move (at each commit) and as records are
/// added. So while an agent runs, the broker holds what its group has read and not committed
/// yet: by default at most about 10,000 records, as a worker on this transport commits every
/// [`commit_interval`](crate::Settings::commit_interval) or every
/// [`commit_every`](crate::Settings::commit_every) records read.
#[derive(Default)]
pub struct MemoryBroker {
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    groups: Mutex<HashMap<String, Group>>,
    offsets: Mutex<HashMap<String, BTreeMap<TopicPartition, i64>>>,
    /// Held while deciding what a topic keeps, so that two decisions do not cross.
    retention: Mutex<()>,
    next_member: AtomicU64,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("topics", &read(&self.topics).len())
            .finish()
    }
}

#[derive(Default)]
struct Group {
    members: BTreeMap<u64, Member>,
    /// Partitions revoked from a member that has not yet confirmed it committed them; they are
    /// given to their new owner only then, as Kafka's group protocol does.
    releasing: BTreeMap<TopicPartition, u64>,
}

struct Member {
    topics: Vec<String>,
    assigned: Vec<TopicPartition>,
    inbox: Arc<Inbox>,
}

/// Rebalance events waiting for a member, and the member's wake-up.
#[derive(Default)]
struct Inbox {
    events: Mutex<VecDeque<ConsumerEvent>>,
    notify: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl MemoryBroker {
    /// How long a partition no consumer group reads keeps records, unless its topic says
    /// otherwise: Kafka's default `retention.ms`, 7 days.
    pub const DEFAULT_RETENTION_TIME: Duration = Duration::from_secs(7 * 24 * 3600);

    /// About how many bytes a partition no consumer group reads keeps, unless its topic says
    /// otherwise: 4 MiB, some 30,000 small JSON records (Kafka's `retention.bytes` has no
    /// limit, but a Kafka broker keeps records on disk, not in the worker's memory).
    pub const DEFAULT_RETENTION_BYTES: u64 = 4 << 20;

    /// How long a compacted topic keeps a delete marker that is its key's latest record, in
    /// milliseconds: Kafka's `delete.retention.ms`, one day.
    pub const DELETE_RETENTION_MS: i64 = 24 * 3600 * 1000;

    /// A new, empty broker.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The process-wide broker called `name` (what `memory://NAME` connects to).
    pub fn named(name: &str) -> Arc<Self> {
        static NAMED: OnceLock<Mutex<HashMap<String, Arc<MemoryBroker>>>> = OnceLock::new();
        lock(NAMED.get_or_init(Default::default))
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, TransportError> {
        read(&self.topics)
            .get(name)
            .cloned()
            .ok_or_else(|| TransportError::UnknownTopic(name.to_owned()))
    }

    fn create(&self, spec: &TopicSpec) -> Result<u32, TransportError> {
        let mut topics = write(&self.topics);
        if let Some(t) = topics.get(&spec.name) {
            let actual = t.partitions.len() as u32;
            if actual != spec.partitions {
                return Err(TransportError::PartitionMismatch {
                    topic: spec.name.clone(),
                    declared: spec.partitions,
                    actual,
                });
            }
            return Ok(actual);
        }
        if spec.partitions == 0 {
            return Err(TransportError::Other(format!(
                "topic {:?} must have at least one partition",
                spec.name
            )));
        }
        let topic = Topic {
            name: Arc::from(spec.name.as_str()),
            policy: Policy::new(spec),
            partitions: (0..spec.partitions).map(|_| Partition::default()).collect(),
        };
        topics.insert(spec.name.clone(), Arc::new(topic));
        drop(topics);
        // A group subscribed to this name before it existed gets its partitions now, and
        // keeps what it has not read from the first record.
        self.apply_retention(&spec.name);
        let groups: Vec<String> = lock(&self.groups).keys().cloned().collect();
        for g in groups {
            self.rebalance(&g);
        }
        Ok(spec.partitions)
    }

    /// Appends a record; returns its offset. A record of an idempotent writer that the
    /// partition holds already is not appended again: the answer is the first write's
    /// position (see [idempotent writers](super#idempotent-writers)).
    fn append(&self, record: OutgoingRecord) -> Result<RecordPosition, TransportError> {
        let topic = self.topic(&record.topic)?;
        let partitions = topic.partitions.len() as u32;
        let part = topic
            .partitions
            .get(record.partition as usize)
            .ok_or_else(|| TransportError::UnknownPartition {
                topic: record.topic.to_string(),
                partition: record.partition,
                partitions,
            })?;
        let refused = |reason: String| {
            TransportError::Rejected(format!("{}[{}]: {reason}", record.topic, record.partition))
        };
        let producer = match producer_of(&record.headers) {
            None => None,
            Some(Ok(producer)) => Some(producer),
            Some(Err(e)) => return Err(refused(e)),
        };
        let now = now_millis();
        let offset = {
            let mut log = write(&part.log);
            if let Some((id, seq)) = &producer {
                // A retried record: answer with where the first write put it.
                match log.written(id, *seq) {
                    Ok(Some(offset)) => {
                        return Ok(RecordPosition {
                            partition: record.partition,
                            offset,
                        })
                    }
                    Ok(None) => {}
                    Err(e) => return Err(refused(e)),
                }
            }
            let offset = log.end;
            let stored = Stored {
                offset,
                timestamp: record.timestamp.unwrap_or(now),
                key: record.key,
                value: record.value,
                headers: record.headers,
            };
            log.append(stored, &topic.policy, now);
            if let Some((id, seq)) = producer {
                log.wrote(id, seq, offset, now);
            }
            offset
        };
        for w in lock(&part.watchers).iter() {
            w.notify_one();
        }
        Ok(RecordPosition {
            partition: record.partition,
            offset,
        })
    }

    /// A partition's end offset (high watermark): the offset its next record gets.
    pub fn end_offset(&self, topic: &str, partition: u32) -> Option<i64> {
        let t = self.topic(topic).ok()?;
        t.partitions.get(partition as usize).map(Partition::end)
    }

    /// A partition's log-start offset: the records below it were removed (see
    /// [what is kept](MemoryBroker#what-is-kept)).
    pub fn start_offset(&self, topic: &str, partition: u32) -> Option<i64> {
        let t = self.topic(topic).ok()?;
        t.partitions.get(partition as usize).map(Partition::start)
    }

    /// How many records a partition holds now.
    pub fn record_count(&self, topic: &str, partition: u32) -> Option<usize> {
        let t = self.topic(topic).ok()?;
        let part = t.partitions.get(partition as usize)?;
        let n = read(&part.log).records.len();
        Some(n)
    }

    /// Reads up to `max` records from a partition starting at `offset` (or at the first record
    /// kept after it), for inspection in tests and tools.
    pub fn read(&self, topic: &str, partition: u32, offset: i64, max: usize) -> Vec<Message> {
        let Ok(t) = self.topic(topic) else {
            return Vec::new();
        };
        let Some(part) = t.partitions.get(partition as usize) else {
            return Vec::new();
        };
        read_from(&t, partition, part, offset.max(0), max)
    }

    /// Waits until a partition of `from` (partition, offset) of `topic` has a record at or past
    /// its offset, or until `timeout` passes; returns whether one has. For readers in other
    /// processes, which wait on the broker's web server (see the remote transport).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub(crate) async fn wait_for_records(
        &self,
        topic: &str,
        from: &[(u32, i64)],
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        let t = self.topic(topic)?;
        let has_records = || {
            from.iter().any(|(p, offset)| {
                t.partitions
                    .get(*p as usize)
                    .is_some_and(|part| part.end() > *offset)
            })
        };
        let watching = Watching {
            topic: t.clone(),
            partitions: from.iter().map(|(p, _)| *p as usize).collect(),
            notify: Arc::new(Notify::new()),
        };
        for p in &watching.partitions {
            if let Some(part) = t.partitions.get(*p) {
                part.watch(&watching.notify);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if has_records() {
                return Ok(true);
            }
            let woken = tokio::time::timeout_at(deadline, watching.notify.notified()).await;
            if woken.is_err() {
                return Ok(has_records());
            }
        }
    }

    /// The offsets `group` committed: for each partition, the next offset it will read.
    pub fn committed(&self, group: &str) -> Vec<(TopicPartition, i64)> {
        lock(&self.offsets)
            .get(group)
            .map(|m| m.iter().map(|(tp, o)| (tp.clone(), *o)).collect())
            .unwrap_or_default()
    }

    /// Partition count of `topic`, if it exists.
    pub fn partitions(&self, topic: &str) -> Option<u32> {
        self.topic(topic).ok().map(|t| t.partitions.len() as u32)
    }

    fn join(&self, group: &str, topics: Vec<String>, inbox: Arc<Inbox>) -> u64 {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        lock(&self.groups)
            .entry(group.to_owned())
            .or_default()
            .members
            .insert(
                id,
                Member {
                    topics: topics.clone(),
                    assigned: Vec::new(),
                    inbox,
                },
            );
        // The group needs the records from now on, before it is given partitions.
        for t in &topics {
            self.apply_retention(t);
        }
        self.rebalance(group);
        id
    }

    fn resubscribe(&self, group: &str, id: u64, topics: Vec<String>) {
        let mut touched = topics.clone();
        if let Some(m) = lock(&self.groups)
            .get_mut(group)
            .and_then(|g| g.members.get_mut(&id))
        {
            touched.extend(std::mem::replace(&mut m.topics, topics));
        }
        touched.sort();
        touched.dedup();
        for t in &touched {
            self.apply_retention(t);
        }
        self.rebalance(group);
    }

    fn leave(&self, group: &str, id: u64) {
        let mut topics = Vec::new();
        if let Some(g) = lock(&self.groups).get_mut(group) {
            if let Some(m) = g.members.remove(&id) {
                topics = m.topics;
            }
            g.releasing.retain(|_, owner| *owner != id);
        }
        self.rebalance(group);
        for t in &topics {
            self.apply_retention(t);
        }
    }

    /// Decides what `topic` keeps now that a group's subscription or committed offsets
    /// changed: each partition learns the lowest offset the groups reading it need, and
    /// forgets what is below it (or, when no group reads it, what its size and age limits
    /// let go).
    fn apply_retention(&self, topic: &str) {
        let Ok(t) = self.topic(topic) else {
            return;
        };
        if t.policy.compacted {
            return;
        }
        let _one_at_a_time = lock(&self.retention);
        let subscribed: BTreeSet<String> = lock(&self.groups)
            .iter()
            .filter(|(_, g)| {
                g.members
                    .values()
                    .any(|m| m.topics.iter().any(|name| name == topic))
            })
            .map(|(name, _)| name.clone())
            .collect();
        let offsets = lock(&self.offsets);
        let now = now_millis();
        for (p, part) in t.partitions.iter().enumerate() {
            let tp = TopicPartition::new(t.name.clone(), p as u32);
            let committed = offsets.iter().filter_map(|(g, m)| match m.get(&tp) {
                Some(o) => Some(*o),
                // Subscribed and nothing committed yet: it reads from the first record.
                None => subscribed.contains(g).then_some(0),
            });
            let uncommitted = subscribed
                .iter()
                .filter(|g| !offsets.contains_key(*g))
                .map(|_| 0);
            let needed = committed.chain(uncommitted).min();
            let mut log = write(&part.log);
            log.needed = needed;
            match needed {
                Some(offset) => log.forget_below(offset),
                None => log.expire(&t.policy, now),
            }
        }
    }

    /// Range assignment per topic over the members subscribed to it, ordered by member id.
    /// Members lose only the partitions that move (incremental, like cooperative rebalancing).
    fn rebalance(&self, group: &str) {
        let topics = read(&self.topics);
        let mut groups = lock(&self.groups);
        let Some(g) = groups.get_mut(group) else {
            return;
        };
        let mut target: BTreeMap<u64, Vec<TopicPartition>> =
            g.members.keys().map(|id| (*id, Vec::new())).collect();
        let mut names: Vec<&String> = g.members.values().flat_map(|m| m.topics.iter()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let Some(topic) = topics.get(name.as_str()) else {
                continue;
            };
            let subs: Vec<u64> = g
                .members
                .iter()
                .filter(|(_, m)| m.topics.iter().any(|t| t == name))
                .map(|(id, _)| *id)
                .collect();
            let n = topic.partitions.len();
            let per = n / subs.len();
            let extra = n % subs.len();
            let mut next = 0;
            for (i, id) in subs.iter().enumerate() {
                let count = per + usize::from(i < extra);
                let tps = target.entry(*id).or_default();
                for p in next..next + count {
                    tps.push(TopicPartition::new(topic.name.clone(), p as u32));
                }
                next += count;
            }
        }
        // First take partitions away; they stay unowned until their owner releases them.
        for (id, member) in g.members.iter_mut() {
            let new = target.get(id).map(Vec::as_slice).unwrap_or(&[]);
            let revoked: Vec<_> = member
                .assigned
                .iter()
                .filter(|tp| !new.contains(tp))
                .cloned()
                .collect();
            if revoked.is_empty() {
                continue;
            }
            member.assigned.retain(|tp| new.contains(tp));
            for tp in &revoked {
                g.releasing.insert(tp.clone(), *id);
            }
            lock(&member.inbox.events).push_back(ConsumerEvent::Revoked(revoked));
            member.inbox.notify.notify_one();
        }
        // Then give out what nobody holds.
        let owned: Vec<TopicPartition> = g
            .members
            .values()
            .flat_map(|m| m.assigned.iter().cloned())
            .chain(g.releasing.keys().cloned())
            .collect();
        for (id, member) in g.members.iter_mut() {
            let new = target.remove(id).unwrap_or_default();
            let assigned: Vec<_> = new.into_iter().filter(|tp| !owned.contains(tp)).collect();
            if assigned.is_empty() {
                continue;
            }
            member.assigned.extend(assigned.iter().cloned());
            lock(&member.inbox.events).push_back(ConsumerEvent::Assigned(assigned));
            member.inbox.notify.notify_one();
        }
    }

    /// A member committed the partitions it was asked to give up: hand them over.
    fn release(&self, group: &str, id: u64, tps: &[TopicPartition]) {
        if let Some(g) = lock(&self.groups).get_mut(group) {
            for tp in tps {
                if g.releasing.get(tp) == Some(&id) {
                    g.releasing.remove(tp);
                }
            }
        }
        self.rebalance(group);
    }

    fn committed_offset(&self, group: &str, tp: &TopicPartition) -> Option<i64> {
        lock(&self.offsets).get(group)?.get(tp).copied()
    }
}

/// A waiter registered with partitions of a topic; unregistered when dropped.
struct Watching {
    topic: Arc<Topic>,
    partitions: Vec<usize>,
    notify: Arc<Notify>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        for p in &self.partitions {
            if let Some(part) = self.topic.partitions.get(*p) {
                part.unwatch(&self.notify);
            }
        }
    }
}

/// What the durable transport (`file://`, see [`super::file`]) needs of the broker it keeps as
/// its in-memory index: loading what its log holds, and learning what retention removed.
impl MemoryBroker {
    /// Where the partition put `record` already, if it is a retry of an idempotent writer's
    /// record the partition has (see [idempotent writers](super#idempotent-writers)); `None`
    /// for a record to append; an error for one the partition refuses (a sequence number below
    /// the producer's window, or a malformed producer header). What the durable log asks
    /// before it writes a record, since it gives the record its offset itself.
    pub(crate) fn already_written(
        &self,
        record: &OutgoingRecord,
    ) -> Result<Option<RecordPosition>, TransportError> {
        let refused = |reason: String| {
            TransportError::Rejected(format!("{}[{}]: {reason}", record.topic, record.partition))
        };
        let (id, seq) = match producer_of(&record.headers) {
            None => return Ok(None),
            Some(Ok(producer)) => producer,
            Some(Err(e)) => return Err(refused(e)),
        };
        let topic = self.topic(&record.topic)?;
        let Some(part) = topic.partitions.get(record.partition as usize) else {
            return Ok(None);
        };
        let log = read(&part.log);
        match log.written(&id, seq) {
            Ok(offset) => Ok(offset.map(|offset| RecordPosition {
                partition: record.partition,
                offset,
            })),
            Err(e) => Err(refused(e)),
        }
    }

    /// Tells a partition, loaded from a durable log, that the idempotent writer `id` wrote
    /// records up to sequence number `last` (at `offset`), last at `at`. The log keeps this
    /// apart from the records, since those may be gone (committed by every group and removed)
    /// while a retry of them must still be answered rather than appended again. Call it after
    /// the log's records are appended again: what they rebuilt stays.
    pub(crate) fn restore_producer(
        &self,
        topic: &str,
        partition: u32,
        id: Bytes,
        last: (u64, i64),
        at: i64,
    ) {
        let Ok(t) = self.topic(topic) else { return };
        let Some(part) = t.partitions.get(partition as usize) else {
            return;
        };
        let mut log = write(&part.log);
        let p = log.producers.entry(id).or_default();
        if p.recent.back().is_none_or(|(seq, _)| *seq < last.0) {
            p.recent.push_back(last);
            if p.recent.len() > PRODUCER_WINDOW {
                p.recent.pop_front();
            }
        }
        p.known_below = Some(p.known_below.map_or(last.0, |k| k.max(last.0)));
        p.at = p.at.max(at);
    }

    /// Creates a topic, as `ensure_topic` does.
    pub(crate) fn create_topic(&self, spec: &TopicSpec) -> Result<u32, TransportError> {
        self.create(spec)
    }

    /// Appends a record at `offset`, or at the partition's end offset if that is further on
    /// (records are appended in offset order). Offsets between the end and `offset` stay
    /// empty, as those a compaction removed. Goes through the broker's append path, so
    /// whatever it keeps per record is rebuilt when a log is loaded.
    pub(crate) fn append_at(
        &self,
        record: OutgoingRecord,
        offset: i64,
    ) -> Result<RecordPosition, TransportError> {
        if let Ok(t) = self.topic(&record.topic) {
            if let Some(part) = t.partitions.get(record.partition as usize) {
                let mut log = write(&part.log);
                if offset > log.end {
                    log.end = offset;
                }
            }
        }
        self.append(record)
    }

    /// Sets an empty partition's log-start (and end) offset, as loaded from a log whose
    /// records below it were removed.
    pub(crate) fn restore_start(&self, topic: &str, partition: u32, start: i64) {
        if let Ok(t) = self.topic(topic) {
            if let Some(part) = t.partitions.get(partition as usize) {
                let mut log = write(&part.log);
                if log.records.is_empty() && start > log.end {
                    log.start = start;
                    log.end = start;
                }
            }
        }
    }

    /// Sets offsets a group committed earlier (loaded from a log), without deciding what the
    /// topics keep: [`retain`](Self::retain) does once the topics are loaded.
    pub(crate) fn restore_committed(&self, group: &str, offsets: Vec<(TopicPartition, i64)>) {
        let mut all = lock(&self.offsets);
        all.entry(group.to_owned()).or_default().extend(offsets);
    }

    /// Commits `offsets` for `group`, and forgets what every group reading those partitions
    /// has committed.
    pub(crate) fn commit_group(&self, group: &str, offsets: Vec<(TopicPartition, i64)>) {
        let topics: BTreeSet<Arc<str>> = offsets.iter().map(|(tp, _)| tp.topic.clone()).collect();
        {
            let mut all = lock(&self.offsets);
            let map = all.entry(group.to_owned()).or_default();
            for (tp, o) in offsets {
                map.insert(tp, o);
            }
        }
        for t in &topics {
            self.apply_retention(t);
        }
    }

    /// Decides again what `topic` keeps (see [what is kept](MemoryBroker#what-is-kept)).
    pub(crate) fn retain(&self, topic: &str) {
        self.apply_retention(topic);
    }

    /// Forgets a topic (the durable log's temporary reply topics); its consumers read what
    /// they hold, nothing more.
    pub(crate) fn remove_topic(&self, name: &str) {
        write(&self.topics).remove(name);
    }

    /// Every topic: its name, partition count and whether it is compacted.
    pub(crate) fn topic_list(&self) -> Vec<(Arc<str>, u32, bool)> {
        read(&self.topics)
            .values()
            .map(|t| {
                (
                    t.name.clone(),
                    t.partitions.len() as u32,
                    t.policy.compacted,
                )
            })
            .collect()
    }
}

/// Up to `max` records from `offset` on; below the log-start offset, from there.
fn read_from(
    topic: &Topic,
    partition: u32,
    part: &Partition,
    offset: i64,
    max: usize,
) -> Vec<Message> {
    let log = read(&part.log);
    let first = log.records.partition_point(|r| r.offset < offset);
    log.records
        .range(first..)
        .take(max)
        .map(|r| Message {
            topic: topic.name.clone(),
            partition,
            offset: r.offset,
            timestamp: r.timestamp,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
        })
        .collect()
}

/// The embedded transport: a handle on a [`MemoryBroker`].
#[derive(Debug, Clone)]
pub(crate) struct MemoryTransport {
    broker: Arc<MemoryBroker>,
}

impl MemoryTransport {
    pub(crate) fn new(broker: Arc<MemoryBroker>) -> Self {
        Self { broker }
    }
}

impl Transport for MemoryTransport {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn embedded(&self) -> bool {
        true
    }

    fn ensure_topic(&self, spec: TopicSpec) -> BoxFuture<'_, Result<u32, TransportError>> {
        let r = self.broker.create(&spec);
        async move { r }.boxed()
    }

    fn partition_count(&self, topic: &str) -> BoxFuture<'_, Result<Option<u32>, TransportError>> {
        let n = read(&self.broker.topics)
            .get(topic)
            .map(|t| t.partitions.len() as u32);
        async move { Ok(n) }.boxed()
    }

    fn send(
        &self,
        record: OutgoingRecord,
    ) -> BoxFuture<'_, Result<RecordPosition, TransportError>> {
        let r = self.broker.append(record);
        async move { r }.boxed()
    }

    fn enqueue(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<(), TransportError>> {
        let r = self.broker.append(record).map(|_| ());
        async move { r }.boxed()
    }

    #[allow(clippy::result_large_err)]
    fn try_enqueue(
        &self,
        record: OutgoingRecord,
    ) -> Result<Result<(), TransportError>, OutgoingRecord> {
        Ok(self.broker.append(record).map(|_| ()))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        async { Ok(()) }.boxed()
    }

    fn end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>> {
        let r = self
            .broker
            .topic(topic)
            .map(|t| t.partitions.iter().map(Partition::end).collect());
        async move { r }.boxed()
    }

    fn group_consumer(&self, group: &str) -> Result<Box<dyn Consumer>, TransportError> {
        Ok(Box::new(MemoryConsumer {
            broker: self.broker.clone(),
            group: Some(group.to_owned()),
            member: None,
            inbox: Arc::new(Inbox::default()),
            assigned: Vec::new(),
            cursor: 0,
            releasing: Vec::new(),
            paused: Default::default(),
        }))
    }

    fn topic_consumer(
        &self,
        topic: &str,
        start: StartAt,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        let r = self.broker.topic(topic).map(|t| {
            let inbox = Arc::new(Inbox::default());
            let assigned = t
                .partitions
                .iter()
                .enumerate()
                .map(|(p, part)| {
                    part.watch(&inbox.notify);
                    let position = match start {
                        StartAt::Earliest => part.start(),
                        StartAt::Latest => part.end(),
                    };
                    Assigned {
                        topic: t.clone(),
                        partition: p as u32,
                        position,
                    }
                })
                .collect();
            Box::new(MemoryConsumer {
                broker: self.broker.clone(),
                group: None,
                member: None,
                inbox,
                assigned,
                cursor: 0,
                releasing: Vec::new(),
                paused: Default::default(),
            }) as Box<dyn Consumer>
        });
        async move { r }.boxed()
    }

    fn partitions_consumer(
        &self,
        topic: &str,
        starts: Vec<(u32, i64)>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        let r = self.broker.topic(topic).and_then(|t| {
            let inbox = Arc::new(Inbox::default());
            let mut assigned = Vec::with_capacity(starts.len());
            for (p, offset) in starts {
                let part = t.partitions.get(p as usize).ok_or_else(|| {
                    TransportError::UnknownPartition {
                        topic: topic.to_owned(),
                        partition: p,
                        partitions: t.partitions.len() as u32,
                    }
                })?;
                part.watch(&inbox.notify);
                assigned.push(Assigned {
                    topic: t.clone(),
                    partition: p,
                    position: offset.clamp(0, part.end()),
                });
            }
            Ok(Box::new(MemoryConsumer {
                broker: self.broker.clone(),
                group: None,
                member: None,
                inbox,
                assigned,
                cursor: 0,
                releasing: Vec::new(),
                paused: Default::default(),
            }) as Box<dyn Consumer>)
        });
        async move { r }.boxed()
    }

    fn committed(
        &self,
        group: &str,
    ) -> BoxFuture<'_, Result<Vec<(TopicPartition, i64)>, TransportError>> {
        let offsets = self.broker.committed(group);
        async move { Ok(offsets) }.boxed()
    }
}

struct Assigned {
    topic: Arc<Topic>,
    partition: u32,
    position: i64,
}

struct MemoryConsumer {
    broker: Arc<MemoryBroker>,
    group: Option<String>,
    member: Option<u64>,
    inbox: Arc<Inbox>,
    assigned: Vec<Assigned>,
    /// Partition to read first on the next poll, so no partition starves the others.
    cursor: usize,
    /// Partitions revoked by the last poll: released to the group at the next poll, once the
    /// caller has committed them.
    releasing: Vec<TopicPartition>,
    /// Partitions not fetched until resumed.
    paused: std::collections::HashSet<TopicPartition>,
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("group", &self.group)
            .field("member", &self.member)
            .field("assigned", &self.assigned.len())
            .finish()
    }
}

impl MemoryConsumer {
    fn apply(&mut self, event: &ConsumerEvent) {
        match event {
            ConsumerEvent::Assigned(tps) => {
                for tp in tps {
                    let Ok(topic) = self.broker.topic(&tp.topic) else {
                        continue;
                    };
                    let Some(part) = topic.partitions.get(tp.partition as usize) else {
                        continue;
                    };
                    part.watch(&self.inbox.notify);
                    let position = self
                        .group
                        .as_deref()
                        .and_then(|g| self.broker.committed_offset(g, tp))
                        .unwrap_or(0);
                    self.assigned.push(Assigned {
                        topic,
                        partition: tp.partition,
                        position,
                    });
                }
            }
            ConsumerEvent::Revoked(tps) | ConsumerEvent::Lost(tps) => {
                // A partition assigned again starts unpaused, as on Kafka.
                for tp in tps {
                    self.paused.remove(tp);
                }
                let notify = self.inbox.notify.clone();
                self.assigned.retain(|a| {
                    let gone = tps
                        .iter()
                        .any(|tp| *tp.topic == *a.topic.name && tp.partition == a.partition);
                    if gone {
                        a.topic.partitions[a.partition as usize].unwatch(&notify);
                    }
                    !gone
                });
            }
            ConsumerEvent::Messages(_) | ConsumerEvent::Ended(_) | ConsumerEvent::Passed(_) => {}
        }
    }

    fn fetch(&mut self) -> Vec<Message> {
        let n = self.assigned.len();
        let mut out = Vec::new();
        for i in 0..n {
            if out.len() >= MAX_POLL_RECORDS {
                break;
            }
            let a = &mut self.assigned[(self.cursor + i) % n];
            if !self.paused.is_empty()
                && self
                    .paused
                    .contains(&TopicPartition::new(a.topic.name.clone(), a.partition))
            {
                continue;
            }
            let part = &a.topic.partitions[a.partition as usize];
            let batch = read_from(
                &a.topic,
                a.partition,
                part,
                a.position,
                MAX_POLL_RECORDS - out.len(),
            );
            if let Some(last) = batch.last() {
                // Past the last record read: offsets have gaps where records were removed.
                a.position = last.offset + 1;
            }
            out.extend(batch);
        }
        if n > 0 {
            self.cursor = (self.cursor + 1) % n;
        }
        out
    }
}

impl Consumer for MemoryConsumer {
    fn subscribe(&mut self, topics: &[String]) -> Result<(), TransportError> {
        let Some(group) = self.group.clone() else {
            return Err(TransportError::Other(
                "a consumer outside a group cannot subscribe".into(),
            ));
        };
        match self.member {
            Some(id) => self.broker.resubscribe(&group, id, topics.to_vec()),
            None => {
                self.member = Some(
                    self.broker
                        .join(&group, topics.to_vec(), self.inbox.clone()),
                )
            }
        }
        Ok(())
    }

    fn poll(&mut self) -> BoxFuture<'_, Result<ConsumerEvent, TransportError>> {
        async move {
            if !self.releasing.is_empty() {
                let tps = std::mem::take(&mut self.releasing);
                if let (Some(group), Some(id)) = (&self.group, self.member) {
                    self.broker.release(group, id, &tps);
                }
            }
            loop {
                let pending = lock(&self.inbox.events).pop_front();
                if let Some(event) = pending {
                    self.apply(&event);
                    if let ConsumerEvent::Revoked(tps) = &event {
                        self.releasing = tps.clone();
                    }
                    return Ok(event);
                }
                let batch = self.fetch();
                if !batch.is_empty() {
                    return Ok(ConsumerEvent::Messages(batch));
                }
                self.inbox.notify.notified().await;
            }
        }
        .boxed()
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        self.paused.extend(partitions.iter().cloned());
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        for tp in partitions {
            self.paused.remove(tp);
        }
        // Records may be waiting: look again at the next poll.
        self.inbox.notify.notify_one();
        Ok(())
    }

    fn commit(
        &mut self,
        offsets: Vec<(TopicPartition, i64)>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let r = match &self.group {
            Some(group) => {
                self.broker.commit_group(group, offsets);
                Ok(())
            }
            None => Err(TransportError::Other(
                "a consumer outside a group has nothing to commit".into(),
            )),
        };
        async move { r }.boxed()
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        for a in &self.assigned {
            a.topic.partitions[a.partition as usize].unwatch(&self.inbox.notify);
        }
        if let (Some(group), Some(id)) = (&self.group, self.member) {
            self.broker.leave(group, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, key: Option<&str>, value: Option<&str>, timestamp: i64) -> Stored {
        Stored {
            offset,
            timestamp,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: Vec::new(),
        }
    }

    /// A record as the tests look at it: offset, key, value.
    type Kept<'a> = (i64, Option<&'a [u8]>, Option<&'a [u8]>);

    fn kept(log: &Log) -> Vec<Kept<'_>> {
        log.records
            .iter()
            .map(|r| (r.offset, r.key.as_deref(), r.value.as_deref()))
            .collect()
    }

    fn spec(name: &str, partitions: u32) -> TopicSpec {
        TopicSpec {
            name: name.to_owned(),
            partitions,
            replication_factor: 1,
            compacted: false,
            retention: Default::default(),
        }
    }

    /// A record of producer `id` numbered `seq`, to partition 1 of topic `t`.
    fn numbered(id: &'static str, seq: &str, value: &'static str) -> OutgoingRecord {
        OutgoingRecord {
            topic: Arc::from("t"),
            partition: 1,
            key: None,
            value: Some(Bytes::from_static(value.as_bytes())),
            headers: vec![
                (
                    crate::transport::PRODUCER_ID_HEADER.to_owned(),
                    Bytes::from_static(id.as_bytes()),
                ),
                (
                    crate::transport::PRODUCER_SEQ_HEADER.to_owned(),
                    Bytes::copy_from_slice(seq.as_bytes()),
                ),
            ],
            timestamp: None,
        }
    }

    fn values(broker: &MemoryBroker) -> Vec<(i64, String)> {
        broker
            .read("t", 1, 0, 100)
            .into_iter()
            .map(|m| {
                let v = m.value.unwrap_or_default();
                (m.offset, String::from_utf8_lossy(&v).into_owned())
            })
            .collect()
    }

    #[test]
    fn a_record_sent_again_by_its_producer_lands_once_and_gets_its_first_offset() {
        let broker = MemoryBroker::new();
        broker.create(&spec("t", 2)).expect("create");
        let first = broker.append(numbered("p1", "7", "a")).expect("append");
        // Another writer's record, and an unnumbered one, in between.
        broker.append(numbered("p2", "7", "b")).expect("append");
        let mut plain = numbered("p1", "7", "c");
        plain.headers.clear();
        broker.append(plain).expect("append");
        let again = broker.append(numbered("p1", "7", "a")).expect("retry");
        assert_eq!(
            again, first,
            "the retry is answered with the first write's position"
        );
        // A retried batch: every record of it, oldest first, is answered from memory.
        let batch: Vec<RecordPosition> = ["8", "9", "10"]
            .iter()
            .map(|seq| broker.append(numbered("p1", seq, "d")).expect("append"))
            .collect();
        let retried: Vec<RecordPosition> = ["8", "9", "10"]
            .iter()
            .map(|seq| broker.append(numbered("p1", seq, "d")).expect("retry"))
            .collect();
        assert_eq!(retried, batch);
        assert_eq!(
            values(&broker),
            vec![
                (0, "a".to_owned()),
                (1, "b".to_owned()),
                (2, "c".to_owned()),
                (3, "d".to_owned()),
                (4, "d".to_owned()),
                (5, "d".to_owned()),
            ],
            "each record once"
        );
        // The same sequence number on the other partition is another record.
        let mut other = numbered("p1", "7", "e");
        other.partition = 0;
        assert_eq!(broker.append(other).expect("append").offset, 0);
    }

    #[test]
    fn a_numbered_record_the_partition_cannot_place_is_refused_not_appended() {
        let broker = MemoryBroker::new();
        broker.create(&spec("t", 2)).expect("create");
        broker.append(numbered("p1", "5", "a")).expect("append");
        // Below the last one and never written: out of order.
        let err = broker
            .append(numbered("p1", "3", "x"))
            .expect_err("out of order")
            .to_string();
        assert!(err.contains("t[1]") && err.contains("record 3"), "{err}");
        let err = broker
            .append(numbered("p1", "five", "x"))
            .expect_err("not a number")
            .to_string();
        assert!(
            err.contains("rill-producer-seq") && err.contains("five"),
            "{err}"
        );
        assert_eq!(values(&broker), vec![(0, "a".to_owned())]);
    }

    #[test]
    fn a_partition_remembers_a_bounded_window_of_each_producer() {
        let broker = MemoryBroker::new();
        broker.create(&spec("t", 2)).expect("create");
        let n = PRODUCER_WINDOW as u64 + 10;
        for seq in 0..n {
            broker
                .append(numbered("p1", &seq.to_string(), "v"))
                .expect("append");
        }
        // The latest are answered; one older than the window is refused, never appended.
        let last = broker
            .append(numbered("p1", &(n - 1).to_string(), "v"))
            .expect("retry");
        assert_eq!(last.offset, n as i64 - 1);
        assert!(broker.append(numbered("p1", "0", "v")).is_err());
        assert_eq!(broker.end_offset("t", 1), Some(n as i64));
    }

    #[test]
    fn compaction_keeps_each_keys_latest_record_and_old_deletes_go() {
        let policy = Policy {
            compacted: true,
            time_ms: i64::MAX,
            bytes: u64::MAX,
        };
        let day = MemoryBroker::DELETE_RETENTION_MS;
        let now = 10 * day;
        let mut log = Log::default();
        let mut offset = 0;
        let mut push = |log: &mut Log, key, value, timestamp| {
            log.append(record(offset, key, value, timestamp), &policy, now);
            offset += 1;
        };
        push(&mut log, Some("old"), Some("1"), 0);
        push(&mut log, Some("old"), None, 0);
        push(&mut log, Some("new"), Some("1"), now);
        push(&mut log, Some("new"), None, now);
        push(&mut log, None, Some("keyless"), now);
        for i in 0..COMPACT_AFTER as i64 {
            push(
                &mut log,
                Some("k"),
                Some(if i % 2 == 0 { "a" } else { "b" }),
                now,
            );
        }
        push(&mut log, Some("last"), None, 0);
        assert!(log.records.len() < 10, "compaction ran as records came");
        log.compact(now);
        // Each key's latest record is left; the delete of `old` is past `delete.retention.ms`
        // and goes, a keyless record goes, the newest record stays whatever it is.
        assert_eq!(
            kept(&log),
            vec![
                (3, Some(&b"new"[..]), None),
                (4 + COMPACT_AFTER as i64, Some(&b"k"[..]), Some(&b"b"[..])),
                (5 + COMPACT_AFTER as i64, Some(&b"last"[..]), None),
            ]
        );
        assert_eq!((log.start, log.end), (0, 6 + COMPACT_AFTER as i64));
        let bytes: u64 = log.records.iter().map(Stored::size).sum();
        assert_eq!(log.bytes, bytes);
    }

    #[test]
    fn an_unread_partition_keeps_its_newest_records_within_its_limits() {
        let size = record(0, Some("k"), Some("v"), 0).size();
        let policy = Policy {
            compacted: false,
            time_ms: 1000,
            bytes: 3 * size,
        };
        let mut log = Log::default();
        for offset in 0..10 {
            log.append(record(offset, Some("k"), Some("v"), 5000), &policy, 5000);
        }
        assert_eq!((log.start, log.end, log.records.len()), (7, 10, 3));
        // Old records go, but the newest stays.
        log.expire(&policy, 10_000);
        assert_eq!((log.start, log.end, log.records.len()), (9, 10, 1));
        // What groups committed goes, however new; the offsets stay.
        log.needed = Some(10);
        log.forget_below(10);
        assert_eq!(
            (log.start, log.end, log.records.len(), log.bytes),
            (10, 10, 0, 0)
        );
    }
}
