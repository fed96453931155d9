//! Every answer carries an `X-Request-Id`; a 5xx answer names it in its body too, and the log
//! line with the full cause chain carries the same id, so an operator can find what a user saw.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request this task answers, if it runs inside [`assign`].
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Gives the request an id of its own (a client's `X-Request-Id` is not trusted: it could
/// point an operator at another request's log lines).
pub async fn assign(request: Request, next: Next) -> Response {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let span = tracing::info_span!("request", id = %id);
    let mut response = REQUEST_ID.scope(id.clone(), tracing::Instrument::instrument(next.run(request), span)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}
