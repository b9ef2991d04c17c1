//! The handle of a running app, [`Worker`], and the signals that stop it.

use crate::engine::{AppCore, Runtime};
use crate::error::Result;
use crate::table::TableRunner;
use std::fmt;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running app. Stop it with [`shutdown`](Worker::shutdown): agents finish the events they
/// hold, offsets are committed, and the app can be started again.
///
/// ```
/// use rill::prelude::*;
///
/// # #[tokio::main] async fn main() -> rill::Result<()> {
/// let app = App::new("counting");
/// app.configure(|s| s.web_port = Some(0)); // serve /health, /ready and /metrics
/// let words = app.topic("words").key_type::<String>().value_type::<String>();
/// let counts = app.table::<String, u64>("counts");
/// let table = counts.clone();
/// app.agent(move |mut words: Stream<String, String>| {
///     let counts = table.clone();
///     async move {
///         while let Some(word) = words.next().await {
///             counts.update(word, |n| *n += 1);
///         }
///     }
/// })
/// .channel(&words);
///
/// let worker = app.start().await?;
/// assert!(worker.ready().await, "partitions assigned, tables restored");
/// println!("serving on {:?}", worker.web_addr());
/// words.send("hello".to_owned()).key("hello".to_owned()).await?;
/// while counts.get(&"hello".to_owned()) != Some(1) {
///     tokio::task::yield_now().await;
/// }
/// worker.shutdown().await?; // drains, commits, and lets the app start again
/// # Ok(()) }
/// ```
pub struct Worker {
    pub(crate) core: Arc<AppCore>,
    pub(crate) rt: Arc<Runtime>,
    pub(crate) dispatcher: Option<JoinHandle<()>>,
    pub(crate) replies: Option<JoinHandle<()>>,
    pub(crate) web: Option<crate::web::Web>,
    /// Reads the membership topic (see [`crate::engine::membership::membership`]).
    pub(crate) membership: Option<JoinHandle<()>>,
    pub(crate) closed: CancellationToken,
    /// The app's tables, attached to this worker.
    pub(crate) tables: Vec<Arc<dyn TableRunner>>,
    /// The timers, crontabs and tasks this worker runs.
    pub(crate) timers: crate::timer::Running,
    /// Its `worker.json` in the app's data directory, when it announces itself there.
    pub(crate) announcement: Option<super::discovery::Announcement>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("app", &self.rt.app_id)
            .field("transport", &self.rt.transport.kind())
            .finish()
    }
}

impl Worker {
    /// The transport's kind: `memory` or `kafka`.
    pub fn transport(&self) -> &'static str {
        self.rt.transport.kind()
    }

    /// How many messages of `topic` agents could not read (bad input: undecodable, or larger
    /// than `max_payload_bytes`), skipped or sent to a dead-letter topic.
    pub fn decode_errors(&self, topic: &str) -> u64 {
        self.rt
            .stats
            .decode_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied()
            .unwrap_or(0)
    }

    /// How many times the agent `agent` raised an error or panicked.
    pub fn agent_errors(&self, agent: &str) -> u64 {
        self.rt
            .stats
            .agent_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent)
            .copied()
            .unwrap_or(0)
    }

    /// How many records the agent `agent` wrote to its dead-letter topic (see
    /// [`Agent::dead_letter`](crate::Agent::dead_letter)).
    pub fn dead_letters(&self, agent: &str) -> u64 {
        crate::engine::Stats::read(&self.rt.stats.dead_letters)
            .get(agent)
            .copied()
            .unwrap_or(0)
    }

    /// The address of the worker's web server, if it serves one (see
    /// [`Settings::web_port`](crate::Settings::web_port)).
    pub fn web_addr(&self) -> Option<std::net::SocketAddr> {
        self.web.as_ref().map(|w| w.addr)
    }

    /// Whether the worker serves: it has its partitions (on Kafka, the consumer group has
    /// given it its share), and every table partition it owns is restored. What `GET /ready`
    /// answers 200 to.
    pub fn is_ready(&self) -> bool {
        self.rt.readiness().is_ok()
    }

    /// Waits until the worker [is ready](Worker::is_ready); returns `false` if it stopped
    /// first. Bound the wait with a timeout of your own: a group that never gives this worker
    /// partitions keeps it waiting.
    pub async fn ready(&self) -> bool {
        loop {
            if self.rt.stop.is_cancelled() {
                return false;
            }
            if self.is_ready() {
                return true;
            }
            tokio::select! {
                _ = self.rt.stop.cancelled() => return false,
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }
    }

    /// Waits until the worker has processed and committed every record its topics hold now,
    /// and what its agents sent on from them to topics it reads too (a `group_by`'s
    /// repartition topic, say): for tests, commands and batch jobs that need "done". Fails
    /// with [`Error::NotProcessed`](crate::Error::NotProcessed) after `timeout`.
    /// [`App::processed`](crate::App::processed) does the same from an app's command.
    ///
    /// Records that keep coming keep it waiting; it looks every 10 ms.
    pub async fn processed(&self, timeout: std::time::Duration) -> Result<()> {
        processed(&self.rt, timeout).await
    }

    /// The URL this worker's web server is advertised under to the app's other workers
    /// (`http://host:port`; see [`Settings::web_host`](crate::Settings::web_host)).
    pub fn web_url(&self) -> Option<String> {
        self.web.as_ref().and_then(|_| self.rt.web())
    }

    /// Whether this worker announced itself in the app's data directory, so that the app's
    /// commands in other processes reach it (see [`Settings::datadir`](crate::Settings::datadir)).
    pub fn is_reachable(&self) -> bool {
        self.announcement.is_some()
    }

    /// Whether this worker is the app's leader, the one that runs its `on_leader` timers
    /// ([`Timer::on_leader`](crate::Timer::on_leader)). Workers elect a leader only when the
    /// app declares such a timer; otherwise this is `false`.
    pub fn is_leader(&self) -> bool {
        self.rt.leadership.is_leader()
    }

    /// Completes when the worker has stopped by itself, after an error it cannot go on from
    /// (logged when it happened): with exactly-once on Kafka, a producer fenced by a newer
    /// worker with the same `worker_id`, or a transaction that can be neither committed nor
    /// aborted. Its agents no longer get events; call [`shutdown`](Worker::shutdown).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing.
    pub async fn stopped(&self) {
        self.rt.stop.cancelled().await
    }

    /// Why the worker stopped by itself, when it stopped because an output of a processed
    /// event could not be written and never could be (a record larger than the broker
    /// accepts, say): skipping it would lose it, so the worker stops uncommitted.
    pub fn fatal_error(&self) -> Option<String> {
        self.rt
            .fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many changelog records this worker replayed to restore partitions of `table`.
    pub fn table_records_replayed(&self, table: &str) -> u64 {
        self.rt
            .stats
            .table_replayed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(table)
            .copied()
            .unwrap_or(0)
    }

    /// Waits for Ctrl-C or SIGTERM (listening from the moment it is called).
    pub async fn wait_for_signal() {
        match Signals::new() {
            Ok(mut s) => s.recv().await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for signals; waiting for Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }

    /// Stops the worker: no more events are read, agents finish the events they hold (up to
    /// `shutdown_timeout`), processed offsets are committed, and pending sends are flushed.
    pub async fn shutdown(mut self) -> Result<()> {
        tracing::info!(app = %self.rt.app_id, "worker stopping");
        // First of all: no new command of the app comes to a worker that stops.
        if let Some(mut announcement) = self.announcement.take() {
            announcement.release();
        }
        self.rt.stop.cancel();
        self.timers.stop(self.rt.settings.shutdown_timeout).await;
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.await;
        }
        self.closed.cancel();
        if let Some(replies) = self.replies.take() {
            let _ = replies.await;
        }
        self.rt.replies.stop_listening().await;
        if let Some(web) = self.web.take() {
            let _ = web.server.await;
        }
        if let Some(membership) = self.membership.take() {
            let _ = membership.await;
        }
        let flushed = self.rt.transport.flush().await;
        if self.rt.reply_topic_temporary {
            let topic = &self.rt.reply_topic;
            match tokio::time::timeout(REPLY_TOPIC_DELETE, self.rt.transport.delete_topic(topic))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%topic, error = %e, "cannot delete this run's reply topic; delete it by hand")
                }
                Err(_) => {
                    tracing::warn!(%topic, "this run's reply topic was not deleted in time; delete it by hand")
                }
            }
        }
        for table in &self.tables {
            table.detach();
        }
        self.core.clear_runtime(&self.rt);
        tracing::info!(app = %self.rt.app_id, "worker stopped");
        Ok(flushed?)
    }
}

/// Waits until the worker of `rt` has processed and committed what its topics hold (see
/// [`Worker::processed`]).
pub(crate) async fn processed(rt: &Runtime, timeout: std::time::Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !caught_up(rt).await? {
        if tokio::time::Instant::now() >= deadline {
            return Err(crate::Error::NotProcessed { timeout });
        }
        tokio::time::sleep(PROCESSED_POLL).await;
    }
    Ok(())
}

/// Whether every record of the topics the worker reads is committed.
async fn caught_up(rt: &Runtime) -> Result<bool> {
    let committed: std::collections::HashMap<crate::transport::TopicPartition, i64> = rt
        .transport
        .committed(&rt.app_id)
        .await?
        .into_iter()
        .collect();
    for topic in rt.ops.topics() {
        let ends = rt.transport.end_offsets(&topic).await?;
        for (p, end) in ends.into_iter().enumerate() {
            let tp = crate::transport::TopicPartition::new(topic.as_str(), p as u32);
            if end > committed.get(&tp).copied().unwrap_or(0) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// How often [`Worker::processed`] looks.
const PROCESSED_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// How often [`Worker::ready`] looks.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// How long a stopping worker waits for the deletion of its temporary reply topic.
const REPLY_TOPIC_DELETE: std::time::Duration = std::time::Duration::from_secs(10);

/// Listens for Ctrl-C (SIGINT) and SIGTERM from the moment it is created, so a signal that
/// arrives early is not lost (or fatal).
pub(crate) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Waits for the next signal.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.rt.stop.cancel();
        self.closed.cancel();
        self.rt.replies.cancel_listening();
    }
}
