//! The seed's `examples/send_to_agent.py`: a program that asks the adding agent of
//! `examples/agent.rs` to add 4 and 4.
//!
//! ```console
//! $ cargo run --example send_to_agent
//! 8
//! ```
//!
//! On the embedded transport the agent lives in this process, so the program starts its own
//! worker, asks, and stops it; with `RILL_BROKER=kafka://...` it only starts a client and asks
//! the workers of the cluster. With any arguments it runs the app's command line instead
//! (`cargo run --example send_to_agent -- worker`).

use rill::prelude::*;
use std::future::Future;

// The same model, app, topic and agent as examples/agent.rs (a Rust example cannot import
// another example, as `from .agent import Add, adding` does).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            // here we receive Add objects, add a + b.
            yield value.a + value.b;
        }
    }
}

async fn send_value(adding: &Agent<Add, i64>) -> rill::Result<()> {
    println!("{}", adding.ask(Add { a: 4, b: 4 }).await?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let app = App::new("agent-example");
    let topic = app.topic("adding").value_type::<Add>();
    let adding = app.agent(adding).channel(&topic);

    if std::env::args_os().len() > 1 {
        app.main()
    }
    run_until_complete(&app, send_value(&adding))
}

/// Runs `send` with `app` started in this process (Python's
/// `loop.run_until_complete(send_value())`): a whole worker on the embedded transport, only a
/// client on Kafka, where workers elsewhere run the agent.
#[tokio::main]
async fn run_until_complete(
    app: &App,
    send: impl Future<Output = rill::Result<()>>,
) -> anyhow::Result<()> {
    if let Ok(broker) = std::env::var("RILL_BROKER") {
        app.configure(|s| s.broker = broker);
    }
    let worker = if app.is_embedded() {
        app.start().await?
    } else {
        app.start_client().await?
    };
    let sent = send.await;
    worker.shutdown().await?;
    Ok(sent?)
}
