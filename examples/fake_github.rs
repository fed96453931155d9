//! The tests' fake GitHub API (`tests/common/github.rs`) as a program of its own, so that
//! `scripts/bench.py` gives previewd's feedback calls the same fake the tests do.
//!
//! Usage: `fake_github PORT_FILE TOKEN LOGIN PULLS_DIR`
//!
//! - serves on `127.0.0.1` on a free port, and writes the port to PORT_FILE (atomically, via a
//!   temp file and a rename) once it accepts connections;
//! - TOKEN is the only token it knows, belonging to LOGIN;
//! - every `*.json` file in PULLS_DIR is a `pull_request` webhook payload: its pull request is
//!   what `GET /repos/{owner}/{repo}/pulls/{number}` answers (GitHub holds what it delivered
//!   last), and LOGIN is an admin of its repository;
//! - each line `summary` on stdin is answered with one line of JSON on stdout: the calls, the
//!   comments, the deployments and their statuses by state;
//! - it exits when stdin closes (so it never outlives the bench), printing every call it got to
//!   stderr first.

use std::collections::BTreeMap;
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
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|err| format!("read {}: {err}", path.display()))?;
            let payload: Value =
                serde_json::from_str(&text).map_err(|err| format!("parse {}: {err}", path.display()))?;
            let repo = payload["repository"]["full_name"].as_str().map(str::to_owned);
            match (repo, payload.get("pull_request")) {
                (Some(repo), Some(pull)) if pull["number"].is_u64() => Ok((repo, pull.clone())),
                _ => Err(format!("{}: not a pull_request payload with repository.full_name", path.display())),
            }
        })
        .collect()
}

/// What previewd told the fake so far.
fn summary(fake: &FakeGitHub, pulls: &[(String, Value)]) -> Value {
    let mut repos: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (repo, pull) in pulls {
        repos.entry(repo).or_default().extend(pull["number"].as_u64());
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
    json!({ "calls": fake.calls().len(), "comments": comments, "deployments": deployments, "statuses": states })
}

fn write_port(path: &Path, url: &str) -> Result<(), String> {
    let port = url.rsplit(':').next().unwrap_or_default();
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, port).map_err(|err| format!("write {}: {err}", temp.display()))?;
    std::fs::rename(&temp, path).map_err(|err| format!("rename to {}: {err}", path.display()))
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let pulls = read_pulls(&args.pulls_dir)?;
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
        let answer = match line.trim() {
            "summary" => summary(&fake, &pulls),
            "" => continue,
            other => json!({ "error": format!("unknown command {other:?}: only `summary`") }),
        };
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
