//! The API's edges: which host names it answers (`api_hosts`), whether `/metrics` needs
//! credentials (`metrics_auth`), and the request id that ties a 5xx answer to its log line.

mod common;

use common::{BinaryConfig, Daemon, PASSWORD, TestApp, USER, client, error_of, free_port, unique_instance};

async fn app_with(extra: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (unique_instance(), free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &common::Options::default()) + extra;
    TestApp::start_from(dir, instance, nginx_port, yaml).await
}

async fn list_with_host(app: &TestApp, host: &str) -> reqwest::Response {
    app.client.get(app.url("/api/previews")).header("host", host).basic_auth(USER, Some(PASSWORD)).send().await.unwrap()
}

#[tokio::test]
async fn with_api_hosts_a_request_for_another_name_gets_421_while_listed_names_and_ip_addresses_are_answered() {
    let app = app_with("api_hosts: [previews.example.com]\n").await;
    let (status, error) = error_of(list_with_host(&app, "rebound.evil.example:7800").await).await;
    assert_eq!(status, 421, "{error}");
    assert!(error.contains("api_hosts") && error.contains("previews.example.com"), "{error}");
    assert_eq!(list_with_host(&app, "previews.example.com").await.status(), 200);
    assert_eq!(list_with_host(&app, &app.api.to_string()).await.status(), 200);
}

#[tokio::test]
async fn without_api_hosts_any_host_name_is_answered() {
    let app = app_with("").await;
    assert_eq!(list_with_host(&app, "anything.example").await.status(), 200);
}

#[tokio::test]
async fn with_metrics_auth_metrics_asks_for_the_apis_credentials() {
    let app = app_with("metrics_auth: true\n").await;
    let anonymous = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let signed_in = app.client.get(app.url("/metrics")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(signed_in.status(), 200);
    assert!(signed_in.text().await.unwrap().contains("previewd_"));
}

#[tokio::test]
async fn a_5xx_answer_names_a_request_id_whose_log_line_holds_the_cause_the_answer_leaves_out() {
    let setup = BinaryConfig::new();
    let _cleanup = setup.cleanup();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/vhost.conf.tera")).unwrap();
    let broken = shipped.replace("server {", "server {\n    this_is_not_an_nginx_directive on;");
    let template = setup.dir.path().join("broken.conf.tera");
    std::fs::write(&template, broken).unwrap();
    let shipped_path = concat!(env!("CARGO_MANIFEST_DIR"), "/templates/vhost.conf.tera");
    let yaml = std::fs::read_to_string(&setup.path).unwrap().replace(shipped_path, &template.display().to_string());
    std::fs::write(&setup.path, yaml).unwrap();
    let log = setup.dir.path().join("previewd.log");
    let mut daemon = Daemon::start(&setup.path, &log);
    let http = client();
    daemon.wait_until_healthy(&http, &setup.api).await;

    let response = http
        .post(format!("{}/launch", setup.api))
        .basic_auth(USER, Some(PASSWORD))
        .header("accept", "application/json")
        .form(&[("image_name", "demo"), ("container_name", "broken")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    let header = response.headers().get("x-request-id").unwrap().to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    let (message, id) = (body["error"].as_str().unwrap(), body["request_id"].as_str().unwrap());
    assert_eq!(id, header);
    assert!(message.contains(id), "{message}");
    assert!(!message.contains("this_is_not_an_nginx_directive") && !message.contains(".conf"), "{message}");

    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged.lines().find(|line| line.contains(id) && line.contains("request failed"));
    let line = line.unwrap_or_else(|| panic!("no log line names request id {id}:\n{logged}"));
    assert!(line.contains("this_is_not_an_nginx_directive"), "the cause is in the log: {line}");
    assert!(daemon.terminate().success());
}
