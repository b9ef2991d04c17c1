//! An idle embedded worker stays small: the `agent` example's worker, started as a process,
//! keeps its resident memory under 30 MB, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The example binaries `cargo test` builds next to the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    dir.join("examples").join(name)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
#[cfg(target_os = "linux")]
fn idle_embedded_worker_stays_under_30_mb() {
    let bin = example("agent");
    assert!(bin.exists(), "{} not built", bin.display());
    // A data directory of its own (the worker announces itself there, and removes it when
    // it stops).
    let datadir = std::env::temp_dir().join(format!("rill-memory-datadir-{}", std::process::id()));
    let mut child = Command::new(&bin)
        // Tests run side by side: each worker serves on a free port.
        .env("RILL_WEB_PORT", "0")
        .env("RILL_DATADIR", &datadir)
        .arg("worker")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start worker");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("ready") => break,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                panic!("worker did not print its ready banner: {e}");
            }
        }
    }
    // Sample the idle worker a few times; the largest reading counts.
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(rss_kib(pid).expect("read VmRSS"));
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("idle embedded worker: VmRSS {peak} KiB");

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success(), "kill -TERM failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait for worker") {
            break exit;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("worker did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "worker exited with {exit}");
    assert!(
        !datadir.join("worker.json").exists(),
        "a worker stopped by SIGTERM removes its worker.json"
    );
    // The worker command keeps its log on disk, in the data directory, for its next run.
    assert!(
        datadir.join("agent-example").join("log").is_dir(),
        "the worker's durable log stays in its data directory"
    );
    assert!(
        peak < 30 * 1024,
        "idle embedded worker uses {peak} KiB resident, over 30 MB"
    );
}
