//! The periodic sweep (every `LifecyclePolicy::sweep_every`): a quiet period that began puts
//! awake previews to sleep, idle previews sleep, unused ones are removed, and the last request
//! of each preview is saved to `<state_dir>/last-requests.json` (so idle and age clocks survive
//! a restart) when it changed.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::quiet::{quiet_since, sleeps_for_quiet, timestamp};
use super::sleep::{SleepReason, Unused};
use super::{Lifecycle, LifecycleError};
use crate::preview::{PreviewState, Slug};

impl Lifecycle {
    /// One sweep at `now`.
    pub async fn sweep(&self, now: SystemTime) {
        self.sleep_for_quiet_hours(now).await;
        self.sleep_idle().await;
        self.remove_unused(now).await;
        let lifecycle = self.clone();
        // Two fsyncs: not on a runtime thread.
        let saved = tokio::task::spawn_blocking(move || lifecycle.save_last_requests()).await;
        if let Ok(Err(err)) = saved {
            tracing::warn!(error = %err, "cannot save when previews were last used");
        }
    }

    /// When a quiet period runs, puts to sleep the awake previews not used since it began (not
    /// the pinned or busy ones); how many went.
    pub async fn sleep_for_quiet_hours(&self, now: SystemTime) -> usize {
        let Some(quiet) = &self.config.lifecycle.quiet_hours else { return 0 };
        let Some(since) = quiet_since(timestamp(now), quiet) else { return 0 };
        let Some(previews) = self.list_for("find those to put to sleep for the quiet hours").await else { return 0 };
        let building = self.building();
        let mut slept = 0;
        for preview in previews.iter().filter(|p| p.status == PreviewState::Running) {
            let slug = &preview.name;
            let last = self.last_request(slug);
            if self.kept_awake(slug, &building) || !sleeps_for_quiet(last, since) {
                continue;
            }
            match self.sleep_unless_used(slug, SleepReason::QuietHours, Unused::Since(last)).await {
                Ok(went) => slept += usize::from(went),
                Err(err) => tracing::warn!(%slug, error = %err, "cannot put a preview to sleep for the quiet hours"),
            }
        }
        slept
    }

    /// Every preview, for a sweep's step (`what` it lists them for, when that fails).
    pub(super) async fn list_for(&self, what: &str) -> Option<Vec<crate::lifecycle::PreviewInfo>> {
        self.list().await.inspect_err(|err| tracing::warn!(error = %err, "cannot list previews to {what}")).ok()
    }

    /// Whether nothing automatic may put the preview to sleep or remove it: pinned, or busy
    /// (among `building`, or being woken).
    pub(super) fn kept_awake(&self, slug: &Slug, building: &[Slug]) -> bool {
        self.is_pinned(slug) || building.contains(slug) || self.sleepers.is_waking(slug)
    }

    /// The previews being built (queued, downloading or building).
    pub(super) fn building(&self) -> Vec<Slug> {
        self.builds.statuses().into_iter().map(|build| build.name).collect()
    }

    /// Writes the last requests when they changed since the last write.
    pub fn save_last_requests(&self) -> Result<(), LifecycleError> {
        let Some(traffic) = &self.traffic else { return Ok(()) };
        let seconds: BTreeMap<Slug, i64> =
            traffic.snapshot().into_iter().map(|(slug, at)| (slug, crate::clock::unix_seconds(at))).collect();
        self.last_requests.replace(seconds)
    }
}
