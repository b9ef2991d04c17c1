//! `Worker::shutdown`: agents finish the events they hold, everything processed is committed
//! and nothing else, and the same app started again resumes from the commit.

mod common;

use common::{
    assert_committed_to_end, committed, wait_until, wait_until_state, within, Recorder, WAIT,
};
use rill::prelude::*;
use rill::transport::TopicPartition;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Values as `(run, value)`; `run` tells the two lives of a restarted app apart.
type Log = Recorder<(usize, u64)>;

fn recording_agent(app: &App, topic: &Topic<rill::Bytes, u64>, log: &Log, run: &Arc<AtomicUsize>) {
    let (log, run) = (log.clone(), run.clone());
    app.agent(move |mut s: Stream<u64>| {
        let (log, run) = (log.clone(), run.clone());
        async move {
            while let Some(v) = s.next().await {
                log.push((run.load(Ordering::SeqCst), v));
            }
        }
    })
    .named("recorder")
    .channel(topic);
}

// Virtual time: the periodic commit runs once at start and then not for an hour, so what is
// committed at the end, shutdown committed.
#[tokio::test(start_paused = true)]
async fn shutdown_commits_everything_processed() -> anyhow::Result<()> {
    const EVENTS: u64 = 400;
    let app = App::new("shutdown-commit");
    app.configure(|s| s.commit_interval = Duration::from_secs(3600));
    let topic = app.topic("events").partitions(4).value_type::<u64>();
    let log = Log::new();
    recording_agent(&app, &topic, &log, &Arc::new(AtomicUsize::new(1)));

    let worker = app.start().await?;
    // Let the commit that runs at start pass before anything is processed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for v in 0..EVENTS {
        topic.send(v).await?;
    }
    wait_until_state(
        WAIT,
        "every event was processed",
        || log.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    assert!(
        committed(&app).is_empty(),
        "precondition: nothing committed before shutdown, got {:?}",
        committed(&app)
    );
    worker.shutdown().await?;

    let mut values: Vec<u64> = log.snapshot().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        values.len(),
        EVENTS as usize,
        "an event was processed twice"
    );
    values.sort_unstable();
    assert_eq!(values, (0..EVENTS).collect::<Vec<_>>());
    assert_committed_to_end(&app, "events");
    Ok(())
}

// Virtual time: the in-flight event takes one (virtual) second, so shutdown certainly starts
// while it is being processed.
#[tokio::test(start_paused = true)]
async fn shutdown_lets_the_in_flight_event_finish_and_commits_exactly_what_was_processed(
) -> anyhow::Result<()> {
    const EVENTS: u64 = 50;
    let app = App::new("shutdown-drain");
    app.configure(|s| s.commit_interval = Duration::from_secs(3600));
    let topic = app.topic("slow").partitions(1).value_type::<u64>();

    let started: Recorder<u64> = Recorder::new();
    let finished: Recorder<(usize, u64)> = Recorder::new();
    let run = Arc::new(AtomicUsize::new(1));
    let (s_rec, f_rec, run_no) = (started.clone(), finished.clone(), run.clone());
    app.agent(move |mut s: Stream<u64>| {
        let (s_rec, f_rec, run_no) = (s_rec.clone(), f_rec.clone(), run_no.clone());
        async move {
            while let Some(v) = s.next().await {
                s_rec.push(v);
                let r = run_no.load(Ordering::SeqCst);
                if r == 1 && v == 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                f_rec.push((r, v));
            }
        }
    })
    .named("slow")
    .channel(&topic);

    let worker = app.start().await?;
    for v in 0..EVENTS {
        topic.send(v).await?;
    }
    wait_until(WAIT, "the first event is in flight", || !started.is_empty()).await;
    assert!(
        finished.is_empty(),
        "precondition: the first event is still in flight"
    );
    let stopping = tokio::time::Instant::now();
    worker.shutdown().await?;
    assert!(
        stopping.elapsed() >= Duration::from_millis(900),
        "shutdown returned before the in-flight event could finish"
    );

    let first_run: Vec<u64> = finished.snapshot().into_iter().map(|(_, v)| v).collect();
    assert!(!first_run.is_empty(), "the in-flight event was abandoned");
    assert_eq!(
        started.snapshot(),
        first_run,
        "an event was started and not finished during shutdown"
    );
    assert_eq!(first_run, (0..first_run.len() as u64).collect::<Vec<_>>());
    let tp = TopicPartition::new("slow", 0);
    assert_eq!(
        committed(&app).get(&tp).copied(),
        Some(first_run.len() as i64),
        "the commit must cover exactly the events processed"
    );

    // Started again, the app goes on from the commit: the rest, and nothing twice.
    run.store(2, Ordering::SeqCst);
    let worker = app.start().await?;
    wait_until_state(
        WAIT,
        "the restarted app processed the rest",
        || finished.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;
    let all: Vec<u64> = finished.snapshot().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        all,
        (0..EVENTS).collect::<Vec<_>>(),
        "lost or processed twice across restart"
    );
    assert_committed_to_end(&app, "slow");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_app_resumes_from_the_commit_and_processes_nothing_twice() -> anyhow::Result<()>
{
    const PARTITIONS: u32 = 4;
    const PER_RUN: u64 = 200;
    let app = App::new("shutdown-restart");
    let topic = app
        .topic("events")
        .partitions(PARTITIONS)
        .value_type::<u64>();
    let log = Log::new();
    let run = Arc::new(AtomicUsize::new(1));
    recording_agent(&app, &topic, &log, &run);

    let worker = app.start().await?;
    for v in 0..PER_RUN {
        topic.send(v).await?;
    }
    wait_until_state(
        WAIT,
        "the first run processed everything",
        || log.len(),
        |n| *n >= PER_RUN as usize,
    )
    .await;
    within(WAIT, "shutdown", worker.shutdown()).await?;
    assert_committed_to_end(&app, "events");

    run.store(2, Ordering::SeqCst);
    let worker = app.start().await?;
    // New events in every partition: an old event read again would come before them.
    for v in PER_RUN..2 * PER_RUN {
        topic
            .send(v)
            .partition((v % u64::from(PARTITIONS)) as u32)
            .await?;
    }
    let new: BTreeSet<u64> = (PER_RUN..2 * PER_RUN).collect();
    wait_until_state(
        WAIT,
        "the second run processed the new events",
        || {
            log.snapshot()
                .into_iter()
                .filter(|(r, _)| *r == 2)
                .map(|(_, v)| v)
                .collect::<BTreeSet<u64>>()
        },
        |seen| new.is_subset(seen),
    )
    .await;
    within(WAIT, "second shutdown", worker.shutdown()).await?;

    let log = log.snapshot();
    let second: Vec<u64> = log
        .iter()
        .filter(|(r, _)| *r == 2)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(
        second.len(),
        PER_RUN as usize,
        "the restarted app processed old events again: {:?}",
        second.iter().filter(|v| **v < PER_RUN).collect::<Vec<_>>()
    );
    let mut all: Vec<u64> = log.iter().map(|(_, v)| *v).collect();
    all.sort_unstable();
    assert_eq!(all, (0..2 * PER_RUN).collect::<Vec<_>>());
    assert_committed_to_end(&app, "events");
    Ok(())
}

// Virtual time: the shutdown timeout passes without waiting for it.
#[tokio::test(start_paused = true)]
async fn an_event_still_in_flight_at_the_shutdown_timeout_is_not_committed_and_comes_back(
) -> anyhow::Result<()> {
    let app = App::new("shutdown-timeout");
    app.configure(|s| s.shutdown_timeout = Duration::from_secs(5));
    let topic = app.topic("stuck").partitions(1).value_type::<u64>();
    let done: Recorder<(usize, u64)> = Recorder::new();
    let run = Arc::new(AtomicUsize::new(1));
    let (rec, run_no) = (done.clone(), run.clone());
    app.agent(move |mut s: Stream<u64>| {
        let (rec, run_no) = (rec.clone(), run_no.clone());
        async move {
            while let Some(v) = s.next().await {
                let r = run_no.load(Ordering::SeqCst);
                if r == 1 && v == 3 {
                    // Hangs in the first run only.
                    std::future::pending::<()>().await;
                }
                rec.push((r, v));
            }
        }
    })
    .named("stuck")
    .channel(&topic);

    let worker = app.start().await?;
    for v in 0..6 {
        topic.send(v).await?;
    }
    wait_until_state(
        WAIT,
        "the events before the stuck one",
        || done.len(),
        |n| *n >= 3,
    )
    .await;
    let started = tokio::time::Instant::now();
    worker.shutdown().await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(10),
        "shutdown gave up after {waited:?}, not after the 5 s shutdown timeout"
    );
    assert_eq!(done.snapshot(), vec![(1, 0), (1, 1), (1, 2)]);
    let tp = TopicPartition::new("stuck", 0);
    assert_eq!(
        committed(&app).get(&tp).copied(),
        Some(3),
        "only the events before the unfinished one may be committed"
    );

    run.store(2, Ordering::SeqCst);
    let worker = app.start().await?;
    wait_until_state(
        WAIT,
        "the second run processed the rest",
        || done.len(),
        |n| *n >= 6,
    )
    .await;
    worker.shutdown().await?;
    assert_eq!(
        done.snapshot(),
        vec![(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)],
        "the unfinished event and those after it are processed after the restart"
    );
    assert_committed_to_end(&app, "stuck");
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Transfer {
    account_id: String,
    seq: u32,
}

// Virtual time: each transfer takes a (virtual) millisecond, so transfers are still queued on
// both sides of the repartition topic when the worker stops, and a shutdown stuck until its
// timeout shows as virtual time passing.
#[tokio::test(start_paused = true)]
async fn shutdown_of_a_group_by_agent_with_queued_events_is_prompt_and_loses_nothing(
) -> anyhow::Result<()> {
    const BATCH: u32 = 100;
    const EVENTS: u32 = 2 * BATCH;
    let shutdown_timeout = Duration::from_secs(120);
    let app = App::new("shutdown-groupby");
    app.configure(|s| s.shutdown_timeout = shutdown_timeout);
    let topic = app
        .topic("transfers")
        .partitions(1)
        .value_type::<Transfer>();
    let seen: Recorder<u32> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<Transfer>| {
        let rec = rec.clone();
        async move {
            let mut s = s.group_by(field!(Transfer.account_id));
            while let Some(t) = s.next().await {
                tokio::time::sleep(Duration::from_millis(1)).await;
                rec.push(t.seq);
            }
        }
    })
    .named("by-account")
    .channel(&topic);

    let worker = app.start().await?;
    let send = |seq: u32| {
        topic.send(Transfer {
            account_id: format!("acct-{}", seq % 10),
            seq,
        })
    };
    for seq in 0..BATCH {
        send(seq).await?;
    }
    wait_until(WAIT, "the first transfers are being processed", || {
        !seen.is_empty()
    })
    .await;
    // These queue up behind the first batch, which the agent is still working through.
    for seq in BATCH..2 * BATCH {
        send(seq).await?;
    }
    wait_until(WAIT, "more transfers processed", || seen.len() >= 5).await;
    assert!(
        seen.len() < BATCH as usize,
        "precondition: transfers are still queued when the worker stops"
    );
    let stopping = tokio::time::Instant::now();
    worker.shutdown().await?;
    let took = stopping.elapsed();
    assert!(
        took < shutdown_timeout / 2,
        "shutdown took {took:?}: it waited for the {shutdown_timeout:?} timeout instead of draining"
    );

    // Whatever was not processed is processed after a restart: nothing lost, nothing twice.
    let worker = app.start().await?;
    wait_until_state(
        WAIT,
        "every transfer was processed",
        || seen.len(),
        |n| *n >= EVENTS as usize,
    )
    .await;
    worker.shutdown().await?;
    let mut all = seen.snapshot();
    assert_eq!(all.len(), EVENTS as usize, "a transfer was processed twice");
    all.sort_unstable();
    assert_eq!(all, (0..EVENTS).collect::<Vec<_>>());
    assert_committed_to_end(&app, "transfers");
    Ok(())
}

// Virtual time: a shutdown that waits for its timeout shows as virtual time passing.
#[tokio::test(start_paused = true)]
async fn a_group_by_agent_stopped_as_it_starts_stops_at_once_and_loses_nothing(
) -> anyhow::Result<()> {
    let shutdown_timeout = Duration::from_secs(120);
    // Each round stops the worker after a different number of scheduler turns, so the stop
    // lands before, while and after the agent subscribes to its repartition topic (a command
    // that sends and returns at once stops its worker this way).
    for turns in 0..24u32 {
        let app = App::new(format!("shutdown-groupby-start-{turns}"));
        app.configure(|s| s.shutdown_timeout = shutdown_timeout);
        let topic = app
            .topic("transfers")
            .partitions(1)
            .value_type::<Transfer>();
        let seen: Recorder<u32> = Recorder::new();
        let rec = seen.clone();
        app.agent(move |s: Stream<Transfer>| {
            let rec = rec.clone();
            async move {
                let mut s = s.group_by(field!(Transfer.account_id));
                while let Some(t) = s.next().await {
                    rec.push(t.seq);
                }
            }
        })
        .named("by-account")
        .channel(&topic);

        let worker = app.start().await?;
        topic
            .send(Transfer {
                account_id: "acct-1".into(),
                seq: turns,
            })
            .await?;
        for _ in 0..turns {
            tokio::task::yield_now().await;
        }
        let stopping = tokio::time::Instant::now();
        worker.shutdown().await?;
        let took = stopping.elapsed();
        assert!(
            took < shutdown_timeout / 2,
            "round {turns}: shutdown took {took:?}: the agent waited for the {shutdown_timeout:?} \
             timeout"
        );

        // Processed exactly once, before the stop or after a restart.
        let worker = app.start().await?;
        wait_until(WAIT, "the transfer was processed", || !seen.is_empty()).await;
        worker.shutdown().await?;
        assert_eq!(seen.snapshot(), vec![turns], "round {turns}");
    }
    Ok(())
}

// Virtual time: the timeout of a worker that cannot catch up passes without waiting.
#[tokio::test(start_paused = true)]
async fn processed_waits_for_every_record_through_a_group_by_and_times_out_on_a_stuck_agent(
) -> anyhow::Result<()> {
    const EVENTS: u32 = 200;
    let app = App::new("processed-wait");
    app.configure(|s| s.commit_interval = Duration::from_millis(100));
    let topic = app
        .topic("transfers")
        .partitions(2)
        .value_type::<Transfer>();
    let seen: Recorder<u32> = Recorder::new();
    let stuck = Arc::new(tokio::sync::Notify::new());
    let (rec, hold) = (seen.clone(), stuck.clone());
    app.agent(move |s: Stream<Transfer>| {
        let (rec, hold) = (rec.clone(), hold.clone());
        async move {
            let mut s = s.group_by(field!(Transfer.account_id));
            while let Some(t) = s.next().await {
                if t.seq == EVENTS {
                    // The last one holds the agent until the test lets it go.
                    hold.notified().await;
                }
                rec.push(t.seq);
            }
        }
    })
    .named("by-account")
    .channel(&topic);

    let worker = app.start().await?;
    for seq in 0..EVENTS {
        topic
            .send(Transfer {
                account_id: format!("acct-{}", seq % 7),
                seq,
            })
            .await?;
    }
    worker.processed(Duration::from_secs(60)).await?;
    assert_eq!(
        seen.len(),
        EVENTS as usize,
        "every transfer, through the repartition topic"
    );

    topic
        .send(Transfer {
            account_id: "acct-0".into(),
            seq: EVENTS,
        })
        .await?;
    let err = worker
        .processed(Duration::from_secs(5))
        .await
        .expect_err("a stuck agent is not done");
    assert!(matches!(err, rill::Error::NotProcessed { .. }), "{err}");
    // From a command, the app answers the same.
    stuck.notify_one();
    app.processed(Duration::from_secs(60)).await?;
    assert_eq!(seen.len(), EVENTS as usize + 1);
    worker.shutdown().await?;
    Ok(())
}
