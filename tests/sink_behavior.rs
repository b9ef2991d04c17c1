//! Sinks: every value an agent yields reaches each of its sinks (a function, an async
//! function, a topic, a channel, another agent), in the order it was yielded.

mod common;

use common::{read_all, wait_until_state, within, Recorder, WAIT};
use rill::prelude::*;

const VALUES: i64 = 200;

fn expected() -> Vec<i64> {
    (0..VALUES).map(|v| v * 10).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_kind_receives_every_yielded_value_in_order() -> anyhow::Result<()> {
    let app = App::new("sinks");
    // One partition everywhere order is checked, so the order is the yield order.
    let input = app.topic("numbers").partitions(1).value_type::<i64>();
    let log_topic = app.topic("agent_log").partitions(1).value_type::<i64>();
    let b_topic = app.topic("agent_b").partitions(1).value_type::<i64>();
    let channel = app.channel::<i64>();

    let yielded: Recorder<i64> = Recorder::new();
    let by_fn: Recorder<i64> = Recorder::new();
    let by_async_fn: Recorder<i64> = Recorder::new();
    let by_agent: Recorder<i64> = Recorder::new();

    let rec = by_agent.clone();
    let agent_b = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            async move {
                while let Some(v) = s.next().await {
                    rec.push(v);
                }
            }
        })
        .named("agent_b")
        .channel(&b_topic);

    let rec = yielded.clone();
    let sync_rec = by_fn.clone();
    let async_rec = by_async_fn.clone();
    app.agent(move |mut s: Stream<i64>| {
        let rec = rec.clone();
        stream! {
            while let Some(v) = s.next().await {
                rec.push(v * 10);
                yield v * 10;
            }
        }
    })
    .named("agent_a")
    .channel(&input)
    .sink(move |v: i64| sync_rec.push(v))
    .sink(move |v: i64| {
        let rec = async_rec.clone();
        async move {
            tokio::task::yield_now().await;
            rec.push(v);
        }
    })
    .sink(&log_topic)
    .sink(&channel)
    .sink(&agent_b);

    let worker = app.start().await?;
    for v in 0..VALUES {
        input.send(v).await?;
    }

    let mut from_channel = Vec::new();
    for _ in 0..VALUES {
        let v = within(WAIT, "the next value on the sink channel", channel.recv()).await;
        from_channel.push(v.expect("the channel is open"));
    }
    wait_until_state(
        WAIT,
        "every sink has every value",
        || {
            (
                by_fn.len(),
                by_async_fn.len(),
                app.memory_broker().end_offset("agent_log", 0),
                by_agent.len(),
            )
        },
        |(f, a, log, b)| {
            let n = VALUES as usize;
            *f >= n && *a >= n && *log >= Some(VALUES) && *b >= n
        },
    )
    .await;
    worker.shutdown().await?;

    assert_eq!(
        yielded.snapshot(),
        expected(),
        "the agent itself saw the wrong values"
    );
    assert_eq!(by_fn.snapshot(), expected(), "function sink");
    assert_eq!(by_async_fn.snapshot(), expected(), "async function sink");
    assert_eq!(from_channel, expected(), "channel sink");
    assert!(channel.is_empty(), "the channel sink got extra values");
    let logged: Vec<i64> = read_all(&app, "agent_log")
        .iter()
        .map(|m| serde_json::from_slice(m.value.as_deref().unwrap_or_default()).unwrap())
        .collect();
    assert_eq!(logged, expected(), "topic sink");
    assert_eq!(by_agent.snapshot(), expected(), "agent sink");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yielding_agent_without_sinks_or_asker_still_processes_everything() -> anyhow::Result<()>
{
    // The yielded values go nowhere; the agent must not stall on them.
    let app = App::new("sinkless");
    let input = app.topic("in").value_type::<i64>();
    let seen: Recorder<i64> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut s: Stream<i64>| {
        let rec = rec.clone();
        stream! {
            while let Some(v) = s.next().await {
                rec.push(v);
                yield v;
            }
        }
    })
    .named("sinkless")
    .channel(&input);

    let worker = app.start().await?;
    for v in 0..VALUES {
        input.send(v).await?;
    }
    wait_until_state(
        WAIT,
        "every value processed",
        || seen.len(),
        |n| *n >= VALUES as usize,
    )
    .await;
    worker.shutdown().await?;
    let mut seen = seen.snapshot();
    seen.sort_unstable();
    assert_eq!(seen, (0..VALUES).collect::<Vec<_>>());
    common::assert_committed_to_end(&app, "in");
    Ok(())
}
