//! A topic-reading agent on the durable transport (`file://`) runs in bounded memory: a
//! million events through it grow the process's resident memory by less than 20 MB once it is
//! warmed up. Every event is written to the log on disk and removed from it once committed;
//! what stays in memory is fjall's block cache (4 MiB) and write buffer (16 MiB in all, 8 MiB
//! per memtable), filled during the warm-up, and the uncommitted records the index holds, as on
//! `memory://`. (The log keeps no bloom filters: it never looks a record up by key, and their
//! memory grew with every table file the million records passed through.)
//!
//! This is a test binary of its own, with one test, so that the resident memory it measures is
//! this agent's and no other test's.

mod common;

use common::bounded::{a_million_events_through_an_agent, PARTITIONS};
use rill::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg(target_os = "linux")]
async fn a_million_events_through_a_topic_agent_on_file_stay_in_bounded_memory() {
    let app = App::new("bounded-adding-file");
    let dir = std::env::temp_dir().join(format!("rill-durable-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    app.configure(|s| s.broker = format!("file://{}", dir.display()));
    // The app's log (a process has one open log per directory, which the app shares).
    let log = rill::transport::FileBroker::open(&dir, "bounded-adding-file").expect("log");
    let broker = log.memory().clone();
    // Sent a thousand at a time (each send resolves once the log has written it; the log
    // writes what is pending in one batch).
    a_million_events_through_an_agent(&app, 1000, || {
        (0..PARTITIONS)
            .map(|p| broker.record_count("adding", p).unwrap_or(0))
            .sum::<usize>()
    })
    .await;
    // And the disk holds nothing of it either.
    for p in 0..PARTITIONS {
        assert_eq!(log.records_on_disk("adding", p).expect("count"), 0);
    }
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}
