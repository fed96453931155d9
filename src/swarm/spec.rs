//! The pure half of the Swarm runtime: the service spec of a preview's app (from the same plan
//! a container is made from) and what a service's tasks say of its state and node.

use std::collections::HashMap;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, EndpointSpec,
    EndpointSpecModeEnum, Limit, Mount, MountTmpfsOptions, MountType, NetworkAttachmentConfig, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecUpdateConfig, ServiceSpecUpdateConfigOrderEnum, TaskSpec,
    TaskSpecContainerSpec, TaskSpecLogDriver, TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};

use crate::config::runtime::Holder;
use crate::docker::labels::*;
use crate::docker::{LOG_MAX_FILES, LOG_MAX_SIZE, capabilities};
use crate::preview::{InstanceName, PreviewState, Role};
use crate::runtime::{ContainerPlan, ServicePlan};

/// The tmpfs of a read-only app on `/tmp`, as on one engine.
const READ_ONLY_TMPFS_BYTES: i64 = 256 << 20;

/// A holder waits and does nothing else.
const HOLDER_MEMORY: i64 = 32 << 20;
const HOLDER_RESTART_DELAY_NS: i64 = 5_000_000_000;

/// Swarm's limit on a service name.
const MAX_NAME: usize = 63;
/// How long Swarm waits before it starts a crashed app again: long enough for a launch to see
/// the crash (the failed task is the newest for that long).
const RESTART_DELAY_NS: i64 = 2_000_000_000;
/// What the app gets to exit on SIGTERM when its service is scaled down or removed.
const STOP_GRACE_NS: i64 = 10_000_000_000;

/// A name that tells the instance and the preview, unique by a random suffix (a replacement
/// lives beside the service it replaces), within Swarm's 63 characters.
pub fn service_name(instance: &InstanceName, slug: &str, suffix: u32) -> String {
    let mut base = format!("previewd_{instance}_{slug}");
    base.truncate(MAX_NAME - 9);
    format!("{}_{suffix:08x}", base.trim_end_matches(['-', '_']))
}

/// The labels of a service of a preview environment, on the service and on its containers.
pub fn part_labels(instance: &InstanceName, plan: &ServicePlan<'_>, created_ns: u128) -> HashMap<String, String> {
    let mut labels = instance_labels(instance.as_ref());
    put_role(&mut labels, &Role::Service(plan.name.clone()));
    labels.insert(LABEL_SLUG.to_owned(), plan.slug.to_string());
    labels.insert(LABEL_IMAGE.to_owned(), plan.image_key.to_string());
    labels.insert(LABEL_NETWORK.to_owned(), plan.network.to_owned());
    labels.insert(LABEL_DIGEST.to_owned(), plan.spec.digest());
    labels.insert(LABEL_CREATED.to_owned(), created_ns.to_string());
    labels
}

/// The labels of a preview's app service, on the service and on its containers.
pub fn app_labels(instance: &InstanceName, plan: &ContainerPlan<'_>, created_ns: u128) -> HashMap<String, String> {
    let mut labels = instance_labels(instance.as_ref());
    put_role(&mut labels, &Role::App);
    labels.insert(LABEL_SLUG.to_owned(), plan.slug.to_string());
    labels.insert(LABEL_IMAGE.to_owned(), plan.image_key.to_string());
    labels.insert(LABEL_PORT.to_owned(), plan.spec.port.to_string());
    labels.insert(LABEL_CREATED.to_owned(), created_ns.to_string());
    if let Some(network) = plan.network {
        labels.insert(LABEL_NETWORK.to_owned(), network.to_owned());
    }
    put_origin(&mut labels, plan.origin, plan.owner);
    labels
}

/// One replica of the app, published in host mode on `port` of its node (the routing mesh
/// needs IPVS), held to the image's limits, with every capability dropped but `cap_add`.
pub fn app_service(
    name: String,
    labels: HashMap<String, String>,
    plan: &ContainerPlan<'_>,
    network: Option<&str>,
    port: u16,
    constraints: &[String],
) -> ServiceSpec {
    let spec = plan.spec;
    let container = TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        labels: Some(labels.clone()),
        args: spec.command.clone(),
        env: Some(plan.env.clone()),
        read_only: spec.read_only.then_some(true),
        mounts: spec.read_only.then(|| vec![tmp_mount()]),
        capability_drop: Some(vec!["ALL".to_owned()]),
        capability_add: Some(capabilities(spec)),
        stop_grace_period: Some(STOP_GRACE_NS),
        ..Default::default()
    };
    let limits = limits(spec.memory, spec.cpus, spec.pids);
    let task = task_spec(container, limits, constraints, network.map(|network| attachment(network, None)));
    let ports = vec![EndpointPortConfig {
        protocol: Some(EndpointPortConfigProtocolEnum::TCP),
        target_port: Some(i64::from(spec.port)),
        published_port: Some(i64::from(port)),
        publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
        ..Default::default()
    }];
    service_spec(name, labels, task, 1, ports)
}

/// A service of a preview environment: never published, reachable on the preview's network by
/// its name, its data volume (on the node it is pinned to) mounted on `data`. Created with no
/// replica: `start_part` scales it to one.
pub fn part_service(
    name: String,
    labels: HashMap<String, String>,
    plan: &ServicePlan<'_>,
    constraints: &[String],
) -> ServiceSpec {
    let spec = plan.spec;
    let data = plan.volume.zip(spec.data.as_ref()).map(|(volume, path)| Mount {
        target: Some(path.clone()),
        source: Some(volume.to_owned()),
        typ: Some(MountType::VOLUME),
        ..Default::default()
    });
    let container = TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        labels: Some(labels.clone()),
        args: spec.command.clone(),
        env: Some(plan.env.clone()),
        mounts: data.map(|mount| vec![mount]),
        capability_drop: Some(vec!["ALL".to_owned()]),
        capability_add: Some(spec.cap_add.iter().map(ToString::to_string).collect()),
        stop_grace_period: Some(STOP_GRACE_NS),
        ..Default::default()
    };
    let limits = limits(spec.memory, spec.cpus, spec.pids);
    let network = attachment(plan.network, Some(plan.name.to_string()));
    let task = task_spec(container, limits, constraints, Some(network));
    service_spec(name, labels, task, 0, Vec::new())
}

/// The holder of a network is named after it (a network has at most one holder).
pub fn holder_name(network: &str) -> String {
    let mut name = format!("{network}_hold");
    if name.len() > MAX_NAME {
        name.replace_range(MAX_NAME - 5.., "_hold");
    }
    name
}

/// A holder's labels: the instance and the network; not `previewd.managed`.
pub fn holder_labels(instance: &InstanceName, network: &str) -> HashMap<String, String> {
    HashMap::from([(LABEL_INSTANCE.to_owned(), instance.to_string()), (LABEL_HOLDS.to_owned(), network.to_owned())])
}

/// One idle task on every node the constraints allow, attached to `network`: killed rather
/// than asked to stop (a `sleep` as PID 1 ignores SIGTERM), and tried a few times at most on a
/// node that refuses it.
pub fn holder_service(
    name: String,
    labels: HashMap<String, String>,
    holder: &Holder,
    network: &str,
    constraints: &[String],
) -> ServiceSpec {
    let container = TaskSpecContainerSpec {
        image: Some(holder.image.clone()),
        labels: Some(labels.clone()),
        args: holder.command.clone(),
        read_only: Some(true),
        capability_drop: Some(vec!["ALL".to_owned()]),
        stop_signal: Some("SIGKILL".to_owned()),
        ..Default::default()
    };
    let mut task =
        task_spec(container, limits(HOLDER_MEMORY, Some(0.01), 16), constraints, Some(attachment(network, None)));
    task.restart_policy = Some(TaskSpecRestartPolicy {
        condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
        delay: Some(HOLDER_RESTART_DELAY_NS),
        max_attempts: Some(3),
        ..Default::default()
    });
    ServiceSpec {
        name: Some(name),
        labels: Some(labels),
        task_template: Some(task),
        mode: Some(ServiceSpecMode { global: Some(HashMap::new()), ..Default::default() }),
        endpoint_spec: Some(EndpointSpec { mode: Some(EndpointSpecModeEnum::DNSRR), ports: None }),
        ..Default::default()
    }
}

/// The node of the task Swarm wants running and has placed (it may still be starting there).
pub fn assigned_node(tasks: &[TaskView]) -> Option<&str> {
    let placed = tasks.iter().filter(|task| task.wanted && !task.has_failed() && task.state.is_some_and(is_placed));
    placed.max_by_key(|task| task.created_ns)?.node.as_deref()
}

/// Assigned to a node, or further on its way.
fn is_placed(state: TaskState) -> bool {
    !matches!(state, TaskState::NEW | TaskState::ALLOCATED | TaskState::PENDING)
}

/// Whether a holder's tasks have settled: on every node either one runs, or none does and one
/// was refused or failed (returned, newest per node). `None` while a node's holder is coming.
pub fn holders_settled(tasks: &[TaskView]) -> Option<Vec<&TaskView>> {
    let mut nodes: HashMap<&str, Vec<&TaskView>> = HashMap::new();
    for task in tasks {
        nodes.entry(task.node.as_deref().unwrap_or_default()).or_default().push(task);
    }
    if nodes.is_empty() {
        return None;
    }
    let mut refused = Vec::new();
    for tasks in nodes.values() {
        if tasks.iter().any(|task| task.is_running()) {
            continue;
        }
        let failed = tasks.iter().filter(|task| task.has_failed()).max_by_key(|task| task.created_ns);
        refused.push(*failed?);
    }
    Some(refused)
}

fn limits(memory: i64, cpus: Option<f64>, pids: i64) -> Limit {
    Limit { nano_cpus: cpus.map(|cpus| (cpus * 1e9).round() as i64), memory_bytes: Some(memory), pids: Some(pids) }
}

fn tmp_mount() -> Mount {
    Mount {
        target: Some("/tmp".to_owned()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(MountTmpfsOptions { size_bytes: Some(READ_ONLY_TMPFS_BYTES), ..Default::default() }),
        ..Default::default()
    }
}

fn attachment(network: &str, alias: Option<String>) -> NetworkAttachmentConfig {
    NetworkAttachmentConfig {
        target: Some(network.to_owned()),
        aliases: alias.map(|alias| vec![alias]),
        ..Default::default()
    }
}

/// Restarted by Swarm whatever the exit, after a pause; placed by `constraints`; a log that
/// cannot fill the node's disk.
fn task_spec(
    container: TaskSpecContainerSpec,
    limits: Limit,
    constraints: &[String],
    network: Option<NetworkAttachmentConfig>,
) -> TaskSpec {
    TaskSpec {
        container_spec: Some(container),
        resources: Some(TaskSpecResources { limits: Some(limits), ..Default::default() }),
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
            delay: Some(RESTART_DELAY_NS),
            ..Default::default()
        }),
        placement: Some(TaskSpecPlacement { constraints: Some(constraints.to_vec()), ..Default::default() }),
        networks: network.map(|network| vec![network]),
        log_driver: Some(TaskSpecLogDriver {
            name: Some("json-file".to_owned()),
            options: Some(HashMap::from([
                ("max-size".to_owned(), LOG_MAX_SIZE.to_owned()),
                ("max-file".to_owned(), LOG_MAX_FILES.to_owned()),
            ])),
        }),
        ..Default::default()
    }
}

/// DNS round robin rather than a virtual IP: nothing reaches an app by its service name, a
/// service is reached through its alias on the preview's network, and a virtual IP needs IPVS.
fn service_spec(
    name: String,
    labels: HashMap<String, String>,
    task: TaskSpec,
    replicas: i64,
    ports: Vec<EndpointPortConfig>,
) -> ServiceSpec {
    ServiceSpec {
        name: Some(name),
        labels: Some(labels),
        task_template: Some(task),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(replicas) }),
            ..Default::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            order: Some(ServiceSpecUpdateConfigOrderEnum::STOP_FIRST),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec { mode: Some(EndpointSpecModeEnum::DNSRR), ports: Some(ports) }),
        ..Default::default()
    }
}

/// A task of a service, as far as previewd cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    pub id: String,
    pub state: Option<TaskState>,
    /// Swarm still wants it to run (it is not being shut down or replaced).
    pub wanted: bool,
    pub node: Option<String>,
    /// Unix nanoseconds.
    pub created_ns: i128,
    pub exit_code: Option<i64>,
    pub message: String,
    /// The task's container, once it has one.
    pub container: Option<String>,
}

impl TaskView {
    pub fn is_running(&self) -> bool {
        self.state == Some(TaskState::RUNNING)
    }

    /// Failed or refused: it will not run (Swarm may start another in its place).
    pub fn has_failed(&self) -> bool {
        matches!(self.state, Some(TaskState::FAILED | TaskState::REJECTED | TaskState::ORPHANED))
    }

    /// On its way to running: not failed, not finished.
    pub fn is_coming_up(&self) -> bool {
        self.wanted && !self.is_running() && !self.has_failed() && !self.is_ended()
    }

    fn is_ended(&self) -> bool {
        matches!(self.state, Some(TaskState::COMPLETE | TaskState::SHUTDOWN | TaskState::REMOVE))
    }
}

/// What a service's tasks say, in previewd's terms, and the node of the task that runs.
///
/// `kept`: the app had answered once (see `keep_running`): Swarm restarts or reschedules it, so a
/// task that is not running yet is on its way back (`Restarting`, which reconcile leaves
/// alone). A service that never came up and whose task failed is `Exited`: a launch cut off.
pub fn service_state(replicas: i64, kept: bool, tasks: &[TaskView]) -> (PreviewState, Option<&str>) {
    let running = tasks.iter().filter(|task| task.is_running()).max_by_key(|task| task.created_ns);
    if replicas == 0 {
        return match running {
            Some(_) => (PreviewState::Stopping, None),
            None => (PreviewState::Exited, None),
        };
    }
    if let Some(task) = running.filter(|task| task.wanted) {
        return (PreviewState::Running, task.node.as_deref());
    }
    if kept {
        return (PreviewState::Restarting, None);
    }
    let failed = tasks.iter().any(TaskView::has_failed);
    let coming = tasks.iter().any(TaskView::is_coming_up);
    match (failed, coming) {
        (true, _) => (PreviewState::Exited, None),
        (false, true) | (false, false) => (PreviewState::Created, None),
    }
}

/// Whether the app crashed, and its exit code: no task runs, and one failed after the last
/// task that ran and was stopped (a sleep). Swarm's own times cannot say "since the last
/// update": it updates a new service once more as it allocates its port, around when it makes
/// the first task.
pub fn crashed(tasks: &[TaskView]) -> Option<Option<i64>> {
    if tasks.iter().any(|task| task.wanted && task.is_running()) {
        return None;
    }
    let stopped = tasks.iter().filter(|task| task.is_ended()).map(|task| task.created_ns).max().unwrap_or(i128::MIN);
    tasks
        .iter()
        .filter(|task| task.has_failed() && task.created_ns > stopped)
        .max_by_key(|task| task.created_ns)
        .map(|task| task.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState, wanted: bool, created_ns: i128) -> TaskView {
        TaskView {
            id: format!("task-{created_ns}"),
            state: Some(state),
            wanted,
            node: Some(format!("node-{created_ns}")),
            created_ns,
            exit_code: None,
            message: String::new(),
            container: None,
        }
    }

    fn on(node: &str, state: TaskState, created_ns: i128) -> TaskView {
        TaskView { node: Some(node.to_owned()), ..task(state, true, created_ns) }
    }

    #[test]
    fn a_task_has_a_node_once_the_scheduler_assigned_it() {
        assert_eq!(assigned_node(&[on("a", TaskState::PENDING, 1)]), None);
        assert_eq!(assigned_node(&[on("a", TaskState::ASSIGNED, 1)]), Some("a"));
        assert_eq!(assigned_node(&[on("a", TaskState::PREPARING, 1)]), Some("a"));
    }

    #[test]
    fn the_node_of_a_task_being_replaced_or_refused_is_not_the_placement() {
        let leaving = TaskView { wanted: false, ..on("a", TaskState::RUNNING, 1) };
        assert_eq!(assigned_node(&[leaving, on("b", TaskState::REJECTED, 2)]), None);
        assert_eq!(assigned_node(&[on("a", TaskState::FAILED, 1), on("c", TaskState::STARTING, 3)]), Some("c"));
    }

    #[test]
    fn a_holder_name_is_its_networks_within_swarms_limit() {
        assert_eq!(holder_name("previewd_default_pv-abc12300001"), "previewd_default_pv-abc12300001_hold");
        let long = holder_name(&format!("previewd_{}_pv-abc12300001", "i".repeat(40)));
        assert_eq!(long.len(), MAX_NAME);
        assert!(long.ends_with("_hold"), "{long}");
    }

    #[test]
    fn holders_have_settled_once_each_node_runs_one() {
        let tasks = [on("a", TaskState::RUNNING, 1), on("b", TaskState::RUNNING, 2)];
        assert_eq!(holders_settled(&tasks), Some(vec![]));
    }

    #[test]
    fn holders_have_not_settled_while_a_node_prepares_one() {
        let tasks = [on("a", TaskState::RUNNING, 1), on("b", TaskState::PREPARING, 2)];
        assert_eq!(holders_settled(&tasks), None);
        assert_eq!(holders_settled(&[]), None, "Swarm has made no task yet");
    }

    #[test]
    fn a_node_that_refused_its_holder_is_named_and_does_not_hold_the_others_up() {
        let refused = TaskView { message: "No such image: pause:3.9".to_owned(), ..on("b", TaskState::REJECTED, 2) };
        let tasks = [on("a", TaskState::RUNNING, 1), refused.clone(), on("a", TaskState::FAILED, 0)];
        assert_eq!(holders_settled(&tasks), Some(vec![&refused]));
    }

    #[test]
    fn a_holder_is_global_unpublished_and_killed_on_removal() {
        let holder = Holder { image: "pause:3.9".to_owned(), command: None };
        let labels = holder_labels(&InstanceName::parse("default").unwrap(), "net");
        let spec = holder_service("net_hold".to_owned(), labels, &holder, "net", &["node.role == worker".to_owned()]);
        assert!(spec.mode.as_ref().and_then(|mode| mode.global.as_ref()).is_some());
        assert!(spec.labels.as_ref().is_some_and(|l| l.get(LABEL_HOLDS).map(String::as_str) == Some("net")));
        assert!(spec.labels.as_ref().is_some_and(|l| !l.contains_key(LABEL_MANAGED)), "no preview's");
        let task = spec.task_template.unwrap();
        assert_eq!(task.container_spec.unwrap().stop_signal.as_deref(), Some("SIGKILL"));
        assert_eq!(task.networks.unwrap()[0].target.as_deref(), Some("net"));
        assert_eq!(spec.endpoint_spec.unwrap().ports, None);
    }

    #[test]
    fn a_service_name_fits_swarms_limit_and_keeps_the_suffix() {
        let instance = InstanceName::parse("default").unwrap();
        let name = service_name(&instance, &"a".repeat(63), 0xdead_beef);
        assert!(name.len() <= MAX_NAME, "{name}");
        assert!(name.starts_with("previewd_default_aaa") && name.ends_with("_deadbeef"), "{name}");
        assert_eq!(service_name(&instance, "feature-x", 1), "previewd_default_feature-x_00000001");
    }

    #[test]
    fn the_running_task_gives_the_state_and_the_node() {
        let tasks = [task(TaskState::SHUTDOWN, false, 1), task(TaskState::RUNNING, true, 2)];
        assert_eq!(service_state(1, true, &tasks), (PreviewState::Running, Some("node-2")));
    }

    #[test]
    fn a_task_being_shut_down_is_not_the_one_to_route() {
        let tasks = [task(TaskState::RUNNING, false, 1), task(TaskState::PREPARING, true, 2)];
        assert_eq!(service_state(1, true, &tasks).0, PreviewState::Restarting);
    }

    #[test]
    fn a_kept_preview_whose_node_went_away_is_on_its_way_back() {
        let tasks = [task(TaskState::ORPHANED, false, 1), task(TaskState::PENDING, true, 2)];
        assert_eq!(service_state(1, true, &tasks), (PreviewState::Restarting, None));
    }

    #[test]
    fn a_launch_that_never_came_up_and_failed_has_exited() {
        let tasks = [task(TaskState::FAILED, false, 1), task(TaskState::READY, true, 2)];
        assert_eq!(service_state(1, false, &tasks).0, PreviewState::Exited);
        assert_eq!(service_state(1, false, &[task(TaskState::STARTING, true, 1)]).0, PreviewState::Created);
    }

    #[test]
    fn a_service_scaled_to_zero_is_stopping_until_its_task_ends() {
        assert_eq!(service_state(0, true, &[task(TaskState::RUNNING, false, 1)]).0, PreviewState::Stopping);
        assert_eq!(service_state(0, true, &[task(TaskState::SHUTDOWN, false, 1)]).0, PreviewState::Exited);
    }

    #[test]
    fn a_failed_task_with_none_running_is_a_crash() {
        let mut failed = task(TaskState::FAILED, false, 5);
        failed.exit_code = Some(3);
        let tasks = [failed.clone(), task(TaskState::PENDING, true, 6)];
        assert_eq!(crashed(&tasks), Some(Some(3)));
        assert_eq!(crashed(&[failed, task(TaskState::RUNNING, true, 6)]), None);
    }

    #[test]
    fn a_failure_before_the_last_sleep_is_not_a_crash_of_the_wake() {
        let tasks = [
            task(TaskState::FAILED, false, 1),
            task(TaskState::SHUTDOWN, false, 2),
            task(TaskState::STARTING, true, 3),
        ];
        assert_eq!(crashed(&tasks), None);
        let mut woken = tasks.to_vec();
        woken[2] = task(TaskState::FAILED, false, 3);
        assert_eq!(crashed(&woken), Some(None));
    }
}
