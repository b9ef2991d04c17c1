//! The worker's own pages: `GET /health` (liveness), `GET /ready` (readiness), `GET /metrics`
//! and the status page `GET /`: plain HTML rendered on the server, every value escaped.

use super::Served;
use crate::metrics::{self, list, AgentInfo, Health};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use std::fmt::Write;
use std::sync::Arc;

/// Liveness: 200 while the worker runs (`status`: `starting`, `running`, `rebalancing`; with
/// `ready` saying whether it serves, see [`ready`]), 503 `stopping` once it drains. A process
/// supervisor restarts a worker on 503; a load balancer asks [`ready`].
pub(super) async fn health(State(web): State<Arc<Served>>) -> Response {
    let rt = &web.rt;
    let health = rt.ops.health(rt.stop.is_cancelled());
    let code = if health == Health::Stopping {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({
        "status": health.as_str(),
        "ready": rt.readiness().is_ok(),
        "app": &*rt.app_id,
        "transport": rt.transport.kind(),
        "partitions": rt.ops.partitions().len(),
    });
    (code, Json(body)).into_response()
}

/// Readiness: 200 `{"status": "ready"}` when the worker has its partitions and every table
/// partition it owns is restored, so that it processes events and answers lookups; else 503
/// with why (`starting`, `rebalancing`, `restoring` with the partitions, or `stopping`).
pub(super) async fn ready(State(web): State<Arc<Served>>) -> Response {
    let (code, body) = match web.rt.readiness() {
        Ok(()) => (StatusCode::OK, serde_json::json!({ "status": "ready" })),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    };
    (code, Json(body)).into_response()
}

/// The metrics in Prometheus's text exposition format.
pub(super) async fn metrics(State(web): State<Arc<Served>>) -> Response {
    let Some(prometheus) = metrics::prometheus() else {
        return (
            StatusCode::NOT_FOUND,
            "this program installed a metrics recorder of its own: rill's metrics go there\n",
        )
            .into_response();
    };
    web.refresh().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus.render(),
    )
        .into_response()
}

/// The status page.
pub(super) async fn page(State(web): State<Arc<Served>>) -> Html<String> {
    web.refresh().await;
    Html(render(&web))
}

/// Escapes text for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A table with an id, its header and rows; every cell is escaped.
fn table(out: &mut String, id: &str, headers: &[&str], rows: &[Vec<String>]) {
    let _ = write!(out, "<table id=\"{id}\">\n<tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

fn render(web: &Served) -> String {
    let rt = &web.rt;
    let health = rt.ops.health(rt.stop.is_cancelled());
    let app = escape(&rt.app_id);
    let mut out = format!(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"5\">\n<title>rill {app}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;\
         margin-bottom:1.5em}}th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}\
         </style>\n</head>\n<body>\n<h1>rill app <code id=\"app\">{app}</code></h1>\n"
    );
    let facts = [
        ("status", health.as_str().to_owned()),
        ("transport", rt.transport.kind().to_owned()),
        ("broker", rt.settings.broker.clone()),
        (
            "processing guarantee",
            rt.settings.processing_guarantee.to_string(),
        ),
        ("events/s", format!("{:.1}", rt.ops.events_per_second())),
        ("rill", env!("CARGO_PKG_VERSION").to_owned()),
    ];
    out.push_str("<dl id=\"facts\">\n");
    for (k, v) in facts {
        let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(&v));
    }
    out.push_str("</dl>\n<h2>Agents</h2>\n");
    let agents: Vec<Vec<String>> = rt
        .ops
        .agents()
        .into_iter()
        .map(|(a, events)| {
            let mut row = a.row();
            row.push(events.to_string());
            row
        })
        .collect();
    let columns = [&AgentInfo::COLUMNS[..], &["events in"]].concat();
    table(&mut out, "agents", &columns, &agents);
    out.push_str("<h2>Assigned partitions</h2>\n");
    let partitions: Vec<Vec<String>> = rt
        .ops
        .partitions()
        .into_iter()
        .map(|(tp, lag)| {
            vec![
                tp.topic.to_string(),
                tp.partition.to_string(),
                lag.map_or_else(|| "?".to_owned(), |l| l.to_string()),
            ]
        })
        .collect();
    table(
        &mut out,
        "partitions",
        &["topic", "partition", "lag"],
        &partitions,
    );
    out.push_str("<h2>Tables</h2>\n");
    let tables: Vec<Vec<String>> = web
        .tables
        .iter()
        .map(|t| {
            let recovering = t.recovering();
            let mut row = crate::table::table_row(&**t);
            row.push(list(&t.held_partitions()));
            row.push(t.size().to_string());
            row.push(if recovering.is_empty() {
                "ready".to_owned()
            } else {
                format!("recovering {}", list(&recovering))
            });
            row
        })
        .collect();
    let columns = [
        &crate::table::TABLE_COLUMNS[..],
        &["held here", "keys", "state"],
    ]
    .concat();
    table(&mut out, "tables", &columns, &tables);
    out.push_str("<p><a href=\"/health\">health</a> · <a href=\"/metrics\">metrics</a> · <a href=\"/tables\">tables (JSON)</a></p>\n</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<script>alert('x' & \"y\")</script>"),
            "&lt;script&gt;alert(&#39;x&#39; &amp; &quot;y&quot;)&lt;/script&gt;"
        );
        let mut out = String::new();
        table(&mut out, "t", &["<a>"], &[vec!["<b>".to_owned()]]);
        assert!(!out.contains("<a>") && !out.contains("<b>"), "{out}");
    }
}
