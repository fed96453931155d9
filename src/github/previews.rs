//! Applies a pull request's desired state: its preview made to run at the head commit (a new
//! container answering before the route switches) or removed, one pull request at a time, with
//! each step reported to GitHub.
//!
//! GitHub does not deliver webhooks in order. Each pull request keeps only the newest state
//! delivered (by the payload's `updated_at`); an older delivery arriving late is dropped, and the
//! work always applies the newest state, so `synchronize` and `closed` arriving together cannot
//! leave the preview of a closed pull request running.
//!
//! A delivery's signature does not cover its delivery id, so a captured delivery can be sent
//! again under a new id. The work therefore acts on the pull request as GitHub's API shows it,
//! not on the payload; only when GitHub cannot be asked does it fall back to a payload, and only
//! to one newer than anything applied to that pull request (see [`basis`]). The newest state
//! applied is kept in [`Memory`] across restarts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::client::{ApiCallError, GitHubApi};
use super::event::{Desired, PullRequest, Target, desired, with_tag};
use super::feedback::{Feedback, PullRequestKey, Step};
use super::memory::Memory;
use crate::build::context::{ContextError, Layout};
use crate::build::{BuildFailure, BuildInput, SourceArchive};
use crate::config::{BuildSpec, Config};
use crate::lifecycle::{Lifecycle, LifecycleError, LifecycleEvent, PreviewInfo};
use crate::locks::KeyedLocks;
use crate::preview::{EnvName, Slug};
use crate::request::{LaunchRequest, PullRequestOrigin};

#[derive(Clone)]
pub struct PullRequestPreviews {
    pub(super) config: Arc<Config>,
    pub(super) lifecycle: Lifecycle,
    pub(super) feedback: Feedback,
    pub(super) api: GitHubApi,
    pub(super) memory: Arc<Memory>,
    /// The newest delivered state of each pull request.
    latest: Arc<Mutex<HashMap<PullRequestKey, Latest>>>,
    /// One pull request's work at a time, so its feedback stays in order.
    pub(super) order: Arc<KeyedLocks<PullRequestKey>>,
    /// Pull requests with work queued that has not read their newest state yet.
    queued: Arc<Mutex<HashSet<PullRequestKey>>>,
}

/// Where a pull request's state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A webhook payload: authentic, but maybe replayed; read from GitHub before acting.
    Delivery,
    /// GitHub's API (the periodic sync): current when read.
    GitHub,
}

#[derive(Clone)]
pub(super) struct Latest {
    pub(super) updated_at: String,
    pub(super) slug: Slug,
    pub(super) desired: Desired,
    source: Source,
}

/// Pull requests whose newest state is remembered; past this, those with no preview are forgotten.
const MAX_REMEMBERED: usize = 10_000;
/// The read of a pull request delays its preview: past this, GitHub counts as unreachable.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// GitHub's API can lag a moment behind the webhook it just sent: reads of a state older than
/// the delivery's are tried this often, this far apart, before GitHub's answer is taken anyway.
const LAG_TRIES: usize = 3;
const LAG_DELAY: Duration = Duration::from_secs(1);

/// What a delivery's work acts on, given what reading the pull request from GitHub gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// The pull request as GitHub's API showed it.
    GitHub,
    /// The payload, unverified, and why that is allowed.
    Payload(String),
    /// Nothing, and why.
    Nothing(String),
}

/// A payload is acted on unverified only when GitHub cannot be asked (unreachable, failing,
/// rate-limited) and it is strictly newer than the newest state applied: a replay is of a
/// delivery previewd (or GitHub) saw before, so it is never newer than that. A 404 (no such pull
/// request, or the token cannot see it) and any other refusal act on nothing.
pub fn basis(read: &Result<PullRequest, ApiCallError>, delivered_at: &str, applied: Option<&str>) -> Basis {
    let err = match read {
        Ok(_) => return Basis::GitHub,
        Err(err) => err,
    };
    if err.is_not_found() {
        return Basis::Nothing(format!(
            "GitHub does not show this pull request ({err}): it does not exist, or the token cannot see it"
        ));
    }
    if !err.is_retryable() {
        return Basis::Nothing(format!("GitHub refused to show this pull request ({err})"));
    }
    match applied {
        Some(applied) if delivered_at <= applied => Basis::Nothing(format!(
            "GitHub cannot be asked ({err}), and the payload (updated_at {delivered_at}) is not newer than the state last applied ({applied})"
        )),
        Some(applied) => Basis::Payload(format!(
            "GitHub cannot be asked ({err}); the payload (updated_at {delivered_at}) is newer than the state last applied ({applied})"
        )),
        None => {
            Basis::Payload(format!("GitHub cannot be asked ({err}); no state of this pull request was applied before"))
        }
    }
}

impl PullRequestPreviews {
    pub fn new(
        config: Arc<Config>,
        lifecycle: Lifecycle,
        feedback: Feedback,
        api: GitHubApi,
        memory: Arc<Memory>,
    ) -> Self {
        Self {
            config,
            lifecycle,
            feedback,
            api,
            memory,
            latest: Arc::default(),
            order: Arc::default(),
            queued: Arc::default(),
        }
    }

    /// Remembers a delivered state; false when a newer one was delivered or applied before (this
    /// one is stale and must not be applied).
    pub fn record(&self, key: &PullRequestKey, slug: Slug, desired: Desired, updated_at: &str, source: Source) -> bool {
        if self.memory.applied(key).is_some_and(|applied| applied.as_str() > updated_at) {
            return false;
        }
        let mut latest = self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if latest.get(key).is_some_and(|known| known.updated_at.as_str() > updated_at) {
            return false;
        }
        if latest.len() >= MAX_REMEMBERED {
            latest.retain(|_, known| matches!(known.desired, Desired::Present(_)));
        }
        // A build in flight for an older commit stops now, not when this state's work gets its turn.
        match &desired {
            Desired::Present(target) => self.lifecycle.builds().supersede(&slug, &target.sha),
            Desired::Absent(_) => {
                self.lifecycle.builds().cancel(&slug);
            }
        }
        latest.insert(key.clone(), Latest { updated_at: updated_at.to_owned(), slug, desired, source });
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

    /// Applies the newest state delivered for a pull request, as GitHub confirms it.
    #[tracing::instrument(skip_all, fields(repo = %key.repo, pr = key.number))]
    async fn apply_latest(&self, key: PullRequestKey) {
        let _order = self.order.lock(&key).await;
        // From here on, a newer delivery needs work of its own: this one may have read too early.
        self.queued.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
        let latest = self.latest.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&key).cloned();
        let Some(latest) = latest else { return };
        let current = match latest.source {
            Source::GitHub => Some(latest),
            // Read here, not in the webhook handler: GitHub wants its answer within 10 s, and this
            // read may wait for a slow GitHub; the order lock also keeps reads of one pull
            // request from overtaking each other.
            Source::Delivery => self.confirm(&key, latest).await,
        };
        let Some(Latest { slug, desired, updated_at, .. }) = current else { return };
        self.memory.set_applied(&key, &updated_at);
        match desired {
            Desired::Present(target) => {
                // Its failure is on the pull request already.
                self.make_present(slug, target, key, false).await.ok();
            }
            Desired::Absent(reason) => self.make_absent(slug, reason, key).await,
        }
    }

    /// The state to apply for a delivered one: the pull request as GitHub shows it now, the
    /// payload when GitHub cannot be asked and [`basis`] allows it, or nothing.
    async fn confirm(&self, key: &PullRequestKey, delivered: Latest) -> Option<Latest> {
        let read = self.read_pull(key, &delivered.updated_at).await;
        let applied = self.memory.applied(key);
        let metrics = self.lifecycle.metrics();
        match basis(&read, &delivered.updated_at, applied.as_deref()) {
            Basis::GitHub => {
                metrics.delivery_basis("github");
                let pr = read.ok()?;
                self.state_of(key, &pr)
            }
            Basis::Payload(why) => {
                metrics.delivery_basis("payload");
                tracing::warn!(reason = %why, "acting on the delivery's payload unverified");
                Some(delivered)
            }
            Basis::Nothing(why) => {
                metrics.delivery_basis("nothing");
                tracing::warn!(reason = %why, "acting on nothing for this delivery");
                None
            }
        }
    }

    /// Reads the pull request, again while GitHub shows a state older than the delivered one.
    async fn read_pull(&self, key: &PullRequestKey, delivered_at: &str) -> Result<PullRequest, ApiCallError> {
        for _ in 1..LAG_TRIES {
            match self.read_pull_once(key).await {
                Ok(pr) if pr.updated_at.as_str() < delivered_at => {
                    tracing::debug!(read = %pr.updated_at, delivered = delivered_at, "GitHub shows an older state than the delivery's; reading again");
                    tokio::time::sleep(LAG_DELAY).await;
                }
                other => return other,
            }
        }
        self.read_pull_once(key).await
    }

    pub(super) async fn read_pull_once(&self, key: &PullRequestKey) -> Result<PullRequest, ApiCallError> {
        within(READ_TIMEOUT, self.api.pull(&key.repo, key.number)).await
    }

    /// GitHub's pull request through the same rule as a payload.
    pub(super) fn state_of(&self, key: &PullRequestKey, pr: &PullRequest) -> Option<Latest> {
        let Some(repo) = self.config.github.as_ref().and_then(|github| github.repo(&key.repo)) else {
            tracing::error!("the repository is no longer in config.yml");
            return None;
        };
        match desired(pr, repo, self.memory.approved(key).as_deref()) {
            Ok((slug, desired)) => {
                Some(Latest { updated_at: pr.updated_at.clone(), slug, desired, source: Source::GitHub })
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot use the pull request GitHub shows");
                None
            }
        }
    }

    /// Runs the preview at the target commit; `again`: even when it runs it already (`/preview
    /// redeploy`). Why it does not run it, when the deploy failed.
    pub(super) async fn make_present(
        &self,
        slug: Slug,
        target: Target,
        key: PullRequestKey,
        again: bool,
    ) -> Result<(), String> {
        if !again && self.lifecycle.runs_commit(&slug, &target.sha).await {
            tracing::info!(%slug, sha = %target.sha, "preview already runs the head commit");
            self.follow_keep_awake_label(&slug, &target).await;
            return Ok(());
        }
        if self.lifecycle.stays_removed(&slug, &target.sha) {
            tracing::info!(%slug, sha = %target.sha, "preview was removed by age or /preview destroy at this commit; a push or /preview redeploy brings it back");
            return Ok(());
        }
        let Some(request) = self.launch_request(&slug, &target) else {
            tracing::error!(repo = %target.repo, "the repository is no longer in config.yml");
            return Err("the repository is no longer in previewd's config.yml".to_owned());
        };
        self.feedback.send(key.clone(), slug.clone(), Step::Deploying { sha: target.sha.clone() });
        let build = self.config.github.as_ref().and_then(|github| github.repo(&target.repo)?.build.clone());
        let result = match build {
            Some(build) => self.build_and_launch(request, build, &target).await,
            None => self.lifecycle.launch(request).await,
        };
        let (step, outcome) = match result {
            Ok(info) => {
                self.follow_keep_awake_label(&slug, &target).await;
                (Step::Live { sha: target.sha, url: info.url }, Ok(()))
            }
            Err(LifecycleError::Build(BuildFailure::Superseded | BuildFailure::Removed)) => {
                // The newer commit's work (or the removal) reports on the pull request; this
                // deployment ends with it.
                tracing::info!(%slug, sha = %target.sha, "this build was stopped");
                return Err("the deploy was stopped by a newer commit or a removal".to_owned());
            }
            Err(err) => {
                tracing::error!(%slug, error = %err, "pull request preview failed");
                let log_url = matches!(err, LifecycleError::Build(_))
                    .then(|| {
                        self.config.dashboard_url.as_ref().map(|url| format!("{url}/api/previews/{slug}/build-log"))
                    })
                    .flatten();
                let reason = err.summary();
                (Step::Failed { sha: target.sha, reason: reason.clone(), log_url }, Err(reason))
            }
        };
        self.feedback.send(key, slug, step);
        outcome
    }

    /// Downloads the head commit's source from GitHub, then builds and launches it. A newer push
    /// (see [`Self::record`]) stops it at any point.
    async fn build_and_launch(
        &self,
        request: LaunchRequest,
        build: BuildSpec,
        target: &Target,
    ) -> Result<PreviewInfo, LifecycleError> {
        let builds = self.lifecycle.builds();
        let slug = request.name.clone();
        let claim = builds.claim(&slug, &target.sha);
        let fail = |failure: BuildFailure| {
            builds.finish(&slug, &claim, &format!("failed: {failure}"));
            Err(failure.into())
        };
        let file = match builds.temp_dir().and_then(tempfile::NamedTempFile::new_in) {
            Ok(file) => file.into_temp_path(),
            Err(err) => return fail(BuildFailure::Io(format!("cannot make a file for the source: {err}"))),
        };
        let max = builds.config().max_context;
        let downloaded = tokio::select! {
            downloaded = self.api.download_tarball(&target.repo, &target.sha, &file, max) => downloaded,
            () = claim.cancel.cancelled() => return fail(claim.stopped()),
        };
        match downloaded {
            Ok(_) => {}
            Err(ApiCallError::TooLarge(limit)) => {
                return fail(BuildFailure::Context(ContextError::TooLarge { limit }));
            }
            Err(err) => return fail(BuildFailure::Download(err.to_string())),
        }
        let input = BuildInput {
            source: SourceArchive { file, layout: Layout::GitHubTarball },
            build,
            revision: target.sha.clone(),
            repository: target.repo.clone(),
            repo_file: true,
            claim,
        };
        self.lifecycle.launch_built(request, Some(input), None).await
    }

    /// Pins the preview while its pull request carries `lifecycle.keep_awake_label`.
    async fn follow_keep_awake_label(&self, slug: &Slug, target: &Target) {
        let Some(label) = &self.config.lifecycle.keep_awake_label else { return };
        if let Err(err) = self.lifecycle.follow_label(slug, label, target.has_label(label)).await {
            tracing::warn!(%slug, error = %err, "cannot pin or unpin the preview for its label");
        }
    }

    /// Says on the pull request when its preview is removed by age, and how to bring it back.
    pub async fn announce_removals(
        self,
        mut events: tokio::sync::broadcast::Receiver<LifecycleEvent>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.recv() => event,
            };
            match event {
                Ok(LifecycleEvent::RemovedByAge { slug, origin: Some(origin), after }) => {
                    let reason = removed_by_age(after);
                    self.lifecycle.record_removal(&slug, &origin, &reason);
                    let key = PullRequestKey { repo: origin.repo, number: origin.number };
                    self.feedback.send(key, slug, Step::Removed { reason });
                }
                Ok(LifecycleEvent::RemovedByAge { origin: None, .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "missed removals to announce on pull requests");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn make_absent(&self, slug: Slug, reason: &str, key: PullRequestKey) {
        // A fork's approval was of a commit that no longer runs (closed, or another pushed).
        self.memory.forget_approval(&key);
        if let Err(err) = self.lifecycle.forget_removal(&slug) {
            tracing::warn!(%slug, error = %err, "cannot forget that the preview was removed by age");
        }
        let origin = PullRequestOrigin { repo: key.repo.clone(), number: key.number, sha: String::new() };
        match self.lifecycle.kill_pull_request(&slug, &origin).await {
            Ok(true) => {
                self.lifecycle.record_removal(&slug, &origin, reason);
                self.feedback.send(key, slug, Step::Removed { reason: reason.to_owned() })
            }
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

/// A call to GitHub, or an error when it gives no answer within `limit`.
pub(super) async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, ApiCallError>>,
) -> Result<T, ApiCallError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(ApiCallError::Transport(format!("no answer within {} s", limit.as_secs()))))
}

/// The reason a pull request's comment gives for a removal by age.
pub fn removed_by_age(after: Duration) -> String {
    format!(
        "nobody requested it and nothing was deployed for {}; push a commit or comment `/preview redeploy` to bring it back",
        crate::clock::span(after)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_by_age_says_how_long_and_how_to_bring_the_preview_back() {
        let reason = removed_by_age(Duration::from_secs(7 * 86_400));
        assert!(reason.contains("for 7d") && reason.contains("/preview redeploy"), "{reason}");
    }

    const APPLIED: &str = "2019-05-15T15:21:18Z";

    fn pull() -> PullRequest {
        let path = format!("{}/tests/fixtures/github-webhooks/pull_request.closed.json", env!("CARGO_MANIFEST_DIR"));
        let event: super::super::event::PullRequestEvent =
            serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("fixture parses");
        event.pull_request
    }

    fn status(status: u16, message: &str) -> Result<PullRequest, ApiCallError> {
        Err(ApiCallError::Status { status, message: message.into() })
    }

    #[test]
    fn githubs_answer_wins_over_any_payload() {
        assert_eq!(basis(&Ok(pull()), "2030-01-01T00:00:00Z", Some(APPLIED)), Basis::GitHub);
        assert_eq!(basis(&Ok(pull()), "2000-01-01T00:00:00Z", None), Basis::GitHub);
    }

    #[test]
    fn an_unreachable_github_lets_only_a_strictly_newer_payload_act() {
        let down = Err(ApiCallError::Transport("connection refused".into()));
        assert!(matches!(basis(&down, "2019-05-15T15:21:19Z", Some(APPLIED)), Basis::Payload(_)));
        assert!(matches!(basis(&down, APPLIED, Some(APPLIED)), Basis::Nothing(_)), "a replay of the newest state");
        assert!(matches!(basis(&down, "2019-05-15T15:20:33Z", Some(APPLIED)), Basis::Nothing(_)));
        assert!(matches!(basis(&down, "2019-05-15T15:20:33Z", None), Basis::Payload(_)), "nothing applied yet");
        for failing in [status(502, "Bad Gateway"), status(429, "Too Many"), status(403, "API rate limit exceeded")] {
            assert!(matches!(basis(&failing, "2019-05-15T15:21:19Z", Some(APPLIED)), Basis::Payload(_)));
        }
    }

    #[test]
    fn a_404_or_a_refusal_acts_on_nothing_however_new_the_payload() {
        let Basis::Nothing(why) = basis(&status(404, "Not Found"), "2030-01-01T00:00:00Z", None) else {
            panic!("a 404 acts on nothing")
        };
        assert!(why.contains("does not exist, or the token cannot see it"), "{why}");
        let refused = status(403, "Resource not accessible by integration");
        assert!(matches!(basis(&refused, "2030-01-01T00:00:00Z", None), Basis::Nothing(_)));
    }
}
