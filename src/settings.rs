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

impl std::fmt::Display for ProcessingGuarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessingGuarantee::AtLeastOnce => "at-least-once",
            ProcessingGuarantee::ExactlyOnce => "exactly-once",
        })
    }
}

/// Settings of an [`App`](crate::App). Every field has a default that suits development on the
/// embedded transport; see each field.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the app's topics live: `memory://` (embedded, the default), `memory://NAME` (an
    /// embedded broker shared by the apps of one process), or `kafka://host:port[,host:port]`.
    /// The `--broker` option and the `RILL_BROKER` environment variable override it.
    pub broker: String,
    /// Partitions of topics the app creates when the topic does not say (Faust's default: 8).
    pub topic_partitions: u32,
    /// Replication factor of topics the app creates (Kafka only).
    pub topic_replication_factor: i16,
    /// How often processed offsets are committed (Faust's default: 2.8 s).
    pub commit_interval: Duration,
    /// Capacity of each agent's input queue and of channels: the back-pressure bound.
    pub stream_buffer_maxsize: usize,
    /// How long `ask`, `map` and `join` wait for a reply.
    pub ask_timeout: Duration,
    /// How long a stopping worker waits for agents to finish in-flight events.
    pub shutdown_timeout: Duration,
    /// Largest number of requests `map`/`join` keep in flight at once.
    pub map_max_inflight: usize,
    /// The processing guarantee.
    pub processing_guarantee: ProcessingGuarantee,
    /// Where tables keep a local copy of their partitions: `memory://` (the default: nothing
    /// is kept, a worker rebuilds its partitions from the changelogs) or `fjall://PATH` (a
    /// persistent store under `PATH/<app id>`: a restarted worker reads it and replays only
    /// the changelog written since). The `--store` option and `RILL_STORE` override it.
    pub store: String,
    /// Standby replicas of table partitions (Faust's `table_standby_replicas`): with one or
    /// more, every worker keeps a warm copy of the table partitions it does not own by tailing
    /// the changelogs, so a worker taking a partition over (failover, rebalance) replays only
    /// the few records its copy lacks. `None` (the default) means 1 on Kafka and 0 on the
    /// embedded transport. See the tables section of the README for the placement.
    pub table_standby_replicas: Option<u32>,
    /// Port of the worker's web server (table lookups): `None` (the default for workers
    /// started in code) serves nothing; the `worker` command serves on 6066, as Faust does,
    /// unless `--web-port` says otherwise. Port 0 picks a free port.
    pub web_port: Option<u16>,
    /// Address the web server binds: loopback unless configured otherwise.
    pub web_bind: String,
    /// librdkafka settings passed through to every Kafka client (SASL, SSL, timeouts, ...),
    /// e.g. `("security.protocol", "SASL_SSL")`. `RILL_KAFKA_*` environment variables add to
    /// them (`RILL_KAFKA_SASL_PASSWORD` sets `sasl.password`). Values are never logged.
    pub kafka: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            broker: "memory://".to_owned(),
            topic_partitions: 8,
            topic_replication_factor: 1,
            commit_interval: Duration::from_millis(2800),
            stream_buffer_maxsize: 4096,
            ask_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            map_max_inflight: 1024,
            processing_guarantee: ProcessingGuarantee::AtLeastOnce,
            store: "memory://".to_owned(),
            table_standby_replicas: None,
            web_port: None,
            web_bind: "127.0.0.1".to_owned(),
            kafka: BTreeMap::new(),
        }
    }
}
