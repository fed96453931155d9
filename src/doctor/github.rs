//! The GitHub checks: the token works, it may comment and create deployments on each listed
//! repository, the webhook secret is set, and the repositories' webhooks deliver to this host.

use super::Check;
use crate::config::Config;
use crate::config::github::GitHubConfig;
use crate::github::client::{ApiCallError, GitHubApi};

/// GitHub's advice is a long random string; shorter ones are guessable.
const SHORT_SECRET: usize = 16;
const WEBHOOK_PATHS: [&str; 2] = ["/webhooks/github", "/event_receiver"];

pub async fn checks(config: &Config, github: &GitHubConfig) -> Vec<Check> {
    let mut checks = vec![secret(github)];
    let api = match GitHubApi::new(&github.api_url, github.token.expose()) {
        Ok(api) => api,
        Err(err) => {
            checks.push(Check::fail("github token", err.to_string()));
            return checks;
        }
    };
    match api.user().await {
        Ok(login) => checks.push(Check::ok("github token", format!("{} accepts the token of {login}", github.api_url))),
        Err(err) => {
            checks.push(token_refused(&github.api_url, &err));
            return checks;
        }
    }
    for repo in github.repos.values() {
        checks.push(write_access(&api, &repo.full_name).await);
        checks.push(hooks(&api, config, &repo.full_name).await);
    }
    checks
}

fn secret(github: &GitHubConfig) -> Check {
    let length = github.webhook_secret.expose().len();
    if length < SHORT_SECRET {
        Check::warn(
            "webhook secret",
            format!(
                "set, but only {length} characters: use a long random one (openssl rand -hex 32) here and in GitHub"
            ),
        )
    } else {
        Check::ok("webhook secret", format!("set ({length} characters)"))
    }
}

fn token_refused(api_url: &str, err: &ApiCallError) -> Check {
    let fix = match err {
        ApiCallError::Status { status: 401, .. } => {
            "the token is wrong, expired or revoked: create a new one and put it where github.token_file/token_env says"
        }
        ApiCallError::Status { .. } => "see GitHub's message",
        _ => "check that previewd's host reaches the GitHub API (proxy, firewall, github.api_url)",
    };
    Check::fail("github token", format!("{api_url}/user: {err}: {fix}"))
}

async fn write_access(api: &GitHubApi, repo: &str) -> Check {
    let name = format!("github {repo}");
    match api.repo_permissions(repo).await {
        Ok(permissions) if permissions.push || permissions.admin => {
            Check::ok(name, "the token may comment and create deployments (push access)")
        }
        Ok(permissions) => Check::fail(
            name,
            format!(
                "the token may not write to {repo} ({}): previewd cannot comment or create deployments; give its \
                 owner write access, and a fine-grained token \"Pull requests\" and \"Deployments\" read and write",
                if permissions.pull { "read access only" } else { "no access" }
            ),
        ),
        Err(ApiCallError::Status { status: 404, .. }) => Check::fail(
            name,
            format!(
                "{repo} does not exist or the token may not see it: check the name in github.repos and the token's repositories"
            ),
        ),
        Err(err) => Check::fail(name, format!("cannot read {repo}: {err}")),
    }
}

async fn hooks(api: &GitHubApi, config: &Config, repo: &str) -> Check {
    let name = format!("webhook {repo}");
    let expected = format!("https://{}/webhooks/github", config.base_domain);
    let urls = match api.hook_urls(repo).await {
        Ok(urls) => urls,
        Err(ApiCallError::Status { status: 403 | 404, .. }) => {
            return Check::warn(
                name,
                format!(
                    "the token may not read {repo}'s webhooks (that needs admin): check by hand that one delivers pull_request events to {expected}"
                ),
            );
        }
        Err(err) => return Check::warn(name, format!("cannot read {repo}'s webhooks: {err}")),
    };
    match urls.iter().find(|url| delivers_here(url, config.base_domain.as_ref())) {
        Some(url) => Check::ok(name, format!("delivers to {url}")),
        None if urls.is_empty() => Check::fail(
            name,
            format!(
                "{repo} has no active webhook: add one (Settings → Webhooks) with payload URL {expected}, content type application/json, the webhook secret, and the pull request event"
            ),
        ),
        None => Check::warn(
            name,
            format!(
                "no active webhook of {repo} delivers to this host (they go to {}): add one for {expected}",
                urls.join(", ")
            ),
        ),
    }
}

/// Whether a webhook URL is previewd's on this deployment: the base domain's host (or this
/// host's address) and one of previewd's webhook paths.
fn delivers_here(url: &str, base_domain: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")) else { return false };
    let (authority, path) = rest.split_once('/').map_or((rest, "/"), |(authority, path)| (authority, path));
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = host.rsplit_once(':').map_or(host, |(host, _port)| host);
    let path = format!("/{}", path.split('?').next().unwrap_or_default());
    host.eq_ignore_ascii_case(base_domain) && WEBHOOK_PATHS.contains(&path.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_to_the_base_domain_on_previewds_path_delivers_here() {
        assert!(delivers_here("https://preview.example.com/webhooks/github", "preview.example.com"));
        assert!(delivers_here("https://user:pw@preview.example.com:8443/event_receiver", "preview.example.com"));
        assert!(!delivers_here("https://ci.example.com/webhooks/github", "preview.example.com"));
        assert!(!delivers_here("https://preview.example.com/other", "preview.example.com"));
    }
}
