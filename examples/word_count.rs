//! Word count: sentences in, words out through `group_by`, counted in a table.
//!
//! ```console
//! $ cargo run --example word_count -- worker -l info --store fjall://./word-count-data
//! $ cargo run --example word_count -- count "The quick brown fox" "the lazy dog" --print
//! the      2
//! quick    1
//! ...
//! ```
//!
//! With no worker running, `count` runs the agents in its own process (embedded, in memory) and
//! prints the counts once every word is counted. With a worker running (embedded, where the
//! `worker` command keeps its log in `word_count-data/`, or on Kafka), `count` sends the
//! sentences to it, and its web server answers `GET http://127.0.0.1:6066/tables/word_counts/the`
//! with the count of `the`; a restarted worker still has its counts.

use rill::prelude::*;
use std::time::{Duration, Instant};

/// Splits sentences into lower-cased words.
fn split_sentences(mut sentences: Stream<String>) -> impl AsyncIterable<String> {
    stream! {
        while let Some(sentence) = sentences.next().await {
            for word in sentence.split(|c: char| !c.is_alphanumeric()) {
                if !word.is_empty() {
                    yield word.to_lowercase();
                }
            }
        }
    }
}

/// Counts words in the table: every occurrence of a word reaches the same partition, so the
/// worker that owns the partition holds the word's count.
async fn count_words(words: Stream<String>, word_counts: Table<String, i64>) {
    let mut words = words.group_by(GroupBy::new("word", |w: &String| w.clone()));
    while let Some(word) = words.next().await {
        word_counts.update(word, |n| *n += 1);
    }
}

/// Send sentences; with `--print`, wait until their words are counted and print the counts.
#[derive(Debug, clap::Args)]
struct Count {
    /// The sentences.
    sentences: Vec<String>,
    /// Print the counts of the words sent (embedded transport).
    #[arg(long)]
    print: bool,
}

fn main() {
    let app = App::new("word_count");
    let sentences = app.topic("sentences").value_codec(Utf8);
    let words = app.topic("words").value_type::<String>();
    let word_counts = app.table::<String, i64>("word_counts");

    app.agent(split_sentences).channel(&sentences).sink(&words);

    app.agent_with(word_counts.clone(), count_words)
        .named("count_words")
        .channel(&words);

    let local = app.clone();
    // Not `send`: that is the built-in command every app has (`send @count_words '"word"'`).
    app.command("count", move |args: Count| {
        let (app, sentences, word_counts) = (local.clone(), sentences.clone(), word_counts.clone());
        async move {
            let mut expected: std::collections::BTreeMap<String, i64> = Default::default();
            for sentence in &args.sentences {
                for word in sentence.split(|c: char| !c.is_alphanumeric()) {
                    if !word.is_empty() {
                        *expected.entry(word.to_lowercase()).or_default() += 1;
                    }
                }
                sentences.send(sentence.clone()).await?;
            }
            if !args.print || !app.is_embedded() {
                return Ok::<_, rill::Error>(());
            }
            // Counts start from the table's state, so wait until each word has grown by at
            // least what was sent.
            let deadline = Instant::now() + Duration::from_secs(30);
            let before: Vec<(String, i64)> = expected.keys().map(|w| (w.clone(), 0)).collect();
            while before
                .iter()
                .any(|(w, _)| word_counts.value(w) < expected[w])
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for word in expected.keys() {
                println!("{word:<8} {}", word_counts.value(word));
            }
            Ok(())
        }
    });
    app.main()
}
