//! Removal by age (`lifecycle.remove_after`): a preview with no request through nginx and no
//! deploy for that long is removed, unless pinned or being built or woken. A pull request's
//! preview removed so (or by `/preview destroy`) is remembered, with its commit, in
//! `<state_dir>/expired.json`: the periodic sync with GitHub does not bring it back for the same
//! commit, a push (a new commit) or `/preview redeploy` does. The removal is announced as a
//! [`LifecycleEvent`] so that the pull request's comment can say so.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::sleep::idle_previews;
use super::{Lifecycle, LifecycleError};
use crate::preview::Slug;
use crate::request::PullRequestOrigin;

/// What the lifecycle announces to those who follow it (GitHub feedback).
#[derive(Debug, Clone)]
pub enum LifecycleEvent {
    /// Removed for no request and no deploy for `after`.
    RemovedByAge { slug: Slug, origin: Option<PullRequestOrigin>, after: Duration },
}

/// A pull request's preview removed by age, as `expired.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expired {
    /// Unix seconds.
    pub at: i64,
    pub repo: String,
    pub number: u64,
    /// The commit it ran.
    pub sha: String,
}

/// The last use of a preview: its last request, or its deploy when that came later.
pub fn last_use(last_request: Option<SystemTime>, created_unix: i64) -> SystemTime {
    let deployed = crate::clock::system_time(created_unix);
    last_request.map_or(deployed, |last| last.max(deployed))
}

impl Lifecycle {
    /// Removes the previews unused for `lifecycle.remove_after`; how many went.
    pub async fn remove_unused(&self, now: SystemTime) -> usize {
        let Some(after) = self.config.lifecycle.remove_after else { return 0 };
        let Some(previews) = self.list_for("find unused ones").await else { return 0 };
        let building = self.building();
        let candidates: Vec<(Slug, Option<SystemTime>)> = previews
            .into_iter()
            .filter(|p| !self.kept_awake(&p.name, &building))
            .filter(|p| {
                // First seen now (previewd started without a record of it): its clock starts,
                // rather than its age being counted from its deploy.
                let seen = self.last_request(&p.name).is_some();
                if !seen {
                    self.touch(&p.name);
                }
                seen
            })
            .map(|p| {
                let used = last_use(self.last_request(&p.name), p.created);
                (p.name, Some(used))
            })
            .collect();
        let mut removed = 0;
        for slug in idle_previews(now, &candidates, after) {
            match self.remove_unless_used(&slug, after).await {
                Ok(went) => removed += usize::from(went),
                Err(err) => tracing::warn!(%slug, error = %err, "cannot remove an unused preview"),
            }
        }
        removed
    }

    /// Removes the preview if, under its lock, it is still unused for `after` and not pinned.
    #[tracing::instrument(skip_all, fields(slug = %slug))]
    async fn remove_unless_used(&self, slug: &Slug, after: Duration) -> Result<bool, LifecycleError> {
        let _guard = self.locks.lock(slug).await;
        let containers = self.runtime.list_slug(slug).await?;
        let Some(app) = containers.last() else { return Ok(false) };
        let used = last_use(self.last_request(slug), app.created);
        if self.kept_awake(slug, &self.building())
            || idle_previews(SystemTime::now(), &[(slug.clone(), Some(used))], after).is_empty()
        {
            return Ok(false);
        }
        let origin = app.origin.clone();
        self.kill_locked(slug, containers).await?;
        if let Some(origin) = &origin {
            self.remember_removal(slug, origin)?;
        }
        self.metrics.removals_by_age.inc();
        tracing::info!(after_secs = after.as_secs(), "preview removed: no request and no deploy");
        // Nobody following is fine: the removal stands.
        self.events.send(LifecycleEvent::RemovedByAge { slug: slug.clone(), origin, after }).ok();
        Ok(true)
    }

    /// Remembers that a pull request's preview was removed while its pull request stays open:
    /// the sync with GitHub leaves it removed until another commit.
    pub fn remember_removal(&self, slug: &Slug, origin: &PullRequestOrigin) -> Result<(), LifecycleError> {
        let expired = Expired {
            at: crate::clock::unix_now(),
            repo: origin.repo.clone(),
            number: origin.number,
            sha: origin.sha.clone(),
        };
        self.expired.set(slug, Some(expired))
    }

    /// Whether the preview was removed by age (or by `/preview destroy`) while it ran this
    /// commit (the sync with GitHub then leaves it removed).
    pub fn stays_removed(&self, slug: &Slug, sha: &str) -> bool {
        self.expired.get(slug).is_some_and(|expired| expired.sha == sha)
    }

    /// Forgets a removal by age: the preview may come back (a launch, `/preview redeploy`, the
    /// pull request closed).
    pub fn forget_removal(&self, slug: &Slug) -> Result<(), LifecycleError> {
        if self.expired.contains(slug) { self.expired.set(slug, None) } else { Ok(()) }
    }

    /// Follows what the lifecycle announces.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<LifecycleEvent> {
        self.events.subscribe()
    }

    /// When a preview will be removed by age if nobody uses it (Unix seconds), unless pinned.
    pub(super) fn expires(&self, slug: &Slug, created: i64) -> Option<i64> {
        let after = self.config.lifecycle.remove_after?;
        if self.is_pinned(slug) {
            return None;
        }
        let at = last_use(self.last_request(slug), created) + after;
        Some(crate::clock::unix_seconds(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_preview_is_last_used_at_its_last_request_or_its_later_deploy() {
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(last_use(Some(at(500)), 100), at(500));
        assert_eq!(last_use(Some(at(50)), 100), at(100), "a deploy after the last request counts");
        assert_eq!(last_use(None, 100), at(100), "never requested: its deploy");
    }

    #[test]
    fn previews_unused_for_remove_after_are_removed_and_no_others() {
        let now = UNIX_EPOCH + Duration::from_secs(10 * 86_400);
        let week = Duration::from_secs(7 * 86_400);
        let slug = |name: &str| Slug::parse(name).unwrap();
        let candidates = [
            (slug("old"), Some(last_use(None, 86_400))),
            (slug("used"), Some(last_use(Some(now - Duration::from_secs(3600)), 86_400))),
            (slug("pushed"), Some(last_use(None, 9 * 86_400))),
        ];
        assert_eq!(idle_previews(now, &candidates, week), vec![slug("old")]);
    }
}
