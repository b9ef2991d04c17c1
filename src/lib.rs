//! # rill: stream-processing agents for Rust
//!
//! rill follows Python's Faust: an [`App`] declares typed topics and channels, and *agents*:
//! async functions over a typed, partitioned [`Stream`]. The same program runs embedded (the
//! default: the whole app in one process, topics in memory) or on a Kafka cluster, by changing
//! the broker URL.
//!
//! ```
//! use rill::prelude::*;
//!
//! #[derive(Serialize, Deserialize, Clone)]
//! struct Add { a: i64, b: i64 }
//!
//! fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
//!     stream! {
//!         while let Some(value) = stream.next().await {
//!             yield value.a + value.b;
//!         }
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> rill::Result<()> {
//! let app = App::new("agent-example");
//! let topic = app.topic("adding").value_type::<Add>();
//! let adding = app.agent(adding).channel(&topic);
//!
//! let worker = app.start().await?;
//! assert_eq!(adding.ask(Add { a: 4, b: 8 }).await?, 12);
//! worker.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! A program usually hands its command line to the app instead, with [`App::main`]: every app
//! then has `worker` (run the agents until Ctrl-C or SIGTERM), `send`, `agents`, `tables`,
//! `reset`, `help`, and the commands it declares with [`App::command`], as a Faust app does.
//!
//! ```no_run
//! use rill::prelude::*;
//! # #[derive(Serialize, Deserialize, Clone)]
//! # struct Add { a: i64, b: i64 }
//! # fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
//! #     stream! { while let Some(v) = stream.next().await { yield v.a + v.b; } }
//! # }
//!
//! fn main() {
//!     let app = App::new("agent-example");
//!     let topic = app.topic("adding").value_type::<Add>();
//!     app.agent(adding).channel(&topic);
//!     // `myapp worker -l info`, `myapp send @adding '{"a": 4, "b": 8}'`, ...
//!     app.main()
//! }
//! ```
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

// The layers, from the bottom up (see "Map of the source" in the README): each uses only the
// ones before it. tests/layering.rs checks that no two modules import each other.
//
// Foundations: codecs (and Faust's wire forms), errors, settings, the key partitioner.
pub mod codec;
mod error;
pub mod faust;
mod partitioner;
mod settings;

// The log: the embedded and Kafka transports.
pub mod transport;

// What a worker reports (counters, gauges, health), fed by the layers above.
mod metrics;

// Dispatch, acks and commits, rebalances, the runtime context.
mod engine;

// Topics and channels, and the streams agents read.
mod channel;
mod topic;

mod stream;

// State: tables, windows, stores.
pub mod table;

// Agents.
mod agent;

// The app surface: timers, the web server, the app and its worker, the command line.
mod timer;
mod web;

mod app;

mod cli;

#[doc(inline)]
pub use agent::{
    marker, Agent, AgentAsk, AgentFn, AgentSend, AsyncIterable, IntoSink, IntoValues, Offered,
    ReplyTo, Sink, Source, TryAsyncIterable, TryYields, WithState,
};
#[doc(inline)]
pub use app::App;
#[doc(inline)]
pub use app::Worker;
#[doc(inline)]
pub use channel::{Channel, SendError};
#[doc(inline)]
pub use cli::NoArgs;
#[doc(inline)]
pub use error::{BoxError, Error, Result, TransportError};
#[doc(inline)]
pub use settings::{BadInput, ProcessingGuarantee, Settings};
#[doc(inline)]
pub use stream::{Event, GroupBy, Stream};
#[doc(inline)]
pub use table::{SetTable, Table, TableReader};
#[doc(inline)]
pub use timer::{Crontab, Task, TaskOutput, Timer};
#[doc(inline)]
pub use topic::{Topic, TopicNames, TopicSend};

/// Write an agent body that yields values: `stream! { ... yield value; }` (from
/// `async-stream`).
pub use async_stream::stream;
/// What the crate's macros use; not public API.
#[doc(hidden)]
pub mod __private {
    pub use async_stream;
}

/// Byte buffers used for raw keys and values.
pub use bytes::Bytes;
/// Argument parsing for commands: the arguments of [`App::command`] are a `clap::Args`
/// struct. The prelude brings `clap` into scope, so `#[derive(clap::Args)]` works in a crate
/// that does not depend on clap itself (the derive's code names `clap::...`); without the
/// prelude, `use rill::clap;` does the same.
///
/// ```
/// use rill::prelude::*;
///
/// #[derive(clap::Args)]
/// struct SendValue {
///     /// First number to add
///     a: i64,
///     #[arg(long)]
///     print: bool,
/// }
///
/// let app = App::new("command-doc");
/// app.command("send_value", |SendValue { a, print }| async move {
///     if print {
///         println!("{a}");
///     }
///     Ok::<_, rill::Error>(())
/// });
/// ```
pub use clap;

/// The names almost every app uses.
pub mod prelude {
    /// `clap`, for `#[derive(clap::Args)]` on the arguments of a command.
    pub use crate::clap;
    pub use crate::codec::{Json, Raw, Utf8};
    pub use crate::{
        field, stream, try_stream, Agent, App, AsyncIterable, Bytes, Channel, Event, GroupBy,
        NoArgs, Settings, Stream, Table, TableReader, Topic, TryAsyncIterable,
    };
    pub use futures::StreamExt;
    pub use serde::{Deserialize, Serialize};
}
