//! The parts of a preview environment on the Docker API: service containers (on the preview's
//! network, reachable by their name, with a data volume), job containers run to their end, the
//! data volumes and the copy of a seed volume into one. When each is made is the lifecycle's
//! business.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, ExecConfig, HostConfig, Mount, MountType, NetworkingConfig,
    RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    InspectContainerOptions, ListVolumesOptions, RemoveVolumeOptions, WaitContainerOptions,
};
use futures_util::StreamExt;

use super::labels::{LABEL_DIGEST, LABEL_PART, LABEL_ROLE, LABEL_SLUG};
use super::{DockerRuntime, Limits, is_not_found, restart_policy, unix_nanos};
use crate::config::VolumeName;
use crate::preview::{ImageKey, Role, ServiceName, Slug};
use crate::runtime::{Containers, DockerError, JobPlan, ManagedVolume, Parts, RunOutcome, ServicePlan};

/// Where the copy of a seed volume sees it, and the volume it fills.
const SEED_MOUNT: &str = "/previewd-seed";
const DATA_MOUNT: &str = "/previewd-data";
/// What `cp -a` needs to keep the seed's owners, modes and times on files it does not own.
const COPY_CAPS: &[&str] = &["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"];

impl DockerRuntime {
    async fn create_part(
        &self,
        slug: &Slug,
        part: &ServiceName,
        kind: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let name = format!("previewd.{}.{slug}.{kind}-{part}.{:08x}", self.instance, rand::random::<u32>());
        self.create_container_named(name, body).await
    }

    async fn run_copy(&self, id: &str) -> Result<(), DockerError> {
        self.start_part(id).await?;
        match self.wait_for_end(id, Duration::from_secs(3600)).await? {
            RunOutcome::Exited(0) => Ok(()),
            outcome => Err(DockerError::Api {
                action: "copy the seed volume",
                message: format!("cp -a ended with {outcome:?}: {}", self.logs_tail(id, 5).await.trim()),
            }),
        }
    }
}

#[async_trait]
impl Parts for DockerRuntime {
    /// Creates a service container, never published on the host. Like an app, it is restarted
    /// by Docker only once it was ready (`keep_running`): a crash during start-up stays visible,
    /// with its exit code, and fails the launch at once.
    async fn create_service(&self, plan: &ServicePlan<'_>) -> Result<String, DockerError> {
        let role = Role::Service(plan.name.clone());
        let mut labels = self.preview_labels(plan.slug, plan.image_key, &role, Some(plan.network));
        labels.insert(LABEL_DIGEST.to_owned(), plan.spec.digest());
        labels.insert(super::LABEL_CREATED.to_owned(), unix_nanos().to_string());
        let spec = plan.spec;
        let limits = Limits {
            memory: spec.memory,
            cpus: spec.cpus,
            pids: spec.pids,
            cap_add: spec.cap_add.iter().map(ToString::to_string).collect(),
        };
        let mounts = plan.volume.zip(spec.data.as_ref()).map(|(volume, path)| vec![volume_mount(volume, path, false)]);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.command.clone(),
            env: Some(plan.env.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(plan.network.to_owned()),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                restart_policy: Some(restart_policy(RestartPolicyNameEnum::NO)),
                mounts,
                ..limits.host_config()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    plan.network.to_owned(),
                    EndpointSettings { aliases: Some(vec![plan.name.to_string()]), ..Default::default() },
                )])),
            }),
            ..Default::default()
        };
        self.create_part(plan.slug, plan.name, "service", body).await
    }

    /// Creates a job container: the app's image, environment, limits and hardening, on the
    /// preview's network, running the job's command once.
    async fn create_job(&self, plan: &JobPlan<'_>) -> Result<String, DockerError> {
        let role = Role::Job(plan.job.name.clone());
        let body = self.app_image_body(&plan.app, &role, Some(plan.job.command.clone()), None)?;
        self.create_part(plan.app.slug, &plan.job.name, "job", body).await
    }

    /// Starts a container that publishes no port (a service or a job).
    async fn start_part(&self, id: &str) -> Result<(), DockerError> {
        self.docker.start_container(id, None).await.map_err(|err| DockerError::from_bollard("start the container", err))
    }

    /// Waits until the container stops, at most `timeout`; its exit code.
    async fn wait_for_end(&self, id: &str, timeout: Duration) -> Result<RunOutcome, DockerError> {
        let options = WaitContainerOptions { condition: "not-running".to_owned() };
        let mut waiting = self.docker.wait_container(id, Some(options));
        // The wait answers with an error for a non-zero exit: the code is read back below.
        if tokio::time::timeout(timeout, waiting.next()).await.is_err() {
            return Ok(RunOutcome::TimedOut);
        }
        match self.status(id).await? {
            Some(status) if status.running => Ok(RunOutcome::TimedOut),
            Some(status) => Ok(RunOutcome::Exited(status.exit_code.unwrap_or(-1))),
            None => Err(DockerError::Api { action: "wait for the container", message: "it was removed".to_owned() }),
        }
    }

    /// Runs `argv` inside a running container; its exit code (`None` if it could not run).
    async fn exec_status(&self, id: &str, argv: &[String]) -> Result<Option<i64>, DockerError> {
        let config = ExecConfig {
            cmd: Some(argv.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec = match self.docker.create_exec(id, config).await {
            Ok(exec) => exec,
            // Not running (yet, or any more): the check did not pass.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => return Ok(None),
            Err(err) => return Err(DockerError::from_bollard("run the ready check", err)),
        };
        match self.docker.start_exec(&exec.id, None).await {
            Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) => while output.next().await.is_some() {},
            Ok(bollard::exec::StartExecResults::Detached) => {}
            Err(err) => return Err(DockerError::from_bollard("run the ready check", err)),
        }
        let inspect = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|err| DockerError::from_bollard("run the ready check", err))?;
        Ok(inspect.exit_code)
    }

    /// The container's address on `network`, while it runs.
    async fn address_on(&self, id: &str, network: &str) -> Result<Option<IpAddr>, DockerError> {
        let inspect = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(inspect) => inspect,
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(DockerError::from_bollard("inspect the container", err)),
        };
        let address = inspect
            .network_settings
            .and_then(|settings| settings.networks)
            .and_then(|mut networks| networks.remove(network))
            .and_then(|endpoint| endpoint.ip_address)
            .and_then(|ip| ip.parse().ok());
        Ok(address)
    }

    /// The name of a service's data volume: one per preview and service, so a redeploy finds
    /// it again.
    fn volume_name(&self, slug: &Slug, service: &ServiceName) -> String {
        format!("previewd.{}.{slug}.{service}", self.instance)
    }

    async fn volume_exists(&self, name: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_volume(name).await {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(DockerError::from_bollard("inspect the volume", err)),
        }
    }

    /// Creates an empty data volume of a service.
    async fn create_volume(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        service: &ServiceName,
    ) -> Result<String, DockerError> {
        let name = self.volume_name(slug, service);
        let mut labels = self.preview_labels(slug, image_key, &Role::Service(service.clone()), None);
        labels.insert(LABEL_ROLE.to_owned(), "data".to_owned());
        let request = VolumeCreateRequest { name: Some(name.clone()), labels: Some(labels), ..Default::default() };
        self.docker.create_volume(request).await.map_err(|err| DockerError::from_bollard("create the volume", err))?;
        Ok(name)
    }

    /// Removes a volume; one already gone is fine. Its containers must be gone first.
    async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.remove_volume(name, Some(RemoveVolumeOptions { force: false })).await {
            Err(err) if !is_not_found(&err) => Err(DockerError::from_bollard("remove the volume", err)),
            _ => Ok(()),
        }
    }

    /// Every data volume of this instance.
    async fn list_volumes(&self) -> Result<Vec<ManagedVolume>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), self.instance_labels())]);
        let listed = self
            .docker
            .list_volumes(Some(ListVolumesOptions { filters: Some(filters) }))
            .await
            .map_err(|err| DockerError::from_bollard("list volumes", err))?;
        Ok(listed.volumes.unwrap_or_default().into_iter().filter_map(managed_volume).collect())
    }

    /// Copies the seed volume into the data volume with `cp -a` in `image` (the service's own,
    /// so nothing else needs to be on the host), keeping owners, modes and times; a container
    /// without a network, removed after. The error holds `cp`'s own words.
    async fn copy_volume(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        service: &ServiceName,
        image: &str,
        seed: &VolumeName,
        volume: &str,
    ) -> Result<(), DockerError> {
        let role = Role::SeedCopy(service.clone());
        let labels = self.preview_labels(slug, image_key, &role, None);
        let limits = Limits {
            memory: crate::config::DEFAULT_MEMORY,
            cpus: None,
            pids: 64,
            cap_add: COPY_CAPS.iter().map(|cap| (*cap).to_owned()).collect(),
        };
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            entrypoint: Some(vec!["cp".to_owned()]),
            cmd: Some(vec!["-a".to_owned(), format!("{SEED_MOUNT}/."), format!("{DATA_MOUNT}/")]),
            user: Some("0:0".to_owned()),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".to_owned()),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                mounts: Some(vec![
                    volume_mount(seed.as_ref(), SEED_MOUNT, true),
                    volume_mount(volume, DATA_MOUNT, false),
                ]),
                ..limits.host_config()
            }),
            ..Default::default()
        };
        let id = self.create_part(slug, service, "seed-copy", body).await?;
        let result = self.run_copy(&id).await;
        self.remove(&id).await?;
        result
    }
}

fn volume_mount(source: &str, target: &str, read_only: bool) -> Mount {
    Mount {
        target: Some(target.to_owned()),
        source: Some(source.to_owned()),
        typ: Some(MountType::VOLUME),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn managed_volume(volume: bollard::models::Volume) -> Option<ManagedVolume> {
    let labels = volume.labels;
    let slug = Slug::parse(labels.get(LABEL_SLUG)?).ok()?;
    let service = ServiceName::parse(labels.get(LABEL_PART)?).ok()?;
    Some(ManagedVolume { name: volume.name, slug, service })
}
