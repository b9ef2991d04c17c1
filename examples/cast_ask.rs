//! The seed's "Cast or Ask?" section: talking to an agent with `cast`, `ask` and `send`.
//!
//! ```console
//! $ cargo run --example cast_ask -- worker -l info
//! $ cargo run --example cast_ask -- cast_ask
//! -- cast
//! -- ask
//! adder received Add { a: 2, b: 2 }
//! adder received Add { a: 2, b: 2 }
//! ask replied 4
//! -- send, reply_to another_agent
//! adder received Add { a: 2, b: 2 }
//! another_agent received 4
//! ```

use rill::prelude::*;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn adder(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            println!("adder received {value:?}");
            yield value.a + value.b;
        }
    }
}

async fn another_agent(mut stream: Stream<i64>) {
    while let Some(value) = stream.next().await {
        println!("another_agent received {value:?}");
    }
}

/// Cast to the adder, ask it, and send to it with the reply going to another agent.
#[derive(Debug, clap::Args)]
struct NoArgs {}

fn main() {
    let app = App::new("cast-ask");

    let adder = app.agent(adder);
    let another_agent = app.agent(another_agent);

    let local = app.clone();
    app.command("cast_ask", move |NoArgs {}| {
        let app = local.clone();
        let (adder, another_agent) = (adder.clone(), another_agent.clone());
        async move {
            // A cast is non-blocking as it will not wait for a reply.
            // The agent will receive the request, but it will not send a reply.
            println!("-- cast");
            adder.cast(Add { a: 2, b: 2 }).await?;

            // Asking an agent will send a reply back to process that sent the request.
            println!("-- ask");
            let value = adder.ask(Add { a: 2, b: 2 }).await?;
            assert_eq!(value, 4);
            println!("ask replied {value}");

            // Send is the underlying mechanism used by cast and ask.
            // Use it to send the reply to another agent.
            println!("-- send, reply_to another_agent");
            adder
                .send(Add { a: 2, b: 2 })
                .reply_to(&another_agent)
                .await?;
            // On the embedded transport the agents run in this process: wait until they have
            // processed it all. (On Kafka the worker runs them, and prints what another_agent
            // receives.)
            if app.is_embedded() {
                app.processed(Duration::from_secs(10)).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
    });

    app.main()
}
