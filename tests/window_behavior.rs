//! Windowed tables on the embedded transport, checked with virtual time: event times come from
//! a field of the events or from a clock the test sets, never from sleeping. Tumbling and
//! hopping windows count exactly per window; `value()`, `current()`, `now()` and `delta()`
//! read the windows Faust's accessors read; expired windows leave the table, get tombstones
//! in the changelog and do not come back on restart.

mod common;

use common::{read_all, wait_until, wait_until_state, Recorder, WAIT};
use rill::prelude::*;
use rill::table::{WindowRange, WindowedTable};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A realistic time (milliseconds since the epoch), a multiple of every window size used.
const T0: i64 = 1_700_000_040_000;
const SEC: i64 = 1000;

#[derive(Serialize, Deserialize, Clone, Debug)]
struct View {
    page: String,
    /// When the view happened, in milliseconds since the epoch.
    at: i64,
}

/// What the agent saw after each update: page, event time, `value()` and windows changed.
type Seen = (String, i64, i64, usize);

/// An app counting page views (keyed by page, so each page's views stay in order) into a
/// windowed table.
struct Views {
    app: App,
    views: Topic<String, View>,
    table: WindowedTable<String, i64>,
    seen: Recorder<Seen>,
}

fn views_app(
    id: &str,
    broker: &str,
    partitions: u32,
    make: impl FnOnce(Table<(String, i64), i64>) -> WindowedTable<String, i64>,
) -> Views {
    let app = App::new(id);
    let broker = broker.to_owned();
    app.configure(|s| {
        s.broker = broker;
        s.topic_partitions = partitions;
        s.commit_interval = Duration::from_millis(20);
    });
    let views = app.topic("views").key_type::<String>().value_type::<View>();
    let table = make(app.table::<(String, i64), i64>("views"));
    let seen = Recorder::new();
    let (t, rec) = (table.clone(), seen.clone());
    app.agent(move |mut views: Stream<View, String>| {
        let (table, seen) = (t.clone(), rec.clone());
        async move {
            while let Some(view) = views.next().await {
                let changed = table.update(view.page.clone(), |n| *n += 1);
                let value = table.get(&view.page).value();
                seen.push((view.page, view.at, value, changed));
            }
        }
    })
    .named("count_views")
    .channel(&views);
    Views {
        app,
        views,
        table,
        seen,
    }
}

impl Views {
    async fn send(&self, page: &str, at: i64) {
        let view = View {
            page: page.to_owned(),
            at,
        };
        self.views
            .send(view)
            .key(page.to_owned())
            .await
            .expect("send");
    }

    async fn wait_seen(&self, n: usize) {
        let seen = self.seen.clone();
        wait_until(WAIT, &format!("{n} views are counted"), || seen.len() >= n).await;
    }

    /// What the agent saw for `page`, in order: (event time, `value()`, windows changed).
    fn seen_for(&self, page: &str) -> Vec<(i64, i64, usize)> {
        self.seen
            .snapshot()
            .into_iter()
            .filter(|(p, ..)| p == page)
            .map(|(_, at, value, changed)| (at, value, changed))
            .collect()
    }
}

/// Start of each window, per page, with its count.
fn snapshot(t: &WindowedTable<String, i64>) -> BTreeMap<(String, i64), i64> {
    t.items()
        .into_iter()
        .map(|(page, range, n)| {
            assert_eq!(range, t.window().range(range.start), "window of {page}");
            ((page, range.start), n)
        })
        .collect()
}

fn windows(entries: &[(&str, i64, i64)]) -> BTreeMap<(String, i64), i64> {
    entries
        .iter()
        .map(|&(page, start, n)| ((page.to_owned(), start), n))
        .collect()
}

async fn wait_for_windows(t: &WindowedTable<String, i64>, want: &BTreeMap<(String, i64), i64>) {
    wait_until_state(WAIT, "the window counts", || snapshot(t), |got| got == want).await;
}

/// Every changelog record in order: key `(page, window start)` and count (`None`: tombstone).
fn changelog(app: &App) -> Vec<((String, i64), Option<i64>)> {
    read_all(app, &format!("{}-views-changelog", app.id()))
        .into_iter()
        .map(|m| {
            let key = serde_json::from_slice(m.key.as_deref().expect("changelog key"))
                .expect("changelog key is [page, start]");
            let value = m
                .value
                .as_deref()
                .map(|v| serde_json::from_slice(v).expect("changelog value"));
            (key, value)
        })
        .collect()
}

/// The last changelog record of each key (what a compacted changelog keeps), tombstones
/// dropped.
fn compacted(app: &App) -> BTreeMap<(String, i64), i64> {
    let mut last = BTreeMap::new();
    for (key, value) in changelog(app) {
        match value {
            Some(v) => last.insert(key, v),
            None => last.remove(&key),
        };
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tumbling_windows_count_each_event_once_in_its_window() {
    let v = views_app("win-tumbling", "memory://", 4, |t| {
        t.tumbling(Duration::from_secs(10), None)
            .relative_to_field(|v: &View| v.at)
    });
    let worker = v.app.start().await.expect("start");
    let events = [
        ("a", T0 + SEC),
        ("a", T0 + 5 * SEC),
        ("b", T0 + 3 * SEC),
        ("a", T0 + 10 * SEC - 1),
        ("a", T0 + 10 * SEC),
        ("a", T0 + 15 * SEC),
        ("a", T0 + 25 * SEC),
        ("b", T0 + 40 * SEC),
    ];
    for (page, at) in events {
        v.send(page, at).await;
    }
    let want = windows(&[
        ("a", T0, 3),
        ("a", T0 + 10 * SEC, 2),
        ("a", T0 + 20 * SEC, 1),
        ("b", T0, 1),
        ("b", T0 + 40 * SEC, 1),
    ]);
    wait_for_windows(&v.table, &want).await;
    v.wait_seen(events.len()).await;

    // After each update, value() is the count so far in the event's window; one window each.
    assert_eq!(
        v.seen_for("a"),
        vec![
            (T0 + SEC, 1, 1),
            (T0 + 5 * SEC, 2, 1),
            (T0 + 10 * SEC - 1, 3, 1),
            (T0 + 10 * SEC, 1, 1),
            (T0 + 15 * SEC, 2, 1),
            (T0 + 25 * SEC, 1, 1),
        ]
    );
    assert_eq!(
        v.seen_for("b"),
        vec![(T0 + 3 * SEC, 1, 1), (T0 + 40 * SEC, 1, 1)]
    );

    let a = v.table.get(&"a".to_owned());
    assert_eq!(a.at(T0), 3);
    assert_eq!(a.at(T0 + 19_999), 2);
    assert_eq!(a.at(T0 + 30 * SEC), 0, "an empty window reads the default");
    let range = WindowRange {
        start: T0 + 20 * SEC,
        end: T0 + 30 * SEC,
    };
    assert_eq!(v.table.get_range(&"a".to_owned(), range), Some(1));
    assert_eq!(v.table.get_range(&"b".to_owned(), range), None);
    assert_eq!(v.table.len(), 5);
    worker.shutdown().await.expect("stop");

    // The changelog holds the windows under the keys [page, window start].
    assert_eq!(compacted(&v.app), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopping_windows_count_each_event_in_size_over_step_windows() {
    let v = views_app("win-hopping", "memory://", 4, |t| {
        t.hopping(Duration::from_secs(10), Duration::from_secs(5), None)
            .relative_to_field(|v: &View| v.at)
    });
    let worker = v.app.start().await.expect("start");
    for at in [T0 + SEC, T0 + 6 * SEC, T0 + 12 * SEC, T0 + 14 * SEC] {
        v.send("a", at).await;
    }
    // [T0-5s, T0+5s) holds 1 s; [T0, T0+10s) 1 s and 6 s; [T0+5s, T0+15s) 6, 12 and 14 s;
    // [T0+10s, T0+20s) 12 and 14 s.
    let want = windows(&[
        ("a", T0 - 5 * SEC, 1),
        ("a", T0, 2),
        ("a", T0 + 5 * SEC, 3),
        ("a", T0 + 10 * SEC, 2),
    ]);
    wait_for_windows(&v.table, &want).await;
    v.wait_seen(4).await;
    // Every event changes two windows; value() reads the newest window holding the event.
    assert_eq!(
        v.seen_for("a"),
        vec![
            (T0 + SEC, 1, 2),
            (T0 + 6 * SEC, 1, 2),
            (T0 + 12 * SEC, 1, 2),
            (T0 + 14 * SEC, 2, 2),
        ]
    );
    assert_eq!(v.table.get(&"a".to_owned()).at(T0 + 7 * SEC), 3);
    worker.shutdown().await.expect("stop");
    assert_eq!(compacted(&v.app), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopping_counts_match_a_brute_force_count() {
    let (size, step) = (30 * SEC, 10 * SEC);
    let v = views_app("win-hopping-many", "memory://", 4, |t| {
        t.hopping(Duration::from_secs(30), Duration::from_secs(10), None)
            .relative_to_field(|v: &View| v.at)
    });
    let worker = v.app.start().await.expect("start");
    // Pseudo-random pages and times over five minutes, out of order.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut events = Vec::new();
    for _ in 0..300 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let page = ["a", "b", "c"][(x >> 60) as usize % 3];
        let at = T0 + ((x >> 20) % 300_000) as i64;
        events.push((page, at));
    }
    for &(page, at) in &events {
        v.send(page, at).await;
    }
    // Count every event in every window [s, s + size) holding it, s a multiple of step.
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for &(page, at) in &events {
        let mut s = at - at % step - size;
        while s <= at {
            if s <= at && at < s + size {
                *want.entry((page.to_owned(), s)).or_default() += 1;
            }
            s += step;
        }
    }
    wait_for_windows(&v.table, &want).await;
    v.wait_seen(events.len()).await;
    assert!(v.seen.snapshot().iter().all(|(.., changed)| *changed == 3));
    assert_eq!(want.values().sum::<i64>(), 3 * events.len() as i64);
    worker.shutdown().await.expect("stop");
    assert_eq!(compacted(&v.app), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_windows_leave_the_table_and_the_changelog() {
    // One partition, so every event moves the same stream time.
    let make = |t: Table<(String, i64), i64>| {
        t.tumbling(Duration::from_secs(10), Duration::from_secs(20))
            .relative_to_field(|v: &View| v.at)
    };
    let v = views_app("win-expiry", "memory://win-expiry", 1, make);
    let worker = v.app.start().await.expect("start");
    v.send("a", T0 + SEC).await;
    v.send("b", T0 + 12 * SEC).await;
    let both = windows(&[("a", T0, 1), ("b", T0 + 10 * SEC, 1)]);
    wait_for_windows(&v.table, &both).await;
    wait_until_state(
        WAIT,
        "the changelog has both windows",
        || compacted(&v.app),
        |c| c == &both,
    )
    .await;

    // Stream time T0+30s is 20 s after the end of [T0, T0+10s): that window expires, while
    // [T0+10s, T0+20s) has 10 s to go.
    v.send("c", T0 + 30 * SEC).await;
    let after = windows(&[("b", T0 + 10 * SEC, 1), ("c", T0 + 30 * SEC, 1)]);
    wait_for_windows(&v.table, &after).await;
    assert_eq!(v.table.get(&"a".to_owned()).at(T0 + SEC), 0);

    // A late event for the expired window is dropped instead of opening it again.
    v.send("a", T0 + 2 * SEC).await;
    v.wait_seen(4).await;
    assert_eq!(
        v.seen_for("a"),
        vec![(T0 + SEC, 1, 1), (T0 + 2 * SEC, 0, 0)]
    );
    assert_eq!(snapshot(&v.table), after);

    // The next commit writes the expired window's tombstone.
    let a_window = ("a".to_owned(), T0);
    wait_until_state(
        WAIT,
        "the changelog has the expired window's tombstone",
        || changelog(&v.app),
        |records| {
            records
                .iter()
                .rev()
                .find(|(k, _)| k == &a_window)
                .is_some_and(|(_, value)| value.is_none())
        },
    )
    .await;
    let records = changelog(&v.app);
    assert_eq!(
        records
            .iter()
            .filter(|(k, _)| k == &a_window)
            .map(|(_, value)| *value)
            .collect::<Vec<_>>(),
        vec![Some(1), None],
        "the window's count, then its tombstone"
    );
    assert_eq!(compacted(&v.app), after);
    worker.shutdown().await.expect("stop");

    // A new process restores the table from the changelog without the expired window.
    let v = views_app("win-expiry", "memory://win-expiry", 1, make);
    let worker = v.app.start().await.expect("restart");
    wait_for_windows(&v.table, &after).await;
    assert!(worker.table_records_replayed("views") > 0);
    // The restarted worker expires what it restored as its stream time moves: T0+41s is 21 s
    // past the end of [T0+10s, T0+20s).
    v.send("c", T0 + 41 * SEC).await;
    wait_for_windows(
        &v.table,
        &windows(&[("c", T0 + 30 * SEC, 1), ("c", T0 + 40 * SEC, 1)]),
    )
    .await;
    worker.shutdown().await.expect("stop");
    assert_eq!(
        compacted(&v.app),
        windows(&[("c", T0 + 30 * SEC, 1), ("c", T0 + 40 * SEC, 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_and_relative_to_now_read_the_tables_clock() {
    let clock = Arc::new(AtomicI64::new(T0 + SEC));
    let c = clock.clone();
    let v = views_app("win-now", "memory://", 1, move |t| {
        t.tumbling(Duration::from_secs(10), Duration::from_secs(30))
            .relative_to_now()
            .clock(move || c.load(Ordering::SeqCst))
    });
    let worker = v.app.start().await.expect("start");
    // Event times are the clock's, whatever the events say.
    v.send("a", 0).await;
    v.wait_seen(1).await;
    clock.store(T0 + 12 * SEC, Ordering::SeqCst);
    v.send("a", 0).await;
    v.send("a", 0).await;
    v.wait_seen(3).await;
    assert_eq!(
        snapshot(&v.table),
        windows(&[("a", T0, 1), ("a", T0 + 10 * SEC, 2)])
    );
    assert_eq!(v.seen_for("a"), vec![(0, 1, 1), (0, 1, 1), (0, 2, 1)]);

    let a = v.table.get(&"a".to_owned());
    assert_eq!(a.now(), 2, "the clock's window");
    assert_eq!(a.value(), 2, "relative to now");
    clock.store(T0 + 25 * SEC, Ordering::SeqCst);
    assert_eq!(a.now(), 0, "no views in [T0+20s, T0+30s)");
    assert_eq!(a.at(T0), 1);

    // The clock is stream time too: at T0+45s, [T0, T0+10s) is 35 s past its end and
    // expires; [T0+10s, T0+20s) is 25 s past its end and stays.
    clock.store(T0 + 45 * SEC, Ordering::SeqCst);
    v.send("a", 0).await;
    wait_for_windows(
        &v.table,
        &windows(&[("a", T0 + 10 * SEC, 2), ("a", T0 + 40 * SEC, 1)]),
    )
    .await;
    worker.shutdown().await.expect("stop");
}

/// Faust's `WindowSet.now()` reads the earliest hopping window holding the clock
/// (`window.earliest(now)`), while `value()` and `at(t)` read the newest (`window.current(t)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_reads_the_earliest_hopping_window_holding_the_clock() {
    let clock = Arc::new(AtomicI64::new(T0 + 2 * SEC));
    let c = clock.clone();
    let v = views_app("win-now-hopping", "memory://", 1, move |t| {
        t.hopping(Duration::from_secs(10), Duration::from_secs(5), None)
            .relative_to_now()
            .clock(move || c.load(Ordering::SeqCst))
    });
    let worker = v.app.start().await.expect("start");
    // At T0+2s: counted in [T0-5s, T0+5s) and [T0, T0+10s).
    v.send("a", 0).await;
    v.wait_seen(1).await;
    // At T0+7s: counted in [T0, T0+10s) and [T0+5s, T0+15s).
    clock.store(T0 + 7 * SEC, Ordering::SeqCst);
    v.send("a", 0).await;
    v.wait_seen(2).await;
    assert_eq!(
        snapshot(&v.table),
        windows(&[("a", T0 - 5 * SEC, 1), ("a", T0, 2), ("a", T0 + 5 * SEC, 1)])
    );
    let a = v.table.get(&"a".to_owned());
    assert_eq!(
        a.now(),
        2,
        "the earliest window holding T0+7s is [T0, T0+10s)"
    );
    assert_eq!(a.value(), 1, "value() reads the newest, [T0+5s, T0+15s)");
    assert_eq!(a.at(T0 + 7 * SEC), 1);
    // At T0+12s the earliest window holding the clock is [T0+5s, T0+15s).
    clock.store(T0 + 12 * SEC, Ordering::SeqCst);
    assert_eq!(a.now(), 1);
    worker.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_and_delta_read_the_windows_of_the_message_timestamp() {
    // Windows of 2 ms relative to the messages' own timestamps (set by the broker when they
    // are sent): the checks are computed from the timestamps the agent saw.
    let app = App::new("win-stream");
    app.configure(|s| s.topic_partitions = 2);
    let views = app.topic("views").key_type::<String>().value_type::<View>();
    let table = app
        .table::<(String, i64), i64>("views")
        .tumbling(Duration::from_millis(2), None);
    // (message timestamp, value(), current(), delta(2 ms), delta(4 ms))
    let seen: Recorder<(i64, i64, i64, i64, i64)> = Recorder::new();
    let (t, rec) = (table.clone(), seen.clone());
    app.agent(move |views: Stream<View, String>| {
        let (table, seen) = (t.clone(), rec.clone());
        async move {
            let mut events = views.events();
            while let Some(event) = events.next().await {
                table.update(event.value.page.clone(), |n| *n += 1);
                let w = table.get(&event.value.page);
                seen.push((
                    event.timestamp(),
                    w.value(),
                    w.current(),
                    w.delta(Duration::from_millis(2)),
                    w.delta(Duration::from_millis(4)),
                ));
            }
        }
    })
    .named("count_views")
    .channel(&views);
    let worker = app.start().await.expect("start");
    for _ in 0..60 {
        let view = View {
            page: "a".to_owned(),
            at: 0,
        };
        views.send(view).key("a".to_owned()).await.expect("send");
    }
    let s = seen.clone();
    wait_until(WAIT, "60 views are counted", || s.len() >= 60).await;

    let seen = seen.snapshot();
    let window = |ts: i64| ts.div_euclid(2);
    for (i, &(ts, value, current, delta2, delta4)) in seen.iter().enumerate() {
        let count_in = |w: i64| seen[..=i].iter().filter(|e| window(e.0) == w).count() as i64;
        assert_eq!(current, count_in(window(ts)), "current() of event {i}");
        assert_eq!(
            value, current,
            "value() of event {i} is relative to the stream"
        );
        assert_eq!(delta2, count_in(window(ts) - 1), "delta(2 ms) of event {i}");
        assert_eq!(delta4, count_in(window(ts) - 2), "delta(4 ms) of event {i}");
    }
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for &(ts, ..) in &seen {
        *want.entry(("a".to_owned(), window(ts) * 2)).or_default() += 1;
    }
    assert_eq!(snapshot(&table), want);
    worker.shutdown().await.expect("stop");
}
