//! The service images scripts/service-images.sh builds from Debian packages, run with the
//! hardening previewd gives every container (`CapDrop: ALL`, `no-new-privileges`, 512
//! processes, 1 GiB): which `cap_add` each needs, tried rather than read from an entrypoint.
//! PostgreSQL and Redis do not answer HTTP, which previewd's launch probes, so they run with
//! plain `docker run` and those same settings, on a network of the test's own. So does the shop
//! demo app of whole environments (previewd-shop:demo), on a copy of its seed volume.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::unique_instance;

const POSTGRES: &str = "previewd-postgres:15";
const REDIS: &str = "previewd-redis:7";
const SHOP: &str = "previewd-shop:demo";
/// The seed of the shop's database, made by scripts/shop-seed.sh.
const SHOP_SEED: &str = "shop-db-seed";
/// What the official PostgreSQL image's entrypoint needs (README, Security model).
const POSTGRES_CAPS: &[&str] = &["CHOWN", "SETUID", "SETGID", "FOWNER", "DAC_OVERRIDE"];
/// What `cp -a` of the seed (postgres's, mode 700) needs as root, tried: DAC_OVERRIDE to read
/// it, CHOWN to hand the copy to postgres, FOWNER to then set its modes and times.
const SEED_COPY_CAPS: &[&str] = &["CHOWN", "FOWNER", "DAC_OVERRIDE"];

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

    /// A new volume of the test's holding a copy of the shop's seed, made the way a preview's
    /// is: `cp -a` in a container, the seed mounted read-only.
    fn seed_copy(&self, name: &str) -> String {
        let volume = self.volume(name);
        let from = format!("{SHOP_SEED}:/from:ro");
        let to = format!("{volume}:/to");
        let copy = self.run(
            false,
            &format!("{name}-cp"),
            SEED_COPY_CAPS,
            &["-v", &from, "-v", &to, POSTGRES, "cp", "-a", "/from/.", "/to/"],
        );
        assert!(copy.status.success(), "{}", text(&copy));
        volume
    }

    /// PostgreSQL on a copy of the shop's seed, ready; its name on the network is returned.
    /// The copy is postgres's already, so SETUID and SETGID are all it needs.
    fn seeded_postgres(&self) -> String {
        let volume = self.seed_copy("pgdata");
        let mount = format!("{volume}:/var/lib/postgresql/data");
        let server = self.start("postgres", &["SETUID", "SETGID"], &["-v", &mount, POSTGRES]);
        wait_ready(&server, SEED_READY);
        server
    }
}

/// The shop's tests need its image and its seed volume.
fn require_shop() {
    assert!(docker(&["image", "inspect", SHOP]).status.success(), "{SHOP} is missing: run scripts/service-images.sh");
    let seed = docker(&["volume", "inspect", SHOP_SEED]);
    assert!(seed.status.success(), "volume {SHOP_SEED} is missing: run scripts/service-images.sh");
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
/// The seed's user, password and database.
const SEED_READY: &[&str] = &["pg_isready", "-h", "127.0.0.1", "-U", "app", "-d", "app"];

/// `psql` in a second container (no capabilities), over the network, as app with `password`.
fn query(env: &Env, client: &str, server: &str, password: &str, sql: &str) -> Output {
    query_db(env, client, server, "appdb", password, sql)
}

fn query_db(env: &Env, client: &str, server: &str, db: &str, password: &str, sql: &str) -> Output {
    let password = format!("PGPASSWORD={password}");
    let args = ["-e", &password, "--entrypoint", "psql", POSTGRES, "-h", server, "-U", "app", "-d", db, "-tAc", sql];
    env.run(false, client, &[], &args)
}

/// The shop's DATABASE_URL and REDIS_URL for servers on the test's network.
fn shop_env(postgres: &str, redis: &str) -> [String; 4] {
    [
        "-e".into(),
        format!("DATABASE_URL=postgres://app:app@{postgres}:5432/app"),
        "-e".into(),
        format!("REDIS_URL=redis://{redis}:6379/0"),
    ]
}

/// The shop app with previewd's hardening, a read-only root and no capability, published on a
/// random loopback port; returns its container name and that address.
fn start_shop(env: &Env, env_args: &[&str]) -> (String, String) {
    let options = ["--read-only", "--tmpfs", "/tmp", "-p", "127.0.0.1::5000"];
    let app = env.start("shop", &[], &[&options[..], env_args, &["-e", "PREVIEW_NAME=pr-7", SHOP]].concat());
    let port = text(&docker(&["port", &app, "5000/tcp"]));
    let address = port.lines().find(|line| line.starts_with("127.0.0.1:")).expect("a loopback port").to_owned();
    (app, address)
}

/// One HTTP/1.0 request (the app closes after each); the status and the body. None if the
/// connection fails or closes without an answer (the app is not listening yet).
fn http(address: &str, method: &str, path: &str, form: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: shop\r\n");
    if let Some(form) = form {
        request += &format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", form.len());
    }
    request += "\r\n";
    request += form.unwrap_or("");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn get(address: &str, path: &str) -> (u16, String) {
    http(address, "GET", path, None).unwrap_or_else(|| panic!("no answer to GET {path}"))
}

fn api_state(address: &str) -> serde_json::Value {
    let (status, body) = get(address, "/api/state");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls /healthz until it answers `want`; panics with the app's logs if it stops or 30 s pass.
fn wait_health(app: &str, address: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http(address, "GET", "/healthz", None);
        match answer {
            Some((status, body)) if status == want => return body,
            _ => {}
        }
        let state = state(app);
        assert!(state.starts_with("running"), "{app} stopped ({state}):\n{}", logs(app));
        assert!(Instant::now() < deadline, "/healthz answered {answer:?}, not {want}, for 30 s:\n{}", logs(app));
        std::thread::sleep(Duration::from_millis(250));
    }
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

#[test]
fn the_shop_seed_volume_holds_ten_thousand_products() {
    require_shop();
    let env = Env::new();
    let server = env.seeded_postgres();
    let answer = query_db(&env, "psql", &server, "app", "app", "select count(*) from products");
    assert!(answer.status.success(), "{}", text(&answer));
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), "10000");
}

#[test]
fn the_shop_app_serves_seeded_rows_and_a_redis_counter_and_the_migration_adds_reviews() {
    require_shop();
    let env = Env::new();
    let postgres = env.seeded_postgres();
    let redis = env.start("redis", &[], &[REDIS]);
    wait_ready(&redis, &["redis-cli", "ping"]);
    let urls = shop_env(&postgres, &redis);
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();

    let migration = env.run(false, "migrate", &[], &[&urls[..], &[SHOP, "python3", "migrate.py"]].concat());
    assert!(migration.status.success(), "{}", text(&migration));
    assert!(text(&migration).contains("created table reviews"), "{}", text(&migration));

    let (app, address) = start_shop(&env, &urls);
    assert_eq!(wait_health(&app, &address, 200).trim(), "ok");
    assert_ne!(proc_status(&app, "Uid"), "0", "the shop does not run as root");
    assert_eq!(proc_status(&app, "CapEff"), "0000000000000000");

    let before = api_state(&address);
    assert_eq!(before["products"], 10000, "{before}");
    assert_eq!(before["first"], serde_json::json!(["product 1", "product 2", "product 3", "product 4", "product 5"]));
    assert_eq!(before["migrated"], true, "{before}");
    assert_eq!(before["reviews"], 1, "{before}");
    assert_eq!(before["preview"], "pr-7", "{before}");

    let (status, page) = get(&address, "/");
    assert_eq!(status, 200, "{page}");
    for line in ["<title>previewd shop</title>", "10000 products", "<td>product 20</td>", "added by the migration"] {
        assert!(page.contains(line), "{line:?} not in the page:\n{page}");
    }
    let after = api_state(&address);
    assert_eq!(after["visits"].as_i64().unwrap(), before["visits"].as_i64().unwrap() + 1, "{before} then {after}");
}

#[test]
fn the_shop_migration_fails_with_exit_code_3_when_asked_to() {
    require_shop();
    let env = Env::new();
    let migration = env.run(false, "migrate", &[], &["-e", "MIGRATE_FAIL=1", SHOP, "python3", "migrate.py"]);
    assert_eq!(migration.status.code(), Some(3), "{}", text(&migration));
    assert!(text(&migration).contains("migration failed on purpose: MIGRATE_FAIL is set"), "{}", text(&migration));
}

#[test]
fn the_shop_migration_run_twice_adds_its_review_once() {
    require_shop();
    let env = Env::new();
    let postgres = env.seeded_postgres();
    let url = format!("DATABASE_URL=postgres://app:app@{postgres}:5432/app");
    for (run, said) in [("migrate-1", "inserted the review of product 1"), ("migrate-2", "inserted none")] {
        let migration = env.run(false, run, &[], &["-e", &url, SHOP, "python3", "migrate.py"]);
        assert!(migration.status.success(), "{}", text(&migration));
        assert!(text(&migration).contains(said), "{run}: {}", text(&migration));
    }
    let reviews = query_db(&env, "psql", &postgres, "app", "app", "select count(*) from reviews");
    assert_eq!(String::from_utf8_lossy(&reviews.stdout).trim(), "1", "{}", text(&reviews));
}

#[test]
fn the_shop_health_check_answers_503_with_the_reason_while_postgres_and_redis_do_not_answer() {
    require_shop();
    let env = Env::new();
    // Nothing listens on port 1 of the app's own loopback: both refuse at once.
    let urls = ["-e", "DATABASE_URL=postgres://app:app@127.0.0.1:1/app", "-e", "REDIS_URL=redis://127.0.0.1:1/0"];
    let (app, address) = start_shop(&env, &urls);
    let reason = wait_health(&app, &address, 503);
    assert_eq!(reason.lines().count(), 1, "one line: {reason}");
    assert!(reason.starts_with("postgres: ") && reason.contains("; redis: "), "{reason}");
}

#[test]
fn the_shop_app_adds_a_product_posted_as_a_form_and_refuses_a_bad_field() {
    require_shop();
    let env = Env::new();
    let postgres = env.seeded_postgres();
    let redis = env.start("redis", &[], &[REDIS]);
    let urls = shop_env(&postgres, &redis);
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (app, address) = start_shop(&env, &urls);
    wait_health(&app, &address, 200);

    let created = http(&address, "POST", "/products", Some("name=lamp&price=12.50")).expect("an answer");
    assert_eq!(created, (201, "{\"id\": 10001}\n".to_owned()), "the next id after the seed's");
    assert_eq!(api_state(&address)["products"], 10001);
    for (form, said) in [("name=lamp&price=1.234", "at most 2 decimals"), ("price=3", "name is missing")] {
        let (status, body) = http(&address, "POST", "/products", Some(form)).expect("an answer");
        assert_eq!(status, 400, "{form}: {body}");
        assert!(body.contains(said), "{form}: {body}");
    }
    assert_eq!(api_state(&address)["products"], 10001, "nothing added by a refused form");
}
