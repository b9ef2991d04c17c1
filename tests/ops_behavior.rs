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

/// A ChromeDriver process driving headless Chromium (the W3C WebDriver protocol over HTTP),
/// stopped by its pid when dropped.
struct Browser {
    driver: std::process::Child,
    addr: SocketAddr,
    session: String,
    profile: std::path::PathBuf,
}

/// The screen the status page is made for.
const SCREEN: (u64, u64) = (1280, 900);

impl Browser {
    async fn start() -> Self {
        let chromium = require_program("chromium", "RILL_CHROMIUM", "install Debian's `chromium`");
        let chromedriver = require_program(
            "chromedriver",
            "RILL_CHROMEDRIVER",
            "install Debian's `chromium-driver`",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let driver = std::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile =
            std::env::temp_dir().join(format!("rill-ops-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("a fresh profile directory");
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        wait_until(WAIT, "chromedriver to be ready", || {
            std::net::TcpStream::connect(addr).is_ok()
                && http_json(addr, "GET", "/status", &serde_json::Value::Null)
                    .1
                    .contains("\"ready\":true")
        })
        .await;
        let args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .chain([
            format!("--window-size={},{}", SCREEN.0, SCREEN.1),
            format!("--user-data-dir={}", browser.profile.display()),
        ])
        .collect();
        let created = browser
            .call(
                "POST",
                "/session",
                serde_json::json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": args},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }}}),
            )
            .await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        // The page's viewport is the screen (the window's size includes its frame).
        browser
            .session_call(
                "POST",
                "/goog/cdp/execute",
                serde_json::json!({
                    "cmd": "Emulation.setDeviceMetricsOverride",
                    "params": {"width": SCREEN.0, "height": SCREEN.1, "deviceScaleFactor": 1,
                               "mobile": false},
                }),
            )
            .await;
        browser
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (addr, method, path) = (self.addr, method.to_owned(), path.to_owned());
        let (status, text) = within(
            Duration::from_secs(120),
            "a WebDriver command",
            tokio::task::spawn_blocking(move || http_json(addr, &method, &path, &body)),
        )
        .await
        .expect("the request runs");
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("chromedriver answered {status} with no JSON ({e}): {text}")
        });
        assert_eq!(status, 200, "WebDriver command failed: {reply}");
        reply["value"].clone()
    }

    async fn session_call(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn open(&self, url: &str) {
        self.session_call("POST", "/url", serde_json::json!({ "url": url }))
            .await;
    }

    async fn run(&self, script: &str) -> serde_json::Value {
        self.session_call(
            "POST",
            "/execute/sync",
            serde_json::json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// The browser console's messages since the last call.
    async fn console(&self) -> Vec<serde_json::Value> {
        self.session_call("POST", "/se/log", serde_json::json!({ "type": "browser" }))
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A PNG of the window.
    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let png = self
            .session_call("GET", "/screenshot", serde_json::Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a base64 screenshot"))
            .expect("base64")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = std::panic::catch_unwind(|| {
                http_json(self.addr, "DELETE", &path, &serde_json::Value::Null)
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// An HTTP/1.0 request with a JSON body (none for `null`): status code and body.
fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to chromedriver");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    // Read until the response is whole: ChromeDriver keeps the connection open.
    let mut response = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).expect("read response");
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("a status code");
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
            };
            if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
                if body.len() >= len {
                    return (status, body[..len].to_owned());
                }
            } else if header("transfer-encoding").is_some_and(|e| e.eq_ignore_ascii_case("chunked"))
            {
                if body.ends_with("0\r\n\r\n") {
                    return (status, dechunk(body));
                }
            } else if n == 0 {
                return (status, body.to_owned());
            }
        }
        assert!(n > 0, "chromedriver closed the connection mid-response");
    }
}

/// The body of a chunked HTTP response.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// What the status page shows, read in the browser: its tables' cells as text (a chart cell
/// as `chart:<points drawn>:<latest value>`), where its parts are on the screen, and the
/// facts.
const READ_PAGE: &str = r#"
const rows = id => Array.from(document.querySelectorAll('#' + id + ' tr'))
  .filter(tr => tr.querySelector('td'))
  .map(tr => Array.from(tr.querySelectorAll('td')).map(td => {
    const line = td.querySelector('polyline');
    if (!line) return td.textContent;
    const points = line.getAttribute('points').trim().split(/\s+/).filter(Boolean).length;
    return 'chart:' + points + ':' + td.querySelector('.value').textContent;
  }));
const rect = id => {
  const e = document.getElementById(id);
  if (!e) return null;
  const r = e.getBoundingClientRect();
  return { top: r.top, bottom: r.bottom, right: r.right };
};
const facts = {};
document.querySelectorAll('#facts div').forEach(d => {
  facts[d.querySelector('dt').textContent] = d.querySelector('dd').textContent;
});
return {
  viewport: [window.innerWidth, window.innerHeight],
  width: document.documentElement.scrollWidth,
  scripts: document.scripts.length,
  app: document.getElementById('app').textContent,
  status: document.getElementById('status').textContent,
  facts,
  agents: rows('agents'), partitions: rows('partitions'), tables: rows('tables'),
  errors: rows('errors'),
  lastError: (document.getElementById('last-error') || {}).textContent || null,
  at: { agents: rect('agents'), partitions: rect('partitions'), tables: rect('tables'),
        errors: rect('errors') },
};
"#;

/// The width and height of a PNG, from its header.
fn png_size(png: &[u8]) -> (u64, u64) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG"
    );
    let be = |b: &[u8]| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_chromium_fits_one_screen_with_charts_partitions_tables_and_errors() {
    let id = "ops-status";
    let app = app(id);
    let orders = app.topic("orders").value_type::<Reading>().partitions(3);
    let tallies = app.topic("tallies").value_type::<u32>();
    let words = app.topic("words").value_type::<String>().partitions(2);
    let readings = app.topic("readings").value_type::<Reading>().partitions(1);
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
    // Reads each word twice (from `words`, then from its repartition topic): counted once.
    app.agent(|stream: Stream<String>| async move {
        let mut words = stream.group_by(GroupBy::new("word", |w: &String| w.clone()));
        while words.next().await.is_some() {}
    })
    .named("count_words")
    .channel(&words);
    // Fails on 13; sends bad input to its dead-letter topic.
    app.agent(|mut stream: Stream<Reading>| async move {
        while let Some(r) = stream.next().await {
            if r.n == 13 {
                return Err(format!("unlucky {}", r.n));
            }
        }
        Ok(())
    })
    .named("checked")
    .dead_letter(true)
    .channel(&readings);

    let worker = within(WAIT, "the worker to start", app.start())
        .await
        .expect("the worker starts");
    for n in 1..=6 {
        orders.send(Reading { n }).await.expect("send");
    }
    for w in ["a", "b", "a", "c"] {
        words.send(w.to_owned()).await.expect("send");
    }
    readings
        .send_raw(None, Some(bytes::Bytes::from_static(b"{not json")), Some(0))
        .await
        .expect("send bad input");
    for n in [12, 13, 14] {
        readings.send(Reading { n }).await.expect("send");
    }
    for topic in ["orders", "tallies", "readings"] {
        wait_committed(&app, topic).await;
    }
    let counted = &worker;
    eventually(
        "the dead letter and the agent error to be counted",
        move || async move {
            let counts = (
                counted.dead_letters("checked"),
                counted.agent_errors("checked"),
            );
            if counts == (1, 1) {
                Ok(())
            } else {
                Err(format!("dead letters, errors: {counts:?}"))
            }
        },
    )
    .await;

    let browser = Browser::start().await;
    let url = format!("http://{}/", web_addr(&worker));
    // The charts fill once a second: wait for a few samples after the events.
    let (b, u) = (&browser, &url);
    let page = eventually(
        "the charts to have three samples with every event in",
        move || async move {
            b.open(u).await;
            let browser = b;
            let page = browser.run(READ_PAGE).await;
            let drawn = |cell: &serde_json::Value| {
                cell.as_str()
                    .and_then(|c| c.strip_prefix("chart:"))
                    .and_then(|c| c.split(':').next())
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            let agents = page["agents"].as_array().cloned().unwrap_or_default();
            let lagging = page["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r[3] != "0");
            if agents.len() == 4
                && agents
                    .iter()
                    .all(|r| drawn(&r[6]) >= 3 && drawn(&r[7]) >= 3)
                && !lagging
            {
                Ok(page)
            } else {
                Err(page)
            }
        },
    )
    .await;
    let cells = |name: &str| -> Vec<String> {
        page[name]
            .as_array()
            .unwrap_or_else(|| panic!("no table {name}: {page}"))
            .iter()
            .map(|r| {
                r.as_array()
                    .expect("a row")
                    .iter()
                    .map(|c| c.as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect()
    };

    assert_eq!(page["app"], id);
    assert_eq!(page["status"], "running");
    assert_eq!(page["scripts"], 0, "names are text, not markup: {page}");
    let facts = &page["facts"];
    for fact in [
        "uptime",
        "last commit",
        "events/s",
        "partitions",
        "transport",
        "processing guarantee",
    ] {
        assert!(facts[fact].is_string(), "fact {fact:?} missing: {facts}");
    }
    assert_ne!(facts["last commit"], "none yet", "{facts}");
    assert_eq!(facts["transport"], "memory");

    // Agents: what each was handed from its source, its errors, and two charts. A chart cell
    // reads `chart:<points>:<latest value>`; the sources are idle by now, so the latest rate
    // and lag are 0.
    let agents: Vec<Vec<String>> = cells("agents")
        .iter()
        .map(|r| {
            r.split(" | ")
                .map(|c| match c.strip_prefix("chart:") {
                    Some(chart) => {
                        format!("chart latest {}", chart.split(':').nth(1).unwrap_or(""))
                    }
                    None => c.to_owned(),
                })
                .collect()
        })
        .collect();
    assert_eq!(
        agents,
        vec![
            vec![
                "tally",
                "orders",
                "1",
                "topic tallies",
                "6",
                "0",
                "chart latest 0",
                "chart latest 0"
            ],
            vec![
                "audit<script>&co",
                "tallies",
                "3",
                "-",
                "6",
                "0",
                "chart latest 0",
                "chart latest 0"
            ],
            vec![
                "count_words",
                "words",
                "1",
                "-",
                "4",
                "0",
                "chart latest 0",
                "chart latest 0"
            ],
            vec![
                "checked",
                "readings",
                "1",
                "-",
                "4",
                "1",
                "chart latest 0",
                "chart latest 0"
            ],
        ],
        "agent, source, concurrency, sinks, events in (from the source only), errors, charts"
    );
    // Partitions: one row per topic.
    let mut partitions = cells("partitions");
    partitions.sort();
    assert_eq!(partitions.len(), 5, "{partitions:?}");
    assert_eq!(
        partitions[0], "ops-status-words-word-repartition | 0-1 | 2 | 0 | 0",
        "{partitions:?}"
    );
    assert_eq!(
        partitions[1..],
        [
            "orders | 0-2 | 3 | 0 | 0",
            "readings | 0 | 1 | 0 | 0",
            "tallies | 0-7 | 8 | 0 | 0",
            "words | 0-1 | 2 | 0 | 0",
        ],
        "topic, partitions, count, lag, most lag"
    );
    // The key is written in the partition of each event that updated it (as in Faust): one
    // copy in each of the 3 partitions of `orders`.
    assert_eq!(
        cells("tables"),
        ["totals | ops-status-totals-changelog | 8 | 0-7 | - | 3 | ready"],
        "table, changelog, partitions, held here, standby, keys, state"
    );
    assert_eq!(
        cells("errors"),
        [
            "bad input | readings | 1",
            "agent error | checked | 1",
            "dead letter | checked | 1",
        ],
        "kind, where, count"
    );
    let last = page["lastError"].as_str().unwrap_or_default();
    assert!(
        last.contains("checked") && last.contains("unlucky 13") && last.contains("readings[0]@"),
        "the last error names the agent, the error and where: {last:?}"
    );

    // One screen of 1280×900 holds it all, tables and errors included, with no sideways
    // scrolling.
    assert_eq!(
        page["viewport"],
        serde_json::json!([SCREEN.0, SCREEN.1]),
        "{page}"
    );
    assert!(
        page["width"].as_u64() <= Some(SCREEN.0),
        "no sideways scrolling: {page}"
    );
    for part in ["agents", "partitions", "tables", "errors"] {
        let bottom = page["at"][part]["bottom"].as_f64().unwrap_or(f64::MAX);
        assert!(
            bottom <= SCREEN.1 as f64,
            "{part} ends below the fold at {bottom}: {page}"
        );
    }
    let console = browser.console().await;
    assert!(
        console.is_empty(),
        "the page logs nothing to the console: {console:?}"
    );
    let png = browser.screenshot().await;
    assert_eq!(
        png_size(&png),
        SCREEN,
        "the screenshot is of the whole screen"
    );
    let shot = std::env::var_os("RILL_STATUS_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("rill-status-{}.png", std::process::id()))
        });
    std::fs::write(&shot, &png).expect("the screenshot is written");
    drop(browser);

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
        page.contains("<tr><td>ops-jobs</td><td>0</td><td>1</td><td>5</td><td>5</td></tr>"),
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
