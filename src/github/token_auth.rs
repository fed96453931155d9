//! GitHub tokens as API credentials (Stager's GithubAuthentication): with `github.api_auth`,
//! `Authorization: Bearer <token>` is accepted for a GitHub user who has push access to a
//! repository whose pull requests use the image at stake. GitHub's answers, refusals included,
//! are cached briefly (GitHub's rate limit is not a refusal and is not cached), identical tokens
//! share one question, only a few questions run at once, and each client address may present
//! only a few tokens GitHub refuses: random tokens cannot turn previewd into a flood of requests
//! to GitHub.

use std::net::IpAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::client::{ApiCallError, GitHubApi};
use crate::cache::ExpiringMap;
use crate::config::{GitHubConfig, RepoConfig};
use crate::locks::KeyedLocks;
use crate::preview::ImageKey;
use crate::throttle::{Budget, RetryAfter, Throttle};

const CACHE_FOR: Duration = Duration::from_secs(60);
const MAX_CACHED: usize = 4096;
const MAX_CONCURRENT_LOOKUPS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenAuthError {
    #[error("GitHub does not accept this token; create a token at https://github.com/settings/tokens")]
    Rejected,
    #[error("cannot ask GitHub who this token belongs to: {0}")]
    Unavailable(ApiCallError),
    #[error("GitHub user {login} has no push access to {repos}")]
    NoPushAccess { login: String, repos: String },
    #[error("no repository in github.repos uses image {0}, so GitHub users cannot use it")]
    NoRepository(String),
    #[error("too many unknown tokens from your address; try again in {} s", .0.seconds())]
    Throttled(RetryAfter),
}

impl TokenAuthError {
    /// For a `Retry-After` header.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Throttled(wait) => Some(wait.seconds()),
            Self::Unavailable(ApiCallError::RateLimited { retry_after, .. }) => Some(retry_after.unwrap_or(60)),
            _ => None,
        }
    }
}

/// Ten tokens GitHub refuses per address, then one more every six seconds: each lookup of an
/// unknown token is a call to GitHub, which counts failed ones against previewd's address.
const LOOKUP_BUDGET: Budget = Budget { burst: 10, refill_every: Duration::from_secs(6), in_flight: 4 };

pub struct TokenAuth {
    api_url: String,
    /// previewd's own client, which reads collaborator permissions.
    service: GitHubApi,
    /// Token digest → its owner's login, or `None` for a token GitHub refused.
    logins: ExpiringMap<[u8; 32], Option<String>>,
    push: ExpiringMap<(String, String), bool>,
    in_flight: KeyedLocks<[u8; 32]>,
    lookups: Semaphore,
    throttle: Throttle,
}

impl TokenAuth {
    pub fn new(config: &GitHubConfig, service: GitHubApi) -> Self {
        Self {
            api_url: config.api_url.clone(),
            service,
            logins: ExpiringMap::new(CACHE_FOR, MAX_CACHED),
            push: ExpiringMap::new(CACHE_FOR, MAX_CACHED),
            in_flight: KeyedLocks::default(),
            lookups: Semaphore::new(MAX_CONCURRENT_LOOKUPS),
            throttle: Throttle::new(LOOKUP_BUDGET),
        }
    }

    /// The login of the token's owner. Lookups of tokens GitHub refuses are throttled per
    /// `client` address (when known); GitHub's rate limit is not remembered as a refusal.
    pub async fn login(&self, token: &str, client: Option<IpAddr>) -> Result<String, TokenAuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = self.logins.get(&key) {
            return known.ok_or(TokenAuthError::Rejected);
        }
        let attempt = self.throttle.begin(client).map_err(TokenAuthError::Throttled)?;
        let _flight = self.in_flight.lock(&key).await;
        if let Some(known) = self.logins.get(&key) {
            return known.ok_or(TokenAuthError::Rejected);
        }
        let _permit = self.lookups.acquire().await.map_err(|_| TokenAuthError::Rejected)?;
        let api = GitHubApi::new(&self.api_url, token).map_err(TokenAuthError::Unavailable)?;
        match api.user().await {
            Ok(login) => {
                self.logins.insert(key, Some(login.clone()));
                attempt.succeeded();
                Ok(login)
            }
            Err(ApiCallError::Status { status: 401 | 403, .. }) => {
                self.logins.insert(key, None);
                Err(TokenAuthError::Rejected)
            }
            Err(other) => {
                // GitHub's trouble, not the caller's.
                attempt.succeeded();
                Err(TokenAuthError::Unavailable(other))
            }
        }
    }

    /// Allows a user with push access to one of the repositories whose pull requests use
    /// `image` (any configured repository when `image` is `None`).
    pub async fn authorize(
        &self,
        github: &GitHubConfig,
        login: &str,
        image: Option<&ImageKey>,
    ) -> Result<(), TokenAuthError> {
        let repos: Vec<&RepoConfig> = match image {
            Some(image) => github.repos_of_image(image).collect(),
            None => github.repos.values().collect(),
        };
        if repos.is_empty() {
            return Err(TokenAuthError::NoRepository(image.map(ToString::to_string).unwrap_or_default()));
        }
        for repo in &repos {
            if self.may_push(&repo.full_name, login).await? {
                return Ok(());
            }
        }
        let names: Vec<&str> = repos.iter().map(|r| r.full_name.as_str()).collect();
        Err(TokenAuthError::NoPushAccess { login: login.to_owned(), repos: names.join(", ") })
    }

    /// Whether the user may push to `repo` (asked once, then cached).
    pub async fn may_push(&self, repo: &str, login: &str) -> Result<bool, TokenAuthError> {
        let key = (repo.to_owned(), login.to_owned());
        if let Some(allowed) = self.push.get(&key) {
            return Ok(allowed);
        }
        let allowed = match self.service.permission(repo, login).await {
            // GitHub reports `maintain` as `write`.
            Ok(permission) => matches!(permission.as_str(), "admin" | "write"),
            Err(ApiCallError::Status { status: 404, .. }) => false,
            Err(err) => return Err(TokenAuthError::Unavailable(err)),
        };
        self.push.insert(key, allowed);
        Ok(allowed)
    }
}
