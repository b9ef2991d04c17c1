mod common;

use common::kafka::{scratch_dir, Kafka};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use rill::prelude::*;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_smoke() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    let cluster = MockCluster::new(1)?;
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    let app = App::new("kafka-smoke");
    app.configure(|s| {
        s.broker = url.clone();
        s.topic_partitions = 4;
    });
    let topic = app.topic("adding").value_type::<Add>().partitions(4);
    let adding = app.agent(adding).channel(&topic);
    let t0 = std::time::Instant::now();
    let w = app.start().await?;
    println!("started in {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    assert_eq!(adding.ask(Add { a: 4, b: 8 }).await?, 12);
    println!("first ask {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    for i in 0..100 {
        assert_eq!(adding.ask(Add { a: i, b: 1 }).await?, i + 1);
    }
    println!("100 asks {:?}", t0.elapsed());
    let r = adding.join((0..50).map(|i| Add { a: i, b: i })).await?;
    assert_eq!(r, (0..50).map(|i| 2 * i).collect::<Vec<_>>());
    w.shutdown().await?;
    Ok(())
}

/// The topics of the cluster at `bootstrap` whose names start with `prefix`.
fn topics_named(bootstrap: &str, prefix: &str) -> Vec<String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    let md = client
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let mut names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Every `send` or command run on Kafka is a worker with a reply topic for its asks. A run
/// without a worker id deletes its own when it stops (a shared cluster used to keep one per
/// run for ever); a worker with a worker id keeps `<app>-reply-<worker id>` for its next run.
#[test]
fn reply_topics_do_not_pile_up_on_kafka() {
    let dir = scratch_dir("reply-topics");
    let kafka = Kafka::single(&dir);
    let url = format!("kafka://{}", kafka.bootstrap());
    let app = App::new("reply-leak");
    let topic = app.topic("adding").value_type::<Add>().partitions(2);
    app.agent(adding).channel(&topic);
    for _ in 0..3 {
        app.main_from([
            "reply-leak",
            "--broker",
            &url,
            "send",
            "@adding",
            r#"{"a": 1, "b": 2}"#,
        ])
        .expect("send");
    }
    assert_eq!(
        topics_named(&kafka.bootstrap(), "reply-leak-reply-"),
        Vec::<String>::new(),
        "the sends' reply topics are gone"
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        app.configure(|s| {
            s.broker = url.clone();
            s.worker_id = Some("w 1".into());
        });
        let worker = app.start().await.expect("worker starts");
        worker.shutdown().await.expect("worker stops");
    });
    assert_eq!(
        topics_named(&kafka.bootstrap(), "reply-leak-reply-"),
        vec!["reply-leak-reply-w_1".to_owned()],
        "a worker with a worker id keeps its reply topic"
    );
    drop(kafka);
    let _ = std::fs::remove_dir_all(&dir);
}
