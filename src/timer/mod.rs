//! Timers, crontabs and tasks: async functions a worker runs beside its agents, Faust's
//! `@app.timer`, `@app.crontab` and `@app.task`.
//!
//! - A timer runs its body every interval, the first time one interval after the worker
//!   starts. A crontab runs it at the times a cron expression selects, in a time zone (UTC by
//!   default; see [`cron`] for the expression and the daylight-saving rule). A task runs once,
//!   when the worker starts.
//! - A body that returns an error or panics is logged with the timer's name; the timer runs
//!   again at its next tick and the worker goes on. Runs of one timer never overlap: a tick
//!   that comes while the body still runs is skipped.
//! - `on_leader` timers run on one worker of the app at a time, the leader. The app then
//!   declares a topic `<app id>-__leader` that every worker reads as a member of the app's
//!   consumer group: the worker the group gives partition 0 of it to is the leader. On the
//!   embedded transport a single worker is always the leader.
//! - At shutdown, timers stop waiting for their next tick at once; a body that is running may
//!   finish (up to `shutdown_timeout`) before agents drain and offsets are committed. Tasks are
//!   cancelled.

mod cron;

use self::cron::CronSchedule;
use crate::engine::Runtime;
use crate::error::{BoxError, Error, Result};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a timer, crontab or task body may return: `()`, or `Result<(), E>` where the error
/// converts into a [`BoxError`] (an error is logged with the timer's name).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be returned by a timer, crontab or task",
    note = "a timer, crontab or task body is an async function returning `()` or `Result<(), E>`"
)]
pub trait TaskOutput: Send + 'static {
    /// The outcome, with the error boxed.
    fn into_result(self) -> Result<(), BoxError>;
}

impl TaskOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError> + Send + 'static> TaskOutput for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

type Body = Arc<dyn Fn() -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

fn body<F, Fut, O>(f: F) -> Body
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = O> + Send + 'static,
    O: TaskOutput,
{
    Arc::new(move || {
        let run = f();
        async move { run.await.into_result() }.boxed()
    })
}

/// When a body runs.
#[derive(Debug, Clone)]
enum Schedule {
    /// Once, when the worker starts (a task).
    Start,
    /// Every interval (a timer).
    Every(Duration),
    /// At the times a cron expression selects (a crontab).
    Cron {
        expression: String,
        timezone: String,
    },
}

struct Spec {
    name: String,
    schedule: Schedule,
    on_leader: bool,
    body: Body,
}

/// A declared timer, crontab or task, shared by the app and the handle the user configures.
#[derive(Clone)]
struct Handle(Arc<Mutex<Spec>>);

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.spec();
        f.debug_struct("Timer")
            .field("name", &s.name)
            .field("schedule", &s.schedule)
            .field("on_leader", &s.on_leader)
            .finish()
    }
}

impl Handle {
    fn spec(&self) -> MutexGuard<'_, Spec> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> String {
        self.spec().name.clone()
    }

    fn set(self, f: impl FnOnce(&mut Spec)) -> Self {
        f(&mut self.spec());
        self
    }
}

/// A timer or crontab: see [`App::timer`](crate::App::timer) and [`App::crontab`](crate::App::crontab).
#[derive(Debug, Clone)]
pub struct Timer(Handle);

impl Timer {
    /// The timer's name (by default the function's path), as logs show it.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// Renames the timer.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self(self.0.set(|s| s.name = name.into()))
    }

    /// Runs the timer on one worker of the app only, the leader (Faust's `on_leader=True`).
    pub fn on_leader(self) -> Self {
        Self(self.0.set(|s| s.on_leader = true))
    }
}

/// A crontab: see [`App::crontab`](crate::App::crontab). Configure it like a [`Timer`], and give it a time zone.
#[derive(Debug, Clone)]
pub struct Crontab(Timer);

impl Crontab {
    /// The crontab's name (by default the function's path), as logs show it.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// Renames the crontab.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self(self.0.named(name))
    }

    /// Runs the crontab on one worker of the app only, the leader.
    pub fn on_leader(self) -> Self {
        Self(self.0.on_leader())
    }

    /// The time zone the expression is read in: an IANA name such as `Europe/Paris` (the
    /// default is `UTC`). An unknown name makes [`App::start`](crate::App::start) fail.
    pub fn timezone(self, timezone: impl Into<String>) -> Self {
        let timezone = timezone.into();
        Self(Timer((self.0).0.set(|s| {
            if let Schedule::Cron { timezone: tz, .. } = &mut s.schedule {
                *tz = timezone;
            }
        })))
    }
}

/// A task: see [`App::task`](crate::App::task).
#[derive(Debug, Clone)]
pub struct Task(Handle);

impl Task {
    /// The task's name (by default the function's path), as logs show it.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// Renames the task.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self(self.0.set(|s| s.name = name.into()))
    }
}

/// The timers, crontabs and tasks an app declares.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    declared: Mutex<Vec<Handle>>,
}

impl Timers {
    fn add(&self, name: String, schedule: Schedule, body: Body) -> Handle {
        let handle = Handle(Arc::new(Mutex::new(Spec {
            name,
            schedule,
            on_leader: false,
            body,
        })));
        self.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle.clone());
        handle
    }

    /// Declares a timer (see [`App::timer`](crate::App::timer)(crate::App::timer)).
    pub(crate) fn every<F, Fut, O>(&self, name: String, interval: Duration, f: F) -> Timer
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        Timer(self.add(name, Schedule::Every(interval), body(f)))
    }

    /// Declares a crontab (see [`App::crontab`](crate::App::crontab)(crate::App::crontab)).
    pub(crate) fn cron<F, Fut, O>(&self, name: String, expression: String, f: F) -> Crontab
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        let schedule = Schedule::Cron {
            expression,
            timezone: "UTC".to_owned(),
        };
        Crontab(Timer(self.add(name, schedule, body(f))))
    }

    /// Declares a task (see [`App::task`](crate::App::task)(crate::App::task)).
    pub(crate) fn at_start<F, Fut, O>(&self, name: String, f: F) -> Task
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        Task(self.add(name, Schedule::Start, body(f)))
    }

    /// Checks every declaration (intervals, cron expressions, time zones) and says what a
    /// worker runs.
    pub(crate) fn plan(&self) -> Result<Plan> {
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut planned = Vec::with_capacity(declared.len());
        for handle in declared {
            let s = handle.spec();
            let when = match &s.schedule {
                Schedule::Start => When::Start,
                Schedule::Every(d) if d.is_zero() => {
                    return Err(Error::Config(format!(
                        "timer {:?}: the interval must be longer than zero",
                        s.name
                    )))
                }
                Schedule::Every(d) => When::Every(*d),
                Schedule::Cron {
                    expression,
                    timezone,
                } => {
                    let invalid = |message: String| Error::Crontab {
                        expression: expression.clone(),
                        message: format!("{message} (crontab {:?})", s.name),
                    };
                    let schedule = CronSchedule::parse(expression).map_err(invalid)?;
                    let tz: Tz = timezone
                        .parse()
                        .map_err(|_| invalid(format!("unknown time zone {timezone:?}")))?;
                    When::Cron(schedule, tz)
                }
            };
            planned.push(Planned {
                name: s.name.clone(),
                when,
                on_leader: s.on_leader,
                body: s.body.clone(),
            });
        }
        Ok(Plan { planned })
    }
}

enum When {
    Start,
    Every(Duration),
    Cron(CronSchedule, Tz),
}

struct Planned {
    name: String,
    when: When,
    on_leader: bool,
    body: Body,
}

/// What a worker runs, checked.
pub(crate) struct Plan {
    planned: Vec<Planned>,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.planned.iter().map(|p| &p.name))
            .finish()
    }
}

impl Plan {
    /// Nothing to run (a client, which runs no agents either).
    pub(crate) fn empty() -> Self {
        Self {
            planned: Vec::new(),
        }
    }

    /// Whether some timer runs on the leader only: the workers then elect one.
    pub(crate) fn needs_leader(&self) -> bool {
        self.planned.iter().any(|p| p.on_leader)
    }

    /// Starts every timer, crontab and task; they stop when the worker's stop token is
    /// cancelled, and [`Running::stop`] waits for them.
    pub(crate) fn start(self, rt: &Runtime) -> Running {
        let clock = Clock {
            wall: rt.settings.clock_start,
            start: tokio::time::Instant::now(),
        };
        let handles = self.planned.into_iter().map(|p| {
            let leader = p.on_leader.then(|| rt.leadership.watch());
            let stop = rt.stop.clone();
            match p.when {
                When::Start => tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = run_body(&p.name, "task", &p.body) => {}
                    }
                }),
                When::Every(period) => {
                    let first = tokio::time::Instant::now() + period;
                    let mut interval = tokio::time::interval_at(first, period);
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    let ticks = futures::stream::unfold(interval, |mut i| async move {
                        i.tick().await;
                        Some(((), i))
                    });
                    tokio::spawn(run_timer(p, "timer", ticks.boxed(), leader, stop))
                }
                When::Cron(ref schedule, tz) => {
                    let ticks = cron_ticks(schedule.clone(), tz, clock);
                    tokio::spawn(run_timer(p, "crontab", ticks, leader, stop))
                }
            }
        });
        let running = Running::default();
        running.handles().extend(handles);
        running
    }
}

/// Wall-clock time for crontabs: the system clock, or `Settings::clock_start` plus the tokio
/// time elapsed since the worker started (so crontabs follow a paused tokio clock).
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: Option<SystemTime>,
    start: tokio::time::Instant,
}

impl Clock {
    fn now(&self) -> DateTime<Utc> {
        match self.wall {
            Some(wall) => DateTime::<Utc>::from(wall) + self.start.elapsed(),
            None => DateTime::<Utc>::from(SystemTime::now()),
        }
    }
}

/// The times a crontab fires, as they come: each tick waits until the clock shows the next
/// time the schedule selects after the last one.
fn cron_ticks(schedule: CronSchedule, tz: Tz, clock: Clock) -> BoxStream<'static, ()> {
    futures::stream::unfold(clock.now(), move |last| {
        let schedule = schedule.clone();
        async move {
            // Runs missed while a body ran too long (or the machine slept) are skipped.
            let next = schedule.next_after(last.max(clock.now()), tz)?;
            // Until the clock shows `next`: it may have been set back during a wait.
            loop {
                let wait = (next - clock.now()).to_std().unwrap_or(Duration::ZERO);
                if wait.is_zero() {
                    return Some(((), next));
                }
                tokio::time::sleep(wait).await;
            }
        }
    })
    .boxed()
}

/// Runs `p`'s body at every tick until `stop` is cancelled; an `on_leader` timer (with a
/// `leader` watch) only while this worker leads.
async fn run_timer(
    p: Planned,
    kind: &'static str,
    mut ticks: BoxStream<'static, ()>,
    leader: Option<watch::Receiver<bool>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            tick = ticks.next() => if tick.is_none() {
                tracing::warn!(timer = %p.name, kind, "no further run time; the timer stops");
                break;
            },
        }
        if leader.as_ref().is_some_and(|l| !*l.borrow()) {
            tracing::trace!(timer = %p.name, kind, "not the leader; tick skipped");
            continue;
        }
        run_body(&p.name, kind, &p.body).await;
    }
}

/// Runs a body once, logging its error or panic.
async fn run_body(name: &str, kind: &'static str, body: &Body) {
    tracing::debug!(timer = %name, kind, "running");
    let outcome = AssertUnwindSafe(async { body().await })
        .catch_unwind()
        .await;
    let (what, error) = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => ("returned an error", e.to_string()),
        Err(panic) => ("panicked", crate::agent::panic_message(panic)),
    };
    if kind == "task" {
        tracing::error!(task = %name, %error, "task {what}; it is not restarted");
    } else {
        tracing::error!(timer = %name, kind, %error, "{kind} {what}; it runs again at its next tick");
    }
}

/// The timers, crontabs and tasks a worker runs.
#[derive(Debug, Default)]
pub(crate) struct Running {
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Running {
    fn handles(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (up to `timeout`) for the timers to stop once the worker's stop token is
    /// cancelled; bodies still running then are aborted.
    pub(crate) async fn stop(&self, timeout: Duration) {
        let handles = std::mem::take(&mut *self.handles());
        let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(timeout, futures::future::join_all(handles))
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "timers did not finish their runs in time; stopping them"
            );
            for a in aborts {
                a.abort();
            }
        }
    }
}
