//! The engine: what runs an app's agents over a transport, and nothing of what they compute.
//!
//! - [`runtime`]: the context the parts of a running app share ([`Runtime`]), and how records
//!   are addressed to partitions.
//! - [`dispatch`]: the dispatcher, which polls the group consumer and hands each record to the
//!   queues ([`queue`]) of the agents reading its topic.
//! - [`ack`]: which offsets are processed, and the barrier that holds the actors while a
//!   commit takes them.
//! - [`commit`]: commits (offsets, table changelogs, transactions) and roll backs.
//! - [`rebalance`]: partitions assigned and revoked, and the table partitions that follow them.
//! - [`state`]: what the engine needs of the app's state (its tables), as a trait the state
//!   layer implements; [`handle`]: what the state may use of a running worker
//!   ([`StateHandle`]), rather than the whole [`Runtime`].
//! - [`reply`]: replies to `ask`, `map` and `join`, and the consumer of the reply topic.
//! - [`leader`] and [`membership`]: the leader among the app's workers, and which worker holds
//!   which table partitions.
//! - [`core`]: what an app's declarations share with the worker that runs them.
//!
//! The engine uses only the layers below it (transport, metrics, codecs, settings); tables,
//! agents, timers and the web server see it, never the other way round.

pub(crate) mod ack;
mod commit;
pub(crate) mod core;
mod dispatch;
mod handle;
pub(crate) mod leader;
pub(crate) mod membership;
pub(crate) mod queue;
mod rebalance;
pub(crate) mod reply;
pub(crate) mod runtime;
pub(crate) mod state;

pub(crate) use self::core::AppCore;
pub(crate) use dispatch::Dispatcher;
pub(crate) use handle::{StateHandle, WorkerRef};
pub(crate) use runtime::{random_id, Runtime, Stats};
