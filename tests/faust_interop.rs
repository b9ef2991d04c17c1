//! Faust (faust-streaming, pinned to [`FAUST_VERSION`]) and rill workers in one Apache Kafka
//! cluster: a Faust client asks a rill agent (with Faust's reply headers, and with its
//! `ReqRepRequest` records), a rill worker asks a Faust agent, and both read the records the
//! other writes to a shared topic.
//!
//! Faust runs as a separate Python process (a script this test writes into a scratch
//! directory), on loopback, stopped by its pid. `scripts/test` installs faust-streaming when
//! missing; `RILL_PYTHON` overrides the Python run.

mod common;

use common::kafka::{python, run_with_broker_alive, scratch_dir, signal, Kafka};
use common::{wait_until_state, within, Recorder, WAIT};
use rill::faust::{FaustModel, FaustRecord};
use rill::prelude::*;
use std::future::IntoFuture;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// The faust-streaming release the tests are written against; `scripts/test` installs it.
const FAUST_VERSION: &str = "0.15.3";

/// Bound on a Faust process: starting, joining its group, asking or answering.
const FAUST_TIMEOUT: Duration = Duration::from_secs(150);

/// What both sides add: Faust's `Add` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

impl FaustModel for Add {
    const NAMESPACE: &'static str = "interop.Add";
}

/// The answer: Faust's `Sum` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sum {
    total: i64,
    by: String,
}

impl FaustModel for Sum {
    const NAMESPACE: &'static str = "interop.Sum";
}

/// The Faust side. `ask BROKER N` asks the rill agent (topic `rill-add`) N times with reply
/// headers and N times with `ReqRepRequest` records, and prints each answer; `serve BROKER`
/// runs a worker whose agent (topic `faust-add`) answers with a `Sum` and also writes it,
/// keyed as its input, to `faust-sums`.
const FAUST_APP: &str = r#"
import asyncio, json, os, sys, uuid
import faust
from faust.agents.replies import ReplyPromise

mode, broker = sys.argv[1], sys.argv[2]
app = faust.App(
    "faust-interop-" + mode,
    broker="kafka://" + broker,
    web_enabled=False,
    topic_partitions=4,
    datadir=sys.argv[3],
)


class Add(faust.Record, namespace="interop.Add"):
    a: int
    b: int


class Sum(faust.Record, namespace="interop.Sum"):
    total: int
    by: str


# No value_type: a value is decoded into a Record class by its __faust namespace only.
rill_add = app.topic("rill-add", key_serializer="raw")
faust_add = app.topic("faust-add", key_serializer="raw")
faust_sums = app.topic("faust-sums", key_serializer="raw", value_type=Sum)


if mode == "ask":
    # Declared, not run (this client only asks them): the rill agent reading rill-add, asked
    # with Faust's reply headers and with ReqRepRequest records.
    @app.agent(rill_add, name="rill-add-headers")
    async def rill_add_headers(stream):
        async for _ in stream:
            yield None

    @app.agent(rill_add, name="rill-add-wrapped", use_reply_headers=False)
    async def rill_add_wrapped(stream):
        async for _ in stream:
            yield None


@app.agent(faust_add if mode == "serve" else app.channel(), name="faust-add")
async def add(stream):
    async for event in stream.events():
        value = event.value
        # An attribute error (the agent crashes) unless rill wrote a record Faust decoded.
        result = Sum(total=value.a + value.b, by="faust")
        await faust_sums.send(key=event.key, value=result)
        yield result


async def ask_registered(agent, value, key):
    # Faust's own `agent.ask` sends the request first and registers for its reply after the
    # send returns; a reply that arrives in between (a fast agent) is dropped and that ask
    # waits forever. So register first, then send, as `ask` would otherwise do.
    correlation_id = str(uuid.uuid4())
    promise = ReplyPromise(app.conf.reply_to, correlation_id)
    await app._reply_consumer.add(correlation_id, promise)
    await agent.ask_nowait(value, key=key, reply_to=app.conf.reply_to,
                           correlation_id=correlation_id, force=True)
    await app.maybe_start_client()
    return await promise


async def ask(n):
    try:
        for form, agent in (("headers", rill_add_headers), ("wrapped", rill_add_wrapped)):
            for i in range(n):
                answer = await asyncio.wait_for(
                    ask_registered(agent, Add(a=i, b=100), f"{form}-{i}".encode()), 60)
                print(json.dumps({"form": form, "i": i, "type": type(answer).__name__,
                                  "total": answer.total, "by": answer.by}), flush=True)
        code = 0
    except BaseException as e:
        print(f"ask failed: {e!r}", file=sys.stderr, flush=True)
        code = 1
    # Stopping a client-only Faust app can block its event loop for good (a stop that no
    # timeout interrupts): the answers are printed and flushed, so the process just ends.
    sys.stdout.flush()
    os._exit(code)


if mode == "ask":
    asyncio.run(ask(int(sys.argv[4])))
else:
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()
"#;

/// Fails the test unless `python3` has faust-streaming [`FAUST_VERSION`].
fn require_faust() {
    let install = format!(
        "install it with `python3 -m pip install faust-streaming=={FAUST_VERSION}` (scripts/test \
         does) or point RILL_PYTHON at a Python that has it"
    );
    let out = std::process::Command::new(python())
        .args(["-c", "import faust; print(faust.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): {install}", python()));
    assert!(
        out.status.success(),
        "faust-streaming is missing from {} ({}): {install}",
        python(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        version, FAUST_VERSION,
        "faust-streaming {version} is installed, the tests pin {FAUST_VERSION}: {install}"
    );
}

/// A Faust process running the script in `mode`, its output in files of `dir`; stopped by
/// its pid when dropped.
struct FaustProcess {
    child: tokio::process::Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl FaustProcess {
    fn start(dir: &Path, mode: &str, broker: &str, extra: &[&str]) -> Self {
        Self::run(dir, FAUST_APP, mode, mode, broker, extra)
    }

    /// Runs `app` (a Faust script) in `mode`; `run` names this run's data and output files.
    fn run(dir: &Path, app: &str, mode: &str, run: &str, broker: &str, extra: &[&str]) -> Self {
        let script = dir.join(format!("{mode}.py"));
        std::fs::write(&script, app).expect("write the Faust app");
        let data = dir.join(format!("faust-data-{run}"));
        let (out, err) = (
            dir.join(format!("faust-{run}.out")),
            dir.join(format!("faust-{run}.err")),
        );
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(&script)
            .args([mode, broker])
            .arg(&data)
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("Faust stdout file"))
            .stderr(std::fs::File::create(&err).expect("Faust stderr file"))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start Faust ({mode}): {e}"));
        Self { child, out, err }
    }

    fn output(&self) -> String {
        format!(
            "--- Faust stderr (last lines):\n{}\n--- Faust stdout:\n{}",
            common::kafka::tail(&self.err, 40),
            std::fs::read_to_string(&self.out).unwrap_or_default()
        )
    }

    /// Waits (bounded) for the process to end on its own; fails the test if it fails.
    async fn finish(mut self) -> String {
        match tokio::time::timeout(FAUST_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => {
                assert!(
                    status.success(),
                    "Faust failed ({status})\n{}",
                    self.output()
                );
                std::fs::read_to_string(&self.out).unwrap_or_default()
            }
            Ok(Err(e)) => panic!("waiting for Faust: {e}"),
            Err(_) => panic!(
                "Faust did not finish within {FAUST_TIMEOUT:?}\n{}",
                self.output()
            ),
        }
    }

    /// Stops the process by its pid: SIGTERM, then SIGKILL if it does not end in time.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM");
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn app_on(id: &str, broker: &str) -> App {
    let app = App::new(id);
    let broker = format!("kafka://{broker}");
    app.configure(|s| {
        s.broker = broker;
        s.topic_partitions = 4;
        s.ask_timeout = FAUST_TIMEOUT;
    });
    app
}

/// What a Faust `ask` printed.
#[derive(Debug, Deserialize, PartialEq)]
struct Answer {
    form: String,
    i: i64,
    r#type: String,
    total: i64,
    by: String,
}

/// Requests per reply form: more than a handful, so that an asker that stops getting answers
/// after a few shows.
const ASKS: i64 = 8;

#[test]
fn a_faust_ask_gets_the_answer_of_a_rill_agent_in_both_request_forms() {
    require_faust();
    let dir = scratch_dir("faust-asks-rill");
    let kafka = Kafka::single(&dir);
    run_with_broker_alive(faust_asks_rill(&dir, kafka.addr()));
    drop(kafka);
}

async fn faust_asks_rill(dir: &Path, broker: String) {
    let app = app_on("rill-adder", &broker);
    let adds = app.topic("rill-add").key_codec(Utf8).value_type::<Add>();
    let seen = Recorder::new();
    let record = seen.clone();
    app.agent(move |mut adds: Stream<Add, String>| {
        let record = record.clone();
        stream! {
            while let Some(add) = adds.next().await {
                record.push(add.clone());
                yield FaustRecord(Sum { total: add.a + add.b, by: "rill".to_owned() });
            }
        }
    })
    .named("rill-add")
    .channel(&adds);
    let worker = within(WAIT, "the rill worker to start", app.start())
        .await
        .expect("the rill worker starts");

    let faust = FaustProcess::start(dir, "ask", &broker, &[&ASKS.to_string()]);
    let out = faust.finish().await;
    let answers: Vec<Answer> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("Faust printed {l:?}: {e}")))
        .collect();
    let expected: Vec<Answer> = ["headers", "wrapped"]
        .iter()
        .flat_map(|form| {
            (0..ASKS).map(move |i| Answer {
                form: (*form).to_owned(),
                i,
                r#type: "Sum".to_owned(),
                total: i + 100,
                by: "rill".to_owned(),
            })
        })
        .collect();
    assert_eq!(
        answers, expected,
        "Faust's asks did not each get the rill agent's Sum"
    );
    // The agent read Faust's Add records (with their __faust field) as plain structs.
    let mut got = seen.snapshot();
    got.sort_by_key(|a| a.a);
    got.dedup();
    assert_eq!(
        got,
        (0..ASKS).map(|i| Add { a: i, b: 100 }).collect::<Vec<_>>()
    );

    within(WAIT, "the rill worker to stop", worker.shutdown())
        .await
        .expect("the rill worker stops");
}

#[test]
fn a_rill_ask_gets_the_answer_of_a_faust_agent_and_both_read_each_others_records() {
    require_faust();
    let dir = scratch_dir("rill-asks-faust");
    let kafka = Kafka::single(&dir);
    run_with_broker_alive(rill_asks_faust(&dir, kafka.addr()));
    drop(kafka);
}

async fn rill_asks_faust(dir: &Path, broker: String) {
    let faust = FaustProcess::start(dir, "serve", &broker, &[]);

    let app = app_on("rill-asker", &broker);
    let faust_adds = app
        .topic("faust-add")
        .key_codec(Utf8)
        .value_type::<FaustRecord<Add>>();
    let add = app
        .remote_agent::<FaustRecord<Add>, Sum, String>("faust-add")
        .channel(&faust_adds);
    // What the Faust agent writes to faust-sums, read by a rill agent.
    let sums = app.topic("faust-sums").key_codec(Utf8).value_type::<Sum>();
    let read = Recorder::new();
    let record = read.clone();
    app.agent(move |stream: Stream<Sum, String>| {
        let record = record.clone();
        async move {
            let mut items = stream.items();
            while let Some((key, sum)) = items.next().await {
                record.push((key, sum));
            }
        }
    })
    .named("read-sums")
    .channel(&sums);
    let worker = within(WAIT, "the rill worker to start", app.start())
        .await
        .expect("the rill worker starts");

    for i in 0..ASKS {
        let key = format!("k-{i}");
        let asked = add
            .ask(FaustRecord(Add { a: i, b: 7 }))
            .key(key.clone())
            .await;
        let sum = match asked {
            Ok(sum) => sum,
            Err(e) => panic!("ask {i} of the Faust agent failed: {e}\n{}", faust.output()),
        };
        assert_eq!(
            sum,
            Sum {
                total: i + 7,
                by: "faust".to_owned()
            },
            "the Faust agent's answer to ask {i}"
        );
    }

    let want: Vec<(Option<String>, Sum)> = (0..ASKS)
        .map(|i| {
            (
                Some(format!("k-{i}")),
                Sum {
                    total: i + 7,
                    by: "faust".to_owned(),
                },
            )
        })
        .collect();
    wait_until_state(
        FAUST_TIMEOUT,
        "the rill agent read every Sum the Faust agent wrote",
        || read.len(),
        |n| *n >= want.len(),
    )
    .await;
    let mut got = read.snapshot();
    got.sort_by_key(|(_, s)| s.total);
    assert_eq!(
        got, want,
        "Faust's Sum records as rill read them (raw keys)"
    );

    within(WAIT, "the rill worker to stop", worker.shutdown())
        .await
        .expect("the rill worker stops");
    faust.stop().await;
}

/// A Faust word count: agent `wc.count` reads `wc-words`, regroups by `Word.text` (Faust names
/// the repartition topic `wc.count-wc-words-Word.text-repartition`) and counts in table
/// `counts` (changelog `interop-wc-counts-changelog`), writing each word's new count to the
/// file named by its fourth argument (a Faust worker turns an agent's `print` into log lines).
const FAUST_WORD_COUNT: &str = r#"
import json, sys
import faust

mode, broker = sys.argv[1], sys.argv[2]
counted = open(sys.argv[4], "a", buffering=1) if mode == "count" else None
app = faust.App(
    "interop-wc",
    broker="kafka://" + broker,
    topic_partitions=4,
    datadir=sys.argv[3],
    web_port=int(sys.argv[5]) if mode == "count" else 6066,
    web_bind="127.0.0.1",
    web_host="127.0.0.1",
)


class Word(faust.Record, namespace="interop.Word"):
    text: str


words = app.topic("wc-words", value_type=Word, key_serializer="raw", partitions=4)
counts = app.Table("counts", default=int, partitions=4)


@app.agent(words, name="wc.count")
async def count(stream):
    async for word in stream.group_by(Word.text):
        counts[word.text] += 1
        counted.write(json.dumps({"text": word.text, "count": counts[word.text]}) + "\n")


# Faust serves a table over HTTP from a view the app writes; `table_route` sends the request
# to the worker that owns the key.
@app.page("/count/{word}/")
@app.table_route(table=counts, match_info="word")
async def get_count(web, request, word):
    return web.json({"word": word, "count": counts[word]})


# Reads a rill worker's table over HTTP, as a Faust view or client would:
# `read URL DATADIR WORD...`.
if mode == "read":
    import asyncio, aiohttp

    async def read(url, words):
        async with aiohttp.ClientSession() as http:
            for word in words:
                async with http.get(f"{url}/tables/counts/{word}") as r:
                    print(json.dumps({"word": word, "status": r.status, "count": await r.json()}))

    asyncio.run(read(sys.argv[2], sys.argv[4:]))
    sys.exit(0)


# Info logs carry the worker's "Ready" line, which the test waits for.
sys.argv = [sys.argv[0], "worker", "-l", "info"]
app.main()
"#;

/// Waits until the Faust worker logs that it is ready: partitions assigned and its table
/// recovered. Records sent before that may be processed twice (a Faust worker rebalances
/// while it starts, and replays what it had not committed).
async fn faust_ready(faust: &FaustProcess) {
    wait_until_state(
        FAUST_TIMEOUT,
        "the Faust worker to be ready",
        || std::fs::read_to_string(&faust.err).unwrap_or_default(),
        |log| log.contains("[^Worker]: Ready"),
    )
    .await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Word {
    text: String,
}

impl FaustModel for Word {
    const NAMESPACE: &'static str = "interop.Word";
}

/// Distinct words, and how many of each every batch sends.
const WORDS: usize = 6;
const PER_BATCH: [usize; 3] = [20, 10, 10];

/// A word's counts, in the order they were printed or recorded.
fn counts_by_word(seen: &[(String, i64)]) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut by = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for (text, n) in seen {
        by.entry(text.clone()).or_default().push(*n);
    }
    by
}

/// What the Faust word count wrote to `counted` so far.
fn faust_counts(counted: &Path) -> Vec<(String, i64)> {
    #[derive(Deserialize)]
    struct Counted {
        text: String,
        count: i64,
    }
    std::fs::read_to_string(counted)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Counted>(l).ok())
        .map(|c| (c.text, c.count))
        .collect()
}

/// Each word's counts from `from` to `to`, one at a time: nothing lost, nothing counted twice,
/// in order.
fn expected_counts(from: i64, to: i64) -> std::collections::BTreeMap<String, Vec<i64>> {
    (0..WORDS)
        .map(|w| (format!("w{w}"), (from..=to).collect()))
        .collect()
}

async fn send_words(feeder: &rill::Topic<String, FaustRecord<Word>>, per_word: usize) {
    for i in 0..per_word * WORDS {
        let word = FaustRecord(Word {
            text: format!("w{}", i % WORDS),
        });
        within(WAIT, "a word to be sent", feeder.send(word).into_future())
            .await
            .expect("a word is sent");
    }
}

/// Waits until the group `interop-wc` (Faust's and rill's app id) has committed everything in
/// the source and the repartition topic: after that, stopping a worker loses or repeats
/// nothing.
async fn wait_committed(app: &App, topics: &[&str], faust: Option<&FaustProcess>) {
    let deadline = tokio::time::Instant::now() + FAUST_TIMEOUT;
    loop {
        let committed = app.committed_offsets().await.unwrap_or_default();
        let mut done = true;
        for topic in topics {
            let ends = app.end_offsets(topic).await.unwrap_or_default();
            for (partition, end) in ends.iter().enumerate() {
                let at = committed
                    .iter()
                    .find(|(tp, _)| &*tp.topic == *topic && tp.partition as usize == partition)
                    .map_or(0, |(_, o)| *o);
                done &= *end == 0 || at >= *end;
            }
        }
        if done {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "group interop-wc did not commit all of {topics:?} within {FAUST_TIMEOUT:?} \
                 (committed {committed:?}){}",
                faust.map(|f| f.output()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn faust_and_rill_take_turns_on_one_group_by_and_table() {
    require_faust();
    let dir = scratch_dir("faust-rill-word-count");
    let kafka = Kafka::single(&dir);
    run_with_broker_alive(take_turns(&dir, kafka.addr()));
    drop(kafka);
}

/// A word count moves from Faust to rill and back in one consumer group (`interop-wc`, both
/// apps' id): each continues from the offsets the other committed, the repartition topic is the
/// same one, and the table's counts carry over both ways through its changelog.
async fn take_turns(dir: &Path, broker: String) {
    const REPARTITION: &str = "wc.count-wc-words-Word.text-repartition";
    // The feeder creates `wc-words` with 4 partitions (Faust does not create a topic it does
    // not own).
    let feeder_app = app_on("interop-wc-feeder", &broker);
    let feeder = feeder_app
        .topic("wc-words")
        .key_codec(Utf8)
        .value_type::<FaustRecord<Word>>();
    let feeding = within(WAIT, "the feeder to start", feeder_app.start_client())
        .await
        .expect("the feeder starts");

    // Faust counts the first batch.
    let faust_web = common::kafka::free_port();
    let counted = dir.join("counted-1.jsonl");
    let faust = FaustProcess::run(
        dir,
        FAUST_WORD_COUNT,
        "count",
        "count-1",
        &broker,
        &[&counted.to_string_lossy(), &faust_web.to_string()],
    );
    faust_ready(&faust).await;
    send_words(&feeder, PER_BATCH[0]).await;
    let first = PER_BATCH[0] as i64;
    wait_until_state(
        FAUST_TIMEOUT,
        "Faust to count the first batch",
        || faust_counts(&counted).len(),
        |n| *n >= WORDS * PER_BATCH[0],
    )
    .await;
    let app = app_on("interop-wc", &broker);
    app.configure(|s| s.web_port = Some(0));
    wait_committed(&app, &["wc-words", REPARTITION], Some(&faust)).await;
    assert_eq!(
        counts_by_word(&faust_counts(&counted)),
        expected_counts(1, first),
        "Faust's counts of the first batch\n{}",
        faust.output()
    );
    faust.stop().await;

    // rill takes over the agent: same group, same repartition topic, same table.
    let words = app.topic("wc-words").key_codec(Utf8).value_type::<Word>();
    let counts = app.table::<String, i64>("counts");
    let seen = Recorder::new();
    let record = seen.clone();
    let table = counts.clone();
    app.agent(move |stream: Stream<Word, String>| {
        let (record, table) = (record.clone(), table.clone());
        async move {
            let by_text = field!(Word.text)
                .topic(REPARTITION)
                .partitions(4)
                .key_serializer("raw");
            let mut words = stream.group_by(by_text);
            while let Some(word) = words.next().await {
                let n = table.update(word.text.clone(), |n| {
                    *n += 1;
                    *n
                });
                record.push((word.text, n));
            }
        }
    })
    .named("wc.count")
    .channel(&words);
    let worker = within(WAIT, "the rill worker to start", app.start())
        .await
        .expect("the rill worker starts");
    send_words(&feeder, PER_BATCH[1]).await;
    let second = first + PER_BATCH[1] as i64;
    wait_until_state(
        FAUST_TIMEOUT,
        "rill to count the second batch",
        || seen.len(),
        |n| *n >= WORDS * PER_BATCH[1],
    )
    .await;
    assert_eq!(
        counts_by_word(&seen.snapshot()),
        expected_counts(first + 1, second),
        "rill's counts: each word goes on from Faust's count, once per word sent"
    );
    let ends = within(WAIT, "end offsets", app.end_offsets(REPARTITION))
        .await
        .expect("the repartition topic's end offsets");
    assert_eq!(
        ends.iter().sum::<i64>() as usize,
        WORDS * (PER_BATCH[0] + PER_BATCH[1]),
        "Faust and rill regroup into the one repartition topic"
    );
    // Python (aiohttp, what a Faust view would use) reads rill's table over HTTP.
    let web = worker.web_addr().expect("the rill worker serves the web");
    let words_asked: Vec<String> = (0..WORDS).map(|w| format!("w{w}")).collect();
    let mut read_args: Vec<&str> = Vec::new();
    read_args.extend(words_asked.iter().map(String::as_str));
    let reader = FaustProcess::run(
        dir,
        FAUST_WORD_COUNT,
        "read",
        "read-2",
        &format!("http://{web}"),
        &read_args,
    );
    let read: Vec<serde_json::Value> = reader
        .finish()
        .await
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let want: Vec<serde_json::Value> = words_asked
        .iter()
        .map(|w| serde_json::json!({"word": w, "status": 200, "count": second}))
        .collect();
    assert_eq!(read, want, "rill's table as Python read it over HTTP");
    within(WAIT, "the rill worker to stop", worker.shutdown())
        .await
        .expect("the rill worker stops");
    wait_committed(&app, &["wc-words", REPARTITION], None).await;
    eprintln!(
        "before faust 3: committed {:?}",
        app.committed_offsets().await
    );
    eprintln!(
        "before faust 3: ends {:?} {:?}",
        app.end_offsets("wc-words").await,
        app.end_offsets(REPARTITION).await
    );

    // And back to Faust, which reads rill's counts from the changelog.
    let counted = dir.join("counted-3.jsonl");
    let faust = FaustProcess::run(
        dir,
        FAUST_WORD_COUNT,
        "count",
        "count-3",
        &broker,
        &[&counted.to_string_lossy(), &faust_web.to_string()],
    );
    faust_ready(&faust).await;
    send_words(&feeder, PER_BATCH[2]).await;
    wait_until_state(
        FAUST_TIMEOUT,
        "Faust to count the third batch",
        || faust_counts(&counted).len(),
        |n| *n >= WORDS * PER_BATCH[2],
    )
    .await;
    wait_committed(&app, &["wc-words", REPARTITION], Some(&faust)).await;
    eprintln!(
        "after faust 3: committed {:?}",
        app.committed_offsets().await
    );
    eprintln!(
        "after faust 3: ends {:?} {:?}",
        app.end_offsets("wc-words").await,
        app.end_offsets(REPARTITION).await
    );
    assert_eq!(
        counts_by_word(&faust_counts(&counted)),
        expected_counts(second + 1, second + PER_BATCH[2] as i64),
        "Faust's counts after rill's turn\n{}",
        faust.output()
    );
    // And Faust's table over HTTP, from its `table_route` view.
    let faust_addr: std::net::SocketAddr = ([127, 0, 0, 1], faust_web).into();
    let last = second + PER_BATCH[2] as i64;
    for word in &words_asked {
        let path = format!("/count/{word}/");
        let (status, body) =
            tokio::task::spawn_blocking(move || common::http_get(faust_addr, &path))
                .await
                .expect("the request runs");
        assert_eq!(status, 200, "Faust's view of {word}: {body}");
        let got: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Faust's view of {word} answered {body:?}: {e}"));
        assert_eq!(got, serde_json::json!({"word": word, "count": last}));
    }
    faust.stop().await;
    within(WAIT, "the feeder to stop", feeding.shutdown())
        .await
        .expect("the feeder stops");
}
