//! The daemon against the real Docker engine and a real (managed) nginx on loopback.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::system_nginx::SystemNginx;
use common::{Options, PASSWORD, Template, TestApp, USER, error_of};
use serde_json::json;

/// Form fields of a request.
type Form<'a> = &'a [(&'a str, &'a str)];

fn docker_inspect(id: &str, format: &str) -> String {
    let output = std::process::Command::new("docker").args(["inspect", "--format", format, id]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Many fresh connections at once, right after a change: every one must see the new config.
async fn all_fresh_connections_see(app: &TestApp, name: &str, needle: &str, connections: usize) {
    let requests = (0..connections).map(|_| app.via_nginx(name, "/"));
    for result in futures_util::future::join_all(requests).await {
        let (status, body) = result.expect("nginx answers");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(needle), "expected {needle:?} in {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_serves_the_preview_with_its_env_then_relaunch_and_kill_leave_nothing() {
    let app = TestApp::start().await;

    // Stager's exact form fields, plus fields that become environment variables.
    let response = app
        .launch(&[("image_name", "demo"), ("container_name", "Test"), ("FOO", "bar baz"), ("OVERRIDE_ME", "request")])
        .await;
    assert_eq!(response.status(), 200);
    let expected_url = format!("http://test.preview.localhost:{}\n", app.nginx_port);
    assert_eq!(response.text().await.unwrap(), expected_url);

    all_fresh_connections_see(&app, "test", "Preview: test", 20).await;
    let (status, env) = app.via_nginx("test", "/cgi-bin/env").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "FOO=bar baz",
        "GREETING=hello",
        "OVERRIDE_ME=request",
        "image_name=demo",
        "container_name=Test",
        "PREVIEW_NAME=test",
        &format!("PREVIEW_URL=http://test.preview.localhost:{}", app.nginx_port),
    ] {
        assert!(env.lines().any(|l| l == line), "{line:?} missing from:\n{env}");
    }

    let containers = app.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    let first_id = containers[0].split(' ').next().unwrap().to_owned();
    assert_eq!(
        docker_inspect(
            &first_id,
            "{{index .Config.Labels \"previewd.slug\"}} {{index .Config.Labels \"previewd.image\"}} {{index .Config.Labels \"previewd.managed\"}}"
        ),
        "test demo true"
    );
    assert_eq!(
        docker_inspect(&first_id, "{{range $p, $b := .HostConfig.PortBindings}}{{$p}}={{(index $b 0).HostIp}}{{end}}"),
        "3000/tcp=127.0.0.1"
    );
    assert_eq!(
        docker_inspect(&first_id, "{{.HostConfig.SecurityOpt}} {{.HostConfig.RestartPolicy.Name}}"),
        "[no-new-privileges] unless-stopped",
        "restarts are on once the app answered"
    );
    assert_eq!(
        docker_inspect(
            &first_id,
            "{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config \"max-size\"}} {{index .HostConfig.LogConfig.Config \"max-file\"}}"
        ),
        "json-file 10m 3"
    );
    // The image's raw Docker create fields are merged in, under previewd's own.
    assert_eq!(
        docker_inspect(&first_id, "{{.Config.Hostname}} {{.HostConfig.ShmSize}} {{index .Config.Labels \"team\"}}"),
        "preview-box 8388608 web"
    );
    assert_eq!(
        docker_inspect(&first_id, "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}}"),
        "67108864 500000000 256"
    );

    let listed: serde_json::Value = app
        .client
        .get(app.url("/api/previews"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "test");
    assert_eq!(listed[0]["routed"], true);
    let one: serde_json::Value = app
        .client
        .get(app.url("/api/previews/test"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(one["container_id"].as_str().unwrap().starts_with(&first_id), "{one}");

    // Relaunch (JSON this time): a new container replaces the old one.
    let response = app.launch_json(json!({"image_name": "demo", "container_name": "test", "FOO": "second"})).await;
    assert_eq!(response.status(), 200);
    let info: serde_json::Value = response.json().await.unwrap();
    assert_eq!(info["name"], "test");
    assert_eq!(info["image"], "demo");
    assert_eq!(info["status"], "running");
    assert_eq!(info["url"], expected_url.trim_end());
    let second_id = info["container_id"].as_str().unwrap();
    assert!(!second_id.starts_with(&first_id), "relaunch must start a new container");
    let (_, env) = app.via_nginx("test", "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|l| l == "FOO=second"), "{env}");
    assert_eq!(app.containers().len(), 1, "the replaced container is removed");

    // Kill: route and container gone; nginx's default server answers for the host.
    let response = app.kill("test").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "removed test\n");
    let (status, body) = app.via_nginx("test", "/").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("No preview"), "{body}");
    assert!(app.containers().is_empty());
    assert!(!app.vhost_path("test").exists());
    let (status, message) = error_of(app.kill("test").await).await;
    assert_eq!(status, 404);
    assert!(message.contains("no preview named \"test\""), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaunch_switches_to_the_new_container_without_a_failed_request() {
    let app = Arc::new(TestApp::start().await);
    assert_eq!(
        app.launch(&[("image_name", "demo"), ("container_name", "swap"), ("VERSION", "one")]).await.status(),
        200
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (app, stop, ok, failed) = (Arc::clone(&app), Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match app.via_nginx("swap", "/").await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed request during the switch: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for version in ["two", "three"] {
        let response = app.launch(&[("image_name", "demo"), ("container_name", "swap"), ("VERSION", version)]).await;
        assert_eq!(response.status(), 200);
        let (_, env) = app.via_nginx("swap", "/cgi-bin/env").await.unwrap();
        assert!(env.lines().any(|l| l == format!("VERSION={version}")), "{env}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 20, "the load loop ran");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request may fail during a replace");
    assert_eq!(app.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_launches_are_all_served_with_few_reloads() {
    // All twenty run at once (the default `limits.parallel_launches` queues all but 8), so their
    // routes can share reloads; each finds its network ready, as on a daemon that has been up a
    // moment (`network.warm`).
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (common::unique_instance(), common::free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Options::default())
        + "limits:\n  parallel_launches: 20\nnetwork:\n  warm: 20\n";
    let app = TestApp::start_from(dir, instance, nginx_port, yaml).await;
    let networks = app.lifecycle.as_ref().unwrap().networks().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while networks.warm_count() < 20 {
        assert!(Instant::now() < deadline, "20 networks are not ready after 60 s: {}", networks.warm_count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloads_before = app.reloads();
    let logged_before = app.nginx_reloads_logged();
    let names: Vec<String> = (0..20).map(|i| format!("burst-{i}")).collect();
    let started = Instant::now();
    let launches = names.iter().map(|name| {
        let app = &app;
        async move { app.launch(&[("image_name", "demo"), ("container_name", name)]).await }
    });
    for response in futures_util::future::join_all(launches).await {
        assert_eq!(response.status(), 200);
    }
    let elapsed = started.elapsed();
    for name in &names {
        all_fresh_connections_see(&app, name, &format!("Preview: {name}"), 3).await;
    }
    let reloads = app.reloads() - reloads_before;
    let logged = app.nginx_reloads_logged() - logged_before;
    eprintln!("20 launches in {elapsed:?} with {reloads} reloads (nginx logged {logged})");
    assert_eq!(reloads as usize, logged, "previewd's count matches nginx's log");
    assert!(reloads <= 5, "20 launches cost {reloads} reloads; they must be coalesced");
    assert_eq!(app.containers().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_deleted_vhosts_removes_orphans_and_keeps_previews() {
    let mut app = TestApp::start().await;
    for name in ["alpha", "beta"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    app.stop().await;
    assert!(!nginx_alive(&app), "managed nginx stopped with previewd");
    let containers: Vec<String> =
        app.containers().iter().filter_map(|line| line.split_whitespace().next().map(str::to_owned)).collect();
    assert_eq!(containers.len(), 2, "previews keep running while previewd is down");
    // As if previewd had died between the app's first answer and setting the restart policy.
    let update =
        std::process::Command::new("docker").args(["update", "--restart=no", &containers[0]]).output().unwrap();
    assert!(update.status.success(), "{update:?}");

    std::fs::remove_file(app.vhost_path("alpha")).unwrap();
    std::fs::write(app.vhost_path("ghost"), "server { listen 127.0.0.1:1; server_name ghost.invalid; }\n").unwrap();
    let other_instance = app.sites_dir().join("previewd.other.alpha.conf");
    std::fs::write(&other_instance, "# another instance's file\n").unwrap();

    let report = app.boot().await;
    assert_eq!((report.routed, report.removed_vhosts, report.removed_containers), (2, 1, 0), "{report:?}");
    assert_eq!(app.reloads(), 1, "start-up reconcile reloads nginx once");
    for name in ["alpha", "beta"] {
        all_fresh_connections_see(&app, name, &format!("Preview: {name}"), 5).await;
    }
    for id in &containers {
        assert_eq!(
            docker_inspect(id, "{{.HostConfig.RestartPolicy.Name}}"),
            "unless-stopped",
            "Docker keeps every live preview running"
        );
    }
    assert!(app.vhost_path("alpha").exists());
    assert!(!app.vhost_path("ghost").exists(), "orphan vhost removed");
    assert!(other_instance.exists(), "another instance's files are not touched");
    // Tidy the foreign file so the managed nginx test is not confused by it in later steps.
    std::fs::remove_file(other_instance).unwrap();
}

fn nginx_alive(app: &TestApp) -> bool {
    std::fs::read_to_string(app.dir.path().join("state/nginx/nginx.pid"))
        .ok()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{}/cmdline", pid.trim())).ok())
        .is_some_and(|cmdline| cmdline.starts_with("nginx: master"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_removes_containers_that_are_not_the_live_preview() {
    let mut app = TestApp::start().await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "live")]).await.status(), 200);
    app.stop().await;
    // What a crash between create and start leaves behind: a created, never started container.
    let created = std::process::Command::new("docker")
        .args(["create", "--label", "previewd.managed=true", "--label", &format!("previewd.instance={}", app.instance)])
        .args(["--label", "previewd.slug=half", "--label", "previewd.image=demo", "--label", "previewd.port=3000"])
        .arg(common::DEMO_IMAGE)
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let report = app.boot().await;
    assert_eq!((report.routed, report.removed_containers), (1, 1), "{report:?}");
    let states: Vec<String> = app.containers();
    assert_eq!(states.len(), 1, "{states:?}");
    assert!(states[0].ends_with("running"));
    assert!(!app.vhost_path("half").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_that_fails_nginx_test_is_rolled_back_and_the_rest_keeps_serving() {
    let template = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/vhost.conf.tera")).unwrap();
    let broken = template.replace(
        "server {",
        "server {\n{% if slug == \"broken\" or slug == \"broken-two\" %}    this_is_not_an_nginx_directive on;\n{% endif %}",
    );
    assert_ne!(broken, template);
    let app = TestApp::start_with(Options { template: Template::Custom(broken), ..Options::default() }).await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "good")]).await.status(), 200);
    let good_vhost = std::fs::read_to_string(app.vhost_path("good")).unwrap();

    let (status, message) = error_of(app.launch(&[("image_name", "demo"), ("container_name", "broken")]).await).await;
    assert_eq!(status, 500);
    assert!(!message.contains("this_is_not_an_nginx_directive"), "nginx's output goes to the log only: {message}");
    assert!(message.contains("restored") && message.contains("request id"), "{message}");
    assert!(!app.vhost_path("broken").exists());
    assert_eq!(std::fs::read_to_string(app.vhost_path("good")).unwrap(), good_vhost);
    assert_eq!(app.containers().len(), 1, "the failed launch's container is removed");
    all_fresh_connections_see(&app, "good", "Preview: good", 5).await;

    // In one batch with a good change, only the bad one fails.
    let (good, bad) = tokio::join!(
        app.launch(&[("image_name", "demo"), ("container_name", "good-two")]),
        app.launch(&[("image_name", "demo"), ("container_name", "broken-two")]),
    );
    assert_eq!(good.status(), 200);
    assert_eq!(bad.status(), 500);
    all_fresh_connections_see(&app, "good-two", "Preview: good-two", 3).await;
    assert!(!app.vhost_path("broken-two").exists());
    assert_eq!(app.containers().len(), 2);
    let files: Vec<_> = std::fs::read_dir(app.sites_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 2, "no temp or backup file is left: {files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_status_and_a_message_and_leave_nothing_behind() {
    let app = TestApp::start().await;
    let post = |path: &str| app.client.post(app.url(path)).basic_auth(USER, Some(PASSWORD));

    // Authentication.
    let response = app
        .client
        .post(app.url("/launch"))
        .form(&[("image_name", "demo"), ("container_name", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], r#"Basic realm="previewd", charset="UTF-8""#);
    assert_eq!(error_of(response).await.0, 401);
    let response = app
        .client
        .post(app.url("/launch"))
        .basic_auth(USER, Some("wrong"))
        .form(&[("image_name", "demo")])
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!((status, message.as_str()), (401, "wrong user name or password"));
    let response = app.client.get(app.url("/api/previews")).send().await.unwrap();
    assert_eq!(response.status(), 401);

    let form_cases: &[(Form, u16, &str)] = &[
        (&[("container_name", "x")], 400, "missing field `image_name`"),
        (&[("image_name", "demo")], 400, "missing field `container_name`"),
        (
            &[("image_name", "nope"), ("container_name", "x")],
            400,
            "allowed: chatty, crash, demo, late, missing, silent, slowcgi, unpullable",
        ),
        (&[("image_name", "demo"), ("container_name", "///")], 400, "has no letters or digits"),
        (
            &[("image_name", "demo"), ("container_name", "x"), ("BAD-NAME", "1")],
            400,
            "\"BAD-NAME\" is not a valid environment variable name",
        ),
        (&[("image_name", "demo"), ("container_name", "x"), ("PREVIEW_URL", "1")], 400, "set by previewd"),
        (&[("image_name", "demo"), ("container_name", "x"), ("PREVIEW_SHA", "f00")], 400, "starting with PREVIEW_"),
        (&[("image_name", "demo"), ("container_name", "x"), ("A", "1"), ("A", "2")], 400, "given more than once"),
        (&[("image_name", "demo"), ("container_name", "x"), ("A", "nul\0byte")], 400, "NUL byte"),
        (&[("image_name", "missing"), ("container_name", "x")], 422, "pull policy is `never`: build or load it first"),
        (
            &[("image_name", "unpullable"), ("container_name", "x")],
            422,
            "cannot pull image registry.invalid/previewd/none:1",
        ),
        (&[("image_name", "crash"), ("container_name", "x")], 502, "exit code 3"),
        (
            &[("image_name", "silent"), ("container_name", "x")],
            504,
            "did not answer HTTP on container port 3000 at / within 2s",
        ),
    ];
    for (fields, expected_status, expected_message) in form_cases {
        let (status, message) = error_of(post("/launch").form(fields).send().await.unwrap()).await;
        assert_eq!(status, *expected_status, "{fields:?}: {message}");
        assert!(message.contains(expected_message), "{fields:?}: {message:?} lacks {expected_message:?}");
    }

    // The container's last log lines come with a failed start.
    let (_, message) =
        error_of(post("/launch").form(&[("image_name", "crash"), ("container_name", "x")]).send().await.unwrap()).await;
    assert!(message.contains("config file missing"), "{message}");
    let (_, message) =
        error_of(post("/launch").form(&[("image_name", "silent"), ("container_name", "x")]).send().await.unwrap())
            .await;
    assert!(message.contains("waiting forever"), "{message}");

    let body_cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            post("/launch").header("content-type", "application/json").body("{\"image_name\": "),
            400,
            "JSON body is not valid",
        ),
        (
            post("/launch").json(&json!({"image_name": "demo", "container_name": "x", "NESTED": {"a": 1}})),
            400,
            "`NESTED` must be a string",
        ),
        (post("/launch").json(&json!(["demo"])), 400, "must be an object"),
        (post("/launch").header("content-type", "text/plain").body("image_name=demo"), 415, "unsupported Content-Type"),
        (
            post("/launch").form(&[("image_name", "demo"), ("container_name", &"x".repeat(100_000))]),
            413,
            "larger than 65536 bytes",
        ),
        (post("/kill").form(&[("nothing", "here")]), 400, "missing field `container_name`"),
        (post("/kill").form(&[("container_name", "ghost")]), 404, "no preview named \"ghost\""),
        (
            post("/kill").header("origin", "https://evil.example").form(&[("container_name", "ghost")]),
            403,
            "cross-site requests are refused",
        ),
        (
            post("/launch")
                .header("sec-fetch-site", "cross-site")
                .form(&[("image_name", "demo"), ("container_name", "x")]),
            403,
            "cross-site",
        ),
        (post("/nowhere"), 404, "no route"),
        (app.client.get(app.url("/launch")).basic_auth(USER, Some(PASSWORD)), 405, "method not allowed"),
        (
            app.client.get(app.url("/api/previews/ghost")).basic_auth(USER, Some(PASSWORD)),
            404,
            "no preview named \"ghost\"",
        ),
    ];
    for (request, expected_status, expected_message) in body_cases {
        let (status, message) = error_of(request.send().await.unwrap()).await;
        assert_eq!(status, expected_status, "{message}");
        assert!(message.contains(expected_message), "{message:?} lacks {expected_message:?}");
    }

    assert!(app.containers().is_empty(), "failed requests leave no container: {:?}", app.containers());
    let files: Vec<_> = std::fs::read_dir(app.sites_dir()).unwrap().collect();
    assert!(files.is_empty(), "failed requests leave no file: {files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_needs_no_auth_and_reports_a_dead_nginx() {
    let app = TestApp::start().await;
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["docker"]["ok"], true);
    assert_eq!(body["nginx"]["ok"], true);

    common::stop_nginx(&app.dir.path().join("state/nginx/nginx.pid"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = json!(null);
    while Instant::now() < deadline {
        let response = app.client.get(app.url("/healthz")).send().await.unwrap();
        let status = response.status().as_u16();
        last = response.json().await.unwrap();
        if status == 503 {
            assert_eq!(last["nginx"]["ok"], false);
            assert_eq!(last["docker"]["ok"], true);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("healthz never reported the stopped nginx: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_stopped_system_nginx_healthz_and_launches_name_the_pid_file_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let system_dir = dir.path().join("system-nginx");
    let nginx_port = common::free_port();
    let system = SystemNginx::start(&system_dir, nginx_port);
    let app = with_system_nginx(dir, &system, nginx_port).await;
    let pid_file = system_dir.join("nginx.pid");
    common::stop_nginx(&pid_file);
    let expected = format!(
        "nginx is not running: no live nginx master in {} (nginx.pid_file): start nginx (systemctl start nginx), \
         or set nginx.pid_file to the pid file nginx.conf names",
        pid_file.display()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let response = app.client.get(app.url("/healthz")).send().await.unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        if status == 503 || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["nginx"]["error"], expected.as_str(), "{body}");
    let (status, message) = error_of(app.launch(&[("image_name", "demo"), ("container_name", "nowhere")]).await).await;
    assert_eq!(status, 503);
    assert!(message.starts_with(&expected) && message.contains("(request id "), "{message}");
    assert_eq!(app.containers(), Vec::<String>::new(), "the failed launch leaves no container");
}

/// A previewd driving a system nginx started with `SystemNginx::start_with`.
async fn with_system_nginx(dir: tempfile::TempDir, system: &SystemNginx, nginx_port: u16) -> TestApp {
    let instance = common::unique_instance();
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Options::default())
        .replace("  managed: true\n", &system.unmanaged_yaml());
    TestApp::start_from(dir, instance, nginx_port, yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_against_an_nginx_that_does_not_include_the_sites_dir_fails_saying_so_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let system_dir = dir.path().join("system-nginx");
    let nginx_port = common::free_port();
    let system = SystemNginx::start_with(&system_dir, nginx_port, false, true);
    let app = with_system_nginx(dir, &system, nginx_port).await;

    let (status, message) = error_of(app.launch(&[("image_name", "demo"), ("container_name", "lost")]).await).await;
    let sites = system_dir.join("sites-enabled");
    let expected = format!(
        "nginx does not serve {}: add `include {}/*.conf;` to the http block of {}, then reload nginx",
        sites.display(),
        sites.display(),
        system_dir.join("nginx.conf").display()
    );
    assert_eq!(status, 503);
    assert!(message.starts_with(&expected) && message.contains("(request id "), "{message}");
    assert_eq!(app.containers(), Vec::<String>::new(), "the launch's container is removed");
    let left: Vec<_> = std::fs::read_dir(&sites).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left in the sites dir: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_whose_host_name_nginx_cannot_hold_fails_naming_the_hash_bucket_size() {
    let dir = tempfile::tempdir().unwrap();
    let system_dir = dir.path().join("system-nginx");
    let nginx_port = common::free_port();
    let system = SystemNginx::start_with(&system_dir, nginx_port, true, false);
    let app = with_system_nginx(dir, &system, nginx_port).await;
    let long = "a-preview-name-of-the-longest-kind-that-a-dns-label-can-hold-63";

    let (status, message) = error_of(app.launch(&[("image_name", "demo"), ("container_name", long)]).await).await;
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("add `server_names_hash_bucket_size 256;` to the http block"), "{message}");
    assert_eq!(app.containers(), Vec::<String>::new(), "the launch's container is removed");
    let sites = system_dir.join("sites-enabled");
    assert_eq!(std::fs::read_dir(&sites).unwrap().count(), 0, "a vhost file is left in {}", sites.display());
    // A short name still works on that nginx.
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "short")]).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmanaged_mode_drives_an_existing_nginx_through_its_commands_and_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let system_dir = dir.path().join("system-nginx");
    let nginx_port = common::free_port();
    let system = SystemNginx::start(&system_dir, nginx_port);
    let instance = common::unique_instance();
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Options::default())
        .replace("  managed: true\n", &system.unmanaged_yaml());
    let mut app = TestApp::start_from(dir, instance, nginx_port, yaml).await;

    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "sys")]).await.status(), 200);
    all_fresh_connections_see(&app, "sys", "Preview: sys", 10).await;
    let vhost = system_dir.join("sites-enabled").join(format!("previewd.{}.sys.conf", app.instance));
    assert!(vhost.exists());
    assert!(!app.dir.path().join("state/nginx/nginx.conf").exists(), "no managed nginx config in unmanaged mode");

    app.stop().await;
    let pid = std::fs::read_to_string(system_dir.join("nginx.pid")).unwrap();
    let title = std::fs::read_to_string(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    assert!(title.starts_with("nginx: master"), "previewd leaves a system nginx running");
    assert_eq!(app.via_nginx("sys", "/").await.unwrap().0, 200, "and its previews served");

    app.boot().await;
    assert_eq!(app.kill("sys").await.status(), 200);
    assert_eq!(app.via_nginx("sys", "/").await.unwrap().0, 404);
    assert!(!vhost.exists());
}

fn host_port_of(id: &str) -> String {
    docker_inspect(id, "{{(index (index .NetworkSettings.Ports \"3000/tcp\") 0).HostPort}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_docker_restarts_on_a_new_port_is_routed_again() {
    let mut app = TestApp::start().await;
    app.stop().await;
    // previewd publishes on ports it picks, which Docker keeps across restarts; a container on
    // a port Docker picks (an older previewd's) gets a new one each time Docker restarts it.
    let created = std::process::Command::new("docker")
        .args(["run", "-d", "-p", "127.0.0.1::3000", "--label", "previewd.managed=true"])
        .args(["--label", &format!("previewd.instance={}", app.instance), "--label", "previewd.slug=bounce"])
        .args([
            "--label",
            "previewd.image=demo",
            "--label",
            "previewd.port=3000",
            "-e",
            "PREVIEW_NAME=bounce",
            common::DEMO_IMAGE,
        ])
        .args(["/bin/busybox", "httpd", "-f", "-p", "3000", "-h", "/www"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    app.boot().await;
    let before = host_port_of(&id);
    let router = app.lifecycle.as_ref().unwrap().router();
    let reloads = router.reloads();

    // What Docker does after a crash or an engine restart: the same container, a new host port.
    let restarted = std::process::Command::new("docker").args(["restart", "-t", "0", &id]).output().unwrap();
    assert!(restarted.status.success(), "{restarted:?}");
    let after = host_port_of(&id);
    assert_ne!(before, after, "Docker kept the port; this test proves nothing");

    // Done once the re-route's reload has returned: a first 200 can come from a new nginx
    // worker while the old ones, with the old port, still take connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.reloads() == reloads {
        assert!(Instant::now() < deadline, "previewd did not re-route the preview after its restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vhost = std::fs::read_to_string(app.vhost_path("bounce")).unwrap();
    assert!(vhost.contains(&format!("127.0.0.1:{after};")), "the route follows the new port {after}:\n{vhost}");
    all_fresh_connections_see(&app, "bounce", "Preview: bounce", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_an_interrupted_replace_keeps_the_container_that_answers() {
    let mut app = TestApp::start().await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "pair")]).await.status(), 200);
    let old_id = app.containers()[0].split(' ').next().unwrap().to_owned();
    app.stop().await;
    // A replacement that was started but never answered (previewd died during its health wait),
    // and one that was created but never started.
    for (run, command) in [("run", "-d"), ("create", "--init")] {
        let labels = [
            "previewd.managed=true".to_owned(),
            format!("previewd.instance={}", app.instance),
            "previewd.slug=pair".to_owned(),
            "previewd.image=silent".to_owned(),
            "previewd.port=3000".to_owned(),
            format!("previewd.created={}", u128::MAX / 2),
        ];
        let mut args: Vec<String> = vec![run.into(), command.into(), "-p".into(), "127.0.0.1::3000".into()];
        for label in labels {
            args.extend(["--label".to_owned(), label]);
        }
        args.extend([common::DEMO_IMAGE.to_owned(), "/bin/busybox".into(), "sleep".into(), "600".into()]);
        let output = std::process::Command::new("docker").args(&args).output().unwrap();
        assert!(output.status.success(), "{output:?}");
    }
    assert_eq!(app.containers().len(), 3);

    let report = app.boot().await;
    assert_eq!((report.routed, report.removed_containers), (1, 2), "{report:?}");
    let left = app.containers();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(&old_id), "the answering container is kept: {left:?}");
    all_fresh_connections_see(&app, "pair", "Preview: pair", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_restores_the_vhost_and_removes_the_new_container() {
    let dir = tempfile::tempdir().unwrap();
    let instance = common::unique_instance();
    let nginx_port = common::free_port();
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Options::default())
        .replace("  managed: true\n", "  managed: true\n  reload_command: [/bin/false]\n  reload_timeout: 2\n");
    let app = TestApp::start_from(dir, instance, nginx_port, yaml).await;

    let (status, message) = error_of(app.launch(&[("image_name", "demo"), ("container_name", "noreload")]).await).await;
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("/bin/false") && message.contains("printed nothing"), "{message}");
    assert!(!app.vhost_path("noreload").exists(), "the vhost nginx never loaded is removed again");
    assert!(app.containers().is_empty(), "{:?}", app.containers());
    let (status, page) = app.via_nginx("noreload", "/").await.unwrap();
    assert_eq!(status, 502, "its status page says the deploy failed: {page}");
    assert!(page.contains("noreload failed to deploy") && page.contains("/bin/false"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_being_started_shows_its_step_then_why_it_failed_and_a_kill_forgets_it() {
    let app = Arc::new(TestApp::start().await);
    let launching = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { app.launch(&[("image_name", "silent"), ("container_name", "hush")]).await.status() })
    };
    // `silent` never answers: its launch waits out its health_timeout of 2 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let starting = loop {
        let (status, page) = app.via_nginx("hush", "/").await.unwrap();
        if status == 503 {
            break page;
        }
        assert!(Instant::now() < deadline && status == 404, "no status page while it starts: {status} {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(starting.starts_with("Starting hush…"), "{starting}");
    assert_eq!(launching.await.unwrap().as_u16(), 504);
    let (status, page) = app.via_nginx("hush", "/").await.unwrap();
    assert_eq!(status, 502, "{page}");
    assert!(page.starts_with("hush failed to deploy") && page.contains("did not answer"), "{page}");

    let browser = reqwest::Client::builder()
        .no_proxy()
        .resolve(&app.host("hush"), ([127, 0, 0, 1], app.nginx_port).into())
        .build()
        .unwrap();
    let html = browser
        .get(format!("http://{}:{}/", app.host("hush"), app.nginx_port))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(html.headers()["content-type"], "text/html; charset=utf-8");
    assert!(html.text().await.unwrap().contains("<h1>hush failed to deploy</h1>"));

    assert_eq!(app.kill("hush").await.status(), 404, "nothing of it runs");
    assert_eq!(app.via_nginx("hush", "/").await.unwrap().0, 404, "and its failure is forgotten");
    assert_eq!(
        app.via_nginx("nobody-here", "/").await.unwrap(),
        (404, "No preview is running at this address.\n".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_one_name_are_serialized() {
    let app = TestApp::start().await;
    let (first, second) = tokio::join!(
        app.launch(&[("image_name", "demo"), ("container_name", "same"), ("RUN", "a")]),
        app.launch(&[("image_name", "demo"), ("container_name", "same"), ("RUN", "b")]),
    );
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    assert_eq!(app.containers().len(), 1, "the second launch replaced the first: {:?}", app.containers());
    let (_, env) = app.via_nginx("same", "/cgi-bin/env").await.unwrap();
    assert!(env.lines().any(|l| l == "RUN=a" || l == "RUN=b"), "{env}");

    // Whichever of a launch and a kill gets the name first, the other sees its whole result.
    let (launch, kill) =
        tokio::join!(app.launch(&[("image_name", "demo"), ("container_name", "same")]), app.kill("same"));
    assert_eq!((launch.status().as_u16(), kill.status().as_u16()), (200, 200));
    let containers = app.containers();
    match containers.len() {
        0 => assert!(!app.vhost_path("same").exists(), "killed last: no route left"),
        1 => all_fresh_connections_see(&app, "same", "Preview: same", 3).await,
        _ => panic!("one preview, several containers: {containers:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_during_a_replace_still_completes() {
    let app = Arc::new(TestApp::start().await);
    assert_eq!(app.launch(&[("image_name", "slowcgi"), ("container_name", "drain")]).await.status(), 200);
    let (status, body) = app.via_nginx("drain", "/cgi-bin/slow").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slow done\n"), "the slow page works");

    // A 2 s request under the old route, then the replace switches the route under it.
    let slow = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { app.via_nginx("drain", "/cgi-bin/slow").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.launch(&[("image_name", "slowcgi"), ("container_name", "drain")]).await.status(), 200);
    let (status, body) = slow.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "slow done\n"), "the old container served its request to the end");
    assert_eq!(app.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_whose_port_was_taken_while_it_was_down_comes_back_on_another_port() {
    let mut app = TestApp::start().await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "held")]).await.status(), 200);
    app.stop().await;
    let id = app.containers()[0].split(' ').next().unwrap().to_owned();
    let old_port = host_port_of(&id);
    // What an engine restart can leave: the container stopped and its port held by another program.
    let stopped = std::process::Command::new("docker").args(["stop", "-t", "0", &id]).output().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    let _squatter = std::net::TcpListener::bind(format!("127.0.0.1:{old_port}")).expect("the old port is free to take");
    let started = std::process::Command::new("docker").args(["start", &id]).output().unwrap();
    assert!(!started.status.success(), "Docker started the container on a taken port; this test proves nothing");

    let report = app.boot().await;
    assert_eq!((report.routed, report.removed_containers), (1, 1), "{report:?}");
    all_fresh_connections_see(&app, "held", "Preview: held", 3).await;
    let states = app.containers();
    assert_eq!(states.len(), 1, "{states:?}");
    let new_id = states[0].split(' ').next().unwrap();
    assert_ne!(host_port_of(new_id), old_port);
    assert_eq!(docker_inspect(new_id, "{{.HostConfig.RestartPolicy.Name}}"), "unless-stopped");
}

/// What a restart after `kill -9` can meet: a removal the killed previewd had asked for, which
/// Docker is still carrying out. Removing it again, or keeping it running, is not an error: the
/// start-up reconcile used to fail on it, and previewd did not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_being_removed_or_gone_is_not_an_error() {
    use previewd::runtime::Containers;
    common::require_demo_image();
    let instance = common::unique_instance();
    let no_nginx = tempfile::tempdir().unwrap();
    let _cleanup = common::Cleanup { instance: instance.clone(), pid_file: no_nginx.path().join("nginx.pid") };
    let runtime = previewd::docker::DockerRuntime::connect(previewd::preview::InstanceName::parse(&instance).unwrap())
        .await
        .unwrap();
    let run = || {
        let output = std::process::Command::new("docker")
            .args([
                "run",
                "-d",
                "--label",
                &format!("previewd.instance={instance}"),
                common::DEMO_IMAGE,
                "/bin/busybox",
                "httpd",
                "-f",
                "-p",
                "3000",
                "-h",
                "/www",
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    for _ in 0..3 {
        let id = run();
        let (first, second) = tokio::join!(runtime.remove(&id), runtime.remove(&id));
        first.unwrap();
        second.unwrap();
        assert!(common::docker_ps(&format!("id={id}")).is_empty());
        assert!(!runtime.ensure_kept_running(&id).await.unwrap(), "a container that is gone is not kept running");
    }
    let id = run();
    assert!(runtime.ensure_kept_running(&id).await.unwrap());
    assert_eq!(docker_inspect(&id, "{{.HostConfig.RestartPolicy.Name}}"), "unless-stopped");
    runtime.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_whose_container_is_removed_behind_previewds_back_loses_its_route() {
    let app = TestApp::start().await;
    for name in ["doomed", "bystander"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    let doomed = app.containers().into_iter().find(|line| line.contains(".doomed.")).unwrap();
    let id = doomed.split_whitespace().next().unwrap().to_owned();
    let removed = std::process::Command::new("docker").args(["rm", "-f", &id]).output().unwrap();
    assert!(removed.status.success(), "{removed:?}");

    // Docker's destroy event makes previewd drop the route (vhost deleted, nginx reloaded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.vhost_path("doomed").exists() || !matches!(app.via_nginx("doomed", "/").await, Ok((404, _))) {
        assert!(Instant::now() < deadline, "the route of the removed container is still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(app.via_nginx("bystander", "/").await, Ok((200, _))), "the other preview is untouched");
    let response =
        app.client.get(app.url("/api/previews/doomed")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(response.status(), 404);
}
