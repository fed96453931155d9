//! The Docker checks: the engine answers (version, API version, storage driver), there is room
//! under its data root (for builds from source: `builds.min_free_disk`), every image of `images` and of their services is there or may be
//! pulled, and every `seed_volume` exists; on a Swarm (`runtime.kind: swarm`), that the engine
//! manages one with a node previews can use.

use super::Check;
use crate::config::{Config, PullPolicy};
use crate::docker::DockerRuntime;
use crate::network::Networks;
use crate::runtime::{Engine, Parts};
use crate::swarm::SwarmSurvey;

/// Free space under Docker's data root below which launches start failing for lack of room.
const FAIL_BELOW: u64 = 1 << 30;
/// Below this, a few image pulls or builds fill the disk.
const WARN_BELOW: u64 = 5 << 30;

pub async fn checks(config: &Config) -> Vec<Check> {
    let runtime = match DockerRuntime::connect(config.instance.clone()).await {
        Ok(runtime) => runtime,
        Err(err) => return vec![unreachable(&err.to_string())],
    };
    let engine = match runtime.engine().await {
        Ok(engine) => engine,
        Err(err) => return vec![unreachable(&err.to_string())],
    };
    let mut checks = vec![Check::ok(
        "docker",
        format!(
            "Docker {} answers (API {}, storage driver {})",
            engine.version, engine.api_version, engine.storage_driver
        ),
    )];
    let builds = config.github.iter().flat_map(|github| github.repos.values()).any(|repo| repo.build.is_some());
    checks.push(disk(&engine.data_root, builds.then_some(config.builds.min_free_disk)));
    if config.runtime.is_swarm() {
        checks.push(swarm(&runtime).await);
    }
    checks.extend(network(config, &runtime).await);
    for (key, spec) in &config.images {
        checks.push(image(&runtime, &format!("image {key}"), &spec.image, spec.pull, &format!("images.{key}")).await);
        for (name, service) in &spec.services {
            let label = format!("image {key}/{name}");
            let path = format!("images.{key}.services.{name}");
            checks.push(image(&runtime, &label, &service.image, service.pull, &path).await);
            if let Some(seed) = &service.seed_volume {
                checks.push(match runtime.volume_exists(seed.as_ref()).await {
                    Ok(true) => Check::ok(format!("seed {key}/{name}"), format!("volume {seed} is present")),
                    Ok(false) => Check::fail(format!("seed {key}/{name}"), missing_seed(&path, seed.as_ref())),
                    Err(err) => {
                        Check::fail(format!("seed {key}/{name}"), format!("cannot inspect volume {seed}: {err}"))
                    }
                });
            }
        }
    }
    checks
}

/// Whether an image of `images` (or of a service, at `path`) is there or may be pulled.
async fn image(runtime: &DockerRuntime, label: &str, image: &str, pull: PullPolicy, path: &str) -> Check {
    match (runtime.has_image(image).await, pull) {
        (Ok(true), _) => Check::ok(label, format!("{image} is present")),
        (Ok(false), PullPolicy::Never) => Check::fail(
            label,
            format!(
                "{image} is not in Docker's image store and `pull: never` forbids pulling it: build or load it \
                 (docker build -t {image} …, or docker load), or set {path}.pull: missing"
            ),
        ),
        (Ok(false), _) => Check::warn(
            label,
            format!("{image} is not present; the first launch pulls it (check that the registry is reachable)"),
        ),
        (Err(err), _) => Check::fail(label, format!("cannot inspect {image}: {err}")),
    }
}

/// What to say of a `seed_volume` Docker does not have (check-config warns, doctor fails).
pub fn missing_seed(path: &str, volume: &str) -> String {
    format!(
        "{path}.seed_volume: the volume {volume} does not exist, so launches of this image fail; create and fill it \
         (docker volume create {volume}, then load the data into it), or remove seed_volume"
    )
}

/// The `seed_volume`s of config.yml Docker does not have, as `(services.<name> path, volume)`.
pub async fn missing_seed_volumes(config: &Config) -> Result<Vec<(String, String)>, crate::runtime::DockerError> {
    let runtime = DockerRuntime::connect(config.instance.clone()).await?;
    let mut missing = Vec::new();
    for (key, spec) in &config.images {
        for (name, service) in &spec.services {
            let Some(seed) = &service.seed_volume else { continue };
            if !runtime.volume_exists(seed.as_ref()).await? {
                missing.push((format!("images.{key}.services.{name}"), seed.to_string()));
            }
        }
    }
    Ok(missing)
}

fn unreachable(why: &str) -> Check {
    let endpoint = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
    Check::fail(
        "docker",
        format!(
            "cannot talk to Docker at {endpoint}: {why}: start the engine (systemctl start docker) or set DOCKER_HOST \
             to its socket, and make sure previewd's user may use it"
        ),
    )
}

/// With `runtime.kind: swarm`: the engine is a Swarm manager with a node previews can use.
async fn swarm(runtime: &DockerRuntime) -> Check {
    match crate::swarm::survey(runtime).await {
        Ok(SwarmSurvey::NotManager) => Check::fail(
            "swarm",
            "runtime.kind is swarm, but this engine is not a Swarm manager: run `docker swarm init` here (or point \
             DOCKER_HOST at a manager)",
        ),
        Ok(SwarmSurvey::Manager { nodes, usable: 0 }) => Check::fail(
            "swarm",
            format!(
                "none of the Swarm's {nodes} nodes is ready and active: start or `docker node update --availability active` one"
            ),
        ),
        Ok(SwarmSurvey::Manager { nodes, usable }) => Check::ok(
            "swarm",
            format!(
                "a Swarm manager; {usable} of {nodes} nodes ready and active (which of them runtime.constraints \
                 allows, and whether they have the images, is not checked from here)"
            ),
        ),
        Err(err) => Check::fail("swarm", format!("cannot read the Swarm: {err}")),
    }
}

/// The preview networks: isolation on, the firewall in place (or installable), and subnets left
/// for every preview `limits.max_previews` allows.
async fn network(config: &Config, runtime: &DockerRuntime) -> Vec<Check> {
    if !config.network.isolation {
        return vec![Check::warn(
            "network",
            "network.isolation is false: previews share Docker's default bridge, reach each other's containers and \
             the host's addresses",
        )];
    }
    let metrics = crate::metrics::Metrics::new();
    let fenced = !config.runtime.is_swarm();
    let networks =
        Networks::new(std::sync::Arc::new(runtime.clone()), config.instance.clone(), config.network, fenced, &metrics);
    let firewall = if !fenced {
        Check::ok(
            "firewall",
            "on a Swarm the previews' overlays are on the nodes, where previewd installs no rules: firewall the nodes \
             (README, \"Run on a Swarm\")",
        )
    } else if networks.firewall().installed().await {
        Check::ok("firewall", "the preview networks' rules are in place (PREVIEWD-INPUT, PREVIEWD-FORWARD)")
    } else {
        match networks.firewall().usable().await {
            Ok(()) => Check::warn(
                "firewall",
                "the preview networks' rules are not in place yet; previewd serve installs them when it starts",
            ),
            Err(err) => Check::fail("firewall", err.to_string()),
        }
    };
    let needed = config.limits.max_previews + config.network.warm;
    let subnets = match networks.free_subnets().await {
        Ok(free) if free >= needed => Check::ok("subnets", format!("{free} free subnets in network.subnets")),
        Ok(free) => Check::fail(
            "subnets",
            format!(
                "only {free} free /{} subnets in network.subnets ({}), fewer than limits.max_previews + network.warm \
                 ({needed}): widen network.subnets or lengthen network.subnet_prefix",
                config.network.subnet_prefix, config.network.subnets
            ),
        ),
        Err(err) => Check::fail("subnets", err.to_string()),
    };
    vec![firewall, subnets]
}

/// Free space under Docker's data root; with builds from source (`min_builds`), below
/// `builds.min_free_disk` is a failure: no build would start.
fn disk(data_root: &str, min_builds: Option<u64>) -> Check {
    let stats = match rustix::fs::statvfs(data_root) {
        Ok(stats) => stats,
        Err(err) => {
            return Check::warn(
                "disk",
                format!(
                    "cannot read the free space under Docker's data root {data_root} ({err}); check it on the engine's host"
                ),
            );
        }
    };
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    let gib = free as f64 / f64::from(1u32 << 30);
    let message = format!("{gib:.1} GiB free under Docker's data root {data_root}");
    if let Some(min) = min_builds.filter(|min| free < *min) {
        let min_gib = min as f64 / f64::from(1u32 << 30);
        return Check::fail(
            "disk",
            format!(
                "{message}: below builds.min_free_disk ({min_gib:.1} GiB), so no build starts; free space or lower it"
            ),
        );
    }
    if free < FAIL_BELOW {
        Check::fail("disk", format!("{message}: free space (docker system prune removes unused images and containers)"))
    } else if free < WARN_BELOW {
        Check::warn("disk", format!("{message}: image pulls may fill it (docker system prune frees unused images)"))
    } else {
        Check::ok("disk", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_builds_less_free_disk_than_min_free_disk_fails_naming_the_key() {
        let check = disk("/", Some(u64::MAX));
        assert_eq!(check.level, super::super::Level::Fail);
        assert!(check.message.contains("builds.min_free_disk"), "{}", check.message);
        let without_builds = disk("/", None);
        assert!(!without_builds.message.contains("builds.min_free_disk"), "{}", without_builds.message);
    }
}
