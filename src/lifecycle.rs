//! The preview lifecycle: launch (or replace), reset, kill, list and reconcile, built on the
//! container runtime (`crate::runtime`) and the nginx router.
//!
//! Operations on one preview are serialized by a per-slug lock; different previews proceed in
//! parallel. Every step can be interrupted and repeated: a replacement container is started and
//! answering before the route switches, failed launches remove what they created, and
//! `reconcile` rebuilds the routes from the container labels alone.
//!
//! This file holds the shared parts (errors, what the API reports, progress) and the queries;
//! each operation has a file of its own: [`launch`] (launch and replace), [`reset`], [`removal`]
//! (kill) and [`reconcile`] (start-up reconcile and the refresh after Docker's events), and
//! [`environment`] holds what they share about a preview's services and jobs.

mod deploys;
mod environment;
mod expiry;
mod launch;
mod pins;
mod quiet;
mod reconcile;
mod removal;
mod reset;
mod sleep;
mod store;
mod sweep;

pub use deploys::{Deploys, PreviewPage, Removal};
pub use expiry::{Expired, LifecycleEvent};
pub use pins::{Pin, PinnedBy};
pub use sleep::{Asleep, SleepReason, Sleepers, WakeState};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::{Admission, LimitError};
use crate::build::{BuildFailure, Builds};
use crate::config::Config;
use crate::locks::KeyedLocks;
use crate::metrics::{ByStep, Metrics};
use crate::network::{NetworkError, Networks};
use crate::nginx::{NginxError, Router};
use crate::preview::{ImageKey, PreviewState, Role, ServiceName, Slug};
use crate::probe::Prober;
use crate::request::{Owner, PullRequestOrigin};
use crate::runtime::{DockerError, ManagedContainer, Runtime};
use crate::traffic::Traffic;
use serde::Serialize;
use tokio::sync::mpsc;

/// How many lines of a failed container's log (an app's, a service's, a job's) go into the error.
const LOG_LINES_ON_FAILURE: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Nginx(#[from] NginxError),
    #[error("the container stopped during start-up (exit code {}); it was removed. Last log lines:\n{logs}", exit_code.map_or("unknown".to_owned(), |c| c.to_string()))]
    Crashed { exit_code: Option<i64>, logs: String },
    #[error(
        "the app did not answer HTTP on container port {port} at {path} within {timeout:?}; the container was removed. Last log lines:\n{logs}"
    )]
    Unhealthy { port: u16, path: String, timeout: Duration, logs: String },
    #[error("no preview named \"{0}\" is running; GET /api/previews lists them")]
    NotFound(Slug),
    #[error("the name \"{name}\" is taken by {owner}; use another name (a pull request's preview follows its pushes)")]
    NameTaken { name: Slug, owner: String },
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("service {service} stopped during start-up (exit code {}). Last log lines:\n{logs}", exit_code.map_or("unknown".to_owned(), |c| c.to_string()))]
    ServiceFailed { service: ServiceName, exit_code: Option<i64>, logs: String },
    #[error(
        "service {service} was not ready within {timeout:?} (its `ready` check never passed). Last log lines:\n{logs}"
    )]
    ServiceNotReady { service: ServiceName, timeout: Duration, logs: String },
    #[error("job {job} failed with exit code {exit_code}. Last log lines:\n{logs}")]
    JobFailed { job: ServiceName, exit_code: i64, logs: String },
    #[error("job {job} did not end within {timeout:?} (its `timeout`); it was stopped. Last log lines:\n{logs}")]
    JobTimedOut { job: ServiceName, timeout: Duration, logs: String },
    #[error(
        "the seed volume {volume} of service {service} does not exist; create it (docker volume create {volume}, then fill it) or remove seed_volume"
    )]
    SeedMissing { service: ServiceName, volume: String },
    #[error("env {key}: the template does not render: {message}")]
    EnvTemplate { key: String, message: String },
    #[error("image {0} has services, which need the preview's own network; set network.isolation: true")]
    NoNetworkForServices(ImageKey),
    #[error("preview {name} has no service named {service}; GET /api/previews/{name} lists its services")]
    NoSuchService { name: Slug, service: ServiceName },
    #[error("the image {0} of this preview is no longer in config.yml; launch it again with an image that is")]
    ImageGone(ImageKey),
    #[error(transparent)]
    Build(#[from] BuildFailure),
    #[error("cannot keep previewd's state: {0}")]
    State(String),
    #[error("{0}")]
    NoRoom(String),
}

impl LifecycleError {
    /// The error without the container's log lines, for places others can read (a PR comment):
    /// an app may print secrets.
    pub fn summary(&self) -> String {
        match self {
            Self::Crashed { exit_code, .. } => format!(
                "the container stopped during start-up (exit code {}); previewd's log has its last lines",
                exit_code.map_or("unknown".to_owned(), |c| c.to_string())
            ),
            Self::Unhealthy { path, timeout, .. } => {
                format!("the app did not answer HTTP at {path} within {timeout:?}; previewd's log has its last lines")
            }
            Self::ServiceFailed { service, exit_code, .. } => format!(
                "service {service} stopped during start-up (exit code {}); previewd's log has its last lines",
                exit_code.map_or("unknown".to_owned(), |c| c.to_string())
            ),
            Self::ServiceNotReady { service, timeout, .. } => {
                format!("service {service} was not ready within {timeout:?}; previewd's log has its last lines")
            }
            Self::JobFailed { job, exit_code, .. } => {
                format!("job {job} failed with exit code {exit_code}; previewd's log has its last lines")
            }
            Self::JobTimedOut { job, timeout, .. } => {
                format!("job {job} did not end within {timeout:?}; previewd's log has its last lines")
            }
            // A step's output may hold what a public pull request must not show.
            Self::Build(BuildFailure::Step { step, .. }) => {
                format!("the build failed at {step}; the build log has its output")
            }
            other => other.to_string(),
        }
    }
}

/// What the API reports about a preview.
#[derive(Debug, Clone, Serialize)]
pub struct PreviewInfo {
    pub name: Slug,
    pub url: String,
    pub image: ImageKey,
    pub container_id: String,
    /// The state of the preview's container: running, restarting, exited, ...
    pub status: PreviewState,
    /// Whether nginx routes the preview's host.
    pub routed: bool,
    /// Unix seconds.
    pub created: i64,
    /// `owner/name`, number and commit of the pull request, for previews of one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// Who launched it by hand: `user:<name>` or `github:<login>`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "owner_label")]
    pub owner: Option<Owner>,
    /// The preview's services (`images.<key>.services`), by name.
    pub services: Vec<ServiceInfo>,
    /// Unix seconds of the last request nginx served it (or of its launch or wake).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_request: Option<i64>,
    /// Who pinned it awake (`user:<name>`, `github:<login>`, `label <name>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Unix seconds when `lifecycle.remove_after` removes it if nobody uses it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
}

/// Events kept for a follower that lags; past this, it misses some (and says so).
const EVENTS_BUFFERED: usize = 256;

/// A service of a preview, as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    pub name: ServiceName,
    pub status: PreviewState,
}

fn owner_label<S: serde::Serializer>(owner: &Option<Owner>, serializer: S) -> Result<S::Ok, S::Error> {
    match owner {
        Some(owner) => serializer.collect_str(owner),
        None => serializer.serialize_none(),
    }
}

/// What a reconcile found and did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReconcileReport {
    pub routed: usize,
    pub removed_containers: usize,
    pub removed_vhosts: usize,
    /// Previews that run but could not be routed, with the reason.
    pub failed: Vec<String>,
}

#[derive(Clone)]
pub struct Lifecycle {
    config: Arc<Config>,
    runtime: Arc<dyn Runtime>,
    router: Router,
    prober: Prober,
    locks: Arc<KeyedLocks<Slug>>,
    metrics: Arc<Metrics>,
    admission: Admission,
    networks: Networks,
    builds: Builds,
    /// Requests through nginx, when previewd follows them (see `crate::traffic`).
    traffic: Option<Traffic>,
    sleepers: Arc<Sleepers>,
    pins: Arc<store::SlugFile<Pin>>,
    expired: Arc<store::SlugFile<Expired>>,
    /// When each preview last served a request, as last saved (see `sweep`).
    last_requests: Arc<store::SlugFile<i64>>,
    events: tokio::sync::broadcast::Sender<LifecycleEvent>,
    deploys: Arc<Deploys>,
}

/// A launch step as it begins: `image`, `pull`, `create`, `start`, `health`, `route`, and
/// `retire` for a replacement.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressEvent {
    pub step: &'static str,
    pub message: String,
    /// Since the launch began.
    pub elapsed_ms: u64,
}

/// Reports launch steps to a listener, and their durations to the metrics.
struct Progress {
    events: Option<mpsc::UnboundedSender<ProgressEvent>>,
    /// Where the status page of the preview being deployed reads its step.
    shown: Option<(Arc<Deploys>, Slug)>,
    metrics: Arc<Metrics>,
    started: Instant,
    current: Option<(&'static str, Instant)>,
}

impl Progress {
    fn new(events: Option<mpsc::UnboundedSender<ProgressEvent>>, metrics: Arc<Metrics>) -> Self {
        Self { events, shown: None, metrics, started: Instant::now(), current: None }
    }

    /// The steps show on the preview's status page too.
    fn shown_for(mut self, deploys: &Arc<Deploys>, slug: &Slug) -> Self {
        self.shown = Some((Arc::clone(deploys), slug.clone()));
        self
    }

    fn step(&mut self, step: &'static str, message: String) {
        self.finish();
        self.current = Some((step, Instant::now()));
        if let Some((deploys, slug)) = &self.shown {
            deploys.step(slug, step, &message);
        }
        if let Some(events) = &self.events {
            let elapsed_ms = self.started.elapsed().as_millis() as u64;
            events.send(ProgressEvent { step, message, elapsed_ms }).ok();
        }
    }

    /// Ends the current step.
    fn finish(&mut self) {
        if let Some((step, began)) = self.current.take() {
            self.metrics.launch_step_seconds.get_or_create(&ByStep { step }).observe(began.elapsed().as_secs_f64());
        }
    }
}

impl Lifecycle {
    pub fn new(
        config: Arc<Config>,
        runtime: Arc<dyn Runtime>,
        router: Router,
        metrics: Arc<Metrics>,
        traffic: Option<Traffic>,
    ) -> Self {
        let admission = Admission::new(config.limits);
        let config_state_dir = config.state_dir.clone();
        let networks = Networks::new(
            Arc::clone(&runtime),
            config.instance.clone(),
            config.network,
            !config.runtime.is_swarm(),
            &metrics,
        );
        let builds = Builds::new(
            config.builds.clone(),
            config.instance.clone(),
            &config.state_dir,
            Arc::clone(&runtime),
            networks.clone(),
            Arc::clone(&metrics),
        );
        let last_requests = store::SlugFile::<i64>::load(&config_state_dir, "last-requests.json");
        if let Some(traffic) = &traffic {
            traffic.restore(last_requests.all().into_iter().map(|(slug, at)| (slug, crate::clock::system_time(at))));
        }
        let lifecycle = Self {
            config,
            runtime,
            router,
            prober: Prober::new(),
            locks: Arc::default(),
            metrics,
            admission,
            networks,
            builds,
            traffic,
            sleepers: Arc::new(Sleepers::load(&config_state_dir)),
            pins: Arc::new(store::SlugFile::load(&config_state_dir, "pinned.json")),
            expired: Arc::new(store::SlugFile::load(&config_state_dir, "expired.json")),
            last_requests: Arc::new(last_requests),
            events: tokio::sync::broadcast::channel(EVENTS_BUFFERED).0,
            deploys: Arc::new(Deploys::load(&config_state_dir)),
        };
        lifecycle.count_pins();
        lifecycle
    }

    pub fn builds(&self) -> &Builds {
        &self.builds
    }

    pub fn networks(&self) -> &Networks {
        &self.networks
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn runtime(&self) -> &dyn Runtime {
        self.runtime.as_ref()
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Whether the preview runs, routed, the given commit of its pull request.
    pub async fn runs_commit(&self, slug: &Slug, sha: &str) -> bool {
        let _guard = self.locks.lock(slug).await;
        match self.get(slug).await {
            // A sleeping preview runs its commit too: a sync must not wake (redeploy) it.
            Ok(info) => {
                info.routed
                    && matches!(info.status, PreviewState::Running | PreviewState::Asleep)
                    && info.sha.as_deref() == Some(sha)
            }
            Err(_) => false,
        }
    }

    /// The log of a preview's newest app container, or of one of its services; see
    /// [`Runtime::log_stream`].
    pub async fn logs(
        &self,
        slug: &Slug,
        service: Option<&ServiceName>,
        tail: usize,
        follow: bool,
    ) -> Result<impl futures_util::Stream<Item = Result<axum::body::Bytes, DockerError>> + use<>, LifecycleError> {
        let preview = self.get(slug).await?;
        let id = match service {
            None => preview.container_id,
            Some(name) => {
                let members = self.runtime.list_slug_all(slug).await?;
                let role = Role::Service(name.clone());
                let newest = members.into_iter().rev().find(|c| c.role == role);
                newest.ok_or_else(|| LifecycleError::NoSuchService { name: slug.clone(), service: name.clone() })?.id
            }
        };
        Ok(self.runtime.log_stream(&id, tail, follow))
    }

    /// Every preview of this instance, from the container labels.
    pub async fn list(&self) -> Result<Vec<PreviewInfo>, LifecycleError> {
        let mut members = self.runtime.list_all().await?;
        let parts = members.extract_if(.., |c| c.role != Role::App).collect::<Vec<_>>();
        let mut services = services_per_slug(parts);
        let newest = newest_per_slug(members);
        Ok(newest
            .into_values()
            .map(|c| {
                let services = services.remove(&c.slug).unwrap_or_default();
                self.info(c, services)
            })
            .collect())
    }

    pub async fn get(&self, slug: &Slug) -> Result<PreviewInfo, LifecycleError> {
        let mut members = self.runtime.list_slug_all(slug).await?;
        let parts = members.extract_if(.., |c| c.role != Role::App).collect::<Vec<_>>();
        let newest = members.into_iter().last().ok_or_else(|| LifecycleError::NotFound(slug.clone()))?;
        let services = services_per_slug(parts).remove(slug).unwrap_or_default();
        Ok(self.info(newest, services))
    }

    fn health_path(&self, image: &ImageKey) -> String {
        self.config.images.get(image).map_or_else(|| "/".to_owned(), |spec| spec.health_path.clone())
    }

    fn url_for(&self, slug: &Slug) -> String {
        self.config.public_url.for_host(&self.config.base_domain.host_for(slug))
    }

    fn is_routed(&self, slug: &Slug) -> bool {
        self.router.sites().read(slug).ok().flatten().is_some()
    }

    fn info(&self, container: ManagedContainer, services: Vec<ServiceInfo>) -> PreviewInfo {
        let (repo, pr, sha) = split_origin(container.origin);
        PreviewInfo {
            url: self.url_for(&container.slug),
            routed: self.is_routed(&container.slug),
            status: if self.sleepers.is_asleep(&container.slug) { PreviewState::Asleep } else { container.state },
            last_request: self.last_request(&container.slug).map(crate::clock::unix_seconds),
            pinned: self.pinned(&container.slug).map(|pin| pin.by.to_string()),
            expires: self.expires(&container.slug, container.created),
            name: container.slug,
            image: container.image,
            container_id: container.id,
            created: container.created,
            repo,
            pr,
            sha,
            owner: container.owner,
            services,
        }
    }
}

/// The newest container of each service of each preview, by name.
fn services_per_slug(parts: Vec<ManagedContainer>) -> BTreeMap<Slug, Vec<ServiceInfo>> {
    let mut newest: BTreeMap<(Slug, ServiceName), ManagedContainer> = BTreeMap::new();
    for part in parts {
        if let Role::Service(name) = &part.role {
            // Oldest first, so the last one wins.
            newest.insert((part.slug.clone(), name.clone()), part);
        }
    }
    let mut services: BTreeMap<Slug, Vec<ServiceInfo>> = BTreeMap::new();
    for ((slug, name), container) in newest {
        services.entry(slug).or_default().push(ServiceInfo { name, status: container.state });
    }
    services
}

fn same_pull_request(container: Option<&PullRequestOrigin>, origin: &PullRequestOrigin) -> bool {
    container.is_some_and(|c| c.repo.eq_ignore_ascii_case(&origin.repo) && c.number == origin.number)
}

fn describe_owner(origin: Option<&PullRequestOrigin>) -> String {
    match origin {
        Some(origin) => format!("pull request #{} of {}", origin.number, origin.repo),
        None => "a preview launched through the API".to_owned(),
    }
}

fn split_origin(origin: Option<PullRequestOrigin>) -> (Option<String>, Option<u64>, Option<String>) {
    match origin {
        Some(origin) => (Some(origin.repo), Some(origin.number), Some(origin.sha)),
        None => (None, None, None),
    }
}

fn newest_per_slug(containers: Vec<ManagedContainer>) -> BTreeMap<Slug, ManagedContainer> {
    // Containers come oldest first, so the last one of a slug wins.
    containers.into_iter().map(|c| (c.slug.clone(), c)).collect()
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_of_a_failed_service_or_job_names_it_without_its_log() {
        let job = ServiceName::parse("migrate").unwrap();
        let failed = LifecycleError::JobFailed { job, exit_code: 3, logs: "password=hunter2".to_owned() };
        assert!(failed.to_string().contains("password=hunter2"), "the API caller sees the log lines");
        let summary = failed.summary();
        assert!(summary.contains("job migrate failed with exit code 3") && !summary.contains("hunter2"), "{summary}");
        let service = ServiceName::parse("db").unwrap();
        let timeout = Duration::from_secs(60);
        let slow = LifecycleError::ServiceNotReady { service, timeout, logs: "secret".to_owned() };
        assert!(slow.summary().contains("service db was not ready within 60s") && !slow.summary().contains("secret"));
    }
}
