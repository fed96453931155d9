//! The tests' fake GitHub API (`tests/common/github.rs`) as a program of its own, so that
//! `scripts/bench.py` gives previewd's feedback calls (and its builds' tarball downloads) the
//! same fake the tests do.
//!
//! Usage: `fake_github PORT_FILE TOKEN LOGIN PULLS_DIR`
//!
//! - serves on `127.0.0.1` on a free port, and writes the port to PORT_FILE (atomically, via a
//!   temp file and a rename) once it accepts connections; its codeload (where tarball redirects
//!   point) listens on another free port, as `localhost`;
//! - TOKEN is the only token it knows, belonging to LOGIN;
//! - every `*.json` file in PULLS_DIR is a `pull_request` webhook payload: its pull request is
//!   what `GET /repos/{owner}/{repo}/pulls/{number}` answers (GitHub holds what it delivered
//!   last), and LOGIN is an admin of its repository;
//! - it reads commands on stdin, one a line, and answers each with one line of JSON on stdout
//!   (`{"error": "..."}` when it cannot do it):
//!   - `summary`: the calls, the comments, the deployments and their statuses by state, and the
//!     archives codeload served (`tarballs`);
//!   - `pull FILE`: FILE is a `pull_request` payload like those of PULLS_DIR: its pull request is
//!     what the API answers from now on (as a push changes it on GitHub), LOGIN an admin of its
//!     repository; answers `{"ok": true}`;
//!   - `commit REPO SHA DIR`: the files under DIR (the rest of the line; paths relative to it,
//!     executable bits kept, nothing else but files and directories) are the tree of commit SHA
//!     of REPO (`owner/name`): what its tarball holds from now on; answers `{"ok": true,
//!     "files": N}`;
//! - it exits when stdin closes (so it never outlives the bench), printing every call it got to
//!   stderr first.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[allow(dead_code)]
#[path = "../tests/common/github.rs"]
mod github;

use github::FakeGitHub;

struct Args {
    port_file: PathBuf,
    token: String,
    login: String,
    pulls_dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [port_file, token, login, pulls_dir] => Ok(Args {
            port_file: port_file.into(),
            token: token.clone(),
            login: login.clone(),
            pulls_dir: pulls_dir.into(),
        }),
        _ => Err("usage: fake_github PORT_FILE TOKEN LOGIN PULLS_DIR".to_owned()),
    }
}

/// The pull requests of the payloads in `dir`: (repository full name, pull request), by file name.
fn read_pulls(dir: &Path) -> Result<Vec<(String, Value)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|err| format!("read {}: {err}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths.iter().map(|path| read_pull(path)).collect()
}

/// The pull request of one `pull_request` payload: (repository full name, pull request).
fn read_pull(path: &Path) -> Result<(String, Value), String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("read {}: {err}", path.display()))?;
    let payload: Value = serde_json::from_str(&text).map_err(|err| format!("parse {}: {err}", path.display()))?;
    let repo = payload["repository"]["full_name"].as_str().map(str::to_owned);
    match (repo, payload.get("pull_request")) {
        (Some(repo), Some(pull)) if pull["number"].is_u64() => Ok((repo, pull.clone())),
        _ => Err(format!("{}: not a pull_request payload with repository.full_name", path.display())),
    }
}

/// The files under `dir`, by path relative to it (`/` between directories), with whether each
/// is executable.
fn read_tree(dir: &Path) -> Result<Vec<(String, Vec<u8>, bool)>, String> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<(String, Vec<u8>, bool)>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|err| format!("read {}: {err}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|err| format!("read {}: {err}", dir.display()))?.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|err| format!("stat {}: {err}", path.display()))?;
            if meta.is_dir() {
                walk(root, &path, files)?;
            } else if meta.is_file() {
                let relative = path.strip_prefix(root).map_err(|err| err.to_string())?;
                let name = relative
                    .to_str()
                    .ok_or_else(|| format!("{} is not UTF-8", path.display()))?
                    .replace(std::path::MAIN_SEPARATOR, "/");
                let content = std::fs::read(&path).map_err(|err| format!("read {}: {err}", path.display()))?;
                files.push((name, content, meta.permissions().mode() & 0o111 != 0));
            } else {
                return Err(format!("{}: only files and directories make a commit", path.display()));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    Ok(files)
}

/// `commit REPO SHA DIR`'s arguments.
fn commit_args(rest: &str) -> Option<(&str, &str, &Path)> {
    let (repo, rest) = rest.trim_start().split_once(char::is_whitespace)?;
    let (sha, dir) = rest.trim_start().split_once(char::is_whitespace)?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| (repo, sha, Path::new(dir)))
}

/// `commit REPO SHA DIR`: the files of DIR become the commit's tree.
fn commit(fake: &FakeGitHub, rest: &str) -> Result<Value, String> {
    let (repo, sha, dir) = commit_args(rest).ok_or("usage: commit REPO SHA DIR")?;
    let files = read_tree(dir)?;
    if files.is_empty() {
        return Err(format!("{}: no files", dir.display()));
    }
    let tree: Vec<(&str, &[u8])> = files.iter().map(|(path, content, _)| (path.as_str(), content.as_slice())).collect();
    // The fake asserts on trees git could not hold: an answer, not a panic, for those.
    let set = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fake.set_commit(repo, sha, &tree)));
    set.map_err(|_| format!("{}: not a tree git could hold (see stderr)", dir.display()))?;
    for (path, _, executable) in &files {
        if *executable {
            fake.set_executable(repo, sha, path);
        }
    }
    Ok(json!({ "ok": true, "files": files.len() }))
}

/// What previewd told the fake so far.
fn summary(fake: &FakeGitHub, pulls: &[(String, Value)]) -> Value {
    let mut repos: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (repo, pull) in pulls {
        let numbers = repos.entry(repo).or_default();
        numbers.extend(pull["number"].as_u64().filter(|n| !numbers.contains(n)));
    }
    let (mut comments, mut deployments) = (0, 0);
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    for (repo, numbers) in &repos {
        comments += numbers.iter().map(|n| fake.comments(repo, *n).len()).sum::<usize>();
        for deployment in fake.deployments(repo) {
            deployments += 1;
            for status in fake.statuses(repo, deployment.id) {
                *states.entry(status.state).or_default() += 1;
            }
        }
    }
    json!({
        "calls": fake.calls().len(),
        "comments": comments,
        "deployments": deployments,
        "statuses": states,
        "tarballs": fake.codeload_calls().len(),
    })
}

fn write_port(path: &Path, url: &str) -> Result<(), String> {
    let port = url.rsplit(':').next().unwrap_or_default();
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, port).map_err(|err| format!("write {}: {err}", temp.display()))?;
    std::fs::rename(&temp, path).map_err(|err| format!("rename to {}: {err}", path.display()))
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mut pulls = read_pulls(&args.pulls_dir)?;
    let fake = FakeGitHub::start().await;
    fake.add_token(&args.token, &args.login);
    for (repo, pull) in &pulls {
        fake.set_permission(repo, &args.login, "admin");
        fake.set_pull(repo, pull.clone());
    }
    write_port(&args.port_file, &fake.url)?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await.map_err(|err| format!("read stdin: {err}"))? {
        let (command, rest) = line.trim().split_once(char::is_whitespace).unwrap_or((line.trim(), ""));
        let answer = match command {
            "summary" => Ok(summary(&fake, &pulls)),
            "pull" => read_pull(Path::new(rest.trim())).map(|(repo, pull)| {
                fake.set_permission(&repo, &args.login, "admin");
                fake.set_pull(&repo, pull.clone());
                pulls.push((repo, pull));
                json!({ "ok": true })
            }),
            "commit" => commit(&fake, rest),
            "" => continue,
            other => Err(format!("unknown command {other:?}: summary, pull FILE or commit REPO SHA DIR")),
        };
        let answer = answer.unwrap_or_else(|message| json!({ "error": message }));
        stdout.write_all(format!("{answer}\n").as_bytes()).await.map_err(|err| format!("write stdout: {err}"))?;
        stdout.flush().await.map_err(|err| format!("write stdout: {err}"))?;
    }
    eprintln!("{}", fake.dump_calls());
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(message) = run().await {
        eprintln!("fake_github: {message}");
        std::process::exit(2);
    }
}
