//! `.previewd.yml`: what a repository says about its own previews, read from the pull request's
//! head commit so that a pull request which changes it is previewed with its change.
//!
//! The file is written by whoever opens the pull request, so it may only set what is theirs to
//! decide: `build.context`, `build.dockerfile`, `build.args`, `build.paths`, `port`,
//! `health_path`, `env` (plain values, never templates; not over a key the operator set, which may
//! hold a secret) and `jobs` (their timeouts cut to the longest of the image's own jobs, or 300 s).
//! Any other key fails the deployment with a message naming it; the operator's config.yml stays
//! the authority on services, limits, secrets and networking.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::builds::{BuildSpec, RawBuild, validate_build};
use super::environment::{RawEnvValue, RawJob, validate_jobs};
use super::{EnvTemplate, ImageSpec, Problems};
use crate::preview::EnvName;

/// Where the file is read from: the root of the repository at the pull request's head commit.
pub const REPO_FILE: &str = ".previewd.yml";

const TOP_KEYS: [&str; 5] = ["build", "port", "health_path", "env", "jobs"];
const BUILD_KEYS: [&str; 4] = ["context", "dockerfile", "args", "paths"];
/// The longest a repository's job may run when config.yml's image has no jobs of its own.
const DEFAULT_JOB_CAP: std::time::Duration = std::time::Duration::from_secs(300);
/// Larger than any sensible file; a bigger one is refused unread.
pub const MAX_REPO_FILE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RepoFileError {
    #[error(
        "{REPO_FILE}: `{key}` may not be set by the repository (it may set build.context, build.dockerfile, build.args, build.paths, port, health_path, env, jobs); remove it or ask the operator to set it in config.yml"
    )]
    Forbidden { key: String },
    #[error("{REPO_FILE}: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepoFile {
    #[serde(default)]
    build: Option<RawBuild>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    health_path: Option<String>,
    #[serde(default)]
    env: BTreeMap<EnvName, RawEnvValue>,
    #[serde(default)]
    jobs: Option<Vec<RawJob>>,
}

/// The first key of `text` that the repository may not set, as a dotted path.
fn forbidden_key(value: &serde_norway::Value) -> Option<String> {
    let serde_norway::Value::Mapping(top) = value else { return None };
    for (key, inner) in top {
        let name = key.as_str().map_or_else(|| format!("{key:?}"), str::to_owned);
        if !TOP_KEYS.contains(&name.as_str()) {
            return Some(name);
        }
        if name == "build"
            && let serde_norway::Value::Mapping(build) = inner
        {
            for key in build.keys() {
                let inner_name = key.as_str().map_or_else(|| format!("{key:?}"), str::to_owned);
                if !BUILD_KEYS.contains(&inner_name.as_str()) {
                    return Some(format!("build.{inner_name}"));
                }
            }
        }
    }
    None
}

/// `spec` (from config.yml) and `build` refined by the repository's file.
pub fn apply(text: &str, spec: &mut ImageSpec, build: &mut BuildSpec) -> Result<(), RepoFileError> {
    if text.trim().is_empty() {
        return Ok(());
    }
    let value: serde_norway::Value =
        serde_norway::from_str(text).map_err(|err| RepoFileError::Invalid(err.to_string()))?;
    if value.is_null() {
        return Ok(());
    }
    if !value.is_mapping() {
        return Err(RepoFileError::Invalid("must be a mapping of keys, e.g. `port: 8000`".to_owned()));
    }
    if let Some(key) = forbidden_key(&value) {
        return Err(RepoFileError::Forbidden { key });
    }
    let raw: RawRepoFile = serde_norway::from_value(value).map_err(|err| RepoFileError::Invalid(err.to_string()))?;
    let mut problems = Vec::new();
    let refined = match raw.build {
        Some(raw_build) => validate_build("build", raw_build, Some(build), &mut |key, message| {
            problems.push(format!("{key}: {message}"))
        }),
        None => Some(build.clone()),
    };
    if raw.port == Some(0) {
        problems.push("port: must be the container port the app listens on (1-65535)".to_owned());
    }
    if let Some(path) = &raw.health_path
        && (!path.starts_with('/') || path.contains(|c: char| c.is_whitespace() || c.is_control()))
    {
        problems.push("health_path: must be a URL path starting with '/', e.g. /healthz".to_owned());
    }
    for name in raw.env.keys().filter(|name| spec.env.contains_key(*name)) {
        problems.push(format!("env.{name}: is set by the operator in config.yml and cannot be changed here"));
    }
    let jobs = raw.jobs.map(|jobs| {
        let mut job_problems = Problems::default();
        let jobs = validate_jobs("", jobs, &mut job_problems);
        problems.extend(job_problems.0.into_iter().map(|p| p.message.trim_start_matches('.').to_owned()));
        jobs
    });
    if !problems.is_empty() {
        return Err(RepoFileError::Invalid(problems.join("; ")));
    }
    if let Some(refined) = refined {
        *build = refined;
    }
    if let Some(port) = raw.port {
        spec.port = port;
    }
    if let Some(path) = raw.health_path {
        spec.health_path = path;
    }
    for (name, value) in raw.env {
        spec.env.insert(name, EnvTemplate::literal(&value.into_string()));
    }
    if let Some(mut jobs) = jobs {
        // A job runs while the launch holds one of `limits.parallel_launches`: the repository
        // may not make it wait longer than the operator's own jobs may.
        let cap = spec.jobs.iter().map(|job| job.timeout).max().unwrap_or(DEFAULT_JOB_CAP);
        for job in &mut jobs {
            job.timeout = job.timeout.min(cap);
        }
        spec.jobs = jobs;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> (ImageSpec, BuildSpec) {
        let yaml = "image: shop:1\nport: 3000\nenv: {SECRET: s}\n";
        let raw = serde_norway::from_str(yaml).expect("an image");
        let spec = crate::config::validate_image("images.shop", raw, &mut Problems::default()).expect("valid");
        let build = validate_build("b", RawBuild::default(), None, &mut |_, _| {}).expect("defaults");
        (spec, build)
    }

    #[test]
    fn the_repository_may_refine_port_health_env_jobs_and_build() {
        let (mut spec, mut build) = base();
        let text = "port: 8000\nhealth_path: /up\nenv: {GREETING: '{{ slug }}'}\nbuild: {context: web, args: {A: '1'}}\njobs: [{name: migrate, command: ['true']}]\n";
        apply(text, &mut spec, &mut build).unwrap();
        assert_eq!((spec.port, spec.health_path.as_str()), (8000, "/up"));
        assert_eq!((build.context.to_string(), build.args["A"].as_str()), ("web".to_owned(), "1"));
        assert_eq!(spec.jobs.len(), 1);
        let context = crate::config::EnvContext { slug: "s", base_domain: "d", branch: "b", pr_number: "1".into() };
        let greeting = &spec.env[&EnvName::parse("GREETING").unwrap()];
        assert_eq!(greeting.render(&context).unwrap(), "{{ slug }}", "a repository's value is never a template");
    }

    #[test]
    fn a_repositorys_jobs_run_no_longer_than_the_operators_allow() {
        let (mut spec, mut build) = base();
        apply("jobs: [{name: forever, command: [sleep, '9999'], timeout: 999999}]\n", &mut spec, &mut build).unwrap();
        assert_eq!(spec.jobs[0].timeout, DEFAULT_JOB_CAP);
    }

    #[test]
    fn a_key_the_repository_may_not_set_fails_with_its_name() {
        for (text, key) in [
            ("port: 8000\nservices: {db: {image: x}}\n", "services"),
            ("memory: 8g\n", "memory"),
            ("build: {context: ., network: host}\n", "build.network"),
        ] {
            let (mut spec, mut build) = base();
            let err = apply(text, &mut spec, &mut build).unwrap_err();
            assert_eq!(err, RepoFileError::Forbidden { key: key.to_owned() });
            assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
            assert_eq!(spec.port, 3000, "nothing applied");
        }
    }

    #[test]
    fn bad_values_and_operator_env_keys_are_refused_with_their_key() {
        let (mut spec, mut build) = base();
        let err = apply("port: 0\nenv: {SECRET: mine}\nbuild: {context: ../up}\n", &mut spec, &mut build).unwrap_err();
        let text = err.to_string();
        for needle in ["port:", "env.SECRET", "build.context"] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert!(matches!(apply("- a list", &mut spec, &mut build), Err(RepoFileError::Invalid(_))));
        assert_eq!(apply("", &mut spec, &mut build), Ok(()));
    }
}
