//! The seed's sinks ("Sinks" in the Agents guide): a function, an async function, a topic and
//! another agent receiving what an agent yields.
//!
//! ```console
//! $ cargo run --example sinks -- worker -l info
//! $ cargo run --example sinks -- send_values
//! -- function sink
//! AGENT YIELD: 10
//! ...
//! -- async function sink
//! AGENT YIELD (async sink): 10
//! ...
//! -- topic sink
//! AGENT LOG TOPIC: 10
//! ...
//! -- agent sink
//! AGENT A RECEIVED: "hello"
//! AGENT B RECEIVED: "hello"
//! ...
//! ```
//!
//! Rust has no redefinition, so the guide's three `myagent`s are one function declared as three
//! agents (`sinks.myagent`, `sinks.myagent_async`, `sinks.myagent_log`), and its second
//! `mysink` is `mysink_async`.

use rill::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

// How many values each sink has received, so that `send_values` can wait for them.
static FUNCTION_SINK: AtomicUsize = AtomicUsize::new(0);
static ASYNC_SINK: AtomicUsize = AtomicUsize::new(0);
static TOPIC_SINK: AtomicUsize = AtomicUsize::new(0);
static AGENT_SINK: AtomicUsize = AtomicUsize::new(0);

// Function Callback

fn mysink(value: i64) {
    println!("AGENT YIELD: {value:?}");
    FUNCTION_SINK.fetch_add(1, Ordering::Relaxed);
}

fn process_value(value: i64) -> i64 {
    value * 10
}

fn myagent(mut stream: Stream<i64>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            yield process_value(value);
        }
    }
}

// Async Function Callback

async fn mysink_async(value: i64) {
    println!("AGENT YIELD (async sink): {value:?}");
    // OBS This will force the agent instance that yielded this value
    // to sleep for 0.1 second before continuing on the next event
    // in the stream.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ASYNC_SINK.fetch_add(1, Ordering::Relaxed);
}

// Topic: `agent_log_topic` is declared in main. This agent reads it, to show what arrives.

async fn agent_log(mut stream: Stream<serde_json::Value>) {
    while let Some(value) = stream.next().await {
        println!("AGENT LOG TOPIC: {value}");
        TOPIC_SINK.fetch_add(1, Ordering::Relaxed);
    }
}

// Another Agent

async fn agent_b(mut stream: Stream<String>) {
    while let Some(event) = stream.next().await {
        println!("AGENT B RECEIVED: {event:?}");
        AGENT_SINK.fetch_add(1, Ordering::Relaxed);
    }
}

fn agent_a(mut stream: Stream<String>) -> impl AsyncIterable<String> {
    stream! {
        while let Some(event) = stream.next().await {
            println!("AGENT A RECEIVED: {event:?}");
            // The guide's agent_a only prints, so agent_b would never hear from it: an agent's
            // sinks receive what it yields.
            yield event;
        }
    }
}

/// Send a few values to each agent and show every sink receiving them.
#[derive(Debug, clap::Args)]
struct NoArgs {}

fn main() {
    let app = App::new("sinks");

    let myagent_fn = app.agent(myagent).sink(mysink);

    let myagent_async = app
        .agent(myagent)
        .named("sinks.myagent_async")
        .sink(mysink_async);

    let agent_log_topic = app.topic("agent_log");
    let myagent_log = app
        .agent(myagent)
        .named("sinks.myagent_log")
        .sink(&agent_log_topic);
    app.agent(agent_log).channel(&agent_log_topic);

    let agent_b = app.agent(agent_b);
    let agent_a = app.agent(agent_a).sink(&agent_b);

    let local = app.clone();
    app.command("send_values", move |NoArgs {}| {
        let app = local.clone();
        let (myagent_fn, myagent_async) = (myagent_fn.clone(), myagent_async.clone());
        let (myagent_log, agent_a) = (myagent_log.clone(), agent_a.clone());
        async move {
            let values = [1, 2, 3];

            println!("-- function sink");
            for value in values {
                myagent_fn.cast(value).await?;
            }
            wait_for(&app, &FUNCTION_SINK, values.len()).await?;

            println!("-- async function sink");
            for value in values {
                myagent_async.cast(value).await?;
            }
            wait_for(&app, &ASYNC_SINK, values.len()).await?;

            println!("-- topic sink");
            for value in values {
                myagent_log.cast(value).await?;
            }
            wait_for(&app, &TOPIC_SINK, values.len()).await?;

            println!("-- agent sink");
            for event in ["hello", "agent", "b"] {
                agent_a.cast(event.to_owned()).await?;
            }
            wait_for(&app, &AGENT_SINK, 3).await?;
            Ok::<_, anyhow::Error>(())
        }
    });

    app.main()
}

/// Waits (at most 10 seconds) until `count` has reached `n`, when the agents run in this
/// process: on the embedded transport. (On Kafka they run in the worker, which prints what the
/// sinks receive.)
async fn wait_for(app: &App, count: &AtomicUsize, n: usize) -> anyhow::Result<()> {
    if !app.is_embedded() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::Relaxed) < n {
        if tokio::time::Instant::now() >= deadline {
            let got = count.load(Ordering::Relaxed);
            anyhow::bail!("the sink received only {got} of {n} values in time");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
