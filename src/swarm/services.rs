//! The apps of previews as Swarm services: create, start (scale to one, wait until it runs),
//! stop (scale to zero), restart, status, logs, removal, listing by labels, and the changes
//! the Swarm makes by itself (a task rescheduled to another node), found by polling: the
//! manager's event stream tells of services, not of where their tasks run.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};

use bollard::models::{Service, TaskState};
use bollard::query_parameters::{ListContainersOptions, LogsOptions};

use super::spec::{self, TaskView};
use super::{LABEL_UP, SwarmRuntime};
use crate::docker::labels::*;
use crate::docker::{is_not_found, unix_nanos};
use crate::preview::{ImageKey, Role, Slug};
use crate::runtime::{ContainerPlan, ContainerStatus, Containers, CreatedContainer, DockerError, ManagedContainer};

/// How long a started service may wait for a node before the start fails.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest pause between two looks at a starting task (each is two cheap calls to the
/// manager; a task starts within a second).
const PLACEMENT_POLL: Duration = Duration::from_millis(20);
/// How long `placement` waits for the scheduler (which places a task within tens of
/// milliseconds when a node can take it), and how often it looks.
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(5);
const ASSIGNMENT_POLL: Duration = Duration::from_millis(10);
/// How often the Swarm is asked where the previews' tasks run (see `container_changes`).
const CHANGES_POLL: Duration = Duration::from_secs(1);
/// How long a removal waits for the Swarm to remove the service's containers (they stop
/// within their grace period).
const CONTAINERS_GONE: Duration = Duration::from_secs(30);
/// How long a log read may take: a node that went away does not answer.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);

impl SwarmRuntime {
    /// The ids of the service's tasks now: those `placed` is not to wait for.
    pub(super) async fn task_ids(&self, id: &str) -> Result<HashSet<String>, DockerError> {
        let tasks = self.tasks_of(&[id.to_owned()]).await?.remove(id).unwrap_or_default();
        Ok(tasks.into_iter().map(|task| task.id).collect())
    }

    /// Waits until a task of the service that is not one of `earlier` runs (its container has
    /// started), or has failed (the health wait then reports the crash); where nginx will reach
    /// it. Not sooner: a connection to the node's published port before the container's network
    /// is up is taken by Docker's proxy and answered only after a SYN retransmission, a second
    /// later. A task a node refuses (the image is not there) fails the start at once, with
    /// Swarm's reason.
    pub(super) async fn placed(
        &self,
        id: &str,
        port: u16,
        earlier: &HashSet<String>,
    ) -> Result<SocketAddr, DockerError> {
        let deadline = Instant::now() + PLACEMENT_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            let tasks = self.tasks_of(&[id.to_owned()]).await?.remove(id).unwrap_or_default();
            let fresh: Vec<&TaskView> = tasks.iter().filter(|task| !earlier.contains(&task.id)).collect();
            if let Some(task) = fresh.iter().find(|task| task.state == Some(TaskState::REJECTED)) {
                return Err(DockerError::Refused { reason: task.message.clone() });
            }
            let started = fresh.iter().filter(|task| task.is_running() || task.has_failed());
            if let Some(node) = started.filter_map(|task| task.node.as_deref()).next()
                && let Some(ip) = self.node_addresses().await?.get(node)
            {
                tracing::debug!(service = id, node, "the task runs");
                return Ok(SocketAddr::new(*ip, port));
            }
            if Instant::now() >= deadline {
                // Swarm's own words for the newest task: why no node takes it.
                let newest = fresh.iter().max_by_key(|task| task.created_ns);
                let why = newest.map(|task| format!("{:?}: {}", task.state, task.message));
                let message = why.unwrap_or_else(|| "Swarm made no task for it".to_owned());
                return Err(DockerError::Api { action: "place the preview on a node", message });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PLACEMENT_POLL);
        }
    }

    /// Whether previewd built `image` on the manager's engine.
    async fn built_here(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(inspect.config.and_then(|c| c.labels).is_some_and(|l| l.contains_key(LABEL_BUILT))),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(DockerError::from_bollard("inspect the image", err)),
        }
    }

    /// Waits (at most `CONTAINERS_GONE`) until no container of the removed service is left on
    /// the manager's engine.
    async fn wait_for_containers_gone(&self, id: &str) -> Result<(), DockerError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("com.docker.swarm.service.id={id}")])]);
        let deadline = Instant::now() + CONTAINERS_GONE;
        loop {
            let options = ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() };
            let left = self
                .docker
                .list_containers(Some(options))
                .await
                .map_err(|err| DockerError::from_bollard("list containers", err))?;
            if left.is_empty() || Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The published port of a service (the one port previewd gave it).
    fn published_port(service: &Service) -> Option<u16> {
        let ports = service.spec.as_ref()?.endpoint_spec.as_ref()?.ports.as_ref()?;
        u16::try_from(ports.first()?.published_port?).ok()
    }

    pub(super) fn replicas(service: &Service) -> i64 {
        let mode = service.spec.as_ref().and_then(|spec| spec.mode.as_ref());
        mode.and_then(|mode| mode.replicated.as_ref()?.replicas).unwrap_or(0)
    }

    async fn mark_up(&self, id: &str) -> Result<(), DockerError> {
        self.update(id, |spec| {
            spec.labels.get_or_insert_default().insert(LABEL_UP.to_owned(), "true".to_owned());
        })
        .await
    }

    /// These services as previewd's containers: one task list and one node list for all.
    async fn describe(&self, services: Vec<Service>) -> Result<Vec<ManagedContainer>, DockerError> {
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = services.iter().filter_map(|service| service.id.clone()).collect();
        let mut tasks = self.tasks_of(&ids).await?;
        let nodes = self.node_addresses().await?;
        let mut containers: Vec<ManagedContainer> = services
            .into_iter()
            .filter_map(|service| {
                let tasks = service.id.as_ref().and_then(|id| tasks.remove(id)).unwrap_or_default();
                managed_service(service, &tasks, &nodes)
            })
            .collect();
        containers.sort_by_key(|c| c.created_ns);
        Ok(containers)
    }

    /// Every service of the instance (of one preview), whatever its role.
    async fn list_all_services(&self, slug: Option<&Slug>) -> Result<Vec<ManagedContainer>, DockerError> {
        self.describe(self.services(slug).await?).await
    }

    /// Where each preview's tasks run, as a comparable text per preview.
    async fn placements(&self) -> Result<HashMap<Slug, String>, DockerError> {
        let mut placements: HashMap<Slug, String> = HashMap::new();
        for container in self.describe(self.services(None).await?).await? {
            let upstream = container.upstream.map_or_else(String::new, |upstream| upstream.to_string());
            let entry = placements.entry(container.slug).or_default();
            entry.push_str(&format!("{} {} {upstream};", container.id, container.state));
        }
        Ok(placements)
    }
}

/// A job or a seed copy: a plain container of the manager's engine. The engine also lists the
/// containers of Swarm's tasks, which carry the labels of their service: those are not parts.
fn is_engine_part(container: &ManagedContainer) -> bool {
    matches!(container.role, Role::Job(_) | Role::SeedCopy(_))
}

/// Reads a service back from its labels; one whose labels were tampered with is skipped.
fn managed_service(
    service: Service,
    tasks: &[TaskView],
    nodes: &HashMap<String, std::net::IpAddr>,
) -> Option<ManagedContainer> {
    let port = SwarmRuntime::published_port(&service);
    let replicas = SwarmRuntime::replicas(&service);
    let labels = service.spec?.labels.unwrap_or_default();
    let slug = Slug::parse(labels.get(LABEL_SLUG)?).ok()?;
    let image = ImageKey::parse(labels.get(LABEL_IMAGE)?).ok()?;
    let role = role(&labels)?;
    let created_ns: u128 = labels.get(LABEL_CREATED).and_then(|ns| ns.parse().ok()).unwrap_or_default();
    let (state, node) = spec::service_state(replicas, labels.contains_key(LABEL_UP), tasks);
    let upstream = match (node, port) {
        (Some(node), Some(port)) => nodes.get(node).map(|ip| SocketAddr::new(*ip, port)),
        _ => None,
    };
    let (origin, owner) = origin(&labels);
    Some(ManagedContainer {
        id: service.id?,
        slug,
        image,
        state,
        upstream,
        created: i64::try_from(created_ns / 1_000_000_000).unwrap_or_default(),
        created_ns,
        origin,
        owner,
        network: labels.get(LABEL_NETWORK).cloned(),
        role,
        digest: labels.get(LABEL_DIGEST).cloned(),
    })
}

#[async_trait]
impl Containers for SwarmRuntime {
    /// Creates the app's service with one replica: Swarm places it at once, and `start`
    /// waits for the node.
    async fn create(&self, plan: ContainerPlan<'_>) -> Result<CreatedContainer, DockerError> {
        let taken = self.taken_ports().await?;
        let hold = self.reserve_port(&taken)?;
        let name = spec::service_name(&self.instance, plan.slug.as_ref(), rand::random());
        let labels = spec::app_labels(&self.instance, &plan, unix_nanos());
        // An environment's app goes where its services and their data are; an image built from
        // source is on the manager only (there is no registry to take it to the other nodes).
        let built = self.built_here(&plan.spec.image).await?;
        let constraints =
            if plan.spec.services.is_empty() && !built { self.constraints.to_vec() } else { self.on_manager() };
        let service = spec::app_service(name, labels, &plan, plan.network, hold.port, &constraints);
        let id = self.create_spec(service, "create the service").await?;
        tracing::debug!(service = id, "service created");
        let port = hold.port;
        Ok(CreatedContainer::placed_at_start(id, port, hold))
    }

    /// Scales the service to one replica (when it was scaled to none) and waits for its node.
    async fn start(&self, container: &CreatedContainer) -> Result<SocketAddr, DockerError> {
        let service = self
            .service(&container.id)
            .await?
            .ok_or_else(|| DockerError::Api { action: "start the service", message: "it is gone".to_owned() })?;
        let mut earlier = HashSet::new();
        if Self::replicas(&service) == 0 {
            earlier = self.task_ids(&container.id).await?;
            self.scale(&container.id, 1).await?;
        }
        let upstream = self.placed(&container.id, container.host_port, &earlier).await?;
        let network = service.spec.and_then(|spec| spec.labels?.remove(LABEL_NETWORK));
        if let Some(network) = network {
            self.release_later(&network);
        }
        Ok(upstream)
    }

    /// The node the scheduler gave the service's task, which `start` then waits to run there
    /// (the start fails if no node takes it; this then says `None`).
    async fn placement(&self, container: &CreatedContainer) -> Result<Option<SocketAddr>, DockerError> {
        let id = container.id.as_str();
        let deadline = Instant::now() + ASSIGNMENT_TIMEOUT;
        loop {
            let tasks = self.tasks_of(&[id.to_owned()]).await?.remove(id).unwrap_or_default();
            if let Some(node) = spec::assigned_node(&tasks) {
                tracing::debug!(service = id, node, "the scheduler placed the task");
                let ip = self.node_addresses().await?.get(node).copied();
                return Ok(ip.map(|ip| SocketAddr::new(ip, container.host_port)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(ASSIGNMENT_POLL).await;
        }
    }

    /// Swarm itself starts a task again elsewhere when its port is taken on one node.
    async fn recreate(&self, _id: &str) -> Result<Option<CreatedContainer>, DockerError> {
        Ok(None)
    }

    async fn ensure_kept_running(&self, id: &str) -> Result<bool, DockerError> {
        let Some(service) = self.service(id).await? else { return Ok(false) };
        let up = service.spec.as_ref().and_then(|spec| spec.labels.as_ref()).is_some_and(|l| l.contains_key(LABEL_UP));
        if !up {
            self.mark_up(id).await?;
        }
        Ok(true)
    }

    /// Swarm restarts the app's task whatever happens (restart condition `any`); what changes
    /// is that a task not running is from now on one on its way back.
    async fn keep_running(&self, id: &str) -> Result<(), DockerError> {
        self.mark_up(id).await
    }

    async fn container_env(&self, id: &str) -> Result<Vec<String>, DockerError> {
        let service = self.service(id).await?;
        let container = service.and_then(|s| s.spec?.task_template?.container_spec);
        Ok(container.and_then(|c| c.env).unwrap_or_default())
    }

    /// The id, on the manager, of the image the service names (a built preview's is there);
    /// the name itself when the manager does not have it. Unlike a container, a service keeps
    /// the name, not the id: a tag moved since (two pull requests at one commit share a built
    /// image's tag) gives the image it names now.
    async fn container_image(&self, id: &str) -> Result<String, DockerError> {
        let service = self.service(id).await?;
        let container = service.and_then(|s| s.spec?.task_template?.container_spec);
        let Some(image) = container.and_then(|c| c.image) else { return Ok(String::new()) };
        match self.docker.inspect_image(&image).await {
            Ok(inspect) => Ok(inspect.id.unwrap_or(image)),
            Err(err) if is_not_found(&err) => Ok(image),
            Err(err) => Err(DockerError::from_bollard("inspect the image", err)),
        }
    }

    async fn stopped_app(&self, id: &str) -> Result<Option<CreatedContainer>, DockerError> {
        let Some(service) = self.service(id).await? else { return Ok(None) };
        Ok(Self::published_port(&service).map(|port| CreatedContainer::placed_at_start(id.to_owned(), port, ())))
    }

    /// Scales the service to none and waits until its task has ended (Swarm gives it the
    /// service's own grace period).
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        self.scale(id, 0).await?;
        let deadline = Instant::now() + grace + Duration::from_secs(10);
        loop {
            let tasks = self.tasks_of(&[id.to_owned()]).await?.remove(id).unwrap_or_default();
            if !tasks.iter().any(|task| task.is_running() || task.is_coming_up()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DockerError::Api {
                    action: "stop the service",
                    message: "its task is still running".to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A forced update: Swarm stops the task and starts a new one (stop-first), maybe on
    /// another node.
    async fn restart(&self, id: &str, _grace: Duration) -> Result<SocketAddr, DockerError> {
        let earlier = self.task_ids(id).await?;
        self.update(id, |spec| {
            if let Some(task) = spec.task_template.as_mut() {
                task.force_update = Some(task.force_update.unwrap_or(0) + 1);
            }
        })
        .await?;
        let service = self
            .service(id)
            .await?
            .ok_or_else(|| DockerError::Api { action: "restart the service", message: "it is gone".to_owned() })?;
        let port = Self::published_port(&service).unwrap_or_default();
        self.placed(id, port, &earlier).await
    }

    /// Not running when scaled to none, when no task runs, or when a task failed since the
    /// service last changed (a crash Swarm is about to retry is still a crash to a launch).
    async fn status(&self, id: &str) -> Result<Option<ContainerStatus>, DockerError> {
        let Some(service) = self.service(id).await? else { return self.engine.status(id).await };
        if Self::replicas(&service) == 0 {
            return Ok(Some(ContainerStatus { running: false, exit_code: None }));
        }
        let tasks = self.tasks_of(&[id.to_owned()]).await?.remove(id).unwrap_or_default();
        if let Some(exit_code) = spec::crashed(&tasks) {
            return Ok(Some(ContainerStatus { running: false, exit_code }));
        }
        let running = tasks.iter().any(|task| task.wanted && (task.is_running() || task.is_coming_up()));
        Ok(Some(ContainerStatus { running, exit_code: None }))
    }

    async fn logs_tail(&self, id: &str, lines: usize) -> String {
        if matches!(self.service(id).await, Ok(None)) {
            return self.engine.logs_tail(id, lines).await;
        }
        let options = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
        let read = self.docker.service_logs(id, Some(options)).collect::<Vec<_>>();
        let chunks = tokio::time::timeout(LOG_TIMEOUT, read).await.unwrap_or_default();
        chunks
            .into_iter()
            .filter_map(Result::ok)
            .map(|chunk| String::from_utf8_lossy(&chunk.into_bytes()).into_owned())
            .collect()
    }

    fn log_stream(&self, id: &str, tail: usize, follow: bool) -> BoxStream<'static, Result<Bytes, DockerError>> {
        let options = LogsOptions { stdout: true, stderr: true, follow, tail: tail.to_string(), ..Default::default() };
        self.docker
            .service_logs(id, Some(options))
            .map_ok(|chunk| chunk.into_bytes())
            .map_err(|err| DockerError::from_bollard("read the service's log", err))
            .boxed()
    }

    /// Removes the service, and waits until the manager's engine has removed its containers
    /// (an environment's data volume can go only then); a job's container is removed at once.
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        match self.docker.delete_service(id).await {
            Ok(()) => self.wait_for_containers_gone(id).await,
            Err(err) if is_not_found(&err) => self.engine.remove(id).await,
            Err(err) => Err(DockerError::from_bollard("remove the service", err)),
        }
    }

    /// The previews whose tasks the Swarm started, stopped or moved since the last look, once
    /// a second: a task rescheduled to another node is re-routed from here.
    fn container_changes(&self) -> BoxStream<'static, Result<Slug, DockerError>> {
        struct Poll {
            runtime: SwarmRuntime,
            seen: Option<HashMap<Slug, String>>,
            changed: VecDeque<Slug>,
        }
        let start = Poll { runtime: self.clone(), seen: None, changed: VecDeque::new() };
        futures_util::stream::unfold(start, |mut poll| async move {
            loop {
                if let Some(slug) = poll.changed.pop_front() {
                    return Some((Ok(slug), poll));
                }
                if poll.seen.is_some() {
                    tokio::time::sleep(CHANGES_POLL).await;
                }
                let now = match poll.runtime.placements().await {
                    Ok(now) => now,
                    Err(err) => return Some((Err(err), poll)),
                };
                if let Some(seen) = &poll.seen {
                    let gone = seen.keys().filter(|slug| !now.contains_key(*slug));
                    let moved = now.iter().filter(|(slug, text)| seen.get(*slug) != Some(*text)).map(|(slug, _)| slug);
                    poll.changed.extend(gone.chain(moved).cloned());
                }
                poll.seen = Some(now);
            }
        })
        .boxed()
    }

    async fn list(&self) -> Result<Vec<ManagedContainer>, DockerError> {
        Ok(self.list_all_services(None).await?.into_iter().filter(|c| c.role == Role::App).collect())
    }

    async fn list_slug(&self, slug: &Slug) -> Result<Vec<ManagedContainer>, DockerError> {
        Ok(self.list_all_services(Some(slug)).await?.into_iter().filter(|c| c.role == Role::App).collect())
    }

    async fn list_all(&self) -> Result<Vec<ManagedContainer>, DockerError> {
        let mut all = self.list_all_services(None).await?;
        all.extend(self.engine.list_all().await?.into_iter().filter(is_engine_part));
        all.sort_by_key(|c| c.created_ns);
        Ok(all)
    }

    async fn list_slug_all(&self, slug: &Slug) -> Result<Vec<ManagedContainer>, DockerError> {
        let mut all = self.list_all_services(Some(slug)).await?;
        all.extend(self.engine.list_slug_all(slug).await?.into_iter().filter(is_engine_part));
        all.sort_by_key(|c| c.created_ns);
        Ok(all)
    }
}
