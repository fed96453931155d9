//! Sleep and wake. A preview nobody used for `lifecycle.sleep_after` (no request through nginx,
//! see `crate::traffic`) sleeps: its host is routed to previewd's wake listener (`crate::wake`),
//! then its app and services are stopped, their data volumes kept. The first request wakes it:
//! services started and ready, then the app container again on its port (a copy on a new port
//! when that was taken meanwhile; no jobs). Requests held for the wake go to the app as soon as it
//! answers; the route back to it follows. Concurrent requests share one wake.
//!
//! Which previews sleep is written to `<state_dir>/asleep.json` (atomically) before their
//! containers stop, so a restart of previewd or of the engine leaves them asleep: reconcile
//! routes them to the wake listener and starts none of their containers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::store::SlugFile;
use super::{Lifecycle, LifecycleError, Progress, short};
use crate::metrics::ByReason;
use crate::preview::{Role, Slug};
use crate::runtime::ManagedContainer;

/// How long a sleeping container gets to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why a preview went to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SleepReason {
    /// No request for `lifecycle.sleep_after`.
    Idle,
    /// Asked for (`POST /api/previews/{name}/sleep`, `previewd sleep`).
    Manual,
    /// To make room under `lifecycle.max_awake` or `max_awake_memory` for a launch or a wake.
    Cap,
    /// A quiet period of `lifecycle.quiet_hours` began.
    QuietHours,
}

impl SleepReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Manual => "manual",
            Self::Cap => "cap",
            Self::QuietHours => "quiet_hours",
        }
    }
}

/// A sleeping preview, as `asleep.json` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asleep {
    /// Unix seconds.
    pub since: i64,
    pub reason: SleepReason,
}

/// Where a wake is, for the requests waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeState {
    /// Starting: the step being run.
    Waking(&'static str),
    /// Awake: where nginx reaches the app.
    Awake(SocketAddr),
    /// The wake failed: why.
    Failed(String),
}

/// The sleeping previews (persisted) and the wakes under way.
pub struct Sleepers {
    asleep: SlugFile<Asleep>,
    waking: Mutex<HashMap<Slug, watch::Receiver<WakeState>>>,
    /// Held while room is made for a launch or a wake (see `make_room`).
    room: tokio::sync::Mutex<()>,
    /// Launches and wakes that were given room and do not run yet, with the memory they take:
    /// counted as awake (and busy) by the next plans, so that two launches at once do not both
    /// take the same room.
    reserved: Mutex<HashMap<Slug, u64>>,
    /// The wake listener's port on 127.0.0.1 (0 until it listens).
    wake_port: AtomicU16,
}

impl Sleepers {
    /// Reads `asleep.json` from `state_dir` (none: nobody sleeps).
    pub fn load(state_dir: &std::path::Path) -> Self {
        Self {
            asleep: SlugFile::load(state_dir, "asleep.json"),
            waking: Mutex::default(),
            room: tokio::sync::Mutex::default(),
            reserved: Mutex::default(),
            wake_port: AtomicU16::new(0),
        }
    }

    /// Where nginx sends the hosts of sleeping previews: the wake listener.
    pub fn wake_upstream(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.wake_port.load(Ordering::Relaxed)))
    }

    pub fn set_wake_port(&self, port: u16) {
        self.wake_port.store(port, Ordering::Relaxed);
    }

    pub fn get(&self, slug: &Slug) -> Option<Asleep> {
        self.asleep.get(slug)
    }

    pub fn is_asleep(&self, slug: &Slug) -> bool {
        self.asleep.contains(slug)
    }

    fn set(&self, slug: &Slug, asleep: Option<Asleep>) -> Result<(), LifecycleError> {
        self.asleep.set(slug, asleep)
    }

    /// Forgets the sleeping previews that have no container left (removed while previewd was
    /// down, or by hand).
    pub(super) fn forget_gone(&self, previews: &std::collections::BTreeSet<Slug>) -> Result<(), LifecycleError> {
        self.asleep.retain(|slug, _| previews.contains(slug))
    }

    /// The launch or wake of the preview given room ended: it runs (and counts as running) or
    /// failed.
    pub(super) fn unreserve(&self, slug: &Slug) {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner).remove(slug);
    }

    fn reservations(&self) -> HashMap<Slug, u64> {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether a wake of the preview is under way.
    pub fn is_waking(&self, slug: &Slug) -> bool {
        self.waking().get(slug).is_some_and(|state| matches!(*state.borrow(), WakeState::Waking(_)))
    }

    fn waking(&self) -> std::sync::MutexGuard<'_, HashMap<Slug, watch::Receiver<WakeState>>> {
        self.waking.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// When a preview about to be put to sleep is still left awake.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unused {
    /// Never: it sleeps.
    Always,
    /// It was used within this long.
    For(Duration),
    /// It was used since this last request was read.
    Since(Option<SystemTime>),
}

/// How many times room is planned again when a preview chosen to sleep was used meanwhile.
const ROOM_ATTEMPTS: usize = 3;

/// An awake preview, as `room_for` weighs it.
#[derive(Debug, Clone)]
pub struct AwakePreview {
    pub slug: Slug,
    pub last_request: Option<SystemTime>,
    /// The memory limits of its containers (app and services).
    pub memory: u64,
    /// Pinned, being built or being woken: it is not put to sleep.
    pub busy: bool,
}

/// The previews to put to sleep, least recently used first, so that one more preview taking
/// `memory` fits under `max_awake` and `max_awake_memory`; why not, when even all that may
/// sleep would not make room.
pub fn room_for(
    awake: &[AwakePreview],
    memory: u64,
    max_awake: Option<usize>,
    max_memory: Option<u64>,
) -> Result<Vec<Slug>, String> {
    let mut count = awake.len() + 1;
    let mut used: u64 = awake.iter().map(|p| p.memory).sum::<u64>() + memory;
    let over =
        |count: usize, used: u64| max_awake.is_some_and(|max| count > max) || max_memory.is_some_and(|max| used > max);
    let mut candidates: Vec<&AwakePreview> = awake.iter().filter(|p| !p.busy).collect();
    // Never used first (their clock has not started), then the least recently used.
    candidates.sort_by_key(|p| p.last_request);
    let mut victims = Vec::new();
    let mut candidates = candidates.into_iter();
    while over(count, used) {
        let Some(victim) = candidates.next() else {
            let mut why = Vec::new();
            if let Some(max) = max_awake.filter(|max| count > *max) {
                why.push(format!("{count} previews would be awake and lifecycle.max_awake is {max}"));
            }
            if let Some(max) = max_memory.filter(|max| used > *max) {
                why.push(format!(
                    "awake previews would take {} MiB and lifecycle.max_awake_memory is {} MiB",
                    used >> 20,
                    max >> 20
                ));
            }
            return Err(format!(
                "no room to wake or launch this preview: {}; every other awake preview is pinned, being built or being woken. \
                 Put one to sleep or kill one, or raise the cap",
                why.join("; ")
            ));
        };
        victims.push(victim.slug.clone());
        count -= 1;
        used -= victim.memory;
    }
    Ok(victims)
}

/// The awake previews to put to sleep at `now`: those whose last request (or launch, or wake)
/// is `sleep_after` old or older. A preview with no record yet is skipped: its clock starts
/// when previewd first sees it.
pub fn idle_previews(now: SystemTime, awake: &[(Slug, Option<SystemTime>)], sleep_after: Duration) -> Vec<Slug> {
    awake
        .iter()
        .filter(|(_, last)| last.is_some_and(|last| now.duration_since(last).is_ok_and(|idle| idle >= sleep_after)))
        .map(|(slug, _)| slug.clone())
        .collect()
}

impl Lifecycle {
    pub fn sleepers(&self) -> &Sleepers {
        &self.sleepers
    }

    /// Puts a running preview to sleep: recorded, routed to the wake listener, its app and
    /// services stopped (data kept). A sleeping preview stays asleep.
    pub async fn sleep(&self, slug: &Slug, reason: SleepReason) -> Result<(), LifecycleError> {
        self.sleep_unless_used(slug, reason, Unused::Always).await.map(drop)
    }

    /// `sleep`, unless the preview was used in a way `unused` rules out when its turn comes (a
    /// redeploy may have held its lock meanwhile). Whether it went to sleep.
    #[tracing::instrument(skip_all, fields(slug = %slug, reason = reason.as_str()))]
    pub(super) async fn sleep_unless_used(
        &self,
        slug: &Slug,
        reason: SleepReason,
        unused: Unused,
    ) -> Result<bool, LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        if self.sleepers.is_asleep(slug) || (reason != SleepReason::Manual && self.is_pinned(slug)) {
            return Ok(false);
        }
        let last = self.last_request(slug);
        let used = match unused {
            Unused::Always => false,
            Unused::For(idle) => idle_previews(SystemTime::now(), &[(slug.clone(), last)], idle).is_empty(),
            Unused::Since(planned) => last != planned,
        };
        if used {
            return Ok(false);
        }
        let members = self.runtime.list_slug_all(slug).await?;
        if !members.iter().any(|c| c.role == Role::App && c.is_running()) {
            return Err(LifecycleError::NotFound(slug.clone()));
        }
        self.sleepers.set(slug, Some(Asleep { since: crate::clock::unix_now(), reason }))?;
        self.router.route(slug, self.sleepers.wake_upstream()).await?;
        self.stop_members(slug, &members).await?;
        self.metrics.sleeps.get_or_create(&ByReason { reason: reason.as_str() }).inc();
        tracing::info!("preview asleep");
        Ok(true)
    }

    /// Stops the app first (no request reaches it now), then its services.
    async fn stop_members(&self, slug: &Slug, members: &[ManagedContainer]) -> Result<(), LifecycleError> {
        let (apps, parts): (Vec<_>, Vec<_>) = members.iter().partition(|c| c.role == Role::App);
        for container in apps.into_iter().chain(parts).filter(|c| c.is_running() || c.state.is_transient()) {
            tracing::debug!(%slug, container = %short(&container.id), "stopping");
            self.runtime.stop(&container.id, STOP_GRACE).await?;
        }
        Ok(())
    }

    /// Wakes a preview, or joins the wake under way; the receiver says when it is up. The wake
    /// runs on its own task: a request that gives up does not stop it.
    pub fn wake_shared(&self, slug: &Slug) -> watch::Receiver<WakeState> {
        let mut waking = self.sleepers.waking();
        if let Some(receiver) = waking.get(slug)
            && matches!(*receiver.borrow(), WakeState::Waking(_))
        {
            return receiver.clone();
        }
        let (sender, receiver) = watch::channel(WakeState::Waking("queued"));
        waking.insert(slug.clone(), receiver.clone());
        let (lifecycle, slug) = (self.clone(), slug.clone());
        tokio::spawn(async move {
            let outcome = match lifecycle.wake(&slug, &sender).await {
                Ok(port) => WakeState::Awake(port),
                Err(err) => {
                    tracing::warn!(%slug, error = %err, "the preview did not wake");
                    WakeState::Failed(err.summary())
                }
            };
            sender.send_replace(outcome);
            lifecycle.sleepers.waking().remove(&slug);
        });
        receiver
    }

    /// `wake`, for a caller that waits for its end without following its steps.
    pub async fn wake_now(&self, slug: &Slug) -> Result<SocketAddr, LifecycleError> {
        let (steps, _) = watch::channel(WakeState::Waking("queued"));
        self.wake(slug, &steps).await
    }

    /// Wakes a sleeping preview: services started and ready, then the app (on its port, or a
    /// copy on a new one), answering, routed. Returns the app's port (that of the
    /// running app when the preview was not asleep).
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn wake(&self, slug: &Slug, steps: &watch::Sender<WakeState>) -> Result<SocketAddr, LifecycleError> {
        if self.sleepers.is_asleep(slug) {
            self.make_room(slug, None).await?;
        }
        let woken = self.wake_locked(slug, steps).await;
        self.sleepers.unreserve(slug);
        woken
    }

    async fn wake_locked(&self, slug: &Slug, steps: &watch::Sender<WakeState>) -> Result<SocketAddr, LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let members = self.runtime.list_slug_all(slug).await?;
        if !self.sleepers.is_asleep(slug) {
            let running = members.iter().rev().find(|c| c.role == Role::App && c.is_running());
            return running.and_then(|c| c.upstream).ok_or_else(|| LifecycleError::NotFound(slug.clone()));
        }
        let began = Instant::now();
        let result = self.wake_members(slug, &members, steps).await;
        let result_label = if result.is_ok() { crate::metrics::SUCCESS } else { crate::metrics::FAILURE };
        self.metrics.wakes.get_or_create(&result_label).inc();
        let upstream = result?;
        self.metrics.wake_seconds.observe(began.elapsed().as_secs_f64());
        tracing::info!(%upstream, elapsed_ms = began.elapsed().as_millis() as u64, "preview awake");
        Ok(upstream)
    }

    async fn wake_members(
        &self,
        slug: &Slug,
        members: &[ManagedContainer],
        steps: &watch::Sender<WakeState>,
    ) -> Result<SocketAddr, LifecycleError> {
        let (apps, parts): (Vec<_>, Vec<_>) = members.iter().partition(|c| c.role == Role::App);
        let app = apps.last().ok_or_else(|| LifecycleError::NotFound(slug.clone()))?;
        let spec = self.config.images.get(&app.image).ok_or_else(|| LifecycleError::ImageGone(app.image.clone()))?;
        steps.send_replace(WakeState::Waking("services"));
        for service in parts.iter().filter(|c| matches!(c.role, Role::Service(_)) && !c.is_running()) {
            let (Role::Service(name), Some(network)) = (&service.role, &service.network) else { continue };
            let Some(service_spec) = spec.services.get(name) else { continue };
            self.runtime.start_part(&service.id).await?;
            self.wait_until_ready(&service.id, network, name, service_spec).await?;
        }
        steps.send_replace(WakeState::Waking("app"));
        let (id, port) = self.start_app_again(slug, app, spec).await?;
        // The requests held for the wake are passed to the app from here: the reload that
        // routes it again is not theirs to wait for.
        steps.send_replace(WakeState::Awake(port));
        self.router.route(slug, port).await?;
        self.sleepers.set(slug, None)?;
        self.touch(slug);
        for old in apps.iter().filter(|old| old.id != id) {
            if let Err(err) = self.runtime.remove(&old.id).await {
                tracing::warn!(error = %err, container = %short(&old.id), "cannot remove the app container that slept");
            }
        }
        Ok(port)
    }

    /// Starts the app container that slept, on its port, until it answers; when that port was
    /// taken meanwhile (or it cannot start), a copy on a new port. Its id and port.
    async fn start_app_again(
        &self,
        slug: &Slug,
        app: &ManagedContainer,
        spec: &crate::config::ImageSpec,
    ) -> Result<(String, SocketAddr), LifecycleError> {
        if let Some(container) = self.runtime.stopped_app(&app.id).await? {
            let began = Instant::now();
            match self.runtime.start(&container).await {
                Ok(upstream) => {
                    tracing::debug!(elapsed_ms = began.elapsed().as_millis() as u64, "app started");
                    self.wait_until_answering(&app.id, upstream, spec).await?;
                    tracing::debug!(elapsed_ms = began.elapsed().as_millis() as u64, "app answers");
                    return Ok((app.id.clone(), upstream));
                }
                Err(err) => {
                    tracing::warn!(%slug, error = %err, "the app cannot start on its port again; starting a copy")
                }
            }
        }
        let copy = self.runtime.recreate(&app.id).await?.ok_or_else(|| LifecycleError::NotFound(slug.clone()))?;
        let mut progress = Progress::new(None, Arc::clone(&self.metrics));
        match self.start_until_answering(&copy, spec, &mut progress).await {
            Ok(port) => Ok((copy.id.clone(), port)),
            Err(err) => {
                if let Err(cleanup) = self.runtime.remove(&copy.id).await {
                    tracing::error!(error = %cleanup, container = %short(&copy.id), "cannot remove the failed copy");
                }
                Err(err)
            }
        }
    }

    /// A launch (or redeploy) is use, and wakes a sleeping preview: its new containers run.
    pub(super) fn awake_after_launch(&self, slug: &Slug) -> Result<(), LifecycleError> {
        self.touch(slug);
        self.forget_removal(slug)?;
        if self.sleepers.is_asleep(slug) {
            self.sleepers.set(slug, None)?;
        }
        Ok(())
    }

    /// The preview was used now (a launch or a wake counts).
    pub(super) fn touch(&self, slug: &Slug) {
        if let Some(traffic) = &self.traffic {
            traffic.touch(slug);
        }
    }

    /// When the preview last served a request through nginx (or was launched or woken), as
    /// last saved before a restart at least.
    pub fn last_request(&self, slug: &Slug) -> Option<SystemTime> {
        self.traffic.as_ref().and_then(|traffic| traffic.last_request(slug))
    }

    /// Puts to sleep the previews idle for `lifecycle.sleep_after`; how many went.
    pub async fn sleep_idle(&self) -> usize {
        let Some(sleep_after) = self.config.lifecycle.sleep_after else { return 0 };
        let Some(previews) = self.list_for("find idle ones").await else { return 0 };
        let awake: Vec<(Slug, Option<SystemTime>)> = previews
            .into_iter()
            .filter(|p| p.status == crate::preview::PreviewState::Running && !self.is_pinned(&p.name))
            .map(|p| {
                if self.last_request(&p.name).is_none() {
                    // First seen now (previewd started, or the preview was made by hand).
                    self.touch(&p.name);
                }
                let last = self.last_request(&p.name);
                (p.name, last)
            })
            .collect();
        let mut slept = 0;
        for slug in idle_previews(SystemTime::now(), &awake, sleep_after) {
            match self.sleep_unless_used(&slug, SleepReason::Idle, Unused::For(sleep_after)).await {
                Ok(went) => slept += usize::from(went),
                Err(err) => tracing::warn!(%slug, error = %err, "cannot put an idle preview to sleep"),
            }
        }
        slept
    }

    /// Room for `slug` to be awake under `lifecycle.max_awake` and `max_awake_memory`: the least
    /// recently used awake previews that are not busy are put to sleep first. `memory`: what it
    /// will take awake (`None`: what its image takes). Nothing for a preview already awake (a
    /// redeploy). One at a time: two launches do not both count the same room.
    pub(super) async fn make_room(&self, slug: &Slug, memory: Option<u64>) -> Result<(), LifecycleError> {
        let policy = &self.config.lifecycle;
        if policy.max_awake.is_none() && policy.max_awake_memory.is_none() {
            return Ok(());
        }
        let _room = self.sleepers.room.lock().await;
        for _ in 0..ROOM_ATTEMPTS {
            let previews = self.list().await?;
            let memory_of = |image: &crate::preview::ImageKey| self.config.images.get(image).map_or(0, preview_memory);
            if previews.iter().any(|p| &p.name == slug && p.status == crate::preview::PreviewState::Running) {
                return Ok(());
            }
            let memory =
                memory.or_else(|| previews.iter().find(|p| &p.name == slug).map(|p| memory_of(&p.image))).unwrap_or(0);
            let building = self.building();
            let running = |name: &Slug| {
                previews.iter().any(|p| &p.name == name && p.status == crate::preview::PreviewState::Running)
            };
            let mut awake: Vec<AwakePreview> = previews
                .iter()
                .filter(|p| p.status == crate::preview::PreviewState::Running && &p.name != slug)
                .map(|p| AwakePreview {
                    slug: p.name.clone(),
                    last_request: self.last_request(&p.name),
                    memory: memory_of(&p.image),
                    busy: self.kept_awake(&p.name, &building),
                })
                .collect();
            // Given room before and not running yet: awake soon, and not to be put to sleep.
            awake.extend(
                self.sleepers
                    .reservations()
                    .into_iter()
                    .filter(|(name, _)| name != slug && !running(name))
                    .map(|(name, memory)| AwakePreview { slug: name, last_request: None, memory, busy: true }),
            );
            let victims =
                room_for(&awake, memory, policy.max_awake, policy.max_awake_memory).map_err(LifecycleError::NoRoom)?;
            let mut all_slept = true;
            for victim in &victims {
                let planned = awake.iter().find(|p| &p.slug == victim).and_then(|p| p.last_request);
                tracing::info!(%slug, asleep = %victim, "putting the least recently used preview to sleep to make room");
                all_slept &= self.sleep_unless_used(victim, SleepReason::Cap, Unused::Since(planned)).await?;
            }
            if all_slept {
                self.sleepers.reserved.lock().unwrap_or_else(PoisonError::into_inner).insert(slug.clone(), memory);
                return Ok(());
            }
        }
        Err(LifecycleError::NoRoom(
            "no room to wake or launch this preview: the previews chosen to sleep kept being used; try again"
                .to_owned(),
        ))
    }

    /// Forgets everything about a preview's sleep and pin (it was removed).
    pub(super) fn forget_sleep(&self, slug: &Slug) -> Result<(), LifecycleError> {
        if let Some(traffic) = &self.traffic {
            traffic.forget(slug);
        }
        if self.sleepers.is_asleep(slug) {
            self.sleepers.set(slug, None)?;
        }
        if self.is_pinned(slug) {
            self.pins.set(slug, None)?;
        }
        Ok(())
    }

    /// Reconcile's part for a sleeping preview: its containers stay (stopped: one found running,
    /// after a crash in the middle of a sleep, is stopped again) and its host goes to the wake
    /// listener. The port to route.
    pub(super) async fn settle_asleep(
        &self,
        slug: &Slug,
        members: &[ManagedContainer],
    ) -> Result<SocketAddr, LifecycleError> {
        self.stop_members(slug, members).await?;
        Ok(self.sleepers.wake_upstream())
    }
}

/// The memory limits of a preview of `spec`: its app and its services.
pub fn preview_memory(spec: &crate::config::ImageSpec) -> u64 {
    let services: i64 = spec.services.values().map(|service| service.memory).sum();
    u64::try_from(spec.memory + services).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn awake(name: &str, used_ago: Option<u64>, memory: u64, busy: bool) -> AwakePreview {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        AwakePreview {
            slug: slug(name),
            last_request: used_ago.map(|ago| now - Duration::from_secs(ago)),
            memory,
            busy,
        }
    }

    #[test]
    fn the_least_recently_used_previews_sleep_to_make_room_and_busy_ones_never() {
        let previews = [
            awake("recent", Some(5), 100, false),
            awake("old", Some(500), 100, false),
            awake("older", Some(900), 100, true),
        ];
        assert_eq!(room_for(&previews, 100, Some(3), None), Ok(vec![slug("old")]), "older is busy");
        assert_eq!(room_for(&previews, 100, Some(4), None), Ok(vec![]));
        assert_eq!(room_for(&previews, 100, None, Some(250)), Ok(vec![slug("old"), slug("recent")]));
        let never_used = [awake("used", Some(5), 100, false), awake("unused", None, 100, false)];
        assert_eq!(room_for(&never_used, 100, Some(2), None), Ok(vec![slug("unused")]));
    }

    #[test]
    fn no_room_is_refused_saying_which_cap_and_why() {
        let previews = [awake("busy", Some(5), 100, true)];
        let why = room_for(&previews, 100, Some(1), None).unwrap_err();
        assert!(
            why.contains("2 previews would be awake and lifecycle.max_awake is 1")
                && why.contains("pinned, being built or being woken"),
            "{why}"
        );
        let why = room_for(&[], 300 << 20, None, Some(200 << 20)).unwrap_err();
        assert!(why.contains("300 MiB") && why.contains("max_awake_memory is 200 MiB"), "{why}");
    }

    fn slug(name: &str) -> Slug {
        Slug::parse(name).unwrap()
    }

    #[test]
    fn previews_idle_for_sleep_after_are_put_to_sleep_and_no_others() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let ago = |seconds: u64| Some(now - Duration::from_secs(seconds));
        let awake = [
            (slug("busy"), ago(10)),
            (slug("idle"), ago(600)),
            (slug("just-idle"), ago(300)),
            (slug("unseen"), None),
            (slug("future"), Some(now + Duration::from_secs(5))),
        ];
        assert_eq!(idle_previews(now, &awake, Duration::from_secs(300)), vec![slug("idle"), slug("just-idle")]);
    }

    #[test]
    fn the_asleep_record_survives_a_reload_and_forgets_woken_previews() {
        let dir = tempfile::tempdir().unwrap();
        let sleepers = Sleepers::load(dir.path());
        sleepers.set(&slug("a"), Some(Asleep { since: 1, reason: SleepReason::Idle })).unwrap();
        sleepers.set(&slug("b"), Some(Asleep { since: 2, reason: SleepReason::Manual })).unwrap();
        sleepers.set(&slug("a"), None).unwrap();
        let again = Sleepers::load(dir.path());
        assert!(!again.is_asleep(&slug("a")));
        assert_eq!(again.get(&slug("b")), Some(Asleep { since: 2, reason: SleepReason::Manual }));
    }
}
