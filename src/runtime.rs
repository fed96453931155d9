//! The seam between the preview lifecycle and the container engine: [`Runtime`], in previewd's
//! own terms (preview containers with their [`Role`], [`PreviewState`], plans of what to create,
//! data volumes, preview networks), and the types that cross it. The Docker engine
//! (`crate::docker::DockerRuntime`) is its implementation; no engine library type appears here,
//! so the lifecycle, the API and the dashboard never see one.
//!
//! The trait is split by concern, each implemented in the engine module's file of that concern:
//! [`Engine`] (the engine itself and images), [`Containers`] (app containers: create, start,
//! inspect, list, remove, logs, events), [`Parts`] (services, jobs and data volumes of preview
//! environments), [`Networking`] (preview networks) and [`Images`] (images built from source).
//! [`Runtime`] is all five.

use std::any::Any;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use ipnet::Ipv4Net;

use crate::config::{ImageSpec, JobSpec, PullPolicy, ServiceSpec, VolumeName};
use crate::preview::{ImageKey, InstanceName, PreviewState, Role, ServiceName, Slug};
use crate::request::{Owner, PullRequestOrigin};

/// A container engine previewd can run previews on.
pub trait Runtime: Engine + Containers + Parts + Networking + Images {}

impl<T: Engine + Containers + Parts + Networking + Images> Runtime for T {}

/// The engine itself, and its images.
#[async_trait]
pub trait Engine: Send + Sync {
    /// What `previewd doctor` reports of the engine.
    async fn engine(&self) -> Result<EngineInfo, DockerError>;

    async fn ping(&self) -> Result<(), DockerError>;

    /// Whether an image is in the engine's store.
    async fn has_image(&self, image: &str) -> Result<bool, DockerError>;

    /// Whether the image must be pulled before it runs, as its `pull` policy says; an error
    /// when it is missing and may not be pulled.
    async fn image_needs_pull(&self, image: &str, pull: PullPolicy) -> Result<bool, DockerError>;

    /// `image_needs_pull` for a preview's app image.
    async fn needs_pull(&self, spec: &ImageSpec) -> Result<bool, DockerError> {
        self.image_needs_pull(&spec.image, spec.pull).await
    }

    async fn pull(&self, image: &str) -> Result<(), DockerError>;
}

/// The app containers of previews, and what every container of a preview shares: status, log,
/// removal, listing by labels, the engine's events.
#[async_trait]
pub trait Containers: Send + Sync {
    /// Creates an app container to be published on a free port, chosen here rather than by
    /// the engine at start so that nginx can be routed to it while it starts (when the engine
    /// knows the address before the start: see [`CreatedContainer::upstream`]).
    async fn create(&self, plan: ContainerPlan<'_>) -> Result<CreatedContainer, DockerError>;

    /// Starts the container; the address nginx reaches it at.
    async fn start(&self, container: &CreatedContainer) -> Result<SocketAddr, DockerError>;

    /// Where a container being started will be reached, as soon as the engine has decided,
    /// before it runs: nginx is routed there meanwhile. At once on one engine; on a Swarm once
    /// the scheduler has given the task a node. `None` when that is not known before it runs.
    async fn placement(&self, container: &CreatedContainer) -> Result<Option<SocketAddr>, DockerError> {
        Ok(container.upstream)
    }

    /// A new container like `id` (same image, command, environment, labels and limits) on
    /// another free port, for a preview that was up and that the engine could not start again
    /// (another program took its port while the engine was down). `None` when `id` never came
    /// up or is gone: there is nothing to bring back.
    async fn recreate(&self, id: &str) -> Result<Option<CreatedContainer>, DockerError>;

    /// `keep_running`, unless the engine already keeps the container running; `false` when the
    /// container is gone.
    async fn ensure_kept_running(&self, id: &str) -> Result<bool, DockerError>;

    /// From now on the engine restarts the container after a crash or an engine restart. Set
    /// once the app (or service) is up; repeating it is harmless.
    async fn keep_running(&self, id: &str) -> Result<(), DockerError>;

    /// The `KEY=VALUE` environment a container was created with.
    async fn container_env(&self, id: &str) -> Result<Vec<String>, DockerError>;

    /// The id of the image a container runs (for a preview built from source, the image it
    /// built, not `images.<key>.image`), which no tag moved since.
    async fn container_image(&self, id: &str) -> Result<String, DockerError>;

    /// A stopped app container, to be started again on the port it publishes its routed port
    /// on (kept while it is stopped); `None` when it has none or is gone.
    async fn stopped_app(&self, id: &str) -> Result<Option<CreatedContainer>, DockerError>;

    /// Stops a container (`grace` for it to exit on SIGTERM, then killed); it stays, stopped,
    /// and the engine does not start it again by itself. One already stopped or gone is left.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError>;

    /// Stops a running container (`grace` for it to exit on SIGTERM) and starts it again, with
    /// the same port; where nginx reaches it then.
    async fn restart(&self, id: &str, grace: Duration) -> Result<SocketAddr, DockerError>;

    /// Whether one container runs, and its exit code; `None` when it no longer exists.
    async fn status(&self, id: &str) -> Result<Option<ContainerStatus>, DockerError>;

    /// The last `lines` lines the container wrote to stdout and stderr.
    async fn logs_tail(&self, id: &str, lines: usize) -> String;

    /// The container's stdout and stderr as they come: the last `tail` lines, then (with
    /// `follow`) everything it writes until it stops or the reader goes away.
    fn log_stream(&self, id: &str, tail: usize, follow: bool) -> BoxStream<'static, Result<Bytes, DockerError>>;

    /// Removes a container and its anonymous volumes; a container that is already gone is fine.
    async fn remove(&self, id: &str) -> Result<(), DockerError>;

    /// The previews whose containers the engine starts or removes from now on (it also
    /// restarts containers by itself, and anyone may remove one by hand).
    fn container_changes(&self) -> BoxStream<'static, Result<Slug, DockerError>>;

    /// Every app container of this instance, running or not, oldest first (by creation time).
    async fn list(&self) -> Result<Vec<ManagedContainer>, DockerError>;

    /// The app containers of one preview, oldest first.
    async fn list_slug(&self, slug: &Slug) -> Result<Vec<ManagedContainer>, DockerError>;

    /// Every container of this instance, whatever its role, oldest first.
    async fn list_all(&self) -> Result<Vec<ManagedContainer>, DockerError>;

    /// Every container of one preview, whatever its role, oldest first.
    async fn list_slug_all(&self, slug: &Slug) -> Result<Vec<ManagedContainer>, DockerError>;
}

/// The services, jobs and data volumes of preview environments.
#[async_trait]
pub trait Parts: Send + Sync {
    /// Creates a service container on the preview's network, reachable there by its name,
    /// never published on the host, restarted by the engine only once `keep_running` is set.
    async fn create_service(&self, plan: &ServicePlan<'_>) -> Result<String, DockerError>;

    /// Creates a job container: the app's image, environment, limits and hardening, on the
    /// preview's network, running the job's command once.
    async fn create_job(&self, plan: &JobPlan<'_>) -> Result<String, DockerError>;

    /// Starts a container that publishes no port (a service or a job).
    async fn start_part(&self, id: &str) -> Result<(), DockerError>;

    /// Waits until the container stops, at most `timeout`.
    async fn wait_for_end(&self, id: &str, timeout: Duration) -> Result<RunOutcome, DockerError>;

    /// Runs `argv` inside a running container; its exit code (`None` if it could not run).
    async fn exec_status(&self, id: &str, argv: &[String]) -> Result<Option<i64>, DockerError>;

    /// The container's address on `network`, while it runs.
    async fn address_on(&self, id: &str, network: &str) -> Result<Option<IpAddr>, DockerError>;

    /// The name of a service's data volume: one per preview and service, so a redeploy finds
    /// it again.
    fn volume_name(&self, slug: &Slug, service: &ServiceName) -> String;

    async fn volume_exists(&self, name: &str) -> Result<bool, DockerError>;

    /// Creates an empty data volume of a service; its name.
    async fn create_volume(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        service: &ServiceName,
    ) -> Result<String, DockerError>;

    /// Removes a volume; one already gone is fine. Its containers must be gone first.
    async fn remove_volume(&self, name: &str) -> Result<(), DockerError>;

    /// Every data volume of this instance.
    async fn list_volumes(&self) -> Result<Vec<ManagedVolume>, DockerError>;

    /// Copies the seed volume into the data volume, keeping owners, modes and times, in `image`
    /// (the service's own, so nothing else needs to be on the host).
    async fn copy_volume(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        service: &ServiceName,
        image: &str,
        seed: &VolumeName,
        volume: &str,
    ) -> Result<(), DockerError>;
}

/// The preview networks (which network a preview gets, and when, is `crate::network`'s).
#[async_trait]
pub trait Networking: Send + Sync {
    /// The name of a preview network with this bridge: `previewd.<instance>.<bridge>`.
    fn network_name(&self, instance: &InstanceName, bridge: &str) -> String {
        format!("previewd.{instance}.{bridge}")
    }

    async fn create_network(&self, spec: &NetworkSpec<'_>) -> Result<(), CreateNetworkError>;

    /// Gets a new network ready for a launch ahead of time, off any launch's path (on a Swarm:
    /// set up on the nodes). Nothing to do on one engine.
    async fn prepare_network(&self, _name: &str) -> Result<(), DockerError> {
        Ok(())
    }

    /// Whether a network of that name exists (someone may have pruned it).
    async fn network_exists(&self, name: &str) -> Result<bool, DockerError>;

    /// Removes a network; one that is already gone is fine.
    async fn remove_network(&self, name: &str) -> Result<(), DockerError>;

    /// This instance's networks.
    async fn list_networks(&self) -> Result<Vec<ManagedNetwork>, DockerError>;

    /// The IPv4 subnets of every network on the engine, previewd's or not.
    async fn used_subnets(&self) -> Result<Vec<Ipv4Net>, DockerError>;
}

/// Images built from a preview's source, and the disk they take.
#[async_trait]
pub trait Images: Send + Sync {
    /// Builds the context (a tar file) and returns the built image's id; each line of the
    /// build's output goes to `on_output` as it comes. Dropping the future stops the build. The
    /// image carries no label of previewd's yet (see `label_image`).
    async fn build_image(
        &self,
        plan: &BuildPlan<'_>,
        context: tokio::fs::File,
        on_output: &mut (dyn FnMut(BuildOutput) + Send),
    ) -> Result<String, BuildError>;

    /// Writes `tag`: the image `built` with previewd's labels for `slug`, without a build step
    /// (a new image config over the same layers). `built` stays, as the next build's layer
    /// cache, and goes with the labelled image. Refused with `BuildError::ReservedLabels` when
    /// the built image sets labels previewd reads off containers.
    async fn label_image(&self, built: &str, slug: &Slug, tag: &str) -> Result<(), BuildError>;

    /// Gives an image one more tag (no build step: the engine only records the name).
    async fn tag_image(&self, image: &str, tag: &str) -> Result<(), DockerError>;

    /// Every image this instance built, newest first.
    async fn built_images(&self) -> Result<Vec<BuiltImage>, DockerError>;

    /// Removes an image by tag or id; one already gone, or still used by a container, is left.
    async fn remove_image(&self, reference: &str) -> Result<(), DockerError>;

    /// Removes a built image: each of its tags, then its build's own image (the layer cache)
    /// unless another of `others` was labelled from the same one.
    async fn remove_built(&self, image: &BuiltImage, others: &[BuiltImage]) -> Result<(), DockerError>;

    /// Removes the untagged layers builds of this instance left (a failed or stopped build's
    /// last step, an image whose tag moved), but none of a preview in `building` (a build in
    /// flight has untagged step images too); how many images went.
    async fn prune_build_leftovers(&self, leftovers: &[String], building: &[Slug]) -> Result<usize, DockerError>;

    /// The bytes this instance's built images add to their base images, and the free bytes on
    /// the engine's disk (`None` when it cannot be read from here).
    async fn disk(&self) -> Result<DiskUsage, DockerError>;

    /// The free bytes on the engine's disk alone (cheap, unlike the images' sizes).
    async fn free_disk(&self) -> Option<u64>;
}

/// One build to run.
pub struct BuildPlan<'a> {
    pub slug: &'a Slug,
    /// Path of the Dockerfile inside the context.
    pub dockerfile: &'a str,
    pub args: &'a std::collections::BTreeMap<String, String>,
    pub cpu_shares: i64,
    pub memory: i64,
    /// The network the `RUN` steps join; `None`: the engine's default bridge.
    pub network: Option<&'a str>,
}

/// A line of a build's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildOutput {
    /// `Step 2/5 : RUN make`: a Dockerfile step begins.
    Step(String),
    /// Any other line.
    Line(String),
    /// An image a step produced (kept to remove the leftovers of a build that does not finish).
    Layer(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{step} failed: {message}")]
    StepFailed { step: String, message: String },
    /// The built image sets labels previewd reads off containers (they would reach the
    /// preview's containers, which inherit an image's labels).
    #[error("the image sets labels previewd reserves: {}", .0.join(", "))]
    ReservedLabels(Vec<String>),
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// An image previewd built.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub id: String,
    pub tags: Vec<String>,
    pub slug: Option<Slug>,
    /// Unix seconds.
    pub created: i64,
    /// The image the build produced, before previewd labelled it: the layer cache of the next
    /// build of the preview.
    pub cache: Option<String>,
    /// The bytes the build added to its base image.
    pub added_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct DiskUsage {
    /// `None` when the engine cannot say.
    pub images_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
}

/// What went wrong talking to the engine. Both engines previewd drives are Docker's (one
/// engine, or a Swarm's manager), hence the name.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine ({0}); is dockerd running?")]
    Unreachable(String),
    #[error("image {image} is not on this host and its pull policy is `never`: build or load it first")]
    ImageMissing { image: String },
    #[error("cannot pull image {image}: {message}")]
    PullFailed { image: String, message: String },
    #[error("Docker could not {action}: {message}")]
    Api { action: &'static str, message: String },
    /// A Swarm node would not run the task (most often: the image is not on it).
    #[error(
        "a node of the Swarm refused to run the preview: {reason}; put the image on every node runtime.constraints \
         allows (or in a registry they pull from), see README \"Run on a Swarm\""
    )]
    Refused { reason: String },
    /// The loopback port chosen for the container was taken before Docker bound it.
    #[error("Docker could not publish the container on 127.0.0.1:{port}: {message}")]
    PortInUse { port: u16, message: String },
    #[error("cannot find a free port on 127.0.0.1 for the container: {0}")]
    NoFreePort(String),
}

/// The engine's version and storage, as `docker version` and `docker info` tell them.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub version: String,
    pub api_version: String,
    pub storage_driver: String,
    /// Where the engine keeps images and containers, on the engine's host.
    pub data_root: String,
}

/// A container of this instance, as its labels and Docker's state describe it.
#[derive(Debug, Clone)]
pub struct ManagedContainer {
    pub id: String,
    pub slug: Slug,
    pub image: ImageKey,
    pub state: PreviewState,
    /// Where nginx reaches the routed container port, while running: 127.0.0.1 and the port
    /// previewd published it on, or on a Swarm the address of the task's node.
    pub upstream: Option<SocketAddr>,
    /// Unix seconds.
    pub created: i64,
    /// Unix nanoseconds, for ordering.
    pub created_ns: u128,
    pub origin: Option<PullRequestOrigin>,
    pub owner: Option<Owner>,
    /// The preview's own network, when it has one.
    pub network: Option<String>,
    pub role: Role,
    /// Of a service: the digest of the definition it was made from.
    pub digest: Option<String>,
}

impl ManagedContainer {
    pub fn is_running(&self) -> bool {
        self.state == PreviewState::Running
    }
}

/// How a started container is doing.
#[derive(Debug, Clone)]
pub struct ContainerStatus {
    pub running: bool,
    pub exit_code: Option<i64>,
}

/// Everything needed to create one preview container.
#[derive(Clone)]
pub struct ContainerPlan<'a> {
    pub slug: &'a Slug,
    pub image_key: &'a ImageKey,
    pub spec: &'a ImageSpec,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub origin: Option<&'a PullRequestOrigin>,
    pub owner: Option<&'a Owner>,
    /// The preview's own network; `None`: Docker's default bridge.
    pub network: Option<&'a str>,
}

/// A container just created, and the port it will be published on once started.
pub struct CreatedContainer {
    pub id: String,
    pub host_port: u16,
    /// Where nginx will reach it, when that is known before the start (on one engine:
    /// 127.0.0.1); `None` on a Swarm, whose scheduler picks the node at the start.
    pub upstream: Option<SocketAddr>,
    /// Keeps other launches off the port until the container has bound it (the engine's own
    /// reservation, dropped with this).
    _hold: Box<dyn Any + Send + Sync>,
}

impl CreatedContainer {
    /// A container published on 127.0.0.1:`host_port`.
    pub fn on_loopback(id: String, host_port: u16, hold: impl Any + Send + Sync) -> Self {
        let upstream = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)));
        Self { id, host_port, upstream, _hold: Box::new(hold) }
    }

    /// A container published on `host_port` of whichever node the engine will place it on.
    pub fn placed_at_start(id: String, host_port: u16, hold: impl Any + Send + Sync) -> Self {
        Self { id, host_port, upstream: None, _hold: Box::new(hold) }
    }
}

/// One service container to create.
pub struct ServicePlan<'a> {
    pub slug: &'a Slug,
    pub image_key: &'a ImageKey,
    pub name: &'a ServiceName,
    pub spec: &'a ServiceSpec,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub network: &'a str,
    /// The data volume mounted on `spec.data`.
    pub volume: Option<&'a str>,
}

/// One job container to create: the app's image and environment with the job's command.
pub struct JobPlan<'a> {
    pub app: ContainerPlan<'a>,
    pub job: &'a JobSpec,
}

/// How a container that was run to its end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Exited(i64),
    /// Still running when its time was up (it is left running; the caller removes it).
    TimedOut,
}

/// A data volume of this instance.
#[derive(Debug, Clone)]
pub struct ManagedVolume {
    pub name: String,
    pub slug: Slug,
    pub service: ServiceName,
}

/// A network to create.
pub struct NetworkSpec<'a> {
    pub name: &'a str,
    pub bridge: &'a str,
    pub subnet: Ipv4Net,
}

/// A network of this instance, as the engine lists it.
#[derive(Debug, Clone)]
pub struct ManagedNetwork {
    pub name: String,
    pub bridge: Option<String>,
}

/// Why a network could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateNetworkError {
    /// Another network (of another daemon, or made by hand) took the subnet meanwhile.
    #[error("the subnet is taken: {0}")]
    SubnetTaken(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
}
