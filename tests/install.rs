//! Installing on a server: the systemd unit, scripts/install.sh, the production config and the
//! nginx snippets, checked with the real tools (systemd-analyze, nginx, openssl, curl, shellcheck;
//! scripts/setup.sh installs them). Nothing here touches the machine outside temp dirs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use previewd::nginx::reach;
use previewd::nginx::vhost::{Vhost, VhostTemplate};
use previewd::preview::{BaseDomain, InstanceName, Slug};

const BIN: &str = env!("CARGO_BIN_EXE_previewd");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BASE_DOMAIN: &str = "preview.example.com";
const NOT_FOUND: &str = "No preview is running at this address.\n";

fn repo(path: &str) -> PathBuf {
    Path::new(REPO).join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Runs a tool the tests need; a missing one fails the test (setup.sh installs them all).
fn run(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().unwrap_or_else(|err| panic!("cannot run {program} ({err}): run scripts/setup.sh to install it"))
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `s` with `from` replaced by `to`, which must occur exactly `count` times.
fn replace(s: &str, from: &str, to: &str, count: usize) -> String {
    assert_eq!(s.matches(from).count(), count, "expected {count}× {from:?} in:\n{s}");
    s.replace(from, to)
}

// ---- the unit ------------------------------------------------------------------------------------

/// The unit as installed, but starting the binary under test: `systemd-analyze verify` checks
/// that ExecStart's program exists.
fn unit_for_test(dir: &Path, extra: &str) -> PathBuf {
    let unit = read(&repo("systemd/previewd.service"));
    let unit = replace(&unit, "ExecStart=/usr/local/bin/previewd ", &format!("ExecStart={BIN} "), 1);
    let unit = replace(&unit, "[Install]", &format!("{extra}\n[Install]"), 1);
    let path = dir.join("previewd.service");
    std::fs::write(&path, unit).unwrap();
    path
}

/// `systemd-analyze verify` exits 0 on unknown keys and bad values (it only warns), so any
/// line about the unit counts as a failure. Works offline, without systemd as PID 1.
fn verify(unit: &Path) -> (bool, String) {
    let output = run(Command::new("systemd-analyze").arg("verify").arg(unit));
    let about_unit: Vec<String> =
        text(&output).lines().filter(|line| line.contains("previewd.service")).map(str::to_owned).collect();
    (output.status.success() && about_unit.is_empty(), text(&output))
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = verify(&unit_for_test(dir.path(), ""));
    assert!(ok, "systemd-analyze verify:\n{output}");

    // The check can fail: a misspelt key and a bad value are reported.
    let (ok, output) = verify(&unit_for_test(dir.path(), "ProtectSystm=strict\nKillSignal=SIGNOPE\n"));
    assert!(!ok && output.contains("ProtectSystm") && output.contains("SIGNOPE"), "{output}");
}

#[test]
fn the_unit_runs_the_documented_command_and_stops_gracefully() {
    let unit = read(&repo("systemd/previewd.service"));
    let lines: Vec<&str> = unit.lines().filter(|line| !line.starts_with('#')).collect();
    for expected in [
        "ExecStart=/usr/local/bin/previewd serve --config /etc/previewd/config.yml --log-format json",
        "EnvironmentFile=-/etc/previewd/previewd.env",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "Wants=docker.service nginx.service network-online.target",
        "After=docker.service nginx.service network-online.target",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=previewd",
        "ReadWritePaths=/etc/nginx/sites-enabled",
        "PrivateTmp=yes",
        "ProtectHome=yes",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?}");
    }
    // Longer than a launch can take: health_timeout (30 s by default) plus a reload (10 s).
    let stop = lines.iter().find_map(|l| l.strip_prefix("TimeoutStopSec=")).expect("TimeoutStopSec");
    let secs: u64 = stop.trim_end_matches('s').parse().unwrap();
    assert!(secs > 40, "TimeoutStopSec={stop}");
    // The production config's state_dir and sites_dir are the dirs the sandbox leaves writable.
    let config = read(&repo("systemd/config.production.yml"));
    assert!(config.contains("\nstate_dir: /var/lib/previewd "), "StateDirectory=previewd is /var/lib/previewd");
    assert!(config.contains("\n  sites_dir: /etc/nginx/sites-enabled "));
}

// ---- install.sh ----------------------------------------------------------------------------------

fn install(root: &Path, args: &[&str]) -> String {
    install_bin(root, BIN, args)
}

/// Where the installed binary does not matter, a small one spares copying the debug build.
fn install_config_only(root: &Path) -> String {
    install_bin(root, "/bin/true", &[])
}

fn install_bin(root: &Path, bin: &str, args: &[&str]) -> String {
    let output = run(Command::new("bash")
        .arg(repo("scripts/install.sh"))
        .arg("--root")
        .arg(root)
        .args(["--bin", bin])
        .args(args)
        .env_remove("DESTDIR"));
    assert!(output.status.success(), "install.sh {args:?}:\n{}", text(&output));
    text(&output)
}

/// Every path under `root` with its type, mode, times, and content or link target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                String::from("dir")
            } else if meta.len() < 1 << 20 {
                format!("{:?}", std::fs::read(&path).unwrap())
            } else {
                format!("{} bytes", meta.len()) // the binary: its times and size tell
            };
            let stamp = format!(
                "{what} mode {:o} mtime {}.{} ctime {}.{}",
                meta.mode() & 0o7777,
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec()
            );
            out.insert(path.strip_prefix(root).unwrap().to_owned(), stamp);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn install_sh_installs_everything_once_and_keeps_an_edited_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let output = install(root, &[]);
    let etc = root.join("etc/previewd");

    assert_eq!(std::fs::read(root.join("usr/local/bin/previewd")).unwrap(), std::fs::read(BIN).unwrap());
    assert_eq!(mode(&root.join("usr/local/bin/previewd")), 0o755);
    assert_eq!(read(&root.join("etc/systemd/system/previewd.service")), read(&repo("systemd/previewd.service")));
    assert_eq!(read(&etc.join("vhost.conf.tera")), read(&repo("templates/vhost.conf.tera")));
    assert_eq!(read(&etc.join("previewd.env")), read(&repo("systemd/previewd.env.example")));
    assert_eq!(mode(&etc.join("previewd.env")), 0o600, "secrets are root-only");
    assert_eq!(mode(&etc.join("config.yml")), 0o640);
    // The installed config names the template beside it, whatever the root.
    let shipped = read(&repo("systemd/config.production.yml"));
    let config = read(&etc.join("config.yml"));
    assert_eq!(
        config,
        replace(&shipped, "  template: ../templates/vhost.conf.tera\n", "  template: vhost.conf.tera\n", 1)
    );
    let nginx = root.join("etc/nginx");
    assert_eq!(read(&nginx.join("conf.d/previewd.conf")), read(&repo("systemd/nginx/previewd-http.conf")));
    for name in ["previewd-wildcard.conf", "previewd-wildcard-tls.conf"] {
        assert_eq!(read(&nginx.join("sites-available").join(name)), read(&repo("systemd/nginx").join(name)));
    }
    // Plain HTTP is enabled, TLS (which needs a certificate first) is not.
    let enabled = nginx.join("sites-enabled");
    assert_eq!(
        std::fs::read_link(enabled.join("previewd-wildcard.conf")).unwrap(),
        Path::new("../sites-available/previewd-wildcard.conf")
    );
    assert_eq!(read(&enabled.join("previewd-wildcard.conf")), read(&repo("systemd/nginx/previewd-wildcard.conf")));
    assert!(!enabled.join("previewd-wildcard-tls.conf").exists());
    assert_eq!(mode(&root.join("var/lib/previewd")), 0o750);
    assert!(output.contains("systemctl and nginx were not run"), "{output}");

    // A second run changes nothing at all, not even a timestamp.
    let before = snapshot(root);
    let output = install(root, &[]);
    assert_eq!(snapshot(root), before, "{output}");
    assert!(!output.contains("install: installed /"), "{output}");

    // An edited config (and a site swapped for TLS) survive an upgrade; the shipped config
    // lands beside it. Running again after that still changes nothing.
    let edited = config.replace("base_domain: preview.example.com", "base_domain: pr.acme.test");
    std::fs::write(etc.join("config.yml"), &edited).unwrap();
    std::fs::remove_file(enabled.join("previewd-wildcard.conf")).unwrap();
    std::os::unix::fs::symlink(
        "../sites-available/previewd-wildcard-tls.conf",
        enabled.join("previewd-wildcard-tls.conf"),
    )
    .unwrap();
    let output = install(root, &[]);
    assert!(
        output.contains("kept your /etc/previewd/config.yml; the shipped version is /etc/previewd/config.yml.new"),
        "{output}"
    );
    assert_eq!(read(&etc.join("config.yml")), edited);
    assert_eq!(read(&etc.join("config.yml.new")), config);
    assert!(!enabled.join("previewd-wildcard.conf").exists(), "a disabled site stays disabled");
    let before = snapshot(root);
    install(root, &[]);
    assert_eq!(snapshot(root), before);

    // Uninstall: everything but /etc/previewd and /var/lib/previewd, previewd's vhosts included.
    std::fs::write(enabled.join("previewd.default.feature-x.conf"), "server {}\n").unwrap();
    std::fs::write(enabled.join("other-site"), "server {}\n").unwrap();
    let output = install(root, &["--uninstall"]);
    for gone in [
        "usr/local/bin/previewd",
        "etc/systemd/system/previewd.service",
        "etc/nginx/conf.d/previewd.conf",
        "etc/nginx/sites-available/previewd-wildcard.conf",
        "etc/nginx/sites-available/previewd-wildcard-tls.conf",
        "etc/nginx/sites-enabled/previewd-wildcard-tls.conf",
        "etc/nginx/sites-enabled/previewd.default.feature-x.conf",
    ] {
        assert!(std::fs::symlink_metadata(root.join(gone)).is_err(), "{gone} is left:\n{output}");
    }
    assert!(enabled.join("other-site").exists(), "other sites stay");
    assert_eq!(read(&etc.join("config.yml")), edited);
    assert!(etc.join("previewd.env").exists() && root.join("var/lib/previewd").is_dir());
    assert!(output.contains("kept /etc/previewd"), "{output}");
}

#[test]
fn the_production_config_passes_check_config_in_the_repo_and_installed() {
    let output = run(Command::new(BIN).args(["check-config", "--config"]).arg(repo("systemd/config.production.yml")));
    assert!(output.status.success(), "{}", text(&output));

    let dir = tempfile::tempdir().unwrap();
    install_config_only(dir.path());
    let config = dir.path().join("etc/previewd/config.yml");
    let output = run(Command::new(BIN).args(["check-config", "--config"]).arg(&config).env_clear());
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("OK (instance default, 1 image(s), 1 user(s), previews at *.preview.example.com)"),
        "{stdout}"
    );
}

#[test]
fn install_sh_passes_bash_n_and_shellcheck() {
    let script = repo("scripts/install.sh");
    let output = run(Command::new("bash").arg("-n").arg(&script));
    assert!(output.status.success(), "{}", text(&output));
    let output = run(Command::new("shellcheck").arg(&script));
    assert!(output.status.success(), "{}", text(&output));
}

// ---- the nginx snippets, in a real nginx ---------------------------------------------------------

/// An nginx of its own in a temp dir: the installed conf.d and sites, a preview vhost rendered
/// from the installed template, and an app behind it that echoes the request's headers.
struct TestNginx {
    dir: tempfile::TempDir,
    http_port: u16,
    tls_port: u16,
    app_port: u16,
    started: bool,
}

impl TestNginx {
    /// `site` is the installed sites-available file to enable; `preview` the slug of a routed
    /// preview (listening like config.yml's nginx.listen says for that site).
    fn new(site: &str, preview: &str, with_http_conf: bool) -> Self {
        Self::trusting(site, preview, with_http_conf, &[])
    }

    /// The vhost rendered with these `trusted_proxies`.
    fn trusting(site: &str, preview: &str, with_http_conf: bool, trusted_proxies: &[ipnet::IpNet]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        install_config_only(&root);
        let (http_port, tls_port, app_port) = (free_port(), free_port(), echo_app());
        let tls = site.contains("tls");
        let sites = dir.path().join("sites");
        std::fs::create_dir(&sites).unwrap();

        let snippet = read(&root.join("etc/nginx/sites-available").join(site));
        let snippet = replace(&snippet, "listen 80;", &format!("listen {http_port};"), if tls { 1 } else { 2 });
        let snippet = if tls {
            let (cert, key) = self_signed_cert(dir.path());
            let s = replace(&snippet, "listen 443 ", &format!("listen {tls_port} "), 2);
            let s = replace(&s, "/etc/ssl/certs/preview.example.com.pem", &cert.display().to_string(), 2);
            replace(&s, "/etc/ssl/private/preview.example.com.key", &key.display().to_string(), 2)
        } else {
            snippet
        };
        std::fs::write(sites.join(site), snippet).unwrap();

        // The vhost previewd would write, rendered by previewd's own code from the installed
        // template, on 0.0.0.0:<port> as config.yml's nginx.listen (0.0.0.0:80 or 0.0.0.0:443).
        let template = VhostTemplate::load(&root.join("etc/previewd/vhost.conf.tera"), trusted_proxies).unwrap();
        let (instance, slug) = (InstanceName::parse("default").unwrap(), Slug::parse(preview).unwrap());
        let host = BaseDomain::parse(BASE_DOMAIN).unwrap().host_for(&slug);
        let listen = ([0, 0, 0, 0], if tls { tls_port } else { http_port }).into();
        let vhost =
            template.render(&Vhost::new(&instance, &slug, &host, listen, ([127, 0, 0, 1], app_port).into())).unwrap();
        std::fs::write(sites.join(format!("previewd.default.{preview}.conf")), vhost).unwrap();

        let d = dir.path().display();
        let temp_paths: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|kind| format!("    {kind}_temp_path {d}/tmp-{kind};\n"))
            .collect();
        let http_conf = if with_http_conf {
            format!("    include {}/etc/nginx/conf.d/*.conf;\n", root.display())
        } else {
            String::new()
        };
        let conf = format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n{temp_paths}{http_conf}    include {}/*;\n}}\n",
            sites.display()
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        Self { dir, http_port, tls_port, app_port, started: false }
    }

    fn nginx(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        run(Command::new("nginx")
            .args(args)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log")))
    }

    /// previewd's own route check (`nginx::reach`) for a host, against this nginx on `port`.
    fn probe(&self, host: &str, port: u16) -> reach::Answer {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(reach::probe(([127, 0, 0, 1], port).into(), host, false))
    }

    fn start(&mut self) {
        let output = self.nginx(&[]);
        assert!(output.status.success(), "nginx did not start: {}", text(&output));
        self.started = true;
    }

    /// curl's status line, Location header and body for a URL, resolving every name to 127.0.0.1.
    fn get(&self, url: &str) -> (u16, String, String) {
        self.get_with(url, &[])
    }

    /// `get` with extra request headers (`Name: value`).
    fn get_with(&self, url: &str, headers: &[&str]) -> (u16, String, String) {
        let host = url.split("://").nth(1).unwrap().split('/').next().unwrap();
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5", "--noproxy", "*", "--resolve", &format!("{host}:127.0.0.1")]);
        let cert = self.dir.path().join("cert.pem");
        if cert.exists() {
            curl.arg("--cacert").arg(cert);
        }
        for header in headers {
            curl.args(["-H", header]);
        }
        let output = run(curl.args(["-w", "\n%{http_code} %{redirect_url}", url]));
        assert!(output.status.success(), "curl {url}: {}", text(&output));
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = out.rsplit_once('\n').unwrap();
        let (code, location) = status.split_once(' ').unwrap();
        (code.parse().unwrap(), location.to_owned(), body.to_owned())
    }
}

impl Drop for TestNginx {
    fn drop(&mut self) {
        if self.started {
            self.nginx(&["-s", "stop"]);
            let pid_file = self.dir.path().join("nginx.pid");
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A certificate for preview.example.com and *.preview.example.com, like the operator's.
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=preview.example.com",
            "-addext",
            "subjectAltName=DNS:preview.example.com,DNS:*.preview.example.com",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert!(output.status.success(), "openssl: {}", text(&output));
    (cert, key)
}

/// An app on a loopback port that answers every request with the request's head.
fn echo_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let body = String::from_utf8_lossy(&head).to_lowercase();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).ok();
        }
    });
    port
}

/// The longest preview name: 63 characters, which nginx's default server_names_hash_bucket_size
/// cannot hold.
const LONG: &str = "a-preview-name-of-the-longest-kind-that-a-dns-label-can-hold-63";

#[test]
fn nginx_serves_previews_and_answers_unknown_names_with_the_plain_snippet() {
    assert_eq!(LONG.len(), 63);
    // Without conf.d/previewd.conf, nginx -t refuses the long name.
    let bare = TestNginx::new("previewd-wildcard.conf", LONG, false);
    let output = bare.nginx(&["-t"]);
    assert!(!output.status.success() && text(&output).contains("server_names_hash_bucket_size"), "{}", text(&output));

    let mut nginx = TestNginx::new("previewd-wildcard.conf", LONG, true);
    let output = nginx.nginx(&["-t"]);
    assert!(output.status.success(), "{}", text(&output));
    nginx.start();
    let port = nginx.http_port;

    let (status, _, body) = nginx.get(&format!("http://{LONG}.{BASE_DOMAIN}:{port}/"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("host: {LONG}.{BASE_DOMAIN}")) && body.contains("x-forwarded-proto: http\r"),
        "{body}"
    );

    let (status, _, body) = nginx.get(&format!("http://nothing-here.{BASE_DOMAIN}:{port}/"));
    assert_eq!((status, body.as_str()), (404, NOT_FOUND));

    // previewd's route check reaches the app through the vhost, and not for another name.
    let answer = nginx.probe(&format!("{LONG}.{BASE_DOMAIN}"), port);
    assert!(answer.reached(&format!("127.0.0.1:{}", nginx.app_port)), "{answer:?}");
    let answer = nginx.probe(&format!("nothing-here.{BASE_DOMAIN}"), port);
    assert_eq!(answer, reach::Answer::Http { status: 404, upstream: None });

    // The API is not published over plain HTTP, only the webhook and /healthz are.
    let (status, _, body) = nginx.get(&format!("http://{BASE_DOMAIN}:{port}/api/previews"));
    assert_eq!(status, 403, "{body}");
}

#[test]
fn the_app_sees_the_client_address_nginx_saw_and_a_connection_header_nginx_chose() {
    let mut nginx = TestNginx::new("previewd-wildcard.conf", "headers", true);
    nginx.start();
    let url = format!("http://headers.{BASE_DOMAIN}:{}/", nginx.http_port);
    let spoofed = ["X-Forwarded-For: 203.0.113.66", "Connection: keep-alive, x-forwarded-for"];
    let (status, _, body) = nginx.get_with(&url, &spoofed);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\r") && !body.contains("203.0.113.66"), "{body}");
    assert!(body.contains("connection: close\r"), "{body}");
    let (_, _, body) = nginx.get_with(&url, &["Upgrade: websocket", "Connection: Upgrade"]);
    assert!(body.contains("connection: upgrade\r") && body.contains("upgrade: websocket\r"), "{body}");
}

#[test]
fn behind_a_trusted_proxy_the_app_sees_the_client_address_the_proxy_forwarded() {
    let mut nginx = TestNginx::trusting("previewd-wildcard.conf", "headers", true, &["127.0.0.1/32".parse().unwrap()]);
    nginx.start();
    let url = format!("http://headers.{BASE_DOMAIN}:{}/", nginx.http_port);
    let (status, _, body) = nginx.get_with(&url, &["X-Forwarded-For: 203.0.113.66"]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-forwarded-for: 203.0.113.66\r"), "{body}");
    assert!(body.contains("x-real-ip: 203.0.113.66\r"), "{body}");
}

#[test]
fn nginx_serves_previews_over_tls_with_the_wildcard_certificate() {
    let mut nginx = TestNginx::new("previewd-wildcard-tls.conf", LONG, true);
    let output = nginx.nginx(&["-t"]);
    assert!(output.status.success(), "{}", text(&output));
    nginx.start();
    let (http, tls) = (nginx.http_port, nginx.tls_port);

    // previewd's unchanged template (`listen 0.0.0.0:<port>;`, no certificate) speaks TLS with the
    // wildcard certificate (curl checks it against the name), and the app learns it was HTTPS.
    let (status, _, body) = nginx.get(&format!("https://{LONG}.{BASE_DOMAIN}:{tls}/"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-forwarded-proto: https\r"), "{body}");

    let (status, _, body) = nginx.get(&format!("https://nothing-here.{BASE_DOMAIN}:{tls}/"));
    assert_eq!((status, body.as_str()), (404, NOT_FOUND));

    // previewd's route check speaks TLS with SNI to that port (nginx's 400 to plain HTTP tells it
    // to) and reaches the app through the vhost.
    let answer = nginx.probe(&format!("{LONG}.{BASE_DOMAIN}"), tls);
    assert!(answer.reached(&format!("127.0.0.1:{}", nginx.app_port)), "{answer:?}");

    let (status, location, _) = nginx.get(&format!("http://{LONG}.{BASE_DOMAIN}:{http}/x?y=1"));
    assert_eq!((status, location.as_str()), (301, format!("https://{LONG}.{BASE_DOMAIN}/x?y=1").as_str()));
}
