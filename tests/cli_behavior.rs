//! The command line of `examples/agent.rs`, run as a user runs it: the seed's `send_value`
//! command, usage errors, and a `worker` stopped by a signal.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::process::Command;

/// Building the example may take minutes on a loaded machine; running it takes milliseconds.
const BUILD: Duration = Duration::from_secs(600);
const RUN: Duration = Duration::from_secs(60);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A command with no settings inherited from the environment that would change the app.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(manifest_dir())
        .env_remove("RILL_BROKER")
        .env_remove("RILL_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Builds the example once per test binary and returns the path cargo reports for it.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let out = std::process::Command::new(env!("CARGO"))
            .current_dir(manifest_dir())
            .args([
                "build",
                "--quiet",
                "--example",
                "agent",
                "--message-format=json",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "cargo build --example agent failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "agent")
            .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .expect("cargo reports the example's executable")
    })
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
    let binary = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("build");
    let mut cmd = command(binary);
    cmd.args(args);
    run(cmd, RUN, &format!("agent {}", args.join(" "))).await
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
}

/// Starts `agent worker` and waits (bounded) for the banner line that says it is ready.
async fn start_worker() -> ReadyWorker {
    let binary = tokio::task::spawn_blocking(example_binary)
        .await
        .expect("build");
    let mut child = Running(
        std::process::Command::new(binary)
            .current_dir(manifest_dir())
            .env_remove("RILL_BROKER")
            .env_remove("RILL_LOG")
            .env_remove("RUST_LOG")
            // Tests run side by side: each worker serves on a free port.
            .env("RILL_WEB_PORT", "0")
            .arg("worker")
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
    assert!(
        worker.banner.last().is_some_and(|l| l.contains("ready")),
        "ready comes last: {banner}"
    );
    // Dropping the handle kills the worker.
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
