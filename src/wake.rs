//! The wake and status listener (loopback, a free port at each start). nginx routes the host of
//! a sleeping preview here, and the managed nginx's default server every host it has no vhost
//! for. The first request to a sleeping preview wakes it (see `crate::lifecycle`'s sleep), and
//! - a browser's (a request that accepts `text/html`) gets a small "Waking up <name>…" page at
//!   once, which reloads every second until the app answers in its place;
//! - any other request is held until the preview is awake, up to `lifecycle.wake_timeout`, and
//!   then proxied to the app as nginx would have; past the timeout it gets 503 with
//!   `Retry-After`.
//!
//! A preview that does not serve gets its status page (HTML for a browser, a line of text
//! otherwise): being deployed (503 with its step, reloading), its last deploy failed (502, the
//! short reason, no log lines), removed (410, why, with a link to its pull request), or no such
//! preview (404). Only what previewd holds in memory decides: a request for an unknown name
//! costs no call to Docker.
//!
//! Requests for hosts that are not previews get 404, except nginx's route probe, which names the
//! listener itself by address (200).

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lifecycle::{Lifecycle, PreviewPage, WakeState};
use crate::preview::{BaseDomain, Slug};

#[derive(Clone)]
struct Waker {
    lifecycle: Lifecycle,
    base_domain: BaseDomain,
    timeout: Duration,
    /// Where pull requests are shown (`https://github.com`).
    github_web: String,
}

/// nginx's own answer for a host without a vhost, kept for non-browser clients.
const NOT_FOUND: &str = "No preview is running at this address.\n";

/// Listens on a free loopback port.
pub async fn bind() -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).await
}

/// The listener's routes: every path of every host.
pub fn routes(lifecycle: Lifecycle, base_domain: BaseDomain, timeout: Duration, github_web: String) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(Waker { lifecycle, base_domain, timeout, github_web })
}

async fn handle(State(waker): State<Waker>, request: Request) -> Response {
    let html = accepts_html(&request);
    let Some(slug) = preview_of(&request, &waker.base_domain) else {
        if names_an_address(&request) {
            return (StatusCode::OK, "previewd wake listener\n").into_response();
        }
        return (StatusCode::NOT_FOUND, NOT_FOUND).into_response();
    };
    let lifecycle = &waker.lifecycle;
    let asleep = lifecycle.sleepers().is_asleep(&slug);
    let status_page = lifecycle.page_of(&slug);
    match status_page {
        Some(deploying @ PreviewPage::Deploying { .. }) => return status(&slug, &deploying, &waker.github_web, html),
        Some(other) if !asleep => return status(&slug, &other, &waker.github_web, html),
        _ => {}
    }
    // Not asleep: a request nginx sent here just before the route back to the app of a
    // preview previewd knows (it served, or was launched or woken); held. Any other name is
    // answered from memory, without asking Docker.
    if !asleep && (lifecycle.last_request(&slug).is_none() || lifecycle.get(&slug).await.is_err()) {
        return not_found(&slug, html);
    }
    let mut state = waker.lifecycle.wake_shared(&slug);
    if asleep && html {
        let current = state.borrow().clone();
        return match current {
            WakeState::Awake(upstream) => proxy(upstream, request).await,
            WakeState::Waking(step) => waking_page(&slug, step),
            WakeState::Failed(why) => page(StatusCode::BAD_GATEWAY, &format!("{slug} did not wake up"), &why, false),
        };
    }
    match tokio::time::timeout(waker.timeout, awake(&mut state)).await {
        Ok(Ok(port)) => proxy(port, request).await,
        Ok(Err(why)) => (StatusCode::BAD_GATEWAY, format!("{slug} did not wake up: {why}\n")).into_response(),
        Err(_) => {
            let mut response =
                (StatusCode::SERVICE_UNAVAILABLE, format!("{slug} is still waking up; try again shortly\n"))
                    .into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            response
        }
    }
}

/// Waits for the wake's end: where the app is, or why it failed.
async fn awake(state: &mut watch::Receiver<WakeState>) -> Result<SocketAddr, String> {
    loop {
        match &*state.borrow_and_update() {
            WakeState::Awake(upstream) => return Ok(*upstream),
            WakeState::Failed(why) => return Err(why.clone()),
            WakeState::Waking(_) => {}
        }
        if state.changed().await.is_err() {
            // The wake ended without a word (its task went away).
            return match &*state.borrow() {
                WakeState::Awake(upstream) => Ok(*upstream),
                WakeState::Failed(why) => Err(why.clone()),
                WakeState::Waking(_) => Err("the wake stopped".to_owned()),
            };
        }
    }
}

/// Whether the request's `Host` is an address (nginx's route probe names the listener so).
fn names_an_address(request: &Request) -> bool {
    let Some(host) = request.headers().get(header::HOST).and_then(|host| host.to_str().ok()) else { return false };
    crate::preview::host_name(host).parse::<std::net::IpAddr>().is_ok()
}

/// The status page of a preview that does not serve.
fn status(slug: &Slug, status_page: &PreviewPage, github_web: &str, html: bool) -> Response {
    let (code, title, text, link) = match status_page {
        PreviewPage::Deploying { step, doing } => {
            let title = if step == "build" { format!("Building {slug}…") } else { format!("Starting {slug}…") };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                title,
                format!("Now: {step}: {doing}. This page reloads by itself."),
                None,
            )
        }
        PreviewPage::Failed(reason) => {
            (StatusCode::BAD_GATEWAY, format!("{slug} failed to deploy"), reason.clone(), None)
        }
        PreviewPage::Removed(removal) => {
            let url = format!("{github_web}/{}/pull/{}", removal.repo, removal.number);
            let link = (format!("Pull request #{} of {}", removal.number, removal.repo), url);
            (StatusCode::GONE, format!("{slug} was removed"), format!("{}.", removal.reason), Some(link))
        }
    };
    if !html {
        let link = link.map(|(_, url)| format!(" {url}")).unwrap_or_default();
        let mut response = (code, format!("{title} {text}{link}\n")).into_response();
        if code == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return response;
    }
    let reload = code == StatusCode::SERVICE_UNAVAILABLE;
    page_with_link(code, &title, &text, link.as_ref().map(|(label, url)| (label.as_str(), url.as_str())), reload)
}

fn not_found(slug: &Slug, html: bool) -> Response {
    if !html {
        return (StatusCode::NOT_FOUND, NOT_FOUND).into_response();
    }
    page(StatusCode::NOT_FOUND, &format!("No preview named {slug}"), "No preview runs at this address.", false)
}

/// The preview a request is for, by its `Host` (nginx passes the client's on).
fn preview_of(request: &Request, base_domain: &BaseDomain) -> Option<Slug> {
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    base_domain.slug_of(crate::preview::host_name(host))
}

fn accepts_html(request: &Request) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("text/html"))
}

/// Sends the request on to the app at `upstream`, as nginx would have, and its answer back.
async fn proxy(upstream: SocketAddr, request: Request) -> Response {
    match forward(upstream, request).await {
        Ok(response) => response,
        Err(why) => {
            tracing::warn!(%upstream, error = %why, "cannot pass a held request on to the woken preview");
            (StatusCode::BAD_GATEWAY, format!("the preview woke up but did not answer: {why}\n")).into_response()
        }
    }
}

async fn forward(upstream: SocketAddr, request: Request) -> Result<Response, String> {
    let stream = tokio::net::TcpStream::connect(upstream).await.map_err(|err| err.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|err| err.to_string())?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    // Only the path goes on the request line, as from nginx.
    parts.uri =
        parts.uri.path_and_query().map_or_else(|| "/".parse(), |p| p.as_str().parse()).map_err(|e| format!("{e}"))?;
    let response = sender.send_request(Request::from_parts(parts, body)).await.map_err(|err| err.to_string())?;
    Ok(response.map(Body::new))
}

fn waking_page(slug: &Slug, step: &str) -> Response {
    let doing = match step {
        "services" => "starting its services",
        "app" => "starting the app",
        _ => "starting",
    };
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("Waking up {slug}…"),
        &format!("It was asleep; {doing}. This page reloads by itself."),
        true,
    )
}

/// A small page, readable on a phone. Every text in it is a slug or previewd's own words:
/// still escaped, as HTML.
fn page(status: StatusCode, title: &str, text: &str, reload: bool) -> Response {
    page_with_link(status, title, text, None, reload)
}

/// `page`, with a link (label, URL) under the text.
fn page_with_link(status: StatusCode, title: &str, text: &str, link: Option<(&str, &str)>, reload: bool) -> Response {
    let refresh = if reload { "<meta http-equiv=\"refresh\" content=\"1\">" } else { "" };
    let link = link
        .map(|(label, url)| format!("<p><a href=\"{}\">{}</a></p>", escape(url), escape(label)))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}<title>{title}</title>\
         <style>body{{font:1.1rem/1.5 system-ui,sans-serif;margin:3rem auto;max-width:32rem;padding:0 1rem;color:#222}}</style>\
         </head><body><h1>{title}</h1><p>{text}</p>{link}</body></html>\n",
        title = escape(title),
        text = escape(text),
    );
    let mut response = (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: &str, accept: Option<&str>) -> Request {
        let mut builder = Request::builder().uri("/x").header(header::HOST, host);
        if let Some(accept) = accept {
            builder = builder.header(header::ACCEPT, accept);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn the_preview_is_read_from_the_host_and_other_hosts_are_not_previews() {
        let domain = BaseDomain::parse("preview.localhost").unwrap();
        let slug = |host| preview_of(&request(host, None), &domain).map(|s| s.to_string());
        assert_eq!(slug("feature-x.preview.localhost:8080"), Some("feature-x".to_owned()));
        assert_eq!(slug("Feature-X.Preview.Localhost"), Some("feature-x".to_owned()));
        assert_eq!(slug("127.0.0.1:41234"), None, "nginx's route probe names the listener");
        assert_eq!(slug("a.b.preview.localhost"), None);
        assert_eq!(slug("preview.localhost"), None);
    }

    #[test]
    fn browsers_are_told_apart_by_accept() {
        assert!(accepts_html(&request("h", Some("text/html,application/xhtml+xml,*/*;q=0.8"))));
        assert!(!accepts_html(&request("h", Some("application/json"))));
        assert!(!accepts_html(&request("h", None)));
    }

    #[test]
    fn status_pages_answer_with_the_right_codes_and_escape_what_they_print() {
        let slug = Slug::parse("shop-pr-7").unwrap();
        let github = "https://github.com";
        let deploying = PreviewPage::Deploying { step: "build".into(), doing: "Step 2/4 : RUN make <all>".into() };
        let response = status(&slug, &deploying, github, true);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            status(&slug, &PreviewPage::Failed("no answer".into()), github, true).status(),
            StatusCode::BAD_GATEWAY
        );
        let removal = crate::lifecycle::Removal {
            at: 0,
            reason: "the pull request is closed".into(),
            repo: "acme/shop".into(),
            number: 7,
        };
        let gone = status(&slug, &PreviewPage::Removed(removal), github, false);
        assert_eq!(gone.status(), StatusCode::GONE);
        assert_eq!(not_found(&slug, false).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_route_probe_is_told_apart_by_an_address_for_a_host() {
        assert!(names_an_address(&request("127.0.0.1:41234", None)));
        assert!(!names_an_address(&request("feature-x.preview.localhost", None)));
        assert!(!names_an_address(&request("evil.example.com", None)));
    }

    #[test]
    fn the_waking_page_reloads_and_says_503_with_retry_after() {
        let response = waking_page(&Slug::parse("feature-x").unwrap(), "app");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(escape("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
    }
}
