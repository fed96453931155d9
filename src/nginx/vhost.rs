//! Renders one preview's nginx server block from the operator's Tera template. Only validated
//! types reach the template context: Tera does not escape `.conf` output, so nothing else may.

use std::net::SocketAddr;
use std::path::Path;

use serde::Serialize;
use tera::{Context, Tera};

use crate::preview::{Host, InstanceName, Slug};

const NAME: &str = "vhost";

/// What a vhost template can use: `{{ instance }}`, `{{ slug }}`, `{{ host }}`, `{{ listen }}`,
/// `{{ upstream }}` (`address:port` nginx proxies to: `127.0.0.1:<port>` on one engine, the
/// node of the task on a Swarm), `{{ upstream_port }}` (its port alone), `{{ probe }}`, the location previewd checks each route through
/// (required: see [`super::reach`]), `{{ real_ip }}`, the real-IP directives for
/// `trusted_proxies` (empty without them; required with them), and `{{ traffic }}`, the access
/// log that tells previewd of each request (see `crate::traffic`; required with
/// `lifecycle.sleep_after`).
#[derive(Debug, Serialize)]
pub struct Vhost<'a> {
    pub instance: &'a InstanceName,
    pub slug: &'a Slug,
    pub host: &'a Host,
    pub listen: SocketAddr,
    pub upstream: String,
    pub upstream_port: u16,
    probe: String,
    /// Empty when previewd does not follow traffic.
    pub traffic: String,
}

impl<'a> Vhost<'a> {
    pub fn new(
        instance: &'a InstanceName,
        slug: &'a Slug,
        host: &'a Host,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> Self {
        let probe = super::reach::probe_location(&upstream.to_string());
        let (upstream_port, upstream) = (upstream.port(), upstream.to_string());
        Self { instance, slug, host, listen, upstream, upstream_port, probe, traffic: String::new() }
    }
}

pub struct VhostTemplate {
    tera: Tera,
    /// nginx's real-IP module set to believe `X-Forwarded-For` from these proxies only.
    real_ip: String,
}

/// The directives that make nginx take the client address from `X-Forwarded-For` when the
/// request comes from a trusted proxy (and only then). Networks are validated, so they are safe
/// to write into nginx's config.
fn real_ip_directives(trusted_proxies: &[ipnet::IpNet]) -> String {
    if trusted_proxies.is_empty() {
        return String::new();
    }
    let mut block: String = trusted_proxies.iter().map(|net| format!("set_real_ip_from {net};\n    ")).collect();
    block.push_str("real_ip_header X-Forwarded-For;\n    real_ip_recursive on;");
    block
}

impl VhostTemplate {
    /// Loads the template and renders it once with sample values, so a broken template is found
    /// at start-up and by `check-config`, not at the first launch.
    pub fn load(path: &Path, trusted_proxies: &[ipnet::IpNet]) -> Result<Self, String> {
        let mut tera = Tera::new();
        tera.autoescape_on(Vec::<&str>::new());
        tera.add_template_file(path, Some(NAME))
            .map_err(|err| format!("cannot load template {}: {}", path.display(), crate::error_chain(&err)))?;
        let template = Self { tera, real_ip: real_ip_directives(trusted_proxies) };
        let instance = InstanceName::parse("sample").map_err(|err| err.to_string())?;
        let slug = Slug::parse("sample").map_err(|err| err.to_string())?;
        let host = crate::preview::BaseDomain::parse("example.com").map_err(|e| e.to_string())?.host_for(&slug);
        let sample = Vhost::new(&instance, &slug, &host, ([127, 0, 0, 1], 80).into(), ([127, 0, 0, 1], 1).into());
        let rendered = template.render(&sample).map_err(|err| format!("template {}: {err}", path.display()))?;
        if !rendered.contains(super::reach::PROBE_PATH) {
            return Err(format!(
                "template {} does not use {{{{ probe }}}}: put it inside the server block; previewd requests it after \
                 each route change to prove nginx serves the preview",
                path.display()
            ));
        }
        if !template.real_ip.is_empty() && !rendered.contains("set_real_ip_from") {
            return Err(format!(
                "template {} does not use {{{{ real_ip }}}}, so trusted_proxies would have no effect: put it inside \
                 the server block",
                path.display()
            ));
        }
        Ok(template)
    }

    /// With `lifecycle.sleep_after`, previews sleep when nginx reports no request for them: a
    /// template without `{{ traffic }}` would put every preview to sleep however busy it is.
    pub fn check_traffic(&self, path: &Path) -> Result<(), String> {
        let instance = InstanceName::parse("sample").map_err(|err| err.to_string())?;
        let slug = Slug::parse("sample").map_err(|err| err.to_string())?;
        let host = crate::preview::BaseDomain::parse("example.com").map_err(|e| e.to_string())?.host_for(&slug);
        let mut sample = Vhost::new(&instance, &slug, &host, ([127, 0, 0, 1], 80).into(), ([127, 0, 0, 1], 1).into());
        sample.traffic = "access_log syslog:server=127.0.0.1:9,tag=sample combined;".to_owned();
        let rendered = self.render(&sample).map_err(|err| format!("template {}: {err}", path.display()))?;
        if rendered.contains(&sample.traffic) {
            return Ok(());
        }
        Err(format!(
            "template {} does not use {{{{ traffic }}}}, so previewd would not see requests and lifecycle.sleep_after \
             (and remove_after, quiet_hours) would put busy previews to sleep or remove them: put it inside the \
             server block",
            path.display()
        ))
    }

    /// On a Swarm previews run on other nodes: a template that proxies to
    /// `127.0.0.1:{{ upstream_port }}` would send every preview's traffic to the manager.
    pub fn check_upstream_address(&self, path: &Path) -> Result<(), String> {
        let instance = InstanceName::parse("sample").map_err(|err| err.to_string())?;
        let slug = Slug::parse("sample").map_err(|err| err.to_string())?;
        let host = crate::preview::BaseDomain::parse("example.com").map_err(|e| e.to_string())?.host_for(&slug);
        let remote: SocketAddr = ([192, 0, 2, 1], 4711).into();
        let sample = Vhost::new(&instance, &slug, &host, ([127, 0, 0, 1], 80).into(), remote);
        let rendered = self.render(&sample).map_err(|err| format!("template {}: {err}", path.display()))?;
        if rendered.contains(&format!("proxy_pass http://{remote}")) {
            return Ok(());
        }
        Err(format!(
            "template {} does not proxy to {{{{ upstream }}}} (`proxy_pass http://{{{{ upstream }}}};`), which \
             runtime.kind: swarm needs: previews run on other nodes than 127.0.0.1",
            path.display()
        ))
    }

    pub fn render(&self, vhost: &Vhost<'_>) -> Result<String, String> {
        let mut context = Context::from_serialize(vhost).map_err(|err| crate::error_chain(&err))?;
        context.insert("real_ip", &self.real_ip);
        self.tera.render(NAME, &context).map_err(|err| crate::error_chain(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `feature-x.preview.localhost` on 127.0.0.1:8080, routed to 127.0.0.1:`upstream_port`.
    fn render_sample(template: &VhostTemplate, upstream_port: u16) -> String {
        let upstream_port: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        let instance = InstanceName::parse("default").unwrap();
        let slug = Slug::parse("feature-x").unwrap();
        let host = crate::preview::BaseDomain::parse("preview.localhost").unwrap().host_for(&slug);
        template.render(&Vhost::new(&instance, &slug, &host, ([127, 0, 0, 1], 8080).into(), upstream_port)).unwrap()
    }

    #[test]
    fn shipped_template_routes_the_host_to_the_loopback_port() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera");
        let conf = render_sample(&VhostTemplate::load(&path, &[]).unwrap(), 49153);
        assert!(conf.contains("listen 127.0.0.1:8080;"), "{conf}");
        assert!(conf.contains("server_name feature-x.preview.localhost;"), "{conf}");
        assert!(conf.contains("proxy_pass http://127.0.0.1:49153;"), "{conf}");
        assert!(conf.contains("add_header X-Previewd-Upstream \"127.0.0.1:49153\" always;"), "{conf}");
    }

    #[test]
    fn with_trusted_proxies_the_shipped_template_believes_their_forwarded_for_only() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera");
        let proxies = ["10.0.0.0/8".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
        let conf = render_sample(&VhostTemplate::load(&path, &proxies).unwrap(), 1);
        assert!(conf.contains("set_real_ip_from 10.0.0.0/8;") && conf.contains("set_real_ip_from 192.0.2.7/32;"));
        assert!(conf.contains("real_ip_header X-Forwarded-For;"), "{conf}");
        let conf = render_sample(&VhostTemplate::load(&path, &[]).unwrap(), 1);
        assert!(!conf.contains("real_ip"), "{conf}");
    }

    #[test]
    fn with_trusted_proxies_a_template_without_real_ip_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("custom.tera");
        std::fs::write(&path, "server { listen {{ listen }}; server_name {{ host }}; {{ probe }} }").unwrap();
        assert!(VhostTemplate::load(&path, &[]).is_ok());
        let err = VhostTemplate::load(&path, &["10.0.0.0/8".parse().unwrap()]).err().unwrap();
        assert!(err.contains("{{ real_ip }}") && err.contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn a_template_without_the_probe_location_is_refused_at_load_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.tera");
        std::fs::write(&path, "server { listen {{ listen }}; server_name {{ host }}; }").unwrap();
        let err = VhostTemplate::load(&path, &[]).err().expect("a template without the probe must be refused");
        assert!(err.contains("{{ probe }}") && err.contains("old.tera"), "{err}");
    }

    #[test]
    fn the_shipped_template_logs_requests_for_previewd_and_a_template_without_it_is_refused_for_sleep() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera");
        assert!(VhostTemplate::load(&path, &[]).unwrap().check_traffic(&path).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("custom.tera");
        std::fs::write(&path, "server { listen {{ listen }}; server_name {{ host }}; {{ probe }} }").unwrap();
        let err = VhostTemplate::load(&path, &[]).unwrap().check_traffic(&path).unwrap_err();
        assert!(err.contains("{{ traffic }}") && err.contains("sleep_after"), "{err}");
    }

    #[test]
    fn a_template_with_a_syntax_error_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tera");
        std::fs::write(&path, "server { {{ slug ").unwrap();
        let err = VhostTemplate::load(&path, &[]).err().expect("a broken template must be refused");
        assert!(err.contains("bad.tera"), "{err}");
    }

    #[test]
    fn a_template_using_an_unknown_variable_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unknown.tera");
        std::fs::write(&path, "server_name {{ nope }};").unwrap();
        assert!(VhostTemplate::load(&path, &[]).is_err());
    }
}
