//! A topic-reading agent on the embedded transport runs in bounded memory: a million events
//! through it grow the process's resident memory by less than 20 MB once it is warmed up,
//! since the broker forgets what the agent's group has committed.
//!
//! This is a test binary of its own, with one test, so that the resident memory it measures is
//! this agent's and no other test's.

mod common;

use common::bounded::{a_million_events_through_an_agent, PARTITIONS};
use rill::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg(target_os = "linux")]
async fn a_million_events_through_a_topic_agent_stay_in_bounded_memory() {
    let app = App::new("bounded-adding");
    let broker = app.memory_broker();
    // Sent one at a time: a send to memory:// resolves at once.
    a_million_events_through_an_agent(&app, 1, || {
        (0..PARTITIONS)
            .map(|p| broker.record_count("adding", p).unwrap_or(0))
            .sum::<usize>()
    })
    .await;
}
