//! GitHub tokens as API credentials (Stager's GithubAuthentication): with `github.api_auth`,
//! `Authorization: Bearer <token>` is accepted for a GitHub user who has push access to a
//! repository whose pull requests use the image at stake. GitHub's answers are cached briefly,
//! so a burst of requests asks GitHub once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::client::{ApiCallError, GitHubApi};
use crate::config::{GitHubConfig, RepoConfig};
use crate::preview::ImageKey;

const CACHE_FOR: Duration = Duration::from_secs(60);
const MAX_CACHED: usize = 4096;

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
}

pub struct TokenAuth {
    api_url: String,
    /// previewd's own client, which reads collaborator permissions.
    service: GitHubApi,
    logins: Cache<[u8; 32], String>,
    push: Cache<(String, String), bool>,
}

impl TokenAuth {
    pub fn new(config: &GitHubConfig, service: GitHubApi) -> Self {
        Self { api_url: config.api_url.clone(), service, logins: Cache::default(), push: Cache::default() }
    }

    /// The login of the token's owner.
    pub async fn login(&self, token: &str) -> Result<String, TokenAuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(login) = self.logins.get(&key) {
            return Ok(login);
        }
        let client = GitHubApi::new(&self.api_url, token).map_err(TokenAuthError::Unavailable)?;
        let login = client.user().await.map_err(|err| match err {
            ApiCallError::Status { status: 401 | 403, .. } => TokenAuthError::Rejected,
            other => TokenAuthError::Unavailable(other),
        })?;
        self.logins.put(key, login.clone());
        Ok(login)
    }

    /// Allows a user with push access to one of the repositories whose pull requests use
    /// `image` (any configured repository when `image` is `None`).
    pub async fn authorize(&self, github: &GitHubConfig, login: &str, image: Option<&ImageKey>) -> Result<(), TokenAuthError> {
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

    async fn may_push(&self, repo: &str, login: &str) -> Result<bool, TokenAuthError> {
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
        self.push.put(key, allowed);
        Ok(allowed)
    }
}

/// A small map whose entries count for [`CACHE_FOR`].
struct Cache<K, V>(Mutex<HashMap<K, (V, Instant)>>);

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + std::hash::Hash, V: Clone> Cache<K, V> {
    fn get(&self, key: &K) -> Option<V> {
        let entries = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(key).filter(|(_, at)| at.elapsed() < CACHE_FOR).map(|(value, _)| value.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut entries = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= MAX_CACHED {
            entries.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
        }
        if entries.len() < MAX_CACHED {
            entries.insert(key, (value, Instant::now()));
        }
    }
}
