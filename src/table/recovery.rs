//! Recovery: restoring a table partition this worker is given, from the local store, a copy
//! kept warm or set aside, and the changelog records written after it.

use super::store;
use super::store::Change;
use super::{Attached, Part, Table, TableKey, TableValue};
use crate::error::{Error, Result};
use crate::transport::ConsumerEvent;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// How often recovery reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

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

impl<K: TableKey, V: TableValue> Table<K, V> {
    /// Restores partitions: from a copy set aside or kept on standby if there is one, else
    /// from the local store; then the changelog from where that state stands to its end.
    /// With a persistent store, what was restored from elsewhere than the store is written to
    /// it before the partition is used, so that the store's checkpoint never claims more than
    /// the store holds (the next commit moves the checkpoint on from there).
    pub(super) async fn restore(&self, partitions: &[u32]) -> Result<()> {
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
        let ends = a.worker.transport().settled_end_offsets(&topic).await?;
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

    /// Applies one changelog record to a partition; returns the key it changed.
    pub(super) fn apply_record(
        &self,
        part: &mut Part<K, V>,
        m: &crate::transport::Message,
    ) -> Option<K> {
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
        let mut consumer = a
            .worker
            .transport()
            .partitions_consumer(topic, starts)
            .await?;
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut done = 0i64;
        while !remaining.is_empty() {
            let event = tokio::select! {
                e = consumer.poll() => e?,
                _ = a.worker.stop().cancelled() => {
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
            crate::metrics::recovery_progress(a.worker.app_id(), name, replayed, left);
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
        a.worker.table_replayed(name, done as u64);
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        Ok(replayed)
    }
}
