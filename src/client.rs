//! The command-line client: `previewd launch | kill | list | logs | login` talk to a daemon's
//! API. The server comes from `--server`, `$PREVIEWD_SERVER` or the client file; credentials
//! from `$PREVIEWD_USER`/`$PREVIEWD_PASSWORD`, `$PREVIEWD_GITHUB_TOKEN`, or the client file
//! (`~/.config/previewd/client.yml`, written by `previewd login` with mode 0600).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const DEFAULT_SERVER: &str = "http://127.0.0.1:7800";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no credentials: run `previewd login`, or set PREVIEWD_USER and PREVIEWD_PASSWORD (or PREVIEWD_GITHUB_TOKEN)"
    )]
    NoCredentials,
    #[error("cannot reach previewd at {server}: {message}")]
    Unreachable { server: String, message: String },
    #[error("{0}")]
    Refused(String),
    #[error("cannot use the client file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
}

/// What `previewd login` saves.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_token: Option<String>,
}

#[derive(Clone)]
enum Credentials {
    Basic { user: String, password: String },
    Token(String),
}

pub struct Client {
    server: String,
    credentials: Credentials,
    http: reqwest::Client,
}

pub fn client_file_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("previewd").join("client.yml")
}

fn read_client_file() -> Result<ClientFile, ClientError> {
    let path = client_file_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_norway::from_str(&text).map_err(|err| ClientError::File { path, message: err.to_string() }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ClientFile::default()),
        Err(err) => Err(ClientError::File { path, message: err.to_string() }),
    }
}

/// Saves the client file with mode 0600, atomically.
pub fn write_client_file(file: &ClientFile) -> Result<PathBuf, ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = client_file_path();
    let failure = |err: &dyn std::fmt::Display| ClientError::File { path: path.clone(), message: err.to_string() };
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    std::fs::create_dir_all(&dir).map_err(|e| failure(&e))?;
    let text = serde_norway::to_string(file).map_err(|e| failure(&e))?;
    let temp = dir.join(format!(".client.yml.{:08x}", rand::random::<u32>()));
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(|e| failure(&e))?;
    out.write_all(text.as_bytes()).and_then(|()| out.sync_all()).map_err(|e| failure(&e))?;
    std::fs::rename(&temp, &path).map_err(|e| failure(&e))?;
    Ok(path)
}

impl Client {
    /// A client for `server` (or `$PREVIEWD_SERVER`, the client file, the default).
    pub fn from_environment(server: Option<String>) -> Result<Self, ClientError> {
        let file = read_client_file()?;
        let server = server.or(file.server.clone()).unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let credentials = match (env("PREVIEWD_USER"), env("PREVIEWD_PASSWORD"), env("PREVIEWD_GITHUB_TOKEN")) {
            (Some(user), Some(password), _) => Credentials::Basic { user, password },
            (_, _, Some(token)) => Credentials::Token(token),
            _ => match (file.user, file.password, file.github_token) {
                (Some(user), Some(password), _) => Credentials::Basic { user, password },
                (_, _, Some(token)) => Credentials::Token(token),
                _ => return Err(ClientError::NoCredentials),
            },
        };
        Ok(Self::new(server, credentials))
    }

    fn new(server: String, credentials: Credentials) -> Self {
        let http =
            reqwest::Client::builder().no_proxy().connect_timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Self { server: server.trim_end_matches('/').to_owned(), credentials, http }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.server));
        match &self.credentials {
            Credentials::Basic { user, password } => request.basic_auth(user, Some(password)),
            Credentials::Token(token) => request.bearer_auth(token),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|err| ClientError::Unreachable { server: self.server.clone(), message: err.to_string() })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"].as_str().map_or_else(|| format!("previewd answered {status}"), str::to_owned);
        Err(ClientError::Refused(message))
    }

    /// Launches and reports each step to `on_step` as the daemon takes it; returns the preview.
    pub async fn launch(
        &self,
        image: &str,
        name: &str,
        env: &[(String, String)],
        mut on_step: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let mut fields =
            vec![("image_name".to_owned(), image.to_owned()), ("container_name".to_owned(), name.to_owned())];
        fields.extend(env.iter().cloned());
        let form = serde_urlencoded::to_string(&fields).map_err(|err| ClientError::Usage(err.to_string()))?;
        let request = self
            .request(reqwest::Method::POST, "/launch")
            .header("accept", "application/x-ndjson")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form);
        let response = self.send(request).await?;
        let mut body = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|err| ClientError::Unreachable { server: self.server.clone(), message: err.to_string() })?;
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(event) = serde_json::from_slice::<Value>(&line) else { continue };
                match event["step"].as_str() {
                    Some("ready") => return Ok(event["preview"].clone()),
                    Some("failed") => {
                        return Err(ClientError::Refused(
                            event["error"].as_str().unwrap_or("the launch failed").to_owned(),
                        ));
                    }
                    _ => on_step(&event),
                }
            }
        }
        Err(ClientError::Unreachable { server: self.server.clone(), message: "the launch answer ended early".into() })
    }

    pub async fn kill(&self, name: &str) -> Result<(), ClientError> {
        let request = self
            .request(reqwest::Method::POST, "/kill")
            .header("accept", "application/json")
            .form(&[("container_name", name)]);
        self.send(request).await.map(drop)
    }

    pub async fn list(&self) -> Result<Vec<Value>, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, "/api/previews")).await?;
        response.json().await.map_err(|err| ClientError::Refused(format!("previewd's answer is not a list: {err}")))
    }

    /// Puts a preview's data back as at its first launch; the preview once it answers again.
    pub async fn reset(&self, name: &str) -> Result<Value, ClientError> {
        let path = format!("/api/previews/{}/reset", urlencode(name));
        let response = self.send(self.request(reqwest::Method::POST, &path)).await?;
        response.json().await.map_err(|err| ClientError::Refused(format!("previewd's answer is not a preview: {err}")))
    }

    /// Copies a preview's log (or one of its services') to `out`, following it when asked,
    /// until it ends.
    pub async fn logs(
        &self,
        name: &str,
        service: Option<&str>,
        tail: usize,
        follow: bool,
        out: &mut impl Write,
    ) -> Result<(), ClientError> {
        let mut path = format!("/api/previews/{}/logs?tail={tail}&follow={follow}", urlencode(name));
        if let Some(service) = service {
            path.push_str(&format!("&service={}", urlencode(service)));
        }
        let response = self.send(self.request(reqwest::Method::GET, &path)).await?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|err| ClientError::Unreachable { server: self.server.clone(), message: err.to_string() })?;
            match out.write_all(&chunk).and_then(|()| out.flush()) {
                Ok(()) => {}
                // `previewd logs NAME | head`: the reader has all it wanted.
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(err) => return Err(ClientError::Usage(err.to_string())),
            }
        }
        Ok(())
    }

    /// Checks credentials by listing previews.
    pub async fn check(&self) -> Result<(), ClientError> {
        self.list().await.map(drop)
    }

    pub fn for_login(server: String, user: Option<String>, secret: String) -> Self {
        let credentials = match user {
            Some(user) => Credentials::Basic { user, password: secret },
            None => Credentials::Token(secret),
        };
        Self::new(server, credentials)
    }
}

fn urlencode(text: &str) -> String {
    serde_urlencoded::to_string([("", text)]).map(|s| s.trim_start_matches('=').to_owned()).unwrap_or_default()
}

/// The `previewd list` table: name, image, PR, commit, status, services, age, URL.
pub fn table(previews: &[Value]) -> String {
    let now = crate::clock::unix_now();
    let header = ["NAME", "IMAGE", "PR", "COMMIT", "STATUS", "SERVICES", "AGE", "URL"];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    for preview in previews {
        let text = |key: &str| preview[key].as_str().unwrap_or("-").to_owned();
        let pr = match (preview["repo"].as_str(), preview["pr"].as_u64()) {
            (Some(repo), Some(number)) => format!("{repo}#{number}"),
            _ => "-".to_owned(),
        };
        let commit = preview["sha"].as_str().map_or("-".to_owned(), |sha| sha.chars().take(7).collect());
        let status = if preview["routed"].as_bool() == Some(false) {
            format!("{} (unrouted)", text("status"))
        } else {
            text("status")
        };
        let age = crate::clock::age(now - preview["created"].as_i64().unwrap_or(now));
        rows.push(vec![text("name"), text("image"), pr, commit, status, services(preview), age, text("url")]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            cells.join("  ").trim_end().to_owned() + "\n"
        })
        .collect()
}

/// `db:running,cache:exited`, or `-` for a preview without services.
fn services(preview: &Value) -> String {
    let list = preview["services"].as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return "-".to_owned();
    }
    let entry = |s: &Value| format!("{}:{}", s["name"].as_str().unwrap_or("?"), s["status"].as_str().unwrap_or("?"));
    list.iter().map(entry).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_a_row_per_preview_with_pr_commit_and_age() {
        let now = crate::clock::unix_now();
        let previews = [
            json!({"name": "a", "image": "demo", "status": "running", "routed": true, "created": now - 125, "url": "http://a",
                   "services": [{"name": "db", "status": "running"}, {"name": "cache", "status": "exited"}]}),
            json!({"name": "hello-world-pr-2", "image": "demo", "status": "running", "routed": false, "created": now - 7200,
                   "url": "http://h", "repo": "Codertocat/Hello-World", "pr": 2, "sha": "ec26c3e57ca3a959"}),
        ];
        let text = table(&previews);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(lines[1].contains("2m") && lines[1].contains("http://a"), "{text}");
        assert!(lines[0].contains("SERVICES") && lines[1].contains("db:running,cache:exited"), "{text}");
        assert!(
            lines[2].contains("Codertocat/Hello-World#2")
                && lines[2].contains("ec26c3e")
                && lines[2].contains("(unrouted)")
                && lines[2].contains("2h"),
            "{text}"
        );
    }
}
