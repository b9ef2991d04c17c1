//! The embedded broker of this worker, published under `/transport` for the app's commands in
//! other processes (the remote transport; the API is described in `transport::remote`).

use crate::transport::remote::{
    ErrorBody, Hello, Offsets, Read, ReadRecord, ReadResult, Records, TopicBody, TopicInfo,
    WireError, WriteResults, Written, MAX_READ, MAX_WAIT,
};
use crate::transport::{MemoryBroker, Transport};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The largest request body taken: a batch of records near the largest message size.
const BODY_LIMIT: usize = 64 << 20;

/// What the handlers share: the broker (its in-memory log, read directly, and the transport
/// writes go through: on `file://`, the durable log's), who this worker is, and when it stops.
struct Published {
    broker: Arc<MemoryBroker>,
    transport: Arc<dyn Transport>,
    hello: Hello,
    /// Cancelled when the web server stops: long polls answer at once, so that they do not
    /// hold the worker's shutdown.
    closed: CancellationToken,
}

/// The routes under `/transport`, publishing `broker` until `closed`: reads from its log,
/// writes through `transport` (one that writes at once, not in a transaction).
pub(super) fn routes(
    broker: Arc<MemoryBroker>,
    transport: Arc<dyn Transport>,
    hello: Hello,
    closed: CancellationToken,
) -> Router {
    let published = Arc::new(Published {
        transport,
        broker,
        hello,
        closed,
    });
    Router::new()
        .route("/transport", get(who))
        .route("/transport/topics/{topic}", get(describe).put(ensure))
        .route("/transport/records", post(append))
        .route("/transport/read", post(read))
        .route("/transport/groups/{group}/offsets", get(committed))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(published)
}

fn failure(error: WireError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(ErrorBody { error })).into_response()
}

fn bad_request(rejection: JsonRejection) -> Response {
    let error = WireError::other(format!("bad request: {}", rejection.body_text()));
    (StatusCode::BAD_REQUEST, Json(ErrorBody { error })).into_response()
}

async fn who(State(p): State<Arc<Published>>) -> Json<Hello> {
    Json(p.hello.clone())
}

async fn ensure(
    State(p): State<Arc<Published>>,
    Path(topic): Path<String>,
    body: Result<Json<TopicBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    match p.transport.ensure_topic(body.spec(&topic)).await {
        Ok(partitions) => Json(TopicInfo {
            partitions,
            start_offsets: Vec::new(),
            end_offsets: Vec::new(),
        })
        .into_response(),
        Err(e) => failure(WireError::of(&e)),
    }
}

async fn describe(State(p): State<Arc<Published>>, Path(topic): Path<String>) -> Response {
    let Some(partitions) = p.broker.partitions(&topic) else {
        return failure(WireError::of(&crate::error::TransportError::UnknownTopic(
            topic,
        )));
    };
    Json(TopicInfo {
        partitions,
        start_offsets: (0..partitions)
            .map(|q| p.broker.start_offset(&topic, q).unwrap_or(0))
            .collect(),
        end_offsets: (0..partitions)
            .map(|q| p.broker.end_offset(&topic, q).unwrap_or(0))
            .collect(),
    })
    .into_response()
}

async fn append(
    State(p): State<Arc<Published>>,
    body: Result<Json<Records>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let mut results = Vec::with_capacity(body.records.len());
    for record in body.records {
        results.push(match p.transport.send(record.into_record()).await {
            Ok(at) => Written::At {
                partition: at.partition,
                offset: at.offset,
            },
            Err(e) => Written::Failed {
                error: WireError::of(&e),
            },
        });
    }
    Json(WriteResults { results }).into_response()
}

async fn read(
    State(p): State<Arc<Published>>,
    body: Result<Json<Read>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let Some(partitions) = p.broker.partitions(&body.topic) else {
        return failure(WireError::of(&crate::error::TransportError::UnknownTopic(
            body.topic,
        )));
    };
    if let Some((partition, _)) = body.from.iter().find(|(q, _)| *q >= partitions) {
        return failure(WireError::of(
            &crate::error::TransportError::UnknownPartition {
                topic: body.topic,
                partition: *partition,
                partitions,
            },
        ));
    }
    let max = body.max.unwrap_or(MAX_READ).clamp(1, MAX_READ);
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    // A position below what the partition still holds moves up to its first record.
    let mut next: Vec<(u32, i64)> = body
        .from
        .iter()
        .map(|(q, offset)| {
            let start = p.broker.start_offset(&body.topic, *q).unwrap_or(0);
            (*q, (*offset).max(start))
        })
        .collect();
    loop {
        let mut records = Vec::new();
        for (q, offset) in next.iter_mut() {
            if records.len() >= max {
                break;
            }
            let batch = p.broker.read(&body.topic, *q, *offset, max - records.len());
            match batch.last() {
                Some(last) => *offset = last.offset + 1,
                // Records removed under the position (committed by every group): go on from
                // what is left, or the wait below would not wait.
                None => {
                    *offset = (*offset).max(p.broker.start_offset(&body.topic, *q).unwrap_or(0))
                }
            }
            records.extend(batch.into_iter().map(ReadRecord::of));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !records.is_empty() || left.is_zero() {
            return Json(ReadResult { records, next }).into_response();
        }
        let waited = tokio::select! {
            waited = p.broker.wait_for_records(&body.topic, &next, left) => waited,
            _ = p.closed.cancelled() => Ok(false),
        };
        match waited {
            Ok(true) => continue,
            Ok(false) => return Json(ReadResult { records, next }).into_response(),
            Err(e) => return failure(WireError::of(&e)),
        }
    }
}

async fn committed(State(p): State<Arc<Published>>, Path(group): Path<String>) -> Response {
    let offsets = p
        .broker
        .committed(&group)
        .into_iter()
        .map(|(tp, o)| (tp.topic.to_string(), tp.partition, o))
        .collect();
    Json(Offsets { offsets }).into_response()
}
