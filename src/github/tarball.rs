//! A commit's source as GitHub serves it: `GET /repos/{owner}/{repo}/tarball/{sha}` answers
//! `302 Found` with a `Location` on another host (codeload.github.com), whose answer is the
//! gzip'd tarball. The redirect is followed by hand: the token goes to the API's host only,
//! never to the host a redirect names. The tarball streams to a file, and stops at a size limit.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, LOCATION, USER_AGENT};
use tokio::io::AsyncWriteExt;

use super::client::{ApiCallError, GitHubApi};

/// Redirects followed before giving up (GitHub uses one).
const MAX_REDIRECTS: usize = 5;
/// A download that gets no byte for this long has stalled.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Downloads {
    http: reqwest::Client,
    api: reqwest::Url,
    token: String,
}

/// Scheme, host and port: where a token may be sent.
fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme() && a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}

impl Downloads {
    pub fn new(api_url: &str, token: &str) -> Result<Self, ApiCallError> {
        let api = reqwest::Url::parse(&format!("{}/", api_url.trim_end_matches('/')))
            .map_err(|err| ApiCallError::Setup(format!("github.api_url: {err}")))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|err| ApiCallError::Setup(err.to_string()))?;
        Ok(Self { http, api, token: token.to_owned() })
    }
}

async fn error_of(response: reqwest::Response) -> ApiCallError {
    let status = response.status().as_u16();
    let limited = super::client::rate_limit(status, response.headers(), crate::clock::unix_now().max(0) as u64);
    if let Some(retry_after) = limited {
        return ApiCallError::RateLimited { status, retry_after };
    }
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect());
    ApiCallError::Status { status, message }
}

impl GitHubApi {
    /// Writes the tarball of `repo` at `sha` to `dest`; its size. More than `max_bytes` fails.
    pub async fn download_tarball(
        &self,
        repo: &str,
        sha: &str,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, ApiCallError> {
        let result = self.downloads.fetch(repo, sha, dest, max_bytes).await;
        self.count(result.is_ok());
        result
    }
}

impl Downloads {
    async fn fetch(&self, repo: &str, sha: &str, dest: &Path, max_bytes: u64) -> Result<u64, ApiCallError> {
        let transport = |err: reqwest::Error| ApiCallError::Transport(crate::error_chain(&err));
        let mut url = self
            .api
            .join(&format!("repos/{repo}/tarball/{sha}"))
            .map_err(|err| ApiCallError::Setup(err.to_string()))?;
        for _ in 0..=MAX_REDIRECTS {
            let mut request =
                self.http.get(url.clone()).header(USER_AGENT, "previewd").header(ACCEPT, "application/vnd.github+json");
            if same_origin(&url, &self.api) {
                request = request.header(AUTHORIZATION, format!("Bearer {}", self.token));
            }
            let response = request.send().await.map_err(transport)?;
            let status = response.status();
            if status.is_redirection() {
                let location =
                    response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
                        ApiCallError::Transport(format!("GitHub answered {status} without a Location"))
                    })?;
                url = url
                    .join(location)
                    .map_err(|err| ApiCallError::Transport(format!("bad Location {location:?}: {err}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(error_of(response).await);
            }
            return save(response, dest, max_bytes).await;
        }
        Err(ApiCallError::Transport(format!("more than {MAX_REDIRECTS} redirects for the tarball of {repo}@{sha}")))
    }
}

async fn save(response: reqwest::Response, dest: &Path, max_bytes: u64) -> Result<u64, ApiCallError> {
    let io =
        |err: std::io::Error| ApiCallError::Transport(format!("cannot write the tarball to {}: {err}", dest.display()));
    let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
    let mut body = response.bytes_stream();
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|err| ApiCallError::Transport(crate::error_chain(&err)))?;
        written += chunk.len() as u64;
        if written > max_bytes {
            return Err(ApiCallError::TooLarge(max_bytes));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_only_to_the_apis_own_origin() {
        let api = reqwest::Url::parse("https://api.github.com/").unwrap();
        let same = reqwest::Url::parse("https://api.github.com:443/repos/a/b/tarball/x").unwrap();
        assert!(same_origin(&api, &same));
        for other in [
            "https://codeload.github.com/a/b/legacy.tar.gz/x",
            "http://api.github.com/x",
            "https://api.github.com:8443/x",
        ] {
            assert!(!same_origin(&api, &reqwest::Url::parse(other).unwrap()), "{other}");
        }
    }
}
