//! Previews built from the pull request's own source, end to end: the fake GitHub serves commit
//! tarballs (through a redirect to a second host, like codeload), the real Docker engine builds
//! them `FROM` the local demo image, and the result is served through a real nginx. Uploads by
//! hand (`POST /api/builds`) go the same way.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::github::{FakeGitHub, PrEvent};
use common::github_app::{GitHubApp, Load, REPO, WAIT};
use common::{PASSWORD, TestApp, USER};
use serde_json::{Value, json};

const SLUG: &str = "hello-world-pr-2";
/// The app image the builds are for: no `command`, so the Dockerfile's CMD runs.
const WEB_IMAGE: &str = "\n  web:\n    image: previewd-demo:latest\n    port: 3000\n    pull: never\n    memory: 64m\n    health_timeout: 20";

fn sha(n: u8) -> String {
    format!("{n:x}").repeat(40)[..40].to_owned()
}

fn short(sha: &str) -> &str {
    &sha[..7]
}

/// A Dockerfile from the demo image that serves `site/` and runs `steps` first. Each test's
/// instance is in the first step, so no test reuses another's layers.
fn dockerfile(instance: &str, steps: &str) -> String {
    format!(
        "FROM previewd-demo:latest\nRUN echo {instance} > /instance\n{steps}COPY site/ /www/\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"3000\", \"-h\", \"/www\"]\n"
    )
}

/// A pull request's state at a later time than any before (a push).
fn pushed(n: u32, sha: &str) -> PrEvent {
    let mut event = PrEvent::new("synchronize").sha(sha);
    event.value["pull_request"]["updated_at"] = json!(format!("2030-01-01T00:{:02}:{:02}Z", n / 60, n % 60));
    event
}

fn opened(sha: &str) -> PrEvent {
    PrEvent::new("opened").sha(sha)
}

async fn build_app(build_yaml: &str, top: &str) -> GitHubApp {
    let repos = format!("    {REPO}:\n      image: web\n      build:\n        context: .\n{build_yaml}");
    GitHubApp::start_configured(FakeGitHub::start().await, &repos, "", top, WEB_IMAGE).await
}

fn commit(gh: &GitHubApp, sha: &str, files: &[(&str, String)]) {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(path, text)| (*path, text.as_bytes())).collect();
    gh.github.set_commit(REPO, sha, &files);
}

/// A commit of a site saying `text`, built by `steps`.
fn site_commit(gh: &GitHubApp, sha: &str, steps: &str, text: &str) {
    let dockerfile = dockerfile(&gh.app.instance, steps);
    commit(gh, sha, &[("Dockerfile", dockerfile), ("site/index.html", format!("{text}\n"))]);
}

/// Waits until the preview runs `sha`; a failure of that commit fails the test with its build log.
async fn live(gh: &GitHubApp, sha: &str) {
    let (live, failed) = (format!("Commit `{}`", short(sha)), format!("failed for commit `{}`", short(sha)));
    let outcome = gh
        .github
        .wait_for("the commit live or failed", WAIT, |github| {
            let comments = github.comments(REPO, 2);
            comments.iter().find(|c| c.body.contains(&live) || c.body.contains(&failed)).map(|c| c.body.clone())
        })
        .await;
    if outcome.contains(&failed) {
        panic!("{outcome}\nbuild log:\n{}", build_log(gh).await);
    }
}

async fn api_get(gh: &GitHubApp, path: &str) -> reqwest::Response {
    gh.client.get(gh.app.url(path)).basic_auth(USER, Some(PASSWORD)).send().await.unwrap()
}

async fn build_log(gh: &GitHubApp) -> String {
    let response = api_get(gh, &format!("/api/previews/{SLUG}/build-log")).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Seconds the last build took, as its log's last line says.
fn build_seconds(log: &str) -> f64 {
    let line = log.lines().rev().find(|line| line.starts_with("previewd: built")).expect("a finished build");
    line.split(" in ").nth(1).and_then(|rest| rest.trim_end_matches(" s").parse().ok()).expect("a duration")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_pull_request_is_built_from_its_head_commit_and_served() {
    let gh = build_app("", "").await;
    let head = sha(1);
    site_commit(&gh, &head, "", "built from commit one");
    assert_eq!(gh.send_pr(opened(&head)).await.0, 202);
    live(&gh, &head).await;

    let (status, page) = gh.app.via_nginx(SLUG, "/").await.unwrap();
    assert_eq!((status, page.trim()), (200, "built from commit one"));
    let api_call = gh.github.calls().into_iter().find(|call| call.path.contains("/tarball/")).expect("a tarball call");
    assert_eq!(api_call.path, format!("/repos/{REPO}/tarball/{head}"));
    assert!(api_call.authorization.is_some(), "the API gets the token");
    let downloads = gh.github.codeload_calls();
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    assert_eq!(downloads[0].authorization, None, "the redirect's other host never sees the token");
    let tag = format!("previewd-{}/codertocat/hello-world:{}", gh.app.instance, &head[..12]);
    assert_eq!(common::built_images(&gh.app.instance), vec![tag]);
    let log = build_log(&gh).await;
    assert!(log.contains("Step 1/4 : FROM previewd-demo:latest"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_rebuilt_on_cached_layers_and_replaces_the_preview_without_a_failed_request() {
    let gh = Arc::new(build_app("", "").await);
    let slow_step = "RUN sleep 3\n";
    let (first, second) = (sha(1), sha(2));
    site_commit(&gh, &first, slow_step, "version one");
    site_commit(&gh, &second, slow_step, "version two");
    gh.send_pr(opened(&first)).await;
    live(&gh, &first).await;
    let cold = build_seconds(&build_log(&gh).await);

    let load = Load::start(&gh, SLUG);
    gh.send_pr(pushed(1, &second)).await;
    live(&gh, &second).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request fails while the new build takes over");
    assert!(ok > 10);
    assert_eq!(gh.app.via_nginx(SLUG, "/").await.unwrap().1.trim(), "version two");
    let log = build_log(&gh).await;
    assert!(log.contains("Using cache"), "{log}");
    let warm = build_seconds(&log);
    assert!(warm < cold - 2.0, "the rebuild reuses the slow layer: cold {cold} s, warm {warm} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_during_a_build_stops_it_and_only_the_newest_commit_is_deployed() {
    let gh = build_app("", "").await;
    let (old, new) = (sha(1), sha(2));
    let marker = format!("{}-slow", gh.app.instance);
    site_commit(&gh, &old, &format!("RUN echo {marker} && sleep 120\n"), "old commit");
    site_commit(&gh, &new, "", "new commit");
    gh.send_pr(opened(&old)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let builds: Value = api_get(&gh, "/api/builds").await.json().await.unwrap();
        let step = builds[0]["step"].as_str().unwrap_or_default().to_owned();
        if builds[0]["state"] == "building" && step.contains("sleep 120") {
            assert_eq!(builds[0]["revision"], old.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "the old commit's build never reached its slow step: {builds}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    gh.send_pr(pushed(1, &new)).await;
    live(&gh, &new).await;
    assert_eq!(gh.app.via_nginx(SLUG, "/").await.unwrap().1.trim(), "new commit");
    let metrics = api_get(&gh, "/metrics").await.text().await.unwrap();
    assert!(metrics.contains("previewd_builds_total{result=\"superseded\"} 1"), "{metrics}");
    let tag = format!("previewd-{}/codertocat/hello-world:{}", gh.app.instance, &new[..12]);
    assert_eq!(common::built_images(&gh.app.instance), vec![tag], "the stopped build tagged nothing");
    // The stopped build's step container goes too (Docker removes it once the build is cut off).
    let deadline = Instant::now() + WAIT;
    while common::docker_ps("status=running").iter().any(|line| line.contains(&marker))
        || docker_commands().contains(&marker)
    {
        assert!(Instant::now() < deadline, "the stopped build's container still runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_deployment = gh.github.deployments(REPO).into_iter().find(|d| d.sha == old).expect("old deployment");
    let states: Vec<String> = gh.github.statuses(REPO, old_deployment.id).into_iter().map(|s| s.state).collect();
    assert!(!states.contains(&"success".to_owned()), "the old commit was never live: {states:?}");
}

/// The commands of every container on the engine.
fn docker_commands() -> String {
    let output = std::process::Command::new("docker")
        .args(["ps", "-a", "--no-trunc", "--format", "{{.Command}}"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_keeps_the_previous_preview_serving_and_the_status_names_the_step() {
    let gh = build_app("", "dashboard_url: http://previewd.example/\n").await;
    let (good, broken) = (sha(1), sha(2));
    site_commit(&gh, &good, "", "the good commit");
    site_commit(&gh, &broken, "RUN sh -c 'echo $((6 * 7))-secret-output; exit 3'\n", "never served");
    gh.send_pr(opened(&good)).await;
    live(&gh, &good).await;

    gh.send_pr(pushed(1, &broken)).await;
    let comments = gh.comment_saying(2, &format!("failed for commit `{}`", short(&broken))).await;
    let step = "Step 3/5 : RUN sh -c 'echo $((6 * 7))-secret-output; exit 3'";
    assert!(comments[0].body.contains(step), "{}", comments[0].body);
    assert!(!comments[0].body.contains("42-secret-output"), "build output is never posted: {}", comments[0].body);
    let log_url = format!("http://previewd.example/api/previews/{SLUG}/build-log");
    assert!(comments[0].body.contains(&log_url), "{}", comments[0].body);
    let deployment = gh.github.deployments(REPO).into_iter().find(|d| d.sha == broken).expect("a deployment");
    let failure = gh.github.statuses(REPO, deployment.id).pop().expect("a status");
    assert_eq!(failure.state, "failure");
    assert!(failure.description.as_deref().unwrap_or_default().contains("Step 3/5"), "{failure:?}");
    assert_eq!(failure.log_url.as_deref(), Some(log_url.as_str()));
    assert_eq!(gh.app.via_nginx(SLUG, "/").await.unwrap(), (200, "the good commit\n".to_owned()));
    assert!(build_log(&gh).await.contains("42-secret-output"), "the build log keeps the output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repositorys_previewd_yml_changes_the_port_and_is_honoured() {
    let gh = build_app("", "").await;
    let head = sha(1);
    let dockerfile = dockerfile(&gh.app.instance, "").replace("\"3000\"", "\"8000\"");
    commit(
        &gh,
        &head,
        &[
            ("Dockerfile", dockerfile),
            ("site/index.html", "on port 8000\n".into()),
            (".previewd.yml", "port: 8000\nenv: {FROM_REPO: hello}\n".into()),
        ],
    );
    gh.send_pr(opened(&head)).await;
    live(&gh, &head).await;
    assert_eq!(gh.app.via_nginx(SLUG, "/").await.unwrap(), (200, "on port 8000\n".to_owned()));
    let (_, env) = gh.app.via_nginx(SLUG, "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|line| line == "FROM_REPO=hello"), "{env}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previewd_yml_with_a_key_the_repository_may_not_set_fails_naming_it() {
    let gh = build_app("", "").await;
    let head = sha(1);
    let dockerfile = dockerfile(&gh.app.instance, "");
    commit(
        &gh,
        &head,
        &[
            ("Dockerfile", dockerfile),
            ("site/index.html", "x\n".into()),
            (".previewd.yml", "port: 3000\nmemory: 8g\n".into()),
        ],
    );
    gh.send_pr(opened(&head)).await;
    let comments = gh.comment_saying(2, "failed for commit").await;
    assert!(comments[0].body.contains("`memory` may not be set by the repository"), "{}", comments[0].body);
    assert!(common::built_images(&gh.app.instance).is_empty(), "nothing was built");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_changes_none_of_the_paths_reuses_the_last_build() {
    let gh = build_app("        paths: [\"site/**\", Dockerfile]\n", "").await;
    let (first, docs_only) = (sha(1), sha(2));
    let dockerfile = dockerfile(&gh.app.instance, "");
    let site = ("site/index.html", "the site\n".to_owned());
    commit(&gh, &first, &[("Dockerfile", dockerfile.clone()), site.clone(), ("README.md", "one".into())]);
    commit(&gh, &docs_only, &[("Dockerfile", dockerfile), site, ("README.md", "two".into())]);
    gh.send_pr(opened(&first)).await;
    live(&gh, &first).await;
    gh.send_pr(pushed(1, &docs_only)).await;
    live(&gh, &docs_only).await;

    let metrics = api_get(&gh, "/metrics").await.text().await.unwrap();
    assert!(metrics.contains("previewd_builds_total{result=\"success\"} 2"), "{metrics}");
    assert!(build_log(&gh).await.contains("no change in build.paths"), "the second build built nothing");
    assert_eq!(common::built_images(&gh.app.instance).len(), 1, "one image serves both commits");
    let preview: Value = api_get(&gh, &format!("/api/previews/{SLUG}")).await.json().await.unwrap();
    assert_eq!(preview["sha"], docs_only.as_str(), "the preview runs the new head commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_beyond_keep_are_removed_and_a_closed_pull_request_leaves_no_image() {
    let gh = build_app("", "builds:\n  keep: 2\n").await;
    let heads = [sha(1), sha(2), sha(3)];
    for (n, head) in heads.iter().enumerate() {
        site_commit(&gh, head, "", &format!("version {n}"));
    }
    gh.send_pr(opened(&heads[0])).await;
    live(&gh, &heads[0]).await;
    for (n, head) in heads.iter().enumerate().skip(1) {
        gh.send_pr(pushed(n as u32, head)).await;
        live(&gh, head).await;
    }
    let tags = |heads: &[String]| -> Vec<String> {
        heads.iter().map(|h| format!("previewd-{}/codertocat/hello-world:{}", gh.app.instance, &h[..12])).collect()
    };
    let mut images = common::built_images(&gh.app.instance);
    images.sort();
    assert_eq!(images, tags(&heads[1..]), "the running build and the one before it");

    let mut closed = PrEvent::new("closed").sha(&heads[2]);
    closed.value["pull_request"]["updated_at"] = json!("2030-01-02T00:00:00Z");
    gh.send_pr(closed).await;
    gh.comment_saying(2, "was removed").await;
    let deadline = Instant::now() + WAIT;
    while !common::built_images(&gh.app.instance).is_empty() {
        assert!(Instant::now() < deadline, "the closed pull request's images are still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(api_get(&gh, &format!("/api/previews/{SLUG}/build-log")).await.status(), 404);
}

/// The `web` image with a job that passes only in a built image (which has `/instance`).
const WEB_WITH_JOB: &str = "\n  webjob:\n    image: previewd-demo:latest\n    port: 3000\n    pull: never\n    jobs: [{name: check, command: [test, -e, /instance]}]";

/// A test instance for uploads: no GitHub, the `web` and `webjob` images, and `builds` as given.
async fn upload_app(builds: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let instance = common::unique_instance();
    let nginx_port = common::free_port();
    let config = common::config_yaml(&instance, dir.path(), nginx_port, &Default::default());
    let yaml = common::with_images(&config, &format!("{WEB_IMAGE}{WEB_WITH_JOB}"));
    TestApp::start_from(dir, instance, nginx_port, format!("{yaml}{builds}")).await
}

async fn status_and_text(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A tar of the given files.
fn tar_of(files: &[(&str, String)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(text.len() as u64);
        builder.append_data(&mut header, path, text.as_bytes()).unwrap();
    }
    builder.into_inner().unwrap()
}

async fn upload(app: &TestApp, name: &str, body: Vec<u8>, content_type: &str, accept: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/api/builds?image=web&name={name}")))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", content_type)
        .header("accept", accept)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_uploaded_by_hand_is_built_and_launched_with_its_progress() {
    let app = upload_app("").await;
    let context =
        tar_of(&[("Dockerfile", dockerfile(&app.instance, "")), ("site/index.html", "uploaded by hand\n".into())]);
    let response = upload(&app, "feature-x", context, "application/x-tar", "application/x-ndjson").await;
    assert_eq!(response.status(), 200);
    let lines: Vec<Value> =
        response.text().await.unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let steps: Vec<&str> = lines.iter().filter_map(|line| line["step"].as_str()).collect();
    assert!(
        lines
            .iter()
            .any(|line| line["step"] == "build" && line["message"].as_str().unwrap().starts_with("Step 3/4 : COPY")),
        "{lines:?}"
    );
    assert_eq!(steps.last(), Some(&"ready"), "{lines:?}");
    let first_build = steps.iter().position(|s| *s == "build").unwrap();
    let first_route = steps.iter().position(|s| *s == "route" || *s == "health").unwrap();
    assert!(first_build < first_route, "the build comes before the launch: {steps:?}");
    assert_eq!(app.via_nginx("feature-x", "/").await.unwrap(), (200, "uploaded by hand\n".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_refused_with_what_to_fix() {
    let app = upload_app("builds:\n  max_context: 4k\n").await;
    let small = tar_of(&[("site/index.html", "no dockerfile\n".into())]);
    let response = upload(&app, "x", small.clone(), "application/json", "application/json").await;
    let (status, message) = common::error_of(response).await;
    assert_eq!(status, 415, "{message}");
    assert!(message.contains("application/x-tar"), "{message}");

    let big = tar_of(&[("Dockerfile", "FROM x\n".into()), ("blob", "x".repeat(8192))]);
    let (status, message) =
        common::error_of(upload(&app, "x", big, "application/x-tar", "application/json").await).await;
    assert_eq!(status, 413, "{message}");

    let (status, message) =
        common::error_of(upload(&app, "x", small, "application/x-tar", "application/json").await).await;
    assert_eq!(status, 422, "{message}");
    assert!(message.contains("no Dockerfile at Dockerfile"), "{message}");
    let response = app.client.get(app.url("/api/previews/x/build-log")).basic_auth(USER, Some(PASSWORD)).send().await;
    let log = response.unwrap().text().await.unwrap();
    assert!(log.contains("no Dockerfile"), "the failure is in the build log: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_would_leave_docker_less_than_min_free_disk_is_refused() {
    let app = upload_app("builds:\n  min_free_disk: 999999g\n").await;
    let context = tar_of(&[("Dockerfile", dockerfile(&app.instance, "")), ("site/index.html", "x\n".into())]);
    let (status, message) =
        common::error_of(upload(&app, "x", context, "application/x-tar", "application/json").await).await;
    assert_eq!(status, 507, "{message}");
    assert!(message.contains("builds.min_free_disk"), "{message}");
    assert!(common::built_images(&app.instance).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_build_waits_for_its_turn_and_shows_as_queued() {
    let app = Arc::new(upload_app("builds:\n  max_parallel: 1\n").await);
    let slow = tar_of(&[("Dockerfile", dockerfile(&app.instance, "RUN sleep 4\n")), ("site/index.html", "a\n".into())]);
    let quick = tar_of(&[("Dockerfile", dockerfile(&app.instance, "")), ("site/index.html", "b\n".into())]);
    let first = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            status_and_text(upload(&app, "first", slow, "application/x-tar", "application/json").await).await
        })
    };
    let deadline = Instant::now() + WAIT;
    let building = || async {
        let response = app.client.get(app.url("/api/builds")).basic_auth(USER, Some(PASSWORD)).send().await;
        response.unwrap().json::<Value>().await.unwrap()
    };
    while building().await.as_array().is_none_or(|builds| !builds.iter().any(|b| b["state"] == "building")) {
        assert!(Instant::now() < deadline, "the first build never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            status_and_text(upload(&app, "second", quick, "application/x-tar", "application/json").await).await
        })
    };
    loop {
        let builds = building().await;
        let queued = builds.as_array().unwrap().iter().find(|b| b["name"] == "second" && b["state"] == "queued");
        if queued.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the second build never showed as queued: {builds}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dashboard = app.client.get(app.url("/")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    let html = dashboard.text().await.unwrap();
    assert!(html.contains(r#"<tr class="build" data-name="second">"#), "the dashboard shows the queued build");
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((first.0, second.0), (200, 200), "{} / {}", first.1, second.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_being_built_shows_building_and_its_step_at_its_url() {
    let app = Arc::new(upload_app("").await);
    let slow = tar_of(&[("Dockerfile", dockerfile(&app.instance, "RUN sleep 3\n")), ("site/index.html", "a\n".into())]);
    let built = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            status_and_text(upload(&app, "brewing", slow, "application/x-tar", "application/json").await).await
        })
    };
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let (status, page) = app.via_nginx("brewing", "/").await.unwrap();
        if status == 503 && page.contains("RUN sleep 3") {
            break page;
        }
        assert!(Instant::now() < deadline, "the build's step never showed at its URL: {status} {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(page.starts_with("Building brewing…"), "{page}");
    assert_eq!(built.await.unwrap().0, 200);
    assert_eq!(app.via_nginx("brewing", "/").await.unwrap().0, 200, "the app once it runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_builds_a_local_directory_with_its_progress_and_honours_dockerignore() {
    let app = upload_app("").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("site")).unwrap();
    std::fs::create_dir_all(dir.path().join("node_modules")).unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile(&app.instance, "")).unwrap();
    std::fs::write(dir.path().join("site/index.html"), "from my laptop\n").unwrap();
    std::fs::write(dir.path().join("site/secret.env"), "TOKEN=1\n").unwrap();
    std::fs::write(dir.path().join(".dockerignore"), "node_modules\n**/*.env\n").unwrap();
    let home = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let output =
        common::run_client(&app, home.path(), &["launch", "web", "my-work", "--build", path], true, None).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|line| line.contains("build") && line.contains("Step 3/4 : COPY site/ /www/")),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("my-work.preview.localhost"));
    assert_eq!(app.via_nginx("my-work", "/").await.unwrap(), (200, "from my laptop\n".to_owned()));
    assert_eq!(app.via_nginx("my-work", "/secret.env").await.unwrap().0, 404, ".dockerignore kept it out");

    let output = common::run_client(&app, home.path(), &["logs", "my-work", "--build"], true, None).await;
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("Step 1/4 : FROM previewd-demo:latest") && log.contains("previewd: built"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_past_builds_timeout_is_stopped_with_504() {
    let app = upload_app("builds:\n  timeout: 3s\n").await;
    let context =
        tar_of(&[("Dockerfile", dockerfile(&app.instance, "RUN sleep 60\n")), ("site/index.html", "x\n".into())]);
    let started = Instant::now();
    let (status, message) =
        common::error_of(upload(&app, "slow", context, "application/x-tar", "application/json").await).await;
    assert_eq!(status, 504, "{message}");
    assert!(message.contains("builds.timeout"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "stopped at its timeout, not at the step's end");
    let deadline = Instant::now() + WAIT;
    while !common::built_images(&app.instance).is_empty() {
        assert!(Instant::now() < deadline, "the stopped build left {:?}", common::built_images(&app.instance));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builds_run_steps_cannot_reach_services_on_the_host() {
    let app = upload_app("").await;
    let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Write;
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from the host\n");
        }
    });
    // Control: a container on Docker's default bridge reaches the listener at the bridge's gateway.
    let fetch = |address: &str| format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}");
    let control = std::process::Command::new("docker")
        .args(["run", "--rm", "--network", "bridge", "previewd-demo:latest", "sh", "-c", &fetch("172.17.0.1")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&control.stdout).contains("hello from the host"), "control failed: {control:?}");
    let probe = format!(
        "RUN gateway=$(ip route | awk '/default/ {{print $3}}'); for address in 172.17.0.1 $gateway; do if {} | grep -q hello; then echo reached $address; exit 9; fi; done\n",
        fetch("$address")
    );
    let context =
        tar_of(&[("Dockerfile", dockerfile(&app.instance, &probe)), ("site/index.html", "isolated\n".into())]);
    let response = upload(&app, "isolated-build", context, "application/x-tar", "application/json").await;
    let status = response.status();
    let log = app.client.get(app.url("/api/previews/isolated-build/build-log")).basic_auth(USER, Some(PASSWORD));
    let log = log.send().await.unwrap().text().await.unwrap();
    assert_eq!(status, 200, "a RUN step reached the host:\n{log}");
    let network = log
        .lines()
        .find_map(|line| line.strip_prefix("previewd: RUN steps run on the network "))
        .expect("the build ran on a network of its own")
        .to_owned();
    let deadline = Instant::now() + WAIT;
    while common::networks(&app.instance).contains(&network) {
        assert!(Instant::now() < deadline, "the build's network {network} is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_that_sets_previewds_labels_itself_is_refused_and_its_image_removed() {
    let app = upload_app("").await;
    let dockerfile = dockerfile(&app.instance, "LABEL previewd.slug=someone-elses-preview\n");
    let context = tar_of(&[("Dockerfile", dockerfile), ("site/index.html", "x\n".into())]);
    let (status, message) =
        common::error_of(upload(&app, "swallowed", context, "application/x-tar", "application/json").await).await;
    assert_eq!(status, 422, "{message}");
    assert!(message.contains("may not set the previewd.* labels previewd reads"), "{message}");
    assert!(message.contains("it sets previewd.slug"), "{message}");
    assert!(common::built_images(&app.instance).is_empty(), "no labelled image");
    let log = app.client.get(app.url("/api/previews/swallowed/build-log")).basic_auth(USER, Some(PASSWORD));
    let log = log.send().await.unwrap().text().await.unwrap();
    let built = log.lines().find_map(|line| line.strip_prefix("Successfully built ")).expect("the engine built it");
    assert!(!common::image_exists(built), "the refused image {built} is gone:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_image_gets_previewds_labels_without_a_build_step_and_keeps_its_build_as_cache() {
    let app = upload_app("").await;
    let context = tar_of(&[("Dockerfile", dockerfile(&app.instance, "")), ("site/index.html", "x\n".into())]);
    assert_eq!(upload(&app, "labelled", context, "application/x-tar", "application/json").await.status(), 200);
    let log = app.client.get(app.url("/api/previews/labelled/build-log")).basic_auth(USER, Some(PASSWORD));
    let log = log.send().await.unwrap().text().await.unwrap();
    assert!(log.contains("Step 4/4 : CMD"), "the Dockerfile's own 4 steps, none added:\n{log}");
    assert!(!log.contains("LABEL"), "{log}");
    let images = common::built_images(&app.instance);
    assert_eq!(images.len(), 1, "{images:?}");
    let labels: Value = serde_json::from_str(&common::docker_output(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        &images[0],
    ]))
    .unwrap();
    assert_eq!(labels["previewd.built"], "true");
    assert_eq!(labels["previewd.instance"], app.instance.as_str());
    assert_eq!(labels["previewd.slug"], "labelled");
    let built = log.lines().find_map(|line| line.strip_prefix("Successfully built ")).expect("the engine built it");
    let cache = labels["previewd.cache"].as_str().expect("the build's own image is named");
    assert!(cache.trim_start_matches("sha256:").starts_with(built.trim()), "{cache} vs {built}");
    assert!(labels["previewd.added-bytes"].as_str().and_then(|b| b.parse::<u64>().ok()).is_some_and(|b| b > 0));

    assert_eq!(app.kill("labelled").await.status(), 200);
    let deadline = Instant::now() + WAIT;
    while common::image_exists(cache) || !common::built_images(&app.instance).is_empty() {
        assert!(Instant::now() < deadline, "the killed preview's image or its build cache {cache} is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_images_of_a_build_cut_by_a_crash_are_removed_at_the_next_start() {
    let setup = common::BinaryConfig::with_images(WEB_IMAGE);
    let _cleanup = setup.cleanup();
    let client = common::client();
    let log = setup.dir.path().join("previewd.log");
    let mut daemon = common::Daemon::start(&setup.path, &log);
    daemon.wait_until_healthy(&client, &setup.api).await;
    let marker = format!("{}-crashed", setup.instance);
    let slow = tar_of(&[
        ("Dockerfile", dockerfile(&setup.instance, &format!("RUN echo {marker} > /marker\nRUN sleep 120\n"))),
        ("site/index.html", "x\n".into()),
    ]);
    let building = {
        let request = client
            .post(format!("{}/api/builds?image=web&name=crashed", setup.api))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/x-tar")
            .body(slow);
        tokio::spawn(async move { request.send().await })
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let response = client.get(format!("{}/api/builds", setup.api)).basic_auth(USER, Some(PASSWORD));
        let builds: Value = response.send().await.unwrap().json().await.unwrap();
        if builds[0]["step"].as_str().is_some_and(|step| step.contains("sleep 120")) {
            break;
        }
        assert!(Instant::now() < deadline, "the build never reached its slow step: {builds}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    building.await.unwrap().ok();
    // The engine ends the build whose client went away; the step before stays.
    let deadline = Instant::now() + WAIT;
    let step_image = loop {
        if let Some(image) = common::image_of_step(&marker) {
            break image;
        }
        assert!(Instant::now() < deadline, "the marker step's image never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut daemon = common::Daemon::start(&setup.path, &setup.dir.path().join("again.log"));
    daemon.wait_until_healthy(&client, &setup.api).await;
    let deadline = Instant::now() + WAIT;
    while common::image_exists(&step_image) {
        assert!(Instant::now() < deadline, "the crashed build's step image {step_image} is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let temp = std::fs::read_dir(setup.dir.path().join("state/build-tmp")).map_or(0, Iterator::count);
    assert_eq!(temp, 0, "the crashed build's source and context are gone too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_first_build_stops_it_and_leaves_nothing() {
    let app = Arc::new(upload_app("").await);
    let marker = format!("{}-killed", app.instance);
    let slow = tar_of(&[
        ("Dockerfile", dockerfile(&app.instance, &format!("RUN echo {marker} && sleep 120\n"))),
        ("site/index.html", "x\n".into()),
    ]);
    let building = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            common::error_of(upload(&app, "doomed", slow, "application/x-tar", "application/json").await).await
        })
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let response = app.client.get(app.url("/api/builds")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
        let builds: Value = response.json().await.unwrap();
        if builds[0]["step"].as_str().is_some_and(|step| step.contains("sleep 120")) {
            break;
        }
        assert!(Instant::now() < deadline, "the build never reached its slow step: {builds}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.kill("doomed").await.status(), 200, "a kill stops a first build");
    let (status, message) = building.await.unwrap();
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("removed while it was being built"), "{message}");
    let deadline = Instant::now() + WAIT;
    while docker_commands().contains(&marker) {
        assert!(Instant::now() < deadline, "the killed build's step container is still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + WAIT;
    while !common::built_images(&app.instance).is_empty() {
        assert!(Instant::now() < deadline, "the killed build left {:?}", common::built_images(&app.instance));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = app.client.get(app.url("/api/previews/doomed/build-log")).basic_auth(USER, Some(PASSWORD));
    assert_eq!(log.send().await.unwrap().status(), 404, "no log of a removed preview");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commits_dockerignore_keeps_files_out_of_its_build() {
    let gh = build_app("", "").await;
    let head = sha(1);
    let dockerfile = dockerfile(&gh.app.instance, "");
    commit(
        &gh,
        &head,
        &[
            ("Dockerfile", dockerfile),
            (".dockerignore", "site/*.env\n".into()),
            ("site/index.html", "ignored files stay out\n".into()),
            ("site/secret.env", "TOKEN=1\n".into()),
        ],
    );
    gh.send_pr(opened(&head)).await;
    live(&gh, &head).await;
    assert_eq!(gh.app.via_nginx(SLUG, "/").await.unwrap(), (200, "ignored files stay out\n".to_owned()));
    assert_eq!(gh.app.via_nginx(SLUG, "/secret.env").await.unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_a_built_preview_runs_its_jobs_in_the_built_image() {
    let app = upload_app("").await;
    let context = tar_of(&[("Dockerfile", dockerfile(&app.instance, "")), ("site/index.html", "x\n".into())]);
    let response = app
        .client
        .post(app.url("/api/builds?image=webjob&name=resettable"))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", "application/x-tar")
        .header("accept", "application/json")
        .body(context)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let reset = app.client.post(app.url("/api/previews/resettable/reset")).basic_auth(USER, Some(PASSWORD));
    let response = reset.send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_of_a_preview_removed_while_previewd_was_down_go_at_the_next_start() {
    let mut app = upload_app("").await;
    let context = tar_of(&[("Dockerfile", dockerfile(&app.instance, "")), ("site/index.html", "x\n".into())]);
    assert_eq!(upload(&app, "orphan", context, "application/x-tar", "application/json").await.status(), 200);
    assert_eq!(common::built_images(&app.instance).len(), 1);
    app.stop().await;
    for line in app.containers() {
        let id = line.split(' ').next().unwrap_or_default().to_owned();
        std::process::Command::new("docker").args(["rm", "-f", &id]).output().unwrap();
    }
    app.boot().await;
    let deadline = Instant::now() + WAIT;
    while !common::built_images(&app.instance).is_empty() {
        assert!(Instant::now() < deadline, "the orphan's image is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_show_the_disk_previewds_builds_take() {
    let app = upload_app("").await;
    let context = tar_of(&[
        ("Dockerfile", dockerfile(&app.instance, "RUN head -c 1048576 /dev/zero > /weight\n")),
        ("site/index.html", "x\n".into()),
    ]);
    assert_eq!(upload(&app, "weighed", context, "application/x-tar", "application/json").await.status(), 200);
    let health: Value = app.client.get(app.url("/healthz")).send().await.unwrap().json().await.unwrap();
    let images = health["builds"]["images_bytes"].as_u64().expect("images_bytes");
    assert!(images >= 1 << 20, "the built image's own megabyte: {health}");
    assert!(health["builds"]["docker_free_bytes"].as_u64().is_some_and(|free| free > 0), "{health}");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let gauge =
        |name: &str| metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok());
    assert!(gauge("previewd_build_images_bytes").is_some_and(|bytes| bytes >= 1_048_576.0), "{metrics}");
    assert!(gauge("previewd_docker_free_bytes").is_some_and(|bytes| bytes > 0.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_cannot_hand_its_preview_previewds_other_labels() {
    let app = upload_app("").await;
    let dockerfile = dockerfile(&app.instance, "LABEL previewd.owner=user:someone-else previewd.pr=7\n");
    let context = tar_of(&[("Dockerfile", dockerfile), ("site/index.html", "x\n".into())]);
    let (status, message) =
        common::error_of(upload(&app, "impostor", context, "application/x-tar", "application/json").await).await;
    assert_eq!(status, 422, "{message}");
    assert!(common::built_images(&app.instance).is_empty());
}
