//! App settings and their defaults.

use std::collections::BTreeMap;
use std::time::Duration;

/// How often work is committed and what a consumer of the output may see twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProcessingGuarantee {
    /// Every event is processed at least once; after a crash, events processed since the last
    /// commit are processed again (the default, as in Faust and Kafka Streams).
    #[default]
    AtLeastOnce,
    /// Every event's effects are committed exactly once (see the exactly-once docs).
    ExactlyOnce,
}

impl std::str::FromStr for ProcessingGuarantee {
    type Err = String;

    /// `at_least_once` or `exactly_once` (dashes work too, as in Kafka Streams' values).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "at_least_once" => Ok(Self::AtLeastOnce),
            "exactly_once" | "exactly_once_v2" => Ok(Self::ExactlyOnce),
            other => Err(format!(
                "unknown processing guarantee {other:?}: use at_least_once or exactly_once"
            )),
        }
    }
}

impl std::fmt::Display for ProcessingGuarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessingGuarantee::AtLeastOnce => "at_least_once",
            ProcessingGuarantee::ExactlyOnce => "exactly_once",
        })
    }
}

/// What a worker does with a message an agent cannot read: one whose key or value its codec
/// cannot decode (bad JSON, wrong types, missing fields, invalid UTF-8, an empty payload or a
/// tombstone for a type that cannot be null) or that is larger than
/// [`Settings::max_payload_bytes`]. Either way the message is logged once (topic, partition,
/// offset, codec and error), counted ([`Worker::decode_errors`](crate::Worker::decode_errors)),
/// and the agent goes on with the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadInput {
    /// Skip the message: its offset is committed as if it had been processed (the default).
    #[default]
    Skip,
    /// Copy the message to the agent's dead-letter topic `<app id>-<agent>-dead-letter` (its
    /// key, value and headers as they were, plus `rill.error`, `rill.topic`,
    /// `rill.partition`, `rill.offset`, `rill.codec` and `rill.agent` headers), and commit
    /// its offset only once the copy is durable.
    DeadLetter,
}

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadInput::Skip => "skip",
            BadInput::DeadLetter => "dead-letter",
        })
    }
}

impl std::str::FromStr for BadInput {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(BadInput::Skip),
            "dead-letter" | "dead_letter" => Ok(BadInput::DeadLetter),
            other => Err(format!("expected skip or dead-letter, got {other:?}")),
        }
    }
}

/// Settings of an [`App`](crate::App). Every field has a default that suits development on the
/// embedded transport; see each field.
///
/// ```
/// use rill::{App, ProcessingGuarantee, Settings};
/// use std::time::Duration;
///
/// let app = App::with_settings(
///     "payments",
///     Settings {
///         broker: "kafka://127.0.0.1:9092".into(),
///         processing_guarantee: ProcessingGuarantee::ExactlyOnce,
///         commit_interval: Duration::from_secs(1),
///         ..Settings::default()
///     },
/// );
/// // Or change some on an app already made (before it starts):
/// app.configure(|s| s.store = "fjall://./payments-data".into());
/// assert_eq!(app.settings().topic_partitions, 8);
/// ```
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the app's topics live: `memory://` (embedded, the default), `memory://NAME` (an
    /// embedded broker shared by the apps of one process), `file://PATH[?fsync=...]` (embedded,
    /// on disk under `PATH/<app id>`: see [`FileBroker`](crate::transport::FileBroker)), or
    /// `kafka://host:port[,host:port]`.
    /// The `--broker` option and the `RILL_BROKER` environment variable override it.
    pub broker: String,
    /// Partitions of topics the app creates when the topic does not say (Faust's default: 8).
    pub topic_partitions: u32,
    /// Replication factor of topics the app creates (Kafka only).
    pub topic_replication_factor: i16,
    /// How often processed offsets are committed (Faust's default: 2.8 s); see also
    /// [`commit_every`](Settings::commit_every). With exactly-once processing and this left at
    /// its default, every 100 ms (Kafka Streams' default then), since outputs become visible
    /// only when committed; an interval set on purpose applies to exactly-once too (fewer,
    /// larger transactions, outputs visible later), up to 5 s, half the transactions'
    /// `transaction.timeout.ms` (past it the brokers abort a transaction). Exactly-once
    /// commits come further apart while they are slow (five times their average duration, at
    /// most 2 s).
    /// On the embedded transport the records a group
    /// has read and not committed stay in memory (see
    /// [`MemoryBroker`](crate::transport::MemoryBroker#what-is-kept)).
    pub commit_interval: Duration,
    /// Commit also after this many records read since the last commit (Faust's
    /// `broker_commit_every`). `None` (the default) takes the transport's: 10,000 on the
    /// embedded transport, where it bounds what the broker holds for the group however fast
    /// the agents go; none on Kafka, which commits by [`commit_interval`] only (each commit
    /// pauses the agents while the producer is flushed). `Some(0)` commits by interval only.
    ///
    /// [`commit_interval`]: Settings::commit_interval
    pub commit_every: Option<u64>,
    /// Capacity of each agent's input queue and of channels: the back-pressure bound.
    pub stream_buffer_maxsize: usize,
    /// How long `ask`, `map` and `join` wait for a reply.
    pub ask_timeout: Duration,
    /// Whether `ask`, `map` and `join` requests carry Faust's request headers
    /// (`Faust-Ag-ReplyTo`, `Faust-Ag-CorrelationId`) besides rill's own (default `true`), so
    /// that a Faust agent answers them too. A rill agent answers by rill's headers whenever
    /// they are there; turn this off to save the two headers when no Faust agent is asked.
    pub faust_ask_headers: bool,
    /// How long a stopping worker waits for agents to finish in-flight events.
    pub shutdown_timeout: Duration,
    /// Largest number of requests `map`/`join` keep in flight at once.
    pub map_max_inflight: usize,
    /// The processing guarantee (default at-least-once). With
    /// [`ExactlyOnce`](ProcessingGuarantee::ExactlyOnce) on Kafka, each commit is a Kafka
    /// transaction holding everything produced since the last one (agent outputs, sinks,
    /// changelog, repartition and reply records) and the input offsets; commits then happen at
    /// least every 100 ms, since outputs become visible to read-committed consumers only when
    /// committed. The `worker` command's `--processing-guarantee` and
    /// `RILL_PROCESSING_GUARANTEE` set it.
    pub processing_guarantee: ProcessingGuarantee,
    /// Names this worker across restarts (default: none, a new name per process). With
    /// exactly-once on Kafka its transactional id is `<app id>-<worker_id>`: a restarted worker
    /// then aborts the transaction its crashed predecessor left open at once, instead of
    /// read-committed consumers of its partitions waiting for the broker to time it out
    /// (`transaction.timeout.ms`, 10 s). Two live workers must not share a name. The
    /// `--worker-id` option and `RILL_WORKER_ID` set it.
    pub worker_id: Option<String>,
    /// What to do with a message an agent cannot read (default: skip it). Agents can override
    /// it with [`Agent::dead_letter`](crate::Agent::dead_letter); the `worker` command's
    /// `--bad-input` option and `RILL_BAD_INPUT` set it.
    pub bad_input: BadInput,
    /// Largest message (key and value together, in bytes) an agent accepts; a larger one is
    /// bad input (see [`BadInput`]). Default: 1 MiB, about Kafka's default largest message.
    pub max_payload_bytes: usize,
    /// Where tables keep a local copy of their partitions: `memory://` (the default: nothing
    /// is kept, a worker rebuilds its partitions from the changelogs) or `fjall://PATH` (a
    /// persistent store under `PATH/<app id>`: a restarted worker reads it and replays only
    /// the changelog written since). The `--store` option and `RILL_STORE` override it.
    pub store: String,
    /// The app's data directory (Faust's `datadir`): `None` (the default) is `<app id>-data`
    /// in the current directory (see [`App::datadir`](crate::App::datadir)). A worker on the
    /// app's own embedded broker (`memory://`) that serves the web announces itself there, in
    /// `worker.json` (its process id, web address, app id, a random instance id and its
    /// transport), written when it starts and removed when it stops. The app's commands in
    /// other processes (`send`, the app's own commands) read it to reach that worker instead
    /// of running the agents themselves; a second worker of the app with the same data
    /// directory refuses to start, naming the first. A named embedded broker
    /// (`memory://NAME`) is not announced. The `--datadir` option and `RILL_DATADIR` set it.
    pub datadir: Option<std::path::PathBuf>,
    /// Standby replicas of table partitions (Faust's `table_standby_replicas`): each table
    /// partition gets a warm copy on this many workers other than its owner, kept up to date
    /// by tailing the changelog, so a worker taking a partition over (failover, rebalance)
    /// replays only the few records its copy lacks. The copies go to the workers the group's
    /// range assignor will hand each partition to when its owner leaves. `None` (the default)
    /// means 1 on Kafka and 0 on the embedded transport. See the tables section of the README
    /// for the placement.
    pub table_standby_replicas: Option<u32>,
    /// Port of the worker's web server (table lookups): `None` (the default for workers
    /// started in code) serves nothing; the `worker` command serves on 6066, as Faust does,
    /// unless `--web-port` says otherwise. Port 0 picks a free port.
    pub web_port: Option<u16>,
    /// Address the web server binds: loopback unless configured otherwise.
    pub web_bind: String,
    /// The host other workers reach this worker's web server by (Faust's `web_host`): it is
    /// advertised to them for forwarded table lookups. `None` (the default) advertises the
    /// bound address, or, when that is unspecified (`0.0.0.0`, `::`), the machine's host name.
    pub web_host: Option<String>,
    /// librdkafka settings passed through to every Kafka client (SASL, SSL, timeouts, ...),
    /// e.g. `("security.protocol", "SASL_SSL")`. `RILL_KAFKA_*` environment variables add to
    /// them (`RILL_KAFKA_SASL_PASSWORD` sets `sasl.password`). Values are never logged.
    pub kafka: BTreeMap<String, String>,
    /// The serializer of the keys of the app's topics, by name (Faust's `key_serializer`): one
    /// of [`SERIALIZERS`](crate::codec::SERIALIZERS) (`json`, `raw`, `utf-8`). A topic's own
    /// [`key_serializer`](crate::Topic::key_serializer) or
    /// [`key_codec`](crate::Topic::key_codec) overrides it. `None` (the default): raw bytes
    /// for untyped keys ([`Bytes`](crate::Bytes)), JSON for typed ones. Read when a topic is
    /// declared (set it in [`App::with_settings`](crate::App::with_settings), or with
    /// `configure` before declaring topics); an unknown name fails `App::start`.
    pub key_serializer: Option<String>,
    /// The serializer of the values of the app's topics, by name (Faust's
    /// `value_serializer`), as [`key_serializer`](Settings::key_serializer) is for keys.
    /// `None` (the default): JSON, or raw bytes for [`Bytes`](crate::Bytes) values.
    pub value_serializer: Option<String>,
    /// The wall-clock time at the moment the worker starts, for crontabs on virtual time:
    /// with `Some(t)`, crontabs take "now" to be `t` plus the tokio time elapsed since the
    /// worker started, so under a paused tokio clock (`#[tokio::test(start_paused = true)]`)
    /// they fire as virtual time advances. `None` (the default) reads the system clock.
    pub clock_start: Option<std::time::SystemTime>,
}

/// [`Settings::commit_interval`]'s default (Faust's).
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(2800);
/// How often exactly-once commits come when [`Settings::commit_interval`] is left at its default
/// (Kafka Streams' `commit.interval.ms` under exactly-once).
const EXACTLY_ONCE_COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// The longest commit interval with exactly-once processing: half the transactions'
/// `transaction.timeout.ms` (10 s), after which the brokers abort a transaction.
pub(crate) const EXACTLY_ONCE_MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(5);

impl Settings {
    /// How often the worker commits (see [`Settings::commit_interval`]).
    pub(crate) fn effective_commit_interval(&self) -> Duration {
        match self.processing_guarantee {
            ProcessingGuarantee::AtLeastOnce => self.commit_interval,
            ProcessingGuarantee::ExactlyOnce if self.commit_interval == DEFAULT_COMMIT_INTERVAL => {
                EXACTLY_ONCE_COMMIT_INTERVAL
            }
            ProcessingGuarantee::ExactlyOnce => {
                self.commit_interval.min(EXACTLY_ONCE_MAX_COMMIT_INTERVAL)
            }
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker: "memory://".to_owned(),
            topic_partitions: 8,
            topic_replication_factor: 1,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            commit_every: None,
            stream_buffer_maxsize: 4096,
            ask_timeout: Duration::from_secs(30),
            faust_ask_headers: true,
            shutdown_timeout: Duration::from_secs(30),
            map_max_inflight: 1024,
            processing_guarantee: ProcessingGuarantee::AtLeastOnce,
            worker_id: None,
            bad_input: BadInput::Skip,
            max_payload_bytes: 1024 * 1024,
            store: "memory://".to_owned(),
            datadir: None,
            table_standby_replicas: None,
            web_port: None,
            web_bind: "127.0.0.1".to_owned(),
            web_host: None,
            kafka: BTreeMap::new(),
            key_serializer: None,
            value_serializer: None,
            clock_start: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(guarantee: ProcessingGuarantee, interval: Option<Duration>) -> Duration {
        let mut s = Settings {
            processing_guarantee: guarantee,
            ..Settings::default()
        };
        if let Some(i) = interval {
            s.commit_interval = i;
        }
        s.effective_commit_interval()
    }

    #[test]
    fn exactly_once_commits_every_100_ms_unless_told_otherwise() {
        use ProcessingGuarantee::{AtLeastOnce, ExactlyOnce};
        assert_eq!(with(AtLeastOnce, None), Duration::from_millis(2800));
        assert_eq!(with(ExactlyOnce, None), Duration::from_millis(100));
        // An interval set on purpose is kept, as Kafka Streams keeps `commit.interval.ms`...
        let second = Duration::from_secs(1);
        assert_eq!(with(ExactlyOnce, Some(second)), second);
        let short = Duration::from_millis(20);
        assert_eq!(with(ExactlyOnce, Some(short)), short);
        // ...up to half the transaction timeout.
        let long = Duration::from_secs(30);
        assert_eq!(with(ExactlyOnce, Some(long)), Duration::from_secs(5));
        assert_eq!(with(AtLeastOnce, Some(long)), long);
    }
}
