//! The wake listener: nginx routes the host of a sleeping preview here (loopback, a free port at
//! each start). The first request wakes the preview (see `crate::lifecycle`'s sleep), and
//! - a browser's (a request that accepts `text/html`) gets a small "Waking up <name>…" page at
//!   once, which reloads every second until the app answers in its place;
//! - any other request is held until the preview is awake, up to `lifecycle.wake_timeout`, and
//!   then proxied to the app as nginx would have; past the timeout it gets 503 with
//!   `Retry-After`.
//!
//! Requests for hosts that are not previews (nginx's route probe names the listener itself)
//! get a plain 200.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::lifecycle::{Lifecycle, WakeState};
use crate::preview::{BaseDomain, Slug};

#[derive(Clone)]
struct Waker {
    lifecycle: Lifecycle,
    base_domain: BaseDomain,
    timeout: Duration,
}

/// Listens on a free loopback port.
pub async fn bind() -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).await
}

/// The listener's routes: every path of every host.
pub fn routes(lifecycle: Lifecycle, base_domain: BaseDomain, timeout: Duration) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(Waker { lifecycle, base_domain, timeout })
}

async fn handle(State(waker): State<Waker>, request: Request) -> Response {
    let Some(slug) = preview_of(&request, &waker.base_domain) else {
        return (StatusCode::OK, "previewd wake listener\n").into_response();
    };
    let asleep = waker.lifecycle.sleepers().is_asleep(&slug);
    // A sleeping preview exists (it is recorded); for others, asking Docker is worth its time.
    if !asleep && waker.lifecycle.get(&slug).await.is_err() {
        return page(StatusCode::NOT_FOUND, &format!("No preview named {slug}"), "It may have been removed.", false);
    }
    let mut state = waker.lifecycle.wake_shared(&slug);
    // Not asleep: a request nginx sent here just before the route back to the app; held.
    if asleep && accepts_html(&request) {
        let current = state.borrow().clone();
        return match current {
            WakeState::Awake(port) => proxy(port, request).await,
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

/// Waits for the wake's end: the app's port, or why it failed.
async fn awake(state: &mut watch::Receiver<WakeState>) -> Result<u16, String> {
    loop {
        match &*state.borrow_and_update() {
            WakeState::Awake(port) => return Ok(*port),
            WakeState::Failed(why) => return Err(why.clone()),
            WakeState::Waking(_) => {}
        }
        if state.changed().await.is_err() {
            // The wake ended without a word (its task went away).
            return match &*state.borrow() {
                WakeState::Awake(port) => Ok(*port),
                WakeState::Failed(why) => Err(why.clone()),
                WakeState::Waking(_) => Err("the wake stopped".to_owned()),
            };
        }
    }
}

/// The preview a request is for, by its `Host` (nginx passes the client's on).
fn preview_of(request: &Request, base_domain: &BaseDomain) -> Option<Slug> {
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    let host = host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(host, |(name, _)| name);
    let label = host.to_ascii_lowercase().strip_suffix(&format!(".{base_domain}"))?.to_owned();
    Slug::parse(&label).ok()
}

fn accepts_html(request: &Request) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("text/html"))
}

/// Sends the request on to the app on 127.0.0.1:`port`, as nginx would have, and its answer back.
async fn proxy(port: u16, request: Request) -> Response {
    match forward(port, request).await {
        Ok(response) => response,
        Err(why) => {
            tracing::warn!(port, error = %why, "cannot pass a held request on to the woken preview");
            (StatusCode::BAD_GATEWAY, format!("the preview woke up but did not answer: {why}\n")).into_response()
        }
    }
}

async fn forward(port: u16, request: Request) -> Result<Response, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|err| err.to_string())?;
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
    let refresh = if reload { "<meta http-equiv=\"refresh\" content=\"1\">" } else { "" };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}<title>{title}</title>\
         <style>body{{font:1.1rem/1.5 system-ui,sans-serif;margin:3rem auto;max-width:32rem;padding:0 1rem;color:#222}}</style>\
         </head><body><h1>{title}</h1><p>{text}</p></body></html>\n",
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
    fn the_waking_page_reloads_and_says_503_with_retry_after() {
        let response = waking_page(&Slug::parse("feature-x").unwrap(), "app");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(escape("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
    }
}
