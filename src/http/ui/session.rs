//! Server-side sessions: a random id in a cookie maps to the credential
//! the viewer signed in with, its expiry, its CSRF token and a one-shot
//! message. Sign-in and sign-out, the CSRF and Origin checks of every POST.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Form, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::{Ui, UiError, page};
use crate::http::api::{AppState, keys::Scope};

/// The session cookie.
const COOKIE: &str = "agentq_session";
/// The sign-in form's own CSRF cookie (before there is a session).
const LOGIN_COOKIE: &str = "agentq_login";
/// Sessions kept at most (expired ones are dropped first).
const MAX_SESSIONS: usize = 10_000;
/// Sessions one key or JWT may hold: signing in again past this ends its
/// oldest session, so one tenant cannot fill [`MAX_SESSIONS`] and lock
/// everyone else out of the dashboard.
const MAX_PER_CREDENTIAL: usize = 16;

/// One signed-in browser.
struct Session {
    credential: String,
    csrf: String,
    expires: Instant,
    flash: Option<String>,
}

/// Every session of this server (memory only: a restart signs everyone out).
pub(super) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    ttl: Duration,
}

/// End the oldest sessions of `credential` until it holds at most `keep`.
fn evict_oldest_beyond(m: &mut HashMap<String, Session>, credential: &str, keep: usize) {
    let mut own: Vec<(Instant, String)> = m
        .iter()
        .filter(|(_, s)| s.credential == credential)
        .map(|(id, s)| (s.expires, id.clone()))
        .collect();
    if own.len() <= keep {
        return;
    }
    own.sort();
    let over = own.len() - keep;
    for (_, id) in own.into_iter().take(over) {
        m.remove(&id);
    }
}

/// 32 random bytes, hex.
fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    pub(super) fn new(ttl: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for `credential`: its id, or None when full.
    fn create(&self, credential: String) -> Option<String> {
        let mut m = self.lock();
        let now = Instant::now();
        m.retain(|_, s| s.expires > now);
        evict_oldest_beyond(&mut m, &credential, MAX_PER_CREDENTIAL - 1);
        if m.len() >= MAX_SESSIONS {
            return None;
        }
        let id = token();
        let s = Session {
            credential,
            csrf: token(),
            expires: now + self.ttl,
            flash: None,
        };
        m.insert(id.clone(), s);
        Some(id)
    }

    /// (credential, CSRF token) of a live session.
    fn get(&self, id: &str) -> Option<(String, String)> {
        let mut m = self.lock();
        match m.get(id) {
            Some(s) if s.expires > Instant::now() => Some((s.credential.clone(), s.csrf.clone())),
            Some(_) => {
                m.remove(id);
                None
            }
            None => None,
        }
    }

    /// Whether the session still exists (for the live stream).
    pub(super) fn alive(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|s| s.expires > Instant::now())
    }

    pub(super) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Leave a message for the next page.
    pub(super) fn flash(&self, id: &str, text: String) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(text);
        }
    }

    /// The message left for this page, once.
    pub(super) fn take_flash(&self, id: &str) -> Option<String> {
        self.lock().get_mut(id).and_then(|s| s.flash.take())
    }
}

/// The signed-in viewer of a request (its credential re-checked now).
pub struct Viewer {
    /// Session id.
    pub(super) sid: String,
    /// Its tenant ("*" for an operator).
    pub(super) tenant: String,
    /// An operator (admin-scope key).
    pub(super) admin: bool,
    /// Who, for the audit log and the page header: a key prefix or the tenant.
    pub(super) who: String,
    /// The session's CSRF token, for the forms of the page.
    pub(super) csrf: String,
    /// Client address.
    pub(super) client: IpAddr,
}

impl Viewer {
    /// Operator pages answer 404 to tenants (nothing to see there).
    pub(super) fn need_admin(&self) -> Result<(), UiError> {
        if self.admin {
            Ok(())
        } else {
            Err(UiError::NotFound)
        }
    }
}

/// A named cookie of the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn client_of(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

fn ui_of(parts: &Parts) -> Result<Arc<Ui>, UiError> {
    parts
        .extensions
        .get::<Arc<Ui>>()
        .cloned()
        .ok_or(UiError::SignIn)
}

/// Resolve a credential through the API's own authentication.
async fn caller(
    st: &AppState,
    credential: &str,
    client: IpAddr,
) -> Result<crate::http::api::Caller, crate::http::api::ApiError> {
    let mut h = HeaderMap::new();
    let v = HeaderValue::from_str(&format!("Bearer {credential}")).map_err(|_| {
        crate::http::api::ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the key holds characters no key has",
        )
    })?;
    h.insert(header::AUTHORIZATION, v);
    crate::http::api::any_caller(st, &h, client).await
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Viewer, UiError> {
        let ui = ui_of(parts)?;
        if parts.method == Method::POST {
            check_origin(&parts.headers)?;
        }
        let sid = cookie(&parts.headers, COOKIE).ok_or(UiError::SignIn)?;
        let (credential, csrf) = ui.sessions.get(&sid).ok_or(UiError::SignIn)?;
        let client = client_of(parts);
        let c = match caller(st, &credential, client).await {
            Ok(c) => c,
            Err(e) if e.status == StatusCode::UNAUTHORIZED => {
                ui.sessions.remove(&sid);
                return Err(UiError::SignIn);
            }
            Err(e) => return Err(e.into()),
        };
        let admin = c.scope == Scope::Admin;
        Ok(Viewer {
            sid,
            who: c.key_prefix.clone().unwrap_or_else(|| c.tenant.clone()),
            tenant: c.tenant,
            admin,
            csrf,
            client,
        })
    }
}

/// Refuse a POST from another site: its `Origin` (else `Referer`), when
/// sent, must be this server's own (scheme aside, `Host` must match).
pub(super) fn check_origin(headers: &HeaderMap) -> Result<(), UiError> {
    let refused = || UiError::Forbidden("cross-site request refused (Origin)".into());
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .map(|v| v.to_str().unwrap_or("null"));
    let Some(from) = from else { return Ok(()) };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(refused)?;
    let rest = from
        .strip_prefix("http://")
        .or_else(|| from.strip_prefix("https://"))
        .ok_or_else(refused)?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(refused())
    }
}

/// The CSRF check of a POST: the form's `csrf` must be the session's.
pub(super) fn check_csrf(v: &Viewer, form: &HashMap<String, String>) -> Result<(), UiError> {
    match form.get("csrf") {
        Some(t) if constant_eq(t, &v.csrf) => Ok(()),
        _ => Err(UiError::Forbidden(
            "missing or wrong CSRF token: reload the page and try again".into(),
        )),
    }
}

/// Equality that takes as long for every mismatch of equal length.
fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, Secure when asked.
fn set_cookie(name: &str, value: &str, path: &str, max_age: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

/// Whether this request's cookies must be `Secure`.
fn secure(ui: &Ui, headers: &HeaderMap) -> bool {
    ui.secure_cookies
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn with_cookie(mut r: Response, c: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// `GET /ui/login`: the form, with a fresh token in its own cookie.
pub(super) async fn login_form(
    axum::Extension(ui): axum::Extension<Arc<Ui>>,
    headers: HeaderMap,
) -> Response {
    login_page(&ui, &headers, StatusCode::OK, None)
}

fn login_page(ui: &Ui, headers: &HeaderMap, status: StatusCode, error: Option<&str>) -> Response {
    let t = token();
    let c = set_cookie(LOGIN_COOKIE, &t, "/ui/login", 3600, secure(ui, headers));
    with_cookie((status, page::login(&t, error)).into_response(), &c)
}

/// `POST /ui/login`: check the form's token and the key (or JWT) as the
/// API would, then start a session.
pub(super) async fn login(
    State(st): State<AppState>,
    axum::Extension(ui): axum::Extension<Arc<Ui>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_origin(&headers)?;
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    let given = form.get("csrf").map(String::as_str).unwrap_or("");
    if expected.is_empty() || !constant_eq(given, &expected) {
        return Err(UiError::Forbidden(
            "missing or wrong CSRF token: reload the sign-in page and try again".into(),
        ));
    }
    let key = form.get("key").map(|k| k.trim()).unwrap_or("");
    if key.is_empty() {
        return Ok(login_page(
            &ui,
            &headers,
            StatusCode::BAD_REQUEST,
            Some("Enter an API key."),
        ));
    }
    let c = match caller(&st, key, client.ip()).await {
        Ok(c) => c,
        Err(e) => return Ok(login_page(&ui, &headers, e.status, Some(&e.message))),
    };
    let Some(sid) = ui.sessions.create(key.to_string()) else {
        return Err(UiError::Bad(
            "too many open sessions on this server; retry later".into(),
        ));
    };
    tracing::info!(target: "agentq::audit", client = %client.ip(), tenant = %c.tenant,
        key = c.key_prefix.as_deref().unwrap_or("jwt"), action = "ui.sign_in", "dashboard sign-in");
    let s = secure(&ui, &headers);
    let max_age = st_ttl(&ui);
    let r = Redirect::to("/ui").into_response();
    let r = with_cookie(r, &set_cookie(COOKIE, &sid, "/ui", max_age, s));
    Ok(with_cookie(
        r,
        &set_cookie(LOGIN_COOKIE, "", "/ui/login", 0, s),
    ))
}

fn st_ttl(ui: &Ui) -> u64 {
    ui.sessions.ttl.as_secs()
}

/// `POST /ui/logout`: end the session (CSRF-checked like every action).
pub(super) async fn logout(
    axum::Extension(ui): axum::Extension<Arc<Ui>>,
    headers: HeaderMap,
    v: Result<Viewer, UiError>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    check_origin(&headers)?;
    let v = match v {
        Ok(v) => v,
        Err(UiError::SignIn) => return Ok(Redirect::to("/ui/login").into_response()),
        Err(e) => return Err(e),
    };
    check_csrf(&v, &form)?;
    ui.sessions.remove(&v.sid);
    let c = set_cookie(COOKIE, "", "/ui", 0, secure(&ui, &headers));
    Ok(with_cookie(Redirect::to("/ui/login").into_response(), &c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn origin_must_be_this_server() {
        let ok = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(check_origin(&ok).is_ok());
        let evil = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example"),
        ]);
        assert!(check_origin(&evil).is_err());
        let null = headers(&[("host", "127.0.0.1:8080"), ("origin", "null")]);
        assert!(check_origin(&null).is_err());
        let referer = headers(&[("host", "h:1"), ("referer", "https://h:1/ui/queues")]);
        assert!(check_origin(&referer).is_ok());
        assert!(check_origin(&headers(&[("host", "h:1")])).is_ok());
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = set_cookie(COOKIE, "abc", "/ui", 60, true);
        assert_eq!(
            c,
            "agentq_session=abc; Path=/ui; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
        );
        let h = headers(&[("cookie", "a=1; agentq_session=xyz")]);
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("xyz"));
    }

    #[test]
    fn one_key_holds_a_bounded_number_of_sessions() {
        let s = Sessions::new(Duration::from_secs(60));
        let first = s.create("key-a".into()).expect("session");
        let other = s.create("key-b".into()).expect("session");
        for _ in 0..MAX_PER_CREDENTIAL {
            s.create("key-a".into()).expect("session");
        }
        let held = |c: &str| s.lock().values().filter(|x| x.credential == c).count();
        assert_eq!(held("key-a"), MAX_PER_CREDENTIAL);
        assert!(
            s.get(&first).is_none(),
            "the oldest of key-a's sessions ended"
        );
        assert!(
            s.get(&other).is_some(),
            "another key's session is untouched"
        );
    }

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new(Duration::from_secs(60));
        let id = s.create("aq_x".into()).expect("room");
        assert_eq!(s.get(&id).map(|(c, _)| c).as_deref(), Some("aq_x"));
        s.flash(&id, "hi".into());
        assert_eq!(s.take_flash(&id).as_deref(), Some("hi"));
        assert_eq!(s.take_flash(&id), None);
        s.remove(&id);
        assert!(s.get(&id).is_none());
        let gone = Sessions::new(Duration::ZERO);
        let id = gone.create("k".into()).expect("room");
        assert!(gone.get(&id).is_none());
    }
}
