//! `group_by` on the embedded transport: the stream is repartitioned through
//! `<app id>-<topic>-<key name>-repartition`, so each key is read from one partition, every
//! event arrives once, and each key keeps its order.

mod common;

use common::{
    assert_committed_to_end, http_get, kafka_partition, read_all, wait_until_state, Recorder, WAIT,
};
use rill::prelude::*;
use rill::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

// The seed's `examples/groupby.py` record, with a sequence number per account so order can be
// checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BankTransfer {
    account_id: String,
    amount: f64,
    seq: u32,
}

const REPARTITION: &str = "groupby-groupby-BankTransfer.account_id-repartition";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_routes_each_key_to_one_repartition_partition_once_and_in_order(
) -> anyhow::Result<()> {
    const ACCOUNTS: u32 = 40;
    const TRANSFERS: u32 = 1200;

    let app = App::new("groupby");
    let topic = app.topic("groupby").value_type::<BankTransfer>();
    // (account, seq, topic read from, partition read from)
    let seen: Recorder<(String, u32, String, u32)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<BankTransfer>| {
        let rec = rec.clone();
        async move {
            let mut s = s.group_by(field!(BankTransfer.account_id));
            while let Some(transfer) = s.next().await {
                let event = s.current_event().expect("a value comes with its event");
                rec.push((
                    transfer.account_id.clone(),
                    transfer.seq,
                    event.topic.to_string(),
                    event.partition,
                ));
            }
        }
    })
    .named("stream")
    .channel(&topic);

    let worker = app.start().await?;
    // The source is keyed by branch, so each account's transfers sit in order in one source
    // partition, and many accounts share a partition: group_by has to move them.
    let mut next_seq: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..TRANSFERS {
        let n = (i * 31) % ACCOUNTS;
        let account = format!("acct-{n}");
        let branch = format!("branch-{}", n % 5);
        let seq = next_seq.entry(account.clone()).or_default();
        let transfer = BankTransfer {
            account_id: account,
            amount: f64::from(i),
            seq: *seq,
        };
        *seq += 1;
        topic
            .send(transfer)
            .key(Bytes::from(branch.into_bytes()))
            .await?;
    }
    wait_until_state(
        WAIT,
        "every transfer came out of group_by",
        || seen.len(),
        |n| *n >= TRANSFERS as usize,
    )
    .await;
    worker.shutdown().await?;

    let broker = app.memory_broker();
    assert_eq!(
        broker.partitions(REPARTITION),
        Some(8),
        "the repartition topic has the source's partition count"
    );

    let seen = seen.snapshot();
    assert_eq!(
        seen.len(),
        TRANSFERS as usize,
        "transfers arrived more than once"
    );
    let mut per_account: BTreeMap<String, (Vec<u32>, BTreeSet<u32>)> = BTreeMap::new();
    for (account, seq, topic, partition) in &seen {
        assert_eq!(
            topic, REPARTITION,
            "value not read back from the repartition topic"
        );
        let entry = per_account.entry(account.clone()).or_default();
        entry.0.push(*seq);
        entry.1.insert(*partition);
    }
    assert_eq!(per_account.len(), ACCOUNTS as usize);
    for (account, (seqs, partitions)) in &per_account {
        let expected: Vec<u32> = (0..next_seq[account]).collect();
        assert_eq!(
            seqs, &expected,
            "transfers of {account} out of order, lost or duplicated"
        );
        // The new key is JSON-encoded, and partitioned as Kafka's Java client would.
        let key = serde_json::to_vec(account)?;
        assert_eq!(
            partitions,
            &BTreeSet::from([kafka_partition(&key, 8)]),
            "transfers of {account} read from the wrong partitions"
        );
    }

    // The repartition topic was written each transfer once; what the group committed of it is
    // gone (the embedded broker keeps only what a group still needs), and whatever is left is
    // keyed by its account.
    let written: i64 = common::end_offsets(&app, REPARTITION).iter().sum();
    assert_eq!(written, i64::from(TRANSFERS));
    for m in &read_all(&app, REPARTITION) {
        let t: BankTransfer = serde_json::from_slice(m.value.as_deref().unwrap_or_default())?;
        let key: String = serde_json::from_slice(m.key.as_deref().unwrap_or_default())?;
        assert_eq!(key, t.account_id);
    }

    assert_committed_to_end(&app, "groupby");
    assert_committed_to_end(&app, REPARTITION);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_with_a_computed_key_names_the_topic_after_the_grouping() -> anyhow::Result<()> {
    let app = App::new("bank");
    let topic = app
        .topic("transfers")
        .partitions(4)
        .value_type::<BankTransfer>();
    let seen: Recorder<(bool, u32)> = Recorder::new();
    let rec = seen.clone();
    app.agent(move |s: Stream<BankTransfer>| {
        let rec = rec.clone();
        async move {
            let by_parity = GroupBy::new("parity", |t: &BankTransfer| t.seq % 2 == 0);
            let mut s = s.group_by(by_parity).items();
            while let Some((key, transfer)) = s.next().await {
                rec.push((key.expect("group_by sets the key"), transfer.seq));
            }
        }
    })
    .named("parity")
    .channel(&topic);

    let worker = app.start().await?;
    for seq in 0..100 {
        let t = BankTransfer {
            account_id: "a".into(),
            amount: 1.0,
            seq,
        };
        topic.send(t).partition(0).await?;
    }
    wait_until_state(
        WAIT,
        "all 100 transfers grouped",
        || seen.len(),
        |n| *n >= 100,
    )
    .await;
    worker.shutdown().await?;

    assert_eq!(
        app.memory_broker()
            .partitions("bank-transfers-parity-repartition"),
        Some(4)
    );
    let seen = seen.snapshot();
    assert_eq!(seen.len(), 100);
    for parity in [true, false] {
        let seqs: Vec<u32> = seen
            .iter()
            .filter(|(k, _)| *k == parity)
            .map(|(_, s)| *s)
            .collect();
        let expected: Vec<u32> = (0..100).filter(|s| (s % 2 == 0) == parity).collect();
        assert_eq!(
            seqs, expected,
            "key {parity}: the typed key or the order is wrong"
        );
    }
    Ok(())
}

/// The agent's queue is full (one record) and the dispatcher waits on it before the agent's
/// `group_by` subscribes to its repartition topic, which needs the dispatcher: the dispatcher
/// serves the subscription while it waits, and every event comes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_subscribes_while_its_queue_is_full() -> anyhow::Result<()> {
    const TRANSFERS: u32 = 200;
    let app = App::new("groupby-full");
    app.configure(|s| {
        s.stream_buffer_maxsize = 1;
        s.web_port = Some(0);
    });
    let topic = app.topic("transfers").value_type::<BankTransfer>();
    let seen: Recorder<u32> = Recorder::new();
    let gate = Arc::new(tokio::sync::Notify::new());
    let (rec, open) = (seen.clone(), gate.clone());
    app.agent(move |s: Stream<BankTransfer>| {
        let (rec, open) = (rec.clone(), open.clone());
        async move {
            // Held back until the dispatcher has filled the queue.
            open.notified().await;
            let mut s = s.group_by(field!(BankTransfer.account_id));
            while let Some(transfer) = s.next().await {
                rec.push(transfer.seq);
            }
        }
    })
    .named("stream")
    .channel(&topic);
    let worker = app.start().await?;
    for seq in 0..TRANSFERS {
        let transfer = BankTransfer {
            account_id: format!("acct-{}", seq % 7),
            amount: 1.0,
            seq,
        };
        topic
            .send(transfer)
            .key(Bytes::from(format!("b{}", seq % 3)))
            .await?;
    }
    // One record in the queue, the next in the dispatcher's hands: once it has counted the
    // second it can only wait on the full queue (the agent reads nothing until the gate
    // opens). How many it counts depends on how the records were batched when it polled, so
    // two is all there is to wait for; if the gate opens before the dispatcher is waiting,
    // the subscription waits in the control channel and the dispatcher still meets it while
    // it waits on the queue.
    let web = worker.web_addr().expect("the web server runs");
    let dispatched = || {
        let (_, body) = http_get(web, "/metrics");
        body.lines()
            .filter(|l| {
                l.starts_with("rill_events_in_total")
                    && l.contains("app=\"groupby-full\"")
                    && l.contains("topic=\"transfers\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    wait_until_state(
        WAIT,
        "the dispatcher waits on the full queue",
        dispatched,
        |n| *n >= 2.0,
    )
    .await;
    gate.notify_one();
    wait_until_state(
        WAIT,
        "every transfer came out of group_by",
        || seen.len(),
        |n| *n >= TRANSFERS as usize,
    )
    .await;
    worker.shutdown().await?;
    let mut seqs = seen.snapshot();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..TRANSFERS).collect::<Vec<_>>());
    Ok(())
}
