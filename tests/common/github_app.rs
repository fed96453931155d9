//! A previewd with a `github` section pointing at a fake GitHub, and the deliveries tests send
//! it, shared by the pull-request tests (`tests/github.rs`) and the build tests
//! (`tests/builds.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::github::{FakeGitHub, PrEvent, deliver};
use super::{Options, PASSWORD, TestApp, USER};

pub const SECRET: &str = "webhook secret for tests";
pub const SERVICE_TOKEN: &str = "ghs_previewd_service_token";
pub const REPO: &str = "Codertocat/Hello-World";
pub const HEAD: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
pub const WAIT: Duration = Duration::from_secs(60);

/// A previewd with a `github` section pointing at a fake GitHub.
pub struct GitHubApp {
    pub app: TestApp,
    pub github: FakeGitHub,
    pub client: reqwest::Client,
    deliveries: AtomicUsize,
}

impl GitHubApp {
    pub async fn start(repos: &str, extra: &str) -> Self {
        Self::start_with(FakeGitHub::start().await, repos, extra).await
    }

    pub async fn start_with(github: FakeGitHub, repos: &str, extra: &str) -> Self {
        Self::start_configured(github, repos, extra, "", "").await
    }

    /// `extra` goes into the `github` section, `top` at the top level of config.yml, `images`
    /// under `images` (see `with_images`).
    pub async fn start_configured(github: FakeGitHub, repos: &str, extra: &str, top: &str, images: &str) -> Self {
        github.add_token(SERVICE_TOKEN, "previewd-bot");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("webhook.secret"), format!("{SECRET}\n")).unwrap();
        std::fs::write(dir.path().join("github.token"), SERVICE_TOKEN).unwrap();
        let instance = super::unique_instance();
        let nginx_port = super::free_port();
        let yaml = format!(
            "{}{top}github:\n  api_url: {}\n  webhook_secret_file: webhook.secret\n  token_file: github.token\n{extra}  repos:\n{repos}",
            super::with_images(&super::config_yaml(&instance, dir.path(), nginx_port, &Options::default()), images),
            github.url,
        );
        let app = TestApp::start_from(dir, instance, nginx_port, yaml).await;
        Self { app, github, client: super::client(), deliveries: AtomicUsize::new(0) }
    }

    pub async fn default() -> Self {
        Self::start(&format!("    {REPO}:\n      image: demo\n"), "").await
    }

    pub fn next_delivery(&self) -> String {
        format!("delivery-{}", self.deliveries.fetch_add(1, Ordering::Relaxed))
    }

    /// A signed delivery; returns status and JSON body.
    pub async fn send(&self, event: &str, body: &[u8]) -> (u16, Value) {
        self.send_as(event, &self.next_delivery(), body, Some(SECRET)).await
    }

    /// A delivery as GitHub sends it: when it is GitHub's (signed with the secret), GitHub holds
    /// the pull request it describes from then on.
    pub async fn send_as(&self, event: &str, delivery: &str, body: &[u8], secret: Option<&str>) -> (u16, Value) {
        if secret == Some(SECRET) {
            self.hold_on_github(event, body);
        }
        self.post_delivery(event, delivery, body, secret).await
    }

    /// A captured delivery sent again by someone else: GitHub's state does not change.
    pub async fn replay(&self, delivery: &str, body: &[u8]) -> (u16, Value) {
        self.post_delivery("pull_request", delivery, body, Some(SECRET)).await
    }

    pub async fn post_delivery(&self, event: &str, delivery: &str, body: &[u8], secret: Option<&str>) -> (u16, Value) {
        let response = deliver(&self.client, &self.app.url("/webhooks/github"), event, delivery, body, secret).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Records a `pull_request` delivery's pull request as its current state on the fake GitHub,
    /// unless the fake holds a newer one (the delivery is a late one of an older state).
    pub fn hold_on_github(&self, event: &str, body: &[u8]) {
        let Ok(payload) = serde_json::from_slice::<Value>(body) else { return };
        let (Some(repo), pull) = (payload["repository"]["full_name"].as_str(), &payload["pull_request"]) else {
            return;
        };
        let Some(number) = pull["number"].as_u64().filter(|_| event == "pull_request") else { return };
        let held = self.github.pull(repo, number);
        if held.is_none_or(|held| held["updated_at"].as_str() <= pull["updated_at"].as_str()) {
            self.github.set_pull(repo, pull.clone());
        }
    }

    /// The value of one metric line, e.g. `previewd_delivery_bases_total{basis="github"}`.
    pub async fn metric(&self, name: &str) -> u64 {
        let metrics = self.client.get(self.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let value = metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned));
        value.map_or(0, |value| value.parse().unwrap())
    }

    pub async fn wait_for_metric(&self, name: &str, at_least: u64) {
        let deadline = std::time::Instant::now() + WAIT;
        while self.metric(name).await < at_least {
            assert!(std::time::Instant::now() < deadline, "{name} never reached {at_least}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A signed delivery that also carries Basic credentials (Stager's hook URL), to `path`.
    pub async fn send_with_basic_auth(&self, path: &str, delivery: &str, body: &[u8]) -> reqwest::Response {
        self.hold_on_github("pull_request", body);
        self.client
            .post(self.app.url(path))
            .basic_auth(USER, Some(PASSWORD))
            .header("x-github-event", "pull_request")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", super::github::signature(SECRET, body))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    pub async fn send_pr(&self, event: PrEvent) -> (u16, Value) {
        self.send("pull_request", &event.body()).await
    }

    /// Waits until the sticky comment of a PR contains `needle`; returns the comments.
    pub async fn comment_saying(&self, number: u64, needle: &str) -> Vec<super::github::Comment> {
        let needle = needle.to_owned();
        self.github
            .wait_for(&format!("a comment saying {needle:?}"), WAIT, |github| {
                let comments = github.comments(REPO, number);
                comments.iter().any(|c| c.body.contains(&needle)).then_some(comments)
            })
            .await
    }

    /// `login` comments `body` on pull request `number` (GitHub holds the comment), and GitHub
    /// delivers it as an `issue_comment` event; the comment's id and the delivery's answer.
    pub async fn comment(&self, number: u64, login: &str, body: &str) -> (u64, u16, Value) {
        let id = self.github.add_comment(REPO, number, login, body);
        let (status, answer) = self.send("issue_comment", &comment_event(number, id, login, body)).await;
        (id, status, answer)
    }

    /// `comment`, delivered `late` after it was written.
    pub async fn late_comment(&self, number: u64, login: &str, body: &str, late: Duration) -> (u64, u16, Value) {
        let id = self.github.add_comment(REPO, number, login, body);
        let mut event: Value = serde_json::from_slice(&comment_event(number, id, login, body)).unwrap();
        let written = jiff::Timestamp::now() - jiff::SignedDuration::try_from(late).unwrap();
        event["comment"]["created_at"] = Value::String(iso8601(written));
        let (status, answer) = self.send("issue_comment", &serde_json::to_vec(&event).unwrap()).await;
        (id, status, answer)
    }

    /// Waits until previewd has read the open pull requests `count` more times (periodic syncs).
    pub async fn wait_for_syncs(&self, count: usize) {
        let lists = |github: &FakeGitHub| github.calls().iter().filter(|c| c.path.contains("/pulls?")).count();
        let seen = lists(&self.github);
        let what = format!("{count} more syncs");
        self.github.wait_for(&what, WAIT, |github| (lists(github) >= seen + count).then_some(())).await;
    }

    /// Waits until the comment has a reaction; its reactions.
    pub async fn reactions_to(&self, comment_id: u64) -> Vec<String> {
        self.github
            .wait_for("a reaction", WAIT, |github| {
                let reactions = github.reactions(REPO, comment_id);
                (!reactions.is_empty()).then_some(reactions)
            })
            .await
    }

    pub fn statuses(&self, deployment: u64) -> Vec<String> {
        self.github.statuses(REPO, deployment).into_iter().map(|s| s.state).collect()
    }
}

/// An `issue_comment` `created` delivery for a comment on pull request `number`, shaped on
/// GitHub's webhook documentation; repository and sender come from the `pull_request` fixture.
pub fn comment_event(number: u64, comment_id: u64, login: &str, body: &str) -> Vec<u8> {
    let pr = super::github::fixture("pull_request.opened");
    let repo = pr["repository"]["full_name"].as_str().unwrap_or(REPO).to_owned();
    let event = serde_json::json!({
        "action": "created",
        "issue": {
            "number": number,
            "title": pr["pull_request"]["title"],
            "state": "open",
            "user": pr["pull_request"]["user"],
            "pull_request": {
                "url": format!("https://api.github.com/repos/{repo}/pulls/{number}"),
                "html_url": format!("https://github.com/{repo}/pull/{number}"),
            },
        },
        "comment": {
            "id": comment_id,
            "body": body,
            "user": { "login": login, "type": "User" },
            "created_at": iso8601(jiff::Timestamp::now()),
            "updated_at": iso8601(jiff::Timestamp::now()),
            "author_association": "COLLABORATOR",
        },
        "repository": pr["repository"],
        "sender": { "login": login, "type": "User" },
    });
    serde_json::to_vec(&event).expect("a JSON value serialises")
}

/// As GitHub writes times: `2026-12-06T10:50:00Z`.
fn iso8601(at: jiff::Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// GETs of a preview through nginx, one after another, until stopped: what a redeploy must
/// serve without a failed request.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    pub fn start(gh: &Arc<GitHubApp>, name: &str) -> Self {
        let (stop, ok, failed) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let task = {
            let (gh, name) = (Arc::clone(gh), name.to_owned());
            let (stop, ok, failed): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
                (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match gh.app.via_nginx(&name, "/").await {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("failed request during the redeploy: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        Self { stop, ok, failed, task }
    }

    /// Stops the requests; how many were answered 200, and how many were not.
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task");
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}
