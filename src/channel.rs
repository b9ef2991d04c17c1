//! Channels: bounded in-memory queues that agents can read from.

use crate::transport::{Headers, Message};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A failed send: the channel is closed. The value is handed back.
#[derive(Debug, thiserror::Error)]
#[error("channel is closed")]
pub struct SendError<T>(pub T);

pub(crate) struct ChannelItem<T> {
    pub(crate) value: T,
    pub(crate) meta: Arc<Message>,
}

struct Inner<T> {
    name: Arc<str>,
    tx: async_channel::Sender<ChannelItem<T>>,
    rx: async_channel::Receiver<ChannelItem<T>>,
    seq: AtomicI64,
}

/// An in-memory, bounded queue of typed values, like an `asyncio.Queue` in Faust.
///
/// A channel can be an agent's source (the agent reads what is sent to it), a sink, or simply a
/// queue read with [`recv`](Channel::recv). Values never leave the process and are not
/// encoded. Sending waits while the channel is full: that is the back-pressure.
pub struct Channel<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Channel<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for Channel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.inner.name)
            .field("len", &self.inner.tx.len())
            .finish()
    }
}

impl<T: Send + 'static> Channel<T> {
    pub(crate) fn new(name: String, capacity: usize) -> Self {
        let (tx, rx) = async_channel::bounded(capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                tx,
                rx,
                seq: AtomicI64::new(0),
            }),
        }
    }

    /// The channel's name (used in logs and as the event's topic).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of values waiting.
    pub fn len(&self) -> usize {
        self.inner.tx.len()
    }

    /// Whether no value is waiting.
    pub fn is_empty(&self) -> bool {
        self.inner.tx.is_empty()
    }

    /// Sends a value, waiting while the channel is full.
    ///
    /// # Cancel safety
    ///
    /// If cancelled before it completes, the value was not sent.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.send_with(value, None, Vec::new()).await
    }

    pub(crate) async fn send_with(
        &self,
        value: T,
        key: Option<bytes::Bytes>,
        headers: Headers,
    ) -> Result<(), SendError<T>> {
        let offset = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let meta = Arc::new(Message {
            topic: self.inner.name.clone(),
            partition: 0,
            offset,
            timestamp: crate::transport::memory::now_millis(),
            key,
            value: None,
            headers,
        });
        self.inner
            .tx
            .send(ChannelItem { value, meta })
            .await
            .map_err(|e| SendError(e.0.value))
    }

    /// Receives the next value, waiting for one.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a value is only taken when the future completes.
    pub async fn recv(&self) -> Option<T> {
        self.inner.rx.recv().await.ok().map(|i| i.value)
    }

    /// Receives a value if one is waiting.
    pub fn try_recv(&self) -> Option<T> {
        self.inner.rx.try_recv().ok().map(|i| i.value)
    }

    pub(crate) fn receiver(&self) -> async_channel::Receiver<ChannelItem<T>> {
        self.inner.rx.clone()
    }
}
