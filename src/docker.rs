//! The Docker engine as previewd's [`Runtime`]: creates, starts, inspects, lists and removes
//! preview containers through the Docker Engine API. Container labels are the record of what
//! runs; nothing else is kept. No bollard type leaves this module and its children.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, ContainerUpdateBody, HostConfig,
    HostConfigLogConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions,
};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::config::{ImageSpec, PullPolicy};
use crate::preview::{ImageKey, InstanceName, PreviewState, Role, Slug};
use crate::runtime::{
    ContainerPlan, ContainerStatus, Containers, CreatedContainer, DockerError, Engine, EngineInfo, ManagedContainer,
};

mod builds;
mod environment;
pub(crate) mod labels;
mod networks;
use labels::*;

/// What the container's log files may grow to (json-file rotation), so previews cannot fill the disk.
pub(crate) const LOG_MAX_SIZE: &str = "10m";
pub(crate) const LOG_MAX_FILES: &str = "3";
/// `/tmp` of a read-only preview: writable, but no device files or set-uid programs.
const READ_ONLY_TMPFS: &str = "rw,nosuid,nodev,size=256m";

impl DockerError {
    pub(crate) fn from_bollard(action: &'static str, err: BollardError) -> Self {
        match err {
            BollardError::DockerResponseServerError { message, .. } => Self::Api { action, message },
            BollardError::IOError { .. }
            | BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::HttpClientError { .. }
            | BollardError::RequestTimeoutError => Self::Unreachable(err.to_string()),
            other => Self::Api { action, message: other.to_string() },
        }
    }
}

fn is_removal_in_progress(err: &BollardError) -> bool {
    matches!(err, BollardError::DockerResponseServerError { status_code: 409, message } if message.contains("already in progress"))
}

pub(crate) fn is_not_found(err: &BollardError) -> bool {
    matches!(err, BollardError::DockerResponseServerError { status_code: 404, .. })
}

/// The Docker engine on this host, as previewd's [`crate::runtime::Runtime`].
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    instance: InstanceName,
    ports: PortPicker,
    /// Where the engine keeps its images, asked once (`docker info` is slow): for the free disk.
    data_root: Arc<std::sync::OnceLock<String>>,
}

impl DockerRuntime {
    /// The engine's API client, for the Swarm runtime that drives the same engine.
    pub(crate) fn client(&self) -> &Docker {
        &self.docker
    }

    /// Connects to the local engine and agrees on an API version it speaks.
    pub async fn connect(instance: InstanceName) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|err| DockerError::Unreachable(err.to_string()))?
            .negotiate_version()
            .await
            .map_err(|err| DockerError::Unreachable(err.to_string()))?;
        Ok(Self { docker, instance, ports: PortPicker::default(), data_root: Arc::default() })
    }

    /// Creates the container under a name that tells the instance and the preview, unique by a
    /// random suffix (a replacement lives beside the container it replaces).
    async fn create_named(
        &self,
        slug: &str,
        body: ContainerCreateBody,
        reserved: PortReservation,
    ) -> Result<CreatedContainer, DockerError> {
        let name = format!("previewd.{}.{slug}.{:08x}", self.instance, rand::random::<u32>());
        let id = self.create_container_named(name, body).await?;
        Ok(CreatedContainer::on_loopback(id, reserved.port, reserved))
    }

    /// Creates a container under `name`; its id.
    async fn create_container_named(&self, name: String, body: ContainerCreateBody) -> Result<String, DockerError> {
        let options = CreateContainerOptions { name: Some(name), ..Default::default() };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|err| DockerError::from_bollard("create the container", err))?;
        Ok(created.id)
    }

    fn create_body(&self, plan: &ContainerPlan<'_>, host_port: u16) -> Result<ContainerCreateBody, DockerError> {
        self.app_image_body(plan, &Role::App, plan.spec.command.clone(), Some(host_port))
    }

    /// A container of the preview's app image (the app, or one of its jobs with `cmd`): its
    /// labels, previewd's limits and hardening, merged into the image's `container_create_params`.
    /// Only the app is published, on `host_port`.
    fn app_image_body(
        &self,
        plan: &ContainerPlan<'_>,
        role: &Role,
        cmd: Option<Vec<String>>,
        host_port: Option<u16>,
    ) -> Result<ContainerCreateBody, DockerError> {
        let spec = plan.spec;
        let mut labels = self.preview_labels(plan.slug, plan.image_key, role, plan.network);
        labels.insert(LABEL_CREATED.to_owned(), unix_nanos().to_string());
        if host_port.is_some() {
            labels.insert(LABEL_PORT.to_owned(), spec.port.to_string());
        }
        put_origin(&mut labels, plan.origin, plan.owner);
        let mut security_opt = user_security_opts(&spec.container_create_params);
        security_opt.push("no-new-privileges".to_owned());
        let limits = Limits { memory: spec.memory, cpus: spec.cpus, pids: spec.pids, cap_add: capabilities(spec) };
        let ours = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd,
            env: Some(plan.env.clone()),
            labels: Some(labels),
            exposed_ports: host_port.map(|_| vec![format!("{}/tcp", spec.port)]),
            host_config: Some(HostConfig {
                port_bindings: host_port.map(|port| loopback_binding(&spec.port.to_string(), port)),
                network_mode: plan.network.map(str::to_owned),
                security_opt: Some(security_opt),
                // No restarts until the app has answered once (see `keep_running`): a crash
                // during start-up then stays visible, with its exit code.
                restart_policy: Some(restart_policy(RestartPolicyNameEnum::NO)),
                readonly_rootfs: spec.read_only.then_some(true),
                tmpfs: spec.read_only.then(|| HashMap::from([("/tmp".to_owned(), READ_ONLY_TMPFS.to_owned())])),
                ..limits.host_config()
            }),
            ..Default::default()
        };
        let ours = serde_json::to_value(ours).map_err(|err| invalid_params(err.to_string()))?;
        let mut merged = Value::Object(spec.container_create_params.clone());
        merge(&mut merged, ours);
        serde_json::from_value(merged).map_err(|err| invalid_params(err.to_string()))
    }

    /// The labels of every container and volume of a preview.
    fn preview_labels(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        role: &Role,
        network: Option<&str>,
    ) -> HashMap<String, String> {
        let mut labels = instance_labels(self.instance.as_ref());
        put_role(&mut labels, role);
        labels.insert(LABEL_SLUG.to_owned(), slug.to_string());
        labels.insert(LABEL_IMAGE.to_owned(), image_key.to_string());
        if let Some(network) = network {
            labels.insert(LABEL_NETWORK.to_owned(), network.to_owned());
        }
        labels
    }

    async fn set_unless_stopped(&self, id: &str) -> Result<(), BollardError> {
        let update = ContainerUpdateBody {
            restart_policy: Some(restart_policy(RestartPolicyNameEnum::UNLESS_STOPPED)),
            ..Default::default()
        };
        self.docker.update_container(id, update).await.map(drop)
    }

    fn instance_labels(&self) -> Vec<String> {
        vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_INSTANCE}={}", self.instance)]
    }

    async fn list_filtered(&self, slug: Option<&Slug>) -> Result<Vec<ManagedContainer>, DockerError> {
        let mut labels = self.instance_labels();
        if let Some(slug) = slug {
            labels.push(format!("{LABEL_SLUG}={slug}"));
        }
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), labels)])),
            ..Default::default()
        };
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|err| DockerError::from_bollard("list containers", err))?;
        let mut containers: Vec<_> = summaries.into_iter().filter_map(managed_container).collect();
        containers.sort_by_key(|c| c.created_ns);
        Ok(containers)
    }
}

#[async_trait]
impl Engine for DockerRuntime {
    /// What `previewd doctor` reports of the engine.
    async fn engine(&self) -> Result<EngineInfo, DockerError> {
        let version = self.docker.version().await.map_err(|err| DockerError::from_bollard("tell its version", err))?;
        let info = self.docker.info().await.map_err(|err| DockerError::from_bollard("describe itself", err))?;
        Ok(EngineInfo {
            version: version.version.unwrap_or_default(),
            api_version: version.api_version.unwrap_or_default(),
            storage_driver: info.driver.unwrap_or_default(),
            data_root: info.docker_root_dir.unwrap_or_default(),
        })
    }

    /// Whether an image is in the engine's store.
    async fn has_image(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(DockerError::from_bollard("inspect the image", err)),
        }
    }

    async fn ping(&self) -> Result<(), DockerError> {
        self.docker.ping().await.map(drop).map_err(|err| DockerError::from_bollard("answer a ping", err))
    }

    /// `needs_pull` for any image and policy (a service's).
    async fn image_needs_pull(&self, image: &str, pull: PullPolicy) -> Result<bool, DockerError> {
        let present = self.has_image(image).await?;
        match (pull, present) {
            (PullPolicy::Never, false) => Err(DockerError::ImageMissing { image: image.to_owned() }),
            (PullPolicy::Always, _) | (PullPolicy::Missing, false) => Ok(true),
            _ => Ok(false),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), DockerError> {
        let options = CreateImageOptions { from_image: Some(image.to_owned()), ..Default::default() };
        self.docker
            .create_image(Some(options), None, None)
            .try_for_each(|_| async { Ok(()) })
            .await
            .map_err(|err| DockerError::PullFailed { image: image.to_owned(), message: err.to_string() })
    }
}

#[async_trait]
impl Containers for DockerRuntime {
    /// Creates a container to be published on a free loopback port, chosen here rather than by
    /// Docker at start so that nginx can be routed to it while the container starts.
    async fn create(&self, plan: ContainerPlan<'_>) -> Result<CreatedContainer, DockerError> {
        let reserved = self.ports.reserve()?;
        let body = self.create_body(&plan, reserved.port)?;
        self.create_named(plan.slug.as_ref(), body, reserved).await
    }

    async fn start(&self, container: &CreatedContainer) -> Result<SocketAddr, DockerError> {
        self.docker.start_container(&container.id, None).await.map_err(|err| match err {
            BollardError::DockerResponseServerError { message, .. } if is_port_conflict(&message) => {
                DockerError::PortInUse { port: container.host_port, message }
            }
            other => DockerError::from_bollard("start the container", other),
        })?;
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, container.host_port)))
    }

    /// A new container like `id` (same image, command, environment, labels and limits) on
    /// another free port, for a preview that was up and that Docker could not start again
    /// (another program took its port while the engine was down). `None` when `id` never came
    /// up (its restart policy was never set) or is gone: there is nothing to bring back.
    async fn recreate(&self, id: &str) -> Result<Option<CreatedContainer>, DockerError> {
        let inspect = match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect,
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(DockerError::from_bollard("inspect the container", err)),
        };
        let mut host_config = inspect.host_config.unwrap_or_default();
        let kept_running = is_kept_running(&host_config);
        let Some(config) = inspect.config.filter(|_| kept_running) else { return Ok(None) };
        let mut labels = config.labels.clone().unwrap_or_default();
        let Some(container_port) = labels.get(LABEL_PORT).cloned() else { return Ok(None) };
        let slug = labels.get(LABEL_SLUG).cloned().unwrap_or_default();
        labels.insert(LABEL_CREATED.to_owned(), unix_nanos().to_string());
        let reserved = self.ports.reserve()?;
        host_config.port_bindings = Some(loopback_binding(&container_port, reserved.port));
        host_config.restart_policy = Some(restart_policy(RestartPolicyNameEnum::NO));
        let config = serde_json::to_value(config).map_err(|err| invalid_params(err.to_string()))?;
        let mut body: ContainerCreateBody =
            serde_json::from_value(config).map_err(|err| invalid_params(err.to_string()))?;
        body.hostname = None;
        body.labels = Some(labels);
        body.host_config = Some(host_config);
        self.create_named(&slug, body, reserved).await.map(Some)
    }

    /// `keep_running`, unless Docker already keeps the container running; `false` when the
    /// container is gone (a removal a killed previewd had asked for, which Docker finishes).
    /// The check is a read (~1 ms); the update writes the container's config even when nothing
    /// changes (~15 ms, one at a time), which at 500 previews made every start-up reconcile
    /// take 8 s.
    async fn ensure_kept_running(&self, id: &str) -> Result<bool, DockerError> {
        let inspect = match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect,
            Err(err) if is_not_found(&err) => return Ok(false),
            Err(err) => return Err(DockerError::from_bollard("inspect the container", err)),
        };
        if inspect.host_config.as_ref().is_some_and(is_kept_running) {
            return Ok(true);
        }
        match self.set_unless_stopped(id).await {
            Ok(()) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(DockerError::from_bollard("set the restart policy", err)),
        }
    }

    /// From now on Docker restarts the container after a crash or an engine restart
    /// (`unless-stopped`). Set once the app has answered; repeating it is harmless.
    async fn keep_running(&self, id: &str) -> Result<(), DockerError> {
        self.set_unless_stopped(id).await.map_err(|err| DockerError::from_bollard("set the restart policy", err))
    }

    /// The `KEY=VALUE` environment a container was created with.
    async fn container_env(&self, id: &str) -> Result<Vec<String>, DockerError> {
        let inspect = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|err| DockerError::from_bollard("inspect the container", err))?;
        Ok(inspect.config.and_then(|config| config.env).unwrap_or_default())
    }

    async fn container_image(&self, id: &str) -> Result<String, DockerError> {
        let inspect = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|err| DockerError::from_bollard("inspect the container", err))?;
        Ok(inspect.image.unwrap_or_default())
    }

    /// A stopped app container, to start again on the 127.0.0.1 port it publishes.
    async fn stopped_app(&self, id: &str) -> Result<Option<CreatedContainer>, DockerError> {
        let inspect = match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect,
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(DockerError::from_bollard("inspect the container", err)),
        };
        let labels = inspect.config.and_then(|config| config.labels).unwrap_or_default();
        let Some(container_port) = labels.get(LABEL_PORT) else { return Ok(None) };
        let bindings = inspect.host_config.and_then(|host| host.port_bindings).unwrap_or_default();
        let port = bindings
            .get(&format!("{container_port}/tcp"))
            .and_then(|binding| binding.as_ref()?.first()?.host_port.as_deref()?.parse().ok());
        Ok(port.map(|port| CreatedContainer::on_loopback(id.to_owned(), port, ())))
    }

    async fn stop(&self, id: &str, grace: std::time::Duration) -> Result<(), DockerError> {
        let options = bollard::query_parameters::StopContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        match self.docker.stop_container(id, Some(options)).await {
            // 304: stopped already.
            Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(err) => Err(DockerError::from_bollard("stop the container", err)),
        }
    }

    /// Stops a running container (`grace` for its app to exit on SIGTERM) and starts it again,
    /// with the same port.
    async fn restart(&self, id: &str, grace: std::time::Duration) -> Result<SocketAddr, DockerError> {
        let options = bollard::query_parameters::RestartContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        self.docker
            .restart_container(id, Some(options))
            .await
            .map_err(|err| DockerError::from_bollard("restart the container", err))?;
        let app = self.stopped_app(id).await?;
        app.and_then(|app| app.upstream).ok_or_else(|| DockerError::Api {
            action: "restart the container",
            message: "it publishes no port".to_owned(),
        })
    }

    /// Whether one container runs, and its exit code; `None` when it no longer exists.
    async fn status(&self, id: &str) -> Result<Option<ContainerStatus>, DockerError> {
        let inspect = match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect,
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(DockerError::from_bollard("inspect the container", err)),
        };
        let state = inspect.state.unwrap_or_default();
        Ok(Some(ContainerStatus { running: state.running.unwrap_or(false), exit_code: state.exit_code }))
    }

    /// The last `lines` lines the container wrote to stdout and stderr.
    async fn logs_tail(&self, id: &str, lines: usize) -> String {
        let options = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
        let chunks: Vec<_> = self.docker.logs(id, Some(options)).collect().await;
        chunks
            .into_iter()
            .filter_map(Result::ok)
            .map(|chunk| String::from_utf8_lossy(&chunk.into_bytes()).into_owned())
            .collect()
    }

    /// The container's stdout and stderr as they come: the last `tail` lines, then (with
    /// `follow`) everything it writes until it stops or the reader goes away.
    fn log_stream(&self, id: &str, tail: usize, follow: bool) -> BoxStream<'static, Result<Bytes, DockerError>> {
        let options = LogsOptions { stdout: true, stderr: true, follow, tail: tail.to_string(), ..Default::default() };
        self.docker
            .logs(id, Some(options))
            .map(|chunk| {
                chunk.map(|c| c.into_bytes()).map_err(|err| DockerError::from_bollard("read the container's log", err))
            })
            .boxed()
    }

    /// Removes a container and its anonymous volumes; a container that is already gone is fine.
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(id, Some(options)).await {
            // Gone, or going: a removal a killed previewd had asked for is still under way.
            Err(err) if !is_not_found(&err) && !is_removal_in_progress(&err) => {
                Err(DockerError::from_bollard("remove the container", err))
            }
            _ => Ok(()),
        }
    }

    /// The previews whose container Docker starts or removes from now on, as Docker reports them
    /// (it also restarts containers by itself, after a crash or an engine restart, and anyone may
    /// remove one by hand).
    fn container_changes(&self) -> BoxStream<'static, Result<Slug, DockerError>> {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("event".to_owned(), vec!["start".to_owned(), "destroy".to_owned()]),
            ("label".to_owned(), self.instance_labels()),
        ]);
        let options = EventsOptions { filters: Some(filters), ..Default::default() };
        self.docker
            .events(Some(options))
            .filter_map(|event| async move {
                match event {
                    Ok(message) => {
                        let attributes = message.actor.and_then(|actor| actor.attributes).unwrap_or_default();
                        attributes.get(LABEL_SLUG).and_then(|slug| Slug::parse(slug).ok()).map(Ok)
                    }
                    Err(err) => Some(Err(DockerError::from_bollard("stream events", err))),
                }
            })
            .boxed()
    }

    /// Every app container of this instance, running or not, oldest first (by creation time).
    async fn list(&self) -> Result<Vec<ManagedContainer>, DockerError> {
        Ok(self.list_filtered(None).await?.into_iter().filter(|c| c.role == Role::App).collect())
    }

    /// The app containers of one preview, oldest first.
    async fn list_slug(&self, slug: &Slug) -> Result<Vec<ManagedContainer>, DockerError> {
        Ok(self.list_filtered(Some(slug)).await?.into_iter().filter(|c| c.role == Role::App).collect())
    }

    /// Every container of this instance, whatever its role, oldest first.
    async fn list_all(&self) -> Result<Vec<ManagedContainer>, DockerError> {
        self.list_filtered(None).await
    }

    /// Every container of one preview, whatever its role, oldest first.
    async fn list_slug_all(&self, slug: &Slug) -> Result<Vec<ManagedContainer>, DockerError> {
        self.list_filtered(Some(slug)).await
    }
}

/// Reads a container back from its labels; one whose labels were tampered with is skipped.
fn managed_container(summary: ContainerSummary) -> Option<ManagedContainer> {
    let labels = summary.labels.unwrap_or_default();
    let slug = Slug::parse(labels.get(LABEL_SLUG)?).ok()?;
    let image = ImageKey::parse(labels.get(LABEL_IMAGE)?).ok()?;
    let role = labels::role(&labels)?;
    // Only the app is published; a service or job has no routed port.
    let container_port: Option<u16> = match role {
        Role::App => Some(labels.get(LABEL_PORT)?.parse().ok()?),
        _ => None,
    };
    let created = summary.created.unwrap_or_default();
    let created_ns = labels
        .get(LABEL_CREATED)
        .and_then(|ns| ns.parse().ok())
        .unwrap_or(u128::try_from(created).unwrap_or_default() * 1_000_000_000);
    let state = preview_state(summary.state);
    let running = state == PreviewState::Running;
    let upstream = summary
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|port| Some(port.private_port) == container_port)
        .find(|port| port.ip.as_deref() == Some("127.0.0.1"))
        .and_then(|port| port.public_port)
        .filter(|_| running)
        .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    let (origin, owner) = labels::origin(&labels);
    let network = labels.get(LABEL_NETWORK).cloned();
    let digest = labels.get(LABEL_DIGEST).cloned();
    Some(ManagedContainer {
        id: summary.id?,
        slug,
        image,
        state,
        upstream,
        created,
        created_ns,
        origin,
        owner,
        network,
        role,
        digest,
    })
}

/// Docker's state of a container in previewd's terms.
fn preview_state(state: Option<ContainerSummaryStateEnum>) -> PreviewState {
    match state {
        Some(ContainerSummaryStateEnum::CREATED) => PreviewState::Created,
        Some(ContainerSummaryStateEnum::RUNNING) => PreviewState::Running,
        Some(ContainerSummaryStateEnum::RESTARTING) => PreviewState::Restarting,
        Some(ContainerSummaryStateEnum::PAUSED) => PreviewState::Paused,
        Some(ContainerSummaryStateEnum::STOPPING) => PreviewState::Stopping,
        Some(ContainerSummaryStateEnum::REMOVING) => PreviewState::Removing,
        Some(ContainerSummaryStateEnum::EXITED) => PreviewState::Exited,
        Some(ContainerSummaryStateEnum::DEAD) => PreviewState::Dead,
        Some(ContainerSummaryStateEnum::EMPTY) | None => PreviewState::Unknown,
    }
}

/// Checks `container_create_params` against the fields Docker's create call knows
/// (`ContainerCreateBody`), with their types: an unknown or misspelt key would otherwise be
/// dropped without a word.
pub fn check_create_params(params: &serde_json::Map<String, Value>) -> Result<(), String> {
    let body: ContainerCreateBody =
        serde_json::from_value(Value::Object(params.clone())).map_err(|err| err.to_string())?;
    let known = serde_json::to_value(&body).map_err(|err| err.to_string())?;
    let unknown: Vec<&str> =
        params.keys().filter(|key| known.get(key.as_str()).is_none()).map(String::as_str).collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown Docker create field(s) {}; use the Docker Engine API names, e.g. Tty, HostConfig",
            unknown.join(", ")
        ))
    }
}

/// Publishes `<container_port>/tcp` on 127.0.0.1 only: previews are reached through nginx.
fn loopback_binding(container_port: &str, host_port: u16) -> HashMap<String, Option<Vec<PortBinding>>> {
    let binding = PortBinding { host_ip: Some("127.0.0.1".to_owned()), host_port: Some(host_port.to_string()) };
    HashMap::from([(format!("{container_port}/tcp"), Some(vec![binding]))])
}

/// What Docker says when a published port is already bound (by the userland proxy or iptables).
fn is_port_conflict(message: &str) -> bool {
    message.contains("address already in use") || message.contains("port is already allocated")
}

/// Hands out free loopback ports, each to one launch at a time: a port the kernel calls free
/// stays free for others until Docker binds it, so two launches at once could get the same one.
///
/// Ports come from below the kernel's ephemeral range (as Kubernetes' node ports do): outgoing
/// connections and Docker's own port choices take ports from that range, and Docker re-binds
/// a container's port when it restarts the container, after an engine restart too.
#[derive(Clone, Default)]
struct PortPicker {
    reserved: Arc<Mutex<HashSet<u16>>>,
}

impl PortPicker {
    const ATTEMPTS: usize = 50;
    /// The lowest port handed out.
    const LOWEST: u16 = 20000;

    fn reserve(&self) -> Result<PortReservation, DockerError> {
        let range = Self::LOWEST..ephemeral_low().unwrap_or(30000).max(Self::LOWEST + 1000);
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..Self::ATTEMPTS {
            let port = rand::random_range(range.clone());
            if !reserved.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                reserved.insert(port);
                return Ok(PortReservation { port, picker: self.clone() });
            }
        }
        Err(DockerError::NoFreePort(format!(
            "{} ports tried between {} and {} were all in use",
            Self::ATTEMPTS,
            range.start,
            range.end
        )))
    }
}

/// The first port of the kernel's ephemeral range (net.ipv4.ip_local_port_range).
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?.split_whitespace().next()?.parse().ok()
}

struct PortReservation {
    port: u16,
    picker: PortPicker,
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        self.picker.reserved.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.port);
    }
}

/// What every container of a preview is held to: its memory, CPUs and processes, every
/// capability dropped but `cap_add`, and a log that cannot fill the disk.
struct Limits {
    memory: i64,
    cpus: Option<f64>,
    pids: i64,
    cap_add: Vec<String>,
}

impl Limits {
    fn host_config(self) -> HostConfig {
        HostConfig {
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), LOG_MAX_SIZE.to_owned()),
                    ("max-file".to_owned(), LOG_MAX_FILES.to_owned()),
                ])),
            }),
            memory: Some(self.memory),
            nano_cpus: self.cpus.map(|cpus| (cpus * 1e9).round() as i64),
            pids_limit: Some(self.pids),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(self.cap_add),
            ..Default::default()
        }
    }
}

fn restart_policy(name: RestartPolicyNameEnum) -> RestartPolicy {
    RestartPolicy { name: Some(name), maximum_retry_count: None }
}

/// Whether Docker brings the container back after a crash or an engine restart: set once its
/// app had answered (see `keep_running`).
fn is_kept_running(host_config: &HostConfig) -> bool {
    host_config.restart_policy.as_ref().and_then(|p| p.name) == Some(RestartPolicyNameEnum::UNLESS_STOPPED)
}

pub(crate) fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The image's `cap_add` and any `CapAdd` of its create params: both survive `CapDrop: ALL`.
pub(crate) fn capabilities(spec: &ImageSpec) -> Vec<String> {
    let mut caps: Vec<String> = spec.cap_add.iter().map(ToString::to_string).collect();
    let user = spec.container_create_params.get("HostConfig").and_then(|host| host.get("CapAdd"));
    for cap in user.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        if !caps.iter().any(|known| known.eq_ignore_ascii_case(cap)) {
            caps.push(cap.to_owned());
        }
    }
    caps
}

fn user_security_opts(params: &serde_json::Map<String, Value>) -> Vec<String> {
    params
        .get("HostConfig")
        .and_then(|host| host.get("SecurityOpt"))
        .and_then(Value::as_array)
        .map(|opts| opts.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn invalid_params(message: String) -> DockerError {
    DockerError::Api { action: "use the image's container_create_params", message }
}

/// Deep-merges `overlay` into `base`: objects merge key by key, anything else is replaced.
/// previewd's own fields are the overlay, so labels, ports and safety options always hold.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, overlay) => *base = overlay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_keeps_user_fields_and_lets_ours_win() {
        let mut base = json!({"Tty": true, "HostConfig": {"Binds": ["/a:/b"], "Memory": 1}, "Labels": {"x": "1"}});
        merge(&mut base, json!({"HostConfig": {"Memory": 2}, "Labels": {"previewd.slug": "s"}}));
        assert_eq!(
            base,
            json!({"Tty": true, "HostConfig": {"Binds": ["/a:/b"], "Memory": 2}, "Labels": {"x": "1", "previewd.slug": "s"}})
        );
    }

    #[test]
    fn a_reserved_port_is_not_handed_out_twice_until_released() {
        let picker = PortPicker::default();
        let held: Vec<PortReservation> = (0..50).map(|_| picker.reserve().unwrap()).collect();
        let ports: HashSet<u16> = held.iter().map(|r| r.port).collect();
        assert_eq!(ports.len(), 50);
        let ephemeral = ephemeral_low().unwrap();
        assert!(ports.iter().all(|p| (PortPicker::LOWEST..ephemeral.max(21000)).contains(p)), "{ports:?}");
        drop(held);
        assert!(picker.reserved.lock().unwrap().is_empty());
    }

    #[test]
    fn port_conflicts_are_recognised() {
        assert!(is_port_conflict(
            "driver failed programming external connectivity on endpoint x: Error starting userland proxy: listen tcp4 127.0.0.1:4000: bind: address already in use"
        ));
        assert!(is_port_conflict("Bind for 127.0.0.1:4000 failed: port is already allocated"));
        assert!(!is_port_conflict("No such image: x"));
    }
}
