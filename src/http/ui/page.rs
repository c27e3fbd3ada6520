//! The page frame (header, navigation, sign-out, message), the sign-in and
//! error pages, and small pieces the views share. maud escapes every
//! interpolated value; nothing here uses `PreEscaped`.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::{Ui, Viewer};

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · agentq" }
            link rel="stylesheet" href="/ui/static/ui.css";
            script src="/ui/static/ui.js" defer {}
        }
    }
}

fn nav(v: &Viewer) -> Markup {
    html! {
        header {
            nav aria-label="Dashboard" {
                span.brand { "agentq" }
                @if v.admin {
                    a href="/ui/queues" { "Queues" }
                    a href="/ui/tenants" { "Tenants" }
                    a href="/ui/usage" { "Usage" }
                    a href="/ui/dead" { "Dead letters" }
                } @else {
                    a href="/ui/tenant" { "My jobs" }
                }
                form.inline role="search" method="get" action="/ui/jobs" {
                    label for="job-id" { "Job id" }
                    input #job-id type="text" name="id" required size="18";
                    button type="submit" { "Open" }
                }
                span.who {
                    @if v.admin { "operator " (v.who) } @else { "tenant " (v.tenant) }
                }
                form.inline method="post" action="/ui/logout" {
                    (csrf(v))
                    button type="submit" { "Sign out" }
                }
            }
        }
    }
}

/// The hidden CSRF field of every form.
pub(super) fn csrf(v: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

/// A one-button POST form (an action on a row).
pub(super) fn action(v: &Viewer, url: &str, label: &str, confirm: Option<&str>) -> Markup {
    html! {
        form.inline method="post" action=(url) data-confirm=[confirm] {
            (csrf(v))
            button type="submit" { (label) }
        }
    }
}

/// A full page for `v`: `live` is the URL of its live-update stream.
pub(super) fn render(
    ui: &Ui,
    v: &Viewer,
    title: &str,
    live: Option<&str>,
    body: Markup,
) -> Response {
    let flash = ui.sessions.take_flash(&v.sid);
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body data-live-src=[live] {
                (nav(v))
                main {
                    @if let Some(f) = &flash {
                        p.flash role="status" { (f) }
                    }
                    @if live.is_some() {
                        p.live { "Updates: " span #live-status aria-live="polite" { "static (reload to update)" } }
                    }
                    (body)
                }
            }
        }
    };
    Html(page.into_string()).into_response()
}

/// The sign-in page; `token` is the form's CSRF token.
pub(super) fn login(token: &str, error: Option<&str>) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main.narrow {
                    h1 { "agentq dashboard" }
                    @if let Some(e) = error {
                        p.error role="alert" { (e) }
                    }
                    form method="post" action="/ui/login" {
                        input type="hidden" name="csrf" value=(token);
                        label for="key" { "API key or JWT" }
                        input #key type="password" name="key" autocomplete="off" required;
                        p.hint { "An operator (admin) key shows every queue and tenant; a tenant key shows only that tenant." }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    };
    Html(page.into_string())
}

/// An error page (no session needed).
pub(super) fn error_page(status: StatusCode, text: &str) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Error"))
            body {
                main.narrow {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("Error")) }
                    p.error role="alert" { (text) }
                    p { a href="/ui" { "Back to the dashboard" } }
                }
            }
        }
    };
    Html(page.into_string())
}

/// An optional value, or a dash.
pub(super) fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "—".to_string(), |x| x.to_string())
}

/// Micro-dollars as dollars.
pub(super) fn dollars(micros: i64) -> String {
    format!("${:.4}", micros as f64 / 1e6)
}

/// Milliseconds as seconds, minutes or hours.
pub(super) fn duration_ms(ms: i64) -> String {
    crate::model::units::format_duration(std::time::Duration::from_millis(ms.max(0) as u64))
}

/// A quota bar: `used` of `quota` ms (none when 0).
pub(super) fn quota_bar(used_ms: u64, quota_ms: u64, label: &str) -> Markup {
    if quota_ms == 0 {
        return html! { span { (duration_ms(used_ms as i64)) " used, no quota" } };
    }
    let pct = (used_ms as f64 / quota_ms as f64 * 100.0).min(999.0);
    html! {
        meter min="0" max=(quota_ms) low=(quota_ms * 8 / 10) high=(quota_ms * 95 / 100)
            optimum="0" value=(used_ms.min(quota_ms)) aria-label=(label) {}
        " " span { (format!("{pct:.0}%")) " of " (duration_ms(quota_ms as i64)) }
    }
}
