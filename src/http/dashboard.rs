//! The dashboard at `GET /`: one server-rendered page listing every preview, with a logs link,
//! relaunch and kill per preview.
//!
//! The Tera template is embedded in the binary and parsed once; every value is HTML-escaped. The
//! page fetches nothing from elsewhere: its style and a little vanilla JS are inline, allowed by
//! a per-response CSP nonce, and the JS only calls this daemon's own `/launch`, `/kill` and `/`.

use crate::clock::{age, unix_now, utc};
use std::sync::OnceLock;

use axum::extract::{Extension, State};
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use tera::{Context, Tera};

use super::AppState;
use super::error::ApiError;
use crate::auth::Principal;
use crate::config::Config;
use crate::lifecycle::PreviewInfo;
use crate::preview::PreviewState;

const TEMPLATE: &str = include_str!("../../templates/dashboard.html.tera");
/// The `.html` suffix turns Tera's autoescaping on (it is also set explicitly below).
const TEMPLATE_NAME: &str = "dashboard.html";

pub async fn page(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    let mut previews = state.visible_previews(&principal).await?;
    previews.sort_by(|a, b| a.name.as_ref().cmp(b.name.as_ref()));
    let nonce = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let builds = state.lifecycle.builds();
    let mut page = Page::new(&state.config, &principal, &previews, unix_now(), nonce.clone());
    let in_flight = super::builds::visible_builds(&principal, builds.statuses(), &previews);
    page.builds = in_flight.iter().map(|status| BuildRow::new(status, unix_now())).collect();
    for (row, info) in page.previews.iter_mut().zip(&previews) {
        if builds.has_log(&info.name) {
            row.build_log_url = Some(format!("/api/previews/{}/build-log", info.name));
        }
    }
    let html = render(&page).map_err(ApiError::Internal)?;
    let mut response = Html(html).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let csp = content_security_policy(&nonce);
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&csp).map_err(|err| ApiError::Internal(format!("bad CSP header: {err}")))?,
    );
    Ok(response)
}

/// Nothing but this page's own inline style and script (by nonce), and requests to this origin.
fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src data:; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
}

/// What the template sees. Every string is escaped by Tera when rendered.
#[derive(Debug, Serialize)]
struct Page {
    nonce: String,
    instance: String,
    /// Who is signed in: a `users` name or a GitHub login.
    user: String,
    previews: Vec<Row>,
    running: usize,
    /// The image keys `/launch` accepts, for the empty state.
    images: Vec<String>,
    /// The empty state's example command, up to the API's address...
    launch_command: String,
    /// ...which the page replaces with the origin it was loaded from.
    api_origin: String,
    /// Builds in flight and queued.
    builds: Vec<BuildRow>,
}

/// A build in flight or queued: where it is, and its log.
#[derive(Debug, Serialize)]
struct BuildRow {
    name: String,
    state: &'static str,
    revision: String,
    step: Option<String>,
    age: String,
    log_url: String,
}

impl BuildRow {
    fn new(status: &crate::build::BuildStatus, now: i64) -> Self {
        Self {
            name: status.name.to_string(),
            state: status.state,
            revision: status.revision.chars().take(12).collect(),
            step: status.step.clone(),
            age: age(now - status.started),
            log_url: format!("/api/previews/{}/build-log", status.name),
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    url: String,
    /// Only http(s) URLs become links.
    url_is_link: bool,
    image: String,
    container: String,
    status: String,
    /// ok, warn, bad or idle: the badge's colour.
    status_class: &'static str,
    routed: bool,
    age: String,
    created_utc: String,
    repo: Option<String>,
    repo_url: Option<String>,
    pr: Option<u64>,
    pr_url: Option<String>,
    sha: Option<String>,
    sha_short: Option<String>,
    commit_url: Option<String>,
    logs_url: String,
    /// Of a preview built from source: its last build's log.
    build_log_url: Option<String>,
    services: Vec<ServiceRow>,
    asleep: bool,
    /// How long ago nginx last served it a request (or it was launched or woken).
    last_request: Option<String>,
    /// Who pinned it.
    pinned: Option<String>,
    /// In how long `lifecycle.remove_after` removes it, and when.
    expires: Option<String>,
    expires_utc: Option<String>,
}

/// A service of a preview: its state badge, and a link to its log.
#[derive(Debug, Serialize)]
struct ServiceRow {
    name: String,
    status: String,
    status_class: &'static str,
    logs_url: String,
}

impl Page {
    fn new(config: &Config, principal: &Principal, previews: &[PreviewInfo], now: i64, nonce: String) -> Self {
        let web = github_web_url(config);
        let images: Vec<String> = config.images.keys().map(ToString::to_string).collect();
        let (user, auth) = match principal {
            Principal::User(name) => (name.clone(), format!("--user {}", shell_word(name))),
            Principal::GitHub(login) => {
                (format!("{login} (GitHub)"), r#"-H "Authorization: Bearer $GITHUB_TOKEN""#.to_owned())
            }
        };
        let image = images.first().map_or("IMAGE", String::as_str);
        let launch_command = format!("curl {auth} -d 'image_name={image}&container_name=my-branch'");
        Self {
            nonce,
            instance: config.instance.to_string(),
            user,
            running: previews.iter().filter(|p| p.status == PreviewState::Running).count(),
            previews: previews.iter().map(|info| Row::new(info, now, &web)).collect(),
            images,
            launch_command,
            api_origin: api_origin(config.listen),
            builds: Vec::new(),
        }
    }
}

impl Row {
    fn new(info: &PreviewInfo, now: i64, github_web: &str) -> Self {
        let repo_url = info.repo.as_ref().map(|repo| format!("{github_web}/{repo}"));
        let pr_url = match (&repo_url, info.pr) {
            (Some(repo_url), Some(pr)) => Some(format!("{repo_url}/pull/{pr}")),
            _ => None,
        };
        let commit_url = match (&repo_url, &info.sha) {
            (Some(repo_url), Some(sha)) => Some(format!("{repo_url}/commit/{sha}")),
            _ => None,
        };
        Self {
            name: info.name.to_string(),
            url: info.url.clone(),
            url_is_link: info.url.starts_with("http://") || info.url.starts_with("https://"),
            image: info.image.to_string(),
            container: info.container_id.chars().take(12).collect(),
            status: info.status.to_string(),
            status_class: status_class(info.status),
            routed: info.routed,
            age: age(now - info.created),
            created_utc: utc_timestamp(info.created),
            repo: info.repo.clone(),
            repo_url,
            pr: info.pr,
            pr_url,
            sha: info.sha.clone(),
            sha_short: info.sha.as_ref().map(|sha| sha.chars().take(7).collect()),
            commit_url,
            logs_url: format!("/api/previews/{}/logs?tail=200", info.name),
            build_log_url: None,
            asleep: info.status == PreviewState::Asleep,
            last_request: info.last_request.map(|at| format!("{} ago", age(now - at))),
            pinned: info.pinned.clone(),
            expires: info.expires.map(|at| age((at - now).max(0))),
            expires_utc: info.expires.map(utc_timestamp),
            services: info
                .services
                .iter()
                .map(|service| ServiceRow {
                    name: service.name.to_string(),
                    status: service.status.to_string(),
                    status_class: status_class(service.status),
                    logs_url: format!("/api/previews/{}/logs?tail=200&service={}", info.name, service.name),
                })
                .collect(),
        }
    }
}

fn status_class(status: PreviewState) -> &'static str {
    match status {
        PreviewState::Running => "ok",
        PreviewState::Restarting
        | PreviewState::Created
        | PreviewState::Paused
        | PreviewState::Stopping
        | PreviewState::Removing => "warn",
        PreviewState::Exited | PreviewState::Dead => "bad",
        PreviewState::Unknown | PreviewState::Asleep => "idle",
    }
}

/// Where pull requests are shown: github.com, or a GitHub Enterprise host (`https://HOST/api/v3`).
fn github_web_url(config: &Config) -> String {
    config.github.as_ref().map_or_else(|| "https://github.com".to_owned(), |github| github.web_url())
}

/// The API's address as a client would type it (the page replaces it with its own origin).
fn api_origin(listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() { format!("http://HOST:{}", listen.port()) } else { format!("http://{listen}") }
}

/// A user name as one shell word (quoted unless plainly safe).
fn shell_word(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `2026-01-31 12:34 UTC`.
fn utc_timestamp(unix: i64) -> String {
    let t = utc(unix);
    format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", t.year, t.month, t.day, t.hour, t.minute)
}

/// The parsed template, built on first use.
fn tera() -> Result<&'static Tera, String> {
    static TERA: OnceLock<Result<Tera, String>> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut tera = Tera::new();
        tera.autoescape_on([".html"]);
        tera.add_raw_template(TEMPLATE_NAME, TEMPLATE)
            .map_err(|err| format!("the dashboard template does not parse: {err}"))?;
        Ok(tera)
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn render(page: &Page) -> Result<String, String> {
    let context = Context::from_serialize(page).map_err(|err| format!("cannot render the dashboard: {err}"))?;
    tera()?
        .render(TEMPLATE_NAME, &context)
        .map_err(|err| format!("cannot render the dashboard: {}", crate::error_chain(&err)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::{ImageKey, Slug};

    fn info(name: &str) -> PreviewInfo {
        PreviewInfo {
            name: Slug::parse(name).unwrap(),
            url: format!("http://{name}.preview.localhost:8080"),
            image: ImageKey::parse("demo").unwrap(),
            container_id: "0123456789abcdef0123".to_owned(),
            status: PreviewState::Running,
            routed: true,
            created: 1_000_000,
            repo: None,
            pr: None,
            sha: None,
            owner: None,
            services: Vec::new(),
            last_request: None,
            pinned: None,
            expires: None,
        }
    }

    fn page(rows: Vec<Row>) -> Page {
        Page {
            nonce: "bm9uY2U=".to_owned(),
            instance: "default".to_owned(),
            user: "testuser".to_owned(),
            running: rows.len(),
            previews: rows,
            images: vec!["demo".to_owned()],
            launch_command: "curl --user testuser -d 'image_name=demo&container_name=my-branch'".to_owned(),
            api_origin: "http://127.0.0.1:7800".to_owned(),
            builds: Vec::new(),
        }
    }

    #[test]
    fn builds_in_flight_show_their_step_and_log_and_built_previews_link_their_build_log() {
        let mut row = Row::new(&info("shop-pr-1"), 1_000_060, "https://github.com");
        row.build_log_url = Some("/api/previews/shop-pr-1/build-log".to_owned());
        let mut page = page(vec![row]);
        page.builds = vec![BuildRow {
            name: "shop-pr-2".to_owned(),
            state: "building",
            revision: "0123456789ab".to_owned(),
            step: Some("Step 2/5 : RUN make <all>".to_owned()),
            age: "5s".to_owned(),
            log_url: "/api/previews/shop-pr-2/build-log".to_owned(),
        }];
        let html = render(&page).unwrap();
        assert!(html.contains("Step 2/5 : RUN make &lt;all&gt;"), "escaped step");
        assert!(html.contains(r#"href="/api/previews/shop-pr-2/build-log""#));
        assert!(html.contains(r#"href="/api/previews/shop-pr-1/build-log""#));
        assert!(!render(&super::tests::page(Vec::new())).unwrap().contains("builds-title"), "no builds, no section");
    }

    #[test]
    fn every_value_is_html_escaped() {
        let hostile = r#"<script>alert("x")</script>'&"#;
        let mut row = Row::new(&info("test"), 1_000_060, "https://github.com");
        row.status = hostile.to_owned();
        row.image = hostile.to_owned();
        row.url = format!("https://x.example/\"><img src=x onerror=alert(1)>{hostile}");
        row.repo = Some(hostile.to_owned());
        row.pr_url = Some(format!("https://github.com/{hostile}/pull/1"));
        row.pr = Some(1);
        row.sha_short = Some(hostile.to_owned());
        let mut page = page(vec![row]);
        page.user = hostile.to_owned();
        page.instance = hostile.to_owned();
        let html = render(&page).unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(!html.contains(r#""><img"#), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#39;&amp;"), "{html}");
        // The page's own script is still there, with the nonce.
        assert!(html.contains(r#"<script nonce="bm9uY2U=">"#), "{html}");
    }

    #[test]
    fn the_template_has_no_inline_handlers_or_external_resources() {
        let html = render(&page(vec![Row::new(&info("test"), 1_000_060, "https://github.com")])).unwrap();
        for banned in
            [" onclick=", " onload=", " onsubmit=", "<script src", "<link rel=\"stylesheet\"", "@import", " style=\""]
        {
            assert!(!html.contains(banned), "{banned} in the page: CSP would block it, or it fetches at run time");
        }
        assert!(html.contains(r#"<meta name="viewport""#));
        assert!(html.contains(r#"href="http://test.preview.localhost:8080""#));
        assert!(html.contains(r#"href="/api/previews/test/logs?tail=200""#));
        assert!(html.contains(r#"data-name="test""#) && html.contains(r#"data-image="demo""#));
    }

    #[test]
    fn each_service_has_a_badge_with_its_state_linking_to_its_log() {
        let mut shop = info("shop-x");
        shop.services = vec![
            crate::lifecycle::ServiceInfo {
                name: crate::preview::ServiceName::parse("db").unwrap(),
                status: PreviewState::Running,
            },
            crate::lifecycle::ServiceInfo {
                name: crate::preview::ServiceName::parse("cache").unwrap(),
                status: PreviewState::Exited,
            },
        ];
        let html = render(&page(vec![Row::new(&shop, 1_000_060, "https://github.com")])).unwrap();
        assert!(
            html.contains(r#"<a class="badge ok" href="/api/previews/shop-x/logs?tail=200&amp;service=db""#),
            "{html}"
        );
        assert!(html.contains(">db: running</a>") && html.contains(">cache: exited</a>"), "{html}");
        assert!(html.contains(r#"<a class="badge bad" href="/api/previews/shop-x/logs?tail=200&amp;service=cache""#));
    }

    #[test]
    fn empty_state_shows_how_to_launch() {
        let html = render(&page(Vec::new())).unwrap();
        assert!(html.contains("No previews are running"), "{html}");
        assert!(
            html.contains("curl --user testuser -d &#39;image_name=demo&amp;container_name=my-branch&#39;"),
            "{html}"
        );
        assert!(html.contains(r#"<span class="api-origin">http://127.0.0.1:7800</span>/launch"#), "{html}");
    }

    #[test]
    fn pull_request_previews_link_to_github() {
        let mut pr = info("hello-world-pr-2");
        pr.repo = Some("Codertocat/Hello-World".to_owned());
        pr.pr = Some(2);
        pr.sha = Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821".to_owned());
        let row = Row::new(&pr, 1_000_000 + 7300, "https://github.com");
        assert_eq!(row.pr_url.as_deref(), Some("https://github.com/Codertocat/Hello-World/pull/2"));
        assert_eq!(row.sha_short.as_deref(), Some("ec26c3e"));
        assert_eq!(row.age, "2h");
        let html = render(&page(vec![row])).unwrap();
        assert!(html.contains(r#"href="https://github.com/Codertocat/Hello-World/pull/2""#), "{html}");
        assert!(html.contains(">#2<"), "{html}");
        assert!(html.contains(
            r#"href="https://github.com/Codertocat/Hello-World/commit/ec26c3e57ca3a959ca5aad62de7213c562f8c821""#
        ));
    }

    #[test]
    fn only_http_urls_become_links() {
        let mut bad = info("test");
        bad.url = "javascript:alert(1)".to_owned();
        let html = render(&page(vec![Row::new(&bad, 1_000_000, "https://github.com")])).unwrap();
        assert!(!html.contains(r#"href="javascript:"#), "{html}");
    }

    #[test]
    fn ages_and_timestamps_read_like_a_person_wrote_them() {
        assert_eq!(age(-5), "0s");
        assert_eq!(age(45), "45s");
        assert_eq!(age(180), "3m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(5 * 86_400 + 10), "5d");
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_timestamp(1_795_314_056), "2026-11-22 02:20 UTC");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn csp_allows_only_the_nonce_and_this_origin() {
        let csp = content_security_policy("abc");
        assert!(csp.starts_with("default-src 'none';"));
        assert!(csp.contains("script-src 'nonce-abc'") && csp.contains("style-src 'nonce-abc'"));
        assert!(csp.contains("connect-src 'self'") && csp.contains("form-action 'self'"));
        assert!(!csp.contains("unsafe"));
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("testuser"), "testuser");
        assert_eq!(shell_word("it's me"), r"'it'\''s me'");
    }
}
