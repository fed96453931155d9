//! The HTTP API (axum): one line per route, authentication on everything but `/healthz` and the
//! GitHub webhook (which checks GitHub's signature), and handlers that turn validated requests
//! into lifecycle operations.
//!
//! Lifecycle operations run as tracked tasks of their own, so a client that hangs up cannot
//! cancel a launch half-way, and shutdown waits for them to finish.

pub mod body;
pub mod error;
pub mod webhook;

use std::sync::Arc;

use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::task::TaskTracker;
use tower_http::trace::TraceLayer;

use crate::auth::{AuthError, Authenticator, Principal, bearer_token};
use crate::config::Config;
use crate::github::previews::PullRequestPreviews;
use crate::github::token_auth::TokenAuth;
use crate::preview::ImageKey;
use crate::github::webhook::DeliveryLog;
use crate::lifecycle::{Lifecycle, LifecycleError, PreviewInfo};
use crate::request::{KillRequest, LaunchRequest, preview_name};
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
}

/// What the webhook needs besides the shared state.
#[derive(Clone)]
pub struct GitHubService {
    pub previews: PullRequestPreviews,
    pub deliveries: Arc<DeliveryLog>,
}

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/launch", post(launch))
        .route("/kill", post(kill))
        .route("/api/previews", get(list_previews))
        .route("/api/previews/{name}", get(get_preview))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .route("/healthz", get(healthz))
        // The webhook checks GitHub's signature itself (and Basic auth when configured).
        .route("/webhooks/github", post(webhook::github_webhook))
        .route("/event_receiver", post(webhook::github_webhook))
        .merge(protected)
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Who calls: a `users` entry (Basic) or, with `github.api_auth`, a GitHub user (Bearer token).
async fn require_auth(State(state): State<AppState>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let principal = match (authorization.as_deref().and_then(bearer_token), &state.tokens) {
        (Some(token), Some(tokens)) => Principal::GitHub(tokens.login(token).await?),
        (Some(_), None) => return Err(AuthError::TokensOff.into()),
        (None, _) => Principal::User(state.auth.authenticate(authorization.as_deref()).await?),
    };
    tracing::debug!(?principal, "authenticated");
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

impl AppState {
    /// Basic users may do anything; GitHub users need push access to a repository that uses
    /// the image (or to any configured repository, for reads).
    pub async fn authorize(&self, principal: &Principal, image: Option<&ImageKey>) -> Result<(), ApiError> {
        match (principal, &self.tokens, &self.config.github) {
            (Principal::User(_), _, _) => Ok(()),
            (Principal::GitHub(login), Some(tokens), Some(github)) => Ok(tokens.authorize(github, login, image).await?),
            (Principal::GitHub(_), _, _) => Err(AuthError::TokensOff.into()),
        }
    }
}

async fn launch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Fields(fields): Fields,
) -> Result<Response, ApiError> {
    let request = LaunchRequest::parse(fields, &state.config.images)?;
    state.authorize(&principal, Some(&request.image)).await?;
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
        // Authorized at all before learning whether the preview exists.
        state.authorize(&principal, None).await?;
        let image = state.lifecycle.get(&request.name).await?.image;
        state.authorize(&principal, Some(&image)).await?;
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
    state.authorize(&principal, None).await?;
    let mut previews = state.lifecycle.list().await?;
    if let (Principal::GitHub(login), Some(tokens), Some(github)) = (&principal, &state.tokens, &state.config.github) {
        let mut visible = Vec::new();
        for preview in previews {
            if tokens.may_see(github, login, preview.repo.as_deref(), &preview.image).await? {
                visible.push(preview);
            }
        }
        previews = visible;
    }
    Ok(Json(previews))
}

async fn get_preview(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<PreviewInfo>, ApiError> {
    state.authorize(&principal, None).await?;
    let slug = preview_name("name", &name)?;
    let preview = state.lifecycle.get(&slug).await?;
    if let (Principal::GitHub(login), Some(tokens), Some(github)) = (&principal, &state.tokens, &state.config.github)
        && !tokens.may_see(github, login, preview.repo.as_deref(), &preview.image).await?
    {
        return Err(LifecycleError::NotFound(slug).into());
    }
    Ok(Json(preview))
}

/// No auth: for load balancers and monitoring. 503 when Docker or nginx is not usable.
async fn healthz(State(state): State<AppState>) -> Response {
    let docker = state.lifecycle.runtime().ping().await.err().map(|err| err.to_string());
    let nginx = state.lifecycle.router().nginx();
    let nginx_error = nginx.master_pid().is_none().then(|| "no live nginx master process (is nginx running?)".to_owned());
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

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}
