//! `previewd doctor` against real setups: the real binary, Docker, an nginx started as a system
//! nginx would be, and the fake GitHub. A good setup passes with every line ok; each broken part
//! fails its own line with the fix.

mod common;

use std::path::{Path, PathBuf};

use common::github::FakeGitHub;
use common::system_nginx::SystemNginx;

const REPO: &str = "acme/web";
const TOKEN: &str = "ghp_doctor_token";
const BOT: &str = "previewd-bot";

/// What to break in a setup.
#[derive(Default)]
struct Broken {
    no_include: bool,
    small_hash_bucket: bool,
    missing_image: bool,
    /// An image with services: a present PostgreSQL whose seed volume does not exist, and a
    /// Redis image that may not be pulled and is missing.
    broken_services: bool,
    docker_host: Option<&'static str>,
    read_only_token: bool,
    /// `iptables` on the PATH fails as it does for a user who is not root.
    no_iptables: bool,
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    sites: PathBuf,
    docker_host: Option<&'static str>,
    /// A directory put first on the doctor's PATH.
    path_first: Option<PathBuf>,
    _nginx: SystemNginx,
    _github: FakeGitHub,
}

impl Setup {
    async fn new(broken: Broken) -> Self {
        common::require_demo_image();
        let dir = tempfile::tempdir().unwrap();
        let nginx_port = common::free_port();
        let nginx = SystemNginx::start_with(
            &dir.path().join("system-nginx"),
            nginx_port,
            !broken.no_include,
            !broken.small_hash_bucket,
        );
        let github = FakeGitHub::start().await;
        github.add_token(TOKEN, BOT);
        github.set_permission(REPO, BOT, if broken.read_only_token { "read" } else { "admin" });
        github.set_hooks(REPO, &[&format!("https://{}/webhooks/github", common::BASE_DOMAIN)]);
        std::fs::write(dir.path().join("webhook.secret"), "a webhook secret long enough\n").unwrap();
        std::fs::write(dir.path().join("github.token"), TOKEN).unwrap();
        let missing = match (broken.missing_image, broken.broken_services) {
            (true, _) => "  missing:\n    image: previewd-missing-image:none\n    port: 3000\n    pull: never\n",
            (_, true) => concat!(
                "  shop:\n    image: previewd-shop:demo\n    port: 5000\n    pull: never\n    services:\n",
                "      db: {image: previewd-postgres:15, pull: never, data: /var/lib/postgresql/data, seed_volume: previewd-doctor-no-such-seed}\n",
                "      cache: {image: previewd-missing-image:none, pull: never}\n",
            ),
            _ => "",
        };
        let yaml = format!(
            r#"instance: {instance}
listen: 127.0.0.1:{api_port}
base_domain: {base}
public_url: "http://{{host}}:{nginx_port}"
state_dir: {state}
nginx:
{unmanaged}  listen: 127.0.0.1:{nginx_port}
  template: {template}
images:
  demo:
    image: {demo}
    port: 3000
    pull: never
{missing}users:
  - name: operator
    password_hash: "{hash}"
github:
  api_url: {api}
  webhook_secret_file: webhook.secret
  token_file: github.token
  repos:
    {REPO}:
      image: demo
"#,
            instance = common::unique_instance(),
            api_port = common::free_port(),
            base = common::BASE_DOMAIN,
            state = dir.path().join("state").display(),
            unmanaged = nginx.unmanaged_yaml(),
            template = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera").display(),
            demo = common::DEMO_IMAGE,
            hash = previewd::auth::hash_password("a password").unwrap(),
            api = github.url,
        );
        let config = dir.path().join("config.yml");
        std::fs::write(&config, yaml).unwrap();
        let sites = nginx.sites_dir();
        let path_first = broken.no_iptables.then(|| failing_iptables(dir.path()));
        Self { _dir: dir, config, sites, docker_host: broken.docker_host, path_first, _nginx: nginx, _github: github }
    }

    /// Runs `previewd doctor --config <config>`: its exit status and report.
    async fn doctor(&self) -> Report {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_previewd"));
        command.arg("doctor").arg("--config").arg(&self.config).env_remove("PREVIEWD_CONFIG");
        if let Some(host) = self.docker_host {
            command.env("DOCKER_HOST", host);
        }
        if let Some(dir) = &self.path_first {
            command.env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default()));
        }
        let output = command.output().await.unwrap();
        Report {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

struct Report {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Report {
    /// The check lines as (level, name-and-message), without the summary.
    fn lines(&self) -> Vec<(&str, &str)> {
        self.stdout
            .lines()
            .filter(|line| !line.starts_with("doctor: "))
            .map(|line| (line.get(..4).unwrap_or(line).trim(), line.get(6..).unwrap_or_default()))
            .collect()
    }

    /// The level and message of the check named `name`.
    fn check(&self, name: &str) -> (&str, &str) {
        self.lines()
            .into_iter()
            .find_map(|(level, rest)| {
                let message = rest.strip_prefix(name)?;
                message.starts_with("  ").then(|| (level, message.trim_start()))
            })
            .unwrap_or_else(|| panic!("no `{name}` line in the report:\n{}{}", self.stdout, self.stderr))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.stdout, self.stderr)
    }
}

/// Free space under Docker's data root, read here independently of previewd.
fn docker_free_bytes() -> u64 {
    let output =
        std::process::Command::new("docker").args(["info", "--format", "{{.DockerRootDir}}"]).output().unwrap();
    let root = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let output = std::process::Command::new("df").args(["--output=avail", "-B1", &root]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_good_setup_with_every_line_ok() {
    let setup = Setup::new(Broken::default()).await;
    // What `previewd serve` does at start; the rules are the same for every instance.
    previewd::network::Firewall::new("pv-doctor", true).install().await.unwrap();
    let report = setup.doctor().await;
    assert!(report.success, "{report}");
    let names = [
        "config",
        "template",
        "docker",
        "disk",
        "firewall",
        "subnets",
        "image demo",
        "nginx",
        "nginx running",
        "nginx config",
        "nginx host names",
        "nginx served",
        "dns",
        "webhook secret",
        "github token",
        &format!("github {REPO}"),
        &format!("webhook {REPO}"),
        "api port",
        "nginx port",
    ];
    for name in names {
        let (level, message) = report.check(name);
        // The only line a good setup may not pass is the machine's own free disk space.
        if name == "disk" && level == "warn" {
            assert!(docker_free_bytes() < 5 << 30, "disk warned with room to spare: {message}");
            continue;
        }
        assert_eq!(level, "ok", "{name}: {message}\n{report}");
    }
    assert_eq!(report.lines().len(), names.len(), "{report}");
    assert!(report.check("nginx port").1.contains("held by nginx"), "{report}");
    assert_eq!(std::fs::read_dir(&setup.sites).unwrap().count(), 0, "the probe vhost is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_served_line_when_nginx_does_not_include_the_sites_dir() {
    let setup = Setup::new(Broken { no_include: true, ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    let (level, message) = report.check("nginx served");
    let sites = setup.sites.display();
    assert_eq!(level, "FAIL", "{report}");
    assert!(
        message
            .starts_with(&format!("nginx does not serve {sites}: add `include {sites}/*.conf;` to the http block of")),
        "{report}"
    );
    assert_eq!(report.check("nginx config").0, "ok", "{report}");
    assert_eq!(std::fs::read_dir(&setup.sites).unwrap().count(), 0, "the probe vhost is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_host_names_line_when_the_hash_bucket_is_too_small() {
    let setup = Setup::new(Broken { small_hash_bucket: true, ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    let (level, message) = report.check("nginx host names");
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.contains("add `server_names_hash_bucket_size 256;` to the http block"), "{report}");
    assert_eq!(std::fs::read_dir(&setup.sites).unwrap().count(), 0, "the probe vhost is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_image_line_of_a_missing_image_that_may_not_be_pulled() {
    let setup = Setup::new(Broken { missing_image: true, ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    let (level, message) = report.check("image missing");
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.contains("previewd-missing-image:none is not in Docker's image store"), "{report}");
    assert!(message.contains("set images.missing.pull: missing"), "{report}");
    assert_eq!(report.check("image demo").0, "ok", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_lines_of_a_missing_seed_volume_and_a_missing_service_image() {
    common::shop::require_images();
    let setup = Setup::new(Broken { broken_services: true, ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    assert_eq!(report.check("image shop/db").0, "ok", "{report}");
    let (level, message) = report.check("seed shop/db");
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.contains("the volume previewd-doctor-no-such-seed does not exist"), "{report}");
    let (level, message) = report.check("image shop/cache");
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.contains("set images.shop.services.cache.pull: missing"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_docker_line_when_docker_is_unreachable() {
    let socket = "unix:///nonexistent/previewd-doctor/docker.sock";
    let setup = Setup::new(Broken { docker_host: Some(socket), ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    let (level, message) = report.check("docker");
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.starts_with(&format!("cannot talk to Docker at {socket}")), "{report}");
    assert!(message.contains("start the engine"), "{report}");
    assert_eq!(report.check("nginx served").0, "ok", "the other checks still run:\n{report}");
}

/// A directory whose `iptables` fails the way it does for a user who is not root.
fn failing_iptables(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("iptables");
    std::fs::write(&script, "#!/bin/sh\necho 'iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)' >&2\nexit 4\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_firewall_line_when_iptables_cannot_be_run() {
    let setup = Setup::new(Broken { no_iptables: true, ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    let (level, message) = report.check("firewall");
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.contains("Permission denied (you must be root)"), "{report}");
    assert!(message.contains("network.isolation: false"), "the fix is named: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_the_repository_line_when_the_token_may_not_write() {
    let setup = Setup::new(Broken { read_only_token: true, ..Broken::default() }).await;
    let report = setup.doctor().await;
    assert!(!report.success, "{report}");
    assert_eq!(report.check("github token").0, "ok", "{report}");
    let (level, message) = report.check(&format!("github {REPO}"));
    assert_eq!(level, "FAIL", "{report}");
    assert!(message.starts_with(&format!("the token may not write to {REPO} (read access only)")), "{report}");
    // A token without admin may not read the webhooks: a warning, not a failure.
    assert_eq!(report.check(&format!("webhook {REPO}")).0, "warn", "{report}");
}
