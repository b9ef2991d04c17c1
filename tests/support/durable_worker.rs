//! A worker process for the durable transport's kill harness (`tests/durable_sigkill.rs`).
//!
//! An exactly-once worker on `file://DIR` reads numbered events from `numbers`, forwards each
//! one to `out`, and adds it to the table `totals` (per key: how many events, and their sum).
//! It prints `processed N` for every event it processes, so the harness can kill it after a
//! number of events. A running worker serves its log over its web server (on a free port,
//! announced in `DIR/datadir/worker.json`), so the harness feeds it from another process.
//!
//! ```console
//! $ cargo run --example durable_worker -- work DIR          # runs until killed
//! $ cargo run --example durable_worker -- drain DIR         # processes what is there, stops
//! $ cargo run --example durable_worker -- feed DIR 0 2000   # sends events 0..2000, exits
//! ```

use rill::prelude::*;
use std::time::Duration;

/// Partitions of `numbers`, `out` and `totals`.
pub const PARTITIONS: u32 = 4;
/// Events are keyed `n % KEYS`.
pub const KEYS: u64 = 8;

/// An event: its number.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Number {
    n: u64,
}

/// What the table keeps per key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Totals {
    count: u64,
    sum: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, dir) = match args.as_slice() {
        [mode, dir, ..] => (mode.clone(), dir.clone()),
        _ => return Err("usage: durable_worker work|drain|feed DIR [FROM TO]".into()),
    };
    let app = App::new("durable-sigkill");
    app.configure(|s| {
        s.broker = format!("file://{dir}");
        s.processing_guarantee = rill::ProcessingGuarantee::ExactlyOnce;
        // A running worker is reachable: it serves its log on a free port and announces
        // itself in DIR/datadir/worker.json, where the harness's feeder finds it.
        if mode != "feed" {
            s.web_port = Some(0);
            s.datadir = Some(std::path::PathBuf::from(&dir).join("datadir"));
        }
    });
    let numbers = app
        .topic("numbers")
        .value_type::<Number>()
        .partitions(PARTITIONS);
    // Nobody reads `out`: it keeps everything, for the harness to read back.
    let out = app
        .topic("out")
        .value_type::<Number>()
        .partitions(PARTITIONS)
        .retention_bytes(u64::MAX)
        .retention_time(Duration::from_secs(10 * 365 * 24 * 3600));
    let totals = app.table::<u64, Totals>("totals").partitions(PARTITIONS);
    app.agent(move |mut stream: Stream<Number>| {
        let totals = totals.clone();
        stream! {
            while let Some(event) = stream.next().await {
                totals.update(event.n % KEYS, |t| {
                    t.count += 1;
                    t.sum += event.n;
                });
                println!("processed {}", event.n);
                yield event;
            }
        }
    })
    .named("forward")
    .channel(&numbers)
    .sink(&out);

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match mode.as_str() {
            "work" => {
                let worker = app.start().await?;
                // Runs until killed (or interrupted).
                tokio::signal::ctrl_c().await?;
                worker.shutdown().await?;
            }
            "drain" => {
                let worker = app.start().await?;
                if !worker.ready().await {
                    return Err("the worker stopped before it was ready".into());
                }
                worker.processed(Duration::from_secs(120)).await?;
                worker.shutdown().await?;
                println!("drained");
            }
            "feed" => {
                let range = match args.get(2..4) {
                    Some([from, to]) => from.parse::<u64>()?..to.parse::<u64>()?,
                    _ => return Err("usage: durable_worker feed DIR FROM TO".into()),
                };
                // Writes directly (no agents run here, so nothing is staged).
                let client = app.start_client().await?;
                for n in range {
                    numbers
                        .send(Number { n })
                        .key(Bytes::from((n % KEYS).to_string()))
                        .await?;
                }
                client.shutdown().await?;
                println!("fed");
            }
            other => return Err(format!("unknown mode {other:?}").into()),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
