//! The command-line client: `previewd launch | kill | list | logs | login` talk to a daemon's
//! API. The server comes from `--server`, `$PREVIEWD_SERVER` or the client file; credentials
//! from `$PREVIEWD_USER`/`$PREVIEWD_PASSWORD`, `$PREVIEWD_GITHUB_TOKEN`, or the client file
//! (`~/.config/previewd/client.yml`, written by `previewd login` with mode 0600).
//! `previewd launch --build DIR` streams DIR as a build context ([`context`]) to
//! `POST /api/builds`.

pub mod context;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use context::{Context, ContextError};

const DEFAULT_SERVER: &str = "http://127.0.0.1:7800";

/// How much of a build context goes into the request at a time, and how many such chunks may
/// wait for the connection: what the upload holds in memory at most.
const CONTEXT_CHUNK: usize = 64 * 1024;
const CONTEXT_CHUNKS_WAITING: usize = 8;

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
    #[error(transparent)]
    Context(ContextError),
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
        on_step: impl FnMut(&Value),
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
        self.read_steps(response, on_step).await
    }

    /// Builds the image from `dir` (sent as the build context, streamed as it is read: see
    /// [`context`]) and launches it, reporting each step to `on_step` as [`Client::launch`]
    /// does, the Dockerfile's among them; returns the preview.
    pub async fn build_launch(
        &self,
        image: &str,
        name: &str,
        dir: &Path,
        on_step: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let context = Context::open(dir).map_err(|err| match err {
            ContextError::Missing { .. } | ContextError::NotADirectory { .. } => ClientError::Usage(err.to_string()),
            err => ClientError::Context(err),
        })?;
        let (body, upload) = context_stream(move |out| context.write_tar(out).map(drop));
        let _stop = StopUpload(upload.clone());
        let path = format!("/api/builds?image={}&name={}", urlencode(image), urlencode(name));
        let request = self
            .request(reqwest::Method::POST, &path)
            .header("accept", "application/x-ndjson")
            .header("content-type", "application/x-tar")
            .body(reqwest::Body::wrap_stream(body));
        let result = match self.send(request).await {
            Ok(response) => self.read_steps(response, on_step).await,
            Err(err) => Err(err),
        };
        result.map_err(|err| {
            // A context that could not be read is why the request failed, whatever came back.
            match upload.failure.lock().unwrap_or_else(PoisonError::into_inner).take() {
                Some(failure) if !matches!(failure, ContextError::Write { .. }) => ClientError::Context(failure),
                _ => err,
            }
        })
    }

    /// Reads a launch's NDJSON answer: each step's line to `on_step` until the last, `ready`
    /// (the preview) or `failed` (its error).
    async fn read_steps(
        &self,
        response: reqwest::Response,
        mut on_step: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
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

    /// Builds in flight and queued (`GET /api/builds`).
    pub async fn builds(&self) -> Result<Vec<Value>, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, "/api/builds")).await?;
        response.json().await.map_err(|err| ClientError::Refused(format!("previewd's answer is not a list: {err}")))
    }

    /// The log of a preview's build in flight, or of its last build.
    pub async fn build_log(&self, name: &str) -> Result<String, ClientError> {
        let path = format!("/api/previews/{}/build-log", urlencode(name));
        let response = self.send(self.request(reqwest::Method::GET, &path)).await?;
        response
            .text()
            .await
            .map_err(|err| ClientError::Unreachable { server: self.server.clone(), message: err.to_string() })
    }

    /// Puts a preview's data back as at its first launch; the preview once it answers again.
    pub async fn reset(&self, name: &str) -> Result<Value, ClientError> {
        self.preview_action(name, "reset").await
    }

    /// `POST /api/previews/{name}/{action}` (reset, sleep, wake): the preview as it is after.
    pub async fn preview_action(&self, name: &str, action: &str) -> Result<Value, ClientError> {
        let path = format!("/api/previews/{}/{action}", urlencode(name));
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

/// A request body that `write` fills on a blocking thread as the body is read (at most
/// [`CONTEXT_CHUNKS_WAITING`] chunks ahead), with what the two share. If `write` fails the
/// body ends with an error, never early: the daemon must not take a cut tar for a whole one.
fn context_stream<F>(
    write: F,
) -> (impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static, Arc<Upload>)
where
    F: FnOnce(BufWriter<ChannelWriter>) -> Result<(), ContextError> + Send + 'static,
{
    let upload = Arc::new(Upload::default());
    let (sender, mut chunks) = mpsc::channel::<Bytes>(CONTEXT_CHUNKS_WAITING);
    let writing = upload.clone();
    tokio::task::spawn_blocking(move || {
        // Held until the outcome is recorded: the body ends only after that.
        let _open = sender.clone();
        let out = BufWriter::with_capacity(CONTEXT_CHUNK, ChannelWriter { sender, upload: writing.clone() });
        match write(out) {
            Ok(()) => writing.complete.store(true, Ordering::Release),
            Err(err) => *writing.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(err),
        }
    });
    let streaming = upload.clone();
    let mut ended = false;
    let body = futures_util::stream::poll_fn(move |cx| {
        if ended {
            return Poll::Ready(None);
        }
        match chunks.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(None) => {
                ended = true;
                if streaming.complete.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(std::io::Error::other("the build context could not be read"))))
                }
            }
            Poll::Pending => Poll::Pending,
        }
    });
    (body, upload)
}

/// What the thread writing a build context shares with the request body reading it.
#[derive(Default)]
struct Upload {
    /// The request is over (answered, failed or dropped): stop writing.
    stopped: AtomicBool,
    /// The whole tar is in the channel.
    complete: AtomicBool,
    /// Why the tar could not be written, recorded before the channel closes.
    failure: Mutex<Option<ContextError>>,
}

/// Stops the upload when `build_launch` returns or is dropped.
struct StopUpload(Arc<Upload>);

impl Drop for StopUpload {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
    }
}

/// The write end of a request body: blocks while the connection has enough waiting.
struct ChannelWriter {
    sender: mpsc::Sender<Bytes>,
    upload: Arc<Upload>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the request is over");
        if self.upload.stopped.load(Ordering::Acquire) {
            return Err(gone());
        }
        self.sender.blocking_send(Bytes::copy_from_slice(buf)).map_err(|_| gone())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn urlencode(text: &str) -> String {
    serde_urlencoded::to_string([("", text)]).map(|s| s.trim_start_matches('=').to_owned()).unwrap_or_default()
}

/// The `previewd list` table: name, image, PR, commit, status, services, age, last request,
/// expiry (or who pinned it), URL.
pub fn table(previews: &[Value]) -> String {
    let now = crate::clock::unix_now();
    let header = ["NAME", "IMAGE", "PR", "COMMIT", "STATUS", "SERVICES", "AGE", "LAST REQUEST", "EXPIRES", "URL"];
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
        let used = preview["last_request"]
            .as_i64()
            .map_or("-".to_owned(), |at| format!("{} ago", crate::clock::age(now - at)));
        let expires = match (preview["pinned"].as_str(), preview["expires"].as_i64()) {
            (Some(by), _) => format!("pinned ({by})"),
            (None, Some(at)) => format!("in {}", crate::clock::age((at - now).max(0))),
            (None, None) => "-".to_owned(),
        };
        let row = [text("name"), text("image"), pr, commit, status, services(preview), age, used, expires, text("url")];
        rows.push(row.to_vec());
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

/// The builds part of `previewd list`: one line per build in flight or queued, empty without.
pub fn builds_table(builds: &[Value]) -> String {
    let now = crate::clock::unix_now();
    builds
        .iter()
        .map(|build| {
            let text = |key: &str| build[key].as_str().unwrap_or("-").to_owned();
            let revision: String = text("revision").chars().take(12).collect();
            let age = crate::clock::age(now - build["started"].as_i64().unwrap_or(now));
            let step = build["step"].as_str().map(|step| format!("  {step}")).unwrap_or_default();
            format!("{}  {}  {revision}  {age}{step}\n", text("name"), text("state"))
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

    /// A stand-in for `POST /api/builds`: refuses the image `unknown` before reading the body,
    /// else answers a `build` step per tar entry, then `ready` with what it got.
    async fn build_server() -> String {
        use axum::extract::Query;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use std::collections::HashMap;

        async fn builds(
            Query(query): Query<HashMap<String, String>>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> axum::response::Response {
            if query["image"] == "unknown" {
                return (StatusCode::NOT_FOUND, axum::Json(json!({"error": "no image `unknown` in config.yml"})))
                    .into_response();
            }
            let mut archive = tar::Archive::new(&body[..]);
            let entries: Vec<String> = archive
                .entries()
                .unwrap()
                .map(|entry| entry.unwrap().path().unwrap().to_string_lossy().into_owned())
                .collect();
            let mut lines: Vec<Value> =
                entries.iter().map(|e| json!({"step": "build", "message": e, "elapsed_ms": 5})).collect();
            lines.push(json!({"step": "ready", "url": "http://x", "preview": {
                "name": query["name"], "image": query["image"], "entries": entries,
                "content_type": headers["content-type"].to_str().unwrap(), "accept": headers["accept"].to_str().unwrap(),
            }}));
            let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
            ([("content-type", "application/x-ndjson")], text).into_response()
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/api/builds", axum::routing::post(builds));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    fn context_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "secret\n").unwrap();
        std::fs::write(dir.path().join("secret"), "hunter2").unwrap();
        std::fs::write(dir.path().join("index.html"), "hi").unwrap();
        dir
    }

    #[tokio::test]
    async fn a_build_launch_streams_the_context_and_reads_the_steps() {
        let client = Client::for_login(build_server().await, Some("u".into()), "p".into());
        let dir = context_dir();
        let mut steps = Vec::new();
        let preview =
            client.build_launch("demo app", "my-preview", dir.path(), |event| steps.push(event.clone())).await.unwrap();
        assert_eq!(preview["name"], "my-preview");
        assert_eq!(preview["image"], "demo app");
        assert_eq!(preview["entries"], json!([".dockerignore", "Dockerfile", "index.html"]));
        assert_eq!(preview["content_type"], "application/x-tar");
        assert_eq!(preview["accept"], "application/x-ndjson");
        let messages: Vec<&str> = steps.iter().map(|s| s["message"].as_str().unwrap()).collect();
        assert_eq!(messages, [".dockerignore", "Dockerfile", "index.html"]);
    }

    #[tokio::test]
    async fn a_context_failing_midway_ends_the_body_with_an_error_not_early() {
        let (body, upload) = context_stream(|mut out| {
            out.write_all(b"half a tar").and_then(|()| out.flush()).unwrap();
            Err(ContextError::Read { path: "ctx/big.bin".into(), source: std::io::Error::other("EIO") })
        });
        let items: Vec<std::io::Result<Bytes>> = body.collect().await;
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0].as_ref().unwrap(), &Bytes::from_static(b"half a tar"));
        assert!(items[1].is_err());
        let failure = upload.failure.lock().unwrap().take();
        assert!(matches!(failure, Some(ContextError::Read { .. })), "{failure:?}");

        let (body, _) =
            context_stream(|mut out| out.write_all(b"whole").map_err(|source| ContextError::Write { source }));
        let items: Vec<std::io::Result<Bytes>> = body.collect().await;
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(items[0].is_ok());
    }

    #[tokio::test]
    async fn a_build_launch_shows_the_daemon_s_refusal() {
        let client = Client::for_login(build_server().await, Some("u".into()), "p".into());
        let dir = context_dir();
        match client.build_launch("unknown", "p", dir.path(), |_| {}).await {
            Err(ClientError::Refused(message)) => assert_eq!(message, "no image `unknown` in config.yml"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_build_launch_of_no_directory_is_a_usage_error_before_any_request() {
        // Nothing listens there: a request would be Unreachable.
        let client = Client::for_login("http://127.0.0.1:9".into(), Some("u".into()), "p".into());
        let dir = context_dir();
        for path in [dir.path().join("missing"), dir.path().join("index.html")] {
            match client.build_launch("demo", "p", &path, |_| {}).await {
                Err(ClientError::Usage(message)) => assert!(message.contains(&*path.to_string_lossy()), "{message}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_table_has_a_row_per_preview_with_pr_commit_and_age() {
        let now = crate::clock::unix_now();
        let previews = [
            json!({"name": "a", "image": "demo", "status": "running", "routed": true, "created": now - 125, "url": "http://a",
                   "services": [{"name": "db", "status": "running"}, {"name": "cache", "status": "exited"}]}),
            json!({"name": "hello-world-pr-2", "image": "demo", "status": "running", "routed": false, "created": now - 7200,
                   "url": "http://h", "repo": "Codertocat/Hello-World", "pr": 2, "sha": "ec26c3e57ca3a959",
                   "expires": now + 3 * 86_400}),
            json!({"name": "kept", "image": "demo", "status": "asleep", "routed": true, "created": now, "url": "http://k",
                   "pinned": "label keep-awake", "expires": null}),
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
                && lines[2].contains("2h")
                && lines[2].contains("in 3d"),
            "{text}"
        );
        assert!(lines[0].contains("EXPIRES") && lines[3].contains("pinned (label keep-awake)"), "{text}");
    }
}
