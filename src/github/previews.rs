//! Applies a pull request's desired state: its preview made to run at the head commit (a new
//! container answering before the route switches) or removed, one pull request at a time, with
//! each step reported to GitHub.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::event::{Desired, Target, with_tag};
use super::feedback::{Feedback, PullRequestKey, Step};
use crate::config::Config;
use crate::lifecycle::{Lifecycle, LifecycleError};
use crate::locks::KeyedLocks;
use crate::preview::{EnvName, Slug};
use crate::request::{LaunchRequest, PullRequestOrigin};

#[derive(Clone)]
pub struct PullRequestPreviews {
    config: Arc<Config>,
    lifecycle: Lifecycle,
    feedback: Feedback,
    /// Keeps each preview's check-launch-report sequence whole, so its feedback stays in order.
    order: Arc<KeyedLocks<Slug>>,
}

impl PullRequestPreviews {
    pub fn new(config: Arc<Config>, lifecycle: Lifecycle, feedback: Feedback) -> Self {
        Self { config, lifecycle, feedback, order: Arc::default() }
    }

    #[tracing::instrument(skip_all, fields(slug = %slug))]
    pub async fn apply(&self, slug: Slug, desired: Desired, key: PullRequestKey) {
        let _order = self.order.lock(&slug).await;
        match desired {
            Desired::Present(target) => self.make_present(slug, target, key).await,
            Desired::Absent(reason) => self.make_absent(slug, reason, key).await,
        }
    }

    async fn make_present(&self, slug: Slug, target: Target, key: PullRequestKey) {
        if self.lifecycle.runs_commit(&slug, &target.sha).await {
            tracing::info!(sha = %target.sha, "preview already runs the head commit");
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
                tracing::error!(error = %err, "pull request preview failed");
                Step::Failed { sha: target.sha, reason: err.to_string() }
            }
        };
        self.feedback.send(key, slug, step);
    }

    async fn make_absent(&self, slug: Slug, reason: &str, key: PullRequestKey) {
        match self.lifecycle.kill(&slug).await {
            Ok(()) => self.feedback.send(key, slug, Step::Removed { reason: reason.to_owned() }),
            Err(LifecycleError::NotFound(_)) => tracing::debug!(reason, "no preview to remove"),
            Err(err) => tracing::error!(error = %err, "cannot remove the pull request's preview"),
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
            origin: Some(PullRequestOrigin { repo: target.repo.clone(), number: target.number, sha: target.sha.clone() }),
        })
    }
}
