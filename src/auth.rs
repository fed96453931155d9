//! Who may call the API: HTTP Basic credentials checked against the argon2 hashes in
//! `config.yml`, and the `hash-password` helper that makes those hashes.
//!
//! argon2 is slow by design (tens of ms and ~19 MiB per check), so a successful check is
//! remembered for a few minutes under a salted digest of the credentials (never the password
//! itself), concurrent requests with the same credentials share one check, at most a few
//! checks run at once with a bounded queue behind them (429 beyond), and each client address
//! may fail only a few logins before it must wait (see [`crate::throttle`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::cache::ExpiringMap;
use crate::config::User;
use crate::locks::KeyedLocks;
use crate::throttle::{Budget, RetryAfter, Throttle};

/// Who is calling the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A `users` entry of config.yml.
    User(String),
    /// A GitHub user, by a token (`github.api_auth`).
    GitHub(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authentication required: send HTTP Basic credentials of a user from config.yml")]
    Missing,
    #[error("the Authorization header is not valid HTTP Basic (expected `Basic base64(user:password)`)")]
    Malformed,
    #[error("wrong user name or password")]
    Rejected,
    #[error("GitHub tokens are not accepted here (github.api_auth is off); use HTTP Basic credentials")]
    TokensOff,
    #[error("too many failed logins from your address; try again in {} s", .0.seconds())]
    Throttled(RetryAfter),
    #[error("too many logins are being checked right now; try again in a second")]
    Busy,
}

impl AuthError {
    /// For a `Retry-After` header.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Throttled(wait) => Some(wait.seconds()),
            Self::Busy => Some(1),
            _ => None,
        }
    }
}

/// The token of `Authorization: Bearer <token>` (or GitHub's older `token <token>`).
pub fn bearer_token(authorization: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(authorization).ok()?.trim();
    let (scheme, token) = header.split_once(' ')?;
    let is_token = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token");
    (is_token && !token.trim().is_empty()).then(|| token.trim())
}

/// Checks Basic credentials. Unknown users are checked against a dummy hash so that the answer
/// takes as long as for a known user and does not tell which user names exist.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    hashes: HashMap<String, String>,
    dummy_hash: String,
    /// A flood of requests queues for these instead of exhausting memory.
    permits: Semaphore,
    /// Per process, so the digests in memory cannot be checked against a password list offline.
    salt: [u8; 16],
    /// Digests of credentials that passed.
    verified: ExpiringMap<CredentialDigest, ()>,
    in_flight: KeyedLocks<CredentialDigest>,
    /// Checks waiting for a permit.
    waiting: AtomicUsize,
    throttle: Throttle,
}

type CredentialDigest = [u8; 32];

const MAX_CONCURRENT_CHECKS: usize = 4;
/// Checks that may wait for a permit (a few seconds of argon2); beyond, 429.
const MAX_WAITING_CHECKS: usize = 64;
/// Ten failed logins per address, then one more every six seconds.
const LOGIN_BUDGET: Budget = Budget { burst: 10, refill_every: Duration::from_secs(6), in_flight: 1 };
const REMEMBER_FOR: Duration = Duration::from_secs(300);
const MAX_REMEMBERED: usize = 4096;

impl Authenticator {
    pub fn new(users: &[User]) -> Self {
        let inner = Inner {
            hashes: users.iter().map(|u| (u.name.clone(), u.password_hash.clone())).collect(),
            dummy_hash: hash_password("previewd-dummy-password").unwrap_or_default(),
            permits: Semaphore::new(MAX_CONCURRENT_CHECKS),
            salt: rand::random(),
            verified: ExpiringMap::new(REMEMBER_FOR, MAX_REMEMBERED),
            in_flight: KeyedLocks::default(),
            waiting: AtomicUsize::new(0),
            throttle: Throttle::new(LOGIN_BUDGET),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Returns the user name when the `Authorization` header holds valid credentials. Checks
    /// from `client` (when known) are throttled as a whole: failed ones use up its budget.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        client: Option<IpAddr>,
    ) -> Result<String, AuthError> {
        let (user, password) = parse_basic(authorization.ok_or(AuthError::Missing)?)?;
        let digest = self.inner.digest(&user, &password);
        if self.inner.remembers(&digest) {
            return Ok(user);
        }
        // Requests with the same credentials wait here for the first one's check (a browser's
        // parallel requests), so they do not count against the address.
        let _flight = self.inner.in_flight.lock(&digest).await;
        if self.inner.remembers(&digest) {
            return Ok(user);
        }
        let attempt = self.inner.throttle.begin(client).map_err(AuthError::Throttled)?;
        let known = self.inner.hashes.get(&user).cloned();
        let matches = {
            let hash = known.clone().unwrap_or_else(|| self.inner.dummy_hash.clone());
            let _permit = self.inner.permit().await?;
            tokio::task::spawn_blocking(move || verify_password(&password, &hash)).await.unwrap_or(false)
        };
        if matches && known.is_some() {
            self.inner.remember(digest);
            attempt.succeeded();
            Ok(user)
        } else {
            Err(AuthError::Rejected)
        }
    }
}

impl Inner {
    /// A turn to run argon2, waiting in a bounded queue.
    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AuthError> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING_CHECKS {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(AuthError::Busy);
        }
        let permit = self.permits.acquire().await.map_err(|_| AuthError::Busy);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        permit
    }

    fn digest(&self, user: &str, password: &str) -> CredentialDigest {
        let mut hasher = Sha256::new();
        hasher.update(self.salt);
        hasher.update(user.as_bytes());
        hasher.update([0]);
        hasher.update(password.as_bytes());
        hasher.finalize().into()
    }

    fn remembers(&self, digest: &CredentialDigest) -> bool {
        self.verified.get(digest).is_some()
    }

    fn remember(&self, digest: CredentialDigest) {
        self.verified.insert(digest, ());
    }
}

fn parse_basic(header: &[u8]) -> Result<(String, String), AuthError> {
    let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let (scheme, encoded) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| AuthError::Malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
    let (user, password) = decoded.split_once(':').ok_or(AuthError::Malformed)?;
    Ok((user.to_owned(), password.to_owned()))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

/// Hashes a password with argon2id and a random salt, as a PHC string for `config.yml`.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|err| format!("cannot hash the password: {err}"))
}

/// Accepts only an argon2 PHC string (`$argon2id$v=19$...`).
pub fn check_phc_hash(hash: &str) -> Result<(), String> {
    let hint = "make one with `previewd hash-password` (plain-text passwords are not accepted)";
    let parsed = PasswordHash::new(hash).map_err(|err| format!("not an argon2 PHC string ({err}); {hint}"))?;
    if parsed.algorithm.as_str().starts_with("argon2") {
        Ok(())
    } else {
        Err(format!("uses {}, not argon2; {hint}", parsed.algorithm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(credentials: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials)).into_bytes()
    }

    impl Authenticator {
        async fn authenticate_anywhere(&self, authorization: Option<&[u8]>) -> Result<String, AuthError> {
            self.authenticate(authorization, None).await
        }
    }

    #[tokio::test]
    async fn an_address_that_failed_its_budget_is_refused_without_a_check_while_others_are_not() {
        let auth = authenticator();
        let (attacker, operator) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 1]));
        for _ in 0..LOGIN_BUDGET.burst {
            assert_eq!(
                auth.authenticate(Some(&basic("testuser:guess")), Some(attacker)).await,
                Err(AuthError::Rejected)
            );
        }
        let refused = auth.authenticate(Some(&basic("testuser:testpassword")), Some(attacker)).await;
        assert!(matches!(refused, Err(AuthError::Throttled(_))), "{refused:?}");
        let wait = refused.unwrap_err().retry_after().unwrap();
        assert!((1..=6).contains(&wait), "at most one refill away: {wait}");
        let operator_login = auth.authenticate(Some(&basic("testuser:testpassword")), Some(operator)).await;
        assert_eq!(operator_login, Ok("testuser".into()));
    }

    fn authenticator() -> Authenticator {
        let hash = hash_password("testpassword").unwrap();
        Authenticator::new(&[User { name: "testuser".into(), password_hash: hash }])
    }

    #[test]
    fn hashes_are_argon2id_phc_strings_that_verify() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(check_phc_hash(&hash).is_ok());
        assert!(verify_password("s3cret", &hash));
        assert!(!verify_password("wrong", &hash));
    }

    #[test]
    fn plain_text_passwords_are_not_hashes() {
        assert!(check_phc_hash("testpassword").unwrap_err().contains("hash-password"));
    }

    #[test]
    fn bearer_and_token_schemes_carry_a_token() {
        assert_eq!(bearer_token(b"Bearer ghp_abc"), Some("ghp_abc"));
        assert_eq!(bearer_token(b"token ghp_abc"), Some("ghp_abc"));
        assert_eq!(bearer_token(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
    }

    #[tokio::test]
    async fn right_credentials_give_the_user_name() {
        let auth = authenticator();
        assert_eq!(auth.authenticate_anywhere(Some(&basic("testuser:testpassword"))).await, Ok("testuser".into()));
    }

    #[tokio::test]
    async fn a_verified_password_is_remembered_but_a_wrong_one_never_is() {
        let auth = authenticator();
        assert!(auth.authenticate_anywhere(Some(&basic("testuser:testpassword"))).await.is_ok());
        let started = std::time::Instant::now();
        for _ in 0..50 {
            assert!(auth.authenticate_anywhere(Some(&basic("testuser:testpassword"))).await.is_ok());
        }
        assert!(started.elapsed() < Duration::from_millis(200), "remembered checks skip argon2");
        assert_eq!(auth.authenticate_anywhere(Some(&basic("testuser:testpassword2"))).await, Err(AuthError::Rejected));
        assert_eq!(auth.inner.verified.size(), 1);
    }

    #[tokio::test]
    async fn wrong_missing_or_malformed_credentials_are_refused() {
        let auth = authenticator();
        assert_eq!(auth.authenticate_anywhere(None).await, Err(AuthError::Missing));
        assert_eq!(auth.authenticate_anywhere(Some(&basic("testuser:nope"))).await, Err(AuthError::Rejected));
        assert_eq!(auth.authenticate_anywhere(Some(&basic("nobody:testpassword"))).await, Err(AuthError::Rejected));
        assert_eq!(auth.authenticate_anywhere(Some(b"Bearer abc")).await, Err(AuthError::Malformed));
        assert_eq!(auth.authenticate_anywhere(Some(b"Basic !!!")).await, Err(AuthError::Malformed));
    }
}
