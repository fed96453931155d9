//! The one mapping from previewd's errors to HTTP answers: `{"error": "..."}` with a status that
//! says whose move it is. 4xx messages tell the caller what to fix; 5xx messages say what failed
//! on this host without leaking secrets.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::AuthError;
use crate::docker::DockerError;
use crate::github::event::EventError;
use crate::github::token_auth::TokenAuthError;
use crate::github::webhook::WebhookError;
use crate::lifecycle::LifecycleError;
use crate::nginx::NginxError;
use crate::preview::Slug;
use crate::request::RequestError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("{0}")]
    Body(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("unsupported Content-Type {0:?}: send application/x-www-form-urlencoded or application/json")]
    UnsupportedMediaType(String),
    #[error("no route for this path; see the API in the README")]
    NoRoute,
    #[error("method not allowed on this path; see the API in the README")]
    MethodNotAllowed,
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("{0}")]
    NotConfigured(&'static str),
    #[error(transparent)]
    Token(#[from] TokenAuthError),
    #[error("cross-site requests are refused: call the API directly (curl, `previewd launch`) or use the dashboard")]
    CrossSite,
    #[error("the name {name} is reserved for pull requests of {repo} (github.repos.{repo}.name); choose another name")]
    NameReserved { name: Slug, repo: String },
    #[error("the name {0} is taken by a preview you may not change; choose another name")]
    NotYours(Slug),
    #[error(transparent)]
    StreamsFull(#[from] crate::http::streams::StreamsFull),
}

/// Set on a 4xx answer for the metrics layer (`count_refusals`): why the request was refused.
#[derive(Debug, Clone, Copy)]
pub struct Refusal(pub &'static str);

impl ApiError {
    /// A short label of why a request was refused, for `previewd_refused_requests_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Auth(_) | Self::Token(TokenAuthError::Rejected) => "unauthenticated",
            Self::Token(_) => "not_authorized",
            Self::Request(_) | Self::Body(_) | Self::UnsupportedMediaType(_) => "invalid_request",
            Self::TooLarge(_) => "too_large",
            Self::NoRoute | Self::MethodNotAllowed | Self::NotConfigured(_) => "no_route",
            Self::Webhook(WebhookError::MissingHeader(_)) | Self::Event(_) => "invalid_delivery",
            Self::Webhook(_) => "bad_signature",
            Self::CrossSite => "cross_site",
            Self::StreamsFull(_) => "limit",
            Self::NameReserved { .. } | Self::NotYours(_) => "name_taken",
            Self::Lifecycle(LifecycleError::NotFound(_)) => "not_found",
            Self::Lifecycle(LifecycleError::NameTaken { .. }) => "name_taken",
            Self::Lifecycle(LifecycleError::Limit(_)) => "limit",
            Self::Lifecycle(_) | Self::Internal(_) => "launch_failed",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::Request(_) | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Lifecycle(err) => lifecycle_status(err),
            Self::Webhook(WebhookError::MissingHeader(_)) => StatusCode::BAD_REQUEST,
            Self::Webhook(_) => StatusCode::UNAUTHORIZED,
            Self::Event(EventError::NotACommit(_)) => StatusCode::BAD_REQUEST,
            Self::Event(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotConfigured(_) => StatusCode::NOT_FOUND,
            Self::CrossSite => StatusCode::FORBIDDEN,
            Self::StreamsFull(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NameReserved { .. } | Self::NotYours(_) => StatusCode::CONFLICT,
            Self::Token(TokenAuthError::Rejected) => StatusCode::UNAUTHORIZED,
            Self::Token(TokenAuthError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Token(_) => StatusCode::FORBIDDEN,
        }
    }
}

fn lifecycle_status(err: &LifecycleError) -> StatusCode {
    match err {
        LifecycleError::NotFound(_) => StatusCode::NOT_FOUND,
        LifecycleError::NameTaken { .. } => StatusCode::CONFLICT,
        LifecycleError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
        LifecycleError::Crashed { .. } => StatusCode::BAD_GATEWAY,
        LifecycleError::Unhealthy { .. } => StatusCode::GATEWAY_TIMEOUT,
        LifecycleError::Docker(
            DockerError::Unreachable(_) | DockerError::PortInUse { .. } | DockerError::NoFreePort(_),
        ) => StatusCode::SERVICE_UNAVAILABLE,
        LifecycleError::Docker(DockerError::ImageMissing { .. } | DockerError::PullFailed { .. }) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        LifecycleError::Docker(DockerError::Api { .. }) => StatusCode::BAD_GATEWAY,
        LifecycleError::Nginx(NginxError::NotRunning { .. } | NginxError::Stopped | NginxError::NotServed(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        LifecycleError::Nginx(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            // At debug: a flood of bad requests must not fill the journal (they are counted).
            tracing::debug!(error = %self, status = status.as_u16(), "request refused");
        }
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status.is_client_error() {
            response.extensions_mut().insert(Refusal(self.reason()));
        }
        if matches!(self, Self::Auth(_) | Self::Token(TokenAuthError::Rejected)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="previewd", charset="UTF-8""#),
            );
        }
        response
    }
}
