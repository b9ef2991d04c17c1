//! Replies to `ask`, `map` and `join`: correlation ids and the waiters behind them.

use super::runtime::Runtime;
use crate::error::{Error, Result, TransportError};
use crate::transport::{Consumer, ConsumerEvent, Message, StartAt};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Header naming the topic a reply goes to.
pub(crate) const REPLY_TO: &str = "rill-reply-to";
/// Header carrying the request's correlation id.
pub(crate) const CORRELATION_ID: &str = "rill-correlation-id";

enum Waiter {
    One(oneshot::Sender<Bytes>),
    Many(mpsc::UnboundedSender<(String, Bytes)>),
}

/// Requests of this worker that wait for a reply, by correlation id.
pub(crate) struct Replies {
    prefix: String,
    next: AtomicU64,
    pending: Mutex<HashMap<String, Waiter>>,
    /// Topics other than the worker's reply topic that an `ask` named as its `reply_to`, and
    /// that this worker reads replies from until it stops.
    listening: tokio::sync::Mutex<HashSet<String>>,
    listeners: TaskTracker,
    /// Stops the readers of [`listening`](Replies::listening).
    closed: CancellationToken,
}

impl Replies {
    pub(crate) fn new(prefix: String) -> Self {
        Self {
            prefix,
            next: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            listening: tokio::sync::Mutex::new(HashSet::new()),
            listeners: TaskTracker::new(),
            closed: CancellationToken::new(),
        }
    }

    /// Stops reading the topics [`listen`] started reading, and waits for their readers.
    pub(crate) async fn stop_listening(&self) {
        self.closed.cancel();
        self.listeners.close();
        self.listeners.wait().await;
    }

    /// Tells the readers of [`listen`] to stop, without waiting.
    pub(crate) fn cancel_listening(&self) {
        self.closed.cancel();
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A correlation id unique to this worker.
    pub(crate) fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Waits for the reply to the request `id`; `None` if a request with that id waits
    /// already.
    pub(crate) fn expect_one(&self, id: String) -> Option<oneshot::Receiver<Bytes>> {
        let mut pending = self.pending();
        if pending.contains_key(&id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(id, Waiter::One(tx));
        Some(rx)
    }

    pub(crate) fn expect_many(&self, id: String, tx: mpsc::UnboundedSender<(String, Bytes)>) {
        self.pending().insert(id, Waiter::Many(tx));
    }

    pub(crate) fn cancel(&self, id: &str) {
        self.pending().remove(id);
    }

    /// How many requests wait for a reply.
    pub(crate) fn len(&self) -> usize {
        self.pending().len()
    }

    /// Hands a reply to its waiter; returns false when nobody waits for it (a late reply).
    pub(crate) fn complete(&self, id: &str, value: Bytes) -> bool {
        let waiter = self.pending().remove(id);
        match waiter {
            Some(Waiter::One(tx)) => tx.send(value).is_ok(),
            Some(Waiter::Many(tx)) => tx.send((id.to_owned(), value)).is_ok(),
            None => false,
        }
    }
}

/// The correlation id of an `ask` that waits for its reply, given up when this is dropped: an
/// `ask` future dropped before its reply came leaves no waiter behind, and a reply that comes
/// later is ignored (see [`Replies::complete`]).
pub(crate) struct WaitingOne {
    owner: Arc<Runtime>,
    pub(crate) id: String,
}

impl WaitingOne {
    /// Registers the request `id`; its reply comes through the receiver. An error if a
    /// request of this worker with the same correlation id still waits for its reply.
    pub(crate) fn new(owner: Arc<Runtime>, id: String) -> Result<(Self, oneshot::Receiver<Bytes>)> {
        let Some(reply) = owner.replies.expect_one(id.clone()) else {
            return Err(Error::Config(format!(
                "correlation id {id:?} is already used by a request of this worker that waits \
                 for its reply: give each ask its own"
            )));
        };
        Ok((Self { owner, id }, reply))
    }
}

impl Drop for WaitingOne {
    fn drop(&mut self) {
        // A no-op when the reply came (its waiter was removed then) or the ask gave up.
        self.owner.replies.cancel(&self.id);
    }
}

/// The correlation ids of `map`/`join` requests that wait for a reply, given up when this is
/// dropped: a stream dropped before all its replies came leaves no waiter behind, and a reply
/// that comes later is ignored (see [`Replies::complete`]).
pub(crate) struct Waiting<T> {
    owner: Arc<Runtime>,
    ids: std::collections::HashMap<String, T>,
}

impl<T> Waiting<T> {
    pub(crate) fn new(owner: Arc<Runtime>) -> Self {
        Self {
            owner,
            ids: std::collections::HashMap::new(),
        }
    }

    /// A new request: its id, and the waiter the reply goes to.
    pub(crate) fn insert(&mut self, id: String, data: T) {
        self.ids.insert(id, data);
    }

    /// The request `id` got its reply (its waiter is gone already): forget it.
    pub(crate) fn remove(&mut self, id: &str) -> Option<T> {
        self.ids.remove(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }
}

impl<T> Drop for Waiting<T> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut pending = self.owner.replies.pending();
        for id in self.ids.keys() {
            pending.remove(id);
        }
    }
}

/// Makes replies sent to `topic` reach this worker's requests: an `ask` with a `reply_to`
/// other than the worker's own reply topic waits on that topic, as Faust's does. The first
/// time a topic is named, it is created if missing (with the app's default partition count)
/// and read from its end, on every partition and outside any consumer group, until the worker
/// stops; replies there for requests of other workers are ignored. Returns once the reader is
/// positioned, so a reply sent after it cannot be missed.
pub(crate) async fn listen(rt: &Arc<Runtime>, topic: &str) -> Result<()> {
    if topic == rt.reply_topic {
        return Ok(());
    }
    let mut listening = rt.replies.listening.lock().await;
    if listening.contains(topic) {
        return Ok(());
    }
    match rt.ensure_topic(&rt.default_spec(topic)).await {
        // An existing topic is read with the partitions it has.
        Ok(_) | Err(Error::Transport(TransportError::PartitionMismatch { .. })) => {}
        Err(e) => return Err(e),
    }
    let consumer = rt.transport.topic_consumer(topic, StartAt::Latest).await?;
    tracing::info!(
        topic,
        "reading replies from a reply_to topic named by an ask"
    );
    rt.replies
        .listeners
        .spawn(run_replies(rt.clone(), consumer, rt.replies.closed.clone()));
    listening.insert(topic.to_owned());
    Ok(())
}

/// Reads this worker's reply topic and hands replies to whoever asked.
pub(crate) async fn run_replies(
    rt: Arc<Runtime>,
    mut consumer: Box<dyn Consumer>,
    closed: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => break,
            event = consumer.poll() => match event {
                Ok(ConsumerEvent::Messages(batch)) => {
                    for m in batch {
                        let Some((id, value)) = reply_of(&m) else {
                            tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset, "reply without correlation id ignored");
                            continue;
                        };
                        if !rt.replies.complete(&id, value) {
                            tracing::debug!(correlation_id = %id, "reply arrived after its request gave up");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reply consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

/// The correlation id and value of a reply: rill's (the id in a header), or a Faust agent's
/// (a `ReqRepResponse` record holding both).
fn reply_of(m: &Message) -> Option<(String, Bytes)> {
    if let Some(id) = m.header(CORRELATION_ID) {
        let id = String::from_utf8_lossy(id).into_owned();
        return Some((id, m.value.clone().unwrap_or_default()));
    }
    let (id, value) = crate::faust::unwrap_response(m.value.as_deref()?)?;
    Some((id, Bytes::from(value)))
}
