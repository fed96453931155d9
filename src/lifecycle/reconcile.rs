//! Reconcile: at start-up, nginx and the networks are made to match the containers' labels; after
//! Docker's events, one preview at a time (`refresh`). A working preview is never removed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;

use super::{Lifecycle, LifecycleError, Progress, ReconcileReport, short};
use crate::config::ImageSpec;
use crate::preview::{Role, Slug};
use crate::runtime::{CreatedContainer, ManagedContainer};

/// Which services of a live app `settle_environment` starts again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repair {
    /// Those without a container.
    Missing,
    /// Those without a running container.
    MissingOrStopped,
}

/// How many previews a reconcile settles at once.
const RECONCILE_PARALLELISM: usize = 16;

/// What settling one preview left: where to route it, and how many containers went.
struct Settled {
    upstream: Option<SocketAddr>,
    removed: usize,
}

impl Lifecycle {
    /// Settles one preview as a start-up reconcile would, under its lock: the route points at
    /// the port its live container has now (Docker gives a container it restarts a new host
    /// port, unless previewd chose it), a preview Docker could not restart is brought back on
    /// a new port, and containers that stopped for good (a launch cut off by an engine
    /// restart) are removed, with the route when nothing is left running. A preview whose
    /// containers are all gone (removed by hand) loses its route.
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn refresh(&self, slug: &Slug) -> Result<(), LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        if self.sleepers.is_asleep(slug) {
            // Asleep: nothing of it is started again; its host stays with the wake listener.
            let members = self.runtime.list_slug_all(slug).await?;
            let upstream = self.settle_asleep(slug, &members).await?;
            self.router.route_if_changed(slug, upstream).await?;
            return Ok(());
        }
        let containers = self.runtime.list_slug(slug).await?;
        let none_left = containers.is_empty();
        let networks: BTreeSet<String> = containers.iter().filter_map(|c| c.network.clone()).collect();
        let settled = self.settle_preview(slug, containers).await?;
        if settled.upstream.is_none() && settled.removed > 0 && self.runtime.list_slug(slug).await?.is_empty() {
            for network in &networks {
                self.networks.remove(network).await;
            }
        }
        match settled.upstream {
            Some(upstream) if self.router.route_if_changed(slug, upstream).await? => {
                tracing::info!(%upstream, "preview re-routed to its container's new address");
            }
            None if (settled.removed > 0 || none_left) && self.is_routed(slug) => {
                tracing::info!("preview has no container left; removing its route");
                self.router.unroute(slug).await?;
            }
            Some(_) | None => {}
        }
        let members = self.runtime.list_slug_all(slug).await?;
        // After an event, only a service that is gone is started again: one that stopped
        // (a failed start, or `docker stop`) would be retried at every event it causes.
        self.settle_environment(slug, members, Repair::Missing).await
    }

    /// `refresh` for every preview that has a container.
    pub async fn refresh_all(&self) -> Result<(), LifecycleError> {
        let slugs: BTreeSet<Slug> = self.runtime.list().await?.into_iter().map(|c| c.slug).collect();
        for slug in slugs {
            self.refresh(&slug).await?;
        }
        Ok(())
    }

    /// Makes nginx match the containers: the live container of every preview routed to its
    /// current port, every other vhost of this instance deleted, containers that never came up
    /// or were replaced removed, and one reload. A working preview is never removed: of several
    /// running containers of one preview (a replace cut short), the newest that answers HTTP is
    /// kept, and if none answers yet, all are kept and the newest is routed.
    #[tracing::instrument(skip_all)]
    pub async fn reconcile(&self) -> Result<ReconcileReport, LifecycleError> {
        let mut groups: BTreeMap<Slug, Vec<ManagedContainer>> = BTreeMap::new();
        for container in self.runtime.list().await? {
            groups.entry(container.slug.clone()).or_default().push(container);
        }
        let mut report = ReconcileReport::default();
        let mut routes = BTreeMap::new();
        // One Docker call or more per preview: at hundreds of previews, in sequence they made a
        // restart take seconds.
        let mut settling = futures_util::stream::iter(groups)
            .map(|(slug, group)| async move {
                if self.sleepers.is_asleep(&slug) {
                    let members = self.runtime.list_slug_all(&slug).await?;
                    let upstream = self.settle_asleep(&slug, &members).await?;
                    return Ok((slug, Settled { upstream: Some(upstream), removed: 0 }));
                }
                self.settle_preview(&slug, group).await.map(|settled| (slug, settled))
            })
            .buffer_unordered(RECONCILE_PARALLELISM);
        while let Some(result) = settling.next().await {
            let (slug, settled) = result?;
            report.removed_containers += settled.removed;
            routes.extend(settled.upstream.map(|upstream| (slug, upstream)));
        }
        let outcome = self.router.sync(&routes).await?;
        report.removed_vhosts = outcome.orphans;
        for (slug, err) in outcome.failures {
            tracing::error!(%slug, error = %err, "cannot route a running preview");
            routes.remove(&slug);
            report.failed.push(format!("{slug}: {err}"));
        }
        report.routed = routes.len();
        let mut members: BTreeMap<Slug, Vec<ManagedContainer>> = BTreeMap::new();
        for container in self.runtime.list_all().await? {
            members.entry(container.slug.clone()).or_default().push(container);
        }
        let mut with_parts: BTreeSet<Slug> = members
            .iter()
            .filter(|(_, group)| group.iter().any(|c| c.role != Role::App))
            .map(|(s, _)| s.clone())
            .collect();
        with_parts.extend(self.runtime.list_volumes().await?.into_iter().map(|volume| volume.slug));
        // A sleeping preview's services stay stopped.
        with_parts.retain(|slug| !self.sleepers.is_asleep(slug));
        let mut settling = futures_util::stream::iter(with_parts)
            .map(|slug| {
                let group = members.remove(&slug).unwrap_or_default();
                async move {
                    let result = self.settle_environment(&slug, group, Repair::MissingOrStopped).await;
                    (slug, result)
                }
            })
            .buffer_unordered(RECONCILE_PARALLELISM);
        while let Some((slug, result)) = settling.next().await {
            if let Err(err) = result {
                tracing::error!(%slug, error = %err, "cannot settle the preview's services");
                report.failed.push(format!("{slug}: {err}"));
            }
        }
        let all = self.runtime.list_all().await?;
        let in_use = all.iter().filter_map(|c| c.network.clone()).collect();
        self.networks.reconcile(&in_use).await?;
        let previews: BTreeSet<Slug> = all.into_iter().map(|c| c.slug).collect();
        self.remove_orphan_builds(&previews).await;
        self.sleepers.forget_gone(&previews)?;
        self.forget_gone_pins(&previews)?;
        tracing::info!(
            routed = report.routed,
            removed_containers = report.removed_containers,
            removed_vhosts = report.removed_vhosts,
            failed = report.failed.len(),
            "reconciled"
        );
        Ok(report)
    }

    /// Removes the images built for previews that no longer exist (previewd stopped between a
    /// kill and the removal of its images, or a first launch failed after its build).
    async fn remove_orphan_builds(&self, previews: &BTreeSet<Slug>) {
        let images = match self.runtime.built_images().await {
            Ok(images) => images,
            Err(err) => return tracing::warn!(error = %err, "cannot list built images"),
        };
        let building: BTreeSet<Slug> = self.builds.statuses().into_iter().map(|b| b.name).collect();
        let orphans = images.iter().filter(|image| {
            image.slug.as_ref().is_some_and(|slug| !previews.contains(slug) && !building.contains(slug))
        });
        for image in orphans {
            match self.runtime.remove_built(image, &images).await {
                Ok(()) => tracing::info!(image = %image.id, "removed an image built for a preview that is gone"),
                Err(err) => tracing::warn!(image = %image.id, error = %err, "cannot remove a built image"),
            }
        }
    }

    /// Makes a preview's environment match its app: a preview whose app is gone loses its
    /// services, data volumes and network; job and seed-copy containers are leftovers of a
    /// launch cut short (no launch of the preview runs now) and go; a live app gets back the
    /// services it is missing (on their kept data), and with `MissingOrStopped` those that
    /// stopped too.
    async fn settle_environment(
        &self,
        slug: &Slug,
        members: Vec<ManagedContainer>,
        repair: Repair,
    ) -> Result<(), LifecycleError> {
        let (apps, parts): (Vec<_>, Vec<_>) = members.into_iter().partition(|c| c.role == Role::App);
        if apps.is_empty() {
            let networks: BTreeSet<String> = parts.iter().filter_map(|c| c.network.clone()).collect();
            if !self.remove_environment(slug, &parts).await? {
                return Ok(());
            }
            tracing::info!(%slug, "removed the services and data of a preview whose app is gone");
            for network in &networks {
                self.networks.remove(network).await;
            }
            return Ok(());
        }
        for leftover in parts.iter().filter(|c| matches!(c.role, Role::Job(_) | Role::SeedCopy(_))) {
            tracing::info!(%slug, container = %short(&leftover.id), "removing a job container of a launch cut short");
            self.runtime.remove(&leftover.id).await?;
        }
        let Some(app) = apps.iter().rev().find(|c| c.is_running()) else { return Ok(()) };
        let Some(spec) = self.config.images.get(&app.image) else { return Ok(()) };
        if app.network.is_none() {
            return Ok(());
        }
        let services: Vec<ManagedContainer> =
            parts.into_iter().filter(|c| matches!(c.role, Role::Service(_))).collect();
        let missing = spec.services.iter().any(|(name, _)| {
            let role = Role::Service(name.clone());
            let counts = |c: &ManagedContainer| repair == Repair::Missing || c.is_running() || c.state.is_transient();
            !services.iter().any(|c| c.role == role && counts(c))
        });
        if spec.services.is_empty() || !missing {
            return Ok(());
        }
        tracing::warn!(%slug, "the preview's app runs without all its services; starting them again on their data");
        let env = self.runtime.container_env(&app.id).await?;
        let mut progress = Progress::new(None, Arc::clone(&self.metrics));
        self.bring_up_services_of(app, spec, &env, &services, &mut progress).await
    }

    /// Keeps the live container of one preview (brought back on a new port if Docker could not
    /// restart it) and removes the others; the port to route, if any.
    async fn settle_preview(&self, slug: &Slug, group: Vec<ManagedContainer>) -> Result<Settled, LifecycleError> {
        let (live, doomed) = self.settle(group).await;
        let upstream = match &live {
            // previewd may have died between the first answer and this setting, or while it
            // removed the container, which Docker then finishes: a container gone meanwhile
            // leaves nothing to route.
            Some(live) => {
                let kept = self.runtime.ensure_kept_running(&live.id).await?;
                live.upstream.filter(|_| kept)
            }
            None => self.revive(slug, &doomed).await,
        };
        for container in &doomed {
            tracing::info!(%slug, container = %short(&container.id), state = %container.state, "removing a container that is not the live preview");
            self.runtime.remove(&container.id).await?;
        }
        Ok(Settled { upstream, removed: doomed.len() })
    }

    /// Brings back a preview that was up but whose container Docker could not start again
    /// (another program took its port while the engine was down): a copy on a new port. Its
    /// address once it answers; `None` when there is nothing to bring back or it does not answer.
    async fn revive(&self, slug: &Slug, stopped: &[ManagedContainer]) -> Option<SocketAddr> {
        // The newest container that had been up: a replacement cut off by the same outage may
        // be newer, but never came up. One whose image left config.yml stays gone.
        for container in stopped.iter().rev() {
            let Some(spec) = self.config.images.get(&container.image) else { continue };
            match self.runtime.recreate(&container.id).await {
                Ok(Some(copy)) => return self.start_copy(slug, copy, spec).await,
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%slug, error = %err, "cannot bring back a stopped preview");
                    return None;
                }
            }
        }
        None
    }

    async fn start_copy(&self, slug: &Slug, copy: CreatedContainer, spec: &ImageSpec) -> Option<SocketAddr> {
        tracing::warn!(%slug, port = copy.host_port, "Docker could not restart this preview; starting a copy on a new port");
        let mut progress = Progress::new(None, Arc::clone(&self.metrics));
        match self.start_until_answering(&copy, spec, &mut progress).await {
            Ok(port) => Some(port),
            Err(err) => {
                tracing::warn!(%slug, error = %err, "the copy of a stopped preview did not come up; removing the preview");
                if let Err(err) = self.runtime.remove(&copy.id).await {
                    tracing::error!(error = %err, container = %short(&copy.id), "cannot remove the failed copy");
                }
                None
            }
        }
    }

    /// Picks the live container of one preview (oldest first in `group`) and the ones to remove.
    async fn settle(&self, group: Vec<ManagedContainer>) -> (Option<ManagedContainer>, Vec<ManagedContainer>) {
        let (running, others): (Vec<_>, Vec<_>) = group.into_iter().partition(ManagedContainer::is_running);
        // Restarting or paused containers are left alone; created, exited or dead ones never
        // came up, or stopped for good.
        let mut doomed: Vec<_> = others.into_iter().filter(|c| !c.state.is_transient()).collect();
        if running.len() <= 1 {
            return (running.into_iter().next(), doomed);
        }
        let mut answering = None;
        for candidate in running.iter().rev() {
            let Some(upstream) = candidate.upstream else { continue };
            if self.prober.answers(upstream, &self.health_path(&candidate.image)).await {
                answering = Some(candidate.id.clone());
                break;
            }
        }
        let Some(live_id) = answering else {
            return (running.into_iter().last(), doomed);
        };
        let (live, replaced): (Vec<_>, Vec<_>) = running.into_iter().partition(|c| c.id == live_id);
        doomed.extend(replaced);
        (live.into_iter().next(), doomed)
    }
}
