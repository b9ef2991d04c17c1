//! The seed's first agent (`faustexample.py`, "Create an agent" in the Agents guide).
//!
//! ```console
//! $ cargo run --example faustexample -- worker -l info
//! $ cargo run --example faustexample -- send_events
//! myagent received: {"id":0,"text":"hello"}
//! myagent received: {"id":1,"text":"hello"}
//! myagent received: {"id":2,"text":"hello"}
//! myagent processed 3 events
//! ```
//!
//! Faust's example connects to `kafka://localhost:9092`; rill runs on its embedded transport
//! unless told otherwise, so add `--broker kafka://localhost:9092` to use Kafka.

use rill::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Events `myagent` has processed, so that `send_events` can wait for them.
static PROCESSED: AtomicUsize = AtomicUsize::new(0);

// Without a channel, the agent reads the topic named after it (`faustexample.myagent`).
// Its values are any JSON.
async fn myagent(mut stream: Stream<serde_json::Value>) {
    while let Some(event) = stream.next().await {
        // process event
        println!("myagent received: {event}");
        PROCESSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Send events to myagent and wait until it has processed them.
#[derive(Debug, clap::Args)]
struct SendEvents {
    /// How many events to send
    #[arg(long, default_value_t = 3)]
    count: usize,
}

fn main() {
    let app = App::new("example");

    let myagent = app.agent(myagent);

    let local = app.clone();
    app.command("send_events", move |SendEvents { count }| {
        let (app, myagent) = (local.clone(), myagent.clone());
        async move {
            for id in 0..count {
                let event = serde_json::json!({ "id": id, "text": "hello" });
                myagent.cast(event).await?;
            }
            if !agents_run_here(&app) {
                println!("sent {count} events");
                return Ok(());
            }
            if !wait_until(|| PROCESSED.load(Ordering::Relaxed) >= count).await {
                let done = PROCESSED.load(Ordering::Relaxed);
                anyhow::bail!("myagent processed only {done} of {count} events in time");
            }
            println!("myagent processed {count} events");
            Ok::<_, anyhow::Error>(())
        }
    });

    app.main()
}

/// Whether the agents run in this process while a command runs: only on the embedded
/// transport with no worker of the app running (on Kafka, or when the command reached the
/// app's running worker, they run in the worker, which prints what they receive).
fn agents_run_here(app: &App) -> bool {
    app.is_embedded()
}

/// Waits until `done()` holds, for at most 10 seconds; returns whether it does.
async fn wait_until(done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}
