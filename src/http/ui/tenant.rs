//! The tenant's page: its own jobs (waiting, running, dead), this month's
//! quota use, usage and cost. Nothing of another tenant is read into it:
//! jobs are listed by tenant, usage is read under row-level security.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::Response;
use maud::{Markup, html};

use super::operator::{date, tkey};
use super::page::{self, opt, quota_bar};
use super::{Ui, UiError, Viewer, chart, url_part};
use crate::http::api::AppState;
use crate::queue::inspect::{self, JobSummary};
use crate::usage::{self, Period};

/// Jobs of `tenant` shown at most per queue.
const PER_QUEUE: usize = 50;

async fn own_jobs(st: &AppState, tenant: &str) -> Result<Vec<(String, JobSummary)>, UiError> {
    let mut out = Vec::new();
    for queue in inspect::queue_names(&st.queue).await? {
        for j in inspect::list_jobs(&st.queue, &queue, Some(tenant), None, PER_QUEUE).await? {
            out.push((queue.clone(), j));
        }
    }
    Ok(out)
}

fn jobs_table(jobs: &[(String, JobSummary)]) -> Markup {
    html! {
        @if jobs.is_empty() { p { "No waiting, running or dead jobs. Finished jobs: open them by id." } }
        @else {
            table {
                caption { "Your waiting, running and dead jobs (up to 50 per queue)" }
                thead { tr {
                    th scope="col" { "Job" } th scope="col" { "Queue" } th scope="col" { "Kind" }
                    th scope="col" { "State" } th scope="col" { "Attempts" } th scope="col" { "Enqueued" }
                    th scope="col" { "Last error" }
                } }
                tbody { @for (q, j) in jobs { tr {
                    td { a href=(format!("/ui/jobs/{}", url_part(&j.id))) { code { (j.id) } } }
                    td { (q) } td { (j.kind) } td { (j.state) } td.num { (j.attempts) }
                    td { (opt(&j.enqueued_at)) } td.error-text { (opt(&j.last_error)) }
                } } }
            }
        }
    }
}

/// `GET /ui/tenant?since=&until=`.
pub(super) async fn home(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, UiError> {
    if v.admin {
        return Err(UiError::NotFound);
    }
    let t = v.tenant.clone();
    let stats = inspect::tenant_stats(&st.queue, None).await?;
    let me = stats
        .into_iter()
        .find(|s| s.tenant == t)
        .unwrap_or_default();
    let today = chrono::Utc::now().date_naive();
    let since = date(&q, "since", usage::month_start(today))?;
    let until = date(&q, "until", today)?;
    let rows = usage::tenant_report(&st.db, &t, since, until, Period::Day).await?;
    let jobs = own_jobs(&st, &t).await?;
    let body = html! {
        h1 { "Tenant " (t) }
        dl.fields {
            dt { "Running / cap" } dd { span data-live=(tkey(&t, "running")) { (me.running) } " / " (me.cap) }
            dt { "Ready" } dd data-live=(tkey(&t, "ready")) { (me.ready) }
            dt { "Delayed" } dd data-live=(tkey(&t, "delayed")) { (me.delayed) }
            dt { "Dead" } dd data-live=(tkey(&t, "dead")) { (me.dead) }
            dt { "Held (why)" } dd data-live=(tkey(&t, "held")) { (opt(&me.held)) }
            dt { "Tier" } dd { (opt(&me.tier)) }
            dt { "Quota this month" } dd { (quota_bar(me.usage_ms, me.quota_ms, "your quota used this month")) }
        }
        h2 { "Jobs" }
        (jobs_table(&jobs))
        form.filters method="get" action="/ui/tenant" {
            label for="since" { "From" } input #since type="date" name="since" value=(since);
            label for="until" { "To" } input #until type="date" name="until" value=(until);
            button type="submit" { "Show usage" }
        }
        (chart::usage_section(&rows, since, until))
    };
    Ok(page::render(
        &ui,
        &v,
        &format!("Tenant {t}"),
        Some("/ui/live"),
        body,
    ))
}
