//! A table with its types erased: as the engine keeps it ([`PartitionedState`]: the
//! partitions that follow the assignment, and the writes of each commit), and as the app, the
//! web server and the command line keep it ([`TableRunner`]).

use super::lookup::Lookup;
use super::recovery::Restored;
use super::standby::standby_replicas;
use super::store::Store;
use super::{changelog::Flushed, Attached, Part, Table, TableKey, TableValue};
use crate::engine::state::{self as engine, PartitionedState};
use crate::engine::StateHandle;
use crate::error::{Error, Result};
use crate::transport::TopicSpec;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A table with its types erased, as the app, the web server and the command line keep it.
pub(crate) trait TableRunner: PartitionedState {
    /// This table as the engine keeps it.
    fn as_state(self: Arc<Self>) -> Arc<dyn PartitionedState>;
    /// The changelog topic's spec.
    fn changelog_spec(&self) -> TopicSpec;
    /// Connects the table to a starting worker.
    fn attach(&self, worker: StateHandle, store: Arc<dyn Store>);
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

impl<K: TableKey, V: TableValue> PartitionedState for Table<K, V> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn restoring(&self) -> Vec<u32> {
        TableRunner::recovering(self)
    }

    fn recover<'a>(&'a self, partitions: &'a [u32]) -> BoxFuture<'a, Result<()>> {
        async move { self.restore(partitions).await }.boxed()
    }

    fn changelog_ends(&self) -> BoxFuture<'_, Result<Vec<i64>>> {
        async move {
            let a = self.inner.attached()?;
            Ok(a.worker.transport().end_offsets(&a.spec.name).await?)
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
            retention: Default::default(),
        }
    }

    fn attach(&self, worker: StateHandle, store: Arc<dyn Store>) {
        let spec = self.changelog_spec();
        let replicas = standby_replicas(worker.settings(), &**worker.transport());
        let standby = replicas > 0 || self.is_global();
        let placed = if self.is_global() || !worker.transport().range_assignment() {
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
            worker,
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
        self.lookup_text(text)
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
