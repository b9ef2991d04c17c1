//! Streams: what an agent iterates over, and the operators that reshape it.

pub(crate) mod bad_input;

use crate::codec::{Codec, Json};
use crate::engine::ack::Acks;
use crate::engine::queue::{Delivery, Queue};
use crate::engine::reply::REPLY_TO;
use crate::engine::Runtime;
use crate::faust;
use crate::topic::Topic;
use crate::transport::{Message, TopicSpec};
use bad_input::Rejected;
use bytes::Bytes;
use futures::future::{BoxFuture, Either, FutureExt, Ready};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// A value moving through a stream with the event it came from and the acks it holds.
pub(crate) struct Item<T> {
    pub(crate) value: T,
    pub(crate) meta: Arc<Message>,
    pub(crate) acks: Acks,
}

/// Deliveries an actor took from a queue but has not handed to its agent yet. They outlive a
/// failing agent body: the restarted body continues with them, so a failure loses nothing.
pub(crate) type Buffer = Arc<Mutex<std::collections::VecDeque<Delivery>>>;

/// An actor's buffers, one per queue it reads (its source and internal topics), kept across
/// restarts of the agent body.
#[derive(Default)]
pub(crate) struct Buffers(Mutex<std::collections::HashMap<String, Buffer>>);

impl Buffers {
    pub(crate) fn get(&self, queue: &str) -> Buffer {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(queue.to_owned())
            .or_default()
            .clone()
    }

    /// Whether every buffer is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .all(|b| b.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
    }
}

/// Reads a queue one delivery at a time. The deliveries it holds go back to the actor's
/// buffer when it is dropped (when an agent body fails), so the restarted body gets them.
pub(crate) struct QueueReader {
    queue: Pin<Box<Queue>>,
    local: std::collections::VecDeque<Delivery>,
    shared: Buffer,
    /// Told each time a chunk is taken: the dispatcher may have chunks waiting for room.
    room: Arc<Runtime>,
}

impl QueueReader {
    pub(crate) fn new(queue: Queue, shared: Buffer, rt: Arc<Runtime>) -> Self {
        let local = std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()));
        Self {
            queue: Box::pin(queue),
            local,
            shared,
            room: rt,
        }
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        if let Some(d) = self.local.pop_front() {
            return Poll::Ready(Some(d));
        }
        match futures::Stream::poll_next(self.queue.as_mut(), cx) {
            Poll::Ready(Some(chunk)) => {
                self.room.room.notify_one();
                self.local.extend(chunk);
                Poll::Ready(self.local.pop_front())
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The next delivery.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a received chunk is kept by the reader.
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }
}

impl futures::Stream for QueueReader {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_delivery(cx)
    }
}

impl Drop for QueueReader {
    fn drop(&mut self) {
        if self.local.is_empty() {
            return;
        }
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(d) = self.local.pop_back() {
            shared.push_front(d);
        }
    }
}

/// What one agent instance (actor) shares with the streams it iterates.
pub(crate) struct ActorCtx {
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) agent: Arc<str>,
    /// Main topic of the agent's source (or the channel's name).
    pub(crate) source: Arc<str>,
    /// Partition count of the source, used for internal topics derived from it.
    pub(crate) source_partitions: u32,
    /// Number of actors of the agent.
    pub(crate) concurrency: usize,
    /// The actor's buffers, which outlive this body.
    pub(crate) buffers: Arc<Buffers>,
    pub(crate) current: Mutex<Option<Arc<Message>>>,
    /// The agent's dead-letter topic, if it sends bad input there.
    pub(crate) dead_letter: Option<TopicSpec>,
}

impl ActorCtx {
    pub(crate) fn current(&self) -> Option<Arc<Message>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_current(&self, meta: Option<Arc<Message>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = meta;
    }
}

/// What decoding a delivery gives: the item, or at once a future that handles the message as
/// bad input (so the valid path costs no allocation).
pub(crate) type Decoded<T> = Either<Ready<Option<Item<T>>>, BoxFuture<'static, Option<Item<T>>>>;

/// The item, or the rejection of a message the agent cannot read (see [`bad_input::reject`]).
fn accept<T: 'static>(ctx: &Arc<ActorCtx>, item: Result<Item<T>, Rejected>) -> Decoded<T> {
    match item {
        Ok(item) => Either::Left(futures::future::ready(Some(item))),
        Err(r) => Either::Right(bad_input::reject(ctx.clone(), r).map(|()| None).boxed()),
    }
}

/// Decodes a delivery's value. A message larger than `max_payload_bytes` or that the codec
/// cannot decode is bad input: logged, counted, skipped or dead-lettered, then acked.
pub(crate) fn decode_delivery<T: 'static>(
    ctx: &Arc<ActorCtx>,
    codec: &dyn Codec<T>,
    mut d: Delivery,
) -> Decoded<T> {
    let decoded = match bad_input::oversize(&d.msg, ctx.runtime.settings.max_payload_bytes) {
        Some(error) => Err(Rejected {
            message: d.msg,
            acks: Acks::One(d.ack),
            part: "message",
            codec: codec.name(),
            error,
        }),
        None => match codec.decode(faust_request(&mut d).as_deref().unwrap_or(&[])) {
            Ok(value) => Ok(Item {
                value,
                meta: d.msg,
                acks: Acks::One(d.ack),
            }),
            Err(e) => Err(Rejected::undecodable(d.msg, Acks::One(d.ack), "value", e)),
        },
    };
    accept(ctx, decoded)
}

/// The value to decode: the message's own, or, when it is a Faust `ReqRepRequest` (a Faust
/// `ask` without reply headers), the value inside it. The message then carries the request's
/// address as Faust's reply headers, as if it had come with them, so the agent's reply goes
/// where the Faust asker waits.
fn faust_request(d: &mut Delivery) -> Option<Bytes> {
    let value = d.msg.value.clone()?;
    if d.msg.header(REPLY_TO).is_some() {
        return Some(value);
    }
    let Some(req) = faust::unwrap_request(&value) else {
        return Some(value);
    };
    let msg = Arc::make_mut(&mut d.msg);
    msg.headers.push((
        faust::REPLY_TO.to_owned(),
        Bytes::from(req.reply_to.into_bytes()),
    ));
    msg.headers.push((
        faust::CORRELATION_ID.to_owned(),
        Bytes::from(req.correlation_id.into_bytes()),
    ));
    let inner = Bytes::from(req.value);
    msg.value = Some(inner.clone());
    Some(inner)
}

/// An event: a value with the metadata of the message it came from.
#[derive(Debug, Clone)]
pub struct Event<T> {
    /// The decoded value.
    pub value: T,
    message: Arc<Message>,
}

impl<T> Event<T> {
    /// Topic (or channel name) the event came from.
    pub fn topic(&self) -> &str {
        &self.message.topic
    }

    /// Partition it came from.
    pub fn partition(&self) -> u32 {
        self.message.partition
    }

    /// Offset in the partition.
    pub fn offset(&self) -> i64 {
        self.message.offset
    }

    /// Timestamp in milliseconds since the Unix epoch.
    pub fn timestamp(&self) -> i64 {
        self.message.timestamp
    }

    /// The encoded key, if the message had one.
    pub fn key(&self) -> Option<&Bytes> {
        self.message.key.as_ref()
    }

    /// Every header of the message.
    pub fn headers(&self) -> &[(String, Bytes)] {
        &self.message.headers
    }

    /// The whole message, including the encoded value.
    pub fn message(&self) -> &Message {
        &self.message
    }
}

/// A key for [`Stream::group_by`]: a name (part of the repartition topic's name) and a function
/// computing the new key from a value. [`field!`](crate::field) builds one from a field.
///
/// As Faust's `group_by(key, name=..., topic=..., partitions=...)`, the repartition topic can
/// be named outright ([`topic`](GroupBy::topic)) and given its own partition count
/// ([`partitions`](GroupBy::partitions)), and its keys a serializer
/// ([`key_serializer`](GroupBy::key_serializer)): what a rill agent needs to share a
/// repartition topic with a Faust agent (see the README's section on moving a Faust app to
/// rill).
pub struct GroupBy<T, K> {
    name: String,
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
    topic: Option<String>,
    partitions: Option<u32>,
    key_serializer: Option<String>,
}

impl<T, K> fmt::Debug for GroupBy<T, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupBy")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("key_serializer", &self.key_serializer)
            .finish()
    }
}

impl<T, K> GroupBy<T, K> {
    /// Group by `key`, naming the grouping `name`.
    pub fn new(name: impl Into<String>, key: impl Fn(&T) -> K + Send + Sync + 'static) -> Self {
        Self {
            name: name.into(),
            key: Arc::new(key),
            topic: None,
            partitions: None,
            key_serializer: None,
        }
    }

    /// The grouping's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names the repartition topic outright (Faust's `group_by(..., topic=...)`) instead of
    /// `<app id>-<source topic>-<grouping name>-repartition`. A Faust agent's repartition
    /// topic is `<agent name>-<source topic>-<grouping name>-repartition`, its agent name
    /// being `module.function` unless the agent was given a `name`:
    ///
    /// ```
    /// # use rill::prelude::*;
    /// # #[derive(Clone, Serialize, Deserialize)] struct Word { text: String }
    /// let by_text = field!(Word.text)
    ///     .topic("wc.count-words-Word.text-repartition")
    ///     .partitions(8)
    ///     .key_serializer("raw");
    /// assert_eq!(by_text.name(), "Word.text");
    /// ```
    pub fn topic(mut self, name: impl Into<String>) -> Self {
        self.topic = Some(name.into());
        self
    }

    /// The repartition topic's partition count (Faust's `group_by(..., partitions=...)`); by
    /// default the source topic's.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// The serializer of the new keys, by name (one of
    /// [`SERIALIZERS`](crate::codec::SERIALIZERS)). By default the app's
    /// [`Settings::key_serializer`](crate::Settings::key_serializer) where it can carry the
    /// key's type (as Faust derives the repartition topic's serializer from the app's), else
    /// JSON. Faust's default key serializer is `raw`, so a `String` key shared with Faust needs
    /// `"raw"` (its UTF-8 bytes), unless the Faust app sets another. A name that cannot carry
    /// the key's type makes every forwarded value an encoding error naming the topic.
    pub fn key_serializer(mut self, name: impl Into<String>) -> Self {
        self.key_serializer = Some(name.into());
        self
    }
}

/// Group by a field of a record, as Faust's `group_by(Model.field)`:
/// `stream.group_by(field!(BankTransfer.account_id))`. The grouping is named
/// `BankTransfer.account_id`.
#[macro_export]
macro_rules! field {
    ($ty:ident . $field:ident) => {
        $crate::GroupBy::new(
            concat!(stringify!($ty), ".", stringify!($field)),
            |value: &$ty| value.$field.clone(),
        )
    };
}

/// The stream an agent iterates: typed values from its topic or channel, in order within each
/// partition.
///
/// Iterate it with `while let Some(value) = stream.next().await`. Asking for the next value
/// marks the previous one processed (acked), so its offset can be committed. Operators
/// ([`group_by`](Stream::group_by), [`filter`](Stream::filter), [`take`](Stream::take), ...)
/// return new streams over the same events.
///
/// `K` is the key type of the source topic (raw bytes unless the topic says otherwise); it only
/// matters to [`items`](Stream::items).
///
/// ```
/// use rill::prelude::*;
/// use std::sync::{Arc, Mutex};
///
/// # #[tokio::main] async fn main() -> rill::Result<()> {
/// let app = App::new("evens");
/// let numbers = app.topic("numbers").value_type::<u32>();
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let found = seen.clone();
/// app.agent(move |numbers: Stream<u32>| {
///     let found = found.clone();
///     async move {
///         // Only the even ones; each value read marks the one before it processed.
///         let mut evens = numbers.filter(|n| n % 2 == 0);
///         while let Some(n) = evens.next().await {
///             found.lock().unwrap().push(n);
///         }
///     }
/// })
/// .channel(&numbers);
///
/// let worker = app.start().await?;
/// for n in 1..=6 {
///     numbers.send(n).partition(0).await?;
/// }
/// while seen.lock().unwrap().len() < 3 {
///     tokio::task::yield_now().await;
/// }
/// assert_eq!(*seen.lock().unwrap(), vec![2, 4, 6]);
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Stream<T, K = Bytes> {
    inner: BoxStream<'static, Item<T>>,
    ctx: Arc<ActorCtx>,
    key_codec: Option<Arc<dyn Codec<K>>>,
    held: Acks,
    /// Set while the agent is in the middle of the last item handed out; dropped after
    /// `held` (fields drop in order), so the item is acked before the barrier sees it done.
    entered: Option<InBarrier>,
}

/// An actor in the middle of an event (see [`crate::engine::ack::Barrier`]); leaves when dropped.
struct InBarrier(Arc<Runtime>);

impl Drop for InBarrier {
    fn drop(&mut self) {
        self.0.barrier.leave();
    }
}

impl<T, K> fmt::Debug for Stream<T, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("agent", &self.ctx.agent)
            .field("source", &self.ctx.source)
            .finish()
    }
}

impl<T: Send + 'static, K: 'static> Stream<T, K> {
    pub(crate) fn new(
        inner: BoxStream<'static, Item<T>>,
        ctx: Arc<ActorCtx>,
        key_codec: Option<Arc<dyn Codec<K>>>,
    ) -> Self {
        Self {
            inner,
            ctx,
            key_codec,
            held: Acks::None,
            entered: None,
        }
    }

    /// The next value, or `None` once the worker stops. Acks the previous value.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a value is only taken from the stream when the future completes.
    pub async fn next(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_value(cx)).await
    }

    fn poll_value(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // The last item is done: acked, then out of the barrier (a commit waiting at it takes
        // its offset).
        self.held = Acks::None;
        self.entered = None;
        // The next item is taken only between two commits (see `engine::ack::Barrier`); while the
        // agent waits for it, it holds no commit back.
        if self.ctx.runtime.barrier.poll_enter(cx).is_pending() {
            return Poll::Pending;
        }
        let step = InBarrier(self.ctx.runtime.clone());
        let item = match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(item)) => item,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        self.entered = Some(step);
        self.ctx.set_current(Some(item.meta));
        self.held = item.acks;
        Poll::Ready(Some(item.value))
    }

    /// The event the last value came from: topic, partition, offset, timestamp, key, headers.
    pub fn current_event(&self) -> Option<Arc<Message>> {
        self.ctx.current()
    }

    /// Only the values for which `predicate` is true; the others are acked and dropped.
    pub fn filter(self, mut predicate: impl FnMut(&T) -> bool + Send + 'static) -> Stream<T, K> {
        let (inner, key_codec) = (self.inner, self.key_codec);
        let inner = inner
            .filter(move |item| std::future::ready(predicate(&item.value)))
            .boxed();
        Stream::new(inner, self.ctx, key_codec)
    }

    /// Each value transformed by `f`, keeping its event.
    pub fn map<U: Send + 'static>(
        self,
        mut f: impl FnMut(T) -> U + Send + 'static,
    ) -> Stream<U, K> {
        let key_codec = self.key_codec.clone();
        let inner = self.inner;
        let inner = inner
            .map(move |item| Item {
                value: f(item.value),
                meta: item.meta,
                acks: item.acks,
            })
            .boxed();
        Stream::new(inner, self.ctx, key_codec)
    }

    /// Values numbered from 0: `(index, value)`.
    pub fn enumerate(self) -> Stream<(usize, T), K> {
        let mut n = 0usize;
        self.map(move |v| {
            let i = n;
            n += 1;
            (i, v)
        })
    }

    /// `(key, value)` pairs, the key decoded with the source topic's key codec (`None` when the
    /// message has no key). A key that cannot be decoded is bad input, as an undecodable value
    /// is (see [`BadInput`](crate::BadInput)).
    pub fn items(self) -> Stream<(Option<K>, T), K>
    where
        K: Send + Sync,
    {
        let codec = self.key_codec.clone();
        let ctx = self.ctx.clone();
        let inner = self.inner;
        let inner = inner
            .filter_map(move |item| {
                let key = match (&item.meta.key, &codec) {
                    (Some(bytes), Some(codec)) => match codec.decode(bytes) {
                        Ok(k) => Some(k),
                        Err(e) => {
                            let r = Rejected::undecodable(item.meta, item.acks, "key", e);
                            return accept(&ctx, Err(r));
                        }
                    },
                    _ => None,
                };
                accept(
                    &ctx,
                    Ok(Item {
                        value: (key, item.value),
                        meta: item.meta,
                        acks: item.acks,
                    }),
                )
            })
            .boxed();
        let key_codec = self.key_codec;
        Stream::new(inner, self.ctx, key_codec)
    }

    /// Values with the metadata of their event (topic, partition, offset, timestamp, key,
    /// headers).
    pub fn events(self) -> Stream<Event<T>, K> {
        let key_codec = self.key_codec.clone();
        let inner = self.inner;
        let inner = inner
            .map(|item| Item {
                value: Event {
                    value: item.value,
                    message: item.meta.clone(),
                },
                meta: item.meta,
                acks: item.acks,
            })
            .boxed();
        Stream::new(inner, self.ctx, key_codec)
    }

    /// Batches of up to `max` values, each batch handed over as soon as it is full or `within`
    /// has passed since its first value. A batch's events are acked together when the next
    /// batch is asked for.
    pub fn take(self, max: usize, within: Duration) -> Stream<Vec<T>, K> {
        let max = max.max(1);
        let key_codec = self.key_codec.clone();
        let mut upstream = self.inner;
        let inner = async_stream::stream! {
            loop {
                let Some(first) = upstream.next().await else { break };
                let deadline = tokio::time::Instant::now() + within;
                let mut values = Vec::with_capacity(max.min(1024));
                let mut acks = Vec::with_capacity(max.min(1024));
                let mut meta = first.meta;
                values.push(first.value);
                acks.push(first.acks);
                let mut ended = false;
                while values.len() < max {
                    match tokio::time::timeout_at(deadline, upstream.next()).await {
                        Ok(Some(item)) => {
                            values.push(item.value);
                            acks.push(item.acks);
                            meta = item.meta;
                        }
                        Ok(None) => {
                            ended = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                yield Item { value: values, meta, acks: Acks::Many(acks) };
                if ended {
                    break;
                }
            }
        }
        .boxed();
        Stream::new(inner, self.ctx, key_codec)
    }

    /// Sends every value on to `topics` as well (same key, value encoded by each topic's
    /// codec), and yields it unchanged.
    pub fn echo<K2>(self, topics: &[&Topic<K2, T>]) -> Stream<T, K>
    where
        K2: Send + Sync + 'static,
        T: Sync,
    {
        let topics: Vec<Topic<K2, T>> = topics.iter().map(|t| (*t).clone()).collect();
        let ctx = self.ctx.clone();
        let key_codec = self.key_codec.clone();
        let mut upstream = self.inner;
        let inner = async_stream::stream! {
            while let Some(item) = upstream.next().await {
                for topic in &topics {
                    forward(&ctx, &topic.spec(), item.meta.key.clone(), topic.encode_value(&item.value), Acks::None).await;
                }
                yield item;
            }
        }
        .boxed();
        Stream::new(inner, self.ctx, key_codec)
    }

    /// Sends every value to `topic` (same key) and continues with the stream read back from
    /// that topic: the rest of the agent sees the topic's partitioning.
    pub fn through<K2>(self, topic: &Topic<K2, T>) -> Stream<T, K2>
    where
        K2: Send + Sync + 'static,
        T: Sync,
    {
        let spec = topic.spec();
        let encoder = topic.clone();
        let value_codec = topic.value_codec.clone();
        let key_codec = Some(topic.key_codec.clone());
        let Stream { inner, ctx, .. } = self;
        let inner = relay(
            ctx.clone(),
            inner,
            spec,
            move |item: &Item<T>| (item.meta.key.clone(), encoder.encode_value(&item.value)),
            value_codec,
        );
        Stream::new(inner, ctx, key_codec)
    }

    /// Repartitions the stream by a new key: every value is sent to the internal topic
    /// `<app id>-<source topic>-<grouping name>-repartition` (or the one the key names with
    /// [`GroupBy::topic`]) keyed by `key`, and the rest of the agent reads it back from there,
    /// so all values with the same key reach the same agent instance, in order.
    pub fn group_by<NK>(self, key: GroupBy<T, NK>) -> Stream<T, NK>
    where
        T: Serialize + DeserializeOwned + Sync,
        NK: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let ctx = self.ctx.clone();
        let name = key.topic.clone().unwrap_or_else(|| {
            format!(
                "{}-{}-{}-repartition",
                ctx.runtime.app_id, ctx.source, key.name
            )
        });
        let spec = TopicSpec {
            name,
            partitions: key.partitions.unwrap_or(ctx.source_partitions),
            replication_factor: ctx.runtime.settings.topic_replication_factor,
            compacted: false,
            retention: Default::default(),
        };
        let key_codec: Arc<dyn Codec<NK>> = match &key.key_serializer {
            Some(named) => match crate::codec::by_name::<NK>(named) {
                Ok(codec) => codec,
                Err(error) => Arc::new(crate::codec::Unusable { error }),
            },
            None => ctx
                .runtime
                .settings
                .key_serializer
                .as_deref()
                .and_then(|named| crate::codec::by_name::<NK>(named).ok())
                .unwrap_or_else(|| Arc::new(Json::<NK>::new())),
        };
        let value_codec: Arc<dyn Codec<T>> = Arc::new(Json::<T>::new());
        let (kc, vc, spec_name) = (key_codec.clone(), value_codec.clone(), spec.name.clone());
        let key_fn = key.key;
        let inner = relay(
            ctx.clone(),
            self.inner,
            spec,
            move |item: &Item<T>| {
                let key = (key_fn)(&item.value);
                let key = kc.encode(&key).map_err(|source| crate::Error::Encode {
                    what: "key",
                    topic: spec_name.clone(),
                    source,
                });
                match key {
                    Ok(k) => (
                        Some(k),
                        vc.encode(&item.value)
                            .map_err(|source| crate::Error::Encode {
                                what: "value",
                                topic: spec_name.clone(),
                                source,
                            }),
                    ),
                    Err(e) => (None, Err(e)),
                }
            },
            value_codec,
        );
        Stream::new(inner, ctx, Some(key_codec))
    }
}

impl<T: Send + 'static, K: 'static> futures::Stream for Stream<T, K> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().poll_value(cx)
    }
}

/// Sends one record on behalf of a stream operator, then acks the event it came from
/// (`acks`), as one step between two commits (see [`crate::engine::ack::Barrier`]). A value that
/// cannot be encoded is logged and the event counts as processed; a record the transport
/// cannot take is a failed output (see [`Runtime::output_failed`](crate::engine::Runtime)).
async fn forward(
    ctx: &ActorCtx,
    spec: &TopicSpec,
    key: Option<Bytes>,
    value: crate::Result<Bytes>,
    acks: Acks,
) {
    let _step = ctx.runtime.barrier.enter().await;
    let result = match value {
        Ok(v) => {
            ctx.runtime
                .enqueue(spec, None, key, Some(v), Vec::new())
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let what = format!(
            "agent {} cannot forward a value to {}",
            ctx.agent, spec.name
        );
        if !ctx.runtime.output_error(&what, &e) {
            tracing::error!(agent = %ctx.agent, topic = %spec.name, error = %e, "cannot forward value");
        }
    }
    drop(acks);
}

/// The next delivery read back from a relay's topic; `None` once there is none to come.
async fn next_relayed(reader: &mut Option<QueueReader>) -> Option<Delivery> {
    match reader {
        Some(reader) => reader.next().await,
        None => None,
    }
}

/// Forwards every upstream item to `spec`'s topic and yields what is read back from it.
fn relay<T, U>(
    ctx: Arc<ActorCtx>,
    mut upstream: BoxStream<'static, Item<T>>,
    spec: TopicSpec,
    encode: impl Fn(&Item<T>) -> (Option<Bytes>, crate::Result<Bytes>) + Send + 'static,
    value_codec: Arc<dyn Codec<U>>,
) -> BoxStream<'static, Item<U>>
where
    T: Send + 'static,
    U: Send + 'static,
{
    async_stream::stream! {
        let mut reader = match ctx.runtime.subscribe(&ctx.agent, ctx.concurrency, spec.clone()).await {
            Ok(rx) => Some(QueueReader::new(rx, ctx.buffers.get(&spec.name), ctx.runtime.clone())),
            // The worker stopped before the topic was read: what is upstream is still
            // forwarded, and read back after a restart.
            Err(crate::Error::ShuttingDown { .. }) => None,
            Err(e) => {
                tracing::error!(agent = %ctx.agent, topic = %spec.name, error = %e, "cannot subscribe to internal topic");
                return;
            }
        };
        let mut upstream_done = false;
        let mut relayed_done = reader.is_none();
        // Ends when both sides are done: at shutdown the internal queue closes first, and what
        // is still upstream is forwarded (and read back after a restart).
        while !(upstream_done && relayed_done) {
            tokio::select! {
                biased;
                d = next_relayed(&mut reader), if !relayed_done => match d {
                    Some(d) => if let Some(item) = decode_delivery(&ctx, &*value_codec, d).await {
                        yield item;
                    },
                    None => relayed_done = true,
                },
                item = upstream.next(), if !upstream_done => match item {
                    Some(item) => {
                        let (key, value) = encode(&item);
                        forward(&ctx, &spec, key, value, item.acks).await;
                    }
                    None => upstream_done = true,
                },
            }
        }
    }
    .boxed()
}
