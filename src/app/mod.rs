//! The application: settings, and the registry of topics, channels, agents and commands.

mod command;
pub(crate) mod discovery;
mod timers;
mod worker;

pub(crate) use command::CommandSpec;
pub(crate) use worker::Signals;
pub use worker::Worker;

use crate::agent::{default_name, Agent, AgentFn, AgentRunner};
use crate::channel::Channel;
use crate::engine::queue::queue;
use crate::engine::reply::run_replies;
use crate::engine::{AppCore, Dispatcher, Runtime};
use crate::error::{BoxError, Error, Result, TransportError};
use crate::settings::{ProcessingGuarantee, Settings};
use crate::table::{Table, TableKey, TableRunner, TableValue};
use crate::topic::{Topic, TopicNames};
use crate::transport::memory::MemoryTransport;
use crate::transport::{MemoryBroker, StartAt, TopicPartition, TopicSpec, Transport};
use command::Command;

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a started app runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Agents, timers, crontabs and tasks: the `worker` command and [`App::start`].
    Worker,
    /// Agents only: an app's command on the embedded transport when no worker of the app
    /// runs, so nobody else runs them (timers belong to workers, as in Faust).
    Agents,
    /// Neither: only what sending and asking need (on Kafka, or as the client of the app's
    /// running embedded worker, on `remote://`).
    Client,
}

impl Role {
    /// The role of a command-line tool: on the embedded transport it runs the agents itself.
    pub(crate) fn for_command(embedded: bool) -> Self {
        if embedded {
            Role::Agents
        } else {
            Role::Client
        }
    }
}

/// A rill application: its id, settings, topics, channels, agents and commands.
///
/// Declare everything, then either run the command line with [`App::main`] (which gives the
/// `worker` command and the app's own commands) or start a worker in code with
/// [`App::start`].
///
/// ```
/// # use rill::prelude::*;
/// #[derive(Serialize, Deserialize, Clone)]
/// struct Add { a: i64, b: i64 }
///
/// fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
///     stream! {
///         while let Some(value) = stream.next().await {
///             yield value.a + value.b;
///         }
///     }
/// }
///
/// # #[tokio::main] async fn main() -> rill::Result<()> {
/// let app = App::new("agent-example");
/// let topic = app.topic("adding").value_type::<Add>();
/// let adding = app.agent(adding).channel(&topic);
///
/// let worker = app.start().await?;
/// assert_eq!(adding.ask(Add { a: 2, b: 2 }).await?, 4);
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct App {
    pub(crate) core: Arc<AppCore>,
    agents: Arc<Mutex<Vec<Arc<dyn AgentRunner>>>>,
    pub(crate) commands: Arc<Mutex<Vec<Arc<dyn CommandSpec>>>>,
    /// The program's name as it was run, for usage lines (see [`App::main_from`]).
    pub(crate) program: Arc<Mutex<Option<String>>>,
    tables: Arc<Mutex<Vec<Arc<dyn TableRunner>>>>,
    channels: Arc<AtomicUsize>,
    pub(crate) timers: Arc<crate::timer::Timers>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("id", &self.core.id)
            .field("agents", &self.agent_names())
            .finish()
    }
}

impl App {
    /// An app with default [`Settings`] (embedded transport).
    pub fn new(id: impl Into<String>) -> Self {
        Self::with_settings(id, Settings::default())
    }

    /// An app with the given settings.
    pub fn with_settings(id: impl Into<String>, settings: Settings) -> Self {
        Self {
            core: Arc::new(AppCore::new(Arc::from(id.into()), settings)),
            agents: Arc::new(Mutex::new(Vec::new())),
            commands: Arc::new(Mutex::new(Vec::new())),
            program: Arc::new(Mutex::new(None)),
            tables: Arc::new(Mutex::new(Vec::new())),
            channels: Arc::new(AtomicUsize::new(0)),
            timers: Arc::default(),
        }
    }

    /// The app id: the consumer group, and the prefix of internal topics.
    pub fn id(&self) -> &str {
        &self.core.id
    }

    /// A copy of the current settings.
    pub fn settings(&self) -> Settings {
        self.core.settings()
    }

    /// Changes settings; takes effect the next time a worker starts.
    pub fn configure(&self, f: impl FnOnce(&mut Settings)) -> &Self {
        self.core.configure(f);
        self
    }

    /// Declares a topic description with one or more names (the first is the main topic).
    /// Keys are raw bytes and values JSON until [`key_type`](Topic::key_type) /
    /// [`value_type`](Topic::value_type) say otherwise. Declared topics are created when the
    /// worker starts.
    pub fn topic(&self, names: impl TopicNames) -> Topic {
        let names = names.into_names();
        assert!(!names.is_empty(), "a topic needs at least one name");
        Topic::new(self.core.clone(), names)
    }

    /// A new in-memory channel, bounded by the `stream_buffer_maxsize` setting.
    pub fn channel<T: Send + 'static>(&self) -> Channel<T> {
        let n = self.channels.fetch_add(1, Ordering::Relaxed);
        Channel::new(
            format!("{}-channel-{n}", self.core.id),
            self.core.settings().stream_buffer_maxsize,
        )
    }

    /// Declares an agent running `f`, Faust's `@app.agent()`. Configure it with the returned
    /// handle: [`channel`](Agent::channel) (its topic or channel; by default a topic named
    /// after the function, e.g. `agent.adding`), [`concurrency`](Agent::concurrency),
    /// [`sink`](Agent::sink), [`named`](Agent::named).
    pub fn agent<F, T, K, R, M>(&self, f: F) -> Agent<T, R, K>
    where
        F: AgentFn<T, K, R, M>,
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Serialize + Clone + Send + Sync + 'static,
        K: Send + Sync + 'static,
    {
        let name = default_name::<F>();
        let agent = Agent::new(self.core.clone(), name, Arc::new(move |s| f.call(s)));
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(agent.clone()));
        agent
    }

    /// A handle on an agent that another service runs (a Faust agent, or a rill agent of
    /// another app), to [`send`](Agent::send), [`ask`](Agent::ask) or [`map`](Agent::map) it
    /// through its topic, as a Faust client declares the agents it asks. This worker does not
    /// read the topic; give it with [`channel`](Agent::channel) (by default the topic is
    /// `name`). Faust agents answer rill's `ask` while
    /// [`Settings::faust_ask_headers`](crate::Settings::faust_ask_headers) is on (the default).
    ///
    /// ```
    /// use rill::prelude::*;
    ///
    /// let app = App::new("client");
    /// let adds = app.topic("adds").key_codec(Utf8).value_type::<i64>();
    /// // `@app.agent(adds)` in a Faust app, answering with an integer.
    /// let add = app.remote_agent::<i64, i64, String>("faust-add").channel(&adds);
    /// assert_eq!(add.name(), "faust-add");
    /// ```
    pub fn remote_agent<T, R, K>(&self, name: impl Into<String>) -> Agent<T, R, K>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Serialize + Clone + Send + Sync + 'static,
        K: Send + Sync + 'static,
    {
        let runs_elsewhere: crate::agent::BoxAgentFn<T, K, R> =
            Arc::new(|_| futures::StreamExt::boxed(futures::stream::empty()));
        Agent::new(self.core.clone(), String::new(), runs_elsewhere).named(name)
    }

    /// Declares an agent running `f(stream, state)`: an agent that needs state (a table, a
    /// client, a counter) stays a plain named function, and each of its runs gets a clone of
    /// `state`, as an axum handler gets its router's state. Named, and configured, as
    /// [`agent`](App::agent) does.
    ///
    /// ```
    /// use rill::prelude::*;
    ///
    /// async fn count_words(mut words: Stream<String>, counts: Table<String, i64>) {
    ///     while let Some(word) = words.next().await {
    ///         counts.update(word, |n| *n += 1);
    ///     }
    /// }
    ///
    /// let app = App::new("word-count");
    /// let words = app.topic("words").value_type::<String>();
    /// let counts = app.table::<String, i64>("counts");
    /// app.agent_with(counts.clone(), count_words).channel(&words);
    /// ```
    pub fn agent_with<S, F, T, K, R, M>(&self, state: S, f: F) -> Agent<T, R, K>
    where
        crate::agent::WithState<F, S>: AgentFn<T, K, R, M>,
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Serialize + Clone + Send + Sync + 'static,
        K: Send + Sync + 'static,
    {
        let name = default_name::<F>();
        let f = crate::agent::WithState::new(f, state);
        let agent = Agent::new(self.core.clone(), name, Arc::new(move |s| f.call(s)));
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(agent.clone()));
        agent
    }

    /// Declares a table, Faust's `app.Table(name, default=...)`: partitioned key/value state
    /// kept in memory, written to the changelog topic `<app id>-<name>-changelog`, and
    /// restored when a worker takes its partitions. Missing keys start from `V::default()`
    /// (change it with [`default_value`](Table::default_value)).
    ///
    /// # Panics
    ///
    /// If a table named `name` was already declared.
    pub fn table<K: TableKey, V: TableValue + Default>(
        &self,
        name: impl Into<String>,
    ) -> Table<K, V> {
        self.declare_table(Table::new(
            self.core.clone(),
            name.into(),
            Arc::new(V::default),
        ))
    }

    fn declare_table<K: TableKey, V: TableValue>(&self, table: Table<K, V>) -> Table<K, V> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            tables.iter().all(|t| t.name() != table.name()),
            "table {:?} is declared twice",
            table.name()
        );
        tables.push(Arc::new(table.clone()));
        table
    }

    /// Removes the local state of every table (`reset` command): a worker started afterwards
    /// rebuilds its partitions from the changelogs.
    pub(crate) fn reset(&self, confirmed: bool) -> Result<()> {
        let settings = self.core.settings();
        if let Some(dir) = crate::table::store::directory(&settings.store, &self.core.id) {
            // A mistyped path must not pass for a reset: nothing is created where nothing was.
            if !dir.is_dir() {
                return Err(Error::Config(format!(
                    "no local table state of app {:?} in {} ({} does not exist): nothing to \
                     reset; check --store",
                    self.core.id,
                    settings.store,
                    dir.display()
                )));
            }
        }
        let store = crate::table::store::open(&settings.store, &self.core.id)?;
        if !store.is_persistent() {
            println!(
                "the table store is {}: nothing is kept locally",
                store.describe()
            );
            return Ok(());
        }
        if !confirmed {
            return Err(Error::Config(format!(
                "reset removes the local state of tables {:?} in {}; run it again with --yes \
                 to confirm",
                self.table_names(),
                store.describe()
            )));
        }
        let tables = self
            .tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for t in &tables {
            let partitions = t.changelog_spec().partitions;
            for p in 0..partitions {
                store.clear(t.name(), p)?;
            }
            println!("removed the local state of table {:?}", t.name());
        }
        Ok(())
    }

    /// Declares a global table, Faust's `app.GlobalTable`: every worker keeps every partition
    /// up to date from the changelog, and reads see the whole table. Use it for reference data
    /// every worker needs (settings, lookups) rather than for large, write-heavy state.
    ///
    /// # Panics
    ///
    /// If a table named `name` was already declared.
    pub fn global_table<K: TableKey, V: TableValue + Default>(
        &self,
        name: impl Into<String>,
    ) -> Table<K, V> {
        self.declare_table(
            Table::new(self.core.clone(), name.into(), Arc::new(V::default)).global(),
        )
    }

    /// Names of the declared tables.
    pub fn table_names(&self) -> Vec<String> {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|t| t.name().to_owned())
            .collect()
    }

    /// Declares a command-line command, Faust's `@app.command()`. `A` is a `clap::Args` struct
    /// holding the command's arguments and options. On the embedded transport the app's agents
    /// run while the command does, so it can `ask` them.
    pub fn command<A, F, Fut, E>(&self, name: impl Into<String>, f: F) -> &Self
    where
        A: clap::Args + clap::FromArgMatches + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(Command::new(name.into(), f)));
        self
    }

    /// Names of the declared agents.
    pub fn agent_names(&self) -> Vec<String> {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|a| a.name())
            .collect()
    }

    /// The declared agents (for the `agents` and `send` commands).
    pub(crate) fn agent_runners(&self) -> Vec<Arc<dyn AgentRunner>> {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The declared tables (for the `tables` command).
    pub(crate) fn table_runners(&self) -> Vec<Arc<dyn TableRunner>> {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The app's own embedded broker (what `memory://` connects to), for inspection in tests
    /// and tools.
    pub fn memory_broker(&self) -> Arc<MemoryBroker> {
        self.core.memory()
    }

    /// How many `ask`, `map` and `join` requests of the running worker wait for a reply (0
    /// when no worker runs). For tests: a request whose future or stream was dropped no longer
    /// waits.
    #[doc(hidden)]
    pub fn pending_replies(&self) -> usize {
        self.core.runtime().map_or(0, |rt| rt.replies.len())
    }

    /// Waits until the running worker of this app has processed and committed every record
    /// its topics hold now (see [`Worker::processed`]): what an app's command that sent
    /// something calls to wait for it to be done. Fails if no worker runs.
    pub async fn processed(&self, timeout: std::time::Duration) -> Result<()> {
        let rt = self.core.runtime()?;
        worker::processed(&rt, timeout).await
    }

    /// The offsets the app's consumer group has committed: for each partition, the next offset
    /// a worker will read. Works whether or not a worker runs.
    pub async fn committed_offsets(&self) -> Result<Vec<(TopicPartition, i64)>> {
        let transport = self.transport().await?;
        Ok(transport.committed(&self.core.id).await?)
    }

    /// The end offset of each partition of `topic` (the offset its next record will get).
    pub async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>> {
        let transport = self.transport().await?;
        Ok(transport.end_offsets(topic).await?)
    }

    /// The running worker's transport, or a new connection.
    async fn transport(&self) -> Result<Arc<dyn Transport>> {
        match self.core.runtime() {
            Ok(rt) => Ok(rt.transport.clone()),
            Err(_) => self.connect(&self.core.settings().broker, None).await,
        }
    }

    /// Starts a worker: creates the topics, joins the consumer group and runs every agent.
    pub async fn start(&self) -> Result<Worker> {
        self.start_with(Role::Worker).await
    }

    /// Starts only what sending and asking need, without running this app's agents: for
    /// programs that talk to workers running elsewhere: on Kafka, or an embedded worker of
    /// another process reached through its web server (`remote://HOST:PORT`, which the app's
    /// command line finds by itself; see [`Settings::datadir`]). On the app's own embedded
    /// broker (`memory://`) nobody else runs the agents, so use [`start`](App::start) there;
    /// see [`is_embedded`](App::is_embedded).
    pub async fn start_client(&self) -> Result<Worker> {
        self.start_with(Role::Client).await
    }

    /// Whether the app runs on an embedded transport (`memory://`, or its durable twin
    /// `file://`), where every agent runs in this process. A command of the app's command
    /// line that finds a running worker of the app (see [`Settings::datadir`]) runs as that
    /// worker's client instead, on `remote://`: this is `false` then, as on Kafka, and the
    /// worker runs the agents.
    pub fn is_embedded(&self) -> bool {
        let broker = &self.core.settings().broker;
        broker.starts_with("memory:") || broker.starts_with("file://")
    }

    /// Whether the app runs on its own embedded broker (`memory://`, not a named one shared
    /// by the apps of the process, or a durable `file://` log): the broker a worker publishes
    /// to other processes.
    pub(crate) fn owns_embedded_broker(&self) -> bool {
        let broker = self.core.settings().broker;
        broker.starts_with("file://")
            || broker
                .strip_prefix("memory:")
                .is_some_and(|rest| rest.trim_matches('/').is_empty())
    }

    /// The embedded broker a worker publishes to other processes (see
    /// [`owns_embedded_broker`](Self::owns_embedded_broker)): its in-memory log, and a
    /// transport that writes to it at once (on `file://`, to the durable log, outside any
    /// transaction).
    fn published_broker(&self) -> Result<(Arc<MemoryBroker>, Arc<dyn Transport>, &'static str)> {
        let url = self.core.settings().broker;
        if url.starts_with("file://") {
            let parsed = crate::transport::file::FileUrl::parse(&url)?;
            let broker = crate::transport::FileBroker::open(&parsed.dir, &self.core.id)?;
            let transport: Arc<dyn Transport> = Arc::new(broker.transport(parsed.fsync, false));
            return Ok((broker.memory().clone(), transport, "file"));
        }
        let broker = self.core.memory();
        Ok((
            broker.clone(),
            Arc::new(MemoryTransport::new(broker)),
            "memory",
        ))
    }

    /// The app's data directory ([`Settings::datadir`]; by default `<app id>-data` in the
    /// current directory), where its running worker announces itself.
    pub fn datadir(&self) -> std::path::PathBuf {
        self.core
            .settings()
            .datadir
            .unwrap_or_else(|| std::path::PathBuf::from(format!("{}-data", self.core.id)))
    }

    /// Starts the app in `role`.
    pub(crate) async fn start_with(&self, role: Role) -> Result<Worker> {
        let run_agents = role != Role::Client;
        if self.core.runtime().is_ok() {
            return Err(Error::Config(format!(
                "app {:?} is already running",
                self.core.id
            )));
        }
        self.core.check_serializers()?;
        let settings = self.core.settings();
        // A worker on its own embedded broker serving the web publishes the broker and
        // announces itself in the data directory: one per app and data directory.
        let publishes = run_agents && settings.web_port.is_some() && self.owns_embedded_broker();
        let announces = publishes && role == Role::Worker;
        let datadir = self.datadir();
        if announces {
            match discovery::find(&datadir, &self.core.id).await {
                discovery::Found::Running(running) => {
                    return Err(discovery::already_running(&datadir, &running))
                }
                discovery::Found::OtherApp(running) => {
                    return Err(discovery::taken(&datadir, &self.core.id, &running))
                }
                discovery::Found::Nothing | discovery::Found::Stale(_) => {}
            }
        }
        let timers = if role == Role::Worker {
            self.timers.plan()?
        } else {
            crate::timer::Plan::empty()
        };
        // Only a worker running agents commits transactions; clients send as usual.
        let transactional_id = (run_agents
            && settings.processing_guarantee == ProcessingGuarantee::ExactlyOnce)
            .then(|| {
                let worker = settings
                    .worker_id
                    .clone()
                    .unwrap_or_else(|| format!("{:016x}", crate::engine::random_id()));
                format!("{}-{worker}", self.core.id)
            });
        let transport = self.connect(&settings.broker, transactional_id).await?;
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(64);
        let tables: Vec<Arc<dyn TableRunner>> = if run_agents {
            self.tables
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            Vec::new()
        };
        let store = if tables.is_empty() {
            None
        } else {
            Some(crate::table::store::open(&settings.store, &self.core.id)?)
        };
        if run_agents && settings.web_port.is_some() {
            // Before any metric handle is made: handles made earlier count nothing.
            crate::metrics::install();
        }
        let rt = Arc::new(Runtime::new(
            self.core.id.clone(),
            settings.clone(),
            transport.clone(),
            control_tx,
            tables.iter().map(|t| t.clone().as_state()).collect(),
        ));

        let agents: Vec<Arc<dyn AgentRunner>> = if run_agents {
            self.agents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            Vec::new()
        };
        let mut specs: BTreeMap<String, TopicSpec> = BTreeMap::new();
        let declared: Vec<String> = self.core.declared_topics();
        for name in declared {
            specs.insert(name.clone(), self.core.topic_spec(&name, None));
        }
        let mut agent_topics = Vec::with_capacity(agents.len());
        let mut dead_letters = Vec::new();
        for agent in &agents {
            let topics = agent.topics()?;
            for spec in &topics {
                specs.insert(spec.name.clone(), spec.clone());
            }
            agent_topics.push(topics);
            dead_letters.extend(agent.dead_letter(&settings)?);
        }
        for table in &tables {
            let spec = table.changelog_spec();
            specs.insert(spec.name.clone(), spec);
        }
        for spec in specs.values() {
            if let Err(e) = rt.ensure_topic(spec).await {
                let read = agent_topics.iter().flatten().any(|t| t.name == spec.name);
                // A topic an agent reads that does not exist (and cannot be created) stops
                // only that agent's part of the work: the subscription picks it up once it
                // exists.
                if !read || !matches!(transport.partition_count(&spec.name).await, Ok(None)) {
                    return Err(e);
                }
                tracing::error!(
                    topic = %spec.name,
                    error = %e,
                    "an agent reads a topic that does not exist and cannot be created; its \
                     events are read once the topic exists, the other topics meanwhile"
                );
            }
        }
        for spec in &dead_letters {
            rt.ensure_internal_topic(&spec.name).await?;
        }
        if let Some(store) = &store {
            for table in &tables {
                table.attach(crate::engine::StateHandle::new(&rt), store.clone());
            }
        }
        rt.ensure_internal_topic(&rt.reply_topic).await?;
        if timers.needs_leader() {
            let topic = crate::engine::leader::leader_topic(&self.core.id);
            rt.ensure_internal_topic(&topic).await?;
            rt.leadership.elect_by(topic);
        }
        let reply_consumer = transport
            .topic_consumer(&rt.reply_topic, StartAt::Latest)
            .await?;

        let actors = TaskTracker::new();
        let capacity = settings.stream_buffer_maxsize.max(1);
        let mut routes = Vec::new();
        let mut queues = Vec::with_capacity(agents.len());
        for (agent, topics) in agents.iter().zip(&agent_topics) {
            if topics.is_empty() {
                queues.push(None);
                continue;
            }
            let (route, rx) = queue(agent.concurrency(), capacity);
            let names = topics.iter().map(|t| t.name.clone()).collect();
            routes.push((agent.name(), names, route));
            queues.push(Some(rx));
        }
        rt.ops
            .set_agents(agents.iter().filter_map(|a| a.info().ok()).collect());
        let steady = transport.embedded() || routes.is_empty();
        let dispatcher = if run_agents {
            let consumer = transport.group_consumer(&self.core.id)?;
            Some(Dispatcher::new(
                rt.clone(),
                consumer,
                routes,
                control_rx,
                actors.clone(),
            )?)
        } else {
            None
        };

        self.core.set_runtime(rt.clone());
        for (agent, queue) in agents.iter().zip(queues) {
            if let Err(e) = agent.start(&rt, &actors, queue) {
                rt.stop.cancel();
                self.core.clear_runtime(&rt);
                return Err(e);
            }
        }
        let closed = CancellationToken::new();
        let web = match (run_agents, settings.web_port) {
            (true, Some(port)) => {
                let published = match publishes.then(|| self.published_broker()) {
                    None => None,
                    Some(Ok((broker, transport, kind))) => Some(crate::web::Published {
                        broker,
                        transport,
                        hello: crate::transport::remote::Hello {
                            app: self.core.id.to_string(),
                            instance: rt.instance.clone(),
                            pid: std::process::id(),
                            transport: kind.to_owned(),
                        },
                    }),
                    Some(Err(e)) => {
                        rt.stop.cancel();
                        self.core.clear_runtime(&rt);
                        return Err(e);
                    }
                };
                let served = crate::web::start(
                    rt.clone(),
                    tables.clone(),
                    &settings.web_bind,
                    port,
                    published,
                    closed.clone(),
                );
                match served.await {
                    Ok(web) => Some(web),
                    Err(e) => {
                        rt.stop.cancel();
                        self.core.clear_runtime(&rt);
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        let announcement = match (&web, announces) {
            (Some(web), true) => {
                let announced = discovery::Announced {
                    app: self.core.id.to_string(),
                    pid: std::process::id(),
                    web: format!("http://{}", reachable(web.addr)),
                    instance: rt.instance.clone(),
                    transport: settings.broker.clone(),
                    started: crate::transport::memory::now_millis(),
                };
                match discovery::announce(&datadir, &announced).await {
                    Ok(a) => Some(a),
                    Err(e) => {
                        rt.stop.cancel();
                        closed.cancel();
                        self.core.clear_runtime(&rt);
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        // Membership: where lookups are forwarded, and where standby replicas go.
        let standbys =
            !tables.is_empty() && crate::table::standby_replicas(&rt.settings, &*rt.transport) > 0;
        let membership = if run_agents && (web.is_some() || standbys) {
            match crate::engine::membership::membership(rt.clone(), closed.clone()).await {
                Ok(handle) => Some(handle),
                Err(e) => {
                    rt.stop.cancel();
                    closed.cancel();
                    self.core.clear_runtime(&rt);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let replies = tokio::spawn(run_replies(rt.clone(), reply_consumer, closed.clone()));
        let dispatcher = dispatcher.map(|d| tokio::spawn(d.run()));
        let timers = timers.start(&rt);
        rt.ops.started(steady);
        tracing::info!(app = %self.core.id, transport = transport.kind(), agents = agents.len(), "worker started");
        if !steady && run_agents {
            tracing::info!(group = %self.core.id, "joining the consumer group: waiting for partitions");
        }
        Ok(Worker {
            core: self.core.clone(),
            rt,
            dispatcher,
            replies: Some(replies),
            web,
            membership,
            closed,
            tables,
            timers,
            announcement,
        })
    }

    /// Connects to the broker at `url`; on Kafka, with a transactional producer when
    /// `transactional_id` is given (exactly-once processing), on `file://` staging what is
    /// produced until the worker's commit.
    async fn connect(
        &self,
        url: &str,
        transactional_id: Option<String>,
    ) -> Result<Arc<dyn Transport>> {
        if let Some(rest) = url.strip_prefix("memory:") {
            let name = rest.trim_start_matches("//").trim_end_matches('/');
            let broker = if name.is_empty() {
                self.core.memory()
            } else {
                MemoryBroker::named(name)
            };
            return Ok(Arc::new(MemoryTransport::new(broker)));
        }
        if let Some(address) = url.strip_prefix("remote://") {
            return Ok(Arc::new(
                crate::transport::remote::RemoteTransport::connect(address).await?,
            ));
        }
        if url.starts_with("file://") {
            use crate::transport::{FileBroker, FileTransport};
            let parsed = crate::transport::file::FileUrl::parse(url)?;
            let broker = FileBroker::open(&parsed.dir, &self.core.id)?;
            let transport: FileTransport =
                broker.transport(parsed.fsync, transactional_id.is_some());
            return Ok(Arc::new(transport));
        }
        #[cfg(feature = "kafka")]
        if url.starts_with("kafka://") {
            use crate::transport::kafka::{KafkaConfig, KafkaTransport};
            let settings = self.core.settings();
            let mut config = KafkaConfig::from_url(url, &settings.kafka)?
                .revocations_within(settings.shutdown_timeout)
                .report_lag(Arc::new(crate::metrics::kafka_lag));
            if let Some(id) = transactional_id {
                config = config.transactional(id);
            }
            return Ok(Arc::new(KafkaTransport::connect(config).await?));
        }
        #[cfg(not(feature = "kafka"))]
        let _ = transactional_id;
        Err(TransportError::UnsupportedUrl(url.to_owned()).into())
    }
}

/// The address to reach a server bound to `addr` from this machine: loopback for an
/// unspecified address (`0.0.0.0`, `::`).
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}
