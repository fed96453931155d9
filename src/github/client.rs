//! GitHub's REST API as previewd uses it: pull requests, issue comments, deployments and their
//! statuses, and who a token belongs to. Calls go through octocrab's generic requests to the documented
//! routes, and only the fields previewd needs are read from the answers.

use std::sync::Arc;
use std::time::Duration;

use octocrab::Octocrab;
use octocrab::service::middleware::retry::RetryConfig;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// GitHub limits a deployment status description to 140 characters.
const MAX_DESCRIPTION: usize = 140;
const PER_PAGE: usize = 100;
/// Pages read of a paged list (comments searched for the sticky one, open pull requests).
const MAX_PAGES: usize = 30;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiCallError {
    #[error("GitHub answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("cannot reach GitHub: {0}")]
    Transport(String),
    #[error("cannot set up the GitHub client: {0}")]
    Setup(String),
    /// GitHub's rate limit (primary: `X-RateLimit-Remaining: 0`; secondary: `Retry-After`) says
    /// nothing about the request itself.
    #[error("GitHub's rate limit applies (HTTP {status}){}", retry_after.map(|s| format!("; retry in {s} s")).unwrap_or_default())]
    RateLimited { status: u16, retry_after: Option<u64> },
    /// A download (a commit's tarball) was larger than allowed.
    #[error("the download is larger than {0} bytes")]
    TooLarge(u64),
}

impl ApiCallError {
    /// GitHub says there is no such thing, or the token may not see it (GitHub answers both 404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }

    /// Worth another try: GitHub or the network failed, or a rate limit applies.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Status { status, message } => {
                *status >= 500
                    || *status == 429
                    || (*status == 403 && message.to_ascii_lowercase().contains("rate limit"))
            }
            Self::RateLimited { .. } => true,
            Self::Setup(_) | Self::TooLarge(_) => false,
        }
    }
}

/// Whether an error answer is GitHub's rate limit rather than about the request, per GitHub's
/// docs on rate limits: 403 or 429 with `x-ratelimit-remaining: 0`, or with `retry-after`.
/// Returns the seconds to wait when GitHub says.
pub fn rate_limit(status: u16, headers: &axum::http::HeaderMap, now_unix: u64) -> Option<Option<u64>> {
    if !matches!(status, 403 | 429) {
        return None;
    }
    let number =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(seconds) = number("retry-after") {
        return Some(Some(seconds));
    }
    if number("x-ratelimit-remaining") == Some(0) {
        return Some(number("x-ratelimit-reset").map(|reset| reset.saturating_sub(now_unix)));
    }
    None
}

impl From<octocrab::Error> for ApiCallError {
    fn from(err: octocrab::Error) -> Self {
        match err {
            octocrab::Error::GitHub { source, .. } => {
                Self::Status { status: source.status_code.as_u16(), message: source.message }
            }
            other => Self::Transport(other.to_string()),
        }
    }
}

#[derive(Deserialize)]
struct Created {
    id: u64,
}

#[derive(Deserialize)]
struct CommentItem {
    id: u64,
    #[serde(default)]
    body: Option<String>,
    user: Option<UserItem>,
}

#[derive(Deserialize)]
struct UserItem {
    login: String,
}

#[derive(Deserialize)]
struct PermissionItem {
    permission: String,
}

/// What the token's owner may do on a repository (`GET /repos/{owner}/{repo}`'s `permissions`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RepoPermissions {
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub push: bool,
    #[serde(default)]
    pub pull: bool,
}

#[derive(Deserialize)]
struct RepoItem {
    #[serde(default)]
    permissions: Option<RepoPermissions>,
}

#[derive(Deserialize)]
struct HookItem {
    #[serde(default)]
    active: bool,
    #[serde(default)]
    config: HookConfig,
}

#[derive(Default, Deserialize)]
struct HookConfig {
    #[serde(default)]
    url: Option<String>,
}

#[derive(Clone)]
pub struct GitHubApi {
    octocrab: Octocrab,
    metrics: Option<Arc<Metrics>>,
    /// Commit tarballs (see `super::tarball`): read raw, since GitHub redirects them to another
    /// host, which must not get the token.
    pub(super) downloads: super::tarball::Downloads,
}

impl GitHubApi {
    pub fn new(api_url: &str, token: &str) -> Result<Self, ApiCallError> {
        let octocrab = Octocrab::builder()
            .base_uri(api_url)
            .map_err(|err| ApiCallError::Setup(err.to_string()))?
            .personal_token(token.to_owned())
            // previewd retries itself, with its own backoff and shutdown handling.
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(Duration::from_secs(5)))
            .set_read_timeout(Some(Duration::from_secs(20)))
            .build()
            .map_err(|err| ApiCallError::Setup(err.to_string()))?;
        let downloads = super::tarball::Downloads::new(api_url, token)?;
        Ok(Self { octocrab, metrics: None, downloads })
    }

    /// Counts this client's calls in the metrics.
    pub fn counted(self, metrics: Arc<Metrics>) -> Self {
        Self { metrics: Some(metrics), ..self }
    }

    fn observe<T>(&self, result: Result<T, octocrab::Error>) -> Result<T, ApiCallError> {
        self.count(result.is_ok());
        result.map_err(ApiCallError::from)
    }

    pub(super) fn count(&self, success: bool) {
        if let Some(metrics) = &self.metrics {
            let outcome = if success { &crate::metrics::SUCCESS } else { &crate::metrics::FAILURE };
            metrics.github_calls.get_or_create(outcome).inc();
        }
    }

    /// The id of the first comment by `author` on an issue or pull request whose body contains
    /// `marker` (anyone can post a comment that contains the marker).
    pub async fn find_comment(
        &self,
        repo: &str,
        number: u64,
        marker: &str,
        author: &str,
    ) -> Result<Option<u64>, ApiCallError> {
        for page in 1..=MAX_PAGES {
            let route = format!("/repos/{repo}/issues/{number}/comments?per_page={PER_PAGE}&page={page}");
            let comments: Vec<CommentItem> = self.observe(self.octocrab.get(route, None::<&()>).await)?;
            let ours = |c: &&CommentItem| c.user.as_ref().is_some_and(|u| u.login.eq_ignore_ascii_case(author));
            if let Some(found) =
                comments.iter().filter(ours).find(|c| c.body.as_deref().is_some_and(|b| b.contains(marker)))
            {
                return Ok(Some(found.id));
            }
            if comments.len() < PER_PAGE {
                break;
            }
        }
        Ok(None)
    }

    pub async fn create_comment(&self, repo: &str, number: u64, body: &str) -> Result<u64, ApiCallError> {
        let route = format!("/repos/{repo}/issues/{number}/comments");
        let created: Created = self.observe(self.octocrab.post(route, Some(&json!({ "body": body }))).await)?;
        Ok(created.id)
    }

    pub async fn update_comment(&self, repo: &str, id: u64, body: &str) -> Result<(), ApiCallError> {
        let route = format!("/repos/{repo}/issues/comments/{id}");
        let _: serde_json::Value = self.observe(self.octocrab.patch(route, Some(&json!({ "body": body }))).await)?;
        Ok(())
    }

    /// Reacts to a comment (`+1`, `confused`, …); GitHub answers 200 when that reaction was
    /// there already.
    pub async fn add_reaction(&self, repo: &str, comment_id: u64, content: &str) -> Result<(), ApiCallError> {
        let route = format!("/repos/{repo}/issues/comments/{comment_id}/reactions");
        let _: serde_json::Value =
            self.observe(self.octocrab.post(route, Some(&json!({ "content": content }))).await)?;
        Ok(())
    }

    /// A transient, non-production deployment of one commit to the preview's environment. No
    /// required status contexts and no auto-merge: GitHub would otherwise refuse (409) until every
    /// check passed, or merge the default branch into the PR.
    pub async fn create_deployment(
        &self,
        repo: &str,
        sha: &str,
        environment: &str,
        description: &str,
    ) -> Result<u64, ApiCallError> {
        let body = json!({
            "ref": sha,
            "task": "deploy",
            "auto_merge": false,
            "required_contexts": [],
            "environment": environment,
            "description": truncate(description),
            "transient_environment": true,
            "production_environment": false,
        });
        let created: Created =
            self.observe(self.octocrab.post(format!("/repos/{repo}/deployments"), Some(&body)).await)?;
        Ok(created.id)
    }

    pub async fn create_status(
        &self,
        repo: &str,
        deployment: u64,
        state: &str,
        environment_url: Option<&str>,
        log_url: Option<&str>,
        description: &str,
    ) -> Result<(), ApiCallError> {
        let mut body = json!({ "state": state, "description": truncate(description), "auto_inactive": true });
        if let Some(url) = environment_url {
            body["environment_url"] = json!(url);
        }
        if let Some(url) = log_url {
            body["log_url"] = json!(url);
        }
        let route = format!("/repos/{repo}/deployments/{deployment}/statuses");
        let _: serde_json::Value = self.observe(self.octocrab.post(route, Some(&body)).await)?;
        Ok(())
    }

    /// The open pull requests of a repository, every page; an error rather than a partial list
    /// (a pull request missing from it would look closed).
    pub async fn open_pulls(&self, repo: &str) -> Result<Vec<super::event::PullRequest>, ApiCallError> {
        let mut pulls = Vec::new();
        for page in 1..=MAX_PAGES {
            let route = format!("/repos/{repo}/pulls?state=open&per_page={PER_PAGE}&page={page}");
            let batch: Vec<super::event::PullRequest> = self.observe(self.octocrab.get(route, None::<&()>).await)?;
            let last = batch.len() < PER_PAGE;
            pulls.extend(batch);
            if last {
                return Ok(pulls);
            }
        }
        Err(ApiCallError::Status {
            status: 0,
            message: format!("{repo} has more than {} open pull requests; not syncing it", MAX_PAGES * PER_PAGE),
        })
    }

    /// One pull request as GitHub holds it now.
    pub async fn pull(&self, repo: &str, number: u64) -> Result<super::event::PullRequest, ApiCallError> {
        self.observe(self.octocrab.get(format!("/repos/{repo}/pulls/{number}"), None::<&()>).await)
    }

    /// The login of the token's owner. Read raw, because a refusal must be told apart from
    /// GitHub's rate limit by its headers (a refused token is remembered; a rate limit is not).
    pub async fn user(&self) -> Result<String, ApiCallError> {
        let response = self.octocrab._get("/user").await.inspect_err(|_| self.count(false))?;
        let status = response.status().as_u16();
        self.count((200..300).contains(&status));
        let limited = rate_limit(status, response.headers(), crate::clock::unix_now().max(0) as u64);
        let body = self.octocrab.body_to_string(response).await.map_err(ApiCallError::from)?;
        if let Some(retry_after) = limited {
            return Err(ApiCallError::RateLimited { status, retry_after });
        }
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(ApiCallError::Status { status, message });
        }
        let user: UserItem = serde_json::from_str(&body)
            .map_err(|err| ApiCallError::Transport(format!("GitHub's answer to GET /user is not a user: {err}")))?;
        Ok(user.login)
    }

    /// The token owner's permissions on a repository (none listed: read-only, as for an
    /// installation token GitHub describes without them).
    pub async fn repo_permissions(&self, repo: &str) -> Result<RepoPermissions, ApiCallError> {
        let item: RepoItem = self.observe(self.octocrab.get(format!("/repos/{repo}"), None::<&()>).await)?;
        Ok(item.permissions.unwrap_or_default())
    }

    /// The URLs the repository's active webhooks deliver to (needs admin on the repository).
    pub async fn hook_urls(&self, repo: &str) -> Result<Vec<String>, ApiCallError> {
        let route = format!("/repos/{repo}/hooks?per_page={PER_PAGE}");
        let hooks: Vec<HookItem> = self.observe(self.octocrab.get(route, None::<&()>).await)?;
        Ok(hooks.into_iter().filter(|hook| hook.active).filter_map(|hook| hook.config.url).collect())
    }

    /// `admin`, `write`, `read` or `none`.
    pub async fn permission(&self, repo: &str, login: &str) -> Result<String, ApiCallError> {
        let route = format!("/repos/{repo}/collaborators/{login}/permission");
        let permission: PermissionItem = self.observe(self.octocrab.get(route, None::<&()>).await)?;
        Ok(permission.permission)
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> axum::http::HeaderMap {
        pairs.iter().map(|(k, v)| (axum::http::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn githubs_rate_limit_answers_are_told_apart_from_refusals() {
        let primary = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1000060")]);
        assert_eq!(rate_limit(403, &primary, 1_000_000), Some(Some(60)));
        assert_eq!(rate_limit(429, &headers(&[("retry-after", "30")]), 0), Some(Some(30)));
        assert_eq!(rate_limit(403, &headers(&[("x-ratelimit-remaining", "4999")]), 0), None, "a real refusal");
        assert_eq!(rate_limit(401, &primary, 0), None);
        assert_eq!(rate_limit(403, &headers(&[("x-ratelimit-remaining", "0")]), 0), Some(None));
    }
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_DESCRIPTION {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(MAX_DESCRIPTION - 1).collect();
    short.push('…');
    short
}

/// Backoff between tries of one call: 0.5 s doubling to 30 s, about three minutes in all.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
const MAX_TRIES: usize = 10;

/// Runs a call until it succeeds, fails for good, or the tries run out. Once `shutdown` is
/// cancelled a failed call is not tried again.
pub async fn with_retries<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut call: F) -> Result<T, ApiCallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiCallError>>,
{
    let mut delay = FIRST_RETRY;
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(err) if err.is_retryable() && attempt < MAX_TRIES && !shutdown.is_cancelled() => {
                tracing::warn!(call = what, attempt, error = %err, retry_in_ms = delay.as_millis() as u64, "GitHub call failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => {}
                }
                delay = (delay * 2).min(MAX_RETRY);
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_and_rate_limits_are_retried_client_errors_are_not() {
        let status = |status, message: &str| ApiCallError::Status { status, message: message.into() };
        assert!(status(502, "Bad Gateway").is_retryable());
        assert!(status(429, "Too Many Requests").is_retryable());
        assert!(status(403, "API rate limit exceeded for user").is_retryable());
        assert!(!status(403, "Resource not accessible by integration").is_retryable());
        assert!(!status(422, "Validation Failed").is_retryable());
        assert!(ApiCallError::Transport("connection refused".into()).is_retryable());
    }

    #[test]
    fn descriptions_are_cut_to_githubs_limit() {
        assert_eq!(truncate("short"), "short");
        let long = "x".repeat(500);
        assert_eq!(truncate(&long).chars().count(), MAX_DESCRIPTION);
    }

    #[tokio::test]
    async fn a_retryable_failure_is_tried_again_until_it_succeeds() {
        let mut failures = 2;
        let result = with_retries("test", &CancellationToken::new(), || {
            let fail = failures > 0;
            failures -= 1;
            async move { if fail { Err(ApiCallError::Transport("down".into())) } else { Ok(7) } }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried() {
        let mut calls = 0;
        let result: Result<(), _> = with_retries("test", &CancellationToken::new(), || {
            calls += 1;
            async { Err(ApiCallError::Status { status: 404, message: "Not Found".into() }) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }
}
