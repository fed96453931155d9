//! Fault drills that are quick enough for the test suite: `kill -9` of the real previewd at 20
//! different moments of launches, redeploys and kills (after each restart the state must
//! converge within 10 s: every container up, routed and served; every vhost backed by a
//! container; `nginx -t` passing), the same for previews with services (PostgreSQL, Redis and a
//! migration job: every app with all its services running, no service, volume or job container
//! without an app), and `kill -9` of the managed nginx.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, PASSWORD, USER};

const ROUNDS: u64 = 20;
const CONVERGE: Duration = Duration::from_secs(10);

/// Polls `unconverged` until it finds nothing wrong, failing `round` with its last reason once
/// `limit` has passed since `restarted`.
async fn converge<F, Fut>(restarted: Instant, limit: Duration, round: &str, unconverged: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    while let Some(why) = unconverged().await {
        assert!(restarted.elapsed() < limit, "{round}: {why}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request cut short: previewd is killed `after` it was sent.
struct Cut<'a> {
    path: &'a str,
    image: &'a str,
    name: &'a str,
    after: Duration,
}

struct Drill {
    dir: tempfile::TempDir,
    instance: String,
    nginx_port: u16,
    api: String,
    client: reqwest::Client,
}

impl Drill {
    fn sites(&self) -> std::path::PathBuf {
        self.dir.path().join("state/nginx/sites")
    }

    /// Running previews (slug per container) and routed previews (slug per vhost file).
    fn state(&self) -> (Vec<(String, String)>, Vec<String>) {
        let containers = common::docker_ps(&format!("label=previewd.instance={}", self.instance))
            .into_iter()
            .map(|line| {
                let mut parts = line.split(' ');
                let id = parts.next().unwrap_or_default().to_owned();
                let slug = std::process::Command::new("docker")
                    .args(["inspect", "--format", "{{index .Config.Labels \"previewd.slug\"}} {{.State.Status}}", &id])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    .unwrap_or_default();
                (id, slug)
            })
            .collect();
        let prefix = format!("previewd.{}.", self.instance);
        let mut vhosts: Vec<String> = std::fs::read_dir(self.sites())
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|name| Some(name.strip_prefix(&prefix)?.strip_suffix(".conf")?.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        vhosts.sort();
        (containers, vhosts)
    }

    /// Why the state is not converged yet, if it is not.
    async fn unconverged(&self) -> Option<String> {
        let (containers, vhosts) = self.state();
        let mut slugs = Vec::new();
        for (id, label) in &containers {
            let (slug, status) = label.split_once(' ').unwrap_or((label.as_str(), ""));
            if status != "running" {
                return Some(format!("container {id} of {slug} is {status}"));
            }
            slugs.push(slug.to_owned());
        }
        slugs.sort();
        let unique = {
            let mut u = slugs.clone();
            u.dedup();
            u
        };
        if unique.len() != slugs.len() {
            return Some(format!("several containers for one preview: {slugs:?}"));
        }
        if unique != vhosts {
            return Some(format!("containers {unique:?} but vhosts {vhosts:?}"));
        }
        for slug in &unique {
            match self.via_nginx(slug).await {
                Some(200) => {}
                other => return Some(format!("{slug} answers {other:?} through nginx")),
            }
        }
        None
    }

    async fn via_nginx(&self, slug: &str) -> Option<u16> {
        let host = format!("{slug}.{}", common::BASE_DOMAIN);
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .resolve(&host, ([127, 0, 0, 1], self.nginx_port).into())
            .build()
            .ok()?;
        client.get(format!("http://{host}:{}/", self.nginx_port)).send().await.ok().map(|r| r.status().as_u16())
    }

    /// Sends the request, kills previewd with SIGKILL `after` its start, and starts it again
    /// (logging to `log` in the drill's dir) until it is healthy; when the restart began.
    async fn kill_9_during(&self, daemon: &mut Daemon, config: &Path, cut: Cut<'_>, log: &str) -> Instant {
        let request = self
            .client
            .post(format!("{}{}", self.api, cut.path))
            .basic_auth(USER, Some(PASSWORD))
            .form(&[("image_name", cut.image), ("container_name", cut.name)]);
        let in_flight = tokio::spawn(request.send());
        tokio::time::sleep(cut.after).await;
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        in_flight.abort();
        let restarted = Instant::now();
        *daemon = Daemon::start(config, &self.dir.path().join(log));
        daemon.wait_until_healthy(&self.client, &self.api).await;
        restarted
    }

    fn nginx_test(&self) -> std::process::Output {
        let prefix = self.dir.path().join("state/nginx");
        std::process::Command::new("nginx")
            .args(["-t", "-p"])
            .arg(&prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .arg("-e")
            .arg(prefix.join("error.log"))
            .output()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_twenty_moments_always_converges_after_a_restart() {
    let setup = common::BinaryConfig::new();
    let _cleanup = setup.cleanup();
    let config = setup.path.clone();
    let drill = Drill {
        instance: setup.instance.clone(),
        nginx_port: setup.nginx_port,
        api: setup.api.clone(),
        client: common::client(),
        dir: setup.dir,
    };

    let mut daemon = Daemon::start(&config, &drill.dir.path().join("daemon.log"));
    daemon.wait_until_healthy(&drill.client, &drill.api).await;
    let mut worst = Duration::ZERO;
    for round in 0..ROUNDS {
        // A different moment each round, from before Docker is asked to well after the launch.
        let delay = Duration::from_millis((round * 173) % 1500);
        let (path, name) = match round % 3 {
            0 => ("/launch", format!("drill-{round}")),
            1 => ("/launch", "drill-keep".to_owned()),
            _ => ("/kill", format!("drill-{}", round - 2)),
        };
        let cut = Cut { path, image: "demo", name: &name, after: delay };
        let restarted = drill.kill_9_during(&mut daemon, &config, cut, &format!("daemon-{round}.log")).await;
        let round_name = format!("round {round} ({path} {name}, killed after {delay:?})");
        converge(restarted, CONVERGE, &round_name, || drill.unconverged()).await;
        worst = worst.max(restarted.elapsed());
        let test = drill.nginx_test();
        assert!(test.status.success(), "round {round}: nginx -t fails: {}", String::from_utf8_lossy(&test.stderr));
    }
    eprintln!("{ROUNDS} kill -9 rounds; slowest convergence after a restart: {worst:?}");
    assert!(!drill.state().0.is_empty(), "the drill left previews to check");
}

/// One container of a drill's instance: id, slug, role, state.
struct Member {
    id: String,
    slug: String,
    role: String,
    state: String,
}

fn members(instance: &str) -> Vec<Member> {
    let output = std::process::Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label=previewd.instance={instance}"), "--format"])
        .arg(r#"{{.ID}} {{.Label "previewd.slug"}} {{.Label "previewd.role"}}/{{.Label "previewd.part"}} {{.State}}"#)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (id, slug, role, state) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            Some(Member { id: id.to_owned(), slug: slug.to_owned(), role: role.to_owned(), state: state.to_owned() })
        })
        .collect()
}

impl Drill {
    /// Why the previews with services are not converged yet, if they are not: each app running,
    /// routed and served with its db and cache running; nothing else of the instance.
    async fn environments_unconverged(&self) -> Option<String> {
        let members = members(&self.instance);
        let mut apps: Vec<String> = Vec::new();
        for member in &members {
            match (member.role.as_str(), member.state.as_str()) {
                ("app/", "running") => apps.push(member.slug.clone()),
                ("service/db" | "service/cache", "running") => {}
                (role, state) => return Some(format!("{} of {} is {role} {state}", member.id, member.slug)),
            }
        }
        apps.sort();
        let mut unique = apps.clone();
        unique.dedup();
        if unique != apps {
            return Some(format!("several app containers for one preview: {apps:?}"));
        }
        for slug in &apps {
            for service in ["service/db", "service/cache"] {
                let count = members.iter().filter(|m| &m.slug == slug && m.role == service).count();
                if count != 1 {
                    return Some(format!("{slug} has {count} {service} containers"));
                }
            }
        }
        if let Some(orphan) = members.iter().find(|m| !apps.contains(&m.slug)) {
            return Some(format!("{} of {} runs without the preview's app", orphan.role, orphan.slug));
        }
        let prefix = format!("previewd.{}.", self.instance);
        for volume in common::volumes(&self.instance) {
            let slug = volume.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".db")).unwrap_or(&volume);
            if !apps.iter().any(|app| app == slug) {
                return Some(format!("volume {volume} without its preview"));
            }
        }
        let (_, vhosts) = self.state();
        if vhosts != apps {
            return Some(format!("apps {apps:?} but vhosts {vhosts:?}"));
        }
        for slug in &apps {
            match self.via_nginx(slug).await {
                Some(200) => {}
                other => return Some(format!("{slug} answers {other:?} through nginx")),
            }
        }
        None
    }
}

const ENVIRONMENT_ROUNDS: u64 = 12;
/// Convergence may have to start a service again and wait until it is ready.
const ENVIRONMENT_CONVERGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_launches_redeploys_and_kills_of_previews_with_services_always_converges() {
    common::shop::require_images();
    let setup = common::BinaryConfig::with_images(&common::shop::images_yaml());
    let _cleanup = setup.cleanup();
    let config = setup.path.clone();
    let drill = Drill {
        instance: setup.instance.clone(),
        nginx_port: setup.nginx_port,
        api: setup.api.clone(),
        client: common::client(),
        dir: setup.dir,
    };
    let mut daemon = Daemon::start(&config, &drill.dir.path().join("daemon.log"));
    daemon.wait_until_healthy(&drill.client, &drill.api).await;
    // The preview the rounds redeploy, launched whole first.
    let first = drill
        .client
        .post(format!("{}/launch", drill.api))
        .basic_auth(USER, Some(PASSWORD))
        .form(&[("image_name", "shop"), ("container_name", "env-keep")])
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 200, "{}", first.text().await.unwrap());
    let mut worst = Duration::ZERO;
    for round in 0..ENVIRONMENT_ROUNDS {
        // A launch of the shop takes 2-4 s: moments from before Docker is asked to after.
        let delay = Duration::from_millis((round * 443) % 5000);
        let (path, name) = match round % 3 {
            0 => ("/launch", format!("env-{round}")),
            1 => ("/launch", "env-keep".to_owned()),
            _ => ("/kill", format!("env-{}", round - 2)),
        };
        let cut = Cut { path, image: "shop", name: &name, after: delay };
        let restarted = drill.kill_9_during(&mut daemon, &config, cut, &format!("daemon-env-{round}.log")).await;
        let round_name = format!("round {round} ({path} {name}, killed after {delay:?})");
        converge(restarted, ENVIRONMENT_CONVERGE, &round_name, || drill.environments_unconverged()).await;
        worst = worst.max(restarted.elapsed());
    }
    // The restarts had work to do: services of a first launch cut short, or job containers.
    let cleaned = (0..ENVIRONMENT_ROUNDS)
        .filter(|round| {
            let log =
                std::fs::read_to_string(drill.dir.path().join(format!("daemon-env-{round}.log"))).unwrap_or_default();
            log.contains("removed the services and data of a preview whose app is gone")
                || log.contains("removing a job container of a launch cut short")
        })
        .count();
    eprintln!(
        "{ENVIRONMENT_ROUNDS} kill -9 rounds with services, {cleaned} of them left parts a restart removed; slowest convergence after a restart: {worst:?}"
    );
    assert!(cleaned > 0, "no round was cut short with services or jobs under way");
    assert!(members(&drill.instance).iter().any(|m| m.slug == "env-keep"), "the redeployed preview is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_managed_nginx_is_started_again_and_serves_the_previews() {
    let app = common::TestApp::start().await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "survivor")]).await.status(), 200);
    let pid_file = app.dir.path().join("state/nginx/nginx.pid");
    let master = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    // The master killed outright (an OOM kill, `kill -9`): its workers live on without it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap();
    let old_workers: Vec<String> = children.split_whitespace().map(str::to_owned).collect();
    assert!(!old_workers.is_empty());
    std::process::Command::new("kill").args(["-9", &master]).status().unwrap();
    let gone = Instant::now() + CONVERGE;
    while Path::new(&format!("/proc/{master}")).exists() {
        assert!(Instant::now() < gone, "the killed master lingers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let deadline = Instant::now() + CONVERGE;
    let new_master_live = || {
        let pid = std::fs::read_to_string(&pid_file).unwrap_or_default().trim().to_owned();
        pid != master
            && std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with("nginx: master"))
    };
    while !new_master_live() || !matches!(app.via_nginx("survivor", "/").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "the managed nginx was not started again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health: serde_json::Value = app.client.get(app.url("/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["nginx"]["ok"], true, "{health}");
    let alive = |pid: &String| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with("nginx: worker"))
    };
    assert!(!old_workers.iter().any(alive), "the dead master's workers are stopped: {old_workers:?}");
    // A launch after the restart is routed and served too.
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "after")]).await.status(), 200);
    assert_eq!(app.via_nginx("after", "/").await.unwrap().0, 200);
}
