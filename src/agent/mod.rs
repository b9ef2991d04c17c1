//! Agents: async functions over a typed stream, run by the worker as one or more actors.

mod actor;
mod request;
mod sink;

pub use request::{AgentAsk, AgentSend, IntoValues, ReplyTo};

/// Writes the body of an agent that yields values and can fail: as
/// [`stream!`](crate::stream), where `?` on an error (anything that converts into a
/// [`BoxError`](crate::BoxError)) ends the run with it. The agent function returns
/// `impl TryAsyncIterable<T>`; see [`TryAsyncIterable`] for what happens to the error.
///
/// ```
/// use rill::prelude::*;
///
/// fn checked(mut numbers: Stream<i64>) -> impl TryAsyncIterable<i64> {
///     try_stream! {
///         while let Some(n) = numbers.next().await {
///             let doubled = n.checked_mul(2).ok_or("overflow")?;
///             yield doubled;
///         }
///     }
/// }
/// ```
#[macro_export]
macro_rules! try_stream {
    ($($body:tt)*) => {
        $crate::TryYields::new($crate::__private::async_stream::try_stream! { $($body)* })
    };
}
pub use sink::{IntoSink, Offered, Sink};

use crate::channel::Channel;
use crate::codec::{Codec, Raw};
use crate::engine::AppCore;
use crate::error::{BoxError, Error, Result};
use crate::settings::Settings;
use crate::stream::Stream;
use crate::topic::Topic;
use crate::transport::TopicSpec;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

pub(crate) use actor::{panic_message, AgentRunner};

/// What an agent reads: a topic description or a channel.
// One per agent, made once: the size of a topic description costs nothing here.
#[allow(clippy::large_enum_variant)]
pub enum Source<T, K = Bytes> {
    /// A topic description (one or more topics).
    Topic(Topic<K, T>),
    /// An in-memory channel.
    Channel(Channel<T>),
}

impl<T, K> Clone for Source<T, K> {
    fn clone(&self) -> Self {
        match self {
            Source::Topic(t) => Source::Topic(t.clone()),
            Source::Channel(c) => Source::Channel(c.clone()),
        }
    }
}

impl<T: 'static, K: 'static> fmt::Debug for Source<T, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Topic(t) => t.fmt(f),
            Source::Channel(c) => c.fmt(f),
        }
    }
}

impl<T, K> From<&Topic<K, T>> for Source<T, K> {
    fn from(t: &Topic<K, T>) -> Self {
        Source::Topic(t.clone())
    }
}

impl<T, K> From<Topic<K, T>> for Source<T, K> {
    fn from(t: Topic<K, T>) -> Self {
        Source::Topic(t)
    }
}

impl<T, K> From<&Channel<T>> for Source<T, K> {
    fn from(c: &Channel<T>) -> Self {
        Source::Channel(c.clone())
    }
}

impl<T, K> From<Channel<T>> for Source<T, K> {
    fn from(c: Channel<T>) -> Self {
        Source::Channel(c)
    }
}

/// Marker types that let [`AgentFn`] accept several shapes of agent function.
pub mod marker {
    use std::marker::PhantomData;

    /// An `async fn` returning `()`.
    #[derive(Debug)]
    pub struct Unit<Fut>(PhantomData<fn() -> Fut>);
    /// An `async fn` returning `Result<(), E>`.
    #[derive(Debug)]
    pub struct Fallible<Fut, E>(PhantomData<fn() -> (Fut, E)>);
    /// A function returning a stream of yielded values (`stream! { ... yield v; }`).
    #[derive(Debug)]
    pub struct Yields<S>(PhantomData<fn() -> S>);
    /// A function returning yielded values or an error (`try_stream! { ... yield v; }`).
    #[derive(Debug)]
    pub struct TryYields<I>(PhantomData<fn() -> I>);
    /// An agent function that takes state too (see `App::agent_with`), of kind `M`.
    #[derive(Debug)]
    pub struct WithState<M>(PhantomData<fn() -> M>);
    /// A plain function sink.
    #[derive(Debug)]
    pub struct SyncFn;
    /// An async function sink.
    #[derive(Debug)]
    pub struct AsyncFn<Fut>(PhantomData<fn() -> Fut>);
    /// A topic sink.
    #[derive(Debug)]
    pub struct TopicSink;
    /// A channel sink.
    #[derive(Debug)]
    pub struct ChannelSink;
    /// An agent sink.
    #[derive(Debug)]
    pub struct AgentSink;
    /// Values from an iterator.
    #[derive(Debug)]
    pub struct Iter;
    /// Values from an async stream.
    #[derive(Debug)]
    pub struct Async;
}

/// A function the worker can run as an agent. Implemented for:
///
/// - `async fn(Stream<T, K>)`, and `async fn(Stream<T, K>) -> Result<(), E>`;
/// - `fn(Stream<T, K>) -> impl AsyncIterable<R>`, usually written with [`stream!`](crate::stream)
///   so the body can `yield` values, as a Faust agent does;
/// - `fn(Stream<T, K>) -> impl TryAsyncIterable<R>`, written with
///   [`try_stream!`](crate::try_stream): a body that yields values and can fail with `?`.
///
/// An agent that fails (returns `Err`, fails with `?` in `try_stream!`, or panics) has the
/// error logged with the event it was processing (`topic[partition]@offset`) and counted
/// ([`Worker::agent_errors`](crate::Worker::agent_errors)); that event is acked, not
/// retried, and the agent is restarted on the rest of its stream, as a crashed Faust agent is.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an agent",
    note = "an agent is `async fn(Stream<T>)`, `async fn(Stream<T>) -> Result<(), E>`, a function returning `stream! {{ ... yield value; }}`, or one returning `try_stream! {{ ... yield value?; }}`; annotate a closure's argument: `|stream: Stream<MyRecord>|`"
)]
pub trait AgentFn<T, K, R, M>: Send + Sync + 'static {
    /// Runs the agent over `stream`, as a stream of yielded values.
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<R, BoxError>>;
}

impl<F, Fut, T, K> AgentFn<T, K, (), marker::Unit<Fut>> for F
where
    F: Fn(Stream<T, K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<(), BoxError>> {
        self(stream)
            .into_stream()
            .filter_map(|()| std::future::ready(None))
            .boxed()
    }
}

impl<F, Fut, T, K, E> AgentFn<T, K, (), marker::Fallible<Fut, E>> for F
where
    F: Fn(Stream<T, K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<(), BoxError>> {
        self(stream)
            .into_stream()
            .filter_map(|r| std::future::ready(r.err().map(|e| Err(e.into()))))
            .boxed()
    }
}

impl<F, S, T, K, R: 'static> AgentFn<T, K, R, marker::Yields<S>> for F
where
    F: Fn(Stream<T, K>) -> S + Send + Sync + 'static,
    S: futures::Stream<Item = R> + Send + 'static,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<R, BoxError>> {
        self(stream).map(Ok).boxed()
    }
}

impl<F, I, T, K, R: 'static> AgentFn<T, K, R, marker::TryYields<I>> for F
where
    F: Fn(Stream<T, K>) -> I + Send + Sync + 'static,
    I: TryAsyncIterable<R>,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<R, BoxError>> {
        self(stream).into_results()
    }
}

/// An agent function `f(stream, state)` with its state: each run of the agent (one per actor,
/// and again after a restart) gets a clone of `state`. Made by `App::agent_with`.
#[derive(Debug, Clone)]
pub struct WithState<F, S> {
    f: F,
    state: S,
}

impl<F, S> WithState<F, S> {
    pub(crate) fn new(f: F, state: S) -> Self {
        Self { f, state }
    }
}

impl<F, St, Fut, T, K> AgentFn<T, K, (), marker::WithState<marker::Unit<Fut>>> for WithState<F, St>
where
    F: Fn(Stream<T, K>, St) -> Fut + Send + Sync + 'static,
    St: Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<(), BoxError>> {
        (self.f)(stream, self.state.clone())
            .into_stream()
            .filter_map(|()| std::future::ready(None))
            .boxed()
    }
}

impl<F, St, Fut, T, K, E> AgentFn<T, K, (), marker::WithState<marker::Fallible<Fut, E>>>
    for WithState<F, St>
where
    F: Fn(Stream<T, K>, St) -> Fut + Send + Sync + 'static,
    St: Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<(), BoxError>> {
        (self.f)(stream, self.state.clone())
            .into_stream()
            .filter_map(|r| std::future::ready(r.err().map(|e| Err(e.into()))))
            .boxed()
    }
}

impl<F, St, S, T, K, R: 'static> AgentFn<T, K, R, marker::WithState<marker::Yields<S>>>
    for WithState<F, St>
where
    F: Fn(Stream<T, K>, St) -> S + Send + Sync + 'static,
    St: Clone + Send + Sync + 'static,
    S: futures::Stream<Item = R> + Send + 'static,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<R, BoxError>> {
        (self.f)(stream, self.state.clone()).map(Ok).boxed()
    }
}

impl<F, St, I, T, K, R: 'static> AgentFn<T, K, R, marker::WithState<marker::TryYields<I>>>
    for WithState<F, St>
where
    F: Fn(Stream<T, K>, St) -> I + Send + Sync + 'static,
    St: Clone + Send + Sync + 'static,
    I: TryAsyncIterable<R>,
{
    fn call(&self, stream: Stream<T, K>) -> BoxStream<'static, Result<R, BoxError>> {
        (self.f)(stream, self.state.clone()).into_results()
    }
}

/// What an agent function returns when it yields values: an async iterable of `T`, as in the
/// type hint `AsyncIterable[int]` of a Faust agent.
pub trait AsyncIterable<T>: futures::Stream<Item = T> + Send + 'static {}

impl<T, S> AsyncIterable<T> for S where S: futures::Stream<Item = T> + Send + 'static {}

/// What an agent function returns when it yields values of type `T` and can fail: the body of
/// a [`try_stream!`](crate::try_stream), where `?` ends the run with an error.
///
/// The error is the agent's failure on the event it was processing, as when a Faust agent
/// raises: it is logged with the agent, the event (`topic[partition]@offset`) and the
/// error, and counted ([`Worker::agent_errors`](crate::Worker::agent_errors),
/// `rill_agent_errors_total`); the event is acked, not retried (at-least-once does not mean
/// redelivered forever), and the agent is restarted on the rest of its stream. An `ask`
/// waiting for that event gets no reply (it times out). This is what an `async fn` agent
/// returning `Err` gets too.
///
/// ```
/// use rill::prelude::*;
///
/// // Parses numbers; text that is not one fails the event (and only that event).
/// fn parse(mut lines: Stream<String>) -> impl TryAsyncIterable<i64> {
///     try_stream! {
///         while let Some(line) = lines.next().await {
///             let n: i64 = line.trim().parse()?;
///             if n < 0 {
///                 Err(format!("negative number {n}"))?;
///             }
///             yield n;
///         }
///     }
/// }
///
/// # #[tokio::main] async fn main() -> rill::Result<()> {
/// let app = App::new("parse-doc");
/// let lines = app.topic("lines").value_type::<String>();
/// let parse = app.agent(parse).channel(&lines);
/// let worker = app.start().await?;
/// assert_eq!(parse.ask("42".to_owned()).await?, 42);
/// lines.send("forty-two".to_owned()).await?; // logged and counted; the agent goes on
/// assert_eq!(parse.ask("7".to_owned()).await?, 7);
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not the body of a fallible agent",
    note = "write the body with `rill::try_stream! {{ ... yield value; }}` (use `stream!` and `impl AsyncIterable<T>` for a body that cannot fail)"
)]
pub trait TryAsyncIterable<T>: Send + 'static {
    /// The yielded values and the error that ended the run, if one did.
    fn into_results(self) -> BoxStream<'static, Result<T, BoxError>>;
}

/// The body of a fallible yielding agent, made by [`try_stream!`](crate::try_stream): a
/// stream of values that ends at the first error.
#[must_use = "an agent body does nothing until the worker runs it"]
pub struct TryYields<S>(S);

impl<S> fmt::Debug for TryYields<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TryYields")
    }
}

impl<S, T> TryYields<S>
where
    S: futures::Stream<Item = Result<T, BoxError>> + Send + 'static,
{
    /// Wraps a stream of results; what [`try_stream!`](crate::try_stream) expands to.
    pub fn new(stream: S) -> Self {
        Self(stream)
    }
}

impl<S, T> TryAsyncIterable<T> for TryYields<S>
where
    S: futures::Stream<Item = Result<T, BoxError>> + Send + 'static,
{
    fn into_results(self) -> BoxStream<'static, Result<T, BoxError>> {
        self.0.boxed()
    }
}

pub(crate) type BoxAgentFn<T, K, R> =
    Arc<dyn Fn(Stream<T, K>) -> BoxStream<'static, Result<R, BoxError>> + Send + Sync>;

pub(crate) struct Config<T, R, K> {
    pub(crate) name: String,
    /// Whether `name` was given with [`Agent::named`] (else it is the function's path).
    pub(crate) named: bool,
    pub(crate) source: Option<Source<T, K>>,
    pub(crate) concurrency: usize,
    pub(crate) sinks: Vec<Arc<dyn Sink<R>>>,
    /// Overrides the app's [`BadInput`](crate::BadInput) setting: whether bad input goes to
    /// the dead-letter topic.
    pub(crate) dead_letter: Option<bool>,
}

pub(crate) struct AgentInner<T, R, K> {
    pub(crate) core: Arc<AppCore>,
    pub(crate) fun: BoxAgentFn<T, K, R>,
    pub(crate) config: Mutex<Config<T, R, K>>,
    /// The source as resolved when the worker first started.
    pub(crate) resolved: std::sync::OnceLock<Source<T, K>>,
}

/// A handle on an agent: configure it before the worker starts, and talk to it (`cast`, `ask`,
/// `send`, `map`, `join`) while it runs.
///
/// `T` is what the agent reads, `R` what it yields, `K` its source's key type.
///
/// ```
/// use rill::prelude::*;
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
/// let app = App::new("doubling");
/// let numbers = app.topic("numbers").value_type::<i64>();
/// // Two actors share the topic's partitions.
/// let agent = app.agent(double).channel(&numbers).concurrency(2);
///
/// let worker = app.start().await?;
/// assert_eq!(agent.ask(21).await?, 42);
/// assert_eq!(agent.join([1, 2, 3]).await?, vec![2, 4, 6]);
/// agent.cast(5).await?; // no reply wanted
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Agent<T, R = (), K = Bytes> {
    pub(crate) inner: Arc<AgentInner<T, R, K>>,
}

impl<T, R, K> Clone for Agent<T, R, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T, R, K> fmt::Debug for Agent<T, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.inner.config();
        f.debug_struct("Agent")
            .field("name", &c.name)
            .field("concurrency", &c.concurrency)
            .field("sinks", &c.sinks.len())
            .finish()
    }
}

impl<T, R, K> AgentInner<T, R, K> {
    pub(crate) fn config(&self) -> std::sync::MutexGuard<'_, Config<T, R, K>> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The agent name Faust would give a function: its path with dots, e.g. `agent.adding`.
///
/// It names the agent's default topic, so it must not change while the program does not. Rust
/// does not promise the format of [`std::any::type_name`]; for a function item it has always
/// been the function's path, and a test here fails the build's tests if a compiler ever says
/// otherwise. A name that is not a plain path (a closure, a generic function) is refused where
/// it would name a topic (see `check_name`): such agents are given a name with `.named(..)`.
pub(crate) fn default_name<F>() -> String {
    std::any::type_name::<F>().replace("::", ".")
}

impl<T, R, K> Agent<T, R, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    pub(crate) fn new(core: Arc<AppCore>, name: String, fun: BoxAgentFn<T, K, R>) -> Self {
        let concurrency = 1;
        Self {
            inner: Arc::new(AgentInner {
                core,
                fun,
                config: Mutex::new(Config {
                    named: false,
                    name,
                    source: None,
                    concurrency,
                    sinks: Vec::new(),
                    dead_letter: None,
                }),
                resolved: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The agent's name (by default the function's path, e.g. `agent.adding`).
    pub fn name(&self) -> String {
        self.inner.config().name.clone()
    }

    /// Renames the agent. Agents written as closures need a name.
    pub fn named(self, name: impl Into<String>) -> Self {
        let mut c = self.inner.config();
        c.name = name.into();
        c.named = true;
        drop(c);
        self
    }

    /// The topic or channel the agent reads (Faust's `channel` argument). Without one, the
    /// agent reads a topic named after the agent.
    pub fn channel(self, source: impl Into<Source<T, K>>) -> Self {
        self.inner.config().source = Some(source.into());
        self
    }

    /// Runs `n` instances (actors) of the agent on each worker. They share the stream and
    /// process it concurrently, out of order.
    pub fn concurrency(self, n: usize) -> Self {
        self.inner.config().concurrency = n.max(1);
        self
    }

    /// Adds a sink: every value the agent yields is also handed to it. A sink is a function,
    /// an async function, a topic, a channel, or another agent.
    pub fn sink<M>(self, sink: impl IntoSink<R, M>) -> Self {
        self.inner.config().sinks.push(sink.into_sink());
        self
    }

    /// Whether messages this agent cannot read (bad input) go to its dead-letter topic
    /// `<app id>-<agent>-dead-letter` (`true`) or are skipped (`false`), whatever the app's
    /// [`bad_input`](crate::Settings::bad_input) setting says. See [`BadInput`](crate::BadInput).
    pub fn dead_letter(self, enabled: bool) -> Self {
        self.inner.config().dead_letter = Some(enabled);
        self
    }

    /// The agent's dead-letter topic, if it sends bad input there (agents reading a channel
    /// have none: their values are never decoded).
    pub(crate) fn dead_letter_spec(&self, settings: &Settings) -> Result<Option<TopicSpec>> {
        if let Source::Channel(_) = self.source()? {
            return Ok(None);
        }
        let c = self.inner.config();
        Ok(crate::stream::bad_input::dead_letter_spec(
            &self.inner.core.id,
            &c.name,
            c.dead_letter,
            settings,
        ))
    }

    /// The agent's source, resolving the default topic named after the agent.
    pub(crate) fn source(&self) -> Result<Source<T, K>> {
        if let Some(s) = self.inner.resolved.get() {
            return Ok(s.clone());
        }
        let c = self.inner.config();
        if let Some(s) = &c.source {
            return Ok(s.clone());
        }
        if !c.named {
            check_name(&c.name)?;
        }
        let key_codec = default_key_codec::<K>().ok_or_else(|| {
            Error::Config(format!(
                "agent {:?} reads keys of type {}: give it a topic declared with that key type \
                 (`.channel(&topic)`)",
                c.name,
                std::any::type_name::<K>()
            ))
        })?;
        let topic = Topic::new(self.inner.core.clone(), vec![c.name.clone()])
            .value_type::<T>()
            .key_codec(ArcCodec(key_codec));
        Ok(Source::Topic(topic))
    }
}

/// Refuses a default name that would not stay the same: its default topic is named after it.
fn check_name(name: &str) -> Result<()> {
    if name.contains("{{closure}}") {
        return Err(Error::Config(format!(
            "an agent written as a closure needs a name: app.agent(f).named(\"...\") (got {name:?})"
        )));
    }
    let identifier = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
            && chars.all(|c| c.is_alphanumeric() || c == '_')
    };
    if !name.split('.').all(identifier) {
        return Err(Error::Config(format!(
            "agent {name:?} has no name that stays the same from one build to the next (its \
             default topic is named after it): name it with app.agent(f).named(\"...\"), or \
             give it a topic with .channel(&topic)"
        )));
    }
    Ok(())
}

/// Raw bytes is the only key type with a default codec.
fn default_key_codec<K: 'static>() -> Option<Arc<dyn Codec<K>>> {
    let raw: Arc<dyn Codec<Bytes>> = Arc::new(Raw);
    let any: Box<dyn Any> = Box::new(raw);
    any.downcast::<Arc<dyn Codec<K>>>().ok().map(|b| *b)
}

struct ArcCodec<K>(Arc<dyn Codec<K>>);

impl<K: 'static> Codec<K> for ArcCodec<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn encode(&self, value: &K) -> Result<Bytes, crate::codec::CodecError> {
        self.0.encode(value)
    }

    fn decode(&self, bytes: &[u8]) -> Result<K, crate::codec::CodecError> {
        self.0.decode(bytes)
    }
}

/// The specs of a source's topics (empty for a channel).
pub(crate) fn source_specs<T: 'static, K: 'static>(source: &Source<T, K>) -> Vec<TopicSpec> {
    match source {
        Source::Topic(t) => t
            .names()
            .iter()
            .map(|n| t.core.topic_spec(n, t.partition_count()))
            .collect(),
        Source::Channel(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::{check_name, default_name};

    async fn adding(_: crate::Stream<i64>) {}

    fn generic<T>(_: T) {}

    /// A default agent name (and so its default topic) is the function's path: if a compiler
    /// ever reports function types otherwise, this fails before any topic is renamed.
    #[test]
    fn a_functions_default_name_is_its_path() {
        assert_eq!(default_name_of(adding), "rill.agent.tests.adding");
        assert!(check_name(&default_name_of(adding)).is_ok());
    }

    #[test]
    fn names_that_are_not_plain_paths_are_refused() {
        let closure = default_name_of(|_: u8| ());
        assert!(check_name(&closure).is_err(), "{closure}");
        let generic = default_name_of(generic::<u8>);
        assert!(check_name(&generic).is_err(), "{generic}");
        let err = check_name("a.b<c>").expect_err("not a path").to_string();
        assert!(err.contains(".named("), "{err}");
    }

    fn default_name_of<F>(_: F) -> String {
        default_name::<F>()
    }
}
