//! Timers, crontabs and tasks: Faust's `@app.timer`, `@app.crontab` and `@app.task`.
//!
//! ```console
//! $ cargo run --example timers -- worker -l info
//! worker started: tick numbers follow every 2 seconds
//! tick 0
//! tick 1
//! ...
//! ```
//!
//! The timer sends a tick every 2 seconds, on one worker of the app only (`on_leader`); an
//! agent prints the ticks; a crontab greets Paris at 09:00 on weekdays; a task says hello when
//! the worker starts. Start two workers on Kafka (`--broker kafka://localhost:9092`) and only
//! one sends ticks; stop it and the other takes over.

use rill::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    n: u64,
}

async fn print_ticks(mut ticks: Stream<Tick>) {
    while let Some(tick) = ticks.next().await {
        println!("tick {}", tick.n);
    }
}

fn main() {
    let app = App::new("timers-example");
    let ticks = app.topic("ticks").value_type::<Tick>();
    app.agent(print_ticks).channel(&ticks);

    let sent = Arc::new(AtomicU64::new(0));
    app.timer(Duration::from_secs(2), move || {
        let (ticks, n) = (ticks.clone(), sent.fetch_add(1, Ordering::Relaxed));
        async move { ticks.send(Tick { n }).await.map(drop) }
    })
    .on_leader()
    .named("send_tick");

    app.crontab("0 9 * * mon-fri", || async {
        println!("good morning, Paris");
    })
    .timezone("Europe/Paris")
    .named("good_morning");

    app.task(|| async {
        println!("worker started: tick numbers follow every 2 seconds");
    })
    .named("hello");

    app.main()
}
