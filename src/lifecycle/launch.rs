//! Launch and replace: admission and the launch queue, the preview's network, the container
//! created, started and answering, the route switched (for a new preview, while it starts), and
//! the replaced container retired once its requests are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::environment::{EnvironmentOf, render_env};
use super::{
    LOG_LINES_ON_FAILURE, Lifecycle, LifecycleError, PreviewInfo, Progress, ProgressEvent, ServiceInfo, describe_owner,
    same_pull_request, short, split_origin,
};
use crate::admission::AdmitError;
use crate::build::BuildInput;
use crate::config::{EnvContext, ImageSpec, PullPolicy};
use crate::metrics;
use crate::nginx::{Drain, NginxError, RouteTicket};
use crate::preview::{PreviewState, Slug};
use crate::request::LaunchRequest;
use crate::runtime::{ContainerPlan, CreatedContainer, DockerError, ManagedContainer};

const FIRST_HEALTH_POLL: Duration = Duration::from_millis(10);
const HEALTH_POLL: Duration = Duration::from_millis(50);
/// How long a replace waits for requests in flight under the old route before removing the old
/// container (a WebSocket may stay open far longer; it is cut then).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How many ports a launch tries when the one chosen is taken before Docker binds it.
const PORT_ATTEMPTS: u32 = 3;

/// The network a launch puts its container on.
struct PreviewNetwork {
    name: String,
    /// Taken for this launch: removed again if the launch fails.
    new: bool,
    /// Held until the launch is over, so that the pool's refill does not slow its start.
    _refill: Option<crate::network::Refill>,
}

impl Lifecycle {
    /// Starts a preview, or replaces the one of the same name with no downtime: the new
    /// container answers before the route switches, and only then is the old one removed.
    pub async fn launch(&self, request: LaunchRequest) -> Result<PreviewInfo, LifecycleError> {
        self.launch_reporting(request, None).await
    }

    /// `launch`, sending an event as each step begins (the API streams them to clients).
    pub async fn launch_reporting(
        &self,
        request: LaunchRequest,
        events: Option<mpsc::UnboundedSender<ProgressEvent>>,
    ) -> Result<PreviewInfo, LifecycleError> {
        self.launch_built(request, None, events).await
    }

    /// `launch_reporting` of an image built first from `build` (see [`crate::build`]): the build
    /// runs before the preview's lock is taken, so the preview keeps serving (and can be killed)
    /// while it builds; a failed build leaves it as it was.
    #[tracing::instrument(skip_all, fields(slug = %request.name, image = %request.image))]
    pub async fn launch_built(
        &self,
        request: LaunchRequest,
        build: Option<BuildInput>,
        events: Option<mpsc::UnboundedSender<ProgressEvent>>,
    ) -> Result<PreviewInfo, LifecycleError> {
        let slug = request.name.clone();
        let result = self.deploy(request, build, events).await;
        self.sleepers.unreserve(&slug);
        self.deploys.finish(&slug, result.as_ref().map(drop));
        result
    }

    async fn deploy(
        &self,
        mut request: LaunchRequest,
        build: Option<BuildInput>,
        events: Option<mpsc::UnboundedSender<ProgressEvent>>,
    ) -> Result<PreviewInfo, LifecycleError> {
        let mut progress = Progress::new(events, Arc::clone(&self.metrics)).shown_for(&self.deploys, &request.name);
        let claim = build.as_ref().map(|input| input.claim.clone());
        if let Some(input) = build {
            progress.step("build", "preparing the build context".to_owned());
            let mut on_step = |step: &'static str, message: String| progress.step(step, message);
            let image = self.builds.run(&request.name, input, &mut request.spec, &mut on_step).await;
            let image = image.inspect_err(|_| progress.finish())?;
            request.spec.image = image;
            request.spec.pull = PullPolicy::Never;
        }
        let (request_name, image) = (request.name.clone(), request.spec.image.clone());
        let result = match self.make_room(&request.name, Some(super::sleep::preview_memory(&request.spec))).await {
            Ok(()) => self.launch_under_lock(request, claim.as_ref(), &mut progress).await,
            Err(err) => Err(err),
        };
        if claim.is_some() {
            // Whatever the launch did (failed, refused by `limits`, stopped): a preview that
            // keeps failing must not pile up an image per push. The images its containers run
            // stay; when they cannot be listed, nothing is removed.
            if let Some(in_use) = self.images_in_use(&request_name, image).await {
                self.builds.keep(&request_name, &in_use).await;
            }
        }
        result
    }

    async fn launch_under_lock(
        &self,
        request: LaunchRequest,
        claim: Option<&crate::build::Claim>,
        progress: &mut Progress,
    ) -> Result<PreviewInfo, LifecycleError> {
        let _guard = self.locks.lock(&request.name).await;
        // The build shows as in flight (and a kill or a newer push can stop it) until the
        // preview's lock is taken; a stop that came meanwhile is honoured here.
        if let Some(claim) = claim {
            self.builds.release(&request.name, claim);
            if claim.cancel.is_cancelled() {
                progress.finish();
                return Err(claim.stopped().into());
            }
        }
        let (previous, place) = self.admit(&request).await?;
        let _turn = self.take_turn(progress).await;
        let result = self.launch_locked(request, &previous, progress).await;
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

    /// The images (by id) the preview's containers run, and `launched` (by tag); `None` when
    /// they cannot all be read.
    async fn images_in_use(&self, slug: &Slug, launched: String) -> Option<Vec<String>> {
        let mut in_use = vec![launched];
        for container in self.runtime.list_slug_all(slug).await.ok()? {
            in_use.push(self.runtime.container_image(&container.id).await.ok()?);
        }
        Some(in_use)
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
        let base_domain = self.config.base_domain.to_string();
        let context = env_context(&request, &base_domain);
        let env = container_env(&request, &url, &context)?;
        let fresh = previous.is_empty();
        let has_environment = !spec.services.is_empty() || !spec.jobs.is_empty();
        // Announced before the network is taken: a launch that has to wait for a new network
        // (the warm pool ran dry in a burst) still shares the burst's reload. A launch with
        // services or jobs announces it once they are done, not to hold up others' reloads.
        let early_ticket = (!has_environment).then(|| self.router.ticket());
        let network = self.network_for(spec, previous).await?;
        let network_name = network.as_ref().map(|n| n.name.as_str());
        let brought_up = async {
            if has_environment {
                self.prepare_environment(&request, &env, &context, network_name, fresh, progress).await?;
            }
            let ticket = early_ticket.unwrap_or_else(|| self.router.ticket());
            self.create_and_bring_up(&request, env.clone(), network_name, fresh, ticket, progress).await
        }
        .await;
        let (id, drain) = match brought_up {
            Ok(up) => up,
            Err(err) => {
                // A first launch leaves nothing behind; a redeploy keeps the services and their
                // data, and the old app serving.
                let cleanup = async {
                    let members = self.runtime.list_slug_all(&request.name).await?;
                    self.remove_environment(&request.name, &members).await
                };
                if fresh
                    && has_environment
                    && let Err(cleanup) = cleanup.await
                {
                    tracing::error!(error = %cleanup, "cannot remove the failed launch's services; reconcile will");
                }
                if let Some(PreviewNetwork { name, new: true, .. }) = network {
                    self.networks.remove(&name).await;
                }
                return Err(err);
            }
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
        self.awake_after_launch(&request.name)?;
        tracing::info!(elapsed_ms = progress.started.elapsed().as_millis() as u64, %url, "preview ready");
        let (repo, pr, sha) = split_origin(request.origin);
        let owner = request.owner;
        let now = crate::clock::unix_now();
        Ok(PreviewInfo {
            pinned: self.pinned(&request.name).map(|pin| pin.by.to_string()),
            expires: self.expires(&request.name, now),
            name: request.name,
            url,
            image: request.image,
            container_id: id,
            status: PreviewState::Running,
            routed: true,
            created: now,
            repo,
            pr,
            sha,
            owner,
            // Each was ready before the app started.
            services: spec
                .services
                .keys()
                .map(|name| ServiceInfo { name: name.clone(), status: PreviewState::Running })
                .collect(),
            last_request: Some(now),
        })
    }

    /// Brings up the preview's services and runs its jobs, before its new app container.
    async fn prepare_environment(
        &self,
        request: &LaunchRequest,
        env: &[String],
        context: &EnvContext<'_>,
        network: Option<&str>,
        fresh: bool,
        progress: &mut Progress,
    ) -> Result<(), LifecycleError> {
        let spec = &request.spec;
        if !spec.services.is_empty() {
            let network = network.ok_or_else(|| LifecycleError::NoNetworkForServices(request.image.clone()))?;
            let existing = if fresh { Vec::new() } else { self.runtime.list_slug_all(&request.name).await? };
            let of = EnvironmentOf { slug: &request.name, image_key: &request.image, spec, network, context };
            self.bring_up_services(&of, &existing, progress).await?;
        }
        let app = ContainerPlan {
            slug: &request.name,
            image_key: &request.image,
            spec,
            env: env.to_vec(),
            origin: request.origin.as_ref(),
            owner: request.owner.as_ref(),
            network,
        };
        self.run_jobs(&app, fresh, progress).await
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
                return Ok(Some(PreviewNetwork { name, new: false, _refill: None }));
            }
            tracing::warn!(
                network = name,
                "the preview's network was removed behind previewd's back; taking a new one"
            );
        }
        let (name, refill) = self.networks.lease().await?;
        Ok(Some(PreviewNetwork { name, new: true, _refill: Some(refill) }))
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

    /// A new preview, with nothing to keep serving: nginx is routed to the container while it
    /// starts (on a Swarm, from when the scheduler has picked its node), so the reload costs no
    /// time of its own. The launch still answers only once both the app and nginx do; if the app
    /// never answers, the route goes.
    async fn bring_up_fresh(
        &self,
        container: &CreatedContainer,
        spec: &ImageSpec,
        slug: &Slug,
        ticket: RouteTicket,
        progress: &mut Progress,
    ) -> Result<Drain, LifecycleError> {
        let mut ticket = Some(ticket);
        let mut early = None;
        let started = {
            let start = self.start_container(container, progress);
            tokio::pin!(start);
            tokio::select! {
                biased;
                placed = self.runtime.placement(container) => {
                    if let (Ok(Some(upstream)), Some(ticket)) = (placed, ticket.take()) {
                        early = Some((upstream, route_in_background(ticket, slug, upstream)));
                    }
                    start.await
                }
                started = &mut start => started,
            }
        };
        let placed = early.as_ref().map(|(placed, _)| *placed);
        let route = match (route_after_start(started.as_ref().ok().copied(), placed), ticket, early) {
            (RouteAfterStart::Route(upstream), Some(ticket), _) => Some(route_in_background(ticket, slug, upstream)),
            (RouteAfterStart::Reroute(upstream), _, Some((_, first))) => {
                let (router, slug) = (self.router.clone(), slug.clone());
                Some(tokio::spawn(async move {
                    let _ = first.await;
                    router.route(&slug, upstream).await
                }))
            }
            (_, _, early) => early.map(|(_, route)| route),
        };
        let up = match started {
            Ok(upstream) => self.answer_then_keep(&container.id, upstream, spec, progress).await.map(|()| upstream),
            Err(err) => Err(err),
        };
        progress.step("route", format!("routing {}", self.config.base_domain.host_for(slug)));
        let routed = match route {
            Some(route) => Some(route.await.unwrap_or(Err(NginxError::Stopped))),
            None => None,
        };
        match (up, routed) {
            (Ok(upstream), Some(Ok(drain))) => match self.router.check_served(slug, upstream).await {
                Ok(()) => Ok(drain),
                Err(err) => {
                    self.unroute_failed(slug).await;
                    Err(err.into())
                }
            },
            (Ok(_), Some(Err(err))) => Err(err.into()),
            // Not reached: a started container always has its route under way.
            (Ok(_), None) => Err(NginxError::Stopped.into()),
            (Err(err), Some(Ok(_))) => {
                self.unroute_failed(slug).await;
                Err(err)
            }
            (Err(err), _) => Err(err),
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
        let upstream = self.start_until_answering(container, spec, progress).await?;
        progress.step("route", format!("routing {}", self.config.base_domain.host_for(slug)));
        let previous = self.router.current(slug)?;
        let drain = ticket.route(slug, upstream).await?;
        if let Err(err) = self.router.check_served(slug, upstream).await {
            // The old container still runs: give it its route back.
            if let Err(restore) = self.router.restore(slug, previous).await {
                tracing::error!(error = %restore, "cannot put the previous route back; reconcile will");
            }
            return Err(err.into());
        }
        Ok(drain)
    }

    /// Starts the container and waits until the app answers HTTP; returns where nginx
    /// reaches it.
    pub(super) async fn start_until_answering(
        &self,
        container: &CreatedContainer,
        spec: &ImageSpec,
        progress: &mut Progress,
    ) -> Result<SocketAddr, LifecycleError> {
        let upstream = self.start_container(container, progress).await?;
        self.answer_then_keep(&container.id, upstream, spec, progress).await?;
        Ok(upstream)
    }

    async fn start_container(
        &self,
        container: &CreatedContainer,
        progress: &mut Progress,
    ) -> Result<SocketAddr, LifecycleError> {
        progress.step("start", "starting the container".to_owned());
        let upstream = self.runtime.start(container).await?;
        tracing::info!(container = %short(&container.id), %upstream, "container started");
        Ok(upstream)
    }

    /// Waits until the app answers, then has the engine keep it running.
    async fn answer_then_keep(
        &self,
        id: &str,
        upstream: SocketAddr,
        spec: &ImageSpec,
        progress: &mut Progress,
    ) -> Result<(), LifecycleError> {
        progress.step(
            "health",
            format!("waiting for the app to answer HTTP on port {} at {}", spec.port, spec.health_path),
        );
        self.wait_until_answering(id, upstream, spec).await?;
        self.runtime.keep_running(id).await?;
        Ok(())
    }

    /// Probes the app on the port previewd gave the container until it answers, asking Docker
    /// between tries whether it crashed. Tries come quickly at first (10 ms, doubling up to
    /// `HEALTH_POLL`): most apps answer within milliseconds of their start, and a fixed 50 ms
    /// pause after a first miss was launch latency.
    pub(super) async fn wait_until_answering(
        &self,
        id: &str,
        upstream: SocketAddr,
        spec: &ImageSpec,
    ) -> Result<(), LifecycleError> {
        let deadline = Instant::now() + spec.health_timeout;
        let mut pause = FIRST_HEALTH_POLL;
        loop {
            if self.prober.answers(upstream, &spec.health_path).await {
                return Ok(());
            }
            let status = self.runtime.status(id).await?;
            if status.as_ref().is_none_or(|s| !s.running) {
                let logs = self.runtime.logs_tail(id, LOG_LINES_ON_FAILURE).await;
                return Err(LifecycleError::Crashed { exit_code: status.and_then(|s| s.exit_code), logs });
            }
            if Instant::now() >= deadline {
                let logs = self.runtime.logs_tail(id, LOG_LINES_ON_FAILURE).await;
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
}

/// What the `env` templates of a launch see.
fn env_context<'a>(request: &'a LaunchRequest, base_domain: &'a str) -> EnvContext<'a> {
    EnvContext {
        slug: request.name.as_ref(),
        base_domain,
        branch: &request.container_name,
        pr_number: request.origin.as_ref().map_or_else(String::new, |origin| origin.number.to_string()),
    }
}

/// The environment of a preview container: the image's `env` (rendered), overridden by the
/// request's fields, plus what previewd sets itself (Stager's `image_name`/`container_name`
/// included).
fn container_env(request: &LaunchRequest, url: &str, context: &EnvContext<'_>) -> Result<Vec<String>, LifecycleError> {
    let mut env = render_env(&request.spec.env, context)?;
    env.extend(request.env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env.insert("image_name".into(), request.image.to_string());
    env.insert("container_name".into(), request.container_name.clone());
    env.insert("PREVIEW_NAME".into(), request.name.to_string());
    env.insert("PREVIEW_URL".into(), url.to_owned());
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// What a new preview's route needs once its start is over.
#[derive(Debug, PartialEq, Eq)]
enum RouteAfterStart {
    /// Not routed yet (the engine said where only at the start): route it there.
    Route(SocketAddr),
    /// Routed where the engine first placed it, but it runs elsewhere (on a Swarm, its first
    /// task failed and another was placed on another node): route it again.
    Reroute(SocketAddr),
    /// Routed where it runs, or it did not start: nothing more.
    Keep,
}

/// `started`: where the started container is reached (`None`: the start failed); `placed`:
/// where nginx was routed while it started, if anywhere.
fn route_after_start(started: Option<SocketAddr>, placed: Option<SocketAddr>) -> RouteAfterStart {
    match (started, placed) {
        (Some(upstream), None) => RouteAfterStart::Route(upstream),
        (Some(upstream), Some(placed)) if placed != upstream => RouteAfterStart::Reroute(upstream),
        _ => RouteAfterStart::Keep,
    }
}

/// Routes nginx while the caller goes on (a launch waits for the route only at its end).
fn route_in_background(
    ticket: RouteTicket,
    slug: &Slug,
    upstream: SocketAddr,
) -> tokio::task::JoinHandle<Result<Drain, NginxError>> {
    let slug = slug.clone();
    tokio::spawn(async move { ticket.route(&slug, upstream).await })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const HERE: &str = "10.0.0.11:24000";
    const THERE: &str = "10.0.0.12:24000";

    fn at(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn a_container_routed_where_it_was_placed_and_runs_is_not_routed_again() {
        assert_eq!(route_after_start(Some(at(HERE)), Some(at(HERE))), RouteAfterStart::Keep);
    }

    #[test]
    fn a_container_that_runs_elsewhere_than_it_was_placed_is_routed_again() {
        assert_eq!(route_after_start(Some(at(THERE)), Some(at(HERE))), RouteAfterStart::Reroute(at(THERE)));
    }

    #[test]
    fn a_container_placed_only_at_its_start_is_routed_then() {
        assert_eq!(route_after_start(Some(at(HERE)), None), RouteAfterStart::Route(at(HERE)));
    }

    #[test]
    fn a_container_that_did_not_start_gets_no_route() {
        assert_eq!(route_after_start(None, Some(at(HERE))), RouteAfterStart::Keep);
        assert_eq!(route_after_start(None, None), RouteAfterStart::Keep);
    }

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
        let context = env_context(&request, "p.localhost");
        let env = container_env(&request, "http://my-branch.p.localhost", &context).unwrap();
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
