//! Whole environments against the real Docker engine and nginx: the shop demo
//! (`previewd-shop:demo`) with a real PostgreSQL seeded from `shop-db-seed` (10,000 products),
//! a real Redis and a migration job, all built by scripts/setup.sh.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Options, PASSWORD, TestApp, USER, config_yaml, error_of, free_port, run_client, shop, unique_instance, volumes,
    with_images,
};
use serde_json::Value;

async fn start_shop() -> TestApp {
    shop::require_images();
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance();
    let nginx_port = free_port();
    let yaml = config_yaml(&instance, dir.path(), nginx_port, &Options::default());
    TestApp::start_from(dir, instance, nginx_port, with_images(&yaml, &shop::images_yaml())).await
}

async fn launch(app: &TestApp, image: &str, name: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut fields = vec![("image_name", image), ("container_name", name)];
    fields.extend_from_slice(extra);
    app.client
        .post(app.url("/launch"))
        .basic_auth(USER, Some(PASSWORD))
        .header("accept", "application/json")
        .form(&fields)
        .send()
        .await
        .expect("launch request")
}

async fn launch_ok(app: &TestApp, image: &str, name: &str) -> Value {
    let response = launch(app, image, name, &[]).await;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The shop's `/api/state` through nginx.
async fn state(app: &TestApp, name: &str) -> Value {
    let (status, body) = app.via_nginx(name, "/api/state").await.expect("request through nginx");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn get_preview(app: &TestApp, name: &str) -> (u16, Value) {
    let response = app
        .client
        .get(app.url(&format!("/api/previews/{name}")))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `docker ps -a` of this instance's containers with one role: (id, state) pairs.
fn containers_with_role(app: &TestApp, role: &str) -> Vec<(String, String)> {
    let output = Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label=previewd.instance={}", app.instance)])
        .args(["--filter", &format!("label=previewd.role={role}"), "--format", "{{.ID}} {{.State}}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once(' ').map(|(id, state)| (id.to_owned(), state.to_owned())))
        .collect()
}

#[tokio::test]
async fn a_launch_with_services_serves_the_seeded_rows_and_the_migrations_effect() {
    let app = start_shop().await;
    let began = Instant::now();
    let preview = launch_ok(&app, "shop", "feature-x").await;
    eprintln!("shop environment launched in {:?}", began.elapsed());
    let shop = state(&app, "feature-x").await;
    assert_eq!(shop["products"], 10_000, "{shop}");
    assert_eq!(shop["first"][0], "product 1", "{shop}");
    assert_eq!(shop["migrated"], true, "{shop}");
    assert_eq!(shop["preview"], "feature-x", "{shop}");
    let names: Vec<&str> =
        preview["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cache", "db"], "{preview}");
    let (_, listed) = get_preview(&app, "feature-x").await;
    assert!(listed["services"].as_array().unwrap().iter().all(|s| s["status"] == "running"), "{listed}");
    assert_eq!(containers_with_role(&app, "service").len(), 2);
    assert!(containers_with_role(&app, "job").is_empty(), "the migration's container is removed once it ends");
    assert_eq!(volumes(&app.instance), [format!("previewd.{}.feature-x.db", app.instance)]);
}

/// The id of the instance's running container of service `name`.
fn running_service(app: &TestApp, name: &str) -> String {
    let output = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=previewd.instance={}", app.instance)])
        .args(["--filter", &format!("label=previewd.part={name}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Requests through nginx, one after another, until `stop`: (answers, failures).
fn keep_requesting(
    app: &TestApp,
    name: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    let host = app.host(name);
    let port = app.nginx_port;
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .resolve(&host, ([127, 0, 0, 1], port).into())
            .build()
            .unwrap();
        let (mut answers, mut failures) = (0, Vec::new());
        while !*stop.borrow() {
            match client.get(format!("http://{host}:{port}/api/state")).send().await {
                Ok(response) if response.status() == 200 => answers += 1,
                Ok(response) => failures.push(format!("HTTP {}", response.status())),
                Err(err) => failures.push(err.to_string()),
            }
        }
        (answers, failures)
    })
}

async fn add_product(app: &TestApp, name: &str, product: &str) {
    let host = app.host(name);
    let client =
        reqwest::Client::builder().no_proxy().resolve(&host, ([127, 0, 0, 1], app.nginx_port).into()).build().unwrap();
    let response = client
        .post(format!("http://{host}:{}/products", app.nginx_port))
        .form(&[("name", product), ("price", "9.99")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201, "{}", response.text().await.unwrap());
}

#[tokio::test]
async fn data_written_through_the_app_survives_a_redeploy_that_fails_no_request() {
    let app = start_shop().await;
    launch_ok(&app, "shop", "keep").await;
    add_product(&app, "keep", "written before the redeploy").await;
    let services_before = containers_with_role(&app, "service");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let requests = keep_requesting(&app, "keep", stopped);
    launch_ok(&app, "shop", "keep").await;
    stop.send(true).unwrap();
    let (answers, failures) = requests.await.unwrap();
    assert!(failures.is_empty(), "requests failed during the redeploy: {failures:?}");
    assert!(answers > 0);
    let shop = state(&app, "keep").await;
    assert_eq!(shop["products"], 10_001, "{shop}");
    assert_eq!(containers_with_role(&app, "service"), services_before, "the services are kept as they were");
}

#[tokio::test]
async fn two_previews_of_the_same_image_have_separate_databases() {
    let app = start_shop().await;
    launch_ok(&app, "shop", "one").await;
    launch_ok(&app, "shop", "two").await;
    add_product(&app, "one", "only in one").await;
    assert_eq!(state(&app, "one").await["products"], 10_001);
    assert_eq!(state(&app, "two").await["products"], 10_000);
}

/// Nothing of the instance is left: no container, no volume, no vhost.
fn assert_nothing_left(app: &TestApp) {
    assert!(app.containers().is_empty(), "containers left: {:?}", app.containers());
    assert!(volumes(&app.instance).is_empty(), "volumes left: {:?}", volumes(&app.instance));
    let vhosts: Vec<_> =
        std::fs::read_dir(app.sites_dir()).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(vhosts.is_empty(), "vhosts left: {vhosts:?}");
}

/// The instance's networks in use by a container (free warm networks are the pool's).
fn networks_in_use(app: &TestApp) -> Vec<String> {
    common::networks(&app.instance)
        .into_iter()
        .filter(|network| {
            let output = Command::new("docker")
                .args(["network", "inspect", "-f", "{{len .Containers}}", network])
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).trim() != "0"
        })
        .collect()
}

#[tokio::test]
async fn a_service_that_stops_during_start_up_fails_the_first_launch_naming_it_and_leaves_nothing() {
    let app = start_shop().await;
    let began = Instant::now();
    let (status, body) = error_of(launch(&app, "shop-brokencache", "broken", &[]).await).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("service cache stopped during start-up (exit code 4)"), "{body}");
    assert!(body.contains("cache config is broken"), "the service's last log lines: {body}");
    assert!(began.elapsed() < Duration::from_secs(20), "fails fast: {:?}", began.elapsed());
    assert_nothing_left(&app);
    let (status, _) = get_preview(&app, "broken").await;
    assert_eq!(status, 404);
    assert!(metrics(&app).await.contains("previewd_service_failures_total{name=\"cache\"} 1"));
}

#[tokio::test]
async fn a_service_that_is_not_ready_in_time_fails_the_launch_naming_it() {
    let app = start_shop().await;
    let (status, body) = error_of(launch(&app, "shop-deafcache", "deaf", &[]).await).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("service cache was not ready within 2s"), "{body}");
    assert_nothing_left(&app);
}

#[tokio::test]
async fn a_failing_job_fails_the_first_launch_with_its_exit_code_and_log_and_leaves_nothing() {
    let app = start_shop().await;
    let (status, body) = error_of(launch(&app, "shop", "badjob", &[("MIGRATE_FAIL", "1")]).await).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("job migrate failed with exit code 3"), "{body}");
    assert!(body.contains("migration failed on purpose"), "the job's last log lines: {body}");
    assert_nothing_left(&app);
    assert!(networks_in_use(&app).is_empty());
    assert!(metrics(&app).await.contains("previewd_job_failures_total{name=\"migrate\"} 1"));
}

#[tokio::test]
async fn a_failing_job_on_a_redeploy_keeps_the_old_app_serving() {
    let app = start_shop().await;
    let first = launch_ok(&app, "shop", "steady").await;
    let (status, body) = error_of(launch(&app, "shop", "steady", &[("MIGRATE_FAIL", "1")]).await).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("job migrate failed with exit code 3"), "{body}");
    let (_, preview) = get_preview(&app, "steady").await;
    assert_eq!(preview["container_id"], first["container_id"], "the old app is still the preview's");
    assert_eq!(state(&app, "steady").await["products"], 10_000);
}

#[tokio::test]
async fn reset_puts_the_seeded_rows_back() {
    let app = start_shop().await;
    launch_ok(&app, "shop", "resettable").await;
    add_product(&app, "resettable", "gone after the reset").await;
    assert_eq!(state(&app, "resettable").await["products"], 10_001);
    let response = app
        .client
        .post(app.url("/api/previews/resettable/reset"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let shop = state(&app, "resettable").await;
    assert_eq!(shop["products"], 10_000, "{shop}");
    assert_eq!(shop["migrated"], true, "the jobs ran again: {shop}");
}

#[tokio::test]
async fn kill_leaves_no_container_volume_network_or_vhost() {
    let app = start_shop().await;
    launch_ok(&app, "shop", "doomed").await;
    assert!(!volumes(&app.instance).is_empty());
    let network = networks_in_use(&app);
    assert_eq!(network.len(), 1, "{network:?}");
    assert_eq!(app.kill("doomed").await.status().as_u16(), 200);
    assert_nothing_left(&app);
    assert!(!common::networks(&app.instance).contains(&network[0]), "the preview's network is removed");
}

#[tokio::test]
async fn the_log_of_a_service_is_served_by_name_and_an_unknown_service_is_a_404() {
    let app = start_shop().await;
    launch_ok(&app, "shop", "logged").await;
    let logs = |query: &'static str| {
        app.client.get(app.url(&format!("/api/previews/logged/logs?{query}"))).basic_auth(USER, Some(PASSWORD)).send()
    };
    let response = logs("service=db&tail=200").await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("database system is ready to accept connections"), "{text}");
    let (status, body) = error_of(logs("service=search").await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no service named search"), "{body}");
    let (status, _) = error_of(logs("service=Not%20A%20Name").await.unwrap()).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_service_removed_behind_previewds_back_is_started_again_on_its_data() {
    let app = start_shop().await;
    launch_ok(&app, "shop", "healing").await;
    add_product(&app, "healing", "kept in the volume").await;
    let db = running_service(&app, "db");
    assert!(Command::new("docker").args(["rm", "-f", &db]).output().unwrap().status.success());
    // Docker's destroy event makes previewd start it again: wait for the app to answer with it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, body)) = app.via_nginx("healing", "/api/state").await {
            let shop: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(shop["products"], 10_001, "the data survived: {shop}");
            break;
        }
        assert!(Instant::now() < deadline, "the db service did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let services = containers_with_role(&app, "service");
    assert_eq!(services.len(), 2, "{services:?}");
    assert!(services.iter().all(|(id, state)| !db.starts_with(id.as_str()) && state == "running"), "{services:?}");
}

#[tokio::test]
async fn a_restart_removes_the_services_and_data_of_a_preview_whose_app_was_removed() {
    let mut app = start_shop().await;
    launch_ok(&app, "shop", "orphaned").await;
    app.stop().await;
    let apps = containers_with_role(&app, "app");
    for (id, _) in &apps {
        assert!(Command::new("docker").args(["rm", "-f", id]).output().unwrap().status.success());
    }
    let report = app.boot().await;
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(app.containers().is_empty(), "{:?}", app.containers());
    assert!(volumes(&app.instance).is_empty(), "{:?}", volumes(&app.instance));
    assert!(networks_in_use(&app).is_empty());
}

#[tokio::test]
async fn a_service_whose_definition_changed_is_recreated_with_its_data_kept() {
    let mut app = start_shop().await;
    launch_ok(&app, "shop", "evolving").await;
    add_product(&app, "evolving", "kept across the change").await;
    let before = containers_with_role(&app, "service");
    app.stop().await;
    app.options_yaml = app.options_yaml.replacen("memory: 512m", "memory: 640m", 1);
    app.boot().await;
    launch_ok(&app, "shop", "evolving").await;
    let after = containers_with_role(&app, "service");
    let kept: Vec<_> = after.iter().filter(|c| before.contains(c)).collect();
    assert_eq!(kept.len(), 1, "the cache is kept, the db is recreated: {before:?} -> {after:?}");
    assert_eq!(state(&app, "evolving").await["products"], 10_001);
}

async fn metrics(app: &TestApp) -> String {
    app.client.get(app.url("/metrics")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn a_restart_starts_a_service_stopped_by_hand_again_on_its_data() {
    let mut app = start_shop().await;
    launch_ok(&app, "shop", "stopped").await;
    add_product(&app, "stopped", "kept while the db was stopped").await;
    let db = running_service(&app, "db");
    assert!(Command::new("docker").args(["stop", &db]).output().unwrap().status.success());
    app.stop().await;
    let report = app.boot().await;
    assert!(report.failed.is_empty(), "{report:?}");
    let services = containers_with_role(&app, "service");
    assert!(services.iter().all(|(_, state)| state == "running"), "{services:?}");
    assert_eq!(state(&app, "stopped").await["products"], 10_001);
}

#[tokio::test]
async fn the_client_launches_an_environment_lists_its_services_reads_a_services_log_and_resets_it() {
    let app = start_shop().await;
    let home = tempfile::tempdir().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let out = run_client(&app, home.path(), &["launch", "shop", "by-cli"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    let progress = text(&out.stderr);
    let steps: Vec<&str> = progress.lines().filter_map(|line| line.split_whitespace().nth(1)).collect();
    assert_eq!(steps, ["image", "services", "job", "create", "start", "health", "route", "ready"], "{progress}");

    let out = run_client(&app, home.path(), &["list"], true, None).await;
    let table = text(&out.stdout);
    assert!(table.lines().next().unwrap().contains("SERVICES"), "{table}");
    assert!(table.contains("cache:running,db:running"), "{table}");

    let out =
        run_client(&app, home.path(), &["logs", "by-cli", "--service", "cache", "--tail", "50"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("Ready to accept connections"), "{}", text(&out.stdout));

    add_product(&app, "by-cli", "gone after the reset").await;
    let out = run_client(&app, home.path(), &["reset", "by-cli"], true, None).await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).starts_with("reset by-cli: http://by-cli."), "{}", text(&out.stdout));
    assert_eq!(state(&app, "by-cli").await["products"], 10_000);

    let out = run_client(&app, home.path(), &["reset", "no-such-preview"], true, None).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no preview named \"no-such-preview\""), "{}", text(&out.stderr));
}
