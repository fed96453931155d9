//! The fake GitHub's repository tarballs, checked on their own: tests of building previews from a
//! pull request's source rely on the API redirecting to codeload like GitHub does, and on the
//! archive being laid out like `git archive` lays it out.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::github::FakeGitHub;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};

const TOKEN: &str = "ghs_fake_tarball_token";
const REPO: &str = "Octo-Org/Shop";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const TOP: &str = "Octo-Org-Shop-0123456/";

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn fake() -> FakeGitHub {
    let github = FakeGitHub::start().await;
    github.add_token(TOKEN, "previewd-bot");
    github.set_commit(REPO, SHA, &[("Dockerfile", b"FROM nginx\n"), ("site/index.html", b"<h1>shop</h1>\n")]);
    github
}

/// One entry of a tar, as it was written.
struct Entry {
    path: String,
    kind: u8,
    mode: u32,
    link: Option<String>,
    content: Vec<u8>,
}

fn untar(gzipped: &[u8]) -> Vec<Entry> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gzipped));
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let header = entry.header();
        let (kind, mode) = (header.entry_type().as_byte(), header.mode().unwrap());
        let link = entry.link_name_bytes().map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        entries.push(Entry { path, kind, mode, link, content });
    }
    entries
}

async fn tarball_location(github: &FakeGitHub, git_ref: &str) -> reqwest::Url {
    let url = format!("{}/repos/{REPO}/tarball/{git_ref}", github.url);
    let response = client().get(url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 302);
    reqwest::Url::parse(response.headers()[LOCATION].to_str().unwrap()).unwrap()
}

#[tokio::test]
async fn tarball_redirects_to_codeload_which_serves_the_commit_as_git_archive_does() {
    let github = fake().await;
    github.set_executable(REPO, SHA, "Dockerfile");
    github.set_symlink(REPO, SHA, "site/escape", "../../etc/passwd");

    let api =
        client().get(format!("{}/repos/{REPO}/tarball/{SHA}", github.url)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(api.status(), 302);
    assert_eq!(api.headers()[CONTENT_LENGTH], "0");
    let location = reqwest::Url::parse(api.headers()[LOCATION].to_str().unwrap()).unwrap();
    assert_eq!(location.host_str(), Some("localhost"), "codeload is another host than the API's 127.0.0.1");
    assert_eq!(location.path(), format!("/{REPO}/legacy.tar.gz/{SHA}"));
    assert_eq!(location.as_str().trim_end_matches(location.path()), github.codeload_url);

    let download = client().get(location).send().await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.headers()[CONTENT_TYPE], "application/x-gzip");
    assert!(download.headers().get(CONTENT_LENGTH).is_none(), "codeload streams archives");
    let entries = untar(&download.bytes().await.unwrap());

    let listing: Vec<(&str, u8, u32)> = entries.iter().map(|e| (e.path.as_str(), e.kind, e.mode)).collect();
    let (top, dockerfile, site) = (TOP.to_owned(), format!("{TOP}Dockerfile"), format!("{TOP}site/"));
    let (escape, index) = (format!("{TOP}site/escape"), format!("{TOP}site/index.html"));
    assert_eq!(
        listing,
        [
            ("pax_global_header", b'g', 0o666),
            (top.as_str(), b'5', 0o775),
            (dockerfile.as_str(), b'0', 0o775),
            (site.as_str(), b'5', 0o775),
            (escape.as_str(), b'2', 0o777),
            (index.as_str(), b'0', 0o664),
        ]
    );
    assert_eq!(entries[0].content, format!("52 comment={SHA}\n").into_bytes(), "git get-tar-commit-id reads this");
    assert_eq!(entries[2].content, b"FROM nginx\n");
    assert_eq!(entries[4].link.as_deref(), Some("../../etc/passwd"));
    assert_eq!(entries[5].content, b"<h1>shop</h1>\n");

    // The token went to the API only.
    let api_calls = github.calls();
    assert_eq!(api_calls.len(), 1);
    assert_eq!(api_calls[0].path, format!("/repos/{REPO}/tarball/{SHA}"));
    assert_eq!(api_calls[0].authorization.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    let codeload_calls = github.codeload_calls();
    assert_eq!(codeload_calls.len(), 1);
    assert_eq!((codeload_calls[0].method.as_str(), codeload_calls[0].authorization.as_deref()), ("GET", None));
    assert_eq!(github.tarball_downloads(REPO, SHA), 1);
}

#[tokio::test]
async fn unknown_repositories_and_refs_are_404_and_the_api_wants_a_token() {
    let github = fake().await;
    let other_sha = "fedcba9876543210fedcba9876543210fedcba98";
    for path in [format!("/repos/{REPO}/tarball/{other_sha}"), format!("/repos/octo-org/unknown/tarball/{SHA}")] {
        let response = client().get(format!("{}{path}", github.url)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["message"], "Not Found");
        assert!(body["documentation_url"].is_string());
    }
    let anonymous = client().get(format!("{}/repos/{REPO}/tarball/{SHA}", github.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    let missing =
        client().get(format!("{}/{REPO}/legacy.tar.gz/{other_sha}", github.codeload_url)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(github.tarball_downloads(REPO, other_sha), 0);
    assert_eq!(github.tarball_downloads(REPO, SHA), 0);
}

#[tokio::test]
async fn branches_resolve_when_codeload_serves_and_credentials_there_are_recorded_not_refused() {
    let github = fake().await;
    let next = "89abcdef0123456789abcdef0123456789abcdef";
    github.set_commit(REPO, next, &[("Dockerfile", b"FROM nginx:alpine\n")]);
    github.set_ref(REPO, "feature/x", SHA);
    let location = tarball_location(&github, "feature%2Fx").await;
    assert_eq!(location.path(), format!("/{REPO}/legacy.tar.gz/feature%2Fx"));
    // The branch moves between the redirect and the download: codeload serves the new head.
    github.set_ref(REPO, "feature/x", next);
    let download = client().get(location).header(AUTHORIZATION, format!("token {TOKEN}")).send().await.unwrap();
    assert_eq!(download.status(), 200);
    let entries = untar(&download.bytes().await.unwrap());
    assert_eq!(entries[1].path, "Octo-Org-Shop-89abcde/");
    assert_eq!(entries[2].content, b"FROM nginx:alpine\n");
    assert_eq!(github.codeload_calls()[0].authorization.as_deref(), Some(format!("token {TOKEN}").as_str()));
    assert_eq!((github.tarball_downloads(REPO, next), github.tarball_downloads(REPO, SHA)), (1, 0));
}

#[tokio::test]
async fn codeload_can_be_slow_and_stops_with_the_fake() {
    let github = fake().await;
    github.set_tarball_delay(Duration::from_millis(300));
    let location = tarball_location(&github, SHA).await;
    let started = Instant::now();
    assert_eq!(client().get(location.clone()).send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    drop(github);
    let deadline = Instant::now() + Duration::from_secs(5);
    while client().get(location.clone()).send().await.is_ok() {
        assert!(Instant::now() < deadline, "codeload still answers after the fake was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
