//! The seed's "Static types" block: the adding agent with its types spelled out.
//!
//! ```console
//! $ cargo run --example typed_agent -- worker -l info
//! $ cargo run --example typed_agent -- send_value 4 8
//! 12
//! 4 + 8 = 12 (read from typed_agent.adding_events[0])
//! ```
//!
//! Python's type hints are optional and checked by mypy; in Rust the types are the signature.
//! `StreamT[Add]` is `Stream<Add>`, and `AsyncIterable[int]` is `impl AsyncIterable<i64>`:
//! what the agent yields is what `ask` returns.

use rill::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            yield value.a + value.b;
        }
    }
}

// The argument is a `Stream<Add>`, not just any async iterable, so the stream API (`group_by`,
// `through`, `filter`, `events`, ...) is there to use. This agent yields a `String`, so asking
// it returns one.
fn adding_events(stream: Stream<Add>) -> impl AsyncIterable<String> {
    let mut events = stream.events();
    stream! {
        while let Some(event) = events.next().await {
            let Add { a, b } = event.value;
            let (topic, partition) = (event.topic(), event.partition());
            yield format!("{a} + {b} = {} (read from {topic}[{partition}])", a + b);
        }
    }
}

/// Send an Add request to the adding agent and print the reply.
#[derive(Debug, clap::Args)]
struct SendValue {
    /// First number to add
    #[arg(allow_negative_numbers = true)]
    a: i64,
    /// Second number to add
    #[arg(allow_negative_numbers = true)]
    b: i64,
}

fn main() {
    let app = App::new("typed-agent");

    let topic = app.topic("adding").value_type::<Add>();

    let adding = app.agent(adding).channel(&topic);
    let adding_events = app.agent(adding_events);

    app.command("send_value", move |SendValue { a, b }| {
        let (adding, adding_events) = (adding.clone(), adding_events.clone());
        async move {
            // The reply has the type the agent yields.
            let sum: i64 = adding.ask(Add { a, b }).await?;
            println!("{sum}");
            let described: String = adding_events.ask(Add { a, b }).await?;
            println!("{described}");
            Ok::<_, rill::Error>(())
        }
    });

    app.main()
}
