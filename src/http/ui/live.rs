//! `GET /ui/live[?job=ID]`: a small server-sent event stream of the
//! numbers the viewer's page shows (`counts` events: a JSON object of
//! `data-live` key to text), sent when they change, read every second.
//! Operators get every queue's and tenant's counts, a tenant only its own;
//! with `job`, that job's status (404 if the viewer may not see it). The
//! stream ends when the session does, or the server stops.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::job::{jkey, visible_job};
use super::operator::{qkey, tkey};
use super::page::opt;
use super::{Ui, UiError, Viewer};
use crate::http::api::AppState;
use crate::queue::inspect;

/// How often the numbers are read.
const EVERY: Duration = Duration::from_secs(1);

/// Query of `/ui/live`.
#[derive(Debug, Deserialize)]
pub(super) struct LiveQuery {
    job: Option<String>,
}

type Snapshot = BTreeMap<String, String>;

struct Feed {
    st: AppState,
    ui: Arc<Ui>,
    sid: String,
    tenant: Option<String>,
    job: Option<String>,
    last: Snapshot,
    first: bool,
}

async fn counts(f: &Feed) -> Result<Snapshot, crate::queue::QueueError> {
    let mut m = Snapshot::new();
    if f.tenant.is_none() {
        for s in inspect::queue_stats(&f.st.queue).await? {
            let n = &s.queue;
            m.insert(qkey(n, "ready"), s.ready.to_string());
            m.insert(qkey(n, "delayed"), s.delayed.to_string());
            m.insert(qkey(n, "running"), s.running.to_string());
            m.insert(qkey(n, "dead"), s.dead.to_string());
            m.insert(
                qkey(n, "paused"),
                if s.paused { "yes" } else { "no" }.into(),
            );
        }
    }
    for t in inspect::tenant_stats(&f.st.queue, None).await? {
        if f.tenant.as_ref().is_some_and(|own| *own != t.tenant) {
            continue;
        }
        let n = &t.tenant;
        m.insert(tkey(n, "running"), t.running.to_string());
        m.insert(tkey(n, "ready"), t.ready.to_string());
        m.insert(tkey(n, "delayed"), t.delayed.to_string());
        m.insert(tkey(n, "dead"), t.dead.to_string());
        m.insert(tkey(n, "held"), opt(&t.held));
    }
    Ok(m)
}

async fn job_fields(f: &Feed, id: &str) -> Result<Snapshot, crate::queue::QueueError> {
    let j = inspect::job_info(&f.st.queue, id).await?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut m = Snapshot::new();
    m.insert(jkey("state"), j.state.clone());
    m.insert(
        jkey("attempts"),
        format!("{} of {}", j.attempts, j.max_attempts),
    );
    m.insert(jkey("outcome"), opt(&j.outcome));
    m.insert(jkey("started_at"), opt(&j.started_at));
    m.insert(jkey("finished_at"), opt(&j.finished_at));
    m.insert(jkey("lease_until"), opt(&j.lease_until));
    m.insert(jkey("worker"), opt(&j.worker));
    m.insert(jkey("last_error"), opt(&j.last_error));
    m.insert(jkey("result"), j.result.as_ref().map_or("—".into(), pretty));
    if let Some(p) = &j.progress {
        m.insert(jkey("progress"), pretty(p));
    }
    Ok(m)
}

impl Feed {
    /// The next change (waiting a tick between reads); None when the
    /// session has ended.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if !self.first {
                tokio::select! {
                    () = tokio::time::sleep(EVERY) => {}
                    () = self.ui.stop.cancelled() => return None,
                }
            }
            self.first = false;
            if !self.ui.sessions.alive(&self.sid) {
                return None;
            }
            let now = match &self.job {
                Some(id) => job_fields(self, id).await,
                None => counts(self).await,
            };
            // A failed read is skipped: the page keeps its last numbers.
            let Ok(now) = now else { continue };
            if now != self.last {
                let data = serde_json::to_string(&now).unwrap_or_else(|_| "{}".into());
                self.last = now;
                return Some(Event::default().event("counts").data(data));
            }
        }
    }
}

/// `GET /ui/live`.
pub(super) async fn stream(
    State(st): State<AppState>,
    Extension(ui): Extension<Arc<Ui>>,
    v: Viewer,
    Query(q): Query<LiveQuery>,
) -> Result<Response, UiError> {
    if let Some(id) = &q.job {
        visible_job(&st, &v, id).await?;
    }
    let feed = Feed {
        st,
        ui,
        sid: v.sid.clone(),
        tenant: (!v.admin).then(|| v.tenant.clone()),
        job: q.job,
        last: Snapshot::new(),
        first: true,
    };
    let events = futures::stream::unfold(feed, |mut f| async move {
        let e = f.next().await?;
        Some((Ok::<_, Infallible>(e), f))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
