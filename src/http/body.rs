//! Reads request bodies: the fields of a launch or kill request from a form-encoded body
//! (Stager's curl) or a JSON object, and raw bodies up to a limit. A `Content-Length` past the
//! limit is refused before any byte is read; a body that misses `http.body_timeout` is a 408.
//! [`ReadBudget`] bounds what bodies not yet authenticated may hold at once.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::FromRequest;
use axum::http::{HeaderMap, Request, header};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// Request bodies larger than this are refused (a launch is a few short fields).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The body's fields in the order sent, values as strings.
pub struct Fields(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequest<S> for Fields {
    type Rejection = ApiError;

    async fn from_request(request: Request<Body>, _state: &S) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/x-www-form-urlencoded")
            .to_owned();
        declared_length(request.headers(), MAX_BODY_BYTES)?;
        let bytes = read_limited(request.into_body(), MAX_BODY_BYTES).await?;
        let mime = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match mime.as_str() {
            "application/x-www-form-urlencoded" | "" => parse_form(&bytes),
            "application/json" => parse_json(&bytes),
            _ => Err(ApiError::UnsupportedMediaType(content_type)),
        }
        .map(Fields)
    }
}

/// The length `Content-Length` declares (`None` for a chunked body), or 413 at once when it is
/// past `limit`: the body is not read then.
pub fn declared_length(headers: &HeaderMap, limit: usize) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_LENGTH) else { return Ok(None) };
    let length = value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::Body("Content-Length must be a number of bytes".into()))?;
    match usize::try_from(length) {
        Ok(length) if length <= limit => Ok(Some(length)),
        _ => Err(ApiError::TooLarge(limit)),
    }
}

/// The whole body, or 413 past `limit` bytes.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        if caused_by::<http_body_util::LengthLimitError>(&err) { ApiError::TooLarge(limit) } else { body_error(&err) }
    })
}

/// The whole body in one buffer of at most `limit` bytes (allocated once when `declared` gives
/// its size), each piece handed to `each` as it arrives.
pub async fn read_each(
    body: Body,
    limit: usize,
    declared: Option<usize>,
    mut each: impl FnMut(&[u8]),
) -> Result<Bytes, ApiError> {
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| body_error(&err))?;
        if buffer.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        each(&chunk);
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}

fn body_error(err: &axum::Error) -> ApiError {
    if caused_by::<tower_http::timeout::TimeoutError>(err) {
        ApiError::BodyTimeout
    } else {
        ApiError::Body(format!("cannot read the request body: {err}"))
    }
}

fn caused_by<T: std::error::Error + 'static>(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if cause.is::<T>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Bytes that bodies not yet authenticated may hold at once. Their senders wait their turn (the
/// kernel holds what they send meanwhile), so a flood of forged webhooks costs previewd at most
/// this much memory, however many connections it uses.
#[derive(Clone)]
pub struct ReadBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl ReadBudget {
    pub fn new(total: usize) -> Self {
        Self { bytes: Arc::new(Semaphore::new(total)), total }
    }

    /// Holds `bytes` of the budget until the permit is dropped; 503 when other reads do not
    /// leave room within `wait`.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Result<OwnedSemaphorePermit, ApiError> {
        let permits = u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX);
        match tokio::time::timeout(wait, Arc::clone(&self.bytes).acquire_many_owned(permits)).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(ApiError::Internal("the body read budget is closed".into())),
            Err(_elapsed) => Err(ApiError::BodiesBusy),
        }
    }
}

fn parse_form(bytes: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_bytes(bytes).map_err(|err| ApiError::Body(format!("the form body is not valid: {err}")))
}

fn parse_json(bytes: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|err| ApiError::Body(format!("the JSON body is not valid: {err}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::Body(
            "the JSON body must be an object of fields, e.g. {\"image_name\": \"demo\", \"container_name\": \"test\"}"
                .into(),
        ));
    };
    object
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok((key, text)),
            Value::Number(number) => Ok((key, number.to_string())),
            Value::Bool(flag) => Ok((key, flag.to_string())),
            _ => Err(ApiError::Body(format!("field `{key}` must be a string, number or boolean"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content_length(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, value.parse().unwrap());
        headers
    }

    #[test]
    fn a_declared_length_past_the_limit_is_refused_naming_the_limit() {
        assert!(matches!(declared_length(&content_length("30000000"), 1024), Err(ApiError::TooLarge(1024))));
        assert_eq!(declared_length(&content_length("1024"), 1024).unwrap(), Some(1024));
        assert_eq!(declared_length(&HeaderMap::new(), 1024).unwrap(), None, "a chunked body is read up to the limit");
        assert!(matches!(declared_length(&content_length("many"), 1024), Err(ApiError::Body(_))));
    }

    #[tokio::test]
    async fn a_read_hands_over_every_piece_and_stops_at_the_limit() {
        let mut seen = 0;
        let bytes = read_each(Body::from("0123456789"), 10, Some(10), |piece| seen += piece.len()).await.unwrap();
        assert_eq!((bytes.len(), seen), (10, 10));
        let over = read_each(Body::from("0123456789"), 9, None, |_| {}).await;
        assert!(matches!(over, Err(ApiError::TooLarge(9))));
    }

    #[tokio::test]
    async fn the_budget_makes_a_reader_wait_and_then_refuses() {
        let budget = ReadBudget::new(10);
        let held = budget.reserve(8, Duration::from_millis(10)).await.unwrap();
        let waited = budget.reserve(8, Duration::from_millis(50)).await;
        assert!(matches!(waited, Err(ApiError::BodiesBusy)));
        drop(held);
        assert!(budget.reserve(100, Duration::from_millis(10)).await.is_ok(), "at most the whole budget is asked");
    }

    #[test]
    fn form_fields_keep_order_and_duplicates() {
        let fields = parse_form(b"image_name=demo&container_name=Feature+X%2FY&a=1&a=2").unwrap();
        assert_eq!(fields[1], ("container_name".into(), "Feature X/Y".into()));
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn json_scalars_become_strings_and_nesting_is_refused() {
        let fields = parse_json(br#"{"image_name": "demo", "PORT": 8, "DEBUG": true}"#).unwrap();
        assert!(fields.contains(&("PORT".into(), "8".into())));
        assert!(fields.contains(&("DEBUG".into(), "true".into())));
        assert!(matches!(parse_json(br#"{"x": {"y": 1}}"#), Err(ApiError::Body(m)) if m.contains("`x`")));
        assert!(matches!(parse_json(b"[1]"), Err(ApiError::Body(_))));
        assert!(matches!(parse_json(b"{"), Err(ApiError::Body(_))));
    }
}
