//! Topics: named, partitioned logs with a key and a value type.

use crate::codec::{Codec, SerializerError};
use crate::engine::AppCore;
use crate::error::Result;
use crate::transport::{Headers, RecordPosition, Retention, TopicSpec};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

/// A topic description: one or more topic names (the first is the main topic), the key and
/// value types and their codecs, and the partition count.
///
/// Created with [`App::topic`](crate::App::topic). Keys default to raw bytes and values to
/// JSON (`serde_json::Value`); [`key_type`](Topic::key_type) and
/// [`value_type`](Topic::value_type) make them typed.
///
/// Keys and values are encoded by the serializer named for the topic
/// ([`key_serializer`](Topic::key_serializer), [`value_serializer`](Topic::value_serializer),
/// as Faust's `app.topic(..., key_serializer='json')`), else by the app's
/// ([`Settings::key_serializer`](crate::Settings::key_serializer),
/// [`Settings::value_serializer`](crate::Settings::value_serializer)), else by the default
/// (raw bytes for [`Bytes`], JSON for other types). [`key_codec`](Topic::key_codec) and
/// [`value_codec`](Topic::value_codec) set a codec outright.
///
/// ```
/// # use rill::prelude::*;
/// #[derive(Serialize, Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// let app = App::new("agent-example");
/// let topic = app.topic("adding").value_type::<Add>();
/// assert_eq!(topic.name(), "adding");
/// ```
pub struct Topic<K = Bytes, V = serde_json::Value> {
    pub(crate) core: Arc<AppCore>,
    names: Arc<[String]>,
    partitions: Option<u32>,
    retention: Retention,
    pub(crate) key_codec: Arc<dyn Codec<K>>,
    pub(crate) value_codec: Arc<dyn Codec<V>>,
    /// The serializers named for this topic (`key_serializer`, `value_serializer`).
    key_serializer: Option<Arc<str>>,
    value_serializer: Option<Arc<str>>,
    /// Why the key or value serializer cannot be used with the topic's types, if it cannot.
    key_problem: Option<SerializerError>,
    value_problem: Option<SerializerError>,
}

impl<K, V> Clone for Topic<K, V> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            names: self.names.clone(),
            partitions: self.partitions,
            retention: self.retention,
            key_codec: self.key_codec.clone(),
            value_codec: self.value_codec.clone(),
            key_serializer: self.key_serializer.clone(),
            value_serializer: self.value_serializer.clone(),
            key_problem: self.key_problem.clone(),
            value_problem: self.value_problem.clone(),
        }
    }
}

/// Keys or values.
#[derive(Clone, Copy)]
enum Side {
    Key,
    Value,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Key => "key",
            Side::Value => "value",
        }
    }
}

/// The codec of the serializer `named` for the topic (else the app's, else the default) for
/// `T`; if it cannot be used, a codec that fails, and why. An unknown name is also recorded
/// in `core`, so the worker refuses to start.
fn resolve<T>(
    core: &AppCore,
    topic: &str,
    side: Side,
    named: Option<&str>,
) -> (Arc<dyn Codec<T>>, Option<SerializerError>)
where
    T: Serialize + DeserializeOwned + 'static,
{
    let settings = core.settings();
    let name = named.map(str::to_owned).or(match side {
        Side::Key => settings.key_serializer,
        Side::Value => settings.value_serializer,
    });
    let Some(name) = name else {
        return (crate::codec::default_for::<T>(), None);
    };
    match crate::codec::by_name::<T>(&name) {
        Ok(codec) => (codec, None),
        Err(error) => {
            if let SerializerError::Unknown { .. } = error {
                let whose = if named.is_some() {
                    ""
                } else {
                    " (the app's default)"
                };
                core.unknown_serializer(
                    format!("the {} serializer of topic {topic:?}{whose}", side.as_str()),
                    error.clone(),
                );
            }
            let codec = Arc::new(crate::codec::Unusable {
                error: error.clone(),
            });
            (codec, Some(error))
        }
    }
}

impl<K: 'static, V: 'static> fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic")
            .field("names", &self.names)
            .field("partitions", &self.partitions)
            .field("retention", &self.retention)
            .field("key_codec", &self.key_codec.name())
            .field("value_codec", &self.value_codec.name())
            .finish()
    }
}

/// One topic name or several; see [`App::topic`](crate::App::topic).
pub trait TopicNames {
    /// The names, main topic first.
    fn into_names(self) -> Vec<String>;
}

impl TopicNames for &str {
    fn into_names(self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl TopicNames for String {
    fn into_names(self) -> Vec<String> {
        vec![self]
    }
}

impl<const N: usize> TopicNames for [&str; N] {
    fn into_names(self) -> Vec<String> {
        self.iter().map(|s| (*s).to_owned()).collect()
    }
}

impl TopicNames for Vec<String> {
    fn into_names(self) -> Vec<String> {
        self
    }
}

impl Topic<Bytes, serde_json::Value> {
    pub(crate) fn new(core: Arc<AppCore>, names: Vec<String>) -> Self {
        for n in &names {
            core.declare(n, None);
        }
        let (key_codec, key_problem) = resolve(&core, &names[0], Side::Key, None);
        let (value_codec, value_problem) = resolve(&core, &names[0], Side::Value, None);
        Self {
            core,
            names: names.into(),
            partitions: None,
            retention: Retention::default(),
            key_codec,
            value_codec,
            key_serializer: None,
            value_serializer: None,
            key_problem,
            value_problem,
        }
    }
}

impl<K: 'static, V: 'static> Topic<K, V> {
    /// The main topic's name (the first name).
    pub fn name(&self) -> &str {
        &self.names[0]
    }

    /// Every name of this description.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The declared partition count, if set.
    pub fn partition_count(&self) -> Option<u32> {
        self.partitions
    }

    /// Sets the partition count the topics are created with (default: the app's
    /// `topic_partitions`).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        for n in self.names.iter() {
            self.core.declare(n, Some(partitions));
        }
        self
    }

    /// What is kept of the topics' past.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Keeps records for at least `time` (Kafka's `retention.ms`; default: the transport's,
    /// see [`Retention`]). On Kafka it is the topic's configuration when rill creates the
    /// topic; on the embedded transport records no consumer group still needs are removed once
    /// older than this.
    ///
    /// ```
    /// # use rill::prelude::*;
    /// use std::time::Duration;
    ///
    /// let app = App::new("retention-example");
    /// let audit = app
    ///     .topic("audit")
    ///     .retention_time(Duration::from_secs(3600))
    ///     .retention_bytes(1 << 20);
    /// assert_eq!(audit.retention().bytes, Some(1 << 20));
    /// ```
    pub fn retention_time(mut self, time: Duration) -> Self {
        self.retention.time = Some(time);
        self.declare_retention()
    }

    /// Keeps about `bytes` per partition (Kafka's `retention.bytes`; default: the transport's,
    /// see [`Retention`]); older records beyond it are removed, on the embedded transport only
    /// once no consumer group still needs them. `u64::MAX` is no limit (`-1` on Kafka).
    pub fn retention_bytes(mut self, bytes: u64) -> Self {
        self.retention.bytes = Some(bytes);
        self.declare_retention()
    }

    fn declare_retention(self) -> Self {
        for n in self.names.iter() {
            self.core.declare_retention(n, self.retention);
        }
        self
    }

    /// Values are `V2`, encoded by the topic's value serializer (by default JSON; raw for
    /// [`Bytes`]).
    pub fn value_type<V2>(self) -> Topic<K, V2>
    where
        V2: Serialize + DeserializeOwned + 'static,
    {
        let (codec, problem) = resolve::<V2>(
            &self.core,
            self.name(),
            Side::Value,
            self.value_serializer.as_deref(),
        );
        let mut topic = self.value_codec_arc(codec);
        topic.value_problem = problem;
        topic
    }

    /// Keys are `K2`, encoded by the topic's key serializer (by default JSON; raw for
    /// [`Bytes`]).
    pub fn key_type<K2>(self) -> Topic<K2, V>
    where
        K2: Serialize + DeserializeOwned + 'static,
    {
        let (codec, problem) = resolve::<K2>(
            &self.core,
            self.name(),
            Side::Key,
            self.key_serializer.as_deref(),
        );
        let mut topic = self.key_codec_arc(codec);
        topic.key_problem = problem;
        topic
    }

    /// Encodes values with the serializer named `name` (Faust's
    /// `app.topic(..., value_serializer='raw')`): `json`, `raw` or `utf-8` (see
    /// [`SERIALIZERS`](crate::codec::SERIALIZERS)), for the value type given before or after
    /// with [`value_type`](Topic::value_type). An unknown name, or one that cannot carry the
    /// value type (`raw` takes [`Bytes`] or `String`), fails `App::start` with
    /// [`Error::Serializer`](crate::Error::Serializer) naming the topic, the serializer and
    /// the known ones.
    ///
    /// ```
    /// # use rill::prelude::*;
    /// let app = App::new("serializers-doc");
    /// let raw = app
    ///     .topic("raw-events")
    ///     .key_serializer("json")
    ///     .value_serializer("raw")
    ///     .key_type::<String>()
    ///     .value_type::<Bytes>();
    /// ```
    pub fn value_serializer(mut self, name: &str) -> Self
    where
        V: Serialize + DeserializeOwned + 'static,
    {
        self.value_serializer = Some(Arc::from(name));
        let (codec, problem) = resolve::<V>(&self.core, self.name(), Side::Value, Some(name));
        self.value_codec = codec;
        self.value_problem = problem;
        self
    }

    /// Encodes keys with the serializer named `name` (Faust's
    /// `app.topic(..., key_serializer='json')`), as
    /// [`value_serializer`](Topic::value_serializer) does values.
    pub fn key_serializer(mut self, name: &str) -> Self
    where
        K: Serialize + DeserializeOwned + 'static,
    {
        self.key_serializer = Some(Arc::from(name));
        let (codec, problem) = resolve::<K>(&self.core, self.name(), Side::Key, Some(name));
        self.key_codec = codec;
        self.key_problem = problem;
        self
    }

    /// An error if the key or value serializer cannot be used with the topic's types.
    pub(crate) fn check_serializers(&self) -> Result<()> {
        for (side, problem) in [
            (Side::Key, &self.key_problem),
            (Side::Value, &self.value_problem),
        ] {
            if let Some(problem) = problem {
                return Err(crate::Error::Serializer {
                    what: format!(
                        "the {} serializer of topic {:?}",
                        side.as_str(),
                        self.name()
                    ),
                    source: problem.clone(),
                });
            }
        }
        Ok(())
    }

    /// Values are `V2`, encoded by `codec` (e.g. [`Utf8`](crate::codec::Utf8)).
    pub fn value_codec<V2>(self, codec: impl Codec<V2>) -> Topic<K, V2> {
        let mut topic = self.value_codec_arc(Arc::new(codec));
        topic.value_problem = None;
        topic
    }

    /// Keys are `K2`, encoded by `codec`.
    pub fn key_codec<K2>(self, codec: impl Codec<K2>) -> Topic<K2, V> {
        let mut topic = self.key_codec_arc(Arc::new(codec));
        topic.key_problem = None;
        topic
    }

    fn value_codec_arc<V2>(self, codec: Arc<dyn Codec<V2>>) -> Topic<K, V2> {
        Topic {
            core: self.core,
            names: self.names,
            partitions: self.partitions,
            retention: self.retention,
            key_codec: self.key_codec,
            value_codec: codec,
            key_serializer: self.key_serializer,
            value_serializer: self.value_serializer,
            key_problem: self.key_problem,
            value_problem: self.value_problem,
        }
    }

    fn key_codec_arc<K2>(self, codec: Arc<dyn Codec<K2>>) -> Topic<K2, V> {
        Topic {
            core: self.core,
            names: self.names,
            partitions: self.partitions,
            retention: self.retention,
            key_codec: codec,
            value_codec: self.value_codec,
            key_serializer: self.key_serializer,
            value_serializer: self.value_serializer,
            key_problem: self.key_problem,
            value_problem: self.value_problem,
        }
    }

    pub(crate) fn spec(&self) -> TopicSpec {
        self.core.topic_spec(self.name(), self.partitions)
    }

    /// Sends `value` to the main topic. Set a key, partition or headers on the returned
    /// builder, then `.await` it. Needs a running app.
    pub fn send(&self, value: V) -> TopicSend<'_, K, V> {
        TopicSend {
            topic: self,
            value,
            key: None,
            partition: None,
            headers: Vec::new(),
        }
    }

    /// Sends already encoded bytes to the main topic, bypassing the codecs (for tools and for
    /// testing how agents treat bad input).
    pub async fn send_raw(
        &self,
        key: Option<Bytes>,
        value: Option<Bytes>,
        partition: Option<u32>,
    ) -> Result<RecordPosition> {
        let rt = self.core.runtime()?;
        rt.produce(&self.spec(), partition, key, value, Vec::new())
            .await
    }

    /// Queues `value` (no key) for a sink; durable at the next commit's flush.
    pub(crate) async fn enqueue_value(&self, value: V) -> Result<()> {
        let rt = self.core.runtime()?;
        let value = self.encode_value(&value)?;
        rt.enqueue_to(
            self.name(),
            || self.spec(),
            None,
            None,
            Some(value),
            Vec::new(),
        )
        .await
    }

    /// Queues `value` as [`enqueue_value`](Topic::enqueue_value) does when that needs no
    /// waiting (the topic is known, the transport has room); the value comes back otherwise.
    pub(crate) fn try_enqueue_value(&self, value: V) -> std::result::Result<Result<()>, V> {
        let Ok(rt) = self.core.runtime() else {
            return Err(value);
        };
        let bytes = match self.encode_value(&value) {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        rt.try_enqueue_value(self.name(), bytes).map_err(|_| value)
    }

    pub(crate) fn encode_key(&self, key: &K) -> Result<Bytes> {
        self.key_codec
            .encode(key)
            .map_err(|source| crate::Error::Encode {
                what: "key",
                topic: self.name().to_owned(),
                source,
            })
    }

    pub(crate) fn encode_value(&self, value: &V) -> Result<Bytes> {
        self.value_codec
            .encode(value)
            .map_err(|source| crate::Error::Encode {
                what: "value",
                topic: self.name().to_owned(),
                source,
            })
    }
}

/// A pending send to a topic; `.await` it. Returned by [`Topic::send`].
#[must_use = "a send does nothing until awaited"]
pub struct TopicSend<'a, K, V> {
    topic: &'a Topic<K, V>,
    value: V,
    key: Option<K>,
    partition: Option<u32>,
    headers: Headers,
}

impl<K: 'static, V: 'static> fmt::Debug for TopicSend<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicSend")
            .field("topic", &self.topic.name())
            .field("partition", &self.partition)
            .finish()
    }
}

impl<K, V> TopicSend<'_, K, V> {
    /// The message key: it picks the partition, as Kafka's Java client does.
    pub fn key(mut self, key: K) -> Self {
        self.key = Some(key);
        self
    }

    /// Sends to this partition instead of the one the key picks.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl<'a, K, V> IntoFuture for TopicSend<'a, K, V>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    type Output = Result<RecordPosition>;
    type IntoFuture = BoxFuture<'a, Result<RecordPosition>>;

    fn into_future(self) -> Self::IntoFuture {
        async move {
            let rt = self.topic.core.runtime()?;
            let key = self
                .key
                .as_ref()
                .map(|k| self.topic.encode_key(k))
                .transpose()?;
            let value = self.topic.encode_value(&self.value)?;
            rt.produce(
                &self.topic.spec(),
                self.partition,
                key,
                Some(value),
                self.headers,
            )
            .await
        }
        .boxed()
    }
}
