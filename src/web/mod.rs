//! The worker's web server: table lookups, and the membership that lets any worker answer
//! for a key another worker owns.
//!
//! - `GET /`: the status page (app, agents, assigned partitions with lag, tables); `GET
//!   /health`: `{"status": "running", ...}` with 200, or 503 while starting, rebalancing or
//!   stopping; `GET /metrics`: the metrics in Prometheus's text format (see `status`).
//! - `GET /tables`: the app's tables (name, changelog topic, partitions, what this worker
//!   holds).
//! - `GET /tables/{table}`: the same for one table, plus, per partition this worker restored,
//!   where its state came from on the last restore (`store`, `changelog`, `standby` or
//!   `set_aside`), how many keys the local store or the copy gave, how many changelog records
//!   were replayed and how many keys were written to the local store.
//! - `GET /tables/{table}/{key}`: 200 with the value as JSON, 404 when the key is missing,
//!   503 while the key's partition is being restored. The key is JSON (`"word"`, `42`) or bare
//!   text, which is taken as a string. When another worker owns the key's partition the request
//!   is forwarded to it.
//!
//! Lookups of keys another worker owns are forwarded to it, as the app's membership tells
//! (see `engine::membership`).
//!
//! An embedded worker (`memory://`) also publishes its broker under `/transport`, for the
//! app's commands in other processes: the remote transport (see `transport::remote` for the
//! API).

mod status;
mod transport;

use crate::engine::Runtime;
use crate::error::{Error, Result};
use crate::table::{Lookup, TableRunner};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Marks a forwarded lookup, which is answered locally (no second hop).
const FORWARDED: &str = "x-rill-forwarded";
/// How long a forwarded lookup may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The running web server of a worker.
#[derive(Debug)]
pub(crate) struct Web {
    pub(crate) addr: SocketAddr,
    pub(crate) server: JoinHandle<()>,
}

/// What the web server's handlers read: the running worker, and the app's tables.
pub(crate) struct Served {
    pub(crate) rt: Arc<Runtime>,
    pub(crate) tables: Vec<Arc<dyn TableRunner>>,
}

impl Served {
    /// Brings the gauges and the status up to date (see [`crate::metrics::refresh`]).
    async fn refresh(&self) {
        let tables: Vec<crate::metrics::TableSize<'_>> = self
            .tables
            .iter()
            .map(|t| crate::metrics::TableSize {
                name: t.name(),
                keys: t.size(),
                recovering: t.recovering().len(),
            })
            .collect();
        crate::metrics::refresh(&self.rt.app_id, &self.rt.ops, &*self.rt.transport, &tables).await;
    }
}

/// Refreshes the gauges once a second and runs the recorder's upkeep, until `stop`.
async fn gauges(web: Arc<Served>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(crate::metrics::RATE_WINDOW);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {
                web.refresh().await;
                if let Some(p) = crate::metrics::prometheus() {
                    p.run_upkeep();
                }
            }
        }
    }
}

/// The host this worker's web server is advertised under (see [`Settings::web_host`]).
///
/// [`Settings::web_host`]: crate::Settings::web_host
fn advertised_host(configured: Option<&str>, bound: std::net::IpAddr) -> String {
    if let Some(host) = configured.map(str::trim).filter(|h| !h.is_empty()) {
        return host.to_owned();
    }
    if !bound.is_unspecified() {
        return bound.to_string();
    }
    // Bound to every address: other hosts know this one by its name.
    match host_name() {
        Some(name) => name,
        None => {
            tracing::warn!(
                "the web server listens on every address but this host's name is unknown: \
                 advertising 127.0.0.1, which other hosts cannot reach; set --web-host"
            );
            "127.0.0.1".to_owned()
        }
    }
}

/// The machine's host name, as the kernel knows it.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `host` as it goes in a URL: IPv6 addresses in brackets.
fn url_host(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => host.to_owned(),
    }
}

/// An embedded broker a worker publishes under `/transport`: its in-memory log, the transport
/// other processes' writes go through (on `file://`, one writing to the durable log at once),
/// and who the worker is.
pub(crate) struct Published {
    pub(crate) broker: Arc<crate::transport::MemoryBroker>,
    pub(crate) transport: Arc<dyn crate::transport::Transport>,
    pub(crate) hello: crate::transport::remote::Hello,
}

/// Binds the web server and starts serving; stops when `closed` is cancelled.
pub(crate) async fn start(
    rt: Arc<Runtime>,
    tables: Vec<Arc<dyn TableRunner>>,
    bind: &str,
    port: u16,
    published: Option<Published>,
    closed: CancellationToken,
) -> Result<Web> {
    let listener = tokio::net::TcpListener::bind((bind, port))
        .await
        .map_err(|e| {
            Error::Config(format!(
                "cannot serve the web interface on {bind}:{port}: {e} (another worker on this \
                 machine? give each its own --web-port)"
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the web address: {e}")))?;
    let host = advertised_host(rt.settings.web_host.as_deref(), addr.ip());
    if !rt.transport.embedded() && is_loopback(&host) {
        tracing::info!(
            url = %format!("http://{host}:{}", addr.port()),
            "the web server is reachable from this machine only: workers on other hosts cannot \
             forward table lookups to it (serve on another address with --web-bind, and name \
             this host with --web-host)"
        );
    }
    rt.set_web(format!("http://{}:{}", url_host(&host), addr.port()));

    let served = Arc::new(Served { rt, tables });
    let app = Router::new()
        .route("/", get(status::page))
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        .route("/metrics", get(status::metrics))
        .route("/tables", get(list_tables))
        .route("/tables/{table}", get(describe_table))
        .route("/tables/{table}/{key}", get(get_key))
        .with_state(served.clone());
    let app = match published {
        Some(p) => app.merge(transport::routes(
            p.broker,
            p.transport,
            p.hello,
            closed.clone(),
        )),
        None => app,
    };
    let stop = closed.clone();
    let gauges = gauges(served, closed.clone());
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        let (served, ()) = tokio::join!(async move { serve.await }, gauges);
        if let Err(e) = served {
            tracing::error!(error = %e, "web server failed");
        }
    });
    tracing::info!(address = %addr, "web server listening");
    Ok(Web { addr, server })
}

#[derive(Serialize)]
struct TableInfo {
    name: String,
    changelog: String,
    partitions: u32,
    local_partitions: Vec<u32>,
    local_keys: usize,
    standby_partitions: Vec<u32>,
}

async fn list_tables(State(web): State<Arc<Served>>) -> Json<Vec<TableInfo>> {
    Json(
        web.tables
            .iter()
            .map(|t| {
                let spec = t.changelog_spec();
                TableInfo {
                    name: t.name().to_owned(),
                    changelog: spec.name,
                    partitions: spec.partitions,
                    local_partitions: t.held_partitions(),
                    local_keys: t.size(),
                    standby_partitions: t.standby(),
                }
            })
            .collect(),
    )
}

/// One table in detail: what [`list_tables`] says of it, plus, for each partition this worker
/// restored, where its state came from on the last restore and how much each source gave.
#[derive(Serialize)]
struct TableDetail {
    #[serde(flatten)]
    info: TableInfo,
    recovering_partitions: Vec<u32>,
    restored: std::collections::BTreeMap<u32, crate::table::Restored>,
}

async fn describe_table(State(web): State<Arc<Served>>, Path(table): Path<String>) -> Response {
    let Some(t) = web.tables.iter().find(|t| t.name() == table) else {
        return error(StatusCode::NOT_FOUND, format!("no table named {table:?}"));
    };
    let spec = t.changelog_spec();
    Json(TableDetail {
        info: TableInfo {
            name: t.name().to_owned(),
            changelog: spec.name,
            partitions: spec.partitions,
            local_partitions: t.held_partitions(),
            local_keys: t.size(),
            standby_partitions: t.standby(),
        },
        recovering_partitions: t.recovering(),
        restored: t.restored(),
    })
    .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn get_key(
    State(web): State<Arc<Served>>,
    Path((table, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(t) = web.tables.iter().find(|t| t.name() == table) else {
        return error(StatusCode::NOT_FOUND, format!("no table named {table:?}"));
    };
    match t.lookup(&key) {
        Lookup::Found(v) => Json(v).into_response(),
        Lookup::BadKey(e) => error(
            StatusCode::BAD_REQUEST,
            format!("{key:?} is not a key of table {table:?}: {e}"),
        ),
        Lookup::Recovering(p) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("partition {p} of table {table:?} is being restored; try again"),
        ),
        Lookup::Missing { partition, held } => {
            if held || headers.contains_key(FORWARDED) {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no key {key:?} in table {table:?}"),
                );
            }
            match web.rt.members.owner_of(partition, &web.rt.instance) {
                Some(owner) => forward(&owner, &table, &key).await,
                None => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "partition {partition} of table {table:?} is not held by any worker \
                         right now (rebalancing?); try again"
                    ),
                ),
            }
        }
    }
}

/// What a path segment keeps as is: letters, digits and `-._~` (RFC 3986's unreserved).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment.
fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Asks the worker at `owner` (`http://host:port`) and relays its answer.
async fn forward(owner: &str, table: &str, key: &str) -> Response {
    let path = format!("/tables/{}/{}", encode_segment(table), encode_segment(key));
    match tokio::time::timeout(FORWARD_TIMEOUT, http_get(owner, &path)).await {
        Ok(Ok((status, body))) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (
                status,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::BAD_GATEWAY,
            format!("the worker at {owner} owns this key but did not answer: {e}"),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the worker at {owner} owns this key but did not answer within {FORWARD_TIMEOUT:?}"
            ),
        ),
    }
}

/// The largest answer a forwarded lookup takes from another worker.
const FORWARDED_BODY_LIMIT: usize = 64 * 1024 * 1024;

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// An HTTP GET of `path` on the worker at `base` (`http://host:port`): status code and body.
async fn http_get(base: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    use http_body_util::BodyExt;
    static CLIENT: std::sync::OnceLock<HttpClient> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http()
    });
    let request = axum::http::Request::get(format!("{base}{path}"))
        .header(FORWARDED, "1")
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("bad address: {e}"))?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), FORWARDED_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("cannot read the answer: {e}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("a b/\"c\""), "a%20b%2F%22c%22");
    }
}
