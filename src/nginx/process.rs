//! Driving the nginx process: `nginx -t`, reloads that wait until every new connection gets the
//! new configuration, and, in managed mode, the main `nginx.conf`, start and stop of previewd's
//! own nginx.
//!
//! A reload is asynchronous: `nginx -s reload` returns before the master has started new workers,
//! and until the old workers get their QUIT they keep accepting connections with the old config.
//! So a reload is only done once every pre-reload worker has exited or retitled itself "worker
//! process is shutting down" (nginx does that just before closing its listening sockets) and a
//! new worker runs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::process::Command;

use crate::config::NginxConfig;

const WORKER_TITLE: &str = "nginx: worker process";
const MASTER_TITLE_PREFIX: &str = "nginx: master process";
/// How long one nginx command (test, reload signal, start) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The managed nginx is the `nginx` found on PATH.
const NGINX_PROGRAM: &str = "nginx";
/// A graceful stop waits for open connections; after this, open connections are cut.
const GRACEFUL_STOP: Duration = Duration::from_secs(10);
const FAST_STOP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum NginxError {
    #[error("nginx rejected the configuration: {0}")]
    TestFailed(String),
    #[error(
        "nginx rejected the new configuration, so the previous vhost files were restored and nginx keeps serving them: {0}"
    )]
    RolledBack(String),
    #[error("cannot run `{command}`: {message}")]
    Command { command: String, message: String },
    #[error("{}", not_running_message(pid_file, *managed))]
    NotRunning { pid_file: PathBuf, managed: bool },
    #[error("cannot write nginx files at {path}: {message}")]
    Io { path: PathBuf, message: String },
    /// The route is written and nginx reloaded, but a request to nginx does not reach the
    /// preview; the message says why and what to change.
    #[error("{0}")]
    NotServed(String),
    #[error("cannot render the vhost template: {0}")]
    Template(String),
    #[error("nginx did not {0} within {1:?}; see its error log")]
    Timeout(&'static str, Duration),
    #[error("previewd is shutting down and no longer changes routes")]
    Stopped,
}

fn not_running_message(pid_file: &Path, managed: bool) -> String {
    let pid_file = pid_file.display();
    if managed {
        format!(
            "previewd's nginx is not running (no live nginx master in {pid_file}); previewd starts it again within seconds"
        )
    } else {
        format!(
            "nginx is not running: no live nginx master in {pid_file} (nginx.pid_file): start nginx \
             (systemctl start nginx), or set nginx.pid_file to the pid file nginx.conf names"
        )
    }
}

/// Paths of previewd's own nginx, all under `<state_dir>/nginx`.
struct Managed {
    prefix: PathBuf,
    conf: PathBuf,
    error_log: PathBuf,
}

pub struct Nginx {
    config: NginxConfig,
    managed: Option<Managed>,
    /// previewd's status listener (see `crate::wake`): the managed nginx's default server passes
    /// the hosts it has no vhost for there. `None`: it answers 404 itself.
    status_port: Option<u16>,
}

impl Nginx {
    pub fn new(config: NginxConfig, state_dir: &Path) -> Self {
        let managed = config.managed.then(|| {
            let prefix = state_dir.join("nginx");
            Managed { conf: prefix.join("nginx.conf"), error_log: prefix.join("error.log"), prefix }
        });
        Self { config, managed, status_port: None }
    }

    /// Hosts without a vhost go to previewd's status listener on this port (managed mode).
    pub fn with_status_port(mut self, port: u16) -> Self {
        self.status_port = Some(port);
        self
    }

    pub fn is_managed(&self) -> bool {
        self.managed.is_some()
    }

    /// `nginx -t` on the whole configuration, vhosts included.
    pub async fn test(&self) -> Result<(), NginxError> {
        self.run(&self.config.test_command).await.map_err(|err| match err {
            NginxError::Command { message, .. } if message.contains("server_names_hash_bucket_size") => {
                NginxError::NotServed(format!(
                    "nginx cannot hold the preview's host name: {message}; add `server_names_hash_bucket_size 256;` \
                     to the http block of nginx.conf (preview host names are up to 253 characters)"
                ))
            }
            NginxError::Command { message, .. } => NginxError::TestFailed(message),
            other => other,
        })
    }

    /// Reloads and returns once only new workers accept connections, with the old workers,
    /// which may still be finishing requests they accepted before.
    ///
    /// Without a `reload_command`, previewd sends the master SIGHUP itself: that is all `nginx -s
    /// reload` does, after parsing the whole configuration first. `nginx -t` has just parsed it
    /// and the master parses it again, so the third parse only made each reload slower (~45 ms
    /// at 500 vhosts).
    pub async fn reload(&self) -> Result<Drain, NginxError> {
        let master = self.master_pid().ok_or_else(|| self.not_running())?;
        let old_workers: HashSet<u32> = workers(master).into_iter().collect();
        match &self.config.reload_command {
            Some(argv) => self.run(argv).await?,
            None => signal(master, Signal::HUP)?,
        }
        let deadline = Instant::now() + self.config.reload_timeout;
        loop {
            let old_still_accepting = old_workers.iter().any(|pid| title(*pid).as_deref() == Some(WORKER_TITLE));
            let new_running = workers(master).iter().any(|pid| !old_workers.contains(pid));
            if !old_still_accepting && new_running {
                return Ok(Drain { workers: old_workers.into_iter().collect() });
            }
            if Instant::now() >= deadline {
                return Err(NginxError::Timeout("switch to the new configuration", self.config.reload_timeout));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The error for a pid file that names no live master: it names the file and the key.
    pub fn not_running(&self) -> NginxError {
        NginxError::NotRunning { pid_file: self.config.pid_file.clone(), managed: self.config.managed }
    }

    /// The pid of the live nginx master named by the pid file, if any.
    pub fn master_pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(&self.config.pid_file).ok()?.trim().parse().ok()?;
        title(pid).filter(|t| t.starts_with(MASTER_TITLE_PREFIX)).map(|_| pid)
    }

    /// Managed mode: writes the main config and starts nginx, or adopts and reloads the one a
    /// previous previewd left running (previews stay reachable across a previewd restart).
    pub async fn start_managed(&self, sites_dir: &Path) -> Result<(), NginxError> {
        let Some(managed) = &self.managed else { return Ok(()) };
        let tmp = managed.prefix.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|err| io_error(&tmp, err))?;
        let conf = main_conf(self.config.listen, sites_dir, managed, &self.config.pid_file, self.status_port);
        super::sites::write_atomic(&managed.conf, conf.as_bytes()).map_err(|err| io_error(&managed.conf, err))?;
        self.test().await?;
        if self.master_pid().is_some() {
            tracing::info!("adopting the managed nginx left running by a previous previewd");
            return self.reload().await.map(drop);
        }
        self.run(&[NGINX_PROGRAM.into()]).await?;
        let started = |nginx: &Self| nginx.master_pid().is_some_and(|pid| !workers(pid).is_empty());
        self.wait_for("start", COMMAND_TIMEOUT, started).await
    }

    /// Managed mode: graceful stop (`nginx -s quit`, open connections may finish), then a fast
    /// one if that takes too long; returns once the master has exited.
    pub async fn stop_managed(&self) -> Result<(), NginxError> {
        if self.managed.is_none() || self.master_pid().is_none() {
            return Ok(());
        }
        let stopped = |nginx: &Self| nginx.master_pid().is_none();
        self.run(&[NGINX_PROGRAM.into(), "-s".into(), "quit".into()]).await?;
        if self.wait_for("stop gracefully", GRACEFUL_STOP, stopped).await.is_ok() {
            return Ok(());
        }
        tracing::warn!("nginx did not stop gracefully in {GRACEFUL_STOP:?}; stopping it now");
        self.run(&[NGINX_PROGRAM.into(), "-s".into(), "stop".into()]).await?;
        self.wait_for("stop", FAST_STOP, stopped).await
    }

    async fn wait_for(
        &self,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), NginxError> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() >= deadline {
                return Err(NginxError::Timeout(what, timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// `nginx -T`: the whole configuration as nginx reads it, each file under a
    /// `# configuration file <path>:` line. The test command with `-t` turned into `-T`.
    pub async fn dump(&self) -> Result<String, NginxError> {
        let argv: Vec<String> = self
            .config
            .test_command
            .iter()
            .map(|arg| if arg == "-t" { "-T".to_owned() } else { arg.clone() })
            .collect();
        if !argv.iter().any(|arg| arg == "-T") {
            return Err(NginxError::Command {
                command: argv.join(" "),
                message: "nginx.test_command has no -t to turn into -T".to_owned(),
            });
        }
        self.output(&argv).await
    }

    /// Runs an nginx command line; in managed mode it is pointed at previewd's own nginx.
    async fn run(&self, argv: &[String]) -> Result<(), NginxError> {
        self.output(argv).await.map(drop)
    }

    /// Runs an nginx command line and returns what it printed on stdout.
    async fn output(&self, argv: &[String]) -> Result<String, NginxError> {
        let mut args: Vec<String> = argv[1..].to_vec();
        if let Some(managed) = &self.managed {
            for (flag, path) in [("-p", &managed.prefix), ("-c", &managed.conf), ("-e", &managed.error_log)] {
                args.push(flag.to_owned());
                args.push(path.display().to_string());
            }
        }
        let command_line =
            std::iter::once(argv[0].as_str()).chain(args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ");
        let failure = |message: String| NginxError::Command { command: command_line.clone(), message };
        let child = Command::new(&argv[0])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child)
            .await
            .map_err(|_| failure(format!("no answer within {COMMAND_TIMEOUT:?}")))?
            .map_err(|err| failure(err.to_string()))?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        match (output.status.success(), stderr.is_empty()) {
            (true, _) => Ok(String::from_utf8_lossy(&output.stdout).into_owned()),
            (false, false) => Err(failure(stderr)),
            (false, true) => Err(failure(format!("it {} and printed nothing", output.status))),
        }
    }
}

fn io_error(path: &Path, err: std::io::Error) -> NginxError {
    NginxError::Io { path: path.to_owned(), message: err.to_string() }
}

/// The main config of the managed nginx: a default server for hosts without a vhost (passed to
/// previewd's status listener, which explains a preview being built, failed or removed, or an
/// unknown name; without one, a plain 404), and the vhosts of the sites dir.
fn main_conf(
    listen: std::net::SocketAddr,
    sites_dir: &Path,
    managed: &Managed,
    pid_file: &Path,
    status_port: Option<u16>,
) -> String {
    let quote = |path: &Path| format!("\"{}\"", path.display().to_string().replace('\\', "\\\\").replace('"', "\\\""));
    let tmp = managed.prefix.join("tmp");
    let temp_paths: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|kind| format!("    {kind}_temp_path {};\n", quote(&tmp.join(kind))))
        .collect();
    let answer = match status_port {
        Some(port) => format!(
            "location / {{\n            proxy_pass http://127.0.0.1:{port};\n            proxy_set_header Host $host;\n            \
             proxy_read_timeout 60s;\n        }}"
        ),
        None => "return 404 \"No preview is running at this address.\\n\";".to_owned(),
    };
    format!(
        r#"# Written by previewd at every start; do not edit.
worker_processes auto;
pid {pid};
error_log {error_log} notice;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp_paths}    # Preview host names are up to 253 characters, and there may be hundreds of them.
    server_names_hash_bucket_size 256;
    server_names_hash_max_size 8192;
    server {{
        listen {listen} default_server;
        server_name _;
        default_type text/plain;
        {answer}
    }}
    include {sites};
}}
"#,
        pid = quote(pid_file),
        error_log = quote(&managed.error_log),
        sites = quote(&sites_dir.join("*.conf")),
    )
}

/// The workers a reload retired. They accept no new connection, but finish the requests they
/// accepted before, which still go to the upstreams of the old configuration.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    workers: Vec<u32>,
}

impl Drain {
    /// Waits until the retired workers have exited (their requests are done), at most `limit`.
    pub async fn wait(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.workers.iter().any(|pid| title(*pid).is_some_and(|t| t.starts_with(WORKER_TITLE))) {
            if Instant::now() >= deadline {
                tracing::warn!(?limit, "old nginx workers still finish requests; going on");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// kill(2), as nginx's own `-s` does.
fn signal(pid: u32, signal: Signal) -> Result<(), NginxError> {
    let name = match signal {
        Signal::HUP => "HUP".to_owned(),
        Signal::KILL => "KILL".to_owned(),
        other => other.as_raw().to_string(),
    };
    let failure = |message: String| NginxError::Command { command: format!("kill -{name} {pid}"), message };
    let target = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| failure("not a process id".to_owned()))?;
    rustix::process::kill_process(target, signal).map_err(|errno| failure(errno.to_string()))
}

/// Stops worker processes whose master is gone (only those still titled as nginx workers).
pub async fn stop_orphaned_workers(pids: &[u32]) {
    let alive: Vec<u32> =
        pids.iter().copied().filter(|pid| title(*pid).is_some_and(|t| t.starts_with(WORKER_TITLE))).collect();
    if alive.is_empty() {
        return;
    }
    tracing::warn!(workers = ?alive, "stopping the workers the dead nginx master left");
    for pid in alive {
        if let Err(err) = signal(pid, Signal::KILL) {
            tracing::error!(error = %err, "cannot stop an orphaned nginx worker");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|pid| title(*pid).is_some_and(|t| t.starts_with(WORKER_TITLE))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The worker processes of an nginx master that still accept connections.
pub fn workers(master: u32) -> Vec<u32> {
    children(master).into_iter().filter(|pid| title(*pid).as_deref() == Some(WORKER_TITLE)).collect()
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// A process's title as `ps` shows it (nginx rewrites its argv to name its role).
fn title(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_conf_quotes_paths_and_includes_only_conf_files() {
        let managed = Managed {
            prefix: "/s/nginx".into(),
            conf: "/s/nginx/nginx.conf".into(),
            error_log: "/s/nginx/error.log".into(),
        };
        let conf = main_conf(
            "127.0.0.1:8080".parse().unwrap(),
            Path::new("/s/a \"b\""),
            &managed,
            Path::new("/s/nginx/nginx.pid"),
            None,
        );
        assert!(conf.contains(r#"include "/s/a \"b\"/*.conf";"#), "{conf}");
        assert!(conf.contains("listen 127.0.0.1:8080 default_server;"), "{conf}");
        assert!(conf.contains(r#"pid "/s/nginx/nginx.pid";"#), "{conf}");
        assert!(conf.contains(r#"return 404 "No preview is running at this address.\n";"#), "{conf}");
        let with_status =
            main_conf("127.0.0.1:8080".parse().unwrap(), Path::new("/s"), &managed, Path::new("/p"), Some(4711));
        assert!(with_status.contains("proxy_pass http://127.0.0.1:4711;") && !with_status.contains("return 404"));
    }

    #[test]
    fn own_process_has_a_title_and_no_nginx_children() {
        let me = std::process::id();
        assert!(title(me).is_some());
        assert!(workers(me).is_empty());
    }

    #[test]
    fn a_signal_that_cannot_be_sent_names_the_process_and_the_reason() {
        let gone = signal(i32::MAX as u32, Signal::HUP).unwrap_err().to_string();
        assert!(gone.contains(&format!("kill -HUP {}", i32::MAX)) && gone.contains("No such process"), "{gone}");
        let bogus = signal(u32::MAX, Signal::HUP).unwrap_err().to_string();
        assert!(bogus.contains("not a process id"), "{bogus}");
    }
}
