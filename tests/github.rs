//! Pull-request previews end to end: signed deliveries (the fixtures in `tests/fixtures/` and variants derived
//! from them) into the real daemon, containers on the real Docker engine served through a real
//! nginx, and feedback on a fake GitHub API on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::github::{FakeGitHub, PrEvent, fixture};
use common::github_app::{GitHubApp, HEAD, Load, REPO, SECRET, WAIT};
use common::{PASSWORD, USER};
use serde_json::{Value, json};

fn opened() -> PrEvent {
    PrEvent::new("opened")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_pull_request_gets_a_preview_a_comment_and_a_successful_deployment() {
    let gh = GitHubApp::default().await;
    let (status, body) = gh.send_pr(opened()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["preview"], "hello-world-pr-2");
    assert_eq!(body["desired"], "present");

    let comments = gh.comment_saying(2, "is live at").await;
    assert_eq!(comments.len(), 1, "one sticky comment: {comments:?}");
    let url = format!("http://hello-world-pr-2.preview.localhost:{}", gh.app.nginx_port);
    assert!(comments[0].body.contains(&url), "{}", comments[0].body);
    assert!(comments[0].body.contains("`ec26c3e`"), "{}", comments[0].body);
    assert!(comments[0].body.contains(&format!("<!-- previewd:{}:hello-world-pr-2 -->", gh.app.instance)));

    let (status, page) = gh.app.via_nginx("hello-world-pr-2", "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("Preview: hello-world-pr-2"));
    let (_, env) = gh.app.via_nginx("hello-world-pr-2", "/cgi-bin/env").await.unwrap();
    for line in [
        "PREVIEW_PR_NUMBER=2",
        "PREVIEW_BRANCH=changes",
        &format!("PREVIEW_SHA={HEAD}"),
        &format!("PREVIEW_REPO={REPO}"),
        &format!("PREVIEW_URL={url}"),
        "image_name=demo",
        "container_name=changes",
    ] {
        assert!(env.lines().any(|l| l == line), "{line:?} missing from:\n{env}");
    }

    let deployments = gh.github.deployments(REPO);
    assert_eq!(deployments.len(), 1, "{deployments:?}");
    let deployment = &deployments[0];
    assert_eq!((deployment.sha.as_str(), deployment.environment.as_str()), (HEAD, "hello-world-pr-2"));
    assert!(deployment.transient_environment && !deployment.production_environment);
    assert_eq!(deployment.required_contexts.as_deref(), Some(&[][..]));
    assert_eq!(deployment.auto_merge, Some(false));
    let statuses = gh.github.statuses(REPO, deployment.id);
    assert_eq!(statuses.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(), ["in_progress", "success"]);
    assert_eq!(statuses[1].environment_url.as_deref(), Some(url.as_str()));

    let listed: Value = gh
        .client
        .get(gh.app.url("/api/previews/hello-world-pr-2"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (listed["repo"].as_str(), listed["pr"].as_u64(), listed["sha"].as_str()),
        (Some(REPO), Some(2), Some(HEAD))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_redeploys_the_new_head_without_a_failed_request_and_close_removes_everything() {
    let gh = Arc::new(GitHubApp::default().await);
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    gh.comment_saying(2, "is live at").await;

    let load = Load::start(&gh, "hello-world-pr-2");
    let new_head = "1111111111111111111111111111111111111111";
    let (status, body) = gh.send_pr(PrEvent::new("synchronize").sha(new_head)).await;
    assert_eq!(status, 202, "{body}");
    let comments = gh.comment_saying(2, "Commit `1111111`").await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request may fail while the new head takes over");
    assert!(ok > 10);
    assert_eq!(comments.len(), 1, "the sticky comment is edited, not repeated");
    let (_, env) = gh.app.via_nginx("hello-world-pr-2", "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|l| l == format!("PREVIEW_SHA={new_head}")), "{env}");
    assert_eq!(gh.app.containers().len(), 1);
    let deployments = gh.github.deployments(REPO);
    assert_eq!(deployments.len(), 2, "one deployment per head commit");
    assert_eq!(deployments[1].sha, new_head);
    assert_eq!(gh.statuses(deployments[1].id), ["in_progress", "success"]);
    let superseded = gh.github.wait_for("the old deployment retired", WAIT, |github| {
        let states: Vec<String> = github.statuses(REPO, deployments[0].id).into_iter().map(|s| s.state).collect();
        (states.last().map(String::as_str) == Some("inactive")).then_some(states)
    });
    assert_eq!(superseded.await, ["in_progress", "success", "inactive"]);

    let (status, body) = gh.send_pr(PrEvent::new("closed").sha(new_head).merged(true)).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("absent")), "{body}");
    gh.comment_saying(2, "was removed").await;
    assert!(gh.app.containers().is_empty());
    assert!(!gh.app.vhost_path("hello-world-pr-2").exists());
    let (status, page) = gh.app.via_nginx("hello-world-pr-2", "/").await.unwrap();
    assert_eq!(status, 410, "its URL says it was removed: {page}");
    assert!(
        page.contains("the pull request is closed")
            && page.contains("https://github.com/Codertocat/Hello-World/pull/2"),
        "{page}"
    );
    let last = gh.statuses(deployments[1].id);
    assert_eq!(last.last().map(String::as_str), Some("inactive"), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_signatures_and_malformed_deliveries_do_nothing() {
    let gh = GitHubApp::default().await;
    let body = opened().body();
    let (status, answer) = gh.send_as("pull_request", "d1", &body, None).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("missing X-Hub-Signature-256"));
    let (status, answer) = gh.send_as("pull_request", "d2", &body, Some("not the secret")).await;
    assert_eq!(status, 401);
    assert!(answer["error"].as_str().unwrap().contains("does not match"));

    let signature = common::github::signature(SECRET, &body);
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let response = gh
        .client
        .post(gh.app.url("/webhooks/github"))
        .header("x-github-event", "pull_request")
        .header("x-github-delivery", "d3")
        .header("x-hub-signature-256", signature)
        .header("content-type", "application/json")
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "a body that differs by one byte is refused");

    let (status, answer) = gh.send("pull_request", b"{\"action\": \"opened\"}").await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("pull_request payload is not valid"), "{answer}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gh.app.containers().is_empty());
    let posted: Vec<_> = gh
        .github
        .calls()
        .into_iter()
        .filter(|c| !(c.method == "GET" && c.path.contains("/pulls?state=open")))
        .collect();
    assert!(posted.is_empty(), "nothing but the sync's reading of open pull requests reached GitHub: {posted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_acknowledged_and_ignored_and_a_current_preview_is_left_alone() {
    let gh = GitHubApp::default().await;
    let body = opened().body();
    assert_eq!(gh.send_as("pull_request", "same-id", &body, Some(SECRET)).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    let (status, answer) = gh.send_as("pull_request", "same-id", &body, Some(SECRET)).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("duplicate")), "{answer}");

    // A new delivery for the head commit that already runs changes nothing.
    assert_eq!(gh.send_pr(PrEvent::new("reopened")).await.0, 202);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gh.github.deployments(REPO).len(), 1);
    assert_eq!(gh.app.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_are_refused_unless_allowed_and_drafts_wait_for_review() {
    let repos = format!(
        "    {REPO}:\n      image: demo\n    Codertocat/Open-Source:\n      image: demo\n      allow_forks: true\n      name: \"oss-{{{{ number }}}}\"\n"
    );
    let gh = GitHubApp::start(&repos, "").await;

    let (status, body) = gh.send_pr(opened().fork(true)).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("absent")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("fork"), "{body}");

    let (status, body) = gh.send_pr(opened().repo("Codertocat/Open-Source").fork(true).number(7)).await;
    assert_eq!((status, body["preview"].as_str()), (202, Some("oss-7")), "{body}");
    gh.github
        .wait_for("the fork's preview", WAIT, |github| {
            github.comments("Codertocat/Open-Source", 7).iter().any(|c| c.body.contains("is live at")).then_some(())
        })
        .await;
    assert_eq!(gh.app.via_nginx("oss-7", "/").await.unwrap().0, 200);
    assert!(gh.github.comments(REPO, 2).is_empty(), "nothing is said on the refused fork's PR");

    let (status, body) = gh.send_pr(opened().number(3).draft(true)).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("absent")), "{body}");
    let (status, body) = gh.send_pr(PrEvent::new("ready_for_review").number(3).draft(false)).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("present")), "{body}");
    gh.comment_saying(3, "is live at").await;
    let (status, _) = gh.send_pr(PrEvent::new("converted_to_draft").number(3).draft(true)).await;
    assert_eq!(status, 202);
    gh.comment_saying(3, "was removed").await;
    assert_eq!(gh.app.via_nginx("hello-world-pr-3", "/").await.unwrap().0, 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_label_adds_and_removes_the_preview() {
    let gh = GitHubApp::start(
        &format!("    {REPO}:\n      image: demo\n      label: staging\n      name: \"{{{{ branch }}}}\"\n"),
        "",
    )
    .await;
    let branch = "Feature/Ünïcode & spaces";
    let (status, body) = gh.send_pr(opened().branch(branch)).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("absent")), "no label, no preview: {body}");
    assert_eq!(body["preview"], "feature-unicode-spaces");

    let labeled = PrEvent::new("labeled").branch(branch).labels(&["bug", "staging"]).label_event("staging");
    assert_eq!(gh.send_pr(labeled).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    let (_, env) = gh.app.via_nginx("feature-unicode-spaces", "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|l| l == format!("PREVIEW_BRANCH={branch}")), "the branch is passed as is: {env}");
    assert!(env.lines().any(|l| l == format!("container_name={branch}")), "{env}");

    let unlabeled = PrEvent::new("unlabeled").branch(branch).labels(&["bug"]).label_event("staging");
    assert_eq!(gh.send_pr(unlabeled).await.0, 202);
    gh.comment_saying(2, "was removed").await;
    assert!(gh.app.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_other_events_actions_and_repositories_are_acknowledged_and_ignored() {
    let gh = GitHubApp::default().await;
    let ping = serde_json::to_vec(&fixture("ping")).unwrap();
    assert_eq!(gh.send("ping", &ping).await, (200, json!({"status": "pong"})));
    let push = serde_json::to_vec(&fixture("push")).unwrap();
    let (status, body) = gh.send("push", &push).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ignored")));
    let (status, body) = gh.send_pr(PrEvent::new("assigned")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ignored")), "{body}");
    let (status, body) = gh.send_pr(opened().repo("someone/else")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ignored")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("not in config.yml"));
    assert_eq!(gh.send_as("pull_request", "forged", &opened().body(), Some("wrong")).await.0, 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gh.app.containers().is_empty());
    let metrics = gh.client.get(gh.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "previewd_webhook_deliveries_total{event=\"ping\",outcome=\"pong\"} 1",
        "previewd_webhook_deliveries_total{event=\"push\",outcome=\"ignored\"} 1",
        "previewd_webhook_deliveries_total{event=\"pull_request\",outcome=\"ignored\"} 2",
        "previewd_webhook_deliveries_total{event=\"unverified\",outcome=\"rejected\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_deliveries_for_one_pull_request_queues_one_run() {
    let gh = GitHubApp::default().await;
    let body = opened().body();
    // Each a delivery of its own (GitHub redelivers, or a bot keeps editing the pull request).
    let floods = (0..40).map(|_| gh.send("pull_request", &body));
    let statuses: Vec<u16> =
        futures_util::future::join_all(floods).await.into_iter().map(|(status, _)| status).collect();
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    let runs =
        |metrics: &str| metrics.lines().find_map(|l| l.strip_prefix("previewd_pull_request_runs ")).map(str::to_owned);
    let metrics = gh.client.get(gh.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let queued: u64 = runs(&metrics).expect("the runs gauge").parse().unwrap();
    assert!(queued <= 2, "one run may be running and one waiting, not {queued}");
    gh.comment_saying(2, "is live at").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let metrics = gh.client.get(gh.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if runs(&metrics).as_deref() == Some("0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the runs never finished: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gh.github.deployments(REPO).len(), 1, "one deployment for the one commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_outages_delay_the_feedback_but_never_the_preview() {
    let gh = GitHubApp::default().await;
    gh.github.set_down(true);
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    let deadline = std::time::Instant::now() + WAIT;
    while !matches!(gh.app.via_nginx("hello-world-pr-2", "/").await, Ok((200, _))) {
        assert!(std::time::Instant::now() < deadline, "the preview must come up while GitHub is down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gh.github.comments(REPO, 2).is_empty());
    gh.github.set_down(false);
    gh.github.fail_next(2, 502);
    let comments = gh.comment_saying(2, "is live at").await;
    assert_eq!(comments.len(), 1);
    let deployments = gh.github.deployments(REPO);
    assert_eq!(deployments.len(), 1);
    assert_eq!(gh.statuses(deployments[0].id), ["in_progress", "success"], "order holds through the retries");
    let metrics = gh.client.get(gh.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let failed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("previewd_github_api_calls_total{result=\"failure\"} "))
        .unwrap_or("0");
    assert!(failed.parse::<u64>().unwrap() >= 3, "the outage and the two 502s are counted: {metrics}");
    assert!(metrics.contains("previewd_github_api_calls_total{result=\"success\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_github_delays_the_feedback_but_never_the_preview() {
    let gh = GitHubApp::default().await;
    // Each call takes 2 s: the feedback of one launch is six calls in a row.
    gh.github.set_delay(Duration::from_secs(2));
    let sent = std::time::Instant::now();
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    assert!(sent.elapsed() < Duration::from_secs(1), "the delivery is answered before any GitHub call");
    while !matches!(gh.app.via_nginx("hello-world-pr-2", "/").await, Ok((200, _))) {
        assert!(sent.elapsed() < Duration::from_secs(8), "the preview must not wait for the slow GitHub");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gh.github.deployments(REPO).iter().all(|d| gh.statuses(d.id).len() < 2),
        "the preview is up before its feedback is through"
    );
    let comments = gh.comment_saying(2, "is live at").await;
    assert_eq!(comments.len(), 1);
    let deployments = gh.github.deployments(REPO);
    assert_eq!(deployments.len(), 1);
    assert_eq!(gh.statuses(deployments[0].id), ["in_progress", "success"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_tokens_with_push_access_may_use_the_api_and_stager_hook_credentials_work() {
    let repos = format!(
        "    {REPO}:\n      image: demo\n    Codertocat/Secret:\n      image: demo\n      name: \"secret-{{{{ number }}}}\"\n"
    );
    let gh = GitHubApp::start(&repos, "  api_auth: true\n  webhook_basic_auth: true\n").await;
    gh.github.add_token("alice-token", "alice");
    gh.github.add_token("bob-token", "bob");
    gh.github.set_permission(REPO, "alice", "write");
    gh.github.set_permission(REPO, "bob", "read");
    gh.github.set_permission("Codertocat/Secret", "alice", "none");
    let launch = |token: &str| {
        gh.client
            .post(gh.app.url("/launch"))
            .bearer_auth(token)
            .form(&[("image_name", "demo"), ("container_name", "by-token")])
            .send()
    };
    assert_eq!(launch("alice-token").await.unwrap().status(), 200);
    let refused = launch("bob-token").await.unwrap();
    assert_eq!(refused.status(), 403);
    let message: Value = refused.json().await.unwrap();
    assert!(
        message["error"].as_str().unwrap().contains("bob has no push access to Codertocat/Hello-World"),
        "{message}"
    );
    assert_eq!(launch("no-such-token").await.unwrap().status(), 401);
    // A preview of a repository alice cannot push to stays invisible to her.
    let secret_pr = opened().repo("Codertocat/Secret").number(9).body();
    let (status, _) = gh.send_as("pull_request", "secret-9", &secret_pr, Some(SECRET)).await;
    assert_eq!(status, 401, "webhook_basic_auth wants Basic credentials too");
    let response = gh.send_with_basic_auth("/webhooks/github", "secret-9", &secret_pr).await;
    assert_eq!(response.status(), 202);
    gh.github
        .wait_for("the secret preview", WAIT, |github| {
            github.comments("Codertocat/Secret", 9).iter().any(|c| c.body.contains("is live at")).then_some(())
        })
        .await;
    let listed = gh.get_json_as("alice-token", "/api/previews").await;
    let names: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["by-token"], "{listed}");
    let hidden = gh.client.get(gh.app.url("/api/previews/secret-9")).bearer_auth("alice-token").send().await.unwrap();
    assert_eq!(hidden.status(), 404);
    let all: Value = gh
        .client
        .get(gh.app.url("/api/previews"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2, "Basic users see everything: {all}");
    let killed = gh
        .client
        .post(gh.app.url("/kill"))
        .bearer_auth("bob-token")
        .form(&[("container_name", "by-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(killed.status(), 403);

    // Stager's hook URL carried Basic credentials: with webhook_basic_auth they are required.
    let body = opened().body();
    assert_eq!(gh.send_as("pull_request", "no-basic", &body, Some(SECRET)).await.0, 401);
    let signed = gh.send_with_basic_auth("/event_receiver", "with-basic", &body).await;
    assert_eq!(signed.status(), 202);
    gh.comment_saying(2, "is live at").await;
}

/// Removes a local image tag made by a test.
struct LocalTag(String);

impl Drop for LocalTag {
    fn drop(&mut self) {
        std::process::Command::new("docker").args(["rmi", &self.0]).output().ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_tag_picks_the_pull_requests_image_and_a_failed_launch_is_reported() {
    // What CI would push for PR 41; PR 42 has no image yet.
    let tag = format!("pr-41-{}", common::unique_instance());
    let tagged = LocalTag(format!("previewd-demo:{tag}"));
    let made = std::process::Command::new("docker").args(["tag", common::DEMO_IMAGE, &tagged.0]).output().unwrap();
    assert!(made.status.success(), "{made:?}");
    let suffix = tag.trim_start_matches("pr-41");
    let repos = format!("    {REPO}:\n      image: demo\n      image_tag: \"pr-{{{{ number }}}}{suffix}\"\n");
    let gh = GitHubApp::start(&repos, "").await;

    let started = std::time::Instant::now();
    let (status, _) = gh.send_pr(opened().number(41)).await;
    assert_eq!(status, 202);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the webhook answers without waiting for the launch: {:?}",
        started.elapsed()
    );
    gh.comment_saying(41, "is live at").await;
    let id = gh.app.containers()[0].split(' ').next().unwrap().to_owned();
    let image =
        std::process::Command::new("docker").args(["inspect", "--format", "{{.Config.Image}}", &id]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&image.stdout).trim(), tagged.0);

    assert_eq!(gh.send_pr(opened().number(42)).await.0, 202);
    let comments = gh.comment_saying(42, "failed for commit").await;
    assert!(
        comments[0].body.contains(&format!("previewd-demo:pr-42{suffix}")),
        "the reason names the image: {}",
        comments[0].body
    );
    let deployment = gh.github.deployments(REPO).into_iter().find(|d| d.environment == "hello-world-pr-42").unwrap();
    let statuses = gh.github.statuses(REPO, deployment.id);
    assert_eq!(statuses.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(), ["in_progress", "failure"]);
    let description = statuses[1].description.clone().unwrap_or_default();
    assert!(description.contains("not on this host") && description.chars().count() <= 140, "{description}");
    assert_eq!(gh.app.containers().len(), 1, "the failed launch left nothing behind");
}

fn updated_at(mut event: PrEvent, when: &str) -> PrEvent {
    event.value["pull_request"]["updated_at"] = json!(when);
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delivery_of_an_older_state_is_dropped() {
    let gh = GitHubApp::default().await;
    // GitHub sent "closed" after "synchronize", but "closed" arrives first.
    let closed = updated_at(PrEvent::new("closed"), "2030-01-01T10:00:05Z");
    let (status, body) = gh.send_pr(closed).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("absent")), "{body}");
    let late =
        updated_at(PrEvent::new("synchronize").sha("2222222222222222222222222222222222222222"), "2030-01-01T10:00:01Z");
    let (status, body) = gh.send_pr(late).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("stale")), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gh.app.containers().is_empty(), "the closed pull request keeps no preview");
    assert!(gh.github.deployments(REPO).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_never_takes_or_removes_a_preview_it_does_not_own() {
    let gh = GitHubApp::default().await;
    // The API refuses manual launches of names a PR gets (see below); one launched before the
    // repository was configured can still hold the name.
    let images = previewd::config::Config::from_yaml(&gh.app.options_yaml, gh.app.dir.path()).unwrap().images;
    let fields = vec![("image_name".into(), "demo".into()), ("container_name".into(), "hello-world-pr-2".into())];
    let request = previewd::request::LaunchRequest::parse(fields, &images).unwrap();
    gh.app.lifecycle.as_ref().unwrap().launch(request).await.expect("a manual preview");
    let manual_id = gh.app.containers()[0].split(' ').next().unwrap().to_owned();

    assert_eq!(gh.send_pr(opened()).await.0, 202);
    let comments = gh.comment_saying(2, "failed for commit").await;
    assert!(comments[0].body.contains("is taken by a preview launched through the API"), "{}", comments[0].body);
    assert_eq!(gh.send_pr(PrEvent::new("closed")).await.0, 202);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = gh.app.containers();
    assert!(left.len() == 1 && left[0].starts_with(&manual_id), "the manual preview is untouched: {left:?}");
    assert_eq!(gh.app.via_nginx("hello-world-pr-2", "/").await.unwrap().0, 200);
}

/// A previewd with two repos of one image: mallory may push to the other one only.
async fn two_repos_and_mallory() -> GitHubApp {
    let repos = format!("    {REPO}:\n      image: demo\n    other/web2:\n      image: demo\n");
    let gh = GitHubApp::start(&repos, "  api_auth: true\n").await;
    gh.github.add_token("mallory-token", "mallory");
    gh.github.set_permission("other/web2", "mallory", "write");
    gh.github.set_permission(REPO, "mallory", "read");
    gh
}

impl GitHubApp {
    /// A form POST to the API as a GitHub token user; status and error message.
    async fn post_as(&self, token: &str, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let response = self.client.post(self.app.url(path)).bearer_auth(token).form(fields).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let error =
            serde_json::from_str::<Value>(&text).ok().and_then(|body| body["error"].as_str().map(str::to_owned));
        (status, error.unwrap_or(text))
    }

    async fn get_json_as(&self, token: &str, path: &str) -> Value {
        self.client.get(self.app.url(path)).bearer_auth(token).send().await.unwrap().json().await.unwrap()
    }

    async fn get_as(&self, token: &str, path: &str) -> u16 {
        self.client.get(self.app.url(path)).bearer_auth(token).send().await.unwrap().status().as_u16()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_user_of_another_repository_gets_404_for_a_pull_requests_preview() {
    let gh = two_repos_and_mallory().await;
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    let name = "hello-world-pr-2";
    let (_, missing) = gh.post_as("mallory-token", "/kill", &[("container_name", "hello-world-pr-9")]).await;
    let (status, message) = gh.post_as("mallory-token", "/kill", &[("container_name", name)]).await;
    let missing = missing.replace("hello-world-pr-9", name);
    assert_eq!((status, message.as_str()), (404, missing.as_str()), "as if it did not exist");
    assert_eq!(gh.get_as("mallory-token", &format!("/api/previews/{name}")).await, 404);
    assert_eq!(gh.get_as("mallory-token", &format!("/api/previews/{name}/logs")).await, 404);
    let (status, _) = gh.post_as("mallory-token", "/launch", &[("image_name", "demo"), ("container_name", name)]).await;
    assert_eq!(status, 409, "nor may she replace it");
    assert_eq!(gh.app.via_nginx(name, "/").await.unwrap().0, 200, "the preview is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_user_may_change_the_previews_they_launched_and_no_others() {
    let gh = two_repos_and_mallory().await;
    assert_eq!(gh.app.launch(&[("image_name", "demo"), ("container_name", "ops-box")]).await.status(), 200);
    let (status, _) = gh.post_as("mallory-token", "/kill", &[("container_name", "ops-box")]).await;
    assert_eq!(status, 404, "an operator's preview is not hers");
    let fields = [("image_name", "demo"), ("container_name", "ops-box"), ("GREETING", "pwned")];
    let (status, message) = gh.post_as("mallory-token", "/launch", &fields).await;
    assert_eq!(
        (status, message.as_str()),
        (409, "the name ops-box is taken by a preview you may not change; choose another name")
    );
    assert!(!gh.app.via_nginx("ops-box", "/cgi-bin/env").await.unwrap().1.contains("pwned"));

    let (status, _) =
        gh.post_as("mallory-token", "/launch", &[("image_name", "demo"), ("container_name", "mine")]).await;
    assert_eq!(status, 200);
    let mine = gh.get_json_as("mallory-token", "/api/previews/mine").await;
    assert_eq!(mine["owner"], "github:mallory", "{mine}");
    assert_eq!(gh.post_as("mallory-token", "/kill", &[("container_name", "mine")]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_launch_of_a_name_a_pull_request_will_get_is_refused() {
    let gh = GitHubApp::default().await;
    let (status, message) =
        common::error_of(gh.app.launch(&[("image_name", "demo"), ("container_name", "Hello-World-PR-3")]).await).await;
    assert_eq!(status, 409);
    assert_eq!(
        message,
        format!(
            "the name hello-world-pr-3 is reserved for pull requests of {REPO} (github.repos.{REPO}.name); choose another name"
        )
    );
    assert!(gh.app.containers().is_empty());
    assert_eq!(gh.app.launch(&[("image_name", "demo"), ("container_name", "hello-world-3")]).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repositories_of_the_same_name_get_previews_named_with_their_owner() {
    let repos = format!("    {REPO}:\n      image: demo\n    other/Hello-World:\n      image: demo\n");
    let gh = GitHubApp::start(&repos, "").await;
    assert_eq!(gh.send_pr(opened().repo("other/Hello-World")).await.0, 202);
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    for name in ["other-hello-world-pr-2", "codertocat-hello-world-pr-2"] {
        let deadline = std::time::Instant::now() + WAIT;
        while gh.app.via_nginx(name, "/").await.map(|(status, _)| status).unwrap_or(0) != 200 {
            assert!(std::time::Instant::now() < deadline, "{name} was never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_alike_comment_is_not_taken_over_and_failures_do_not_publish_logs() {
    let repos = format!("    {REPO}:\n      image: crash\n");
    let gh = GitHubApp::start(&repos, "").await;
    gh.github.add_token("mallory-token", "mallory");
    let marker = format!("<!-- previewd:{}:hello-world-pr-2 -->", gh.app.instance);
    let planted = gh
        .client
        .post(format!("{}/repos/{REPO}/issues/2/comments", gh.github.url))
        .bearer_auth("mallory-token")
        .json(&json!({ "body": format!("{marker}\nnot previewd") }))
        .send()
        .await
        .unwrap();
    assert_eq!(planted.status(), 201);

    assert_eq!(gh.send_pr(opened()).await.0, 202);
    let comments = gh.comment_saying(2, "failed for commit").await;
    assert_eq!(comments.len(), 2, "previewd writes its own comment: {comments:?}");
    assert!(comments.iter().any(|c| c.user == "mallory" && c.body.contains("not previewd")), "{comments:?}");
    let ours = comments.iter().find(|c| c.user == "previewd-bot").expect("previewd's comment");
    assert!(ours.body.contains("exit code 3"), "{}", ours.body);
    assert!(!ours.body.contains("config file missing"), "the container's log stays off the PR: {}", ours.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_sync_repairs_missed_deliveries() {
    let github = FakeGitHub::start().await;
    let pr = |number: u64| PrEvent::new("opened").number(number).value["pull_request"].clone();
    // PR 5 was opened while previewd was down: no delivery will ever come for it.
    github.set_open_pulls(REPO, vec![pr(5)]);
    // A repository GitHub answers 404 for comes first: it must not stop the others' sync.
    let repos = format!("    Aaa/No-Access:\n      image: demo\n    {REPO}:\n      image: demo\n");
    let gh = GitHubApp::start_with(github, &repos, "  sync_interval: 1\n").await;
    gh.comment_saying(5, "is live at").await;
    assert_eq!(gh.app.via_nginx("hello-world-pr-5", "/").await.unwrap().0, 200);

    gh.github.set_open_pulls(REPO, vec![pr(5), pr(6)]);
    assert_eq!(gh.send_pr(opened().number(6)).await.0, 202);
    gh.comment_saying(6, "is live at").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gh.app.via_nginx("hello-world-pr-6", "/").await.unwrap().0, 200, "a sync keeps an open PR's preview");
    // PR 6 is closed, and its delivery is lost.
    gh.github.set_open_pulls(REPO, vec![pr(5)]);
    gh.comment_saying(6, "was removed").await;
    assert_eq!(gh.app.via_nginx("hello-world-pr-6", "/").await.unwrap().0, 410);
    assert_eq!(gh.app.via_nginx("hello-world-pr-5", "/").await.unwrap().0, 200, "open pull requests keep theirs");
}

const READ_FROM_GITHUB: &str = "previewd_delivery_bases_total{basis=\"github\"}";
const ACTED_UNVERIFIED: &str = "previewd_delivery_bases_total{basis=\"payload\"}";
const ACTED_ON_NOTHING: &str = "previewd_delivery_bases_total{basis=\"nothing\"}";

/// The `pull_request` object of a `closed` delivery, as GitHub holds it after the close.
fn closed_on_github() -> Value {
    PrEvent::new("closed").value["pull_request"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_opened_delivery_after_the_pull_request_was_closed_launches_nothing() {
    let gh = GitHubApp::default().await;
    let captured = opened().body();
    assert_eq!(gh.send_as("pull_request", "original", &captured, Some(SECRET)).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    // Closed on GitHub, and the `closed` delivery never reached previewd (lost, or held back).
    gh.github.set_pull(REPO, closed_on_github());

    let (status, answer) = gh.replay("a-new-delivery-id", &captured).await;
    assert_eq!(status, 202, "the signature is GitHub's, so the delivery is taken: {answer}");
    gh.wait_for_metric(READ_FROM_GITHUB, 2).await;
    gh.comment_saying(2, "was removed").await;
    assert_eq!(gh.github.pull_reads(REPO, 2), 2, "{}", gh.github.dump_calls());
    assert!(gh.app.containers().is_empty(), "the closed pull request keeps no preview");
    assert_eq!(gh.github.deployments(REPO).len(), 1, "the replay launched nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_delivery_after_a_restart_is_still_stale_or_a_duplicate() {
    let mut gh = GitHubApp::default().await;
    let captured = opened().body();
    assert_eq!(gh.send_as("pull_request", "opened-id", &captured, Some(SECRET)).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    assert_eq!(gh.send_pr(PrEvent::new("closed")).await.0, 202);
    gh.comment_saying(2, "was removed").await;
    gh.app.stop().await;
    let record = gh.app.dir.path().join("state/github-deliveries.json");
    let saved: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(saved["deliveries"].as_array().unwrap().contains(&json!("opened-id")), "{saved}");

    gh.app.boot().await;
    let (status, answer) = gh.replay("opened-id", &captured).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("duplicate")), "{answer}");
    let (status, answer) = gh.replay("a-new-delivery-id", &captured).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("stale")), "older than the close: {answer}");
    assert!(gh.app.containers().is_empty());
    assert_eq!(gh.github.deployments(REPO).len(), 1, "the replays launched nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_github_down_a_delivery_newer_than_the_state_applied_is_acted_on() {
    let gh = GitHubApp::default().await;
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    gh.github.set_down(true);

    let new_head = "3333333333333333333333333333333333333333";
    let push = updated_at(PrEvent::new("synchronize").sha(new_head), "2019-05-15T15:25:00Z");
    assert_eq!(gh.send_pr(push).await.0, 202);
    gh.wait_for_metric(ACTED_UNVERIFIED, 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    let wanted = format!("PREVIEW_SHA={new_head}");
    while !gh.app.via_nginx("hello-world-pr-2", "/cgi-bin/env").await.is_ok_and(|(_, env)| env.contains(&wanted)) {
        assert!(std::time::Instant::now() < deadline, "the new head was never deployed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_github_down_a_delivery_no_newer_than_the_state_applied_is_not_acted_on() {
    let gh = GitHubApp::default().await;
    let captured_open = opened().body();
    let captured_close = PrEvent::new("closed").body();
    assert_eq!(gh.send_as("pull_request", "opened-id", &captured_open, Some(SECRET)).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    assert_eq!(gh.send_as("pull_request", "closed-id", &captured_close, Some(SECRET)).await.0, 202);
    gh.comment_saying(2, "was removed").await;
    gh.github.set_down(true);

    let (status, answer) = gh.replay("replayed-open", &captured_open).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("stale")), "older than the close: {answer}");
    // As old as the state applied: taken, but GitHub cannot confirm it and it is not newer.
    let (status, answer) = gh.replay("replayed-close", &captured_close).await;
    assert_eq!(status, 202, "{answer}");
    gh.wait_for_metric(ACTED_ON_NOTHING, 1).await;
    assert_eq!(gh.metric(ACTED_UNVERIFIED).await, 0);
    assert!(gh.app.containers().is_empty());
    assert_eq!(gh.github.deployments(REPO).len(), 1, "nothing was launched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_for_a_pull_request_github_answers_404_for_launches_nothing() {
    let gh = GitHubApp::default().await;
    // Signed, but of a pull request GitHub does not show (deleted, or the token cannot see it).
    let (status, answer) = gh.replay("unknown-pr", &opened().number(77).body()).await;
    assert_eq!((status, answer["desired"].as_str()), (202, Some("present")), "{answer}");
    gh.wait_for_metric(ACTED_ON_NOTHING, 1).await;
    assert_eq!(gh.github.pull_reads(REPO, 77), 1);
    assert!(gh.app.containers().is_empty());
    assert!(gh.github.deployments(REPO).is_empty() && gh.github.comments(REPO, 77).is_empty());
}

fn user_lookups(gh: &GitHubApp) -> usize {
    gh.github.calls().iter().filter(|call| call.method == "GET" && call.path == "/user").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_from_one_address_are_looked_up_only_until_its_budget_is_spent() {
    let gh = two_repos_and_mallory().await;
    let mut refused = 0;
    let throttled = loop {
        let response = gh.client.get(gh.app.url("/api/previews")).bearer_auth(format!("guess-{refused}")).send().await;
        let response = response.unwrap();
        match response.status().as_u16() {
            401 => refused += 1,
            429 => break response,
            other => panic!("an unknown token got {other}"),
        }
        assert!(refused <= 10, "more than ten unknown tokens were looked up");
    };
    assert_eq!(refused, 10);
    let wait: u64 = throttled.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&wait), "{wait}");
    assert!(throttled.text().await.unwrap().contains("unknown tokens from your address"));
    assert_eq!(user_lookups(&gh), 10, "the refused lookup did not reach GitHub");
    let elsewhere = reqwest::Client::builder().no_proxy().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build();
    let answer = elsewhere.unwrap().get(gh.app.url("/api/previews")).bearer_auth("mallory-token").send().await;
    assert_eq!(answer.unwrap().status(), 200, "another address keeps its budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn githubs_rate_limit_answer_is_passed_on_and_not_remembered_as_a_refusal() {
    let gh = two_repos_and_mallory().await;
    gh.github.rate_limit_user_lookups(1);
    let limited = gh.client.get(gh.app.url("/api/previews")).bearer_auth("mallory-token").send().await.unwrap();
    assert_eq!(limited.status(), 503);
    let wait: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "GitHub's reset time: {wait}");
    assert_eq!(gh.get_as("mallory-token", "/api/previews").await, 200, "the token was asked about again");
    assert_eq!(user_lookups(&gh), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_unused_for_remove_after_is_removed_with_a_comment_and_a_push_brings_it_back() {
    let github = FakeGitHub::start().await;
    github.set_open_pulls(REPO, vec![opened().value["pull_request"].clone()]);
    let repos = format!("    {REPO}:\n      image: demo\n");
    let top = "lifecycle:\n  remove_after: 3\n";
    let gh = GitHubApp::start_configured(github, &repos, "  sync_interval: 1\n", top, "").await;
    gh.comment_saying(2, "is live at").await;

    let comments = gh.comment_saying(2, "nothing was deployed for 3s").await;
    assert!(comments[0].body.contains("/preview redeploy"), "{}", comments[0].body);
    assert!(gh.app.containers().is_empty());
    assert_eq!(gh.metric("previewd_removals_by_age_total").await, 1);
    // Three more syncs see the pull request open at the same commit, and leave it removed.
    gh.wait_for_syncs(3).await;
    assert!(gh.app.containers().is_empty(), "the sync does not bring it back for the same commit");

    let pushed = "2222222222222222222222222222222222222222";
    let synchronize = PrEvent::new("synchronize").sha(pushed);
    gh.github.set_open_pulls(REPO, vec![synchronize.value["pull_request"].clone()]);
    assert_eq!(gh.send_pr(synchronize).await.0, 202);
    gh.comment_saying(2, "Commit `2222222`").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keep_awake_label_pins_a_pull_requests_preview_while_it_is_on() {
    let repos = format!("    {REPO}:\n      image: demo\n");
    let top = "lifecycle:\n  remove_after: 2\n  keep_awake_label: Keep-Awake\n";
    let gh = GitHubApp::start_configured(FakeGitHub::start().await, &repos, "", top, "").await;
    assert_eq!(gh.send_pr(opened().labels(&["keep-awake"])).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    assert_eq!(gh.send_pr(opened().number(3)).await.0, 202);
    gh.comment_saying(3, "is live at").await;

    // PR 3's removal shows the sweeps ran past PR 2's remove_after too.
    gh.comment_saying(3, "nothing was deployed").await;
    let kept: Value = gh.app.get_json("/api/previews/hello-world-pr-2").await;
    assert_eq!(
        (kept["status"].as_str(), kept["pinned"].as_str()),
        (Some("running"), Some("label Keep-Awake")),
        "{kept}"
    );

    let unlabeled = PrEvent::new("unlabeled").labels(&[]).label_event("keep-awake");
    assert_eq!(gh.send_pr(unlabeled).await.0, 202);
    gh.comment_saying(2, "nothing was deployed").await;
}

/// A PR 2 preview running, and a collaborator `alice` with write access.
async fn commanded_app() -> GitHubApp {
    let gh = GitHubApp::default().await;
    gh.github.set_permission(REPO, "alice", "write");
    gh.github.set_permission(REPO, "reader", "read");
    assert_eq!(gh.send_pr(opened()).await.0, 202);
    gh.comment_saying(2, "is live at").await;
    gh
}

async fn preview_of_pr_2(gh: &GitHubApp) -> Value {
    gh.app.get_json("/api/previews/hello-world-pr-2").await
}

/// `alice` comments `/preview <command>`; waits for the reaction, which must be +1.
async fn command(gh: &GitHubApp, command: &str) {
    let (id, status, answer) = gh.comment(2, "alice", &format!("/preview {command}")).await;
    let name = command.split_whitespace().next();
    assert_eq!((status, answer["command"].as_str()), (202, name), "{answer}");
    assert_eq!(gh.reactions_to(id).await, ["+1"], "/preview {command}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_commands_from_a_collaborator_sleep_wake_pin_and_report_the_preview() {
    let gh = commanded_app().await;
    command(&gh, "sleep").await;
    assert_eq!(preview_of_pr_2(&gh).await["status"], "asleep");
    gh.comment_saying(2, "is asleep; a request to").await;
    command(&gh, "wake").await;
    assert_eq!(preview_of_pr_2(&gh).await["status"], "running");
    command(&gh, "pin").await;
    assert_eq!(preview_of_pr_2(&gh).await["pinned"], "github:alice");
    gh.comment_saying(2, "pinned by github:alice").await;
    command(&gh, "unpin").await;
    assert!(preview_of_pr_2(&gh).await.get("pinned").is_none());
    command(&gh, "status").await;
    let comments = gh.comment_saying(2, "status: running").await;
    let sticky: Vec<_> = comments.iter().filter(|c| c.body.contains("previewd:")).collect();
    assert_eq!(sticky.len(), 1, "one sticky comment, edited: {comments:?}");
    assert_eq!(gh.metric("previewd_pr_commands_total{command=\"status\",outcome=\"done\"}").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_destroy_removes_it_until_a_redeploy_and_the_sync_leaves_it_removed() {
    let github = FakeGitHub::start().await;
    github.set_open_pulls(REPO, vec![opened().value["pull_request"].clone()]);
    github.set_pull(REPO, opened().value["pull_request"].clone());
    let gh = GitHubApp::start_with(github, &format!("    {REPO}:\n      image: demo\n"), "  sync_interval: 1\n").await;
    gh.github.set_permission(REPO, "alice", "admin");
    gh.comment_saying(2, "is live at").await;

    command(&gh, "destroy").await;
    gh.comment_saying(2, "@alice destroyed it with `/preview destroy`").await;
    assert!(gh.app.containers().is_empty());
    gh.wait_for_syncs(3).await;
    assert!(gh.app.containers().is_empty(), "the sync does not bring a destroyed preview back");

    command(&gh, "redeploy").await;
    assert_eq!(gh.app.via_nginx("hello-world-pr-2", "/").await.unwrap().0, 200);
    gh.comment_saying(2, "is live at").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_commands_from_a_reader_are_refused_with_a_confused_reaction_and_a_reply() {
    let gh = commanded_app().await;
    let (id, status, _) = gh.comment(2, "reader", "/preview destroy").await;
    assert_eq!(status, 202);
    assert_eq!(gh.reactions_to(id).await, ["confused"]);
    let replies = gh.comment_saying(2, "@reader: `/preview` commands need write access").await;
    assert!(replies.iter().any(|c| c.body.contains("you have `read`")), "{replies:?}");
    assert_eq!(gh.app.get_json("/api/previews/hello-world-pr-2").await["status"], "running", "nothing was done");
    // Checked through the API: a payload claiming the reader is an owner changes nothing.
    let (id, _, _) = gh.comment(2, "stranger", "/preview sleep").await;
    assert_eq!(gh.reactions_to(id).await, ["confused"]);
    assert_eq!(gh.app.get_json("/api/previews/hello-world-pr-2").await["status"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_command_gets_the_list_of_commands_and_a_replayed_comment_is_not_run_twice() {
    let gh = commanded_app().await;
    let (id, _, _) = gh.comment(2, "alice", "/preview deploy").await;
    assert_eq!(gh.reactions_to(id).await, ["confused"]);
    gh.comment_saying(2, "`/preview deploy` is not a command previewd knows; use one of `/preview redeploy`").await;
    let (_, status, answer) = gh.comment(2, "alice", "LGTM").await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("ignored")), "{answer}");

    let (id, _, _) = gh.comment(2, "alice", "/preview sleep").await;
    assert_eq!(gh.reactions_to(id).await, ["+1"]);
    command(&gh, "wake").await;
    // The sleep comment's delivery captured and sent again under a new delivery id.
    let replayed = common::github_app::comment_event(2, id, "alice", "/preview sleep");
    let (status, answer) = gh.send_as("issue_comment", "replayed-delivery", &replayed, Some(SECRET)).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("duplicate")), "{answer}");
    assert_eq!(gh.app.get_json("/api/previews/hello-world-pr-2").await["status"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forks_pull_request_runs_only_the_head_commit_a_maintainer_approved() {
    let gh = GitHubApp::start(&format!("    {REPO}:\n      image: demo\n      allow_forks: approve\n"), "").await;
    gh.github.set_permission(REPO, "alice", "maintain");
    gh.github.set_permission(REPO, "reader", "read");
    let (status, body) = gh.send_pr(opened().fork(true)).await;
    assert_eq!((status, body["desired"].as_str()), (202, Some("absent")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("/preview approve"), "{body}");

    let (id, _, _) = gh.comment(2, "reader", "/preview approve").await;
    assert_eq!(gh.reactions_to(id).await, ["confused"], "a reader cannot approve");
    assert!(gh.app.containers().is_empty());
    let (id, _, _) = gh.late_comment(2, "alice", "/preview approve", Duration::from_secs(300)).await;
    assert_eq!(gh.reactions_to(id).await, ["confused"], "an approval read five minutes late");
    gh.comment_saying(2, "more than 120 s old").await;

    command(&gh, "approve").await;
    gh.comment_saying(2, "is live at").await;
    assert_eq!(gh.app.via_nginx("hello-world-pr-2", "/").await.unwrap().0, 200);

    // A push to the fork is not approved: its preview goes, and the new commit does not run.
    let pushed = "3333333333333333333333333333333333333333";
    assert_eq!(gh.send_pr(PrEvent::new("synchronize").fork(true).sha(pushed)).await.0, 202);
    gh.comment_saying(2, "its head commit runs once a maintainer comments `/preview approve`").await;
    assert!(gh.app.containers().is_empty());
    let (id, _, _) = gh.comment(2, "alice", "/preview approve ec26c3e").await;
    assert_eq!(gh.reactions_to(id).await, ["confused"], "the commit reviewed is no longer the head");
    gh.comment_saying(2, "the head commit is `333333333333`, not `ec26c3e`").await;
    command(&gh, "approve 3333333").await;
    gh.comment_saying(2, "Commit `3333333`").await;
    let (_, env) = gh.app.via_nginx("hello-world-pr-2", "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|l| l == format!("PREVIEW_SHA={pushed}")), "{env}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_pull_request_preview_stays_asleep_across_syncs() {
    let github = FakeGitHub::start().await;
    github.set_open_pulls(REPO, vec![opened().value["pull_request"].clone()]);
    let gh = GitHubApp::start_with(github, &format!("    {REPO}:\n      image: demo\n"), "  sync_interval: 1\n").await;
    gh.comment_saying(2, "is live at").await;
    let slept = gh
        .app
        .client
        .post(gh.app.url("/api/previews/hello-world-pr-2/sleep"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(slept.status(), 200);
    gh.wait_for_syncs(3).await;
    let preview = gh.app.get_json("/api/previews/hello-world-pr-2").await;
    assert_eq!(preview["status"], "asleep", "a sync does not redeploy (wake) a preview at its head commit: {preview}");
    assert_eq!(gh.github.deployments(REPO).len(), 1, "no new deployment");
}
