//! Serializers named by string, as Faust's `key_serializer=`/`value_serializer=` on a topic and
//! in the app's settings: what reaches the log, what the agents read, and the error a user sees
//! for a name that does not exist or cannot carry the topic's type.

mod common;

use common::{read_all, wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use rill::{Error, Settings};

/// Commits only when the worker stops, so that the log can be read back while it runs.
fn keep_until_shutdown(s: &mut Settings) {
    s.commit_interval = std::time::Duration::from_secs(3600);
    s.commit_every = Some(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topics_named_serializers_encode_its_keys_and_values() -> anyhow::Result<()> {
    let app = App::new("serializers-topic");
    // No commit before the log is read back: the embedded broker drops what a group commits.
    app.configure(keep_until_shutdown);
    // Faust: app.topic('blobs', key_serializer='json', value_serializer='raw')
    let blobs = app
        .topic("blobs")
        .key_serializer("json")
        .value_serializer("raw")
        .key_type::<String>()
        .value_type::<Bytes>()
        .partitions(1);
    // The same, with the types first and the names after.
    let texts = app
        .topic("texts")
        .key_type::<String>()
        .value_type::<String>()
        .value_serializer("utf-8")
        .partitions(1);
    let got: Recorder<(String, Bytes)> = Recorder::new();
    let rec = got.clone();
    app.agent(move |s: Stream<Bytes, String>| {
        let rec = rec.clone();
        async move {
            let mut items = s.items();
            while let Some((key, value)) = items.next().await {
                rec.push((key.unwrap_or_default(), value));
            }
        }
    })
    .named("blob_reader")
    .channel(&blobs);
    let worker = app.start().await?;

    let blob = Bytes::from_static(&[0, 159, 146, 150]);
    blobs.send(blob.clone()).key("k1".to_owned()).await?;
    texts
        .send("plain text".to_owned())
        .key("k2".to_owned())
        .await?;
    wait_until_state(WAIT, "the agent read the blob", || got.len(), |n| *n >= 1).await;
    let blobs = read_all(&app, "blobs");
    worker.shutdown().await?;

    assert_eq!(got.snapshot(), vec![("k1".to_owned(), blob.clone())]);
    assert_eq!(
        blobs[0].key.as_deref(),
        Some(&b"\"k1\""[..]),
        "the key is JSON"
    );
    assert_eq!(
        blobs[0].value.as_deref(),
        Some(&blob[..]),
        "the value is the raw bytes"
    );
    let texts = read_all(&app, "texts");
    assert_eq!(texts[0].key.as_deref(), Some(&b"\"k2\""[..]));
    assert_eq!(texts[0].value.as_deref(), Some(&b"plain text"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_default_serializers_apply_to_every_topic() -> anyhow::Result<()> {
    // Faust: faust.App('id', key_serializer='raw', value_serializer='utf-8')... in Rust terms.
    let app = App::with_settings(
        "serializers-app",
        Settings {
            key_serializer: Some("raw".into()),
            value_serializer: Some("utf-8".into()),
            ..Settings::default()
        },
    );
    app.configure(keep_until_shutdown);
    let lines = app
        .topic("lines")
        .key_type::<String>()
        .value_type::<String>()
        .partitions(1);
    // A topic's own serializer wins over the app's.
    let numbers = app
        .topic("numbers")
        .value_serializer("json")
        .value_type::<Vec<i64>>()
        .partitions(1);
    let got: Recorder<String> = Recorder::new();
    let rec = got.clone();
    app.agent(move |mut s: Stream<String, String>| {
        let rec = rec.clone();
        async move {
            while let Some(line) = s.next().await {
                rec.push(line);
            }
        }
    })
    .named("line_reader")
    .channel(&lines);
    let worker = app.start().await?;
    lines
        .send("hello".to_owned())
        .key("greeting".to_owned())
        .await?;
    numbers.send(vec![1, 2]).await?;
    wait_until_state(WAIT, "the agent read the line", || got.len(), |n| *n >= 1).await;
    let lines = read_all(&app, "lines");
    worker.shutdown().await?;

    assert_eq!(got.snapshot(), vec!["hello".to_owned()]);
    assert_eq!(lines[0].key.as_deref(), Some(&b"greeting"[..]), "raw key");
    assert_eq!(
        lines[0].value.as_deref(),
        Some(&b"hello"[..]),
        "utf-8 value"
    );
    let numbers = read_all(&app, "numbers");
    assert_eq!(numbers[0].value.as_deref(), Some(&b"[1,2]"[..]));
    Ok(())
}

async fn start_error(app: &App) -> String {
    match app.start().await {
        Err(e @ Error::Serializer { .. }) => e.to_string(),
        Err(other) => panic!("expected a serializer error, got {other}"),
        Ok(_) => panic!("the worker started"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_unfit_serializer_fails_the_start_naming_it() {
    // An unknown name on a topic.
    let app = App::new("serializers-unknown");
    let _ = app.topic("orders").value_serializer("yaml");
    let err = start_error(&app).await;
    assert_eq!(
        err,
        "the value serializer of topic \"orders\": unknown serializer \"yaml\": the known \
         serializers are json, raw, utf-8"
    );

    // An unknown name in the settings.
    let app = App::new("serializers-unknown-default");
    app.configure(|s| s.key_serializer = Some("pickle".into()));
    let err = start_error(&app).await;
    assert!(
        err.starts_with("Settings::key_serializer: unknown serializer \"pickle\""),
        "{err}"
    );
    assert!(err.contains("json, raw, utf-8"), "{err}");

    // A serializer that cannot carry the type of the topic an agent reads.
    let app = App::new("serializers-unfit");
    let counts = app
        .topic("counts")
        .value_serializer("raw")
        .value_type::<i64>();
    app.agent(|mut s: Stream<i64>| async move { while s.next().await.is_some() {} })
        .named("counter")
        .channel(&counts);
    let err = start_error(&app).await;
    assert!(
        err.contains("topic \"counts\"") && err.contains("\"raw\"") && err.contains("i64"),
        "{err}"
    );
}
