//! Runs the `/preview` commands [`command`](super::command) reads from pull-request comments:
//! the commenter's permission is read from GitHub's API, the pull request too (its head commit
//! and preview name, never the payload's), the command is applied through the lifecycle in the
//! pull request's turn (after or before its deliveries' work, never in between), the comment gets
//! a reaction (`+1`, or `confused` with a reply saying why) and the sticky comment says the
//! preview's state.

use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::client::with_retries;
use super::command::{Command, may_command, names_commit};
use super::event::{Desired, from_fork};
use super::feedback::{PullRequestKey, Step};
use super::previews::{PullRequestPreviews, within};
use crate::config::github::ForkPolicy;
use crate::lifecycle::{LifecycleError, PinnedBy, PreviewInfo, SleepReason};
use crate::preview::{PreviewState, Slug};
use crate::request::PullRequestOrigin;

/// A command as a comment gave it.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub key: PullRequestKey,
    pub comment_id: u64,
    pub login: String,
    /// The command, or why the comment names none.
    pub command: Result<Command, String>,
    /// When the comment was written (ISO 8601, from the signed payload).
    pub created_at: String,
    /// The word after the command (`/preview approve <commit>`).
    pub argument: Option<String>,
}

/// Past this, GitHub counts as unreachable for a permission read (the pull request's read has
/// its own, see `previews`).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An approval without a commit binds to the head commit GitHub shows when previewd reads the
/// pull request, so an approving comment older than this (previewd was down, or the delivery is
/// late) is refused: a commit pushed since would be approved unseen.
const APPROVAL_FRESHNESS: Duration = Duration::from_secs(120);
/// A command older than this is refused (previewd was down, or a captured delivery is sent
/// again once its ids were forgotten): it may no longer be what its author wants.
const COMMAND_FRESHNESS: Duration = Duration::from_secs(600);

impl PullRequestPreviews {
    /// Runs a command in the background.
    pub fn schedule_command(&self, request: CommandRequest, tasks: &TaskTracker) {
        let previews = self.clone();
        tasks.spawn(async move { previews.run_command(request).await });
    }

    #[tracing::instrument(skip_all, fields(repo = %request.key.repo, pr = request.key.number, login = %request.login))]
    async fn run_command(&self, request: CommandRequest) {
        let outcome = self.authorized_outcome(&request).await;
        let (content, reply) = match &outcome {
            Ok(()) => ("+1", None),
            Err(why) => ("confused", Some(format!("@{}: {why}", request.login))),
        };
        let name = request.command.map_or("unknown", Command::as_str);
        tracing::info!(command = name, done = outcome.is_ok(), "pull request command");
        self.lifecycle.metrics().pr_command(name, if outcome.is_ok() { "done" } else { "refused" });
        self.answer(&request.key, request.comment_id, content, reply).await;
    }

    /// The command's outcome: done, or why not (for the reply).
    async fn authorized_outcome(&self, request: &CommandRequest) -> Result<(), String> {
        let permission =
            within(READ_TIMEOUT, self.api.permission(&request.key.repo, &request.login)).await.map_err(|err| {
                format!("previewd cannot read your permission on {} from GitHub ({err}); try again", request.key.repo)
            })?;
        if !may_command(&permission) {
            return Err(format!(
                "`/preview` commands need write access to {}; GitHub says you have `{permission}`",
                request.key.repo
            ));
        }
        let command = request.command.clone()?;
        if !fresh(&request.created_at, jiff::Timestamp::now(), COMMAND_FRESHNESS) {
            return Err(format!(
                "your comment is more than {} minutes old, and previewd acts only on recent ones; comment again",
                COMMAND_FRESHNESS.as_secs() / 60
            ));
        }
        let _order = self.order.lock(&request.key).await;
        self.apply_command(request, command).await
    }

    async fn apply_command(&self, request: &CommandRequest, command: Command) -> Result<(), String> {
        let key = &request.key;
        let pr = self
            .read_pull_once(key)
            .await
            .map_err(|err| format!("previewd cannot read this pull request from GitHub ({err}); try again"))?;
        let latest = self.state_of(key, &pr).ok_or("this repository's previews cannot be named; see previewd's log")?;
        let (slug, desired) = (latest.slug, latest.desired);
        let lifecycle = &self.lifecycle;
        let gone = |err: LifecycleError| match err {
            LifecycleError::NotFound(_) => format!(
                "this pull request has no preview running; `/preview redeploy` deploys its head commit{}",
                match &desired {
                    Desired::Absent(reason) => format!(" once it may have one ({reason})"),
                    Desired::Present(_) => String::new(),
                }
            ),
            other => other.summary(),
        };
        match command {
            Command::Redeploy => {
                let Desired::Present(target) = desired.clone() else {
                    return Err(absent_reason(&desired));
                };
                lifecycle.forget_removal(&slug).map_err(|err| err.summary())?;
                self.make_present(slug.clone(), target, key.clone(), true)
                    .await
                    .map_err(|why| format!("the redeploy failed: {why}"))
            }
            Command::Destroy => {
                let sha = match &desired {
                    Desired::Present(target) => target.sha.clone(),
                    Desired::Absent(_) => String::new(),
                };
                let origin = PullRequestOrigin { repo: key.repo.clone(), number: key.number, sha };
                if !lifecycle.kill_pull_request(&slug, &origin).await.map_err(|err| err.summary())? {
                    return Err(gone(LifecycleError::NotFound(slug)));
                }
                if !origin.sha.is_empty() {
                    lifecycle.remember_removal(&slug, &origin).map_err(|err| err.summary())?;
                }
                let reason = format!(
                    "@{} destroyed it with `/preview destroy`; push a commit or comment `/preview redeploy` to bring it back",
                    request.login
                );
                lifecycle.record_removal(&slug, &origin, &reason);
                self.feedback.send(key.clone(), slug, Step::Removed { reason });
                Ok(())
            }
            Command::Wake => {
                lifecycle.wake_now(&slug).await.map_err(gone)?;
                self.report(key, &slug).await
            }
            Command::Sleep => {
                lifecycle.sleep(&slug, SleepReason::Manual).await.map_err(gone)?;
                self.report(key, &slug).await
            }
            Command::Pin => {
                lifecycle.pin(&slug, PinnedBy::Person(format!("github:{}", request.login))).await.map_err(gone)?;
                self.report(key, &slug).await
            }
            Command::Unpin => {
                lifecycle.unpin(&slug).await.map_err(gone)?;
                self.report(key, &slug).await
            }
            Command::Status => self.report(key, &slug).await.map_err(|_| gone(LifecycleError::NotFound(slug.clone()))),
            Command::Approve => self.approve(request, &pr).await,
        }
    }

    /// Approves the head commit of a fork's pull request, then deploys it.
    async fn approve(&self, request: &CommandRequest, pr: &super::event::PullRequest) -> Result<(), String> {
        let key = &request.key;
        let repo = self.config.github.as_ref().and_then(|github| github.repo(&key.repo)).ok_or("not configured")?;
        if repo.allow_forks != ForkPolicy::Approve {
            return Err(format!(
                "`/preview approve` is for pull requests from forks of a repository with `allow_forks: approve`; {} has `allow_forks: {}`",
                key.repo,
                repo.allow_forks == ForkPolicy::Allow
            ));
        }
        if !from_fork(pr, repo) {
            return Err("this pull request is not from a fork: its previews need no approval".to_owned());
        }
        match &request.argument {
            Some(commit) if !names_commit(commit, &pr.head.sha) => {
                return Err(format!(
                    "the head commit is `{}`, not `{commit}`: review it and approve it by name (`/preview approve {}`)",
                    &pr.head.sha[..pr.head.sha.len().min(12)],
                    &pr.head.sha[..pr.head.sha.len().min(12)]
                ));
            }
            Some(_) => {}
            None if !fresh(&request.created_at, jiff::Timestamp::now(), APPROVAL_FRESHNESS) => {
                return Err(format!(
                    "your comment is more than {} s old, and the pull request may have changed since; review its head commit and approve it by name (`/preview approve <commit>`)",
                    APPROVAL_FRESHNESS.as_secs()
                ));
            }
            None => {}
        }
        self.memory.approve(key, &pr.head.sha, &request.login);
        tracing::info!(sha = %pr.head.sha, "fork commit approved");
        let latest = self.state_of(key, pr).ok_or("this repository's previews cannot be named; see previewd's log")?;
        match latest.desired {
            Desired::Present(target) => {
                // An approval is a wish to see this commit, even one removed by age before.
                self.lifecycle.forget_removal(&latest.slug).map_err(|err| err.summary())?;
                self.make_present(latest.slug.clone(), target, key.clone(), false)
                    .await
                    .map_err(|why| format!("the approved commit did not deploy: {why}"))
            }
            absent @ Desired::Absent(_) => Err(absent_reason(&absent)),
        }
    }

    /// Puts the preview's state in the sticky comment.
    async fn report(&self, key: &PullRequestKey, slug: &Slug) -> Result<(), String> {
        let info = self.lifecycle.get(slug).await.map_err(|err| err.summary())?;
        self.feedback.send(key.clone(), slug.clone(), Step::Status { text: describe(&info, crate::clock::unix_now()) });
        Ok(())
    }

    /// The reaction, and the reply when there is one.
    async fn answer(&self, key: &PullRequestKey, comment_id: u64, content: &str, reply: Option<String>) {
        let shutdown = self.feedback.shutdown();
        let (api, repo) = (&self.api, key.repo.as_str());
        if let Err(err) =
            with_retries("react to a comment", shutdown, || api.add_reaction(repo, comment_id, content)).await
        {
            tracing::error!(error = %err, "cannot react to the command's comment");
        }
        if let Some(reply) = reply
            && let Err(err) =
                with_retries("reply to a comment", shutdown, || api.create_comment(repo, key.number, &reply)).await
        {
            tracing::error!(error = %err, "cannot reply to the command's comment");
        }
    }
}

/// Whether a comment written at `created_at` is at most `within` old.
fn fresh(created_at: &str, now: jiff::Timestamp, within: Duration) -> bool {
    let Ok(written) = created_at.parse::<jiff::Timestamp>() else { return false };
    let age = now.duration_since(written);
    age <= jiff::SignedDuration::try_from(within).unwrap_or_default()
}

fn absent_reason(desired: &Desired) -> String {
    match desired {
        Desired::Absent(reason) => format!("this pull request gets no preview: {reason}"),
        Desired::Present(_) => String::new(),
    }
}

/// The sticky comment's line for a preview's state.
pub fn describe(info: &PreviewInfo, now: i64) -> String {
    let commit = info.sha.as_deref().map(|sha| format!(" · commit `{}`", &sha[..sha.len().min(7)])).unwrap_or_default();
    let state = match info.status {
        PreviewState::Running => format!("is live at {}", info.url),
        PreviewState::Asleep => format!("is asleep; a request to {} wakes it", info.url),
        other => format!("is {other} at {}", info.url),
    };
    let keep = match (&info.pinned, info.expires) {
        (Some(by), _) => format!(" · pinned by {by}"),
        (None, Some(at)) => format!(" · removed if unused for {}", crate::clock::age((at - now).max(0))),
        (None, None) => String::new(),
    };
    format!("{state}\n\nstatus: {}{commit}{keep}", info.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_recent_comment_approves() {
        let now: jiff::Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        assert!(fresh("2026-12-06T11:59:00Z", now, APPROVAL_FRESHNESS));
        assert!(!fresh("2026-12-06T11:50:00Z", now, APPROVAL_FRESHNESS), "previewd read it ten minutes late");
        assert!(fresh("2026-12-06T11:50:00Z", now, COMMAND_FRESHNESS));
        assert!(!fresh("", now, COMMAND_FRESHNESS), "no time: not fresh");
        assert!(!fresh("yesterday", now, COMMAND_FRESHNESS));
    }
}
