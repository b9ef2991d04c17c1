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
use std::sync::{Arc, Mutex};

pub(crate) struct PartitionTracker {
    pub(crate) tp: TopicPartition,
    state: Mutex<State>,
}

struct State {
    /// Offsets handed out and not yet fully acked, ascending, with their remaining acks.
    pending: VecDeque<(i64, u32)>,
    /// Next offset to commit when nothing is pending.
    done_until: i64,
    /// Set when the worker gave up waiting for its agents: later acks must not move the
    /// commit past events that were not processed.
    frozen: bool,
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
                done_until: -1,
                frozen: false,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `offset` was handed to `refs` receivers.
    pub(crate) fn register(&self, offset: i64, refs: u32) {
        let mut s = self.state();
        if refs == 0 && s.pending.is_empty() {
            s.done_until = s.done_until.max(offset + 1);
        } else {
            s.pending.push_back((offset, refs));
        }
    }

    /// One receiver is done with `offset`.
    pub(crate) fn ack(&self, offset: i64) {
        let mut s = self.state();
        if s.frozen {
            return;
        }
        let Ok(i) = s.pending.binary_search_by_key(&offset, |e| e.0) else {
            return;
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
        match s.pending.front() {
            Some(&(o, _)) => Some(o),
            None => (s.done_until >= 0).then_some(s.done_until),
        }
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
