//! Webhook deliveries: a delivery exists as a [`VerifiedDelivery`] only once its
//! `X-Hub-Signature-256` matched the HMAC-SHA256 of the raw body (compared in constant time), and
//! the [`DeliveryLog`] acknowledges GitHub's redeliveries without doing the work twice (its ids
//! are kept across restarts by [`super::memory`]).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use axum::body::Bytes;
use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::config::github::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("missing X-Hub-Signature-256: set the webhook's secret in GitHub to the one previewd has")]
    MissingSignature,
    #[error("X-Hub-Signature-256 does not match the body: the webhook's secret differs from previewd's")]
    BadSignature,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
}

/// A delivery whose signature matched.
#[derive(Debug)]
pub struct VerifiedDelivery {
    pub event: String,
    pub delivery: String,
    pub body: Bytes,
}

/// A delivery's claimed signature, hashed against the body as it arrives, so that the body is
/// checked without first being held whole.
pub struct Signed {
    expected: Vec<u8>,
    mac: Hmac<Sha256>,
}

impl Signed {
    /// Reads `X-Hub-Signature-256` before any of the body: a request without a well-formed one
    /// is refused unread.
    pub fn start(secret: &Secret, headers: &HeaderMap) -> Result<Self, WebhookError> {
        let signature = headers.get("x-hub-signature-256").ok_or(WebhookError::MissingSignature)?;
        let expected = signature
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("sha256="))
            .and_then(|hex_digest| hex::decode(hex_digest).ok())
            .filter(|digest| digest.len() == 32)
            .ok_or(WebhookError::BadSignature)?;
        let mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).map_err(|_| WebhookError::BadSignature)?;
        Ok(Self { expected, mac })
    }

    /// The next piece of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.mac.update(chunk);
    }

    /// The delivery, once every byte of `body` went through [`Signed::update`] and the
    /// signature matched (compared in constant time).
    pub fn finish(self, headers: &HeaderMap, body: Bytes) -> Result<VerifiedDelivery, WebhookError> {
        self.mac.verify_slice(&self.expected).map_err(|_| WebhookError::BadSignature)?;
        let header = |name: &'static str| {
            headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned).ok_or(WebhookError::MissingHeader(name))
        };
        Ok(VerifiedDelivery { event: header("x-github-event")?, delivery: header("x-github-delivery")?, body })
    }
}

/// [`Signed`] over a body already in memory.
pub fn verify(secret: &Secret, headers: &HeaderMap, body: Bytes) -> Result<VerifiedDelivery, WebhookError> {
    let mut signed = Signed::start(secret, headers)?;
    signed.update(&body);
    signed.finish(headers, body)
}

/// The delivery ids seen recently (GitHub reuses the id when it redelivers).
pub struct DeliveryLog {
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl DeliveryLog {
    const CAPACITY: usize = 10_000;

    pub fn new() -> Self {
        Self { seen: Mutex::new((HashSet::new(), VecDeque::new())) }
    }

    /// A log that has seen `ids`, oldest first (as [`DeliveryLog::ids`] gave them); past the
    /// capacity only the newest are kept.
    pub fn from_ids(ids: impl IntoIterator<Item = String>) -> Self {
        let log = Self::new();
        for id in ids {
            log.first_time(&id);
        }
        log
    }

    /// The ids remembered, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).1.iter().cloned().collect()
    }

    /// True the first time an id is offered.
    pub fn first_time(&self, delivery: &str) -> bool {
        let mut guard = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (set, order) = &mut *guard;
        if !set.insert(delivery.to_owned()) {
            return false;
        }
        order.push_back(delivery.to_owned());
        if order.len() > Self::CAPACITY
            && let Some(oldest) = order.pop_front()
        {
            set.remove(&oldest);
        }
        true
    }
}

impl Default for DeliveryLog {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
pub(crate) fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        crate::config::github::tests_support::secret("It's a Secret to Everybody")
    }

    fn headers(signature: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", "ping".parse().unwrap());
        headers.insert("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958".parse().unwrap());
        if let Some(signature) = signature {
            headers.insert("x-hub-signature-256", signature.parse().unwrap());
        }
        headers
    }

    #[test]
    fn githubs_documented_example_signature_verifies() {
        // From GitHub's "Validating webhook deliveries" docs: secret and payload below.
        let body = Bytes::from_static(b"Hello, World!");
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let delivery = verify(&secret(), &headers(Some(signature)), body).unwrap();
        assert_eq!(delivery.event, "ping");
    }

    #[test]
    fn a_missing_wrong_or_malformed_signature_is_refused() {
        let body = Bytes::from_static(b"{}");
        assert_eq!(verify(&secret(), &headers(None), body.clone()).unwrap_err(), WebhookError::MissingSignature);
        let wrong = sign("another secret", &body);
        assert_eq!(verify(&secret(), &headers(Some(&wrong)), body.clone()).unwrap_err(), WebhookError::BadSignature);
        for malformed in ["sha1=abc", "sha256=zz", "sha256="] {
            assert_eq!(
                verify(&secret(), &headers(Some(malformed)), body.clone()).unwrap_err(),
                WebhookError::BadSignature
            );
        }
    }

    #[test]
    fn the_signature_covers_every_byte_of_the_body() {
        let signature = sign("It's a Secret to Everybody", b"{\"a\":1}");
        assert!(verify(&secret(), &headers(Some(&signature)), Bytes::from_static(b"{\"a\":1}")).is_ok());
        assert!(verify(&secret(), &headers(Some(&signature)), Bytes::from_static(b"{\"a\":1} ")).is_err());
    }

    #[test]
    fn a_body_hashed_in_pieces_verifies_like_the_whole() {
        let body = b"{\"action\":\"opened\",\"number\":1}";
        let signature = sign("It's a Secret to Everybody", body);
        let headers = headers(Some(&signature));
        let mut signed = Signed::start(&secret(), &headers).unwrap();
        for piece in body.chunks(5) {
            signed.update(piece);
        }
        assert_eq!(signed.finish(&headers, Bytes::from_static(body)).unwrap().event, "ping");
    }

    #[test]
    fn a_signature_of_the_wrong_length_is_refused_before_any_body() {
        let short = format!("sha256={}", "ab".repeat(16));
        assert!(matches!(Signed::start(&secret(), &headers(Some(&short))), Err(WebhookError::BadSignature)));
    }

    #[test]
    fn a_redelivery_is_recognised_and_the_log_is_bounded() {
        let log = DeliveryLog::new();
        assert!(log.first_time("a"));
        assert!(!log.first_time("a"));
        for i in 0..DeliveryLog::CAPACITY {
            log.first_time(&i.to_string());
        }
        assert!(log.first_time("a"), "the oldest ids are forgotten");
        assert!(log.seen.lock().unwrap().0.len() <= DeliveryLog::CAPACITY);
    }

    #[test]
    fn a_log_rebuilt_from_its_ids_knows_them_in_the_same_order() {
        let log = DeliveryLog::new();
        for id in ["a", "b", "c"] {
            log.first_time(id);
        }
        let rebuilt = DeliveryLog::from_ids(log.ids());
        assert_eq!(rebuilt.ids(), ["a", "b", "c"]);
        assert!(!rebuilt.first_time("b"));
        let many = DeliveryLog::from_ids((0..DeliveryLog::CAPACITY + 5).map(|i| i.to_string()));
        assert_eq!(many.ids().len(), DeliveryLog::CAPACITY);
        assert_eq!(many.ids()[0], "5", "the oldest are the ones dropped");
    }
}
