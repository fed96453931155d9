//! Applies a pull request's desired state: its preview made to run at the head commit (a new
//! container answering before the route switches) or removed, one pull request at a time, with
//! each step reported to GitHub.
//!
//! GitHub does not deliver webhooks in order. Each pull request keeps only the newest state
//! delivered (by the payload's `updated_at`); an older delivery arriving late is dropped, and the
//! work always applies the newest state, so `synchronize` and `closed` arriving together cannot
//! leave the preview of a closed pull request running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::task::TaskTracker;

use super::event::{Desired, Target, with_tag};
use super::feedback::{Feedback, PullRequestKey, Step};
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::locks::KeyedLocks;
use crate::preview::{EnvName, Slug};
use crate::request::{LaunchRequest, PullRequestOrigin};

#[derive(Clone)]
pub struct PullRequestPreviews {
    config: Arc<Config>,
    lifecycle: Lifecycle,
    feedback: Feedback,
    /// The newest delivered state of each pull request.
    latest: Arc<Mutex<HashMap<PullRequestKey, Latest>>>,
    /// One pull request's work at a time, so its feedback stays in order.
    order: Arc<KeyedLocks<PullRequestKey>>,
    /// Pull requests with work queued that has not read their newest state yet.
    queued: Arc<Mutex<HashSet<PullRequestKey>>>,
}

#[derive(Clone)]
struct Latest {
    updated_at: String,
    slug: Slug,
    desired: Desired,
}

/// Pull requests whose newest state is remembered; past this, those with no preview are forgotten.
const MAX_REMEMBERED: usize = 10_000;

impl PullRequestPreviews {
    pub fn new(config: Arc<Config>, lifecycle: Lifecycle, feedback: Feedback) -> Self {
        Self { config, lifecycle, feedback, latest: Arc::default(), order: Arc::default(), queued: Arc::default() }
    }

    /// Remembers a delivered state; false when a newer one was delivered before (this one is
    /// stale and must not be applied).
    pub fn record(&self, key: &PullRequestKey, slug: Slug, desired: Desired, updated_at: &str) -> bool {
        let mut latest = self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if latest.get(key).is_some_and(|known| known.updated_at.as_str() > updated_at) {
            return false;
        }
        if latest.len() >= MAX_REMEMBERED {
            latest.retain(|_, known| matches!(known.desired, Desired::Present(_)));
        }
        latest.insert(key.clone(), Latest { updated_at: updated_at.to_owned(), slug, desired });
        true
    }

    /// Queues the work that applies a pull request's newest state, unless work that has yet to
    /// read it is queued already: a flood of deliveries for one pull request then costs one run
    /// (and one task waiting), not one each.
    pub fn schedule(&self, key: PullRequestKey, tasks: &TaskTracker) {
        if !self.queued.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone()) {
            return;
        }
        let previews = self.clone();
        let runs = self.lifecycle.metrics().pull_request_runs.clone();
        runs.inc();
        tasks.spawn(async move {
            previews.apply_latest(key).await;
            runs.dec();
        });
    }

    /// Applies the newest state delivered for a pull request.
    #[tracing::instrument(skip_all, fields(repo = %key.repo, pr = key.number))]
    async fn apply_latest(&self, key: PullRequestKey) {
        let _order = self.order.lock(&key).await;
        // From here on, a newer delivery needs work of its own: this one may have read too early.
        self.queued.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        let latest = self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&key).cloned();
        let Some(Latest { slug, desired, .. }) = latest else { return };
        match desired {
            Desired::Present(target) => self.make_present(slug, target, key).await,
            Desired::Absent(reason) => self.make_absent(slug, reason, key).await,
        }
    }

    async fn make_present(&self, slug: Slug, target: Target, key: PullRequestKey) {
        if self.lifecycle.runs_commit(&slug, &target.sha).await {
            tracing::info!(%slug, sha = %target.sha, "preview already runs the head commit");
            return;
        }
        let Some(request) = self.launch_request(&slug, &target) else {
            tracing::error!(repo = %target.repo, "the repository is no longer in config.yml");
            return;
        };
        self.feedback.send(key.clone(), slug.clone(), Step::Deploying { sha: target.sha.clone() });
        let step = match self.lifecycle.launch(request).await {
            Ok(info) => Step::Live { sha: target.sha, url: info.url },
            Err(err) => {
                tracing::error!(%slug, error = %err, "pull request preview failed");
                Step::Failed { sha: target.sha, reason: err.summary() }
            }
        };
        self.feedback.send(key, slug, step);
    }

    async fn make_absent(&self, slug: Slug, reason: &str, key: PullRequestKey) {
        let origin = PullRequestOrigin { repo: key.repo.clone(), number: key.number, sha: String::new() };
        match self.lifecycle.kill_pull_request(&slug, &origin).await {
            Ok(true) => self.feedback.send(key, slug, Step::Removed { reason: reason.to_owned() }),
            Ok(false) => tracing::debug!(%slug, reason, "no preview of this pull request to remove"),
            Err(err) => tracing::error!(%slug, error = %err, "cannot remove the pull request's preview"),
        }
    }

    /// The launch of a pull request's preview: its image (with the `image_tag` override), the
    /// branch as Stager's `container_name`, and the `PREVIEW_*` variables of the pull request.
    fn launch_request(&self, slug: &Slug, target: &Target) -> Option<LaunchRequest> {
        let repo = self.config.github.as_ref()?.repo(&target.repo)?;
        let mut spec = self.config.images.get(&repo.image)?.clone();
        if let Some(tag) = &target.image_tag {
            spec.image = with_tag(&spec.image, tag);
        }
        let env: BTreeMap<EnvName, String> = [
            ("PREVIEW_PR_NUMBER", target.number.to_string()),
            ("PREVIEW_BRANCH", target.branch.clone()),
            ("PREVIEW_SHA", target.sha.clone()),
            ("PREVIEW_REPO", target.repo.clone()),
        ]
        .into_iter()
        .filter_map(|(name, value)| EnvName::parse(name).ok().map(|name| (name, value.replace('\0', ""))))
        .collect();
        Some(LaunchRequest {
            image: repo.image.clone(),
            spec,
            name: slug.clone(),
            container_name: target.branch.replace('\0', ""),
            env,
            origin: Some(PullRequestOrigin {
                repo: target.repo.clone(),
                number: target.number,
                sha: target.sha.clone(),
            }),
            owner: None,
        })
    }
}
