//! Launch and kill requests: the fields of an API call (form or JSON, already decoded by the
//! HTTP layer) parsed into validated values. Nothing unvalidated goes past this module.

use std::collections::{BTreeMap, HashSet};

use std::fmt;

use crate::config::{ImageSpec, RequestEnv};
use crate::preview::{EnvName, ImageKey, NameError, Slug};

/// Variables previewd sets itself start with this (`PREVIEW_NAME`, `PREVIEW_URL`, the pull
/// request's `PREVIEW_SHA`, ...); a request may set none of them, so an app can trust them.
pub const RESERVED_ENV_PREFIX: &str = "PREVIEW_";

/// Who launched a preview by hand, recorded in its labels (a pull request's preview is owned by
/// the pull request: see `PullRequestOrigin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A `users` entry (HTTP Basic).
    User(String),
    /// A GitHub login (Bearer token).
    GitHub(String),
}

impl Owner {
    /// The label form written by `Display`: `user:<name>` or `github:<login>`.
    pub fn parse_label(text: &str) -> Option<Self> {
        match text.split_once(':')? {
            ("user", name) => Some(Self::User(name.to_owned())),
            ("github", login) => Some(Self::GitHub(login.to_owned())),
            _ => None,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(name) => write!(f, "user:{name}"),
            Self::GitHub(login) => write!(f, "github:{login}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` is given more than once")]
    DuplicateField(String),
    #[error("unknown image_name {given:?}; allowed: {allowed}")]
    UnknownImage { given: String, allowed: String },
    #[error("{field}: {source}")]
    Name { field: &'static str, source: NameError },
    #[error("field {0}; every field besides image_name and container_name becomes an environment variable")]
    EnvName(NameError),
    #[error("field `{0}`: variables starting with PREVIEW_ are set by previewd and cannot come from a request")]
    ReservedEnv(String),
    #[error("field `{field}` is not a variable image {image} takes from requests; {allowed}")]
    EnvNotAllowed { field: String, image: ImageKey, allowed: String },
    #[error("field `{0}` contains a NUL byte, which cannot be passed to a container")]
    NulByte(String),
}

/// A validated `POST /launch`.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub image: ImageKey,
    /// The allowlisted image `image` names.
    pub spec: ImageSpec,
    pub name: Slug,
    /// `container_name` as sent (Stager passed it on to the container unchanged).
    pub container_name: String,
    /// Every other field, for the container's environment.
    pub env: BTreeMap<EnvName, String>,
    /// The pull request this preview is of, when a webhook asked for it.
    pub origin: Option<PullRequestOrigin>,
    /// Who launched it by hand (`None` for a pull request's preview).
    pub owner: Option<Owner>,
}

/// Which pull request, at which commit, a preview runs. Recorded in the container's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestOrigin {
    /// `owner/name`.
    pub repo: String,
    pub number: u64,
    /// 40 hex digits.
    pub sha: String,
}

/// A validated `POST /kill`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillRequest {
    pub name: Slug,
}

impl LaunchRequest {
    pub fn parse(fields: Vec<(String, String)>, images: &BTreeMap<ImageKey, ImageSpec>) -> Result<Self, RequestError> {
        let mut fields = unique(fields)?;
        let image_name = fields.remove("image_name").ok_or(RequestError::MissingField("image_name"))?;
        let container_name = fields.remove("container_name").ok_or(RequestError::MissingField("container_name"))?;
        let (image, spec) = ImageKey::parse(&image_name)
            .ok()
            .and_then(|key| images.get_key_value(&key))
            .map(|(key, spec)| (key.clone(), spec.clone()))
            .ok_or_else(|| RequestError::UnknownImage {
                given: image_name,
                allowed: images.keys().map(ImageKey::to_string).collect::<Vec<_>>().join(", "),
            })?;
        let name = preview_name("container_name", &container_name)?;
        let env = fields
            .into_iter()
            .map(|(key, value)| {
                let name = EnvName::parse(&key).map_err(RequestError::EnvName)?;
                if key.starts_with(RESERVED_ENV_PREFIX) {
                    return Err(RequestError::ReservedEnv(key));
                }
                allowed_env(&image, &spec.request_env, &name)?;
                if value.contains('\0') {
                    return Err(RequestError::NulByte(key));
                }
                Ok((name, value))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { image, spec, name, container_name, env, origin: None, owner: None })
    }
}

fn allowed_env(image: &ImageKey, policy: &RequestEnv, name: &EnvName) -> Result<(), RequestError> {
    let allowed = match policy {
        RequestEnv::Any => return Ok(()),
        RequestEnv::Only(names) if names.contains(name) => return Ok(()),
        RequestEnv::Only(names) => {
            let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
            format!("it takes {} (images.{image}.request_env)", names.join(", "))
        }
        RequestEnv::None => format!("it takes none (images.{image}.request_env: false)"),
    };
    Err(RequestError::EnvNotAllowed { field: name.to_string(), image: image.clone(), allowed })
}

impl KillRequest {
    pub fn parse(fields: Vec<(String, String)>) -> Result<Self, RequestError> {
        let mut fields = unique(fields)?;
        let container_name = fields.remove("container_name").ok_or(RequestError::MissingField("container_name"))?;
        Ok(Self { name: preview_name("container_name", &container_name)? })
    }
}

/// The slug of a preview named in a request field or path segment.
pub fn preview_name(field: &'static str, text: &str) -> Result<Slug, RequestError> {
    Slug::slugify(text).map_err(|source| RequestError::Name { field, source })
}

fn unique(fields: Vec<(String, String)>) -> Result<BTreeMap<String, String>, RequestError> {
    let mut seen = HashSet::new();
    for (key, _) in &fields {
        if !seen.insert(key.as_str()) {
            return Err(RequestError::DuplicateField(key.clone()));
        }
    }
    Ok(fields.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn images() -> BTreeMap<ImageKey, ImageSpec> {
        let hash = crate::auth::hash_password("x").unwrap();
        let yaml = format!(
            "base_domain: p.localhost\nimages:\n  demo: {{image: d, port: 3000}}\nusers: [{{name: u, password_hash: \"{hash}\"}}]\n"
        );
        Config::from_yaml(&yaml, std::path::Path::new(".")).unwrap().images
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn stager_launch_fields_parse_with_extra_fields_as_env() {
        let request = LaunchRequest::parse(
            fields(&[("image_name", "demo"), ("container_name", "Feature X/Y"), ("GREETING", "hi there")]),
            &images(),
        )
        .unwrap();
        assert_eq!(request.name.as_ref(), "feature-x-y");
        assert_eq!(request.container_name, "Feature X/Y");
        assert_eq!(request.env.len(), 1);
        assert_eq!(request.env[&EnvName::parse("GREETING").unwrap()], "hi there");
    }

    #[test]
    fn bad_launch_fields_say_what_to_fix() {
        let images = images();
        let parse = |pairs: &[(&str, &str)]| LaunchRequest::parse(fields(pairs), &images).unwrap_err();
        assert_eq!(parse(&[("container_name", "x")]), RequestError::MissingField("image_name"));
        assert_eq!(parse(&[("image_name", "demo")]), RequestError::MissingField("container_name"));
        assert!(
            matches!(parse(&[("image_name", "nope"), ("container_name", "x")]), RequestError::UnknownImage { allowed, .. } if allowed == "demo")
        );
        assert!(matches!(parse(&[("image_name", "demo"), ("container_name", "///")]), RequestError::Name { .. }));
        assert!(matches!(
            parse(&[("image_name", "demo"), ("container_name", "x"), ("BAD-NAME", "1")]),
            RequestError::EnvName(_)
        ));
        assert_eq!(
            parse(&[("image_name", "demo"), ("container_name", "x"), ("PREVIEW_URL", "1")]),
            RequestError::ReservedEnv("PREVIEW_URL".into())
        );
        assert_eq!(
            parse(&[("image_name", "demo"), ("container_name", "x"), ("PREVIEW_SHA", "1")]),
            RequestError::ReservedEnv("PREVIEW_SHA".into()),
            "every PREVIEW_ variable is previewd's"
        );
        assert_eq!(
            parse(&[("image_name", "demo"), ("container_name", "x"), ("A", "a\0b")]),
            RequestError::NulByte("A".into())
        );
        assert_eq!(
            parse(&[("image_name", "demo"), ("image_name", "demo"), ("container_name", "x")]),
            RequestError::DuplicateField("image_name".into())
        );
    }

    fn images_with(request_env: &str) -> BTreeMap<ImageKey, ImageSpec> {
        let hash = crate::auth::hash_password("x").unwrap();
        let yaml = format!(
            "base_domain: p.localhost\nimages:\n  demo: {{image: d, port: 3000, request_env: {request_env}}}\nusers: [{{name: u, password_hash: \"{hash}\"}}]\n"
        );
        Config::from_yaml(&yaml, std::path::Path::new(".")).unwrap().images
    }

    #[test]
    fn an_image_takes_only_the_request_fields_its_request_env_lists() {
        let images = images_with("[TICKET, FEATURE_FLAGS]");
        let launch = |pairs: &[(&str, &str)]| LaunchRequest::parse(fields(pairs), &images);
        assert!(launch(&[("image_name", "demo"), ("container_name", "x"), ("TICKET", "T-1")]).is_ok());
        let err = launch(&[("image_name", "demo"), ("container_name", "x"), ("LD_PRELOAD", "/x.so")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `LD_PRELOAD` is not a variable image demo takes from requests; it takes FEATURE_FLAGS, TICKET (images.demo.request_env)"
        );
    }

    #[test]
    fn an_image_with_request_env_false_takes_no_request_fields() {
        let images = images_with("false");
        let err = LaunchRequest::parse(fields(&[("image_name", "demo"), ("container_name", "x"), ("A", "1")]), &images)
            .unwrap_err();
        assert!(err.to_string().ends_with("it takes none (images.demo.request_env: false)"), "{err}");
    }

    #[test]
    fn owners_round_trip_through_their_label() {
        for owner in [Owner::User("testuser".into()), Owner::GitHub("octocat".into())] {
            assert_eq!(Owner::parse_label(&owner.to_string()), Some(owner));
        }
        assert_eq!(Owner::parse_label("someone"), None);
    }

    #[test]
    fn kill_needs_a_container_name_that_slugs() {
        assert_eq!(KillRequest::parse(fields(&[("container_name", "Test")])).unwrap().name.as_ref(), "test");
        assert_eq!(KillRequest::parse(fields(&[])).unwrap_err(), RequestError::MissingField("container_name"));
    }
}
