//! A running embedded worker is reachable from the app's other processes: the seed's two
//! consoles (`agent worker` in one, `agent send_value 4 8 --print` in another) work on the
//! embedded transport. The worker announces itself in its data directory (`worker.json`) and
//! publishes its broker over its web server; the app's commands find it there and run as its
//! clients (`remote://`), or run the agents themselves, saying so, when no worker runs.

mod common;

use futures::TryStreamExt;
use rill::prelude::*;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::process::Command;

/// Running a command or starting a worker takes milliseconds; building the example may take
/// minutes on a loaded machine (done once, before the clock of a test's waits starts).
const RUN: Duration = Duration::from_secs(60);

async fn binary(name: &'static str) -> PathBuf {
    tokio::task::spawn_blocking(move || common::example_binary(name))
        .await
        .expect("build")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the example `example` with `args` on the data directory `datadir`, to its end.
async fn run(example: &'static str, datadir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary(example).await);
    cmd.current_dir(common::manifest_dir())
        .env("RILL_DATADIR", datadir)
        .env_remove("RILL_BROKER")
        .env_remove("RILL_LOG")
        .env_remove("RUST_LOG")
        .env_remove("RILL_WEB_PORT")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{example} {}", args.join(" "));
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    common::within(RUN, &what, child.wait_with_output())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A `worker` process of an example: killed (and reaped) when dropped, if it still runs.
struct WorkerProcess {
    child: std::process::Child,
    /// Its stdout, line by line, after the banner.
    lines: mpsc::Receiver<String>,
    banner: Vec<String>,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl WorkerProcess {
    /// Starts `example worker ARGS` on `datadir`, serving on a free port, and waits (bounded)
    /// until its banner says it is ready; `Err` has what it printed, if it exited first.
    async fn start(
        example: &'static str,
        datadir: &Path,
        args: &[&str],
    ) -> Result<Self, (Vec<String>, std::process::Child)> {
        let mut child = std::process::Command::new(binary(example).await)
            .current_dir(common::manifest_dir())
            .env("RILL_DATADIR", datadir)
            .env("RILL_WEB_PORT", "0")
            .env_remove("RILL_BROKER")
            .env_remove("RILL_LOG")
            .env_remove("RUST_LOG")
            .arg("worker")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the worker starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (banner, lines) = tokio::task::spawn_blocking(move || {
            let mut banner = Vec::new();
            let deadline = std::time::Instant::now() + RUN;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match lines.recv_timeout(left) {
                    Ok(line) => {
                        let ready = line.starts_with('└') && line.contains("ready");
                        banner.push(line);
                        if ready {
                            return (Ok(banner), lines);
                        }
                    }
                    Err(_) => return (Err(banner), lines),
                }
            }
        })
        .await
        .expect("reader");
        match banner {
            Ok(banner) => Ok(Self {
                child,
                lines,
                banner,
            }),
            Err(banner) => Err((banner, child)),
        }
    }

    /// The address of its web server, from the banner.
    fn web(&self) -> SocketAddr {
        self.banner
            .iter()
            .find_map(|l| l.split("http://").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the web address in the banner: {:?}", self.banner))
    }

    /// Waits (bounded) for a line of its stdout that contains `needle`.
    async fn printed(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + RUN;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let got = tokio::task::block_in_place(|| self.lines.recv_timeout(left));
            match got {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(e) => panic!("the worker did not print {needle:?}: {e}"),
            }
        }
    }

    /// Stops it with SIGTERM and waits (bounded) for it to exit; its exit status.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {pid} failed");
        let mut exit = None;
        common::wait_until(RUN, "the worker exits after SIGTERM", || {
            exit = self.child.try_wait().expect("wait for the worker");
            exit.is_some()
        })
        .await;
        exit.expect("exited")
    }
}

async fn get(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || common::http_get(addr, path))
        .await
        .expect("request")
}

/// The worker's `rill_events_in_total` for the agent `agent` (0 before its first event).
async fn events_in(web: SocketAddr, agent: &str) -> u64 {
    let (status, body) = get(web, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let label = format!("agent=\"{agent}\"");
    body.lines()
        .filter(|l| l.starts_with("rill_events_in_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()))
        .map(|n| n as u64)
        .sum()
}

/// Waits (bounded) until the worker at `web` has handed `agent` `n` events.
async fn wait_for_events(web: SocketAddr, agent: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + RUN;
    loop {
        let seen = events_in(web, agent).await;
        if seen >= n {
            assert_eq!(seen, n, "exactly {n} events reached {agent}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker handed {agent} {seen} of {n} events in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a command prints on stderr when it finds no worker.
fn no_worker_note(datadir: &Path) -> String {
    format!(
        "no worker of app \"agent-example\" is running (datadir {}): running its agents in this \
         process",
        datadir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_two_consoles_send_value_is_answered_by_the_running_worker() {
    let datadir = common::TempDir::new("reach-two-consoles", false);
    let worker = WorkerProcess::start("agent", datadir.path(), &["-l", "info"])
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    let web = worker.web();
    assert_eq!(events_in(web, "agent.adding").await, 0);
    let announced: serde_json::Value = serde_json::from_slice(
        &std::fs::read(datadir.path().join("worker.json")).expect("the worker wrote worker.json"),
    )
    .expect("worker.json is JSON");
    assert_eq!(announced["app"], "agent-example");
    assert_eq!(announced["pid"], worker.child.id());
    assert_eq!(announced["web"], format!("http://{web}"));

    let out = run(
        "agent",
        datadir.path(),
        &["-l", "info", "send_value", "4", "8", "--print"],
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "Sending Add(4, 8)...\n12\n");
    assert!(
        stderr.contains("a worker of this app is running")
            && stderr.contains(&format!("pid={}", worker.child.id())),
        "the command says which worker it reached: {stderr}"
    );
    assert!(
        !stderr.contains("no worker") && !stderr.contains("starting agent"),
        "the command ran no agent of its own: {stderr}"
    );
    // The worker's agent processed the request: one event in, in the worker.
    wait_for_events(web, "agent.adding", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_an_agent_from_another_process_reaches_the_running_workers_agent() {
    let datadir = common::TempDir::new("reach-send", false);
    let worker = WorkerProcess::start("agent", datadir.path(), &[])
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    let web = worker.web();
    let out = run(
        "agent",
        datadir.path(),
        &["send", "@adding", r#"{"a":1,"b":2}"#],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sent: serde_json::Value =
        serde_json::from_str(text(&out.stdout).trim()).expect("send prints where the record went");
    assert_eq!(sent["topic"], "adding");
    assert_eq!(sent["offset"], 0, "the first record of its partition");
    assert!(
        !text(&out.stderr).contains("no worker"),
        "{}",
        text(&out.stderr)
    );
    wait_for_events(web, "agent.adding", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_command_casting_from_another_process_is_processed_by_the_running_worker() {
    let datadir = common::TempDir::new("reach-cast", false);
    let mut worker = WorkerProcess::start("faustexample", datadir.path(), &[])
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    let out = run(
        "faustexample",
        datadir.path(),
        &["send_events", "--count", "2"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The command is a client, as on Kafka: the worker prints what the agent receives.
    assert_eq!(text(&out.stdout), "sent 2 events\n");
    for id in 0..2 {
        let line = worker
            .printed(&format!(r#"myagent received: {{"id":{id},"#))
            .await;
        assert!(line.contains(r#""text":"hello""#), "{line}");
    }
    assert_eq!(worker.terminate().await.code(), Some(0));
    assert!(
        !datadir.path().join("worker.json").exists(),
        "a worker that stops removes its worker.json"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_running_a_command_runs_the_agents_itself_and_says_so() {
    let datadir = common::TempDir::new("reach-none", false);
    let out = run(
        "agent",
        datadir.path(),
        &["send_value", "4", "8", "--print"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Sending Add(4, 8)...\n12\n");
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.matches(&no_worker_note(datadir.path())).count(),
        1,
        "said once: {stderr}"
    );
    assert!(
        !datadir.path().exists(),
        "a command makes no data directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_json_is_ignored_and_replaced() {
    let datadir = common::TempDir::new("reach-stale", true);
    // A process that has exited, and an address where nothing listens.
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("`true` runs");
    let gone_pid = gone.id();
    gone.wait().expect("`true` exits");
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let stale = serde_json::json!({
        "app": "agent-example",
        "pid": gone_pid,
        "web": format!("http://{nowhere}"),
        "instance": "0123456789abcdef",
        "transport": "memory://",
        "started": 0,
    });
    let file = datadir.path().join("worker.json");
    std::fs::write(&file, stale.to_string()).expect("write worker.json");

    let out = run(
        "agent",
        datadir.path(),
        &["send_value", "4", "8", "--print"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Sending Add(4, 8)...\n12\n");
    assert!(
        text(&out.stderr).contains(&no_worker_note(datadir.path())),
        "{}",
        text(&out.stderr)
    );

    // A worker starts over it, and its own announcement replaces it.
    let worker = WorkerProcess::start("agent", datadir.path(), &[])
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    let announced: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read worker.json"))
            .expect("worker.json is JSON");
    assert_eq!(announced["pid"], worker.child.id());
    assert_ne!(announced["instance"], "0123456789abcdef");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_of_the_app_on_the_same_datadir_is_refused_naming_the_first() {
    let datadir = common::TempDir::new("reach-second", false);
    let first = WorkerProcess::start("agent", datadir.path(), &[])
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    let out = run("agent", datadir.path(), &["worker", "--web-port", "0"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("already running")
            && stderr.contains(&format!("process {}", first.child.id()))
            && stderr.contains(&format!("http://{}", first.web())),
        "the error names the running worker: {stderr}"
    );
    assert!(
        !text(&out.stdout).contains("ready"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_web_says_it_is_not_reachable_and_commands_run_their_own_agents() {
    let datadir = common::TempDir::new("reach-without-web", false);
    let worker = WorkerProcess::start("agent", datadir.path(), &["--without-web"])
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    assert!(
        worker
            .banner
            .iter()
            .any(|l| l.contains("datadir") && l.contains("not reachable")),
        "{:?}",
        worker.banner
    );
    assert!(!datadir.path().join("worker.json").exists());
    let out = run("agent", datadir.path(), &["send_value", "2", "3"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "5\n");
    assert!(
        text(&out.stderr).contains(&no_worker_note(datadir.path())),
        "{}",
        text(&out.stderr)
    );
}

// ---- The remote transport in code, against a worker of this process. ----

fn adding(mut stream: Stream<Add>) -> impl AsyncIterable<i64> {
    stream! {
        while let Some(value) = stream.next().await {
            yield value.a + value.b;
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// The adding app, on `broker`.
fn adding_app(id: &str, broker: &str) -> (App, Agent<Add, i64>) {
    let app = App::new(id);
    app.configure(|s| s.broker = broker.to_owned());
    let topic = app.topic("adding").value_type::<Add>();
    let agent = app.agent(adding).channel(&topic);
    (app, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_remote_asks_maps_and_joins_the_workers_agent() -> anyhow::Result<()> {
    let datadir = common::TempDir::new("reach-remote-code", false);
    let (app, _) = adding_app("reach-remote", "memory://");
    let dir = datadir.path().to_path_buf();
    app.configure(|s| {
        s.web_port = Some(0);
        s.datadir = Some(dir);
    });
    let worker = app.start().await?;
    assert!(worker.is_reachable());
    assert!(datadir.path().join("worker.json").is_file());
    let web = worker.web_addr().expect("a web server");

    let (client, adding) = adding_app("reach-remote", &format!("remote://{web}"));
    assert!(!client.is_embedded());
    let session = client.start_client().await?;
    assert_eq!(session.transport(), "remote");
    assert_eq!(adding.ask(Add { a: 4, b: 8 }).await?, 12);
    let joined = adding
        .join((0..20).map(|i| Add { a: i, b: 100 }).collect::<Vec<_>>())
        .await?;
    assert_eq!(joined, (100..120).collect::<Vec<i64>>());
    let mut mapped: Vec<i64> = adding
        .map(vec![Add { a: 1, b: 1 }, Add { a: 2, b: 2 }])
        .try_collect()
        .await?;
    mapped.sort();
    assert_eq!(mapped, vec![2, 4]);
    session.shutdown().await?;

    // A second worker cannot join from another process: an embedded app has one.
    let (other, _) = adding_app("reach-remote", &format!("remote://{web}"));
    let err = other
        .start()
        .await
        .expect_err("no group from a remote process")
        .to_string();
    assert!(
        err.contains("exactly one worker") && err.contains("Kafka"),
        "{err}"
    );

    worker.shutdown().await?;
    assert!(
        !datadir.path().exists(),
        "the worker removed its worker.json and the data directory it made"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_appended_twice_with_one_producer_sequence_lands_once_over_http(
) -> anyhow::Result<()> {
    let datadir = common::TempDir::new("reach-idempotent", false);
    let app = App::new("reach-idempotent");
    let dir = datadir.path().to_path_buf();
    app.configure(|s| {
        s.web_port = Some(0);
        s.datadir = Some(dir);
    });
    let worker = app.start().await?;
    let web = worker.web_addr().expect("a web server");
    let request = |method: &'static str, path: &'static str, body: String| {
        tokio::task::spawn_blocking(move || common::http_send(web, method, path, &body))
    };
    let (status, body) = request(
        "PUT",
        "/transport/topics/numbers",
        r#"{"partitions": 2}"#.into(),
    )
    .await?;
    assert_eq!((status, body.as_str()), (200, r#"{"partitions":2}"#));

    // "rill-producer-id": "p-1", "rill-producer-seq": "41", value "hi" (base64).
    let record = |seq: &str, value: &str| {
        serde_json::json!({"records": [{
            "topic": "numbers", "partition": 1, "value": value,
            "headers": [["rill-producer-id", "cC0x"], ["rill-producer-seq", seq]],
        }]})
        .to_string()
    };
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let first = request("POST", "/transport/records", record(&b64("41"), "aGk=")).await?;
    let again = request("POST", "/transport/records", record(&b64("41"), "aGk=")).await?;
    let next = request("POST", "/transport/records", record(&b64("42"), "aGk=")).await?;
    assert_eq!(first.0, 200, "{}", first.1);
    let at = |answer: &(u16, String)| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&answer.1).expect("JSON")["results"][0].clone()
    };
    assert_eq!(at(&first), serde_json::json!({"partition": 1, "offset": 0}));
    assert_eq!(
        at(&again),
        at(&first),
        "the retry gets the first write's position"
    );
    assert_eq!(at(&next), serde_json::json!({"partition": 1, "offset": 1}));
    let (status, body) = get(web, "/transport/topics/numbers").await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        info["end_offsets"],
        serde_json::json!([0, 2]),
        "two records, not three"
    );

    // A bad body is a clear 400; an unknown topic a 404 naming it.
    let (status, body) = request("POST", "/transport/records", "{".into()).await?;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(web, "/transport/topics/nowhere").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("unknown_topic") && body.contains("nowhere"),
        "{body}"
    );
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_datadir_where_another_apps_worker_runs() -> anyhow::Result<()> {
    let datadir = common::TempDir::new("reach-two-apps", false);
    let on_datadir = |id: &str| {
        let (app, _) = adding_app(id, "memory://");
        let dir = datadir.path().to_path_buf();
        app.configure(|s| {
            s.web_port = Some(0);
            s.datadir = Some(dir);
        });
        app
    };
    let first = on_datadir("reach-app-one").start().await?;
    let err = on_datadir("reach-app-two")
        .start()
        .await
        .expect_err("the data directory is taken")
        .to_string();
    assert!(
        err.contains("\"reach-app-one\"")
            && err.contains(&format!("process {}", std::process::id()))
            && err.contains("its own --datadir"),
        "{err}"
    );
    let announced: serde_json::Value =
        serde_json::from_slice(&std::fs::read(datadir.path().join("worker.json"))?)?;
    assert_eq!(
        announced["app"], "reach-app-one",
        "the first keeps its worker.json"
    );
    first.shutdown().await?;
    Ok(())
}

/// A client waiting for replies holds a long poll open on the worker: the worker stops without
/// waiting for it to run out (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_at_once_while_a_client_waits_on_it() -> anyhow::Result<()> {
    let datadir = common::TempDir::new("reach-stop", false);
    let (app, _) = adding_app("reach-stop", "memory://");
    let dir = datadir.path().to_path_buf();
    app.configure(|s| {
        s.web_port = Some(0);
        s.datadir = Some(dir);
    });
    let worker = app.start().await?;
    let web = worker.web_addr().expect("a web server");
    let (client, adding) = adding_app("reach-stop", &format!("remote://{web}"));
    let session = client.start_client().await?;
    assert_eq!(adding.ask(Add { a: 1, b: 2 }).await?, 3);
    // The client's reply consumer is back to waiting on the worker now.
    common::within(
        Duration::from_secs(3),
        "the worker to stop",
        worker.shutdown(),
    )
    .await?;
    session.shutdown().await?;
    Ok(())
}

/// A proxy to `upstream` that, once, lets a `POST /transport/records` through and loses its
/// answer (it closes the connection instead): the records arrived, the client does not know.
/// Counts the `POST /transport/records` requests it passes.
async fn lossy_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let addr = listener.local_addr().expect("the proxy's address");
    let lose = Arc::new(AtomicBool::new(true));
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(pipe(client, upstream, lose.clone(), counted.clone()));
        }
    });
    (addr, posts)
}

async fn pipe(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    lose: Arc<AtomicBool>,
    posts: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_in, mut client_out) = client.into_split();
    let (mut server_in, mut server_out) = server.into_split();
    let doomed = AtomicBool::new(false);
    let requests = async {
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = match client_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if chunk.windows(23).any(|w| w == b"POST /transport/records") {
                posts.fetch_add(1, Ordering::SeqCst);
                if lose.swap(false, Ordering::SeqCst) {
                    doomed.store(true, Ordering::SeqCst);
                }
            }
            if server_out.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let answers = async {
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = match server_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if doomed.load(Ordering::SeqCst) {
                // The answer is lost: the connection closes when this returns.
                return;
            }
            if client_out.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_answer_is_lost_is_sent_again_and_lands_once() -> anyhow::Result<()> {
    let datadir = common::TempDir::new("reach-lossy", false);
    let numbers_app = |broker: &str| {
        let app = App::new("reach-lossy");
        app.configure(|s| s.broker = broker.to_owned());
        let numbers = app.topic("numbers").value_type::<i64>().partitions(1);
        (app, numbers)
    };
    let (app, _) = numbers_app("memory://");
    let dir = datadir.path().to_path_buf();
    app.configure(|s| {
        s.web_port = Some(0);
        s.datadir = Some(dir);
    });
    let worker = app.start().await?;
    let (proxy, posts) = lossy_proxy(worker.web_addr().expect("a web server")).await;

    let (client, numbers) = numbers_app(&format!("remote://{proxy}"));
    let session = client.start_client().await?;
    numbers.send(42).await?;
    assert_eq!(
        posts.load(Ordering::SeqCst),
        2,
        "the client sent the records again after losing the answer"
    );
    let broker = app.memory_broker();
    assert_eq!(
        broker.end_offset("numbers", 0),
        Some(1),
        "one record, not two"
    );
    let stored = broker.read("numbers", 0, 0, 10);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].value.as_deref(), Some(&b"42"[..]));
    // The next record is a new one.
    numbers.send(43).await?;
    assert_eq!(broker.end_offset("numbers", 0), Some(2));
    session.shutdown().await?;
    worker.shutdown().await?;
    Ok(())
}

/// The count of `word` the worker at `web` serves over HTTP, once it serves one (a restoring
/// partition answers 503, a word not counted yet 404).
async fn served_count(web: SocketAddr, word: &str) -> Option<i64> {
    let path = format!("/tables/word_counts/{word}");
    let (status, body) = tokio::task::spawn_blocking(move || common::http_get(web, &path))
        .await
        .expect("request");
    (status == 200).then(|| {
        body.trim()
            .parse()
            .unwrap_or_else(|e| panic!("a count is a number: {body:?}: {e}"))
    })
}

/// Waits (bounded) until the worker at `web` serves `want` for every word of it.
async fn wait_for_counts(web: SocketAddr, want: &[(&str, i64)]) {
    let deadline = tokio::time::Instant::now() + RUN;
    loop {
        let mut got = Vec::new();
        for (word, _) in want {
            got.push((*word, served_count(web, word).await));
        }
        let expected: Vec<(&str, Option<i64>)> = want.iter().map(|(w, n)| (*w, Some(*n))).collect();
        if got == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's counts: {got:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `worker` command keeps its log in its data directory (`file://`): a word count worker
/// SIGKILLed right after a second process sent it sentences comes back with every word counted
/// once (exactly-once: its counts and offsets are committed together), and goes on counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_word_count_worker_killed_and_restarted_keeps_its_counts() {
    let datadir = common::TempDir::new("reach-durable-counts", false);
    let args = ["--processing-guarantee", "exactly_once"];
    let mut worker = WorkerProcess::start("word_count", datadir.path(), &args)
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not start: {banner:?}"));
    assert!(
        worker
            .banner
            .iter()
            .any(|l| l.contains("transport") && l.contains("file://")),
        "the worker command keeps its log on disk: {:?}",
        worker.banner
    );
    let sentences = ["the quick brown fox", "the lazy dog"];
    let out = run(
        "word_count",
        datadir.path(),
        &["count", sentences[0], sentences[1]],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Killed at once: the sentences are in the log; their counting may be anywhere.
    worker.child.kill().expect("SIGKILL the worker");
    worker.child.wait().expect("reap the worker");

    let worker = WorkerProcess::start("word_count", datadir.path(), &args)
        .await
        .unwrap_or_else(|(banner, _)| panic!("the worker did not restart: {banner:?}"));
    let web = worker.web();
    let counted = [
        ("the", 2),
        ("quick", 1),
        ("brown", 1),
        ("fox", 1),
        ("lazy", 1),
        ("dog", 1),
    ];
    wait_for_counts(web, &counted).await;

    let out = run("word_count", datadir.path(), &["count", "the end"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for_counts(web, &[("the", 3), ("end", 1), ("dog", 1)]).await;
}
