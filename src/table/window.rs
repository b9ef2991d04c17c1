//! Windowed tables: values kept per key *and* per time window, Faust's
//! `app.Table(...).tumbling(...)` and `.hopping(...)`.
//!
//! A windowed table counts (or sums, or collects) per window of time: "views of each page per
//! minute", "errors per host in the last 10 minutes, every minute". Declare a table keyed by
//! `(K, i64)` (the key and the start of a window) and make it windowed:
//!
//! - [`tumbling(size, expires)`](Table::tumbling): fixed-size windows that do not overlap
//!   (`[0, size)`, `[size, 2·size)`, ...), so every event lands in exactly one window.
//! - [`hopping(size, step, expires)`](Table::hopping): windows of `size` starting every `step`
//!   (`[0, size)`, `[step, step + size)`, ...), so an event lands in `size / step` windows.
//!
//! Windows are aligned on the Unix epoch and times are milliseconds since the epoch, like
//! message timestamps. A window holds the times `start <= t < end`.
//!
//! # Writing
//!
//! [`WindowedTable::update`] changes the value of a key in every window that holds the event's
//! time (Faust's `table[key] += 1`); missing values start from the table's default value.
//! Which time is the event's is the table's *time relativity*:
//!
//! - [`relative_to_stream`](WindowedTable::relative_to_stream) (the default): the timestamp
//!   of the message the agent is processing.
//! - [`relative_to_field`](WindowedTable::relative_to_field): a field of the message's value,
//!   e.g. the time a page view happened rather than the time it reached Kafka.
//! - [`relative_to_now`](WindowedTable::relative_to_now): the wall clock at the write.
//!
//! [`update_at`](WindowedTable::update_at) gives the time explicitly. Outside an agent there is
//! no current event, and the stream and field relativities use the wall clock.
//!
//! # Reading
//!
//! [`WindowedTable::get`] returns the [`WindowSet`] of a key (Faust's `table[key]`), whose
//! accessors each read one window, the default value if the window has none:
//!
//! | accessor | window holding |
//! |---|---|
//! | [`value()`](WindowSet::value) | the current event's time by the table's relativity |
//! | [`current()`](WindowSet::current) | the current event's message timestamp (stream time) |
//! | [`now()`](WindowSet::now) | the wall clock now |
//! | [`delta(d)`](WindowSet::delta) | the current event's message timestamp minus `d` |
//! | [`at(t)`](WindowSet::at) | the time `t` |
//!
//! With hopping windows several windows hold a time. As Faust's `WindowSet` does,
//! [`now()`](WindowSet::now) reads the *earliest* of them (the one that started first, the
//! longest-running window holding the clock: Faust's `window.earliest(now)`), while
//! [`value()`](WindowSet::value), [`current()`](WindowSet::current),
//! [`delta(d)`](WindowSet::delta) and [`at(t)`](WindowSet::at) read the *newest* (the one
//! that started last: Faust's `window.current(t)`). With tumbling windows both are the one
//! window holding the time. [`WindowedTable::items`] lists every window held.
//!
//! The wall clock is the system clock unless [`clock`](WindowedTable::clock) gives another
//! (a virtual one in tests).
//!
//! # Expiry
//!
//! Without `expires`, windows are kept forever. With it, a window is removed once the
//! partition's *stream time* — the latest event time written to that partition of the table —
//! reaches the window's end plus `expires`: a window is kept for `expires` after it closes, to
//! be read and to take late events. A removed window is deleted from the table and gets a
//! tombstone in the changelog at the next commit (so it is gone from the compacted changelog
//! and from persistent stores too); events later than that are dropped rather than opening the
//! window again. Removal happens as writes advance stream time, when it crosses a window
//! boundary, so a partition that receives no events keeps its windows.
//!
//! # Storage
//!
//! The windows are entries of an ordinary [`Table`] keyed by `(key, window start)`: the
//! changelog topic is `<app id>-<table>-changelog` with JSON keys `[key, start]` (the worker's
//! web server looks a window up by that key too), and they are partitioned, committed and
//! restored like any table's. As with any table, the stream that writes it must be
//! partitioned by the key (keyed messages, or [`group_by`](crate::Stream::group_by)), so that
//! all the events of a key update the same table partition.
//!
//! # Example
//!
//! ```
//! # use rill::prelude::*;
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize, Clone)]
//! struct PageView { page: String, at_ms: i64 }
//!
//! # #[tokio::main] async fn main() -> rill::Result<()> {
//! let app = App::new("page-views-doc");
//! // Keyed by page: a page's views reach one partition, which holds the page's windows.
//! let views = app.topic("page_views").key_type::<String>().value_type::<PageView>();
//! // Views per page per minute, kept for an hour after the minute ends.
//! let per_minute = app
//!     .table::<(String, i64), i64>("views_per_minute")
//!     .tumbling(Duration::from_secs(60), Duration::from_secs(3600))
//!     .relative_to_field(|v: &PageView| v.at_ms);
//! let table = per_minute.clone();
//! app.agent(move |mut views: Stream<PageView, String>| {
//!     let per_minute = table.clone();
//!     async move {
//!         while let Some(view) = views.next().await {
//!             per_minute.update(view.page.clone(), |n| *n += 1);
//!             let this_minute = per_minute.get(&view.page).value();
//!             let minute_before = per_minute.get(&view.page).at(view.at_ms - 60_000);
//!             println!("{}: {this_minute} views this minute, {minute_before} before", view.page);
//!         }
//!     }
//! })
//! .named("count_views")
//! .channel(&views);
//!
//! let worker = app.start().await?;
//! for at_ms in [60_000, 61_000, 125_000] {
//!     let view = PageView { page: "/home".into(), at_ms };
//!     views.send(view).key("/home".into()).await?;
//! }
//! # let deadline = std::time::Instant::now() + Duration::from_secs(30);
//! # let home = "/home".to_owned();
//! # while per_minute.get(&home).at(60_000) + per_minute.get(&home).at(125_000) < 3 {
//! #     assert!(std::time::Instant::now() < deadline, "the views were not counted");
//! #     tokio::time::sleep(Duration::from_millis(5)).await;
//! # }
//! let home = per_minute.get(&"/home".to_owned());
//! assert_eq!(home.at(60_000), 2); // the minute [60 s, 120 s)
//! assert_eq!(home.at(125_000), 1); // the minute [120 s, 180 s)
//! assert_eq!(home.at(0), 0); // no views in the first minute
//! worker.shutdown().await?;
//! # Ok(()) }
//! ```

use super::{Table, TableKey, TableValue, ACTOR};
use crate::engine::WorkerRef;
use crate::transport::Message;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whole milliseconds in `d`, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn duration(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The system clock, in milliseconds since the Unix epoch.
fn system_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// How a windowed table cuts time into windows: their size, how far apart they start, and how
/// long they are kept after they end. Times are milliseconds since the Unix epoch, and windows
/// are aligned on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    size: i64,
    step: i64,
    expires: Option<i64>,
}

impl Window {
    /// Tumbling windows: `size` long, one after the other, so every time is in one window.
    /// See [`hopping`](Window::hopping) for `expires`.
    ///
    /// # Panics
    ///
    /// If `size` is shorter than a millisecond.
    pub fn tumbling(size: Duration, expires: impl Into<Option<Duration>>) -> Self {
        Self::hopping(size, size, expires)
    }

    /// Hopping windows: `size` long, one starting every `step`, so every time is in about
    /// `size / step` windows. A window is removed `expires` after it ends (in stream time);
    /// `None` keeps windows forever.
    ///
    /// # Panics
    ///
    /// If `size` is shorter than a millisecond, or `step` is shorter than a millisecond or
    /// longer than `size` (there would be times in no window).
    pub fn hopping(size: Duration, step: Duration, expires: impl Into<Option<Duration>>) -> Self {
        let (size_ms, step_ms) = (millis(size), millis(step));
        assert!(
            size_ms > 0,
            "a window must be at least 1 ms long (size {size:?})"
        );
        assert!(
            step_ms > 0 && step_ms <= size_ms,
            "a hopping window's step must be at least 1 ms and at most its size \
             (size {size:?}, step {step:?})"
        );
        Self {
            size: size_ms,
            step: step_ms,
            expires: expires.into().map(millis),
        }
    }

    /// How long a window is.
    pub fn size(&self) -> Duration {
        duration(self.size)
    }

    /// How far apart windows start (the size, for tumbling windows).
    pub fn step(&self) -> Duration {
        duration(self.step)
    }

    /// How long a window is kept after it ends, if it expires.
    pub fn expires(&self) -> Option<Duration> {
        self.expires.map(duration)
    }

    /// Whether the windows overlap (hopping rather than tumbling).
    pub fn is_hopping(&self) -> bool {
        self.step < self.size
    }

    /// The window starting at `start`.
    pub fn range(&self, start: i64) -> WindowRange {
        WindowRange {
            start,
            end: start.saturating_add(self.size),
        }
    }

    /// Start of the newest window holding `timestamp`.
    fn newest_start(&self, timestamp: i64) -> i64 {
        timestamp.saturating_sub(timestamp.rem_euclid(self.step))
    }

    /// Every window holding `timestamp`, oldest first: one for tumbling windows.
    pub fn ranges(&self, timestamp: i64) -> Vec<WindowRange> {
        let mut ranges = Vec::with_capacity(((self.size / self.step) as usize + 1).min(1024));
        let mut start = Some(self.newest_start(timestamp));
        while let Some(s) = start {
            let range = self.range(s);
            if !range.contains(timestamp) {
                break;
            }
            ranges.push(range);
            start = s.checked_sub(self.step);
        }
        ranges.reverse();
        ranges
    }

    /// The earliest window holding `timestamp` (the one that started first), Faust's
    /// `window.earliest(timestamp)`: the first of [`ranges`](Window::ranges).
    ///
    /// ```
    /// use rill::table::Window;
    /// use std::time::Duration;
    ///
    /// let w = Window::hopping(Duration::from_secs(10), Duration::from_secs(5), None);
    /// assert_eq!(w.earliest(12_000), w.range(5_000));
    /// assert_eq!(w.current(12_000), w.range(10_000));
    /// ```
    pub fn earliest(&self, timestamp: i64) -> WindowRange {
        // The first window start after `timestamp - size`: that window still holds it.
        let start = self
            .newest_start(timestamp.saturating_sub(self.size))
            .saturating_add(self.step)
            .min(self.newest_start(timestamp));
        self.range(start)
    }

    /// The newest window holding `timestamp` (the one that started last), Faust's
    /// `window.current(timestamp)`.
    pub fn current(&self, timestamp: i64) -> WindowRange {
        self.range(self.newest_start(timestamp))
    }

    /// The newest window holding `timestamp - d`, Faust's `window.delta(timestamp, d)`.
    pub fn delta(&self, timestamp: i64, d: Duration) -> WindowRange {
        self.current(timestamp.saturating_sub(millis(d)))
    }

    /// Whether `range` has expired once stream time is `stream_time`: it ended `expires` ago
    /// or earlier.
    pub fn is_expired(&self, range: &WindowRange, stream_time: i64) -> bool {
        self.expires
            .is_some_and(|e| range.end.saturating_add(e) <= stream_time)
    }
}

/// A window: the times `start <= t < end`, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowRange {
    /// First time in the window.
    pub start: i64,
    /// First time after the window.
    pub end: i64,
}

impl WindowRange {
    /// Whether `timestamp` is in the window.
    pub fn contains(&self, timestamp: i64) -> bool {
        self.start <= timestamp && timestamp < self.end
    }
}

/// Reads the time of an event from its message.
type FieldFn = Arc<dyn Fn(&Message) -> Result<i64, String> + Send + Sync>;

/// Which time an event has, for writes and [`WindowSet::value`].
#[derive(Clone)]
enum RelativeTo {
    /// The message timestamp.
    Stream,
    /// The wall clock.
    Now,
    /// A field of the message value.
    Field(FieldFn),
}

impl fmt::Debug for RelativeTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelativeTo::Stream => "stream",
            RelativeTo::Now => "now",
            RelativeTo::Field(_) => "field",
        })
    }
}

/// Stream time of one table partition.
struct PartitionTime {
    /// The latest event time written to the partition.
    stream_time: i64,
    /// `limit.div_euclid(step)` at the last removal of expired windows, where windows starting
    /// at or before `limit` had expired: the removal runs again when it grows.
    swept: Option<i64>,
}

/// The stream times of the partitions, for the worker they were seen on.
#[derive(Default)]
struct Clocks {
    /// The worker whose events set these times: a new worker starts over, as its partitions
    /// were restored anew.
    worker: Option<WorkerRef>,
    partitions: HashMap<u32, PartitionTime>,
}

/// A table of values per key and time window, Faust's windowed table: made from a table keyed
/// by `(key, window start)` with [`Table::tumbling`] or [`Table::hopping`]. See the
/// [module documentation](self) for how windows are written, read and expired.
///
/// Clones share the table; the `relative_to_*` and [`clock`](WindowedTable::clock) settings
/// are per handle.
pub struct WindowedTable<K, V> {
    table: Table<(K, i64), V>,
    window: Window,
    relative_to: RelativeTo,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    clocks: Arc<Mutex<Clocks>>,
}

impl<K, V> Clone for WindowedTable<K, V> {
    /// A writable handle on the same table; an agent with `concurrency > 1` must take a
    /// [`reader`](WindowedTable::reader) instead (see [`TableReader`](super::TableReader)).
    fn clone(&self) -> Self {
        super::note_writable_clone(&self.table.inner.name);
        self.share()
    }
}

impl<K, V> WindowedTable<K, V> {
    /// Another handle, not counted as a writable clone.
    fn share(&self) -> Self {
        Self {
            table: self.table.share(),
            window: self.window,
            relative_to: self.relative_to.clone(),
            clock: self.clock.clone(),
            clocks: self.clocks.clone(),
        }
    }
}

impl<K, V> fmt::Debug for WindowedTable<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowedTable")
            .field("name", &self.table.inner.name)
            .field("window", &self.window)
            .field("relative_to", &self.relative_to)
            .finish()
    }
}

impl<K: TableKey, V: TableValue> Table<(K, i64), V> {
    /// Makes this table windowed with tumbling windows of `size` (Faust's
    /// `.tumbling(size, expires=...)`): each event counts in exactly one window. Windows are
    /// removed `expires` after they end (in stream time); `None` keeps them.
    ///
    /// ```
    /// # use rill::prelude::*;
    /// # use std::time::Duration;
    /// let app = App::new("tumbling-doc");
    /// let per_minute = app
    ///     .table::<(String, i64), i64>("views")
    ///     .tumbling(Duration::from_secs(60), Duration::from_secs(3600));
    /// ```
    ///
    /// # Panics
    ///
    /// If `size` is shorter than a millisecond.
    pub fn tumbling(
        self,
        size: Duration,
        expires: impl Into<Option<Duration>>,
    ) -> WindowedTable<K, V> {
        WindowedTable::new(self, Window::tumbling(size, expires))
    }

    /// Makes this table windowed with hopping windows of `size` starting every `step`
    /// (Faust's `.hopping(size, step, expires=...)`): each event counts in the `size / step`
    /// windows that hold its time. Windows are removed `expires` after they end (in stream
    /// time); `None` keeps them.
    ///
    /// # Panics
    ///
    /// If `size` is shorter than a millisecond, or `step` is shorter than a millisecond or
    /// longer than `size`.
    pub fn hopping(
        self,
        size: Duration,
        step: Duration,
        expires: impl Into<Option<Duration>>,
    ) -> WindowedTable<K, V> {
        WindowedTable::new(self, Window::hopping(size, step, expires))
    }
}

/// The message the agent running here is processing.
fn current_event() -> Option<Arc<Message>> {
    ACTOR.try_with(|a| a.current()).ok().flatten()
}

impl<K: TableKey, V: TableValue> WindowedTable<K, V> {
    fn new(table: Table<(K, i64), V>, window: Window) -> Self {
        Self {
            table,
            window,
            relative_to: RelativeTo::Stream,
            clock: Arc::new(system_now),
            clocks: Arc::new(Mutex::new(Clocks::default())),
        }
    }

    /// Event time is the timestamp of the message being processed (the default; Faust's
    /// `relative_to_stream()`).
    pub fn relative_to_stream(mut self) -> Self {
        self.relative_to = RelativeTo::Stream;
        self
    }

    /// Event time is the wall clock (Faust's `relative_to_now()`).
    pub fn relative_to_now(mut self) -> Self {
        self.relative_to = RelativeTo::Now;
        self
    }

    /// Event time is read from the value of the message being processed (Faust's
    /// `relative_to_field(Model.field)`): `field` returns it in milliseconds since the Unix
    /// epoch. The value is decoded from the message as JSON (the default value codec) into
    /// `T`, the type the agent's topic carries; a message that does not decode falls back to
    /// its timestamp, with a warning.
    ///
    /// ```
    /// # use rill::prelude::*;
    /// # use std::time::Duration;
    /// #[derive(Serialize, Deserialize, Clone)]
    /// struct PageView { page: String, at_ms: i64 }
    ///
    /// let app = App::new("relative-to-field-doc");
    /// let per_minute = app
    ///     .table::<(String, i64), i64>("views")
    ///     .tumbling(Duration::from_secs(60), None)
    ///     .relative_to_field(|v: &PageView| v.at_ms);
    /// ```
    pub fn relative_to_field<T, F>(mut self, field: F) -> Self
    where
        T: DeserializeOwned + 'static,
        F: Fn(&T) -> i64 + Send + Sync + 'static,
    {
        self.relative_to = RelativeTo::Field(Arc::new(move |m: &Message| {
            let bytes = m.value.as_deref().unwrap_or(&[]);
            serde_json::from_slice::<T>(bytes)
                .map(|v| field(&v))
                .map_err(|e| e.to_string())
        }));
        self
    }

    /// Sets the wall clock that [`WindowSet::now`],
    /// [`relative_to_now`](WindowedTable::relative_to_now) and writes outside agents read, in
    /// milliseconds since the Unix epoch: by default the system clock. Tests give a virtual
    /// clock here.
    pub fn clock(mut self, now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(now);
        self
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        self.table.name()
    }

    /// The windows.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The table holding the windows, keyed by `(key, window start)`.
    pub fn table(&self) -> &Table<(K, i64), V> {
        &self.table
    }

    /// The wall clock now.
    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// The message timestamp of `event`, or the wall clock without an event.
    fn stream_time_of(&self, event: Option<&Message>) -> i64 {
        event.map_or_else(|| self.now(), |m| m.timestamp)
    }

    /// The time of `event` by the table's relativity.
    fn event_time(&self, event: Option<&Message>) -> i64 {
        match (&self.relative_to, event) {
            (RelativeTo::Now, _) | (_, None) => self.now(),
            (RelativeTo::Stream, Some(m)) => m.timestamp,
            (RelativeTo::Field(field), Some(m)) => match field(m) {
                Ok(t) => t,
                Err(error) => {
                    tracing::warn!(
                        table = %self.table.inner.name,
                        topic = %m.topic,
                        partition = m.partition,
                        offset = m.offset,
                        %error,
                        "cannot read the event time field; using the message timestamp"
                    );
                    m.timestamp
                }
            },
        }
    }

    /// Changes the value of `key` in every window holding the current event's time (by the
    /// table's relativity), starting from the default value where a window has none: Faust's
    /// `table[key] += 1` is `table.update(key, |n| *n += 1)`. Returns the number of windows
    /// changed: none when the event is so late that its windows have expired.
    pub fn update(&self, key: K, f: impl FnMut(&mut V)) -> usize {
        let event = current_event();
        let time = self.event_time(event.as_deref());
        self.update_at(key, time, f)
    }

    /// As [`update`](WindowedTable::update), for the time `timestamp` (milliseconds since the
    /// Unix epoch) instead of the event's.
    pub fn update_at(&self, key: K, timestamp: i64, mut f: impl FnMut(&mut V)) -> usize {
        let mut changed = 0;
        let mut seen: Option<(u32, Option<i64>)> = None;
        for range in self.window.ranges(timestamp) {
            let window_key = (key.clone(), range.start);
            let partition = self.table.write_partition(&window_key);
            let stream_time = match seen {
                Some((p, t)) if p == partition => t,
                _ => {
                    let t = self.advance(partition, timestamp);
                    seen = Some((partition, t));
                    t
                }
            };
            if stream_time.is_some_and(|t| self.window.is_expired(&range, t)) {
                continue;
            }
            self.table.update(window_key, &mut f);
            changed += 1;
        }
        changed
    }

    /// Moves the stream time of `partition` to `time` if that is later, removing the windows
    /// that expire; returns the stream time, if windows expire at all.
    fn advance(&self, partition: u32, time: i64) -> Option<i64> {
        let expires = self.window.expires?;
        let worker = self
            .table
            .inner
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|a| a.worker.worker());
        let (stream_time, sweep) = {
            let mut clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
            let same = match (&clocks.worker, &worker) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                clocks.partitions.clear();
                clocks.worker = worker;
            }
            let pt = clocks.partitions.entry(partition).or_insert(PartitionTime {
                stream_time: time,
                swept: None,
            });
            pt.stream_time = pt.stream_time.max(time);
            // Windows starting at or before `limit` end `expires` or more before stream time.
            let limit = pt
                .stream_time
                .saturating_sub(self.window.size)
                .saturating_sub(expires);
            // Window starts are multiples of the step, so the set of expired windows only
            // grows when `limit` reaches the next multiple.
            let bucket = limit.div_euclid(self.window.step);
            let sweep = pt.swept.is_none_or(|b| bucket > b);
            if sweep {
                pt.swept = Some(bucket);
            }
            (pt.stream_time, sweep.then_some(limit))
        };
        if let Some(limit) = sweep {
            self.remove_expired(partition, limit);
        }
        Some(stream_time)
    }

    /// Removes the windows of `partition` starting at or before `limit`; the changelog gets
    /// their tombstones at the next commit.
    fn remove_expired(&self, partition: u32, limit: i64) {
        let removed = self.table.with_parts(|parts| {
            let Some(part) = parts.get_mut(&partition) else {
                return 0;
            };
            let expired: Vec<(K, i64)> = part
                .data
                .keys()
                .filter(|(_, start)| *start <= limit)
                .cloned()
                .collect();
            for key in &expired {
                part.data.remove(key);
            }
            let n = expired.len();
            part.dirty.extend(expired);
            n
        });
        if removed > 0 {
            tracing::debug!(
                table = %self.table.inner.name,
                partition,
                removed,
                "expired windows removed"
            );
        }
    }

    /// The windows of `key` (Faust's `table[key]`), to read one of them with
    /// [`value`](WindowSet::value), [`current`](WindowSet::current),
    /// [`now`](WindowSet::now), [`delta`](WindowSet::delta) or [`at`](WindowSet::at). It
    /// reads relative to the event being processed when it was made.
    pub fn get(&self, key: &K) -> WindowSet<'_, K, V> {
        WindowSet {
            table: self,
            key: key.clone(),
            event: current_event(),
        }
    }

    /// The value of `key` in `range`, if the table has it (on this worker).
    pub fn get_range(&self, key: &K, range: WindowRange) -> Option<V> {
        self.table.get(&(key.clone(), range.start))
    }

    /// Every window this worker holds: key, window and value, in no particular order.
    pub fn items(&self) -> Vec<(K, WindowRange, V)> {
        self.table
            .items()
            .into_iter()
            .map(|((key, start), value)| (key, self.window.range(start), value))
            .collect()
    }

    /// Number of windows (of all keys) this worker holds.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether this worker holds no windows.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// A read-only handle, the only kind an agent with `concurrency > 1` may hold (as
    /// [`Table::reader`]); it reads with this handle's `relative_to_*` and clock settings.
    ///
    /// ```compile_fail
    /// # use rill::prelude::*;
    /// # use std::time::Duration;
    /// let app = App::new("windowed-reader-doc");
    /// let views = app
    ///     .table::<(String, i64), u64>("views")
    ///     .tumbling(Duration::from_secs(60), None)
    ///     .reader();
    /// views.update("home".to_owned(), |n| *n += 1); // no such method on a reader
    /// ```
    pub fn reader(&self) -> WindowedReader<K, V> {
        WindowedReader {
            table: self.share(),
        }
    }
}

/// A read-only handle on a [`WindowedTable`] ([`WindowedTable::reader`]): its reading
/// methods, no writing ones.
pub struct WindowedReader<K, V> {
    table: WindowedTable<K, V>,
}

impl<K, V> Clone for WindowedReader<K, V> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.share(),
        }
    }
}

impl<K, V> fmt::Debug for WindowedReader<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowedReader")
            .field("name", &self.table.table.inner.name)
            .field("window", &self.table.window)
            .finish()
    }
}

impl<K: TableKey, V: TableValue> WindowedReader<K, V> {
    /// The table's name.
    pub fn name(&self) -> &str {
        self.table.name()
    }

    /// The windows.
    pub fn window(&self) -> &Window {
        self.table.window()
    }

    /// The windows of `key`, as [`WindowedTable::get`].
    pub fn get(&self, key: &K) -> WindowSet<'_, K, V> {
        self.table.get(key)
    }

    /// The value of `key` in `range`, if the table has it (on this worker).
    pub fn get_range(&self, key: &K, range: WindowRange) -> Option<V> {
        self.table.get_range(key, range)
    }

    /// Every window this worker holds: key, window and value, in no particular order.
    pub fn items(&self) -> Vec<(K, WindowRange, V)> {
        self.table.items()
    }

    /// Number of windows (of all keys) this worker holds.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether this worker holds no windows.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The windows of one key of a [`WindowedTable`], Faust's `WindowSet`: each accessor reads
/// the value of one window, or the table's default value if the window has none. Made by
/// [`WindowedTable::get`], relative to the event being processed then.
pub struct WindowSet<'a, K, V> {
    table: &'a WindowedTable<K, V>,
    key: K,
    event: Option<Arc<Message>>,
}

impl<K, V> fmt::Debug for WindowSet<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowSet")
            .field("table", &self.table.table.inner.name)
            .field("event", &self.event.as_ref().map(|m| m.offset))
            .finish()
    }
}

impl<K: TableKey, V: TableValue> WindowSet<'_, K, V> {
    /// The key.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// The value in the window of the event's time by the table's relativity (stream, field
    /// or now): Faust's `table[key].value()`.
    pub fn value(&self) -> V {
        self.at(self.table.event_time(self.event.as_deref()))
    }

    /// The value in the window of the event's message timestamp (stream time), whatever the
    /// table's relativity: Faust's `table[key].current()`.
    pub fn current(&self) -> V {
        self.at(self.table.stream_time_of(self.event.as_deref()))
    }

    /// The value in the window of the wall clock now: Faust's `table[key].now()`. Of the
    /// hopping windows holding the clock, this reads the earliest (the one that started
    /// first, so it has counted the longest), as Faust does; the other accessors read the
    /// newest.
    pub fn now(&self) -> V {
        let range = self.table.window.earliest(self.table.now());
        self.table
            .get_range(&self.key, range)
            .unwrap_or_else(|| self.table.table.default())
    }

    /// The value in the window `d` before the event's message timestamp: Faust's
    /// `table[key].delta(d)`.
    pub fn delta(&self, d: Duration) -> V {
        let t = self.table.stream_time_of(self.event.as_deref());
        self.at(t.saturating_sub(millis(d)))
    }

    /// The value in the (newest) window holding `timestamp`, in milliseconds since the Unix
    /// epoch.
    pub fn at(&self, timestamp: i64) -> V {
        let range = self.table.window.current(timestamp);
        self.table
            .get_range(&self.key, range)
            .unwrap_or_else(|| self.table.table.default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    #[test]
    fn tumbling_ranges_hold_one_window() {
        let w = Window::tumbling(Duration::from_secs(10), None);
        assert_eq!(w.ranges(0), vec![w.range(0)]);
        assert_eq!(w.ranges(9_999), vec![w.range(0)]);
        assert_eq!(w.ranges(10 * S), vec![w.range(10 * S)]);
        assert_eq!(w.ranges(-1), vec![w.range(-10 * S)]);
        assert_eq!(
            w.current(15 * S),
            WindowRange {
                start: 10 * S,
                end: 20 * S
            }
        );
        assert_eq!(w.earliest(15 * S), w.current(15 * S));
        assert_eq!(w.delta(15 * S, Duration::from_secs(10)), w.range(0));
        assert!(!w.is_hopping());
    }

    #[test]
    fn hopping_ranges_hold_size_over_step_windows() {
        let w = Window::hopping(Duration::from_secs(10), Duration::from_secs(5), None);
        assert_eq!(w.ranges(12 * S), vec![w.range(5 * S), w.range(10 * S)]);
        assert_eq!(w.ranges(10 * S), vec![w.range(5 * S), w.range(10 * S)]);
        assert_eq!(w.current(12 * S), w.range(10 * S));
        assert_eq!(w.earliest(12 * S), w.range(5 * S));
        assert_eq!(w.earliest(10 * S), w.range(5 * S));
        assert_eq!(w.earliest(9_999), w.range(0));
        // A size that is not a multiple of the step.
        let w = Window::hopping(Duration::from_secs(10), Duration::from_secs(3), None);
        let starts: Vec<i64> = w.ranges(10 * S).iter().map(|r| r.start).collect();
        assert_eq!(starts, vec![3 * S, 6 * S, 9 * S]);
        assert!(w.ranges(10 * S).iter().all(|r| r.contains(10 * S)));
        for t in [-7 * S, -1, 0, 1, 10 * S, 11 * S, 12_345] {
            assert_eq!(w.earliest(t), w.ranges(t)[0], "at {t}");
        }
        assert!(w.is_hopping());
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let w = Window::hopping(Duration::from_millis(7), Duration::from_millis(3), None);
        assert!(!w.ranges(i64::MIN).is_empty());
        assert!(!w.ranges(i64::MAX / 2).is_empty());
        let _ = w.ranges(i64::MAX);
        let _ = w.delta(i64::MIN, Duration::MAX);
        let _ = (w.earliest(i64::MIN), w.earliest(i64::MAX));
    }

    #[test]
    fn windows_expire_after_their_end_plus_expires() {
        let w = Window::tumbling(Duration::from_secs(10), Duration::from_secs(5));
        let r = w.range(0);
        assert!(!w.is_expired(&r, 14_999));
        assert!(w.is_expired(&r, 15 * S));
        let forever = Window::tumbling(Duration::from_secs(10), None);
        assert!(!forever.is_expired(&r, i64::MAX));
    }

    #[test]
    #[should_panic(expected = "step")]
    fn a_step_longer_than_the_size_is_refused() {
        let _ = Window::hopping(Duration::from_secs(1), Duration::from_secs(2), None);
    }
}
