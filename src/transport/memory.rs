//! The embedded transport: a partitioned in-memory log with consumer groups.
//!
//! Each topic partition is an append-only vector of records addressed by offset. Consumer
//! groups divide partitions between their members with range assignment, per topic, and keep
//! committed offsets, so at-least-once semantics are the same as on Kafka: a restarted consumer
//! resumes from the last commit.

use super::{
    Consumer, ConsumerEvent, Message, OutgoingRecord, RecordPosition, StartAt, TopicPartition,
    TopicSpec, Transport,
};
use crate::error::TransportError;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Most records a consumer returns from one poll.
const MAX_POLL_RECORDS: usize = 1024;

struct Stored {
    timestamp: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: super::Headers,
}

#[derive(Default)]
struct Partition {
    log: RwLock<Vec<Arc<Stored>>>,
    watchers: Mutex<Vec<Arc<Notify>>>,
}

impl Partition {
    fn len(&self) -> i64 {
        read(&self.log).len() as i64
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
    partitions: Vec<Partition>,
}

/// An in-memory broker: topics, consumer groups and their committed offsets.
///
/// `memory://` gives each [`App`](crate::App) a broker of its own; `memory://NAME` names a
/// broker shared by every app of the process that uses the same name.
#[derive(Default)]
pub struct MemoryBroker {
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    groups: Mutex<HashMap<String, Group>>,
    offsets: Mutex<HashMap<String, BTreeMap<TopicPartition, i64>>>,
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
            partitions: (0..spec.partitions).map(|_| Partition::default()).collect(),
        };
        topics.insert(spec.name.clone(), Arc::new(topic));
        drop(topics);
        // A group subscribed to this name before it existed gets its partitions now.
        let groups: Vec<String> = lock(&self.groups).keys().cloned().collect();
        for g in groups {
            self.rebalance(&g);
        }
        Ok(spec.partitions)
    }

    /// Appends a record; returns its offset.
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
        let stored = Arc::new(Stored {
            timestamp: record.timestamp.unwrap_or_else(now_millis),
            key: record.key,
            value: record.value,
            headers: record.headers,
        });
        let offset = {
            let mut log = write(&part.log);
            log.push(stored);
            log.len() as i64 - 1
        };
        for w in lock(&part.watchers).iter() {
            w.notify_one();
        }
        Ok(RecordPosition {
            partition: record.partition,
            offset,
        })
    }

    /// Number of records in a partition (its end offset).
    pub fn end_offset(&self, topic: &str, partition: u32) -> Option<i64> {
        let t = self.topic(topic).ok()?;
        t.partitions.get(partition as usize).map(Partition::len)
    }

    /// Reads up to `max` records from a partition starting at `offset`, for inspection in tests
    /// and tools.
    pub fn read(&self, topic: &str, partition: u32, offset: i64, max: usize) -> Vec<Message> {
        let Ok(t) = self.topic(topic) else {
            return Vec::new();
        };
        let Some(part) = t.partitions.get(partition as usize) else {
            return Vec::new();
        };
        read_from(&t, partition, part, offset.max(0), max)
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
                    topics,
                    assigned: Vec::new(),
                    inbox,
                },
            );
        self.rebalance(group);
        id
    }

    fn resubscribe(&self, group: &str, id: u64, topics: Vec<String>) {
        if let Some(m) = lock(&self.groups)
            .get_mut(group)
            .and_then(|g| g.members.get_mut(&id))
        {
            m.topics = topics;
        }
        self.rebalance(group);
    }

    fn leave(&self, group: &str, id: u64) {
        if let Some(g) = lock(&self.groups).get_mut(group) {
            g.members.remove(&id);
            g.releasing.retain(|_, owner| *owner != id);
        }
        self.rebalance(group);
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

fn read_from(
    topic: &Topic,
    partition: u32,
    part: &Partition,
    offset: i64,
    max: usize,
) -> Vec<Message> {
    let log = read(&part.log);
    let start = (offset.max(0) as usize).min(log.len());
    let end = log.len().min(start.saturating_add(max));
    log[start..end]
        .iter()
        .enumerate()
        .map(|(i, r)| Message {
            topic: topic.name.clone(),
            partition,
            offset: (start + i) as i64,
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
            .map(|t| t.partitions.iter().map(Partition::len).collect());
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
                        StartAt::Earliest => 0,
                        StartAt::Latest => part.len(),
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
                    position: offset.clamp(0, part.len()),
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
            ConsumerEvent::Messages(_) | ConsumerEvent::Ended(_) => {}
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
            a.position += batch.len() as i64;
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
                let mut all = lock(&self.broker.offsets);
                let map = all.entry(group.clone()).or_default();
                for (tp, o) in offsets {
                    map.insert(tp, o);
                }
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
