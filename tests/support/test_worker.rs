//! A worker process for the multi-process tests: it reads keyed, numbered events from
//! `events` and, for each one, writes a record to `processed` saying which worker instance
//! processed it, from which partition. The tests start several of these against one broker,
//! kill and restart them, and read `processed` back to check that nothing was lost and that
//! each key stayed in order.
//!
//! ```console
//! $ cargo run --example test_worker -- worker --broker kafka://127.0.0.1:9092 -l info
//! ```
//! The instance name comes from `RILL_TEST_INSTANCE` (default: the process id).

use rill::prelude::*;

/// An input event: `seq` numbers the events of one key from 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    key: u64,
    seq: u64,
}

/// What the worker reports for each event it processed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Processed {
    instance: String,
    /// Counts this instance's processings from 0, in processing order.
    n: u64,
    key: u64,
    seq: u64,
    partition: u32,
    offset: i64,
}

fn main() {
    let instance =
        std::env::var("RILL_TEST_INSTANCE").unwrap_or_else(|_| std::process::id().to_string());
    let partitions = std::env::var("RILL_TEST_PARTITIONS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(12);
    let app = App::new("rill-test-worker");
    let events = app
        .topic("events")
        .value_type::<Numbered>()
        .partitions(partitions);
    let processed = app
        .topic("processed")
        .value_type::<Processed>()
        .partitions(partitions);
    app.agent(move |mut stream: Stream<Numbered>| {
        let instance = instance.clone();
        let mut n = 0;
        stream! {
            while let Some(event) = stream.next().await {
                let Some(meta) = stream.current_event() else {
                    continue;
                };
                n += 1;
                yield Processed {
                    instance: instance.clone(),
                    n: n - 1,
                    key: event.key,
                    seq: event.seq,
                    partition: meta.partition,
                    offset: meta.offset,
                };
            }
        }
    })
    .named("process")
    .channel(&events)
    .sink(&processed);
    app.main()
}
