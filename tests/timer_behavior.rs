//! Timers, crontabs and tasks: how often they run (on virtual time), what a failure does,
//! crontabs in a time zone across daylight-saving changes, start-up errors, shutdown, and
//! `on_leader` timers running on one worker of an app at a time, on the embedded transport and
//! on librdkafka's mock cluster.

mod common;

use common::{wait_until, wait_until_state, within, Recorder, WAIT};
use rdkafka::mocking::MockCluster;
use rill::prelude::*;
use rill::{Error, Worker};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// An embedded app whose periodic commit stays out of the way of long virtual waits.
fn app(id: &str) -> App {
    init_logging();
    let app = App::new(id);
    app.configure(|s| s.commit_interval = HOUR);
    app
}

/// A timer body that records how long after `start` it ran.
fn record_elapsed(
    log: &Recorder<Duration>,
    start: Instant,
) -> impl Fn() -> std::future::Ready<()> + Send + Sync + 'static {
    let log = log.clone();
    move || {
        log.push(start.elapsed());
        std::future::ready(())
    }
}

/// Lets virtual time run to `start + after` (the paused clock jumps there once every task
/// waits).
async fn run_until(start: Instant, after: Duration) {
    tokio::time::sleep_until(start + after).await;
}

#[tokio::test(start_paused = true)]
async fn a_timer_runs_once_per_interval_from_one_interval_after_start() -> anyhow::Result<()> {
    let app = app("timer-interval");
    let log = Recorder::new();
    let start = Instant::now();
    let timer = app
        .timer(Duration::from_secs(10), record_elapsed(&log, start))
        .named("every-10s");
    assert_eq!(timer.name(), "every-10s");

    let worker = app.start().await?;
    run_until(start, Duration::from_secs(55)).await;
    let secs: Vec<u64> = log.snapshot().iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [10, 20, 30, 40, 50]);
    assert!(!worker.is_leader(), "no on_leader timer, no election");
    assert_eq!(
        app.memory_broker().partitions("timer-interval-__leader"),
        None,
        "an app without on_leader timers declares no leader topic"
    );
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_the_next_tick_and_timers_stop() -> anyhow::Result<()> {
    let app = app("timer-shutdown");
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    app.timer(HOUR, move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async {}
    })
    .named("hourly");

    let start = Instant::now();
    let worker = app.start().await?;
    run_until(start, HOUR + MINUTE).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Virtual time: had shutdown waited for the next tick, the clock would have jumped an hour.
    within(Duration::from_secs(1), "shutdown", worker.shutdown()).await?;
    run_until(start, 5 * HOUR).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a stopped worker's timer ran again"
    );
    Ok(())
}

/// Log lines written while it is installed (on this thread: the tests run on one).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_timer_is_logged_by_name_and_runs_again_at_its_next_tick() -> anyhow::Result<()> {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = app("timer-failing");
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    // Fails on the first run, panics on the second, succeeds after that.
    app.timer(Duration::from_secs(1), move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => Err(std::io::Error::other("disk full")),
                1 => panic!("lost the plot"),
                _ => Ok(()),
            }
        }
    })
    .named("flaky");
    let adding = app
        .agent(|mut s: Stream<i64>| {
            stream! {
                while let Some(v) = s.next().await {
                    yield v + 1;
                }
            }
        })
        .named("add-one");

    let start = Instant::now();
    let worker = app.start().await?;
    run_until(start, Duration::from_millis(5500)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        5,
        "the timer stopped after failing"
    );
    assert_eq!(adding.ask(41).await?, 42, "the worker stopped working");
    worker.shutdown().await?;

    let text = logs.text();
    for expected in [
        "disk full",
        "lost the plot",
        "returned an error",
        "panicked",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains("timer=flaky") && l.contains(expected)),
            "no log line names the timer and says {expected:?}:\n{text}"
        );
    }
    Ok(())
}

/// Runs an embedded worker whose crontab (`expression`, configured by `configure`) reads
/// `wall` as the time when the worker starts, for `duration` of virtual time; returns how long
/// after the start the crontab ran.
async fn crontab_runs(
    wall: &str,
    expression: &str,
    configure: impl FnOnce(rill::Crontab) -> rill::Crontab,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let wall: SystemTime = chrono::DateTime::parse_from_rfc3339(wall)?.into();
    let app = app("crontab");
    app.configure(|s| s.clock_start = Some(wall));
    let log = Recorder::new();
    let start = Instant::now();
    configure(app.crontab(expression, record_elapsed(&log, start)));

    let worker = app.start().await?;
    run_until(start, duration).await;
    worker.shutdown().await?;
    Ok(log.snapshot())
}

#[tokio::test(start_paused = true)]
async fn a_crontab_fires_at_the_top_of_each_hour() -> anyhow::Result<()> {
    let runs = crontab_runs("2024-01-01T10:20:00Z", "0 * * * *", |c| c, 3 * HOUR).await?;
    // 11:00, 12:00 and 13:00.
    assert_eq!(runs, [40 * MINUTE, 100 * MINUTE, 160 * MINUTE]);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_crontab_runs_a_local_time_skipped_in_spring_once_when_the_clocks_go_forward(
) -> anyhow::Result<()> {
    // Europe/Paris, 2024-03-31: at 02:00 CET (01:00 UTC) the clocks go forward to 03:00 CEST.
    // The worker starts at 13:00 CET the day before. On the leader only: the only embedded
    // worker leads.
    let paris = |c: rill::Crontab| c.timezone("Europe/Paris").on_leader();
    let runs = crontab_runs("2024-03-30T12:00:00Z", "30 2 * * *", paris, 48 * HOUR).await?;
    assert_eq!(
        runs,
        [
            // 2024-03-31T01:00Z: 02:30 does not exist that night; it runs at 03:00 CEST.
            13 * HOUR,
            // 2024-04-01T00:30Z: 02:30 CEST.
            36 * HOUR + 30 * MINUTE,
        ]
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_crontab_runs_a_repeated_autumn_time_once_and_an_hourly_one_every_hour(
) -> anyhow::Result<()> {
    // Europe/Paris, 2024-10-27: at 03:00 CEST (01:00 UTC) the clocks go back to 02:00 CET. The
    // worker starts at 01:30 CEST.
    let paris = |c: rill::Crontab| c.timezone("Europe/Paris");
    // A fixed local time runs once: 02:30 CEST (00:30Z), not again at 02:30 CET (01:30Z).
    let runs = crontab_runs("2024-10-26T23:30:00Z", "30 2 * * *", paris, 4 * HOUR).await?;
    assert_eq!(runs, [60 * MINUTE]);
    // An hourly job runs every hour that passes, as in Vixie cron: the repeated one too.
    let runs = crontab_runs("2024-10-26T23:30:00Z", "0 * * * *", paris, 4 * HOUR).await?;
    assert_eq!(
        runs,
        [
            // 00:00Z: 02:00 CEST.
            30 * MINUTE,
            // 01:00Z: 02:00 CET, the repeated hour.
            90 * MINUTE,
            // 02:00Z: 03:00 CET.
            150 * MINUTE,
            // 03:00Z: 04:00 CET.
            210 * MINUTE,
        ]
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_crontab_fails_start_naming_the_expression() {
    let cases = [
        ("61 * * * *", "UTC", "minute field: 61 is out of range 0-59"),
        ("0 * * *", "UTC", "expected 5 fields"),
        ("0 12 * * fun", "UTC", "day-of-week field"),
        (
            "0 * * * *",
            "Europe/Pariss",
            "unknown time zone \"Europe/Pariss\"",
        ),
    ];
    for (expression, timezone, expected) in cases {
        let app = app("crontab-invalid");
        app.crontab(expression, || async {})
            .timezone(timezone)
            .on_leader()
            .named("broken");
        match app.start().await {
            Err(Error::Crontab {
                expression: got,
                message,
            }) => {
                assert_eq!(got, expression);
                assert!(
                    message.contains(expected) && message.contains("broken"),
                    "{expression:?}: {message:?} does not say {expected:?} nor name the crontab"
                );
                let shown = Error::Crontab {
                    expression: got,
                    message,
                }
                .to_string();
                assert!(shown.contains(expression), "{shown:?}");
            }
            Err(e) => panic!("{expression:?}: expected Error::Crontab, got {e}"),
            Ok(w) => {
                let _ = w.shutdown().await;
                panic!("{expression:?} in {timezone:?}: the worker started")
            }
        }
    }
}

#[tokio::test]
async fn a_zero_interval_fails_start() {
    let app = app("timer-zero");
    app.timer(Duration::ZERO, || async {}).named("busy");
    match app.start().await {
        Err(Error::Config(message)) => assert!(message.contains("busy"), "{message}"),
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("the worker started with a zero interval"),
    }
}

/// Sets its flag when dropped: shows that a task's future was cancelled.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_starts_with_the_worker_and_is_cancelled_at_shutdown() -> anyhow::Result<()> {
    let app = app("task-lifecycle");
    let ticks = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (t, c) = (ticks.clone(), cancelled.clone());
    let task = app
        .task(move || {
            let (ticks, flag) = (t.clone(), DropFlag(c.clone()));
            async move {
                let _flag = flag;
                for _ in 0u64.. {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        })
        .named("forever");
    assert_eq!(task.name(), "forever");
    // A task may fail; the worker goes on.
    app.task(|| async { Err::<(), _>("no luck") })
        .named("fails");

    let worker = app.start().await?;
    wait_until(WAIT, "the task ticks three times", || {
        ticks.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(!cancelled.load(Ordering::SeqCst));
    within(Duration::from_secs(1), "shutdown", worker.shutdown()).await?;
    assert!(
        cancelled.load(Ordering::SeqCst),
        "the task still runs after shutdown"
    );
    Ok(())
}

/// Two workers of one app, each with an `on_leader` timer that records the worker's index:
/// exactly one of them runs it, and when that one stops the other takes over.
///
/// `revokes_on_join`: the second worker's join makes the group take every partition from the
/// first and assign them again (Kafka's eager protocol), so the election is settled once the
/// first worker was seen without the lead. On the embedded transport it is settled at once.
async fn one_worker_leads_and_another_takes_over(
    make_app: impl Fn(usize) -> App,
    wait: Duration,
    revokes_on_join: bool,
) -> anyhow::Result<()> {
    let runs: Recorder<usize> = Recorder::new();
    let start_worker = |i: usize| {
        let app = make_app(i);
        let runs = runs.clone();
        app.timer(Duration::from_millis(50), move || {
            runs.push(i);
            async {}
        })
        .on_leader()
        .named("leader-only");
        async move { within(wait, "a worker to start", app.start()).await }
    };

    let first = start_worker(0).await?;
    wait_until(wait, "the first worker leads and runs the timer", || {
        first.is_leader() && !runs.is_empty()
    })
    .await;
    let mut workers: Vec<Option<Worker>> = vec![Some(first), Some(start_worker(1).await?)];
    let leads = |workers: &[Option<Worker>]| -> Vec<bool> {
        workers
            .iter()
            .map(|w| w.as_ref().is_some_and(Worker::is_leader))
            .collect()
    };
    let mut first_lost_lead = !revokes_on_join;
    wait_until_state(
        wait,
        "the group settles with one leader",
        || {
            let l = leads(&workers);
            first_lost_lead |= !l[0];
            (first_lost_lead, l)
        },
        |(lost, l)| *lost && l.iter().filter(|x| **x).count() == 1,
    )
    .await;
    let leader = leads(&workers).iter().position(|x| *x).unwrap_or(0);
    let other = 1 - leader;

    let mark = runs.len();
    wait_until(wait, "the leader runs the timer 20 more times", || {
        runs.len() >= mark + 20
    })
    .await;
    assert!(
        runs.snapshot()[mark..].iter().all(|w| *w == leader),
        "worker {other} ran the timer while worker {leader} led: {:?}",
        &runs.snapshot()[mark..]
    );
    assert_eq!(leads(&workers), [leader == 0, leader == 1]);

    // The leader stops; the other takes over.
    if let Some(w) = workers[leader].take() {
        within(wait, "the leader to shut down", w.shutdown()).await?;
    }
    let stopped = runs.len();
    wait_until(wait, "the other worker takes over", || {
        runs.snapshot()[stopped..]
            .iter()
            .filter(|w| **w == other)
            .count()
            >= 5
    })
    .await;
    assert!(
        runs.snapshot()[stopped..].iter().all(|w| *w == other),
        "the stopped leader ran the timer"
    );
    if let Some(w) = workers[other].as_ref() {
        assert!(w.is_leader());
    }
    if let Some(w) = workers[other].take() {
        within(wait, "the other worker to shut down", w.shutdown()).await?;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_on_leader_timer_runs_on_one_of_two_embedded_workers_sharing_a_broker(
) -> anyhow::Result<()> {
    init_logging();
    one_worker_leads_and_another_takes_over(
        |_| {
            let app = App::new("timer-leader-embedded");
            app.configure(|s| {
                s.broker = "memory://timer-leader-embedded".into();
                s.commit_interval = HOUR;
            });
            app
        },
        WAIT,
        false,
    )
    .await
}

/// Bound for Kafka waits: joining the mock cluster's group and each rebalance take a few
/// seconds (the session timeout below less one second).
const KAFKA_WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_leader_timer_runs_on_exactly_one_of_two_kafka_workers_and_fails_over(
) -> anyhow::Result<()> {
    init_logging();
    let cluster = MockCluster::new(1)?;
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    one_worker_leads_and_another_takes_over(
        |_| {
            let app = App::new("timer-leader-kafka");
            app.configure(|s| {
                s.broker = url.clone();
                s.kafka.insert("session.timeout.ms".into(), "6000".into());
                s.kafka
                    .insert("heartbeat.interval.ms".into(), "1000".into());
            });
            app
        },
        KAFKA_WAIT,
        true,
    )
    .await
}
