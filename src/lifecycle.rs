//! The preview lifecycle: launch (or replace), kill, list and reconcile, built on the Docker
//! runtime and the nginx router.
//!
//! Operations on one preview are serialized by a per-slug lock; different previews proceed in
//! parallel. Every step can be interrupted and repeated: a replacement container is started and
//! answering before the route switches, failed launches remove what they created, and
//! `reconcile` rebuilds the routes from the container labels alone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::{Admission, AdmitError, LimitError};
use crate::config::{Config, ImageSpec};
use crate::docker::{ContainerPlan, CreatedContainer, DockerError, ManagedContainer, Runtime};
use crate::locks::KeyedLocks;
use crate::metrics::{self, ByStep, Metrics};
use crate::network::{NetworkError, Networks};
use crate::nginx::{Drain, NginxError, RouteTicket, Router};
use crate::preview::{ImageKey, PreviewState, Slug};
use crate::probe::Prober;
use crate::request::{LaunchRequest, Owner, PullRequestOrigin};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

/// How many lines of a failed container's log go into the error.
const LOG_LINES_ON_FAILURE: usize = 20;
const FIRST_HEALTH_POLL: Duration = Duration::from_millis(10);
const HEALTH_POLL: Duration = Duration::from_millis(50);
/// How long a replace waits for requests in flight under the old route before removing the old
/// container (a WebSocket may stay open far longer; it is cut then).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How many previews a reconcile settles at once.
const RECONCILE_PARALLELISM: usize = 16;
/// How many ports a launch tries when the one chosen is taken before Docker binds it.
const PORT_ATTEMPTS: u32 = 3;

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
}

fn owner_label<S: serde::Serializer>(owner: &Option<Owner>, serializer: S) -> Result<S::Ok, S::Error> {
    match owner {
        Some(owner) => serializer.collect_str(owner),
        None => serializer.serialize_none(),
    }
}

/// What settling one preview left: the port to route, and how many containers went.
struct Settled {
    port: Option<u16>,
    removed: usize,
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
    runtime: Runtime,
    router: Router,
    prober: Prober,
    locks: Arc<KeyedLocks<Slug>>,
    metrics: Arc<Metrics>,
    admission: Admission,
    networks: Networks,
}

/// The network a launch puts its container on.
struct PreviewNetwork {
    name: String,
    /// Taken for this launch: removed again if the launch fails.
    new: bool,
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
    metrics: Arc<Metrics>,
    started: Instant,
    current: Option<(&'static str, Instant)>,
}

impl Progress {
    fn new(events: Option<mpsc::UnboundedSender<ProgressEvent>>, metrics: Arc<Metrics>) -> Self {
        Self { events, metrics, started: Instant::now(), current: None }
    }

    fn step(&mut self, step: &'static str, message: String) {
        self.finish();
        self.current = Some((step, Instant::now()));
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
    pub fn new(config: Arc<Config>, runtime: Runtime, router: Router, metrics: Arc<Metrics>) -> Self {
        let admission = Admission::new(config.limits);
        let networks = Networks::new(runtime.clone(), config.instance.clone(), config.network, &metrics);
        Self { config, runtime, router, prober: Prober::new(), locks: Arc::default(), metrics, admission, networks }
    }

    pub fn networks(&self) -> &Networks {
        &self.networks
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Starts a preview, or replaces the one of the same name with no downtime: the new
    /// container answers before the route switches, and only then is the old one removed.
    pub async fn launch(&self, request: LaunchRequest) -> Result<PreviewInfo, LifecycleError> {
        self.launch_reporting(request, None).await
    }

    /// `launch`, sending an event as each step begins (the API streams them to clients).
    #[tracing::instrument(skip_all, fields(slug = %request.name, image = %request.image))]
    pub async fn launch_reporting(
        &self,
        request: LaunchRequest,
        events: Option<mpsc::UnboundedSender<ProgressEvent>>,
    ) -> Result<PreviewInfo, LifecycleError> {
        let _guard = self.locks.lock(&request.name).await;
        let mut progress = Progress::new(events, Arc::clone(&self.metrics));
        let (previous, place) = self.admit(&request).await?;
        let _turn = self.take_turn(&mut progress).await;
        let result = self.launch_locked(request, &previous, &mut progress).await;
        place.release().await;
        progress.finish();
        let outcome = if result.is_ok() { &metrics::SUCCESS } else { &metrics::FAILURE };
        let counter = if previous.is_empty() { &self.metrics.launches } else { &self.metrics.redeploys };
        counter.get_or_create(outcome).inc();
        if result.is_ok() {
            self.metrics.launch_seconds.observe(progress.started.elapsed().as_secs_f64());
        }
        result
    }

    /// The preview's containers so far, and its place under `limits` (see [`Admission`]).
    async fn admit(
        &self,
        request: &LaunchRequest,
    ) -> Result<(Vec<ManagedContainer>, crate::admission::Place), LifecycleError> {
        let list = async {
            let containers = self.runtime.list().await?;
            let owners = containers.iter().map(|c| (c.slug.clone(), c.owner.clone())).collect();
            let previous = containers.into_iter().filter(|c| c.slug == request.name).collect::<Vec<_>>();
            Ok::<_, DockerError>((previous, owners))
        };
        match self.admission.admit(&request.name, request.owner.as_ref(), list).await {
            Ok(admitted) => Ok(admitted),
            Err(AdmitError::List(err)) => Err(err.into()),
            Err(AdmitError::Limit(err)) => {
                tracing::info!(error = %err, "launch refused");
                Err(err.into())
            }
        }
    }

    /// Waits for one of the `limits.parallel_launches` turns, saying so when all are taken.
    async fn take_turn(&self, progress: &mut Progress) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Some(turn) = self.admission.try_turn() {
            return Some(turn);
        }
        let limit = self.admission.limits().parallel_launches;
        progress.step("queue", format!("waiting for a turn: {limit} launches are starting (limits.parallel_launches)"));
        self.admission.wait_turn().await
    }

    async fn launch_locked(
        &self,
        request: LaunchRequest,
        previous: &[ManagedContainer],
        progress: &mut Progress,
    ) -> Result<PreviewInfo, LifecycleError> {
        let spec = &request.spec;
        progress.step("image", format!("checking image {}", spec.image));
        // A pull request's preview belongs to it: a launch by hand would leave it orphaned when
        // the PR closes, and a PR may not take a name launched by hand either.
        let foreign = |c: &&ManagedContainer| match (&request.origin, &c.origin) {
            (Some(origin), _) => !same_pull_request(c.origin.as_ref(), origin),
            (None, owner) => owner.is_some(),
        };
        if let Some(other) = previous.iter().find(foreign) {
            return Err(LifecycleError::NameTaken {
                name: request.name.clone(),
                owner: describe_owner(other.origin.as_ref()),
            });
        }
        if self.runtime.needs_pull(spec).await? {
            progress.step("pull", format!("pulling image {}", spec.image));
            self.runtime.pull(&spec.image).await?;
        }
        let url = self.url_for(&request.name);
        let env = container_env(&request, &url);
        // Announced before the network is taken: a launch that has to wait for a new network
        // (the warm pool ran dry in a burst) still shares the burst's reload.
        let ticket = self.router.ticket();
        let network = self.network_for(spec, previous).await?;
        let network_name = network.as_ref().map(|n| n.name.as_str());
        let brought_up =
            self.create_and_bring_up(&request, env, network_name, previous.is_empty(), ticket, progress).await;
        let (id, drain) = match (brought_up, network) {
            (Ok(up), _) => up,
            (Err(err), Some(PreviewNetwork { name, new: true })) => {
                self.networks.remove(&name).await;
                return Err(err);
            }
            (Err(err), _) => return Err(err),
        };
        if !previous.is_empty() {
            // Requests the old nginx workers accepted before the switch still go to the old
            // container: let them finish first.
            progress.step("retire", "removing the replaced container once its requests are done".to_owned());
            drain.wait(DRAIN_LIMIT).await;
        }
        for old in previous {
            if let Err(err) = self.runtime.remove(&old.id).await {
                tracing::warn!(error = %err, container = %short(&old.id), "cannot remove the replaced container; reconcile will");
            }
        }
        tracing::info!(elapsed_ms = progress.started.elapsed().as_millis() as u64, %url, "preview ready");
        let (repo, pr, sha) = split_origin(request.origin);
        let owner = request.owner;
        Ok(PreviewInfo {
            name: request.name,
            url,
            image: request.image,
            container_id: id,
            status: PreviewState::Running,
            routed: true,
            created: crate::clock::unix_now(),
            repo,
            pr,
            sha,
            owner,
        })
    }

    /// The network of the preview's containers: the one its running containers are on (a
    /// replacement joins them), else a new one; `None` with `network.isolation: false` or when
    /// the image's `container_create_params` choose a `NetworkMode` of their own.
    async fn network_for(
        &self,
        spec: &ImageSpec,
        previous: &[ManagedContainer],
    ) -> Result<Option<PreviewNetwork>, LifecycleError> {
        if !self.networks.enabled() || spec.network_mode().is_some() || spec.leaves_preview_network() {
            return Ok(None);
        }
        if let Some(name) = previous.iter().rev().find_map(|c| c.network.clone()) {
            if self.networks.exists(&name).await? {
                return Ok(Some(PreviewNetwork { name, new: false }));
            }
            tracing::warn!(
                network = name,
                "the preview's network was removed behind previewd's back; taking a new one"
            );
        }
        let name = self.networks.lease().await?;
        Ok(Some(PreviewNetwork { name, new: true }))
    }

    /// Creates the container and brings it up; again on another port when the one chosen was
    /// taken before Docker could bind it. Whatever fails is removed.
    async fn create_and_bring_up(
        &self,
        request: &LaunchRequest,
        env: Vec<String>,
        network: Option<&str>,
        fresh: bool,
        first_ticket: RouteTicket,
        progress: &mut Progress,
    ) -> Result<(String, Drain), LifecycleError> {
        let mut attempt = 1;
        let mut first_ticket = Some(first_ticket);
        loop {
            let ticket = first_ticket.take().unwrap_or_else(|| self.router.ticket());
            progress.step("create", "creating the container".to_owned());
            let plan = ContainerPlan {
                slug: &request.name,
                image_key: &request.image,
                spec: &request.spec,
                env: env.clone(),
                origin: request.origin.as_ref(),
                owner: request.owner.as_ref(),
                network,
            };
            let container = self.runtime.create(plan).await?;
            let result = if fresh {
                self.bring_up_fresh(&container, &request.spec, &request.name, ticket, progress).await
            } else {
                self.bring_up_replacement(&container, &request.spec, &request.name, ticket, progress).await
            };
            let err = match result {
                Ok(drain) => return Ok((container.id, drain)),
                Err(err) => err,
            };
            if let Err(cleanup) = self.runtime.remove(&container.id).await {
                tracing::error!(error = %cleanup, container = %short(&container.id), "cannot remove the failed container");
            }
            match err {
                LifecycleError::Docker(DockerError::PortInUse { port, .. }) if attempt < PORT_ATTEMPTS => {
                    tracing::warn!(port, "the port chosen for the container was taken meanwhile; trying another");
                    attempt += 1;
                }
                err => return Err(err),
            }
        }
    }

    /// A new preview, with nothing to keep serving: nginx is routed to the container's port
    /// while the container starts, so the reload costs no time of its own. The launch still
    /// answers only once both the app and nginx do; if the app never answers, the route goes.
    async fn bring_up_fresh(
        &self,
        container: &CreatedContainer,
        spec: &ImageSpec,
        slug: &Slug,
        ticket: RouteTicket,
        progress: &mut Progress,
    ) -> Result<Drain, LifecycleError> {
        let route = {
            let (slug, port) = (slug.clone(), container.host_port);
            tokio::spawn(async move { ticket.route(&slug, port).await })
        };
        let up = self.start_until_answering(container, spec, progress).await;
        progress.step("route", format!("routing {}", self.config.base_domain.host_for(slug)));
        let routed = route.await.unwrap_or(Err(NginxError::Stopped));
        match (up, routed) {
            (Ok(port), Ok(drain)) => match self.router.check_served(slug, port).await {
                Ok(()) => Ok(drain),
                Err(err) => {
                    self.unroute_failed(slug).await;
                    Err(err.into())
                }
            },
            (Ok(_), Err(err)) => Err(err.into()),
            (Err(err), Ok(_)) => {
                self.unroute_failed(slug).await;
                Err(err)
            }
            (Err(err), Err(_)) => Err(err),
        }
    }

    async fn unroute_failed(&self, slug: &Slug) {
        if let Err(unroute) = self.router.unroute(slug).await {
            tracing::error!(error = %unroute, "cannot remove the route of the failed launch; reconcile will");
        }
    }

    /// A replacement: the old container serves until the new one answers; only then does the
    /// route switch.
    async fn bring_up_replacement(
        &self,
        container: &CreatedContainer,
        spec: &ImageSpec,
        slug: &Slug,
        ticket: RouteTicket,
        progress: &mut Progress,
    ) -> Result<Drain, LifecycleError> {
        let port = self.start_until_answering(container, spec, progress).await?;
        progress.step("route", format!("routing {}", self.config.base_domain.host_for(slug)));
        let previous = self.router.current(slug)?;
        let drain = ticket.route(slug, port).await?;
        if let Err(err) = self.router.check_served(slug, port).await {
            // The old container still runs: give it its route back.
            if let Err(restore) = self.router.restore(slug, previous).await {
                tracing::error!(error = %restore, "cannot put the previous route back; reconcile will");
            }
            return Err(err.into());
        }
        Ok(drain)
    }

    /// Starts the container and waits until the app answers HTTP; returns its host port.
    async fn start_until_answering(
        &self,
        container: &CreatedContainer,
        spec: &ImageSpec,
        progress: &mut Progress,
    ) -> Result<u16, LifecycleError> {
        progress.step("start", "starting the container".to_owned());
        self.runtime.start(container).await?;
        tracing::info!(container = %short(&container.id), port = container.host_port, "container started");
        progress.step(
            "health",
            format!("waiting for the app to answer HTTP on port {} at {}", spec.port, spec.health_path),
        );
        self.wait_until_answering(container, spec).await?;
        self.runtime.keep_running(&container.id).await?;
        Ok(container.host_port)
    }

    /// Probes the app on the port previewd gave the container until it answers, asking Docker
    /// between tries whether it crashed. Tries come quickly at first (10 ms, doubling up to
    /// `HEALTH_POLL`): most apps answer within milliseconds of their start, and a fixed 50 ms
    /// pause after a first miss was launch latency.
    async fn wait_until_answering(&self, container: &CreatedContainer, spec: &ImageSpec) -> Result<(), LifecycleError> {
        let deadline = Instant::now() + spec.health_timeout;
        let mut pause = FIRST_HEALTH_POLL;
        loop {
            if self.prober.answers(container.host_port, &spec.health_path).await {
                return Ok(());
            }
            let status = self.runtime.status(&container.id).await?;
            if status.as_ref().is_none_or(|s| !s.running) {
                let logs = self.runtime.logs_tail(&container.id, LOG_LINES_ON_FAILURE).await;
                return Err(LifecycleError::Crashed { exit_code: status.and_then(|s| s.exit_code), logs });
            }
            if Instant::now() >= deadline {
                let logs = self.runtime.logs_tail(&container.id, LOG_LINES_ON_FAILURE).await;
                return Err(LifecycleError::Unhealthy {
                    port: spec.port,
                    path: spec.health_path.clone(),
                    timeout: spec.health_timeout,
                    logs,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(HEALTH_POLL);
        }
    }

    /// Removes the preview of a pull request, unless the name belongs to another preview (another
    /// pull request's, or one launched by hand). Returns whether something was removed.
    pub async fn kill_pull_request(&self, slug: &Slug, origin: &PullRequestOrigin) -> Result<bool, LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let containers = self.runtime.list_slug(slug).await?;
        if containers.iter().any(|c| !same_pull_request(c.origin.as_ref(), origin)) {
            tracing::warn!(%slug, "not removing a preview that belongs to someone else");
            return Ok(false);
        }
        match self.kill_locked(slug, containers).await {
            Err(LifecycleError::NotFound(_)) => Ok(false),
            other => other.map(|()| true),
        }
    }

    /// Removes a preview: first its containers, then its route. In that order a crash half-way
    /// leaves a vhost without a container, which the next reconcile deletes; the other order
    /// would leave a container that reconcile routes again.
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn kill(&self, slug: &Slug) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let containers = self.runtime.list_slug(slug).await?;
        self.kill_locked(slug, containers).await
    }

    async fn kill_locked(&self, slug: &Slug, containers: Vec<ManagedContainer>) -> Result<(), LifecycleError> {
        let result = self.remove_preview(slug, containers).await;
        let outcome = match &result {
            Ok(()) => Some(&metrics::SUCCESS),
            Err(LifecycleError::NotFound(_)) => None,
            Err(_) => Some(&metrics::FAILURE),
        };
        if let Some(outcome) = outcome {
            self.metrics.kills.get_or_create(outcome).inc();
        }
        result
    }

    async fn remove_preview(&self, slug: &Slug, containers: Vec<ManagedContainer>) -> Result<(), LifecycleError> {
        let routed = self.is_routed(slug);
        if containers.is_empty() && !routed {
            return Err(LifecycleError::NotFound(slug.clone()));
        }
        let networks: BTreeSet<String> = containers.iter().filter_map(|c| c.network.clone()).collect();
        for container in containers {
            self.runtime.remove(&container.id).await?;
        }
        for network in networks {
            self.networks.remove(&network).await;
        }
        if routed {
            self.router.unroute(slug).await?;
        }
        tracing::info!("preview removed");
        Ok(())
    }

    /// Settles one preview as a start-up reconcile would, under its lock: the route points at
    /// the port its live container has now (Docker gives a container it restarts a new host
    /// port, unless previewd chose it), a preview Docker could not restart is brought back on
    /// a new port, and containers that stopped for good (a launch cut off by an engine
    /// restart) are removed, with the route when nothing is left running. A preview whose
    /// containers are all gone (removed by hand) loses its route.
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn refresh(&self, slug: &Slug) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let containers = self.runtime.list_slug(slug).await?;
        let none_left = containers.is_empty();
        let networks: BTreeSet<String> = containers.iter().filter_map(|c| c.network.clone()).collect();
        let settled = self.settle_preview(slug, containers).await?;
        if settled.port.is_none() && settled.removed > 0 && self.runtime.list_slug(slug).await?.is_empty() {
            for network in &networks {
                self.networks.remove(network).await;
            }
        }
        match settled.port {
            Some(port) if self.router.route_if_changed(slug, port).await? => {
                tracing::info!(port, "preview re-routed to its container's new port");
            }
            None if (settled.removed > 0 || none_left) && self.is_routed(slug) => {
                tracing::info!("preview has no container left; removing its route");
                self.router.unroute(slug).await?;
            }
            Some(_) | None => {}
        }
        Ok(())
    }

    /// `refresh` for every preview that has a container.
    pub async fn refresh_all(&self) -> Result<(), LifecycleError> {
        let slugs: BTreeSet<Slug> = self.runtime.list().await?.into_iter().map(|c| c.slug).collect();
        for slug in slugs {
            self.refresh(&slug).await?;
        }
        Ok(())
    }

    /// Whether the preview runs, routed, the given commit of its pull request.
    pub async fn runs_commit(&self, slug: &Slug, sha: &str) -> bool {
        let _guard = self.locks.lock(slug).await;
        match self.get(slug).await {
            Ok(info) => info.routed && info.status == PreviewState::Running && info.sha.as_deref() == Some(sha),
            Err(_) => false,
        }
    }

    /// The log of a preview's newest container; see [`Runtime::log_stream`].
    pub async fn logs(
        &self,
        slug: &Slug,
        tail: usize,
        follow: bool,
    ) -> Result<impl futures_util::Stream<Item = Result<axum::body::Bytes, DockerError>> + use<>, LifecycleError> {
        let preview = self.get(slug).await?;
        Ok(self.runtime.log_stream(&preview.container_id, tail, follow))
    }

    /// Every preview of this instance, from the container labels.
    pub async fn list(&self) -> Result<Vec<PreviewInfo>, LifecycleError> {
        let containers = self.runtime.list().await?;
        Ok(newest_per_slug(containers).into_values().map(|c| self.info(c)).collect())
    }

    pub async fn get(&self, slug: &Slug) -> Result<PreviewInfo, LifecycleError> {
        let containers = self.runtime.list_slug(slug).await?;
        let newest = containers.into_iter().last().ok_or_else(|| LifecycleError::NotFound(slug.clone()))?;
        Ok(self.info(newest))
    }

    /// Makes nginx match the containers: the live container of every preview routed to its
    /// current port, every other vhost of this instance deleted, containers that never came up
    /// or were replaced removed, and one reload. A working preview is never removed: of several
    /// running containers of one preview (a replace cut short), the newest that answers HTTP is
    /// kept, and if none answers yet, all are kept and the newest is routed.
    #[tracing::instrument(skip_all)]
    pub async fn reconcile(&self) -> Result<ReconcileReport, LifecycleError> {
        let mut groups: BTreeMap<Slug, Vec<ManagedContainer>> = BTreeMap::new();
        for container in self.runtime.list().await? {
            groups.entry(container.slug.clone()).or_default().push(container);
        }
        let mut report = ReconcileReport::default();
        let mut routes = BTreeMap::new();
        // One Docker call or more per preview: at hundreds of previews, in sequence they made a
        // restart take seconds.
        let mut settling = futures_util::stream::iter(groups)
            .map(|(slug, group)| async move { self.settle_preview(&slug, group).await.map(|settled| (slug, settled)) })
            .buffer_unordered(RECONCILE_PARALLELISM);
        while let Some(result) = settling.next().await {
            let (slug, settled) = result?;
            report.removed_containers += settled.removed;
            routes.extend(settled.port.map(|port| (slug, port)));
        }
        let outcome = self.router.sync(&routes).await?;
        report.removed_vhosts = outcome.orphans;
        for (slug, err) in outcome.failures {
            tracing::error!(%slug, error = %err, "cannot route a running preview");
            routes.remove(&slug);
            report.failed.push(format!("{slug}: {err}"));
        }
        report.routed = routes.len();
        let in_use = self.runtime.list().await?.into_iter().filter_map(|c| c.network).collect();
        self.networks.reconcile(&in_use).await?;
        tracing::info!(
            routed = report.routed,
            removed_containers = report.removed_containers,
            removed_vhosts = report.removed_vhosts,
            failed = report.failed.len(),
            "reconciled"
        );
        Ok(report)
    }

    /// Keeps the live container of one preview (brought back on a new port if Docker could not
    /// restart it) and removes the others; the port to route, if any.
    async fn settle_preview(&self, slug: &Slug, group: Vec<ManagedContainer>) -> Result<Settled, LifecycleError> {
        let (live, doomed) = self.settle(group).await;
        let port = match &live {
            // previewd may have died between the first answer and this setting, or while it
            // removed the container, which Docker then finishes: a container gone meanwhile
            // leaves nothing to route.
            Some(live) => {
                let kept = self.runtime.ensure_kept_running(&live.id).await?;
                live.host_port.filter(|_| kept)
            }
            None => self.revive(slug, &doomed).await,
        };
        for container in &doomed {
            tracing::info!(%slug, container = %short(&container.id), state = %container.state, "removing a container that is not the live preview");
            self.runtime.remove(&container.id).await?;
        }
        Ok(Settled { port, removed: doomed.len() })
    }

    /// Brings back a preview that was up but whose container Docker could not start again
    /// (another program took its port while the engine was down): a copy on a new port. Its
    /// port once it answers; `None` when there is nothing to bring back or it does not answer.
    async fn revive(&self, slug: &Slug, stopped: &[ManagedContainer]) -> Option<u16> {
        // The newest container that had been up: a replacement cut off by the same outage may
        // be newer, but never came up. One whose image left config.yml stays gone.
        for container in stopped.iter().rev() {
            let Some(spec) = self.config.images.get(&container.image) else { continue };
            match self.runtime.recreate(&container.id).await {
                Ok(Some(copy)) => return self.start_copy(slug, copy, spec).await,
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%slug, error = %err, "cannot bring back a stopped preview");
                    return None;
                }
            }
        }
        None
    }

    async fn start_copy(&self, slug: &Slug, copy: CreatedContainer, spec: &ImageSpec) -> Option<u16> {
        tracing::warn!(%slug, port = copy.host_port, "Docker could not restart this preview; starting a copy on a new port");
        let mut progress = Progress::new(None, Arc::clone(&self.metrics));
        match self.start_until_answering(&copy, spec, &mut progress).await {
            Ok(port) => Some(port),
            Err(err) => {
                tracing::warn!(%slug, error = %err, "the copy of a stopped preview did not come up; removing the preview");
                if let Err(err) = self.runtime.remove(&copy.id).await {
                    tracing::error!(error = %err, container = %short(&copy.id), "cannot remove the failed copy");
                }
                None
            }
        }
    }

    /// Picks the live container of one preview (oldest first in `group`) and the ones to remove.
    async fn settle(&self, group: Vec<ManagedContainer>) -> (Option<ManagedContainer>, Vec<ManagedContainer>) {
        let (running, others): (Vec<_>, Vec<_>) = group.into_iter().partition(ManagedContainer::is_running);
        // Restarting or paused containers are left alone; created, exited or dead ones never
        // came up, or stopped for good.
        let mut doomed: Vec<_> = others.into_iter().filter(|c| !c.state.is_transient()).collect();
        if running.len() <= 1 {
            return (running.into_iter().next(), doomed);
        }
        let mut answering = None;
        for candidate in running.iter().rev() {
            let Some(port) = candidate.host_port else { continue };
            if self.prober.answers(port, &self.health_path(&candidate.image)).await {
                answering = Some(candidate.id.clone());
                break;
            }
        }
        let Some(live_id) = answering else {
            return (running.into_iter().last(), doomed);
        };
        let (live, replaced): (Vec<_>, Vec<_>) = running.into_iter().partition(|c| c.id == live_id);
        doomed.extend(replaced);
        (live.into_iter().next(), doomed)
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

    fn info(&self, container: ManagedContainer) -> PreviewInfo {
        let (repo, pr, sha) = split_origin(container.origin);
        PreviewInfo {
            url: self.url_for(&container.slug),
            routed: self.is_routed(&container.slug),
            name: container.slug,
            image: container.image,
            container_id: container.id,
            status: container.state,
            created: container.created,
            repo,
            pr,
            sha,
            owner: container.owner,
        }
    }
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

/// The environment of a preview container: the image's fixed `env`, overridden by the request's
/// fields, plus what previewd sets itself (Stager's `image_name`/`container_name` included).
fn container_env(request: &LaunchRequest, url: &str) -> Vec<String> {
    let mut env: BTreeMap<String, String> = request.spec.env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    env.extend(request.env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env.insert("image_name".into(), request.image.to_string());
    env.insert("container_name".into(), request.container_name.clone());
    env.insert("PREVIEW_NAME".into(), request.name.to_string());
    env.insert("PREVIEW_URL".into(), url.to_owned());
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
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
    fn request_fields_override_image_env_but_not_previewd_variables() {
        let hash = crate::auth::hash_password("x").unwrap();
        let yaml = format!(
            "base_domain: p.localhost\nimages:\n  demo: {{image: d, port: 3000, env: {{A: image, B: image}}}}\nusers: [{{name: u, password_hash: \"{hash}\"}}]\n"
        );
        let config = Config::from_yaml(&yaml, std::path::Path::new(".")).unwrap();
        let fields = vec![
            ("image_name".to_owned(), "demo".to_owned()),
            ("container_name".to_owned(), "My Branch".to_owned()),
            ("B".to_owned(), "request".to_owned()),
        ];
        let request = LaunchRequest::parse(fields, &config.images).unwrap();
        let env = container_env(&request, "http://my-branch.p.localhost");
        for expected in [
            "A=image",
            "B=request",
            "image_name=demo",
            "container_name=My Branch",
            "PREVIEW_NAME=my-branch",
            "PREVIEW_URL=http://my-branch.p.localhost",
        ] {
            assert!(env.contains(&expected.to_owned()), "{expected} not in {env:?}");
        }
    }
}
