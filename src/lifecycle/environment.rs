//! A preview's environment: its services brought up to their definitions and ready (each with
//! its data volume, seeded when made), its jobs run to their end, and all of it removed again.
//! Launch, reset, kill and reconcile call these; the app itself is [`super::launch`]'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{LOG_LINES_ON_FAILURE, Lifecycle, LifecycleError, Progress, short};
use crate::config::{EnvContext, EnvTemplate, ImageSpec, JobWhen, ReadyCheck, ServiceSpec};
use crate::metrics::ByPart;
use crate::preview::{EnvName, ImageKey, Role, ServiceName, Slug};
use crate::runtime::{ContainerPlan, JobPlan, ManagedContainer, RunOutcome, ServicePlan};

const FIRST_READY_POLL: Duration = Duration::from_millis(20);
const READY_POLL: Duration = Duration::from_millis(200);
const TCP_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// Who an environment belongs to, and the names its `env` templates see.
pub(super) struct EnvironmentOf<'a> {
    pub slug: &'a Slug,
    pub image_key: &'a ImageKey,
    pub spec: &'a ImageSpec,
    pub network: &'a str,
    pub context: &'a EnvContext<'a>,
}

impl Lifecycle {
    /// Makes the preview's services match their definitions, all ready: a running service made
    /// from the same definition is kept; one that is missing, stopped or defined differently
    /// now is (re)created on its data volume (made, and seeded, if there is none). Services
    /// start in parallel; the first failure is returned once all have settled.
    pub(super) async fn bring_up_services(
        &self,
        of: &EnvironmentOf<'_>,
        existing: &[ManagedContainer],
        progress: &mut Progress,
    ) -> Result<(), LifecycleError> {
        let stale = self.stale_services(of.spec, existing);
        for container in &stale.remove {
            self.runtime.remove(&container.id).await?;
        }
        if stale.create.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = stale.create.iter().map(|(name, _)| name.as_ref()).collect();
        progress.step("services", format!("starting service(s) {} and waiting until ready", names.join(", ")));
        let results = join_all(stale.create.iter().map(|(name, spec)| self.bring_up_service(of, name, spec))).await;
        results.into_iter().collect::<Result<Vec<()>, _>>().map(drop)
    }

    /// Which services to remove (stopped, defined differently, or no longer in config) and
    /// which to create.
    fn stale_services<'s>(&self, spec: &'s ImageSpec, existing: &[ManagedContainer]) -> StaleServices<'s> {
        let mut remove = Vec::new();
        let mut current: BTreeMap<&ServiceName, bool> = BTreeMap::new();
        for container in existing {
            let Role::Service(name) = &container.role else { continue };
            let wanted = spec.services.get(name);
            let fresh = wanted.is_some_and(|wanted| container.digest.as_deref() == Some(&wanted.digest()));
            let up = container.is_running() || container.state.is_transient();
            if fresh && up && !current.get(name).copied().unwrap_or(false) {
                current.insert(name, true);
            } else {
                remove.push(container.clone());
            }
        }
        let create =
            spec.services.iter().filter(|(name, _)| !current.get(name).copied().unwrap_or(false)).collect::<Vec<_>>();
        StaleServices { remove, create }
    }

    async fn bring_up_service(
        &self,
        of: &EnvironmentOf<'_>,
        name: &ServiceName,
        spec: &ServiceSpec,
    ) -> Result<(), LifecycleError> {
        let result = self.try_bring_up_service(of, name, spec).await;
        if result.is_err() {
            self.metrics.service_failures.get_or_create(&ByPart::new(name)).inc();
        }
        result
    }

    async fn try_bring_up_service(
        &self,
        of: &EnvironmentOf<'_>,
        name: &ServiceName,
        spec: &ServiceSpec,
    ) -> Result<(), LifecycleError> {
        if self.runtime.image_needs_pull(&spec.image, spec.pull).await? {
            self.runtime.pull(&spec.image).await?;
        }
        let volume = match &spec.data {
            Some(_) => Some(self.data_volume(of, name, spec).await?),
            None => None,
        };
        let env = render_env(&spec.env, of.context)?.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let plan = ServicePlan {
            slug: of.slug,
            image_key: of.image_key,
            name,
            spec,
            env,
            network: of.network,
            volume: volume.as_deref(),
        };
        let id = self.runtime.create_service(&plan).await?;
        self.runtime.start_part(&id).await?;
        tracing::info!(service = %name, container = %short(&id), "service started");
        self.wait_until_ready(&id, of.network, name, spec).await?;
        self.runtime.keep_running(&id).await?;
        Ok(())
    }

    /// The service's data volume: the one it has, else a new one, seeded from `seed_volume`.
    async fn data_volume(
        &self,
        of: &EnvironmentOf<'_>,
        name: &ServiceName,
        spec: &ServiceSpec,
    ) -> Result<String, LifecycleError> {
        let volume = self.runtime.volume_name(of.slug, name);
        if self.runtime.volume_exists(&volume).await? {
            return Ok(volume);
        }
        if let Some(seed) = &spec.seed_volume
            && !self.runtime.volume_exists(seed.as_ref()).await?
        {
            return Err(LifecycleError::SeedMissing { service: name.clone(), volume: seed.to_string() });
        }
        let volume = self.runtime.create_volume(of.slug, of.image_key, name).await?;
        if let Some(seed) = &spec.seed_volume {
            let began = Instant::now();
            self.runtime.copy_volume(of.slug, of.image_key, name, &spec.image, seed, &volume).await?;
            tracing::info!(service = %name, seed = %seed, elapsed_ms = began.elapsed().as_millis() as u64, "data volume seeded");
        }
        Ok(volume)
    }

    /// Polls the service's ready check (quickly at first) until it passes, failing at once
    /// when the container stops and at `ready_timeout` otherwise.
    pub(super) async fn wait_until_ready(
        &self,
        id: &str,
        network: &str,
        name: &ServiceName,
        spec: &ServiceSpec,
    ) -> Result<(), LifecycleError> {
        let deadline = Instant::now() + spec.ready_timeout;
        let mut pause = FIRST_READY_POLL;
        loop {
            let status = self.runtime.status(id).await?;
            if status.as_ref().is_none_or(|s| !s.running) {
                let logs = self.runtime.logs_tail(id, LOG_LINES_ON_FAILURE).await;
                return Err(LifecycleError::ServiceFailed {
                    service: name.clone(),
                    exit_code: status.and_then(|s| s.exit_code),
                    logs,
                });
            }
            if self.is_ready(id, network, spec.ready.as_ref()).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs = self.runtime.logs_tail(id, LOG_LINES_ON_FAILURE).await;
                return Err(LifecycleError::ServiceNotReady {
                    service: name.clone(),
                    timeout: spec.ready_timeout,
                    logs,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(READY_POLL);
        }
    }

    async fn is_ready(&self, id: &str, network: &str, check: Option<&ReadyCheck>) -> Result<bool, LifecycleError> {
        Ok(match check {
            None => true,
            Some(ReadyCheck::Command(argv)) => self.runtime.exec_status(id, argv).await? == Some(0),
            Some(ReadyCheck::Tcp(port)) => match self.runtime.address_on(id, network).await? {
                Some(ip) => {
                    let connect = tokio::net::TcpStream::connect(SocketAddr::new(ip, *port));
                    matches!(tokio::time::timeout(TCP_CHECK_TIMEOUT, connect).await, Ok(Ok(_)))
                }
                None => false,
            },
        })
    }

    /// Runs the jobs in order, each to its end: `every_deploy` ones always, `first_deploy`
    /// ones when `first` (a new preview, or a reset). The first that fails ends the run.
    pub(super) async fn run_jobs(
        &self,
        app: &ContainerPlan<'_>,
        first: bool,
        progress: &mut Progress,
    ) -> Result<(), LifecycleError> {
        for job in app.spec.jobs.iter().filter(|job| first || job.when == JobWhen::EveryDeploy) {
            progress.step("job", format!("running job {} ({})", job.name, job.command.join(" ")));
            let plan = JobPlan { app: app.clone(), job };
            let result = self.run_job(&plan).await;
            if result.is_err() {
                self.metrics.job_failures.get_or_create(&ByPart::new(&job.name)).inc();
            }
            result?;
        }
        Ok(())
    }

    async fn run_job(&self, plan: &JobPlan<'_>) -> Result<(), LifecycleError> {
        let id = self.runtime.create_job(plan).await?;
        let outcome = match self.runtime.start_part(&id).await {
            Ok(()) => self.runtime.wait_for_end(&id, plan.job.timeout).await,
            Err(err) => Err(err),
        };
        let logs = match &outcome {
            Ok(RunOutcome::Exited(0)) | Err(_) => String::new(),
            Ok(_) => self.runtime.logs_tail(&id, LOG_LINES_ON_FAILURE).await,
        };
        if let Err(err) = self.runtime.remove(&id).await {
            tracing::warn!(error = %err, container = %short(&id), "cannot remove the job's container; reconcile will");
        }
        let job = plan.job.name.clone();
        match outcome? {
            RunOutcome::Exited(0) => {
                tracing::info!(%job, "job done");
                Ok(())
            }
            RunOutcome::Exited(code) => Err(LifecycleError::JobFailed { job, exit_code: code, logs }),
            RunOutcome::TimedOut => Err(LifecycleError::JobTimedOut { job, timeout: plan.job.timeout, logs }),
        }
    }

    /// Removes the preview's `members` that are not its app (services, jobs, seed copies), then
    /// its data volumes (a volume goes only once no container uses it); whether there was
    /// anything to remove.
    pub(super) async fn remove_environment(
        &self,
        slug: &Slug,
        members: &[ManagedContainer],
    ) -> Result<bool, LifecycleError> {
        let mut removed = false;
        for part in members.iter().filter(|c| c.role != Role::App) {
            self.runtime.remove(&part.id).await?;
            removed = true;
        }
        for volume in self.runtime.list_volumes().await?.into_iter().filter(|v| &v.slug == slug) {
            self.runtime.remove_volume(&volume.name).await?;
            removed = true;
        }
        Ok(removed)
    }

    /// `bring_up_services` for a running app, its `env` templates seeing what they saw at its
    /// launch (`env`: the app container's environment).
    pub(super) async fn bring_up_services_of(
        &self,
        app: &ManagedContainer,
        spec: &ImageSpec,
        env: &[String],
        existing: &[ManagedContainer],
        progress: &mut Progress,
    ) -> Result<(), LifecycleError> {
        let network = app.network.as_deref().ok_or_else(|| LifecycleError::NoNetworkForServices(app.image.clone()))?;
        let base_domain = self.config.base_domain.to_string();
        let context = app_context(app, env, &base_domain);
        let of = EnvironmentOf { slug: &app.slug, image_key: &app.image, spec, network, context: &context };
        self.bring_up_services(&of, existing, progress).await
    }
}

struct StaleServices<'s> {
    remove: Vec<ManagedContainer>,
    create: Vec<(&'s ServiceName, &'s ServiceSpec)>,
}

/// What `env` templates saw when the app was launched, read back from its container's
/// environment (`container_name` is the branch of a pull request's preview).
fn app_context<'a>(app: &'a ManagedContainer, env: &'a [String], base_domain: &'a str) -> EnvContext<'a> {
    EnvContext {
        slug: app.slug.as_ref(),
        base_domain,
        branch: env.iter().find_map(|entry| entry.strip_prefix("container_name=")).unwrap_or_default(),
        pr_number: app.origin.as_ref().map_or_else(String::new, |origin| origin.number.to_string()),
    }
}

/// Renders `env` templates.
pub(super) fn render_env(
    env: &BTreeMap<EnvName, EnvTemplate>,
    context: &EnvContext<'_>,
) -> Result<BTreeMap<String, String>, LifecycleError> {
    env.iter()
        .map(|(key, template)| {
            let value = template
                .render(context)
                .map_err(|message| LifecycleError::EnvTemplate { key: key.to_string(), message })?;
            Ok((key.to_string(), value))
        })
        .collect()
}
