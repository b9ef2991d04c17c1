//! The transport-dependent scenarios (`tests/scenarios/mod.rs`) on Kafka: librdkafka's
//! in-process mock cluster, a fresh one per test. Then what only Kafka can do wrong: an
//! unreachable broker, and an existing topic with another partition count.

mod common;
mod scenarios;

use common::within;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rill::prelude::*;
use rill::{Error, TransportError};
use scenarios::{init_logging, scenario_tests, Harness, PARTITIONS};
use std::time::Duration;

/// The group session timeout and heartbeat of the apps; see [`KafkaHarness`].
const SESSION_TIMEOUT_MS: &str = "6000";
const HEARTBEAT_MS: &str = "1000";

/// Apps on a mock cluster of one broker that lives as long as the harness (the whole test).
/// The mock broker does not answer CreateTopics, so topics are auto-created with its default
/// of 4 partitions.
///
/// The mock's group coordinator completes a rebalance of a group that is up (a member
/// leaving, or rejoining with a new subscription as `group_by` and `through` make it) only
/// when a timer of the session timeout less one second runs out, even once every member has
/// rejoined: 44 s with librdkafka's default session timeout. A 6 s session timeout keeps such
/// rebalances to about 5 s.
struct KafkaHarness {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl KafkaHarness {
    fn new() -> Self {
        init_logging();
        Self {
            cluster: MockCluster::new(1).expect("the mock cluster starts"),
        }
    }
}

impl Harness for KafkaHarness {
    fn transport(&self) -> &'static str {
        "kafka"
    }

    fn app(&self, id: &str) -> App {
        let app = App::new(id);
        let url = format!("kafka://{}", self.cluster.bootstrap_servers());
        app.configure(|s| {
            s.broker = url;
            s.topic_partitions = PARTITIONS;
            s.kafka
                .insert("session.timeout.ms".into(), SESSION_TIMEOUT_MS.into());
            s.kafka
                .insert("heartbeat.interval.ms".into(), HEARTBEAT_MS.into());
        });
        app
    }

    fn shared_app(&self, id: &str) -> App {
        self.app(id)
    }
}

scenario_tests! {
    KafkaHarness::new();
    keyed_sends_keep_per_key_order_in_kafkas_partition,
    group_by_routes_each_key_to_one_repartition_partition_once_and_in_order,
    ask_cast_and_reply_to_deliver_each_result_where_asked,
    map_and_join_return_every_reply_and_join_keeps_input_order,
    ask_without_a_reply_fails_with_ask_timeout,
    every_sink_kind_receives_every_yielded_value,
    concurrent_actors_process_every_event_exactly_once,
    failing_agents_skip_the_bad_event_and_process_the_rest,
    undecodable_messages_are_skipped_counted_and_committed_past,
    shutdown_commits_everything_and_a_restarted_app_resumes_from_it,
    through_keeps_the_key_and_repartitions,
    echo_copies_every_value_to_each_topic_and_passes_it_on,
}

async fn discard(mut stream: Stream<u64>) {
    while stream.next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_start_naming_the_address_in_bounded_time() {
    init_logging();
    // A port nobody listens on: bound, then closed.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let app = App::new("dead-broker");
    app.configure(|s| s.broker = format!("kafka://{address}"));
    let topic = app
        .topic("events")
        .partitions(PARTITIONS)
        .value_type::<u64>();
    app.agent(discard).named("discard").channel(&topic);

    // rill gives up connecting after 10 s.
    let err = within(
        Duration::from_secs(30),
        "start against a dead broker to fail",
        app.start(),
    )
    .await
    .expect_err("start succeeded without a broker");
    let text = err.to_string();
    assert!(
        text.contains(&address.to_string()),
        "the error does not name the broker {address}: {text}"
    );
    assert!(
        matches!(err, Error::Transport(_)),
        "not a transport error: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_with_another_partition_count_fails_start() {
    let h = KafkaHarness::new();
    h.cluster
        .create_topic("events", 2, 1)
        .expect("the mock cluster creates the topic");
    let app = h.app("mismatch");
    let topic = app
        .topic("events")
        .partitions(PARTITIONS)
        .value_type::<u64>();
    app.agent(discard).named("discard").channel(&topic);

    let err = within(
        Duration::from_secs(30),
        "start against a mismatched topic to fail",
        app.start(),
    )
    .await
    .expect_err("start accepted a topic with 2 partitions for one declared with 4");
    match &err {
        Error::Transport(TransportError::PartitionMismatch {
            topic,
            declared,
            actual,
        }) => {
            assert_eq!(topic, "events");
            assert_eq!(*declared, PARTITIONS);
            assert_eq!(*actual, 2);
        }
        other => panic!("expected PartitionMismatch, got {other:?}"),
    }
    let text = err.to_string();
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).collect();
    assert!(
        ["events", "2", "4"].iter().all(|w| words.contains(w)),
        "the message names the topic and both counts: {text}"
    );
}
