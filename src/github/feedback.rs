//! Feedback on the pull request: one sticky comment (found again by a hidden marker) and a
//! GitHub Deployment per head commit with its statuses (`in_progress` → `success` with the URL,
//! `failure` with the reason, `inactive` once removed).
//!
//! Steps of one pull request are posted in order by a worker of its own; different pull requests
//! do not wait for each other. Every call is retried with backoff, and nothing here blocks or
//! undoes a preview: a GitHub outage only delays what the PR shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{ApiCallError, GitHubApi, with_retries};
use crate::preview::{InstanceName, Slug};

/// A worker with nothing to post for this long retires; the next step starts a new one.
const IDLE: Duration = Duration::from_secs(60);

/// What happened to a pull request's preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Deploying { sha: String },
    Live { sha: String, url: String },
    Failed { sha: String, reason: String },
    Removed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PullRequestKey {
    /// `owner/name`.
    pub repo: String,
    pub number: u64,
}

#[derive(Clone)]
pub struct Feedback {
    inner: Arc<Inner>,
}

struct Inner {
    api: GitHubApi,
    instance: InstanceName,
    queues: Mutex<HashMap<PullRequestKey, mpsc::UnboundedSender<(Slug, Step)>>>,
    /// What the workers learnt (comment and deployment ids), kept when a worker retires.
    memory: Mutex<HashMap<PullRequestKey, Posted>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// What has been posted on one pull request.
#[derive(Debug, Clone, Default)]
struct Posted {
    comment: Option<u64>,
    deployment: Option<u64>,
    /// The previous head's deployment, still serving until the new head is live.
    superseded: Option<u64>,
}

impl Feedback {
    pub fn new(api: GitHubApi, instance: InstanceName, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        let inner = Inner { api, instance, queues: Mutex::default(), memory: Mutex::default(), tasks, shutdown };
        Self { inner: Arc::new(inner) }
    }

    /// Queues a step; steps of one pull request are posted in the order they were sent.
    pub fn send(&self, key: PullRequestKey, slug: Slug, step: Step) {
        let mut queues = self.inner.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let item = match queues.get(&key) {
            Some(queue) => match queue.send((slug, step)) {
                Ok(()) => return,
                Err(mpsc::error::SendError(item)) => item,
            },
            None => (slug, step),
        };
        let (queue, steps) = mpsc::unbounded_channel();
        queue.send(item).ok();
        queues.insert(key.clone(), queue);
        self.inner.tasks.spawn(worker(Arc::clone(&self.inner), key, steps));
    }
}

enum Next {
    Step(Option<(Slug, Step)>),
    /// Nothing came for a while, or previewd is stopping: post what is queued, then retire.
    Idle,
}

async fn worker(inner: Arc<Inner>, key: PullRequestKey, mut steps: mpsc::UnboundedReceiver<(Slug, Step)>) {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE, steps.recv()) => next.map_or(Next::Idle, Next::Step),
            () = inner.shutdown.cancelled() => Next::Idle,
        };
        let (slug, step) = match next {
            Next::Step(Some(item)) => item,
            Next::Step(None) => return,
            Next::Idle => {
                // Senders take the same lock, so nothing can slip in between this check and the removal.
                let mut queues = inner.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match steps.try_recv() {
                    Ok(item) => item,
                    Err(_) => {
                        queues.remove(&key);
                        return;
                    }
                }
            }
        };
        post(&inner, &key, slug, step).await;
    }
}

/// Posts one step: the deployment status, then the sticky comment.
async fn post(inner: &Inner, key: &PullRequestKey, slug: Slug, step: Step) {
    let mut posted = inner.memory.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned().unwrap_or_default();
    if let Err(err) = post_status(inner, key, &slug, &step, &mut posted).await {
        tracing::error!(repo = %key.repo, pr = key.number, %slug, error = %err, "cannot post the deployment status");
    }
    if let Err(err) = post_comment(inner, key, &slug, &step, &mut posted).await {
        tracing::error!(repo = %key.repo, pr = key.number, %slug, error = %err, "cannot post the pull request comment");
    }
    inner.memory.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), posted);
}

async fn post_status(inner: &Inner, key: &PullRequestKey, slug: &Slug, step: &Step, posted: &mut Posted) -> Result<(), ApiCallError> {
    let (api, repo, shutdown) = (&inner.api, key.repo.as_str(), &inner.shutdown);
    if let Step::Deploying { sha } = step {
        let description = format!("Preview of pull request #{}", key.number);
        let id = with_retries("create a deployment", shutdown, || api.create_deployment(repo, sha, slug.as_ref(), &description)).await?;
        posted.superseded = posted.deployment.replace(id).or(posted.superseded);
    }
    let Some(deployment) = posted.deployment else {
        return Ok(());
    };
    let (state, url, description) = match step {
        Step::Deploying { .. } => ("in_progress", None, "Starting the preview".to_owned()),
        Step::Live { url, .. } => ("success", Some(url.as_str()), "The preview is live".to_owned()),
        Step::Failed { reason, .. } => ("failure", None, reason.clone()),
        Step::Removed { reason } => ("inactive", None, format!("Removed: {reason}")),
    };
    with_retries("create a deployment status", shutdown, || api.create_status(repo, deployment, state, url, &description)).await?;
    // GitHub's auto_inactive skips transient deployments, so the superseded one is retired here,
    // once the new head is live (after a failed redeploy the old preview still serves).
    if let (Step::Live { sha, .. }, Some(old)) = (step, posted.superseded) {
        let description = format!("Superseded by {}", sha.chars().take(7).collect::<String>());
        with_retries("retire the previous deployment", shutdown, || api.create_status(repo, old, "inactive", None, &description)).await?;
        posted.superseded = None;
    }
    Ok(())
}

async fn post_comment(inner: &Inner, key: &PullRequestKey, slug: &Slug, step: &Step, posted: &mut Posted) -> Result<(), ApiCallError> {
    let (api, repo, shutdown) = (&inner.api, key.repo.as_str(), &inner.shutdown);
    let marker = marker(&inner.instance, slug);
    let body = format!("{marker}\n{}", comment_text(slug, step));
    if posted.comment.is_none() {
        posted.comment = with_retries("find the preview comment", shutdown, || api.find_comment(repo, key.number, &marker)).await?;
    }
    match posted.comment {
        Some(id) => with_retries("edit the preview comment", shutdown, || api.update_comment(repo, id, &body)).await,
        None => {
            let id = with_retries("comment on the pull request", shutdown, || api.create_comment(repo, key.number, &body)).await?;
            posted.comment = Some(id);
            Ok(())
        }
    }
}

/// The hidden marker that identifies previewd's comment for one preview.
pub fn marker(instance: &InstanceName, slug: &Slug) -> String {
    format!("<!-- previewd:{instance}:{slug} -->")
}

fn comment_text(slug: &Slug, step: &Step) -> String {
    let short = |sha: &str| sha.chars().take(7).collect::<String>();
    match step {
        Step::Deploying { sha } => format!("**Preview `{slug}`**: deploying commit `{}`…", short(sha)),
        Step::Live { sha, url } => format!("**Preview `{slug}`** is live at {url}\n\nCommit `{}` · status: ready", short(sha)),
        Step::Failed { sha, reason } => {
            format!("**Preview `{slug}`** failed for commit `{}`.\n\n```\n{}\n```", short(sha), reason.replace("```", "'''"))
        }
        Step::Removed { reason } => format!("**Preview `{slug}`** was removed: {reason}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_comment_says_url_commit_and_status() {
        let slug = Slug::parse("hello-world-pr-2").unwrap();
        let live = comment_text(&slug, &Step::Live { sha: "ec26c3e57ca3a959".into(), url: "http://x".into() });
        assert!(live.contains("http://x") && live.contains("`ec26c3e`") && live.contains("ready"), "{live}");
        let failed = comment_text(&slug, &Step::Failed { sha: "abc".into(), reason: "boom ``` x".into() });
        assert_eq!(failed.matches("```").count(), 2, "the reason cannot close the code block: {failed}");
        assert!(comment_text(&slug, &Step::Removed { reason: "closed".into() }).contains("removed"));
    }

    #[test]
    fn the_marker_names_instance_and_preview() {
        let marker = marker(&InstanceName::parse("default").unwrap(), &Slug::parse("a").unwrap());
        assert_eq!(marker, "<!-- previewd:default:a -->");
    }
}
