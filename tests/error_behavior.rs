//! Agents that fail: a panic or an `Err` on one event is counted, the event is acked, and the
//! agent goes on with the rest of its stream; offsets are committed past the failed events.

mod common;

use common::{assert_committed_to_end, preload, wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use std::sync::Once;

const EVENTS: u64 = 400;

/// Keeps the deliberate panics of these tests out of the test output; other panics (failed
/// assertions) are reported as usual.
fn quiet_deliberate_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.starts_with("deliberate") {
                default(info);
            }
        }));
    });
}

fn expected_good(fails: impl Fn(u64) -> bool) -> Vec<u64> {
    (0..EVENTS).filter(|v| !fails(*v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_and_failing_agents_skip_the_bad_event_and_process_the_rest() -> anyhow::Result<()>
{
    quiet_deliberate_panics();
    let panics_on = |v: u64| v % 5 == 0;
    let errs_on = |v: u64| v % 7 == 3;

    // The events are in the log before the worker starts, so it reads them in large batches.
    let values: Vec<u64> = (0..EVENTS).collect();
    preload("errors-broker", "numbers", 8, &values).await;
    let app = App::new("errors");
    app.configure(|s| s.broker = "memory://errors-broker".into());
    let topic = app.topic("numbers").value_type::<u64>();

    let by_panicky: Recorder<u64> = Recorder::new();
    let rec = by_panicky.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                if panics_on(v) {
                    panic!("deliberate panic on {v}");
                }
                rec.push(v);
            }
        }
    })
    .named("panicky")
    .channel(&topic);

    let by_fallible: Recorder<u64> = Recorder::new();
    let rec = by_fallible.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                if errs_on(v) {
                    return Err(format!("deliberate error on {v}"));
                }
                rec.push(v);
            }
            Ok(())
        }
    })
    .named("fallible")
    .channel(&topic);

    let by_yielding: Recorder<u64> = Recorder::new();
    let rec = by_yielding.clone();
    let yielded: Recorder<u64> = Recorder::new();
    let sink = yielded.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        stream! {
            while let Some(v) = s.next().await {
                if panics_on(v) {
                    panic!("deliberate panic in a yielding agent on {v}");
                }
                rec.push(v);
                yield v;
            }
        }
    })
    .named("yielding")
    .channel(&topic)
    .sink(move |v: u64| sink.push(v));

    // A healthy agent on the same topic: its neighbours' failures do not touch it.
    let by_healthy: Recorder<u64> = Recorder::new();
    let rec = by_healthy.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                rec.push(v);
            }
        }
    })
    .named("healthy")
    .channel(&topic);

    let worker = app.start().await?;
    let panics = expected_good(|v| !panics_on(v)).len() as u64;
    let errors = expected_good(|v| !errs_on(v)).len() as u64;
    wait_until_state(
        WAIT,
        "every agent got through the whole stream",
        || {
            (
                by_panicky.len(),
                by_fallible.len(),
                by_yielding.len(),
                by_healthy.len(),
                worker.agent_errors("panicky"),
                worker.agent_errors("fallible"),
                worker.agent_errors("yielding"),
            )
        },
        |s| {
            *s == (
                (EVENTS - panics) as usize,
                (EVENTS - errors) as usize,
                (EVENTS - panics) as usize,
                EVENTS as usize,
                panics,
                errors,
                panics,
            )
        },
    )
    .await;
    assert_eq!(worker.agent_errors("healthy"), 0);
    worker.shutdown().await?;

    let sorted = |r: &Recorder<u64>| {
        let mut v = r.snapshot();
        v.sort_unstable();
        v
    };
    assert_eq!(
        sorted(&by_panicky),
        expected_good(panics_on),
        "panicky agent"
    );
    assert_eq!(
        sorted(&by_fallible),
        expected_good(errs_on),
        "failing agent"
    );
    assert_eq!(
        sorted(&by_yielding),
        expected_good(panics_on),
        "yielding agent"
    );
    assert_eq!(
        sorted(&yielded),
        expected_good(panics_on),
        "yielding agent's sink"
    );
    assert_eq!(
        sorted(&by_healthy),
        (0..EVENTS).collect::<Vec<_>>(),
        "healthy agent"
    );
    // The failed events are acked: the commit goes past them to the end of every partition.
    assert_committed_to_end(&app, "numbers");
    Ok(())
}

/// Why `checked_halves` fails an event.
#[derive(Debug)]
struct Odd(u64);

impl std::fmt::Display for Odd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is odd", self.0)
    }
}

impl std::error::Error for Odd {}

/// A yielding agent that can fail: `?` in `try_stream!` fails the event with an error.
fn checked_halves(mut numbers: Stream<u64>) -> impl TryAsyncIterable<u64> {
    try_stream! {
        while let Some(n) = numbers.next().await {
            if n % 2 == 1 {
                Err(Odd(n))?;
            }
            let half: u64 = format!("{}", n / 2).parse()?;
            yield half;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yielding_agent_fails_an_event_with_an_error_and_goes_on() -> anyhow::Result<()> {
    let values: Vec<u64> = (0..EVENTS).collect();
    preload("errors-try-broker", "numbers", 8, &values).await;
    let app = App::new("errors-try");
    app.configure(|s| s.broker = "memory://errors-try-broker".into());
    let topic = app.topic("numbers").value_type::<u64>();
    let halves: Recorder<u64> = Recorder::new();
    let sink = halves.clone();
    let agent = app
        .agent(checked_halves)
        .channel(&topic)
        .sink(move |v: u64| sink.push(v));
    let worker = app.start().await?;
    let name = agent.name();
    let odd = EVENTS / 2;
    wait_until_state(
        WAIT,
        "every even number halved and every odd one counted as an error",
        || (halves.len() as u64, worker.agent_errors(&name)),
        |s| *s == (EVENTS - odd, odd),
    )
    .await;
    // The agent still answers after its failures; a failing request gets no reply.
    assert_eq!(agent.ask(42).await?, 21);
    let failed = agent
        .ask(43)
        .timeout(std::time::Duration::from_millis(200))
        .await;
    assert!(
        matches!(failed, Err(rill::Error::AskTimeout { .. })),
        "{failed:?}"
    );
    assert_eq!(worker.agent_errors(&name), odd + 1);
    worker.processed(WAIT).await?;
    worker.shutdown().await?;

    let mut got = halves.snapshot();
    got.sort_unstable();
    let mut want: Vec<u64> = (0..EVENTS).step_by(2).map(|n| n / 2).collect();
    want.push(21);
    want.sort_unstable();
    assert_eq!(got, want, "each even number is halved once");
    // The failed events are acked: the commit goes past them to the end of every partition.
    assert_committed_to_end(&app, "numbers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_in_one_partition_does_not_hold_back_its_commit() -> anyhow::Result<()> {
    quiet_deliberate_panics();
    // All ten are in the log before the worker starts, so it reads them in one batch.
    preload(
        "errors-commit-broker",
        "one",
        1,
        &(0..10u64).collect::<Vec<_>>(),
    )
    .await;
    let app = App::new("errors-commit");
    app.configure(|s| s.broker = "memory://errors-commit-broker".into());
    let topic = app.topic("one").partitions(1).value_type::<u64>();
    let seen: Recorder<u64> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                if v == 0 || v == 9 {
                    panic!("deliberate panic on {v}");
                }
                rec.push(v);
            }
        }
    })
    .named("edges")
    .channel(&topic);

    let worker = app.start().await?;
    wait_until_state(
        WAIT,
        "both failures counted and the rest processed",
        || (seen.len(), worker.agent_errors("edges")),
        |s| *s == (8, 2),
    )
    .await;
    worker.shutdown().await?;
    // In order, the first and last events failed and everything between was processed once.
    assert_eq!(seen.snapshot(), (1..9).collect::<Vec<_>>());
    assert_eq!(common::end_offsets(&app, "one"), vec![10]);
    assert_committed_to_end(&app, "one");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_actor_of_a_concurrent_agent_is_restarted_and_the_rest_is_processed(
) -> anyhow::Result<()> {
    quiet_deliberate_panics();
    let fails = |v: u64| v % 4 == 1;
    let app = App::new("errors-concurrent");
    let topic = app.topic("numbers").value_type::<u64>();
    let seen: Recorder<u64> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut s: Stream<u64>| {
        let rec = rec.clone();
        async move {
            while let Some(v) = s.next().await {
                if fails(v) {
                    panic!("deliberate panic on {v}");
                }
                rec.push(v);
            }
        }
    })
    .named("concurrent")
    .concurrency(3)
    .channel(&topic);

    let worker = app.start().await?;
    for v in 0..EVENTS {
        topic.send(v).await?;
    }
    let failures = EVENTS / 4;
    wait_until_state(
        WAIT,
        "every event processed or counted as failed",
        || (seen.len(), worker.agent_errors("concurrent")),
        |s| *s == ((EVENTS - failures) as usize, failures),
    )
    .await;
    worker.shutdown().await?;
    let mut seen = seen.snapshot();
    seen.sort_unstable();
    assert_eq!(seen, expected_good(fails));
    assert_committed_to_end(&app, "numbers");
    Ok(())
}
