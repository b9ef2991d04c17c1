//! Rebalances: what the dispatcher does when the group assigns or revokes partitions (their
//! in-flight events, their last commit, and the table partitions that go with them).

use super::ack::PartitionTracker;
use super::dispatch::{list, Dispatcher};
use super::runtime::Runtime;
use super::state::PartitionedState;
use crate::error::Error;
use crate::transport::TopicPartition;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// How long a table restore that keeps failing is retried before the worker gives up and
/// stops (its partitions then go to another worker).
const RECOVER_GIVE_UP: Duration = Duration::from_secs(60);

impl Dispatcher {
    /// Lets `tps` go: waits (bounded) for the events in flight, commits what was processed of
    /// them, and sets their table partitions aside (dropped when rolling back).
    pub(super) async fn revoke(&mut self, tps: Vec<TopicPartition>) {
        tracing::info!(partitions = %list(&tps), "partitions revoked");
        self.stop_reading(&tps).await;
        // Read while the partitions are still this worker's: once the commit lets them
        // go, a new owner may write to their changelogs.
        let ends = changelog_ends(&self.rt).await;
        let committed = self.commit().await;
        self.forget(&tps);
        if self.rolling_back || !committed {
            // Their state holds changes that were never committed (or, when the commit
            // failed, the group may have given the partitions to another worker already,
            // whose changelog writes the copy would not have): restore it from the changelog
            // when the partitions come back.
            self.drop_tables();
            crate::engine::membership::publish(&self.rt, Some(&self.owned)).await;
        } else {
            self.park_tables(ends).await;
        }
    }

    /// Stops reading `tps`: their records not handed to an agent yet are taken back, and the
    /// events in flight finish (bounded by `shutdown_timeout`).
    async fn stop_reading(&mut self, tps: &[TopicPartition]) {
        self.rt.ops.revoked(tps);
        self.retract_backlog(Some(tps));
        let trackers = tps
            .iter()
            .filter_map(|tp| self.trackers.get(tp).cloned())
            .collect();
        finish_in_flight(trackers, self.rt.settings.shutdown_timeout).await;
    }

    /// Forgets the offsets and assignment of `tps`.
    fn forget(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.trackers.remove(tp);
            self.committed.remove(tp);
            self.assigned.remove(tp);
        }
    }

    /// Lets `tps` go after the group took them without a handover (see
    /// [`ConsumerEvent::Lost`](crate::transport::ConsumerEvent::Lost)): their new owner may be
    /// processing them already, so nothing is committed, what was processed of them since the
    /// last commit is given up (the transport threw away what it had not delivered; an
    /// exactly-once transaction is aborted), and their table partitions are dropped, to be
    /// restored from the changelog if they come back.
    pub(super) async fn lose(&mut self, tps: Vec<TopicPartition>) {
        tracing::warn!(partitions = %list(&tps), "partitions lost; what was processed of them since the last commit is given up");
        // No agent may change a table partition once it is dropped.
        self.stop_reading(&tps).await;
        self.forget(&tps);
        // Outputs that failed meanwhile were thrown away with the partitions' undelivered
        // records: their events are processed again by the partitions' next owner.
        if let Some(f) = self.rt.take_failure() {
            if f.permanent {
                self.on_failure(f).await;
            } else {
                tracing::debug!(reason = %f.reason, "an output of a lost partition's event failed");
            }
        }
        if self.exactly_once() && !self.fatal {
            // The open transaction holds what was processed of them.
            if let Err(e) = self.consumer.abort().await {
                tracing::error!(error = %e, "stopping the worker");
                self.rt.stop.cancel();
            }
        }
        self.drop_tables();
        crate::engine::membership::publish(&self.rt, Some(&self.owned)).await;
    }

    /// Brings the table partitions in line with the assignment: restores those of newly
    /// assigned partitions before any of their events reach an agent (partitions set aside at
    /// the last revocation only replay the changelog written since), and drops the rest.
    pub(super) async fn sync_tables(&mut self) {
        if self.rt.tables.is_empty() {
            return;
        }
        let wanted: BTreeSet<u32> = self.assigned.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self.owned.difference(&wanted).copied().collect();
        if !gone.is_empty() {
            for table in &self.rt.tables {
                table.release(&gone);
            }
        }
        let new: Vec<u32> = wanted.difference(&self.owned).copied().collect();
        let rt = self.rt.clone();
        for table in &rt.tables {
            if !new.is_empty() && !self.recover(&**table, &new).await {
                return;
            }
            table.drop_parked();
        }
        self.owned = wanted;
        crate::engine::membership::publish(&self.rt, Some(&self.owned)).await;
    }

    /// Restores `partitions` of `table`, retrying errors (a broker that went away, say) with
    /// backoff: an agent must never be handed an event of a partition whose table state is
    /// not there, as its writes would be refused and the event lost. Gives up, stopping the
    /// worker without committing anything more, after [`RECOVER_GIVE_UP`] or when the worker
    /// stops: the partitions are then restored by their next owner. Whether it restored them.
    async fn recover(&mut self, table: &dyn PartitionedState, partitions: &[u32]) -> bool {
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(100);
        for attempt in 1u32.. {
            let e = match table.recover(partitions).await {
                Ok(()) => return true,
                Err(e) => e,
            };
            let stopping = self.rt.stop.is_cancelled();
            if stopping || started.elapsed() >= RECOVER_GIVE_UP {
                self.stop_fatally(format!(
                    "cannot restore partitions {partitions:?} of table {:?} ({attempt} \
                     attempts): {e}",
                    table.name()
                ));
                return false;
            }
            tracing::warn!(
                table = table.name(),
                ?partitions,
                attempt,
                retry_in = ?wait,
                error = %e,
                "cannot restore table partitions yet; their events wait until they are"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.rt.stop.cancelled() => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        false
    }

    /// Drops the table partitions no assigned partition needs any more, and any set aside.
    fn drop_tables(&mut self) {
        let wanted: BTreeSet<u32> = self.assigned.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self.owned.difference(&wanted).copied().collect();
        for table in &self.rt.tables {
            table.release(&gone);
            table.drop_parked();
        }
        self.owned = wanted;
    }

    /// Sets aside the table partitions no assigned partition needs any more (just committed),
    /// with the changelog ends read before the commit.
    async fn park_tables(&mut self, ends: Vec<Option<Vec<i64>>>) {
        if self.rt.tables.is_empty() {
            return;
        }
        let wanted: BTreeSet<u32> = self.assigned.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self.owned.difference(&wanted).copied().collect();
        if gone.is_empty() {
            return;
        }
        for (table, ends) in self.rt.tables.iter().zip(ends) {
            let parked = match &ends {
                Some(ends) => table.park(&gone, ends).await,
                None => Err(Error::Store("no changelog end offsets".into())),
            };
            if let Err(e) = parked {
                tracing::warn!(table = table.name(), error = %e, "cannot set revoked table partitions aside; they will be restored in full");
                table.release(&gone);
            }
        }
        self.owned = wanted;
        crate::engine::membership::publish(&self.rt, Some(&self.owned)).await;
    }
}

/// The changelog end offsets of each table (`None` where they cannot be read).
async fn changelog_ends(rt: &Runtime) -> Vec<Option<Vec<i64>>> {
    let mut ends = Vec::with_capacity(rt.tables.len());
    for table in &rt.tables {
        ends.push(match table.changelog_ends().await {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(table = table.name(), error = %e, "cannot read the changelog's end offsets; revoked partitions will be restored in full");
                None
            }
        });
    }
    ends
}

/// Lets the agents finish the events they hold from revoked partitions (bounded), so the
/// worker taking the partitions over does not process them again.
async fn finish_in_flight(trackers: Vec<Arc<PartitionTracker>>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while trackers.iter().any(|t| !t.is_idle()) {
        if tokio::time::Instant::now() >= deadline {
            let tps: Vec<_> = trackers.iter().map(|t| t.tp.clone()).collect();
            tracing::warn!(
                partitions = %list(&tps),
                "revoked partitions still have events in flight; committing what is done"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
