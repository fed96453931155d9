//! `limits`: how many previews may exist in all and per user, how many start at once, and how
//! many followed log streams a caller and the host may hold, against real Docker and nginx.

mod common;

use std::time::{Duration, Instant};

use common::{PASSWORD, TestApp, USER, error_of, free_port, unique_instance};
use futures_util::StreamExt;

const IMAGES: &str = r#"images:
  slowstart:
    image: previewd-demo:latest
    port: 3000
    command: [/bin/busybox, sh, -c, "sleep 1; exec /bin/busybox httpd -f -p 3000 -h /www"]
    pull: never
"#;

/// A second user with the test user's password.
const OTHER: &str = "other";

async fn app_with(limits: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (unique_instance(), free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &common::Options::default());
    let hash = yaml.split("password_hash: ").nth(1).and_then(|rest| rest.lines().next()).unwrap().to_owned();
    let yaml = yaml.replacen("images:\n", IMAGES, 1)
        + &format!("  - name: {OTHER}\n    password_hash: {hash}\nlimits:\n{limits}");
    TestApp::start_from(dir, instance, nginx_port, yaml).await
}

async fn launch_as(app: &TestApp, user: &str, name: &str) -> reqwest::Response {
    app.client
        .post(app.url("/launch"))
        .basic_auth(user, Some(PASSWORD))
        .form(&[("image_name", "demo"), ("container_name", name)])
        .send()
        .await
        .unwrap()
}

async fn follow_logs(app: &TestApp, user: &str, name: &str) -> reqwest::Response {
    app.client
        .get(app.url(&format!("/api/previews/{name}/logs?follow=true&tail=1")))
        .basic_auth(user, Some(PASSWORD))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_new_preview_beyond_max_previews_is_refused_with_429_naming_the_limit() {
    let app = app_with("  max_previews: 2\n").await;
    for name in ["first", "second"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    let (status, error) = error_of(app.launch(&[("image_name", "demo"), ("container_name", "third")]).await).await;
    assert_eq!(status, 429, "{error}");
    assert!(error.contains("limits.max_previews (2)"), "{error}");
    assert!(!app.containers().iter().any(|line| line.contains(".third.")), "nothing was created for it");
    let replace = app.launch(&[("image_name", "demo"), ("container_name", "first")]).await;
    assert_eq!(replace.status(), 200, "replacing a preview that exists is no new preview");
}

#[tokio::test]
async fn a_user_at_max_previews_per_user_is_refused_while_another_user_may_still_launch() {
    let app = app_with("  max_previews_per_user: 1\n").await;
    assert_eq!(launch_as(&app, USER, "mine").await.status(), 200);
    let (status, error) = error_of(launch_as(&app, USER, "mine-too").await).await;
    assert_eq!(status, 429, "{error}");
    assert!(error.contains("limits.max_previews_per_user (1)") && error.contains(USER), "{error}");
    assert_eq!(launch_as(&app, OTHER, "theirs").await.status(), 200);
}

/// The NDJSON lines of a streamed launch, each with when the test read it.
async fn stream_launch(app: &TestApp, name: &str) -> Vec<(Instant, serde_json::Value)> {
    let response = app
        .client
        .post(app.url("/launch"))
        .basic_auth(USER, Some(PASSWORD))
        .header("accept", "application/x-ndjson")
        .form(&[("image_name", "slowstart"), ("container_name", name)])
        .send()
        .await
        .unwrap();
    let mut lines = Vec::new();
    let mut buffer = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        buffer.extend_from_slice(&chunk.unwrap());
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            lines.push((Instant::now(), serde_json::from_slice(&line).unwrap()));
        }
    }
    lines
}

fn when(lines: &[(Instant, serde_json::Value)], step: &str) -> Option<Instant> {
    lines.iter().find(|(_, line)| line["step"] == step).map(|(at, _)| *at)
}

#[tokio::test]
async fn beyond_parallel_launches_a_launch_waits_its_turn_and_says_so() {
    let app = app_with("  parallel_launches: 1\n").await;
    let (first, second) = tokio::join!(stream_launch(&app, "one"), stream_launch(&app, "two"));
    for lines in [&first, &second] {
        assert_eq!(lines.last().unwrap().1["step"], "ready", "{lines:?}");
    }
    let (waited, went) = if when(&first, "queue").is_some() { (&first, &second) } else { (&second, &first) };
    let queue = waited.iter().find(|(_, line)| line["step"] == "queue").expect("one launch waited").1.clone();
    assert!(queue["message"].as_str().unwrap().contains("limits.parallel_launches"), "{queue}");
    assert!(when(went, "queue").is_none(), "only one launch waited");
    // `route` is the other launch's last step; its turn is given back after it.
    let other_routing = when(went, "route").unwrap();
    assert!(when(waited, "create").unwrap() >= other_routing, "the waiting launch created nothing meanwhile");
}

/// An app with these limits and a preview named `watched` to follow.
async fn watched_app(limits: &str) -> TestApp {
    let app = app_with(limits).await;
    assert_eq!(launch_as(&app, USER, "watched").await.status(), 200);
    app
}

#[tokio::test]
async fn a_caller_may_follow_only_its_share_of_logs_and_a_closed_stream_frees_its_place() {
    let app = watched_app("  log_streams_per_user: 2\n").await;
    let first = follow_logs(&app, USER, "watched").await;
    let second = follow_logs(&app, USER, "watched").await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let (status, error) = error_of(follow_logs(&app, USER, "watched").await).await;
    assert_eq!(status, 429, "{error}");
    assert!(error.contains("limits.log_streams_per_user"), "{error}");
    let unfollowed =
        app.client.get(app.url("/api/previews/watched/logs")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(unfollowed.status(), 200, "reading without follow is not limited");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = follow_logs(&app, USER, "watched").await;
        if again.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the closed stream's place was not given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_host_wide_log_stream_limit_counts_every_caller() {
    let app = watched_app("  log_streams: 2\n").await;
    let _mine = follow_logs(&app, USER, "watched").await;
    let _theirs = follow_logs(&app, OTHER, "watched").await;
    let (status, error) = error_of(follow_logs(&app, OTHER, "watched").await).await;
    assert_eq!(status, 429, "{error}");
    assert!(error.contains("limits.log_streams)"), "{error}");
}

#[tokio::test]
async fn a_followed_log_ends_after_log_stream_seconds() {
    let app = watched_app("  log_stream_seconds: 2\n").await;
    let started = Instant::now();
    let response = follow_logs(&app, USER, "watched").await;
    assert_eq!(response.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(20), response.bytes()).await;
    assert!(ended.expect("the stream ended by itself").is_ok());
    assert!(started.elapsed() >= Duration::from_secs(2), "it ended after its time, not before");
}
