//! The job page: every stored field, the ledger's rows for the job, its
//! status kept live. A tenant sees only its own jobs: another tenant's job
//! is the same 404 as a job that does not exist.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

use super::page::{self, action, dollars, duration_ms, opt};
use super::{Ui, UiError, Viewer, url_part};
use crate::http::api::AppState;
use crate::queue::inspect::{self, JobInfo};

/// The job, if the viewer may see it (404 otherwise, existing or not).
pub(super) async fn visible_job(st: &AppState, v: &Viewer, id: &str) -> Result<JobInfo, UiError> {
    let info = inspect::job_info(&st.queue, id).await?;
    if !v.admin && info.tenant != v.tenant {
        return Err(UiError::NotFound);
    }
    Ok(info)
}

/// `data-live` key of a job field.
pub(super) fn jkey(field: &str) -> String {
    format!("job.{field}")
}

fn json_block(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn fields(j: &JobInfo) -> Markup {
    let live = |k: &str, v: String| html! { dd data-live=(jkey(k)) { (v) } };
    html! {
        dl.fields {
            dt { "State" } dd { strong #job-state data-live=(jkey("state")) { (j.state) } }
            dt { "Tenant" } dd { (j.tenant) }
            dt { "Queue" } dd { (j.queue) }
            dt { "Kind" } dd { (j.kind) }
            dt { "Attempts" } (live("attempts", format!("{} of {}", j.attempts, j.max_attempts)))
            dt { "Outcome" } (live("outcome", opt(&j.outcome)))
            dt { "Priority" } dd { (j.priority) }
            dt { "Timeout" } dd { @if j.timeout_ms == 0 { "kind default" } @else { (duration_ms(j.timeout_ms as i64)) } }
            dt { "Memory" } dd { @if j.memory == 0 { "kind default" } @else { (crate::model::units::format_size(j.memory)) } }
            dt { "Enqueued" } dd { (opt(&j.enqueued_at)) }
            dt { "Run at" } dd { (opt(&j.run_at)) }
            dt { "Started" } (live("started_at", opt(&j.started_at)))
            dt { "Finished" } (live("finished_at", opt(&j.finished_at)))
            dt { "Lease until" } (live("lease_until", opt(&j.lease_until)))
            dt { "Worker" } (live("worker", opt(&j.worker)))
            dt { "Idempotency key" } dd { (opt(&j.idempotency_key)) }
            dt { "Last error" } dd.error-text data-live=(jkey("last_error")) { (opt(&j.last_error)) }
        }
        h2 { "Payload" }
        pre { code { (json_block(&j.payload)) } }
        h2 { "Result" }
        pre { code data-live=(jkey("result")) { (j.result.as_ref().map_or("—".into(), json_block)) } }
        @if let Some(p) = &j.progress {
            h2 { "Progress" }
            pre { code data-live=(jkey("progress")) { (json_block(p)) } }
        }
    }
}

fn ledger(rows: &Result<Vec<crate::ledger::Row>, crate::ledger::LedgerError>) -> Markup {
    html! {
        h2 { "Ledger" }
        @match rows {
            Err(_) => p.error role="alert" { "The usage database did not answer: ledger rows are not shown." },
            Ok(rows) if rows.is_empty() => p { "No ledger rows yet (one is written per finished attempt)." },
            Ok(rows) => table {
                caption { "One row per finished attempt, from the usage ledger" }
                thead { tr {
                    th scope="col" { "Attempt" } th scope="col" { "Outcome" } th scope="col" { "Started" }
                    th scope="col" { "Finished" } th scope="col" { "Waited" } th scope="col" { "Ran" }
                    th scope="col" { "CPU" } th scope="col" { "Peak memory" } th scope="col" { "Exit" }
                    th scope="col" { "Worker" } th scope="col" { "Tokens in/out" } th scope="col" { "Cost" }
                } }
                tbody { @for r in rows { tr {
                    th scope="row" { (r.attempt) } td { (r.outcome) } td { (r.started_at) } td { (r.finished_at) }
                    td.num { (duration_ms(r.wait_ms)) } td.num { (duration_ms(r.run_ms)) } td.num { (duration_ms(r.cpu_ms)) }
                    td.num { (crate::model::units::format_size(r.peak_rss_bytes.max(0) as u64)) }
                    td { (opt(&r.exit_code)) @if let Some(s) = r.signal { " (signal " (s) ")" } }
                    td { (r.worker) } td.num { (r.input_tokens) " / " (r.output_tokens) } td.num { (dollars(r.cost_micros)) }
                } } }
            },
        }
    }
}

/// `GET /ui/jobs/{id}`.
pub(super) async fn page(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let j = visible_job(&st, &v, &id).await?;
    let rows = crate::ledger::rows_for_job(&st.db, &id).await;
    let dead_actions = v.admin && j.state == "dead";
    let body = html! {
        h1 { "Job " code { (j.id) } }
        @if dead_actions {
            p.actions {
                (action(&v, &format!("/ui/dead/{}/retry", url_part(&j.id)), "Retry", None))
                (action(&v, &format!("/ui/dead/{}/purge", url_part(&j.id)), "Purge", Some("Delete this dead job for good?")))
            }
        }
        (fields(&j))
        (ledger(&rows))
    };
    let live = format!("/ui/live?job={}", url_part(&j.id));
    Ok(page::render(
        &ui,
        &v,
        &format!("Job {}", j.id),
        Some(&live),
        body,
    ))
}

/// `GET /ui/jobs?id=`: the look-up form's target.
pub(super) async fn lookup(
    _v: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let id = q.get("id").map(|s| s.trim()).unwrap_or("");
    if id.is_empty() {
        return Err(UiError::Bad("give a job id".into()));
    }
    Ok(Redirect::to(&format!("/ui/jobs/{}", url_part(id))).into_response())
}
