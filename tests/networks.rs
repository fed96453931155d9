//! Each preview on a network of its own, behind the host's firewall: seen from inside the
//! containers, with a plain container on Docker's default bridge as the control that shows each
//! refused address does answer others. "Outside" hosts (the internet, cloud metadata) are network
//! namespaces of the test's own, joined to the host by a veth pair.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestApp, free_port, unique_instance};

async fn app_with_network(network_yaml: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (unique_instance(), free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &common::Options::default()) + network_yaml;
    TestApp::start_from(dir, instance, nginx_port, yaml).await
}

async fn launched(app: &TestApp, name: &str) -> String {
    launched_from(app, "demo", name).await
}

/// The container of a new preview `name` of the image `image`.
async fn launched_from(app: &TestApp, image: &str, name: &str) -> String {
    let response = app.launch(&[("image_name", image), ("container_name", name)]).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let containers = app.containers();
    let line = containers.iter().find(|line| line.contains(&format!(".{name}."))).expect("the preview's container");
    line.split(' ').next().unwrap().to_owned()
}

fn inspect(container: &str, format: &str) -> String {
    let output = Command::new("docker").args(["inspect", "--format", format, container]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn ip_of(container: &str) -> String {
    inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
}

fn gateway_of(container: &str) -> String {
    inspect(container, "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}")
}

fn network_of(container: &str) -> String {
    inspect(container, "{{index .Config.Labels \"previewd.network\"}}")
}

/// The body `container` gets for `GET /` from `address:port` (busybox's `nc`: its static `wget`
/// crashes on some addresses), or why it got nothing.
fn fetch_from(container: &str, address: &str, port: u16) -> Result<String, String> {
    let output = Command::new("docker").args(["exec", container]).args(get_command(address, port)).output().unwrap();
    answer(output)
}

/// The same from a throwaway container (`docker run --rm`) on `network`.
fn fetch_from_new_container(instance: &str, network: &str, address: &str, port: u16) -> Result<String, String> {
    let output = Command::new("docker")
        .args(["run", "--rm", "--network", network, "--label", &format!("previewd.instance={instance}")])
        .arg(common::DEMO_IMAGE)
        .args(get_command(address, port))
        .output()
        .unwrap();
    answer(output)
}

fn get_command(address: &str, port: u16) -> [String; 4] {
    let script = format!(r#"printf 'GET / HTTP/1.0\r\n\r\n' | /bin/busybox nc -w 3 {address} {port}"#);
    ["/bin/busybox".to_owned(), "sh".to_owned(), "-c".to_owned(), script]
}

fn answer(output: std::process::Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    match stdout.split_once("\r\n\r\n") {
        Some((head, body)) if output.status.success() && head.starts_with("HTTP/1.") => Ok(body.to_owned()),
        _ => Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr))),
    }
}

/// An HTTP server on every address of the host that answers "hello from the host".
fn host_listener() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buffer = [0; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from the host\n");
        }
    });
    port
}

/// The host's own IPv4 addresses other than loopback.
fn host_addresses() -> Vec<String> {
    let output = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .filter(|ip| !ip.starts_with("127."))
        .map(str::to_owned)
        .collect()
}

/// A host outside this one: a network namespace behind a veth pair, with `address/30` on its
/// side, the host on the other address of the /30, and an HTTP server on port 80.
struct OutsideHost {
    namespace: String,
    host_side: String,
    server: Child,
}

impl OutsideHost {
    /// `host` and `outside` are the two usable addresses of one /30.
    fn start(host: &str, outside: &str) -> Self {
        let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let (namespace, host_side, outside_side) =
            (format!("pvtest{suffix}"), format!("vth{suffix}"), format!("vto{suffix}"));
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {}", args.join(" "));
        };
        ip(&["netns", "add", &namespace]);
        ip(&["link", "add", &host_side, "type", "veth", "peer", "name", &outside_side]);
        ip(&["link", "set", &outside_side, "netns", &namespace]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_side]);
        ip(&["link", "set", &host_side, "up"]);
        ip(&["netns", "exec", &namespace, "ip", "addr", "add", &format!("{outside}/30"), "dev", &outside_side]);
        ip(&["netns", "exec", &namespace, "ip", "link", "set", &outside_side, "up"]);
        ip(&["netns", "exec", &namespace, "ip", "link", "set", "lo", "up"]);
        ip(&["netns", "exec", &namespace, "ip", "route", "add", "default", "via", host]);
        let server = Command::new("ip")
            .args(["netns", "exec", &namespace, "python3", "-c", OUTSIDE_SERVER])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let host = Self { namespace, host_side, server };
        host.wait_until_serving(outside);
        host
    }

    fn wait_until_serving(&self, outside: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let address = format!("{outside}:80").parse().unwrap();
        while std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "the outside host's server did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["link", "del", &self.host_side]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.namespace]).status();
    }
}

const OUTSIDE_SERVER: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(16)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        c.recv(1024)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from outside\n")
    except OSError:
        pass
    c.close()
"#;

/// `address:port` answers a container on Docker's default bridge (the control) with `expected`,
/// and refuses `preview`.
fn assert_refused_to(app: &TestApp, preview: &str, address: &str, port: u16, expected: &str) {
    let control = fetch_from_new_container(&app.instance, "bridge", address, port);
    assert_eq!(control.as_deref(), Ok(expected), "control: the default bridge reaches {address}:{port}");
    let answer = fetch_from(preview, address, port);
    assert!(answer.is_err(), "the preview reached {address}:{port}: {answer:?}");
}

#[tokio::test]
async fn a_preview_cannot_connect_to_another_previews_container() {
    let app = app_with_network("").await;
    let (a, b) = (launched(&app, "net-a").await, launched(&app, "net-b").await);
    assert_ne!(network_of(&a), network_of(&b), "each preview has its own network");
    let b_ip = ip_of(&b);
    let itself = fetch_from(&b, &b_ip, 3000);
    assert!(itself.is_ok(), "control: B answers on {b_ip}:3000 from inside: {itself:?}");
    let from_a = fetch_from(&a, &b_ip, 3000);
    assert!(from_a.is_err(), "A reached B's container at {b_ip}:3000: {from_a:?}");
}

#[tokio::test]
async fn containers_on_the_same_preview_network_reach_each_other() {
    let app = app_with_network("").await;
    let a = launched(&app, "net-group").await;
    let answer = fetch_from_new_container(&app.instance, &network_of(&a), &ip_of(&a), 3000);
    assert!(answer.is_ok(), "a container on the preview's network could not reach it: {answer:?}");
}

#[tokio::test]
async fn a_preview_cannot_reach_services_on_the_hosts_addresses_but_is_still_served() {
    let app = app_with_network("").await;
    let a = launched(&app, "net-host").await;
    let port = host_listener();
    let control = fetch_from_new_container(&app.instance, "bridge", "172.17.0.1", port);
    assert_eq!(
        control,
        Ok("hello from the host\n".to_owned()),
        "control: the default bridge reaches the host's listener"
    );
    let mut addresses = host_addresses();
    addresses.push(gateway_of(&a));
    assert!(addresses.len() >= 2, "{addresses:?}");
    for address in addresses {
        let answer = fetch_from(&a, &address, port);
        assert!(answer.is_err(), "the preview reached the host at {address}:{port}: {answer:?}");
    }
    let (status, body) = app.via_nginx("net-host", "/").await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_preview_cannot_reach_a_port_docker_publishes_on_the_hosts_addresses() {
    let app = app_with_network("").await;
    let a = launched(&app, "net-published").await;
    // Someone else's container, published on every address of the host.
    let port = free_port();
    let output = Command::new("docker")
        .args(["run", "-d", "--rm", "--label", &format!("previewd.instance={}", app.instance)])
        .args(["-p", &format!("0.0.0.0:{port}:3000"), common::DEMO_IMAGE])
        .args(["/bin/busybox", "httpd", "-f", "-p", "3000", "-h", "/www"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let address = host_addresses().into_iter().find(|ip| ip != "172.17.0.1").expect("an address of the host's own");
    let deadline = Instant::now() + Duration::from_secs(10);
    let control = loop {
        let answer = fetch_from_new_container(&app.instance, "bridge", &address, port);
        if answer.is_ok() || Instant::now() > deadline {
            break answer;
        }
    };
    assert!(control.is_ok(), "control: the default bridge reaches {address}:{port}: {control:?}");
    let answer = fetch_from(&a, &address, port);
    assert!(answer.is_err(), "the preview reached the published port {address}:{port}: {answer:?}");
}

#[tokio::test]
async fn a_preview_cannot_reach_link_local_metadata() {
    let _metadata = OutsideHost::start("169.254.169.253", "169.254.169.254");
    let app = app_with_network("").await;
    let a = launched(&app, "net-meta").await;
    assert_refused_to(&app, &a, "169.254.169.254", 80, "hello from outside\n");
}

#[tokio::test]
async fn a_preview_can_open_connections_to_the_outside() {
    let _outside = OutsideHost::start("198.51.100.2", "198.51.100.1");
    let app = app_with_network("").await;
    let a = launched(&app, "net-out").await;
    assert_eq!(fetch_from(&a, "198.51.100.1", 80), Ok("hello from outside\n".to_owned()));
}

#[tokio::test]
async fn with_egress_off_a_preview_cannot_open_connections_to_the_outside() {
    let _outside = OutsideHost::start("198.51.100.6", "198.51.100.5");
    let app = app_with_network("network:\n  egress: false\n").await;
    let a = launched(&app, "net-sealed").await;
    assert_refused_to(&app, &a, "198.51.100.5", 80, "hello from outside\n");
    let (status, body) = app.via_nginx("net-sealed", "/").await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_replacement_joins_the_network_of_the_preview_it_replaces() {
    let app = app_with_network("").await;
    let first = launched(&app, "net-redeploy").await;
    let network = network_of(&first);
    let response = app.launch(&[("image_name", "demo"), ("container_name", "net-redeploy")]).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let containers = app.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    let second = containers[0].split(' ').next().unwrap();
    assert_ne!(second, first);
    assert_eq!(network_of(second), network);
}

#[tokio::test]
async fn a_killed_preview_leaves_no_network_behind() {
    let app = app_with_network("").await;
    let a = launched(&app, "net-kill").await;
    let network = network_of(&a);
    assert!(common::networks(&app.instance).contains(&network));
    assert_eq!(app.kill("net-kill").await.status(), 200);
    assert!(!common::networks(&app.instance).contains(&network), "{network} is still there");
}

async fn wait_for_warm(app: &TestApp, count: usize) {
    let networks = app.lifecycle.as_ref().unwrap().networks().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while networks.warm_count() < count {
        assert!(Instant::now() < deadline, "{count} warm networks are not ready: {}", networks.warm_count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn networks_no_preview_uses_are_taken_back_into_the_warm_pool_at_start() {
    let mut app = app_with_network("network:\n  warm: 3\n").await;
    launched(&app, "net-pool").await;
    wait_for_warm(&app, 3).await;
    let before = common::networks(&app.instance);
    assert_eq!(before.len(), 4, "three warm and the preview's: {before:?}");
    app.stop().await;
    app.boot().await;
    assert_eq!(app.lifecycle.as_ref().unwrap().networks().warm_count(), 3, "taken back at start");
    assert_eq!(common::networks(&app.instance), before, "none removed, none created");
}

#[tokio::test]
async fn networks_no_preview_uses_are_kept_warm_up_to_the_setting_and_removed_beyond_it() {
    let mut app = app_with_network("").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::networks(&app.instance).len() < 2 {
        assert!(Instant::now() < deadline, "no two warm networks: {:?}", common::networks(&app.instance));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = launched(&app, "net-warm").await;
    let in_use = network_of(&a);
    app.stop().await;
    app.options_yaml.push_str("network:\n  warm: 0\n");
    app.boot().await;
    assert_eq!(common::networks(&app.instance), vec![in_use], "only the preview's own network is left");
}

/// A time stamp of Docker's (RFC 3339) in nanoseconds since the epoch.
fn docker_time(name: &str, format: &str) -> i128 {
    let text = inspect(name, format);
    let nanos = Command::new("date").args(["-d", &text, "+%s%N"]).output().unwrap();
    let nanos = String::from_utf8_lossy(&nanos.stdout).trim().parse();
    nanos.unwrap_or_else(|err| panic!("{name}: {format} is {text:?}: {err}"))
}

#[tokio::test]
async fn the_pool_replaces_a_leased_network_only_once_the_launch_is_over() {
    let app = app_with_network("network:\n  warm: 1\n").await;
    wait_for_warm(&app, 1).await;
    let container = launched_from(&app, "late", "net-refill").await;
    wait_for_warm(&app, 1).await;
    let own = network_of(&container);
    let refill: Vec<String> = common::networks(&app.instance).into_iter().filter(|n| *n != own).collect();
    assert_eq!(refill.len(), 1, "one network replaces the leased one: {refill:?}");
    // The app listens a second after its start; a refill made while the launch waited for it
    // would be older than that.
    let started = docker_time(&container, "{{.State.StartedAt}}");
    let created = docker_time(&refill[0], "{{.Created.Format \"2006-01-02T15:04:05.999999999Z07:00\"}}");
    let after = created - started;
    assert!(after > 900_000_000, "the new network was made {after} ns after the app started, while the launch ran");
}

#[tokio::test]
async fn a_launch_that_finds_no_warm_network_waits_for_a_new_one_and_is_counted() {
    let app = app_with_network("network:\n  warm: 0\n").await;
    let a = launched(&app, "net-cold").await;
    assert!(network_of(&a).starts_with(&format!("previewd.{}.pv-", app.instance)), "{}", network_of(&a));
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|line| line == "previewd_cold_networks_total 1"), "{metrics}");
    assert!(metrics.lines().any(|line| line == "previewd_warm_networks 0"), "{metrics}");
}

/// `iptables -S` of the chain Docker evaluates first for forwarded traffic.
fn docker_user_rules() -> String {
    let output = Command::new("iptables").args(["-w", "-S", "DOCKER-USER"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn turning_isolation_off_removes_the_instances_networks_and_its_own_firewall_rule() {
    let mut app = app_with_network("network:\n  egress: false\n  warm: 1\n").await;
    let a = launched(&app, "net-off").await;
    // previewd.<instance>.pv-<tag><random>: the instance's bridges are pv-<tag>…
    let bridge_prefix = network_of(&a).rsplit('.').next().unwrap()[..9].to_owned();
    assert!(docker_user_rules().contains(&format!("-i {bridge_prefix}+")), "{}", docker_user_rules());
    assert_eq!(app.kill("net-off").await.status(), 200);
    app.stop().await;
    app.options_yaml.push_str("  isolation: false\n");
    app.boot().await;
    assert_eq!(common::networks(&app.instance), Vec::<String>::new());
    assert!(!docker_user_rules().contains(&format!("-i {bridge_prefix}+")), "{}", docker_user_rules());
}
