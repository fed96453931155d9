//! The HTTP API (axum): one line per route, authentication on everything but `/healthz` and the
//! GitHub webhook (which checks GitHub's signature), and handlers that turn validated requests
//! into lifecycle operations.
//!
//! Lifecycle operations run as tracked tasks of their own, so a client that hangs up cannot
//! cancel a launch half-way, and shutdown waits for them to finish.

pub mod body;
pub mod builds;
pub mod dashboard;
pub mod error;
pub mod request_id;
pub mod server;
pub mod streams;
pub mod webhook;

use std::sync::Arc;

use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tower_http::timeout::RequestBodyDeadlineLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{AuthError, Authenticator, Principal, bearer_token};
use crate::build::BuildInput;
use crate::config::Config;
use crate::github::memory::Memory;
use crate::github::previews::PullRequestPreviews;
use crate::github::token_auth::TokenAuth;
use crate::lifecycle::{Lifecycle, LifecycleError, PreviewInfo};
use crate::metrics::Metrics;
use crate::preview::{ImageKey, ServiceName, Slug};
use crate::request::{KillRequest, LaunchRequest, Owner, preview_name};
use body::Fields;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub lifecycle: Lifecycle,
    pub auth: Authenticator,
    pub tasks: TaskTracker,
    /// Present when config.yml has a `github` section.
    pub github: Option<GitHubService>,
    /// Present with `github.api_auth: true`.
    pub tokens: Option<Arc<TokenAuth>>,
    /// Cancelled when previewd stops: long-lived answers (followed logs) end then.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub log_streams: Arc<streams::LogStreams>,
}

/// What the webhook needs besides the shared state.
#[derive(Clone)]
pub struct GitHubService {
    pub previews: PullRequestPreviews,
    /// Delivery ids seen and states applied, kept across restarts.
    pub memory: Arc<Memory>,
    /// What bodies of deliveries not yet verified may hold at once.
    pub unverified: body::ReadBudget,
}

pub fn router(state: AppState) -> Router {
    let metrics_route = Router::new().route("/metrics", get(metrics_text));
    let (public_metrics, protected_metrics) =
        if state.config.metrics_auth { (Router::new(), metrics_route) } else { (metrics_route, Router::new()) };
    let protected = Router::new()
        .route("/", get(dashboard::page))
        .route("/launch", post(launch))
        .route("/kill", post(kill))
        .route("/api/previews", get(list_previews))
        .route("/api/previews/{name}", get(get_preview))
        .route("/api/previews/{name}/logs", get(preview_logs))
        .route("/api/previews/{name}/reset", post(reset_preview))
        .route("/api/previews/{name}/sleep", post(sleep_preview))
        .route("/api/previews/{name}/wake", post(wake_preview))
        .route("/api/previews/{name}/pin", post(pin_preview))
        .route("/api/previews/{name}/unpin", post(unpin_preview))
        .route("/api/previews/{name}/build-log", get(builds::build_log))
        .route("/api/builds", get(builds::list_builds))
        .merge(protected_metrics)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth))
        .route_layer(middleware::from_fn(refuse_cross_site));
    // An upload may take longer than `http.body_timeout` in all: it reads each piece under that
    // deadline instead (see `builds::upload`).
    let uploads = Router::new()
        .route("/api/builds", post(builds::post_build))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth))
        .route_layer(middleware::from_fn(refuse_cross_site));
    let bounded = Router::new()
        .route("/healthz", get(healthz))
        .merge(public_metrics)
        // The webhook checks GitHub's signature itself (and Basic auth when configured).
        .route("/webhooks/github", post(webhook::github_webhook))
        .route("/event_receiver", post(webhook::github_webhook))
        .merge(protected)
        .layer(RequestBodyDeadlineLayer::new(state.config.http.body_timeout));
    Router::new()
        .merge(bounded)
        .merge(uploads)
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), refuse_other_hosts))
        .layer(middleware::from_fn_with_state(state.clone(), count_refusals))
        .layer(middleware::from_fn(request_id::assign))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Counts every 4xx answer by the reason its error set (see `error::Refusal`).
async fn count_refusals(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(error::Refusal(reason)) = response.extensions().get::<error::Refusal>() {
        state.lifecycle.metrics().refused_requests.get_or_create(&crate::metrics::ByReason { reason }).inc();
    }
    response
}

/// With `api_hosts`, a request must name one of them (or an IP address) as its `Host`: a page
/// that rebinds its own domain to this address reaches the API under a name not on the list.
async fn refuse_other_hosts(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    let allowed = &state.config.api_hosts;
    if allowed.is_empty() {
        return Ok(next.run(request).await);
    }
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).or(request.uri().host());
    match host {
        Some(host) if host_allowed(host, allowed) => Ok(next.run(request).await),
        _ => Err(ApiError::WrongHost(allowed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))),
    }
}

/// `Host` without its port is an IP address, or one of `allowed` (case-insensitive).
fn host_allowed(host: &str, allowed: &[crate::preview::BaseDomain]) -> bool {
    let bare = crate::preview::host_name(host);
    bare.parse::<std::net::IpAddr>().is_ok() || allowed.iter().any(|known| known.as_ref().eq_ignore_ascii_case(bare))
}

/// Browsers send cached Basic credentials with any request to this origin, a form another site
/// submits included; so a state-changing request that a browser marks as cross-site is refused.
/// curl and the client send neither header.
async fn refuse_cross_site(request: Request, next: Next) -> Result<Response, ApiError> {
    if request.method() != axum::http::Method::GET && is_cross_site(request.headers()) {
        return Err(ApiError::CrossSite);
    }
    Ok(next.run(request).await)
}

fn is_cross_site(headers: &HeaderMap) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, authority)| authority) != Some(host),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Who calls: a `users` entry (Basic) or, with `github.api_auth`, a GitHub user (Bearer token).
async fn require_auth(State(state): State<AppState>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let principal = match (authorization.as_deref().and_then(bearer_token), &state.tokens) {
        (Some(token), Some(tokens)) => {
            let client = client_address(&request, &state.config.trusted_proxies);
            Principal::GitHub(tokens.login(token, client).await?)
        }
        (Some(_), None) => return Err(AuthError::TokensOff.into()),
        (None, _) => {
            let client = client_address(&request, &state.config.trusted_proxies);
            Principal::User(state.auth.authenticate(authorization.as_deref(), client).await?)
        }
    };
    tracing::debug!(?principal, "authenticated");
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// Who the caller is on the network: the connection's peer, or, when the peer is one of
/// `trusted_proxies`, the last address in its `X-Forwarded-For` that is not a trusted proxy
/// (the ones before it are the client's to make up). `None` without a connection (tests that
/// call the router directly).
pub fn client_address(request: &Request, trusted_proxies: &[ipnet::IpNet]) -> Option<std::net::IpAddr> {
    let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()?.0.ip();
    let forwarded = request.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    Some(client_behind(peer, forwarded, trusted_proxies))
}

fn client_behind<'a>(
    peer: std::net::IpAddr,
    forwarded: impl DoubleEndedIterator<Item = &'a str>,
    trusted_proxies: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let trusted = |address: &std::net::IpAddr| trusted_proxies.iter().any(|net| net.contains(address));
    if !trusted(&peer) {
        return peer;
    }
    let hops = forwarded.rev().flat_map(|header| header.rsplit(',').map(str::trim).collect::<Vec<_>>());
    let mut client = peer;
    for hop in hops {
        match hop.parse::<std::net::IpAddr>() {
            Ok(address) if trusted(&address) => client = address,
            Ok(address) => return address,
            Err(_) => return client,
        }
    }
    client
}

impl AppState {
    /// Basic users may do anything; GitHub users need push access to a repository that uses
    /// the image (or to any configured repository, for reads).
    pub async fn authorize(&self, principal: &Principal, image: Option<&ImageKey>) -> Result<(), ApiError> {
        match (principal, &self.tokens, &self.config.github) {
            (Principal::User(_), _, _) => Ok(()),
            (Principal::GitHub(login), Some(tokens), Some(github)) => {
                Ok(tokens.authorize(github, login, image).await?)
            }
            (Principal::GitHub(_), _, _) => Err(AuthError::TokensOff.into()),
        }
    }

    /// Basic users see every preview; GitHub users the previews of pull requests of
    /// repositories they can push to, and the previews they launched.
    async fn may_see(&self, principal: &Principal, preview: &PreviewInfo) -> Result<bool, ApiError> {
        match (principal, &self.tokens, &preview.repo) {
            (Principal::User(_), _, _) => Ok(true),
            (Principal::GitHub(login), Some(tokens), Some(repo)) => Ok(tokens.may_push(repo, login).await?),
            (Principal::GitHub(login), _, None) => Ok(preview.owner == Some(Owner::GitHub(login.clone()))),
            (Principal::GitHub(_), None, Some(_)) => Ok(false),
        }
    }

    /// A manual launch may not take a name a repo's pull requests get, nor replace a preview
    /// the caller may not see (a GitHub user's launch of an operator's or a PR's preview).
    async fn may_launch(&self, principal: &Principal, name: &Slug) -> Result<(), ApiError> {
        let repos = self.config.github.iter().flat_map(|github| github.repos.values());
        if let Some(repo) = repos.into_iter().find(|repo| repo.reserves(name)) {
            return Err(ApiError::NameReserved { name: name.clone(), repo: repo.full_name.clone() });
        }
        if matches!(principal, Principal::User(_)) {
            return Ok(());
        }
        match self.lifecycle.get(name).await {
            Ok(existing) if !self.may_see(principal, &existing).await? => Err(ApiError::NotYours(name.clone())),
            Ok(_) | Err(LifecycleError::NotFound(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// The previews the caller may see.
    pub async fn visible_previews(&self, principal: &Principal) -> Result<Vec<PreviewInfo>, ApiError> {
        self.authorize(principal, None).await?;
        let mut visible = Vec::new();
        for preview in self.lifecycle.list().await? {
            if self.may_see(principal, &preview).await? {
                visible.push(preview);
            }
        }
        Ok(visible)
    }

    /// A preview the caller may see, or 404 as if it did not exist.
    async fn visible_preview(&self, principal: &Principal, name: &str) -> Result<PreviewInfo, ApiError> {
        self.authorize(principal, None).await?;
        let slug = preview_name("name", name)?;
        let preview = self.lifecycle.get(&slug).await?;
        if self.may_see(principal, &preview).await? { Ok(preview) } else { Err(LifecycleError::NotFound(slug).into()) }
    }
}

async fn launch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Fields(fields): Fields,
) -> Result<Response, ApiError> {
    let mut request = LaunchRequest::parse(fields, &state.config.images)?;
    state.authorize(&principal, Some(&request.image)).await?;
    state.may_launch(&principal, &request.name).await?;
    request.owner = Some(owner_of(&principal));
    if accepts(&headers, NDJSON) {
        return Ok(launch_streaming(&state, request, None));
    }
    let lifecycle = state.lifecycle.clone();
    let info = run_tracked(&state, async move { lifecycle.launch(request).await }).await?;
    Ok(if wants_json(&headers) { Json(info).into_response() } else { format!("{}\n", info.url).into_response() })
}

async fn kill(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Fields(fields): Fields,
) -> Result<Response, ApiError> {
    let request = KillRequest::parse(fields)?;
    if matches!(principal, Principal::GitHub(_)) {
        // A preview the caller may not see answers as one that does not exist.
        state.visible_preview(&principal, request.name.as_ref()).await?;
    }
    let lifecycle = state.lifecycle.clone();
    let name = request.name.clone();
    run_tracked(&state, async move { lifecycle.kill(&request.name).await }).await?;
    Ok(if wants_json(&headers) {
        Json(json!({ "name": name, "status": "removed" })).into_response()
    } else {
        format!("removed {name}\n").into_response()
    })
}

async fn list_previews(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<PreviewInfo>>, ApiError> {
    Ok(Json(state.visible_previews(&principal).await?))
}

async fn get_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    Ok(Json(state.visible_preview(&principal, &name).await?))
}

/// `POST /api/previews/{name}/reset`: the preview's data put back as at its first launch
/// (see `Lifecycle::reset`); answers with the preview once its app answers again.
async fn reset_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    act_on_preview(&state, &principal, &name, |lifecycle, slug| async move { lifecycle.reset(&slug).await }).await
}

/// `POST /api/previews/{name}/sleep`: the preview's app and services stopped (data kept), its
/// host routed to the wake listener; the preview, asleep.
async fn sleep_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    act_on_preview(&state, &principal, &name, |lifecycle, slug| async move {
        lifecycle.sleep(&slug, crate::lifecycle::SleepReason::Manual).await?;
        lifecycle.get(&slug).await
    })
    .await
}

/// `POST /api/previews/{name}/wake`: a sleeping preview started again (services, then the app);
/// answers once the app answers through nginx. A preview that is awake is answered as it is.
async fn wake_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    act_on_preview(&state, &principal, &name, |lifecycle, slug| async move {
        lifecycle.wake_now(&slug).await?;
        lifecycle.get(&slug).await
    })
    .await
}

/// `POST /api/previews/{name}/pin`: the preview is never put to sleep by idleness, caps or
/// quiet hours, nor removed by age, until unpinned.
async fn pin_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    let by = crate::lifecycle::PinnedBy::Person(owner_of(&principal).to_string());
    act_on_preview(&state, &principal, &name, |lifecycle, slug| async move {
        lifecycle.pin(&slug, by).await?;
        lifecycle.get(&slug).await
    })
    .await
}

/// `POST /api/previews/{name}/unpin`: the preview sleeps and expires as any other again (a pin
/// by its pull request's label comes back with the label's next event).
async fn unpin_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    act_on_preview(&state, &principal, &name, |lifecycle, slug| async move {
        lifecycle.unpin(&slug).await?;
        lifecycle.get(&slug).await
    })
    .await
}

fn owner_of(principal: &Principal) -> Owner {
    match principal {
        Principal::User(name) => Owner::User(name.clone()),
        Principal::GitHub(login) => Owner::GitHub(login.clone()),
    }
}

/// An action on a preview the caller may see, run to its end even if the client goes away
/// (and waited for at shutdown); the preview as the action leaves it.
async fn act_on_preview<Action, Done>(
    state: &AppState,
    principal: &Principal,
    name: &str,
    action: Action,
) -> Result<Json<PreviewInfo>, ApiError>
where
    Action: FnOnce(Lifecycle, Slug) -> Done,
    Done: Future<Output = Result<PreviewInfo, LifecycleError>> + Send + 'static,
{
    let preview = state.visible_preview(principal, name).await?;
    let info = run_tracked(state, action(state.lifecycle.clone(), preview.name)).await?;
    Ok(Json(info))
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
    /// A service's log instead of the app's.
    service: Option<String>,
}

/// Lines of log a request may ask for.
const MAX_LOG_TAIL: usize = 100_000;

/// `GET /api/previews/{name}/logs?tail=N&follow=true`: the container's output as plain text,
/// streamed while it runs when `follow` is set.
async fn preview_logs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let preview = state.visible_preview(&principal, &name).await?;
    let service = query
        .service
        .as_deref()
        .map(ServiceName::parse)
        .transpose()
        .map_err(|err| ApiError::Body(format!("service: {err}")))?;
    let tail = query.tail.unwrap_or(100).min(MAX_LOG_TAIL);
    let slot = if query.follow { Some(state.log_streams.take(&principal)?) } else { None };
    // A followed log would otherwise hold graceful shutdown until the container stops.
    let (shutdown, max_follow) = (state.shutdown.clone().cancelled_owned(), state.log_streams.max_follow);
    let ends = async move {
        tokio::select! {
            () = shutdown => {},
            () = tokio::time::sleep(max_follow) => {},
        }
    };
    let stream = state.lifecycle.logs(&preview.name, service.as_ref(), tail, query.follow).await?.take_until(ends).map(
        move |chunk| {
            // The slot lives as long as the stream that the answer's body owns.
            let _slot = &slot;
            chunk
        },
    );
    // The output is the preview's code's: never let a browser run it on this origin.
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CONTENT_SECURITY_POLICY, "sandbox; default-src 'none'"),
    ];
    Ok((headers, axum::body::Body::from_stream(stream)).into_response())
}

/// No auth: for load balancers and monitoring. 503 when Docker or nginx is not usable.
async fn healthz(State(state): State<AppState>) -> Response {
    let docker = state.lifecycle.runtime().ping().await.err().map(|err| err.to_string());
    let nginx = state.lifecycle.router().nginx();
    let nginx_error = nginx.master_pid().is_none().then(|| nginx.not_running().to_string());
    let healthy = docker.is_none() && nginx_error.is_none();
    let check = |error: Option<String>| match error {
        None => json!({ "ok": true }),
        Some(error) => json!({ "ok": false, "error": error }),
    };
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "docker": check(docker),
        "nginx": check(nginx_error),
        "nginx_reloads": state.lifecycle.router().reloads(),
        "nginx_failed_reloads": state.lifecycle.router().failed_reloads(),
        "builds": builds::health(&state).await,
    });
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn run_tracked<T: Send + 'static>(
    state: &AppState,
    operation: impl Future<Output = Result<T, LifecycleError>> + Send + 'static,
) -> Result<T, ApiError> {
    state
        .tasks
        .spawn(operation)
        .await
        .map_err(|err| ApiError::Internal(format!("the operation did not finish: {err}")))?
        .map_err(ApiError::from)
}

const NDJSON: &str = "application/x-ndjson";

fn wants_json(headers: &HeaderMap) -> bool {
    accepts(headers, "application/json")
}

fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|accept| accept.contains(media_type))
}

/// A launch answered as it goes: one JSON object per line as each step begins, then a last line
/// `{"step": "ready", "url", "preview"}` or `{"step": "failed", "error", "status"}`.
fn launch_streaming(state: &AppState, request: LaunchRequest, build: Option<BuildInput>) -> Response {
    let (lines, body) = mpsc::unbounded_channel::<String>();
    let lifecycle = state.lifecycle.clone();
    let request_id = request_id::current();
    state.tasks.spawn(async move {
        let (events, mut progress) = mpsc::unbounded_channel();
        // A task of its own, so that even a panic ends the stream with a `failed` line.
        let launch = tokio::spawn(async move { lifecycle.launch_built(request, build, Some(events)).await });
        tokio::pin!(launch);
        let result = loop {
            tokio::select! {
                Some(event) = progress.recv() => send_line(&lines, &event),
                result = &mut launch => break result,
            }
        };
        while let Ok(event) = progress.try_recv() {
            send_line(&lines, &event);
        }
        let outcome = result
            .map_err(|err| ApiError::Internal(format!("the launch stopped: {err}")))
            .and_then(|r| r.map_err(ApiError::from));
        let last = match outcome {
            Ok(info) => json!({ "step": "ready", "url": info.url, "preview": info }),
            Err(err) if err.status().is_server_error() => {
                let id = request_id.as_deref().unwrap_or("-");
                tracing::error!(request_id = id, error = %crate::error_chain(&err), "streamed launch failed");
                let error = format!("{} (request id {id})", err.public_message());
                json!({ "step": "failed", "error": error, "status": err.status().as_u16(), "request_id": id })
            }
            Err(err) => {
                tracing::info!(error = %err, "streamed launch refused");
                json!({ "step": "failed", "error": err.to_string(), "status": err.status().as_u16() })
            }
        };
        send_line(&lines, &last);
    });
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|line| (Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line)), body))
    });
    ([(header::CONTENT_TYPE, NDJSON), (header::CACHE_CONTROL, "no-store")], axum::body::Body::from_stream(stream))
        .into_response()
}

fn send_line(lines: &mpsc::UnboundedSender<String>, value: &impl serde::Serialize) {
    if let Ok(mut line) = serde_json::to_string(value) {
        line.push('\n');
        lines.send(line).ok();
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics) text. No auth, like `/healthz`; it names no preview.
async fn metrics_text(State(state): State<AppState>) -> Response {
    let metrics = state.lifecycle.metrics();
    if let Ok(previews) = state.lifecycle.list().await {
        metrics
            .previews
            .set(previews.iter().filter(|p| p.status == crate::preview::PreviewState::Running).count() as i64);
        metrics
            .previews_asleep
            .set(previews.iter().filter(|p| p.status == crate::preview::PreviewState::Asleep).count() as i64);
    }
    if let Some(disk) = state.lifecycle.builds().disk().await {
        metrics.build_images_bytes.set(disk.images_bytes.unwrap_or(0) as i64);
        metrics.docker_free_bytes.set(disk.free_bytes.unwrap_or(0) as i64);
    }
    let router = state.lifecycle.router();
    Metrics::sync_counter(&metrics.nginx_reloads.get_or_create(&crate::metrics::SUCCESS), router.reloads());
    Metrics::sync_counter(&metrics.nginx_reloads.get_or_create(&crate::metrics::FAILURE), router.failed_reloads());
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn only_requests_a_browser_marks_as_cross_site_are_refused() {
        assert!(!is_cross_site(&headers(&[])), "curl sends neither header");
        assert!(!is_cross_site(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(is_cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(is_cross_site(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(!is_cross_site(&headers(&[("origin", "http://127.0.0.1:7800"), ("host", "127.0.0.1:7800")])));
        assert!(is_cross_site(&headers(&[("origin", "https://evil.example"), ("host", "127.0.0.1:7800")])));
        assert!(is_cross_site(&headers(&[("origin", "null"), ("host", "127.0.0.1:7800")])));
    }

    #[test]
    fn the_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let (proxy, client): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.5".parse().unwrap(), "203.0.113.9".parse().unwrap());
        let stranger: std::net::IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_behind(stranger, ["203.0.113.9"].into_iter(), &trusted),
            stranger,
            "a stranger's header is ignored"
        );
        assert_eq!(client_behind(proxy, ["203.0.113.9"].into_iter(), &trusted), client);
        let spoofed = ["1.2.3.4, 203.0.113.9, 10.0.0.7"];
        assert_eq!(client_behind(proxy, spoofed.into_iter(), &trusted), client, "the last untrusted hop counts");
        assert_eq!(client_behind(proxy, std::iter::empty(), &trusted), proxy);
        assert_eq!(client_behind(proxy, ["garbage"].into_iter(), &trusted), proxy);
    }

    #[test]
    fn with_api_hosts_only_those_names_and_ip_addresses_are_answered() {
        let allowed = [crate::preview::BaseDomain::parse("previews.example.com").unwrap()];
        for host in ["previews.example.com", "Previews.Example.COM:7800", "127.0.0.1:7800", "10.1.2.3", "[::1]:7800"] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in ["evil.example", "evil.example:7800", "previews.example.com.evil.example", "localhost:7800"] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }
}
