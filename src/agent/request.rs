//! Talking to an agent: `send`, `cast`, `ask`, and the streaming `map`/`join` family.

use super::{marker, Agent, Source};
use crate::channel::Channel;
use crate::engine::reply::{Waiting, WaitingOne, CORRELATION_ID, REPLY_TO};
use crate::error::{Error, Result};
use crate::topic::Topic;
use crate::transport::Headers;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt;
use std::future::IntoFuture;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Where a reply can be sent: a topic name, a topic, or an agent (its topic).
pub trait ReplyTo {
    /// The topic replies go to.
    fn reply_topic(&self) -> Result<String>;
}

impl ReplyTo for &str {
    fn reply_topic(&self) -> Result<String> {
        Ok((*self).to_owned())
    }
}

impl ReplyTo for String {
    fn reply_topic(&self) -> Result<String> {
        Ok(self.clone())
    }
}

impl<K: 'static, V: 'static> ReplyTo for &Topic<K, V> {
    fn reply_topic(&self) -> Result<String> {
        Ok(self.name().to_owned())
    }
}

impl<T, R, K> ReplyTo for &Agent<T, R, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    fn reply_topic(&self) -> Result<String> {
        match self.source()? {
            Source::Topic(t) => Ok(t.name().to_owned()),
            Source::Channel(c) => Err(Error::Config(format!(
                "agent {:?} reads channel {:?}: replies can only be sent to topics",
                self.name(),
                c.name()
            ))),
        }
    }
}

/// Values for [`Agent::map`] and friends: any iterator, or an async stream.
pub trait IntoValues<T, M> {
    /// The values as a stream.
    fn into_values(self) -> BoxStream<'static, T>;
}

impl<I> IntoValues<I::Item, marker::Iter> for I
where
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    I::Item: Send + 'static,
{
    fn into_values(self) -> BoxStream<'static, I::Item> {
        futures::stream::iter(self).boxed()
    }
}

impl<S> IntoValues<S::Item, marker::Async> for S
where
    S: futures::Stream + Send + 'static,
{
    fn into_values(self) -> BoxStream<'static, S::Item> {
        self.boxed()
    }
}

impl<T, R, K> Agent<T, R, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    /// Sends `value` to the agent: the mechanism under `cast` and `ask`. Set a key, partition,
    /// `reply_to` (where the agent sends what it yields for this value) and correlation id on
    /// the builder, then `.await` it.
    pub fn send(&self, value: T) -> AgentSend<'_, T, R, K> {
        AgentSend {
            agent: self,
            value,
            key: None,
            partition: None,
            reply_to: None,
            correlation_id: None,
        }
    }

    /// Sends `value` without waiting for a reply (fire and forget).
    pub fn cast(&self, value: T) -> AgentSend<'_, T, R, K> {
        self.send(value)
    }

    /// Sends `value` and waits for what the agent yields for it. Fails with
    /// [`Error::AskTimeout`] when no reply comes within the app's `ask_timeout` (or the
    /// builder's `timeout`).
    ///
    /// As with [`send`](Agent::send), the builder sets a key, a partition, the
    /// [`reply_to`](AgentAsk::reply_to) topic and the
    /// [`correlation_id`](AgentAsk::correlation_id) (Faust's
    /// `ask(value, reply_to=..., correlation_id=...)`); the reply comes back either way.
    pub fn ask(&self, value: T) -> AgentAsk<'_, T, R, K> {
        AgentAsk {
            agent: self,
            value,
            key: None,
            partition: None,
            timeout: None,
            reply_to: None,
            correlation_id: None,
        }
    }

    pub(crate) async fn deliver(
        &self,
        value: T,
        key: Option<K>,
        partition: Option<u32>,
        headers: Headers,
        wait: bool,
    ) -> Result<()> {
        let rt = self.inner.core.runtime()?;
        match self.source()? {
            Source::Topic(t) => {
                let key = key.as_ref().map(|k| t.encode_key(k)).transpose()?;
                let value = t.encode_value(&value)?;
                if wait {
                    rt.produce(&t.spec(), partition, key, Some(value), headers)
                        .await?;
                } else {
                    rt.enqueue(&t.spec(), partition, key, Some(value), headers)
                        .await?;
                }
                Ok(())
            }
            Source::Channel(c) => send_channel(&c, value, headers).await,
        }
    }

    /// Streams `values` to the agent and yields the replies as they come, in no particular
    /// order. Values are sent while replies arrive, so `values` may be endless. A request
    /// without a reply within the app's `ask_timeout` from when it was sent ends the stream
    /// with [`Error::AskTimeout`]. Dropping the stream gives up every request still waiting.
    pub fn map<I, M>(&self, values: I) -> BoxStream<'static, Result<R>>
    where
        I: IntoValues<T, M>,
        R: DeserializeOwned,
    {
        self.requests(values.into_values().map(|v| (None, v)).boxed())
            .map(|r| r.map(|(_, v)| v))
            .boxed()
    }

    /// As [`map`](Agent::map), for `(key, value)` pairs; the key is the message key.
    pub fn kvmap<I, M>(&self, items: I) -> BoxStream<'static, Result<R>>
    where
        I: IntoValues<(K, T), M>,
        R: DeserializeOwned,
    {
        self.requests(items.into_values().map(|(k, v)| (Some(k), v)).boxed())
            .map(|r| r.map(|(_, v)| v))
            .boxed()
    }

    /// Sends every value and returns the replies in the order of `values`.
    pub async fn join<I, M>(&self, values: I) -> Result<Vec<R>>
    where
        I: IntoValues<T, M>,
        R: DeserializeOwned,
    {
        collect_in_order(self.requests(values.into_values().map(|v| (None, v)).boxed())).await
    }

    /// As [`join`](Agent::join), for `(key, value)` pairs.
    pub async fn kvjoin<I, M>(&self, items: I) -> Result<Vec<R>>
    where
        I: IntoValues<(K, T), M>,
        R: DeserializeOwned,
    {
        collect_in_order(self.requests(items.into_values().map(|(k, v)| (Some(k), v)).boxed()))
            .await
    }

    /// Sends each item as a request and yields `(index, reply)` as replies arrive.
    fn requests(
        &self,
        mut items: BoxStream<'static, (Option<K>, T)>,
    ) -> BoxStream<'static, Result<(usize, R)>>
    where
        R: DeserializeOwned,
    {
        let agent = self.clone();
        async_stream::stream! {
            let rt = match agent.inner.core.runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let (tx, mut rx) = mpsc::unbounded_channel::<(String, Bytes)>();
            // The requests that wait for a reply, with their index among the values; given up
            // when the stream is dropped.
            let mut waiting: Waiting<usize> = Waiting::new(rt.clone());
            // When each request gives up: every one waits `timeout` from when it was sent, so
            // the first one sent is the first to give up.
            let mut deadlines: VecDeque<(Instant, String)> = VecDeque::new();
            let mut next_index = 0usize;
            let mut input_done = false;
            let limit = rt.settings.map_max_inflight.max(1);
            let timeout = rt.settings.ask_timeout;
            loop {
                if input_done && waiting.is_empty() {
                    break;
                }
                while deadlines.front().is_some_and(|(_, id)| !waiting.contains(id)) {
                    deadlines.pop_front();
                }
                let expiry = deadlines.front().map(|(at, _)| *at);
                tokio::select! {
                    biased;
                    reply = rx.recv(), if !waiting.is_empty() => match reply {
                        Some((id, bytes)) => {
                            if let Some(index) = waiting.remove(&id) {
                                yield decode_reply::<R>(&rt.reply_topic, &bytes).map(|v| (index, v));
                            }
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                        let id = deadlines.pop_front().map(|(_, id)| id).unwrap_or_default();
                        yield Err(Error::AskTimeout { agent: agent.name(), timeout, correlation_id: id });
                        break;
                    },
                    item = items.next(), if !input_done && waiting.len() < limit => match item {
                        Some((key, value)) => {
                            let id = rt.replies.new_id();
                            rt.replies.expect_many(id.clone(), tx.clone());
                            waiting.insert(id.clone(), next_index);
                            next_index += 1;
                            let headers = request_headers(&rt.reply_topic, &id, rt.settings.faust_ask_headers);
                            if let Err(e) = agent.deliver(value, key, None, headers, false).await {
                                yield Err(e);
                                break;
                            }
                            deadlines.push_back((Instant::now() + timeout, id));
                        }
                        None => input_done = true,
                    },
                }
            }
        }
        .boxed()
    }
}

async fn collect_in_order<R>(
    mut replies: BoxStream<'static, Result<(usize, R)>>,
) -> Result<Vec<R>> {
    let mut slots: Vec<Option<R>> = Vec::new();
    while let Some(reply) = replies.next().await {
        let (index, value) = reply?;
        if slots.len() <= index {
            slots.resize_with(index + 1, || None);
        }
        slots[index] = Some(value);
    }
    Ok(slots.into_iter().flatten().collect())
}

/// A request's return address: rill's headers, and Faust's too when `faust` (see
/// [`Settings::faust_ask_headers`](crate::Settings::faust_ask_headers)).
fn request_headers(reply_to: &str, id: &str, faust: bool) -> Headers {
    let (reply_to, id) = (
        Bytes::copy_from_slice(reply_to.as_bytes()),
        Bytes::copy_from_slice(id.as_bytes()),
    );
    let mut headers = vec![
        (REPLY_TO.to_owned(), reply_to.clone()),
        (CORRELATION_ID.to_owned(), id.clone()),
    ];
    if faust {
        headers.push((crate::faust::REPLY_TO.to_owned(), reply_to));
        headers.push((crate::faust::CORRELATION_ID.to_owned(), id));
    }
    headers
}

fn decode_reply<R: DeserializeOwned>(topic: &str, bytes: &[u8]) -> Result<R> {
    serde_json::from_slice(bytes).map_err(|e| Error::Decode {
        what: "reply",
        topic: topic.to_owned(),
        partition: 0,
        offset: -1,
        source: crate::codec::CodecError::new("json", e),
    })
}

async fn send_channel<T: Send + 'static>(c: &Channel<T>, value: T, headers: Headers) -> Result<()> {
    c.send_with(value, None, headers)
        .await
        .map_err(|_| Error::ChannelClosed {
            channel: c.name().to_owned(),
        })
}

/// A pending [`Agent::send`] or [`Agent::cast`]; `.await` it.
#[must_use = "a send does nothing until awaited"]
pub struct AgentSend<'a, T, R, K> {
    agent: &'a Agent<T, R, K>,
    value: T,
    key: Option<K>,
    partition: Option<u32>,
    reply_to: Option<Result<String>>,
    correlation_id: Option<String>,
}

impl<T, R, K> fmt::Debug for AgentSend<'_, T, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSend")
            .field("partition", &self.partition)
            .field("correlation_id", &self.correlation_id)
            .finish()
    }
}

impl<T, R, K> AgentSend<'_, T, R, K> {
    /// The message key.
    pub fn key(mut self, key: K) -> Self {
        self.key = Some(key);
        self
    }

    /// Sends to this partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Where the agent sends what it yields for this value: another agent, a topic, or a
    /// topic name.
    pub fn reply_to(mut self, target: impl ReplyTo) -> Self {
        self.reply_to = Some(target.reply_topic());
        self
    }

    /// The correlation id carried with the reply (a new one is made when `reply_to` is set
    /// without one).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

impl<'a, T, R, K> IntoFuture for AgentSend<'a, T, R, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    type Output = Result<()>;
    type IntoFuture = BoxFuture<'a, Result<()>>;

    fn into_future(self) -> Self::IntoFuture {
        async move {
            let mut headers = Vec::new();
            if let Some(reply_to) = self.reply_to {
                let reply_to = reply_to?;
                let rt = self.agent.inner.core.runtime()?;
                let id = match self.correlation_id {
                    Some(id) => id,
                    None => rt.replies.new_id(),
                };
                headers = request_headers(&reply_to, &id, rt.settings.faust_ask_headers);
            } else if let Some(id) = self.correlation_id {
                headers.push((CORRELATION_ID.to_owned(), Bytes::from(id.into_bytes())));
            }
            self.agent
                .deliver(self.value, self.key, self.partition, headers, true)
                .await
        }
        .boxed()
    }
}

/// A pending [`Agent::ask`]; `.await` it for the reply.
///
/// ```
/// use rill::prelude::*;
/// use std::time::Duration;
///
/// fn double(mut numbers: Stream<i64>) -> impl AsyncIterable<i64> {
///     stream! {
///         while let Some(n) = numbers.next().await {
///             yield n * 2;
///         }
///     }
/// }
///
/// # #[tokio::main] async fn main() -> rill::Result<()> {
/// let app = App::new("ask-doc");
/// let numbers = app.topic("numbers").value_type::<i64>();
/// let double = app.agent(double).channel(&numbers);
/// let worker = app.start().await?;
/// let reply = double
///     .ask(21)
///     .reply_to("doubled")        // the reply travels through this topic
///     .correlation_id("order-17") // and carries this id
///     .timeout(Duration::from_secs(5))
///     .await?;
/// assert_eq!(reply, 42);
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
#[must_use = "an ask does nothing until awaited"]
pub struct AgentAsk<'a, T, R, K> {
    agent: &'a Agent<T, R, K>,
    value: T,
    key: Option<K>,
    partition: Option<u32>,
    timeout: Option<Duration>,
    reply_to: Option<Result<String>>,
    correlation_id: Option<String>,
}

impl<T, R, K> fmt::Debug for AgentAsk<'_, T, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentAsk")
            .field("partition", &self.partition)
            .field("timeout", &self.timeout)
            .field("reply_to", &self.reply_to.as_ref().map(|r| r.as_ref().ok()))
            .field("correlation_id", &self.correlation_id)
            .finish()
    }
}

impl<T, R, K> AgentAsk<'_, T, R, K> {
    /// The message key.
    pub fn key(mut self, key: K) -> Self {
        self.key = Some(key);
        self
    }

    /// Sends to this partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// How long to wait for the reply (default: the app's `ask_timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The topic the agent sends its reply to (default: this worker's own reply topic): a
    /// topic name, a topic, or an agent (its topic; an agent reading a channel is an error
    /// when the ask is awaited).
    ///
    /// The ask still waits for the reply, on that topic, as Faust's `ask(reply_to=...)` does:
    /// the first time a worker names a topic here, it creates the topic if it is missing (with
    /// the app's `topic_partitions`) and reads it, from its end, outside any consumer group,
    /// until the worker stops. Everyone else reading the topic (an agent, another service)
    /// sees the reply too, with the request's correlation id in its `rill-correlation-id`
    /// header.
    pub fn reply_to(mut self, target: impl ReplyTo) -> Self {
        self.reply_to = Some(target.reply_topic());
        self
    }

    /// The correlation id the request and its reply carry (default: a new id unique to this
    /// worker). Awaiting the ask fails with [`Error::Config`] while another ask of this worker
    /// with the same id waits for its reply.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

impl<'a, T, R, K> IntoFuture for AgentAsk<'a, T, R, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    type Output = Result<R>;
    type IntoFuture = BoxFuture<'a, Result<R>>;

    fn into_future(self) -> Self::IntoFuture {
        async move {
            let rt = self.agent.inner.core.runtime()?;
            let reply_topic = match self.reply_to {
                Some(topic) => topic?,
                None => rt.reply_topic.clone(),
            };
            crate::engine::reply::listen(&rt, &reply_topic).await?;
            let id = self.correlation_id.unwrap_or_else(|| rt.replies.new_id());
            // Given up when this future is dropped, whether it was sent or not.
            let (waiting, reply) = WaitingOne::new(rt.clone(), id)?;
            let headers = request_headers(&reply_topic, &waiting.id, rt.settings.faust_ask_headers);
            self.agent
                .deliver(self.value, self.key, self.partition, headers, false)
                .await?;
            let timeout = self.timeout.unwrap_or(rt.settings.ask_timeout);
            match tokio::time::timeout(timeout, reply).await {
                Ok(Ok(bytes)) => decode_reply(&reply_topic, &bytes),
                Ok(Err(_)) => Err(Error::ShuttingDown {
                    app: rt.app_id.to_string(),
                }),
                Err(_) => Err(Error::AskTimeout {
                    agent: self.agent.name(),
                    timeout,
                    correlation_id: waiting.id.clone(),
                }),
            }
        }
        .boxed()
    }
}
