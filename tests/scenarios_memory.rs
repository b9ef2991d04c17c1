//! The transport-dependent scenarios (`tests/scenarios/mod.rs`) on the embedded transport.

mod common;
mod scenarios;

use rill::App;
use scenarios::{init_logging, scenario_tests, Harness, PARTITIONS};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Apps on `memory://`: each app its own embedded broker, except `shared_app`s, which share one
/// named broker per harness.
struct MemoryHarness {
    shared: String,
}

impl MemoryHarness {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        init_logging();
        Self {
            shared: format!(
                "memory://scenarios-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }
}

impl Harness for MemoryHarness {
    fn transport(&self) -> &'static str {
        "memory"
    }

    fn app(&self, id: &str) -> App {
        let app = App::new(id);
        app.configure(|s| s.topic_partitions = PARTITIONS);
        app
    }

    fn shared_app(&self, id: &str) -> App {
        let app = self.app(id);
        let url = self.shared.clone();
        app.configure(|s| s.broker = url);
        app
    }
}

scenario_tests! {
    MemoryHarness::new();
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
