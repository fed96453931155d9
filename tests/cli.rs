//! The real `previewd` binary: check-config, hash-password, and serve with SIGTERM and restart.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, PASSWORD, USER};

const BIN: &str = env!("CARGO_BIN_EXE_previewd");

#[test]
fn check_config_accepts_the_shipped_config() {
    let output = Command::new(BIN).args(["check-config", "--config", "config.yml"]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("OK (instance default, 2 image(s), 1 user(s), previews at *.preview.localhost)"),
        "{stdout}"
    );
}

#[test]
fn check_config_lists_every_problem_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yml");
    std::fs::write(
        &path,
        "base_domain: \"not a domain\"\nlisten: nowhere\nimages:\n  demo:\n    image: x\n    port: 99999\nusers: []\n",
    )
    .unwrap();
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display();
    assert!(stderr.contains(&format!("{file}:1:14: base_domain: \"not a domain\" is not a domain name")), "{stderr}");
    assert!(stderr.contains(&format!("{file}: listen: invalid socket address syntax")), "{stderr}");
    assert!(stderr.contains(&format!("{file}: images.demo.port: invalid value: integer `99999`")), "{stderr}");
    assert!(stderr.contains(&format!("{file}: users: no user can call the API")), "{stderr}");
    assert!(stderr.contains("4 problems"), "{stderr}");
}

#[test]
fn the_config_path_comes_from_previewd_config_when_not_given() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yml");
    let elsewhere = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .arg("check-config")
        .env("PREVIEWD_CONFIG", &shipped)
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let missing = Command::new(BIN)
        .arg("check-config")
        .env_remove("PREVIEWD_CONFIG")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("config.yml: cannot read the file"), "{missing:?}");
}

#[test]
fn check_config_reports_a_broken_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.tera"), "server { {{ nope }} }").unwrap();
    let text = std::fs::read_to_string("config.yml").unwrap().replace("templates/vhost.conf.tera", "bad.tera");
    let path = dir.path().join("config.yml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nginx.template"), "{output:?}");
}

/// The shipped config in a temp dir, with `lines` added to the demo image.
fn shipped_config_with(lines: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string("config.yml").unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = shipped
        .replace("templates/vhost.conf.tera", &root.join("templates/vhost.conf.tera").display().to_string())
        .replacen("    port: 3000\n", &format!("    port: 3000\n{lines}"), 1);
    let path = dir.path().join("config.yml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn check_config_warns_about_create_params_that_hand_a_preview_the_host() {
    let (_dir, path) = shipped_config_with("    container_create_params: {HostConfig: {NetworkMode: host}}\n");
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "a warning is not an error: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: warning: images.demo.container_create_params.HostConfig.NetworkMode: sharing the host's namespace",
            path.display()
        )) && stderr.contains("serve refuses it unless images.demo.allow_unsafe: true"),
        "{stderr}"
    );
}

#[test]
fn check_config_warns_about_a_seed_volume_docker_does_not_have() {
    let (_dir, path) = shipped_config_with(
        "    services:\n      db: {image: previewd-postgres:15, data: /data, seed_volume: previewd-cli-no-such-seed}\n",
    );
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "a warning at check time, an error at launch: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "warning: images.demo.services.db.seed_volume: the volume previewd-cli-no-such-seed does not exist"
        ),
        "{stderr}"
    );
}

#[test]
fn hash_password_prints_an_argon2id_hash_of_stdin() {
    let mut child =
        Command::new(BIN).arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"s3cret\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(previewd::auth::check_phc_hash(hash.trim()).is_ok());

    let empty = Command::new(BIN).arg("hash-password").stdin(Stdio::null()).output().unwrap();
    assert_eq!(empty.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_by_reason_and_kept_out_of_the_info_log() {
    let setup = common::BinaryConfig::new();
    let _cleanup = setup.cleanup();
    let log = setup.dir.path().join("refusals.log");
    let client = common::client();
    let mut daemon = Daemon::start(&setup.path, &log);
    daemon.wait_until_healthy(&client, &setup.api).await;
    for _ in 0..8 {
        let refused = client
            .post(format!("{}/launch", setup.api))
            .basic_auth(USER, Some("wrong"))
            .form(&[("image_name", "demo"), ("container_name", "x")])
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
    }
    let bad = client
        .post(format!("{}/launch", setup.api))
        .basic_auth(USER, Some(PASSWORD))
        .form(&[("container_name", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let metrics = client.get(format!("{}/metrics", setup.api)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("previewd_refused_requests_total{reason=\"unauthenticated\"} 8"), "{metrics}");
    assert!(metrics.contains("previewd_refused_requests_total{reason=\"invalid_request\"} 1"), "{metrics}");
    assert!(daemon.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"level\":\"INFO\""), "the log is at info: {text}");
    assert!(!text.contains("request refused"), "refusals are logged at debug only: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_nginx_but_leaves_previews_and_a_restart_serves_them_again() {
    let setup = common::BinaryConfig::new();
    let _cleanup = setup.cleanup();
    let (dir, config, instance, nginx_port, api) =
        (&setup.dir, &setup.path, &setup.instance, setup.nginx_port, setup.api.clone());
    let client = common::client();

    let mut daemon = Daemon::start(config, &dir.path().join("first.log"));
    daemon.wait_until_healthy(&client, &api).await;
    let response = client
        .post(format!("{api}/launch"))
        .basic_auth(USER, Some(PASSWORD))
        .form(&[("image_name", "demo"), ("container_name", "keep me")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let url = response.text().await.unwrap();
    assert_eq!(url, format!("http://keep-me.preview.localhost:{nginx_port}\n"));

    // SIGTERM while a launch is in flight: it finishes, then previewd stops.
    let in_flight = {
        let (client, api) = (client.clone(), api.clone());
        tokio::spawn(async move {
            client
                .post(format!("{api}/launch"))
                .basic_auth(USER, Some(PASSWORD))
                .form(&[("image_name", "demo"), ("container_name", "in flight")])
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tokio::task::block_in_place(|| daemon.terminate()).success());
    let response = in_flight.await.unwrap().expect("the in-flight launch is answered");
    assert_eq!(response.status(), 200, "the in-flight launch completes before shutdown");
    let log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(log.lines().all(|line| line.starts_with('{')), "--log-format json logs JSON lines:\n{log}");
    assert!(
        log.lines().any(|line| line.contains("preview ready") && line.contains("\"slug\":\"keep-me\"")),
        "a launch's log lines carry its preview's name:\n{log}"
    );
    assert!(!log.contains(PASSWORD), "no secret in the log");
    let pid = std::fs::read_to_string(dir.path().join("state/nginx/nginx.pid")).unwrap_or_default();
    assert!(
        std::fs::read_to_string(format!("/proc/{}/cmdline", pid.trim())).map_or(true, |c| !c.starts_with("nginx")),
        "the managed nginx is stopped with previewd"
    );
    let running = common::docker_ps(&format!("label=previewd.instance={instance}"));
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(running.iter().all(|c| c.ends_with("running")), "previews keep running: {running:?}");

    let mut daemon = Daemon::start(config, &dir.path().join("second.log"));
    daemon.wait_until_healthy(&client, &api).await;
    for name in ["keep-me", "in-flight"] {
        let host = format!("{name}.preview.localhost");
        let nginx =
            reqwest::Client::builder().no_proxy().resolve(&host, ([127, 0, 0, 1], nginx_port).into()).build().unwrap();
        let page = nginx.get(format!("http://{host}:{nginx_port}/")).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains(&format!("Preview: {name}")));
    }
}
