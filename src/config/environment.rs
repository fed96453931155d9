//! `images.<key>.services` and `images.<key>.jobs`: what a preview environment runs beside its
//! app (a database, a cache) and before it (a migration), and the templates of `env` values.
//! Validated here, so the lifecycle only ever sees names that are DNS labels, absolute data
//! paths, Docker volume names and templates that render.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hardening::Capability;
use super::{ByteSize, Problems, PullPolicy, check_image_and_command, validate_limits};
use crate::preview::{EnvName, ServiceName};

const DEFAULT_READY_TIMEOUT_SECS: u64 = 60;
const DEFAULT_JOB_TIMEOUT_SECS: u64 = 300;

/// One service of a preview: a container on the preview's network, reachable by its name, with
/// an optional data volume of its own that outlives redeploys.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub image: String,
    pub pull: PullPolicy,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<EnvName, EnvTemplate>,
    pub ready: Option<ReadyCheck>,
    pub ready_timeout: Duration,
    /// The absolute path the preview's data volume is mounted on.
    pub data: Option<String>,
    /// A Docker volume copied into the data volume when it is made (first launch, reset).
    pub seed_volume: Option<VolumeName>,
    pub memory: i64,
    pub cpus: Option<f64>,
    pub pids: i64,
    pub cap_add: Vec<Capability>,
}

impl ServiceSpec {
    /// A short digest of the definition: a service whose digest changed in config.yml is
    /// recreated on the next deploy (its data volume is kept).
    pub fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(format!("{self:?}").as_bytes())[..8])
    }
}

/// How previewd tells that a service is ready for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyCheck {
    /// A command run inside the service's container that exits 0 once it is ready.
    Command(Vec<String>),
    /// A TCP port of the container that accepts connections once it is ready.
    Tcp(u16),
}

/// A command run to completion in the app's image, with the app's environment, before the app
/// gets traffic.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: ServiceName,
    pub command: Vec<String>,
    pub when: JobWhen,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobWhen {
    /// Every launch and redeploy of the preview (migrations).
    EveryDeploy,
    /// The preview's first launch, and a reset (loading fixtures).
    FirstDeploy,
}

/// A Docker volume name: `[A-Za-z0-9][A-Za-z0-9_.-]*`, as Docker accepts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn parse(input: &str) -> Result<Self, String> {
        let mut bytes = input.bytes();
        let first = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
        if first && input.len() <= 255 && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            Ok(Self(input.to_owned()))
        } else {
            Err(format!("{input:?} is not a Docker volume name: use letters, digits, '_', '.' and '-'"))
        }
    }
}

impl AsRef<str> for VolumeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VolumeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an `env` value template may use.
#[derive(Debug, Serialize)]
pub struct EnvContext<'a> {
    pub slug: &'a str,
    pub base_domain: &'a str,
    /// The pull request's branch; for a preview launched by hand, its `container_name`.
    pub branch: &'a str,
    /// Empty for a preview launched by hand.
    pub pr_number: String,
}

/// An `env` value: a Tera template, checked to render at load. A value without `{{` or `{%` is
/// used as it is (no escaping of braces needed in ordinary values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvTemplate {
    text: String,
    /// A value from a pull request's `.previewd.yml`: untrusted, so never run through Tera.
    literal: bool,
}

impl EnvTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let template = Self { text: text.to_owned(), literal: false };
        let sample =
            EnvContext { slug: "name", base_domain: "preview.localhost", branch: "main", pr_number: "1".to_owned() };
        template.render(&sample)?;
        Ok(template)
    }

    /// A value used as it is written.
    pub fn literal(text: &str) -> Self {
        Self { text: text.to_owned(), literal: true }
    }

    pub fn render(&self, context: &EnvContext<'_>) -> Result<String, String> {
        let text = &self.text;
        if self.literal || (!text.contains("{{") && !text.contains("{%") && !text.contains("{#")) {
            return Ok(text.clone());
        }
        let context = tera::Context::from_serialize(context).map_err(|err| err.to_string())?;
        tera::Tera::one_off(text, &context, false).map_err(|err| crate::error_chain(&err))
    }
}

impl<'de> Deserialize<'de> for EnvTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = RawEnvValue::deserialize(deserializer)?.into_string();
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// YAML turns `PORT: 5000` into a number; an environment value is text either way.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawEnvValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl RawEnvValue {
    pub(crate) fn into_string(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Integer(n) => n.to_string(),
            Self::Float(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    image: String,
    #[serde(default)]
    pull: Option<PullPolicy>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<EnvName, EnvTemplate>,
    #[serde(default)]
    ready: Option<RawReady>,
    #[serde(default)]
    ready_timeout: Option<u64>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    seed_volume: Option<String>,
    #[serde(default)]
    memory: Option<ByteSize>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    pids: Option<i64>,
    #[serde(default)]
    cap_add: Option<Vec<String>>,
}

/// `{command: [..]}` or `{tcp: PORT}` (a map, not a YAML tag, so it reads as documented).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReady {
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    tcp: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    name: ServiceName,
    command: Vec<String>,
    #[serde(default)]
    when: Option<JobWhen>,
    #[serde(default)]
    timeout: Option<u64>,
}

pub(super) fn validate_services(
    path: &str,
    raw: BTreeMap<ServiceName, RawService>,
    problems: &mut Problems,
) -> BTreeMap<ServiceName, ServiceSpec> {
    raw.into_iter()
        .filter_map(|(name, service)| {
            let path = format!("{path}.services.{name}");
            validate_service(&path, service, problems).map(|spec| (name, spec))
        })
        .collect()
}

fn validate_service(path: &str, raw: RawService, problems: &mut Problems) -> Option<ServiceSpec> {
    let before = problems.0.len();
    check_image_and_command(path, &raw.image, raw.command.as_deref(), problems);
    let ready = match raw.ready.map(|ready| (ready.command, ready.tcp)) {
        Some((Some(argv), None)) if argv.is_empty() => {
            problems.add(&format!("{path}.ready.command"), "must not be empty, e.g. [pg_isready, -U, app]");
            None
        }
        Some((None, Some(0))) => {
            problems.add(&format!("{path}.ready.tcp"), "must be the container port that answers (1-65535)");
            None
        }
        Some((Some(argv), None)) => Some(ReadyCheck::Command(argv)),
        Some((None, Some(port))) => Some(ReadyCheck::Tcp(port)),
        Some(_) => {
            problems.add(&format!("{path}.ready"), "must be either {command: [..]} or {tcp: PORT}");
            None
        }
        None => None,
    };
    let ready_timeout = raw.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT_SECS);
    if ready_timeout == 0 {
        problems.add(&format!("{path}.ready_timeout"), "must be at least 1 (seconds)");
    }
    if let Some(data) = &raw.data
        && (!data.starts_with('/') || data == "/" || data.contains(|c: char| c == ':' || c.is_control()))
    {
        problems.add(
            &format!("{path}.data"),
            "must be an absolute path in the container other than /, e.g. /var/lib/postgresql/data",
        );
    }
    let seed_volume = raw.seed_volume.as_deref().and_then(|name| {
        VolumeName::parse(name).map_err(|message| problems.add(&format!("{path}.seed_volume"), message)).ok()
    });
    if seed_volume.is_some() && raw.data.is_none() {
        problems.add(&format!("{path}.seed_volume"), "needs `data`: the path the seeded volume is mounted on");
    }
    let limits = validate_limits(path, raw.memory, raw.cpus, raw.pids, raw.cap_add, problems);
    (problems.0.len() == before).then(|| ServiceSpec {
        image: raw.image,
        pull: raw.pull.unwrap_or(PullPolicy::Missing),
        command: raw.command,
        env: raw.env,
        ready,
        ready_timeout: Duration::from_secs(ready_timeout),
        data: raw.data,
        seed_volume,
        memory: limits.memory,
        cpus: limits.cpus,
        pids: limits.pids,
        cap_add: limits.cap_add,
    })
}

pub(crate) fn validate_jobs(path: &str, raw: Vec<RawJob>, problems: &mut Problems) -> Vec<JobSpec> {
    let mut seen = std::collections::BTreeSet::new();
    let mut jobs = Vec::new();
    for (index, job) in raw.into_iter().enumerate() {
        let path = format!("{path}.jobs[{index}]");
        let mut ok = true;
        if !seen.insert(job.name.clone()) {
            problems.add(
                &format!("{path}.name"),
                format!("{:?} names two jobs; give each its own name", job.name.as_ref()),
            );
            ok = false;
        }
        if job.command.is_empty() {
            problems.add(&format!("{path}.command"), "must not be empty, e.g. [python3, manage.py, migrate]");
            ok = false;
        }
        let timeout = job.timeout.unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
        if timeout == 0 {
            problems.add(&format!("{path}.timeout"), "must be at least 1 (seconds)");
            ok = false;
        }
        if ok {
            jobs.push(JobSpec {
                name: job.name,
                command: job.command,
                when: job.when.unwrap_or(JobWhen::EveryDeploy),
                timeout: Duration::from_secs(timeout),
            });
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> EnvContext<'static> {
        EnvContext { slug: "feature-x", base_domain: "p.localhost", branch: "feature/x", pr_number: "7".to_owned() }
    }

    #[test]
    fn env_templates_render_the_previews_names() {
        let template = EnvTemplate::parse("http://api-{{ slug }}.{{ base_domain }}/{{ pr_number }}").unwrap();
        assert_eq!(template.render(&context()).unwrap(), "http://api-feature-x.p.localhost/7");
    }

    #[test]
    fn env_values_without_template_syntax_are_kept_as_they_are() {
        let template = EnvTemplate::parse("postgres://app:a}b@db:5432/app").unwrap();
        assert_eq!(template.render(&context()).unwrap(), "postgres://app:a}b@db:5432/app");
    }

    #[test]
    fn an_env_template_that_does_not_render_is_refused_at_load() {
        let err = EnvTemplate::parse("{{ unknown_variable }}").unwrap_err();
        assert!(err.contains("unknown_variable"), "{err}");
        assert!(EnvTemplate::parse("{{ slug").is_err());
    }

    #[test]
    fn volume_names_are_what_docker_accepts() {
        assert!(VolumeName::parse("shop-db-seed").is_ok());
        assert!(VolumeName::parse("a.b_c-1").is_ok());
        for bad in ["", "-x", "a/b", "a b", "a:b", "../x"] {
            assert!(VolumeName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_changed_service_definition_has_another_digest() {
        let mut problems = Problems::default();
        let raw = |memory: &str| RawService {
            image: "previewd-postgres:15".to_owned(),
            pull: None,
            command: None,
            env: BTreeMap::new(),
            ready: None,
            ready_timeout: None,
            data: None,
            seed_volume: None,
            memory: Some(ByteSize::Text(memory.to_owned())),
            cpus: None,
            pids: None,
            cap_add: None,
        };
        let a = validate_service("s", raw("256m"), &mut problems).unwrap();
        let b = validate_service("s", raw("512m"), &mut problems).unwrap();
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), validate_service("s", raw("256m"), &mut problems).unwrap().digest());
    }
}
