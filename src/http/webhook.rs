//! `POST /webhooks/github` (and Stager's `/event_receiver`): GitHub deliveries, answered within
//! milliseconds. The signature is checked before anything is parsed; the work itself runs in the
//! background, one pull request at a time, and acts on the pull request as GitHub's API shows it
//! (the answer describes what the delivery says, not yet what will be done).
//!
//! Until its signature matches, a delivery is anyone's: one too large by its `Content-Length` or
//! without a signature is refused unread, and the bodies of signed ones are hashed as they arrive
//! and held only within [`UNVERIFIED_BUDGET`].

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::body::{declared_length, read_each};
use super::error::ApiError;
use crate::github::command::{IssueCommentEvent, argument_of, command_of, is_login};
use crate::github::commands::CommandRequest;
use crate::github::event::{ACTIONS, Desired, PullRequestEvent, desired};
use crate::github::feedback::PullRequestKey;
use crate::github::previews::Source;
use crate::github::webhook::{Signed, VerifiedDelivery};

/// GitHub caps payloads at 25 MB; a pull_request event is tens of kilobytes.
pub const MAX_WEBHOOK_BYTES: usize = 5 * 1024 * 1024;

/// The bytes of webhook bodies whose signature is not checked yet that previewd holds at once:
/// one of the largest (GitHub's deliveries are tens of kilobytes; many fit at once).
pub const UNVERIFIED_BUDGET: usize = MAX_WEBHOOK_BYTES;

/// Counts every delivery by event and outcome; events are named only once their signature matched.
pub async fn github_webhook(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let mut event = "unverified".to_owned();
    let result = receive(&state, request, &mut event).await;
    let outcome = match &result {
        Ok((outcome, _)) => *outcome,
        Err(ApiError::Body(_) | ApiError::Event(_) | ApiError::TooLarge(_) | ApiError::BodyTimeout) => "invalid",
        Err(_) => "rejected",
    };
    state.lifecycle.metrics().delivery(&event, outcome);
    result.map(|(_, response)| response)
}

async fn receive(state: &AppState, request: Request, event: &mut String) -> Result<(&'static str, Response), ApiError> {
    let (Some(github), Some(service)) = (state.config.github.as_ref(), state.github.as_ref()) else {
        return Err(ApiError::NotConfigured("GitHub webhooks are off: add a `github` section to config.yml"));
    };
    if github.webhook_basic_auth {
        let authorization = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        let client = super::client_address(&request, &state.config.trusted_proxies);
        state.auth.authenticate(authorization, client).await?;
    }
    let delivery = read_signed(state, service, &github.webhook_secret, request).await?;
    event.clone_from(&delivery.event);
    match delivery.event.as_str() {
        "ping" => Ok(("pong", answer(StatusCode::OK, json!({ "status": "pong" })))),
        "pull_request" => pull_request(state, service, delivery),
        "issue_comment" => issue_comment(state, service, delivery),
        other => Ok(ignored(&format!("the {other} event is not used; send pull_request and issue_comment events"))),
    }
}

/// The delivery, read only as far as its headers allow and held within the unverified budget.
async fn read_signed(
    state: &AppState,
    service: &super::GitHubService,
    secret: &crate::config::github::Secret,
    request: Request,
) -> Result<VerifiedDelivery, ApiError> {
    let (parts, body) = request.into_parts();
    let declared = declared_length(&parts.headers, MAX_WEBHOOK_BYTES)?;
    let mut signed = Signed::start(secret, &parts.headers)?;
    let wait = state.config.http.body_timeout;
    let _held = service.unverified.reserve(declared.unwrap_or(MAX_WEBHOOK_BYTES), wait).await?;
    let body = read_each(body, MAX_WEBHOOK_BYTES, declared, |piece| signed.update(piece)).await?;
    Ok(signed.finish(&parts.headers, body)?)
}

fn pull_request(
    state: &AppState,
    service: &super::GitHubService,
    delivery: VerifiedDelivery,
) -> Result<(&'static str, Response), ApiError> {
    let event: PullRequestEvent = serde_json::from_slice(&delivery.body)
        .map_err(|err| ApiError::Body(format!("the pull_request payload is not valid: {err}")))?;
    if !ACTIONS.contains(&event.action.as_str()) {
        return Ok(ignored(&format!("the {} action does not change previews", event.action)));
    }
    let full_name = &event.repository.full_name;
    let Some(repo) = state.config.github.as_ref().and_then(|github| github.repo(full_name)) else {
        tracing::info!(repo = %full_name, "ignoring a delivery for a repository that is not in config.yml");
        return Ok(ignored(&format!("repository {full_name} is not in config.yml")));
    };
    let key = PullRequestKey { repo: repo.full_name.clone(), number: event.pull_request.number };
    let (slug, desired) = desired(&event.pull_request, repo, service.memory.approved(&key).as_deref())?;
    if !service.memory.first_delivery(&delivery.delivery) {
        return Ok(duplicate(&delivery.delivery));
    }
    let updated_at = &event.pull_request.updated_at;
    if !service.previews.record(&key, slug.clone(), desired.clone(), updated_at, Source::Delivery) {
        tracing::info!(repo = %key.repo, pr = key.number, delivery = %delivery.delivery, "ignoring a delivery older than one already received");
        return Ok(("stale", answer(StatusCode::OK, json!({ "status": "stale", "preview": slug }))));
    }
    let summary = match &desired {
        Desired::Present(target) => {
            json!({ "status": "accepted", "preview": slug, "desired": "present", "sha": target.sha })
        }
        Desired::Absent(reason) => {
            json!({ "status": "accepted", "preview": slug, "desired": "absent", "reason": reason })
        }
    };
    tracing::info!(repo = %key.repo, pr = key.number, action = %event.action, %slug, delivery = %delivery.delivery, "pull request delivery accepted");
    service.previews.schedule(key, &state.tasks);
    Ok(("accepted", answer(StatusCode::ACCEPTED, summary)))
}

/// A `/preview` command in a new comment on a pull request of a configured repository. Its
/// delivery id and its comment id are each acted on once: a captured delivery sent again under
/// a new id is still the same comment.
fn issue_comment(
    state: &AppState,
    service: &super::GitHubService,
    delivery: VerifiedDelivery,
) -> Result<(&'static str, Response), ApiError> {
    let event: IssueCommentEvent = serde_json::from_slice(&delivery.body)
        .map_err(|err| ApiError::Body(format!("the issue_comment payload is not valid: {err}")))?;
    if event.action != "created" {
        return Ok(ignored(&format!("the {} action of a comment gives no command", event.action)));
    }
    if event.issue.pull_request.is_none() {
        return Ok(ignored("a comment on an issue, not on a pull request"));
    }
    let full_name = &event.repository.full_name;
    let Some(repo) = state.config.github.as_ref().and_then(|github| github.repo(full_name)) else {
        return Ok(ignored(&format!("repository {full_name} is not in config.yml")));
    };
    let Some(command) = command_of(&event.comment.body) else {
        return Ok(ignored("the comment is not a /preview command"));
    };
    if !is_login(&event.comment.user.login) {
        return Err(ApiError::Body("issue_comment.comment.user.login is not a GitHub login".to_owned()));
    }
    let comment_key = format!("comment-{}-{}", repo.full_name.to_ascii_lowercase(), event.comment.id);
    if !service.memory.first_delivery(&delivery.delivery) || !service.memory.first_delivery(&comment_key) {
        return Ok(duplicate(&delivery.delivery));
    }
    let key = PullRequestKey { repo: repo.full_name.clone(), number: event.issue.number };
    let name = command.as_ref().map_or("unknown", |command| command.as_str());
    tracing::info!(repo = %key.repo, pr = key.number, command = name, login = %event.comment.user.login, delivery = %delivery.delivery, "pull request command accepted");
    let request = CommandRequest {
        key,
        comment_id: event.comment.id,
        login: event.comment.user.login.clone(),
        command,
        created_at: event.comment.created_at.clone(),
        argument: argument_of(&event.comment.body),
    };
    service.previews.schedule_command(request, &state.tasks);
    Ok(("accepted", answer(StatusCode::ACCEPTED, json!({ "status": "accepted", "command": name }))))
}

/// A delivery (or comment) acted on before: GitHub redelivers under the same id.
fn duplicate(delivery: &str) -> (&'static str, Response) {
    ("duplicate", answer(StatusCode::OK, json!({ "status": "duplicate", "delivery": delivery })))
}

fn ignored(reason: &str) -> (&'static str, Response) {
    ("ignored", answer(StatusCode::OK, json!({ "status": "ignored", "reason": reason })))
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}
