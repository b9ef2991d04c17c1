//! The changelog side of a commit: the keys changed since the last commit, encoded and
//! queued to the changelog topic, and what was written, stored locally once the changelog
//! has it.

use super::store::Change;
use super::{Attached, Table, TableKey, TableValue};
use crate::error::{Error, Result};

/// What a commit wrote to the changelog of one table partition, to be stored locally once the
/// changelog has it.
pub(super) struct Flushed {
    pub(super) partition: u32,
    pub(super) changes: Vec<Change>,
    pub(super) checkpoint: i64,
}

impl<K: TableKey, V: TableValue> Table<K, V> {
    /// Encodes the dirty keys of every partition and queues them to the changelog.
    pub(super) async fn write_changelog(&self) -> Result<Vec<Flushed>> {
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
                a.worker
                    .enqueue(&a.spec, Some(*p), Some(k.clone()), v.clone(), Vec::new())
                    .await?;
            }
            let (key, value) = (Some(last_key.clone()), last_value.clone());
            if persistent {
                // The position of the last record is the checkpoint; records of one partition
                // are appended in order, so the others are before it.
                lasts.push(Some(a.worker.produce(
                    &a.spec,
                    Some(*p),
                    key,
                    value,
                    Vec::new(),
                )));
            } else {
                a.worker
                    .enqueue(&a.spec, Some(*p), key, value, Vec::new())
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

    /// Encodes a key and its value (`None`: removed) for the changelog or the store; `None`
    /// (logged) when either cannot be encoded.
    pub(super) fn encode_change(&self, key: &K, value: Option<&V>) -> Option<Change> {
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
}
