//! Declaring timers, crontabs and tasks on an [`App`].

use super::App;
use crate::agent::default_name;
use crate::timer::{Crontab, Task, TaskOutput, Timer};
use std::future::Future;
use std::time::Duration;

impl App {
    /// Runs `f` every `interval` while a worker runs, Faust's `@app.timer(interval)`: the
    /// first time one interval after the worker starts. `f` is an async function or closure
    /// returning `()` or `Result<(), E>`; an error or panic is logged with the timer's name
    /// and the timer runs again at its next tick. Runs never overlap: ticks that come while
    /// the body runs are skipped.
    ///
    /// [`on_leader`](Timer::on_leader) runs it on one worker of the app only. An interval of
    /// zero makes [`App::start`] fail.
    ///
    /// ```
    /// # use rill::prelude::*;
    /// # use std::time::Duration;
    /// async fn report() {
    ///     println!("still here");
    /// }
    ///
    /// # #[tokio::main] async fn main() -> rill::Result<()> {
    /// let app = App::new("timers");
    /// app.timer(Duration::from_secs(10), report).on_leader();
    /// app.crontab("0 * * * *", || async { println!("top of the hour") })
    ///     .timezone("Europe/Paris")
    ///     .named("hourly");
    /// app.task(|| async { Ok::<_, std::io::Error>(()) }).named("startup");
    ///
    /// let worker = app.start().await?;
    /// worker.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub fn timer<F, Fut, O>(&self, interval: Duration, f: F) -> Timer
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        self.timers.every(default_name::<F>(), interval, f)
    }

    /// Runs `f` at the times the cron expression selects, Faust's `@app.crontab`: five fields
    /// `minute hour day-of-month month day-of-week`, each `*`, a number, a name (`jan`,
    /// `mon`), a range (`1-5`), a step (`*/15`) or a list of them (`0,30`). When both
    /// day-of-month and day-of-week are restricted, a day matches if either does (as in Vixie
    /// cron). Times are read in UTC unless [`timezone`](Crontab::timezone) says otherwise.
    ///
    /// Daylight-saving time: each local time runs at most once. A local time skipped when the
    /// clocks go forward runs at the moment they do (`30 2 * * *` in Europe/Paris runs at
    /// 03:00 on the last Sunday of March); a local time repeated when they go back runs at its
    /// first occurrence only.
    ///
    /// An invalid expression or an unknown time zone makes [`App::start`] fail with
    /// [`Error::Crontab`](crate::Error::Crontab). Errors and panics are handled as for [`App::timer`]; see
    /// [`Settings::clock_start`](crate::Settings::clock_start) for tests on virtual time.
    pub fn crontab<F, Fut, O>(&self, expression: impl Into<String>, f: F) -> Crontab
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        self.timers.cron(default_name::<F>(), expression.into(), f)
    }

    /// Runs `f` once when a worker starts, Faust's `@app.task`; it is cancelled when the
    /// worker stops. An error or panic is logged with the task's name; the task is not
    /// restarted.
    pub fn task<F, Fut, O>(&self, f: F) -> Task
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        self.timers.at_start(default_name::<F>(), f)
    }
}
