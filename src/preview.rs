//! Domain types for previews: validated names that are safe to put in a DNS label, a Docker
//! label, a file name and an nginx config. Each type can only be built through its parser.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, de};

/// Longest DNS label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a string was not accepted as a name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} {input:?} has no letters or digits, so it gives an empty name")]
    EmptySlug { what: &'static str, input: String },
    #[error(
        "{what} {input:?} is not a DNS label: use 1-{max} characters of a-z, 0-9 and '-', \
         not starting or ending with '-'"
    )]
    NotALabel { what: &'static str, input: String, max: usize },
    #[error("{input:?} is not a domain name: use dot-separated DNS labels of a-z, 0-9 and '-'")]
    NotADomain { input: String },
    #[error("{input:?} is not an image key: use 1-64 characters of letters, digits, '.', '_' and '-'")]
    NotAnImageKey { input: String },
    #[error(
        "{input:?} is not a valid environment variable name: use letters, digits and '_', \
         not starting with a digit"
    )]
    NotAnEnvName { input: String },
}

/// A DNS-safe preview name: 1-63 characters of `a-z`, `0-9` and `-`, no leading or trailing `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Slug(String);

/// Read back validated (previewd's own state files): a file edited by hand cannot smuggle a
/// name that is not a slug.
impl<'de> serde::Deserialize<'de> for Slug {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Slug {
    /// Turns free text (a branch, a `container_name`) into a slug: `Feature X/Y` → `feature-x-y`.
    pub fn slugify(input: &str) -> Result<Self, NameError> {
        let mut slug = slug::slugify(input);
        slug.truncate(MAX_LABEL_LEN);
        let trimmed = slug.trim_matches('-');
        if trimmed.is_empty() {
            return Err(NameError::EmptySlug { what: "name", input: input.to_owned() });
        }
        Self::parse(trimmed)
    }

    /// Accepts only a string that already is a slug (labels read back from Docker, file names).
    pub fn parse(input: &str) -> Result<Self, NameError> {
        parse_label("name", input, MAX_LABEL_LEN).map(Self)
    }
}

/// The name of a service or a job of a preview environment (`images.<key>.services.<name>`,
/// `jobs[].name`): a DNS label, since a service is reached by its name on the preview's network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

impl ServiceName {
    pub const MAX_LEN: usize = 32;

    pub fn parse(input: &str) -> Result<Self, NameError> {
        parse_label("service or job name", input, Self::MAX_LEN).map(Self)
    }
}

/// The name of one previewd daemon: it namespaces containers, labels and vhost files, so that
/// several daemons (or test runs) can share a Docker engine and an nginx.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct InstanceName(String);

impl InstanceName {
    pub const MAX_LEN: usize = 32;

    pub fn parse(input: &str) -> Result<Self, NameError> {
        parse_label("instance", input, Self::MAX_LEN).map(Self)
    }
}

fn parse_label(what: &'static str, input: &str, max: usize) -> Result<String, NameError> {
    let valid_chars = input.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let valid =
        !input.is_empty() && input.len() <= max && valid_chars && !input.starts_with('-') && !input.ends_with('-');
    if valid { Ok(input.to_owned()) } else { Err(NameError::NotALabel { what, input: input.to_owned(), max }) }
}

/// The domain previews live under, e.g. `preview.localhost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseDomain(String);

impl BaseDomain {
    /// Room left for the preview's own label and the dot in a 253-character host name.
    const MAX_LEN: usize = 253 - MAX_LABEL_LEN - 1;

    pub fn parse(input: &str) -> Result<Self, NameError> {
        let valid = input.len() <= Self::MAX_LEN
            && input.split('.').all(|label| parse_label("domain label", label, MAX_LABEL_LEN).is_ok());
        if valid { Ok(Self(input.to_owned())) } else { Err(NameError::NotADomain { input: input.to_owned() }) }
    }

    /// The host name of one preview: `<slug>.<base_domain>`.
    pub fn host_for(&self, slug: &Slug) -> Host {
        Host(format!("{slug}.{}", self.0))
    }

    /// The preview a host name (from a `Host` header, see [`host_name`]) is of, in any case;
    /// `None` for any other name.
    pub fn slug_of(&self, name: &str) -> Option<Slug> {
        let label = name.to_ascii_lowercase().strip_suffix(&format!(".{}", self.0.to_ascii_lowercase()))?.to_owned();
        Slug::parse(&label).ok()
    }
}

/// The name in a `Host` header: without its `:port`, and an IPv6 address without brackets.
pub fn host_name(header: &str) -> &str {
    let name = match header.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => header,
    };
    name.trim_start_matches('[').trim_end_matches(']')
}

/// `<slug>.<base_domain>`: built only from a [`Slug`] and a [`BaseDomain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Host(String);

/// A name that can be an environment variable: `[A-Za-z_][A-Za-z0-9_]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EnvName(String);

impl EnvName {
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let mut bytes = input.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Ok(Self(input.to_owned()))
        } else {
            Err(NameError::NotAnEnvName { input: input.to_owned() })
        }
    }
}

/// The key of an entry of `images` in config.yml: what `image_name` names in a launch request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ImageKey(String);

impl ImageKey {
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let valid = (1..=64).contains(&input.len())
            && input.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid { Ok(Self(input.to_owned())) } else { Err(NameError::NotAnImageKey { input: input.to_owned() }) }
    }
}

macro_rules! str_newtype {
    ($($ty:ty),*) => {$(
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}
str_newtype!(Slug, InstanceName, BaseDomain, Host, EnvName, ImageKey, ServiceName);

/// Deserializes through `parse`, inside the string visitor, so that YAML errors point at the
/// offending value's line and column.
macro_rules! deserialize_with_parse {
    ($($ty:ty => $expecting:literal),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, value: &str) -> Result<$ty, E> {
                        <$ty>::parse(value).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    )*};
}
deserialize_with_parse!(
    InstanceName => "an instance name",
    BaseDomain => "a domain name",
    EnvName => "an environment variable name",
    ImageKey => "an image key",
    ServiceName => "a service or job name"
);

/// What one container of a preview is for. Docker records it in the container's labels (see
/// `crate::docker::labels`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The app nginx routes to.
    App,
    /// A service of the preview's environment (a database, a cache).
    Service(ServiceName),
    /// A job's run (a migration); removed once it ends.
    Job(ServiceName),
    /// The copy of a service's seed volume into its data volume; removed once it ends.
    SeedCopy(ServiceName),
}

/// Where a preview's container is in its life, in previewd's terms (the engine's own states are
/// mapped onto these in its module). Shown as the lowercase word in the API and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewState {
    /// Made, not started yet (or a start that never happened).
    Created,
    Running,
    /// The engine is starting it again after a crash or an engine restart.
    Restarting,
    Paused,
    /// Being stopped.
    Stopping,
    /// Being removed.
    Removing,
    /// Stopped: exited by itself, or stopped.
    Exited,
    /// The engine could not stop or remove it.
    Dead,
    /// The engine reported a state previewd does not know.
    Unknown,
    /// Put to sleep by previewd (its containers stopped, its data kept); the first request
    /// wakes it. A preview's state, never a container's.
    Asleep,
}

impl PreviewState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Removing => "removing",
            Self::Exited => "exited",
            Self::Dead => "dead",
            Self::Unknown => "unknown",
            Self::Asleep => "asleep",
        }
    }

    /// Whether the engine may still bring the container back by itself (restart policies), so
    /// that previewd leaves it alone.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Restarting | Self::Paused)
    }
}

impl fmt::Display for PreviewState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_header_names_a_preview_in_any_case_with_or_without_a_port() {
        let domain = BaseDomain::parse("preview.localhost").unwrap();
        let slug = |header| domain.slug_of(host_name(header)).map(|s| s.to_string());
        assert_eq!(slug("feature-x.preview.localhost:8080"), Some("feature-x".to_owned()));
        assert_eq!(slug("Feature-X.Preview.Localhost"), Some("feature-x".to_owned()));
        assert_eq!(slug("a.b.preview.localhost"), None);
        assert_eq!(slug("preview.localhost"), None);
        assert_eq!(host_name("[::1]:7800"), "::1");
        assert_eq!(host_name("127.0.0.1:41234"), "127.0.0.1");
        assert_eq!(host_name("example.com"), "example.com");
    }

    #[test]
    fn slugify_turns_free_text_into_a_dns_label() {
        assert_eq!(Slug::slugify("Feature X/Y").unwrap().as_ref(), "feature-x-y");
        assert_eq!(Slug::slugify("  --Ünïcode_branch--  ").unwrap().as_ref(), "unicode-branch");
        assert_eq!(Slug::slugify("test").unwrap().as_ref(), "test");
    }

    #[test]
    fn slugify_rejects_input_without_letters_or_digits() {
        assert!(matches!(Slug::slugify("/// ---"), Err(NameError::EmptySlug { .. })));
        assert!(matches!(Slug::slugify(""), Err(NameError::EmptySlug { .. })));
    }

    #[test]
    fn slugify_cuts_long_names_to_63_characters_without_a_trailing_dash() {
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        let slug = Slug::slugify(&long).unwrap();
        assert_eq!(slug.as_ref(), "a".repeat(62));
        assert!(Slug::slugify(&"x".repeat(200)).unwrap().as_ref().len() == MAX_LABEL_LEN);
    }

    #[test]
    fn parse_accepts_only_exact_labels() {
        assert!(Slug::parse("ok-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "a b", "a;b", &"a".repeat(64)] {
            assert!(Slug::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn base_domain_accepts_dns_names_only() {
        assert!(BaseDomain::parse("preview.localhost").is_ok());
        assert!(BaseDomain::parse("localhost").is_ok());
        for bad in ["", ".x", "x.", "a..b", "Preview.example", "a b.c", "*.example.com", "x;y"] {
            assert!(BaseDomain::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn host_joins_slug_and_domain() {
        let domain = BaseDomain::parse("preview.localhost").unwrap();
        let host = domain.host_for(&Slug::parse("test").unwrap());
        assert_eq!(host.as_ref(), "test.preview.localhost");
    }

    #[test]
    fn env_names_follow_posix_shell_rules() {
        for good in ["A", "_x", "image_name", "PREVIEW_URL", "a1"] {
            assert!(EnvName::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", "1A", "A-B", "A B", "A=B", "Ä"] {
            assert!(EnvName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
