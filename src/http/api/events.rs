//! Job events over HTTP: Server-Sent Events for one job
//! (`GET /v1/jobs/{id}/events`) or all of the caller's tenant's jobs
//! (`GET /v1/events`), the same over a WebSocket (`GET /v1/ws`), and the
//! long poll `GET /v1/jobs/{id}?wait=30s`.
//!
//! A tenant sees only its own events: the stream read is always the
//! caller's tenant's (from its key or JWT), and a job of another tenant is
//! refused before anything is read. Each SSE event carries its stream
//! position as `id:`, so a client that reconnects with `Last-Event-ID`
//! (or `?after=`) resumes after it and misses nothing still retained.
//! Browsers cannot set headers on `EventSource` or `WebSocket`: these
//! routes also take the key or JWT as `?access_token=`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;

use super::{ApiError, AppState, Caller};
use crate::model::job_event::{EventId, JobEvent};
use crate::queue::hub::Follower;
use crate::queue::inspect::JobInfo;

/// Longest `?wait=` a long poll may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a follower of one job re-reads the job, so it ends even when
/// the job's queue publishes no events (`agentq job-events Q off`) or its
/// events were trimmed.
const RECHECK: Duration = Duration::from_secs(2);

/// How many streams each tenant holds open on this server.
pub(super) struct OpenStreams {
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    max: usize,
}

/// One tenant's place among its open streams; given back when dropped
/// (the stream ended or its client went away).
pub(super) struct StreamPlace {
    streams: std::sync::Arc<OpenStreams>,
    tenant: String,
}

impl OpenStreams {
    pub(super) fn new(max: usize) -> OpenStreams {
        OpenStreams {
            open: Default::default(),
            max,
        }
    }

    /// A place for one more stream of `tenant`, or 429 past its share.
    fn take(self: &std::sync::Arc<Self>, tenant: &str) -> Result<StreamPlace, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(tenant.to_string()).or_insert(0);
        if *n >= self.max {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "this tenant already holds {} event streams and long polls on this server; \
                     close one first",
                    self.max
                ),
            ));
        }
        *n += 1;
        Ok(StreamPlace {
            streams: self.clone(),
            tenant: tenant.to_string(),
        })
    }
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

/// Query of the streaming routes.
#[derive(Debug, Default, Deserialize)]
pub(super) struct StreamQuery {
    /// Resume after this position (as `Last-Event-ID`).
    after: Option<String>,
    /// Only this job's events (`/v1/events`, `/v1/ws`).
    job: Option<String>,
    /// The API key or JWT, for clients that cannot send headers.
    access_token: Option<String>,
}

/// `Authorization` from `?access_token=` when the request has none.
fn with_token(mut headers: HeaderMap, q: &StreamQuery) -> HeaderMap {
    if let Some(t) = &q.access_token
        && !headers.contains_key(header::AUTHORIZATION)
        && let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}"))
    {
        headers.insert(header::AUTHORIZATION, v);
    }
    headers
}

/// The position to resume after: `Last-Event-ID`, else `?after=`.
fn resume_point(headers: &HeaderMap, q: &StreamQuery) -> Result<Option<EventId>, ApiError> {
    let given = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(q.after.as_deref());
    match given {
        None => Ok(None),
        Some(s) => EventId::parse(s).map(Some).ok_or_else(|| {
            ApiError::bad(format!(
                "event position {s:?} is not valid: use the id of an event (<ms>-<seq>)"
            ))
        }),
    }
}

async fn caller(
    st: &AppState,
    headers: HeaderMap,
    q: &StreamQuery,
    client: SocketAddr,
) -> Result<(Caller, HeaderMap), ApiError> {
    let headers = with_token(headers, q);
    let c = super::caller_of(st, &headers, client.ip()).await?;
    Ok((c, headers))
}

/// Where a job's events begin: just before its enqueue time.
fn job_start(info: &JobInfo) -> EventId {
    EventId {
        ms: info.enqueued_ms.unwrap_or(0).saturating_sub(1),
        seq: 0,
    }
}

/// `GET /v1/jobs/{id}/events`: the job's events from its enqueue (or
/// after `Last-Event-ID`) until it ends.
pub(super) async fn job_events(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let (caller, headers) = caller(&st, headers, &q, client).await?;
    let place = st.streams.take(&caller.tenant)?;
    let info = super::own_job(&st, &caller.tenant, &id).await?;
    let after = resume_point(&headers, &q)?.unwrap_or_else(|| job_start(&info));
    let follower = st.hub.follow(&caller.tenant, Some(after)).await?;
    let stream = JobStream {
        st,
        follower,
        id,
        ended: false,
        _place: place,
    };
    Ok(sse(futures::stream::unfold(stream, |mut s| async move {
        let e = s.next().await?;
        Some((e, s))
    })))
}

/// `GET /v1/events`: every event of the caller's tenant from now (or after
/// `Last-Event-ID`), optionally only one job's (`?job=`).
pub(super) async fn tenant_events(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let (follower, only, place) = follow_tenant(&st, headers, &q, client).await?;
    Ok(sse(futures::stream::unfold(
        (follower, only, place),
        |(mut f, only, place)| async move {
            let e = next_matching(&mut f, only.as_deref()).await?;
            Some((e, (f, only, place)))
        },
    )))
}

/// The caller's tenant's events from the request's resume point, the job
/// to keep to (`?job=`), and the stream's place among the tenant's.
async fn follow_tenant(
    st: &AppState,
    headers: HeaderMap,
    q: &StreamQuery,
    client: SocketAddr,
) -> Result<(Follower, Option<String>, StreamPlace), ApiError> {
    let (caller, headers) = caller(st, headers, q, client).await?;
    let place = st.streams.take(&caller.tenant)?;
    let after = resume_point(&headers, q)?;
    let follower = st.hub.follow(&caller.tenant, after).await?;
    Ok((follower, q.job.clone(), place))
}

/// `GET /v1/ws`: the tenant's events (as `/v1/events`) as WebSocket text
/// messages, one JSON event each. The client sends nothing; closing ends it.
pub(super) async fn websocket(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (follower, only, place) = follow_tenant(&st, headers, &q, client).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        pump(socket, follower, only).await;
        drop(place);
    }))
}

async fn pump(mut socket: WebSocket, mut f: Follower, only: Option<String>) {
    loop {
        tokio::select! {
            e = next_matching(&mut f, only.as_deref()) => {
                let Some(e) = e else { return };
                let Ok(text) = serde_json::to_string(&e) else { continue };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            m = socket.recv() => match m {
                // pings are answered by axum; anything else is ignored
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The follower's next event (of `only`, if given); None when the hub
/// fails (the client reconnects and resumes).
async fn next_matching(f: &mut Follower, only: Option<&str>) -> Option<JobEvent> {
    loop {
        match f.next().await {
            Ok(e) if only.is_none_or(|j| j == e.job) => return Some(e),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "job event stream ended");
                return None;
            }
        }
    }
}

/// One job's events until it ends.
struct JobStream {
    st: AppState,
    follower: Follower,
    id: String,
    ended: bool,
    _place: StreamPlace,
}

impl JobStream {
    async fn next(&mut self) -> Option<JobEvent> {
        if self.ended {
            return None;
        }
        loop {
            let recheck = tokio::time::sleep(RECHECK);
            tokio::select! {
                e = next_matching(&mut self.follower, Some(&self.id)) => {
                    let e = e?;
                    self.ended = e.kind.is_final();
                    return Some(e);
                }
                () = recheck => {
                    if let Some(e) = self.ended_quietly().await {
                        self.ended = true;
                        return Some(e);
                    }
                }
            }
        }
    }

    /// The job ended without a final event reaching this stream (its queue
    /// publishes none, or they were trimmed): its end, read from the job.
    async fn ended_quietly(&self) -> Option<JobEvent> {
        let info = crate::queue::inspect::job_info(&self.st.queue, &self.id)
            .await
            .ok()?;
        if !info.is_final() {
            return None;
        }
        Some(info.final_event(self.follower.position()))
    }
}

fn sse(events: impl Stream<Item = JobEvent> + Send + 'static) -> Response {
    use futures::StreamExt;
    let stream = events.map(|e| {
        let data = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
        Ok::<_, Infallible>(
            Event::default()
                .id(e.id.clone())
                .event(e.kind.as_str())
                .data(data),
        )
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `?wait=` of `GET /v1/jobs/{id}`, capped at [`MAX_WAIT`].
pub(super) fn parse_wait(v: Option<&String>) -> Result<Option<Duration>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let d = crate::model::units::parse_duration(v)
        .map_err(|e| ApiError::bad(format!("wait={v:?} is not a duration ({e}): use e.g. 30s")))?;
    Ok(Some(d.min(MAX_WAIT)))
}

/// The job once it has ended, or as it is when `wait` runs out.
pub(super) async fn wait_final(
    st: &AppState,
    tenant: &str,
    id: &str,
    wait: Duration,
) -> Result<JobInfo, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let _place = st.streams.take(tenant)?;
    let mut follower = st.hub.follow(tenant, None).await?;
    loop {
        // Read after following: an end between the two is seen either way.
        let info = super::own_job(st, tenant, id).await?;
        if info.is_final() || tokio::time::Instant::now() >= deadline {
            return Ok(info);
        }
        let ended = async {
            loop {
                match next_matching(&mut follower, Some(id)).await {
                    Some(e) if e.kind.is_final() => return,
                    Some(_) => {}
                    // the hub failed: fall back to re-reading the job
                    None => return tokio::time::sleep(RECHECK).await,
                }
            }
        };
        tokio::select! {
            () = ended => {}
            () = tokio::time::sleep(RECHECK) => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}
