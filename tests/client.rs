//! The CLI client (`previewd launch|list|logs|kill|login`), launch progress over NDJSON, the
//! logs endpoint and `/metrics`, against a real daemon on real Docker and nginx.

mod common;

use common::{PASSWORD, TestApp, USER, run_client as previewd};

const BIN: &str = env!("CARGO_BIN_EXE_previewd");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_launches_with_progress_lists_reads_logs_and_kills() {
    let app = TestApp::start().await;
    let home = tempfile::tempdir().unwrap();

    let out = previewd(&app, home.path(), &["launch", "demo", "Client Test", "-e", "FOO=bar"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    let url = format!("http://client-test.preview.localhost:{}", app.nginx_port);
    assert_eq!(text(&out.stdout).trim(), url);
    let progress = text(&out.stderr);
    let steps: Vec<&str> = progress.lines().filter_map(|line| line.split_whitespace().nth(1)).collect();
    assert_eq!(steps, ["image", "create", "start", "health", "route", "ready"], "{progress}");
    assert!(progress.contains("waiting for the app to answer HTTP on port 3000 at /"), "{progress}");

    let (_, env) = app.via_nginx("client-test", "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|l| l == "FOO=bar"), "{env}");

    // A replacement switches the route after the health check, then retires the old container.
    let out = previewd(&app, home.path(), &["launch", "demo", "Client Test", "-e", "FOO=bar"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    let progress = text(&out.stderr);
    let steps: Vec<&str> = progress.lines().filter_map(|line| line.split_whitespace().nth(1)).collect();
    assert_eq!(steps, ["image", "create", "start", "health", "route", "retire", "ready"], "{progress}");

    let out = previewd(&app, home.path(), &["list"], true, None).await;
    let table = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let row = table.lines().find(|l| l.starts_with("client-test")).unwrap_or_else(|| panic!("no row in:\n{table}"));
    for cell in ["demo", "running", &url] {
        assert!(row.contains(cell), "{cell:?} missing from {row:?}");
    }

    assert_eq!(app.launch(&[("image_name", "chatty"), ("container_name", "talk")]).await.status(), 200);
    let out = previewd(&app, home.path(), &["logs", "talk", "--tail", "50"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "hello from the log\n");
    // --follow keeps the stream open: it has printed the line and is still running.
    let mut follow = tokio::process::Command::new(BIN)
        .args(["logs", "talk", "--follow"])
        .env("PREVIEWD_SERVER", format!("http://{}", app.api))
        .env("PREVIEWD_USER", USER)
        .env("PREVIEWD_PASSWORD", PASSWORD)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let mut first = vec![0u8; 19];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut first),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(text(&first), "hello from the log\n");
    assert!(follow.try_wait().unwrap().is_none(), "--follow waits for more");
    follow.kill().await.unwrap();
    assert_eq!(app.kill("talk").await.status(), 200);

    let out = previewd(&app, home.path(), &["launch", "demo", "client-test", "--json"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    let preview: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!((preview["name"].as_str(), preview["status"].as_str()), (Some("client-test"), Some("running")));
    assert!(out.stderr.is_empty(), "--json prints no progress: {}", text(&out.stderr));

    let out = previewd(&app, home.path(), &["kill", "client-test"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "removed client-test");
    assert!(app.containers().is_empty());
    let out = previewd(&app, home.path(), &["kill", "client-test"], true, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no preview named \"client-test\""), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_launch_exits_non_zero_with_the_reason_and_the_containers_last_lines() {
    let app = TestApp::start().await;
    let home = tempfile::tempdir().unwrap();
    let out = previewd(&app, home.path(), &["launch", "crash", "boom"], true, None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("exit code 3") && stderr.contains("config file missing"), "{stderr}");
    assert!(stderr.contains("health"), "the steps reached are shown: {stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_saves_credentials_privately_and_commands_use_them() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::start().await;
    let home = tempfile::tempdir().unwrap();
    let out = previewd(&app, home.path(), &["list"], false, None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("previewd login"), "{out:?}");

    let server = format!("http://{}", app.api);
    let out =
        previewd(&app, home.path(), &["login", "--user", USER, "--server", &server], false, Some("wrong\n")).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("wrong user name or password"), "{out:?}");
    let out = previewd(
        &app,
        home.path(),
        &["login", "--user", USER, "--server", &server],
        false,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let file = home.path().join(".config/previewd/client.yml");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    let out = tokio::process::Command::new(BIN)
        .args(["list"])
        .env("HOME", home.path())
        .env_remove("PREVIEWD_SERVER")
        .env_remove("PREVIEWD_USER")
        .env_remove("PREVIEWD_PASSWORD")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "the saved server and credentials are used: {out:?}");
    assert!(text(&out.stdout).starts_with("NAME"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_launches_steps_kills_and_reloads() {
    let app = TestApp::start().await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "counted")]).await.status(), 200);
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "counted")]).await.status(), 200);
    assert_eq!(app.launch(&[("image_name", "crash"), ("container_name", "broken")]).await.status(), 502);
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200, "no auth, like /healthz");
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    for line in [
        "previewd_previews 1",
        "previewd_launches_total{result=\"success\"} 1",
        "previewd_launches_total{result=\"failure\"} 1",
        "previewd_redeploys_total{result=\"success\"} 1",
        "previewd_launch_seconds_count 2",
        "previewd_launch_step_seconds_count{step=\"health\"} 3",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
    }
    assert!(text.contains("previewd_nginx_reloads_total{result=\"success\"}"), "{text}");
    assert_eq!(app.kill("counted").await.status(), 200);
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l == "previewd_kills_total{result=\"success\"} 1"), "{text}");
    assert!(text.lines().any(|l| l == "previewd_previews 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_progress_arrives_while_the_launch_is_still_running() {
    use futures_util::StreamExt;
    let app = TestApp::start().await;
    // "silent" never answers, so its launch takes its whole 2 s health timeout.
    let response = app
        .client
        .post(app.url("/launch"))
        .basic_auth(USER, Some(PASSWORD))
        .header("accept", "application/x-ndjson")
        .form(&[("image_name", "silent"), ("container_name", "slow")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let started = std::time::Instant::now();
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"step\":\"health\"") {
        let chunk = body.next().await.expect("more lines").unwrap();
        seen.push_str(&text(&chunk));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "the health step is reported as it begins: {:?}",
        started.elapsed()
    );
    while let Some(chunk) = body.next().await {
        seen.push_str(&text(&chunk.unwrap()));
    }
    let last: serde_json::Value = serde_json::from_str(seen.lines().last().unwrap()).unwrap();
    assert_eq!((last["step"].as_str(), last["status"].as_u64()), (Some("failed"), Some(504)), "{seen}");
    assert!(app.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_by_hand_cannot_take_a_pull_requests_preview() {
    let app = TestApp::start().await;
    let origin =
        previewd::request::PullRequestOrigin { repo: "Codertocat/Hello-World".into(), number: 2, sha: "a".repeat(40) };
    let images = previewd::config::Config::from_yaml(&app.options_yaml, app.dir.path()).unwrap().images;
    let fields = vec![
        ("image_name".to_owned(), "demo".to_owned()),
        ("container_name".to_owned(), "hello-world-pr-2".to_owned()),
    ];
    let mut request = previewd::request::LaunchRequest::parse(fields, &images).unwrap();
    request.origin = Some(origin);
    app.lifecycle.as_ref().unwrap().launch(request).await.unwrap();

    let response = app.launch(&[("image_name", "demo"), ("container_name", "hello-world-pr-2")]).await;
    assert_eq!(response.status(), 409);
    let message: serde_json::Value = response.json().await.unwrap();
    assert!(
        message["error"].as_str().unwrap().contains("taken by pull request #2 of Codertocat/Hello-World"),
        "{message}"
    );
    assert_eq!(app.containers().len(), 1);
}
