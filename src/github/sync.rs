//! The periodic sync with GitHub: webhooks missed while previewd was down (or lost by GitHub)
//! would leave a closed pull request's preview running, or an open one without its preview.
//! Every `sync_interval`, each configured repository's open pull requests are read from GitHub
//! and fed through the same desired-state rule as deliveries; previews of pull requests that
//! are no longer open are removed.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::GitHubApi;
use super::event::{Desired, desired};
use super::feedback::PullRequestKey;
use super::previews::{PullRequestPreviews, Source};
use crate::config::{Config, RepoConfig};
use crate::lifecycle::Lifecycle;
use crate::preview::Slug;

pub struct Sync {
    pub api: GitHubApi,
    pub previews: PullRequestPreviews,
    pub lifecycle: Lifecycle,
    pub config: std::sync::Arc<Config>,
}

impl Sync {
    /// Runs a sync every `interval` until `shutdown`, the first one right away.
    pub async fn run(self, interval: Duration, tasks: TaskTracker, shutdown: CancellationToken) {
        loop {
            self.once(&tasks).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass over every configured repository; a repository whose list cannot be read is
    /// left as it is.
    pub async fn once(&self, tasks: &TaskTracker) {
        let Some(github) = &self.config.github else { return };
        let running = self.lifecycle.list().await.unwrap_or_default();
        for repo in github.repos.values() {
            // One repository's failure (no access, a hiccup) must not stop the others'.
            let open = match self.api.open_pulls(&repo.full_name).await {
                Ok(open) => open,
                Err(err) => {
                    tracing::warn!(repo = %repo.full_name, error = %err, "cannot read the open pull requests; skipping this repository");
                    continue;
                }
            };
            let mut open_numbers = BTreeSet::new();
            for pr in &open {
                open_numbers.insert(pr.number);
                let key = PullRequestKey { repo: repo.full_name.clone(), number: pr.number };
                match desired(pr, repo, self.previews.memory.approved(&key).as_deref()) {
                    Ok((slug, state)) => self.apply(tasks, repo, pr.number, slug, state, &pr.updated_at),
                    Err(err) => {
                        tracing::warn!(repo = %repo.full_name, pr = pr.number, error = %err, "cannot sync a pull request")
                    }
                }
            }
            let closed = running.iter().filter(|p| {
                p.repo.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(&repo.full_name))
                    && p.pr.is_some_and(|n| !open_numbers.contains(&n))
            });
            for preview in closed {
                let number = preview.pr.unwrap_or_default();
                // Closed after everything the preview was built from, whatever GitHub sent before.
                let now = crate::clock::iso8601(crate::clock::unix_now());
                self.apply(
                    tasks,
                    repo,
                    number,
                    preview.name.clone(),
                    Desired::Absent("the pull request is no longer open"),
                    &now,
                );
            }
        }
    }

    fn apply(&self, tasks: &TaskTracker, repo: &RepoConfig, number: u64, slug: Slug, state: Desired, updated_at: &str) {
        let key = PullRequestKey { repo: repo.full_name.clone(), number };
        if self.previews.record(&key, slug, state, updated_at, Source::GitHub) {
            self.previews.schedule(key, tasks);
        }
    }
}
