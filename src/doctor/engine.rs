//! The Docker checks: the engine answers (version, API version, storage driver), there is room
//! under its data root, and every image of `images` is there or may be pulled.

use super::Check;
use crate::config::{Config, PullPolicy};
use crate::docker::Runtime;

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
