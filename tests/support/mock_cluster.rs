//! Hosts librdkafka's mock cluster in a process of its own, so that several worker processes
//! can share it (the cluster lives inside the process that creates it): for the fault-test
//! harness (`tests/fault_harness.rs`).
//!
//! ```console
//! $ cargo run --example mock_cluster -- --brokers 3 --topic fault-events:6 --topic fault-out:6
//! 127.0.0.1:40233,127.0.0.1:41789,127.0.0.1:39125
//! ```
//!
//! It prints the bootstrap servers on the first line of stdout and runs until stdin closes or
//! it is killed. The mock brokers do not answer CreateTopics: `--topic NAME:PARTITIONS`
//! creates a topic with its partition count first (others are auto-created with 4).

use rdkafka::mocking::MockCluster;
use std::io::{BufRead, Write};

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}\nusage: mock_cluster [--brokers N] [--topic NAME:PARTITIONS]...");
    std::process::exit(2)
}

fn main() {
    let mut brokers = 3;
    let mut topics: Vec<(String, i32)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--brokers" => {
                brokers = value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--brokers {value:?}: not a number")))
            }
            "--topic" => {
                let (name, partitions) = value
                    .rsplit_once(':')
                    .and_then(|(n, p)| Some((n.to_owned(), p.parse().ok()?)))
                    .unwrap_or_else(|| usage(&format!("--topic {value:?}: not NAME:PARTITIONS")));
                topics.push((name, partitions));
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let cluster = MockCluster::new(brokers).unwrap_or_else(|e| {
        eprintln!("error: cannot start the mock cluster: {e}");
        std::process::exit(1)
    });
    for (name, partitions) in &topics {
        if let Err(e) = cluster.create_topic(name, *partitions, 1) {
            eprintln!("error: cannot create topic {name:?}: {e}");
            std::process::exit(1)
        }
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{}", cluster.bootstrap_servers());
    let _ = stdout.flush();
    // Runs until whoever started it closes stdin (or exits, which closes it).
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin
        .lock()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
    drop(cluster);
}
