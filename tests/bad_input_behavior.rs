//! Bad input never stops a worker. Every kind of message an agent cannot read (bad JSON, wrong
//! types, missing fields, empty payloads, tombstones for a type that cannot be null, bytes
//! that are not UTF-8, oversized messages, undecodable keys) is sent between valid ones, on the
//! embedded transport and on Kafka (librdkafka's mock cluster, the bad bytes written by a plain
//! rdkafka producer): every valid event is processed as if the bad ones were not there, each bad
//! one is logged once and counted, offsets are committed past them, and with a dead-letter
//! topic each bad message is there with its original bytes and headers and the error headers.
//!
//! Then: a topic an agent reads that does not exist on Kafka, the report of an agent that
//! fails again and again, and random bytes through every codec and the decode path.

mod common;

use common::{wait_until_state, LogCapture, Recorder, LOGS, WAIT};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use rill::codec::{Codec, CodecError, Json, Raw, Utf8};
use rill::prelude::*;
use rill::transport::Message;
use rill::{BadInput, Worker};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::time::Duration;

/// Partitions of every topic: the only count the mock cluster's auto-creation gives.
const PARTITIONS: u32 = 4;
/// `max_payload_bytes` of the apps: a message with more bytes (key and value) is bad input.
const MAX_PAYLOAD: usize = 4096;
/// Bound for waits on processing; on Kafka it includes joining the consumer group.
const PROCESSED: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Logs: every line this test binary logs, so tests can check what a user reads.

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| LogCapture)
        .try_init();
}

/// The log lines that contain every one of `words` (whole whitespace-separated tokens, or,
/// for words with a space, substrings).
fn log_lines(words: &[&str]) -> Vec<String> {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    logs.lines()
        .filter(|line| {
            words.iter().all(|w| {
                if w.contains(' ') {
                    line.contains(w)
                } else {
                    line.split_whitespace().any(|t| t == *w)
                }
            })
        })
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Where the apps run: the embedded transport or a mock Kafka cluster.

enum Broker {
    Memory,
    Kafka {
        cluster: MockCluster<'static, DefaultProducerContext>,
        producer: FutureProducer,
    },
}

struct Harness {
    broker: Broker,
}

impl Harness {
    fn memory() -> Self {
        init_logging();
        Self {
            broker: Broker::Memory,
        }
    }

    fn kafka() -> Self {
        init_logging();
        let cluster = MockCluster::new(1).expect("the mock cluster starts");
        let producer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .expect("an rdkafka producer");
        Self {
            broker: Broker::Kafka { cluster, producer },
        }
    }

    fn name(&self) -> &'static str {
        match self.broker {
            Broker::Memory => "memory",
            Broker::Kafka { .. } => "kafka",
        }
    }

    /// An app on this harness's broker with [`MAX_PAYLOAD`] and [`PARTITIONS`].
    fn app(&self, id: &str, bad_input: BadInput) -> App {
        let app = App::new(format!("{id}-{}", self.name()));
        let kafka = match &self.broker {
            Broker::Memory => None,
            Broker::Kafka { cluster, .. } => {
                Some(format!("kafka://{}", cluster.bootstrap_servers()))
            }
        };
        app.configure(|s| {
            s.topic_partitions = PARTITIONS;
            s.max_payload_bytes = MAX_PAYLOAD;
            s.bad_input = bad_input;
            if let Some(url) = kafka {
                s.broker = url;
                // The mock's coordinator completes rebalances after the session timeout less
                // a second (see scenarios_kafka.rs); topics missing at start are looked for
                // every second.
                for (k, v) in [
                    ("session.timeout.ms", "6000"),
                    ("heartbeat.interval.ms", "1000"),
                    ("topic.metadata.refresh.interval.ms", "1000"),
                ] {
                    s.kafka.insert(k.into(), v.into());
                }
            }
        });
        app
    }

    /// Writes a message of raw bytes as any producer could, and returns its offset: on Kafka
    /// with a plain rdkafka producer, on the embedded transport through a raw-bytes topic of
    /// the running app.
    async fn send(&self, app: &App, topic: &str, m: &Produced) -> anyhow::Result<i64> {
        match &self.broker {
            Broker::Memory => {
                let raw = app.topic(topic).value_codec(Raw);
                let Some(value) = m.value.clone() else {
                    let at = raw.send_raw(m.key.clone(), None, Some(m.partition)).await?;
                    return Ok(at.offset);
                };
                let mut send = raw.send(value).partition(m.partition);
                if let Some(k) = &m.key {
                    send = send.key(k.clone());
                }
                for (name, value) in &m.headers {
                    send = send.header(name.clone(), value.clone());
                }
                Ok(send.await?.offset)
            }
            Broker::Kafka { producer, .. } => {
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(topic).partition(m.partition as i32);
                if let Some(k) = &m.key {
                    record = record.key(&k[..]);
                }
                if let Some(v) = &m.value {
                    record = record.payload(&v[..]);
                }
                let mut headers = OwnedHeaders::new();
                for (name, value) in &m.headers {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(&value[..]),
                    });
                }
                let delivery = producer
                    .send(record.headers(headers), Duration::from_secs(10))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("cannot produce to {topic}: {e}"))?;
                Ok(delivery.offset)
            }
        }
    }

    /// Every record of `topic`, waiting (bounded) until there are at least `count`.
    async fn read(&self, app: &App, topic: &str, count: usize) -> anyhow::Result<Vec<Message>> {
        let cluster = match &self.broker {
            Broker::Memory => {
                let mut got = Vec::new();
                wait_until_state(
                    PROCESSED,
                    &format!("{count} records are in {topic}"),
                    || {
                        got = common::read_all(app, topic);
                        got.len()
                    },
                    |n| *n >= count,
                )
                .await;
                return Ok(got);
            }
            Broker::Kafka { cluster, .. } => cluster,
        };
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let partitions = app.end_offsets(topic).await?.len();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + PROCESSED;
        while got.len() < count {
            let m = tokio::time::timeout_at(deadline, consumer.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("only {} of {count} records in {topic}", got.len())
                })??;
            let mut headers = Vec::new();
            for h in m.headers().iter().flat_map(|h| h.iter()) {
                let value = h.value.map(Bytes::copy_from_slice).unwrap_or_default();
                headers.push((h.key.to_owned(), value));
            }
            got.push(Message {
                topic: topic.into(),
                partition: m.partition() as u32,
                offset: m.offset(),
                timestamp: 0,
                key: m.key().map(Bytes::copy_from_slice),
                value: m.payload().map(Bytes::copy_from_slice),
                headers,
            });
        }
        Ok(got)
    }
}

/// A message as a producer writes it.
#[derive(Debug, Clone)]
struct Produced {
    partition: u32,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Bytes)>,
}

// ---------------------------------------------------------------------------------------------
// The messages.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: u32,
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON encodes"))
}

/// One bad message: what it is, its bytes, and what the log and the dead-letter headers must
/// say about it.
struct Bad {
    what: &'static str,
    key: Option<Bytes>,
    value: Option<Bytes>,
    codec: &'static str,
    /// Part of the error text.
    error: String,
}

fn codec_error<T: 'static>(codec: &dyn Codec<T>, bytes: &[u8]) -> String {
    match codec.decode(bytes) {
        Ok(_) => panic!("the {} codec decodes {bytes:?}", codec.name()),
        Err(CodecError { message, .. }) => message,
    }
}

/// The bad messages for the `readings` agent (JSON `Reading` values).
fn bad_readings() -> Vec<Bad> {
    let codec = Json::<Reading>::new();
    let value = |what, bytes: &'static [u8]| Bad {
        what,
        key: None,
        value: Some(Bytes::from_static(bytes)),
        codec: "json",
        error: codec_error(&codec, bytes),
    };
    let oversized = Reading {
        sensor: "s".repeat(MAX_PAYLOAD),
        value: 1,
    };
    vec![
        value("invalid JSON", b"{\"sensor\": \"s1\", "),
        value("wrong JSON types", b"{\"sensor\": 7, \"value\": \"high\"}"),
        value("a missing field", b"{\"sensor\": \"s1\"}"),
        value("an empty payload", b""),
        value("bytes that are not UTF-8", &[0xff, 0xfe, 0x00]),
        Bad {
            what: "a tombstone",
            key: Some(Bytes::from_static(b"gone")),
            value: None,
            codec: "json",
            error: format!("null value (tombstone): {}", codec_error(&codec, b"")),
        },
        Bad {
            what: "an oversized message (valid JSON)",
            key: None,
            value: Some(json(&oversized)),
            codec: "json",
            error: format!(
                "{} bytes is larger than max_payload_bytes ({MAX_PAYLOAD})",
                json(&oversized).len()
            ),
        },
    ]
}

/// The bad messages for the `words` agent (JSON `String` keys read with `items()`, UTF-8
/// values).
fn bad_words() -> Vec<Bad> {
    vec![
        Bad {
            what: "a value that is not UTF-8",
            key: Some(json(&"k")),
            value: Some(Bytes::from_static(&[0xc3, 0x28])),
            codec: "utf-8",
            error: codec_error(&Utf8, &[0xc3, 0x28]),
        },
        Bad {
            what: "an undecodable key",
            key: Some(Bytes::from_static(b"not json")),
            value: Some(Bytes::from_static(b"w")),
            codec: "json",
            error: codec_error(&Json::<String>::new(), b"not json"),
        },
    ]
}

/// Declares the agent `name` that reads `topic` and records every value it sees.
fn record_values<T>(app: &App, topic: &Topic<Bytes, T>, name: &str) -> Recorder<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let seen = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut stream: Stream<T>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = stream.next().await {
                rec.push(v);
            }
        }
    })
    .named(name)
    .channel(topic);
    seen
}

/// What an agent reading `items()` saw: every `(key, value)`, in order.
type SeenItems<K, T> = Recorder<(Option<K>, T)>;

/// Declares the agent `name` that reads `topic` with `items()` and records every `(key,
/// value)` it sees.
fn record_items<K, T>(
    app: &App,
    topic: &Topic<K, T>,
    name: &str,
) -> (Agent<T, (), K>, SeenItems<K, T>)
where
    K: Clone + Send + Sync + 'static,
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let seen = Recorder::new();
    let rec = seen.clone();
    let agent = app
        .agent(move |stream: Stream<T, K>| {
            let rec = rec.clone();
            async move {
                let mut items = stream.items();
                while let Some(item) = items.next().await {
                    rec.push(item);
                }
            }
        })
        .named(name)
        .channel(topic);
    (agent, seen)
}

/// The topics, agents and expectations of one run of the bad-input scenario.
struct Scenario {
    readings: String,
    words: String,
    seen_readings: Recorder<Reading>,
    seen_words: Recorder<(Option<String>, String)>,
}

impl Scenario {
    /// Declares on `app` the `readings` agent and the `words` agent (with its dead-letter
    /// override, if any).
    fn declare(app: &App, words_dead_letter: Option<bool>) -> Self {
        let (readings, words) = (
            format!("{}-readings", app.id()),
            format!("{}-words", app.id()),
        );
        let topic = app
            .topic(readings.as_str())
            .partitions(PARTITIONS)
            .value_type::<Reading>();
        let seen_readings = record_values(app, &topic, "readings");
        let topic = app
            .topic(words.as_str())
            .partitions(PARTITIONS)
            .key_type::<String>()
            .value_codec(Utf8);
        let (agent, seen_words) = record_items(app, &topic, "words");
        if let Some(enabled) = words_dead_letter {
            let _ = agent.dead_letter(enabled);
        }
        Scenario {
            readings,
            words,
            seen_readings,
            seen_words,
        }
    }
}

/// A bad message as sent: where it went, and what it was.
struct Sent {
    topic: String,
    partition: u32,
    offset: i64,
    message: Produced,
    bad: Bad,
}

/// Sends each bad message between valid ones; returns the bad ones as sent and the valid
/// values in the order an agent must see them.
async fn send_all(
    h: &Harness,
    app: &App,
    s: &Scenario,
) -> anyhow::Result<(Vec<Sent>, Vec<u32>, Vec<(Option<String>, String)>)> {
    let mut sent = Vec::new();
    let (mut readings, mut words) = (Vec::new(), Vec::new());
    let mut n = 0u32;
    let groups = [(&s.readings, 1, bad_readings()), (&s.words, 2, bad_words())];
    for (topic, partition, bads) in groups {
        for (i, bad) in bads.into_iter().enumerate() {
            n += 1;
            let good = if *topic == s.readings {
                readings.push(n);
                Produced {
                    partition,
                    key: None,
                    value: Some(json(&Reading {
                        sensor: "s1".into(),
                        value: n,
                    })),
                    headers: Vec::new(),
                }
            } else {
                // One valid word without a key.
                let key = (i > 0).then(|| format!("k{n}"));
                words.push((key.clone(), format!("w{n}")));
                Produced {
                    partition,
                    key: key.as_ref().map(json),
                    value: Some(Bytes::from(format!("w{n}"))),
                    headers: Vec::new(),
                }
            };
            h.send(app, topic, &good).await?;
            let message = Produced {
                partition,
                key: bad.key.clone(),
                value: bad.value.clone(),
                // Tombstones are sent without headers (the embedded raw send has none).
                headers: match bad.value {
                    Some(_) => vec![("trace-id".to_owned(), Bytes::from(format!("t{n}")))],
                    None => Vec::new(),
                },
            };
            let offset = h.send(app, topic, &message).await?;
            sent.push(Sent {
                topic: topic.clone(),
                partition,
                offset,
                message,
                bad,
            });
        }
    }
    // One more valid event at the end of each topic.
    readings.push(1000);
    let last = Reading {
        sensor: "s1".into(),
        value: 1000,
    };
    let last_reading = Produced {
        partition: 1,
        key: None,
        value: Some(json(&last)),
        headers: Vec::new(),
    };
    h.send(app, &s.readings, &last_reading).await?;
    words.push((Some("last".into()), "w-last".into()));
    let last_word = Produced {
        partition: 2,
        key: Some(json(&"last")),
        value: Some(Bytes::from_static(b"w-last")),
        headers: Vec::new(),
    };
    h.send(app, &s.words, &last_word).await?;
    Ok((sent, readings, words))
}

/// The bad-input scenario with the app's `bad_input` setting and the `words` agent's override.
async fn bad_input_between_valid_events(
    h: &Harness,
    id: &str,
    bad_input: BadInput,
    words_dead_letter: Option<bool>,
) -> anyhow::Result<()> {
    let app = h.app(id, bad_input);
    let s = Scenario::declare(&app, words_dead_letter);
    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    let (sent, readings, words) = send_all(h, &app, &s).await?;
    let bad_count = |topic: &str| sent.iter().filter(|b| b.topic == topic).count() as u64;
    wait_until_state(
        PROCESSED,
        "every valid event was processed and every bad one counted",
        || {
            (
                s.seen_readings.len(),
                s.seen_words.len(),
                worker.decode_errors(&s.readings),
                worker.decode_errors(&s.words),
            )
        },
        |st| {
            *st == (
                readings.len(),
                words.len(),
                bad_count(&s.readings),
                bad_count(&s.words),
            )
        },
    )
    .await;

    let dead_letters = [
        ("readings", &s.readings, bad_input == BadInput::DeadLetter),
        (
            "words",
            &s.words,
            words_dead_letter.unwrap_or(bad_input == BadInput::DeadLetter),
        ),
    ];
    for (agent, topic, enabled) in dead_letters {
        let dlq = format!("{}-{agent}-dead-letter", app.id());
        if enabled {
            let expected: Vec<&Sent> = sent.iter().filter(|b| b.topic == *topic).collect();
            let got = h.read(&app, &dlq, expected.len()).await?;
            check_dead_letters(agent, &expected, got);
        } else if let Broker::Memory = h.broker {
            assert_eq!(app.memory_broker().partitions(&dlq), None, "{dlq} exists");
        }
    }
    assert_eq!(
        worker.agent_errors("readings") + worker.agent_errors("words"),
        0
    );
    shutdown(worker).await?;

    let values: Vec<u32> = s.seen_readings.snapshot().iter().map(|r| r.value).collect();
    assert_eq!(values, readings, "the valid readings, in order");
    assert_eq!(s.seen_words.snapshot(), words, "the valid words, in order");
    for b in &sent {
        check_logged_once(b, dead_letters.iter().any(|d| d.1 == &b.topic && d.2));
    }
    for topic in [&s.readings, &s.words] {
        common::assert_group_committed_to_end(&app, topic).await?;
    }
    Ok(())
}

async fn shutdown(worker: Worker) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, worker.shutdown()).await??;
    Ok(())
}

/// One log line names the message's topic, partition, offset, codec and error.
fn check_logged_once(b: &Sent, dead_lettered: bool) {
    let topic = format!("topic={}", b.topic);
    let partition = format!("partition={}", b.partition);
    let offset = format!("offset={}", b.offset);
    let codec = format!("codec={}", b.bad.codec);
    let action = if dead_lettered {
        "sent to the dead-letter topic"
    } else {
        "event skipped"
    };
    let lines = log_lines(&["bad input: cannot read", &topic, &partition, &offset]);
    assert_eq!(
        lines.len(),
        1,
        "{}: one log line, got {lines:#?}",
        b.bad.what
    );
    let line = &lines[0];
    assert!(
        line.contains(&codec) && line.contains(&b.bad.error) && line.contains(action),
        "{}: the log line names the codec ({codec}), the error ({}) and what was done ({action}): {line}",
        b.bad.what,
        b.bad.error
    );
}

/// The dead-letter topic holds each bad message once, with its key, value and headers, and
/// the headers that say what was wrong.
fn check_dead_letters(agent: &str, expected: &[&Sent], got: Vec<Message>) {
    let header = |m: &Message, name: &str| {
        m.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| panic!("dead letter without {name}: {m:?}"))
    };
    let mut got: BTreeMap<i64, Message> = got
        .into_iter()
        .map(|m| (header(&m, "rill.offset").parse().expect("an offset"), m))
        .collect();
    assert_eq!(got.len(), expected.len(), "one dead letter per bad message");
    for b in expected {
        let m = got
            .remove(&b.offset)
            .unwrap_or_else(|| panic!("{}: no dead letter", b.bad.what));
        assert_eq!(m.key, b.message.key, "{}: the original key", b.bad.what);
        assert_eq!(
            m.value, b.message.value,
            "{}: the original value",
            b.bad.what
        );
        let n = b.message.headers.len();
        assert_eq!(
            m.headers[..n],
            b.message.headers[..],
            "{}: the original headers first",
            b.bad.what
        );
        assert_eq!(header(&m, "rill.topic"), b.topic);
        assert_eq!(header(&m, "rill.partition"), b.partition.to_string());
        assert_eq!(header(&m, "rill.codec"), b.bad.codec);
        assert_eq!(header(&m, "rill.agent"), agent);
        let error = header(&m, "rill.error");
        assert!(
            error.contains(&b.bad.error),
            "{}: rill.error {error:?}",
            b.bad.what
        );
    }
}

/// The scenario twice: by the app's setting bad input is skipped, but one agent sends it to
/// its dead-letter topic; then the other way round.
async fn skipped_or_dead_lettered(h: &Harness) -> anyhow::Result<()> {
    bad_input_between_valid_events(h, "skip", BadInput::Skip, Some(true)).await?;
    bad_input_between_valid_events(h, "dlq", BadInput::DeadLetter, Some(false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bad_input_is_skipped_or_dead_lettered() -> anyhow::Result<()> {
    skipped_or_dead_lettered(&Harness::memory()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_bad_input_is_skipped_or_dead_lettered() -> anyhow::Result<()> {
    skipped_or_dead_lettered(&Harness::kafka()).await
}

// ---------------------------------------------------------------------------------------------
// A topic that does not exist.

/// Declares a topic of `u64` values and an agent `name` that records what it reads.
fn recorder(app: &App, topic: &str, name: &str) -> Recorder<u64> {
    let topic = app.topic(topic).partitions(PARTITIONS).value_type::<u64>();
    record_values(app, &topic, name)
}

/// Sends `values` as JSON to partition 0 of `topic`.
async fn send_values(h: &Harness, app: &App, topic: &str, values: &[u64]) -> anyhow::Result<()> {
    for v in values {
        let m = Produced {
            partition: 0,
            key: None,
            value: Some(json(v)),
            headers: Vec::new(),
        };
        h.send(app, topic, &m).await?;
    }
    Ok(())
}

/// An agent reading a topic the brokers do not know and cannot create (auto-creation off, no
/// right to create topics, or deleted): the worker starts all the same, says which topic is
/// missing, and processes the other topics; once the topic exists, its events are processed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_topic_that_does_not_exist_is_reported_and_the_others_are_processed(
) -> anyhow::Result<()> {
    let h = Harness::kafka();
    let Broker::Kafka { cluster, .. } = &h.broker else {
        unreachable!("a Kafka harness")
    };
    let app = h.app("missing-topic", BadInput::Skip);
    let ghost = format!("{}-ghost", app.id());
    let real = format!("{}-real", app.id());
    // Metadata requests for the topic answer "unknown topic", and auto-creation does not help.
    cluster.topic_error(
        &ghost,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    )?;
    let seen_ghost = recorder(&app, &ghost, "ghost");
    let seen_real = recorder(&app, &real, "real");

    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    let lines = log_lines(&["does not exist", &format!("topic={ghost}")]);
    assert_eq!(
        lines.len(),
        1,
        "one error names the missing topic: {lines:#?}"
    );

    send_values(&h, &app, &real, &[1, 2, 3]).await?;
    wait_until_state(
        PROCESSED,
        "the existing topic's events were processed",
        || seen_real.snapshot(),
        |s| *s == [1, 2, 3],
    )
    .await;

    // The topic appears: the worker reads it as well.
    cluster.topic_error(&ghost, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)?;
    send_values(&h, &app, &ghost, &[7, 8]).await?;
    send_values(&h, &app, &real, &[4]).await?;
    wait_until_state(
        PROCESSED,
        "the new topic's events were processed, and the other's still are",
        || (seen_ghost.snapshot(), seen_real.snapshot()),
        |(g, r)| *g == [7, 8] && *r == [1, 2, 3, 4],
    )
    .await;

    // A topic that disappears (deleted) does not stop the worker either.
    cluster.topic_error(
        &real,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    )?;
    let gone = format!("topic not available: {real}:");
    wait_until_state(
        PROCESSED,
        "the consumer noticed that the topic is gone",
        || log_lines(&[&gone]).len(),
        |n| *n > 0,
    )
    .await;
    send_values(&h, &app, &ghost, &[9]).await?;
    wait_until_state(
        PROCESSED,
        "the remaining topic's events were processed",
        || seen_ghost.snapshot(),
        |g| *g == [7, 8, 9],
    )
    .await;
    shutdown(worker).await
}

/// A dead-letter record the brokers refuse at first is retried (the partition waits) until it
/// is written, and only then is the bad event committed: nothing is lost, nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_refused_dead_letter_record_is_retried_before_its_event_is_committed(
) -> anyhow::Result<()> {
    const REFUSALS: usize = 3;
    let h = Harness::kafka();
    let Broker::Kafka { cluster, .. } = &h.broker else {
        unreachable!("a Kafka harness")
    };
    let app = h.app("dead-letter-retry", BadInput::DeadLetter);
    let topic = format!("{}-numbers", app.id());
    let seen = recorder(&app, &topic, "numbers");
    // In the log before the worker starts: the worker's first write is the dead letter.
    send_values(&h, &app, &topic, &[1]).await?;
    let bad = Produced {
        partition: 0,
        key: Some(Bytes::from_static(b"k")),
        value: Some(Bytes::from_static(b"not a number")),
        headers: vec![("trace-id".into(), Bytes::from_static(b"t1"))],
    };
    let offset = h.send(&app, &topic, &bad).await?;
    send_values(&h, &app, &topic, &[2]).await?;
    // The broker's "unknown server error": a refusal that is not about the record, which
    // librdkafka does not retry itself. One about the record, such as "too large", gets a
    // truncated copy instead (see the next test).
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; REFUSALS],
    );

    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    wait_until_state(
        PROCESSED,
        "the valid events were processed and the bad one counted",
        || (seen.snapshot(), worker.decode_errors(&topic)),
        |s| *s == (vec![1, 2], 1),
    )
    .await;
    let dead_letter = format!("{}-numbers-dead-letter", app.id());
    let got = h.read(&app, &dead_letter, 1).await?;
    shutdown(worker).await?;
    assert_eq!(got.len(), 1, "one dead letter");
    assert_eq!((&got[0].key, &got[0].value), (&bad.key, &bad.value));
    let refused = format!("cannot write the dead-letter record of {topic}[0]@{offset};");
    let refused = log_lines(&[&refused]);
    assert_eq!(
        refused.len(),
        REFUSALS,
        "each refusal is logged: {refused:#?}"
    );
    common::assert_group_committed_to_end(&app, &topic).await?;
    Ok(())
}

/// A bad record too large for its dead-letter copy (larger than the producer's
/// `message.max.bytes`, 1,000,000 bytes by default, but within `max_payload_bytes`, 1 MiB)
/// does not hold up the agent: its other partitions are processed, the refusal is logged and
/// counted, and the dead-letter topic gets a truncated copy that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_bad_record_too_large_for_its_dead_letter_copy_gets_a_truncated_one(
) -> anyhow::Result<()> {
    const BAD_SIZE: usize = 1_010_000;
    let h = Harness::kafka();
    let Broker::Kafka { cluster, .. } = &h.broker else {
        unreachable!("a Kafka harness")
    };
    let app = h.app("dead-letter-too-large", BadInput::DeadLetter);
    app.configure(|s| {
        s.max_payload_bytes = 1024 * 1024;
        s.web_port = Some(0);
    });
    // The web server (for the metrics) comes with the membership topic, of one partition.
    cluster.create_topic(&format!("{}-workers", app.id()), 1, 1)?;
    let topic = format!("{}-numbers", app.id());
    let seen = recorder(&app, &topic, "numbers");
    // Written by a producer that takes larger messages than rill's.
    let large: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("message.max.bytes", "2000000")
        .create()?;
    let payload = vec![b'x'; BAD_SIZE];
    let record = FutureRecord::<[u8], [u8]>::to(&topic)
        .partition(0)
        .payload(&payload[..])
        .headers(OwnedHeaders::new().insert(Header {
            key: "trace-id",
            value: Some(&b"t1"[..]),
        }));
    let offset = large
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("cannot produce the large record: {e}"))?
        .offset;

    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    wait_until_state(
        PROCESSED,
        "the agent met the large bad record",
        || worker.decode_errors(&topic),
        |n| *n == 1,
    )
    .await;
    // Sent only now, so that the agent has the bad record first.
    let valid: Vec<u64> = (1..=20).collect();
    for v in &valid {
        let m = Produced {
            partition: 1,
            key: None,
            value: Some(json(v)),
            headers: Vec::new(),
        };
        h.send(&app, &topic, &m).await?;
    }
    wait_until_state(
        PROCESSED,
        "the 20 valid events of partition 1 were processed",
        || seen.snapshot(),
        |s| *s == valid,
    )
    .await;

    let dead_letter = format!("{}-numbers-dead-letter", app.id());
    let got = h.read(&app, &dead_letter, 1).await?;
    let (_, metrics) = tokio::task::spawn_blocking({
        let addr = worker.web_addr().expect("the worker serves the web");
        move || common::http_get(addr, "/metrics")
    })
    .await?;
    shutdown(worker).await?;

    assert_eq!(got.len(), 1, "one dead letter");
    let m = &got[0];
    let header = |name: &str| {
        m.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let value = m.value.as_deref().unwrap_or_default();
    assert!(
        !value.is_empty() && value.len() < 1_000_000 && payload.starts_with(value),
        "the copy holds the start of the value ({} bytes)",
        value.len()
    );
    assert_eq!(
        m.headers.first(),
        Some(&("trace-id".to_owned(), Bytes::from_static(b"t1"))),
        "the original headers first"
    );
    assert_eq!(header("rill.truncated").as_deref(), Some("true"));
    assert_eq!(
        header("rill.original-size"),
        Some(BAD_SIZE.to_string()),
        "the original size"
    );
    assert_eq!(header("rill.topic").as_deref(), Some(topic.as_str()));
    assert_eq!(header("rill.partition").as_deref(), Some("0"));
    assert_eq!(header("rill.offset"), Some(offset.to_string()));
    assert_eq!(header("rill.agent").as_deref(), Some("numbers"));

    let refused = format!("cannot write the dead-letter record of {topic}[0]@{offset};");
    let refused = log_lines(&[&refused, "writing a truncated copy instead"]);
    assert_eq!(refused.len(), 1, "the refusal is logged once: {refused:#?}");
    assert!(
        refused[0].contains("too large"),
        "the log line says why: {}",
        refused[0]
    );
    let app_label = format!("app=\"{}\"", app.id());
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("rill_dead_letter_errors_total{")
                && l.contains(&app_label)
                && l.contains("agent=\"numbers\"")
        })
        .collect();
    assert_eq!(
        counted
            .iter()
            .map(|l| l.rsplit(' ').next())
            .collect::<Vec<_>>(),
        vec![Some("1")],
        "counted once: {counted:?}"
    );
    common::assert_group_committed_to_end(&app, &topic).await?;
    Ok(())
}

/// A dead-letter copy the brokers keep refusing (for a reason that is not the record's) does not
/// hold up the agent: the events after the bad one, on its partition and the others, are
/// processed meanwhile, but the bad event is not committed until its copy is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_dead_letter_copy_that_keeps_failing_does_not_hold_up_the_agent(
) -> anyhow::Result<()> {
    let h = Harness::kafka();
    let Broker::Kafka { cluster, .. } = &h.broker else {
        unreachable!("a Kafka harness")
    };
    let app = h.app("dead-letter-refused", BadInput::DeadLetter);
    let topic = format!("{}-numbers", app.id());
    let seen = recorder(&app, &topic, "numbers");
    let bad = Produced {
        partition: 0,
        key: None,
        value: Some(Bytes::from_static(b"not a number")),
        headers: Vec::new(),
    };
    let offset = h.send(&app, &topic, &bad).await?;
    // After the bad record on its partition (so read after it), and on another one.
    let mut valid = Vec::new();
    for partition in [0, 1] {
        for v in 1..=10 {
            let v = partition * 100 + v;
            let m = Produced {
                partition,
                key: None,
                value: Some(json(&v)),
                headers: Vec::new(),
            };
            h.send(&app, &topic, &m).await?;
            valid.push(u64::from(v));
        }
    }
    // From now on every write is refused, until the errors are cleared.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 1000],
    );

    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    wait_until_state(
        PROCESSED,
        "the valid events after the bad one were processed while its copy is refused",
        || {
            let mut s = seen.snapshot();
            s.sort_unstable();
            s
        },
        |s| *s == valid,
    )
    .await;
    let committed = app.committed_offsets().await?;
    assert!(
        committed
            .iter()
            .all(|(tp, c)| !(*tp.topic == *topic && tp.partition == 0 && *c > offset)),
        "the bad event is committed before its copy is written: {committed:?}"
    );

    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let dead_letter = format!("{}-numbers-dead-letter", app.id());
    let got = h.read(&app, &dead_letter, 1).await?;
    assert_eq!(got.len(), 1, "one dead letter");
    assert_eq!(got[0].value, bad.value, "the whole value");
    // Committed by the worker once the copy is written (not just by the final commit).
    let deadline = tokio::time::Instant::now() + PROCESSED;
    loop {
        let committed = app.committed_offsets().await?;
        if committed
            .iter()
            .any(|(tp, c)| *tp.topic == *topic && tp.partition == 0 && *c > offset)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad event is not committed after its copy was written: {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown(worker).await?;
    common::assert_group_committed_to_end(&app, &topic).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// An agent that fails again and again.

/// Each failure of an agent body is reported with the agent, the event (topic, partition,
/// offset), the error and how many times the agent has failed; the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_agent_failures_are_reported_with_the_event_and_the_count() -> anyhow::Result<()> {
    let h = Harness::memory();
    let app = h.app("crash-report", BadInput::Skip);
    let topic_name = format!("{}-numbers", app.id());
    let topic = app
        .topic(topic_name.as_str())
        .partitions(1)
        .value_type::<u64>();
    let seen: Recorder<u64> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut stream: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = stream.next().await {
                if v % 2 == 1 {
                    return Err(format!("odd number {v}"));
                }
                rec.push(v);
            }
            Ok(())
        }
    })
    .named("evens")
    .channel(&topic);

    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    for v in 0..8u64 {
        topic.send(v).partition(0).await?;
    }
    wait_until_state(
        WAIT,
        "the even numbers were processed and the odd ones failed",
        || (seen.len(), worker.agent_errors("evens")),
        |s| *s == (4, 4),
    )
    .await;
    shutdown(worker).await?;
    assert_eq!(seen.snapshot(), [0, 2, 4, 6]);
    for (n, offset) in [1, 3, 5, 7].into_iter().enumerate() {
        let words = [
            "agent=evens".to_owned(),
            format!("topic={topic_name}"),
            "partition=0".to_owned(),
            format!("offset={offset}"),
            format!("failures={}", n + 1),
        ];
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let lines = log_lines(&words);
        assert_eq!(
            lines.len(),
            1,
            "one report of failure {} ({words:?})",
            n + 1
        );
        let (error, event) = (
            format!("odd number {offset}"),
            format!("{topic_name}[0]@{offset}"),
        );
        assert!(
            lines[0].contains(&error) && lines[0].contains(&event),
            "the report says {event} and {error}: {}",
            lines[0]
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Arbitrary bytes.

/// A small deterministic random generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// `sample` with a few random edits: flipped, inserted, removed or duplicated bytes, or a
    /// truncation. Mostly almost-valid input, which reaches deeper into a parser.
    fn mutate(&mut self, sample: &[u8]) -> Vec<u8> {
        let mut b = sample.to_vec();
        for _ in 0..=self.below(3) {
            let at = self.below(b.len());
            match self.below(5) {
                0 if !b.is_empty() => b[at] ^= 1 << self.below(8),
                1 => b.insert(at.min(b.len()), self.next() as u8),
                2 if !b.is_empty() => {
                    b.remove(at);
                }
                3 => b.truncate(at),
                _ => {
                    let end = (at + self.below(8)).min(b.len());
                    let piece = b[at.min(end)..end].to_vec();
                    b.splice(at.min(b.len())..at.min(b.len()), piece);
                }
            }
        }
        b
    }
}

/// Valid JSON of several shapes, to mutate.
const SAMPLES: [&[u8]; 6] = [
    br#"{"sensor": "s1", "value": 7}"#,
    br#"{"a": [1, 2.5e3, -0, true, null], "b": {"c": "\u00e9\ud83d\ude00\n"}}"#,
    br#""a string with \"escapes\" and \\ slashes""#,
    b"[18446744073709551615, -9223372036854775808, 1e400, 0.000001]",
    br#"[[[[[[[[[[{"deep": [[[[[]]]]]}]]]]]]]]]]"#,
    b"12345678901234567890123456789012345678901234567890",
];

/// Decodes `bytes` with `codec`; a value that decodes encodes and decodes again to itself.
fn decode_round_trip<T: PartialEq + std::fmt::Debug + 'static>(codec: &dyn Codec<T>, bytes: &[u8]) {
    if let Ok(v) = codec.decode(bytes) {
        let again = codec.encode(&v).expect("a decoded value encodes");
        assert_eq!(
            codec.decode(&again).ok(),
            Some(v),
            "{} round trip of {bytes:?}",
            codec.name()
        );
    }
}

/// Every codec, fed random bytes and mutated JSON: errors, never panics; whatever decodes
/// (floats aside) round-trips; raw bytes pass through and UTF-8 accepts exactly the valid text.
#[test]
fn codecs_never_panic_on_arbitrary_bytes() {
    let mut rng = Rng(0x5eed_0fba_d10b);
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"null".to_vec(),
        vec![b'['; 100_000],
        [vec![b'['; 5000], vec![b']'; 5000]].concat(),
    ];
    for i in 0..20_000 {
        let input = if i % 2 == 0 {
            rng.bytes(64)
        } else {
            let sample = SAMPLES[rng.below(SAMPLES.len())];
            rng.mutate(sample)
        };
        inputs.push(input);
    }
    for bytes in &inputs {
        decode_round_trip(&Json::<Reading>::new(), bytes);
        decode_round_trip(&Json::<Option<u32>>::new(), bytes);
        decode_round_trip(&Json::<String>::new(), bytes);
        decode_round_trip(&Json::<Vec<i64>>::new(), bytes);
        decode_round_trip(&Json::<(u8, bool)>::new(), bytes);
        // Floats do not always read back bit for bit (serde_json's fast parser): these only
        // must not panic.
        let _ = Json::<BTreeMap<String, serde_json::Value>>::new().decode(bytes);
        let _ = Json::<serde_json::Value>::new().decode(bytes);
        let _ = Json::<f64>::new().decode(bytes);
        assert_eq!(Raw.decode(bytes).ok().as_deref(), Some(&bytes[..]));
        assert_eq!(
            Utf8.decode(bytes).ok().as_deref(),
            std::str::from_utf8(bytes).ok()
        );
    }
}

/// Random records through a worker's decode path (size check, value codec, key codec in
/// `items()`): the worker never stops, every valid record is processed in order, and every
/// other one is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_records_never_stop_the_worker() -> anyhow::Result<()> {
    const RECORDS: usize = 600;
    const MAX: usize = 256;
    let h = Harness::memory();
    let app = h.app("random-records", BadInput::Skip);
    app.configure(|s| s.max_payload_bytes = MAX);
    let topic = app
        .topic("random")
        .partitions(1)
        .key_type::<String>()
        .value_type::<Reading>();
    let (_, seen) = record_items(&app, &topic, "random");

    let mut rng = Rng(0x00de_c0de);
    let (keys, values) = (Json::<String>::new(), Json::<Reading>::new());
    let mut valid = Vec::new();
    let worker = tokio::time::timeout(WAIT, app.start()).await??;
    for i in 0..RECORDS {
        let key = match rng.below(5) {
            0 => None,
            1 => Some(rng.bytes(16)),
            _ => Some(json(&format!("k{i}")).to_vec()),
        };
        let good = json(&Reading {
            sensor: "s".repeat(rng.below(MAX)),
            value: i as u32,
        });
        let value = match rng.below(6) {
            0 => None,
            1 => Some(rng.bytes(MAX * 2)),
            2 => Some(rng.mutate(&good)),
            _ => Some(good.to_vec()),
        };
        let size = key.as_ref().map_or(0, Vec::len) + value.as_ref().map_or(0, Vec::len);
        let key_ok = key
            .as_ref()
            .map(|k| keys.decode(k).map(Some))
            .unwrap_or(Ok(None));
        let value_ok = values.decode(value.as_deref().unwrap_or_default());
        if let (true, Ok(k), Ok(v)) = (size <= MAX, key_ok, value_ok) {
            valid.push((k, v));
        }
        topic
            .send_raw(key.map(Bytes::from), value.map(Bytes::from), Some(0))
            .await?;
    }
    let bad = (RECORDS - valid.len()) as u64;
    assert!(bad > 100 && valid.len() > 100, "both kinds: {bad} bad");
    wait_until_state(
        WAIT,
        "every record was processed or counted",
        || (seen.len(), worker.decode_errors("random")),
        |s| *s == (valid.len(), bad),
    )
    .await;
    assert_eq!(worker.agent_errors("random"), 0);
    shutdown(worker).await?;
    assert_eq!(seen.snapshot(), valid);
    common::assert_committed_to_end(&app, "random");
    Ok(())
}
