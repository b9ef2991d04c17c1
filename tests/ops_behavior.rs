//! Running rill in production: a worker's `GET /metrics` (checked by Prometheus's promtool,
//! and counting exactly what was sent), `GET /health`, and the status page `GET /` as headless
//! Chromium renders it. On Kafka (librdkafka's mock cluster), the lag metric comes from
//! librdkafka's statistics.

mod common;

use common::{http_get, require_program, wait_until, within, Recorder, WAIT};
use rill::prelude::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

const EVENTS: u32 = 50;
const PARTITIONS: u32 = 4;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reading {
    n: u32,
}

/// An app whose worker serves the web on a free port and commits often.
fn app(id: &str) -> App {
    let app = App::new(id);
    app.configure(|s| {
        s.web_port = Some(0);
        s.commit_interval = Duration::from_millis(50);
    });
    app
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .expect("the request runs")
}

fn web_addr(worker: &rill::Worker) -> SocketAddr {
    worker.web_addr().expect("the worker serves the web")
}

/// The samples of a Prometheus text exposition: `name{labels}` to value.
#[derive(Debug)]
struct Samples(Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("a sample is `series value`: {line}"));
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|e| panic!("bad value ({e}): {line}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("a label is k=\"v\": {line}"));
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels, value)
            })
            .collect();
        Self(samples)
    }

    /// The values of `name` whose labels include `labels`.
    fn values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect()
    }

    /// The single value of `name` with `labels`; fails unless there is exactly one.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.values(name, labels)[..] {
            [v] => v,
            ref other => panic!("expected one sample {name}{labels:?}, found {other:?}"),
        }
    }
}

async fn scrape(addr: SocketAddr) -> (String, Samples) {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    let samples = Samples::parse(&body);
    (body, samples)
}

/// Waits until the app has committed every record of `topic`.
async fn wait_committed(app: &App, topic: &str) {
    eventually(format!("{topic} is committed to its end"), || async {
        let ends = app.end_offsets(topic).await.expect("end offsets");
        let committed = app.committed_offsets().await.expect("committed offsets");
        let behind: Vec<usize> = (0..ends.len())
            .filter(|&p| {
                ends[p] > 0
                    && !committed.iter().any(|(tp, c)| {
                        &*tp.topic == topic && tp.partition == p as u32 && *c >= ends[p]
                    })
            })
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(format!("partitions behind: {behind:?}"))
        }
    })
    .await
}

/// Runs `probe` every few milliseconds until it returns `Ok`; fails the test with `what` and
/// the last `Err` after [`WAIT`].
async fn eventually<T, S, F>(what: impl std::fmt::Display, mut probe: impl FnMut() -> F) -> T
where
    S: std::fmt::Display,
    F: std::future::Future<Output = Result<T, S>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {WAIT:?} waiting until {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_events_sent_and_pass_promtool() {
    let promtool = require_program(
        "promtool",
        "RILL_PROMTOOL",
        "install Debian's `prometheus` package",
    );
    let id = "ops-metrics";
    let app = app(id);
    let topic = app
        .topic("readings")
        .value_type::<Reading>()
        .partitions(PARTITIONS);
    let doubled = Recorder::new();
    let d = doubled.clone();
    app.agent(|mut stream: Stream<Reading>| {
        stream! {
            while let Some(r) = stream.next().await {
                yield r.n * 2;
            }
        }
    })
    .named("double")
    .channel(&topic)
    .sink(move |v: u32| d.push(v));
    // A second agent on the same topic fails on every multiple of 10.
    let checked = Recorder::new();
    let c = checked.clone();
    app.agent(move |mut stream: Stream<Reading>| {
        let c = c.clone();
        async move {
            while let Some(r) = stream.next().await {
                c.push(r.n);
                if r.n % 10 == 0 {
                    return Err(format!("{} is a multiple of 10", r.n));
                }
            }
            Ok(())
        }
    })
    .named("picky")
    .channel(&topic);

    let worker = within(WAIT, "the worker to start", app.start())
        .await
        .expect("the worker starts");
    let addr = web_addr(&worker);
    for n in 1..=EVENTS {
        topic.send(Reading { n }).await.expect("send");
    }
    wait_until(WAIT, "both agents saw every event", || {
        doubled.len() == EVENTS as usize && checked.len() == EVENTS as usize
    })
    .await;
    wait_committed(&app, "readings").await;

    let (body, m) = scrape(addr).await;
    let app_l = ("app", id);
    for agent in ["double", "picky"] {
        assert_eq!(
            m.value(
                "rill_events_in_total",
                &[app_l, ("agent", agent), ("topic", "readings")]
            ),
            f64::from(EVENTS),
            "records handed to {agent}:\n{body}"
        );
    }
    assert_eq!(
        m.value("rill_events_out_total", &[app_l, ("agent", "double")]),
        f64::from(EVENTS),
        "values double yielded"
    );
    assert_eq!(
        m.value("rill_events_out_total", &[app_l, ("agent", "picky")]),
        0.0
    );
    assert_eq!(
        m.value(
            "rill_agent_errors_total",
            &[app_l, ("agent", "picky"), ("topic", "readings")]
        ),
        f64::from(EVENTS / 10),
        "one error per multiple of 10"
    );
    assert!(m
        .values("rill_agent_errors_total", &[app_l, ("agent", "double")])
        .is_empty());
    let lags = m.values("rill_consumer_lag", &[app_l, ("topic", "readings")]);
    assert_eq!(
        lags,
        vec![0.0; PARTITIONS as usize],
        "lag once all is committed"
    );
    assert_eq!(
        m.value("rill_assigned_partitions", &[app_l]),
        f64::from(PARTITIONS)
    );
    assert!(m.value("rill_rebalances_total", &[app_l]) >= 1.0);
    assert!(m.value("rill_commit_seconds_count", &[app_l]) >= 1.0);
    assert!(
        m.value(
            "rill_agent_process_seconds_count",
            &[app_l, ("agent", "double")]
        ) >= 1.0,
        "processing time recorded"
    );

    // The exposition passes Prometheus's own checker (format and naming lints).
    let mut check = tokio::process::Command::new(&promtool);
    check
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = check.spawn().expect("promtool starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, body.as_bytes())
        .await
        .expect("write the metrics to promtool");
    drop(stdin);
    let out = within(WAIT, "promtool", child.wait_with_output())
        .await
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_200_running_once_started_and_503_stopping_while_draining() {
    let app = app("ops-health");
    let topic = app.topic("jobs").value_type::<Reading>().partitions(1);
    let release = Arc::new(Notify::new());
    let started = Recorder::new();
    let (r, s) = (release.clone(), started.clone());
    app.agent(move |mut stream: Stream<Reading>| {
        let (release, started) = (r.clone(), s.clone());
        async move {
            while let Some(job) = stream.next().await {
                started.push(job.n);
                // Holds the event until the test lets it go.
                release.notified().await;
            }
        }
    })
    .named("slow")
    .channel(&topic);

    let worker = within(WAIT, "the worker to start", app.start())
        .await
        .expect("the worker starts");
    let addr = web_addr(&worker);
    let (status, body) = get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "running", "{body}");
    assert_eq!(health["app"], "ops-health");
    assert_eq!(health["transport"], "memory");
    assert_eq!(health["ready"], true, "{body}");
    let (status, body) = get(addr, "/ready").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));

    topic.send(Reading { n: 1 }).await.expect("send");
    wait_until(WAIT, "the agent holds the event", || !started.is_empty()).await;
    let (status, body) = get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["partitions"], 1, "the assigned partition: {body}");
    let stopping = tokio::spawn(worker.shutdown());
    let body = eventually("GET /health is 503 while the worker drains", || async {
        match get(addr, "/health").await {
            (503, body) => Ok(body),
            (status, body) => Err(format!("{status} {body}")),
        }
    })
    .await;
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "stopping", "{body}");
    let (status, body) = get(addr, "/ready").await;
    assert_eq!(status, 503, "not ready while draining: {body}");

    release.notify_one();
    within(WAIT, "the worker to stop", stopping)
        .await
        .expect("shutdown task")
        .expect("the worker stops");
}

/// Loads `url` in headless Chromium and returns the DOM it built.
async fn chromium_dom(url: &str) -> String {
    let chromium = require_program("chromium", "RILL_CHROMIUM", "install Debian's `chromium`");
    let profile = std::env::temp_dir().join(format!(
        "rill-ops-chromium-{}-{}",
        std::process::id(),
        url.len()
    ));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).expect("a fresh profile directory");
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(["--dump-dom", url])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    let out = within(
        Duration::from_secs(120),
        "chromium --dump-dom",
        cmd.output(),
    )
    .await
    .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cells of each row of the HTML table with `id` (header row excluded), as the DOM has
/// them (still escaped).
fn table_rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let start = dom
        .find(&format!("<table id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no table {id:?} in the page:\n{dom}"));
    let table = &dom[start..];
    let table = &table[..table.find("</table>").expect("the table ends")];
    table
        .split("<tr>")
        .skip(1)
        .filter(|row| row.contains("<td>"))
        .map(|row| {
            row.split("<td>")
                .skip(1)
                .map(|cell| cell.split("</td>").next().unwrap_or("").to_owned())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_chromium_shows_the_agents_partitions_and_tables() {
    let id = "ops-status";
    let app = app(id);
    let orders = app.topic("orders").value_type::<Reading>().partitions(3);
    let tallies = app.topic("tallies").value_type::<u32>();
    let totals = app.table::<String, i64>("totals");
    let t = totals.clone();
    app.agent(move |mut stream: Stream<Reading>| {
        let totals = t.clone();
        stream! {
            while let Some(r) = stream.next().await {
                totals.update("all".to_owned(), |n| *n += i64::from(r.n));
                yield r.n;
            }
        }
    })
    .named("tally")
    .channel(&orders)
    .sink(&tallies);
    // A name a page must escape.
    app.agent(|mut stream: Stream<u32>| async move { while stream.next().await.is_some() {} })
        .named("audit<script>&co")
        .concurrency(3)
        .channel(&tallies);

    let worker = within(WAIT, "the worker to start", app.start())
        .await
        .expect("the worker starts");
    for n in 1..=6 {
        orders.send(Reading { n }).await.expect("send");
    }
    wait_committed(&app, "orders").await;
    wait_committed(&app, "tallies").await;

    let dom = chromium_dom(&format!("http://{}/", web_addr(&worker))).await;
    assert!(dom.contains(id), "the app id: {dom}");
    assert!(
        !dom.contains("<script>"),
        "names are escaped, not markup: {dom}"
    );
    let agents = table_rows(&dom, "agents");
    assert_eq!(
        agents,
        vec![
            vec!["tally", "orders", "1", "topic tallies", "6"],
            vec!["audit&lt;script&gt;&amp;co", "tallies", "3", "-", "6"],
        ],
        "agent, source, concurrency, sinks, events in"
    );
    let mut partitions = table_rows(&dom, "partitions");
    partitions.sort();
    let mut expected: Vec<Vec<String>> = Vec::new();
    for topic in ["orders", "tallies"] {
        let n = if topic == "orders" { 3 } else { 8 };
        for p in 0..n {
            expected.push(vec![topic.into(), p.to_string(), "0".into()]);
        }
    }
    expected.sort();
    assert_eq!(partitions, expected, "topic, partition, lag");
    let tables = table_rows(&dom, "tables");
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(
        tables[0][..3],
        ["totals", "ops-status-totals-changelog", "8"]
    );
    assert_eq!(tables[0][5], "ready", "{tables:?}");

    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_lag_of_each_partition_comes_from_librdkafkas_statistics() {
    // Leaked: the mock broker outlives the worker's consumer whatever happens (a consumer
    // closing against a gone broker waits without bound).
    let cluster: &'static rdkafka::mocking::MockCluster<'static, _> = Box::leak(Box::new(
        rdkafka::mocking::MockCluster::<rdkafka::producer::DefaultProducerContext>::new(1)
            .expect("the mock cluster starts"),
    ));
    // The mock broker does not answer CreateTopics: the topics are made here (the web
    // server's membership topic has one partition).
    for topic in ["ops-jobs", "ops-kafka-lag-workers"] {
        cluster
            .create_topic(topic, 1, 1)
            .expect("the mock cluster creates the topic");
    }
    let app = app("ops-kafka-lag");
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    app.configure(|s| {
        s.broker = url;
        // The mock's group coordinator completes a rebalance when a session timeout runs out
        // (see tests/scenarios_kafka.rs): a short one keeps the start quick.
        for (k, v) in [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
            ("statistics.interval.ms", "200"),
        ] {
            s.kafka.insert(k.into(), v.into());
        }
    });
    let jobs = app.topic("ops-jobs").value_type::<Reading>().partitions(1);
    let release = Arc::new(Notify::new());
    let seen = Recorder::new();
    let (r, s) = (release.clone(), seen.clone());
    app.agent(move |mut stream: Stream<Reading>| {
        let (release, seen) = (r.clone(), s.clone());
        async move {
            while let Some(job) = stream.next().await {
                seen.push(job.n);
                if job.n == 6 {
                    // Holds offset 5: offsets 0..5 are committed, 5..10 are not.
                    release.notified().await;
                }
            }
        }
    })
    .named("worker")
    .channel(&jobs);

    let worker = within(WAIT, "the worker to start", app.start())
        .await
        .expect("the worker starts on the mock cluster");
    let addr = web_addr(&worker);
    for n in 1..=10 {
        jobs.send(Reading { n }).await.expect("send");
    }
    let lag_is = |want: f64| {
        eventually(
            format!("the lag of ops-jobs[0] is {want}"),
            move || async move {
                let (body, m) = scrape(addr).await;
                let labels = [
                    ("app", "ops-kafka-lag"),
                    ("topic", "ops-jobs"),
                    ("partition", "0"),
                ];
                if m.values("rill_consumer_lag", &labels) == [want] {
                    Ok(())
                } else {
                    Err(body)
                }
            },
        )
    };
    // The rebalance of the mock's coordinator takes a session timeout.
    wait_until(Duration::from_secs(60), "the agent holds offset 5", || {
        seen.len() >= 6
    })
    .await;
    lag_is(5.0).await;
    let (status, body) = get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let (_, page) = get(addr, "/").await;
    assert!(
        page.contains("<tr><td>ops-jobs</td><td>0</td><td>5</td></tr>"),
        "the status page shows the lag: {page}"
    );

    release.notify_one();
    lag_is(0.0).await;
    within(WAIT, "the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops");
}

/// Other workers forward table lookups to the URL a worker advertises: the bound address, the
/// host's name when bound to every address (never `0.0.0.0` nor a loopback stand-in for it),
/// or `web_host` (Faust's `--web-host`) when set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_advertises_a_web_address_other_hosts_can_reach() {
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .expect("this machine's host name");
    for (bind, web_host, want) in [
        ("127.0.0.1", None, "127.0.0.1".to_owned()),
        ("0.0.0.0", None, host_name.clone()),
        (
            "0.0.0.0",
            Some("rill-web.example"),
            "rill-web.example".to_owned(),
        ),
    ] {
        let app = app("ops-web-host");
        app.configure(|s| {
            s.web_bind = bind.to_owned();
            s.web_host = web_host.map(str::to_owned);
        });
        let worker = app.start().await.expect("start");
        let port = web_addr(&worker).port();
        assert_eq!(
            worker.web_url(),
            Some(format!("http://{want}:{port}")),
            "bound to {bind}, web_host {web_host:?}"
        );
        // The server answers on the bound address.
        let (status, _) = get(SocketAddr::from(([127, 0, 0, 1], port)), "/health").await;
        assert_eq!(status, 200);
        worker.shutdown().await.expect("stop");
    }
}

/// `GET /health` is liveness and `GET /ready` readiness: while a worker waits for its
/// partitions and restores its table from the changelog (slowed down here: the broker takes
/// 1.5 s per request), it is alive (200) but not ready (503 `starting`, then `restoring` with
/// the table's partitions); once restored, both are 200 and the table has every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_partitions_and_table_restore_while_health_says_alive() {
    // Leaked, as in the lag test above.
    let cluster: &'static rdkafka::mocking::MockCluster<'static, _> = Box::leak(Box::new(
        rdkafka::mocking::MockCluster::<rdkafka::producer::DefaultProducerContext>::new(1)
            .expect("the mock cluster starts"),
    ));
    for topic in [
        "ops-ready-in",
        "ops-ready-counts-changelog",
        "ops-ready-workers",
    ] {
        cluster
            .create_topic(topic, 1, 1)
            .expect("the mock cluster creates the topic");
    }
    const KEYS: u32 = 300;
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    let counting = |url: String| {
        let app = app("ops-ready");
        app.configure(|s| {
            s.broker = url;
            s.table_standby_replicas = Some(0);
            for (k, v) in [
                ("session.timeout.ms", "6000"),
                ("heartbeat.interval.ms", "1000"),
            ] {
                s.kafka.insert(k.into(), v.into());
            }
        });
        let input = app
            .topic("ops-ready-in")
            .value_type::<Reading>()
            .partitions(1);
        let counts = app.table::<u32, u32>("counts").partitions(1);
        let table = counts.clone();
        app.agent(move |mut stream: Stream<Reading>| {
            let counts = table.clone();
            async move {
                while let Some(r) = stream.next().await {
                    counts.update(r.n, |c| *c += 1);
                }
            }
        })
        .named("count")
        .channel(&input);
        (app, input, counts)
    };

    let (app, input, counts) = counting(url.clone());
    let worker = within(WAIT, "the first worker to start", app.start())
        .await
        .expect("the worker starts on the mock cluster");
    for n in 0..KEYS {
        input.send(Reading { n }).await.expect("send");
    }
    wait_until(Duration::from_secs(60), "every key counted", || {
        counts.len() == KEYS as usize
    })
    .await;
    within(WAIT, "the first worker to stop", worker.shutdown())
        .await
        .expect("the first worker stops");

    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .expect("the mock broker slows down");
    let (app, _input, counts) = counting(url);
    let worker = within(WAIT, "the second worker to start", app.start())
        .await
        .expect("the second worker starts");
    let addr = web_addr(&worker);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (health, health_body) = get(addr, "/health").await;
        assert_eq!(
            health, 200,
            "alive while it starts and restores: {health_body}"
        );
        let (status, body) = get(addr, "/ready").await;
        let value: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let state = value["status"].as_str().unwrap_or_default().to_owned();
        if state == "restoring" {
            assert_eq!(value["tables"]["counts"], serde_json::json!([0]), "{body}");
            cluster
                .broker_round_trip_time(1, Duration::ZERO)
                .expect("the mock broker answers at once again");
        }
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if status == 200 {
            assert_eq!(state, "ready");
            assert!(worker.is_ready());
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(!worker.is_ready());
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready within 120 s; states seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, ["starting", "restoring", "ready"]);
    assert_eq!(counts.len(), KEYS as usize, "ready with every key restored");
    within(WAIT, "the second worker to stop", worker.shutdown())
        .await
        .expect("the second worker stops");
}
