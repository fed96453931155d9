//! `previewd doctor`: checks a deployment end to end before users find what is wrong, and prints
//! one line per check, `ok`, `warn` or `FAIL`, each failing line saying what to change. The
//! checks themselves live beside: `engine` (Docker and the images), `web` (nginx and the ports),
//! `names` (DNS), `github` (the token, its permissions and the webhooks).

pub mod engine;
mod github;
mod names;
mod web;

use std::fmt;
use std::path::Path;

use crate::config::Config;
use crate::nginx::vhost::VhostTemplate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    /// Short and stable, e.g. `nginx served`: what tests and people grep for.
    pub name: String,
    /// What was found; for `warn` and `FAIL`, also what to do.
    pub message: String,
}

impl Check {
    pub fn ok(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self { level: Level::Ok, name: name.into(), message: message.into() }
    }

    pub fn warn(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self { level: Level::Warn, name: name.into(), message: message.into() }
    }

    pub fn fail(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self { level: Level::Fail, name: name.into(), message: message.into() }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<16}  {}", self.level, self.name, self.message.replace('\n', " "))
    }
}

/// Every check of the deployment `config_path` describes, in the order they are printed. Only a
/// config that does not load stops the rest.
pub async fn run(config_path: &Path) -> Vec<Check> {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(err) => return vec![Check::fail("config", err.to_string().trim_end().to_owned())],
    };
    let mut checks = vec![Check::ok(
        "config",
        format!(
            "{} parses (instance {}, {} image(s), previews at *.{})",
            config_path.display(),
            config.instance,
            config.images.len(),
            config.base_domain
        ),
    )];
    for (line, refused) in config.unsafe_settings() {
        checks.push(if refused { Check::fail("isolation", line) } else { Check::warn("isolation", line) });
    }
    let template = match VhostTemplate::load(&config.nginx.template, &config.trusted_proxies) {
        Ok(template) => {
            match template.check_traffic(&config.nginx.template) {
                Err(err) if config.lifecycle.follows_traffic() => checks.push(Check::fail("template", err)),
                _ => checks.push(Check::ok("template", format!("{} renders", config.nginx.template.display()))),
            }
            Some(template)
        }
        Err(err) => {
            checks.push(Check::fail("template", err));
            None
        }
    };
    checks.extend(engine::checks(&config).await);
    checks.extend(web::nginx_checks(&config, template.as_ref()).await);
    checks.extend(names::checks(&config).await);
    if let Some(github) = &config.github {
        checks.extend(github::checks(&config, github).await);
    }
    checks.extend(web::port_checks(&config));
    checks
}

/// The worst level in a report: `Fail` makes `doctor` exit non-zero.
pub fn worst(checks: &[Check]) -> Level {
    checks.iter().map(|check| check.level).max().unwrap_or(Level::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_line_shows_level_name_and_message_on_one_line() {
        let line = Check::fail("nginx served", "nginx does not serve /x:\nadd it").to_string();
        assert_eq!(line, "FAIL  nginx served      nginx does not serve /x: add it");
        assert_eq!(Check::ok("config", "fine").to_string(), "ok    config            fine");
    }

    #[test]
    fn one_failing_check_fails_the_report_and_warnings_do_not() {
        assert_eq!(worst(&[Check::ok("a", ""), Check::warn("b", "")]), Level::Warn);
        assert_eq!(worst(&[Check::fail("a", ""), Check::warn("b", "")]), Level::Fail);
        assert_eq!(worst(&[]), Level::Ok);
    }
}
