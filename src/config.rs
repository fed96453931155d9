//! `config.yml`: its schema (the key names are previewd's public interface), loading, and
//! validation into typed values. A config that loads is one the rest of previewd can trust.
//!
//! Problems are reported all at once: the first YAML or type error with its line and column (serde
//! stops there), then every other top-level key and every `images`/`users` entry is checked on
//! its own, and finally the cross-field rules run on a config that parsed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_norway::{Mapping, Value};

use crate::preview::{BaseDomain, EnvName, Host, ImageKey, InstanceName, ServiceName};

pub mod builds;
pub mod environment;
pub mod github;
pub mod hardening;
pub mod http;
pub mod lifecycle;
pub mod limits;
pub mod network;
pub mod repo_file;
pub mod runtime;
pub use builds::{BuildSpec, BuildsConfig};
pub use environment::{EnvContext, EnvTemplate, JobSpec, JobWhen, ReadyCheck, ServiceSpec, VolumeName};
pub use github::{GitHubConfig, RepoConfig};
pub use hardening::Capability;
pub use http::HttpSettings;
pub use lifecycle::LifecyclePolicy;
pub use limits::Limits;
pub use network::NetworkConfig;
pub use runtime::RuntimeConfig;

/// Everything previewd needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub instance: InstanceName,
    pub listen: SocketAddr,
    pub base_domain: BaseDomain,
    pub public_url: PublicUrl,
    pub state_dir: PathBuf,
    pub nginx: NginxConfig,
    pub images: BTreeMap<ImageKey, ImageSpec>,
    pub users: Vec<User>,
    /// Pull-request previews; absent when the `github` section is.
    pub github: Option<GitHubConfig>,
    pub limits: Limits,
    /// Per-preview networks and the firewall around them.
    pub network: NetworkConfig,
    /// Timeouts and the connection cap of the API's HTTP server.
    pub http: HttpSettings,
    /// With entries, the API answers only requests whose `Host` is one of these names (or an
    /// IP address), so a DNS-rebinding page cannot reach it by a name of its own.
    pub api_hosts: Vec<BaseDomain>,
    /// `/metrics` asks for the same credentials as the API.
    pub metrics_auth: bool,
    /// Proxies in front of nginx whose `X-Forwarded-For` nginx believes (its real-IP module).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How builds of previews from source share the host.
    pub builds: BuildsConfig,
    /// When idle previews sleep, and how long a request waits for one to wake.
    pub lifecycle: LifecyclePolicy,
    /// Where people reach previewd's API and dashboard (no trailing slash); links on pull
    /// requests (a failed build's log) point there. Without it, those links are left out.
    pub dashboard_url: Option<String>,
    /// The container engine previews run on: the local Docker engine, or a Swarm.
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone)]
pub struct NginxConfig {
    /// previewd runs its own nginx (true) or drives the system's (false).
    pub managed: bool,
    pub listen: SocketAddr,
    pub sites_dir: PathBuf,
    pub template: PathBuf,
    pub test_command: Vec<String>,
    /// `None`: previewd sends SIGHUP to the master itself (see `Nginx::reload`).
    pub reload_command: Option<Vec<String>>,
    /// Where the nginx master writes its pid; previewd watches its workers through it.
    pub pid_file: PathBuf,
    /// How long a reload may take until every new connection gets the new config.
    pub reload_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub image: String,
    pub port: u16,
    pub command: Option<Vec<String>>,
    /// Values are templates (see [`EnvTemplate`]).
    pub env: BTreeMap<EnvName, EnvTemplate>,
    pub pull: PullPolicy,
    /// Bytes; `DEFAULT_MEMORY` when config.yml sets none, so no preview is unbounded.
    pub memory: i64,
    pub cpus: Option<f64>,
    /// `DEFAULT_PIDS` when config.yml sets none (a fork bomb stays inside its preview).
    pub pids: i64,
    /// Added back after `CapDrop: ALL`.
    pub cap_add: Vec<Capability>,
    /// The root filesystem is read-only, with a tmpfs on `/tmp`.
    pub read_only: bool,
    /// `serve` runs the image although its settings weaken the isolation (`unsafe_settings`).
    pub allow_unsafe: bool,
    /// Which fields of a launch request become variables.
    pub request_env: RequestEnv,
    pub container_create_params: serde_json::Map<String, serde_json::Value>,
    pub health_path: String,
    pub health_timeout: Duration,
    /// Started before the app, on the preview's network, each reachable by its name.
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    /// Run in order, after the services are ready and before the app gets traffic.
    pub jobs: Vec<JobSpec>,
}

/// `images.<key>.request_env`: `true` (any field, as Stager did), a list of names, or `false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEnv {
    Any,
    Only(std::collections::BTreeSet<EnvName>),
    None,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRequestEnv {
    Flag(bool),
    Names(Vec<EnvName>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    Always,
    Missing,
    Never,
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// An argon2 PHC string, checked to parse.
    pub password_hash: String,
}

/// `public_url` with its `{host}` placeholder, e.g. `http://{host}:8080`.
#[derive(Debug, Clone)]
pub struct PublicUrl(String);

impl PublicUrl {
    const PLACEHOLDER: &str = "{host}";

    fn parse(input: &str) -> Result<Self, String> {
        let scheme_ok = input.starts_with("http://") || input.starts_with("https://");
        if !scheme_ok || input.matches(Self::PLACEHOLDER).count() != 1 || input.contains(char::is_whitespace) {
            return Err(format!(
                "{input:?} must be an http:// or https:// URL containing {{host}} once, e.g. \"http://{{host}}:8080\""
            ));
        }
        Ok(Self(input.to_owned()))
    }

    pub fn for_host(&self, host: &Host) -> String {
        self.0.replace(Self::PLACEHOLDER, host.as_ref())
    }
}

/// Why a config could not be used: every problem found, each with where it is.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Line and column (1-based) where YAML gives them.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(f, "{}: {count} problem{}", self.file.display(), if count == 1 { "" } else { "s" })?;
        for problem in &self.problems {
            match problem.position {
                Some((line, column)) => writeln!(f, "{}:{line}:{column}: {}", self.file.display(), problem.message)?,
                None => writeln!(f, "{}: {}", self.file.display(), problem.message)?,
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem { position: None, message: format!("cannot read the file: {err}") }],
        })?;
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        Self::from_yaml(&text, &base_dir).map_err(|problems| ConfigError { file: path.to_owned(), problems })
    }

    /// Validates config text; relative paths are resolved against `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path) -> Result<Self, Vec<Problem>> {
        match serde_norway::from_str::<RawConfig>(text) {
            Ok(raw) => raw.validate(base_dir),
            Err(first) => Err(every_problem(text, base_dir, &first)),
        }
    }
}

/// After a parse error: that error (with its position), the errors of every other section
/// checked on its own, and the cross-field rules run on the sections that did parse.
fn every_problem(text: &str, base_dir: &Path, first: &serde_norway::Error) -> Vec<Problem> {
    let mut problems = vec![Problem {
        position: first.location().map(|loc| (loc.line(), loc.column())),
        message: strip_location(&first.to_string()),
    }];
    let Ok(Value::Mapping(top)) = serde_norway::from_str::<Value>(text) else {
        return problems;
    };
    let sections = Sections::check(top);
    let rules =
        sections.rest_as_config().map(|raw| raw.validate(base_dir).err().unwrap_or_default()).unwrap_or_default();
    let broken_rule = |p: &Problem| sections.broken.iter().any(|path| p.message.starts_with(&format!("{path}:")));
    for problem in sections.problems.into_iter().chain(rules.into_iter().filter(|p| !broken_rule(p))) {
        if !problems.iter().any(|p| p.message == problem.message) {
            problems.push(problem);
        }
    }
    problems
}

fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// The document split into sections (top-level keys; entries of `images`), each parsed on its
/// own, so that one broken section does not hide the problems of the others.
struct Sections {
    problems: Vec<Problem>,
    /// The sections that parse.
    rest: Mapping,
    /// Paths of the sections that do not, and of keys left empty by that.
    broken: Vec<String>,
}

impl Sections {
    fn check(top: Mapping) -> Self {
        let mut sections = Self { problems: Vec::new(), rest: Mapping::new(), broken: Vec::new() };
        for (key, value) in top {
            let name = key.as_str().unwrap_or_default().to_owned();
            if let (Some("images"), Value::Mapping(images)) = (key.as_str(), &value) {
                let mut good = Mapping::new();
                for (image, spec) in images.clone() {
                    let single = Value::Mapping(Mapping::from_iter([(image.clone(), spec.clone())]));
                    match section_error(&key, single) {
                        None => {
                            good.insert(image, spec);
                        }
                        Some(problem) => {
                            sections.fail(format!("images.{}", image.as_str().unwrap_or_default()), problem)
                        }
                    }
                }
                if good.is_empty() {
                    sections.broken.push(name);
                }
                sections.rest.insert(key, Value::Mapping(good));
                continue;
            }
            match section_error(&key, value.clone()) {
                None => {
                    sections.rest.insert(key, value);
                }
                Some(problem) => sections.fail(name, problem),
            }
        }
        sections
    }

    fn fail(&mut self, path: String, problem: Problem) {
        self.broken.push(path);
        self.problems.push(problem);
    }

    fn rest_as_config(&self) -> Option<RawConfig> {
        serde_norway::from_value(Value::Mapping(self.rest.clone())).ok()
    }
}

/// The error of a config that holds only this one key, if any.
fn section_error(key: &Value, value: Value) -> Option<Problem> {
    let doc = Value::Mapping(Mapping::from_iter([(key.clone(), value)]));
    let text = serde_norway::to_string(&doc).ok()?;
    let err = serde_norway::from_str::<RawConfig>(&text).err()?;
    Some(Problem { position: None, message: strip_location(&err.to_string()) })
}

// ---- the schema, as written in config.yml ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    instance: Option<InstanceName>,
    listen: Option<SocketAddr>,
    base_domain: Option<BaseDomain>,
    public_url: Option<String>,
    state_dir: Option<PathBuf>,
    nginx: Option<RawNginx>,
    images: Option<BTreeMap<ImageKey, RawImage>>,
    users: Option<Vec<RawUser>>,
    github: Option<github::RawGitHub>,
    limits: Option<limits::RawLimits>,
    network: Option<network::RawNetwork>,
    http: Option<http::RawHttp>,
    api_hosts: Option<Vec<String>>,
    metrics_auth: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    builds: Option<builds::RawBuilds>,
    lifecycle: Option<lifecycle::RawLifecycle>,
    dashboard_url: Option<String>,
    runtime: Option<runtime::RawRuntime>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNginx {
    managed: Option<bool>,
    listen: Option<SocketAddr>,
    sites_dir: Option<PathBuf>,
    template: Option<PathBuf>,
    test_command: Option<Vec<String>>,
    reload_command: Option<Vec<String>>,
    pid_file: Option<PathBuf>,
    reload_timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawImage {
    image: String,
    port: u16,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<EnvName, EnvTemplate>,
    #[serde(default)]
    pull: Option<PullPolicy>,
    #[serde(default)]
    memory: Option<ByteSize>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    pids: Option<i64>,
    #[serde(default)]
    cap_add: Option<Vec<String>>,
    #[serde(default)]
    read_only: Option<bool>,
    #[serde(default)]
    allow_unsafe: Option<bool>,
    #[serde(default)]
    request_env: Option<RawRequestEnv>,
    #[serde(default)]
    container_create_params: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    health_path: Option<String>,
    #[serde(default)]
    health_timeout: Option<u64>,
    #[serde(default)]
    services: BTreeMap<ServiceName, environment::RawService>,
    #[serde(default)]
    jobs: Vec<environment::RawJob>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ByteSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password_hash: String,
}

/// Collects the problems of the cross-field rules, each prefixed with its key path.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: &str, message: impl fmt::Display) {
        self.0.push(Problem { position: None, message: format!("{path}: {message}") });
    }

    fn require<T>(&mut self, path: &str, value: Option<T>, hint: &str) -> Option<T> {
        if value.is_none() {
            self.add(path, format!("missing; {hint}"));
        }
        value
    }
}

const DEFAULT_LISTEN: &str = "127.0.0.1:7800";
const DEFAULT_NGINX_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 30;
const DEFAULT_RELOAD_TIMEOUT_SECS: u64 = 10;
/// 1 GiB: the memory of a preview whose image sets no `memory`.
pub const DEFAULT_MEMORY: i64 = 1 << 30;
/// The process limit of a preview whose image sets no `pids`.
pub const DEFAULT_PIDS: i64 = 512;

impl RawConfig {
    fn validate(self, base_dir: &Path) -> Result<Config, Vec<Problem>> {
        let mut problems = Problems::default();
        // nginx resolves relative paths against its own prefix, so every path is made absolute.
        let resolve = |path: PathBuf| std::path::absolute(base_dir.join(&path)).unwrap_or(path);

        let instance = self.instance.unwrap_or_else(|| InstanceName::parse("default").expect("valid literal"));
        let listen = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid literal"));
        let base_domain = problems.require(
            "base_domain",
            self.base_domain,
            "set the domain previews live under, e.g. preview.localhost",
        );
        let public_url = match PublicUrl::parse(self.public_url.as_deref().unwrap_or("http://{host}")) {
            Ok(url) => Some(url),
            Err(message) => {
                problems.add("public_url", message);
                None
            }
        };
        let state_dir = resolve(self.state_dir.unwrap_or_else(|| PathBuf::from("state")));
        let nginx = validate_nginx(self.nginx.unwrap_or_default(), &state_dir, &resolve, &mut problems);
        let images = validate_images(self.images.unwrap_or_default(), &mut problems);
        let users = validate_users(self.users.unwrap_or_default(), &mut problems);
        let github = self.github.and_then(|raw| github::validate(raw, &images, &resolve, &mut problems));
        let limits = limits::validate(self.limits.unwrap_or_default()).unwrap_or_else(|errors| {
            for (key, message) in errors {
                problems.add(&key, message);
            }
            Limits::default()
        });
        let network = network::validate(self.network.unwrap_or_default()).unwrap_or_else(|errors| {
            for (key, message) in errors {
                problems.add(&key, message);
            }
            NetworkConfig::default()
        });
        let http = http::validate(self.http.unwrap_or_default()).unwrap_or_else(|errors| {
            for (key, message) in errors {
                problems.add(&key, message);
            }
            HttpSettings::default()
        });
        check_environments(&images, &network, &mut problems);
        let api_hosts = validate_api_hosts(self.api_hosts.unwrap_or_default(), &mut problems);
        let trusted_proxies = validate_trusted_proxies(self.trusted_proxies.unwrap_or_default(), &mut problems);
        let builds = builds::validate_builds(self.builds.unwrap_or_default(), &mut problems);
        let lifecycle = lifecycle::validate(self.lifecycle.unwrap_or_default(), &mut problems);
        let runtime = runtime::validate(self.runtime.unwrap_or_default(), &mut problems);
        if runtime.is_swarm() {
            runtime::check_swarm_images(&images, &network, &mut problems);
        }
        let dashboard_url = self.dashboard_url.map(|url| url.trim_end_matches('/').to_owned());
        if let Some(url) = &dashboard_url
            && (!(url.starts_with("http://") || url.starts_with("https://")) || url.contains(char::is_whitespace))
        {
            problems.add(
                "dashboard_url",
                format!("{url:?} must be an http:// or https:// URL, e.g. https://previewd.example.com"),
            );
        }

        match (base_domain, public_url, problems.0.is_empty()) {
            (Some(base_domain), Some(public_url), true) => Ok(Config {
                instance,
                listen,
                base_domain,
                public_url,
                state_dir,
                nginx,
                images,
                users,
                github,
                limits,
                network,
                http,
                api_hosts,
                metrics_auth: self.metrics_auth.unwrap_or(false),
                trusted_proxies,
                builds,
                lifecycle,
                dashboard_url,
                runtime,
            }),
            _ => Err(problems.0),
        }
    }
}

/// Services are reached by name on the preview's own network, so an image with services needs
/// one: `network.isolation` on, and no `NetworkMode` of its own.
fn check_environments(images: &BTreeMap<ImageKey, ImageSpec>, network: &NetworkConfig, problems: &mut Problems) {
    for (key, spec) in images.iter().filter(|(_, spec)| !spec.services.is_empty()) {
        if !network.isolation {
            problems.add(
                &format!("images.{key}.services"),
                "services run on the preview's own network, which network.isolation: false turns off; set it to true",
            );
        } else if spec.network_mode().is_some() || spec.leaves_preview_network() {
            problems.add(
                &format!("images.{key}.services"),
                "the app must be on the preview's own network to reach its services; remove NetworkMode/NetworkingConfig from container_create_params",
            );
        }
    }
}

fn validate_api_hosts(raw: Vec<String>, problems: &mut Problems) -> Vec<BaseDomain> {
    raw.iter()
        .enumerate()
        .filter_map(|(index, name)| match BaseDomain::parse(&name.to_ascii_lowercase()) {
            Ok(host) => Some(host),
            Err(message) => {
                problems.add(&format!("api_hosts[{index}]"), format!("{message} (a host name, without port)"));
                None
            }
        })
        .collect()
}

fn validate_trusted_proxies(raw: Vec<String>, problems: &mut Problems) -> Vec<ipnet::IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(index, text)| {
            let parsed =
                text.parse::<ipnet::IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            parsed
                .map_err(|_| {
                    problems.add(
                        &format!("trusted_proxies[{index}]"),
                        format!("{text:?} is not an IP address or network, e.g. 10.0.0.5 or 10.0.0.0/8"),
                    )
                })
                .ok()
        })
        .collect()
}

fn validate_nginx(
    raw: RawNginx,
    state_dir: &Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    problems: &mut Problems,
) -> NginxConfig {
    let managed = raw.managed.unwrap_or(true);
    let check = |name: &str, argv: &[String], problems: &mut Problems| {
        if argv.first().is_none_or(String::is_empty) {
            problems.add(&format!("nginx.{name}"), "must be a non-empty argument list, e.g. [nginx, -t]");
        }
    };
    let test_command = raw.test_command.unwrap_or_else(|| vec!["nginx".to_owned(), "-t".to_owned()]);
    check("test_command", &test_command, problems);
    let reload_command = raw.reload_command;
    if let Some(argv) = &reload_command {
        check("reload_command", argv, problems);
    }
    let pid_file = match (managed, raw.pid_file) {
        (true, Some(_)) => {
            problems.add(
                "nginx.pid_file",
                "previewd chooses the pid file of the nginx it manages; remove this key or set managed: false",
            );
            PathBuf::new()
        }
        (true, None) => state_dir.join("nginx").join("nginx.pid"),
        (false, Some(path)) => resolve(path),
        (false, None) => PathBuf::from("/run/nginx.pid"),
    };
    let reload_timeout = raw.reload_timeout.unwrap_or(DEFAULT_RELOAD_TIMEOUT_SECS);
    if reload_timeout == 0 {
        problems.add("nginx.reload_timeout", "must be at least 1 (seconds)");
    }
    NginxConfig {
        managed,
        listen: raw.listen.unwrap_or_else(|| DEFAULT_NGINX_LISTEN.parse().expect("valid literal")),
        sites_dir: raw.sites_dir.map(resolve).unwrap_or_else(|| state_dir.join("nginx").join("sites")),
        template: resolve(raw.template.unwrap_or_else(|| PathBuf::from("templates/vhost.conf.tera"))),
        test_command,
        reload_command,
        pid_file,
        reload_timeout: Duration::from_secs(reload_timeout),
    }
}

fn validate_images(raw: BTreeMap<ImageKey, RawImage>, problems: &mut Problems) -> BTreeMap<ImageKey, ImageSpec> {
    if raw.is_empty() {
        problems.add("images", "no image is allowed; add at least one entry (the allowlist of what can be launched)");
    }
    raw.into_iter()
        .filter_map(|(key, image)| {
            let path = format!("images.{key}");
            validate_image(&path, image, problems).map(|spec| (key, spec))
        })
        .collect()
}

pub(crate) fn validate_image(path: &str, raw: RawImage, problems: &mut Problems) -> Option<ImageSpec> {
    let before = problems.0.len();
    check_image_and_command(path, &raw.image, raw.command.as_deref(), problems);
    if raw.port == 0 {
        problems.add(&format!("{path}.port"), "must be the container port the app listens on (1-65535)");
    }
    let limits = validate_limits(path, raw.memory, raw.cpus, raw.pids, raw.cap_add, problems);
    let health_path = raw.health_path.unwrap_or_else(|| "/".to_owned());
    if !health_path.starts_with('/') || health_path.contains(|c: char| c.is_whitespace() || c.is_control()) {
        problems.add(&format!("{path}.health_path"), "must be a URL path starting with '/', e.g. /healthz");
    }
    let health_timeout = raw.health_timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT_SECS);
    if health_timeout == 0 {
        problems.add(&format!("{path}.health_timeout"), "must be at least 1 (seconds)");
    }
    let params = raw.container_create_params.unwrap_or_default();
    if let Err(message) = crate::docker::check_create_params(&params) {
        problems.add(&format!("{path}.container_create_params"), message);
    }
    let services = environment::validate_services(path, raw.services, problems);
    let jobs = environment::validate_jobs(path, raw.jobs, problems);
    (problems.0.len() == before).then(|| ImageSpec {
        image: raw.image,
        port: raw.port,
        command: raw.command,
        env: raw.env,
        pull: raw.pull.unwrap_or(PullPolicy::Missing),
        memory: limits.memory,
        cpus: limits.cpus,
        pids: limits.pids,
        cap_add: limits.cap_add,
        read_only: raw.read_only.unwrap_or(false),
        allow_unsafe: raw.allow_unsafe.unwrap_or(false),
        request_env: match raw.request_env {
            None | Some(RawRequestEnv::Flag(true)) => RequestEnv::Any,
            Some(RawRequestEnv::Flag(false)) => RequestEnv::None,
            Some(RawRequestEnv::Names(names)) => RequestEnv::Only(names.into_iter().collect()),
        },
        container_create_params: params,
        health_path,
        health_timeout: Duration::from_secs(health_timeout),
        services,
        jobs,
    })
}

/// `image` and `command` of an image or a service.
pub(super) fn check_image_and_command(path: &str, image: &str, command: Option<&[String]>, problems: &mut Problems) {
    if image.trim().is_empty() || image.contains(char::is_whitespace) {
        problems.add(&format!("{path}.image"), "must be a Docker image reference such as previewd-demo:latest");
    }
    if command.is_some_and(<[String]>::is_empty) {
        problems.add(&format!("{path}.command"), "must not be empty; remove it to use the image's own command");
    }
}

/// `memory`, `cpus`, `pids` and `cap_add` of an image or a service, with their defaults.
struct ContainerLimits {
    memory: i64,
    cpus: Option<f64>,
    pids: i64,
    cap_add: Vec<Capability>,
}

fn validate_limits(
    path: &str,
    memory: Option<ByteSize>,
    cpus: Option<f64>,
    pids: Option<i64>,
    cap_add: Option<Vec<String>>,
    problems: &mut Problems,
) -> ContainerLimits {
    let memory = memory.and_then(|size| {
        parse_byte_size(&size).map_err(|message| problems.add(&format!("{path}.memory"), message)).ok()
    });
    if cpus.is_some_and(|cpus| !(cpus > 0.0 && cpus.is_finite())) {
        problems.add(&format!("{path}.cpus"), "must be a positive number of CPUs, e.g. 0.5");
    }
    if pids.is_some_and(|pids| pids < 1) {
        problems.add(&format!("{path}.pids"), "must be at least 1");
    }
    let cap_add = cap_add
        .unwrap_or_default()
        .iter()
        .filter_map(|name| {
            Capability::parse(name).map_err(|message| problems.add(&format!("{path}.cap_add"), message)).ok()
        })
        .collect();
    ContainerLimits { memory: memory.unwrap_or(DEFAULT_MEMORY), cpus, pids: pids.unwrap_or(DEFAULT_PIDS), cap_add }
}

impl ImageSpec {
    /// The `NetworkMode` the image's `container_create_params` set, if any: such a preview
    /// gets no network of its own (see `crate::network`).
    pub fn network_mode(&self) -> Option<&str> {
        self.container_create_params.get("HostConfig")?.get("NetworkMode")?.as_str()
    }

    /// Each setting that weakens the container's isolation, as `(key under the image, why)`;
    /// with `isolated` (`network.isolation`), also those that leave the preview's own network.
    pub fn unsafe_settings(&self, isolated: bool) -> Vec<(String, String)> {
        let caps = self.cap_add.iter().filter(|cap| cap.gives_the_host()).map(|cap| ("cap_add".to_owned(), cap));
        let service_caps = self.services.iter().flat_map(|(name, service)| {
            service
                .cap_add
                .iter()
                .filter(|cap| cap.gives_the_host())
                .map(move |cap| (format!("services.{name}.cap_add"), cap))
        });
        let params = &self.container_create_params;
        let network = if isolated { hardening::leaves_preview_network(params) } else { Vec::new() };
        caps.chain(service_caps)
            .map(|(key, cap)| (key, format!("{cap} lets the container take over the host or its network")))
            .chain(
                hardening::unsafe_params(params)
                    .into_iter()
                    .chain(network)
                    .map(|(key, why)| (format!("container_create_params.{key}"), why)),
            )
            .collect()
    }

    /// Whether the create params take the container off its own network (see
    /// [`hardening::leaves_preview_network`]): such a preview gets none.
    pub fn leaves_preview_network(&self) -> bool {
        !hardening::leaves_preview_network(&self.container_create_params).is_empty()
    }
}

impl Config {
    /// One line per setting that weakens an image's isolation, `images.<key>.<path>: why`, and
    /// whether `serve` refuses it (the image lacks `allow_unsafe: true`).
    pub fn unsafe_settings(&self) -> Vec<(String, bool)> {
        self.images
            .iter()
            .flat_map(|(key, spec)| {
                spec.unsafe_settings(self.network.isolation).into_iter().map(move |(path, why)| {
                    let refused = !spec.allow_unsafe;
                    let consequence = if refused {
                        format!("serve refuses it unless images.{key}.allow_unsafe: true")
                    } else {
                        "allowed by allow_unsafe: true".to_owned()
                    };
                    (format!("images.{key}.{path}: {why}; {consequence}"), refused)
                })
            })
            .collect()
    }
}

/// Parses Docker's size notation: a whole number with an optional unit b, k, m or g (powers of
/// 1024), e.g. `256m`. A few lines, so no crate for it.
pub(crate) fn parse_byte_size(size: &ByteSize) -> Result<i64, String> {
    let text = match size {
        ByteSize::Bytes(bytes) if *bytes > 0 => return Ok(*bytes),
        ByteSize::Bytes(_) => return Err("must be a positive size, e.g. 256m".to_owned()),
        ByteSize::Text(text) => text.trim().to_ascii_lowercase(),
    };
    let (digits, shift) = match text.chars().last() {
        Some('b') => (&text[..text.len() - 1], 0),
        Some('k') => (&text[..text.len() - 1], 10),
        Some('m') => (&text[..text.len() - 1], 20),
        Some('g') => (&text[..text.len() - 1], 30),
        _ => (text.as_str(), 0),
    };
    digits
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size; use a number with b, k, m or g, e.g. 256m"))
}

fn validate_users(raw: Vec<RawUser>, problems: &mut Problems) -> Vec<User> {
    if raw.is_empty() {
        problems.add(
            "users",
            "no user can call the API; add {name, password_hash} entries (make a hash with `previewd hash-password`)",
        );
    }
    let mut users: Vec<User> = Vec::new();
    for (index, user) in raw.into_iter().enumerate() {
        let path = format!("users[{index}]");
        if user.name.is_empty() || user.name.contains(':') || user.name.contains(char::is_control) {
            problems.add(&format!("{path}.name"), "must be a non-empty name without ':'");
        } else if users.iter().any(|u| u.name == user.name) {
            problems.add(&format!("{path}.name"), format!("{:?} is listed twice", user.name));
        }
        if let Err(err) = crate::auth::check_phc_hash(&user.password_hash) {
            problems.add(&format!("{path}.password_hash"), err);
        }
        users.push(User { name: user.name, password_hash: user.password_hash });
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$4dFZ3kCXbd9bLkmhaDkH1EkFfr9mHQ/f/uMqMrOQt5w";

    fn minimal() -> String {
        format!(
            "base_domain: preview.localhost\nimages:\n  demo:\n    image: previewd-demo:latest\n    port: 3000\nusers:\n  - name: testuser\n    password_hash: \"{HASH}\"\n"
        )
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::from_yaml(&minimal(), Path::new("/etc/previewd")).unwrap();
        assert_eq!(config.instance.as_ref(), "default");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7800");
        assert_eq!(config.state_dir, PathBuf::from("/etc/previewd/state"));
        assert_eq!(config.nginx.sites_dir, PathBuf::from("/etc/previewd/state/nginx/sites"));
        assert_eq!(config.nginx.pid_file, PathBuf::from("/etc/previewd/state/nginx/nginx.pid"));
        assert_eq!(config.nginx.test_command, ["nginx", "-t"]);
        assert_eq!(config.nginx.reload_command, None, "previewd signals the master itself");
        let demo = &config.images[&ImageKey::parse("demo").unwrap()];
        assert_eq!(demo.pull, PullPolicy::Missing);
        assert_eq!(demo.health_path, "/");
        assert_eq!(demo.health_timeout, Duration::from_secs(30));
        assert_eq!((demo.memory, demo.pids), (DEFAULT_MEMORY, DEFAULT_PIDS), "no preview is unbounded");
        assert!(demo.cap_add.is_empty() && !demo.read_only && !demo.allow_unsafe);
    }

    #[test]
    fn an_unknown_capability_is_named_with_its_image() {
        let text = minimal().replace("port: 3000", "port: 3000\n    cap_add: [CHOWN, FLY]");
        let err = Config::from_yaml(&text, Path::new("/etc/previewd")).unwrap_err();
        assert!(
            err.iter().any(|p| p.message.contains("images.demo.cap_add: \"FLY\" is not a Linux capability")),
            "{err:?}"
        );
    }

    #[test]
    fn a_host_capability_in_cap_add_is_an_unsafe_setting() {
        let text = minimal().replace("port: 3000", "port: 3000\n    cap_add: [NET_ADMIN]");
        let config = Config::from_yaml(&text, Path::new("/etc/previewd")).unwrap();
        let settings = config.unsafe_settings();
        assert_eq!(settings.len(), 1);
        assert!(settings[0].0.starts_with("images.demo.cap_add: NET_ADMIN") && settings[0].1, "{settings:?}");
    }

    /// `minimal()` with the demo image given `services` (and more) written as YAML under it.
    fn with_services(services: &str) -> Result<Config, String> {
        let text = minimal().replace("port: 3000", &format!("port: 3000\n{services}"));
        Config::from_yaml(&text, Path::new(".")).map_err(|problems| format!("{problems:?}"))
    }

    #[test]
    fn services_and_jobs_are_read_with_their_defaults() {
        let config = with_services(
            "    env: {API_URL: \"http://api-{{ slug }}.{{ base_domain }}\", PORT: 5000}\n    services:\n      db:\n        image: previewd-postgres:15\n        ready: {command: [pg_isready]}\n        data: /var/lib/postgresql/data\n        seed_volume: shop-db-seed\n      cache: {image: previewd-redis:7, ready: {tcp: 6379}}\n    jobs:\n      - {name: migrate, command: [python3, migrate.py]}\n      - {name: fixtures, command: [load], when: first_deploy, timeout: 9}\n",
        )
        .unwrap();
        let demo = &config.images[&ImageKey::parse("demo").unwrap()];
        let db = &demo.services[&ServiceName::parse("db").unwrap()];
        assert_eq!(db.ready, Some(ReadyCheck::Command(vec!["pg_isready".to_owned()])));
        assert_eq!((db.ready_timeout, db.memory), (Duration::from_secs(60), DEFAULT_MEMORY));
        assert_eq!(db.seed_volume.as_ref().map(AsRef::as_ref), Some("shop-db-seed"));
        let cache = &demo.services[&ServiceName::parse("cache").unwrap()];
        assert_eq!((cache.ready.clone(), cache.data.clone()), (Some(ReadyCheck::Tcp(6379)), None));
        assert_eq!(demo.jobs.len(), 2);
        assert_eq!((demo.jobs[0].when, demo.jobs[0].timeout), (JobWhen::EveryDeploy, Duration::from_secs(300)));
        assert_eq!((demo.jobs[1].when, demo.jobs[1].timeout), (JobWhen::FirstDeploy, Duration::from_secs(9)));
    }

    #[test]
    fn a_service_name_that_is_not_a_dns_label_is_refused() {
        let err = with_services("    services:\n      My_DB: {image: x}\n").unwrap_err();
        assert!(err.contains("is not a DNS label"), "{err}");
    }

    #[test]
    fn an_unknown_key_of_a_service_or_job_is_refused() {
        let err = with_services("    services:\n      db: {image: x, volume: /data}\n").unwrap_err();
        assert!(err.contains("unknown field `volume`"), "{err}");
        let err = with_services("    jobs:\n      - {name: migrate, command: [x], every: true}\n").unwrap_err();
        assert!(err.contains("unknown field `every`"), "{err}");
    }

    #[test]
    fn bad_service_and_job_settings_are_each_named() {
        let err = with_services(
            "    services:\n      db: {image: x, seed_volume: seed, ready: {tcp: 1, command: [y]}, data: relative}\n    jobs:\n      - {name: m, command: []}\n      - {name: m, command: [x], timeout: 0}\n",
        )
        .unwrap_err();
        for expected in [
            "images.demo.services.db.ready: must be either",
            "images.demo.services.db.data: must be an absolute path",
            "images.demo.jobs[0].command: must not be empty",
            "images.demo.jobs[1].name: \\\"m\\\" names two jobs",
            "images.demo.jobs[1].timeout: must be at least 1",
        ] {
            assert!(err.contains(expected), "{expected} not in {err}");
        }
        let err = with_services("    services:\n      db: {image: x, seed_volume: seed}\n").unwrap_err();
        assert!(err.contains("seed_volume: needs `data`"), "{err}");
    }

    #[test]
    fn services_need_the_previews_own_network() {
        let text = minimal().replace("port: 3000", "port: 3000\n    services: {db: {image: x}}")
            + "network: {isolation: false}\n";
        let err = format!("{:?}", Config::from_yaml(&text, Path::new(".")).unwrap_err());
        assert!(err.contains("images.demo.services: services run on the preview's own network"), "{err}");
    }

    #[test]
    fn a_swarm_runtime_takes_its_constraints() {
        let text = minimal()
            + "runtime: {kind: swarm, constraints: [\"node.labels.previews == true\"], upstream: node_addr}\n";
        let config = Config::from_yaml(&text, Path::new(".")).unwrap();
        let RuntimeConfig::Swarm { constraints, .. } = config.runtime else {
            panic!("not a swarm: {:?}", config.runtime)
        };
        assert_eq!(constraints.iter().map(ToString::to_string).collect::<Vec<_>>(), ["node.labels.previews == true"]);
        assert_eq!(Config::from_yaml(&minimal(), Path::new(".")).unwrap().runtime, RuntimeConfig::Docker);
    }

    #[test]
    fn a_swarm_runtime_takes_a_holder_with_or_without_its_command() {
        for (holder, command) in [
            ("{image: busybox:1.36, command: [sleep, \"2147483647\"]}", Some(vec!["sleep", "2147483647"])),
            ("{image: busybox:1.36}", None),
        ] {
            let text = minimal() + &format!("runtime: {{kind: swarm, holder: {holder}}}\n");
            let config = Config::from_yaml(&text, Path::new(".")).unwrap();
            let RuntimeConfig::Swarm { holder: Some(holder), .. } = config.runtime else {
                panic!("no holder: {:?}", config.runtime)
            };
            assert_eq!(holder.image, "busybox:1.36");
            assert_eq!(holder.command, command.map(|argv| argv.into_iter().map(str::to_owned).collect()));
        }
    }

    #[test]
    fn a_runtime_that_cannot_work_is_refused_with_what_to_write() {
        for (runtime, expected) in [
            ("{kind: kubernetes}", "runtime.kind: `kubernetes` is not a runtime; use docker (the default) or swarm"),
            (
                "{constraints: [\"node.role == worker\"]}",
                "runtime.constraints: placement constraints need runtime.kind: swarm",
            ),
            ("{kind: swarm, constraints: [\"node.role = worker\"]}", "write `node.<attribute> == <value>` or `!=`"),
            ("{kind: swarm, upstream: vip}", "runtime.upstream: `vip` is not supported; use node_addr"),
            ("{holder: {image: busybox}}", "runtime.holder: holders keep Swarm overlay networks set up; they need"),
            ("{kind: swarm, holder: {image: \"\"}}", "runtime.holder.image: must be a Docker image reference"),
            ("{kind: swarm, holder: {image: busybox, command: []}}", "runtime.holder.command: must not be empty"),
            ("{kind: swarm, holder: {command: [sleep]}}", "missing field `image`"),
        ] {
            let text = minimal() + &format!("runtime: {runtime}\n");
            let err = format!("{:?}", Config::from_yaml(&text, Path::new(".")).unwrap_err());
            assert!(err.contains(expected), "{runtime}: {err}");
        }
    }

    #[test]
    fn what_does_not_run_on_a_swarm_yet_is_refused_there() {
        let params = minimal().replace("port: 3000", "port: 3000\n    container_create_params: {Tty: true}");
        for (text, expected) in [
            (params, "images.demo.container_create_params: these are Docker container fields"),
            (
                minimal() + "network: {egress: false}\n",
                "network.egress: false is enforced by previewd's iptables rules",
            ),
        ] {
            let text = text + "runtime: {kind: swarm}\n";
            let err = format!("{:?}", Config::from_yaml(&text, Path::new(".")).unwrap_err());
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn an_env_template_that_does_not_render_is_named_with_its_key() {
        let err = with_services("    env: {API: \"{{ nope }}\"}\n").unwrap_err();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn the_http_section_is_read_and_checked() {
        let config = Config::from_yaml(&minimal(), Path::new(".")).unwrap();
        assert_eq!(config.http, HttpSettings::default());
        let text = format!("{}http:\n  header_timeout: 2\n  max_connections: 8\n", minimal());
        let config = Config::from_yaml(&text, Path::new(".")).unwrap();
        assert_eq!((config.http.header_timeout, config.http.max_connections), (Duration::from_secs(2), 8));
        assert_eq!(config.http.body_timeout, Duration::from_secs(30));
        let zero = Config::from_yaml(&format!("{}http:\n  body_timeout: 0\n", minimal()), Path::new("."));
        assert!(format!("{:?}", zero.unwrap_err()).contains("http.body_timeout: must be at least 1"));
        let unknown = Config::from_yaml(&format!("{}http:\n  idle_timeout: 5\n", minimal()), Path::new("."));
        assert!(format!("{:?}", unknown.unwrap_err()).contains("idle_timeout"));
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../config.yml");
        let config = Config::from_yaml(text, Path::new(".")).unwrap();
        assert_eq!(config.base_domain.as_ref(), "preview.localhost");
        assert!(config.nginx.managed);
    }

    #[test]
    fn nginx_commands_must_name_a_program() {
        let text = format!("{}nginx:\n  test_command: []\n  reload_command: ['']\n", minimal());
        let problems = Config::from_yaml(&text, Path::new(".")).unwrap_err();
        let all = format!("{problems:?}");
        assert!(all.contains("nginx.test_command") && all.contains("nginx.reload_command"), "{all}");
        let text = format!("{}nginx:\n  reload_command: [systemctl, reload, nginx]\n", minimal());
        let config = Config::from_yaml(&text, Path::new(".")).unwrap();
        assert_eq!(
            config.nginx.reload_command.as_deref(),
            Some(&["systemctl".to_owned(), "reload".to_owned(), "nginx".to_owned()][..])
        );
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_column() {
        let text = minimal().replace("base_domain:", "colour: blue\nbase_domain:");
        let problems = Config::from_yaml(&text, Path::new(".")).unwrap_err();
        assert_eq!(problems[0].position, Some((1, 1)));
        assert!(problems[0].message.contains("unknown field `colour`"), "{problems:?}");
    }

    #[test]
    fn every_broken_section_is_reported_not_only_the_first() {
        let text = minimal()
            .replace("port: 3000", "port: 99999")
            .replace("base_domain: preview.localhost", "base_domain: \"bad domain\"\nlisten: nowhere");
        let problems = Config::from_yaml(&text, Path::new(".")).unwrap_err();
        let all = format!("{problems:?}");
        assert!(all.contains("base_domain"), "{all}");
        assert!(all.contains("listen"), "{all}");
        assert!(all.contains("images.demo.port"), "{all}");
        assert_eq!(problems.len(), 3, "{all}");
        assert_eq!(problems[0].position, Some((1, 14)), "the first error points at its value: {all}");
    }

    #[test]
    fn cross_field_problems_are_all_listed() {
        let text = minimal()
            .replace(
                "port: 3000",
                "port: 3000\n    memory: lots\n    health_path: nope\n    container_create_params: {Ttyy: true}",
            )
            .replace(HASH, "testuser:testpassword");
        let problems = Config::from_yaml(&text, Path::new(".")).unwrap_err();
        let all = format!("{problems:?}");
        for needle in ["images.demo.memory", "images.demo.health_path", "Ttyy", "users[0].password_hash"] {
            assert!(all.contains(needle), "missing {needle} in {all}");
        }
    }

    #[test]
    fn a_parse_error_does_not_hide_the_other_sections_rules() {
        let text = minimal()
            .replace("base_domain: preview.localhost", "base_domain: \"bad domain\"")
            .replace("port: 3000", "port: 3000\n    memory: lots\n  broken:\n    image: x\n    port: nope")
            .replace(HASH, "plain-text");
        let problems = Config::from_yaml(&text, Path::new(".")).unwrap_err();
        let all: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(problems[0].position.is_some(), "{all:?}");
        assert!(all[0].starts_with("base_domain: \"bad domain\""), "{all:?}");
        for needle in ["images.broken.port", "images.demo.memory", "users[0].password_hash"] {
            assert!(all.iter().any(|m| m.starts_with(needle)), "missing {needle} in {all:?}");
        }
        assert!(
            !all.iter().any(|m| m.starts_with("base_domain: missing")),
            "a broken key is not also 'missing': {all:?}"
        );
        assert_eq!(all.len(), 4, "{all:?}");
    }

    #[test]
    fn missing_required_keys_say_what_to_add() {
        let problems = Config::from_yaml("instance: x\n", Path::new(".")).unwrap_err();
        let all = format!("{problems:?}");
        assert!(all.contains("base_domain: missing"), "{all}");
        assert!(all.contains("images: no image"), "{all}");
        assert!(all.contains("users: no user"), "{all}");
    }

    #[test]
    fn byte_sizes_use_docker_units() {
        assert_eq!(parse_byte_size(&ByteSize::Text("256m".into())), Ok(256 << 20));
        assert_eq!(parse_byte_size(&ByteSize::Text("1G".into())), Ok(1 << 30));
        assert_eq!(parse_byte_size(&ByteSize::Bytes(4096)), Ok(4096));
        assert!(parse_byte_size(&ByteSize::Text("-1m".into())).is_err());
        assert!(parse_byte_size(&ByteSize::Text("12q".into())).is_err());
    }

    #[test]
    fn public_url_needs_the_host_placeholder() {
        assert!(PublicUrl::parse("http://{host}:8080").is_ok());
        assert!(PublicUrl::parse("http://example.com").is_err());
        assert!(PublicUrl::parse("ftp://{host}").is_err());
    }
}
