//! Renders one preview's nginx server block from the operator's Tera template. Only validated
//! types reach the template context: Tera does not escape `.conf` output, so nothing else may.

use std::net::SocketAddr;
use std::path::Path;

use serde::Serialize;
use tera::{Context, Tera};

use crate::preview::{Host, InstanceName, Slug};

const NAME: &str = "vhost";

/// What a vhost template can use: `{{ instance }}`, `{{ slug }}`, `{{ host }}`, `{{ listen }}`,
/// `{{ upstream_port }}`.
#[derive(Debug, Serialize)]
pub struct Vhost<'a> {
    pub instance: &'a InstanceName,
    pub slug: &'a Slug,
    pub host: &'a Host,
    pub listen: SocketAddr,
    pub upstream_port: u16,
}

pub struct VhostTemplate {
    tera: Tera,
}

impl VhostTemplate {
    /// Loads the template and renders it once with sample values, so a broken template is found
    /// at start-up and by `check-config`, not at the first launch.
    pub fn load(path: &Path) -> Result<Self, String> {
        let mut tera = Tera::new();
        tera.autoescape_on(Vec::<&str>::new());
        tera.add_template_file(path, Some(NAME))
            .map_err(|err| format!("cannot load template {}: {}", path.display(), crate::error_chain(&err)))?;
        let template = Self { tera };
        let instance = InstanceName::parse("sample").map_err(|err| err.to_string())?;
        let slug = Slug::parse("sample").map_err(|err| err.to_string())?;
        let host = crate::preview::BaseDomain::parse("example.com").map_err(|e| e.to_string())?.host_for(&slug);
        let sample = Vhost {
            instance: &instance,
            slug: &slug,
            host: &host,
            listen: ([127, 0, 0, 1], 80).into(),
            upstream_port: 1,
        };
        template.render(&sample).map_err(|err| format!("template {}: {err}", path.display()))?;
        Ok(template)
    }

    pub fn render(&self, vhost: &Vhost<'_>) -> Result<String, String> {
        let context = Context::from_serialize(vhost).map_err(|err| crate::error_chain(&err))?;
        self.tera.render(NAME, &context).map_err(|err| crate::error_chain(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_template_routes_the_host_to_the_loopback_port() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/vhost.conf.tera");
        let template = VhostTemplate::load(&path).unwrap();
        let instance = InstanceName::parse("default").unwrap();
        let slug = Slug::parse("feature-x").unwrap();
        let host = crate::preview::BaseDomain::parse("preview.localhost").unwrap().host_for(&slug);
        let vhost = Vhost {
            instance: &instance,
            slug: &slug,
            host: &host,
            listen: ([127, 0, 0, 1], 8080).into(),
            upstream_port: 49153,
        };
        let conf = template.render(&vhost).unwrap();
        assert!(conf.contains("listen 127.0.0.1:8080;"), "{conf}");
        assert!(conf.contains("server_name feature-x.preview.localhost;"), "{conf}");
        assert!(conf.contains("proxy_pass http://127.0.0.1:49153;"), "{conf}");
    }

    #[test]
    fn a_template_with_a_syntax_error_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tera");
        std::fs::write(&path, "server { {{ slug ").unwrap();
        let err = VhostTemplate::load(&path).err().expect("a broken template must be refused");
        assert!(err.contains("bad.tera"), "{err}");
    }

    #[test]
    fn a_template_using_an_unknown_variable_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unknown.tera");
        std::fs::write(&path, "server_name {{ nope }};").unwrap();
        assert!(VhostTemplate::load(&path).is_err());
    }
}
