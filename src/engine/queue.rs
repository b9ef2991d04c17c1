//! The bounded queues between the dispatcher and the actors of each agent.

use super::ack::AckGuard;
use crate::transport::Message;
use std::sync::Arc;

/// A record handed by the dispatcher to one agent, with the ack that marks it processed.
pub(crate) struct Delivery {
    pub(crate) msg: Arc<Message>,
    pub(crate) ack: AckGuard,
}

/// Deliveries travel to agents in chunks, so a queue operation carries many records.
pub(crate) type Chunk = Vec<Delivery>;
/// The receiving end of an agent's queue.
pub(crate) type Queue = async_channel::Receiver<Chunk>;

/// One agent's queue as the dispatcher sees it.
pub(crate) struct Route {
    pub(crate) tx: async_channel::Sender<Chunk>,
    /// Deliveries per chunk: large for a single actor, 1 when actors share the queue so that
    /// work spreads between them.
    pub(crate) chunk: usize,
}

/// A new agent queue holding about `buffer` records (the `stream_buffer_maxsize` setting).
pub(crate) fn queue(concurrency: usize, buffer: usize) -> (Route, Queue) {
    let chunk = if concurrency > 1 {
        1
    } else {
        128.min(buffer.max(1))
    };
    let (tx, rx) = async_channel::bounded((buffer / chunk).max(1));
    (Route { tx, chunk }, rx)
}
