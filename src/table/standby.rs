//! Standby replicas: copies of table partitions this worker does not own, kept warm by
//! tailing their changelogs, on the workers that would take each partition over.

use super::{Attached, Part, Table, TableKey, TableValue};
use crate::error::Result;
use crate::settings::Settings;
use crate::transport::ConsumerEvent;
use crate::transport::Transport;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// How long a standby copy no longer placed on this worker is kept: placement changes while
/// the workers of a rebalance publish their new partitions one after the other.
const STANDBY_LINGER: Duration = Duration::from_secs(10);

/// How often the standby tailer looks at the placement.
const PLACEMENT_EVERY: Duration = Duration::from_millis(250);

/// The number of standby replicas of each table partition (see
/// [`Settings::table_standby_replicas`](crate::Settings::table_standby_replicas)).
pub(crate) fn standby_replicas(settings: &Settings, transport: &dyn Transport) -> u32 {
    settings
        .table_standby_replicas
        .unwrap_or(if transport.embedded() { 0 } else { 1 })
}

impl<K: TableKey, V: TableValue> Table<K, V> {
    /// Keeps the standby copies (the set-aside partitions) up to date by reading their
    /// changelog partitions from where each copy stands, until the worker stops. With placed
    /// replicas it also follows the placement: partitions placed here get a copy (read from
    /// the changelog's start), copies placed elsewhere are dropped after [`STANDBY_LINGER`].
    pub(super) async fn tail(&self) -> Result<()> {
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
                        _ = a.worker.stop().cancelled() => break,
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
                _ = a.worker.stop().cancelled() => break,
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
                .worker
                .transport()
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
        let Some(placed) = a.worker.standby_partitions(a.spec.partitions, a.placed) else {
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
}
