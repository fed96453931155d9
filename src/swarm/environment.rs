//! Preview environments on a Swarm: each service is a Swarm service on the preview's overlay
//! network, reachable there by its name; jobs and the copies of seed volumes are containers of
//! the manager's engine on that same (attachable) network. A preview with services runs wholly
//! on the manager node, app included: its data volumes live there, where previewd creates,
//! seeds and removes them (a Swarm manager cannot reach another node's volumes), and its ready
//! checks run there (nor can it exec into another node's container).

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;

use super::{SwarmRuntime, spec};
use crate::config::VolumeName;
use crate::docker::unix_nanos;
use crate::preview::{ImageKey, ServiceName, Slug};
use crate::runtime::{DockerError, JobPlan, ManagedVolume, Parts, RunOutcome, ServicePlan};

impl SwarmRuntime {
    /// The constraint that keeps an environment on the manager node.
    pub(super) fn on_manager(&self) -> Vec<String> {
        vec![format!("node.id == {}", self.manager)]
    }

    /// The container of the service's running task (on the manager, for an environment's
    /// service); `None` when `id` is not a service or none of its tasks runs.
    async fn running_container(&self, id: &str) -> Result<Option<String>, DockerError> {
        let tasks = self.tasks_of(&[id.to_owned()]).await?.remove(id).unwrap_or_default();
        Ok(tasks
            .into_iter()
            .filter(|task| task.wanted && task.is_running())
            .max_by_key(|t| t.created_ns)
            .and_then(|t| t.container))
    }
}

#[async_trait]
impl Parts for SwarmRuntime {
    async fn create_service(&self, plan: &ServicePlan<'_>) -> Result<String, DockerError> {
        let name = spec::service_name(&self.instance, &format!("{}-{}", plan.slug, plan.name), rand::random());
        let labels = spec::part_labels(&self.instance, plan, unix_nanos());
        let service = spec::part_service(name, labels, plan, &self.on_manager());
        self.create_spec(service, "create the service").await
    }

    async fn create_job(&self, plan: &JobPlan<'_>) -> Result<String, DockerError> {
        self.engine.create_job(plan).await
    }

    /// A service: scaled to one replica, once its task has a node. A job: its container started.
    async fn start_part(&self, id: &str) -> Result<(), DockerError> {
        let Some(service) = self.service(id).await? else { return self.engine.start_part(id).await };
        let mut earlier = std::collections::HashSet::new();
        if Self::replicas(&service) == 0 {
            earlier = self.task_ids(id).await?;
            self.scale(id, 1).await?;
        }
        self.placed(id, 0, &earlier).await.map(drop)
    }

    async fn wait_for_end(&self, id: &str, timeout: Duration) -> Result<RunOutcome, DockerError> {
        self.engine.wait_for_end(id, timeout).await
    }

    /// In the container of the service's running task; `None` while none runs.
    async fn exec_status(&self, id: &str, argv: &[String]) -> Result<Option<i64>, DockerError> {
        if self.service(id).await?.is_none() {
            return self.engine.exec_status(id, argv).await;
        }
        match self.running_container(id).await? {
            Some(container) => self.engine.exec_status(&container, argv).await,
            None => Ok(None),
        }
    }

    async fn address_on(&self, id: &str, network: &str) -> Result<Option<IpAddr>, DockerError> {
        if self.service(id).await?.is_none() {
            return self.engine.address_on(id, network).await;
        }
        match self.running_container(id).await? {
            Some(container) => self.engine.address_on(&container, network).await,
            None => Ok(None),
        }
    }

    fn volume_name(&self, slug: &Slug, service: &ServiceName) -> String {
        self.engine.volume_name(slug, service)
    }

    async fn volume_exists(&self, name: &str) -> Result<bool, DockerError> {
        self.engine.volume_exists(name).await
    }

    async fn create_volume(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        service: &ServiceName,
    ) -> Result<String, DockerError> {
        self.engine.create_volume(slug, image_key, service).await
    }

    async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
        self.engine.remove_volume(name).await
    }

    async fn list_volumes(&self) -> Result<Vec<ManagedVolume>, DockerError> {
        self.engine.list_volumes().await
    }

    async fn copy_volume(
        &self,
        slug: &Slug,
        image_key: &ImageKey,
        service: &ServiceName,
        image: &str,
        seed: &VolumeName,
        volume: &str,
    ) -> Result<(), DockerError> {
        self.engine.copy_volume(slug, image_key, service, image, seed, volume).await
    }
}
