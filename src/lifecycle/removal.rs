//! Kill: a preview's build in flight stopped, its containers (app, services, jobs) and data
//! volumes, then its network, then its route (in that order a crash half-way leaves a vhost
//! without a container, which the next reconcile deletes), then the images built for it.

use std::collections::BTreeSet;

use super::{Lifecycle, LifecycleError, same_pull_request};
use crate::metrics;
use crate::preview::Slug;
use crate::request::PullRequestOrigin;
use crate::runtime::ManagedContainer;

impl Lifecycle {
    /// Removes the preview of a pull request, unless the name belongs to another preview (another
    /// pull request's, or one launched by hand). Returns whether something was removed.
    pub async fn kill_pull_request(&self, slug: &Slug, origin: &PullRequestOrigin) -> Result<bool, LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let containers = self.runtime.list_slug(slug).await?;
        if containers.iter().any(|c| !same_pull_request(c.origin.as_ref(), origin)) {
            tracing::warn!(%slug, "not removing a preview that belongs to someone else");
            return Ok(false);
        }
        match self.kill_locked(slug, containers).await {
            Err(LifecycleError::NotFound(_)) => Ok(false),
            other => other.map(|()| true),
        }
    }

    /// Removes a preview: first its containers, then its route. In that order a crash half-way
    /// leaves a vhost without a container, which the next reconcile deletes; the other order
    /// would leave a container that reconcile routes again.
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn kill(&self, slug: &Slug) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let containers = self.runtime.list_slug(slug).await?;
        self.kill_locked(slug, containers).await
    }

    pub(super) async fn kill_locked(
        &self,
        slug: &Slug,
        containers: Vec<ManagedContainer>,
    ) -> Result<(), LifecycleError> {
        let stopped_build = self.builds.cancel(slug);
        let mut result = self.remove_preview(slug, containers).await;
        if matches!(result, Ok(()) | Err(LifecycleError::NotFound(_))) {
            // A failed first deploy leaves no container, only its status page to clear.
            self.deploys.forget(slug);
        }
        if result.is_ok()
            && let Err(err) = self.forget_sleep(slug)
        {
            tracing::warn!(error = %err, "cannot forget that the removed preview slept");
        }
        // A name with neither a preview, a build nor a build log (a first build that failed) has
        // no images either (orphans of previews removed by hand go at the next start), so its
        // 404 costs no image listing.
        if result.is_ok() || stopped_build || self.builds.has_log(slug) {
            self.builds.forget(slug).await;
        }
        if stopped_build && matches!(result, Err(LifecycleError::NotFound(_))) {
            tracing::info!("stopped the first build of a preview that did not run yet");
            result = Ok(());
        }
        let outcome = match &result {
            Ok(()) => Some(&metrics::SUCCESS),
            Err(LifecycleError::NotFound(_)) => None,
            Err(_) => Some(&metrics::FAILURE),
        };
        if let Some(outcome) = outcome {
            self.metrics.kills.get_or_create(outcome).inc();
        }
        result
    }

    /// Removes the app containers, then the rest of the environment (services, jobs and their
    /// data volumes), then the network.
    async fn remove_preview(&self, slug: &Slug, apps: Vec<ManagedContainer>) -> Result<(), LifecycleError> {
        let routed = self.is_routed(slug);
        let members = self.runtime.list_slug_all(slug).await?;
        let networks: BTreeSet<String> = members.iter().filter_map(|c| c.network.clone()).collect();
        for container in apps {
            self.runtime.remove(&container.id).await?;
        }
        let had_environment = self.remove_environment(slug, &members).await?;
        if members.is_empty() && !had_environment && !routed {
            return Err(LifecycleError::NotFound(slug.clone()));
        }
        for network in networks {
            self.networks.remove(&network).await;
        }
        if routed {
            self.router.unroute(slug).await?;
        }
        tracing::info!("preview removed");
        Ok(())
    }
}
