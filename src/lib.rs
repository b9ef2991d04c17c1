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
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod ack;
mod agent;
mod app;
mod bad_input;
mod channel;
mod cli;
pub mod codec;
mod error;
mod metrics;
mod partitioner;
mod reply;
mod settings;
mod stream;
pub mod table;
mod timer;
mod topic;
pub mod transport;
mod web;
mod worker;

#[doc(inline)]
pub use agent::{
    marker, Agent, AgentAsk, AgentFn, AgentSend, AsyncIterable, IntoSink, IntoValues, Offered,
    ReplyTo, Sink, Source,
};
#[doc(inline)]
pub use app::App;
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
#[doc(inline)]
pub use worker::Worker;

/// Write an agent body that yields values: `stream! { ... yield value; }` (from
/// `async-stream`).
pub use async_stream::stream;
/// Byte buffers used for raw keys and values.
pub use bytes::Bytes;
/// Argument parsing for commands (`#[derive(clap::Args)]`).
pub use clap;

/// The names almost every app uses.
pub mod prelude {
    pub use crate::codec::{Json, Raw, Utf8};
    pub use crate::{
        field, stream, Agent, App, AsyncIterable, Bytes, Channel, Event, GroupBy, NoArgs, Settings,
        Stream, Table, TableReader, Topic,
    };
    pub use futures::StreamExt;
    pub use serde::{Deserialize, Serialize};
}
