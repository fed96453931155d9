//! `pull_request` events: the few fields previewd reads, and the rule that turns a pull request
//! into a desired state. previewd thinks in desired state, not in actions: every delivery says
//! whether the PR's preview should exist (at its head commit) or not, so a redelivered, reordered
//! or missed event cannot leave a wrong preview for long. The same [`desired`] function serves a
//! periodic sync with GitHub's list of open pull requests.

use serde::Deserialize;

use crate::config::RepoConfig;
use crate::config::github::ForkPolicy;
use crate::config::github::PrContext;
use crate::preview::Slug;

/// The actions whose delivery may change a preview; all others are acknowledged and ignored.
pub const ACTIONS: [&str; 8] =
    ["opened", "reopened", "ready_for_review", "synchronize", "labeled", "unlabeled", "converted_to_draft", "closed"];

#[derive(Debug, Clone, Deserialize)]
pub struct PullRequestEvent {
    pub action: String,
    pub pull_request: PullRequest,
    pub repository: Repository,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PullRequest {
    pub number: u64,
    pub state: String,
    #[serde(default)]
    pub draft: bool,
    pub head: Branch,
    pub base: Branch,
    #[serde(default)]
    pub labels: Vec<Label>,
    /// ISO 8601 in UTC (`2019-05-15T15:20:33Z`), so that it orders as text. GitHub does not
    /// deliver webhooks in order; this tells which delivery describes the newer state.
    #[serde(default)]
    pub updated_at: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Branch {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    /// `null` when the head repository (a fork) was deleted.
    pub repo: Option<Repository>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    pub full_name: String,
    pub name: String,
    pub owner: Owner,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Owner {
    pub login: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Label {
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("pull_request.head.sha {0:?} is not a commit id (40 hex digits)")]
    NotACommit(String),
    #[error("github.repos.{repo}.name gives no usable preview name: {message}")]
    Name { repo: String, message: String },
    #[error("github.repos.{repo}.image_tag gives no usable Docker tag: {message}")]
    ImageTag { repo: String, message: String },
}

/// A pull request's preview as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// Running at this commit.
    Present(Target),
    /// Gone, and why.
    Absent(&'static str),
}

/// What a pull request's preview runs: which commit, and under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `owner/name` as configured.
    pub repo: String,
    pub number: u64,
    pub branch: String,
    pub sha: String,
    /// A Docker tag from `image_tag`, when configured.
    pub image_tag: Option<String>,
    /// The pull request's labels.
    pub labels: Vec<String>,
}

impl Target {
    /// Whether the pull request carries this label (GitHub's label names ignore case).
    pub fn has_label(&self, label: &str) -> bool {
        self.labels.iter().any(|name| name.eq_ignore_ascii_case(label))
    }
}

/// The preview name of a pull request and whether its preview should exist. `approved`: the
/// commit of it a maintainer approved with `/preview approve` (for `allow_forks: approve`).
pub fn desired(pr: &PullRequest, repo: &RepoConfig, approved: Option<&str>) -> Result<(Slug, Desired), EventError> {
    if !is_commit(&pr.head.sha) {
        return Err(EventError::NotACommit(pr.head.sha.clone()));
    }
    let (owner, name) = repo.full_name.split_once('/').unwrap_or((&repo.full_name, ""));
    let context = PrContext { owner, repo: name, number: pr.number, branch: &pr.head.git_ref, sha: &pr.head.sha };
    let slug =
        repo.name.slug(&context).map_err(|message| EventError::Name { repo: repo.full_name.clone(), message })?;
    if let Some(reason) = ineligible(pr, repo, approved) {
        return Ok((slug, Desired::Absent(reason)));
    }
    let image_tag = match &repo.image_tag {
        None => None,
        Some(template) => Some(
            template
                .render(&context)
                .and_then(|tag| docker_tag(&tag))
                .map_err(|message| EventError::ImageTag { repo: repo.full_name.clone(), message })?,
        ),
    };
    let target = Target {
        repo: repo.full_name.clone(),
        number: pr.number,
        branch: pr.head.git_ref.clone(),
        sha: pr.head.sha.clone(),
        image_tag,
        labels: pr.labels.iter().map(|label| label.name.clone()).collect(),
    };
    Ok((slug, Desired::Present(target)))
}

/// Why a fork's pull request waits (`allow_forks: approve`).
pub const AWAITS_APPROVAL: &str =
    "the pull request comes from a fork: its head commit runs once a maintainer comments `/preview approve`";

/// Whether a pull request comes from a fork (or from a deleted repository).
pub fn from_fork(pr: &PullRequest, repo: &RepoConfig) -> bool {
    pr.head.repo.as_ref().is_none_or(|head| !head.full_name.eq_ignore_ascii_case(&repo.full_name))
}

/// Why a pull request gets no preview, if it gets none. `approved`: the commit a maintainer
/// approved, for a fork's.
fn ineligible(pr: &PullRequest, repo: &RepoConfig, approved: Option<&str>) -> Option<&'static str> {
    let from_fork = from_fork(pr, repo);
    if pr.state != "open" {
        Some("the pull request is closed")
    } else if from_fork && repo.allow_forks == ForkPolicy::Refuse {
        Some("the pull request comes from a fork, and allow_forks is off")
    } else if from_fork && repo.allow_forks == ForkPolicy::Approve && approved != Some(pr.head.sha.as_str()) {
        Some(AWAITS_APPROVAL)
    } else if pr.draft && repo.skip_drafts {
        Some("the pull request is a draft")
    } else if repo.label.as_ref().is_some_and(|gate| !pr.labels.iter().any(|l| l.name.eq_ignore_ascii_case(gate))) {
        Some("the pull request lacks the preview label")
    } else {
        None
    }
}

fn is_commit(sha: &str) -> bool {
    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Docker's tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn docker_tag(tag: &str) -> Result<String, String> {
    let mut bytes = tag.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if first_ok && tag.len() <= 128 && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        Ok(tag.to_owned())
    } else {
        Err(format!("{tag:?} is not a Docker tag (letters, digits, '_', '.', '-'; at most 128)"))
    }
}

/// `image` with its tag replaced: `registry:5000/app:latest` + `pr-2` → `registry:5000/app:pr-2`.
pub fn with_tag(image: &str, tag: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let name_start = without_digest.rfind('/').map_or(0, |slash| slash + 1);
    let repository = match without_digest[name_start..].rfind(':') {
        Some(colon) => &without_digest[..name_start + colon],
        None => without_digest,
    };
    format!("{repository}:{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn fixture(name: &str) -> PullRequestEvent {
        let path = format!("{}/tests/fixtures/github-webhooks/{name}.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("fixture parses")
    }

    fn repo(extra: &str) -> RepoConfig {
        let hash = crate::auth::hash_password("x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        let yaml = format!(
            "base_domain: p.localhost\nimages:\n  demo: {{image: d, port: 3000}}\nusers: [{{name: u, password_hash: \"{hash}\"}}]\n\
             github:\n  webhook_secret_file: secret\n  token_file: secret\n  repos:\n    Codertocat/Hello-World:\n      image: demo\n{extra}"
        );
        let config = Config::from_yaml(&yaml, dir.path()).unwrap();
        config.github.unwrap().repo("codertocat/hello-world").unwrap().clone()
    }

    #[test]
    fn the_opened_fixture_wants_a_preview_at_its_head_commit() {
        let event = fixture("pull_request.opened");
        let (slug, desired) = desired(&event.pull_request, &repo(""), None).unwrap();
        assert_eq!(slug.as_ref(), "hello-world-pr-2");
        let Desired::Present(target) = desired else { panic!("{desired:?}") };
        assert_eq!(target.sha, "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
        assert_eq!(target.branch, "changes");
        assert_eq!(target.number, 2);
    }

    #[test]
    fn the_closed_fixture_wants_none() {
        let event = fixture("pull_request.closed");
        assert_eq!(
            desired(&event.pull_request, &repo(""), None).unwrap().1,
            Desired::Absent("the pull request is closed")
        );
    }

    #[test]
    fn forks_drafts_and_the_gate_label_decide_eligibility() {
        let base = fixture("pull_request.opened").pull_request;
        let mut fork = base.clone();
        fork.head.repo.as_mut().unwrap().full_name = "forker/Hello-World".into();
        assert!(
            matches!(desired(&fork, &repo(""), None).unwrap().1, Desired::Absent(reason) if reason.contains("fork"))
        );
        assert!(matches!(desired(&fork, &repo("      allow_forks: true\n"), None).unwrap().1, Desired::Present(_)));
        let approving = repo("      allow_forks: approve\n");
        assert_eq!(desired(&fork, &approving, None).unwrap().1, Desired::Absent(AWAITS_APPROVAL));
        let older = "0000000000000000000000000000000000000000";
        assert_eq!(desired(&fork, &approving, Some(older)).unwrap().1, Desired::Absent(AWAITS_APPROVAL), "a new push");
        let head = fork.head.sha.clone();
        assert!(matches!(desired(&fork, &approving, Some(&head)).unwrap().1, Desired::Present(_)));
        assert!(matches!(desired(&base, &approving, None).unwrap().1, Desired::Present(_)), "not a fork");

        let mut draft = base.clone();
        draft.draft = true;
        assert!(
            matches!(desired(&draft, &repo(""), None).unwrap().1, Desired::Absent(reason) if reason.contains("draft"))
        );
        assert!(matches!(desired(&draft, &repo("      skip_drafts: false\n"), None).unwrap().1, Desired::Present(_)));

        let gated = repo("      label: Staging\n");
        assert!(matches!(desired(&base, &gated, None).unwrap().1, Desired::Absent(reason) if reason.contains("label")));
        let mut labelled = base.clone();
        labelled.labels.push(Label { name: "staging".into() });
        assert!(matches!(desired(&labelled, &gated, None).unwrap().1, Desired::Present(_)));
    }

    #[test]
    fn image_tag_templates_become_docker_tags() {
        let event = fixture("pull_request.opened");
        let (_, desired) =
            desired(&event.pull_request, &repo("      image_tag: \"pr-{{ number }}-{{ sha }}\"\n"), None).unwrap();
        let Desired::Present(target) = desired else { panic!() };
        assert_eq!(target.image_tag.as_deref(), Some("pr-2-ec26c3e57ca3a959ca5aad62de7213c562f8c821"));
        let bad = desired_error("      image_tag: \"{{ branch }}/x\"\n");
        assert!(matches!(bad, EventError::ImageTag { .. }), "{bad:?}");
    }

    fn desired_error(extra: &str) -> EventError {
        desired(&fixture("pull_request.opened").pull_request, &repo(extra), None).unwrap_err()
    }

    #[test]
    fn a_head_sha_that_is_no_commit_is_refused() {
        let mut pr = fixture("pull_request.opened").pull_request;
        pr.head.sha = "not-a-sha".into();
        assert!(matches!(desired(&pr, &repo(""), None), Err(EventError::NotACommit(_))));
    }

    #[test]
    fn with_tag_replaces_only_the_tag() {
        assert_eq!(with_tag("app", "pr-1"), "app:pr-1");
        assert_eq!(with_tag("app:latest", "pr-1"), "app:pr-1");
        assert_eq!(with_tag("registry:5000/team/app:latest", "pr-1"), "registry:5000/team/app:pr-1");
        assert_eq!(with_tag("registry:5000/team/app", "pr-1"), "registry:5000/team/app:pr-1");
        assert_eq!(with_tag("app@sha256:abc", "pr-1"), "app:pr-1");
    }
}
