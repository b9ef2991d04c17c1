//! A worker process for the fault-test harness (`tests/fault_harness.rs`): it reads keyed,
//! numbered events from `fault-events`, forwards each one unchanged to `fault-out` and counts
//! it in the table `counts` (keyed by the event's key), which the worker's web server answers
//! for (`GET /tables/counts/<key>`). The harness runs three of these against one broker,
//! SIGKILLs and restarts them, and checks `fault-out` and `counts` against what it produced.
//!
//! ```console
//! $ cargo run --example fault_worker -- worker --broker kafka://127.0.0.1:9092 --web-port 0
//! ```
//!
//! `RILL_PROCESSING_GUARANTEE` (`at_least_once`, the default, or `exactly_once`) sets the
//! processing guarantee; `RILL_FAULT_PARTITIONS` (default 6) the partition count of both topics
//! and of the table.

use rill::prelude::*;
use rill::ProcessingGuarantee;

/// An input (and output) event: `seq` numbers the events of one key from 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FaultEvent {
    key: u64,
    seq: u64,
}

fn guarantee_from_env() -> Option<ProcessingGuarantee> {
    let value = std::env::var("RILL_PROCESSING_GUARANTEE").ok()?;
    match value.trim().replace('-', "_").as_str() {
        "at_least_once" => Some(ProcessingGuarantee::AtLeastOnce),
        "exactly_once" => Some(ProcessingGuarantee::ExactlyOnce),
        other => {
            eprintln!(
                "error: RILL_PROCESSING_GUARANTEE: expected at_least_once or exactly_once, got \
                 {other:?}"
            );
            std::process::exit(2)
        }
    }
}

fn main() {
    let partitions = std::env::var("RILL_FAULT_PARTITIONS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6);
    let app = App::new("rill-fault");
    if let Some(guarantee) = guarantee_from_env() {
        app.configure(|s| s.processing_guarantee = guarantee);
    }
    // The producer keys each event with the decimal text of its key, which is also the key's
    // JSON encoding: an event's partition is the partition of its key in `counts`, so a
    // lookup by key finds the worker that counted it.
    let events = app
        .topic("fault-events")
        .value_type::<FaultEvent>()
        .partitions(partitions);
    let out = app
        .topic("fault-out")
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
