//! The seed's adding agent (`examples/agent.py`), with its `send_value` command.
//!
//! ```console
//! $ cargo run --example agent -- worker -l info
//! $ cargo run --example agent -- send_value 4 8 --print
//! Sending Add(4, 8)...
//! 12
//! ```

use rill::prelude::*;

// The model describes the data sent to our agent,
// We will use a JSON serialized dictionary
// with two integer fields: a, and b.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

// The topic used by our agent is named 'adding', and the values in this topic are of the Add
// model. (You can also specify the key_type if your topic uses keys.)
fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            // here we receive Add objects, add a + b.
            yield value.a + value.b;
        }
    }
}

/// Send an Add request to the adding agent and print the reply.
#[derive(Debug, clap::Args)]
struct SendValue {
    /// First number to add
    a: i64,
    /// Second number to add
    b: i64,
    /// Enable debug output
    #[arg(long = "print", overrides_with = "no_print")]
    print: bool,
    /// Disable debug output
    #[arg(long = "no-print")]
    no_print: bool,
}

fn main() {
    // Next, we create the application object that configures our environment.
    let app = App::new("agent-example");

    let topic = app.topic("adding").value_type::<Add>();

    let adding = app.agent(adding).channel(&topic);

    app.command("send_value", move |SendValue { a, b, print, .. }| {
        let adding = adding.clone();
        async move {
            if print {
                println!("Sending Add({a}, {b})...");
            }
            println!("{}", adding.ask(Add { a, b }).await?);
            Ok::<_, rill::Error>(())
        }
    });

    app.main()
}
