//! Processing pauses while a group rebalances (`scripts/bench-rebalance`, which runs
//! `cargo bench --bench peers -- rebalance`): 6 rill worker processes share 24 partitions under
//! a steady load; then one worker joins, one leaves (SIGTERM), or one is SIGKILLed, with the
//! `range` assignor (rill's default) and with `cooperative-sticky`.
//!
//! Each input is `{"a": <sent, µs since the epoch> × 100, "b": <its partition>}`, so each
//! output `a + b` says when its input was sent and which partition it came from. Per
//! partition, the observer notes its longest silence in the window after the event (its
//! pause), and the time from the event until the last partition silent for longer than
//! `PAUSED` produced again (until every partition is processing again). The event comes once
//! every partition has been producing, caught up, for `STEADY`.

use super::{
    create_topics, env_or, epoch_micros, kafka, observer, send_one, BoxResult, Ctx, Running, RILL,
};
use rdkafka::producer::Producer;
use rdkafka::Message;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 24;
const WORKERS: usize = 6;
/// A partition silent for longer than this counts as paused (the machine is shared: shorter
/// silences happen without a rebalance).
const PAUSED: Duration = Duration::from_millis(500);
/// How long every partition must have been processing, caught up, before the event.
const STEADY: Duration = Duration::from_secs(5);
/// Caught up: outputs within this of their inputs.
const CAUGHT_UP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Join,
    Leave,
    Kill,
}

impl Event {
    fn label(self) -> &'static str {
        match self {
            Event::Join => "a 7th worker joins",
            Event::Leave => "a worker leaves (SIGTERM)",
            Event::Kill => "a worker is SIGKILLed",
        }
    }

    /// How long the window after the event is watched: a SIGKILLed member is noticed only
    /// when its session times out (librdkafka's default `session.timeout.ms`: 45 s).
    fn window(self) -> Duration {
        match self {
            Event::Join | Event::Leave => Duration::from_secs(20),
            Event::Kill => Duration::from_secs(60),
        }
    }
}

struct Outcome {
    /// The longest silence of one partition in the window.
    longest_pause: Duration,
    /// From the event until the last paused partition produced again; `None` when one was
    /// still silent at the end of the window.
    all_processing: Option<Duration>,
    /// How many partitions paused for longer than `PAUSED`.
    paused: usize,
    /// The longest end-to-end latency of an input sent in the window.
    max_latency: Duration,
}

pub(super) fn run() -> BoxResult<()> {
    let rate: u64 = env_or("RILL_REBALANCE_RATE", 1000);
    let dir = kafka::scratch_dir("bench-rebalance");
    let broker = super::broker(&dir);
    let ctx = Ctx {
        addr: broker.addr.clone(),
        broker_pid: broker.pid(),
        dir: dir.clone(),
        streams: None,
        faust: None,
        run: std::process::id(),
    };
    println!(
        "rebalance: {WORKERS} rill workers on {PARTITIONS} partitions, {rate} events/s offered"
    );
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| assignor | event | longest pause of a partition | partitions paused > {} ms | until every partition is processing again | longest end-to-end latency |",
        PAUSED.as_millis()
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|");
    for strategy in ["range", "cooperative-sticky"] {
        for event in [Event::Join, Event::Leave, Event::Kill] {
            let o = match measure(&ctx, strategy, event, rate) {
                Ok(o) => o,
                Err(e) => {
                    // One scenario failing says something too: the others still run.
                    println!("  {strategy:<18} {:<26} {e}", event.label());
                    let first = e.to_string();
                    let first = first.lines().next().unwrap_or_default();
                    let _ = writeln!(table, "| {strategy} | {} | {first} | | | |", event.label());
                    continue;
                }
            };
            let all = o.all_processing.map_or_else(
                || format!("not within {} s", event.window().as_secs()),
                |d| format!("{:.2} s", d.as_secs_f64()),
            );
            println!(
                "  {strategy:<18} {:<26} longest pause {:>6.2} s   {:>2} paused   all processing after {all}   max latency {:.2} s",
                event.label(),
                o.longest_pause.as_secs_f64(),
                o.paused,
                o.max_latency.as_secs_f64(),
            );
            let _ = writeln!(
                table,
                "| {strategy} | {} | {:.2} s | {} of {PARTITIONS} | {all} | {:.2} s |",
                event.label(),
                o.longest_pause.as_secs_f64(),
                o.paused,
                o.max_latency.as_secs_f64(),
            );
        }
    }
    println!("\n{table}");
    if let Some(out) = std::env::var_os("RILL_PEERS_OUT") {
        let out = PathBuf::from(out);
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("rebalance.md"), &table)?;
        println!("wrote {}", out.join("rebalance.md").display());
    }
    drop(broker);
    if std::env::var_os("RILL_PEERS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn measure(ctx: &Ctx, strategy: &str, event: Event, rate: u64) -> BoxResult<Outcome> {
    let name = format!("{}-{strategy}-{event:?}", ctx.run).to_lowercase();
    let (input, output, group) = (
        format!("rebalance-in-{name}"),
        format!("rebalance-out-{name}"),
        format!("rebalance-{name}"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(create_topics(
        &ctx.addr,
        &[input.clone(), output.clone()],
        PARTITIONS,
    ))?;
    let observer = observer(&ctx.addr, &output, PARTITIONS)?;
    let env = [
        ("RILL_PEERS_PARTITIONS", PARTITIONS.to_string()),
        (
            "RILL_KAFKA_PARTITION_ASSIGNMENT_STRATEGY",
            strategy.to_owned(),
        ),
    ];
    let spawn = || ctx.spawn_with(RILL, &input, &output, &group, &env);
    let mut workers: Vec<Running> = Vec::new();
    for _ in 0..WORKERS {
        workers.push(spawn()?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let (addr, input, stop) = (ctx.addr.clone(), input.clone(), stop.clone());
        std::thread::spawn(move || offer_partitioned(&addr, &input, rate, &stop))
    };
    let result = watch(&observer, &mut workers, event, &spawn);
    stop.store(true, Ordering::Relaxed);
    let _ = generator.join();
    for w in &workers {
        w.terminate();
    }
    for w in &mut workers {
        let _ = w.stop();
    }
    result
}

fn watch(
    observer: &rdkafka::consumer::BaseConsumer,
    workers: &mut Vec<Running>,
    event: Event,
    spawn: &dyn Fn() -> BoxResult<Running>,
) -> BoxResult<Outcome> {
    let started = Instant::now();
    let mut last: Vec<Option<u64>> = vec![None; PARTITIONS as usize];
    // Phase one: until every partition has been processing, every output within `CAUGHT_UP`
    // of its input, for `STEADY` (the workers' start-up leaves a backlog behind).
    let mut steady_since: Option<Instant> = None;
    let mut lag = 0u64;
    while steady_since.is_none_or(|t| t.elapsed() < STEADY) {
        if started.elapsed() > Duration::from_secs(180) {
            let seen = last.iter().filter(|l| l.is_some()).count();
            return Err(format!(
                "not steady within 180 s ({seen} of {PARTITIONS} partitions produced, the \
                 last output {:.1} s after its input)",
                lag as f64 / 1e6
            )
            .into());
        }
        if let Some(Ok(m)) = observer.poll(Duration::from_millis(50)) {
            if let Some((sent, p)) = decode(&m) {
                let received = epoch_micros();
                last[p] = Some(received);
                lag = received.saturating_sub(sent);
                if lag > CAUGHT_UP.as_micros() as u64 {
                    steady_since = None;
                    continue;
                }
            }
        }
        // Every partition produced within `PAUSED` (none is between owners).
        let now = epoch_micros();
        let live = last
            .iter()
            .all(|l| l.is_some_and(|l| now.saturating_sub(l) <= PAUSED.as_micros() as u64));
        if !live {
            steady_since = None;
        } else if steady_since.is_none() {
            steady_since = Some(Instant::now());
        }
    }
    let t0 = epoch_micros();
    match event {
        Event::Join => workers.push(spawn()?),
        Event::Leave => workers[0].terminate(),
        Event::Kill => workers[0].kill(),
    }
    let end = t0 + event.window().as_micros() as u64;
    // Per partition, its longest silence in the window: (length, when it ended).
    let mut longest = vec![(0u64, t0); PARTITIONS as usize];
    let mut max_latency = 0u64;
    loop {
        let now = epoch_micros();
        if now >= end {
            break;
        }
        let Some(Ok(m)) = observer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let Some((sent, p)) = decode(&m) else {
            continue;
        };
        let received = epoch_micros();
        if sent >= t0.saturating_sub(1_000_000) {
            max_latency = max_latency.max(received.saturating_sub(sent));
        }
        if let Some(prev) = last[p] {
            let gap = received.saturating_sub(prev);
            if gap > longest[p].0 {
                longest[p] = (gap, received);
            }
        }
        last[p] = Some(received);
    }
    // A partition silent at the end is still paused.
    let mut silent = false;
    for (p, l) in last.iter().enumerate() {
        let since = end.saturating_sub(l.unwrap_or(t0));
        if since > PAUSED.as_micros() as u64 {
            silent = true;
            longest[p] = longest[p].max((since, end));
        }
    }
    let paused: Vec<&(u64, u64)> = longest
        .iter()
        .filter(|(gap, _)| *gap > PAUSED.as_micros() as u64)
        .collect();
    let resumed = paused.iter().map(|(_, at)| at.saturating_sub(t0)).max();
    Ok(Outcome {
        longest_pause: Duration::from_micros(longest.iter().map(|l| l.0).max().unwrap_or(0)),
        all_processing: (!silent).then(|| Duration::from_micros(resumed.unwrap_or(0))),
        paused: paused.len(),
        max_latency: Duration::from_micros(max_latency),
    })
}

/// `(sent, partition)` of an output.
fn decode(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<(u64, usize)> {
    let sum: u64 = std::str::from_utf8(m.payload()?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((sum / 100, (sum % 100) as usize))
}

/// Offers `rate` records a second, round-robin over the partitions, until `stop`.
fn offer_partitioned(addr: &str, topic: &str, rate: u64, stop: &AtomicBool) -> BoxResult<()> {
    let p = super::producer(addr, "1")?;
    let start = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while i < due {
            let partition = (i % PARTITIONS as u64) as i64;
            let value = format!(
                "{{\"a\":{},\"b\":{partition}}}",
                epoch_micros() as i64 * 100
            );
            send_one(
                &p,
                topic,
                Some(partition as i32),
                &format!("k{i}"),
                value.as_bytes(),
            );
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.flush(Duration::from_secs(30))?;
    Ok(())
}
