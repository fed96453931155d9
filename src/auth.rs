//! Who may call the API: HTTP Basic credentials checked against the argon2 hashes in
//! `config.yml`, and the `hash-password` helper that makes those hashes.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;

use crate::config::User;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authentication required: send HTTP Basic credentials of a user from config.yml")]
    Missing,
    #[error("the Authorization header is not valid HTTP Basic (expected `Basic base64(user:password)`)")]
    Malformed,
    #[error("wrong user name or password")]
    Rejected,
}

/// Checks Basic credentials. Unknown users are checked against a dummy hash so that the answer
/// takes as long as for a known user and does not tell which user names exist.
#[derive(Clone)]
pub struct Authenticator {
    hashes: Arc<HashMap<String, String>>,
    dummy_hash: Arc<str>,
}

impl Authenticator {
    pub fn new(users: &[User]) -> Self {
        let hashes = users.iter().map(|u| (u.name.clone(), u.password_hash.clone())).collect();
        let dummy_hash = hash_password("previewd-dummy-password").unwrap_or_default();
        Self { hashes: Arc::new(hashes), dummy_hash: dummy_hash.into() }
    }

    /// Returns the user name when the `Authorization` header holds valid credentials.
    pub async fn authenticate(&self, authorization: Option<&[u8]>) -> Result<String, AuthError> {
        let (user, password) = parse_basic(authorization.ok_or(AuthError::Missing)?)?;
        let known = self.hashes.get(&user).cloned();
        let hash = known.clone().unwrap_or_else(|| self.dummy_hash.to_string());
        // argon2 is deliberately slow (tens of ms): keep it off the async workers.
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        if matches && known.is_some() { Ok(user) } else { Err(AuthError::Rejected) }
    }
}

fn parse_basic(header: &[u8]) -> Result<(String, String), AuthError> {
    let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let (scheme, encoded) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| AuthError::Malformed)?;
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

    #[tokio::test]
    async fn right_credentials_give_the_user_name() {
        let auth = authenticator();
        assert_eq!(auth.authenticate(Some(&basic("testuser:testpassword"))).await, Ok("testuser".into()));
    }

    #[tokio::test]
    async fn wrong_missing_or_malformed_credentials_are_refused() {
        let auth = authenticator();
        assert_eq!(auth.authenticate(None).await, Err(AuthError::Missing));
        assert_eq!(auth.authenticate(Some(&basic("testuser:nope"))).await, Err(AuthError::Rejected));
        assert_eq!(auth.authenticate(Some(&basic("nobody:testpassword"))).await, Err(AuthError::Rejected));
        assert_eq!(auth.authenticate(Some(b"Bearer abc")).await, Err(AuthError::Malformed));
        assert_eq!(auth.authenticate(Some(b"Basic !!!")).await, Err(AuthError::Malformed));
    }
}
