//! The one mapping from previewd's errors to HTTP answers: `{"error": "..."}` with a status that
//! says whose move it is. 4xx messages tell the caller what to fix; 5xx messages say what failed
//! on this host without leaking secrets.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::AuthError;
use crate::build::BuildFailure;
use crate::build::context::ContextError;
use crate::github::event::EventError;
use crate::github::token_auth::TokenAuthError;
use crate::github::webhook::WebhookError;
use crate::lifecycle::LifecycleError;
use crate::network::NetworkError;
use crate::nginx::NginxError;
use crate::preview::Slug;
use crate::request::RequestError;
use crate::runtime::DockerError;

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
    #[error("the request body did not arrive completely within http.body_timeout: send it without pausing")]
    BodyTimeout,
    #[error("too many request bodies are being read at once; send it again in a minute")]
    BodiesBusy,
    #[error("unsupported Content-Type {0:?}: send application/x-www-form-urlencoded or application/json")]
    UnsupportedMediaType(String),
    #[error("unsupported Content-Type {0:?}: send the build context as a tar, Content-Type: application/x-tar")]
    NotATar(String),
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
    #[error("this API answers only for the names in api_hosts ({0}) or an IP address: call it by one of those")]
    WrongHost(String),
}

/// Set on a 4xx answer for the metrics layer (`count_refusals`): why the request was refused.
#[derive(Debug, Clone, Copy)]
pub struct Refusal(pub &'static str);

impl ApiError {
    /// A short label of why a request was refused, for `previewd_refused_requests_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Auth(AuthError::Throttled(_) | AuthError::Busy) => "throttled",
            Self::Auth(_) | Self::Token(TokenAuthError::Rejected) => "unauthenticated",
            Self::Token(TokenAuthError::Throttled(_)) => "throttled",
            Self::Token(_) => "not_authorized",
            Self::Request(_) | Self::Body(_) | Self::UnsupportedMediaType(_) | Self::NotATar(_) => "invalid_request",
            Self::TooLarge(_) => "too_large",
            Self::BodyTimeout => "timeout",
            Self::BodiesBusy => "throttled",
            Self::NoRoute | Self::MethodNotAllowed | Self::NotConfigured(_) => "no_route",
            Self::Webhook(WebhookError::MissingHeader(_)) | Self::Event(_) => "invalid_delivery",
            Self::Webhook(_) => "bad_signature",
            Self::CrossSite => "cross_site",
            Self::StreamsFull(_) => "limit",
            Self::WrongHost(_) => "wrong_host",
            Self::NameReserved { .. } | Self::NotYours(_) => "name_taken",
            Self::Lifecycle(LifecycleError::NotFound(_)) => "not_found",
            Self::Lifecycle(LifecycleError::NameTaken { .. }) => "name_taken",
            Self::Lifecycle(LifecycleError::Limit(_)) => "limit",
            Self::Lifecycle(_) | Self::Internal(_) => "launch_failed",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Auth(AuthError::Throttled(_) | AuthError::Busy) => StatusCode::TOO_MANY_REQUESTS,
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::Request(_) | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodiesBusy => StatusCode::TOO_MANY_REQUESTS,
            Self::UnsupportedMediaType(_) | Self::NotATar(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
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
            Self::WrongHost(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::NameReserved { .. } | Self::NotYours(_) => StatusCode::CONFLICT,
            Self::Token(TokenAuthError::Rejected) => StatusCode::UNAUTHORIZED,
            Self::Token(TokenAuthError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Token(TokenAuthError::Throttled(_)) => StatusCode::TOO_MANY_REQUESTS,
            Self::Token(_) => StatusCode::FORBIDDEN,
        }
    }
}

fn lifecycle_status(err: &LifecycleError) -> StatusCode {
    match err {
        LifecycleError::NotFound(_) | LifecycleError::NoSuchService { .. } => StatusCode::NOT_FOUND,
        LifecycleError::NameTaken { .. } => StatusCode::CONFLICT,
        LifecycleError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
        LifecycleError::Crashed { .. } => StatusCode::BAD_GATEWAY,
        LifecycleError::Unhealthy { .. } => StatusCode::GATEWAY_TIMEOUT,
        LifecycleError::ServiceFailed { .. } | LifecycleError::JobFailed { .. } => StatusCode::BAD_GATEWAY,
        LifecycleError::ServiceNotReady { .. } | LifecycleError::JobTimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        LifecycleError::SeedMissing { .. } | LifecycleError::EnvTemplate { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        LifecycleError::NoNetworkForServices(_) | LifecycleError::ImageGone(_) => StatusCode::CONFLICT,
        LifecycleError::Docker(
            DockerError::Unreachable(_) | DockerError::PortInUse { .. } | DockerError::NoFreePort(_),
        ) => StatusCode::SERVICE_UNAVAILABLE,
        LifecycleError::Docker(
            DockerError::ImageMissing { .. } | DockerError::PullFailed { .. } | DockerError::Refused { .. },
        ) => StatusCode::UNPROCESSABLE_ENTITY,
        LifecycleError::Docker(DockerError::Api { .. }) => StatusCode::BAD_GATEWAY,
        LifecycleError::Nginx(NginxError::NotRunning { .. } | NginxError::Stopped | NginxError::NotServed(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        LifecycleError::Nginx(_) => StatusCode::INTERNAL_SERVER_ERROR,
        LifecycleError::Network(NetworkError::Docker(DockerError::Api { .. })) => StatusCode::BAD_GATEWAY,
        LifecycleError::Network(_) => StatusCode::SERVICE_UNAVAILABLE,
        LifecycleError::Build(failure) => build_status(failure),
        LifecycleError::State(_) => StatusCode::INTERNAL_SERVER_ERROR,
        LifecycleError::NoRoom(_) => StatusCode::TOO_MANY_REQUESTS,
    }
}

fn build_status(failure: &BuildFailure) -> StatusCode {
    match failure {
        BuildFailure::Context(ContextError::Write(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        BuildFailure::Context(ContextError::Stopped) => StatusCode::CONFLICT,
        BuildFailure::RepoFile(_)
        | BuildFailure::Context(_)
        | BuildFailure::Step { .. }
        | BuildFailure::ReservedLabels(_)
        | BuildFailure::Dockerignore(_) => StatusCode::UNPROCESSABLE_ENTITY,
        BuildFailure::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
        BuildFailure::Superseded | BuildFailure::Removed => StatusCode::CONFLICT,
        BuildFailure::NoNetwork(_) => StatusCode::SERVICE_UNAVAILABLE,
        BuildFailure::DiskLow { .. } => StatusCode::INSUFFICIENT_STORAGE,
        BuildFailure::Docker(DockerError::Unreachable(_)) => StatusCode::SERVICE_UNAVAILABLE,
        BuildFailure::Docker(_) | BuildFailure::Download(_) => StatusCode::BAD_GATEWAY,
        BuildFailure::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    /// What a 5xx answer says: what failed, without the output, messages and paths the cause
    /// carries (those go to the log under the request id). Errors that tell the operator what
    /// to change on this host (nginx not running or not serving the sites dir, its command
    /// failing, its files not writable) and a preview's
    /// own start-up failure (its log lines are the caller's to see anyway) are kept whole.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "internal error".to_owned(),
            Self::Token(TokenAuthError::Unavailable(_)) => "cannot ask GitHub who this token belongs to".to_owned(),
            Self::Lifecycle(LifecycleError::Docker(err)) => match err {
                DockerError::Unreachable(_) => "cannot reach the Docker engine; is dockerd running?".to_owned(),
                DockerError::Api { action, .. } => format!("Docker could not {action}"),
                DockerError::PortInUse { port, .. } => format!("Docker could not publish the container on port {port}"),
                DockerError::NoFreePort(_) => "no free port on 127.0.0.1 for the container".to_owned(),
                other => other.to_string(),
            },
            Self::Lifecycle(LifecycleError::Nginx(err)) => match err {
                NginxError::TestFailed(_) => "nginx rejected the configuration".to_owned(),
                NginxError::RolledBack(_) => {
                    "nginx rejected the new configuration; the previous vhost files were restored".to_owned()
                }
                NginxError::Template(_) => "cannot render the vhost template".to_owned(),
                other => other.to_string(),
            },
            Self::Lifecycle(LifecycleError::Network(err)) => match err {
                NetworkError::NoSubnet { .. } => err.to_string(),
                NetworkError::Docker(_) => "Docker could not create the preview's network".to_owned(),
            },
            Self::Lifecycle(LifecycleError::Build(BuildFailure::Io(_))) => "cannot prepare the build".to_owned(),
            other => other.to_string(),
        }
    }
}

impl ApiError {
    /// Refused from its headers, before a request body was read.
    fn refused_before_body(&self) -> bool {
        matches!(
            self,
            Self::TooLarge(_) | Self::UnsupportedMediaType(_) | Self::NotATar(_) | Self::CrossSite | Self::BodiesBusy
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = if status.is_server_error() {
            let request_id = super::request_id::current();
            let chain = crate::error_chain(&self);
            tracing::error!(request_id = request_id.as_deref().unwrap_or("-"), error = %chain, "request failed");
            let message = format!("{} (request id {})", self.public_message(), request_id.as_deref().unwrap_or("-"));
            json!({ "error": message, "request_id": request_id })
        } else {
            // At debug: a flood of bad requests must not fill the journal (they are counted).
            tracing::debug!(error = %self, status = status.as_u16(), "request refused");
            json!({ "error": self.to_string() })
        };
        let mut response = (status, Json(body)).into_response();
        if self.refused_before_body() {
            // The body it was sending is still on the connection, which the server closes: the
            // client is told so, rather than finding out by a broken pipe on its next request.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status.is_client_error() {
            response.extensions_mut().insert(Refusal(self.reason()));
        }
        let retry_after = match &self {
            Self::Auth(err) => err.retry_after(),
            Self::Token(err) => err.retry_after(),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        let challenge = matches!(&self, Self::Auth(err) if err.retry_after().is_none());
        if challenge || matches!(self, Self::Token(TokenAuthError::Rejected)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="previewd", charset="UTF-8""#),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_refused_before_its_body_was_read_is_told_the_connection_closes() {
        for refused in
            [ApiError::TooLarge(10), ApiError::CrossSite, ApiError::UnsupportedMediaType("text/plain".into())]
        {
            let response = refused.into_response();
            assert_eq!(response.headers()[header::CONNECTION], "close");
        }
        let response = ApiError::NoRoute.into_response();
        assert!(!response.headers().contains_key(header::CONNECTION), "a refusal that read the request keeps it");
    }

    #[test]
    fn a_task_no_node_would_run_is_the_callers_to_fix_and_says_why() {
        let refused = LifecycleError::Docker(DockerError::Refused { reason: "No such image: web:1".to_owned() });
        let err = ApiError::Lifecycle(refused);
        assert!(
            err.public_message().contains("refused to run the preview: No such image: web:1"),
            "{}",
            err.public_message()
        );
        assert_eq!(err.into_response().status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
