//! Commits: behind the actors' barrier, the offsets of processed events are taken, the table
//! changes written to their changelogs, produced records flushed, and the offsets committed
//! (in one transaction with exactly-once processing); a commit that cannot write what it
//! covers rolls back to the last one, or stops the worker.

use super::dispatch::Dispatcher;
use super::runtime::Failure;
use super::state::Flushed;
use crate::error::{Error, TransportError};
use std::time::Duration;

/// How long a commit waits for the agents to finish the events they are in the middle of.
const BARRIER_WAIT: Duration = Duration::from_secs(5);

/// Lifts the barrier when dropped (on every way out of a commit).
struct Paused<'a>(Option<&'a crate::engine::ack::Barrier>);

impl<'a> Paused<'a> {
    fn new(barrier: &'a crate::engine::ack::Barrier) -> Self {
        Self(Some(barrier))
    }

    fn resume(&mut self) {
        if let Some(b) = self.0.take() {
            b.resume();
        }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.resume();
    }
}

/// With exactly-once processing, the next commit is at least this many times as far off as
/// the last one took...
pub(super) const EXACTLY_ONCE_COMMIT_SHARE: u32 = 5;
/// ...but never further than this: a transaction must end well within the producer's
/// `transaction.timeout.ms` (10 s), or the brokers abort it and fence the producer. (A commit
/// that took 30 s while a broker restarted would otherwise put the next one 150 s off.)
pub(super) const EXACTLY_ONCE_COMMIT_MAX_WAIT: Duration = Duration::from_secs(2);
/// A commit still waiting after this long says what for, and again every time as long.
const SLOW_COMMIT: Duration = Duration::from_secs(10);

impl Dispatcher {
    pub(super) fn exactly_once(&self) -> bool {
        self.rt.settings.processing_guarantee == crate::settings::ProcessingGuarantee::ExactlyOnce
    }

    /// Commits what the agents have processed. Behind the barrier (see
    /// [`Barrier`](super::ack::Barrier)), no agent is in the middle of an event while the
    /// offsets are taken and the table changes written, so both cover the same events; with
    /// exactly-once the barrier stays up until the transaction is committed. Returns whether
    /// everything processed is committed (false when it could not be, or was not meant to be).
    pub(super) async fn commit(&mut self) -> bool {
        self.since_commit = 0;
        if self.fatal {
            // Nothing after the failure counts; an open transaction is aborted.
            let _ = self.consumer.abort().await;
            return false;
        }
        if self.rolling_back {
            // Nothing since the last commit counts: what was produced meanwhile is discarded
            // where the transport can (an exactly-once transaction is aborted).
            if let Err(e) = self.consumer.abort().await {
                tracing::error!(error = %e, "stopping the worker");
                self.rt.stop.cancel();
            }
            return false;
        }
        if self.consumer.assignment_lost() {
            // The partitions' new owners may be writing: the loss is handled next (`lose`).
            return false;
        }
        let exactly_once = self.exactly_once();
        let started = std::time::Instant::now();
        let rt = self.rt.clone();
        let mut barrier = Paused::new(&rt.barrier);
        if !rt.barrier.pause(BARRIER_WAIT).await && exactly_once {
            // An agent is still in the middle of an event: its effects would be in the
            // transaction and its offset not. Try again at the next commit.
            tracing::warn!(wait = ?BARRIER_WAIT, "an agent is still in the middle of an event; commit postponed");
            return false;
        }
        let mut offsets = Vec::new();
        for (tp, tracker) in &self.trackers {
            if let Some(offset) = tracker.committable() {
                if self.committed.get(tp).is_none_or(|c| *c < offset) {
                    offsets.push((tp.clone(), offset));
                }
            }
        }
        let mut flushed = Vec::with_capacity(self.rt.tables.len());
        for table in &self.rt.tables {
            match watched("the changelog writes of a table", table.flush()).await {
                Ok(f) => flushed.push(f),
                Err(e) => {
                    // The changes stay to be written at the next commit; nothing is
                    // committed before they are.
                    drop(barrier);
                    let what = format!(
                        "cannot write the changes of table {} to its changelog",
                        table.name()
                    );
                    self.write_failed(&what, &e, false).await;
                    return false;
                }
            }
        }
        if self.consumer.assignment_lost() {
            // Lost while the changes were queued: those queued after the transport threw
            // away its undelivered records must not reach the changelog either.
            self.rt.transport.discard_undelivered();
            return false;
        }
        if !exactly_once {
            // What the offsets cover is written or queued: agents may go on.
            barrier.resume();
            // Outputs of processed events must be durable before their inputs are committed.
            // (A transaction's commit flushes them itself.) Records that could not be
            // delivered are lost outputs: their events must be processed again.
            if let Err(e) = watched(
                "produced records to be delivered",
                self.rt.transport.flush(),
            )
            .await
            {
                self.write_failed("cannot deliver produced records", &e.into(), true)
                    .await;
                return false;
            }
        }
        if self.consumer.assignment_lost() {
            return false;
        }
        if let Some(f) = self.rt.take_failure() {
            drop(barrier);
            self.on_failure(f).await;
            return false;
        }
        if !exactly_once {
            // The changelog has the table changes: the local stores may have them too.
            self.persist(std::mem::take(&mut flushed));
            if offsets.is_empty() {
                return true;
            }
        }
        offsets.sort();
        let result = watched("the offsets' commit", self.consumer.commit(offsets.clone())).await;
        drop(barrier);
        match result {
            Ok(()) => {
                if exactly_once {
                    // Only now are the table changes committed in the changelog.
                    self.persist(flushed);
                }
                if !offsets.is_empty() {
                    tracing::debug!(offsets = %offsets.iter().map(|(tp, o)| format!("{tp}={o}")).collect::<Vec<_>>().join(","), took_ms = started.elapsed().as_secs_f64() * 1e3, "committed");
                    self.committed.extend(offsets);
                    self.rt.ops.committed(started.elapsed());
                }
                true
            }
            Err(TransportError::TransactionAborted(e)) => {
                self.roll_back(&format!("the transaction was aborted: {e}"))
                    .await;
                false
            }
            Err(e) if exactly_once => {
                tracing::error!(error = %e, "cannot commit; stopping the worker");
                self.rt.stop.cancel();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "commit failed; will retry");
                false
            }
        }
    }

    /// A commit could not write what it covers. A record that can never be written stops the
    /// worker; otherwise the worker rolls back to the last commit, except when `retry` is
    /// false and processing is at-least-once: then the next commit writes it again.
    async fn write_failed(&mut self, what: &str, error: &Error, roll_back: bool) {
        let permanent = matches!(error, Error::Transport(e) if e.is_permanent());
        if permanent {
            self.stop_fatally(format!("{what}: {error}"));
        } else if roll_back || self.exactly_once() {
            self.roll_back(&format!("{what}: {error}")).await;
        } else {
            tracing::error!(error = %error, "{what}; not committing, trying again at the next commit");
        }
    }

    /// An agent's output could not be written (see
    /// [`Runtime::output_failed`](super::Runtime::output_failed)).
    pub(super) async fn on_failure(&mut self, failure: Failure) {
        if !failure.permanent && self.consumer.assignment_lost() {
            // Thrown away with the lost partitions' undelivered records (see `lose`).
            tracing::debug!(reason = %failure.reason, "an output of a lost partition's event failed");
            return;
        }
        if failure.permanent {
            self.stop_fatally(failure.reason);
        } else {
            self.roll_back(&failure.reason).await;
        }
    }

    /// Stops the worker after an error it cannot go on from: nothing more is committed, so
    /// the events since the last commit are processed again by the next worker.
    pub(super) fn stop_fatally(&mut self, reason: String) {
        if self.fatal {
            return;
        }
        self.fatal = true;
        tracing::error!(
            reason = %reason,
            "stopping the worker: it cannot go on without losing events (an output that cannot \
             be written, or table state that cannot be restored); nothing after the last commit \
             is committed"
        );
        *self.rt.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.rt.stop.cancel();
    }

    /// Gives up everything since the last commit: the group is rejoined, so every partition
    /// is revoked (nothing more committed, table state dropped) and assigned again from the
    /// committed offsets, and its events are processed again.
    async fn roll_back(&mut self, why: &str) {
        if self.rolling_back {
            return;
        }
        if !self.consumer.rejoin() {
            tracing::error!(
                reason = why,
                "cannot roll back to the last commit on this transport; stopping the worker"
            );
            self.rt.stop.cancel();
            return;
        }
        tracing::error!(reason = why, "rolling back to the last commit: partitions are revoked and assigned again, and their events since that commit processed again");
        self.rolling_back = true;
        // With nothing assigned, no revocation comes before the next assignment.
        self.rolled_back = self.assigned.is_empty();
        if let Err(e) = self.consumer.abort().await {
            tracing::error!(error = %e, "stopping the worker");
            self.rt.stop.cancel();
        }
    }

    /// Stores in the tables' local stores what the changelog has now.
    fn persist(&self, flushed: Vec<Flushed>) {
        for (table, f) in self.rt.tables.iter().zip(flushed) {
            if let Err(e) = table.persist(f) {
                tracing::error!(table = table.name(), error = %e, "cannot store table changes locally; the changelog has them");
            }
        }
    }
}

/// Awaits `fut`, part of a commit, warning every [`SLOW_COMMIT`] that it still waits for `what`.
async fn watched<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    let started = tokio::time::Instant::now();
    tokio::pin!(fut);
    loop {
        match tokio::time::timeout(SLOW_COMMIT, &mut fut).await {
            Ok(out) => return out,
            Err(_) => tracing::warn!(
                waited = ?started.elapsed(),
                "a commit is slow: still waiting for {what}"
            ),
        }
    }
}
