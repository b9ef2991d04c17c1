//! The dispatcher: polls the group consumer, routes each record to the queues of the agents
//! reading its topic, and holds back reading while an agent's queue is full. Commits are in
//! [`commit`](super::commit), rebalances in [`rebalance`](super::rebalance).

use super::ack::{AckGuard, PartitionTracker};
use super::commit::{EXACTLY_ONCE_COMMIT_MAX_WAIT, EXACTLY_ONCE_COMMIT_SHARE};
use super::queue::{Chunk, Delivery, Route};
use super::runtime::{Control, Runtime};
use crate::error::{Result, TransportError};
use crate::transport::{Consumer, ConsumerEvent, Message, TopicPartition};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// Reads the app's topics as a member of its consumer group, hands each record to the agents
/// reading that topic, and commits what they have processed.
pub(crate) struct Dispatcher {
    pub(super) rt: Arc<Runtime>,
    pub(super) consumer: Box<dyn Consumer>,
    pub(super) routes: Vec<Route>,
    /// Indices into `routes` of the agents reading each topic.
    pub(super) topics: HashMap<Arc<str>, Vec<usize>>,
    /// The counters of records handed out, per topic (in the order of `topics`).
    pub(super) events_in: HashMap<Arc<str>, Vec<crate::metrics::EventsIn>>,
    pub(super) trackers: HashMap<TopicPartition, Arc<PartitionTracker>>,
    pub(super) committed: HashMap<TopicPartition, i64>,
    /// Partitions the group gave this worker.
    pub(super) assigned: HashSet<TopicPartition>,
    /// Table partitions this worker holds (partition numbers of `assigned`).
    pub(super) owned: BTreeSet<u32>,
    pub(super) control: mpsc::Receiver<Control>,
    pub(super) actors: TaskTracker,
    /// Set when a commit failed in a way that must not be retried (an aborted transaction,
    /// records that could not be delivered): nothing is committed, and the table partitions
    /// are dropped, until the group has assigned partitions again from the last commit.
    pub(super) rolling_back: bool,
    /// Set once the partitions were revoked after a roll back began: the next assignment is
    /// the one from the last commit, and ends it (an assignment already on its way when the
    /// roll back began does not).
    pub(super) rolled_back: bool,
    /// Set when the worker stops after an error it cannot go on from: nothing more is
    /// committed.
    pub(super) fatal: bool,
    /// Per route, chunks waiting for room in the agent's full queue, in order: the dispatcher
    /// goes on serving commits, rebalances and subscriptions instead of waiting on the queue.
    pub(super) backlog: Vec<VecDeque<Chunk>>,
    /// Records in `backlog`.
    pub(super) backlogged: usize,
    /// Set while the consumer's partitions are paused: from [`BACKLOG_PAUSE`] times the
    /// queue size of backlogged records until a quarter of that is left. (Pausing at every
    /// full queue would cost throughput: librdkafka drops what it prefetched for a paused
    /// partition and fetches it again after the resume.)
    pub(super) held_back: bool,
    /// Records read since the last commit (see [`Settings::commit_every`]).
    ///
    /// [`Settings::commit_every`]: crate::Settings::commit_every
    pub(super) since_commit: u64,
}

/// Records read between two commits on the embedded transport, unless the settings say (see
/// [`Settings::commit_every`](crate::Settings::commit_every)).
pub(crate) const EMBEDDED_COMMIT_EVERY: u64 = 10_000;

impl Dispatcher {
    pub(crate) fn new(
        rt: Arc<Runtime>,
        consumer: Box<dyn Consumer>,
        routes: Vec<(String, Vec<String>, Route)>,
        control: mpsc::Receiver<Control>,
        actors: TaskTracker,
    ) -> Result<Self> {
        let mut d = Self {
            rt,
            consumer,
            routes: Vec::new(),
            topics: HashMap::new(),
            events_in: HashMap::new(),
            trackers: HashMap::new(),
            committed: HashMap::new(),
            assigned: HashSet::new(),
            owned: BTreeSet::new(),
            control,
            actors,
            rolling_back: false,
            rolled_back: false,
            fatal: false,
            backlog: Vec::new(),
            backlogged: 0,
            held_back: false,
            since_commit: 0,
        };
        for (agent, topics, route) in routes {
            d.add_route(&agent, topics, route);
        }
        d.resubscribe()?;
        Ok(d)
    }

    fn add_route(&mut self, agent: &str, topics: Vec<String>, route: Route) {
        let index = self.routes.len();
        self.routes.push(route);
        self.backlog.push(VecDeque::new());
        for t in topics {
            let topic: Arc<str> = Arc::from(t.as_str());
            self.events_in
                .entry(topic.clone())
                .or_default()
                .push(self.rt.ops.events_in(agent, &t));
            self.topics.entry(topic).or_default().push(index);
        }
    }

    /// Counts the records of `batch` handed to each agent: once per run of records of one
    /// topic, not per record.
    fn count_in(&self, batch: &[Message]) {
        self.rt.ops.read(batch.len() as u64);
        let mut rest = batch;
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .position(|m| m.topic != first.topic)
                .unwrap_or(rest.len());
            for c in self
                .events_in
                .get(&first.topic)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                c.add(n as u64);
            }
            rest = &rest[n..];
        }
    }

    fn resubscribe(&mut self) -> Result<(), TransportError> {
        let mut topics: Vec<String> = self.topics.keys().map(|t| t.to_string()).collect();
        self.rt.ops.set_topics(&topics);
        topics.extend(self.rt.leadership.topic().map(str::to_owned));
        if topics.is_empty() {
            return Ok(());
        }
        topics.sort();
        self.consumer.subscribe(&topics)
    }

    pub(crate) async fn run(mut self) {
        let interval = self.rt.settings.effective_commit_interval();
        if self.exactly_once()
            && self.rt.settings.commit_interval > crate::settings::EXACTLY_ONCE_MAX_COMMIT_INTERVAL
        {
            tracing::warn!(
                commit_interval = ?self.rt.settings.commit_interval,
                used = ?interval,
                "with exactly-once, commits come at most 5 s apart (a transaction open longer risks being aborted by the brokers)"
            );
        }
        // The first commit comes one interval after the start (nothing is processed before).
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let commit_every = match self.rt.settings.commit_every {
            Some(0) => None,
            Some(n) => Some(n),
            None if self.rt.transport.embedded() => Some(EMBEDDED_COMMIT_EVERY),
            None => None,
        };
        let mut failures = 0u32;
        // With exactly-once processing: how long commits take, on average (see below).
        let mut commit_time = Duration::ZERO;
        loop {
            tokio::select! {
                biased;
                _ = self.rt.stop.cancelled() => break,
                Some(control) = self.control.recv() => self.on_control(control),
                _ = self.rt.room.notified(), if self.backlogged > 0 => self.offer_backlog(),
                _ = self.rt.failed.notified() => {
                    if let Some(f) = self.rt.take_failure() {
                        self.on_failure(f).await;
                    }
                }
                _ = ticker.tick() => {
                    let started = tokio::time::Instant::now();
                    let _ = self.commit().await;
                    if self.exactly_once() {
                        // Processing stops while a transaction ends: keep that under a fifth
                        // of the time when the broker is slow to end them. The recent
                        // average, not the last commit, sets the pace: one slow commit among
                        // fast ones would hold every output back for five times as long.
                        let took = started.elapsed();
                        commit_time = (commit_time * 4 + took) / 5;
                        let wait = (commit_time * EXACTLY_ONCE_COMMIT_SHARE).min(EXACTLY_ONCE_COMMIT_MAX_WAIT);
                        ticker.reset_after(interval.max(wait));
                    }
                }
                event = self.consumer.poll() => match event {
                    Ok(event) => {
                        failures = 0;
                        self.on_event(event).await;
                        if commit_every.is_some_and(|n| self.since_commit >= n) {
                            let _ = self.commit().await;
                            ticker.reset();
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                        tracing::warn!(error = %e, retry_in = ?wait, "consumer error; retrying");
                        tokio::time::sleep(wait).await;
                    }
                },
            }
        }
        self.drain().await;
    }

    /// Stops reading, lets the agents finish what they hold, and commits it.
    async fn drain(mut self) {
        self.retract_backlog(None);
        self.routes.clear();
        self.topics.clear();
        self.control.close();
        // Subscriptions asked for but not taken (a relay that started as the worker stopped)
        // are refused, so that their agents end instead of waiting for an answer.
        while self.control.try_recv().is_ok() {}
        self.actors.close();
        let timeout = self.rt.settings.shutdown_timeout;
        if tokio::time::timeout(timeout, self.actors.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "agents did not finish their in-flight events in time; stopping them and \
                 committing what is done"
            );
            // A stopped worker must not go on processing: after a restart its events are
            // processed again from the commit. Events dropped by the stopped actors are not
            // processed, so their acks must not count.
            for t in self.trackers.values() {
                t.freeze();
            }
            self.rt.abort_actors();
            self.actors.wait().await;
        }
        if !self.rt.tables.is_empty() {
            crate::engine::membership::publish(&self.rt, None).await;
        }
        let _ = self.commit().await;
        // Closing a Kafka consumer blocks while it leaves the group: do it off the async
        // threads.
        let consumer = self.consumer;
        self.rt.leadership.resign();
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Subscribe {
                agent,
                topic,
                route,
                done,
            } => {
                self.add_route(&agent, vec![topic], route);
                let _ = done.send(self.resubscribe());
            }
        }
    }

    async fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Messages(batch) => self.dispatch(batch).await,
            ConsumerEvent::Assigned(mut tps) => {
                self.rt.leadership.take_from(&mut tps, true);
                if tps.is_empty() {
                    if self.assigned.is_empty() {
                        tracing::info!("no partitions assigned to this worker (the group has more workers than partitions)");
                    }
                    self.rt.ops.settled();
                    return;
                }
                tracing::info!(partitions = %list(&tps), "partitions assigned");
                if self.rolling_back && std::mem::take(&mut self.rolled_back) {
                    self.rolling_back = false;
                    tracing::info!("rolled back to the last commit; processing resumes");
                }
                self.rt.ops.assigned(&tps);
                for tp in &tps {
                    self.trackers
                        .insert(tp.clone(), PartitionTracker::new(tp.clone()));
                    self.assigned.insert(tp.clone());
                }
                if self.held_back {
                    if let Err(e) = self.consumer.hold_back(true, &tps) {
                        tracing::warn!(error = %e, "cannot pause reading");
                    }
                }
                self.sync_tables().await;
            }
            ConsumerEvent::Revoked(mut tps) => {
                self.rt.leadership.take_from(&mut tps, false);
                if !tps.is_empty() {
                    self.revoke(tps).await;
                }
                // A roll back ends with the first assignment once the worker holds nothing,
                // whether the revocation came after the roll back began or the roll back began
                // in this revocation's commit.
                if self.rolling_back && self.assigned.is_empty() {
                    self.rolled_back = true;
                }
            }
            ConsumerEvent::Lost(mut tps) => {
                self.rt.leadership.take_from(&mut tps, false);
                if !tps.is_empty() {
                    self.lose(tps).await;
                }
                if self.rolling_back && self.assigned.is_empty() {
                    self.rolled_back = true;
                }
            }
            ConsumerEvent::Ended(_) => {}
            ConsumerEvent::Passed(positions) => {
                for (tp, offset) in positions {
                    if let Some(tracker) = self.trackers.get(&tp) {
                        if self.assigned.contains(&tp) {
                            tracker.pass(offset);
                        }
                    }
                }
            }
        }
    }

    async fn dispatch(&mut self, batch: Vec<Message>) {
        self.count_in(&batch);
        self.since_commit += batch.len() as u64;
        let mut pending: Vec<Chunk> = self.routes.iter().map(|_| Vec::new()).collect();
        // The partition of the previous record, and the routes of its topic: records come in
        // runs of one partition.
        let mut current: Option<Arc<PartitionTracker>> = None;
        let mut targets: Vec<usize> = Vec::new();
        let mut full: Vec<(usize, Chunk)> = Vec::new();
        for msg in batch {
            let same = matches!(&current, Some(t)
                if *t.tp.topic == *msg.topic && t.tp.partition == msg.partition);
            if !same {
                let tp = TopicPartition::new(msg.topic.clone(), msg.partition);
                current = Some(
                    self.trackers
                        .entry(tp.clone())
                        .or_insert_with(|| PartitionTracker::new(tp))
                        .clone(),
                );
                targets.clear();
                if let Some(routes) = self.topics.get(&msg.topic) {
                    targets.extend_from_slice(routes);
                }
            }
            let Some(tracker) = &current else {
                continue;
            };
            let offset = msg.offset;
            tracker.register(offset, targets.len() as u32);
            let msg = Arc::new(msg);
            for &i in &targets {
                pending[i].push(Delivery {
                    msg: msg.clone(),
                    ack: AckGuard::new(tracker.clone(), offset),
                });
                if pending[i].len() >= self.routes[i].chunk {
                    full.push((i, std::mem::take(&mut pending[i])));
                }
            }
            for (i, chunk) in full.drain(..) {
                self.offer(i, chunk);
            }
        }
        for (i, chunk) in pending.into_iter().enumerate() {
            if !chunk.is_empty() {
                self.offer(i, chunk);
            }
        }
    }

    /// Hands a chunk to an agent's queue or, when the queue is full (or chunks already wait
    /// for it), keeps it in the route's backlog and pauses the consumer: a busy agent holds
    /// back what is read, never the dispatcher.
    fn offer(&mut self, i: usize, chunk: Chunk) {
        if !self.backlog[i].is_empty() {
            self.backlogged += chunk.len();
            self.backlog[i].push_back(chunk);
            self.hold_back_if_full();
            return;
        }
        match self.routes[i].tx.try_send(chunk) {
            Ok(()) => {}
            Err(async_channel::TrySendError::Full(chunk)) => {
                self.backlogged += chunk.len();
                self.backlog[i].push_back(chunk);
                self.hold_back_if_full();
            }
            // A closed queue (the agent stopped) hands the chunk back; dropping it acks its
            // records.
            Err(async_channel::TrySendError::Closed(_)) => {}
        }
    }

    /// Offers the backlog again; resumes the consumer once it is empty.
    fn offer_backlog(&mut self) {
        for (route, backlog) in self.routes.iter().zip(self.backlog.iter_mut()) {
            while let Some(chunk) = backlog.pop_front() {
                let records = chunk.len();
                match route.tx.try_send(chunk) {
                    Ok(()) => self.backlogged -= records,
                    Err(async_channel::TrySendError::Full(chunk)) => {
                        backlog.push_front(chunk);
                        break;
                    }
                    Err(async_channel::TrySendError::Closed(_)) => self.backlogged -= records,
                }
            }
        }
        self.release_if_drained();
    }

    /// How many backlogged records pause reading.
    fn backlog_limit(&self) -> usize {
        self.rt.settings.stream_buffer_maxsize.max(1) * BACKLOG_PAUSE
    }

    /// Pauses reading once the backlog reaches its limit.
    fn hold_back_if_full(&mut self) {
        if self.backlogged >= self.backlog_limit() {
            self.hold_back();
        }
    }

    /// Resumes reading once the backlog is down to a quarter of its limit.
    fn release_if_drained(&mut self) {
        if self.held_back && self.backlogged <= self.backlog_limit() / 4 {
            self.held_back = false;
            let tps: Vec<TopicPartition> = self.assigned.iter().cloned().collect();
            if let Err(e) = self.consumer.hold_back(false, &tps) {
                tracing::warn!(error = %e, "cannot resume reading");
            }
        }
    }

    /// Pauses the consumer's partitions while chunks wait for a full agent queue.
    fn hold_back(&mut self) {
        if self.held_back {
            return;
        }
        self.held_back = true;
        let tps: Vec<TopicPartition> = self.assigned.iter().cloned().collect();
        tracing::debug!(partitions = %list(&tps), "an agent's queue is full; reading paused");
        if let Err(e) = self.consumer.hold_back(true, &tps) {
            tracing::warn!(error = %e, "cannot pause reading");
        }
    }

    /// Takes the records of `tps` (all, if `None`) out of the backlog: they never reached an
    /// agent, so they are not committed and not waited for (they are read again by the next
    /// owner of their partitions, or after a restart).
    pub(super) fn retract_backlog(&mut self, tps: Option<&[TopicPartition]>) {
        let mut first: HashMap<TopicPartition, i64> = HashMap::new();
        for backlog in &mut self.backlog {
            for chunk in backlog.iter_mut() {
                chunk.retain(|d| {
                    let tp = TopicPartition::new(d.msg.topic.clone(), d.msg.partition);
                    if tps.is_some_and(|tps| !tps.contains(&tp)) {
                        return true;
                    }
                    let o = first.entry(tp).or_insert(d.msg.offset);
                    *o = (*o).min(d.msg.offset);
                    false
                });
            }
            backlog.retain(|c| !c.is_empty());
        }
        self.backlogged = self.backlog.iter().flatten().map(Vec::len).sum();
        for (tp, offset) in first {
            if let Some(t) = self.trackers.get(&tp) {
                t.retract_from(offset);
            }
        }
        self.release_if_drained();
    }
}

/// Backlogged records, in agent queue sizes (`stream_buffer_maxsize`), that pause reading.
const BACKLOG_PAUSE: usize = 64;

pub(super) fn list(tps: &[TopicPartition]) -> String {
    tps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
