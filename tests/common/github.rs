//! A fake GitHub for the integration tests: a REST API server on loopback, plus helpers that
//! build and deliver `pull_request` webhooks like GitHub does.
//!
//! [`FakeGitHub::start`] serves the endpoints previewd uses (user, collaborator permission, issue
//! comments, deployments and their statuses, open pulls, one pull request, repository tarballs) on
//! `127.0.0.1:<free port>` inside the test's tokio runtime. It keeps state in memory, records every
//! request, and can be told to fail ([`FakeGitHub::fail_next`], [`FakeGitHub::set_down`],
//! [`FakeGitHub::set_delay`]). Answers follow GitHub's REST docs — status codes, field names, error
//! JSON, `Link` paging — not what any one client library happens to accept. Where the fake has to
//! simplify, a comment says how.
//!
//! Tarballs come from a second server, as on github.com: "Download a repository archive (tar)",
//! `GET /repos/{owner}/{repo}/tarball/{ref}`, answers `302 Found` with a `Location` on another
//! host, `codeload.github.com`, which serves the gzipped `git archive`. The fake's codeload listens
//! on its own free port and is addressed as `localhost` (the API as `127.0.0.1`), so a client that
//! follows the redirect changes host name and port, like it changes host against GitHub, and a
//! client that carries its token across is caught: codeload records what it gets
//! ([`FakeGitHub::codeload_calls`]) and, like the real one, ignores credentials. Tests describe
//! commits with [`FakeGitHub::set_commit`] and friends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const WEB: &str = "https://github.com";
const DOCS: &str = "https://docs.github.com/rest";
const STATUS_STATES: [&str; 7] = ["error", "failure", "inactive", "in_progress", "queued", "pending", "success"];
const DESCRIPTION_MAX: usize = 140;
const COMMENT_MAX: usize = 65536;
const BODY_LIMIT: usize = 1 << 20;
/// `git archive`'s default `tar.umask`: entries are group-writable, never world-writable.
const TAR_UMASK: u32 = 0o002;
/// Codeload streams archives (chunked, no `Content-Length`); the fake sends pieces of this size.
const CODELOAD_CHUNK: usize = 16 * 1024;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// Path plus `?query` when there is one.
    pub path: String,
    /// The JSON body, `Null` when empty, a string when it was not JSON.
    pub body: Value,
    pub authorization: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Comment {
    pub id: u64,
    pub body: String,
    pub user: String,
}

#[derive(Clone, Debug)]
pub struct Deployment {
    pub id: u64,
    pub sha: String,
    pub git_ref: String,
    pub environment: String,
    pub transient_environment: bool,
    pub production_environment: bool,
    pub required_contexts: Option<Vec<String>>,
    pub auto_merge: Option<bool>,
    pub description: Option<String>,
    pub payload: Value,
}

#[derive(Clone, Debug)]
pub struct DeploymentStatus {
    pub id: u64,
    pub state: String,
    pub environment_url: Option<String>,
    pub log_url: Option<String>,
    pub description: Option<String>,
    pub auto_inactive: Option<bool>,
}

/// The running fake; both servers stop when this is dropped.
pub struct FakeGitHub {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    /// The fake codeload's base URL, e.g. `http://localhost:40125`: where tarball redirects point.
    pub codeload_url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    codeload: tokio::task::JoinHandle<()>,
}

struct Shared {
    base: String,
    codeload: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    tokens: HashMap<String, String>,
    /// Keyed by the lowercased full name: GitHub treats owner and repo names case-insensitively.
    repos: HashMap<String, Repo>,
    last_id: u64,
    fail_remaining: usize,
    fail_status: u16,
    /// Calls still to answer with GitHub's primary rate-limit refusal.
    rate_limited: usize,
    down: bool,
    delay: Duration,
    /// Requests to codeload, kept apart from the API's `calls`.
    codeload_calls: Vec<Call>,
    /// How long codeload waits before it answers.
    tarball_delay: Duration,
}

struct Repo {
    full_name: String,
    permissions: HashMap<String, String>,
    comments: Vec<StoredComment>,
    /// (comment id, content, login) of each reaction.
    reactions: Vec<(u64, String, String)>,
    deployments: Vec<StoredDeployment>,
    pulls: Vec<Value>,
    /// Each pull request's current state, by number, as `GET .../pulls/{number}` shows it. The
    /// fake keeps it apart from `pulls` (the open list): tests set each as they need.
    pull_states: HashMap<u64, Value>,
    /// Payload URLs of the repository's webhooks.
    hooks: Vec<String>,
    /// The commits `set_commit` described, by lowercased SHA.
    commits: HashMap<String, Commit>,
    /// Branch names (case-sensitive, as in git) and the SHA each points at.
    refs: HashMap<String, String>,
    /// Archives codeload served, by lowercased SHA.
    downloads: HashMap<String, usize>,
}

/// A commit's tree, as `git archive` writes it.
#[derive(Clone)]
struct Commit {
    sha: String,
    /// Seconds since the epoch: git archive stamps every entry with the commit's time.
    time: u64,
    /// By path from the repository root. Byte order of full paths is git's tree order ('/'
    /// sorts after '.' and '-', like git compares a directory as `name/`).
    entries: BTreeMap<String, TreeEntry>,
}

#[derive(Clone)]
enum TreeEntry {
    File { content: Vec<u8>, executable: bool },
    Symlink { target: String },
}

/// Who made a resource and when: shown by GitHub, rarely asserted on by tests.
struct Stamp {
    creator: String,
    created_at: String,
    updated_at: String,
}

struct StoredComment {
    item: Comment,
    issue: u64,
    stamp: Stamp,
}

struct StoredDeployment {
    item: Deployment,
    task: String,
    stamp: Stamp,
    statuses: Vec<StoredStatus>,
}

struct StoredStatus {
    item: DeploymentStatus,
    /// The deployment's environment when the status was created.
    environment: String,
    stamp: Stamp,
}

/// An error answered with GitHub's JSON: `message`, `documentation_url`, `status`, maybe `errors`.
struct GhError {
    status: StatusCode,
    body: Value,
}

impl IntoResponse for GhError {
    fn into_response(self) -> Response {
        reply(self.status, &self.body)
    }
}

/// The authenticated caller and the parsed body, put in request extensions by [`gate`].
#[derive(Clone)]
struct Caller {
    login: String,
    body: Value,
}

type Answer = Result<Response, GhError>;
type Fake = State<Arc<Shared>>;

impl FakeGitHub {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake GitHub");
        let url = format!("http://{}", listener.local_addr().expect("fake GitHub address"));
        let codeload_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake codeload");
        let codeload_port = codeload_listener.local_addr().expect("fake codeload address").port();
        // Loopback too, under another name: `localhost` is 127.0.0.1 in /etc/hosts.
        let codeload_url = format!("http://localhost:{codeload_port}");
        let shared = Arc::new(Shared { base: url.clone(), codeload: codeload_url.clone(), inner: Mutex::default() });
        let server = tokio::spawn(serve(listener, router(shared.clone()), "fake GitHub"));
        let codeload = tokio::spawn(serve(codeload_listener, codeload_router(shared.clone()), "fake codeload"));
        Self { url, codeload_url, shared, server, codeload }
    }

    pub fn add_token(&self, token: &str, login: &str) {
        self.shared.lock().tokens.insert(token.to_owned(), login.to_owned());
    }

    /// `permission` is a role: admin, maintain, write, triage, read or none.
    pub fn set_permission(&self, repo: &str, login: &str, permission: &str) {
        let mut inner = self.shared.lock();
        inner.repo_entry(repo).permissions.insert(login.to_lowercase(), permission.to_owned());
    }

    /// The repository's (active, `web`) webhooks deliver to these payload URLs.
    pub fn set_hooks(&self, repo: &str, urls: &[&str]) {
        self.shared.lock().repo_entry(repo).hooks = urls.iter().map(|url| (*url).to_owned()).collect();
    }

    pub fn set_open_pulls(&self, repo: &str, pulls: Vec<Value>) {
        self.shared.lock().repo_entry(repo).pulls = pulls;
    }

    /// A pull request's current state (its `number` says which): what `GET
    /// /repos/{owner}/{repo}/pulls/{number}` answers from now on.
    pub fn set_pull(&self, repo: &str, pull: Value) {
        let number = pull["number"].as_u64().expect("a pull request has a number");
        self.shared.lock().repo_entry(repo).pull_states.insert(number, pull);
    }

    /// The state `set_pull` last set.
    pub fn pull(&self, repo: &str, number: u64) -> Option<Value> {
        self.with_repo(repo, |r| r.pull_states.get(&number).cloned())
    }

    /// How often `GET /repos/{repo}/pulls/{number}` was answered (any status).
    pub fn pull_reads(&self, repo: &str, number: u64) -> usize {
        let path = format!("/repos/{repo}/pulls/{number}").to_lowercase();
        self.calls().iter().filter(|c| c.method == "GET" && c.path.to_lowercase() == path).count()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// The commit `sha` of `repo` holds these files (paths from the repository root, `/`
    /// between directories; mode 0664 as git archive writes them) and nothing else: what its
    /// tarball contains from now on. Replaces an earlier tree of the same SHA.
    pub fn set_commit(&self, repo: &str, sha: &str, files: &[(&str, &[u8])]) {
        let mut entries = BTreeMap::new();
        for (path, content) in files {
            let entry = TreeEntry::File { content: content.to_vec(), executable: false };
            assert!(entries.insert(tree_path(path), entry).is_none(), "{path} given twice");
        }
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let commit = Commit { sha: sha.to_owned(), time, entries };
        check_tree(&commit);
        self.shared.lock().repo_entry(repo).commits.insert(sha.to_lowercase(), commit);
    }

    /// Marks a file of a commit `set_commit` described as executable (git's mode 100755: 0775 in
    /// the archive).
    pub fn set_executable(&self, repo: &str, sha: &str, path: &str) {
        self.with_commit(repo, sha, |commit| match commit.entries.get_mut(path) {
            Some(TreeEntry::File { executable, .. }) => *executable = true,
            _ => panic!("{repo}@{sha} has no file {path}"),
        });
    }

    /// Adds a symbolic link to a commit `set_commit` described. Git stores the target verbatim,
    /// so it may be absolute or climb out of the repository with `..`.
    pub fn set_symlink(&self, repo: &str, sha: &str, path: &str, target: &str) {
        self.with_commit(repo, sha, |commit| {
            commit.entries.insert(tree_path(path), TreeEntry::Symlink { target: target.to_owned() });
            check_tree(commit);
        });
    }

    /// The branch `name` of `repo` points at `sha`: tarball requests may name either.
    pub fn set_ref(&self, repo: &str, name: &str, sha: &str) {
        self.shared.lock().repo_entry(repo).refs.insert(name.to_owned(), sha.to_lowercase());
    }

    /// Every request codeload got, in order (the API's are in [`Self::calls`]).
    pub fn codeload_calls(&self) -> Vec<Call> {
        self.shared.lock().codeload_calls.clone()
    }

    /// How many archives of commit `sha` codeload served (whatever ref the request named).
    pub fn tarball_downloads(&self, repo: &str, sha: &str) -> usize {
        self.with_repo(repo, |r| r.downloads.get(&sha.to_lowercase()).copied().unwrap_or_default())
    }

    /// Codeload waits this long before it answers (the API's `set_delay` does not apply there).
    pub fn set_tarball_delay(&self, delay: Duration) {
        self.shared.lock().tarball_delay = delay;
    }

    /// A comment someone posted on an issue or pull request; its id.
    pub fn add_comment(&self, repo: &str, issue: u64, login: &str, body: &str) -> u64 {
        let mut inner = self.shared.lock();
        let id = inner.next_id();
        let comment = StoredComment {
            item: Comment { id, body: body.to_owned(), user: login.to_owned() },
            issue,
            stamp: stamp(login),
        };
        inner.repo_entry(repo).comments.push(comment);
        id
    }

    /// The contents of the reactions to a comment.
    pub fn reactions(&self, repo: &str, comment_id: u64) -> Vec<String> {
        let mut inner = self.shared.lock();
        let repo = inner.repo_entry(repo);
        repo.reactions.iter().filter(|(id, _, _)| *id == comment_id).map(|(_, content, _)| content.clone()).collect()
    }

    pub fn comments(&self, repo: &str, issue: u64) -> Vec<Comment> {
        self.with_repo(repo, |r| r.comments.iter().filter(|c| c.issue == issue).map(|c| c.item.clone()).collect())
    }

    pub fn deployments(&self, repo: &str) -> Vec<Deployment> {
        self.with_repo(repo, |r| r.deployments.iter().map(|d| d.item.clone()).collect())
    }

    /// Oldest first, unlike the API.
    pub fn statuses(&self, repo: &str, deployment_id: u64) -> Vec<DeploymentStatus> {
        self.with_repo(repo, |r| {
            let deployment = r.deployments.iter().find(|d| d.item.id == deployment_id);
            deployment.map(|d| d.statuses.iter().map(|s| s.item.clone()).collect()).unwrap_or_default()
        })
    }

    /// The next `count` calls answer `status` with GitHub's error JSON, before authentication.
    pub fn fail_next(&self, count: usize, status: u16) {
        assert!(StatusCode::from_u16(status).is_ok(), "{status} is not an HTTP status");
        let mut inner = self.shared.lock();
        inner.fail_remaining = count;
        inner.fail_status = status;
    }

    /// The next `count` calls of `GET /user` (token lookups) answer as GitHub does once a token's
    /// primary rate limit is used up: 403, `x-ratelimit-remaining: 0`, the reset time, and
    /// GitHub's message. Other calls (previewd's own, running meanwhile) are not limited.
    pub fn rate_limit_user_lookups(&self, count: usize) {
        self.shared.lock().rate_limited = count;
    }

    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Polls `check` every 20ms until it returns `Some`, or panics with `what` and every call.
    pub async fn wait_for<T>(&self, what: &str, timeout: Duration, check: impl Fn(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; GitHub calls so far:\n{}", self.dump_calls());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn dump_calls(&self) -> String {
        let lines = self.calls().into_iter().map(|c| format!("  {} {} {}", c.method, c.path, c.body));
        lines.collect::<Vec<_>>().join("\n")
    }

    fn with_repo<T: Default>(&self, repo: &str, read: impl FnOnce(&Repo) -> T) -> T {
        self.shared.lock().repos.get(&repo.to_lowercase()).map(read).unwrap_or_default()
    }

    fn with_commit(&self, repo: &str, sha: &str, change: impl FnOnce(&mut Commit)) {
        let mut inner = self.shared.lock();
        let commit = inner.repos.get_mut(&repo.to_lowercase()).and_then(|r| r.commits.get_mut(&sha.to_lowercase()));
        change(commit.unwrap_or_else(|| panic!("set_commit({repo}, {sha}) first")));
    }
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.server.abort();
        self.codeload.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, app: Router, name: &str) {
    if let Err(err) = axum::serve(listener, app).await {
        eprintln!("{name} stopped: {err}");
    }
}

impl Shared {
    /// A handler panicking mid-test must not turn every later call into a poison panic.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    fn repo_entry(&mut self, full_name: &str) -> &mut Repo {
        self.repos.entry(full_name.to_lowercase()).or_insert_with(|| Repo {
            full_name: full_name.to_owned(),
            permissions: HashMap::new(),
            comments: Vec::new(),
            reactions: Vec::new(),
            deployments: Vec::new(),
            pulls: Vec::new(),
            pull_states: HashMap::new(),
            hooks: Vec::new(),
            commits: HashMap::new(),
            refs: HashMap::new(),
            downloads: HashMap::new(),
        })
    }

    fn known_repo(&mut self, owner: &str, name: &str) -> Result<&mut Repo, GhError> {
        self.repos.get_mut(&repo_key(owner, name)).ok_or_else(not_found)
    }
}

impl Repo {
    /// A SHA `set_commit` described, or a branch `set_ref` set. GitHub also takes tags,
    /// abbreviated SHAs and `refs/...` names; the fake does not.
    fn commit_at(&self, git_ref: &str) -> Option<&Commit> {
        let sha = self.refs.get(git_ref).map_or_else(|| git_ref.to_lowercase(), Clone::clone);
        self.commits.get(&sha)
    }
}

fn repo_key(owner: &str, name: &str) -> String {
    format!("{owner}/{name}").to_lowercase()
}

fn stamp(creator: &str) -> Stamp {
    let now = now_iso8601();
    Stamp { creator: creator.to_owned(), created_at: now.clone(), updated_at: now }
}

// ---------------------------------------------------------------------------------------------
// Server

fn router(shared: Arc<Shared>) -> Router {
    let repo = "/repos/{owner}/{repo}";
    Router::new()
        .route("/user", get(get_user))
        .route(repo, get(get_repo))
        .route(&format!("{repo}/hooks"), get(list_hooks))
        .route(&format!("{repo}/collaborators/{{username}}/permission"), get(get_permission))
        .route(&format!("{repo}/issues/{{issue}}/comments"), get(list_comments).post(create_comment))
        // GitHub accepts POST in place of PATCH for clients that cannot send PATCH.
        .route(&format!("{repo}/issues/comments/{{id}}"), post(update_comment).patch(update_comment))
        .route(&format!("{repo}/issues/comments/{{id}}/reactions"), post(create_reaction))
        .route(&format!("{repo}/deployments"), post(create_deployment))
        .route(&format!("{repo}/deployments/{{id}}/statuses"), get(list_statuses).post(create_status))
        .route(&format!("{repo}/pulls"), get(list_pulls))
        .route(&format!("{repo}/pulls/{{number}}"), get(get_pull))
        .route(&format!("{repo}/tarball/{{ref}}"), get(get_tarball))
        .fallback(not_found_handler)
        // GitHub answers 404, not 405, to a method a route does not support.
        .method_not_allowed_fallback(not_found_handler)
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

/// Records the call, then applies the configured delay, outage, failures and authentication.
async fn gate(State(shared): Fake, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "Payload too large").into_response();
    };
    let parsed = parse_body(&bytes);
    let delay = {
        let mut inner = shared.lock();
        inner.calls.push(Call {
            method: parts.method.to_string(),
            path: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string()),
            body: parsed.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
            authorization: parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned),
        });
        inner.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(limited) = (parts.uri.path() == "/user").then(|| rate_limit(&mut shared.lock())).flatten() {
        return limited;
    }
    let login = match admit(&mut shared.lock(), &parts.headers) {
        Ok(login) => login,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(body) = parsed else {
        return error(StatusCode::BAD_REQUEST, "Problems parsing JSON").into_response();
    };
    let mut request = Request::from_parts(parts, Body::from(bytes));
    request.extensions_mut().insert(Caller { login, body });
    next.run(request).await
}

fn parse_body(bytes: &[u8]) -> Option<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(Value::Null);
    }
    serde_json::from_slice(bytes).ok()
}

/// GitHub's documented answer to a request over the primary rate limit.
fn rate_limit(inner: &mut Inner) -> Option<Response> {
    if inner.rate_limited == 0 {
        return None;
    }
    inner.rate_limited -= 1;
    let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 60;
    let body = json!({
        "message": "API rate limit exceeded for user ID 1.",
        "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
        "status": "403"
    });
    let mut response = reply(StatusCode::FORBIDDEN, &body);
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", "5000".to_owned()),
        ("x-ratelimit-remaining", "0".to_owned()),
        ("x-ratelimit-used", "5000".to_owned()),
        ("x-ratelimit-reset", reset.to_string()),
        ("x-ratelimit-resource", "core".to_owned()),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    Some(response)
}

fn admit(inner: &mut Inner, headers: &HeaderMap) -> Result<String, GhError> {
    if inner.down {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"));
    }
    if inner.fail_remaining > 0 {
        inner.fail_remaining -= 1;
        let status = StatusCode::from_u16(inner.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(error(status, status.canonical_reason().unwrap_or("Server Error")));
    }
    // GitHub says "Requires authentication" when no credentials came, "Bad credentials" when they
    // were wrong; both are 401.
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Err(error(StatusCode::UNAUTHORIZED, "Requires authentication"));
    };
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .map(|(_, token)| token.trim());
    token.and_then(|t| inner.tokens.get(t).cloned()).ok_or_else(|| error(StatusCode::UNAUTHORIZED, "Bad credentials"))
}

async fn not_found_handler() -> GhError {
    not_found()
}

async fn get_user(State(shared): Fake, Extension(caller): Extension<Caller>) -> Response {
    let mut user = user_json(&shared.base, &caller.login);
    user["name"] = Value::Null;
    user["email"] = Value::Null;
    user["created_at"] = json!("2011-01-25T18:44:36Z");
    reply(StatusCode::OK, &user)
}

/// `GET /repos/{owner}/{repo}`: a public repository, with the caller's `permissions`.
async fn get_repo(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name)): Path<(String, String)>,
) -> Answer {
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let role = repo.permissions.get(&caller.login.to_lowercase()).cloned().unwrap_or_else(|| "none".to_owned());
    let mut permissions = permissions_json(&role);
    permissions["pull"] = json!(true);
    let full_name = repo.full_name.clone();
    let (owner_login, short) = full_name.split_once('/').unwrap_or((&full_name, &full_name));
    let id = stable_id(&full_name);
    Ok(reply(
        StatusCode::OK,
        &json!({
            "id": id,
            "node_id": format!("R_fake{id}"),
            "name": short,
            "full_name": full_name,
            "private": false,
            "owner": user_json(&shared.base, owner_login),
            "html_url": format!("{WEB}/{full_name}"),
            "url": format!("{}/repos/{full_name}", shared.base),
            "default_branch": "main",
            "visibility": "public",
            "permissions": permissions,
        }),
    ))
}

/// `GET /repos/{owner}/{repo}/hooks`: admins only; GitHub answers others 404.
async fn list_hooks(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name)): Path<(String, String)>,
) -> Answer {
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    if repo.permissions.get(&caller.login.to_lowercase()).map(String::as_str) != Some("admin") {
        return Err(not_found());
    }
    let base = format!("{}/repos/{}", shared.base, repo.full_name);
    let hooks: Vec<Value> = repo
        .hooks
        .iter()
        .enumerate()
        .map(|(index, url)| {
            let id = 1000 + index as u64;
            json!({
                "type": "Repository",
                "id": id,
                "name": "web",
                "active": true,
                "events": ["pull_request"],
                "config": { "content_type": "json", "insecure_ssl": "0", "url": url },
                "updated_at": "2026-01-01T00:00:00Z",
                "created_at": "2026-01-01T00:00:00Z",
                "url": format!("{base}/hooks/{id}"),
                "test_url": format!("{base}/hooks/{id}/test"),
                "ping_url": format!("{base}/hooks/{id}/pings"),
                "deliveries_url": format!("{base}/hooks/{id}/deliveries"),
                "last_response": { "code": null, "status": "unused", "message": null },
            })
        })
        .collect();
    Ok(reply(StatusCode::OK, &json!(hooks)))
}

async fn get_permission(State(shared): Fake, Path((owner, name, login)): Path<(String, String, String)>) -> Answer {
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let role = repo.permissions.get(&login.to_lowercase()).cloned().unwrap_or_else(|| "none".to_owned());
    // `permission` only has the legacy levels: maintain shows as write, triage as read.
    let permission = match role.as_str() {
        "maintain" => "write",
        "triage" => "read",
        other => other,
    };
    let mut user = user_json(&shared.base, &login);
    user["permissions"] = permissions_json(&role);
    user["role_name"] = json!(role);
    Ok(reply(StatusCode::OK, &json!({ "permission": permission, "role_name": role, "user": user })))
}

async fn list_comments(
    State(shared): Fake,
    Path((owner, name, issue)): Path<(String, String, String)>,
    uri: Uri,
) -> Answer {
    let issue = parse_id(&issue)?;
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let items =
        repo.comments.iter().filter(|c| c.issue == issue).map(|c| comment_json(&shared.base, repo, c)).collect();
    Ok(paginate(&shared.base, &uri, items))
}

async fn create_comment(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name, issue)): Path<(String, String, String)>,
) -> Answer {
    let issue = parse_id(&issue)?;
    let text = comment_body(&caller.body)?;
    let mut inner = shared.lock();
    let id = inner.next_id();
    let repo = inner.repo_entry(&format!("{owner}/{name}"));
    let comment = StoredComment {
        item: Comment { id, body: text, user: caller.login.clone() },
        issue,
        stamp: stamp(&caller.login),
    };
    let answer = comment_json(&shared.base, repo, &comment);
    repo.comments.push(comment);
    Ok(reply(StatusCode::CREATED, &answer))
}

/// `POST .../issues/comments/{id}/reactions`: 201 with the new reaction, 200 with the one the
/// caller already left; 404 for no such comment, 422 for a content GitHub does not have.
async fn create_reaction(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name, id)): Path<(String, String, String)>,
) -> Answer {
    let id = parse_id(&id)?;
    let content = required_str(&caller.body, "content")?;
    if !["+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"].contains(&content.as_str()) {
        return Err(error(StatusCode::UNPROCESSABLE_ENTITY, "Validation Failed"));
    }
    let mut inner = shared.lock();
    let reaction_id = inner.next_id();
    let repo = inner.known_repo(&owner, &name)?;
    if !repo.comments.iter().any(|c| c.item.id == id) {
        return Err(not_found());
    }
    let answer = json!({
        "id": reaction_id,
        "node_id": format!("REA_fake{reaction_id}"),
        "user": user_json(&shared.base, &caller.login),
        "content": content,
        "created_at": now_iso8601(),
    });
    let known = (id, content.clone(), caller.login.clone());
    if repo.reactions.contains(&known) {
        return Ok(reply(StatusCode::OK, &answer));
    }
    repo.reactions.push(known);
    Ok(reply(StatusCode::CREATED, &answer))
}

async fn update_comment(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name, id)): Path<(String, String, String)>,
) -> Answer {
    let id = parse_id(&id)?;
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let index = repo.comments.iter().position(|c| c.item.id == id).ok_or_else(not_found)?;
    let text = comment_body(&caller.body)?;
    let comment = &mut repo.comments[index];
    comment.item.body = text;
    comment.stamp.updated_at = now_iso8601();
    Ok(reply(StatusCode::OK, &comment_json(&shared.base, repo, &repo.comments[index])))
}

async fn create_deployment(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name)): Path<(String, String)>,
) -> Answer {
    let body = &caller.body;
    let git_ref = required_str(body, "ref")?;
    let task = string_field(body, "task")?.unwrap_or_else(|| "deploy".to_owned());
    let auto_merge = bool_field(body, "auto_merge")?;
    let required_contexts = string_list_field(body, "required_contexts")?;
    let environment = string_field(body, "environment")?.unwrap_or_else(|| "production".to_owned());
    let description = string_field(body, "description")?;
    let transient_environment = bool_field(body, "transient_environment")?.unwrap_or(false);
    let production_environment = bool_field(body, "production_environment")?.unwrap_or(environment == "production");
    let payload = body.get("payload").filter(|p| !p.is_null()).cloned().unwrap_or_else(|| json!({}));
    // Without `required_contexts` GitHub demands every commit status context of the ref be
    // `success`. The fake pretends the ref always has one that is still pending, so a client
    // that forgets `required_contexts: []` fails here as it would on a repository with CI.
    // (Real GitHub checks this whatever `auto_merge` says, so the fake does too.)
    if required_contexts.is_none() {
        return Err(status_checks_failed(&git_ref));
    }
    let mut inner = shared.lock();
    let id = inner.next_id();
    let repo = inner.repo_entry(&format!("{owner}/{name}"));
    let sha = resolve_sha(repo, &git_ref);
    let deployment = Deployment {
        id,
        sha,
        git_ref,
        environment,
        transient_environment,
        production_environment,
        required_contexts,
        auto_merge,
        description,
        payload,
    };
    let stored = StoredDeployment { item: deployment, task, stamp: stamp(&caller.login), statuses: Vec::new() };
    let answer = deployment_json(&shared.base, &repo.full_name, &stored);
    repo.deployments.push(stored);
    Ok(reply(StatusCode::CREATED, &answer))
}

async fn list_statuses(
    State(shared): Fake,
    Path((owner, name, id)): Path<(String, String, String)>,
    uri: Uri,
) -> Answer {
    let id = parse_id(&id)?;
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let deployment = repo.deployments.iter().find(|d| d.item.id == id).ok_or_else(not_found)?;
    let items = deployment.statuses.iter().rev().map(|s| status_json(&shared.base, &repo.full_name, id, s)).collect();
    Ok(paginate(&shared.base, &uri, items))
}

async fn create_status(
    State(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((owner, name, id)): Path<(String, String, String)>,
) -> Answer {
    let deployment_id = parse_id(&id)?;
    let mut inner = shared.lock();
    let Inner { repos, last_id, .. } = &mut *inner;
    let repo = repos.get_mut(&repo_key(&owner, &name)).ok_or_else(not_found)?;
    let index = repo.deployments.iter().position(|d| d.item.id == deployment_id).ok_or_else(not_found)?;
    let (status, environment) = parse_status(&caller.body, *last_id + 1)?;
    *last_id += 1;
    let deployment = &mut repo.deployments[index];
    if let Some(environment) = environment {
        deployment.item.environment = environment;
    }
    let deactivate = status.state == "success" && status.auto_inactive != Some(false);
    let stored =
        StoredStatus { item: status, environment: deployment.item.environment.clone(), stamp: stamp(&caller.login) };
    let answer = status_json(&shared.base, &repo.full_name, deployment_id, &stored);
    repo.deployments[index].statuses.push(stored);
    if deactivate {
        deactivate_earlier(repo, index, last_id, &caller.login);
    }
    Ok(reply(StatusCode::CREATED, &answer))
}

fn parse_status(body: &Value, id: u64) -> Result<(DeploymentStatus, Option<String>), GhError> {
    let state = required_str(body, "state")?;
    if !STATUS_STATES.contains(&state.as_str()) {
        return Err(validation_failed("DeploymentStatus", "state", "invalid", None));
    }
    let description = string_field(body, "description")?;
    if description.as_ref().is_some_and(|d| d.chars().count() > DESCRIPTION_MAX) {
        let message = format!("description is too long (maximum is {DESCRIPTION_MAX} characters)");
        return Err(validation_failed("DeploymentStatus", "description", "custom", Some(&message)));
    }
    // `target_url` is the legacy name of `log_url`.
    let log_url = match string_field(body, "log_url")? {
        Some(url) => Some(url),
        None => string_field(body, "target_url")?,
    };
    let status = DeploymentStatus {
        id,
        state,
        environment_url: string_field(body, "environment_url")?,
        log_url,
        description,
        auto_inactive: bool_field(body, "auto_inactive")?,
    };
    Ok((status, string_field(body, "environment")?))
}

/// GitHub's `auto_inactive`: a new `success` status adds an `inactive` status to every earlier
/// deployment of the same repository and environment that is neither transient nor production
/// and whose latest status is `success`. Transient and production deployments keep their state.
fn deactivate_earlier(repo: &mut Repo, current: usize, last_id: &mut u64, creator: &str) {
    let environment = repo.deployments[current].item.environment.clone();
    for deployment in &mut repo.deployments[..current] {
        let item = &deployment.item;
        let latest_success = deployment.statuses.last().is_some_and(|s| s.item.state == "success");
        if item.environment != environment
            || item.transient_environment
            || item.production_environment
            || !latest_success
        {
            continue;
        }
        *last_id += 1;
        let inactive = DeploymentStatus {
            id: *last_id,
            state: "inactive".to_owned(),
            environment_url: None,
            log_url: None,
            description: None,
            auto_inactive: None,
        };
        deployment.statuses.push(StoredStatus {
            item: inactive,
            environment: environment.clone(),
            stamp: stamp(creator),
        });
    }
}

/// `state=open` (the default) and `all` list what `set_open_pulls` set; `closed` lists nothing.
async fn list_pulls(State(shared): Fake, Path((owner, name)): Path<(String, String)>, uri: Uri) -> Answer {
    let closed = query_pairs(&uri).iter().any(|(k, v)| k == "state" && v == "closed");
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let items = if closed { Vec::new() } else { repo.pulls.clone() };
    Ok(paginate(&shared.base, &uri, items))
}

/// `GET /repos/{owner}/{repo}/pulls/{number}`: what `set_pull` set, with the API URLs of this
/// fake; 404 with GitHub's error JSON for a pull request (or repository) it does not know.
async fn get_pull(State(shared): Fake, Path((owner, name, number)): Path<(String, String, String)>) -> Answer {
    let number = parse_id(&number)?;
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    let mut pull = repo.pull_states.get(&number).cloned().ok_or_else(not_found)?;
    replace_strings(&mut pull, "https://api.github.com", &shared.base);
    Ok(reply(StatusCode::OK, &pull))
}

// ---------------------------------------------------------------------------------------------
// Tarballs: the API's redirect, and codeload

/// `GET /repos/{owner}/{repo}/tarball/{ref}`, "Download a repository archive (tar)": `302 Found`
/// to codeload, no body, the ref as the request named it (codeload resolves it). GitHub adds a
/// short-lived `?token=` to the `Location` of private repositories only, and the fake's are all
/// public. 404 with GitHub's error JSON for a repository or ref it does not know.
async fn get_tarball(State(shared): Fake, Path((owner, name, git_ref)): Path<(String, String, String)>) -> Answer {
    let mut inner = shared.lock();
    let repo = inner.known_repo(&owner, &name)?;
    repo.commit_at(&git_ref).ok_or_else(not_found)?;
    let location = format!("{}/{}/legacy.tar.gz/{}", shared.codeload, repo.full_name, path_segment(&git_ref));
    let location = HeaderValue::from_str(&location).map_err(|_| not_found())?;
    Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response())
}

fn codeload_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{owner}/{repo}/legacy.tar.gz/{ref}", get(download_tarball))
        .fallback(codeload_not_found)
        .method_not_allowed_fallback(codeload_not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), codeload_gate))
        .with_state(shared)
}

/// Records the request (credentials included: codeload ignores them, tests assert none came),
/// then waits the configured delay. Codeload authenticates nothing for public repositories.
async fn codeload_gate(State(shared): Fake, request: Request, next: Next) -> Response {
    let delay = {
        let mut inner = shared.lock();
        let uri = request.uri();
        inner.codeload_calls.push(Call {
            method: request.method().to_string(),
            path: uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.to_string()),
            body: Value::Null,
            authorization: request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        inner.tarball_delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    next.run(request).await
}

/// Codeload answers unknown archives with a plain-text 404, not the API's JSON.
async fn codeload_not_found() -> Response {
    let mut response = (StatusCode::NOT_FOUND, "404: Not Found").into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// `GET /{owner}/{repo}/legacy.tar.gz/{ref}`: the gzipped `git archive` of the commit, under
/// `{owner}-{repo}-{sha7}/`, streamed in chunks like codeload does (so no `Content-Length`).
/// The ref is resolved now, not when the API redirected: a branch that moved in between gives the
/// new commit, as on GitHub.
async fn download_tarball(
    State(shared): Fake,
    Path((owner, name, git_ref)): Path<(String, String, String)>,
) -> Response {
    let found = {
        let mut inner = shared.lock();
        inner.repos.get_mut(&repo_key(&owner, &name)).and_then(|repo| {
            let commit = repo.commit_at(&git_ref)?.clone();
            *repo.downloads.entry(commit.sha.to_lowercase()).or_default() += 1;
            Some((repo.full_name.replace('/', "-"), commit))
        })
    };
    let Some((owner_repo, commit)) = found else {
        return codeload_not_found().await;
    };
    let short: String = commit.sha.chars().take(7).collect();
    let prefix = format!("{owner_repo}-{short}");
    let archive = Bytes::from(tarball(&prefix, &commit));
    let chunks: Vec<Result<Bytes, Infallible>> = (0..archive.len())
        .step_by(CODELOAD_CHUNK)
        .map(|at| Ok(archive.slice(at..archive.len().min(at + CODELOAD_CHUNK))))
        .collect();
    let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-gzip"));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename={prefix}.tar.gz")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// A ref as one URL path segment: branch names may hold characters a path cannot.
fn path_segment(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A path as git trees hold them: relative, `/`-separated, no empty, `.`, `..` or `.git` part.
fn tree_path(path: &str) -> String {
    let valid = !path.is_empty() && path.split('/').all(|part| !["", ".", "..", ".git"].contains(&part));
    assert!(valid, "{path:?} cannot be a path in a git tree");
    path.to_owned()
}

/// A path is either a file (or link) or a directory, never both.
fn check_tree(commit: &Commit) {
    for path in commit.entries.keys() {
        for (at, _) in path.match_indices('/') {
            assert!(!commit.entries.contains_key(&path[..at]), "{} is a file and a directory", &path[..at]);
        }
    }
}

/// What `git archive --format=tar.gz --prefix={prefix}/ {sha}` writes with git's defaults: a pax
/// global header holding the commit id (`git get-tar-commit-id` reads it; readers that do not
/// know pax show it as a file named `pax_global_header`), the prefix directory, then every
/// directory and file in tree order. Owner root, mtime the commit's, modes from `tar.umask` 002:
/// 0775 directories and executables, 0664 other files, 0777 symlinks (0666 pax headers). Paths
/// and link targets that ustar's fields cannot hold get pax `path` / `linkpath` records, as git
/// writes them (checked against git 2.47's output).
fn tarball(prefix: &str, commit: &Commit) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let mtime = commit.time;
    let comment = pax_record("comment", commit.sha.as_bytes());
    append_entry(&mut builder, tar::EntryType::XGlobalHeader, "pax_global_header", 0o666, mtime, &comment, None);
    append_entry(&mut builder, tar::EntryType::Directory, &format!("{prefix}/"), 0o777, mtime, &[], None);
    let mut directories = HashSet::new();
    for (path, entry) in &commit.entries {
        // A directory's entry comes before what it holds; each once.
        for (at, _) in path.match_indices('/') {
            let directory = format!("{prefix}/{}/", &path[..at]);
            if directories.insert(directory.clone()) {
                append_entry(&mut builder, tar::EntryType::Directory, &directory, 0o777, mtime, &[], None);
            }
        }
        let full = format!("{prefix}/{path}");
        match entry {
            TreeEntry::File { content, executable } => {
                let mode = if *executable { 0o777 } else { 0o666 };
                append_entry(&mut builder, tar::EntryType::Regular, &full, mode, mtime, content, None);
            }
            TreeEntry::Symlink { target } => {
                append_entry(&mut builder, tar::EntryType::Symlink, &full, 0o777, mtime, &[], Some(target));
            }
        }
    }
    let encoder = builder.into_inner().expect("a tar into memory");
    encoder.finish().expect("gzip into memory")
}

fn append_entry(
    builder: &mut tar::Builder<GzEncoder<Vec<u8>>>,
    kind: tar::EntryType,
    path: &str,
    mode: u32,
    mtime: u64,
    data: &[u8],
    link: Option<&str>,
) {
    let header_with = |kind: tar::EntryType, mode: u32, size: usize| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size as u64);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root").expect("fits");
        header.set_groupname("root").expect("fits");
        header
    };
    // git applies the umask to directories and files only: links keep 0777, pax headers 0666.
    let mode =
        if matches!(kind, tar::EntryType::Directory | tar::EntryType::Regular) { mode & !TAR_UMASK } else { mode };
    let mut header = header_with(kind, mode, data.len());
    let mut pax = Vec::new();
    // git names the stand-in after the blob id; any 40 hex digits do for readers.
    let stand_in = &hex::encode(Sha256::digest(path.as_bytes()))[..40];
    if header.set_path(path).is_err() {
        pax.extend(pax_record("path", path.as_bytes()));
        header = header_with(kind, mode, data.len());
        header.set_path(format!("{stand_in}.data")).expect("fits");
    }
    if let Some(link) = link
        && header.set_link_name_literal(link).is_err()
    {
        pax.extend(pax_record("linkpath", link.as_bytes()));
        header.set_link_name_literal(format!("see {stand_in}.paxheader")).expect("fits");
    }
    if !pax.is_empty() {
        let mut extension = header_with(tar::EntryType::XHeader, 0o666, pax.len());
        extension.set_path(format!("{stand_in}.paxheader")).expect("fits");
        extension.set_cksum();
        builder.append(&extension, pax.as_slice()).expect("a tar into memory");
    }
    header.set_cksum();
    builder.append(&header, data).expect("a tar into memory");
}

/// One pax record, `"<length> <key>=<value>\n"`, the length counting its own digits.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut length = rest + 1;
    while length != rest + length.to_string().len() {
        length = rest + length.to_string().len();
    }
    let mut record = Vec::with_capacity(length);
    write!(record, "{length} {key}=").expect("write to a Vec");
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

// ---------------------------------------------------------------------------------------------
// Request fields, with GitHub's wording for schema errors

fn parse_id(raw: &str) -> Result<u64, GhError> {
    raw.parse().map_err(|_| not_found())
}

fn comment_body(body: &Value) -> Result<String, GhError> {
    let text = required_str(body, "body")?;
    if text.is_empty() {
        return Err(validation_failed("IssueComment", "body", "missing_field", None));
    }
    if text.chars().count() > COMMENT_MAX {
        let message = format!("body is too long (maximum is {COMMENT_MAX} characters)");
        return Err(validation_failed("IssueComment", "body", "custom", Some(&message)));
    }
    Ok(text)
}

fn required_str(body: &Value, name: &str) -> Result<String, GhError> {
    string_field(body, name)?.ok_or_else(|| invalid_request(&format!("\"{name}\" wasn't supplied.")))
}

fn string_field(body: &Value, name: &str) -> Result<Option<String>, GhError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(name, other, "a string")),
    }
}

fn bool_field(body: &Value, name: &str) -> Result<Option<bool>, GhError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(name, other, "a boolean")),
    }
}

fn string_list_field(body: &Value, name: &str) -> Result<Option<Vec<String>>, GhError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => {
            let strings = items.iter().map(|i| i.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>();
            strings.map(Some).ok_or_else(|| wrong_type(name, &body[name], "an array of strings"))
        }
        Some(other) => Err(wrong_type(name, other, "an array")),
    }
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default()
}

/// GitHub resolves a ref to a commit (422 "No ref found" when it cannot). The fake knows SHAs and
/// the heads of open pulls, and makes up a stable SHA for any other ref rather than refuse it.
fn resolve_sha(repo: &Repo, git_ref: &str) -> String {
    if git_ref.len() == 40 && git_ref.chars().all(|c| c.is_ascii_hexdigit()) {
        return git_ref.to_lowercase();
    }
    let branch = git_ref.strip_prefix("refs/heads/").unwrap_or(git_ref);
    let pull = repo.pulls.iter().find(|p| p["head"]["ref"] == branch);
    match pull.and_then(|p| p["head"]["sha"].as_str()) {
        Some(sha) => sha.to_owned(),
        None => hex::encode(Sha256::digest(git_ref.as_bytes()))[..40].to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

fn reply(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    response
}

fn error(status: StatusCode, message: &str) -> GhError {
    error_with(status, json!({ "message": message }))
}

/// Adds the fields every GitHub error carries.
fn error_with(status: StatusCode, mut body: Value) -> GhError {
    body["documentation_url"] = json!(DOCS);
    body["status"] = json!(status.as_u16().to_string());
    GhError { status, body }
}

fn not_found() -> GhError {
    error(StatusCode::NOT_FOUND, "Not Found")
}

fn invalid_request(detail: &str) -> GhError {
    error(StatusCode::UNPROCESSABLE_ENTITY, &format!("Invalid request.\n\n{detail}"))
}

fn wrong_type(name: &str, value: &Value, kind: &str) -> GhError {
    invalid_request(&format!("For 'properties/{name}', {value} is not {kind}."))
}

fn validation_failed(resource: &str, field: &str, code: &str, message: Option<&str>) -> GhError {
    let mut detail = json!({ "resource": resource, "field": field, "code": code });
    if let Some(message) = message {
        detail["message"] = json!(message);
    }
    error_with(StatusCode::UNPROCESSABLE_ENTITY, json!({ "message": "Validation Failed", "errors": [detail] }))
}

fn status_checks_failed(git_ref: &str) -> GhError {
    let contexts = [json!({ "context": "continuous-integration/fake", "state": "pending" })];
    let detail =
        json!({ "contexts": contexts, "resource": "Deployment", "field": "required_contexts", "code": "invalid" });
    let message = format!("Conflict: Commit status checks failed for {git_ref}.");
    error_with(StatusCode::CONFLICT, json!({ "message": message, "errors": [detail] }))
}

/// Pages like GitHub: `per_page` (default 30, max 100), 1-based `page`, and a `Link` header with
/// prev/next/last/first in GitHub's order when there is more than one page.
fn paginate(base: &str, uri: &Uri, items: Vec<Value>) -> Response {
    let query = query_pairs(uri);
    let number =
        |key: &str| query.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse::<usize>().ok()).filter(|n| *n > 0);
    let per_page = number("per_page").unwrap_or(30).min(100);
    let page = number("page").unwrap_or(1);
    let last = items.len().div_ceil(per_page).max(1);
    let skip = (page - 1).saturating_mul(per_page);
    let mut response = reply(StatusCode::OK, &Value::Array(items.into_iter().skip(skip).take(per_page).collect()));
    if last > 1 {
        let link = |n: usize, rel: &str| format!("<{}>; rel=\"{rel}\"", page_url(base, uri, &query, n));
        let mut links = Vec::new();
        if page > 1 {
            links.push(link((page - 1).min(last), "prev"));
        }
        if page < last {
            links.push(link(page + 1, "next"));
            links.push(link(last, "last"));
        }
        if page > 1 {
            links.push(link(1, "first"));
        }
        if let Ok(value) = HeaderValue::from_str(&links.join(", ")) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

/// The request's own URL with `page` replaced in place, or appended when it was absent.
fn page_url(base: &str, uri: &Uri, query: &[(String, String)], page: usize) -> String {
    let mut pairs = query.to_vec();
    match pairs.iter_mut().find(|(k, _)| k == "page") {
        Some(pair) => pair.1 = page.to_string(),
        None => pairs.push(("page".to_owned(), page.to_string())),
    }
    format!("{base}{}?{}", uri.path(), serde_urlencoded::to_string(&pairs).unwrap_or_default())
}

fn user_json(base: &str, login: &str) -> Value {
    let id = stable_id(login);
    json!({
        "login": login,
        "id": id,
        "node_id": format!("U_fake{id}"),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "gravatar_id": "",
        "url": format!("{base}/users/{login}"),
        "html_url": format!("{WEB}/{login}"),
        "type": "User",
        "site_admin": false,
    })
}

fn permissions_json(role: &str) -> Value {
    let rank = ["none", "read", "triage", "write", "maintain", "admin"].iter().position(|r| *r == role).unwrap_or(0);
    json!({ "pull": rank >= 1, "triage": rank >= 2, "push": rank >= 3, "maintain": rank >= 4, "admin": rank >= 5 })
}

/// GitHub's ids are stable per login (or repository, label); the fake derives one from the name.
fn stable_id(name: &str) -> u64 {
    let digest = Sha256::digest(name.to_lowercase().as_bytes());
    1000 + u64::from(u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 100_000_000)
}

fn author_association(repo: &Repo, login: &str) -> &'static str {
    let owner = repo.full_name.split('/').next().unwrap_or_default();
    if owner.eq_ignore_ascii_case(login) {
        "OWNER"
    } else if repo.permissions.get(&login.to_lowercase()).is_some_and(|p| p != "none") {
        "COLLABORATOR"
    } else {
        "NONE"
    }
}

fn comment_json(base: &str, repo: &Repo, comment: &StoredComment) -> Value {
    let (id, full, issue) = (comment.item.id, &repo.full_name, comment.issue);
    json!({
        "id": id,
        "node_id": format!("IC_fake{id}"),
        "url": format!("{base}/repos/{full}/issues/comments/{id}"),
        "html_url": format!("{WEB}/{full}/pull/{issue}#issuecomment-{id}"),
        "issue_url": format!("{base}/repos/{full}/issues/{issue}"),
        "body": comment.item.body,
        "user": user_json(base, &comment.item.user),
        "created_at": comment.stamp.created_at,
        "updated_at": comment.stamp.updated_at,
        "author_association": author_association(repo, &comment.item.user),
        "performed_via_github_app": null,
    })
}

fn deployment_json(base: &str, full: &str, stored: &StoredDeployment) -> Value {
    let d = &stored.item;
    json!({
        "url": format!("{base}/repos/{full}/deployments/{}", d.id),
        "id": d.id,
        "node_id": format!("DE_fake{}", d.id),
        "sha": d.sha,
        "ref": d.git_ref,
        "task": stored.task,
        "payload": d.payload,
        "original_environment": d.environment,
        "environment": d.environment,
        "description": d.description,
        "creator": user_json(base, &stored.stamp.creator),
        "created_at": stored.stamp.created_at,
        "updated_at": stored.stamp.updated_at,
        "statuses_url": format!("{base}/repos/{full}/deployments/{}/statuses", d.id),
        "repository_url": format!("{base}/repos/{full}"),
        "transient_environment": d.transient_environment,
        "production_environment": d.production_environment,
        "performed_via_github_app": null,
    })
}

fn status_json(base: &str, full: &str, deployment_id: u64, stored: &StoredStatus) -> Value {
    let s = &stored.item;
    // GitHub shows unset URLs and descriptions as empty strings.
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    json!({
        "url": format!("{base}/repos/{full}/deployments/{deployment_id}/statuses/{}", s.id),
        "id": s.id,
        "node_id": format!("DES_fake{}", s.id),
        "state": s.state,
        "creator": user_json(base, &stored.stamp.creator),
        "description": text(&s.description),
        "environment": stored.environment,
        "target_url": text(&s.log_url),
        "log_url": text(&s.log_url),
        "environment_url": text(&s.environment_url),
        "created_at": stored.stamp.created_at,
        "updated_at": stored.stamp.updated_at,
        "deployment_url": format!("{base}/repos/{full}/deployments/{deployment_id}"),
        "repository_url": format!("{base}/repos/{full}"),
        "performed_via_github_app": null,
    })
}

fn now_iso8601() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

// ---------------------------------------------------------------------------------------------
// Webhooks

/// A fixture from `tests/fixtures/github-webhooks`, e.g. `fixture("pull_request.opened")`.
pub fn fixture(name: &str) -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/github-webhooks/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("parse {}: {err}", path.display()))
}

/// `X-Hub-Signature-256` of `body`: `sha256=` and the lowercase hex HMAC-SHA256.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A fresh `X-GitHub-Delivery` value: a random UUID v4.
pub fn delivery_id() -> String {
    let version_4 = (rand::random::<u128>() & !(0xf << 76)) | (0x4 << 76);
    let bits = (version_4 & !(0x3 << 62)) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Posts a delivery with the headers GitHub sends.
pub async fn deliver(
    client: &reqwest::Client,
    url: &str,
    event: &str,
    delivery: &str,
    body: &[u8],
    secret: Option<&str>,
) -> reqwest::Response {
    let mut request = client
        .post(url)
        .header("X-GitHub-Event", event)
        .header("X-GitHub-Delivery", delivery)
        .header("X-GitHub-Hook-ID", "1")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::USER_AGENT, "GitHub-Hookshot/fake")
        .body(body.to_vec());
    if let Some(secret) = secret {
        request = request.header("X-Hub-Signature-256", signature(secret, body));
    }
    request.send().await.unwrap_or_else(|err| panic!("deliver {event} to {url}: {err}"))
}

const FIXTURE_ACTIONS: [&str; 6] = ["opened", "closed", "reopened", "synchronize", "labeled", "unlabeled"];
const FORK_OWNER: &str = "forker";

/// A `pull_request` payload derived from a fixture, with overrides.
pub struct PrEvent {
    pub value: Value,
}

impl PrEvent {
    /// The fixture of `action` when there is one, else `opened` relabelled (e.g. `edited`).
    pub fn new(action: &str) -> Self {
        if FIXTURE_ACTIONS.contains(&action) {
            return Self { value: fixture(&format!("pull_request.{action}")) };
        }
        let mut value = fixture("pull_request.opened");
        value["action"] = json!(action);
        match action {
            "converted_to_draft" => value["pull_request"]["draft"] = json!(true),
            "edited" => value["changes"] = json!({ "title": { "from": "An older title" } }),
            _ => {}
        }
        Self { value }
    }

    pub fn number(mut self, n: u64) -> Self {
        self.value["number"] = json!(n);
        self.pr()["number"] = json!(n);
        self.refresh_urls();
        self
    }

    pub fn branch(mut self, name: &str) -> Self {
        self.pr()["head"]["ref"] = json!(name);
        relabel(&mut self.pr()["head"]);
        self
    }

    /// Also sets `after` on `synchronize` events, which name the new head there too.
    pub fn sha(mut self, sha: &str) -> Self {
        self.pr()["head"]["sha"] = json!(sha);
        if self.value.get("after").is_some() {
            self.value["after"] = json!(sha);
        }
        self.refresh_urls();
        self
    }

    pub fn labels(mut self, names: &[&str]) -> Self {
        let full = self.full_name();
        self.pr()["labels"] = names.iter().map(|n| label_json(&full, n)).collect();
        self
    }

    pub fn label_event(mut self, name: &str) -> Self {
        self.value["label"] = label_json(&self.full_name(), name);
        self
    }

    /// A fork's head lives in `forker/<name>`; otherwise head and base share the repository.
    pub fn fork(mut self, fork: bool) -> Self {
        let pr = self.pr();
        let mut head_repo = pr["base"]["repo"].clone();
        if fork {
            let name = head_repo["name"].as_str().unwrap_or_default().to_owned();
            retarget_repo(&mut head_repo, &format!("{FORK_OWNER}/{name}"));
            head_repo["id"] = json!(stable_id(&format!("{FORK_OWNER}/{name}")));
            head_repo["fork"] = json!(true);
        }
        pr["head"]["user"] = head_repo["owner"].clone();
        pr["head"]["repo"] = head_repo;
        relabel(&mut pr["head"]);
        self
    }

    /// Who triggered the event, e.g. the user who added a label.
    pub fn sender(mut self, login: &str) -> Self {
        rename_user(&mut self.value["sender"], login);
        self
    }

    /// Who opened the pull request.
    pub fn author(mut self, login: &str) -> Self {
        rename_user(&mut self.pr()["user"], login);
        self
    }

    pub fn draft(mut self, draft: bool) -> Self {
        self.pr()["draft"] = json!(draft);
        self
    }

    /// For `closed`: merged ones get `merged_at` and `merged_by` like GitHub sends them.
    pub fn merged(mut self, merged: bool) -> Self {
        let sender = self.value["sender"].clone();
        let pr = self.pr();
        pr["merged"] = json!(merged);
        if merged {
            let closed_at = pr["closed_at"].as_str().map_or_else(now_iso8601, str::to_owned);
            pr["merged_at"] = json!(closed_at);
            pr["merged_by"] = sender;
        } else {
            pr["merged_at"] = Value::Null;
            pr["merged_by"] = Value::Null;
        }
        self
    }

    pub fn state(mut self, state: &str) -> Self {
        let pr = self.pr();
        pr["state"] = json!(state);
        pr["closed_at"] = match (state, pr["closed_at"].as_str()) {
            ("closed", Some(at)) => json!(at),
            ("closed", None) => json!(now_iso8601()),
            _ => Value::Null,
        };
        self
    }

    /// Moves the pull request to `owner/name`: repository, base, URLs, and the head unless it is
    /// a fork (whose repository keeps the `forker` owner and takes the new name).
    pub fn repo(mut self, full_name: &str) -> Self {
        let (owner, name) = full_name.split_once('/').unwrap_or_else(|| panic!("{full_name} is not owner/name"));
        let fork = self.pr()["head"]["repo"]["fork"] == json!(true);
        // Labels, milestones and links all embed the full name: rewrite every URL at once.
        let old = self.full_name();
        replace_strings(&mut self.value, &old, full_name);
        retarget_repo(&mut self.value["repository"], full_name);
        let base = &mut self.pr()["base"];
        retarget_repo(&mut base["repo"], full_name);
        rename_user(&mut base["user"], owner);
        relabel(base);
        if fork {
            retarget_repo(&mut self.pr()["head"]["repo"], &format!("{FORK_OWNER}/{name}"));
            relabel(&mut self.pr()["head"]);
        } else {
            self = self.fork(false);
        }
        self.refresh_urls();
        self
    }

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.value).expect("a JSON value serialises")
    }

    fn pr(&mut self) -> &mut Value {
        &mut self.value["pull_request"]
    }

    fn full_name(&self) -> String {
        self.value["repository"]["full_name"].as_str().expect("payload has repository.full_name").to_owned()
    }

    /// Rebuilds the pull request's URLs from the repository, number and head SHA.
    fn refresh_urls(&mut self) {
        let full = self.full_name();
        let n = self.value["number"].clone();
        let pr = self.pr();
        let sha = pr["head"]["sha"].as_str().unwrap_or_default().to_owned();
        let api = format!("https://api.github.com/repos/{full}");
        let html = format!("{WEB}/{full}/pull/{n}");
        // Each URL field, the `_links` entry repeating it, and the URL.
        let urls = [
            ("url", Some("self"), format!("{api}/pulls/{n}")),
            ("html_url", Some("html"), html.clone()),
            ("diff_url", None, format!("{html}.diff")),
            ("patch_url", None, format!("{html}.patch")),
            ("issue_url", Some("issue"), format!("{api}/issues/{n}")),
            ("commits_url", Some("commits"), format!("{api}/pulls/{n}/commits")),
            ("review_comments_url", Some("review_comments"), format!("{api}/pulls/{n}/comments")),
            ("review_comment_url", Some("review_comment"), format!("{api}/pulls/comments{{/number}}")),
            ("comments_url", Some("comments"), format!("{api}/issues/{n}/comments")),
            ("statuses_url", Some("statuses"), format!("{api}/statuses/{sha}")),
        ];
        for (key, rel, url) in urls {
            if let Some(rel) = rel {
                pr["_links"][rel] = json!({ "href": url });
            }
            pr[key] = json!(url);
        }
    }
}

fn label_json(full_name: &str, name: &str) -> Value {
    let id = stable_id(&format!("label:{name}"));
    json!({
        "id": id,
        "node_id": format!("LA_fake{id}"),
        "url": format!("https://api.github.com/repos/{full_name}/labels/{}", name.replace(' ', "%20")),
        "name": name,
        "color": "ededed",
        "default": false,
        "description": null,
    })
}

/// `head.label` / `base.label` are `owner:ref`.
fn relabel(side: &mut Value) {
    let owner = side["repo"]["owner"]["login"].as_str().or(side["user"]["login"].as_str()).unwrap_or_default();
    side["label"] = json!(format!("{owner}:{}", side["ref"].as_str().unwrap_or_default()));
}

/// Renames a repository object, its URLs and its owner.
fn retarget_repo(repo: &mut Value, full_name: &str) {
    let old = repo["full_name"].as_str().unwrap_or_default().to_owned();
    let (owner, name) = full_name.split_once('/').unwrap_or((full_name, full_name));
    replace_strings(repo, &old, full_name);
    repo["name"] = json!(name);
    rename_user(&mut repo["owner"], owner);
}

/// Renames a user object: its login, id and the URLs that end in or go through `/<login>`.
fn rename_user(user: &mut Value, login: &str) {
    if let Some(old) = user["login"].as_str().map(str::to_owned) {
        replace_strings(user, &format!("/{old}"), &format!("/{login}"));
    }
    user["login"] = json!(login);
    user["id"] = json!(stable_id(login));
}

fn replace_strings(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::String(s) if !from.is_empty() && s.contains(from) => *s = s.replace(from, to),
        Value::Array(items) => items.iter_mut().for_each(|v| replace_strings(v, from, to)),
        Value::Object(map) => map.values_mut().for_each(|v| replace_strings(v, from, to)),
        _ => {}
    }
}
