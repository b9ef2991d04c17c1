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

fn pow2(mut stream: Stream<i64>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(v) = stream.next().await {
            yield v * v;
        }
    }
}

#[tokio::test]
async fn smoke() -> anyhow::Result<()> {
    let app = App::new("smoke");
    let topic = app.topic("adding").value_type::<Add>();
    let adding = app.agent(adding).channel(&topic);
    let p = app.agent(pow2).concurrency(4);
    let out = app.channel::<i64>();
    let _grouped = app
        .agent(|mut s: Stream<Add>| async move {
            let mut s = s.group_by(field!(Add.a));
            while let Some(v) = s.next().await {
                println!("grouped {:?} {:?}", v, s.current_event().map(|m| (m.topic.to_string(), m.partition)));
            }
        })
        .named("grouped");
    let failing = app
        .agent(|mut s: Stream<i64>| async move {
            while let Some(v) = s.next().await {
                if v % 3 == 0 {
                    panic!("bad {v}");
                }
            }
        })
        .named("failing");
    let _ = out;
    let w = app.start().await?;
    assert_eq!(adding.ask(Add { a: 4, b: 8 }).await?, 12);
    assert_eq!(p.join([1, 2, 3, 4, 5, 6, 7, 8]).await?, vec![1, 4, 9, 16, 25, 36, 49, 64]);
    for i in 0..10 {
        failing.cast(i).await?;
    }
    for i in 0..5 {
        _grouped.cast(Add { a: i % 2, b: i }).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("failing errors = {}", w.agent_errors("failing"));
    w.shutdown().await?;
    println!("{:?}", app.memory_broker());
    Ok(())
}

