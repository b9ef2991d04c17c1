//! A command in another process reaching a running embedded worker: `ask` round trips and
//! sends through the remote transport (`remote://`, the worker's web server) against the same
//! on the worker's own embedded transport, measured in the same run.
//!
//! ```console
//! $ cargo bench --bench remote
//! ```
//!
//! The client runs in this process but talks to the worker only over HTTP on loopback, as a
//! command in another process does.

use rill::prelude::*;
use std::time::{Duration, Instant};

const ASKS: usize = 2_000;
const SENDS: usize = 20_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
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

fn app(broker: &str) -> (App, Topic<Bytes, Add>, Agent<Add, i64>) {
    let app = App::new("bench-remote");
    app.configure(|s| s.broker = broker.to_owned());
    let topic = app.topic("adding").value_type::<Add>();
    let agent = app.agent(adding).channel(&topic);
    (app, topic, agent)
}

/// Latencies of `ASKS` sequential asks, in microseconds, sorted.
async fn asks(agent: &Agent<Add, i64>) -> Vec<f64> {
    let mut took = Vec::with_capacity(ASKS);
    for i in 0..ASKS as i64 {
        let start = Instant::now();
        let sum = agent.ask(Add { a: i, b: 1 }).await.expect("ask");
        took.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(sum, i + 1);
    }
    took.sort_by(f64::total_cmp);
    took
}

/// Sends per second of `SENDS` records, `in_flight` at a time.
async fn sends(topic: &Topic<Bytes, Add>, in_flight: usize) -> f64 {
    use futures::StreamExt;
    let start = Instant::now();
    futures::stream::iter(0..SENDS as i64)
        .map(|i| async move { topic.send(Add { a: i, b: 1 }).await.expect("send") })
        .buffer_unordered(in_flight)
        .for_each(|_| async {})
        .await;
    SENDS as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let datadir =
            std::env::temp_dir().join(format!("rill-bench-remote-{}", std::process::id()));
        let (worker_app, topic, agent) = app("memory://");
        worker_app.configure(|s| {
            s.web_port = Some(0);
            s.datadir = Some(datadir.clone());
        });
        let worker = worker_app.start().await.expect("worker");
        let web = worker.web_addr().expect("web");
        let (client_app, remote_topic, remote_agent) = app(&format!("remote://{web}"));
        let client = client_app.start_client().await.expect("client");

        let local = asks(&agent).await;
        let remote = asks(&remote_agent).await;
        println!("ask round trip, {ASKS} sequential asks (µs):");
        for (name, t) in [
            ("embedded (in the worker)", &local),
            ("remote (over HTTP)", &remote),
        ] {
            println!(
                "  {name:<26} p50 {:>8.1}   p99 {:>8.1}",
                percentile(t, 0.5),
                percentile(t, 0.99)
            );
        }
        println!(
            "  ratio remote / embedded: p50 {:.1}x",
            percentile(&remote, 0.5) / percentile(&local, 0.5)
        );

        for in_flight in [1, 64] {
            let l = sends(&topic, in_flight).await;
            let r = sends(&remote_topic, in_flight).await;
            println!(
                "send, {SENDS} records, {in_flight} in flight: embedded {l:>10.0}/s   remote \
                 {r:>10.0}/s   ratio {:.3}",
                r / l
            );
        }
        client.shutdown().await.expect("client stops");
        tokio::time::timeout(Duration::from_secs(30), worker.shutdown())
            .await
            .expect("worker stops in time")
            .expect("worker stops");
        let _ = std::fs::remove_dir_all(&datadir);
    });
}
