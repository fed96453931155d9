//! The nginx checks (found, running, `nginx -t`, a probe vhost with the longest host name that is
//! actually served on `nginx.listen`, then removed) and the port checks (the API and nginx
//! listen addresses are free or held by previewd or nginx).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use tokio::io::AsyncWriteExt;

use super::Check;
use crate::config::Config;
use crate::nginx::sites::SitesDir;
use crate::nginx::vhost::{Vhost, VhostTemplate};
use crate::nginx::{Nginx, NginxError, reach};
use crate::preview::Slug;

/// The longest DNS label: the probe vhost's name is as long as a preview's can be.
const LONGEST_LABEL: usize = 63;

pub async fn nginx_checks(config: &Config, template: Option<&VhostTemplate>) -> Vec<Check> {
    let nginx = Nginx::new(config.nginx.clone(), &config.state_dir);
    let program = config.nginx.test_command.first().cloned().unwrap_or_else(|| "nginx".to_owned());
    let mut checks = vec![found(&program).await];
    if checks[0].level == super::Level::Fail {
        return checks;
    }
    let Some(master) = nginx.master_pid() else {
        checks.push(not_running(config, &nginx));
        return checks;
    };
    checks.push(Check::ok("nginx running", format!("master pid {master} ({})", config.nginx.pid_file.display())));
    match nginx.test().await {
        Ok(()) => checks.push(Check::ok("nginx config", "nginx -t passes")),
        Err(err) => {
            checks.push(Check::fail("nginx config", format!("{err}: fix the configuration nginx -t names")));
            return checks;
        }
    }
    let Some(template) = template else {
        checks.push(Check::fail("nginx served", "not checked: the vhost template does not load (see above)"));
        return checks;
    };
    checks.extend(probe_vhost(config, &nginx, template).await);
    checks
}

async fn found(program: &str) -> Check {
    match tokio::process::Command::new(program).arg("-v").output().await {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stderr);
            let version = text.trim().strip_prefix("nginx version: ").unwrap_or(text.trim()).to_owned();
            Check::ok("nginx", format!("{program}: {version}"))
        }
        Err(err) => Check::fail(
            "nginx",
            format!("cannot run {program} ({err}): install nginx (apt install nginx) or fix nginx.test_command"),
        ),
    }
}

fn not_running(config: &Config, nginx: &Nginx) -> Check {
    let pid_file = config.nginx.pid_file.display();
    if config.nginx.managed {
        Check::warn(
            "nginx running",
            format!(
                "previewd's own nginx is not running (no live master in {pid_file}); `previewd serve` starts it: \
                 run doctor again while previewd runs to check that previews are served"
            ),
        )
    } else {
        Check::fail("nginx running", nginx.not_running().to_string())
    }
}

/// Routes a host name of the longest kind to a small server of the doctor's own, checks that
/// nginx serves it there, and removes the route again whatever happened.
async fn probe_vhost(config: &Config, nginx: &Nginx, template: &VhostTemplate) -> Vec<Check> {
    let upstream = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(err) => return vec![Check::fail("nginx served", format!("cannot listen on loopback: {err}"))],
    };
    let port = upstream.local_addr().unwrap_or_else(|_| ([127, 0, 0, 1], 0).into());
    let server = tokio::spawn(answer_ok(upstream));
    let slug = probe_slug();
    let host = config.base_domain.host_for(&slug);
    let sites = SitesDir::new(config.nginx.sites_dir.clone(), &config.instance);
    let rendered = match template.render(&Vhost::new(&config.instance, &slug, &host, config.nginx.listen, port)) {
        Ok(rendered) => rendered,
        Err(err) => return vec![Check::fail("nginx served", format!("the template does not render: {err}"))],
    };
    if let Err(err) = sites.set(&slug, Some(&rendered)) {
        let dir = config.nginx.sites_dir.display();
        return vec![Check::fail(
            "nginx served",
            format!("cannot write a vhost to {dir}: {err}: make it writable by previewd's user"),
        )];
    }
    let checks = served(config, nginx, &sites, &slug, &rendered, port).await;
    if let Err(err) = sites.set(&slug, None) {
        tracing::error!(error = %err, "cannot remove the doctor's probe vhost");
    }
    if let Err(err) = nginx.reload().await {
        tracing::warn!(error = %err, "reload after removing the doctor's probe vhost failed");
    }
    server.abort();
    checks
}

async fn served(
    config: &Config,
    nginx: &Nginx,
    sites: &SitesDir,
    slug: &Slug,
    vhost: &str,
    port: std::net::SocketAddr,
) -> Vec<Check> {
    let host = config.base_domain.host_for(slug).to_string();
    let length = host.len();
    match nginx.test().await {
        Ok(()) => {}
        Err(NginxError::NotServed(message)) => {
            return vec![
                Check::fail("nginx host names", message),
                Check::fail("nginx served", "not checked: nginx refuses long host names (see above)"),
            ];
        }
        Err(err) => return vec![Check::fail("nginx served", format!("nginx -t refuses the probe vhost: {err}"))],
    }
    let mut checks = vec![Check::ok(
        "nginx host names",
        format!("nginx holds a host name of {length} characters, the longest a preview gets"),
    )];
    if let Err(err) = nginx.reload().await {
        checks.push(Check::fail("nginx served", format!("cannot reload nginx: {err}")));
        return checks;
    }
    let listen = config.nginx.listen;
    let answer = reach::probe(reach::connect_addr(listen), &host, reach::listens_tls(vhost)).await;
    if answer.reached(&port.to_string()) {
        checks.push(Check::ok(
            "nginx served",
            format!("a vhost written to {} is served on {listen}", sites.dir().display()),
        ));
        return checks;
    }
    let dump = nginx.dump().await.unwrap_or_default();
    checks
        .push(Check::fail("nginx served", reach::diagnose(&dump, sites.dir(), &sites.path_for(slug), listen, &answer)));
    checks
}

/// `doctor-<random>-…`, padded to the longest DNS label.
fn probe_slug() -> Slug {
    let mut name = format!("doctor-{:016x}-", rand::random::<u64>());
    while name.len() < LONGEST_LABEL {
        name.push('x');
    }
    Slug::parse(&name).unwrap_or_else(|_| unreachable!("a fixed pattern of letters, digits and dashes"))
}

/// Answers every connection with a small 200, like a preview's app would.
async fn answer_ok(listener: tokio::net::TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await;
            let answer = "HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\npreviewd doctor\n";
            let _ = stream.write_all(answer.as_bytes()).await;
        });
    }
}

pub fn port_checks(config: &Config) -> Vec<Check> {
    vec![port("api port", config.listen, "listen"), port("nginx port", config.nginx.listen, "nginx.listen")]
}

fn port(name: &str, addr: SocketAddr, key: &str) -> Check {
    if addr.port() == 0 {
        return Check::ok(name, format!("{addr}: a free port is picked at start"));
    }
    match TcpListener::bind(addr) {
        Ok(_) => return Check::ok(name, format!("{addr} is free")),
        Err(err) if err.kind() != std::io::ErrorKind::AddrInUse => {
            return Check::fail(name, format!("cannot listen on {addr} ({err}): change {key}"));
        }
        Err(_) => {}
    }
    match listener_of(addr.port()) {
        Some((pid, program)) if program == "nginx" || program == "previewd" => {
            Check::ok(name, format!("{addr} is held by {program} (pid {pid})"))
        }
        Some((pid, program)) => {
            Check::fail(name, format!("{addr} is taken by {program} (pid {pid}): stop it, or change {key}"))
        }
        None => Check::warn(
            name,
            format!("{addr} is taken by a process doctor may not see: run as root to name it, or change {key}"),
        ),
    }
}

/// The process listening on a TCP port, from /proc: the socket's inode in /proc/net/tcp{,6},
/// then the process holding a descriptor of it.
fn listener_of(port: u16) -> Option<(u32, String)> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    let processes = std::fs::read_dir("/proc").ok()?;
    for entry in processes.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| {
            let target = target.to_string_lossy();
            inodes.iter().any(|inode| target == format!("socket:[{inode}]"))
        });
        if holds {
            let comm =
                std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_owned()));
        }
    }
    None
}

/// Inodes of the sockets listening on `port` in a /proc/net/tcp table.
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == LISTEN;
            listening.then(|| fields.get(9).map(|inode| (*inode).to_owned())).flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_name_is_as_long_as_a_dns_label_can_be() {
        assert_eq!(probe_slug().as_ref().len(), LONGEST_LABEL);
    }

    #[test]
    fn a_listening_socket_is_found_in_the_proc_table_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                     0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0\n   \
                     1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0\n";
        assert_eq!(listening_inodes(table, 8080), ["4242"]);
        assert!(listening_inodes(table, 8081).is_empty());
    }

    #[test]
    fn a_port_held_by_this_test_is_named_with_its_process() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (pid, _) = listener_of(addr.port()).expect("this process holds the port");
        assert_eq!(pid, std::process::id());
        let check = port("api port", addr, "listen");
        assert_eq!(check.level, super::super::Level::Fail, "{check}");
    }
}
