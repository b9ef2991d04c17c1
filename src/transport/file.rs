//! The durable embedded transport: `file://PATH`, the embedded transport's log on disk.
//!
//! Everything an app's log holds lives under `PATH/<app id>/log`, in a fjall keyspace: the
//! topics and their shapes, every record still kept, each partition's log-start offset, and
//! the offsets consumer groups committed. A restarted worker finds its topics as it left them:
//! the input it had not processed, its outputs, its tables' changelogs and its group's
//! offsets.
//!
//! See [`FileBroker`] for the design, what survives what, exactly-once and locking.

use super::memory::{MemoryBroker, MemoryTransport};
use super::{
    Consumer, ConsumerEvent, OutgoingRecord, RecordPosition, StartAt, TopicPartition, TopicSpec,
    Transport,
};
use crate::error::TransportError;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Writes waiting for the writer thread; a sender waits for room beyond this.
const QUEUE: usize = 64 * 1024;
/// Most operations the writer puts in one batch.
const MAX_BATCH: usize = 16 * 1024;
/// fjall's block cache: records are read from disk only when a log is opened.
const CACHE_BYTES: u64 = 4 << 20;
/// fjall's write buffer for all its partitions, and each partition's memtable: what fjall holds
/// in memory of what it wrote before flushing it to disk tables. With these, and no bloom
/// filters (the log reads records in order, never by key; a filter per table file was what
/// grew), a million records through the log grow resident memory by a few megabytes
/// (tests/durable_memory_behavior.rs).
const WRITE_BUFFER_BYTES: u64 = 16 << 20;
const MEMTABLE_BYTES: u32 = 8 << 20;

/// When the durable transport syncs its writes to the disk (the `fsync` parameter of a
/// `file://` URL). Whatever the policy, every write is handed to the operating system before
/// it is acknowledged, so it survives the process being killed; the policy decides what also
/// survives a power loss or an operating system crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// `fsync=commit` (the default): consumer commits (with exactly-once, the produced
    /// records in them) and [`flush`](Transport::flush) are synced before they return; records
    /// sent outside a commit are synced with the next one. A power loss loses at most what was
    /// sent since the last commit or flush, and never a commit in part.
    #[default]
    Commit,
    /// `fsync=always`: every write is synced before it is acknowledged (slower: one sync per
    /// batch of writes).
    Always,
    /// `fsync=never`: the disk gets writes when the operating system writes them back; a
    /// power loss may lose the last seconds of writes, commits included (each commit still
    /// whole or not at all).
    Never,
}

impl Fsync {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "commit" => Some(Self::Commit),
            "always" => Some(Self::Always),
            "never" => Some(Self::Never),
            _ => None,
        }
    }
}

/// What a `file://` URL says: the directory and the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileUrl {
    pub(crate) dir: PathBuf,
    pub(crate) fsync: Fsync,
}

impl FileUrl {
    /// Parses `file://PATH[?fsync=commit|always|never]`.
    pub(crate) fn parse(url: &str) -> Result<Self, TransportError> {
        let rest = url
            .strip_prefix("file://")
            .ok_or_else(|| TransportError::UnsupportedUrl(url.to_owned()))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(TransportError::Other(format!(
                "broker URL {url:?} names no directory: use file://PATH (file://./data, \
                 file:///var/lib/app)"
            )));
        }
        let mut fsync = Fsync::default();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("fsync", v)) => {
                    fsync = Fsync::parse(v).ok_or_else(|| {
                        TransportError::Other(format!(
                            "broker URL {url:?}: fsync={v:?} is not one of commit, always, never"
                        ))
                    })?;
                }
                _ => {
                    return Err(TransportError::Other(format!(
                        "broker URL {url:?}: unknown option {pair:?} (file:// takes \
                         fsync=commit|always|never)"
                    )))
                }
            }
        }
        Ok(Self {
            dir: PathBuf::from(path),
            fsync,
        })
    }
}

/// An app's durable log on disk, open in this process: what `file://PATH` connects to.
///
/// [`open`](FileBroker::open) it to look at a log while no worker of another process has it
/// open (a worker of this process shares it); [`memory`](FileBroker::memory) is its index,
/// with the records, offsets and groups it holds.
///
/// # Design
///
/// The log has two layers. A [`MemoryBroker`] is the index consumers read from: its consumer
/// groups, rebalances, retention and compaction are the embedded transport's, unchanged. Beneath
/// it, fjall is the durable copy: when the log is opened, the records kept, log-start offsets
/// and committed offsets are loaded into a fresh broker, and from then on every append, commit
/// and removal is written to fjall before (appends, commits) or right after (removals) the
/// broker makes it. The records one write batch appends to a partition are stored as one
/// value (a chunk), keyed `topic \0 partition (big-endian) first offset (big-endian)`: a
/// partition's chunks are in offset order, so loading reads them in order, and retention,
/// which removes records from the front of a partition, removes whole chunks (a chunk goes
/// with its last record; loading skips the records below the log-start offset). A write or a
/// trim costs one fjall key per partition and batch rather than one per record, which is what
/// makes the log about as fast as `memory://` (`cargo bench --bench durable`). A compacted
/// partition (a changelog) is written again, as the records the index keeps, when a compaction
/// has removed some.
///
/// Keeping the index in memory (rather than reading consumers' records back from fjall) keeps
/// one implementation of groups and retention for both embedded transports, and the reading
/// side as fast as `memory://`. What it costs is that the records a group has not committed are
/// held in memory as well as on disk, as on `memory://`; a worker commits every 10,000 records
/// or [`commit_interval`](crate::Settings::commit_interval), so that is a few megabytes while
/// it runs, and at most what an unread partition keeps ([`Retention`](super::Retention)).
///
/// One writer thread makes every write: it takes every pending append and commit at once and
/// writes them as one fjall batch, then makes them visible in the index, then answers their
/// senders (group commit). So records are never visible before they are written, and
/// throughput comes from batching, not from skipping the write.
///
/// # Durability
///
/// Every batch is written to the operating system before anyone is told it is done (fjall's
/// journal buffer is flushed), so what was acknowledged survives the process being killed
/// (`kill -9`). What survives a power loss is what was synced to the disk, which the URL's
/// `fsync` parameter decides ([`Fsync`]).
///
/// # Exactly-once
///
/// A worker with [`ProcessingGuarantee::ExactlyOnce`](crate::ProcessingGuarantee) stages what
/// its agents produce, table changes included: staged records are neither visible nor on disk.
/// Its consumer's commit writes the consumed offsets and every staged record in one fjall
/// batch, which fjall's journal recovers whole or not at all, then makes the records visible;
/// an abort drops them. Readers never see a record of an uncommitted commit.
///
/// # Locking
///
/// A log is one process's: opening it takes an exclusive lock on `PATH/<app id>/log.lock`, and
/// a second process gets an error naming the directory. Within a process, every app that opens
/// the same directory shares one open log.
pub struct FileBroker {
    shared: Arc<Shared>,
    writer: Mutex<Option<(mpsc::Sender<Op>, std::thread::JoinHandle<()>)>>,
    /// The lock on the directory; released last, once fjall has let the directory go.
    _lock: DirLock,
}

impl fmt::Debug for FileBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBroker")
            .field("path", &self.shared.path)
            .finish()
    }
}

/// What the writer thread and the handles share.
struct Shared {
    path: PathBuf,
    memory: Arc<MemoryBroker>,
    keyspace: fjall::Keyspace,
    records: fjall::PartitionHandle,
    meta: fjall::PartitionHandle,
    /// The first failure of a queued write (see [`Transport::enqueue`]), told at the next flush.
    failed: Mutex<Option<TransportError>>,
}

/// A write for the writer thread.
enum Op {
    Append {
        record: OutgoingRecord,
        sync: bool,
        /// `None` for a queued record, whose failure the next flush reports.
        done: Option<oneshot::Sender<Result<RecordPosition, TransportError>>>,
    },
    Commit {
        group: String,
        offsets: Vec<(TopicPartition, i64)>,
        records: Vec<OutgoingRecord>,
        sync: bool,
        done: oneshot::Sender<Result<(), TransportError>>,
    },
    Flush {
        sync: bool,
        done: oneshot::Sender<Result<(), TransportError>>,
    },
    /// Removes a topic, its records and offsets from the log.
    Delete {
        topic: String,
        done: oneshot::Sender<Result<(), TransportError>>,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fail(path: &Path, what: &str, e: impl fmt::Display) -> TransportError {
    TransportError::Other(format!("{what} ({}): {e}", path.display()))
}

fn closed(path: &Path) -> TransportError {
    TransportError::Other(format!(
        "the log at {} is closed (its writer stopped)",
        path.display()
    ))
}

impl FileBroker {
    /// Opens the log of app `app_id` under `dir` (`dir/<app id>/log`), creating it if
    /// missing, and loads what it keeps. In a process that has it open already, returns that.
    ///
    /// Fails, naming the directory, when another process has it open, or when it cannot be
    /// read.
    pub fn open(dir: impl AsRef<Path>, app_id: &str) -> Result<Arc<FileBroker>, TransportError> {
        static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<FileBroker>>>> = OnceLock::new();
        let app_dir = dir.as_ref().join(app_id);
        std::fs::create_dir_all(&app_dir)
            .map_err(|e| fail(&app_dir, "cannot create the log directory", e))?;
        let app_dir = app_dir
            .canonicalize()
            .map_err(|e| fail(&app_dir, "cannot find the log directory", e))?;
        let mut open = lock(OPEN.get_or_init(Default::default));
        if let Some(broker) = open.get(&app_dir).and_then(Weak::upgrade) {
            return Ok(broker);
        }
        let broker = Arc::new(Self::load(&app_dir)?);
        open.retain(|_, b| b.strong_count() > 0);
        open.insert(app_dir, Arc::downgrade(&broker));
        Ok(broker)
    }

    fn load(app_dir: &Path) -> Result<Self, TransportError> {
        let lock = DirLock::take(&app_dir.join("log.lock"), app_dir)?;
        let path = app_dir.join("log");
        let keyspace = fjall::Config::new(&path)
            .cache_size(CACHE_BYTES)
            .max_write_buffer_size(WRITE_BUFFER_BYTES)
            .manual_journal_persist(true)
            .open()
            .map_err(|e| fail(&path, "cannot open the log", e))?;
        let options = || {
            fjall::PartitionCreateOptions::default()
                .max_memtable_size(MEMTABLE_BYTES)
                .bloom_filter_bits(None)
        };
        let records = keyspace
            .open_partition("records", options())
            .map_err(|e| fail(&path, "cannot open the log's records", e))?;
        let meta = keyspace
            .open_partition("meta", options())
            .map_err(|e| fail(&path, "cannot open the log's offsets", e))?;
        let shared = Arc::new(Shared {
            path,
            memory: MemoryBroker::new(),
            keyspace,
            records,
            meta,
            failed: Mutex::new(None),
        });
        let disk = shared.load()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("rill-file-log".into())
                .spawn(move || {
                    Writer {
                        shared,
                        disk,
                        unsynced: false,
                    }
                    .run(rx)
                })
                .map_err(|e| fail(app_dir, "cannot start the log's writer", e))?
        };
        Ok(Self {
            shared,
            writer: Mutex::new(Some((tx, writer))),
            _lock: lock,
        })
    }

    /// The log's in-memory index: the records it keeps, offsets, groups.
    pub fn memory(&self) -> &Arc<MemoryBroker> {
        &self.shared.memory
    }

    /// The log's directory (`PATH/<app id>/log`).
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// How many records of a partition are on disk. Records are stored in chunks (those of
    /// one partition one write batch wrote), and a chunk goes when its last record does, so
    /// this counts records below the log-start offset that share a chunk with kept ones.
    pub fn records_on_disk(&self, topic: &str, partition: u32) -> Result<usize, TransportError> {
        let mut n = 0;
        for kv in self
            .shared
            .records
            .prefix(partition_prefix(topic, partition))
        {
            let (k, v) = kv.map_err(|e| fail(&self.shared.path, "cannot read the log", e))?;
            n += decode_chunk(&v)
                .ok_or_else(|| {
                    fail(
                        &self.shared.path,
                        "cannot read the log",
                        format!("an unreadable chunk {:?}", String::from_utf8_lossy(&k)),
                    )
                })?
                .len();
        }
        Ok(n)
    }

    /// A transport on this log. With `exactly_once`, what is sent through it is staged until a
    /// group consumer made by it commits (see [exactly-once](FileBroker#exactly-once)).
    pub fn transport(self: &Arc<Self>, fsync: Fsync, exactly_once: bool) -> FileTransport {
        FileTransport {
            memory: MemoryTransport::new(self.shared.memory.clone()),
            broker: self.clone(),
            fsync,
            stage: exactly_once.then(|| Arc::new(Stage::default())),
        }
    }

    fn sender(&self) -> Result<mpsc::Sender<Op>, TransportError> {
        lock(&self.writer)
            .as_ref()
            .map(|(tx, _)| tx.clone())
            .ok_or_else(|| closed(&self.shared.path))
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, TransportError>>) -> Op,
    ) -> Result<T, TransportError> {
        let (done, rx) = oneshot::channel();
        self.sender()?
            .send(op(done))
            .await
            .map_err(|_| closed(&self.shared.path))?;
        rx.await.map_err(|_| closed(&self.shared.path))?
    }

    fn ensure_topic(&self, spec: &TopicSpec) -> Result<u32, TransportError> {
        if spec.name.contains('\0') {
            return Err(TransportError::Other(format!(
                "topic name {:?} has a NUL character",
                spec.name
            )));
        }
        if self.shared.memory.partitions(&spec.name).is_none() && spec.partitions > 0 {
            // On disk before anyone can write to it, so a restart knows the topic's shape.
            let stored = StoredSpec::from(spec);
            let value = serde_json::to_vec(&stored)
                .map_err(|e| fail(&self.shared.path, "cannot encode a topic", e))?;
            let mut batch = self
                .shared
                .keyspace
                .batch()
                .durability(Some(fjall::PersistMode::SyncData));
            batch.insert(&self.shared.meta, topic_key(&spec.name), value);
            batch
                .commit()
                .map_err(|e| fail(&self.shared.path, "cannot write a topic", e))?;
        }
        self.shared.memory.create_topic(spec)
    }
}

impl Drop for FileBroker {
    fn drop(&mut self) {
        // The writer finishes what is queued, then lets fjall go before the lock is released.
        if let Some((tx, writer)) = lock(&self.writer).take() {
            drop(tx);
            let _ = writer.join();
        }
    }
}

/// An exclusive lock on a file, held while the log is open.
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn take(path: &Path, dir: &Path) -> Result<Self, TransportError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| fail(path, "cannot open the log's lock file", e))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(TransportError::Other(format!(
                    "the log at {} is in use by another process ({e}): one worker process \
                     at a time opens an app's file:// log",
                    dir.display()
                )));
            }
        }
        #[cfg(not(unix))]
        let _ = dir;
        Ok(Self { _file: file })
    }
}

/// A topic's shape as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSpec {
    name: String,
    partitions: u32,
    compacted: bool,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
}

impl From<&TopicSpec> for StoredSpec {
    fn from(spec: &TopicSpec) -> Self {
        Self {
            name: spec.name.clone(),
            partitions: spec.partitions,
            compacted: spec.compacted,
            retention_ms: spec
                .retention
                .time
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            retention_bytes: spec.retention.bytes,
        }
    }
}

impl StoredSpec {
    fn spec(self) -> TopicSpec {
        TopicSpec {
            name: self.name,
            partitions: self.partitions,
            replication_factor: 1,
            compacted: self.compacted,
            retention: super::Retention {
                time: self.retention_ms.map(Duration::from_millis),
                bytes: self.retention_bytes,
            },
        }
    }
}

const TOPIC: &[u8] = b"topic\0";
const START: &[u8] = b"start\0";
const OFFSET: &[u8] = b"offset\0";
/// What a partition remembers of an idempotent writer: `producer\0 topic \0 partition(4) id`
/// to when it last wrote (8), its last sequence number (8) and that record's offset (8); kept
/// apart from the records (which commits remove), so that a retry is answered after a restart
/// too.
const PRODUCER: &[u8] = b"producer\0";

fn topic_key(topic: &str) -> Vec<u8> {
    [TOPIC, topic.as_bytes()].concat()
}

fn start_key(topic: &str, partition: u32) -> Vec<u8> {
    [START, topic.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
}

fn offset_key(group: &str, tp: &TopicPartition) -> Vec<u8> {
    [
        OFFSET,
        group.as_bytes(),
        b"\0",
        tp.topic.as_bytes(),
        b"\0",
        &tp.partition.to_be_bytes(),
    ]
    .concat()
}

fn producer_key(topic: &str, partition: u32, id: &[u8]) -> Vec<u8> {
    [PRODUCER, &partition_prefix(topic, partition), id].concat()
}

/// A producer key's topic, partition and producer id.
fn parse_producer_key(key: &[u8]) -> Option<(&str, u32, &[u8])> {
    let rest = key.strip_prefix(PRODUCER)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let topic = std::str::from_utf8(&rest[..nul]).ok()?;
    let (p, id) = rest[nul + 1..].split_at_checked(4)?;
    Some((topic, u32::from_be_bytes(p.try_into().ok()?), id))
}

fn encode_producer(at: i64, seq: u64, offset: i64) -> Vec<u8> {
    [at.to_be_bytes(), seq.to_be_bytes(), offset.to_be_bytes()].concat()
}

fn decode_producer(v: &[u8]) -> Option<(i64, u64, i64)> {
    if v.len() != 24 {
        return None;
    }
    let (at, rest) = v.split_at(8);
    let (seq, offset) = rest.split_at(8);
    Some((
        i64_value(at)?,
        u64::from_be_bytes(seq.try_into().ok()?),
        i64_value(offset)?,
    ))
}

fn partition_prefix(topic: &str, partition: u32) -> Vec<u8> {
    [topic.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
}

fn record_key(topic: &str, partition: u32, offset: i64) -> Vec<u8> {
    let mut k = partition_prefix(topic, partition);
    k.extend_from_slice(&(offset as u64).to_be_bytes());
    k
}

/// `name \0 partition(4)`, the end of a meta key: the name and the partition.
fn split_partition(rest: &[u8]) -> Option<(&[u8], u32)> {
    let (name, p) = rest.split_at_checked(rest.len().checked_sub(5)?)?;
    let (nul, p) = p.split_first()?;
    (*nul == 0).then_some(())?;
    Some((name, u32::from_be_bytes(p.try_into().ok()?)))
}

/// A record key: topic, partition, offset.
fn parse_record_key(key: &[u8]) -> Option<(&str, u32, i64)> {
    let (rest, offset) = key.split_at_checked(key.len().checked_sub(8)?)?;
    let (topic, partition) = split_partition(rest)?;
    let offset = i64::try_from(u64::from_be_bytes(offset.try_into().ok()?)).ok()?;
    Some((std::str::from_utf8(topic).ok()?, partition, offset))
}

fn i64_value(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(v.try_into().ok()?))
}

/// A record's value on disk: flags (1: key, 2: value), timestamp, key, value, headers, each
/// length-prefixed (u32, big-endian).
fn encode_record(record: &OutgoingRecord, timestamp: i64) -> Vec<u8> {
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| b.len() + 4);
    let headers: usize = record
        .headers
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(13 + len(&record.key) + len(&record.value) + headers);
    let flags = u8::from(record.key.is_some()) | (u8::from(record.value.is_some()) << 1);
    out.push(flags);
    out.extend_from_slice(&timestamp.to_be_bytes());
    let mut put = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    if let Some(k) = &record.key {
        put(k);
    }
    if let Some(v) = &record.value {
        put(v);
    }
    out.extend_from_slice(&(record.headers.len() as u32).to_be_bytes());
    for (k, v) in &record.headers {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes what [`encode_record`] wrote into a record for `topic`/`partition`.
fn decode_record(value: &[u8], topic: &str, partition: u32) -> Option<OutgoingRecord> {
    let bytes = Bytes::copy_from_slice(value);
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<Bytes> {
        let end = at.checked_add(n)?;
        let b = bytes.get(at..end).map(|_| bytes.slice(at..end))?;
        at = end;
        Some(b)
    };
    let flags = take(1)?[0];
    let timestamp = i64::from_be_bytes(take(8)?[..].try_into().ok()?);
    let field = |take: &mut dyn FnMut(usize) -> Option<Bytes>| -> Option<Bytes> {
        let n = u32::from_be_bytes(take(4)?[..].try_into().ok()?) as usize;
        take(n)
    };
    let key = if flags & 1 != 0 {
        Some(field(&mut take)?)
    } else {
        None
    };
    let value = if flags & 2 != 0 {
        Some(field(&mut take)?)
    } else {
        None
    };
    let count = u32::from_be_bytes(take(4)?[..].try_into().ok()?) as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = field(&mut take)?;
        let name = String::from_utf8(name.to_vec()).ok()?;
        headers.push((name, field(&mut take)?));
    }
    Some(OutgoingRecord {
        topic: Arc::from(topic),
        partition,
        key,
        value,
        headers,
        timestamp: Some(timestamp),
    })
}

/// What is on disk of a partition, as the writer knows it.
#[derive(Debug, Default)]
struct DiskLog {
    /// The log-start offset stored.
    start: i64,
    /// The partition's chunks on disk, oldest first.
    chunks: VecDeque<Chunk>,
    /// Records in them.
    count: usize,
}

/// A chunk: the records of one partition one batch wrote, stored as one value under the
/// offset of the first, so that the log writes (and removes) one key per partition and batch
/// rather than one per record.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    first: i64,
    /// Past its last record's offset.
    end: i64,
    count: usize,
}

/// Records per chunk when a compacted partition is written again.
const CHUNK_RECORDS: usize = 4096;

/// A chunk's value: the record count, then each record's offset, length and encoding.
fn encode_chunk(records: &[(i64, Vec<u8>)]) -> Vec<u8> {
    let size: usize = records.iter().map(|(_, r)| 12 + r.len()).sum();
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (offset, r) in records {
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// The records of a chunk: offset and encoding.
fn decode_chunk(value: &[u8]) -> Option<Vec<(i64, &[u8])>> {
    let (n, mut rest) = value.split_at_checked(4)?;
    let n = u32::from_be_bytes(n.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n.min(CHUNK_RECORDS * 4));
    for _ in 0..n {
        let (offset, r) = rest.split_at_checked(8)?;
        let (len, r) = r.split_at_checked(4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (record, r) = r.split_at_checked(len)?;
        out.push((i64::from_be_bytes(offset.try_into().ok()?), record));
        rest = r;
    }
    rest.is_empty().then_some(out)
}

type Key = (Arc<str>, u32);

impl Shared {
    /// Loads the log into the index: offsets first, so that loading keeps what groups have
    /// not committed; then the topics, their start offsets and their records.
    fn load(&self) -> Result<HashMap<Key, DiskLog>, TransportError> {
        let path = &self.path;
        let corrupt = |what: &str, key: &[u8]| {
            TransportError::Other(format!(
                "the log at {} has an unreadable {what} (key {:?}): it was not written by this \
                 version of rill, or is damaged",
                path.display(),
                String::from_utf8_lossy(key)
            ))
        };
        let mut groups: HashMap<String, Vec<(TopicPartition, i64)>> = HashMap::new();
        for kv in self.meta.prefix(OFFSET) {
            let (k, v) = kv.map_err(|e| fail(path, "cannot read the log", e))?;
            let rest = &k[OFFSET.len()..];
            let parsed = split_partition(rest).and_then(|(names, p)| {
                let cut = names.iter().rposition(|b| *b == 0)?;
                let group = std::str::from_utf8(&names[..cut]).ok()?;
                let topic = std::str::from_utf8(&names[cut + 1..]).ok()?;
                Some((
                    group.to_owned(),
                    TopicPartition::new(topic, p),
                    i64_value(&v)?,
                ))
            });
            let (group, tp, offset) = parsed.ok_or_else(|| corrupt("committed offset", &k))?;
            groups.entry(group).or_default().push((tp, offset));
        }
        for (group, offsets) in groups {
            self.memory.restore_committed(&group, offsets);
        }
        let mut topics = Vec::new();
        for kv in self.meta.prefix(TOPIC) {
            let (k, v) = kv.map_err(|e| fail(path, "cannot read the log", e))?;
            let stored: StoredSpec =
                serde_json::from_slice(&v).map_err(|_| corrupt("topic", &k))?;
            let spec = stored.spec();
            self.memory.create_topic(&spec)?;
            topics.push(spec);
        }
        let mut disk: HashMap<Key, DiskLog> = HashMap::new();
        for kv in self.meta.prefix(START) {
            let (k, v) = kv.map_err(|e| fail(path, "cannot read the log", e))?;
            let (topic, p) = split_partition(&k[START.len()..])
                .and_then(|(t, p)| Some((std::str::from_utf8(t).ok()?, p)))
                .ok_or_else(|| corrupt("start offset", &k))?;
            let start = i64_value(&v).ok_or_else(|| corrupt("start offset", &k))?;
            self.memory.restore_start(topic, p, start);
            disk.entry((Arc::from(topic), p)).or_default().start = start;
        }
        let mut orphans = Vec::new();
        for kv in self.records.iter() {
            let (k, v) = kv.map_err(|e| fail(path, "cannot read the log", e))?;
            let (topic, p, first) = parse_record_key(&k).ok_or_else(|| corrupt("chunk", &k))?;
            if self.memory.partitions(topic).is_none() {
                // Of a deleted topic (its deletion was cut short): removed now.
                orphans.push(k);
                continue;
            }
            let records = decode_chunk(&v).ok_or_else(|| corrupt("chunk", &k))?;
            let log = disk.entry((Arc::from(topic), p)).or_default();
            let end = records.last().map_or(first, |(o, _)| o + 1);
            log.chunks.push_back(Chunk {
                first,
                end,
                count: records.len(),
            });
            log.count += records.len();
            for (offset, bytes) in records {
                if offset < log.start {
                    // Removed before the log was closed, with others of its chunk kept.
                    continue;
                }
                let record = decode_record(bytes, topic, p).ok_or_else(|| corrupt("record", &k))?;
                self.memory.append_at(record, offset)?;
            }
        }
        // What partitions remember of idempotent writers, over what re-appending the records
        // rebuilt (those of committed records are gone); writers quiet for longer than they
        // are remembered are forgotten.
        let now = super::memory::now_millis();
        let mut expired = Vec::new();
        for kv in self.meta.prefix(PRODUCER) {
            let (k, v) = kv.map_err(|e| fail(path, "cannot read the log", e))?;
            let (topic, p, id) = parse_producer_key(&k).ok_or_else(|| corrupt("producer", &k))?;
            let (at, seq, offset) = decode_producer(&v).ok_or_else(|| corrupt("producer", &k))?;
            if self.memory.partitions(topic).is_none()
                || at < now.saturating_sub(super::memory::PRODUCER_EXPIRY_MS)
            {
                expired.push(k);
                continue;
            }
            self.memory
                .restore_producer(topic, p, Bytes::copy_from_slice(id), (seq, offset), at);
        }
        if !orphans.is_empty() || !expired.is_empty() {
            let mut batch = self.keyspace.batch();
            for k in orphans {
                batch.remove(&self.records, k);
            }
            for k in expired {
                batch.remove(&self.meta, k);
            }
            batch
                .commit()
                .map_err(|e| fail(path, "cannot write to the log", e))?;
        }
        for spec in &topics {
            self.memory.retain(&spec.name);
        }
        Ok(disk)
    }
}

/// Whether `record`'s topic and partition exist.
fn check(memory: &MemoryBroker, record: &OutgoingRecord) -> Result<(), TransportError> {
    let partitions = memory
        .partitions(&record.topic)
        .ok_or_else(|| TransportError::UnknownTopic(record.topic.to_string()))?;
    if record.partition >= partitions {
        return Err(TransportError::UnknownPartition {
            topic: record.topic.to_string(),
            partition: record.partition,
            partitions,
        });
    }
    Ok(())
}

/// Gives `record` the next offset of its partition in this batch (`next`) and adds it to its
/// partition's chunk (`chunks`).
fn place(
    shared: &Shared,
    next: &mut HashMap<Key, i64>,
    now: i64,
    record: &mut OutgoingRecord,
    chunks: &mut HashMap<Key, Vec<(i64, Vec<u8>)>>,
) -> Result<i64, TransportError> {
    let memory = &shared.memory;
    check(memory, record)?;
    let key = (record.topic.clone(), record.partition);
    let offset = next.entry(key.clone()).or_insert_with(|| {
        memory
            .end_offset(&record.topic, record.partition)
            .unwrap_or(0)
    });
    let at = *offset;
    *offset += 1;
    let timestamp = *record.timestamp.get_or_insert(now);
    chunks
        .entry(key)
        .or_default()
        .push((at, encode_record(record, timestamp)));
    Ok(at)
}

/// The writer thread: the only one that appends to the index or writes to fjall.
struct Writer {
    shared: Arc<Shared>,
    disk: HashMap<Key, DiskLog>,
    /// Whether appends or commits were written since the last sync. (Removals need none: a
    /// removal lost with the machine is made again when the log is loaded.)
    unsynced: bool,
}

/// A write's outcome, told to its sender once its batch is written.
enum Reply {
    Append(
        Option<oneshot::Sender<Result<RecordPosition, TransportError>>>,
        Result<RecordPosition, TransportError>,
    ),
    Done(
        oneshot::Sender<Result<(), TransportError>>,
        Result<(), TransportError>,
    ),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut ops = Vec::new();
        while let Some(op) = rx.blocking_recv() {
            ops.push(op);
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.write(std::mem::take(&mut ops));
            self.trim();
        }
    }

    /// Writes `ops` as one batch, makes them visible, and answers their senders.
    fn write(&mut self, ops: Vec<Op>) {
        let shared = self.shared.clone();
        let memory = &shared.memory;
        let mut batch = shared.keyspace.batch();
        let mut sync = false;
        // Offsets given out in this batch, per partition.
        let mut next: HashMap<Key, i64> = HashMap::new();
        // The records of this batch, per partition.
        let mut chunks: HashMap<Key, Vec<(i64, Vec<u8>)>> = HashMap::new();
        let now = super::memory::now_millis();
        // What to make visible once written: records at their offsets, and commits.
        enum Visible {
            Record(OutgoingRecord, i64),
            Commit(String, Vec<(TopicPartition, i64)>),
        }
        let mut visible = Vec::new();
        let mut replies = Vec::with_capacity(ops.len());
        // Records of idempotent writers placed in this batch: (topic, partition, producer id,
        // sequence) to offset.
        let mut in_batch: HashMap<(Arc<str>, u32, Bytes, u64), i64> = HashMap::new();
        // The last of them per writer and partition: what the log remembers of the writer is
        // written with the records.
        let mut placed: HashMap<(Arc<str>, u32, Bytes), (u64, i64)> = HashMap::new();
        for op in ops {
            match op {
                Op::Append {
                    mut record,
                    sync: s,
                    done,
                } => {
                    sync |= s;
                    // A retried record of an idempotent writer (a remote client) is answered
                    // with its first position, here before it gets an offset: in the log
                    // already, or earlier in this batch.
                    let producer = match super::memory::producer_of(&record.headers) {
                        Some(Ok((id, seq))) => {
                            Some((record.topic.clone(), record.partition, id, seq))
                        }
                        _ => None,
                    };
                    if let Some(first) = producer.as_ref().and_then(|p| in_batch.get(p)) {
                        let position = RecordPosition {
                            partition: record.partition,
                            offset: *first,
                        };
                        replies.push(Reply::Append(done, Ok(position)));
                        continue;
                    }
                    match memory.already_written(&record) {
                        Ok(Some(position)) => {
                            replies.push(Reply::Append(done, Ok(position)));
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            replies.push(Reply::Append(done, Err(e)));
                            continue;
                        }
                    }
                    match place(&shared, &mut next, now, &mut record, &mut chunks) {
                        Ok(offset) => {
                            let position = RecordPosition {
                                partition: record.partition,
                                offset,
                            };
                            if let Some((topic, partition, id, seq)) = producer {
                                placed
                                    .insert((topic.clone(), partition, id.clone()), (seq, offset));
                                in_batch.insert((topic, partition, id, seq), offset);
                            }
                            visible.push(Visible::Record(record, offset));
                            replies.push(Reply::Append(done, Ok(position)));
                        }
                        Err(e) => replies.push(Reply::Append(done, Err(e))),
                    }
                }
                Op::Commit {
                    group,
                    offsets,
                    records,
                    sync: s,
                    done,
                } => {
                    sync |= s;
                    // Checked whole before any of it joins the batch: all or nothing.
                    if let Some(e) = records.iter().find_map(|r| check(memory, r).err()) {
                        replies.push(Reply::Done(
                            done,
                            Err(TransportError::TransactionAborted(e.to_string())),
                        ));
                        continue;
                    }
                    for mut record in records {
                        if let Ok(offset) = place(&shared, &mut next, now, &mut record, &mut chunks)
                        {
                            visible.push(Visible::Record(record, offset));
                        }
                    }
                    for (tp, offset) in &offsets {
                        batch.insert(&shared.meta, offset_key(&group, tp), offset.to_be_bytes());
                    }
                    visible.push(Visible::Commit(group, offsets));
                    replies.push(Reply::Done(done, Ok(())));
                }
                Op::Flush { sync: s, done } => {
                    sync |= s;
                    replies.push(Reply::Done(done, Ok(())));
                }
                Op::Delete { topic, done } => {
                    let r = self.delete(&mut batch, &topic);
                    replies.push(Reply::Done(done, r));
                }
            }
        }
        for ((topic, p, id), (seq, offset)) in placed {
            batch.insert(
                &shared.meta,
                producer_key(&topic, p, &id),
                encode_producer(now, seq, offset),
            );
        }
        let mut written_chunks = Vec::with_capacity(chunks.len());
        for ((topic, p), records) in chunks {
            let (Some((first, _)), Some((last, _))) = (records.first(), records.last()) else {
                continue;
            };
            if memory.partitions(&topic).is_none() {
                // Deleted in this batch.
                continue;
            }
            let chunk = Chunk {
                first: *first,
                end: last + 1,
                count: records.len(),
            };
            batch.insert(
                &shared.records,
                record_key(&topic, p, chunk.first),
                encode_chunk(&records),
            );
            written_chunks.push(((topic, p), chunk));
        }
        // A sync is needed for what this batch writes, or for what earlier ones wrote
        // unsynced; a flush or commit with neither writes nothing.
        let writes = !batch.is_empty();
        let sync = sync && (writes || self.unsynced);
        let mode = if sync {
            fjall::PersistMode::SyncData
        } else {
            fjall::PersistMode::Buffer
        };
        let written = if writes {
            batch.durability(Some(mode)).commit()
        } else if sync {
            shared.keyspace.persist(mode)
        } else {
            Ok(())
        };
        if written.is_ok() {
            self.unsynced = !sync && (writes || self.unsynced);
        }
        if let Err(e) = written {
            let e = fail(&shared.path, "cannot write to the log", e);
            for reply in replies {
                let failed = TransportError::Other(e.to_string());
                match reply {
                    Reply::Append(None, _) => {
                        lock(&shared.failed).get_or_insert(failed);
                    }
                    Reply::Append(Some(done), _) => {
                        let _ = done.send(Err(failed));
                    }
                    Reply::Done(done, _) => {
                        let _ = done.send(Err(failed));
                    }
                }
            }
            return;
        }
        for (key, chunk) in written_chunks {
            let disk = self.disk.entry(key).or_default();
            disk.count += chunk.count;
            disk.chunks.push_back(chunk);
        }
        for v in visible {
            match v {
                Visible::Record(record, offset) => {
                    let (topic, partition) = (record.topic.clone(), record.partition);
                    if let Ok(at) = memory.append_at(record, offset) {
                        if at.offset != offset {
                            tracing::error!(topic = %topic, partition, offset, at = at.offset, "a record of the file log was made visible at another offset than it was written at");
                        }
                    }
                }
                Visible::Commit(group, offsets) => memory.commit_group(&group, offsets),
            }
        }
        for reply in replies {
            match reply {
                Reply::Append(Some(done), r) => {
                    let _ = done.send(r);
                }
                Reply::Append(None, Err(e)) => {
                    lock(&shared.failed).get_or_insert(e);
                }
                Reply::Append(None, Ok(_)) => {}
                Reply::Done(done, r) => {
                    let _ = done.send(r);
                }
            }
        }
    }

    /// Puts the removal of `topic` in `batch` (its shape, start offsets and records) and
    /// forgets it: the topic is gone from the index at once, from disk with the batch.
    fn delete(&mut self, batch: &mut fjall::Batch, topic: &str) -> Result<(), TransportError> {
        let shared = &self.shared;
        let Some(partitions) = shared.memory.partitions(topic) else {
            return Ok(());
        };
        batch.remove(&shared.meta, topic_key(topic));
        for p in 0..partitions {
            batch.remove(&shared.meta, start_key(topic, p));
            self.disk.remove(&(Arc::from(topic), p));
        }
        let prefix = [topic.as_bytes(), b"\0"].concat();
        for kv in shared.records.prefix(prefix) {
            let (k, _) = kv.map_err(|e| fail(&shared.path, "cannot read the log", e))?;
            batch.remove(&shared.records, k);
        }
        shared.memory.remove_topic(topic);
        Ok(())
    }

    /// Removes from disk what the index removed (retention, compaction), in one batch: the
    /// chunks of a partition whose records are all below its log-start offset, and the
    /// records a compaction removed.
    fn trim(&mut self) {
        let shared = self.shared.clone();
        let memory = &shared.memory;
        let mut batch = shared.keyspace.batch();
        for (topic, partitions, compacted) in memory.topic_list() {
            for p in 0..partitions {
                let key = (topic.clone(), p);
                let Some(start) = memory.start_offset(&topic, p) else {
                    continue;
                };
                let disk = self.disk.entry(key).or_default();
                if compacted {
                    let kept = memory.record_count(&topic, p).unwrap_or(0);
                    if disk.count > kept {
                        rewrite(&shared, &mut batch, &topic, p, disk);
                    }
                    continue;
                }
                while let Some(chunk) = disk.chunks.front().filter(|c| c.end <= start).copied() {
                    batch.remove(&shared.records, record_key(&topic, p, chunk.first));
                    disk.count -= chunk.count;
                    disk.chunks.pop_front();
                }
                if disk.start < start {
                    batch.insert(&shared.meta, start_key(&topic, p), start.to_be_bytes());
                    disk.start = start;
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = batch.durability(Some(fjall::PersistMode::Buffer)).commit() {
            // Left on disk: loading the log skips them, and removes them at its first write.
            tracing::warn!(path = %shared.path.display(), error = %e, "cannot remove trimmed records from the file log");
        }
    }
}

/// Writes a compacted partition again as the index keeps it: its chunks are replaced by chunks
/// of the records kept.
fn rewrite(shared: &Shared, batch: &mut fjall::Batch, topic: &str, p: u32, disk: &mut DiskLog) {
    for chunk in disk.chunks.drain(..) {
        batch.remove(&shared.records, record_key(topic, p, chunk.first));
    }
    let kept = shared.memory.read(topic, p, 0, usize::MAX);
    disk.count = kept.len();
    for part in kept.chunks(CHUNK_RECORDS) {
        let records: Vec<(i64, Vec<u8>)> = part
            .iter()
            .map(|m| {
                let record = OutgoingRecord {
                    topic: m.topic.clone(),
                    partition: m.partition,
                    key: m.key.clone(),
                    value: m.value.clone(),
                    headers: m.headers.clone(),
                    timestamp: Some(m.timestamp),
                };
                (m.offset, encode_record(&record, m.timestamp))
            })
            .collect();
        let (Some((first, _)), Some((last, _))) = (records.first(), records.last()) else {
            continue;
        };
        let chunk = Chunk {
            first: *first,
            end: last + 1,
            count: records.len(),
        };
        batch.insert(
            &shared.records,
            record_key(topic, p, chunk.first),
            encode_chunk(&records),
        );
        disk.chunks.push_back(chunk);
    }
}

/// Records an exactly-once connection staged since its last commit.
#[derive(Default)]
struct Stage {
    records: Mutex<Staged>,
}

#[derive(Default)]
struct Staged {
    records: Vec<OutgoingRecord>,
    /// Records staged per partition.
    counts: HashMap<Key, i64>,
    /// Records per partition of a commit on its way to the log: no longer staged, not in the
    /// index yet, and still counted by the end offsets (or a worker waiting for everything to
    /// be processed would see nothing left while they are being committed).
    committing: HashMap<Key, i64>,
}

impl Staged {
    /// Throws the staged records away (an abort).
    fn discard(&mut self) {
        self.counts.clear();
        self.records.clear();
    }

    /// Takes the staged records for a commit; they count as committing until
    /// [`Staged::committed`] is told the same counts.
    fn take_for_commit(&mut self) -> (Vec<OutgoingRecord>, HashMap<Key, i64>) {
        let counts = std::mem::take(&mut self.counts);
        for (k, n) in &counts {
            *self.committing.entry(k.clone()).or_default() += n;
        }
        (std::mem::take(&mut self.records), counts)
    }

    /// A commit of these counts ended (its records are in the index, or thrown away).
    fn committed(&mut self, counts: &HashMap<Key, i64>) {
        for (k, n) in counts {
            if let Some(c) = self.committing.get_mut(k) {
                *c -= n;
                if *c <= 0 {
                    self.committing.remove(k);
                }
            }
        }
    }
}

/// Records of a commit on its way to the log (see [`Staged::committing`]).
struct Committing {
    stage: Arc<Stage>,
    counts: HashMap<Key, i64>,
}

impl Drop for Committing {
    fn drop(&mut self) {
        lock(&self.stage.records).committed(&self.counts);
    }
}

/// The durable transport: a connection to a [`FileBroker`].
pub struct FileTransport {
    broker: Arc<FileBroker>,
    memory: MemoryTransport,
    fsync: Fsync,
    stage: Option<Arc<Stage>>,
}

impl fmt::Debug for FileTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTransport")
            .field("path", &self.broker.shared.path)
            .field("fsync", &self.fsync)
            .field("exactly_once", &self.stage.is_some())
            .finish()
    }
}

impl FileTransport {
    fn stage(
        &self,
        stage: &Stage,
        record: OutgoingRecord,
    ) -> Result<RecordPosition, TransportError> {
        let memory = &self.broker.shared.memory;
        check(memory, &record)?;
        let mut record = record;
        record
            .timestamp
            .get_or_insert_with(super::memory::now_millis);
        let mut staged = lock(&stage.records);
        // Where it will be if nothing else is appended to the partition before the commit
        // (otherwise further on).
        let count = staged
            .counts
            .entry((record.topic.clone(), record.partition))
            .or_default();
        let before = *count;
        *count += 1;
        let position = RecordPosition {
            partition: record.partition,
            offset: memory
                .end_offset(&record.topic, record.partition)
                .unwrap_or(0)
                + before,
        };
        staged.records.push(record);
        Ok(position)
    }

    fn append_op(
        &self,
        record: OutgoingRecord,
        done: Option<oneshot::Sender<Result<RecordPosition, TransportError>>>,
    ) -> Op {
        Op::Append {
            record,
            sync: self.fsync == Fsync::Always,
            done,
        }
    }
}

impl Transport for FileTransport {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn embedded(&self) -> bool {
        true
    }

    fn ensure_topic(&self, spec: TopicSpec) -> BoxFuture<'_, Result<u32, TransportError>> {
        let r = self.broker.ensure_topic(&spec);
        async move { r }.boxed()
    }

    /// Deletes a topic and what the log keeps of it (a worker's temporary reply topic, when
    /// it stops), so that restarts do not pile them up.
    fn delete_topic(&self, name: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let topic = name.to_owned();
        async move { self.broker.submit(|done| Op::Delete { topic, done }).await }.boxed()
    }

    fn partition_count(&self, topic: &str) -> BoxFuture<'_, Result<Option<u32>, TransportError>> {
        self.memory.partition_count(topic)
    }

    fn send(
        &self,
        record: OutgoingRecord,
    ) -> BoxFuture<'_, Result<RecordPosition, TransportError>> {
        if let Some(stage) = &self.stage {
            let r = self.stage(stage, record);
            return async move { r }.boxed();
        }
        async move {
            self.broker
                .submit(|done| self.append_op(record, Some(done)))
                .await
        }
        .boxed()
    }

    fn enqueue(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<(), TransportError>> {
        if let Some(stage) = &self.stage {
            let r = self.stage(stage, record).map(|_| ());
            return async move { r }.boxed();
        }
        async move {
            let op = self.append_op(record, None);
            self.broker
                .sender()?
                .send(op)
                .await
                .map_err(|_| closed(&self.broker.shared.path))
        }
        .boxed()
    }

    #[allow(clippy::result_large_err)]
    fn try_enqueue(
        &self,
        record: OutgoingRecord,
    ) -> Result<Result<(), TransportError>, OutgoingRecord> {
        if let Some(stage) = &self.stage {
            return Ok(self.stage(stage, record).map(|_| ()));
        }
        let tx = match self.broker.sender() {
            Ok(tx) => tx,
            Err(e) => return Ok(Err(e)),
        };
        match tx.try_send(self.append_op(record, None)) {
            Ok(()) => Ok(Ok(())),
            Err(mpsc::error::TrySendError::Full(Op::Append { record, .. })) => Err(record),
            Err(_) => Ok(Err(closed(&self.broker.shared.path))),
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        async move {
            let sync = self.fsync != Fsync::Never;
            self.broker.submit(|done| Op::Flush { sync, done }).await?;
            match lock(&self.broker.shared.failed).take() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
        .boxed()
    }

    /// With exactly-once, the end offsets count the records this connection staged, as a
    /// Kafka partition's high watermark counts the records of open transactions: what is
    /// staged is written, only not committed yet.
    fn end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>> {
        let topic = topic.to_owned();
        async move {
            let mut ends = self.memory.end_offsets(&topic).await?;
            if let Some(stage) = &self.stage {
                let staged = lock(&stage.records);
                for ((t, p), n) in staged.counts.iter().chain(&staged.committing) {
                    if **t == *topic {
                        if let Some(end) = ends.get_mut(*p as usize) {
                            *end += n;
                        }
                    }
                }
            }
            Ok(ends)
        }
        .boxed()
    }

    fn group_consumer(&self, group: &str) -> Result<Box<dyn Consumer>, TransportError> {
        Ok(Box::new(FileConsumer {
            inner: self.memory.group_consumer(group)?,
            group: group.to_owned(),
            broker: self.broker.clone(),
            sync: self.fsync != Fsync::Never,
            stage: self.stage.clone(),
        }))
    }

    fn topic_consumer(
        &self,
        topic: &str,
        start: StartAt,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        self.memory.topic_consumer(topic, start)
    }

    fn partitions_consumer(
        &self,
        topic: &str,
        starts: Vec<(u32, i64)>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        self.memory.partitions_consumer(topic, starts)
    }

    fn committed(
        &self,
        group: &str,
    ) -> BoxFuture<'_, Result<Vec<(TopicPartition, i64)>, TransportError>> {
        self.memory.committed(group)
    }
}

/// A group consumer of the durable transport: reads from the index; commits through the log.
struct FileConsumer {
    inner: Box<dyn Consumer>,
    group: String,
    broker: Arc<FileBroker>,
    sync: bool,
    stage: Option<Arc<Stage>>,
}

impl fmt::Debug for FileConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileConsumer")
            .field("group", &self.group)
            .field("path", &self.broker.shared.path)
            .finish()
    }
}

impl Consumer for FileConsumer {
    fn subscribe(&mut self, topics: &[String]) -> Result<(), TransportError> {
        self.inner.subscribe(topics)
    }

    fn poll(&mut self) -> BoxFuture<'_, Result<ConsumerEvent, TransportError>> {
        self.inner.poll()
    }

    fn commit(
        &mut self,
        offsets: Vec<(TopicPartition, i64)>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let (records, counts) = self
            .stage
            .as_ref()
            .map(|s| lock(&s.records).take_for_commit())
            .unwrap_or_default();
        async move {
            if offsets.is_empty() && records.is_empty() {
                return Ok(());
            }
            // The records stop counting as committing once the commit ends, or its future is
            // dropped.
            let _committing = self.stage.clone().map(|stage| Committing { stage, counts });
            let (group, sync) = (self.group.clone(), self.sync);
            self.broker
                .submit(|done| Op::Commit {
                    group,
                    offsets,
                    records,
                    sync,
                    done,
                })
                .await
        }
        .boxed()
    }

    fn abort(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        if let Some(stage) = &self.stage {
            lock(&stage.records).discard();
        }
        async { Ok(()) }.boxed()
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        self.inner.pause(partitions)
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        self.inner.resume(partitions)
    }

    fn rejoin(&mut self) -> bool {
        self.inner.rejoin()
    }

    fn assignment_lost(&self) -> bool {
        self.inner.assignment_lost()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rill-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn spec(name: &str) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions: 1,
            replication_factor: 1,
            compacted: false,
            retention: Default::default(),
        }
    }

    fn record(topic: &str, value: &str) -> OutgoingRecord {
        OutgoingRecord {
            topic: Arc::from(topic),
            partition: 0,
            key: Some(Bytes::from(format!("k-{value}"))),
            value: Some(Bytes::from(value.to_owned())),
            headers: vec![("h".into(), Bytes::from_static(b"1"))],
            timestamp: None,
        }
    }

    fn values(broker: &FileBroker, topic: &str) -> Vec<String> {
        broker
            .memory()
            .read(topic, 0, 0, usize::MAX)
            .into_iter()
            .map(|m| String::from_utf8_lossy(m.value.as_deref().unwrap_or_default()).into())
            .collect()
    }

    /// The largest file under `dir`: the journal the last batches went to.
    fn largest_file(dir: &Path) -> PathBuf {
        let mut best: Option<(u64, PathBuf)> = None;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read journal dir").flatten() {
                let path = entry.path();
                let meta = entry.metadata().expect("metadata");
                if meta.is_dir() {
                    stack.push(path);
                } else if best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                    best = Some((meta.len(), path));
                }
            }
        }
        best.expect("a journal file").1
    }

    #[tokio::test]
    async fn a_retried_record_is_not_appended_again_after_a_restart_even_once_removed() {
        let dir = temp_dir("retried");
        let with_seq = |value: &str, seq: u64| {
            let mut r = record("in", value);
            r.headers = vec![
                (
                    super::super::PRODUCER_ID_HEADER.into(),
                    Bytes::from_static(b"p1"),
                ),
                (
                    super::super::PRODUCER_SEQ_HEADER.into(),
                    Bytes::from(seq.to_string()),
                ),
            ];
            r
        };
        {
            let broker = FileBroker::open(&dir, "app").expect("open");
            let t = broker.transport(Fsync::Commit, false);
            t.ensure_topic(spec("in")).await.expect("in");
            for (seq, v) in [(1, "a"), (2, "b"), (3, "c")] {
                t.send(with_seq(v, seq)).await.expect("send");
            }
            // Every group read them: they are removed from the log.
            let mut consumer = t.group_consumer("g").expect("consumer");
            consumer.subscribe(&["in".to_owned()]).expect("subscribe");
            consumer
                .commit(vec![(TopicPartition::new("in", 0), 3)])
                .await
                .expect("commit");
        }
        let broker = FileBroker::open(&dir, "app").expect("reopen");
        let t = broker.transport(Fsync::Commit, false);
        // The producer's retries are answered, not appended: the last one with its offset,
        // older ones (removed with their records) without.
        let last = t.send(with_seq("c", 3)).await.expect("retry of 3");
        assert_eq!(last.offset, 2);
        let older = t.send(with_seq("b", 2)).await.expect("retry of 2");
        assert_eq!(older.offset, -1);
        assert_eq!(
            broker.memory().end_offset("in", 0),
            Some(3),
            "nothing appended again"
        );
        let next = t.send(with_seq("d", 4)).await.expect("send 4");
        assert_eq!(next.offset, 3);
        drop(t);
        drop(broker);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_commit_cut_short_in_the_journal_is_not_recovered_in_part() {
        let dir = temp_dir("torn");
        let tp = TopicPartition::new("in", 0);
        {
            let broker = FileBroker::open(&dir, "app").expect("open");
            let t = broker.transport(Fsync::Commit, true);
            t.ensure_topic(spec("in")).await.expect("in");
            t.ensure_topic(spec("out")).await.expect("out");
            let mut consumer = t.group_consumer("g").expect("consumer");
            t.send(record("out", "a1")).await.expect("stage");
            t.send(record("out", "a2")).await.expect("stage");
            consumer
                .commit(vec![(tp.clone(), 1)])
                .await
                .expect("commit a");
            for v in ["b1", "b2", "b3"] {
                t.send(record("out", v)).await.expect("stage");
            }
            consumer
                .commit(vec![(tp.clone(), 4)])
                .await
                .expect("commit b");
            assert_eq!(values(&broker, "out"), ["a1", "a2", "b1", "b2", "b3"]);
        }
        // The last commit's batch (some 250 bytes) loses its end, as a write cut off by a
        // crash would: its last 30 bytes (the end marker and part of its last item).
        let journal = largest_file(&dir.join("app").join("log").join("journals"));
        // The journal is preallocated: what was written ends at its last byte that is not 0.
        let bytes = std::fs::read(&journal).expect("read journal");
        let len = bytes
            .iter()
            .rposition(|b| *b != 0)
            .expect("a written journal") as u64
            + 1;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .expect("open journal");
        file.set_len(len - 30).expect("truncate");
        drop(file);
        let broker = FileBroker::open(&dir, "app").expect("reopen");
        assert_eq!(values(&broker, "out"), ["a1", "a2"], "none of commit b");
        assert_eq!(broker.memory().committed("g"), vec![(tp, 1)]);
        // The records keep what they were sent with.
        let m = &broker.memory().read("out", 0, 1, 1)[0];
        assert_eq!(m.key.as_deref(), Some(&b"k-a2"[..]));
        assert_eq!(m.header("h").map(|h| &h[..]), Some(&b"1"[..]));
        drop(broker);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_deleted_topic_leaves_nothing_in_the_log() {
        let dir = temp_dir("delete");
        {
            let broker = FileBroker::open(&dir, "app").expect("open");
            let t = broker.transport(Fsync::Commit, false);
            t.ensure_topic(spec("app-reply-1")).await.expect("topic");
            t.ensure_topic(spec("kept")).await.expect("topic");
            for v in ["a", "b"] {
                t.send(record("app-reply-1", v)).await.expect("send");
                t.send(record("kept", v)).await.expect("send");
            }
            t.delete_topic("app-reply-1").await.expect("delete");
            assert_eq!(broker.memory().partitions("app-reply-1"), None);
            t.send(record("app-reply-1", "late"))
                .await
                .expect_err("the topic is gone");
        }
        let broker = FileBroker::open(&dir, "app").expect("reopen");
        assert_eq!(broker.memory().partitions("app-reply-1"), None);
        assert_eq!(broker.records_on_disk("app-reply-1", 0).expect("count"), 0);
        assert_eq!(values(&broker, "kept"), ["a", "b"]);
        drop(broker);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_read_back_as_written() {
        let mut r = record("t", "v");
        r.partition = 3;
        let decoded = decode_record(&encode_record(&r, 42), "t", 3).expect("decode");
        assert_eq!(
            (
                decoded.key,
                decoded.value,
                decoded.headers,
                decoded.timestamp
            ),
            (r.key.clone(), r.value.clone(), r.headers.clone(), Some(42))
        );
        let tombstone = OutgoingRecord {
            key: None,
            value: None,
            headers: Vec::new(),
            ..r
        };
        let decoded = decode_record(&encode_record(&tombstone, -1), "t", 3).expect("decode");
        assert_eq!((decoded.key, decoded.value), (None, None));
        let bytes = encode_record(&record("t", "v"), 1);
        assert!(decode_record(&bytes[..bytes.len() - 1], "t", 0).is_none());
        let key = record_key("a.b", 7, 1234);
        assert_eq!(parse_record_key(&key), Some(("a.b", 7, 1234)));
    }

    #[test]
    fn urls_name_a_directory_and_a_sync_policy() {
        assert_eq!(
            FileUrl::parse("file://./data").expect("url"),
            FileUrl {
                dir: PathBuf::from("./data"),
                fsync: Fsync::Commit
            }
        );
        assert_eq!(
            FileUrl::parse("file:///var/lib/x?fsync=always")
                .expect("url")
                .fsync,
            Fsync::Always
        );
        assert_eq!(
            FileUrl::parse("file://d?fsync=never").expect("url").fsync,
            Fsync::Never
        );
        let e = FileUrl::parse("file://d?sync=1").expect_err("unknown option");
        assert!(e.to_string().contains("unknown option \"sync=1\""), "{e}");
    }

    #[test]
    fn a_locked_directory_is_refused_with_its_path() {
        let dir = temp_dir("lock");
        std::fs::create_dir_all(&dir).expect("dir");
        let lock_file = dir.join("log.lock");
        let _held = DirLock::take(&lock_file, &dir).expect("first lock");
        let e = DirLock::take(&lock_file, &dir)
            .err()
            .expect("second lock refused");
        assert!(
            e.to_string().contains(&dir.display().to_string())
                && e.to_string().contains("in use by another process"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
