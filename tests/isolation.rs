//! What a preview container may do, seen from inside it: the capabilities it keeps, its default
//! limits, a read-only root; and the settings that would hand it the host, which `serve`
//! refuses unless the image allows them.

mod common;

use std::process::Command;

use common::{TestApp, free_port, unique_instance};
use previewd::app::Application;
use previewd::config::Config;

/// Images beside the test config's own, each built from the demo image.
const IMAGES: &str = r#"images:
  capped:
    image: previewd-demo:latest
    port: 3000
    command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www]
    pull: never
    cap_add: [chown, CAP_NET_BIND_SERVICE]
  unlimited:
    image: previewd-demo:latest
    port: 3000
    command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www]
    pull: never
  sealed:
    image: previewd-demo:latest
    port: 3000
    command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www]
    pull: never
    read_only: true
  strict:
    image: previewd-demo:latest
    port: 3000
    command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www]
    pull: never
    request_env: [TICKET]
"#;

async fn app_with(images: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (unique_instance(), free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &common::Options::default()).replacen(
        "images:\n",
        images,
        1,
    );
    TestApp::start_from(dir, instance, nginx_port, yaml).await
}

async fn launched(app: &TestApp, image: &str, name: &str) -> String {
    let response = app.launch(&[("image_name", image), ("container_name", name)]).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let containers = app.containers();
    let line = containers.iter().find(|line| line.contains(&format!(".{name}."))).expect("the preview's container");
    line.split(' ').next().unwrap().to_owned()
}

fn exec(container: &str, script: &str) -> (bool, String) {
    let output = Command::new("docker").args(["exec", container, "/bin/busybox", "sh", "-c", script]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// A capability set of the container's first process, from `/proc/1/status`.
fn capability_set(container: &str, set: &str) -> u64 {
    let (ok, status) = exec(container, "cat /proc/1/status");
    assert!(ok, "{status}");
    let line = status.lines().find(|line| line.starts_with(&format!("{set}:"))).expect("a capability line");
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

fn inspect(container: &str, format: &str) -> String {
    let output = Command::new("docker").args(["inspect", "--format", format, container]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_preview_container_keeps_only_the_capabilities_its_image_adds() {
    let app = app_with(IMAGES).await;
    let capped = launched(&app, "capped", "capped").await;
    let plain = launched(&app, "unlimited", "plain").await;
    let (chown, net_bind_service) = (1 << 0, 1 << 10);
    assert_eq!(capability_set(&capped, "CapEff"), chown | net_bind_service);
    assert_eq!(capability_set(&capped, "CapBnd"), chown | net_bind_service, "nothing to gain later either");
    assert_eq!(capability_set(&plain, "CapEff"), 0, "an image that adds none runs with none");
    assert_eq!(app.via_nginx("plain", "/").await.unwrap().0, 200, "the app still serves without capabilities");
}

#[tokio::test]
async fn an_image_without_limits_gets_512_processes_and_1g_of_memory() {
    let app = app_with(IMAGES).await;
    let container = launched(&app, "unlimited", "unlimited").await;
    assert_eq!(inspect(&container, "{{.HostConfig.PidsLimit}} {{.HostConfig.Memory}}"), "512 1073741824");
    let limited = launched(&app, "demo", "limited").await;
    assert_eq!(inspect(&limited, "{{.HostConfig.PidsLimit}} {{.HostConfig.Memory}}"), "256 67108864");
}

#[tokio::test]
async fn a_read_only_image_cannot_write_its_root_but_can_write_tmp() {
    let app = app_with(IMAGES).await;
    let container = launched(&app, "sealed", "sealed").await;
    let (wrote_root, message) = exec(&container, "echo x > /www/index.html");
    assert!(!wrote_root && message.contains("Read-only file system"), "{message}");
    let (wrote_tmp, message) = exec(&container, "echo x > /tmp/scratch && cat /tmp/scratch");
    assert!(wrote_tmp && message.trim() == "x", "{message}");
    assert_eq!(app.via_nginx("sealed", "/").await.unwrap().0, 200);
}

fn config_with_params(params: &str, allow_unsafe: bool) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let image = format!(
        "images:\n  risky:\n    image: previewd-demo:latest\n    port: 3000\n    pull: never\n    allow_unsafe: {allow_unsafe}\n    container_create_params: {params}\n"
    );
    let yaml = common::config_yaml(&unique_instance(), dir.path(), free_port(), &common::Options::default()).replacen(
        "images:\n",
        &image,
        1,
    );
    let config = Config::from_yaml(&yaml, dir.path()).expect("the config parses");
    (dir, config)
}

#[tokio::test]
async fn serve_refuses_an_image_whose_create_params_hand_it_the_host() {
    let params = "{HostConfig: {Privileged: true, Binds: [\"/var/run/docker.sock:/var/run/docker.sock\"]}}";
    let (_dir, config) = config_with_params(params, false);
    let Err(err) = Application::build(config).await else { panic!("an unsafe image must stop the start") };
    let message = format!("{err:#}");
    for needle in [
        "images.risky.container_create_params.HostConfig.Privileged",
        "images.risky.container_create_params.HostConfig.Binds: mounting /var/run/docker.sock",
        "unless images.risky.allow_unsafe: true",
    ] {
        assert!(message.contains(needle), "{needle:?} missing in {message}");
    }
}

#[tokio::test]
async fn serve_runs_an_unsafe_image_its_config_allows() {
    let (_dir, config) = config_with_params("{HostConfig: {PidMode: host}}", true);
    let application = Application::build(config).await.expect("allow_unsafe lets it start");
    application.shutdown_token().cancel();
    application.run_until_stopped().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_image_with_request_env_takes_only_the_listed_fields_as_variables() {
    let app = app_with(IMAGES).await;
    let fields = [("image_name", "strict"), ("container_name", "strict"), ("LD_PRELOAD", "/tmp/x.so")];
    let (status, message) = common::error_of(app.launch(&fields).await).await;
    assert_eq!(
        (status, message.as_str()),
        (
            400,
            "field `LD_PRELOAD` is not a variable image strict takes from requests; it takes TICKET (images.strict.request_env)"
        )
    );
    assert!(app.containers().is_empty());
    launched(&app, "strict", "strict").await;
    let fields = [("image_name", "strict"), ("container_name", "ticket"), ("TICKET", "T-42")];
    assert_eq!(app.launch(&fields).await.status(), 200);
    let (_, env) = app.via_nginx("ticket", "/cgi-bin/env").await.unwrap();
    assert!(env.contains("TICKET=T-42"), "{env}");
}
