//! The Docker checks: the engine answers (version, API version, storage driver), there is room
//! under its data root, and every image of `images` is there or may be pulled.

use super::Check;
use crate::config::{Config, PullPolicy};
use crate::docker::Runtime;
use crate::network::Networks;

/// Free space under Docker's data root below which launches start failing for lack of room.
const FAIL_BELOW: u64 = 1 << 30;
/// Below this, a few image pulls or builds fill the disk.
const WARN_BELOW: u64 = 5 << 30;

pub async fn checks(config: &Config) -> Vec<Check> {
    let runtime = match Runtime::connect(config.instance.clone()).await {
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
    checks.push(disk(&engine.data_root));
    checks.extend(network(config, &runtime).await);
    for (key, spec) in &config.images {
        checks.push(match (runtime.has_image(&spec.image).await, spec.pull) {
            (Ok(true), _) => Check::ok(format!("image {key}"), format!("{} is present", spec.image)),
            (Ok(false), PullPolicy::Never) => Check::fail(
                format!("image {key}"),
                format!(
                    "{} is not in Docker's image store and `pull: never` forbids pulling it: build or load it \
                     (docker build -t {} …, or docker load), or set images.{key}.pull: missing",
                    spec.image, spec.image
                ),
            ),
            (Ok(false), _) => Check::warn(
                format!("image {key}"),
                format!(
                    "{} is not present; the first launch pulls it (check that the registry is reachable)",
                    spec.image
                ),
            ),
            (Err(err), _) => Check::fail(format!("image {key}"), format!("cannot inspect {}: {err}", spec.image)),
        });
    }
    checks
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

/// The preview networks: isolation on, the firewall in place (or installable), and subnets left
/// for every preview `limits.max_previews` allows.
async fn network(config: &Config, runtime: &Runtime) -> Vec<Check> {
    if !config.network.isolation {
        return vec![Check::warn(
            "network",
            "network.isolation is false: previews share Docker's default bridge, reach each other's containers and \
             the host's addresses",
        )];
    }
    let metrics = crate::metrics::Metrics::new();
    let networks = Networks::new(runtime.clone(), config.instance.clone(), config.network, &metrics);
    let firewall = if networks.firewall().installed().await {
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

fn disk(data_root: &str) -> Check {
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
    if free < FAIL_BELOW {
        Check::fail("disk", format!("{message}: free space (docker system prune removes unused images and containers)"))
    } else if free < WARN_BELOW {
        Check::warn("disk", format!("{message}: image pulls may fill it (docker system prune frees unused images)"))
    } else {
        Check::ok("disk", message)
    }
}
