//! Offset tracking: which events of a partition are done, and what may be committed.
//!
//! The dispatcher registers each record it hands to agents with the number of agents that
//! received it; every agent acks its copy when it is done with it (when it asks for the next
//! event, or when the event is dropped by a filter, a decode error or a failure). The commit
//! offset of a partition is the lowest offset still pending, so nothing is committed before it
//! was processed, even when actors finish out of order.

use crate::transport::TopicPartition;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

pub(crate) struct PartitionTracker {
    pub(crate) tp: TopicPartition,
    state: Mutex<State>,
}

struct State {
    /// Offsets handed out and not yet fully acked, ascending, with their remaining acks.
    pending: VecDeque<(i64, u32)>,
    /// The lowest offset taken back before an agent got it (see
    /// [`retract_from`](PartitionTracker::retract_from)): never committed past.
    limit: Option<i64>,
    /// Next offset to commit when nothing is pending.
    done_until: i64,
    /// Set when the worker gave up waiting for its agents: later acks must not move the
    /// commit past events that were not processed.
    frozen: bool,
    /// Whether a record was registered (see [`PartitionTracker::pass`]).
    seen: bool,
}

impl fmt::Debug for PartitionTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PartitionTracker({}, commit {:?})",
            self.tp,
            self.committable()
        )
    }
}

impl PartitionTracker {
    pub(crate) fn new(tp: TopicPartition) -> Arc<Self> {
        Arc::new(Self {
            tp,
            state: Mutex::new(State {
                pending: VecDeque::new(),
                limit: None,
                done_until: -1,
                frozen: false,
                seen: false,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `offset` was handed to `refs` receivers.
    pub(crate) fn register(&self, offset: i64, refs: u32) {
        let mut s = self.state();
        s.seen = true;
        if refs == 0 && s.pending.is_empty() {
            s.done_until = s.done_until.max(offset + 1);
        } else {
            s.pending.push_back((offset, refs));
        }
    }

    /// The consumer read up to `offset`: what lies below it and after the records registered
    /// so far goes to no agent (transaction markers, aborted records), so once those records
    /// are done the commit may move up to `offset`. Only once a record of the partition was
    /// registered: until a consumer delivers the first record of an assignment, the position
    /// it reports may still be the one of its previous assignment of the partition.
    pub(crate) fn pass(&self, offset: i64) {
        let mut s = self.state();
        if s.frozen || !s.seen {
            return;
        }
        let last = s.pending.back().map_or(s.done_until - 1, |e| e.0);
        if offset - 1 > last {
            // A record with no receivers: done as soon as everything before it is.
            if s.pending.is_empty() {
                s.done_until = offset;
            } else {
                s.pending.push_back((offset - 1, 0));
            }
        }
    }

    /// One receiver is done with `offset`.
    pub(crate) fn ack(&self, offset: i64) {
        let mut s = self.state();
        if s.frozen {
            return;
        }
        // Acks mostly come in order (one actor per partition): the oldest pending record first.
        let i = match s.pending.front() {
            Some(&(o, _)) if o == offset => 0,
            _ => match s.pending.binary_search_by_key(&offset, |e| e.0) {
                Ok(i) => i,
                Err(_) => return,
            },
        };
        let e = &mut s.pending[i];
        e.1 = e.1.saturating_sub(1);
        while let Some(&(o, 0)) = s.pending.front() {
            s.pending.pop_front();
            s.done_until = o + 1;
        }
    }

    /// Keeps `offset` pending for good: this tracker commits nothing from it on, so the event
    /// is read again by the next owner of the partition (or after a restart).
    fn hold(&self, offset: i64) {
        let mut s = self.state();
        if let Ok(i) = s.pending.binary_search_by_key(&offset, |e| e.0) {
            s.pending[i].1 = u32::MAX;
        }
    }

    /// Takes back the records from `offset` on, which were registered but never reached an
    /// agent (a revocation while they waited for a full queue): nothing from `offset` on is
    /// committed, and they no longer count as in flight.
    pub(crate) fn retract_from(&self, offset: i64) {
        let mut s = self.state();
        s.pending.retain(|(o, _)| *o < offset);
        s.limit = Some(s.limit.map_or(offset, |l| l.min(offset)));
    }

    /// Ignores every later ack: what is committable stays what it is now.
    pub(crate) fn freeze(&self) {
        self.state().frozen = true;
    }

    /// Whether no record handed out is still being processed.
    pub(crate) fn is_idle(&self) -> bool {
        self.state().pending.is_empty()
    }

    /// The offset to commit: every record below it that this tracker saw has been processed
    /// (records below the first one it saw were committed before it was created). `None`
    /// before the first record.
    pub(crate) fn committable(&self) -> Option<i64> {
        let s = self.state();
        let at = match s.pending.front() {
            Some(&(o, _)) => Some(o),
            None => (s.done_until >= 0).then_some(s.done_until),
        };
        match (at, s.limit) {
            (Some(at), Some(limit)) => Some(at.min(limit)),
            (at, _) => at,
        }
    }
}

/// Lets a commit see the agents between two events: [`pause`](Barrier::pause) stops every
/// actor from taking its next event and waits until none is in the middle of one, so the
/// offsets, table changes and outputs a commit takes all belong to the same events (with
/// exactly-once, nothing a transaction holds comes from an event whose offset it leaves out).
#[derive(Debug, Default)]
pub(crate) struct Barrier {
    paused: AtomicBool,
    /// Actors in the middle of an event.
    busy: AtomicUsize,
    /// Actors waiting for the barrier to lift.
    waiting: Mutex<Vec<Waker>>,
    idle: tokio::sync::Notify,
}

impl Barrier {
    /// Marks an actor as starting an event, or, while paused, registers it to be woken when
    /// the barrier lifts. Every `Ready` is paired with one [`leave`](Barrier::leave).
    pub(crate) fn poll_enter(&self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.paused.load(Ordering::SeqCst) {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                // Checked again under the lock `resume` takes: a resume in between is seen.
                if self.paused.load(Ordering::SeqCst) {
                    waiting.push(cx.waker().clone());
                    return Poll::Pending;
                }
                continue;
            }
            self.busy.fetch_add(1, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            // Paused in between: step back (`pause` may be waiting for this actor).
            self.leave();
        }
    }

    /// Waits until the actor may start an event (see [`poll_enter`](Barrier::poll_enter));
    /// the guard leaves when dropped.
    pub(crate) async fn enter(&self) -> Entered<'_> {
        std::future::poll_fn(|cx| self.poll_enter(cx)).await;
        Entered(self)
    }

    /// An actor is done with its event.
    pub(crate) fn leave(&self) {
        if self.busy.fetch_sub(1, Ordering::SeqCst) == 1 && self.paused.load(Ordering::SeqCst) {
            self.idle.notify_one();
        }
    }

    /// Stops actors from starting events and waits, up to `timeout`, until none is in the
    /// middle of one; false if some still were. The barrier stays up until
    /// [`resume`](Barrier::resume) either way.
    pub(crate) async fn pause(&self, timeout: Duration) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            if self.busy.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.busy.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Lifts the barrier and wakes the actors waiting at it.
    pub(crate) fn resume(&self) {
        let waiting = {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            self.paused.store(false, Ordering::SeqCst);
            std::mem::take(&mut *w)
        };
        for w in waiting {
            w.wake();
        }
    }
}

/// An actor in the middle of an event (see [`Barrier::enter`]).
#[derive(Debug)]
pub(crate) struct Entered<'a>(&'a Barrier);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Acks one event of one partition when dropped.
pub(crate) struct AckGuard {
    tracker: Arc<PartitionTracker>,
    offset: i64,
}

impl AckGuard {
    pub(crate) fn new(tracker: Arc<PartitionTracker>, offset: i64) -> Self {
        Self { tracker, offset }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        self.tracker.ack(self.offset);
    }
}

impl fmt::Debug for AckGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AckGuard({}@{})", self.tracker.tp, self.offset)
    }
}

/// The acks an item carries through stream operators; dropping it acks them all.
#[derive(Debug, Default)]
pub(crate) enum Acks {
    #[default]
    None,
    One(AckGuard),
    Many(Vec<Acks>),
}

impl Acks {
    /// Gives the events up unprocessed: their offsets are never committed by this worker, so
    /// they are read again after a restart or a rebalance.
    pub(crate) fn abandon(self) {
        match self {
            Acks::None => {}
            Acks::One(guard) => guard.tracker.hold(guard.offset),
            Acks::Many(all) => all.into_iter().for_each(Acks::abandon),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Arc<PartitionTracker> {
        PartitionTracker::new(TopicPartition::new("t", 0))
    }

    #[test]
    fn nothing_committable_before_processing() {
        let t = tracker();
        assert_eq!(t.committable(), None);
        t.register(5, 1);
        assert_eq!(t.committable(), Some(5));
        t.ack(5);
        assert_eq!(t.committable(), Some(6));
    }

    #[test]
    fn out_of_order_acks_commit_only_the_contiguous_prefix() {
        let t = tracker();
        for o in 0..4 {
            t.register(o, 1);
        }
        t.ack(2);
        t.ack(3);
        assert_eq!(t.committable(), Some(0));
        t.ack(0);
        assert_eq!(t.committable(), Some(1));
        t.ack(1);
        assert_eq!(t.committable(), Some(4));
    }

    #[test]
    fn every_receiver_must_ack() {
        let t = tracker();
        t.register(0, 2);
        t.ack(0);
        assert_eq!(t.committable(), Some(0));
        t.ack(0);
        assert_eq!(t.committable(), Some(1));
        t.register(1, 0);
        assert_eq!(t.committable(), Some(2));
    }

    #[test]
    fn a_marker_read_past_is_committed_only_after_the_records_before_it() {
        let t = tracker();
        // Before the first record, a position is not trusted.
        t.pass(7);
        assert_eq!(t.committable(), None);
        t.register(0, 1);
        t.register(1, 1);
        // Offset 2 is a transaction marker: the consumer is at 3.
        t.pass(3);
        assert_eq!(t.committable(), Some(0));
        t.ack(0);
        assert_eq!(t.committable(), Some(1));
        t.ack(1);
        assert_eq!(
            t.committable(),
            Some(3),
            "the commit stays below the marker"
        );
        assert!(t.is_idle());
        // A position the records already reached changes nothing.
        t.register(3, 1);
        t.pass(4);
        t.pass(2);
        assert_eq!(t.committable(), Some(3));
        t.ack(3);
        assert_eq!(t.committable(), Some(4));
        // Idle: the next marker moves the commit at once.
        t.pass(6);
        assert_eq!(t.committable(), Some(6));
    }

    #[test]
    fn retracted_records_are_never_committed_nor_in_flight() {
        let t = tracker();
        for o in 0..6 {
            t.register(o, 1);
        }
        t.ack(0);
        t.ack(1);
        t.retract_from(3);
        assert_eq!(t.committable(), Some(2));
        t.ack(2);
        assert!(t.is_idle(), "3, 4 and 5 never reached an agent");
        assert_eq!(t.committable(), Some(3));
        t.ack(4);
        t.register(6, 0);
        assert_eq!(t.committable(), Some(3));
    }

    #[tokio::test]
    async fn a_paused_barrier_waits_for_the_event_in_progress_and_holds_the_next() {
        let b = Arc::new(Barrier::default());
        let entered = b.enter().await;
        let pausing = {
            let b = b.clone();
            tokio::spawn(async move { b.pause(Duration::from_secs(30)).await })
        };
        // The pause waits for the event in progress...
        tokio::task::yield_now().await;
        assert!(!pausing.is_finished());
        drop(entered);
        assert!(pausing.await.expect("pause"), "idle once the event is done");
        // ...and no actor starts another until it lifts.
        let next = {
            let b = b.clone();
            tokio::spawn(async move {
                let _e = b.enter().await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!next.is_finished());
        b.resume();
        next.await.expect("entered after resume");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_gives_up_after_its_timeout() {
        let b = Barrier::default();
        let _busy = b.enter().await;
        assert!(!b.pause(Duration::from_millis(50)).await);
        b.resume();
    }

    #[test]
    fn abandoned_events_are_never_committed() {
        let t = tracker();
        for o in 0..3 {
            t.register(o, 1);
        }
        t.ack(0);
        Acks::One(AckGuard::new(t.clone(), 1)).abandon();
        t.ack(2);
        assert_eq!(t.committable(), Some(1));
        assert!(!t.is_idle());
    }
}
