//! Table update throughput on the embedded transport with each store, against a bare
//! `HashMap` update loop, and the rate at which a worker restores a table from its changelog.
//!
//! ```console
//! $ cargo bench --bench tables
//! ```
//!
//! Updates run inside an agent (as in an app: the table writes to the current event's
//! partition and collects changes for the changelog); the worker commits as usual meanwhile.
//! Each measurement runs several rounds; medians are printed.

use rill::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const UPDATES: u64 = 2_000_000;
const KEYS: u64 = 100_000;
const RESTORE_KEYS: u64 = 500_000;
const ROUNDS: usize = 5;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("key-{i}")).collect()
}

fn bare(keys: &[String]) -> Duration {
    let mut map: HashMap<String, i64> = HashMap::new();
    let start = Instant::now();
    for i in 0..UPDATES {
        *map.entry(keys[(i % KEYS) as usize].clone()).or_default() += 1;
    }
    let d = start.elapsed();
    assert_eq!(map.len() as u64, KEYS);
    d
}

/// Time for `UPDATES` table updates made by an agent, on a worker with `store`.
async fn rill_updates(store: &str, round: usize, keys: Arc<Vec<String>>) -> Duration {
    let app = App::new(format!("bench-tables-{round}"));
    let store = store.to_owned();
    app.configure(|s| {
        s.store = store;
        s.topic_partitions = 1;
    });
    let counts = app.table::<String, i64>("counts");
    let go = app.topic("go").value_type::<u64>();
    let timing: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
    let (t, out) = (counts.clone(), timing.clone());
    app.agent(move |mut go: Stream<u64>| {
        let (counts, out, keys) = (t.clone(), out.clone(), keys.clone());
        async move {
            while let Some(n) = go.next().await {
                let start = Instant::now();
                for i in 0..n {
                    counts.update(keys[(i % KEYS) as usize].clone(), |c| *c += 1);
                }
                *out.lock().await = Some(start.elapsed());
            }
        }
    })
    .named("update")
    .channel(&go);
    let worker = app.start().await.expect("start");
    go.send(UPDATES).await.expect("send");
    let elapsed = loop {
        if let Some(d) = *timing.lock().await {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(counts.len() as u64, KEYS);
    worker.shutdown().await.expect("stop");
    elapsed
}

/// Fills a table of `RESTORE_KEYS` keys, then measures how fast a new worker restores it from
/// the changelog (memory store: the whole changelog is replayed).
async fn restore_rate() -> (u64, Duration) {
    let build = || {
        let app = App::new("bench-restore");
        app.configure(|s| {
            s.broker = "memory://bench-restore".into();
            s.topic_partitions = 4;
        });
        let counts = app.table::<String, i64>("counts");
        // Table partitions follow the partitions of the topics the app's agents read.
        let input = app.topic("input").value_type::<u64>();
        app.agent(|mut s: Stream<u64>| async move { while s.next().await.is_some() {} })
            .named("reader")
            .channel(&input);
        (app, counts)
    };
    let (app, counts) = build();
    let worker = app.start().await.expect("start");
    while counts.local_partitions().len() < 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for i in 0..RESTORE_KEYS {
        counts.insert(format!("key-{i}"), i as i64);
    }
    worker.shutdown().await.expect("stop");
    let mut times = Vec::new();
    let mut records = 0;
    for _ in 0..ROUNDS {
        let (app, counts) = build();
        let start = Instant::now();
        let worker = app.start().await.expect("restart");
        while (counts.len() as u64) < RESTORE_KEYS {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(start.elapsed());
        records = worker.table_records_replayed("counts");
        worker.shutdown().await.expect("stop");
    }
    times.sort();
    (records, times[ROUNDS / 2])
}

/// Two workers share a table of `RESTORE_KEYS` keys; the time from the first worker's stop to
/// the second holding the whole table, with `standby` replicas or none.
async fn failover(standby: u32, round: usize) -> Duration {
    let id = format!("bench-failover-{standby}-{round}");
    let build = || {
        let app = App::new(id.clone());
        let url = format!("memory://{id}");
        app.configure(|s| {
            s.broker = url;
            s.topic_partitions = 4;
            s.commit_interval = Duration::from_millis(100);
            s.table_standby_replicas = Some(standby);
        });
        let table = app.table::<u64, u64>("squares");
        let numbers = app.topic("numbers").key_type::<u64>().value_type::<u64>();
        let t = table.clone();
        app.agent(move |mut numbers: Stream<u64, u64>| {
            let table = t.clone();
            async move {
                while let Some(n) = numbers.next().await {
                    table.insert(n, n * n);
                }
            }
        })
        .named("square")
        .channel(&numbers);
        (app, table, numbers)
    };
    let (a, ta, numbers) = build();
    let (b, tb, _) = build();
    let wa = a.start().await.expect("start a");
    let wb = b.start().await.expect("start b");
    while ta.local_partitions().len() + tb.local_partitions().len() < 4
        || ta.local_partitions().is_empty()
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for n in 0..RESTORE_KEYS {
        numbers.send(n).key(n).await.expect("send");
    }
    while ((ta.len() + tb.len()) as u64) < RESTORE_KEYS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Everything written to the changelog (and, with a standby, tailed by b).
    let changelog = format!("{id}-squares-changelog");
    loop {
        let written: i64 = a
            .end_offsets(&changelog)
            .await
            .expect("offsets")
            .iter()
            .sum();
        let warm = standby == 0 || tb.standby_len() == ta.len();
        if written as u64 >= RESTORE_KEYS && warm {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    wa.shutdown().await.expect("stop a");
    while (tb.len() as u64) < RESTORE_KEYS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let d = start.elapsed();
    wb.shutdown().await.expect("stop b");
    d
}

fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keys = Arc::new(keys());
    let dir = std::env::temp_dir().join(format!("rill-bench-tables-{}", std::process::id()));
    let fjall = format!("fjall://{}", dir.display());
    let (mut b, mut m, mut f) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        b.push(bare(&keys));
        m.push(rt.block_on(rill_updates("memory://", round, keys.clone())));
        f.push(rt.block_on(rill_updates(&fjall, round, keys.clone())));
    }
    let (b, m, f) = (median(b), median(m), median(f));
    println!("table updates, {UPDATES} updates of {KEYS} keys, median of {ROUNDS} rounds:");
    println!(
        "  bare HashMap           {:>12.0} updates/s",
        per_sec(UPDATES, b)
    );
    println!(
        "  rill table, memory     {:>12.0} updates/s   ({:.2}x bare)",
        per_sec(UPDATES, m),
        b.as_secs_f64() / m.as_secs_f64()
    );
    println!(
        "  rill table, fjall      {:>12.0} updates/s   ({:.2}x bare)",
        per_sec(UPDATES, f),
        b.as_secs_f64() / f.as_secs_f64()
    );
    let (records, d) = rt.block_on(restore_rate());
    println!(
        "changelog restore: {records} records in {:.3} s = {:.0} records/s (median of {ROUNDS})",
        d.as_secs_f64(),
        per_sec(records, d)
    );
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..3 {
        cold.push(rt.block_on(failover(0, round)));
        warm.push(rt.block_on(failover(1, round)));
    }
    let (cold, warm) = (median(cold), median(warm));
    println!(
        "failover of a {RESTORE_KEYS}-key table shared by two workers (median of 3): without a \
         standby {:.3} s, with one {:.3} s ({:.1}x faster)",
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
