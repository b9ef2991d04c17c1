//! The remote transport: the embedded broker of a worker running in another process, reached
//! through that worker's web server (`remote://HOST:PORT`).
//!
//! An embedded worker (`memory://`) that serves the web publishes its broker under
//! `/transport`, so that the app's commands in other processes (`send`, `send @agent`, the
//! app's own commands, `ask`, `map`, `join`) work on it as they do on Kafka. The command line
//! finds the worker by itself (its `worker.json` in the app's data directory); a program can
//! also connect with `--broker remote://HOST:PORT` or
//! [`Settings::broker`](crate::Settings::broker).
//!
//! A remote client cannot join the app's consumer group: an embedded app has exactly one
//! worker (use Kafka for several), so [`Transport::group_consumer`] is refused.
//!
//! # The API
//!
//! Bodies are JSON (`Content-Type: application/json`). Keys, values and header values are
//! bytes, written in standard base64 (`"aGk="`); a missing key or value (`null`) is none, a
//! `null` value is a tombstone. Errors are a status code (400 bad request, 404 unknown topic,
//! 409 partition mismatch, 422 refused record, 500 other) with `{"error": {"kind", "message",
//! ...}}`, where `kind` is `unknown_topic`, `unknown_partition` (with `topic`, `partition`,
//! `partitions`), `partition_mismatch` (with `topic`, `declared`, `actual`), `rejected` or
//! `other`.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /transport` | | `{"app", "instance", "pid", "transport": "memory"}`: who answers |
//! | `PUT /transport/topics/{topic}` | `{"partitions", "compacted", "retention_ms", "retention_bytes"}` | `{"partitions"}`: creates the topic if missing (`ensure_topic`) |
//! | `GET /transport/topics/{topic}` | | `{"partitions", "start_offsets", "end_offsets"}`, or 404 |
//! | `POST /transport/records` | `{"records": [{"topic", "partition", "key", "value", "headers": [[name, value]], "timestamp"}]}` | `{"results": [{"partition", "offset"} or {"error"}]}`, one per record, in order |
//! | `POST /transport/read` | `{"topic", "from": [[partition, offset]], "max", "wait_ms"}` | `{"records": [{"partition", "offset", "timestamp", "key", "value", "headers"}], "next": [[partition, offset]]}` |
//! | `GET /transport/groups/{group}/offsets` | | `{"offsets": [[topic, partition, offset]]}`: what the group committed |
//!
//! `read` returns up to `max` records (at most 1024) of the given partitions, each from its
//! offset (or from the partition's first record, when it no longer holds that offset). When
//! none has a record there, it waits up to `wait_ms` (at most 30 s) for one: a bounded long
//! poll, which is how a client reads the replies to its `ask`. `next` is where to read from
//! next time. Topic and group names in paths are percent-encoded.
//!
//! Records sent through `/transport/records` with the headers `rill-producer-id` and
//! `rill-producer-seq` are appended once however often they are sent (see
//! [idempotent writers](super#idempotent-writers)); the remote transport numbers every record
//! it sends so, and sends a batch again when it did not hear back.

use super::{
    Consumer, ConsumerEvent, Headers, Message, OutgoingRecord, RecordPosition, Retention, StartAt,
    TopicPartition, TopicSpec, Transport, PRODUCER_ID_HEADER, PRODUCER_SEQ_HEADER,
};
use crate::error::TransportError;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most records one `read` answer holds.
pub(crate) const MAX_READ: usize = 1024;
/// Longest wait of one `read`.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);
/// How long a reader waits per request: short enough that a worker going away is noticed.
const READ_WAIT: Duration = Duration::from_secs(5);
/// Most records the transport sends in one request.
const MAX_BATCH: usize = 512;
/// Most bytes (keys and values) the transport sends in one request, past its first record.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Records waiting to be sent.
const QUEUE: usize = 1024;
/// How long a request other than `read` may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a batch is sent before its records fail, when the worker does not answer.
const SEND_ATTEMPTS: u32 = 5;
/// The wait before the first retry of a batch; it doubles each time.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The largest answer taken from the worker.
const BODY_LIMIT: usize = 256 << 20;

// ---- The wire format, shared with the server (`web::transport`). ----

/// Bytes in base64, for the JSON bodies.
mod base64_bytes {
    use base64::Engine;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn encode(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    pub(super) fn decode(s: &str) -> Result<Bytes, String> {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(Bytes::from)
            .map_err(|e| format!("not base64 ({e}): {s:?}"))
    }

    pub(super) fn serialize<S: Serializer>(b: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_str(&encode(b)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| decode(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Headers as `[[name, base64 value]]`.
mod base64_headers {
    use super::Headers;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(h: &Headers, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(h.iter().map(|(k, v)| (k, super::base64_bytes::encode(v))))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Headers, D::Error> {
        let pairs: Vec<(String, String)> = Vec::deserialize(d)?;
        pairs
            .into_iter()
            .map(|(k, v)| {
                super::base64_bytes::decode(&v)
                    .map(|v| (k, v))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// Who answers at an address: `GET /transport`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Hello {
    /// The app id of the worker.
    pub(crate) app: String,
    /// The worker's instance id (random per run).
    pub(crate) instance: String,
    /// The worker's process id.
    pub(crate) pid: u32,
    /// The transport it publishes: `memory`.
    pub(crate) transport: String,
}

/// A topic to create: `PUT /transport/topics/{topic}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TopicBody {
    pub(crate) partitions: u32,
    #[serde(default)]
    pub(crate) compacted: bool,
    #[serde(default)]
    pub(crate) retention_ms: Option<u64>,
    #[serde(default)]
    pub(crate) retention_bytes: Option<u64>,
}

impl TopicBody {
    fn of(spec: &TopicSpec) -> Self {
        Self {
            partitions: spec.partitions,
            compacted: spec.compacted,
            retention_ms: spec
                .retention
                .time
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            retention_bytes: spec.retention.bytes,
        }
    }

    /// The spec of topic `name`.
    pub(crate) fn spec(&self, name: &str) -> TopicSpec {
        TopicSpec {
            name: name.to_owned(),
            partitions: self.partitions,
            replication_factor: 1,
            compacted: self.compacted,
            retention: Retention {
                time: self.retention_ms.map(Duration::from_millis),
                bytes: self.retention_bytes,
            },
        }
    }
}

/// The partitions of a topic: the answer of `PUT` (partitions only) and `GET
/// /transport/topics/{topic}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TopicInfo {
    pub(crate) partitions: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) start_offsets: Vec<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) end_offsets: Vec<i64>,
}

/// A record to append.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireRecord {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    #[serde(default, with = "base64_bytes")]
    pub(crate) key: Option<Bytes>,
    #[serde(default, with = "base64_bytes")]
    pub(crate) value: Option<Bytes>,
    #[serde(default, with = "base64_headers")]
    pub(crate) headers: Headers,
    #[serde(default)]
    pub(crate) timestamp: Option<i64>,
}

impl WireRecord {
    fn of(r: &OutgoingRecord) -> Self {
        Self {
            topic: r.topic.to_string(),
            partition: r.partition,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp: r.timestamp,
        }
    }

    pub(crate) fn into_record(self) -> OutgoingRecord {
        OutgoingRecord {
            topic: Arc::from(self.topic),
            partition: self.partition,
            key: self.key,
            value: self.value,
            headers: self.headers,
            timestamp: self.timestamp,
        }
    }
}

/// `POST /transport/records`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Records {
    pub(crate) records: Vec<WireRecord>,
}

/// Where one record went, or why it did not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Written {
    At { partition: u32, offset: i64 },
    Failed { error: WireError },
}

/// The answer of `POST /transport/records`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriteResults {
    pub(crate) results: Vec<Written>,
}

/// `POST /transport/read`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Read {
    pub(crate) topic: String,
    pub(crate) from: Vec<(u32, i64)>,
    #[serde(default)]
    pub(crate) max: Option<usize>,
    #[serde(default)]
    pub(crate) wait_ms: Option<u64>,
}

/// A record read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReadRecord {
    pub(crate) partition: u32,
    pub(crate) offset: i64,
    pub(crate) timestamp: i64,
    #[serde(default, with = "base64_bytes")]
    pub(crate) key: Option<Bytes>,
    #[serde(default, with = "base64_bytes")]
    pub(crate) value: Option<Bytes>,
    #[serde(default, with = "base64_headers")]
    pub(crate) headers: Headers,
}

impl ReadRecord {
    pub(crate) fn of(m: Message) -> Self {
        Self {
            partition: m.partition,
            offset: m.offset,
            timestamp: m.timestamp,
            key: m.key,
            value: m.value,
            headers: m.headers,
        }
    }
}

/// The answer of `POST /transport/read`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReadResult {
    pub(crate) records: Vec<ReadRecord>,
    pub(crate) next: Vec<(u32, i64)>,
}

/// The answer of `GET /transport/groups/{group}/offsets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Offsets {
    pub(crate) offsets: Vec<(String, u32, i64)>,
}

/// A [`TransportError`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireError {
    pub(crate) kind: String,
    pub(crate) message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) partition: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) partitions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) declared: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) actual: Option<u32>,
}

/// An error answer: `{"error": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: WireError,
}

impl WireError {
    /// A bad request, or another failure that is not the log's.
    pub(crate) fn other(message: impl Into<String>) -> Self {
        Self::of(&TransportError::Other(message.into()))
    }

    /// The status code of an answer carrying this error.
    pub(crate) fn status(&self) -> u16 {
        match self.kind.as_str() {
            "unknown_topic" | "unknown_partition" => 404,
            "partition_mismatch" => 409,
            "rejected" => 422,
            _ => 500,
        }
    }

    pub(crate) fn of(e: &TransportError) -> Self {
        let mut w = Self {
            kind: "other".to_owned(),
            message: e.to_string(),
            topic: None,
            partition: None,
            partitions: None,
            declared: None,
            actual: None,
        };
        match e {
            TransportError::UnknownTopic(topic) => {
                w.kind = "unknown_topic".to_owned();
                w.topic = Some(topic.clone());
            }
            TransportError::UnknownPartition {
                topic,
                partition,
                partitions,
            } => {
                w.kind = "unknown_partition".to_owned();
                w.topic = Some(topic.clone());
                w.partition = Some(*partition);
                w.partitions = Some(*partitions);
            }
            TransportError::PartitionMismatch {
                topic,
                declared,
                actual,
            } => {
                w.kind = "partition_mismatch".to_owned();
                w.topic = Some(topic.clone());
                w.declared = Some(*declared);
                w.actual = Some(*actual);
            }
            TransportError::Rejected(_) => w.kind = "rejected".to_owned(),
            _ => {}
        }
        w
    }

    /// The error as the transport's callers know it; `base` names the worker for the rest.
    fn into_error(self, base: &str) -> TransportError {
        let topic = self.topic.clone().unwrap_or_default();
        match (self.kind.as_str(), self.partition, self.partitions) {
            ("unknown_topic", _, _) => TransportError::UnknownTopic(topic),
            ("unknown_partition", Some(partition), Some(partitions)) => {
                TransportError::UnknownPartition {
                    topic,
                    partition,
                    partitions,
                }
            }
            ("partition_mismatch", _, _) => match (self.declared, self.actual) {
                (Some(declared), Some(actual)) => TransportError::PartitionMismatch {
                    topic,
                    declared,
                    actual,
                },
                _ => TransportError::Other(format!("the worker at {base}: {}", self.message)),
            },
            ("rejected", _, _) => TransportError::Rejected(self.message),
            _ => TransportError::Other(format!("the worker at {base}: {}", self.message)),
        }
    }
}

// ---- The HTTP client. ----

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

fn client() -> &'static HttpClient {
    static CLIENT: std::sync::OnceLock<HttpClient> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http()
    })
}

/// What a path segment keeps as is: letters, digits and `-._~` (RFC 3986's unreserved).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Why a request got no answer worth reading.
#[derive(Debug)]
enum Failure {
    /// No answer (connection refused or reset, timeout): sending again may help.
    Unanswered(String),
    /// An error answer.
    Answered(u16, Vec<u8>),
}

/// Sends a request to the worker at `base` (`http://host:port`); the body of a success (2xx).
async fn request(
    base: &str,
    method: axum::http::Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Bytes, Failure> {
    use http_body_util::BodyExt;
    let mut builder = axum::http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    if body.is_some() {
        builder = builder.header(axum::http::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(http_body_util::Full::new(Bytes::from(
            body.unwrap_or_default(),
        )))
        .map_err(|e| Failure::Unanswered(format!("bad address {base}: {e}")))?;
    let exchange = async {
        let response = client()
            .request(request)
            .await
            .map_err(|e| Failure::Unanswered(describe_client_error(&e)))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| Failure::Unanswered(format!("cannot read the answer: {e}")))?
            .to_bytes();
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(Failure::Answered(status, body.to_vec()))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(Failure::Unanswered(format!("no answer within {timeout:?}"))),
    }
}

/// The client error with its cause (hyper's own message is only "client error (Connect)").
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The error a failed request is to the transport's callers.
fn failed(base: &str, what: &str, failure: Failure) -> TransportError {
    match failure {
        Failure::Unanswered(e) => {
            TransportError::Other(format!("the worker at {base} did not answer {what}: {e}"))
        }
        Failure::Answered(status, body) => match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error.into_error(base),
            Err(_) => TransportError::Other(format!(
                "the worker at {base} answered {what} with {status}: {}",
                String::from_utf8_lossy(&body)
            )),
        },
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    base: &str,
    what: &str,
    body: &[u8],
) -> Result<T, TransportError> {
    serde_json::from_slice(body).map_err(|e| {
        TransportError::Other(format!(
            "the worker at {base} answered {what} with something else than expected ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, TransportError> {
    serde_json::to_vec(value)
        .map_err(|e| TransportError::Other(format!("cannot write a request: {e}")))
}

/// Who answers at `base` (`http://host:port`), waiting at most `timeout`.
pub(crate) async fn hello(base: &str, timeout: Duration) -> Result<Hello, TransportError> {
    let body = request(base, axum::http::Method::GET, "/transport", None, timeout)
        .await
        .map_err(|f| failed(base, "GET /transport", f))?;
    parse(base, "GET /transport", &body)
}

/// A random id, different in each process and each call.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

// ---- The transport. ----

/// A record waiting to be sent, and who waits for where it went.
struct Pending {
    record: OutgoingRecord,
    done: oneshot::Sender<Result<RecordPosition, TransportError>>,
}

/// The remote transport: a client of a worker's embedded broker, over its web server.
pub(crate) struct RemoteTransport {
    /// `http://host:port`.
    base: Arc<str>,
    /// What the worker said it is.
    hello: Hello,
    /// To the task that numbers and sends records, in order.
    records: mpsc::Sender<Pending>,
}

impl fmt::Debug for RemoteTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTransport")
            .field("base", &self.base)
            .field("app", &self.hello.app)
            .finish()
    }
}

impl RemoteTransport {
    /// Connects to the worker at `address` (`host:port`, what follows `remote://`), checking
    /// that a rill worker publishing its broker answers there.
    pub(crate) async fn connect(address: &str) -> Result<Self, TransportError> {
        let address = address.trim_end_matches('/');
        if address.is_empty() {
            return Err(TransportError::UnsupportedUrl("remote://".to_owned()));
        }
        let base: Arc<str> = Arc::from(format!("http://{address}"));
        let hello = hello(&base, REQUEST_TIMEOUT).await.map_err(|e| {
            TransportError::Other(format!(
                "no rill worker publishing its broker answers at remote://{address}: {e}"
            ))
        })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let producer = format!("{:016x}", random_id());
        tokio::spawn(send_records(base.clone(), producer, rx));
        Ok(Self {
            base,
            hello,
            records: tx,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, TransportError> {
        let what = format!("GET {path}");
        let body = request(
            &self.base,
            axum::http::Method::GET,
            path,
            None,
            REQUEST_TIMEOUT,
        )
        .await
        .map_err(|f| failed(&self.base, &what, f))?;
        parse(&self.base, &what, &body)
    }
}

/// Numbers the records it is given and sends them in order, in batches of what is waiting;
/// a batch that got no answer is sent again, as it was, so the broker keeps each record once.
/// Ends when the transport is dropped.
async fn send_records(base: Arc<str>, producer: String, mut rx: mpsc::Receiver<Pending>) {
    let mut seq: u64 = 0;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut bytes = 0;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.record.key.as_ref().map_or(0, Bytes::len)
                        + p.record.value.as_ref().map_or(0, Bytes::len);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let records: Vec<WireRecord> = batch
            .iter()
            .map(|p| {
                let mut r = WireRecord::of(&p.record);
                r.headers
                    .push((PRODUCER_ID_HEADER.to_owned(), Bytes::from(producer.clone())));
                r.headers
                    .push((PRODUCER_SEQ_HEADER.to_owned(), Bytes::from(seq.to_string())));
                seq += 1;
                r
            })
            .collect();
        let results = send_batch(&base, &Records { records }).await;
        match results {
            Ok(results) if results.len() == batch.len() => {
                for (p, result) in batch.into_iter().zip(results) {
                    let _ = p.done.send(match result {
                        Written::At { partition, offset } => {
                            Ok(RecordPosition { partition, offset })
                        }
                        Written::Failed { error } => Err(error.into_error(&base)),
                    });
                }
            }
            Ok(results) => {
                let e = format!(
                    "the worker at {base} answered {} results for {} records",
                    results.len(),
                    batch.len()
                );
                for p in batch {
                    let _ = p.done.send(Err(TransportError::Other(e.clone())));
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.done.send(Err(copy(&e)));
                }
            }
        }
    }
}

/// The same error again, for each record of a batch that failed.
fn copy(e: &TransportError) -> TransportError {
    match e {
        TransportError::Rejected(m) => TransportError::Rejected(m.clone()),
        TransportError::UnknownTopic(t) => TransportError::UnknownTopic(t.clone()),
        other => TransportError::Other(other.to_string()),
    }
}

/// Sends a batch, again while the worker does not answer (up to [`SEND_ATTEMPTS`] times).
async fn send_batch(base: &str, records: &Records) -> Result<Vec<Written>, TransportError> {
    let what = "POST /transport/records";
    let body = json(records)?;
    let mut backoff = RETRY_BACKOFF;
    let mut attempt = 1;
    loop {
        let answer = request(
            base,
            axum::http::Method::POST,
            "/transport/records",
            Some(body.clone()),
            REQUEST_TIMEOUT,
        )
        .await;
        match answer {
            Ok(body) => return Ok(parse::<WriteResults>(base, what, &body)?.results),
            Err(Failure::Unanswered(e)) if attempt < SEND_ATTEMPTS => {
                tracing::warn!(worker = %base, error = %e, attempt, "sending records again");
            }
            Err(Failure::Answered(status, _)) if status >= 500 && attempt < SEND_ATTEMPTS => {
                tracing::warn!(worker = %base, status, attempt, "sending records again");
            }
            Err(f) => return Err(failed(base, what, f)),
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
        attempt += 1;
    }
}

impl Transport for RemoteTransport {
    fn kind(&self) -> &'static str {
        "remote"
    }

    fn ensure_topic(&self, spec: TopicSpec) -> BoxFuture<'_, Result<u32, TransportError>> {
        async move {
            let path = format!("/transport/topics/{}", segment(&spec.name));
            let what = format!("PUT {path}");
            let body = request(
                &self.base,
                axum::http::Method::PUT,
                &path,
                Some(json(&TopicBody::of(&spec))?),
                REQUEST_TIMEOUT,
            )
            .await
            .map_err(|f| failed(&self.base, &what, f))?;
            Ok(parse::<TopicInfo>(&self.base, &what, &body)?.partitions)
        }
        .boxed()
    }

    fn partition_count(&self, topic: &str) -> BoxFuture<'_, Result<Option<u32>, TransportError>> {
        let path = format!("/transport/topics/{}", segment(topic));
        async move {
            match self.get::<TopicInfo>(&path).await {
                Ok(info) => Ok(Some(info.partitions)),
                Err(TransportError::UnknownTopic(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn send(
        &self,
        record: OutgoingRecord,
    ) -> BoxFuture<'_, Result<RecordPosition, TransportError>> {
        async move {
            let (done, answer) = oneshot::channel();
            let gone = || {
                TransportError::Other(format!(
                    "the connection to the worker at {} is closed",
                    self.base
                ))
            };
            self.records
                .send(Pending { record, done })
                .await
                .map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        }
        .boxed()
    }

    fn enqueue(&self, record: OutgoingRecord) -> BoxFuture<'_, Result<(), TransportError>> {
        // Records are sent in order, so waiting for each costs only its round trip; a flush
        // then has nothing left to wait for.
        async move { self.send(record).await.map(|_| ()) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        async { Ok(()) }.boxed()
    }

    fn end_offsets(&self, topic: &str) -> BoxFuture<'_, Result<Vec<i64>, TransportError>> {
        let path = format!("/transport/topics/{}", segment(topic));
        async move { Ok(self.get::<TopicInfo>(&path).await?.end_offsets) }.boxed()
    }

    fn group_consumer(&self, group: &str) -> Result<Box<dyn Consumer>, TransportError> {
        Err(TransportError::Other(format!(
            "cannot join the consumer group {group:?} of the worker at {} (app {:?}) from \
             another process: an embedded app has exactly one worker, which runs its agents; \
             use Kafka (--broker kafka://...) to run several workers of an app",
            self.base, self.hello.app
        )))
    }

    fn topic_consumer(
        &self,
        topic: &str,
        start: StartAt,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        let topic = topic.to_owned();
        async move {
            let path = format!("/transport/topics/{}", segment(&topic));
            let info = self.get::<TopicInfo>(&path).await?;
            let positions = match start {
                StartAt::Earliest => (0..info.partitions).map(|p| (p, 0)).collect(),
                StartAt::Latest => (0..info.partitions)
                    .map(|p| (p, info.end_offsets.get(p as usize).copied().unwrap_or(0)))
                    .collect(),
            };
            Ok(Box::new(RemoteConsumer {
                base: self.base.clone(),
                topic,
                positions,
                paused: HashSet::new(),
            }) as Box<dyn Consumer>)
        }
        .boxed()
    }

    fn partitions_consumer(
        &self,
        topic: &str,
        starts: Vec<(u32, i64)>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, TransportError>> {
        let topic = topic.to_owned();
        async move {
            let path = format!("/transport/topics/{}", segment(&topic));
            let info = self.get::<TopicInfo>(&path).await?;
            if let Some((p, _)) = starts.iter().find(|(p, _)| *p >= info.partitions) {
                return Err(TransportError::UnknownPartition {
                    topic,
                    partition: *p,
                    partitions: info.partitions,
                });
            }
            Ok(Box::new(RemoteConsumer {
                base: self.base.clone(),
                topic,
                positions: starts,
                paused: HashSet::new(),
            }) as Box<dyn Consumer>)
        }
        .boxed()
    }

    fn committed(
        &self,
        group: &str,
    ) -> BoxFuture<'_, Result<Vec<(TopicPartition, i64)>, TransportError>> {
        let path = format!("/transport/groups/{}/offsets", segment(group));
        async move {
            let offsets = self.get::<Offsets>(&path).await?;
            Ok(offsets
                .offsets
                .into_iter()
                .map(|(t, p, o)| (TopicPartition::new(t, p), o))
                .collect())
        }
        .boxed()
    }
}

/// Reads partitions of a topic of the worker's broker, outside any group.
struct RemoteConsumer {
    base: Arc<str>,
    topic: String,
    /// Each partition read, and the offset to read it from next.
    positions: Vec<(u32, i64)>,
    paused: HashSet<u32>,
}

impl fmt::Debug for RemoteConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteConsumer")
            .field("base", &self.base)
            .field("topic", &self.topic)
            .field("partitions", &self.positions.len())
            .finish()
    }
}

impl RemoteConsumer {
    /// One long poll: the records that came, and where to read next.
    async fn read(&self, from: Vec<(u32, i64)>) -> Result<ReadResult, TransportError> {
        let what = "POST /transport/read";
        let body = json(&Read {
            topic: self.topic.clone(),
            from,
            max: Some(MAX_READ),
            wait_ms: Some(READ_WAIT.as_millis() as u64),
        })?;
        let answer = request(
            &self.base,
            axum::http::Method::POST,
            "/transport/read",
            Some(body),
            READ_WAIT + REQUEST_TIMEOUT,
        )
        .await
        .map_err(|f| failed(&self.base, what, f))?;
        parse(&self.base, what, &answer)
    }
}

impl Consumer for RemoteConsumer {
    fn subscribe(&mut self, _topics: &[String]) -> Result<(), TransportError> {
        Err(TransportError::Other(
            "a consumer outside a group cannot subscribe".into(),
        ))
    }

    /// # Cancel safety
    ///
    /// Cancel safe: positions move only when an answer is taken, so a poll dropped mid-way
    /// reads the same records again next time.
    fn poll(&mut self) -> BoxFuture<'_, Result<ConsumerEvent, TransportError>> {
        async move {
            loop {
                let from: Vec<(u32, i64)> = self
                    .positions
                    .iter()
                    .filter(|(p, _)| !self.paused.contains(p))
                    .copied()
                    .collect();
                if from.is_empty() {
                    // Everything paused: nothing comes until a resume, which a new poll sees.
                    futures::future::pending::<()>().await;
                }
                let result = self.read(from).await?;
                for (p, next) in result.next {
                    if let Some(position) = self.positions.iter_mut().find(|(q, _)| *q == p) {
                        position.1 = position.1.max(next);
                    }
                }
                if !result.records.is_empty() {
                    let topic: Arc<str> = Arc::from(self.topic.as_str());
                    let messages = result
                        .records
                        .into_iter()
                        .map(|r| Message {
                            topic: topic.clone(),
                            partition: r.partition,
                            offset: r.offset,
                            timestamp: r.timestamp,
                            key: r.key,
                            value: r.value,
                            headers: r.headers,
                        })
                        .collect();
                    return Ok(ConsumerEvent::Messages(messages));
                }
            }
        }
        .boxed()
    }

    fn commit(
        &mut self,
        _offsets: Vec<(TopicPartition, i64)>,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        async {
            Err(TransportError::Other(
                "a consumer outside a group has nothing to commit".into(),
            ))
        }
        .boxed()
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        for tp in partitions.iter().filter(|tp| *tp.topic == *self.topic) {
            self.paused.insert(tp.partition);
        }
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), TransportError> {
        for tp in partitions {
            self.paused.remove(&tp.partition);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cross_the_wire_unchanged() {
        let record = WireRecord {
            topic: "t".into(),
            partition: 3,
            key: Some(Bytes::from_static(b"\x00k")),
            value: None,
            headers: vec![("h".into(), Bytes::from_static(b"\xffv"))],
            timestamp: Some(5),
        };
        let text = serde_json::to_string(&record).expect("write");
        let back: WireRecord = serde_json::from_str(&text).expect("read");
        assert_eq!(back.key, record.key);
        assert_eq!(back.value, None, "a tombstone stays one");
        assert_eq!(back.headers, record.headers);
        assert_eq!((back.partition, back.timestamp), (3, Some(5)));
        let bad = r#"{"topic":"t","partition":0,"value":"@@"}"#;
        let err = serde_json::from_str::<WireRecord>(bad)
            .expect_err("not base64")
            .to_string();
        assert!(err.contains("base64"), "{err}");
    }

    #[test]
    fn errors_cross_the_wire_as_the_callers_know_them() {
        let e = TransportError::PartitionMismatch {
            topic: "t".into(),
            declared: 2,
            actual: 8,
        };
        let w = WireError::of(&e);
        assert_eq!(w.status(), 409);
        assert!(matches!(
            w.into_error("http://x"),
            TransportError::PartitionMismatch {
                declared: 2,
                actual: 8,
                ..
            }
        ));
        let w = WireError::of(&TransportError::UnknownTopic("t".into()));
        assert_eq!(w.status(), 404);
        assert!(matches!(w.into_error("http://x"), TransportError::UnknownTopic(t) if t == "t"));
    }
}
