//! Reads the fields of a launch or kill request from a form-encoded body (Stager's curl) or a
//! JSON object, with a size limit and an error that names the problem.

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{Request, header};
use serde_json::Value;

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

/// The whole body, or 413 past `limit` bytes.
pub async fn read_limited(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        if is_length_limit(&err) {
            ApiError::TooLarge(limit)
        } else {
            ApiError::Body(format!("cannot read the request body: {err}"))
        }
    })
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
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
