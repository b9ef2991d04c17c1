//! Sinks: where an agent's yielded values go besides the asker.

use super::{marker, Agent};
use crate::channel::Channel;
use crate::error::BoxError;
use crate::topic::Topic;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;

/// Receives every value an agent yields.
pub trait Sink<R>: Send + Sync + 'static {
    /// Hands one value to the sink. The agent waits for it before reading its next event.
    fn deliver(&self, value: R) -> BoxFuture<'_, Result<(), BoxError>>;
    /// Hands one value over, at once when the sink can do so without waiting (which saves
    /// the future [`deliver`](Sink::deliver) returns). The default calls `deliver`.
    fn offer(&self, value: R) -> Offered<'_> {
        Offered::Pending(self.deliver(value))
    }
    /// A short description for logs.
    fn describe(&self) -> String;
}

/// How a [`Sink`] took a value offered to it.
pub enum Offered<'a> {
    /// Delivered already, with this outcome.
    Done(Result<(), BoxError>),
    /// Being delivered: await this.
    Pending(BoxFuture<'a, Result<(), BoxError>>),
}

impl std::fmt::Debug for Offered<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Offered::Done(result) => f.debug_tuple("Done").field(result).finish(),
            Offered::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Something that can be an agent's sink; see [`Agent::sink`]. `M` tells the kinds apart.
pub trait IntoSink<R, M> {
    /// The sink.
    fn into_sink(self) -> Arc<dyn Sink<R>>;
}

struct FnSink<F>(F);

impl<R, F> Sink<R> for FnSink<F>
where
    F: Fn(R) + Send + Sync + 'static,
{
    fn deliver(&self, value: R) -> BoxFuture<'_, Result<(), BoxError>> {
        (self.0)(value);
        futures::future::ready(Ok(())).boxed()
    }

    fn offer(&self, value: R) -> Offered<'_> {
        (self.0)(value);
        Offered::Done(Ok(()))
    }

    fn describe(&self) -> String {
        std::any::type_name::<F>().to_owned()
    }
}

impl<R, F> IntoSink<R, marker::SyncFn> for F
where
    F: Fn(R) + Send + Sync + 'static,
{
    fn into_sink(self) -> Arc<dyn Sink<R>> {
        Arc::new(FnSink(self))
    }
}

struct AsyncFnSink<F>(F);

impl<R, F, Fut> Sink<R> for AsyncFnSink<F>
where
    F: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn deliver(&self, value: R) -> BoxFuture<'_, Result<(), BoxError>> {
        (self.0)(value).map(Ok).boxed()
    }

    fn describe(&self) -> String {
        std::any::type_name::<F>().to_owned()
    }
}

impl<R, F, Fut> IntoSink<R, marker::AsyncFn<Fut>> for F
where
    F: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn into_sink(self) -> Arc<dyn Sink<R>> {
        Arc::new(AsyncFnSink(self))
    }
}

struct TopicSink<K, V>(Topic<K, V>);

impl<R, K, V> Sink<R> for TopicSink<K, V>
where
    R: Into<V> + Send + 'static,
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn deliver(&self, value: R) -> BoxFuture<'_, Result<(), BoxError>> {
        async move {
            self.0.enqueue_value(value.into()).await?;
            Ok(())
        }
        .boxed()
    }

    fn offer(&self, value: R) -> Offered<'_> {
        match self.0.try_enqueue_value(value.into()) {
            Ok(result) => Offered::Done(result.map_err(Into::into)),
            Err(value) => Offered::Pending(
                async move {
                    self.0.enqueue_value(value).await?;
                    Ok(())
                }
                .boxed(),
            ),
        }
    }

    fn describe(&self) -> String {
        format!("topic {}", self.0.name())
    }
}

impl<R, K, V> IntoSink<R, marker::TopicSink> for &Topic<K, V>
where
    R: Into<V> + Send + 'static,
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn into_sink(self) -> Arc<dyn Sink<R>> {
        Arc::new(TopicSink(self.clone()))
    }
}

struct ChannelSink<R>(Channel<R>);

impl<R: Send + 'static> Sink<R> for ChannelSink<R> {
    fn deliver(&self, value: R) -> BoxFuture<'_, Result<(), BoxError>> {
        async move {
            self.0
                .send(value)
                .await
                .map_err(|_| format!("channel {} is closed", self.0.name()).into())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("channel {}", self.0.name())
    }
}

impl<R: Send + 'static> IntoSink<R, marker::ChannelSink> for &Channel<R> {
    fn into_sink(self) -> Arc<dyn Sink<R>> {
        Arc::new(ChannelSink(self.clone()))
    }
}

struct AgentSink<R, R2, K>(Agent<R, R2, K>);

impl<R, R2, K> Sink<R> for AgentSink<R, R2, K>
where
    R: Serialize + DeserializeOwned + Send + Sync + 'static,
    R2: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    fn deliver(&self, value: R) -> BoxFuture<'_, Result<(), BoxError>> {
        async move {
            self.0.deliver(value, None, None, Vec::new(), false).await?;
            Ok(())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("agent {}", self.0.name())
    }
}

impl<R, R2, K> IntoSink<R, marker::AgentSink> for &Agent<R, R2, K>
where
    R: Serialize + DeserializeOwned + Send + Sync + 'static,
    R2: Serialize + Clone + Send + Sync + 'static,
    K: Send + Sync + 'static,
{
    fn into_sink(self) -> Arc<dyn Sink<R>> {
        Arc::new(AgentSink(self.clone()))
    }
}
