//! The service images scripts/service-images.sh builds from Debian packages, run with the
//! hardening previewd gives every container (`CapDrop: ALL`, `no-new-privileges`, 512
//! processes, 1 GiB): which `cap_add` each needs, tried rather than read from an entrypoint.
//! PostgreSQL and Redis do not answer HTTP, which previewd's launch probes, so they run with
//! plain `docker run` and those same settings, on a network of the test's own.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::unique_instance;

const POSTGRES: &str = "previewd-postgres:15";
const REDIS: &str = "previewd-redis:7";
/// What the official PostgreSQL image's entrypoint needs (README, Security model).
const POSTGRES_CAPS: &[&str] = &["CHOWN", "SETUID", "SETGID", "FOWNER", "DAC_OVERRIDE"];

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("run docker")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// One test's network, and everything it starts, labelled `previewd.instance=<instance>` and
/// removed on drop (containers with their anonymous volumes, then volumes and the network).
struct Env {
    instance: String,
    network: String,
}

impl Env {
    fn new() -> Self {
        for image in [POSTGRES, REDIS] {
            assert!(docker(&["image", "inspect", image]).status.success(), "{image} is missing: run scripts/setup.sh");
        }
        let instance = unique_instance();
        let network = format!("previewd-{instance}-services");
        let output = docker(&["network", "create", "--label", &format!("previewd.instance={instance}"), &network]);
        assert!(output.status.success(), "{}", text(&output));
        Self { instance, network }
    }

    fn label(&self) -> String {
        format!("previewd.instance={}", self.instance)
    }

    /// `docker run` with previewd's hardening and `cap_add`, on the test's network; `args` go
    /// on after the name (more options, the image, its command).
    fn run(&self, detach: bool, name: &str, cap_add: &[&str], args: &[&str]) -> Output {
        let name = format!("{}-{name}", self.instance);
        let label = self.label();
        let mut command: Vec<&str> = vec!["run", "--name", &name, "--label", &label, "--network", &self.network];
        command.extend(["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--pids-limit", "512"]);
        command.extend(["--memory", "1g"]);
        for cap in cap_add {
            command.extend(["--cap-add", cap]);
        }
        command.push(if detach { "-d" } else { "--rm" });
        command.extend(args);
        docker(&command)
    }

    /// Starts a server container; its name on the network is returned.
    fn start(&self, name: &str, cap_add: &[&str], args: &[&str]) -> String {
        let output = self.run(true, name, cap_add, args);
        assert!(output.status.success(), "{}", text(&output));
        format!("{}-{name}", self.instance)
    }

    fn volume(&self, name: &str) -> String {
        let name = format!("{}-{name}", self.instance);
        let output = docker(&["volume", "create", "--label", &self.label(), &name]);
        assert!(output.status.success(), "{}", text(&output));
        name
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let label = format!("label={}", self.label());
        let ids = text(&docker(&["ps", "-aq", "--filter", &label]));
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            docker(&[&["rm", "-f", "-v"], ids.as_slice()].concat());
        }
        let volumes = text(&docker(&["volume", "ls", "-q", "--filter", &label]));
        for volume in volumes.split_whitespace() {
            docker(&["volume", "rm", "-f", volume]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

fn state(container: &str) -> String {
    text(&docker(&["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container])).trim().to_owned()
}

fn logs(container: &str) -> String {
    text(&docker(&["logs", container]))
}

/// Polls `docker exec <container> <check>` until it succeeds; panics with the container's logs
/// if the container stops or 60 s pass.
fn wait_ready(container: &str, check: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if docker(&[&["exec", container], check].concat()).status.success() {
            return;
        }
        let state = state(container);
        assert!(state.starts_with("running"), "{container} stopped ({state}):\n{}", logs(container));
        assert!(Instant::now() < deadline, "{container} not ready after 60 s:\n{}", logs(container));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for a container that should fail to have exited, and returns its exit code and logs.
fn wait_exited(container: &str) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = state(container);
        if let Some(code) = state.strip_prefix("exited ") {
            return (code.parse().unwrap(), logs(container));
        }
        assert!(Instant::now() < deadline, "{container} still {state} after 30 s:\n{}", logs(container));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A line of the container's first process's `/proc/1/status`, without its name.
fn proc_status(container: &str, field: &str) -> String {
    let status = text(&docker(&["exec", container, "cat", "/proc/1/status"]));
    let line = status.lines().find(|line| line.starts_with(&format!("{field}:"))).expect("a status line");
    line.split_whitespace().nth(1).unwrap().to_owned()
}

const PG_ENV: &[&str] = &["-e", "POSTGRES_USER=app", "-e", "POSTGRES_PASSWORD=s3cret", "-e", "POSTGRES_DB=appdb"];
const PG_READY: &[&str] = &["pg_isready", "-h", "127.0.0.1", "-U", "app", "-d", "appdb"];

/// `psql` in a second container (no capabilities), over the network, as app with `password`.
fn query(env: &Env, client: &str, server: &str, password: &str, sql: &str) -> Output {
    let password = format!("PGPASSWORD={password}");
    let args =
        ["-e", &password, "--entrypoint", "psql", POSTGRES, "-h", server, "-U", "app", "-d", "appdb", "-tAc", sql];
    env.run(false, client, &[], &args)
}

#[test]
fn postgres_with_the_official_images_cap_add_takes_a_foreign_data_dir_and_answers_with_a_password() {
    // A bind-mounted data directory owned by someone else, mode 700: the entrypoint must read
    // (DAC_OVERRIDE) and chown (CHOWN) it before it drops to postgres (SETUID, SETGID). Made
    // before the environment so it is removed after the container.
    let data = tempfile::tempdir().unwrap();
    let env = Env::new();
    std::os::unix::fs::chown(data.path(), Some(1234), Some(1234)).unwrap();
    let mount = format!("{}:/var/lib/postgresql/data", data.path().display());
    let server = env.start("postgres", POSTGRES_CAPS, &[&["-v", &mount], PG_ENV, &[POSTGRES]].concat());
    wait_ready(&server, PG_READY);

    let uid = env.run(false, "id", &[], &["--entrypoint", "id", POSTGRES, "-u", "postgres"]);
    assert!(uid.status.success(), "{}", text(&uid));
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    let meta = std::fs::metadata(data.path()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid().to_string(), uid, "the data directory was handed to postgres");
    assert_eq!(proc_status(&server, "Uid"), uid, "postgres runs as postgres, not root");
    assert_eq!(proc_status(&server, "CapEff"), "0000000000000000", "and keeps no capability");

    let answer = query(&env, "psql", &server, "s3cret", "select current_user || '@' || current_database()");
    assert!(answer.status.success(), "{}", text(&answer));
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), "app@appdb");
    let refused = query(&env, "psql-wrong", &server, "wrong", "select 1");
    assert!(!refused.status.success());
    assert!(text(&refused).contains("password authentication failed for user \"app\""), "{}", text(&refused));
}

#[test]
fn postgres_needs_only_setuid_and_setgid_for_a_data_dir_that_is_already_its_own() {
    let data = tempfile::tempdir().unwrap();
    let env = Env::new();
    // A fresh named volume takes the image's directory, owner and all.
    let volume = env.volume("pgdata");
    let mount = format!("{volume}:/var/lib/postgresql/data");
    let server = env.start("postgres", &["SETUID", "SETGID"], &[&["-v", &mount], PG_ENV, &[POSTGRES]].concat());
    wait_ready(&server, PG_READY);
    let answer = query(&env, "psql", &server, "s3cret", "select 1");
    assert!(answer.status.success(), "{}", text(&answer));
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), "1");

    // A data directory that is someone else's needs more than those two.
    std::os::unix::fs::chown(data.path(), Some(1234), Some(1234)).unwrap();
    let mount = format!("{}:/var/lib/postgresql/data", data.path().display());
    let foreign = env.start("foreign", &["SETUID", "SETGID"], &[&["-v", &mount], PG_ENV, &[POSTGRES]].concat());
    let (code, logs) = wait_exited(&foreign);
    assert_ne!(code, 0);
    assert!(
        logs.contains("chown: changing ownership of '/var/lib/postgresql/data': Operation not permitted"),
        "{logs}"
    );
}

#[test]
fn postgres_without_capabilities_fails_to_start() {
    let env = Env::new();
    let server = env.start("postgres", &[], &[PG_ENV, &[POSTGRES]].concat());
    let (code, logs) = wait_exited(&server);
    assert_ne!(code, 0, "{logs}");
    assert!(logs.contains("setpriv: setresuid failed: Operation not permitted"), "{logs}");
}

#[test]
fn redis_runs_as_redis_without_any_capability_and_answers_ping_from_another_container() {
    let env = Env::new();
    // SETUID and SETGID, what an entrypoint that switches users needs, and none at all: the
    // image starts as the redis user, so it needs none.
    for (name, cap_add) in [("redis-setid", &["SETUID", "SETGID"][..]), ("redis-none", &[][..])] {
        let volume = env.volume(&format!("{name}-data"));
        let mount = format!("{volume}:/data");
        let server = env.start(name, cap_add, &["-v", &mount, REDIS]);
        wait_ready(&server, &["redis-cli", "ping"]);
        assert_ne!(proc_status(&server, "Uid"), "0", "redis does not run as root");
        assert_eq!(proc_status(&server, "CapEff"), "0000000000000000");

        let client = format!("{name}-cli");
        let ping = env.run(false, &client, &[], &[REDIS, "redis-cli", "-h", &server, "ping"]);
        assert_eq!(text(&ping).trim(), "PONG", "{name}");
        // It can write its data directory (the volume).
        let save = env.run(false, &format!("{client}-save"), &[], &[REDIS, "redis-cli", "-h", &server, "save"]);
        assert_eq!(text(&save).trim(), "OK", "{name}");
    }
}
