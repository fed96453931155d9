//! The `github` section of config.yml: API address, secrets (from the environment or a file,
//! never inline), and which repositories get previews of which image.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Problems;
use crate::preview::{ImageKey, Slug};

#[derive(Debug, Clone)]
pub struct GitHubConfig {
    /// Without a trailing slash, e.g. `https://api.github.com`.
    pub api_url: String,
    pub webhook_secret: Secret,
    pub token: Secret,
    /// The webhook also needs HTTP Basic credentials of a `users` entry (Stager's incoming auth).
    pub webhook_basic_auth: bool,
    /// The API also accepts `Authorization: Bearer <GitHub token>` of users with push access.
    pub api_auth: bool,
    /// Keyed by the lowercased `owner/name` (GitHub names are case-insensitive).
    pub repos: BTreeMap<String, RepoConfig>,
    /// How often open pull requests are read from GitHub to catch missed deliveries; `None`: never.
    pub sync_interval: Option<std::time::Duration>,
}

/// `allow_forks`: whether pull requests from forks (untrusted code) get previews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "RawForkPolicy")]
pub enum ForkPolicy {
    /// `false`: never.
    #[default]
    Refuse,
    /// `true`: always.
    Allow,
    /// `approve`: a commit a maintainer approved with `/preview approve`, and no other.
    Approve,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawForkPolicy {
    Bool(bool),
    Word(ApproveWord),
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ApproveWord {
    Approve,
}

impl From<RawForkPolicy> for ForkPolicy {
    fn from(raw: RawForkPolicy) -> Self {
        match raw {
            RawForkPolicy::Bool(false) => Self::Refuse,
            RawForkPolicy::Bool(true) => Self::Allow,
            RawForkPolicy::Word(ApproveWord::Approve) => Self::Approve,
        }
    }
}

impl GitHubConfig {
    /// Where pull requests are shown: github.com, or a GitHub Enterprise host
    /// (`https://HOST/api/v3`).
    pub fn web_url(&self) -> String {
        match self.api_url.trim_end_matches('/').strip_suffix("/api/v3") {
            Some(host) if host.starts_with("https://") || host.starts_with("http://") => host.to_owned(),
            _ => "https://github.com".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RepoConfig {
    /// `owner/name` as written in config.yml.
    pub full_name: String,
    pub image: ImageKey,
    pub name: NameTemplate,
    pub label: Option<String>,
    pub allow_forks: ForkPolicy,
    pub skip_drafts: bool,
    pub image_tag: Option<NameTemplate>,
    /// Present: previews are built from the pull request's head commit, not run from `image`.
    pub build: Option<super::BuildSpec>,
    /// The preview names `name` can give this repo's pull requests, kept from manual launches;
    /// `None` when the template is the branch alone (it could produce any name).
    pub reserved: Option<regex::Regex>,
}

impl RepoConfig {
    /// Whether `slug` is a name this repo's pull requests may get.
    pub fn reserves(&self, slug: &Slug) -> bool {
        self.reserved.as_ref().is_some_and(|pattern| pattern.is_match(slug.as_ref()))
    }
}

/// Stand-ins for the parts of a pull request's name that vary, chosen to survive slugging.
const NUMBER_MARK: u64 = 9_081_726_354;
const BRANCH_MARK: &str = "qqbranchmarkqq";

/// The names `template` gives pull requests of `owner/repo`, as a pattern over slugs.
fn reserved_names(template: &NameTemplate, owner: &str, repo: &str) -> Option<regex::Regex> {
    let context = PrContext { owner, repo, number: NUMBER_MARK, branch: BRANCH_MARK, sha: "0000000" };
    let slug = template.slug(&context).ok()?;
    let text = slug.as_ref();
    if text == BRANCH_MARK {
        return None;
    }
    let number = NUMBER_MARK.to_string();
    let mut pattern = String::from("^");
    for (index, piece) in text.split(BRANCH_MARK).enumerate() {
        if index > 0 {
            pattern.push_str("[a-z0-9-]+");
        }
        let literals: Vec<String> = piece.split(number.as_str()).map(regex::escape).collect();
        pattern.push_str(&literals.join("[0-9]+"));
    }
    pattern.push('$');
    regex::Regex::new(&pattern).ok()
}

impl GitHubConfig {
    pub fn repo(&self, full_name: &str) -> Option<&RepoConfig> {
        self.repos.get(&full_name.to_ascii_lowercase())
    }

    /// The repositories whose pull requests use an image.
    pub fn repos_of_image<'a>(&'a self, image: &'a ImageKey) -> impl Iterator<Item = &'a RepoConfig> {
        self.repos.values().filter(move |repo| &repo.image == image)
    }
}

/// A secret value; never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a Tera name template sees about a pull request.
#[derive(Debug, serde::Serialize)]
pub struct PrContext<'a> {
    pub owner: &'a str,
    pub repo: &'a str,
    pub number: u64,
    pub branch: &'a str,
    pub sha: &'a str,
}

/// A Tera template of a preview name or image tag, checked to render.
#[derive(Debug, Clone)]
pub struct NameTemplate(String);

impl NameTemplate {
    fn parse(text: &str) -> Result<Self, String> {
        let template = Self(text.to_owned());
        let sample = PrContext { owner: "octo", repo: "app", number: 1, branch: "main", sha: "0000000" };
        template.render(&sample)?;
        Ok(template)
    }

    pub fn render(&self, context: &PrContext<'_>) -> Result<String, String> {
        let context = tera::Context::from_serialize(context).map_err(|err| err.to_string())?;
        tera::Tera::one_off(&self.0, &context, false).map_err(|err| crate::error_chain(&err))
    }

    /// The preview name of a pull request: the rendered template, slugged.
    pub fn slug(&self, context: &PrContext<'_>) -> Result<Slug, String> {
        let text = self.render(context)?;
        Slug::slugify(&text).map_err(|err| err.to_string())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawGitHub {
    api_url: Option<String>,
    webhook_secret_env: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    webhook_basic_auth: Option<bool>,
    api_auth: Option<bool>,
    sync_interval: Option<u64>,
    repos: BTreeMap<String, RawRepo>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRepo {
    image: ImageKey,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    allow_forks: ForkPolicy,
    #[serde(default = "yes")]
    skip_drafts: bool,
    #[serde(default)]
    image_tag: Option<String>,
    #[serde(default)]
    build: Option<super::builds::RawBuild>,
}

fn yes() -> bool {
    true
}

const DEFAULT_NAME: &str = "{{ repo }}-pr-{{ number }}";
/// The default when two listed repositories share a name, so their previews cannot collide.
const DEFAULT_NAME_WITH_OWNER: &str = "{{ owner }}-{{ repo }}-pr-{{ number }}";
const DEFAULT_SYNC_SECS: u64 = 300;

pub(super) fn validate(
    raw: RawGitHub,
    images: &BTreeMap<ImageKey, super::ImageSpec>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    problems: &mut Problems,
) -> Option<GitHubConfig> {
    let before = problems.0.len();
    let api_url = raw.api_url.unwrap_or_else(|| "https://api.github.com".to_owned()).trim_end_matches('/').to_owned();
    if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
        problems.add("github.api_url", format!("{api_url:?} must be an http:// or https:// URL"));
    }
    let webhook_secret = secret(
        "webhook_secret",
        raw.webhook_secret_env,
        raw.webhook_secret_file,
        "PREVIEWD_WEBHOOK_SECRET",
        resolve,
        problems,
    );
    let token = secret("token", raw.token_env, raw.token_file, "PREVIEWD_GITHUB_TOKEN", resolve, problems);
    if raw.repos.is_empty() {
        problems.add("github.repos", "no repository is configured; add `owner/name: {image: ...}` entries");
    }
    let short_name = |full_name: &str| full_name.rsplit('/').next().unwrap_or_default().to_ascii_lowercase();
    let mut short_names: BTreeMap<String, usize> = BTreeMap::new();
    for full_name in raw.repos.keys() {
        *short_names.entry(short_name(full_name)).or_default() += 1;
    }
    let repos: BTreeMap<String, RepoConfig> = raw
        .repos
        .into_iter()
        .filter_map(|(full_name, repo)| {
            let shared = short_names.get(&short_name(&full_name)).is_some_and(|count| *count > 1);
            let default_name = if shared { DEFAULT_NAME_WITH_OWNER } else { DEFAULT_NAME };
            validate_repo(&full_name, repo, default_name, images, problems).map(|r| (full_name.to_ascii_lowercase(), r))
        })
        .collect();
    (problems.0.len() == before).then(|| GitHubConfig {
        api_url,
        webhook_secret: webhook_secret.unwrap_or(Secret(String::new())),
        token: token.unwrap_or(Secret(String::new())),
        webhook_basic_auth: raw.webhook_basic_auth.unwrap_or(false),
        api_auth: raw.api_auth.unwrap_or(false),
        repos,
        sync_interval: match raw.sync_interval.unwrap_or(DEFAULT_SYNC_SECS) {
            0 => None,
            secs => Some(std::time::Duration::from_secs(secs)),
        },
    })
}

/// Reads a secret from `<name>_file` or the environment variable `<name>_env` names.
fn secret(
    name: &str,
    env: Option<String>,
    file: Option<PathBuf>,
    default_env: &str,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    problems: &mut Problems,
) -> Option<Secret> {
    let value = match (env, file) {
        (Some(_), Some(_)) => Err(format!("give {name}_env or {name}_file, not both")),
        (None, Some(file)) => read_secret_file(&resolve(file)),
        (env, None) => {
            let var = env.unwrap_or_else(|| default_env.to_owned());
            std::env::var(&var)
                .map_err(|_| format!("environment variable {var} is not set; export it or use {name}_file"))
        }
    };
    match value.map(|v| v.trim_end_matches(['\n', '\r']).to_owned()) {
        Ok(value) if !value.is_empty() => Some(Secret(value)),
        Ok(_) => {
            problems.add(&format!("github.{name}"), "is empty");
            None
        }
        Err(message) => {
            problems.add(&format!("github.{name}"), message);
            None
        }
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

fn depends_on_sha(template: &NameTemplate) -> bool {
    let with = |sha| template.render(&PrContext { owner: "o", repo: "r", number: 1, branch: "b", sha });
    with("0000000") != with("1111111")
}

fn validate_repo(
    full_name: &str,
    raw: RawRepo,
    default_name: &str,
    images: &BTreeMap<ImageKey, super::ImageSpec>,
    problems: &mut Problems,
) -> Option<RepoConfig> {
    let path = format!("github.repos.{full_name}");
    let before = problems.0.len();
    let valid_part = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match full_name.split_once('/') {
        Some((owner, name)) if valid_part(owner) && valid_part(name) => {}
        _ => problems.add(&path, "must be a repository as owner/name, e.g. Codertocat/Hello-World"),
    }
    if !images.contains_key(&raw.image) {
        let allowed: Vec<String> = images.keys().map(ToString::to_string).collect();
        problems.add(
            &format!("{path}.image"),
            format!("{:?} is not a key of `images` ({})", raw.image.as_ref(), allowed.join(", ")),
        );
    }
    let mut template = |key: &str, text: &str| match NameTemplate::parse(text) {
        Ok(template) => Some(template),
        Err(err) => {
            problems.add(&format!("{path}.{key}"), format!("not a valid template: {err}"));
            None
        }
    };
    let name = template("name", raw.name.as_deref().unwrap_or(default_name));
    let image_tag = raw.image_tag.as_deref().and_then(|text| template("image_tag", text));
    if name.as_ref().is_some_and(depends_on_sha) {
        problems.add(
            &format!("{path}.name"),
            "must not use {{ sha }}: the name is the pull request's identity across pushes",
        );
    }
    if raw.label.as_deref().is_some_and(str::is_empty) {
        problems.add(&format!("{path}.label"), "must not be empty; remove it to preview every pull request");
    }
    if raw.build.is_some() && image_tag.is_some() {
        problems.add(&format!("{path}.image_tag"), "cannot go with `build`: a built preview runs the image it built");
    }
    let build = raw.build.and_then(|raw| {
        super::builds::validate_build(&format!("{path}.build"), raw, None, &mut |key, message| {
            problems.add(&key, message)
        })
    });
    let (owner, repo) = full_name.split_once('/').unwrap_or_default();
    let reserved = name.as_ref().and_then(|name| reserved_names(name, owner, repo));
    (problems.0.len() == before).then(|| RepoConfig {
        reserved,
        full_name: full_name.to_owned(),
        image: raw.image,
        name: name.unwrap_or(NameTemplate(String::new())),
        label: raw.label,
        allow_forks: raw.allow_forks,
        skip_drafts: raw.skip_drafts,
        image_tag,
        build,
    })
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub fn secret(value: &str) -> super::Secret {
        super::Secret(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> PrContext<'static> {
        PrContext { owner: "Codertocat", repo: "Hello-World", number: 2, branch: "feature/Odd Name", sha: "ec26c3e" }
    }

    #[test]
    fn the_default_name_gives_repo_pr_number() {
        let template = NameTemplate::parse(DEFAULT_NAME).unwrap();
        assert_eq!(template.slug(&context()).unwrap().as_ref(), "hello-world-pr-2");
    }

    #[test]
    fn names_from_branches_are_slugged() {
        let template = NameTemplate::parse("{{ branch }}").unwrap();
        assert_eq!(template.slug(&context()).unwrap().as_ref(), "feature-odd-name");
    }

    #[test]
    fn a_name_that_changes_with_every_push_is_refused() {
        assert!(depends_on_sha(&NameTemplate::parse("pr-{{ number }}-{{ sha }}").unwrap()));
        assert!(!depends_on_sha(&NameTemplate::parse(DEFAULT_NAME).unwrap()));
    }

    fn reserves(template: &str, name: &str) -> bool {
        let pattern = reserved_names(&NameTemplate::parse(template).unwrap(), "acme", "web");
        pattern.is_some_and(|pattern| pattern.is_match(name))
    }

    #[test]
    fn the_names_a_template_gives_pull_requests_are_reserved() {
        assert!(reserves(DEFAULT_NAME, "web-pr-3") && reserves(DEFAULT_NAME, "web-pr-1234"));
        assert!(!reserves(DEFAULT_NAME, "web-pr-x") && !reserves(DEFAULT_NAME, "my-web-pr-3"));
        assert!(reserves(DEFAULT_NAME_WITH_OWNER, "acme-web-pr-3") && !reserves(DEFAULT_NAME_WITH_OWNER, "web-pr-3"));
        assert!(reserves("pr-{{ number }}-{{ branch }}", "pr-7-fix-login"));
        assert!(!reserves("pr-{{ number }}-{{ branch }}", "pr-fix-login"));
    }

    #[test]
    fn a_name_of_the_branch_alone_reserves_nothing() {
        assert!(!reserves("{{ branch }}", "anything"));
    }

    #[test]
    fn a_template_with_an_unknown_variable_is_refused() {
        assert!(NameTemplate::parse("{{ nope }}").is_err());
    }

    #[test]
    fn secrets_are_never_printed() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(***)");
    }
}
