//! Tables: partitioned key/value state that survives restarts and moves with its partitions.
//!
//! A table is split into partitions like the stream that writes it: an event read from
//! partition `p` updates partition `p` of the table, so the worker that owns a partition of the
//! stream owns the same partition of the table (co-partitioning). Every change is also written
//! to the table's changelog topic, `<app id>-<table>-changelog` (compacted, with the table's
//! partition count), which is the durable copy:
//!
//! - Changes are collected in memory and written to the changelog when the worker commits
//!   (every `commit_interval`, on rebalance and on shutdown), before the offsets of the events
//!   that made them; a key changed many times between commits is written once, with its last
//!   value (as Kafka Streams' record cache does).
//! - When a worker is given partitions (start, rebalance, failover) it restores those table
//!   partitions before any of their events reach an agent: from the local store if it is
//!   persistent (see [`store`]), then from the changelog records written after it.
//! - On revocation the partitions are committed, then dropped from memory.
//!
//! With at-least-once processing, events processed since the last commit are processed again
//! after a crash, so their table updates are applied again.

pub(crate) mod store;
pub mod window;
pub use window::{Window, WindowRange, WindowSet, WindowedReader, WindowedTable};

use crate::codec::{Codec, Json};
use crate::engine::state::{self as engine, PartitionedState};
use crate::engine::AppCore;
use crate::engine::Runtime;
use crate::error::{Error, Result};
use crate::partitioner::partition_for_key;
use crate::stream::ActorCtx;
use crate::transport::{ConsumerEvent, TopicSpec};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use store::{Change, Store};

tokio::task_local! {
    /// The actor whose agent body is running on this task: tables read the current event's
    /// partition and the agent's concurrency from it.
    pub(crate) static ACTOR: Arc<ActorCtx>;
}

/// How often recovery reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How long a standby copy no longer placed on this worker is kept: placement changes while
/// the workers of a rebalance publish their new partitions one after the other.
const STANDBY_LINGER: Duration = Duration::from_secs(10);

/// How often the standby tailer looks at the placement.
const PLACEMENT_EVERY: Duration = Duration::from_millis(250);

/// The number of standby replicas of each table partition (see
/// [`Settings::table_standby_replicas`](crate::Settings::table_standby_replicas)).
pub(crate) fn standby_replicas(rt: &Runtime) -> u32 {
    rt.settings
        .table_standby_replicas
        .unwrap_or(if rt.transport.kind() == "memory" {
            0
        } else {
            1
        })
}

/// One partition of a table in memory.
struct Part<K, V> {
    data: HashMap<K, V>,
    /// Keys changed since the last commit (removed keys are dirty and absent from `data`).
    dirty: HashSet<K>,
    /// Whether the local store holds `data` as of the changelog offset the partition reaches
    /// (less the dirty keys): true once a restore or a commit wrote it there. A standby copy
    /// is filled from the changelog only, so it is not stored until it is promoted.
    stored: bool,
}

impl<K, V> Default for Part<K, V> {
    fn default() -> Self {
        Self {
            data: HashMap::new(),
            dirty: HashSet::new(),
            stored: false,
        }
    }
}

/// The columns of [`table_row`].
pub(crate) const TABLE_COLUMNS: [&str; 3] = ["table", "changelog", "partitions"];

/// Name, changelog topic and partitions of a table, as the `tables` command and the status
/// page show them.
pub(crate) fn table_row(table: &dyn TableRunner) -> Vec<String> {
    let spec = table.changelog_spec();
    vec![
        table.name().to_owned(),
        spec.name,
        spec.partitions.to_string(),
    ]
}

/// Where the state of one table partition came from when this worker last took it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Restored {
    /// `store` (the local store, plus the changelog after its checkpoint), `changelog` (the
    /// whole changelog: no local state), `standby` (a warm standby copy) or `set_aside` (this
    /// worker's own copy, kept through a rebalance).
    pub(crate) source: &'static str,
    /// Keys read from the local store.
    pub(crate) from_store: usize,
    /// Keys taken from a standby or set-aside copy.
    pub(crate) from_copy: usize,
    /// Changelog records replayed.
    pub(crate) changelog_records: u64,
    /// Keys written to the local store so that it holds what was restored.
    pub(crate) stored_keys: usize,
    /// Seconds the restore of the batch this partition was in took.
    pub(crate) seconds: f64,
}

/// What a changelog replay did to one partition.
struct Replayed<K> {
    records: u64,
    /// The offset of the last record applied.
    last: Option<i64>,
    /// The keys changed, where asked for.
    keys: HashSet<K>,
}

impl<K> Default for Replayed<K> {
    fn default() -> Self {
        Self {
            records: 0,
            last: None,
            keys: HashSet::new(),
        }
    }
}

/// What a restore writes to the local store for one partition.
enum StoreWrite {
    /// The keys the replay changed, onto the state the store holds.
    Changes(Vec<Change>),
    /// The whole partition.
    Replace(store::Entries),
}

/// Changes per local-store write when a restore stores what it replayed.
const STORE_BATCH: usize = 64 * 1024;

/// A revoked partition set aside, with the changelog offset its data reaches.
type Parked<K, V> = (Part<K, V>, i64);

/// Where a running table writes.
#[derive(Clone)]
struct Attached {
    rt: Arc<Runtime>,
    store: Arc<dyn Store>,
    spec: TopicSpec,
    /// Whether partitions this worker does not own are kept warm (standby replicas).
    standby: bool,
    /// Standby replicas per partition, placed on the workers that would take each partition
    /// over (see `engine::membership::Members::standby_partitions`); 0 when every worker keeps
    /// a copy of every partition (global tables, or an assignment that cannot be predicted).
    placed: u32,
}

pub(crate) struct TableInner<K, V> {
    core: Arc<AppCore>,
    name: String,
    partitions: Mutex<Option<u32>>,
    default: RwLock<Arc<dyn Fn() -> V + Send + Sync>>,
    /// A global table: every worker holds every partition (reads see the copies of the
    /// partitions other workers own).
    global: std::sync::atomic::AtomicBool,
    key_codec: Arc<dyn Codec<K>>,
    value_codec: Arc<dyn Codec<V>>,
    parts: Mutex<HashMap<u32, Part<K, V>>>,
    /// Partitions being restored: not served to lookups yet.
    recovering: Mutex<BTreeSet<u32>>,
    /// Partitions revoked from this worker, with the changelog offset their data reaches: if
    /// they come back, only the changelog written since is replayed.
    parked: Mutex<HashMap<u32, Parked<K, V>>>,
    /// Where each partition's state came from on its last restore (for `GET /tables/{table}`).
    restored: Mutex<BTreeMap<u32, Restored>>,
    attached: RwLock<Option<Attached>>,
}

/// A partitioned key/value table, Faust's `app.Table`: declare it with
/// [`App::table`](crate::App::table) and use it from agents.
///
/// ```
/// # use rill::prelude::*;
/// # #[tokio::main] async fn main() -> rill::Result<()> {
/// let app = App::new("word-count-doc");
/// let counts = app.table::<String, i64>("word_counts");
/// let words = app.topic("words").value_type::<String>();
/// let table = counts.clone();
/// app.agent(move |mut words: Stream<String>| {
///     let counts = table.clone();
///     async move {
///         while let Some(word) = words.next().await {
///             counts.update(word, |n| *n += 1);
///         }
///     }
/// })
/// .named("count_words")
/// .channel(&words);
/// let worker = app.start().await?;
/// words.send("hello".to_owned()).await?;
/// # let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
/// # while counts.get(&"hello".to_owned()).is_none() && std::time::Instant::now() < deadline {
/// #     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
/// # }
/// assert_eq!(counts.get(&"hello".to_owned()), Some(1));
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Table<K, V> {
    pub(crate) inner: Arc<TableInner<K, V>>,
}

impl<K, V> Clone for Table<K, V> {
    /// A writable handle on the same table. An agent with `concurrency > 1` must not take one
    /// (see [`Table::reader`]): a clone made while such an agent's actor is built makes the
    /// worker refuse to start.
    fn clone(&self) -> Self {
        note_writable_clone(&self.inner.name);
        self.share()
    }
}

/// Counts a clone of a writable handle on `table` (see [`writable_clones`]).
pub(crate) fn note_writable_clone(table: &str) {
    WRITABLE_CLONES.with(|c| {
        if let Some(names) = c.borrow_mut().as_mut() {
            names.push(table.to_owned());
        }
    });
}

impl<K, V> Table<K, V> {
    /// Another handle on the table, not counted as a writable clone (for rill's own use).
    pub(crate) fn share(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

thread_local! {
    /// While an actor of an agent is built (its function called): the tables whose writable
    /// handles were cloned.
    static WRITABLE_CLONES: std::cell::RefCell<Option<Vec<String>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (which builds an actor: calls the agent's function) and returns the names of the
/// tables whose writable handles it cloned.
pub(crate) fn writable_clones<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    let outer = WRITABLE_CLONES.with(|c| c.borrow_mut().replace(Vec::new()));
    let r = f();
    let names = WRITABLE_CLONES.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
    (r, names.unwrap_or_default())
}

/// A read-only handle on a table ([`Table::reader`]), for agents with `concurrency > 1`: their
/// actors process events of the same partition at the same time, so they could race on a key;
/// they may read tables but never write them.
///
/// It has the reading methods of [`Table`] and no writing ones, so a write does not compile:
///
/// ```compile_fail
/// # use rill::prelude::*;
/// let app = App::new("reader-doc");
/// let counts = app.table::<String, i64>("counts").reader();
/// counts.update("word".to_owned(), |n| *n += 1); // no such method on a reader
/// ```
///
/// ```
/// # use rill::prelude::*;
/// let app = App::new("reader-doc");
/// let counts = app.table::<String, i64>("counts");
/// let words = app.topic("words").value_type::<String>();
/// let reader = counts.reader();
/// app.agent(move |mut words: Stream<String>| {
///     let counts = reader.clone();
///     async move {
///         while let Some(word) = words.next().await {
///             println!("{word}: {}", counts.value(&word));
///         }
///     }
/// })
/// .named("lookups")
/// .concurrency(4)
/// .channel(&words);
/// ```
pub struct TableReader<K, V> {
    table: Table<K, V>,
}

impl<K, V> Clone for TableReader<K, V> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.share(),
        }
    }
}

impl<K, V> fmt::Debug for TableReader<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableReader")
            .field("name", &self.table.inner.name)
            .finish()
    }
}

impl<K: TableKey, V: TableValue> TableReader<K, V> {
    /// The table's name.
    pub fn name(&self) -> &str {
        self.table.name()
    }

    /// The value of `key`, if the table has it (on this worker).
    pub fn get(&self, key: &K) -> Option<V> {
        self.table.get(key)
    }

    /// The value of `key`, or the default value if the table does not have it.
    pub fn value(&self, key: &K) -> V {
        self.table.value(key)
    }

    /// Whether the table has `key` (on this worker).
    pub fn contains_key(&self, key: &K) -> bool {
        self.table.contains_key(key)
    }

    /// Number of keys this worker holds.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether this worker holds no keys.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// A copy of the entries this worker holds, in no particular order.
    pub fn items(&self) -> Vec<(K, V)> {
        self.table.items()
    }

    /// The table partitions this worker holds.
    pub fn local_partitions(&self) -> Vec<u32> {
        self.table.local_partitions()
    }
}

impl<K: TableKey, T> TableReader<K, std::collections::BTreeSet<T>>
where
    T: Ord + Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Whether the set of `key` has `member`.
    pub fn contains(&self, key: &K, member: &T) -> bool {
        self.table.contains(key, member)
    }
}

impl<K, V> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// The bounds table keys meet.
pub trait TableKey:
    Eq + Hash + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
}
impl<T> TableKey for T where
    T: Eq + Hash + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
}

/// The bounds table values meet.
pub trait TableValue: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T> TableValue for T where T: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<K: TableKey, V: TableValue> Table<K, V> {
    pub(crate) fn new(
        core: Arc<AppCore>,
        name: String,
        default: Arc<dyn Fn() -> V + Send + Sync>,
    ) -> Self {
        Self {
            inner: Arc::new(TableInner {
                core,
                name,
                partitions: Mutex::new(None),
                default: RwLock::new(default),
                global: std::sync::atomic::AtomicBool::new(false),
                key_codec: Arc::new(Json::<K>::new()),
                value_codec: Arc::new(Json::<V>::new()),
                parts: Mutex::new(HashMap::new()),
                recovering: Mutex::new(BTreeSet::new()),
                parked: Mutex::new(HashMap::new()),
                restored: Mutex::new(BTreeMap::new()),
                attached: RwLock::new(None),
            }),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A read-only handle on the table, the only kind an agent with `concurrency > 1` may
    /// hold: see [`TableReader`].
    pub fn reader(&self) -> TableReader<K, V> {
        TableReader {
            table: self.share(),
        }
    }

    /// The changelog topic: `<app id>-<table>-changelog`.
    pub fn changelog_topic(&self) -> String {
        changelog_name(&self.inner.core.id, &self.inner.name)
    }

    /// Sets the partition count (by default the app's `topic_partitions`). It must match the
    /// partition count of the topics whose agents write the table.
    pub fn partitions(self, n: u32) -> Self {
        *self
            .inner
            .partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(n.max(1));
        self
    }

    /// Sets the value a missing key starts from (by default `V::default()`), Faust's
    /// `default=`.
    pub fn default_value(self, f: impl Fn() -> V + Send + Sync + 'static) -> Self {
        *self
            .inner
            .default
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(f);
        self
    }

    fn default(&self) -> V {
        let f = self
            .inner
            .default
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        f()
    }

    fn partition_count(&self) -> u32 {
        self.inner.partition_count()
    }

    /// Makes the table global (Faust's `GlobalTable`): every worker keeps every partition up to
    /// date from the changelog, and reads see all of them, not only the partitions this worker
    /// owns. Writes still go to the partition of the event being processed. Declare it with
    /// [`App::global_table`](crate::App::global_table).
    pub(crate) fn global(self) -> Self {
        self.inner
            .global
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Whether every worker holds every partition of the table.
    pub fn is_global(&self) -> bool {
        self.inner.global.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` over the copies of partitions owned elsewhere, for global tables.
    fn with_copies<R>(&self, f: impl FnOnce(&HashMap<u32, Parked<K, V>>) -> R) -> Option<R> {
        if !self.is_global() {
            return None;
        }
        Some(f(&self
            .inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())))
    }

    /// The partition a write goes to: the current event's, else the key's.
    fn write_partition(&self, key: &K) -> u32 {
        let n = self.partition_count();
        let current = ACTOR.try_with(|a| {
            if a.concurrency > 1 {
                panic!(
                    "table {:?}: agent {:?} has concurrency {} and cannot write tables; an \
                     agent with concurrency > 1 can only read them (its actors would race on \
                     the same keys)",
                    self.inner.name, a.agent, a.concurrency
                );
            }
            a.current().map(|m| m.partition)
        });
        match current {
            Ok(Some(p)) if p < n => p,
            _ => self.key_partition(key),
        }
    }

    /// The partition a write goes to. A running worker writes only partitions it holds: a
    /// write to another worker's partition (from a timer or a task, say) would race with its
    /// owner's writes in the changelog, and is refused with a panic that names the table and
    /// the partition (timers and agents log it and go on).
    fn writable<'p>(&self, parts: &'p mut HashMap<u32, Part<K, V>>, p: u32) -> &'p mut Part<K, V> {
        let running = self
            .inner
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if running && !parts.contains_key(&p) {
            panic!(
                "table {:?}: partition {p} is not held by this worker, so it cannot write it \
                 (another worker owns it, or it is not restored yet); write a table from the \
                 agent that reads its partitions, or from a timer only for keys whose \
                 partitions this worker holds (Table::local_partitions)",
                self.inner.name
            );
        }
        parts.entry(p).or_default()
    }

    fn key_partition(&self, key: &K) -> u32 {
        match self.inner.key_codec.encode(key) {
            Ok(bytes) => partition_for_key(&bytes, self.partition_count()),
            Err(_) => 0,
        }
    }

    /// The partition the current event came from, if an agent is running here.
    fn current_partition(&self) -> Option<u32> {
        ACTOR
            .try_with(|a| a.current().map(|m| m.partition))
            .ok()
            .flatten()
    }

    fn with_parts<R>(&self, f: impl FnOnce(&mut HashMap<u32, Part<K, V>>) -> R) -> R {
        f(&mut self.inner.parts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads a key: from the current event's partition first, then from every partition
    /// this worker holds.
    fn read<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        let first = self.current_partition();
        let mut f = Some(f);
        let mut call = |v: &V| f.take().map(|f| f(v));
        let found = self.with_parts(|parts| {
            let v = first
                .and_then(|p| parts.get(&p))
                .and_then(|p| p.data.get(key))
                .or_else(|| parts.values().find_map(|p| p.data.get(key)));
            v.and_then(&mut call)
        });
        if found.is_some() {
            return found;
        }
        self.with_copies(|copies| {
            copies
                .values()
                .find_map(|(p, _)| p.data.get(key))
                .and_then(&mut call)
        })
        .flatten()
    }

    /// The value of `key`, if the table has it (on this worker).
    pub fn get(&self, key: &K) -> Option<V> {
        self.read(key, V::clone)
    }

    /// The value of `key`, or the default value if the table does not have it: Faust's
    /// `table[key]`.
    pub fn value(&self, key: &K) -> V {
        self.get(key).unwrap_or_else(|| self.default())
    }

    /// Whether the table has `key` (on this worker).
    pub fn contains_key(&self, key: &K) -> bool {
        self.read(key, |_| ()).is_some()
    }

    /// Sets `key` to `value`, returning the old value.
    pub fn insert(&self, key: K, value: V) -> Option<V> {
        let p = self.write_partition(&key);
        self.with_parts(|parts| {
            let part = self.writable(parts, p);
            part.dirty.insert(key.clone());
            part.data.insert(key, value)
        })
    }

    /// Changes the value of `key` in place, starting from the default value when the key is
    /// missing: `counts.update(word, |n| *n += 1)` is Faust's `counts[word] += 1`.
    pub fn update<R>(&self, key: K, f: impl FnOnce(&mut V) -> R) -> R {
        let p = self.write_partition(&key);
        self.with_parts(|parts| {
            let part = self.writable(parts, p);
            if !part.dirty.contains(&key) {
                part.dirty.insert(key.clone());
            }
            match part.data.get_mut(&key) {
                Some(value) => f(value),
                None => {
                    let mut value = self.default();
                    let r = f(&mut value);
                    part.data.insert(key, value);
                    r
                }
            }
        })
    }

    /// Removes `key`, returning its value. The changelog gets a tombstone.
    pub fn remove(&self, key: &K) -> Option<V> {
        let p = self.write_partition(key);
        self.with_parts(|parts| {
            let part = self.writable(parts, p);
            let old = part.data.remove(key);
            part.dirty.insert(key.clone());
            old
        })
    }

    /// Number of keys this worker holds.
    pub fn len(&self) -> usize {
        self.with_parts(|parts| parts.values().map(|p| p.data.len()).sum::<usize>())
            + self
                .with_copies(|c| c.values().map(|(p, _)| p.data.len()).sum::<usize>())
                .unwrap_or(0)
    }

    /// Whether this worker holds no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the entries this worker holds, in no particular order.
    pub fn items(&self) -> Vec<(K, V)> {
        let mut items: Vec<(K, V)> = self.with_parts(|parts| {
            parts
                .values()
                .flat_map(|p| p.data.iter().map(|(k, v)| (k.clone(), v.clone())))
                .collect()
        });
        if let Some(more) = self.with_copies(|c| {
            c.values()
                .flat_map(|(p, _)| p.data.iter().map(|(k, v)| (k.clone(), v.clone())))
                .collect::<Vec<_>>()
        }) {
            items.extend(more);
        }
        items
    }

    /// Number of keys in the standby copies this worker keeps of partitions it does not own
    /// (see [`Settings::table_standby_replicas`](crate::Settings::table_standby_replicas)).
    pub fn standby_len(&self) -> usize {
        self.inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(p, _)| p.data.len())
            .sum()
    }

    /// The table partitions this worker holds.
    pub fn local_partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.with_parts(|parts| parts.keys().copied().collect());
        v.sort_unstable();
        v
    }

    /// The partitions of which this worker keeps a standby copy (or, for a global table, a
    /// copy), in order.
    pub fn standby_partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }
}

/// A table whose values are sets, Faust's `SetTable`: `add` and `discard` members of a key's
/// set. (The changelog holds each key's whole set.)
pub type SetTable<K, T> = Table<K, std::collections::BTreeSet<T>>;

impl<K: TableKey, T> Table<K, std::collections::BTreeSet<T>>
where
    T: Ord + Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Adds `member` to the set of `key`; returns whether it was new.
    pub fn add(&self, key: K, member: T) -> bool {
        self.update(key, |set| set.insert(member))
    }

    /// Removes `member` from the set of `key`; returns whether it was there.
    pub fn discard(&self, key: K, member: &T) -> bool {
        self.update(key, |set| set.remove(member))
    }

    /// Whether the set of `key` has `member`.
    pub fn contains(&self, key: &K, member: &T) -> bool {
        self.read(key, |set| set.contains(member)).unwrap_or(false)
    }
}

pub(crate) fn changelog_name(app_id: &str, table: &str) -> String {
    format!("{app_id}-{table}-changelog")
}

impl<K, V> TableInner<K, V> {
    fn partition_count(&self) -> u32 {
        if let Some(a) = self
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return a.spec.partitions;
        }
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| self.core.settings().topic_partitions)
    }

    fn attached(&self) -> Result<Attached> {
        self.attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::NotRunning {
                app: self.core.id.to_string(),
            })
    }
}

/// What a commit wrote to the changelog of one table partition, to be stored locally once the
/// changelog has it.
pub(crate) struct Flushed {
    partition: u32,
    changes: Vec<Change>,
    checkpoint: i64,
}

/// A table with its types erased, as the app and the worker keep it.
pub(crate) trait TableRunner: PartitionedState {
    /// This table as the engine keeps it.
    fn as_state(self: Arc<Self>) -> Arc<dyn PartitionedState>;
    /// The changelog topic's spec.
    fn changelog_spec(&self) -> TopicSpec;
    /// Connects the table to a starting worker.
    fn attach(&self, rt: &Arc<Runtime>, store: Arc<dyn Store>);
    /// Disconnects it from a stopped worker and forgets its partitions.
    fn detach(&self);
    /// The value of a key given as text (JSON, or a bare string), as JSON; for lookups.
    fn lookup(&self, key: &str) -> Lookup;
    /// Number of keys held.
    fn size(&self) -> usize;
    /// Partitions held.
    fn held_partitions(&self) -> Vec<u32>;
    /// Partitions of which a standby copy is kept.
    fn standby(&self) -> Vec<u32>;
    /// Partitions being restored.
    fn recovering(&self) -> Vec<u32>;
    /// Where each partition's state came from on its last restore.
    fn restored(&self) -> BTreeMap<u32, Restored>;
}

/// The answer to a lookup by key.
#[derive(Debug)]
pub(crate) enum Lookup {
    Found(serde_json::Value),
    /// Not here; `held` says whether this worker holds the key's partition.
    Missing {
        partition: u32,
        held: bool,
    },
    /// The key's partition is being restored.
    Recovering(u32),
    /// The key does not parse as a key of this table.
    BadKey(String),
}

impl<K: TableKey, V: TableValue> PartitionedState for Table<K, V> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn recover<'a>(&'a self, partitions: &'a [u32]) -> BoxFuture<'a, Result<()>> {
        async move { self.restore(partitions).await }.boxed()
    }

    fn changelog_ends(&self) -> BoxFuture<'_, Result<Vec<i64>>> {
        async move {
            let a = self.inner.attached()?;
            Ok(a.rt.transport.end_offsets(&a.spec.name).await?)
        }
        .boxed()
    }

    fn park<'a>(&'a self, partitions: &'a [u32], ends: &'a [i64]) -> BoxFuture<'a, Result<()>> {
        async move {
            let taken: Vec<(u32, Part<K, V>)> = self.with_parts(|parts| {
                partitions
                    .iter()
                    .filter_map(|p| parts.remove(p).map(|part| (*p, part)))
                    .collect()
            });
            if taken.is_empty() {
                return Ok(());
            }
            // The changes were flushed by the commit before this, and `ends` were read before
            // that commit let the partitions go: the copy stands at or beyond them (replaying
            // some of its own changes again is harmless; skipping a new owner's would not be).
            let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
            for (p, part) in taken {
                if !part.dirty.is_empty() {
                    // Not flushed (the commit failed): not a consistent copy.
                    continue;
                }
                if let Some(end) = ends.get(p as usize) {
                    parked.insert(p, (part, *end));
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn drop_parked(&self) {
        let standby = self
            .inner
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|a| a.standby);
        if standby {
            // Kept warm by the tailer.
            return;
        }
        self.inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn release(&self, partitions: &[u32]) {
        self.with_parts(|parts| {
            for p in partitions {
                parts.remove(p);
            }
        });
        let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
        for p in partitions {
            parked.remove(p);
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<engine::Flushed>> {
        async move { Ok(Box::new(self.write_changelog().await?) as engine::Flushed) }.boxed()
    }

    fn persist(&self, flushed: engine::Flushed) -> Result<()> {
        let flushed = flushed
            .downcast::<Vec<Flushed>>()
            .map_err(|_| Error::Store("not this table's changelog writes".into()))?;
        let a = self.inner.attached()?;
        for f in *flushed {
            a.store
                .write(&self.inner.name, f.partition, &f.changes, f.checkpoint)?;
        }
        Ok(())
    }
}

impl<K: TableKey, V: TableValue> TableRunner for Table<K, V> {
    fn as_state(self: Arc<Self>) -> Arc<dyn PartitionedState> {
        self
    }

    fn changelog_spec(&self) -> TopicSpec {
        let settings = self.inner.core.settings();
        TopicSpec {
            name: self.changelog_topic(),
            partitions: self.partition_count(),
            replication_factor: settings.topic_replication_factor,
            compacted: true,
        }
    }

    fn attach(&self, rt: &Arc<Runtime>, store: Arc<dyn Store>) {
        let spec = self.changelog_spec();
        let replicas = standby_replicas(rt);
        let standby = replicas > 0 || self.is_global();
        let placed = if self.is_global() || !rt.transport.range_assignment() {
            0
        } else {
            replicas
        };
        if standby && placed == 0 {
            // Every partition starts as an empty standby copy; the tailer fills those this
            // worker does not own.
            let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
            for p in 0..spec.partitions {
                parked.insert(p, (Part::default(), 0));
            }
        }
        *self
            .inner
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Attached {
            rt: rt.clone(),
            store,
            spec,
            standby,
            placed,
        });
        if standby {
            let table = self.clone();
            tokio::spawn(async move {
                if let Err(e) = table.tail().await {
                    tracing::warn!(table = %table.inner.name, error = %e, "standby replicas stopped; partitions taken over will be restored in full");
                }
            });
        }
    }

    fn detach(&self) {
        *self
            .inner
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.with_parts(|parts| parts.clear());
        self.drop_parked();
    }

    fn lookup(&self, text: &str) -> Lookup {
        let key: K = match serde_json::from_str(text)
            .or_else(|_| serde_json::from_value(serde_json::Value::String(text.to_owned())))
        {
            Ok(k) => k,
            Err(e) => return Lookup::BadKey(e.to_string()),
        };
        let p = self.key_partition(&key);
        if self
            .inner
            .recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&p)
        {
            return Lookup::Recovering(p);
        }
        match self.get(&key) {
            Some(v) => match serde_json::to_value(&v) {
                Ok(j) => Lookup::Found(j),
                Err(e) => Lookup::BadKey(e.to_string()),
            },
            None => Lookup::Missing {
                partition: p,
                held: self.with_parts(|parts| parts.contains_key(&p)),
            },
        }
    }

    fn size(&self) -> usize {
        self.len()
    }

    fn held_partitions(&self) -> Vec<u32> {
        self.local_partitions()
    }

    fn standby(&self) -> Vec<u32> {
        self.standby_partitions()
    }

    fn restored(&self) -> BTreeMap<u32, Restored> {
        self.inner
            .restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn recovering(&self) -> Vec<u32> {
        let r = self.inner.recovering.lock();
        r.unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

impl<K: TableKey, V: TableValue> Table<K, V> {
    /// Encodes the dirty keys of every partition and queues them to the changelog.
    async fn write_changelog(&self) -> Result<Vec<Flushed>> {
        let a = self.inner.attached()?;
        // Taken out of the dirty sets, and put back if any write fails: a change is dropped
        // only once the changelog has it.
        let batches: Vec<(u32, Vec<K>, Vec<Change>)> = self.with_parts(|parts| {
            let mut out = Vec::new();
            for (p, part) in parts.iter_mut() {
                if part.dirty.is_empty() {
                    continue;
                }
                let keys: Vec<K> = part.dirty.drain().collect();
                let changes: Vec<Change> = keys
                    .iter()
                    .filter_map(|key| self.encode_change(key, part.data.get(key)))
                    .collect();
                out.push((*p, keys, changes));
            }
            out
        });
        match self.write_batches(&a, &batches).await {
            Ok(checkpoints) => Ok(batches
                .into_iter()
                .zip(checkpoints)
                .filter_map(|((partition, _, changes), checkpoint)| {
                    Some(Flushed {
                        partition,
                        changes,
                        checkpoint: checkpoint?,
                    })
                })
                .collect()),
            Err(e) => {
                self.with_parts(|parts| {
                    for (p, keys, _) in batches {
                        if let Some(part) = parts.get_mut(&p) {
                            part.dirty.extend(keys);
                        }
                    }
                });
                Err(e)
            }
        }
    }

    /// Writes each partition's changes to the changelog; with a persistent store, returns the
    /// offset of each partition's last record (the store's checkpoint), waited for together.
    async fn write_batches(
        &self,
        a: &Attached,
        batches: &[(u32, Vec<K>, Vec<Change>)],
    ) -> Result<Vec<Option<i64>>> {
        let persistent = a.store.is_persistent();
        let mut lasts = Vec::new();
        for (p, _, changes) in batches {
            let Some(((last_key, last_value), rest)) = changes.split_last() else {
                continue;
            };
            for (k, v) in rest {
                a.rt.enqueue(&a.spec, Some(*p), Some(k.clone()), v.clone(), Vec::new())
                    .await?;
            }
            let (key, value) = (Some(last_key.clone()), last_value.clone());
            if persistent {
                // The position of the last record is the checkpoint; records of one partition
                // are appended in order, so the others are before it.
                lasts.push(Some(a.rt.produce(
                    &a.spec,
                    Some(*p),
                    key,
                    value,
                    Vec::new(),
                )));
            } else {
                a.rt.enqueue(&a.spec, Some(*p), key, value, Vec::new())
                    .await?;
            }
        }
        let mut checkpoints = Vec::with_capacity(batches.len());
        let mut delivered = futures::future::join_all(lasts.into_iter().flatten())
            .await
            .into_iter();
        for (_, _, changes) in batches {
            checkpoints.push(match (persistent, changes.is_empty()) {
                (true, false) => Some(delivered.next().transpose()?.map(|d| d.offset).ok_or_else(
                    || Error::Store("a changelog write without a delivery report".into()),
                )?),
                _ => None,
            });
        }
        Ok(checkpoints)
    }

    /// Restores partitions: from a copy set aside or kept on standby if there is one, else
    /// from the local store; then the changelog from where that state stands to its end.
    /// With a persistent store, what was restored from elsewhere than the store is written to
    /// it before the partition is used, so that the store's checkpoint never claims more than
    /// the store holds (the next commit moves the checkpoint on from there).
    async fn restore(&self, partitions: &[u32]) -> Result<()> {
        let a = self.inner.attached()?;
        let partitions: Vec<u32> = partitions
            .iter()
            .copied()
            .filter(|p| *p < a.spec.partitions)
            .collect();
        let partitions = &partitions[..];
        if partitions.is_empty() {
            return Ok(());
        }
        let name = &self.inner.name;
        let topic = a.spec.name.clone();
        self.inner
            .recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(partitions.iter().copied());
        let started = Instant::now();
        let persistent = a.store.is_persistent();
        let ends = a.rt.transport.end_offsets(&topic).await?;
        let mut starts: Vec<(u32, i64)> = Vec::new();
        let mut total = 0i64;
        let mut loaded = 0usize;
        // Per partition: where its state came from, the changelog offset that state
        // includes, and whether the local store holds that state (so that only the replayed
        // keys need storing).
        let mut plans: BTreeMap<u32, (Restored, i64, bool)> = BTreeMap::new();
        for &p in partitions {
            let parked = self
                .inner
                .parked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p);
            let parked = match parked {
                // An untouched standby copy: the local store may know more.
                Some((part, 0)) if part.data.is_empty() && persistent => None,
                other => other,
            };
            let end = ends.get(p as usize).copied().unwrap_or(0);
            if let Some((part, position)) = parked {
                // Set aside by a revocation, or kept warm on standby: replay what was written
                // since.
                if position < end {
                    starts.push((p, position));
                    total += end - position;
                }
                let restored = Restored {
                    source: if a.standby { "standby" } else { "set_aside" },
                    from_copy: part.data.len(),
                    ..Restored::default()
                };
                plans.insert(p, (restored, position - 1, part.stored));
                loaded += part.data.len();
                self.with_parts(|parts| {
                    parts.insert(p, part);
                });
                continue;
            }
            let (entries, checkpoint) = a.store.load(name, p)?;
            let mut part = Part::default();
            for (k, v) in entries {
                match (
                    self.inner.key_codec.decode(&k),
                    self.inner.value_codec.decode(&v),
                ) {
                    (Ok(k), Ok(v)) => {
                        part.data.insert(k, v);
                    }
                    _ => {
                        tracing::warn!(table = %name, partition = p, "undecodable entry in the local store skipped")
                    }
                }
            }
            loaded += part.data.len();
            let from = checkpoint.map_or(0, |c| c + 1);
            if from > end {
                // The changelog is shorter than what the store has seen: a new embedded
                // broker, or a changelog topic that was deleted and created again.
                tracing::warn!(
                    table = %name,
                    partition = p,
                    checkpoint = from - 1,
                    changelog_end = end,
                    "the local store is ahead of the changelog; keeping the local state"
                );
            } else if from < end {
                starts.push((p, from));
                total += end - from;
            }
            let restored = Restored {
                source: if persistent && (checkpoint.is_some() || !part.data.is_empty()) {
                    "store"
                } else {
                    "changelog"
                },
                from_store: part.data.len(),
                ..Restored::default()
            };
            // The store holds what it loaded, as of its checkpoint.
            plans.insert(p, (restored, from - 1, true));
            self.with_parts(|parts| {
                parts.insert(p, part);
            });
        }
        tracing::info!(
            table = %name,
            partitions = ?partitions,
            from_local = loaded,
            changelog_records = total,
            "recovering table partitions"
        );
        let replayed = if total > 0 {
            let track: BTreeSet<u32> = plans
                .iter()
                .filter(|(_, (_, _, in_store))| persistent && *in_store)
                .map(|(p, _)| *p)
                .collect();
            self.replay(&a, &topic, starts, &ends, total, &track)
                .await?
        } else {
            HashMap::new()
        };
        for (p, (restored, _, _)) in plans.iter_mut() {
            if let Some(r) = replayed.get(p) {
                restored.changelog_records = r.records;
            }
        }
        if persistent {
            self.store_restored(&a, &mut plans, replayed).await?;
        }
        self.inner
            .recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| !partitions.contains(p));
        let secs = started.elapsed().as_secs_f64();
        {
            let mut report = self
                .inner
                .restored
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (p, (mut restored, _, _)) in plans {
                restored.seconds = secs;
                report.insert(p, restored);
            }
        }
        tracing::info!(
            table = %name,
            partitions = ?partitions,
            records = total,
            seconds = format!("{secs:.3}"),
            "table partitions recovered"
        );
        Ok(())
    }

    /// Writes restored partitions to the local store: the keys the changelog replay changed
    /// where the store already held the state they were replayed onto, the whole partition
    /// where it did not (a standby copy, or a copy set aside while a standby tailer read it).
    async fn store_restored(
        &self,
        a: &Attached,
        plans: &mut BTreeMap<u32, (Restored, i64, bool)>,
        mut replayed: HashMap<u32, Replayed<K>>,
    ) -> Result<()> {
        let name = self.inner.name.clone();
        for (&p, (restored, base, in_store)) in plans.iter_mut() {
            let replay = replayed.remove(&p).unwrap_or_default();
            let checkpoint = replay.last.unwrap_or(*base);
            let write = self.with_parts(|parts| {
                let part = parts.get_mut(&p)?;
                part.stored = true;
                if *in_store {
                    if replay.keys.is_empty() {
                        return None;
                    }
                    let changes: Vec<Change> = replay
                        .keys
                        .iter()
                        .filter_map(|k| self.encode_change(k, part.data.get(k)))
                        .collect();
                    Some(StoreWrite::Changes(changes))
                } else {
                    let entries: store::Entries = part
                        .data
                        .iter()
                        .filter_map(|(k, v)| match self.encode_change(k, Some(v)) {
                            Some((k, Some(v))) => Some((k, v)),
                            _ => None,
                        })
                        .collect();
                    Some(StoreWrite::Replace(entries))
                }
            });
            let Some(write) = write else {
                continue;
            };
            restored.stored_keys = match &write {
                StoreWrite::Changes(c) => c.len(),
                StoreWrite::Replace(e) => e.len(),
            };
            let (store, name, base) = (a.store.clone(), name.clone(), *base);
            tokio::task::spawn_blocking(move || match write {
                StoreWrite::Changes(changes) => {
                    // In bounded batches; only the last moves the checkpoint (a crash
                    // between them replays the same records again, which is harmless).
                    let mut chunks = changes.chunks(STORE_BATCH).peekable();
                    while let Some(chunk) = chunks.next() {
                        let at = if chunks.peek().is_none() {
                            checkpoint
                        } else {
                            base
                        };
                        store.write(&name, p, chunk, at)?;
                    }
                    Ok(())
                }
                StoreWrite::Replace(entries) => store.replace(&name, p, &entries, checkpoint),
            })
            .await
            .map_err(|e| Error::Store(format!("storing restored partition {p}: {e}")))??;
        }
        Ok(())
    }

    /// Encodes a key and its value (`None`: removed) for the changelog or the store; `None`
    /// (logged) when either cannot be encoded.
    fn encode_change(&self, key: &K, value: Option<&V>) -> Option<Change> {
        let k = match self.inner.key_codec.encode(key) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(table = %self.inner.name, error = %e, "cannot encode a table key; change not written");
                return None;
            }
        };
        let v = match value {
            Some(v) => match self.inner.value_codec.encode(v) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(table = %self.inner.name, error = %e, "cannot encode a table value; change not written");
                    return None;
                }
            },
            None => None,
        };
        Some((k, v))
    }

    /// Keeps the standby copies (the set-aside partitions) up to date by reading their
    /// changelog partitions from where each copy stands, until the worker stops. With placed
    /// replicas it also follows the placement: partitions placed here get a copy (read from
    /// the changelog's start), copies placed elsewhere are dropped after [`STANDBY_LINGER`].
    async fn tail(&self) -> Result<()> {
        let a = self.inner.attached()?;
        let mut reading: Option<BTreeSet<u32>> = None;
        let mut consumer: Option<Box<dyn crate::transport::Consumer>> = None;
        let mut unplaced: HashMap<u32, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(PLACEMENT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The placement and the partitions to read are looked at on each tick, not per batch.
        let mut reconcile = true;
        loop {
            if std::mem::take(&mut reconcile) {
                let ready = self
                    .follow_placement(&a, &mut unplaced, &mut reading, &mut consumer)
                    .await;
                if !ready {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = a.rt.stop.cancelled() => break,
                    }
                    reconcile = true;
                    continue;
                }
            }
            let event = tokio::select! {
                e = async {
                    match consumer.as_mut() {
                        Some(c) => c.poll().await,
                        None => std::future::pending().await,
                    }
                } => e,
                _ = tick.tick() => {
                    reconcile = true;
                    continue;
                }
                _ = a.rt.stop.cancelled() => break,
            };
            let batch = match event {
                Ok(ConsumerEvent::Messages(batch)) => batch,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(table = %self.inner.name, error = %e, "standby tailer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
            for m in &batch {
                let Some((part, position)) = parked.get_mut(&m.partition) else {
                    continue;
                };
                if m.offset < *position {
                    continue;
                }
                *position = m.offset + 1;
                part.stored = false;
                self.apply_record(part, m);
            }
        }
        if let Some(consumer) = consumer {
            let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        }
        Ok(())
    }

    /// Brings the copies in line with the placement (placed replicas only) and the changelog
    /// reader in line with the copies: a new reader, from where each copy stands, when the set
    /// of copies changed. False when the reader cannot be made (try again later).
    async fn follow_placement(
        &self,
        a: &Attached,
        unplaced: &mut HashMap<u32, Instant>,
        reading: &mut Option<BTreeSet<u32>>,
        consumer: &mut Option<Box<dyn crate::transport::Consumer>>,
    ) -> bool {
        if a.placed > 0 {
            self.place(a, unplaced);
        }
        let starts: BTreeMap<u32, i64> = self
            .inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, (_, position))| (*p, *position))
            .collect();
        let wanted: BTreeSet<u32> = starts.keys().copied().collect();
        if reading.as_ref() == Some(&wanted) {
            return true;
        }
        if let Some(old) = consumer.take() {
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        }
        if !wanted.is_empty() {
            match a
                .rt
                .transport
                .partitions_consumer(&a.spec.name, starts.into_iter().collect())
                .await
            {
                Ok(c) => *consumer = Some(c),
                Err(e) => {
                    tracing::debug!(table = %self.inner.name, error = %e, "standby tailer cannot read the changelog; retrying");
                    return false;
                }
            }
        }
        tracing::debug!(table = %self.inner.name, partitions = ?wanted, "standby copies");
        *reading = Some(wanted);
        true
    }

    /// Brings the standby copies in line with the placement: a copy for each partition placed
    /// here that this worker does not own, none for the others (after [`STANDBY_LINGER`]).
    fn place(&self, a: &Attached, unplaced: &mut HashMap<u32, Instant>) {
        let Some(placed) =
            a.rt.members
                .standby_partitions(&a.rt.instance, a.spec.partitions, a.placed)
        else {
            // This worker's own record is not read yet: keep what there is.
            return;
        };
        // A partition being restored may still take its copy: leave those alone.
        let recovering = self
            .inner
            .recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let owned: BTreeSet<u32> = self.with_parts(|parts| {
            parts
                .keys()
                .copied()
                .filter(|p| !recovering.contains(p))
                .collect()
        });
        let now = Instant::now();
        let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
        for p in &placed {
            unplaced.remove(p);
            if !owned.contains(p) && !recovering.contains(p) {
                parked.entry(*p).or_insert_with(|| (Part::default(), 0));
            }
        }
        parked.retain(|p, _| {
            if recovering.contains(p) {
                return true;
            }
            if owned.contains(p) {
                // Owned here: a copy is of no use.
                return false;
            }
            if placed.contains(p) {
                return true;
            }
            let since = *unplaced.entry(*p).or_insert(now);
            now.duration_since(since) < STANDBY_LINGER
        });
        unplaced.retain(|p, _| parked.contains_key(p));
    }

    /// Applies one changelog record to a partition; returns the key it changed.
    fn apply_record(&self, part: &mut Part<K, V>, m: &crate::transport::Message) -> Option<K> {
        let name = &self.inner.name;
        let k = m.key.as_deref()?;
        let key = match self.inner.key_codec.decode(k) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(table = %name, topic = %m.topic, partition = m.partition, offset = m.offset, error = %e, "undecodable changelog key skipped");
                return None;
            }
        };
        match m.value.as_deref() {
            None | Some([]) => {
                part.data.remove(&key);
            }
            Some(v) => match self.inner.value_codec.decode(v) {
                Ok(v) => {
                    part.data.insert(key.clone(), v);
                }
                Err(e) => {
                    tracing::warn!(table = %name, topic = %m.topic, partition = m.partition, offset = m.offset, error = %e, "undecodable changelog value skipped");
                    return None;
                }
            },
        }
        Some(key)
    }

    /// Applies changelog records from `starts` up to `ends`, reporting progress; returns, per
    /// partition, how many records it applied, the last one's offset and, for the partitions
    /// in `track`, the keys they changed.
    async fn replay(
        &self,
        a: &Attached,
        topic: &str,
        starts: Vec<(u32, i64)>,
        ends: &[i64],
        total: i64,
        track: &BTreeSet<u32>,
    ) -> Result<HashMap<u32, Replayed<K>>> {
        let mut replayed: HashMap<u32, Replayed<K>> = HashMap::new();
        let name = &self.inner.name;
        let mut remaining: BTreeMap<u32, i64> = starts
            .iter()
            .map(|&(p, _)| (p, ends.get(p as usize).copied().unwrap_or(0)))
            .collect();
        let mut consumer = a.rt.transport.partitions_consumer(topic, starts).await?;
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut done = 0i64;
        while !remaining.is_empty() {
            let event = tokio::select! {
                e = consumer.poll() => e?,
                _ = a.rt.stop.cancelled() => {
                    return Err(Error::ShuttingDown { app: self.inner.core.id.to_string() })
                }
            };
            let batch = match event {
                ConsumerEvent::Messages(batch) => batch,
                // The end of what is committed: with transactions, the changelog's last
                // offsets may be commit markers (never read) or records of a transaction
                // still open (not ours to restore).
                ConsumerEvent::Ended(tps) => {
                    for tp in tps {
                        if *tp.topic == *topic {
                            remaining.remove(&tp.partition);
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            let before = done;
            self.with_parts(|parts| {
                for m in &batch {
                    let Some(end) = remaining.get(&m.partition).copied() else {
                        continue;
                    };
                    if m.offset >= end {
                        continue;
                    }
                    done += 1;
                    if m.offset + 1 >= end {
                        remaining.remove(&m.partition);
                    }
                    let Some(part) = parts.get_mut(&m.partition) else {
                        continue;
                    };
                    let r = replayed.entry(m.partition).or_default();
                    r.records += 1;
                    r.last = Some(m.offset);
                    if let Some(key) = self.apply_record(part, m) {
                        if track.contains(&m.partition) {
                            r.keys.insert(key);
                        }
                    }
                }
            });
            let (replayed, left) = ((done - before) as u64, (total - done).max(0) as u64);
            crate::metrics::recovery_progress(&a.rt.app_id, name, replayed, left);
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-6);
                let eta = (total - done) as f64 / rate.max(1.0);
                tracing::info!(
                    table = %name,
                    done,
                    total,
                    rate = format!("{rate:.0}/s"),
                    eta = format!("{eta:.1}s"),
                    "recovering"
                );
            }
        }
        a.rt.stats.table_replayed(name, done as u64);
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        Ok(replayed)
    }
}
