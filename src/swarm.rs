//! A Docker Swarm as previewd's [`Runtime`]: each preview's app is a replicated Swarm service
//! (one replica, previewd's labels on the service and its containers, published in host mode on
//! a port previewd picks, stop-first updates), reached by nginx at the address of the node that
//! runs its task. Service labels are the record of what runs, as container labels are on one
//! engine; the tasks say where. Images and builds stay the manager engine's
//! ([`DockerRuntime`]); preview networks are attachable overlays that span the nodes. No
//! bollard type leaves this module.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    Ipam, IpamConfig, NetworkCreateRequest, Node, NodeSpecAvailabilityEnum, NodeState, Service, ServiceSpec, Task,
    TaskState,
};
use bollard::query_parameters::{ListNodesOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions};

use crate::config::PullPolicy;
use crate::config::runtime::Holder;
use crate::docker::labels::*;
use crate::docker::{DockerRuntime, is_not_found};
use crate::preview::{InstanceName, Slug};
use crate::runtime::*;

mod environment;
mod holders;
mod services;
mod spec;

use spec::TaskView;

/// The label previewd puts on a service once its app has answered (a service's own labels,
/// not its tasks', so setting it restarts nothing): from then on a task that is not running is
/// on its way back, not a launch that failed.
const LABEL_UP: &str = "previewd.up";
/// Published ports previewd hands out, below the kernel's usual ephemeral range.
const PORTS: std::ops::Range<u16> = 20000..30000;
const PORT_ATTEMPTS: usize = 50;

/// What `previewd doctor` says of the Swarm, read without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmSurvey {
    /// The engine is no Swarm manager.
    NotManager,
    /// A manager, with this many nodes, of which `usable` are ready and active.
    Manager { nodes: usize, usable: usize },
}

/// Reads whether `engine` manages a Swarm, and the state of its nodes.
pub async fn survey(engine: &DockerRuntime) -> Result<SwarmSurvey, DockerError> {
    let docker = engine.client();
    let info = docker.info().await.map_err(|err| DockerError::from_bollard("describe itself", err))?;
    if info.swarm.and_then(|swarm| swarm.control_available) != Some(true) {
        return Ok(SwarmSurvey::NotManager);
    }
    let nodes = docker
        .list_nodes(None::<ListNodesOptions>)
        .await
        .map_err(|err| DockerError::from_bollard("list the Swarm's nodes", err))?;
    let usable = nodes
        .iter()
        .filter(|node| node.status.as_ref().and_then(|status| status.state) == Some(NodeState::READY))
        .filter(|node| node.spec.as_ref().and_then(|spec| spec.availability) == Some(NodeSpecAvailabilityEnum::ACTIVE))
        .count();
    Ok(SwarmSurvey::Manager { nodes: nodes.len(), usable })
}

/// A Swarm whose manager is the engine `DOCKER_HOST` names, as previewd's runtime.
#[derive(Clone)]
pub struct SwarmRuntime {
    engine: DockerRuntime,
    docker: Docker,
    instance: InstanceName,
    constraints: Arc<Vec<String>>,
    /// The node id of the manager previewd talks to: environments run there.
    manager: String,
    /// Ports handed to launches whose service does not exist yet.
    reserved: Arc<Mutex<HashSet<u16>>>,
    /// What keeps warm networks set up on the nodes (see [`holders`]).
    holder: Option<Arc<Holder>>,
}

impl SwarmRuntime {
    /// Connects to the engine, which must be a Swarm manager, and removes the holders no warm
    /// network needs any more.
    pub async fn connect(
        instance: InstanceName,
        constraints: Vec<String>,
        holder: Option<Holder>,
    ) -> Result<Self, DockerError> {
        let engine = DockerRuntime::connect(instance.clone()).await?;
        let docker = engine.client().clone();
        let info = docker.info().await.map_err(|err| DockerError::from_bollard("describe itself", err))?;
        let swarm = info.swarm.unwrap_or_default();
        let manager = swarm.node_id.filter(|_| swarm.control_available == Some(true));
        let Some(manager) = manager else {
            return Err(DockerError::Api {
                action: "act as a Swarm manager",
                message: "runtime.kind is swarm, but this engine is not a Swarm manager: run `docker swarm init` \
                          here (or point DOCKER_HOST at a manager)"
                    .to_owned(),
            });
        };
        let runtime = Self {
            engine,
            docker,
            instance,
            constraints: Arc::new(constraints),
            manager,
            reserved: Arc::default(),
            holder: holder.map(Arc::new),
        };
        runtime.reconcile_holders().await?;
        Ok(runtime)
    }

    /// This instance's services (of one preview).
    async fn services(&self, slug: Option<&Slug>) -> Result<Vec<Service>, DockerError> {
        let mut labels = vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_INSTANCE}={}", self.instance)];
        labels.extend(slug.map(|slug| format!("{LABEL_SLUG}={slug}")));
        self.services_labelled(labels, "list services").await
    }

    /// The services that carry every one of these labels (`key` or `key=value`); `action`
    /// names the listing in an error.
    async fn services_labelled(&self, labels: Vec<String>, action: &'static str) -> Result<Vec<Service>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let options = ListServicesOptions { filters: Some(filters), ..Default::default() };
        self.docker.list_services(Some(options)).await.map_err(|err| DockerError::from_bollard(action, err))
    }

    /// Creates a service; its id. `action` names it in an error.
    async fn create_spec(&self, spec: ServiceSpec, action: &'static str) -> Result<String, DockerError> {
        let created =
            self.docker.create_service(spec, None).await.map_err(|err| DockerError::from_bollard(action, err))?;
        created.id.ok_or_else(|| DockerError::Api {
            action,
            message: "the manager answered without the service's id".to_owned(),
        })
    }

    async fn service(&self, id: &str) -> Result<Option<Service>, DockerError> {
        match self.docker.inspect_service(id, None).await {
            Ok(service) => Ok(Some(service)),
            Err(err) if is_not_found(&err) => Ok(None),
            Err(err) => Err(DockerError::from_bollard("inspect the service", err)),
        }
    }

    /// The tasks of these services, by service id.
    async fn tasks_of(&self, ids: &[String]) -> Result<HashMap<String, Vec<TaskView>>, DockerError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let options = ListTasksOptions { filters: Some(HashMap::from([("service".to_owned(), ids.to_vec())])) };
        let tasks =
            self.docker.list_tasks(Some(options)).await.map_err(|err| DockerError::from_bollard("list tasks", err))?;
        let mut by_service: HashMap<String, Vec<TaskView>> = HashMap::new();
        for task in tasks {
            if let Some(service) = task.service_id.clone() {
                by_service.entry(service).or_default().push(task_view(task));
            }
        }
        Ok(by_service)
    }

    /// The address of every node, by node id.
    async fn node_addresses(&self) -> Result<HashMap<String, IpAddr>, DockerError> {
        let nodes = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(|err| DockerError::from_bollard("list the Swarm's nodes", err))?;
        Ok(nodes.into_iter().filter_map(|node| Some((node.id.clone()?, node_address(&node)?))).collect())
    }

    /// Sets the replicas of a service; a service that is gone is left.
    async fn scale(&self, id: &str, replicas: i64) -> Result<(), DockerError> {
        self.update(id, |spec| {
            if let Some(replicated) = spec.mode.as_mut().and_then(|mode| mode.replicated.as_mut()) {
                replicated.replicas = Some(replicas);
            }
        })
        .await
    }

    /// Reads a service, changes its spec and writes it back at the version read (Swarm refuses
    /// a write over a newer version: the change is then made again on the newer one).
    async fn update(&self, id: &str, change: impl Fn(&mut ServiceSpec)) -> Result<(), DockerError> {
        for _ in 0..3 {
            let Some(service) = self.service(id).await? else { return Ok(()) };
            let version = service.version.and_then(|v| v.index).unwrap_or_default();
            let mut spec = service.spec.unwrap_or_default();
            change(&mut spec);
            let options =
                UpdateServiceOptions { version: i32::try_from(version).unwrap_or(i32::MAX), ..Default::default() };
            match self.docker.update_service(id, spec, options, None).await {
                Ok(_) => return Ok(()),
                Err(err) if is_not_found(&err) => return Ok(()),
                Err(err) if is_out_of_sequence(&err) => continue,
                Err(err) => return Err(DockerError::from_bollard("update the service", err)),
            }
        }
        Err(DockerError::Api { action: "update the service", message: "it kept changing under previewd".to_owned() })
    }

    /// The published ports of every service on the Swarm (previewd's or not): a host-mode port
    /// taken twice on one node would leave the second task failing there.
    async fn taken_ports(&self) -> Result<HashSet<u16>, DockerError> {
        let services = self
            .docker
            .list_services(None::<ListServicesOptions>)
            .await
            .map_err(|err| DockerError::from_bollard("list services", err))?;
        Ok(services
            .iter()
            .filter_map(|service| service.spec.as_ref()?.endpoint_spec.as_ref()?.ports.as_ref())
            .flatten()
            .filter_map(|port| u16::try_from(port.published_port?).ok())
            .collect())
    }

    fn reserve_port(&self, taken: &HashSet<u16>) -> Result<PortHold, DockerError> {
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..PORT_ATTEMPTS {
            let port = rand::random_range(PORTS);
            if !taken.contains(&port) && reserved.insert(port) {
                return Ok(PortHold { port, reserved: Arc::clone(&self.reserved) });
            }
        }
        Err(DockerError::NoFreePort(format!(
            "{PORT_ATTEMPTS} ports tried between {} and {} were all published by services of the Swarm",
            PORTS.start, PORTS.end
        )))
    }
}

/// Keeps a port off other launches until the service that publishes it exists.
struct PortHold {
    port: u16,
    reserved: Arc<Mutex<HashSet<u16>>>,
}

impl Drop for PortHold {
    fn drop(&mut self) {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.port);
    }
}

fn is_out_of_sequence(err: &BollardError) -> bool {
    matches!(err, BollardError::DockerResponseServerError { message, .. } if message.contains("out of sequence"))
}

/// Where a node is reached: its own address, or (a manager that reports 0.0.0.0) the address it
/// advertises to the other managers.
fn node_address(node: &Node) -> Option<IpAddr> {
    let own = node.status.as_ref()?.addr.as_deref().and_then(|addr| addr.parse::<IpAddr>().ok());
    let advertised = || {
        let addr = node.manager_status.as_ref()?.addr.as_deref()?;
        addr.parse::<SocketAddr>().ok().map(|addr| addr.ip())
    };
    own.filter(|ip| !ip.is_unspecified()).or_else(advertised)
}

fn unix_ns(date: Option<&String>) -> i128 {
    date.and_then(|text| text.parse::<jiff::Timestamp>().ok()).map_or(0, |at| at.as_nanosecond())
}

fn task_view(task: Task) -> TaskView {
    let status = task.status.unwrap_or_default();
    TaskView {
        id: task.id.unwrap_or_default(),
        state: status.state,
        wanted: matches!(task.desired_state, Some(TaskState::RUNNING | TaskState::READY)),
        node: task.node_id,
        created_ns: unix_ns(task.created_at.as_ref()),
        exit_code: status.container_status.as_ref().and_then(|container| container.exit_code),
        message: status.err.or(status.message).unwrap_or_default(),
        container: status.container_status.and_then(|container| container.container_id),
    }
}

#[async_trait]
impl Engine for SwarmRuntime {
    async fn engine(&self) -> Result<EngineInfo, DockerError> {
        self.engine.engine().await
    }

    async fn ping(&self) -> Result<(), DockerError> {
        self.engine.ping().await
    }

    /// Whether the image is in the manager's store: each node that may run a preview needs it
    /// too (from a registry, or loaded there), which the manager cannot see.
    async fn has_image(&self, image: &str) -> Result<bool, DockerError> {
        self.engine.has_image(image).await
    }

    async fn image_needs_pull(&self, image: &str, pull: PullPolicy) -> Result<bool, DockerError> {
        self.engine.image_needs_pull(image, pull).await
    }

    async fn pull(&self, image: &str) -> Result<(), DockerError> {
        self.engine.pull(image).await
    }
}

#[async_trait]
impl Images for SwarmRuntime {
    async fn build_image(
        &self,
        plan: &BuildPlan<'_>,
        context: tokio::fs::File,
        on_output: &mut (dyn FnMut(BuildOutput) + Send),
    ) -> Result<String, BuildError> {
        self.engine.build_image(plan, context, on_output).await
    }

    async fn label_image(&self, built: &str, slug: &Slug, tag: &str) -> Result<(), BuildError> {
        self.engine.label_image(built, slug, tag).await
    }

    async fn tag_image(&self, image: &str, tag: &str) -> Result<(), DockerError> {
        self.engine.tag_image(image, tag).await
    }

    async fn built_images(&self) -> Result<Vec<BuiltImage>, DockerError> {
        self.engine.built_images().await
    }

    async fn remove_image(&self, reference: &str) -> Result<(), DockerError> {
        self.engine.remove_image(reference).await
    }

    async fn remove_built(&self, image: &BuiltImage, others: &[BuiltImage]) -> Result<(), DockerError> {
        self.engine.remove_built(image, others).await
    }

    async fn prune_build_leftovers(&self, leftovers: &[String], building: &[Slug]) -> Result<usize, DockerError> {
        self.engine.prune_build_leftovers(leftovers, building).await
    }

    async fn disk(&self) -> Result<DiskUsage, DockerError> {
        self.engine.disk().await
    }

    async fn free_disk(&self) -> Option<u64> {
        self.engine.free_disk().await
    }
}

#[async_trait]
impl Networking for SwarmRuntime {
    /// Swarm takes network names that are DNS name components: no dots.
    fn network_name(&self, instance: &InstanceName, bridge: &str) -> String {
        format!("previewd_{instance}_{bridge}")
    }

    /// An attachable overlay network on the subnet: it spans the nodes, so a preview's tasks
    /// reach each other wherever they run, and no other preview's.
    async fn create_network(&self, spec: &NetworkSpec<'_>) -> Result<(), CreateNetworkError> {
        let gateway = spec.subnet.hosts().next().map(|ip| ip.to_string());
        let request = NetworkCreateRequest {
            name: spec.name.to_owned(),
            driver: Some("overlay".to_owned()),
            attachable: Some(true),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig { subnet: Some(spec.subnet.to_string()), gateway, ..Default::default() }]),
                ..Default::default()
            }),
            labels: Some(instance_labels(self.instance.as_ref())),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(BollardError::DockerResponseServerError { message, .. }) if message.contains("overlap") => {
                Err(CreateNetworkError::SubnetTaken(message))
            }
            Err(err) => Err(DockerError::from_bollard("create a network", err).into()),
        }
    }

    async fn network_exists(&self, name: &str) -> Result<bool, DockerError> {
        self.engine.network_exists(name).await
    }

    /// Holds the network on the nodes, so that a launch on it does not wait for Swarm to set
    /// it up there.
    async fn prepare_network(&self, name: &str) -> Result<(), DockerError> {
        self.hold(name).await
    }

    /// Its holder goes first: Swarm removes no network a task is attached to.
    async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        if self.release(name).await? {
            self.remove_released(name).await
        } else {
            self.engine.remove_network(name).await
        }
    }

    /// An overlay has no bridge of its own: its name ends with the one previewd gave it, which
    /// tells the start-up reconcile that it is a network of the warm pool.
    async fn list_networks(&self) -> Result<Vec<ManagedNetwork>, DockerError> {
        let mut networks = self.engine.list_networks().await?;
        for network in &mut networks {
            network.bridge = network.name.rsplit_once('_').map(|(_, bridge)| bridge.to_owned());
        }
        Ok(networks)
    }

    async fn used_subnets(&self) -> Result<Vec<ipnet::Ipv4Net>, DockerError> {
        self.engine.used_subnets().await
    }
}
