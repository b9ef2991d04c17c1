//! Talking to agents: `ask`, `cast`, `send(reply_to)`, and the streaming `map`, `kvmap`,
//! `join`, `kvjoin`; what a caller sees when no reply comes or the app is not running.

mod common;

use common::{kafka_partition, read_all, wait_until_state, Recorder, WAIT};
use futures::StreamExt;
use rill::prelude::*;
use rill::{Bytes, Error};
use std::future::IntoFuture;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            yield value.a + value.b;
        }
    }
}

/// An agent that squares, taking longer for smaller values, with one actor per value so the
/// replies come back in reverse order (under a paused clock).
fn slow_pow2(mut stream: Stream<i64>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(v) = stream.next().await {
            tokio::time::sleep(Duration::from_millis(100 - v as u64)).await;
            yield v * v;
        }
    }
}

/// An agent that reads everything and never yields.
async fn silent(mut stream: Stream<i64>) {
    while stream.next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_returns_the_value_the_agent_yields_for_the_request() -> anyhow::Result<()> {
    let app = App::new("ask-adding");
    let topic = app.topic("adding").value_type::<Add>();
    let adder = app.agent(adding).channel(&topic);
    let worker = app.start().await?;

    assert_eq!(adder.ask(Add { a: 2, b: 2 }).await?, 4);
    assert_eq!(adder.ask(Add { a: 4, b: 8 }).await?, 12);
    // Key and partition change where the request goes, not the answer.
    let keyed = adder.ask(Add { a: -1, b: 1 }).key(Bytes::from_static(b"k"));
    assert_eq!(keyed.await?, 0);
    assert_eq!(adder.ask(Add { a: 5, b: 5 }).partition(7).await?, 10);
    // Many asks at once each get their own answer.
    let answers = futures::future::try_join_all(
        (0..50).map(|i| adder.ask(Add { a: i, b: 1000 }).into_future()),
    )
    .await?;
    assert_eq!(answers, (0..50).map(|i| i + 1000).collect::<Vec<_>>());

    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reading_a_channel_answers_ask() -> anyhow::Result<()> {
    let app = App::new("ask-channel");
    let channel = app.channel::<Add>();
    let adder = app.agent(adding).channel(&channel);
    let worker = app.start().await?;
    assert_eq!(adder.ask(Add { a: 20, b: 22 }).await?, 42);
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cast_delivers_without_a_reply() -> anyhow::Result<()> {
    let app = App::new("ask-cast");
    let topic = app.topic("cast").partitions(1).value_type::<i64>();
    let seen: Recorder<(i64, usize)> = Recorder::new();
    let rec = seen.clone();
    let agent = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            stream! {
                while let Some(v) = s.next().await {
                    let headers = s.current_event().map(|m| m.headers.len()).unwrap_or(0);
                    rec.push((v, headers));
                    yield v;
                }
            }
        })
        .named("cast")
        .channel(&topic);
    let worker = app.start().await?;

    for v in 0..10 {
        agent.cast(v).await?;
    }
    wait_until_state(
        WAIT,
        "the agent got every cast",
        || seen.len(),
        |n| *n >= 10,
    )
    .await;
    worker.shutdown().await?;
    assert_eq!(
        seen.snapshot(),
        (0..10).map(|v| (v, 0)).collect::<Vec<_>>(),
        "casts arrive in order, with no reply address or correlation id"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_reply_to_forwards_the_result_to_another_agent_or_topic() -> anyhow::Result<()> {
    let app = App::new("ask-reply-to");
    let topic = app.topic("adding").value_type::<Add>();
    let adder = app.agent(adding).channel(&topic);
    let results = app.topic("results").partitions(1).value_type::<i64>();
    let collected: Recorder<i64> = Recorder::new();
    let rec = collected.clone();
    let collector = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            async move {
                while let Some(v) = s.next().await {
                    rec.push(v);
                }
            }
        })
        .named("collector")
        .channel(&results);
    let replies = app.topic("replies").partitions(1).value_type::<i64>();
    let worker = app.start().await?;

    // To another agent: the agent reads the reply as one of its events.
    adder.send(Add { a: 2, b: 2 }).reply_to(&collector).await?;
    adder.send(Add { a: 3, b: 4 }).reply_to(&collector).await?;
    wait_until_state(
        WAIT,
        "the collector got both results",
        || collected.len(),
        |n| *n >= 2,
    )
    .await;

    // To a topic, by value and by name, with the caller's correlation id.
    adder
        .send(Add { a: 10, b: 1 })
        .reply_to(&replies)
        .correlation_id("req-1")
        .await?;
    adder
        .send(Add { a: 20, b: 2 })
        .reply_to("replies")
        .correlation_id("req-2")
        .await?;
    wait_until_state(
        WAIT,
        "both replies are in the topic",
        || app.memory_broker().end_offset("replies", 0),
        |n| *n >= Some(2),
    )
    .await;
    worker.shutdown().await?;

    let mut got = collected.snapshot();
    got.sort_unstable();
    assert_eq!(got, vec![4, 7]);
    let records = read_all(&app, "replies");
    let replies: Vec<(i64, bool)> = records
        .iter()
        .map(|m| {
            let value: i64 =
                serde_json::from_slice(m.value.as_deref().unwrap_or_default()).unwrap();
            let id = if value == 11 { "req-1" } else { "req-2" };
            let carries_id = m.headers.iter().any(|(_, v)| v.as_ref() == id.as_bytes());
            (value, carries_id)
        })
        .collect();
    let mut replies = replies;
    replies.sort_unstable();
    assert_eq!(
        replies,
        vec![(11, true), (22, true)],
        "each reply carries its request's correlation id"
    );
    Ok(())
}

/// Faust's `ask(value, reply_to=..., correlation_id=...)`: the reply goes through the topic
/// the caller names, carries the caller's correlation id, and still comes back to the ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_with_reply_to_and_correlation_id_gets_its_reply_through_that_topic(
) -> anyhow::Result<()> {
    let app = App::new("ask-reply-to-topic");
    app.configure(|s| s.commit_interval = Duration::from_millis(20));
    let topic = app.topic("adding").value_type::<Add>();
    let adder = app.agent(adding).channel(&topic);
    let answers = app.topic("answers").partitions(1).value_type::<i64>();
    let worker = app.start().await?;

    let reply = adder
        .ask(Add { a: 20, b: 22 })
        .reply_to(&answers)
        .correlation_id("order-17")
        .timeout(WAIT)
        .await?;
    assert_eq!(reply, 42);
    // A topic named only by its name, that nobody declared: created and read the same way.
    let reply = adder
        .ask(Add { a: 1, b: 2 })
        .reply_to("elsewhere")
        .timeout(WAIT)
        .await?;
    assert_eq!(reply, 3);
    // Several asks on the same reply topic each get their own reply.
    let many = futures::future::try_join_all((0..10).map(|i| {
        adder
            .ask(Add { a: i, b: 100 })
            .reply_to(&answers)
            .correlation_id(format!("many-{i}"))
            .timeout(WAIT)
            .into_future()
    }))
    .await?;
    assert_eq!(many, (100..110).collect::<Vec<i64>>());

    // The reply is in the named topic, with the caller's correlation id, for every reader.
    wait_until_state(
        WAIT,
        "the replies are in the answers topic",
        || app.memory_broker().end_offset("answers", 0),
        |n| *n >= Some(11),
    )
    .await;
    let first = read_all(&app, "answers")
        .into_iter()
        .find(|m| m.value.as_deref() == Some(&b"42"[..]))
        .expect("the reply to the first ask is in the topic");
    assert!(
        first.headers.iter().any(|(_, v)| v.as_ref() == b"order-17"),
        "the reply carries the caller's correlation id: {:?}",
        first.headers
    );

    // Two asks waiting with the same correlation id would be ambiguous: the second is refused.
    let silent_app = App::new("ask-same-id");
    let numbers = silent_app.topic("numbers").value_type::<i64>();
    let quiet = silent_app.agent(silent).channel(&numbers);
    let silent_worker = silent_app.start().await?;
    let ask = |n| {
        quiet
            .ask(n)
            .correlation_id("same")
            .timeout(Duration::from_millis(200))
            .into_future()
    };
    let (a, b) = tokio::join!(ask(1), ask(2));
    let (refused, timed_out) = match (a, b) {
        (Err(Error::Config(m)), other) | (other, Err(Error::Config(m))) => (m, other),
        other => panic!("expected one of the two asks to be refused, got {other:?}"),
    };
    assert!(refused.contains("\"same\""), "{refused}");
    assert!(
        matches!(timed_out, Err(Error::AskTimeout { .. })),
        "{timed_out:?}"
    );
    silent_worker.shutdown().await?;
    worker.shutdown().await?;
    Ok(())
}

// Virtual time: replies come back in reverse order, so `join` has to put them back.
#[tokio::test(start_paused = true)]
async fn map_yields_every_reply_as_it_comes_and_join_restores_input_order() -> anyhow::Result<()> {
    let app = App::new("ask-map");
    let pow2 = app.agent(slow_pow2).named("pow2").concurrency(8);
    let worker = app.start().await?;
    let input: Vec<i64> = (1..=8).collect();
    let squares: Vec<i64> = input.iter().map(|v| v * v).collect();

    let mapped: Vec<i64> = pow2
        .map(input.clone())
        .map(|r| r.expect("a reply"))
        .collect()
        .await;
    assert_ne!(
        mapped, squares,
        "precondition: replies should arrive out of order (larger values are faster)"
    );
    let mut sorted = mapped.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, squares, "map lost or duplicated a reply");

    assert_eq!(
        pow2.join(input.clone()).await?,
        squares,
        "join keeps input order"
    );
    // An async stream of values works as well as an iterator.
    let values = futures::stream::iter(input.clone());
    assert_eq!(pow2.join(values).await?, squares);

    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn kvmap_and_kvjoin_use_the_key_as_the_message_key() -> anyhow::Result<()> {
    let app = App::new("ask-kv");
    let seen: Recorder<(Vec<u8>, u32)> = Recorder::new();
    let rec = seen.clone();
    let pow2 = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            stream! {
                while let Some(v) = s.next().await {
                    let event = s.current_event().expect("a value comes with its event");
                    rec.push((event.key.as_deref().unwrap_or_default().to_vec(), event.partition));
                    tokio::time::sleep(Duration::from_millis(100 - v as u64)).await;
                    yield v * v;
                }
            }
        })
        .named("kv-pow2")
        .concurrency(8);
    let worker = app.start().await?;
    let items: Vec<(Bytes, i64)> = (1..=8)
        .map(|v| (Bytes::from(format!("key-{v}")), v))
        .collect();
    let squares: Vec<i64> = (1..=8).map(|v| v * v).collect();

    let mut mapped: Vec<i64> = pow2
        .kvmap(items.clone())
        .map(|r| r.expect("a reply"))
        .collect()
        .await;
    mapped.sort_unstable();
    assert_eq!(mapped, squares);
    assert_eq!(
        pow2.kvjoin(items.clone()).await?,
        squares,
        "kvjoin keeps input order"
    );
    worker.shutdown().await?;

    let seen = seen.snapshot();
    assert_eq!(seen.len(), 16);
    for (key, partition) in seen {
        assert!(key.starts_with(b"key-"), "request sent without its key");
        assert_eq!(
            partition,
            kafka_partition(&key, 8),
            "request not partitioned by its key"
        );
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn ask_without_a_reply_fails_with_ask_timeout() -> anyhow::Result<()> {
    let app = App::new("ask-timeout");
    let agent = app.agent(silent).named("silent");
    let worker = app.start().await?;

    let started = tokio::time::Instant::now();
    let err = agent
        .ask(1)
        .timeout(Duration::from_millis(200))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    match &err {
        Error::AskTimeout { agent, timeout, .. } => {
            assert_eq!(agent, "silent");
            assert_eq!(*timeout, Duration::from_millis(200));
        }
        other => panic!("expected AskTimeout, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
        "gave up after {waited:?}"
    );
    assert!(
        err.to_string().contains("silent"),
        "message names the agent: {err}"
    );
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_apps_ask_timeout_applies_to_ask_map_and_join() -> anyhow::Result<()> {
    let app = App::new("ask-timeout-setting");
    app.configure(|s| s.ask_timeout = Duration::from_millis(500));
    let agent = app.agent(silent).named("silent");
    let worker = app.start().await?;

    let started = tokio::time::Instant::now();
    let err = agent.ask(1).await.unwrap_err();
    assert!(
        matches!(err, Error::AskTimeout { timeout, .. } if timeout == Duration::from_millis(500)),
        "unexpected: {err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));

    let err = agent.join([1, 2, 3]).await.unwrap_err();
    assert!(matches!(err, Error::AskTimeout { .. }), "join: {err:?}");

    let replies: Vec<_> = agent.map([1, 2, 3]).collect().await;
    assert_eq!(
        replies.len(),
        1,
        "map ends after its timeout error: {replies:?}"
    );
    assert!(
        matches!(replies[0], Err(Error::AskTimeout { .. })),
        "map: {replies:?}"
    );
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talking_to_an_agent_of_an_app_that_is_not_running_fails_with_not_running(
) -> anyhow::Result<()> {
    let app = App::new("ask-not-running");
    let topic = app.topic("adding").value_type::<Add>();
    let adder = app.agent(adding).channel(&topic);

    let not_running =
        |e: &Error| matches!(e, Error::NotRunning { app } if app == "ask-not-running");
    let err = adder.ask(Add { a: 1, b: 1 }).await.unwrap_err();
    assert!(not_running(&err), "ask: {err:?}");
    let err = adder.cast(Add { a: 1, b: 1 }).await.unwrap_err();
    assert!(not_running(&err), "cast: {err:?}");
    let err = adder.join([Add { a: 1, b: 1 }]).await.unwrap_err();
    assert!(not_running(&err), "join: {err:?}");
    let err = topic.send(Add { a: 1, b: 1 }).await.unwrap_err();
    assert!(not_running(&err), "topic send: {err:?}");

    // Running, then stopped again.
    let worker = app.start().await?;
    assert_eq!(adder.ask(Add { a: 1, b: 1 }).await?, 2);
    worker.shutdown().await?;
    let err = adder.ask(Add { a: 1, b: 1 }).await.unwrap_err();
    assert!(not_running(&err), "ask after shutdown: {err:?}");
    assert_eq!(
        common::end_offsets(&app, "adding").iter().sum::<i64>(),
        1,
        "only the ask made while running reached the topic"
    );
    Ok(())
}

/// How many asks each part of the leak test drops.
const DROPPED: usize = 1000;

/// An `ask` future or a `map`/`join` stream dropped before its reply came leaves nothing behind:
/// the worker stops waiting for those replies, and one that comes later is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_asks_and_map_streams_leave_no_waiter_behind() -> anyhow::Result<()> {
    let app = App::new("ask-dropped");
    let silent = app.agent(silent).named("silent");
    let answered: Recorder<i64> = Recorder::new();
    let rec = answered.clone();
    let echo = app
        .agent(move |mut s: Stream<i64>| {
            let rec = rec.clone();
            stream! {
                while let Some(v) = s.next().await {
                    rec.push(v);
                    yield v;
                }
            }
        })
        .named("echo");
    let worker = app.start().await?;
    assert_eq!(app.pending_replies(), 0);

    // Asks polled once, so sent and waiting, then dropped.
    let mut asks = Vec::new();
    for v in 0..DROPPED as i64 {
        let mut ask = silent.ask(v).into_future();
        assert!(
            futures::poll!(&mut ask).is_pending(),
            "a silent agent answered"
        );
        asks.push(ask);
    }
    assert_eq!(
        app.pending_replies(),
        DROPPED,
        "precondition: every ask waits"
    );
    drop(asks);
    assert_eq!(
        app.pending_replies(),
        0,
        "dropped asks still wait for a reply"
    );

    // An ask dropped by a timeout around it.
    let gave_up = tokio::time::timeout(Duration::from_millis(1), silent.ask(1).into_future());
    assert!(gave_up.await.is_err(), "a silent agent answered");
    assert_eq!(
        app.pending_replies(),
        0,
        "an ask dropped by a timeout still waits"
    );

    // A map stream and a join dropped with requests in flight.
    let mut mapped = silent.map(0..100);
    tokio::select! {
        reply = mapped.next() => panic!("a silent agent answered: {reply:?}"),
        () = wait_until_state(WAIT, "map sent its values", || app.pending_replies(), |n| *n == 100) => {}
    }
    drop(mapped);
    assert_eq!(app.pending_replies(), 0, "a dropped map stream still waits");
    let joined = silent.join(0..100);
    tokio::select! {
        reply = joined => panic!("a silent agent answered: {reply:?}"),
        () = wait_until_state(WAIT, "join sent its values", || app.pending_replies(), |n| *n == 100) => {}
    }
    assert_eq!(app.pending_replies(), 0, "a dropped join still waits");

    // Replies that come after their ask was dropped are ignored, and asking goes on.
    let mut asks = Vec::new();
    for v in 0..DROPPED as i64 {
        let mut ask = echo.ask(v).into_future();
        if futures::poll!(&mut ask).is_pending() {
            asks.push(ask);
        }
    }
    drop(asks);
    assert_eq!(app.pending_replies(), 0);
    wait_until_state(
        WAIT,
        "the agent answered every dropped ask",
        || answered.len(),
        |n| *n >= DROPPED,
    )
    .await;
    assert_eq!(echo.ask(7).await?, 7);
    assert_eq!(echo.join([1, 2, 3]).await?, vec![1, 2, 3]);
    assert_eq!(app.pending_replies(), 0);
    worker.shutdown().await?;
    Ok(())
}

/// An agent that answers every value but 0.
fn all_but_zero(mut stream: Stream<i64>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(v) = stream.next().await {
            if v != 0 {
                yield v;
            }
        }
    }
}

// Virtual time: values go out every 100 ms for ever, and all but the first are answered.
#[tokio::test(start_paused = true)]
async fn maps_timeout_counts_from_when_each_request_was_sent() -> anyhow::Result<()> {
    let app = App::new("ask-map-timeout");
    app.configure(|s| s.ask_timeout = Duration::from_millis(500));
    let agent = app.agent(all_but_zero).named("all-but-zero");
    let worker = app.start().await?;
    let values = futures::stream::unfold(0i64, |v| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((v, v + 1))
    });

    let started = tokio::time::Instant::now();
    let mut mapped = agent.map(values);
    let mut answered = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match mapped.next().await {
                Some(Ok(v)) => answered.push(v),
                Some(Err(e)) => return e,
                None => panic!("map ended without an error"),
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!("the request for 0 did not time out while the others were answered")
    })?;
    let waited = started.elapsed();
    assert!(
        matches!(err, Error::AskTimeout { timeout, .. } if timeout == Duration::from_millis(500)),
        "unexpected: {err:?}"
    );
    // 0 went out after 100 ms and gave up 500 ms later.
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_millis(700),
        "gave up after {waited:?}"
    );
    assert!(
        answered.len() >= 3 && answered.iter().all(|v| *v > 0),
        "the others were answered meanwhile: {answered:?}"
    );
    drop(mapped);
    assert_eq!(app.pending_replies(), 0);
    worker.shutdown().await?;
    Ok(())
}
