//! The command line of the examples, run as a user runs it: the seed's `send_value` command,
//! the tools every app has (`send`, `agents`, `tables`, `reset`, `--version`), usage errors,
//! and a `worker` stopped by a signal.

mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;
use tokio::process::Command;

/// Building the example may take minutes on a loaded machine; running it takes milliseconds.
const BUILD: Duration = Duration::from_secs(600);
const RUN: Duration = Duration::from_secs(60);

/// A data directory of its own for each command (nothing makes it but a worker): tests run
/// side by side, and a command must not find the worker another test started.
fn own_datadir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "rill-cli-datadir-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A command with no settings inherited from the environment that would change the app.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(common::manifest_dir())
        .env("RILL_DATADIR", own_datadir())
        .env_remove("RILL_BROKER")
        .env_remove("RILL_LOG")
        .env_remove("RUST_LOG")
        .env_remove("RILL_PROCESSING_GUARANTEE")
        .env_remove("RILL_WORKER_ID")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn run(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    common::within(limit, what, child.wait_with_output())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn run_example(args: &[&str]) -> Output {
    run_named("agent", args).await
}

/// Runs the example `example` with `args`.
async fn run_named(example: &str, args: &[&str]) -> Output {
    let name = example.to_owned();
    let binary = tokio::task::spawn_blocking(move || common::example_binary(&name))
        .await
        .expect("build");
    let mut cmd = command(binary);
    cmd.args(args);
    run(cmd, RUN, &format!("{example} {}", args.join(" "))).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cargo_run_send_value_with_print_prints_the_seeds_output() {
    let mut cmd = command(env!("CARGO"));
    cmd.args([
        "run",
        "--quiet",
        "--example",
        "agent",
        "--",
        "send_value",
        "4",
        "8",
        "--print",
    ]);
    let out = run(
        cmd,
        BUILD,
        "cargo run --example agent -- send_value 4 8 --print",
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Sending Add(4, 8)...\n12\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_value_without_print_prints_only_the_result() {
    for args in [
        &["send_value", "4", "8", "--no-print"][..],
        &["send_value", "4", "8"],
    ] {
        let out = run_example(args).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "12\n", "{args:?}");
    }
    // The last of --print / --no-print wins.
    let out = run_example(&["send_value", "2", "3", "--print", "--no-print"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "5\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_argument_is_a_usage_error_with_exit_code_2() {
    let out = run_example(&["send_value", "x", "8"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stdout), "", "nothing is sent, nothing printed");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("invalid value 'x'") && stderr.contains("<A>"),
        "the error names the bad value and the argument: {stderr}"
    );

    let out = run_example(&["send_value", "4"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("<B>"),
        "the error names the missing argument: {}",
        text(&out.stderr)
    );

    let out = run_example(&["no_such_command"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no_such_command"),
        "{}",
        text(&out.stderr)
    );
}

/// A child process killed (and reaped) if the test ends before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A worker that printed its ready banner; its stdout stays open until it is dropped.
struct ReadyWorker {
    child: Running,
    banner: Vec<String>,
    _stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// Its data directory, removed once it is killed (fields drop in order).
    _datadir: common::TempDir,
}

/// Starts `agent worker` and waits (bounded) for the banner line that says it is ready.
async fn start_worker() -> ReadyWorker {
    start_worker_with(&[]).await
}

/// Starts `agent worker ARGS` and waits (bounded) for the banner line that says it is ready.
async fn start_worker_with(args: &[&str]) -> ReadyWorker {
    let binary = tokio::task::spawn_blocking(|| common::example_binary("agent"))
        .await
        .expect("build");
    let datadir = common::TempDir::new("cli-worker", false);
    let mut child = Running(
        std::process::Command::new(binary)
            .current_dir(common::manifest_dir())
            .env("RILL_DATADIR", datadir.path())
            .env_remove("RILL_BROKER")
            .env_remove("RILL_LOG")
            .env_remove("RUST_LOG")
            .env_remove("RILL_PROCESSING_GUARANTEE")
            .env_remove("RILL_WORKER_ID")
            // Tests run side by side: each worker serves on a free port.
            .env("RILL_WEB_PORT", "0")
            .arg("worker")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    // Reads the banner on a blocking thread; the reader is kept open until the worker exits.
    let reading = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("stdout readable");
            let ready = line.contains("ready");
            banner.push(line);
            if ready {
                return Ok((banner, lines));
            }
        }
        Err(banner)
    });
    let (banner, stdout) = common::within(RUN, "the worker's ready banner", reading)
        .await
        .expect("reader thread")
        .unwrap_or_else(|banner| panic!("the worker exited before it was ready: {banner:?}"));
    ReadyWorker {
        child,
        banner,
        _stdout: stdout,
        _datadir: datadir,
    }
}

/// Starts a worker, sends `signal` as soon as it says it is ready, and returns how it exited.
async fn signal_after_ready(signal: &str) -> std::process::ExitStatus {
    let mut worker = start_worker().await;
    let child = &mut worker.child;
    let pid = child.0.id();
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid} failed");
    let mut exit = None;
    common::wait_until(RUN, &format!("the worker exits after {signal}"), || {
        exit = child.0.try_wait().expect("wait for the worker");
        exit.is_some()
    })
    .await;
    exit.expect("exited")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_prints_a_ready_banner_naming_the_app_its_transport_and_agents() {
    let worker = start_worker().await;
    let banner = worker.banner.join("\n");
    assert!(banner.contains("agent-example"), "the app id: {banner}");
    assert!(banner.contains("memory://"), "the transport: {banner}");
    assert!(banner.contains("adding"), "the agent: {banner}");
    for line in ["store", "web", "loglevel", "guarantee"] {
        assert!(banner.contains(line), "the {line}: {banner}");
    }
    assert!(
        worker.banner.last().is_some_and(|l| l.contains("ready")),
        "ready comes last: {banner}"
    );
    // Ready means serving: `GET /ready` agrees as soon as the banner says so.
    let addr: std::net::SocketAddr = worker
        .banner
        .iter()
        .find_map(|l| l.split("http://").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the web address: {banner}"));
    let (status, body) = tokio::task::spawn_blocking(move || common::http_get(addr, "/ready"))
        .await
        .expect("request");
    assert_eq!(status, 200, "{body}");
    // Dropping the handle kills the worker.
}

/// The banner's `guarantee` line.
fn guarantee_line(worker: &ReadyWorker) -> String {
    worker
        .banner
        .iter()
        .find(|l| l.contains("guarantee"))
        .cloned()
        .unwrap_or_else(|| panic!("no guarantee line in the banner: {:?}", worker.banner))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_takes_the_processing_guarantee_from_its_option_and_shows_it() {
    let worker = start_worker().await;
    let line = guarantee_line(&worker);
    assert!(
        line.ends_with(" at_least_once"),
        "the default, as the flag spells it: {line}"
    );
    drop(worker);

    // The embedded transport runs exactly-once too: within the process.
    let worker = start_worker_with(&[
        "--processing-guarantee",
        "exactly_once",
        "--worker-id",
        "w1",
    ])
    .await;
    let line = guarantee_line(&worker);
    assert!(line.ends_with(" exactly_once"), "the option: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_processing_guarantee_is_a_usage_error_with_exit_code_2() {
    let out = run_example(&["worker", "--processing-guarantee", "bogus"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "",
        "no banner: the worker does not start"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("'bogus'") && stderr.contains("exactly_once"),
        "the error names the bad value and the valid ones: {stderr}"
    );

    // The same from the environment.
    let binary = tokio::task::spawn_blocking(|| common::example_binary("agent"))
        .await
        .expect("build");
    let mut cmd = command(binary);
    cmd.env("RILL_PROCESSING_GUARANTEE", "bogus").arg("worker");
    let out = run(
        cmd,
        RUN,
        "agent worker with RILL_PROCESSING_GUARANTEE=bogus",
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("'bogus'"),
        "{}",
        text(&out.stderr)
    );
}

/// Workers started and stopped per signal: a worker that is "ready" must stop cleanly however
/// soon the signal comes, and a race there shows only in some runs.
const CYCLES: usize = 100;

async fn worker_stops_cleanly_on(signal: &str) {
    let mut bad = Vec::new();
    for _ in 0..CYCLES {
        let exit = signal_after_ready(signal).await;
        if exit.code() != Some(0) {
            bad.push(exit);
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {CYCLES} workers stopped by kill {signal} right after their ready banner did not \
         exit 0: {bad:?}",
        bad.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_prints_ready_and_exits_0_on_sigterm() {
    worker_stops_cleanly_on("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exits_0_on_sigint_as_on_ctrl_c() {
    worker_stops_cleanly_on("-INT").await;
}

/// Stdout's lines, each split into its columns (separated by two spaces or more).
fn columns(out: &Output) -> Vec<Vec<String>> {
    text(&out.stdout)
        .lines()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// The JSON lines of stdout (where `send` says the record went).
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_a_json_value_to_an_agent_which_processes_it_before_the_command_exits() {
    let out = run_named(
        "faustexample",
        &["send", "@myagent", r#"{"id": 7, "text": "hi"}"#],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(r#"myagent received: {"id":7,"text":"hi"}"#),
        "the agent processed the value: {stdout}"
    );
    let sent = json_lines(&out);
    assert_eq!(sent.len(), 1, "{stdout}");
    assert_eq!(sent[0]["topic"], "faustexample.myagent", "{stdout}");

    // By topic name, with a key and a partition.
    let out = run_named(
        "faustexample",
        &[
            "send",
            "faustexample.myagent",
            r#""by topic""#,
            "--key",
            "k1",
            "--partition",
            "2",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(r#"myagent received: "by topic""#),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(json_lines(&out)[0]["partition"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_checks_the_value_against_the_type_the_agent_reads() {
    let out = run_example(&["send", "adding", r#"{"a": 4, "b": 8}"#]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(json_lines(&out)[0]["topic"], "adding");

    let out = run_example(&["send", "@adding", r#"{"a": 4}"#]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "", "nothing is sent");
    assert!(
        text(&out.stderr).contains("missing field `b`"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_tables_list_what_the_app_declares() {
    let out = run_named("word_count", &["agents"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        columns(&out),
        vec![
            vec!["agent", "source", "concurrency", "sinks"],
            vec![
                "word_count.split_sentences",
                "sentences",
                "1",
                "topic words"
            ],
            vec!["count_words", "words", "1", "-"],
        ]
    );
    let out = run_named("word_count", &["tables"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        columns(&out),
        vec![
            vec!["table", "changelog", "partitions"],
            vec!["word_counts", "word_count-word_counts-changelog", "8"],
        ]
    );
    let out = run_named("news", &["agents"]).await;
    assert_eq!(
        columns(&out)[1],
        vec!["news.imports_news", "news", "10", "-"],
        "the concurrency"
    );
    let out = run_example(&["tables"]).await;
    assert_eq!(
        columns(&out),
        vec![vec!["table", "changelog", "partitions"]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_to_the_tools_are_usage_errors_with_exit_code_2() {
    let valid = r#"{"a": 1, "b": 2}"#;
    for (args, says) in [
        (&["send"][..], "<TOPIC_OR_AGENT>"),
        (&["send", "@adding"], "<JSON>"),
        (&["send", "@adding", "not json"], "not JSON"),
        (
            &["send", "nowhere", "1"],
            "no topic or agent named \"nowhere\"",
        ),
        (
            &["send", "@adding", valid, "--partition", "x"],
            "invalid value 'x'",
        ),
        (&["agents", "extra"], "extra"),
        (&["tables", "--bogus"], "--bogus"),
    ] {
        let out = run_example(args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "", "{args:?}");
        assert!(
            text(&out.stderr).contains(says),
            "{args:?} says {says:?}: {}",
            text(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_prints_the_program_and_rills_version() {
    let out = run_example(&["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        format!("agent (rill {})\n", env!("CARGO_PKG_VERSION")),
        "the program's name, and the version as rill's"
    );
}

/// The count `word_count count WORD --print` prints for `word`.
fn count_of(out: &Output, word: &str) -> i64 {
    columns(out)
        .iter()
        .find(|c| c.first().map(String::as_str) == Some(word))
        .and_then(|c| c.get(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no count of {word:?}: {}", text(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_refuses_without_yes_and_with_it_removes_the_local_table_state() {
    let dir = std::env::temp_dir().join(format!("rill-cli-reset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = format!("fjall://{}", dir.display());
    let word_count = |args: &[&str]| {
        let args: Vec<String> = ["--store", &store]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_named("word_count", &args).await
        }
    };
    let out = word_count(&["count", "a b a", "--print"]).await;
    assert_eq!(count_of(&out, "a"), 2, "{}", text(&out.stderr));
    // The store keeps the counts from one run to the next.
    let out = word_count(&["count", "a", "--print"]).await;
    assert!(count_of(&out, "a") >= 2, "{}", text(&out.stdout));

    let out = word_count(&["reset"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    let out = word_count(&["reset", "--yes"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("word_counts"),
        "{}",
        text(&out.stdout)
    );

    let out = word_count(&["count", "a", "--print"]).await;
    assert_eq!(
        count_of(&out, "a"),
        1,
        "counting starts again after the reset"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reset` on a store path where the app has no state (a typo, say) says so and fails,
/// and creates nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_of_a_store_that_does_not_exist_fails_and_creates_nothing() {
    let dir = std::env::temp_dir().join(format!("rill-cli-no-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = format!("fjall://{}", dir.display());
    let out = run_named("word_count", &["--store", &store, "reset", "--yes"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("nothing to reset") && stderr.contains(&dir.display().to_string()),
        "the error names the store and says nothing was reset: {stderr}"
    );
    assert!(!dir.exists(), "reset created {}", dir.display());
}

/// A broker nobody answers at: the command says so once per condition, not once per
/// reconnection attempt of every client (it printed 1,615 lines in 10 s), then fails with an
/// error naming the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_reported_in_a_few_lines_then_a_clear_error() {
    // A port nobody listens on: bound, then closed.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let broker = format!("kafka://{address}");
    let out = run_example(&["send_value", "1", "2", "--broker", &broker]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    let lines = stderr.lines().count();
    assert!(
        lines <= 12,
        "{lines} lines on stderr for one unreachable broker:\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("cannot reach Kafka") && last.contains(&address.to_string()),
        "the last line is the error naming the broker: {last:?}"
    );
}

/// `send --key` encodes the key with the key codec of the agent's topic: a JSON string key
/// typed bare on the command line reaches the agent as that string (it used to be sent as raw
/// UTF-8, which the agent's JSON key codec could not read).
#[test]
fn send_encodes_the_key_with_the_agents_key_codec() {
    use rill::prelude::*;
    let app = App::new("cli-keyed");
    let words = app
        .topic("keyed-words")
        .key_type::<String>()
        .value_type::<i64>();
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    app.agent(move |mut stream: Stream<i64, String>| {
        let seen = s.clone();
        async move {
            while let Some(n) = stream.next().await {
                let key = stream.current_event().and_then(|m| m.key.clone());
                seen.lock().expect("lock").push((key, n));
            }
        }
    })
    .named("count")
    .channel(&words);
    app.main_from(["cli-keyed", "send", "@count", "7", "--key", "word"])
        .expect("send");
    app.main_from(["cli-keyed", "send", "@count", "8", "--key", r#""quoted""#])
        .expect("send");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            (Some(bytes::Bytes::from_static(br#""word""#)), 7),
            (Some(bytes::Bytes::from_static(br#""quoted""#)), 8)
        ]
    );
}

/// An app command named like a built-in one would hide it (word_count's own `send` once took
/// `send @count_words '"hello"'` as two sentences and exited 0): refused before anything runs.
#[test]
fn an_app_command_named_like_a_built_in_one_is_refused_at_start_up() {
    use rill::prelude::*;
    for name in ["send", "worker", "agents", "tables", "reset", "help"] {
        let app = App::new("cli-clash");
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        app.command(name, move |_: NoArgs| {
            let r = r.clone();
            async move {
                r.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, rill::Error>(())
            }
        });
        let err = app
            .main_from(["cli-clash", "agents"])
            .expect_err("a clash is an error")
            .to_string();
        assert!(
            err.contains(&format!("{name:?}")) && err.contains("built-in"),
            "{name}: {err}"
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "{name} ran");
    }
}

/// A command without arguments takes `NoArgs`, and runs.
#[test]
fn a_command_without_arguments_takes_no_args() {
    use rill::prelude::*;
    let app = App::new("cli-no-args");
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    app.command("hello", move |_: NoArgs| {
        let r = r.clone();
        async move {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, rill::Error>(())
        }
    });
    app.main_from(["cli-no-args", "hello"]).expect("hello runs");
    assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
}

/// Faust users' habits: `-l INFO` and `-l warning`, `worker -p PORT`, `-f/--logfile`,
/// `help --help` and `help COMMAND`, `--json` listings, and usage lines that name the program
/// as it was run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_takes_faust_users_habits() {
    for level in ["INFO", "warning", "Debug", "CRITICAL"] {
        let out = run_example(&["-l", level, "tables"]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "-l {level}: {}",
            text(&out.stderr)
        );
    }

    let worker = start_worker_with(&["-p", "0"]).await;
    assert!(
        worker.banner.iter().any(|l| l.contains("web ")),
        "`worker -p 0` serves the web interface: {:?}",
        worker.banner
    );
    drop(worker);

    let log = std::env::temp_dir().join(format!("rill-cli-logfile-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let path = log.display().to_string();
    let out = run_example(&["-l", "info", "-f", &path, "send_value", "4", "8", "--print"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Sending Add(4, 8)...\n12\n");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("worker started"),
        "the log file: {logged:?}"
    );
    assert!(
        !text(&out.stderr).contains("worker started"),
        "the log goes to the file only: {}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_file(&log);

    let out = run_example(&["help", "--help"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run_example(&["help", "worker"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("--web-port"),
        "`help worker` explains worker: {}",
        text(&out.stdout)
    );

    let out = run_named("word_count", &["agents", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let agents: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("`agents --json` prints JSON");
    assert_eq!(agents[1]["agent"], "count_words");
    assert_eq!(agents[1]["topics"], serde_json::json!(["words"]));
    assert_eq!(agents[1]["concurrency"], 1);
    let out = run_named("word_count", &["tables", "--json"]).await;
    let tables: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("`tables --json` prints JSON");
    assert_eq!(
        tables,
        serde_json::json!([{
            "table": "word_counts",
            "changelog": "word_count-word_counts-changelog",
            "partitions": 8
        }])
    );

    // The example's binary is `agent`; its app id is `agent-example`.
    for args in [
        &["send", "nowhere", "1"][..],
        &["send"],
        &["worker", "--bogus"],
    ] {
        let out = run_example(args).await;
        let usage: Vec<String> = text(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("Usage:"))
            .map(str::to_owned)
            .collect();
        assert!(
            !usage.is_empty() && usage.iter().all(|l| l.starts_with("Usage: agent ")),
            "{args:?}: {usage:?}"
        );
    }
}

/// `App::main_async` runs the command line on the runtime it is awaited on (from
/// `#[tokio::main]`), where `App::main_from` refuses with an error saying what to call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_runs_from_an_async_main() {
    use rill::prelude::*;
    let app = App::new("cli-async");
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    app.command("hello", move |_: NoArgs| {
        let r = r.clone();
        async move {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, rill::Error>(())
        }
    });
    let err = app
        .main_from(["cli-async", "hello"])
        .expect_err("no runtime inside a runtime")
        .to_string();
    assert!(err.contains("main_async"), "{err}");
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    app.main_async_from(["cli-async", "hello"])
        .await
        .expect("hello runs");
    assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
}
