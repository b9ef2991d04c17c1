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
//!   persistent (see the `store` module), then from the changelog records written after it.
//! - On revocation the partitions are committed, then dropped from memory.
//!
//! With at-least-once processing, events processed since the last commit are processed again
//! after a crash, so their table updates are applied again.

// This file: tables and their readers. What a commit writes is in `changelog`, restoring
// partitions in `recovery`, standby replicas in `standby`, lookups by key in `lookup`, tables
// with their types erased (for the engine and the app) in `runner`, local stores in `store`,
// windowed tables in `window`.
mod changelog;
mod lookup;
mod recovery;
mod runner;
mod standby;
pub(crate) mod store;
pub mod window;

pub(crate) use lookup::{table_row, Lookup, TABLE_COLUMNS};
pub(crate) use recovery::Restored;
pub(crate) use runner::TableRunner;
pub(crate) use standby::standby_replicas;
pub use window::{Window, WindowRange, WindowSet, WindowedReader, WindowedTable};

use crate::codec::{Codec, Json};
use crate::engine::AppCore;
use crate::engine::StateHandle;
use crate::error::{Error, Result};
use crate::partitioner::partition_for_key;
use crate::stream::ActorCtx;
use crate::transport::TopicSpec;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};
use store::Store;

tokio::task_local! {
    /// The actor whose agent body is running on this task: tables read the current event's
    /// partition and the agent's concurrency from it.
    pub(crate) static ACTOR: Arc<ActorCtx>;
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

/// A revoked partition set aside, with the changelog offset its data reaches.
type Parked<K, V> = (Part<K, V>, i64);

/// Where a running table writes.
#[derive(Clone)]
struct Attached {
    /// The worker, as far as a table may use it.
    worker: StateHandle,
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
