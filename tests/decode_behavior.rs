//! Messages an agent cannot decode (bad JSON, wrong types, empty payloads, tombstones, bad
//! keys) are skipped and counted; every valid message around them is processed, and the
//! offsets are committed past them.

mod common;

use common::{assert_committed_to_end, wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use rill::Bytes;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: u32,
}

fn encoded(value: u32) -> Bytes {
    let r = Reading {
        sensor: "s1".into(),
        value,
    };
    Bytes::from(serde_json::to_vec(&r).unwrap())
}

/// Payloads that a JSON codec for `Reading` cannot decode.
fn bad_payloads() -> Vec<(&'static str, Option<Bytes>)> {
    vec![
        (
            "invalid json",
            Some(Bytes::from_static(b"{\"sensor\": \"s1\", ")),
        ),
        (
            "wrong types",
            Some(Bytes::from_static(b"{\"sensor\": 7, \"value\": \"high\"}")),
        ),
        (
            "missing field",
            Some(Bytes::from_static(b"{\"sensor\": \"s1\"}")),
        ),
        ("empty payload", Some(Bytes::new())),
        ("tombstone", None),
        ("not utf-8", Some(Bytes::from_static(&[0xff, 0xfe, 0x00]))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_values_are_skipped_counted_and_committed_past() -> anyhow::Result<()> {
    const ROUNDS: u32 = 20;

    let app = App::new("decode-values");
    let topic = app.topic("readings").partitions(1).value_type::<Reading>();
    let seen: Recorder<u32> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |mut s: Stream<Reading>| {
        let rec = rec.clone();
        async move {
            while let Some(r) = s.next().await {
                rec.push(r.value);
            }
        }
    })
    .named("readings")
    .channel(&topic);

    let worker = app.start().await?;
    let bad = bad_payloads();
    let mut good = 0u32;
    for _ in 0..ROUNDS {
        for (_, payload) in &bad {
            topic.send_raw(None, Some(encoded(good)), Some(0)).await?;
            good += 1;
            topic.send_raw(None, payload.clone(), Some(0)).await?;
        }
        // A typed send between raw ones.
        topic
            .send(Reading {
                sensor: "s1".into(),
                value: good,
            })
            .await?;
        good += 1;
    }
    let bad_count = u64::from(ROUNDS) * bad.len() as u64;
    wait_until_state(
        WAIT,
        "every valid reading was processed and every bad one counted",
        || (seen.len(), worker.decode_errors("readings")),
        |(n, errors)| *n >= good as usize && *errors >= bad_count,
    )
    .await;
    worker.shutdown().await?;

    // In partition order: every valid one, once, none of the bad ones.
    assert_eq!(seen.snapshot(), (0..good).collect::<Vec<_>>());
    let total = i64::from(good) + bad_count as i64;
    assert_eq!(app.memory_broker().end_offset("readings", 0), Some(total));
    assert_committed_to_end(&app, "readings");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_payload_alone_is_skipped() -> anyhow::Result<()> {
    for (what, payload) in bad_payloads() {
        let app = App::new(format!("decode-{}", what.replace(' ', "-")));
        let topic = app.topic("readings").partitions(1).value_type::<Reading>();
        let seen: Recorder<u32> = Recorder::new();
        let rec = seen.clone();
        app.agent(move |mut s: Stream<Reading>| {
            let rec = rec.clone();
            async move {
                while let Some(r) = s.next().await {
                    rec.push(r.value);
                }
            }
        })
        .named("readings")
        .channel(&topic);

        let worker = app.start().await?;
        topic.send_raw(None, payload, Some(0)).await?;
        topic.send_raw(None, Some(encoded(1)), Some(0)).await?;
        wait_until_state(
            WAIT,
            &format!("{what}: the valid reading after it was processed"),
            || (seen.len(), worker.decode_errors("readings")),
            |s| s.0 >= 1 && s.1 >= 1,
        )
        .await;
        assert_eq!(worker.decode_errors("readings"), 1, "{what}");
        worker.shutdown().await?;
        assert_eq!(seen.snapshot(), vec![1], "{what}");
        assert_committed_to_end(&app, "readings");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_keys_are_skipped_by_items_and_counted() -> anyhow::Result<()> {
    let app = App::new("decode-keys");
    let topic = app
        .topic("scores")
        .partitions(1)
        .key_type::<String>()
        .value_type::<u32>();
    let seen: Recorder<(Option<String>, u32)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<u32, String>| {
        let rec = rec.clone();
        async move {
            let mut items = s.items();
            while let Some((key, value)) = items.next().await {
                rec.push((key, value));
            }
        }
    })
    .named("scores")
    .channel(&topic);

    let worker = app.start().await?;
    topic.send(1).key("alice".to_owned()).await?;
    // A key that is not JSON: the event cannot be given a typed key.
    topic
        .send_raw(
            Some(Bytes::from_static(b"bob")),
            Some(Bytes::from_static(b"2")),
            Some(0),
        )
        .await?;
    topic.send(3).await?;
    topic.send(4).key("carol".to_owned()).await?;
    wait_until_state(
        WAIT,
        "the valid events were processed and the bad key counted",
        || (seen.len(), worker.decode_errors("scores")),
        |s| s.0 >= 3 && s.1 >= 1,
    )
    .await;
    worker.shutdown().await?;

    assert_eq!(
        seen.snapshot(),
        vec![
            (Some("alice".to_owned()), 1),
            (None, 3),
            (Some("carol".to_owned()), 4)
        ]
    );
    assert_committed_to_end(&app, "scores");
    Ok(())
}
