//! The worker's own pages: `GET /health` (liveness), `GET /ready` (readiness), `GET /metrics`
//! and the status page `GET /`: plain HTML rendered on the server, every value escaped.

use super::Served;
use crate::metrics::{self, AgentInfo, Health};
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

/// The page's look: a header, fact cards, and tables that fit a 1280×900 screen.
const STYLE: &str = "\
*{box-sizing:border-box}\
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1f2933;background:#f4f6f8}\
header{display:flex;align-items:center;gap:1em;padding:.7em 1.5em;background:#1f2933;color:#fff}\
header h1{font-size:1.15em;margin:0;font-weight:600}header code{font-size:1em}\
header .links{margin-left:auto}header a{color:#9fd3ff;margin-left:1em}\
main{padding:1em 1.5em}\
.badge{padding:.15em .6em;border-radius:1em;font-size:.85em;font-weight:600;text-transform:uppercase}\
.running{background:#2f9e44}.starting,.rebalancing{background:#e8590c}.stopping{background:#c92a2a}\
#facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(125px,1fr));gap:.6em;margin:0 0 1em}\
#facts div{background:#fff;border-radius:6px;padding:.45em .8em;box-shadow:0 1px 2px #0002}\
#facts dt{font-size:.75em;color:#616e7c;text-transform:uppercase}#facts dd{margin:0;font-weight:600;overflow-wrap:anywhere}\
.grid{display:grid;grid-template-columns:1fr 1fr;gap:0 1.5em}\
section{background:#fff;border-radius:6px;padding:.5em 1em .8em;margin-bottom:1em;box-shadow:0 1px 2px #0002}\
h2{font-size:1em;margin:.3em 0 .5em}\
table{border-collapse:collapse;width:100%}\
th,td{padding:.3em .6em;text-align:left;border-bottom:1px solid #e4e7eb;vertical-align:middle}\
th{font-size:.75em;color:#616e7c;text-transform:uppercase;font-weight:600}\
td{font-variant-numeric:tabular-nums}\
.chart{white-space:nowrap}.chart svg{vertical-align:middle;margin-right:.4em}\
.warn{color:#c92a2a;font-weight:600}.quiet{color:#616e7c}\
";

/// How many seconds the page waits before it reloads itself.
const REFRESH_SECONDS: u32 = 5;

/// A duration as people read it: `42 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`.
fn human(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A rate as people read it: `0`, `3.5`, `120`, `48.2k`, `1.3M`.
fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.1}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else if r >= 100.0 || r == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// A sparkline of the samples (at most [`metrics::HISTORY`], oldest on the left), with the
/// latest value beside it. `None` samples are left out.
fn chart(
    out: &mut String,
    class: &str,
    color: &str,
    samples: &[Option<f64>],
    unit: &str,
    show: fn(f64) -> String,
) {
    const W: f64 = 200.0;
    const H: f64 = 28.0;
    let max = samples.iter().flatten().fold(0.0_f64, |m, v| m.max(*v));
    let top = if max > 0.0 { max } else { 1.0 };
    let step = W / samples.len().saturating_sub(1).max(1) as f64;
    let mut points = String::new();
    for (i, v) in samples.iter().enumerate() {
        if let Some(v) = v {
            let x = i as f64 * step;
            let y = H - 1.0 - (v / top) * (H - 2.0);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
    }
    let latest = samples.last().copied().flatten();
    let _ = write!(
        out,
        "<td class=\"chart {class}\"><svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         role=\"img\"><title>{} s shown, highest {} {unit}</title>\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#f4f6f8\"/>\
         <polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/></svg>\
         <span class=\"value\">{}</span></td>",
        samples.len(),
        show(max),
        points.trim_end(),
        latest.map_or_else(|| "?".to_owned(), show),
    );
}

/// Numbers as ranges: `0-3, 5, 7-8`.
fn ranges(numbers: &[u32]) -> String {
    let mut sorted = numbers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// A row of cells, each escaped.
fn row(out: &mut String, cells: &[String]) {
    for cell in cells {
        let _ = write!(out, "<td>{}</td>", escape(cell));
    }
}

fn header_row(out: &mut String, headers: &[&str]) {
    out.push_str("<tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>\n");
}

fn render(web: &Served) -> String {
    let rt = &web.rt;
    let health = rt.ops.health(rt.stop.is_cancelled());
    let app = escape(&rt.app_id);
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\n\
         <meta name=\"viewport\" content=\"width=device-width\">\n\
         <link rel=\"icon\" href=\"data:,\">\n<title>rill {app}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<header><h1>rill app <code id=\"app\">{app}</code>\
         </h1><span id=\"status\" class=\"badge {status}\">{status}</span>\
         <span class=\"links\"><a href=\"/ready\">ready</a><a href=\"/health\">health</a>\
         <a href=\"/metrics\">metrics</a><a href=\"/tables\">tables (JSON)</a></span></header>\n<main>\n",
        status = health.as_str(),
    );

    // Facts.
    let partitions = rt.ops.partitions();
    let last_commit = match rt.ops.last_commit() {
        Some((ago, took)) => format!("{} ago ({} ms)", human(ago), took.as_millis()),
        None => "none yet".to_owned(),
    };
    let facts = [
        ("uptime", human(rt.ops.uptime())),
        ("last commit", last_commit),
        ("events/s", rate(rt.ops.events_per_second())),
        ("partitions", partitions.len().to_string()),
        ("transport", rt.transport.kind().to_owned()),
        ("broker", rt.settings.broker.clone()),
        (
            "processing guarantee",
            rt.settings.processing_guarantee.to_string(),
        ),
        ("rill", env!("CARGO_PKG_VERSION").to_owned()),
    ];
    out.push_str("<dl id=\"facts\">\n");
    for (k, v) in facts {
        let _ = writeln!(
            out,
            "<div><dt>{}</dt><dd>{}</dd></div>",
            escape(k),
            escape(&v)
        );
    }
    out.push_str("</dl>\n");

    // Agents, with their throughput and lag over the last minutes.
    let errors = crate::engine::Stats::read(&rt.stats.agent_errors);
    let _ = write!(
        out,
        "<section><h2>Agents <span class=\"quiet\">(events/s and lag over the last {} min; \
         this page reloads every {REFRESH_SECONDS} s)</span></h2>\n<table id=\"agents\">\n",
        metrics::HISTORY / 60
    );
    header_row(
        &mut out,
        &[
            &AgentInfo::COLUMNS[..],
            &["events in", "errors", "events/s", "lag"],
        ]
        .concat(),
    );
    for a in rt.ops.agent_status() {
        out.push_str("<tr>");
        let mut cells = a.info.row();
        cells.push(a.events.to_string());
        cells.push(errors.get(&a.info.name).copied().unwrap_or(0).to_string());
        row(&mut out, &cells);
        let rates: Vec<Option<f64>> = a.history.iter().map(|p| Some(p.rate)).collect();
        chart(&mut out, "rate", "#1c7ed6", &rates, "events/s", rate);
        let lags: Vec<Option<f64>> = a.history.iter().map(|p| p.lag.map(|l| l as f64)).collect();
        chart(&mut out, "lag", "#e8590c", &lags, "records", |l| {
            format!("{l:.0}")
        });
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n</section>\n<div class=\"grid\">\n<div>\n");

    // Partitions, one row per topic.
    /// A topic's assigned partitions, their lag and the most lag of one.
    type TopicLag = (Vec<u32>, Option<i64>, Option<i64>);
    let mut topics: std::collections::BTreeMap<&str, TopicLag> = std::collections::BTreeMap::new();
    for (tp, lag) in &partitions {
        let t = topics.entry(&tp.topic).or_default();
        t.0.push(tp.partition);
        if let Some(l) = lag {
            t.1 = Some(t.1.unwrap_or(0) + l);
            t.2 = Some(t.2.unwrap_or(0).max(*l));
        }
    }
    out.push_str("<section><h2>Assigned partitions</h2>\n<table id=\"partitions\">\n");
    header_row(
        &mut out,
        &["topic", "partitions", "count", "lag", "most lag"],
    );
    for (topic, (numbers, lag, most)) in &topics {
        let known = |l: &Option<i64>| l.map_or_else(|| "?".to_owned(), |l| l.to_string());
        out.push_str("<tr>");
        row(
            &mut out,
            &[
                (*topic).to_owned(),
                ranges(numbers),
                numbers.len().to_string(),
                known(lag),
                known(most),
            ],
        );
        out.push_str("</tr>\n");
    }
    if topics.is_empty() {
        out.push_str("<tr><td colspan=\"5\" class=\"quiet\">none (yet)</td></tr>\n");
    }
    out.push_str("</table>\n</section>\n</div>\n<div>\n");

    // Tables.
    out.push_str("<section><h2>Tables</h2>\n<table id=\"tables\">\n");
    header_row(
        &mut out,
        &[
            &crate::table::TABLE_COLUMNS[..],
            &["held here", "standby", "keys", "state"],
        ]
        .concat(),
    );
    for t in &web.tables {
        let recovering = t.recovering();
        let mut cells = crate::table::table_row(&**t);
        cells.push(ranges(&t.held_partitions()));
        cells.push(ranges(&t.standby()));
        cells.push(t.size().to_string());
        cells.push(if recovering.is_empty() {
            "ready".to_owned()
        } else {
            format!("restoring {}", ranges(&recovering))
        });
        out.push_str("<tr>");
        row(&mut out, &cells);
        out.push_str("</tr>\n");
    }
    if web.tables.is_empty() {
        out.push_str("<tr><td colspan=\"7\" class=\"quiet\">none</td></tr>\n");
    }
    out.push_str("</table>\n</section>\n");

    // Errors and dead letters.
    out.push_str("<section><h2>Errors</h2>\n<table id=\"errors\">\n");
    header_row(&mut out, &["kind", "where", "count"]);
    let mut any = false;
    let kinds = [
        (
            "bad input",
            crate::engine::Stats::read(&rt.stats.decode_errors),
        ),
        ("agent error", errors),
        (
            "dead letter",
            crate::engine::Stats::read(&rt.stats.dead_letters),
        ),
    ];
    for (kind, counts) in kinds {
        for (place, n) in counts {
            any = true;
            out.push_str("<tr>");
            row(&mut out, &[kind.to_owned(), place, n.to_string()]);
            out.push_str("</tr>\n");
        }
    }
    if !any {
        out.push_str(
            "<tr><td colspan=\"3\" class=\"quiet\">none since the worker started</td></tr>\n",
        );
    }
    out.push_str("</table>\n");
    let last = rt
        .stats
        .last_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(last) = last {
        let _ = writeln!(
            out,
            "<p id=\"last-error\" class=\"warn\">Last: {} ago, {}: {}</p>",
            escape(&human(last.at.elapsed())),
            escape(&last.source),
            escape(&last.message)
        );
    }
    out.push_str("</section>\n</div>\n</div>\n</main>\n</body>\n</html>\n");
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
        header_row(&mut out, &["<a>"]);
        row(&mut out, &["<b>".to_owned()]);
        assert!(!out.contains("<a>") && !out.contains("<b>"), "{out}");
    }

    #[test]
    fn partitions_read_as_ranges() {
        assert_eq!(ranges(&[5, 0, 1, 2, 7, 8, 3]), "0-3, 5, 7-8");
        assert_eq!(ranges(&[4]), "4");
        assert_eq!(ranges(&[]), "-");
    }

    #[test]
    fn durations_and_rates_read_as_people_write_them() {
        use std::time::Duration;
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(human(Duration::from_secs(7_800)), "2 h 10 min");
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(3.25), "3.2");
        assert_eq!(rate(48_200.0), "48.2k");
        assert_eq!(rate(1_300_000.0), "1.3M");
    }
}
