//! Running an agent: its actors, their restarts, and what happens to yielded values.

use super::{source_specs, AgentInner, Offered, Sink, Source};
use crate::codec::exact_bytes;
use crate::engine::queue::Queue;
use crate::engine::reply::{CORRELATION_ID, REPLY_TO};
use crate::engine::Runtime;
use crate::error::{BoxError, Error, Result};
use crate::faust;
use crate::metrics::AgentInfo;
use crate::settings::Settings;
use crate::stream::{decode_delivery, ActorCtx, Buffers, Item, QueueReader, Stream};
use crate::transport::{Message, TopicSpec};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// An agent with its types erased, as the app keeps it.
pub(crate) trait AgentRunner: Send + Sync {
    fn name(&self) -> String;
    /// Number of actors.
    fn concurrency(&self) -> usize;
    /// The topics the agent reads (none for a channel).
    fn topics(&self) -> Result<Vec<TopicSpec>>;
    /// The agent's dead-letter topic, if it sends bad input there.
    fn dead_letter(&self, settings: &Settings) -> Result<Option<TopicSpec>>;
    /// Starts the agent's actors. `queue` carries the records of its topics.
    fn start(&self, rt: &Arc<Runtime>, actors: &TaskTracker, queue: Option<Queue>) -> Result<()>;
    /// What the agent reads and where its values go (the `agents` command, the status page).
    fn info(&self) -> Result<AgentInfo>;
    /// Encodes a JSON value as a value of the agent's topic (the `send` command): an error if
    /// it is not a value the agent reads, or the agent reads a channel.
    fn encode_json(&self, value: &serde_json::Value) -> Result<Bytes, String>;
    /// Encodes a key typed on the command line with the key codec of the agent's topic.
    fn encode_key(&self, key: &str) -> Result<Bytes, String>;
}

impl<T, R, K> AgentRunner for super::Agent<T, R, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    fn name(&self) -> String {
        super::Agent::name(self)
    }

    fn concurrency(&self) -> usize {
        self.inner.config().concurrency
    }

    fn topics(&self) -> Result<Vec<TopicSpec>> {
        Ok(source_specs(&self.source()?))
    }

    fn dead_letter(&self, settings: &Settings) -> Result<Option<TopicSpec>> {
        self.dead_letter_spec(settings)
    }

    fn start(&self, rt: &Arc<Runtime>, actors: &TaskTracker, queue: Option<Queue>) -> Result<()> {
        let dead_letter = self.dead_letter_spec(&rt.settings)?;
        let source = self.source()?;
        if let Source::Topic(topic) = &source {
            topic.check_serializers()?;
        }
        let _ = self.inner.resolved.set(source.clone());
        let (name, concurrency, sinks) = {
            let c = self.inner.config();
            (c.name.clone(), c.concurrency, Arc::new(c.sinks.clone()))
        };
        let (source_name, source_partitions) = match &source {
            Source::Topic(t) => {
                let spec = t.spec();
                (t.name().to_owned(), spec.partitions)
            }
            Source::Channel(c) => (c.name().to_owned(), rt.settings.topic_partitions),
        };
        let name: Arc<str> = Arc::from(name);
        let events_out = crate::metrics::events_out(&rt.app_id, &name, &source_name);
        tracing::info!(agent = %name, source = %source_name, concurrency, sinks = sinks.len(), "starting agent");
        let mut ready = Vec::with_capacity(concurrency);
        for index in 0..concurrency {
            let actor = Actor {
                agent: self.inner.clone(),
                rt: rt.clone(),
                name: name.clone(),
                source: source.clone(),
                source_name: Arc::from(source_name.as_str()),
                source_partitions,
                concurrency,
                queue: queue.clone(),
                buffers: Arc::new(Buffers::default()),
                sinks: sinks.clone(),
                index,
                dead_letter: dead_letter.clone(),
                events_out: events_out.clone(),
            };
            // Each actor's function is called here, so that an agent with concurrency > 1
            // taking a writable table handle is refused before anything runs.
            let (first, writable) = crate::table::writable_clones(|| actor.instantiate());
            if concurrency > 1 {
                if let Some(table) = writable.into_iter().next() {
                    return Err(Error::Table {
                        table,
                        message: format!(
                            "agent {name:?} has concurrency {concurrency} and takes a writable \
                             handle on this table; an agent with concurrency > 1 can only read \
                             tables (its actors would race on the same keys): give it \
                             `table.reader()`, or run it with concurrency 1"
                        ),
                    });
                }
            }
            ready.push((actor, first));
        }
        for (actor, first) in ready {
            let handle = actors.spawn(actor.run(first));
            rt.track_actor(handle.abort_handle());
        }
        Ok(())
    }

    fn info(&self) -> Result<AgentInfo> {
        let source = self.source()?;
        let c = self.inner.config();
        Ok(AgentInfo {
            name: c.name.clone(),
            topics: source_specs(&source).into_iter().map(|s| s.name).collect(),
            channel: match &source {
                Source::Channel(ch) => Some(ch.name().to_owned()),
                Source::Topic(_) => None,
            },
            concurrency: c.concurrency,
            sinks: c.sinks.iter().map(|s| s.describe()).collect(),
        })
    }

    fn encode_json(&self, value: &serde_json::Value) -> Result<Bytes, String> {
        let name = self.name();
        let Ok(Source::Topic(topic)) = self.source() else {
            return Err(format!("agent {name:?} does not read a topic"));
        };
        let value = T::deserialize(value)
            .map_err(|e| format!("{value} is not a value agent {name:?} reads: {e}"))?;
        topic
            .value_codec
            .encode(&value)
            .map_err(|e| format!("cannot encode the value for agent {name:?}: {e}"))
    }

    fn encode_key(&self, key: &str) -> Result<Bytes, String> {
        let name = self.name();
        let Ok(Source::Topic(topic)) = self.source() else {
            return Err(format!("agent {name:?} does not read a topic"));
        };
        topic
            .key_codec
            .encode_text(key)
            .map_err(|e| format!("{key:?} is not a key agent {name:?} reads: {e}"))
    }
}

struct Actor<T, R, K> {
    agent: Arc<AgentInner<T, R, K>>,
    rt: Arc<Runtime>,
    name: Arc<str>,
    source: Source<T, K>,
    source_name: Arc<str>,
    source_partitions: u32,
    concurrency: usize,
    queue: Option<Queue>,
    buffers: Arc<Buffers>,
    sinks: Arc<Vec<Arc<dyn Sink<R>>>>,
    index: usize,
    dead_letter: Option<TopicSpec>,
    /// Counts the values the agent yields.
    events_out: metrics::Counter,
}

/// One run of an actor: its context and what the agent's function returned.
type Instance<R> = (Arc<ActorCtx>, BoxStream<'static, Result<R, BoxError>>);

enum Outcome {
    Finished,
    Failed(BoxError),
    Panicked(String),
}

impl<T, R, K> Actor<T, R, K>
where
    T: Send + 'static,
    R: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    /// Calls the agent's function on a new stream: one run of the actor, not started yet.
    fn instantiate(&self) -> Instance<R> {
        let ctx = Arc::new(ActorCtx {
            runtime: self.rt.clone(),
            agent: self.name.clone(),
            source: self.source_name.clone(),
            source_partitions: self.source_partitions,
            concurrency: self.concurrency,
            buffers: self.buffers.clone(),
            current: Mutex::new(None),
            dead_letter: self.dead_letter.clone(),
        });
        let stream = self.stream(&ctx);
        let out = (self.agent.fun)(stream);
        (ctx, out)
    }

    async fn run(self, first: Instance<R>) {
        let mut backoff = Duration::from_millis(10);
        let mut next = Some(first);
        loop {
            let (ctx, mut out) = match next.take() {
                Some(instance) => instance,
                None => self.instantiate(),
            };
            let outcome = crate::table::ACTOR
                .scope(
                    ctx.clone(),
                    AssertUnwindSafe(self.drive(&mut out, &ctx)).catch_unwind(),
                )
                .await;
            drop(out);
            let outcome = match outcome {
                Ok(Ok(())) => Outcome::Finished,
                Ok(Err(e)) => Outcome::Failed(e),
                Err(panic) => Outcome::Panicked(panic_message(panic)),
            };
            let exhausted = self.exhausted();
            match outcome {
                Outcome::Finished if exhausted => break,
                Outcome::Finished => {
                    tracing::warn!(agent = %self.name, actor = self.index, "agent returned while its stream was still open; restarting it");
                }
                Outcome::Failed(e) => self.report(&ctx, &e.to_string(), "raised an error"),
                Outcome::Panicked(msg) => self.report(&ctx, &msg, "panicked"),
            }
            if exhausted {
                break;
            }
            // A body that fails before it reads anything would otherwise spin.
            if ctx.current().is_none() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            } else {
                backoff = Duration::from_millis(10);
            }
        }
        tracing::debug!(agent = %self.name, actor = self.index, "actor stopped");
    }

    fn report(&self, ctx: &ActorCtx, error: &str, what: &str) {
        let count = self.rt.stats.agent_error(
            &self.name,
            match ctx.current() {
                Some(m) => format!(
                    "{what} at {}[{}]@{}: {error}",
                    m.topic, m.partition, m.offset
                ),
                None => format!("{what}: {error}"),
            },
        );
        let topic = ctx.current().map(|m| m.topic.clone());
        crate::metrics::agent_error(
            &self.rt.app_id,
            &self.name,
            topic.as_deref().unwrap_or(&self.source_name),
        );
        match ctx.current() {
            Some(m) => tracing::error!(
                agent = %self.name,
                actor = self.index,
                topic = %m.topic,
                partition = m.partition,
                offset = m.offset,
                error = %error,
                failures = count,
                "agent {} {what} while processing the event at {}[{}]@{} ({count} failures of \
                 this agent so far); the event is acked, not retried, and the agent restarted",
                self.name,
                m.topic,
                m.partition,
                m.offset
            ),
            None => tracing::error!(
                agent = %self.name,
                actor = self.index,
                error = %error,
                failures = count,
                "agent {} {what} before reading an event ({count} failures of this agent so \
                 far); restarting it",
                self.name
            ),
        }
    }

    /// Whether the source is closed and empty: the worker is stopping.
    fn exhausted(&self) -> bool {
        match (&self.queue, &self.source) {
            (Some(q), _) => q.is_closed() && q.is_empty() && self.buffers.is_empty(),
            (None, Source::Channel(c)) => self.rt.stop.is_cancelled() && c.is_empty(),
            (None, Source::Topic(_)) => true,
        }
    }

    fn stream(&self, ctx: &Arc<ActorCtx>) -> Stream<T, K> {
        match &self.source {
            Source::Topic(topic) => {
                let codec = topic.value_codec.clone();
                let decode_ctx = ctx.clone();
                let inner: BoxStream<'static, Item<T>> = match &self.queue {
                    Some(q) => crate::metrics::Timed::new(
                        QueueReader::new(q.clone(), self.buffers.get(""), self.rt.clone()),
                        crate::metrics::process_seconds(&self.rt.app_id, &self.name),
                    )
                    .filter_map(move |d| decode_delivery(&decode_ctx, &*codec, d))
                    .boxed(),
                    None => futures::stream::empty().boxed(),
                };
                Stream::new(inner, ctx.clone(), Some(topic.key_codec.clone()))
            }
            Source::Channel(channel) => {
                let rx = channel.receiver();
                let stop = self.rt.stop.clone();
                let inner = async_stream::stream! {
                    loop {
                        tokio::select! {
                            biased;
                            item = rx.recv() => match item {
                                Ok(item) => yield Item {
                                    value: item.value,
                                    meta: item.meta,
                                    acks: Default::default(),
                                },
                                Err(_) => break,
                            },
                            _ = stop.cancelled() => break,
                        }
                    }
                }
                .boxed();
                Stream::new(inner, ctx.clone(), None)
            }
        }
    }

    async fn drive(
        &self,
        out: &mut BoxStream<'static, Result<R, BoxError>>,
        ctx: &ActorCtx,
    ) -> Result<(), BoxError> {
        while let Some(result) = out.next().await {
            let value = result?;
            self.events_out.increment(1);
            self.deliver(ctx, value).await;
        }
        Ok(())
    }

    /// Hands a yielded value to the asker (if the event has a reply-to address) and the sinks.
    /// A request with rill's headers gets rill's reply (the value, its correlation id in a
    /// header); one with only Faust's (or a Faust `ReqRepRequest`, unwrapped into them when
    /// it was decoded) gets Faust's `ReqRepResponse` record, which a Faust `ask` reads.
    async fn deliver(&self, ctx: &ActorCtx, value: R) {
        if let Some(meta) = ctx.current() {
            if let Some(reply_to) = meta.header(REPLY_TO) {
                self.reply(&meta, reply_to, &value).await;
            } else if let Some(reply_to) = meta.header(faust::REPLY_TO) {
                self.reply_to_faust(&meta, reply_to, &value).await;
            }
        }
        self.to_sinks(value).await;
    }

    /// Answers a request that came with rill's headers.
    async fn reply(&self, meta: &Message, reply_to: &Bytes, value: &R) {
        let reply_to = String::from_utf8_lossy(reply_to).into_owned();
        // A reply to this very worker is handed over directly.
        if reply_to == self.rt.reply_topic {
            if let (Some(id), Ok(bytes)) = (meta.header(CORRELATION_ID), serde_json::to_vec(value))
            {
                let id = String::from_utf8_lossy(id);
                self.rt.replies.complete(&id, exact_bytes(bytes));
            }
            return;
        }
        let mut headers = Vec::new();
        if let Some(id) = meta.header(CORRELATION_ID) {
            headers.push((CORRELATION_ID.to_owned(), id.clone()));
        }
        let bytes = serde_json::to_vec(value).map(exact_bytes);
        self.send_reply(&reply_to, None, bytes, headers).await;
    }

    /// Answers a Faust `ask`: a `ReqRepResponse` record, without a key, as Faust's agents send
    /// theirs.
    async fn reply_to_faust(&self, meta: &Message, reply_to: &Bytes, value: &R) {
        let reply_to = String::from_utf8_lossy(reply_to).into_owned();
        let id = meta
            .header(faust::CORRELATION_ID)
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .unwrap_or_default();
        let bytes = serde_json::to_vec(value)
            .map(|v| Bytes::from(faust::response(meta.key.as_deref(), &v, &id)));
        self.send_reply(&reply_to, None, bytes, Vec::new()).await;
    }

    async fn send_reply(
        &self,
        reply_to: &str,
        key: Option<Bytes>,
        bytes: serde_json::Result<Bytes>,
        headers: crate::transport::Headers,
    ) {
        let result = match bytes {
            Ok(bytes) => {
                self.rt
                    .enqueue(
                        &self.rt.default_spec(reply_to),
                        None,
                        key,
                        Some(bytes),
                        headers,
                    )
                    .await
            }
            Err(e) => Err(crate::Error::Config(format!("cannot encode reply: {e}"))),
        };
        if let Err(e) = result {
            let what = format!("agent {} cannot send a reply to {reply_to}", self.name);
            if !self.rt.output_error(&what, &e) {
                tracing::error!(agent = %self.name, reply_to, error = %e, "cannot send reply");
            }
        }
    }

    async fn to_sinks(&self, value: R) {
        for sink in self.sinks.iter() {
            let delivered = match sink.offer(value.clone()) {
                Offered::Done(result) => result,
                Offered::Pending(delivery) => delivery.await,
            };
            if let Err(e) = delivered {
                // A record the transport cannot take is a lost output: the event must not be
                // committed. Other sink errors are the sink's own, logged as agent errors are.
                let what = format!(
                    "agent {} cannot write to its sink {}",
                    self.name,
                    sink.describe()
                );
                match e.downcast_ref::<crate::Error>() {
                    Some(e) if self.rt.output_error(&what, e) => {}
                    _ => {
                        tracing::error!(agent = %self.name, sink = %sink.describe(), error = %e, "sink failed")
                    }
                }
            }
        }
    }
}

pub(crate) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}
