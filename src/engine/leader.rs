//! Leader election: the worker the consumer group gives partition 0 of the leader topic to is
//! the app's leader (it runs the `on_leader` timers).

use crate::transport::TopicPartition;
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

/// The name of the topic whose partition 0 makes a worker the app's leader.
pub(crate) fn leader_topic(app_id: &str) -> String {
    format!("{app_id}-__leader")
}

/// Whether this worker is the app's leader, kept up to date from the consumer group's
/// assignments of the leader topic.
#[derive(Debug)]
pub(crate) struct Leadership {
    topic: OnceLock<Arc<str>>,
    leader: watch::Sender<bool>,
}

impl Default for Leadership {
    fn default() -> Self {
        Self {
            topic: OnceLock::new(),
            leader: watch::channel(false).0,
        }
    }
}

impl Leadership {
    /// The workers elect their leader through `topic` (which the dispatcher subscribes to).
    pub(crate) fn elect_by(&self, topic: String) {
        let _ = self.topic.set(Arc::from(topic));
    }

    /// The leader topic, when the workers elect a leader.
    pub(crate) fn topic(&self) -> Option<&str> {
        self.topic.get().map(|t| &**t)
    }

    /// Follows whether this worker is the leader.
    pub(crate) fn watch(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    pub(crate) fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Takes the leader topic's partitions out of `tps`, which the group just assigned to
    /// this worker (`gained`) or revoked, and updates the leadership: the rest of the
    /// dispatcher (offsets, tables) never sees them.
    pub(crate) fn take_from(&self, tps: &mut Vec<TopicPartition>, gained: bool) {
        let Some(topic) = self.topic.get() else {
            return;
        };
        let mut changed = false;
        tps.retain(|tp| {
            let ours = *tp.topic == **topic;
            changed |= ours && tp.partition == 0;
            !ours
        });
        if changed && self.leader.send_replace(gained) != gained {
            tracing::info!(leader = gained, "leadership changed");
        }
    }

    /// This worker leaves the group: it leads no more.
    pub(crate) fn resign(&self) {
        self.leader.send_replace(false);
    }
}
