use rdkafka::mocking::MockCluster;
use rill::prelude::*;

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
