//! The seed's `examples/groupby.py`: an agent that repartitions its stream by account id.
//!
//! ```console
//! $ cargo run --example groupby -- worker -l info
//! $ cargo run --example groupby -- send_transfers
//! ```
//!
//! `send_transfers` sends transfers without a key, so they are spread round-robin over the
//! partitions of the `groupby` topic, and prints where each one reaches the agent after
//! `group_by`: all the transfers of one account come from the same partition of the
//! repartition topic:
//!
//! ```text
//! received alice   10.00 from groupby-groupby-BankTransfer.account_id-repartition[2]
//! received bob     10.00 from groupby-groupby-BankTransfer.account_id-repartition[6]
//! ...
//! alice arrived from partition(s) {2}
//! bob arrived from partition(s) {6}
//! erin arrived from partition(s) {4}
//! frank arrived from partition(s) {5}
//! ```
//!
//! Order is kept per partition: one account's transfers, sent to different partitions of
//! `groupby`, may reach the agent in a different order than they were sent.

use rill::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BankTransfer {
    account_id: String,
    amount: f64,
}

/// `(account_id, repartition topic partition)` of each transfer the agent received.
static RECEIVED: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

async fn stream(s: Stream<BankTransfer>) {
    let mut s = s.group_by(field!(BankTransfer.account_id));
    while let Some(transfer) = s.next().await {
        // transfers will now be distributed such that transfers
        // with the same account_id always arrives to the same agent
        // instance
        let Some(event) = s.current_event() else {
            continue;
        };
        println!(
            "received {:<6} {:>6.2} from {}[{}]",
            transfer.account_id, transfer.amount, event.topic, event.partition
        );
        received().push((transfer.account_id, event.partition));
    }
}

fn received() -> std::sync::MutexGuard<'static, Vec<(String, u32)>> {
    RECEIVED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Send transfers for a few accounts and show where each reaches the agent.
#[derive(Debug, clap::Args)]
struct NoArgs {}

fn main() {
    let app = App::new("groupby");
    let topic = app.topic("groupby").value_type::<BankTransfer>();

    app.agent(stream).channel(&topic);

    let local = app.clone();
    app.command("send_transfers", move |NoArgs {}| {
        let (app, topic) = (local.clone(), topic.clone());
        async move {
            let mut sent = 0;
            for amount in [10.0, 20.0, 30.0] {
                for account_id in ["alice", "bob", "erin", "frank"] {
                    let account_id = account_id.to_owned();
                    topic.send(BankTransfer { account_id, amount }).await?;
                    sent += 1;
                }
            }
            if !agents_run_here(&app) {
                println!("sent {sent} transfers");
                return Ok(());
            }
            if !wait_until(|| received().len() >= sent).await {
                anyhow::bail!("the agent did not receive all {sent} transfers in time");
            }
            let mut partitions: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
            for (account_id, partition) in received().iter() {
                partitions
                    .entry(account_id.clone())
                    .or_default()
                    .insert(*partition);
            }
            for (account_id, partitions) in partitions {
                println!("{account_id} arrived from partition(s) {partitions:?}");
            }
            Ok::<_, anyhow::Error>(())
        }
    });

    app.main()
}

/// Whether the agents run in this process while a command runs: only on the embedded
/// transport (on Kafka they run in the worker, which prints what they receive).
fn agents_run_here(app: &App) -> bool {
    app.is_embedded()
}

/// Waits until `done()` holds, for at most 10 seconds; returns whether it does.
async fn wait_until(done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}
