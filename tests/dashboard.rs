//! The dashboard (`GET /`) in a real headless Chromium, driven over WebDriver by Debian's
//! `chromium` and `chromium-driver` (installed by scripts/setup.sh; nothing is downloaded).
//!
//! Screenshots land in `target/test-artifacts/` (`dashboard.png`, `dashboard-phone.png`,
//! `dashboard-dark.png`, `dashboard-error.png`, `dashboard-empty.png`, and `waking-phone.png`: the page a
//! sleeping preview shows a browser).

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{PASSWORD, TestApp, USER};
use fantoccini::{Client, ClientBuilder, Locator};
use previewd::config::Config;
use previewd::preview::{ImageKey, Slug};
use previewd::request::{LaunchRequest, PullRequestOrigin};
use serde_json::json;

/// The longest any single wait in the browser may take.
const WAIT: Duration = Duration::from_secs(30);
/// The whole browser part of a test.
const TEST_BUDGET: Duration = Duration::from_secs(240);
const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);
const PR_PREVIEW: &str = "hello-world-pr-2";
const PR_SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";

/// A program on PATH (or in the usual Debian place), or a failure that says how to get it.
fn require_program(names: &[&str]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> =
        std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")]).collect();
    for name in names {
        for dir in &dirs {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "{} not found: the dashboard test needs Debian's chromium and chromium-driver; run scripts/setup.sh",
        names.join(" / ")
    );
}

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// chromedriver in a process group of its own, with Chromium under it: dropping this kills the
/// whole group, so a failed test leaves no browser behind.
struct Browser {
    driver: Child,
    client: Option<Client>,
    log: PathBuf,
    profile: tempfile::TempDir,
}

impl Browser {
    /// `dark`: the page sees `prefers-color-scheme: dark`.
    async fn start(dark: bool) -> Self {
        let chromium = require_program(&["chromium", "chromium-browser"]);
        let chromedriver = require_program(&["chromedriver"]);
        let profile = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let log = profile.path().join("chromedriver.log");
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", chromedriver.display()));
        let mut browser = Self { driver, client: None, log, profile };
        let webdriver = format!("http://127.0.0.1:{port}");
        browser.wait_until_driver_ready(&webdriver).await;

        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("unhandledPromptBehavior".into(), json!("ignore"));
        capabilities.insert("timeouts".into(), json!({"pageLoad": 30_000, "script": 30_000, "implicit": 0}));
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-proxy-server",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            "--lang=en-US",
        ]
        .map(String::from)
        .into();
        args.push(format!("--window-size={},{}", DESKTOP.0, DESKTOP.1));
        args.push(format!("--user-data-dir={}", browser.profile.path().join("profile").display()));
        if dark {
            args.push("--force-dark-mode".to_owned());
        }
        capabilities.insert("goog:chromeOptions".into(), json!({ "binary": chromium, "args": args }));
        let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(capabilities);
        let connect = builder.connect(&webdriver);
        let client = match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => panic!("chromium did not start through chromedriver: {err}\n{}", browser.driver_log()),
            Err(_) => panic!("chromium did not start within 60 s\n{}", browser.driver_log()),
        };
        browser.client = Some(client);
        browser
    }

    async fn wait_until_driver_ready(&mut self, webdriver: &str) {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.driver.try_wait().unwrap() {
                panic!("chromedriver exited with {status}\n{}", self.driver_log());
            }
            if let Ok(response) = http.get(format!("{webdriver}/status")).send().await
                && let Ok(body) = response.json::<serde_json::Value>().await
                && body["value"]["ready"] == true
            {
                return;
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer within 20 s\n{}", self.driver_log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn driver_log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("a browser session")
    }

    /// Ends the session (Chromium exits) before the driver is killed.
    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            tokio::time::timeout(Duration::from_secs(20), client.close()).await.ok();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        Command::new("kill").args(["-KILL", "--", &group]).output().ok();
        self.driver.kill().ok();
        self.driver.wait().ok();
    }
}

/// Polls `check` until it gives a value; fails with `what` after `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn row_count(client: &Client, name: &str) -> usize {
    client.find_all(Locator::Css(&format!(r#"tr[data-name="{name}"]"#))).await.map_or(0, |rows| rows.len())
}

async fn flash_text(client: &Client) -> String {
    match client.find(Locator::Id("flash")).await {
        Ok(flash) => flash.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn screenshot(client: &Client, (width, height): (u32, u32), file: &str) -> PathBuf {
    client.set_window_size(width, height).await.expect("resize the window");
    // Let layout settle at the new width.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = artifacts_dir().join(file);
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
    path
}

/// Clicks a row's button, answers its confirm() dialog, and waits for the outcome message.
async fn click_and_confirm(client: &Client, name: &str, action: &str, confirm_mentions: &str) {
    let button = client
        .find(Locator::Css(&format!(r#"tr[data-name="{name}"] button[data-action="{action}"]"#)))
        .await
        .unwrap_or_else(|err| panic!("no {action} button for {name}: {err}"));
    button.click().await.expect("click");
    let text = eventually("the confirm dialog", || async { client.get_alert_text().await.ok() }).await;
    assert!(text.contains(confirm_mentions), "confirm text: {text:?}");
    client.accept_alert().await.expect("accept the confirm dialog");
}

/// A preview of a pull request, as the webhook would start it (with its repo, number and commit).
async fn launch_pull_request_preview(app: &TestApp) {
    let config = Config::from_yaml(&app.options_yaml, app.dir.path()).unwrap();
    let image = ImageKey::parse("demo").unwrap();
    let request = LaunchRequest {
        spec: config.images[&image].clone(),
        image,
        name: Slug::parse(PR_PREVIEW).unwrap(),
        container_name: "feature/greeting".to_owned(),
        env: BTreeMap::new(),
        origin: Some(PullRequestOrigin {
            repo: "Codertocat/Hello-World".to_owned(),
            number: 2,
            sha: PR_SHA.to_owned(),
        }),
        owner: None,
    };
    app.lifecycle.as_ref().unwrap().launch(request).await.expect("the pull-request preview starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_previews_in_chromium_and_its_buttons_relaunch_and_kill_them() {
    let started = Instant::now();
    let app = TestApp::start().await;
    let response = app.launch(&[("image_name", "demo"), ("container_name", "test")]).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    launch_pull_request_preview(&app).await;
    let preview_url = format!("http://test.preview.localhost:{}", app.nginx_port);

    // The HTTP contract, before the browser.
    let anonymous = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let page = app.client.get(app.url("/")).basic_auth(USER, Some(PASSWORD)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let header = |name: &str| page.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert_eq!(header("cache-control"), "no-store");
    let csp = header("content-security-policy");
    assert!(
        csp.starts_with("default-src 'none'") && csp.contains("connect-src 'self'") && csp.contains("'nonce-"),
        "{csp}"
    );
    let body = page.text().await.unwrap();
    let nonce = csp.split("'nonce-").nth(1).and_then(|rest| rest.split('\'').next()).unwrap();
    assert!(body.contains(&format!(r#"<script nonce="{nonce}">"#)), "the inline script carries this response's nonce");

    // Dark mode, in a browser of its own (the colour scheme is fixed at start-up).
    let dark = Browser::start(true).await;
    let shot = tokio::time::timeout(TEST_BUDGET, async {
        let client = dark.client();
        client.goto(&format!("http://{USER}:{PASSWORD}@{}/", app.api)).await.expect("open the dashboard");
        client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(r#"tr[data-name="test"]"#))
            .await
            .expect("the preview's row");
        let background = client.find(Locator::Css("body")).await.unwrap().css_value("background-color").await.unwrap();
        assert!(
            background.starts_with("rgb(13, 17, 23") || background.starts_with("rgba(13, 17, 23"),
            "the dark palette applies: {background}"
        );
        screenshot(client, DESKTOP, "dashboard-dark.png").await;
    })
    .await;
    assert!(shot.is_ok(), "the dark-mode screenshot did not finish within {TEST_BUDGET:?}\n{}", dark.driver_log());
    dark.close().await;

    let browser = Browser::start(false).await;
    let outcome = tokio::time::timeout(TEST_BUDGET, drive_the_dashboard(&app, browser.client(), &preview_url)).await;
    if outcome.is_err() {
        panic!("the browser part did not finish within {TEST_BUDGET:?}\n{}", browser.driver_log());
    }
    browser.close().await;

    // What the buttons did, seen from Docker and nginx.
    assert!(app.containers().is_empty(), "{:?}", app.containers());
    assert!(!app.vhost_path("test").exists());
    assert!(!app.vhost_path(PR_PREVIEW).exists());
    let (status, body) = app.via_nginx("test", "/").await.unwrap();
    assert_eq!(status, 404, "{body}");
    println!("dashboard test took {:.1} s", started.elapsed().as_secs_f64());
}

async fn drive_the_dashboard(app: &TestApp, client: &Client, preview_url: &str) {
    // Basic credentials in the URL: Chromium sends them, and keeps them for the page's fetch().
    let dashboard = format!("http://{USER}:{PASSWORD}@{}/", app.api);
    client.goto(&dashboard).await.expect("open the dashboard");
    client.wait().at_most(WAIT).for_element(Locator::Css(r#"tr[data-name="test"]"#)).await.expect("the preview's row");
    assert_eq!(client.title().await.unwrap(), "Previews · previewd");

    // The plain preview: name, image, status and a link to its URL.
    let row = client.find(Locator::Css(r#"tr[data-name="test"]"#)).await.unwrap();
    let text = row.text().await.unwrap();
    for needle in ["test", "demo", "running", preview_url, "Logs", "Relaunch", "Kill"] {
        assert!(text.contains(needle), "{needle:?} missing from the row: {text:?}");
    }
    let link = row.find(Locator::Css("a.url")).await.unwrap();
    assert_eq!(link.attr("href").await.unwrap().as_deref(), Some(preview_url));
    let logs = row.find(Locator::LinkText("Logs")).await.unwrap();
    assert_eq!(logs.attr("href").await.unwrap().as_deref(), Some("/api/previews/test/logs?tail=200"));

    // The pull request's preview links to the PR and its commit.
    let pr_row = client.find(Locator::Css(&format!(r#"tr[data-name="{PR_PREVIEW}"]"#))).await.unwrap();
    let pr_link =
        pr_row.find(Locator::Css(r#"a[href="https://github.com/Codertocat/Hello-World/pull/2"]"#)).await.unwrap();
    assert!(pr_link.text().await.unwrap().contains("Codertocat/Hello-World #2"));
    let commit = pr_row
        .find(Locator::Css(&format!(r#"a[href="https://github.com/Codertocat/Hello-World/commit/{PR_SHA}"]"#)))
        .await
        .unwrap();
    assert_eq!(commit.text().await.unwrap(), &PR_SHA[..7]);

    // The inline style applied under the CSP (a blocked <style> would leave the badge unstyled).
    let badge = row.find(Locator::Css(".badge")).await.unwrap();
    let background = badge.css_value("background-color").await.unwrap();
    assert!(!background.is_empty() && background != "rgba(0, 0, 0, 0)", "the badge is unstyled: {background:?}");

    screenshot(client, DESKTOP, "dashboard.png").await;
    screenshot(client, PHONE, "dashboard-phone.png").await;
    let header_display = client.find(Locator::Css("thead")).await.unwrap().css_value("display").await.unwrap();
    assert_eq!(header_display, "none", "at phone width the table turns into cards");
    let page_width = client.execute("return document.documentElement.scrollWidth", vec![]).await.unwrap();
    assert!(page_width.as_u64().unwrap() <= u64::from(PHONE.0), "no horizontal scrolling on a phone: {page_width}");
    client.set_window_size(DESKTOP.0, DESKTOP.1).await.unwrap();

    // The URL link works in the browser: *.localhost resolves to this machine.
    client.goto(preview_url).await.expect("open the preview");
    let source = client.source().await.unwrap();
    assert!(source.contains("Preview: test"), "{source}");
    client.goto(&dashboard).await.unwrap();
    client.wait().at_most(WAIT).for_element(Locator::Css(r#"tr[data-name="test"]"#)).await.unwrap();

    // Relaunch: a new container answers, the list is re-rendered.
    let before = app.containers();
    client
        .find(Locator::Css(r#"tr[data-name="test"] button[data-action="relaunch"]"#))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let flash = eventually("the relaunch to finish", || async {
        let text = flash_text(client).await;
        (text.starts_with("Relaunched") || text.contains("failed")).then_some(text)
    })
    .await;
    assert_eq!(flash, format!("Relaunched test: {preview_url}"));
    let after = app.containers();
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(before.iter().any(|c| !after.contains(c)), "relaunch replaced the container: {before:?} -> {after:?}");

    // Kill, with its confirmation: the row goes, and so does the container.
    click_and_confirm(client, "test", "kill", "Kill preview \"test\"").await;
    eventually("the killed preview to leave the page", || async {
        (row_count(client, "test").await == 0).then_some(())
    })
    .await;
    assert_eq!(flash_text(client).await, "Removed test.");
    assert_eq!(row_count(client, PR_PREVIEW).await, 1, "the other preview stays");
    let remaining = app.containers();
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    assert!(!app.vhost_path("test").exists(), "the killed preview's vhost is gone");

    // Dismissing the confirmation changes nothing.
    client
        .find(Locator::Css(&format!(r#"tr[data-name="{PR_PREVIEW}"] button[data-action="kill"]"#)))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the confirm dialog", || async { client.get_alert_text().await.ok() }).await;
    client.dismiss_alert().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(row_count(client, PR_PREVIEW).await, 1);
    assert_eq!(app.containers().len(), 1);

    // A stale page: the preview was removed elsewhere; the API's error shows in its row.
    assert_eq!(app.kill(PR_PREVIEW).await.status(), 200);
    click_and_confirm(client, PR_PREVIEW, "kill", PR_PREVIEW).await;
    let error = eventually("the error in the row", || async {
        let message =
            client.find(Locator::Css(&format!(r#"tr[data-name="{PR_PREVIEW}"] .row-msg.error"#))).await.ok()?;
        message.text().await.ok().filter(|text| !text.is_empty())
    })
    .await;
    assert!(error.contains(&format!("no preview named \"{PR_PREVIEW}\"")), "{error}");
    assert_eq!(flash_text(client).await, format!("Kill of {PR_PREVIEW} failed."));
    screenshot(client, DESKTOP, "dashboard-error.png").await;

    // Refresh: nothing runs any more, and the page tells how to launch a preview.
    client.find(Locator::Css(r#"button[data-action="refresh"]"#)).await.unwrap().click().await.unwrap();
    let empty = eventually("the empty state", || async {
        let element = client.find(Locator::Css(".empty")).await.ok()?;
        element.text().await.ok()
    })
    .await;
    assert!(empty.contains("No previews are running"), "{empty}");
    assert_eq!(flash_text(client).await, "", "a refresh clears the old message");
    let origin = format!("http://{}", app.api);
    // The example names the first configured image (the test config sorts "chatty" first).
    assert!(
        empty.contains(&format!("curl --user {USER} -d 'image_name=chatty&container_name=my-branch' {origin}/launch")),
        "{empty}"
    );
    assert!(
        empty.contains("Images you can launch: chatty crash demo late missing silent slowcgi unpullable"),
        "{empty}"
    );
    screenshot(client, DESKTOP, "dashboard-empty.png").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_puts_a_preview_to_sleep_from_the_dashboard_then_sees_the_waking_page_and_then_the_app() {
    let app = TestApp::start().await;
    let response = app.launch(&[("image_name", "demo"), ("container_name", "nap")]).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let (status, _) = app.via_nginx("nap", "/").await.unwrap();
    assert_eq!(status, 200);
    let preview_url = format!("http://nap.preview.localhost:{}/", app.nginx_port);
    let browser = Browser::start(false).await;
    let outcome = tokio::time::timeout(TEST_BUDGET, async {
        let client = browser.client();
        client.goto(&format!("http://{USER}:{PASSWORD}@{}/", app.api)).await.expect("open the dashboard");
        let sleep = Locator::Css(r#"tr[data-name="nap"] button[data-action="sleep"]"#);
        client.wait().at_most(WAIT).for_element(sleep).await.expect("the Sleep button").click().await.unwrap();
        let wake = Locator::Css(r#"tr[data-name="nap"] button[data-action="wake"]"#);
        client.wait().at_most(WAIT).for_element(wake).await.expect("the row says it sleeps, with a Wake button");
        let row = client.find(Locator::Css(r#"tr[data-name="nap"]"#)).await.unwrap().text().await.unwrap();
        assert!(row.contains("asleep"), "{row}");

        // The preview's own URL: the waking page at once, then the app by itself.
        client.goto(&preview_url).await.expect("open the sleeping preview");
        let title = client.title().await.unwrap();
        assert!(title.starts_with("Waking up nap"), "the first answer is the waking page: {title:?}");
        screenshot(client, PHONE, "waking-phone.png").await;
        eventually("the app in place of the waking page", || async {
            let source = client.source().await.ok()?;
            (!source.contains("Waking up")).then_some(())
        })
        .await;
        assert_eq!(client.current_url().await.unwrap().as_str(), preview_url);
    })
    .await;
    if outcome.is_err() {
        panic!("the browser part did not finish within {TEST_BUDGET:?}\n{}", browser.driver_log());
    }
    browser.close().await;
    // The app answered the browser before the wake routed it and cleared its sleep.
    eventually("the preview awake", || async {
        (app.get_json("/api/previews/nap").await["status"] == "running").then_some(())
    })
    .await;
}
