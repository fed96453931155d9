//! What a preview's URL says while no app serves it (the status pages of `crate::wake`): the
//! deploy under way and its step, how the last deploy failed (its short reason, no log lines),
//! or why a pull request's preview was removed (closed, by age, destroyed). Steps and failures
//! are kept in memory; removals in `<state_dir>/removed.json`, the newest [`MAX_REMOVED`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::store::SlugFile;
use super::{Lifecycle, LifecycleError};
use crate::build::BuildFailure;
use crate::preview::Slug;
use crate::request::PullRequestOrigin;

/// Removals remembered; past this, the oldest are forgotten (their URL answers 404 again).
pub const MAX_REMOVED: usize = 1000;

/// Why a pull request's preview is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// Unix seconds.
    pub at: i64,
    pub reason: String,
    pub repo: String,
    pub number: u64,
}

/// What the status page of a preview that does not serve says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviewPage {
    /// A deploy under way: the step (`build`, `image`, `create`, `start`, `health`, ...) and
    /// what it does.
    Deploying {
        step: String,
        doing: String,
    },
    /// The last deploy failed: why, in short.
    Failed(String),
    Removed(Removal),
}

/// The deploys of every preview, as the status pages see them.
pub struct Deploys {
    steps: Mutex<HashMap<Slug, (String, String)>>,
    failed: Mutex<HashMap<Slug, String>>,
    removed: SlugFile<Removal>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Deploys {
    pub fn load(state_dir: &std::path::Path) -> Self {
        Self { steps: Mutex::default(), failed: Mutex::default(), removed: SlugFile::load(state_dir, "removed.json") }
    }

    /// A deploy's step began.
    pub fn step(&self, slug: &Slug, step: &str, doing: &str) {
        locked(&self.steps).insert(slug.clone(), (step.to_owned(), doing.to_owned()));
    }

    /// A deploy ended: run (the page goes), failed (the reason stays until the next deploy or
    /// a kill), or stopped for a newer commit or a removal (nothing to say).
    pub fn finish(&self, slug: &Slug, outcome: Result<(), &LifecycleError>) {
        locked(&self.steps).remove(slug);
        match outcome {
            Ok(()) => {
                locked(&self.failed).remove(slug);
                if self.removed.contains(slug)
                    && let Err(err) = self.removed.set(slug, None)
                {
                    tracing::warn!(%slug, error = %err, "cannot forget that the preview was removed");
                }
            }
            Err(LifecycleError::Build(BuildFailure::Superseded | BuildFailure::Removed)) => {}
            Err(err) => {
                locked(&self.failed).insert(slug.clone(), err.summary());
            }
        }
    }

    /// The preview went (killed): no failure to tell any more.
    pub fn forget(&self, slug: &Slug) {
        locked(&self.steps).remove(slug);
        locked(&self.failed).remove(slug);
    }

    /// The page of a preview that does not serve, if previewd knows something of it.
    pub fn page(&self, slug: &Slug) -> Option<PreviewPage> {
        if let Some((step, doing)) = locked(&self.steps).get(slug) {
            return Some(PreviewPage::Deploying { step: step.clone(), doing: doing.clone() });
        }
        if let Some(reason) = locked(&self.failed).get(slug) {
            return Some(PreviewPage::Failed(reason.clone()));
        }
        self.removed.get(slug).map(PreviewPage::Removed)
    }

    fn remember_removal(&self, slug: &Slug, removal: Removal) -> Result<(), LifecycleError> {
        self.removed.set(slug, Some(removal))?;
        let all = self.removed.all();
        if all.len() > MAX_REMOVED {
            let mut times: Vec<i64> = all.values().map(|r| r.at).collect();
            times.sort_unstable();
            let oldest_kept = times[all.len() - MAX_REMOVED];
            self.removed.retain(|_, removal| removal.at >= oldest_kept)?;
        }
        Ok(())
    }
}

impl Lifecycle {
    pub fn deploys(&self) -> &Deploys {
        &self.deploys
    }

    /// Remembers why a pull request's preview was removed, for its status page (410).
    pub fn record_removal(&self, slug: &Slug, origin: &PullRequestOrigin, reason: &str) {
        let removal = Removal {
            at: crate::clock::unix_now(),
            reason: reason.to_owned(),
            repo: origin.repo.clone(),
            number: origin.number,
        };
        if let Err(err) = self.deploys.remember_removal(slug, removal) {
            tracing::warn!(%slug, error = %err, "cannot remember why the preview was removed");
        }
    }

    /// The status page of a preview that does not serve: its deploy under way (a build queued
    /// or downloading too), its last failure, or its removal.
    pub fn page_of(&self, slug: &Slug) -> Option<PreviewPage> {
        if let Some(page @ PreviewPage::Deploying { .. }) = self.deploys.page(slug) {
            return Some(page);
        }
        if let Some(build) = self.builds.statuses().into_iter().find(|build| &build.name == slug) {
            let doing = build.step.unwrap_or_else(|| build.state.to_owned());
            return Some(PreviewPage::Deploying { step: "build".to_owned(), doing });
        }
        self.deploys.page(slug)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(name: &str) -> Slug {
        Slug::parse(name).unwrap()
    }

    #[test]
    fn a_deploy_shows_its_step_then_its_failure_and_a_success_clears_both() {
        let dir = tempfile::tempdir().unwrap();
        let deploys = Deploys::load(dir.path());
        let name = slug("web");
        assert_eq!(deploys.page(&name), None);
        deploys.step(&name, "health", "waiting for the app to answer");
        assert!(matches!(deploys.page(&name), Some(PreviewPage::Deploying { step, .. }) if step == "health"));
        let failed = LifecycleError::NotFound(name.clone());
        deploys.finish(&name, Err(&failed));
        assert!(matches!(deploys.page(&name), Some(PreviewPage::Failed(_))));
        deploys.finish(&name, Ok(()));
        assert_eq!(deploys.page(&name), None);
    }

    #[test]
    fn a_stopped_build_leaves_no_failure_to_show() {
        let dir = tempfile::tempdir().unwrap();
        let deploys = Deploys::load(dir.path());
        let name = slug("web");
        deploys.finish(&name, Err(&LifecycleError::Build(BuildFailure::Superseded)));
        assert_eq!(deploys.page(&name), None);
    }

    #[test]
    fn removals_survive_a_restart_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let deploys = Deploys::load(dir.path());
        let removal = |at| Removal { at, reason: "closed".into(), repo: "o/r".into(), number: 1 };
        for at in 0..(MAX_REMOVED as i64 + 5) {
            deploys.remember_removal(&slug(&format!("p{at}")), removal(at)).unwrap();
        }
        let again = Deploys::load(dir.path());
        assert_eq!(again.page(&slug("p0")), None, "the oldest are forgotten");
        let newest = slug(&format!("p{}", MAX_REMOVED + 4));
        assert_eq!(again.page(&newest), Some(PreviewPage::Removed(removal(MAX_REMOVED as i64 + 4))));
        assert_eq!(again.removed.all().len(), MAX_REMOVED);
    }
}
