//! A worker process for the fault-test harness (`tests/fault_harness.rs`): it reads keyed,
//! numbered events from `fault-events`, forwards each one unchanged to `fault-out` and counts
//! it in the table `counts` (keyed by the event's key), which the worker's web server answers
//! for (`GET /tables/counts/<key>`). The harness runs three of these against one broker,
//! SIGKILLs and restarts them, and checks `fault-out` and `counts` against what it produced.
//!
//! ```console
//! $ cargo run --example fault_worker -- worker --broker kafka://127.0.0.1:9092 --web-port 0 \
//!     --processing-guarantee exactly_once --worker-id w0
//! ```
//!
//! The `worker` command's options set the processing guarantee (`--processing-guarantee`) and
//! the worker's name across restarts (`--worker-id`, its transactional id with exactly-once).
//! `RILL_FAULT_PARTITIONS` (default 6) sets the partition count of both topics and of the
//! table; `RILL_FAULT_NAMESPACE` (default empty) is appended to the app id and to both topic
//! names, so runs against a broker that outlives them do not see each other's records.
//! `RILL_FAULT_REPLICATION` (default 1) is the replication factor of the topics it creates.

use rill::prelude::*;

/// An input (and output) event: `seq` numbers the events of one key from 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FaultEvent {
    key: u64,
    seq: u64,
}

fn main() {
    let partitions = std::env::var("RILL_FAULT_PARTITIONS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6);
    let namespace = std::env::var("RILL_FAULT_NAMESPACE").unwrap_or_default();
    let replication = std::env::var("RILL_FAULT_REPLICATION")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let app = App::new(format!("rill-fault{namespace}"));
    app.configure(|s| s.topic_replication_factor = replication);
    // The producer keys each event with the decimal text of its key, which is also the key's
    // JSON encoding: an event's partition is the partition of its key in `counts`, so a
    // lookup by key finds the worker that counted it.
    let events = app
        .topic(format!("fault-events{namespace}"))
        .value_type::<FaultEvent>()
        .partitions(partitions);
    let out = app
        .topic(format!("fault-out{namespace}"))
        .value_type::<FaultEvent>()
        .partitions(partitions);
    let counts = app.table::<u64, u64>("counts").partitions(partitions);
    app.agent(move |mut stream: Stream<FaultEvent>| {
        let counts = counts.clone();
        stream! {
            while let Some(event) = stream.next().await {
                counts.update(event.key, |n| *n += 1);
                yield event;
            }
        }
    })
    .named("forward")
    .channel(&events)
    .sink(&out);
    app.main()
}
