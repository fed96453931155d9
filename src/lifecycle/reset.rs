//! Reset: a preview's data put back as it was at its first launch. Its services and data
//! volumes are removed and made again (seeded from their `seed_volume`, or empty), every job
//! runs (`first_deploy` ones too), and the app restarts on the same port, so its route stays.

use std::sync::Arc;
use std::time::Duration;

use super::{Lifecycle, LifecycleError, PreviewInfo, Progress};
use crate::preview::Slug;
use crate::runtime::{ContainerPlan, ManagedContainer};

/// How long the app has to exit on SIGTERM before it is killed for the restart.
const RESTART_GRACE: Duration = Duration::from_secs(5);

impl Lifecycle {
    /// Puts fresh data back into a running preview (see the module docs).
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn reset(&self, slug: &Slug) -> Result<PreviewInfo, LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let app = self.runtime.list_slug(slug).await?.into_iter().rev().find(ManagedContainer::is_running);
        let app = app.ok_or_else(|| LifecycleError::NotFound(slug.clone()))?;
        let result = self.reset_locked(&app).await;
        let outcome = if result.is_ok() { &crate::metrics::SUCCESS } else { &crate::metrics::FAILURE };
        self.metrics.resets.get_or_create(outcome).inc();
        result?;
        tracing::info!("preview reset");
        self.get(slug).await
    }

    async fn reset_locked(&self, app: &ManagedContainer) -> Result<(), LifecycleError> {
        let configured =
            self.config.images.get(&app.image).ok_or_else(|| LifecycleError::ImageGone(app.image.clone()))?;
        // Jobs run in the image the app runs: for a preview built from source, the build.
        let mut spec = configured.clone();
        let image = self.runtime.container_image(&app.id).await?;
        if !image.is_empty() && image != spec.image {
            spec.image = image;
            spec.pull = crate::config::PullPolicy::Never;
        }
        let spec = &spec;
        let mut progress = Progress::new(None, Arc::clone(&self.metrics));
        let members = self.runtime.list_slug_all(&app.slug).await?;
        self.remove_environment(&app.slug, &members).await?;
        let env = self.runtime.container_env(&app.id).await?;
        if !spec.services.is_empty() {
            self.bring_up_services_of(app, spec, &env, &[], &mut progress).await?;
        }
        let plan = ContainerPlan {
            slug: &app.slug,
            image_key: &app.image,
            spec,
            env: env.clone(),
            origin: None,
            owner: None,
            network: app.network.as_deref(),
        };
        self.run_jobs(&plan, true, &mut progress).await?;
        let upstream = self.runtime.restart(&app.id, RESTART_GRACE).await?;
        self.wait_until_answering(&app.id, upstream, spec).await?;
        progress.finish();
        Ok(())
    }
}
