//! The seed's news importer ("Concurrency" in the Agents guide): an agent with
//! `concurrency(10)` that fetches every published article and stores it.
//!
//! ```console
//! $ cargo run --example news -- worker -l info
//! $ cargo run --example news -- publish_articles --count 50
//! stored 50 articles (3840 bytes) in 115.02ms, with up to 10 fetches at once
//! last stored: https://news.example.com/articles/46
//! ```
//!
//! There is no network here: `fetch_article` stands in for `app.http_client.get` (it waits a
//! little and returns a body), and `store_article_in_db` stores into a list in memory.
//! Concurrent instances process the stream out of order, which is fine for this agent.

use rill::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Article {
    url: String,
    /// ISO 8601, e.g. `2024-05-01T12:00:00Z`.
    date_published: String,
}

/// The "database": the responses stored so far.
static DB: Mutex<Vec<Response>> = Mutex::new(Vec::new());
// Fetches running now, and the most that ran at once.
static FETCHING: AtomicUsize = AtomicUsize::new(0);
static MOST_FETCHING: AtomicUsize = AtomicUsize::new(0);

/// What `fetch_article` returns.
#[derive(Debug)]
struct Response {
    url: String,
    body: String,
}

async fn imports_news(mut articles: Stream<Article>) {
    while let Some(article) = articles.next().await {
        let response = fetch_article(&article.url).await;
        store_article_in_db(response).await;
    }
}

/// Pretends to fetch `url` over HTTP.
async fn fetch_article(url: &str) -> Response {
    let now = FETCHING.fetch_add(1, Ordering::Relaxed) + 1;
    MOST_FETCHING.fetch_max(now, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(20)).await;
    FETCHING.fetch_sub(1, Ordering::Relaxed);
    Response {
        url: url.to_owned(),
        body: format!("<html><body>The article at {url}</body></html>"),
    }
}

async fn store_article_in_db(response: Response) {
    db().push(response);
}

fn db() -> std::sync::MutexGuard<'static, Vec<Response>> {
    DB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publish articles to the news topic and wait until they are all stored.
#[derive(Debug, clap::Args)]
struct PublishArticles {
    /// How many articles to publish
    #[arg(long, default_value_t = 50)]
    count: usize,
}

fn main() {
    let app = App::new("news");

    let news_topic = app.topic("news").value_type::<Article>();

    app.agent(imports_news).channel(&news_topic).concurrency(10);

    let local = app.clone();
    app.command("publish_articles", move |PublishArticles { count }| {
        let (app, news_topic) = (local.clone(), news_topic.clone());
        async move {
            let started = Instant::now();
            for n in 0..count {
                let article = Article {
                    url: format!("https://news.example.com/articles/{n}"),
                    date_published: format!("2024-05-01T12:{:02}:00Z", n % 60),
                };
                news_topic.send(article).await?;
            }
            if !agents_run_here(&app) {
                println!("published {count} articles");
                return Ok(());
            }
            if !wait_until(|| db().len() >= count).await {
                let stored = db().len();
                anyhow::bail!("only {stored} of {count} articles were stored in time");
            }
            let db = db();
            let bytes: usize = db.iter().map(|a| a.body.len()).sum();
            println!(
                "stored {} articles ({bytes} bytes) in {:.2?}, with up to {} fetches at once",
                db.len(),
                started.elapsed(),
                MOST_FETCHING.load(Ordering::Relaxed)
            );
            if let Some(last) = db.last() {
                println!("last stored: {}", last.url);
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
