//! Test harness: one real previewd `Application` per test, with its own instance name, temp
//! state dir, managed nginx on a free loopback port, and cleanup by container label on drop.

#![allow(dead_code)]

pub mod github;
pub mod github_app;
pub mod shop;
pub mod system_nginx;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use previewd::app::Application;
use previewd::config::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const USER: &str = "testuser";
pub const PASSWORD: &str = "testpassword";
pub const DEMO_IMAGE: &str = "previewd-demo:latest";
pub const BASE_DOMAIN: &str = "preview.localhost";

/// A hash of PASSWORD, made once per test binary.
pub fn password_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| previewd::auth::hash_password(PASSWORD).expect("hash"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn unique_instance() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

/// The demo image is built by scripts/setup.sh; without it these tests cannot mean anything.
pub fn require_demo_image() {
    let status = Command::new("docker").args(["image", "inspect", DEMO_IMAGE]).output().expect("run docker");
    assert!(status.status.success(), "{DEMO_IMAGE} is missing: run scripts/setup.sh first");
}

/// The repo's template, or a custom one written into the test's dir.
pub enum Template {
    Shipped,
    Custom(String),
}

pub struct Options {
    pub template: Template,
    pub health_timeout_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self { template: Template::Shipped, health_timeout_secs: 20 }
    }
}

/// The config text of a test instance; images cover the good and the failing cases.
pub fn config_yaml(instance: &str, dir: &Path, nginx_port: u16, options: &Options) -> String {
    let template = match &options.template {
        Template::Shipped => Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera"),
        Template::Custom(text) => {
            let path = dir.join("vhost.conf.tera");
            std::fs::write(&path, text).unwrap();
            path
        }
    };
    let timeout = options.health_timeout_secs;
    format!(
        r#"instance: {instance}
listen: 127.0.0.1:0
base_domain: {BASE_DOMAIN}
public_url: "http://{{host}}:{nginx_port}"
state_dir: {state}
nginx:
  managed: true
  listen: 127.0.0.1:{nginx_port}
  template: {template}
images:
  demo:
    image: {DEMO_IMAGE}
    port: 3000
    command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www]
    env: {{GREETING: hello, OVERRIDE_ME: image}}
    pull: never
    memory: 64m
    cpus: 0.5
    pids: 256
    health_timeout: {timeout}
    container_create_params: {{Hostname: preview-box, HostConfig: {{ShmSize: 8388608}}, Labels: {{team: web}}}}
  chatty:
    image: {DEMO_IMAGE}
    port: 3000
    command: [/bin/busybox, sh, -c, "echo hello from the log; exec /bin/busybox httpd -f -p 3000 -h /www"]
    pull: never
  slowcgi:
    image: {DEMO_IMAGE}
    port: 3000
    command: [/bin/busybox, sh, -c, "printf '%s\\n' '#!/bin/busybox sh' 'sleep 2' 'echo Content-Type: text/plain' echo 'echo slow done' > /www/cgi-bin/slow && chmod 755 /www/cgi-bin/slow && exec /bin/busybox httpd -f -p 3000 -h /www"]
    pull: never
  crash:
    image: {DEMO_IMAGE}
    port: 3000
    command: [/bin/busybox, sh, -c, "echo starting up; echo config file missing >&2; exit 3"]
    pull: never
    health_timeout: {timeout}
  late:
    image: {DEMO_IMAGE}
    port: 3000
    command: [/bin/busybox, sh, -c, "/bin/busybox sleep 1; exec /bin/busybox httpd -f -p 3000 -h /www"]
    pull: never
  silent:
    image: {DEMO_IMAGE}
    port: 3000
    command: [/bin/busybox, sh, -c, "echo waiting forever; exec /bin/busybox sleep 600"]
    pull: never
    health_timeout: 2
  missing:
    image: previewd-missing-image:none
    port: 3000
    pull: never
  unpullable:
    image: registry.invalid/previewd/none:1
    port: 3000
    pull: missing
users:
  - name: {USER}
    password_hash: "{hash}"
"#,
        state = dir.join("state").display(),
        template = template.display(),
        hash = password_hash(),
    )
}

/// Runs the client binary (`previewd ARGS`) against the app, with a home of its own; with
/// `credentials`, as the test user.
pub async fn run_client(
    app: &TestApp,
    home: &std::path::Path,
    args: &[&str],
    credentials: bool,
    stdin: Option<&str>,
) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_previewd"));
    command.args(args).env("HOME", home).env_remove("XDG_CONFIG_HOME").env_remove("PREVIEWD_GITHUB_TOKEN");
    command.env("PREVIEWD_SERVER", format!("http://{}", app.api));
    if credentials {
        command.env("PREVIEWD_USER", USER).env("PREVIEWD_PASSWORD", PASSWORD);
    } else {
        command.env_remove("PREVIEWD_USER").env_remove("PREVIEWD_PASSWORD");
    }
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("run previewd");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        child.stdin.take().unwrap().write_all(input.as_bytes()).await.unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().await.unwrap()
}

/// A config text with more `images` entries (YAML lines that go under `images:`).
pub fn with_images(yaml: &str, entries: &str) -> String {
    yaml.replacen("\nimages:", &format!("\nimages:{entries}"), 1)
}

/// A running previewd plus what a test needs to talk to it.
pub struct TestApp {
    pub instance: String,
    pub dir: tempfile::TempDir,
    pub nginx_port: u16,
    pub api: SocketAddr,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: Option<JoinHandle<anyhow::Result<()>>>,
    pub lifecycle: Option<previewd::lifecycle::Lifecycle>,
    pub options_yaml: String,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let instance = unique_instance();
        let nginx_port = free_port();
        let yaml = config_yaml(&instance, dir.path(), nginx_port, &options);
        Self::start_from(dir, instance, nginx_port, yaml).await
    }

    /// Starts from config text made by the test (see `config_yaml`).
    pub async fn start_from(dir: tempfile::TempDir, instance: String, nginx_port: u16, yaml: String) -> Self {
        require_demo_image();
        let mut app = Self {
            instance,
            dir,
            nginx_port,
            api: "127.0.0.1:0".parse().unwrap(),
            client: client(),
            shutdown: CancellationToken::new(),
            server: None,
            lifecycle: None,
            options_yaml: yaml,
        };
        app.boot_on_a_free_port().await;
        app
    }

    /// `boot`, again on another nginx port when the one `free_port` gave was taken before nginx
    /// bound it (another test's container or nginx got it first: a race of the harness).
    async fn boot_on_a_free_port(&mut self) {
        for _ in 1..3 {
            let config = Config::from_yaml(&self.options_yaml, self.dir.path()).expect("test config is valid");
            match Application::build(config).await {
                Ok(application) => {
                    self.run(application);
                    return;
                }
                Err(err) if previewd::error_chain(&*err).contains("Address already in use") => {
                    let port = free_port();
                    self.options_yaml =
                        self.options_yaml.replace(&format!(":{}", self.nginx_port), &format!(":{port}"));
                    self.nginx_port = port;
                }
                Err(err) => panic!("application starts: {err:?}"),
            }
        }
        self.boot().await;
    }

    /// Builds and runs the Application from this test's config (again, after a `stop`).
    pub async fn boot(&mut self) -> previewd::lifecycle::ReconcileReport {
        let config = Config::from_yaml(&self.options_yaml, self.dir.path()).expect("test config is valid");
        let application = Application::build(config).await.expect("application starts");
        self.run(application)
    }

    /// Serves a built application in the background; its start-up reconcile's report.
    fn run(&mut self, application: Application) -> previewd::lifecycle::ReconcileReport {
        self.api = application.address();
        self.shutdown = application.shutdown_token();
        self.lifecycle = Some(application.lifecycle().clone());
        let report = application.reconcile_report().clone();
        self.server = Some(tokio::spawn(application.run_until_stopped()));
        report
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("clean shutdown");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn host(&self, name: &str) -> String {
        format!("{name}.{BASE_DOMAIN}")
    }

    pub fn sites_dir(&self) -> PathBuf {
        self.dir.path().join("state/nginx/sites")
    }

    pub fn vhost_path(&self, slug: &str) -> PathBuf {
        self.sites_dir().join(format!("previewd.{}.{slug}.conf", self.instance))
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.path().join("state/nginx/error.log")
    }

    /// Reloads previewd counted.
    pub fn reloads(&self) -> u64 {
        self.lifecycle.as_ref().map_or(0, |l| l.router().reloads())
    }

    /// Reloads as the nginx master logged them: independent of previewd's own counter.
    pub fn nginx_reloads_logged(&self) -> usize {
        std::fs::read_to_string(self.error_log()).unwrap_or_default().matches("(SIGHUP) received").count()
    }

    pub async fn launch(&self, fields: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(self.url("/launch"))
            .basic_auth(USER, Some(PASSWORD))
            .form(fields)
            .send()
            .await
            .expect("launch request")
    }

    pub async fn launch_json(&self, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url("/launch"))
            .basic_auth(USER, Some(PASSWORD))
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await
            .expect("launch request")
    }

    pub async fn kill(&self, name: &str) -> reqwest::Response {
        self.client
            .post(self.url("/kill"))
            .basic_auth(USER, Some(PASSWORD))
            .form(&[("container_name", name)])
            .send()
            .await
            .expect("kill request")
    }

    /// An authenticated GET of the API, read as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.client.get(self.url(path)).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// GET through nginx with the preview's Host, on a fresh connection.
    pub async fn via_nginx(&self, name: &str, path: &str) -> Result<(u16, String), reqwest::Error> {
        let host = self.host(name);
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .resolve(&host, ([127, 0, 0, 1], self.nginx_port).into())
            .build()
            .unwrap();
        let response = client.get(format!("http://{host}:{}{path}", self.nginx_port)).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// The containers of this instance, as `docker ps -a` sees them (id, name, state).
    pub fn containers(&self) -> Vec<String> {
        docker_ps(&format!("label=previewd.instance={}", self.instance))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let ids = self.containers();
        if !ids.is_empty() {
            let mut args = vec!["rm".to_owned(), "-f".to_owned()];
            args.extend(ids.iter().map(|line| line.split(' ').next().unwrap_or_default().to_owned()));
            Command::new("docker").args(&args).output().ok();
        }
        remove_volumes(&self.instance);
        remove_networks(&self.instance);
        remove_built_images(&self.instance);
        stop_nginx(&self.dir.path().join("state/nginx/nginx.pid"));
    }
}

/// The images previewd built for an instance (`docker images`: `repository:tag` lines), by
/// their repository tags (a reuse tag, `…/reuse/<name>:<key>`, is left out).
pub fn built_images(instance: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "label=previewd.built=true"])
        .args(["--filter", &format!("label=previewd.instance={instance}")])
        .output()
        .expect("docker images");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.contains("/reuse/"))
        .map(str::to_owned)
        .collect()
}

/// Whether the engine has an image (by id or reference).
pub fn image_exists(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .expect("docker image inspect")
        .status
        .success()
}

/// What a docker command prints, trimmed.
pub fn docker_output(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The dangling image a build step whose command contains `marker` made, if there is one.
pub fn image_of_step(marker: &str) -> Option<String> {
    let ids = docker_output(&["images", "-a", "-q", "--no-trunc", "--filter", "dangling=true"]);
    let mut args = vec!["image", "inspect", "--format", "{{.Id}} {{json .ContainerConfig.Cmd}}"];
    args.extend(ids.split_whitespace());
    let described = docker_output(&args);
    described.lines().find(|line| line.contains(marker)).and_then(|line| line.split(' ').next()).map(str::to_owned)
}

pub fn remove_built_images(instance: &str) {
    let output = Command::new("docker")
        .args(["images", "-q", "--filter", "label=previewd.built=true"])
        .args(["--filter", &format!("label=previewd.instance={instance}")])
        .output()
        .expect("docker images");
    let mut ids: Vec<String> = String::from_utf8_lossy(&output.stdout).split_whitespace().map(str::to_owned).collect();
    if !ids.is_empty() {
        // With each, the build's own image it names (the layer cache previewd removes with it).
        let mut args = vec!["image", "inspect", "--format", "{{index .Config.Labels \"previewd.cache\"}}"];
        args.extend(ids.iter().map(String::as_str));
        let caches = docker_output(&args);
        ids.extend(caches.split_whitespace().filter(|id| id.starts_with("sha256:")).map(str::to_owned));
        Command::new("docker").args(["rmi", "-f"]).args(&ids).output().ok();
    }
}

/// The names of an instance's Docker volumes (services' data), sorted.
pub fn volumes(instance: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["volume", "ls", "--filter", &format!("label=previewd.instance={instance}"), "--format", "{{.Name}}"])
        .output()
        .expect("docker volume ls");
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
    names.sort();
    names
}

/// Removes an instance's volumes (its containers must be gone first).
pub fn remove_volumes(instance: &str) {
    let names = volumes(instance);
    if !names.is_empty() {
        Command::new("docker").arg("volume").arg("rm").arg("-f").args(&names).output().ok();
    }
}

/// The names of an instance's Docker networks, sorted.
pub fn networks(instance: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["network", "ls", "--filter", &format!("label=previewd.instance={instance}"), "--format", "{{.Name}}"])
        .output()
        .expect("docker network ls");
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
    names.sort();
    names
}

/// Removes an instance's networks (its containers must be gone first) and its own firewall rule
/// (`network.egress: false`). A warm network the instance was still creating as its test ended
/// appears later: a thread looks again once Docker has finished it.
pub fn remove_networks(instance: &str) {
    remove_networks_now(instance);
    remove_egress_rules(instance);
    let instance = instance.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(3));
        remove_networks_now(&instance);
    });
}

fn remove_networks_now(instance: &str) {
    let names = networks(instance);
    if !names.is_empty() {
        Command::new("docker").arg("network").arg("rm").args(&names).output().ok();
    }
}

fn remove_egress_rules(instance: &str) {
    let Ok(instance) = previewd::preview::InstanceName::parse(instance) else { return };
    let own = format!("-i {}+ ", previewd::network::bridge_prefix(&instance));
    for program in ["iptables", "ip6tables"] {
        let Ok(output) = Command::new(program).args(["-w", "-S"]).output() else { continue };
        for rule in String::from_utf8_lossy(&output.stdout).lines().filter(|rule| rule.contains(&own)) {
            let args: Vec<&str> = rule.split(' ').collect();
            if let Some(("-A", spec)) = args.split_first().map(|(first, rest)| (*first, rest)) {
                Command::new(program).arg("-w").arg("-D").args(spec).output().ok();
            }
        }
    }
}

/// `docker ps -a` lines "id name state" for a filter.
pub fn docker_ps(filter: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["ps", "-a", "--filter", filter, "--format", "{{.ID}} {{.Names}} {{.State}}"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

/// Stops an nginx left running by a test that failed before its graceful stop: the master
/// named by the pid file, and any other master of the same prefix (one the app's watchdog may
/// have started while the test ended).
pub fn stop_nginx(pid_file: &Path) {
    let mut pids: Vec<String> =
        std::fs::read_to_string(pid_file).map(|pid| vec![pid.trim().to_owned()]).unwrap_or_default();
    if let Some(prefix) = pid_file.parent() {
        let needle = format!("nginx: master process nginx -p {} ", prefix.display());
        let processes = std::fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok);
        for process in processes {
            let cmdline = std::fs::read(process.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).replace('\0', " ").starts_with(&needle) {
                pids.push(process.file_name().to_string_lossy().into_owned());
            }
        }
    }
    if !pids.is_empty() {
        Command::new("kill").arg("-QUIT").args(&pids).output().ok();
    }
}

/// A client for the API. Its idle connections go before the API's `http.header_timeout` (10 s)
/// closes them: a request sent on a connection the server is closing fails with an incomplete
/// message, a race of the test, not of previewd.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

pub async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("errors are JSON");
    (status, body["error"].as_str().expect("an error field").to_owned())
}

/// The real `previewd serve` binary as a child process; killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    log: std::path::PathBuf,
}

impl Daemon {
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_previewd"))
            .args(["serve", "--log-format", "json", "--config"])
            .arg(config)
            // The documented default level, whatever the test's environment says.
            .env_remove("RUST_LOG")
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log: log.to_owned() }
    }

    /// Waits until `/healthz` answers 200. Fails at once if previewd exits, and after a minute
    /// otherwise, with the end of its log either way: a failed start must say why.
    pub async fn wait_until_healthy(&mut self, client: &reqwest::Client, api: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = client.get(format!("{api}/healthz")).send().await
                && response.status() == 200
            {
                return;
            }
            let exited = self.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() >= deadline {
                let why = exited
                    .map_or_else(|| "still not healthy after 60 s".to_owned(), |status| format!("it exited: {status}"));
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("previewd did not become healthy at {api} ({why}); the end of its log:\n{}", tail.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "previewd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Removes the test's containers and nginx whatever happened.
pub struct Cleanup {
    pub instance: String,
    pub pid_file: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for line in docker_ps(&format!("label=previewd.instance={}", self.instance)) {
            let id = line.split(' ').next().unwrap_or_default().to_owned();
            Command::new("docker").args(["rm", "-f", &id]).output().ok();
        }
        remove_volumes(&self.instance);
        remove_networks(&self.instance);
        stop_nginx(&self.pid_file);
    }
}

/// A config file for running the real binary: its own instance, nginx port and API port.
pub struct BinaryConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub instance: String,
    pub nginx_port: u16,
    pub api: String,
}

impl BinaryConfig {
    pub fn new() -> Self {
        Self::with_images("")
    }

    /// With more `images` entries (see [`with_images`]).
    pub fn with_images(entries: &str) -> Self {
        require_demo_image();
        let dir = tempfile::tempdir().unwrap();
        let instance = unique_instance();
        let nginx_port = free_port();
        let api_port = free_port();
        let yaml = config_yaml(&instance, dir.path(), nginx_port, &Options::default())
            .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{api_port}"));
        let yaml = with_images(&yaml, entries);
        let path = dir.path().join("config.yml");
        std::fs::write(&path, yaml).unwrap();
        Self { dir, path, instance, nginx_port, api: format!("http://127.0.0.1:{api_port}") }
    }

    /// Removes this config's containers and nginx when dropped.
    pub fn cleanup(&self) -> Cleanup {
        Cleanup { instance: self.instance.clone(), pid_file: self.dir.path().join("state/nginx/nginx.pid") }
    }
}
