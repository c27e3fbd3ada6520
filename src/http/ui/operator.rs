//! The operator's pages: queues (pause, resume, drain), tenants, usage
//! and cost per day, dead letters (retry, purge). Every action goes
//! through the queue functions `agentq pause|resume|drain|dead` and
//! `/v1/admin` use, with the same checks, and is audit-logged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::NaiveDate;
use maud::{Markup, html};

use super::page::{self, action, dollars, opt, quota_bar};
use super::session::check_csrf;
use super::{Ui, UiError, Viewer, chart, url_part};
use crate::http::api::AppState;
use crate::model::names::validate_name;
use crate::queue::inspect::{self, JobState, QueueStats};
use crate::usage::{self, Period};

/// `data-live` key of a queue's count.
pub(super) fn qkey(queue: &str, field: &str) -> String {
    format!("q.{queue}.{field}")
}

/// `data-live` key of a tenant's count.
pub(super) fn tkey(tenant: &str, field: &str) -> String {
    format!("t.{tenant}.{field}")
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn queue_row(v: &Viewer, s: &QueueStats) -> Markup {
    let base = format!("/ui/queues/{}", url_part(&s.queue));
    html! {
        tr {
            th scope="row" { (s.queue) }
            td.num data-live=(qkey(&s.queue, "ready")) { (s.ready) }
            td.num data-live=(qkey(&s.queue, "delayed")) { (s.delayed) }
            td.num data-live=(qkey(&s.queue, "running")) { (s.running) }
            td.num data-live=(qkey(&s.queue, "dead")) {
                a href=(format!("/ui/dead?queue={}", url_part(&s.queue))) { (s.dead) }
            }
            td data-live=(qkey(&s.queue, "paused")) { (yes_no(s.paused)) }
            td.actions {
                @if s.paused {
                    (action(v, &format!("{base}/resume"), "Resume", None))
                    (action(v, &format!("{base}/purge"), "Purge waiting", Some("Delete every ready and delayed job of this queue?")))
                } @else {
                    (action(v, &format!("{base}/pause"), "Pause", None))
                    (action(v, &format!("{base}/drain"), "Drain", None))
                }
            }
        }
    }
}

/// `GET /ui/queues`.
pub(super) async fn queues(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
) -> Result<Response, UiError> {
    v.need_admin()?;
    let stats = inspect::queue_stats(&st.queue).await?;
    let body = html! {
        h1 { "Queues" }
        @if stats.is_empty() { p { "No queues yet: nothing was enqueued on this namespace." } }
        @else {
            table {
                caption { "Jobs per queue, summed over partitions" }
                thead { tr {
                    th scope="col" { "Queue" } th scope="col" { "Ready" } th scope="col" { "Delayed" }
                    th scope="col" { "Running" } th scope="col" { "Dead" } th scope="col" { "Paused" }
                    th scope="col" { "Actions" }
                } }
                tbody { @for s in &stats { (queue_row(&v, s)) } }
            }
        }
        p.hint { "Pause stops new starts fleet-wide (running jobs finish). Drain pauses; once nothing runs, Purge waiting deletes the queue's ready and delayed jobs (as agentq drain --purge)." }
    };
    Ok(page::render(&ui, &v, "Queues", Some("/ui/live"), body))
}

/// `POST /ui/queues/{queue}/{pause|resume|drain|purge}`.
pub(super) async fn queue_action(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Path((queue, act)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    v.need_admin()?;
    check_csrf(&v, &form)?;
    validate_name("queue", &queue)?;
    let q = &st.queue;
    let text = match act.as_str() {
        "pause" | "drain" => {
            let changed = q.set_paused(&queue, None, true).await?;
            let running = running_in(&st, &queue).await?;
            let was = if changed {
                "paused"
            } else {
                "was already paused"
            };
            if act == "pause" {
                format!("Queue {queue} {was}: no new starts fleet-wide ({running} still running).")
            } else {
                format!(
                    "Draining {queue}: {was}; {running} running. Once none run, Purge waiting deletes its ready and delayed jobs."
                )
            }
        }
        "resume" => {
            let changed = q.set_paused(&queue, None, false).await?;
            let was = if changed { "resumed" } else { "was not paused" };
            format!("Queue {queue} {was}.")
        }
        "purge" => purge_waiting(&st, &queue).await?,
        _ => return Err(UiError::NotFound),
    };
    audit(&v, &format!("queue.{act}"), &queue, "");
    ui.sessions.flash(&v.sid, text);
    Ok(Redirect::to("/ui/queues").into_response())
}

async fn running_in(st: &AppState, queue: &str) -> Result<i64, UiError> {
    let stats = inspect::queue_stats(&st.queue).await?;
    Ok(stats
        .iter()
        .find(|s| s.queue == queue)
        .map_or(0, |s| s.running))
}

/// The last step of a drain: only a paused queue with nothing running.
async fn purge_waiting(st: &AppState, queue: &str) -> Result<String, UiError> {
    let stats = inspect::queue_stats(&st.queue).await?;
    let Some(s) = stats.iter().find(|s| s.queue == queue) else {
        return Err(UiError::NotFound);
    };
    if !s.paused || s.running > 0 {
        return Ok(format!(
            "Not purged: queue {queue} must be paused with nothing running (running: {}).",
            s.running
        ));
    }
    let done = st.queue.purge_waiting(queue).await?;
    let total: u64 = done.values().sum();
    Ok(format!(
        "Purged {total} waiting jobs of queue {queue}; it stays paused."
    ))
}

fn audit(v: &Viewer, what: &str, target: &str, tenant: &str) {
    tracing::info!(
        target: "agentq::audit",
        admin = %v.who,
        client = %v.client,
        action = what,
        on = %target,
        tenant = %tenant,
        via = "ui",
        "operator action from the dashboard"
    );
}

/// This month's cost per tenant, from the ledger's rollup (None: the
/// database did not answer; the page shows a dash).
async fn month_cost(st: &AppState, tenant: Option<&str>) -> Option<BTreeMap<String, i64>> {
    let today = chrono::Utc::now().date_naive();
    let since = usage::month_start(today);
    let rows = usage::report(&st.db, tenant, since, today, Period::Month)
        .await
        .ok()?;
    let mut out = BTreeMap::new();
    for r in rows {
        *out.entry(r.tenant).or_insert(0) += r.cost_micros;
    }
    Some(out)
}

fn tenant_row(t: &inspect::TenantStats, cost: Option<&BTreeMap<String, i64>>) -> Markup {
    let n = &t.tenant;
    let cost = cost.map_or("—".to_string(), |c| {
        dollars(c.get(n).copied().unwrap_or(0))
    });
    html! {
        tr {
            th scope="row" { (n) }
            td { (opt(&t.tier)) }
            td.num { span data-live=(tkey(n, "running")) { (t.running) } " / " (t.cap) }
            td.num data-live=(tkey(n, "ready")) { (t.ready) }
            td.num data-live=(tkey(n, "delayed")) { (t.delayed) }
            td.num { a href=(format!("/ui/dead?tenant={}", url_part(n))) data-live=(tkey(n, "dead")) { (t.dead) } }
            td.num { (t.weight) }
            td data-live=(tkey(n, "held")) { (opt(&t.held)) }
            td { (quota_bar(t.usage_ms, t.quota_ms, &format!("quota used by {n}"))) }
            td.num { (cost) }
        }
    }
}

/// `GET /ui/tenants`.
pub(super) async fn tenants(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
) -> Result<Response, UiError> {
    v.need_admin()?;
    let stats = inspect::tenant_stats(&st.queue, None).await?;
    let cost = month_cost(&st, None).await;
    let body = html! {
        h1 { "Tenants" }
        @if cost.is_none() { p.error role="alert" { "The usage database did not answer: costs are not shown." } }
        table {
            caption { "Every tenant known to the queue: limits in effect, current jobs, this month's quota use and cost" }
            thead { tr {
                th scope="col" { "Tenant" } th scope="col" { "Tier" } th scope="col" { "Running / cap" }
                th scope="col" { "Ready" } th scope="col" { "Delayed" } th scope="col" { "Dead" }
                th scope="col" { "Weight" } th scope="col" { "Held (why)" } th scope="col" { "Quota this month" }
                th scope="col" { "Cost this month" }
            } }
            tbody { @for t in &stats { (tenant_row(t, cost.as_ref())) } }
        }
        p.hint { "Held: why ready work is not starting — paused, cap (running at its concurrency cap), quota or rate." }
    };
    Ok(page::render(&ui, &v, "Tenants", Some("/ui/live"), body))
}

/// A `YYYY-MM-DD` parameter, or `default`.
pub(super) fn date(
    q: &HashMap<String, String>,
    k: &str,
    default: NaiveDate,
) -> Result<NaiveDate, UiError> {
    match q.get(k).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| UiError::Bad(format!("{k}={s:?} is not a date: use YYYY-MM-DD"))),
    }
}

/// A name parameter (`queue`, `tenant`), checked; empty is none.
fn name<'a>(q: &'a HashMap<String, String>, k: &str) -> Result<Option<&'a str>, UiError> {
    let v = q.get(k).map(String::as_str).filter(|s| !s.is_empty());
    if let Some(n) = v {
        validate_name(k, n)?;
    }
    Ok(v)
}

/// `GET /ui/usage?since=&until=&tenant=`: agent time and cost per day.
pub(super) async fn usage(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    v.need_admin()?;
    let today = chrono::Utc::now().date_naive();
    let since = date(&q, "since", usage::month_start(today))?;
    let until = date(&q, "until", today)?;
    if since > until {
        return Err(UiError::Bad(format!(
            "since {since} is after until {until}"
        )));
    }
    let tenant = name(&q, "tenant")?;
    let rows = usage::report(&st.db, tenant, since, until, Period::Day).await?;
    let body = html! {
        h1 { "Usage and cost" }
        form.filters method="get" action="/ui/usage" {
            label for="since" { "From" } input #since type="date" name="since" value=(since);
            label for="until" { "To" } input #until type="date" name="until" value=(until);
            label for="tenant" { "Tenant" } input #tenant type="text" name="tenant" value=(tenant.unwrap_or("")) placeholder="all";
            button type="submit" { "Show" }
        }
        (chart::usage_section(&rows, since, until))
    };
    Ok(page::render(&ui, &v, "Usage", None, body))
}

fn dead_row(v: &Viewer, queue: &str, j: &inspect::JobSummary) -> Markup {
    let id = url_part(&j.id);
    html! {
        tr {
            td { a href=(format!("/ui/jobs/{id}")) { code { (j.id) } } }
            td { (queue) }
            td { (j.tenant) }
            td { (j.kind) }
            td.num { (j.attempts) }
            td { (opt(&j.finished_at)) }
            td.error-text { (opt(&j.last_error)) }
            td.actions {
                (action(v, &format!("/ui/dead/{id}/retry"), "Retry", None))
                (action(v, &format!("/ui/dead/{id}/purge"), "Purge", Some("Delete this dead job for good?")))
            }
        }
    }
}

/// `GET /ui/dead?queue=&tenant=`: dead jobs, newest first per queue.
pub(super) async fn dead(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    v.need_admin()?;
    let tenant = name(&q, "tenant")?;
    let only = name(&q, "queue")?;
    let all = inspect::queue_names(&st.queue).await?;
    let mut rows = Vec::new();
    for queue in all.iter().filter(|n| only.is_none_or(|o| o == n.as_str())) {
        for j in inspect::list_jobs(&st.queue, queue, tenant, Some(JobState::Dead), 100).await? {
            rows.push((queue.clone(), j));
        }
    }
    let body = html! {
        h1 { "Dead letters" }
        form.filters method="get" action="/ui/dead" {
            label for="queue" { "Queue" }
            select #queue name="queue" {
                option value="" { "all" }
                @for n in &all { option value=(n) selected[only == Some(n.as_str())] { (n) } }
            }
            label for="tenant" { "Tenant" }
            input #tenant type="text" name="tenant" value=(tenant.unwrap_or("")) placeholder="all";
            button type="submit" { "Filter" }
        }
        @if rows.is_empty() { p { "No dead jobs here." } }
        @else {
            table {
                caption { "Dead jobs with their last error (up to 100 per queue)" }
                thead { tr {
                    th scope="col" { "Job" } th scope="col" { "Queue" } th scope="col" { "Tenant" }
                    th scope="col" { "Kind" } th scope="col" { "Attempts" } th scope="col" { "Died" }
                    th scope="col" { "Last error" } th scope="col" { "Actions" }
                } }
                tbody { @for (queue, j) in &rows { (dead_row(&v, queue, j)) } }
            }
        }
    };
    Ok(page::render(&ui, &v, "Dead letters", None, body))
}

/// `POST /ui/dead/{id}/{retry|purge}`: as `POST /v1/admin/dead/{id}/retry`
/// and `DELETE /v1/admin/dead/{id}` (the queue's dead-letter script).
pub(super) async fn dead_action(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Path((id, act)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    v.need_admin()?;
    check_csrf(&v, &form)?;
    let retry = match act.as_str() {
        "retry" => true,
        "purge" => false,
        _ => return Err(UiError::NotFound),
    };
    let Some(info) = st.queue.change_dead_job(&id, retry).await? else {
        let text = format!("Job {id} is not dead: only dead jobs can be retried or purged.");
        ui.sessions.flash(&v.sid, text);
        return Ok(Redirect::to("/ui/dead").into_response());
    };
    audit(
        &v,
        if retry { "dead.retry" } else { "dead.purge" },
        &id,
        &info.tenant,
    );
    if retry {
        ui.sessions.flash(
            &v.sid,
            format!("Job {id} is ready to run again with fresh attempts."),
        );
        return Ok(Redirect::to(&format!("/ui/jobs/{}", url_part(&id))).into_response());
    }
    ui.sessions.flash(&v.sid, format!("Job {id} purged."));
    Ok(Redirect::to("/ui/dead").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_escaped() {
        let v = Viewer {
            sid: "s".into(),
            tenant: "*".into(),
            admin: true,
            who: "op".into(),
            csrf: "t\"><x>".into(),
            client: std::net::IpAddr::from([127, 0, 0, 1]),
        };
        let j = inspect::JobSummary {
            id: "0-1".into(),
            tenant: "acme".into(),
            kind: "echo".into(),
            state: "dead".into(),
            attempts: 1,
            enqueued_at: None,
            last_error: Some("<script>alert(1)</script>".into()),
            finished_at: None,
        };
        let html = dead_row(&v, "q", &j).into_string();
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(
            !html.contains("<script>") && !html.contains("<x>"),
            "{html}"
        );
        assert!(html.contains(r#"value="t&quot;&gt;&lt;x&gt;""#), "{html}");
    }
}
