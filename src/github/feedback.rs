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
    Deploying {
        sha: String,
    },
    Live {
        sha: String,
        url: String,
    },
    /// `log_url`: where the build log of a failed build can be read.
    Failed {
        sha: String,
        reason: String,
        log_url: Option<String>,
    },
    Removed {
        reason: String,
    },
    /// The preview's state as a `/preview` command left it: the comment only.
    Status {
        text: String,
    },
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
    /// previewd's own login, to tell its comment from look-alikes others post.
    login: tokio::sync::OnceCell<String>,
}

/// What has been posted on one pull request.
#[derive(Debug, Clone, Default)]
struct Posted {
    comment: Option<u64>,
    /// Deployments (commit, id) not yet retired: the live one, and any still deploying.
    deployments: Vec<(String, u64)>,
}

impl Posted {
    fn deployment_of(&self, sha: &str) -> Option<u64> {
        self.deployments.iter().find(|(commit, _)| commit == sha).map(|(_, id)| *id)
    }
}

/// Pull requests whose comment and deployment ids are remembered.
const MAX_REMEMBERED: usize = 10_000;

impl Feedback {
    pub fn new(api: GitHubApi, instance: InstanceName, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        let inner = Inner {
            api,
            instance,
            queues: Mutex::default(),
            memory: Mutex::default(),
            tasks,
            shutdown,
            login: Default::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Cancelled when previewd stops: calls to GitHub are not tried again after that.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
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

/// Posts one step: the deployment statuses, then the sticky comment.
async fn post(inner: &Inner, key: &PullRequestKey, slug: Slug, step: Step) {
    let mut posted = inner.memory.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned().unwrap_or_default();
    if let Err(err) = post_statuses(inner, key, &slug, &step, &mut posted).await {
        tracing::error!(repo = %key.repo, pr = key.number, %slug, error = %err, "cannot post the deployment status");
    }
    if let Err(err) = post_comment(inner, key, &slug, &step, &mut posted).await {
        tracing::error!(repo = %key.repo, pr = key.number, %slug, error = %err, "cannot post the pull request comment");
    }
    let mut memory = inner.memory.lock().unwrap_or_else(|p| p.into_inner());
    if matches!(step, Step::Removed { .. }) {
        memory.remove(key);
    } else {
        if memory.len() >= MAX_REMEMBERED {
            memory.clear();
        }
        memory.insert(key.clone(), posted);
    }
}

/// One deployment per head commit: created when it starts deploying, `success` or `failure` when
/// that commit's launch ends, and the others retired (`inactive`) once a commit is live or the
/// preview is removed. GitHub's auto_inactive skips transient deployments, hence by hand.
async fn post_statuses(
    inner: &Inner,
    key: &PullRequestKey,
    slug: &Slug,
    step: &Step,
    posted: &mut Posted,
) -> Result<(), ApiCallError> {
    let (api, repo, shutdown) = (&inner.api, key.repo.as_str(), &inner.shutdown);
    let status_with_log =
        |id: u64, state: &'static str, url: Option<String>, log: Option<String>, description: String| async move {
            with_retries("create a deployment status", shutdown, || {
                api.create_status(repo, id, state, url.as_deref(), log.as_deref(), &description)
            })
            .await
        };
    let status = |id: u64, state: &'static str, url: Option<String>, description: String| {
        status_with_log(id, state, url, None, description)
    };
    match step {
        Step::Deploying { sha } => {
            let description = format!("Preview of pull request #{}", key.number);
            let id = with_retries("create a deployment", shutdown, || {
                api.create_deployment(repo, sha, slug.as_ref(), &description)
            })
            .await?;
            posted.deployments.push((sha.clone(), id));
            status(id, "in_progress", None, "Starting the preview".to_owned()).await
        }
        Step::Live { sha, url } => {
            if let Some(id) = posted.deployment_of(sha) {
                status(id, "success", Some(url.clone()), "The preview is live".to_owned()).await?;
            }
            let superseded: Vec<(String, u64)> =
                posted.deployments.iter().filter(|(commit, _)| commit != sha).cloned().collect();
            for (_, old) in superseded {
                status(old, "inactive", None, format!("Superseded by {}", short(sha))).await?;
                posted.deployments.retain(|(_, id)| *id != old);
            }
            Ok(())
        }
        Step::Failed { sha, reason, log_url } => match posted.deployment_of(sha) {
            Some(id) => {
                // The previous commit, if any, still serves: only this deployment ends.
                posted.deployments.retain(|(_, known)| *known != id);
                status_with_log(id, "failure", None, log_url.clone(), reason.clone()).await
            }
            None => Ok(()),
        },
        Step::Removed { reason } => {
            for (_, id) in std::mem::take(&mut posted.deployments) {
                status(id, "inactive", None, format!("Removed: {reason}")).await?;
            }
            Ok(())
        }
        Step::Status { .. } => Ok(()),
    }
}

async fn post_comment(
    inner: &Inner,
    key: &PullRequestKey,
    slug: &Slug,
    step: &Step,
    posted: &mut Posted,
) -> Result<(), ApiCallError> {
    let (api, repo, shutdown) = (&inner.api, key.repo.as_str(), &inner.shutdown);
    let marker = marker(&inner.instance, slug);
    let body = format!("{marker}\n{}", comment_text(slug, step));
    if let Some(id) = posted.comment {
        return with_retries("edit the preview comment", shutdown, || api.update_comment(repo, id, &body)).await;
    }
    let login =
        inner.login.get_or_try_init(|| with_retries("find previewd's GitHub login", shutdown, || api.user())).await?;
    // Looking again before each try: a create whose answer was lost may have succeeded.
    let id = with_retries("comment on the pull request", shutdown, || async {
        match api.find_comment(repo, key.number, &marker, login).await? {
            Some(id) => api.update_comment(repo, id, &body).await.map(|()| id),
            None => api.create_comment(repo, key.number, &body).await,
        }
    })
    .await?;
    posted.comment = Some(id);
    Ok(())
}

fn short(sha: &str) -> String {
    sha.chars().take(7).collect()
}

/// The hidden marker that identifies previewd's comment for one preview.
pub fn marker(instance: &InstanceName, slug: &Slug) -> String {
    format!("<!-- previewd:{instance}:{slug} -->")
}

fn comment_text(slug: &Slug, step: &Step) -> String {
    match step {
        Step::Deploying { sha } => format!("**Preview `{slug}`**: deploying commit `{}`…", short(sha)),
        Step::Live { sha, url } => {
            format!("**Preview `{slug}`** is live at {url}\n\nCommit `{}` · status: ready", short(sha))
        }
        Step::Failed { sha, reason, log_url } => {
            let log = log_url.as_ref().map(|url| format!("\n\n[Build log]({url})")).unwrap_or_default();
            format!(
                "**Preview `{slug}`** failed for commit `{}`.\n\n```\n{}\n```{log}",
                short(sha),
                reason.replace("```", "'''")
            )
        }
        Step::Removed { reason } => format!("**Preview `{slug}`** was removed: {reason}."),
        Step::Status { text } => format!("**Preview `{slug}`** {text}"),
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
        let failed =
            comment_text(&slug, &Step::Failed { sha: "abc".into(), reason: "boom ``` x".into(), log_url: None });
        assert_eq!(failed.matches("```").count(), 2, "the reason cannot close the code block: {failed}");
        assert!(comment_text(&slug, &Step::Removed { reason: "closed".into() }).contains("removed"));
    }

    #[test]
    fn the_marker_names_instance_and_preview() {
        let marker = marker(&InstanceName::parse("default").unwrap(), &Slug::parse("a").unwrap());
        assert_eq!(marker, "<!-- previewd:default:a -->");
    }
}
