//! Previews that sleep when nobody uses them and wake on the first request, end to end against
//! the real Docker engine and a real nginx: traffic is what nginx reports (its request log to
//! previewd), sleeping stops the containers, the first request wakes them.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{PASSWORD, TestApp, USER};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A test instance whose previews sleep after `sleep_after` seconds without a request.
async fn sleepy_app(sleep_after: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let instance = common::unique_instance();
    let nginx_port = common::free_port();
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Default::default());
    let lifecycle = format!("lifecycle:\n  sleep_after: {sleep_after}\n  wake_timeout: 30s\n");
    TestApp::start_from(dir, instance, nginx_port, format!("{yaml}{lifecycle}")).await
}

async fn preview(app: &TestApp, name: &str) -> Value {
    app.get_json(&format!("/api/previews/{name}")).await
}

async fn wait_for_status(app: &TestApp, name: &str, status: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = preview(app, name).await;
        if found["status"] == status {
            return found;
        }
        assert!(Instant::now() < deadline, "{name} never became {status}: {found}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post(app: &TestApp, path: &str) -> reqwest::Response {
    app.client.post(app.url(path)).basic_auth(USER, Some(PASSWORD)).send().await.unwrap()
}

/// The states of the instance's containers of one preview, as Docker has them.
fn states_of(app: &TestApp, name: &str) -> Vec<String> {
    common::docker_ps(&format!("label=previewd.slug={name}"))
        .into_iter()
        .filter(|line| line.contains(&app.instance))
        .map(|line| line.rsplit(' ').next().unwrap_or_default().to_owned())
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

async fn metrics(app: &TestApp) -> String {
    app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The metrics once `series` is above 0.
async fn wait_for_metric(app: &TestApp, series: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(app).await;
        if metric(&text, series) > 0.0 {
            return text;
        }
        assert!(Instant::now() < deadline, "{series} never counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_preview_sleeps_and_a_held_request_wakes_it_and_is_served_by_the_app() {
    let app = sleepy_app("2").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "nap")]).await.status(), 200);
    let (status, awake_page) = app.via_nginx("nap", "/").await.unwrap();
    assert_eq!(status, 200);

    wait_for_status(&app, "nap", "asleep").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let states = states_of(&app, "nap");
        if !states.is_empty() && states.iter().all(|s| s == "exited") {
            break;
        }
        assert!(Instant::now() < deadline, "its containers are never stopped: {states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let began = Instant::now();
    let (status, page) = app.via_nginx("nap", "/").await.unwrap();
    assert_eq!((status, page.as_str()), (200, awake_page.as_str()), "the held request is served by the app");
    let woke_in = began.elapsed();
    let found = wait_for_status(&app, "nap", "running").await;
    assert!(found["last_request"].as_i64().is_some(), "{found}");
    let text = wait_for_metric(&app, "previewd_wakes_total{result=\"success\"}").await;
    assert_eq!(metric(&text, "previewd_sleeps_total{reason=\"idle\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "previewd_wakes_total{result=\"success\"}"), 1.0, "{text}");
    assert!(woke_in < Duration::from_secs(10), "woke in {woke_in:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_that_serves_requests_through_nginx_stays_awake() {
    let app = sleepy_app("2").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "busy")]).await.status(), 200);
    let launched = preview(&app, "busy").await["last_request"].as_i64().expect("a launch counts as use");
    // Six seconds of requests, one every 300 ms: three times sleep_after.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(app.via_nginx("busy", "/").await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let found = preview(&app, "busy").await;
    assert_eq!(found["status"], "running", "{found}");
    let last = found["last_request"].as_i64().unwrap();
    assert!(last >= launched + 4, "nginx's request log moved the last request on: {found}");
    assert_eq!(metric(&metrics(&app).await, "previewd_sleeps_total{reason=\"idle\"}"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_the_waking_page_at_once_and_then_the_app() {
    let app = sleepy_app("0").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "dozy")]).await.status(), 200);
    let (_, awake_page) = app.via_nginx("dozy", "/").await.unwrap();
    let asleep = post(&app, "/api/previews/dozy/sleep").await;
    assert_eq!(asleep.status(), 200);
    assert_eq!(asleep.json::<Value>().await.unwrap()["status"], "asleep");

    let host = app.host("dozy");
    let browser =
        reqwest::Client::builder().no_proxy().resolve(&host, ([127, 0, 0, 1], app.nginx_port).into()).build().unwrap();
    let get = || {
        browser
            .get(format!("http://{host}:{}/", app.nginx_port))
            .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
            .send()
    };
    let first = get().await.unwrap();
    assert_eq!(first.status(), 503, "the waking page says the app is not there yet");
    assert_eq!(first.headers()["retry-after"], "1");
    let text = first.text().await.unwrap();
    assert!(text.contains("Waking up dozy") && text.contains("http-equiv=\"refresh\""), "{text}");
    let deadline = Instant::now() + WAIT;
    loop {
        let response = get().await.unwrap();
        if response.status() == 200 {
            assert_eq!(response.text().await.unwrap(), awake_page);
            break;
        }
        assert!(Instant::now() < deadline, "the browser never got the app");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_share_one_wake_and_all_get_the_app() {
    let app = Arc::new(sleepy_app("0").await);
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "crowd")]).await.status(), 200);
    assert_eq!(post(&app, "/api/previews/crowd/sleep").await.status(), 200);
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let app = Arc::clone(&app);
            tokio::spawn(async move { app.via_nginx("crowd", "/").await.map(|(status, _)| status) })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap(), 200);
    }
    // The held requests are answered before the wake has routed the app and counted itself.
    wait_for_status(&app, "crowd", "running").await;
    let text = wait_for_metric(&app, "previewd_wakes_total{result=\"success\"}").await;
    assert_eq!(metric(&text, "previewd_wakes_total{result=\"success\"}"), 1.0, "{text}");
    let apps = common::docker_ps("label=previewd.slug=crowd");
    assert_eq!(apps.iter().filter(|line| line.contains(&app.instance)).count(), 1, "one app container: {apps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_preview_stays_asleep_across_a_restart_while_a_crashed_one_is_repaired() {
    let mut app = sleepy_app("0").await;
    for name in ["sleeper", "crasher"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    assert_eq!(post(&app, "/api/previews/sleeper/sleep").await.status(), 200);
    app.stop().await;
    let crashed: Vec<String> = common::docker_ps("label=previewd.slug=crasher")
        .into_iter()
        .filter(|line| line.contains(&app.instance))
        .map(|line| line.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    // Stopped behind previewd's back while it was down: the engine will not start it again,
    // so the start-up reconcile must (it is not asleep).
    assert_eq!(crashed.len(), 1, "{crashed:?}");
    std::process::Command::new("docker").args(["stop", "-t", "1", &crashed[0]]).output().unwrap();
    app.boot().await;

    assert_eq!(preview(&app, "crasher").await["status"], "running", "the stopped preview was brought back");
    assert_eq!(app.via_nginx("crasher", "/").await.unwrap().0, 200);
    assert_eq!(preview(&app, "sleeper").await["status"], "asleep");
    assert!(states_of(&app, "sleeper").iter().all(|s| s == "exited"), "nothing of it was started");
    let (status, _) = app.via_nginx("sleeper", "/").await.unwrap();
    assert_eq!(status, 200, "routed to the new wake listener, and woken");
    wait_for_status(&app, "sleeper", "running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_and_wake_of_an_unknown_preview_say_404() {
    let app = sleepy_app("0").await;
    for action in ["sleep", "wake"] {
        let (status, message) = common::error_of(post(&app, &format!("/api/previews/nobody/{action}")).await).await;
        assert_eq!(status, 404, "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_preview_whose_port_was_taken_wakes_as_a_copy_on_another_port() {
    let app = sleepy_app("0").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "moved")]).await.status(), 200);
    let before = preview(&app, "moved").await["container_id"].as_str().unwrap().to_owned();
    assert_eq!(post(&app, "/api/previews/moved/sleep").await.status(), 200);
    let port = common::docker_output(&[
        "inspect",
        "--format",
        "{{(index (index .HostConfig.PortBindings \"3000/tcp\") 0).HostPort}}",
        &before,
    ]);
    // Its container is stopped: another program takes the port meanwhile.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    let (status, _) = app.via_nginx("moved", "/").await.unwrap();
    assert_eq!(status, 200, "woken on another port");
    let after = wait_for_status(&app, "moved", "running").await;
    assert_ne!(after["container_id"], before.as_str(), "a copy runs: {after}");
    assert_eq!(states_of(&app, "moved"), vec!["running".to_owned()], "the container that slept went");
    drop(squatter);
}

/// `sleepy_app` with more `lifecycle` keys and a `big` image whose app alone takes 128 MiB.
async fn capped_app(caps: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let instance = common::unique_instance();
    let nginx_port = common::free_port();
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Default::default());
    let big = "\n  big:\n    image: previewd-demo:latest\n    port: 3000\n    command: [/bin/busybox, httpd, -f, -p, \"3000\", -h, /www]\n    pull: never\n    memory: 128m";
    let yaml = common::with_images(&yaml, big);
    TestApp::start_from(dir, instance, nginx_port, format!("{yaml}lifecycle:\n  {caps}\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_awake_a_launch_puts_the_least_recently_used_preview_to_sleep() {
    let app = capped_app("max_awake: 2").await;
    for name in ["first", "second"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    // A request makes `first` the more recently used of the two.
    assert_eq!(app.via_nginx("first", "/").await.unwrap().0, 200);
    wait_until_used_after(&app, "first", "second").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "third")]).await.status(), 200);
    assert_eq!(preview(&app, "second").await["status"], "asleep", "the least recently used sleeps");
    assert_eq!(preview(&app, "first").await["status"], "running");
    assert_eq!(preview(&app, "third").await["status"], "running");
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "previewd_sleeps_total{reason=\"cap\"}"), 1.0, "{text}");

    // Waking `second` puts the least recently used of the others to sleep in turn.
    assert_eq!(app.via_nginx("second", "/").await.unwrap().0, 200);
    wait_for_status(&app, "second", "running").await;
    assert_eq!(preview(&app, "first").await["status"], "asleep", "first was used before third was launched");
    assert_eq!(preview(&app, "third").await["status"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_launches_at_once_do_not_take_the_same_room_under_max_awake() {
    let app = capped_app("max_awake: 2").await;
    for name in ["first", "second"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    let (third, fourth) = tokio::join!(
        app.launch(&[("image_name", "demo"), ("container_name", "third")]),
        app.launch(&[("image_name", "demo"), ("container_name", "fourth")]),
    );
    assert_eq!((third.status().as_u16(), fourth.status().as_u16()), (200, 200));
    let listed = app.get_json("/api/previews").await;
    let awake: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == "running")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(awake.len(), 2, "max_awake holds with launches at once: {awake:?}");
    assert!(awake.contains(&"third") && awake.contains(&"fourth"), "{awake:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_that_no_sleep_can_make_room_for_under_max_awake_memory_is_refused_with_429() {
    let app = capped_app("max_awake_memory: 100m").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "small")]).await.status(), 200);
    // 64 MiB awake: a second demo preview makes the first sleep.
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "other")]).await.status(), 200);
    assert_eq!(preview(&app, "small").await["status"], "asleep");
    // 128 MiB alone is over the cap, whoever sleeps.
    let (status, message) =
        common::error_of(app.launch(&[("image_name", "big"), ("container_name", "huge")]).await).await;
    assert_eq!(status, 429, "{message}");
    assert!(message.contains("lifecycle.max_awake_memory is 100 MiB") && message.contains("128 MiB"), "{message}");
    assert_eq!(preview(&app, "other").await["status"], "running", "nothing was put to sleep for nothing");
}

/// Waits until nginx's log has `later` used after `earlier` (both launched: both have a time).
async fn wait_until_used_after(app: &TestApp, later: &str, earlier: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (a, b) = (preview(app, later).await, preview(app, earlier).await);
        if a["last_request"].as_i64() > b["last_request"].as_i64() {
            return;
        }
        assert!(Instant::now() < deadline, "{later} was never used after {earlier}: {a} {b}");
        // Last requests are in whole seconds: a new request each time, until one lands later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.via_nginx(later, "/").await.unwrap();
    }
}

/// `sleepy_app` with these `lifecycle` keys instead.
async fn app_with_lifecycle(keys: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let instance = common::unique_instance();
    let nginx_port = common::free_port();
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &Default::default());
    TestApp::start_from(dir, instance, nginx_port, format!("{yaml}lifecycle:\n{keys}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_preview_never_sleeps_and_sleeps_again_once_unpinned() {
    let app = sleepy_app("2").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "kept")]).await.status(), 200);
    let pinned = post(&app, "/api/previews/kept/pin").await;
    assert_eq!(pinned.status(), 200);
    assert_eq!(pinned.json::<Value>().await.unwrap()["pinned"], format!("user:{USER}"));
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "other")]).await.status(), 200);
    // `other` sleeping shows the sweeps ran past `kept`'s sleep_after too.
    wait_for_status(&app, "other", "asleep").await;
    let found = preview(&app, "kept").await;
    assert_eq!(found["status"], "running", "{found}");
    assert!(metric(&metrics(&app).await, "previewd_previews_pinned") == 1.0);

    let unpinned = post(&app, "/api/previews/kept/unpin").await;
    assert_eq!(unpinned.status(), 200);
    assert!(unpinned.json::<Value>().await.unwrap().get("pinned").is_none());
    wait_for_status(&app, "kept", "asleep").await;
    let (status, message) = common::error_of(post(&app, "/api/previews/nobody/pin").await).await;
    assert_eq!(status, 404, "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_unused_for_remove_after_is_removed_unless_pinned() {
    let app = app_with_lifecycle("  remove_after: 2\n").await;
    for name in ["old", "kept"] {
        assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", name)]).await.status(), 200);
    }
    assert_eq!(post(&app, "/api/previews/kept/pin").await.status(), 200);
    let listed = app.get_json("/api/previews").await;
    let old = listed.as_array().unwrap().iter().find(|p| p["name"] == "old").unwrap().clone();
    let expires = old["expires"].as_i64().expect("an expiry is shown");
    assert!((old["last_request"].as_i64().unwrap() + 2..=old["last_request"].as_i64().unwrap() + 3).contains(&expires));

    wait_for_metric(&app, "previewd_removals_by_age_total").await;
    assert!(states_of(&app, "old").is_empty(), "its containers went");
    assert!(!app.vhost_path("old").exists(), "its route went");
    assert_eq!(app.via_nginx("old", "/").await.unwrap().0, 404);
    let kept = preview(&app, "kept").await;
    assert_eq!(kept["status"], "running", "a pinned preview is never removed by age: {kept}");
    assert!(kept.get("expires").is_none(), "{kept}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_requests_survive_a_restart() {
    let mut app = sleepy_app("1h").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "clock")]).await.status(), 200);
    let before = preview(&app, "clock").await["last_request"].as_i64().unwrap();
    app.stop().await;
    app.boot().await;
    assert_eq!(preview(&app, "clock").await["last_request"].as_i64(), Some(before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_quiet_hours_begin_awake_previews_sleep_and_a_request_still_wakes_one() {
    let mut app = sleepy_app("1h").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "night")]).await.status(), 200);
    app.stop().await;
    // Last used two hours ago; previewd comes back during a quiet period that began since.
    let two_hours_ago = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 7200;
    let saved = app.dir.path().join("state/last-requests.json");
    std::fs::write(&saved, format!("{{\"night\": {two_hours_ago}}}")).unwrap();
    let now = jiff::Timestamp::now().to_zoned_datetime(jiff::tz::TimeZone::UTC);
    let (from, to) = (now.time(), (now.clone() + jiff::SignedDuration::from_mins(30)).time());
    let quiet = format!(
        "  quiet_hours:\n    from: \"{}\"\n    to: \"{}\"\n    timezone: UTC\n",
        from.strftime("%H:%M"),
        to.strftime("%H:%M")
    );
    app.options_yaml = app.options_yaml.replace("lifecycle:\n", &format!("lifecycle:\n{quiet}"));
    app.boot().await;

    // Counted once its containers are stopped.
    let text = wait_for_metric(&app, "previewd_sleeps_total{reason=\"quiet_hours\"}").await;
    assert_eq!(metric(&text, "previewd_sleeps_total{reason=\"idle\"}"), 0.0, "{text}");
    assert_eq!(preview(&app, "night").await["status"], "asleep");
    assert_eq!(app.via_nginx("night", "/").await.unwrap().0, 200, "a request still wakes it");
    wait_for_status(&app, "night", "running").await;
    // Used since the period began: a sweep now leaves it to sleep_after.
    app.lifecycle.as_ref().unwrap().sweep(SystemTime::now()).await;
    assert_eq!(preview(&app, "night").await["status"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_previewd_has_no_record_of_gets_its_age_counted_from_when_previewd_first_sees_it() {
    let mut app = app_with_lifecycle("  wake_timeout: 30s\n").await;
    assert_eq!(app.launch(&[("image_name", "demo"), ("container_name", "veteran")]).await.status(), 200);
    app.stop().await;
    let created = preview_created(&app, "veteran");
    // Older than remove_after by its deploy, and previewd has no record of its requests.
    while SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() < created + 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!app.dir.path().join("state/last-requests.json").exists());
    app.options_yaml = app.options_yaml.replace("lifecycle:\n", "lifecycle:\n  remove_after: 2\n");
    app.boot().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let found = preview(&app, "veteran").await;
        assert_eq!(found["status"], "running", "removed as soon as previewd saw it: {found}");
        if found["last_request"].as_i64().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "its clock never started: {found}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Unix seconds Docker says the preview's app container was created at.
fn preview_created(app: &TestApp, name: &str) -> u64 {
    let id = common::docker_ps(&format!("label=previewd.slug={name}"))
        .into_iter()
        .find(|line| line.contains(&app.instance))
        .and_then(|line| line.split(' ').next().map(str::to_owned))
        .expect("its container");
    let created = common::docker_output(&["inspect", "--format", "{{.Created}}", &id]);
    let created: jiff::Timestamp = created.trim().parse().unwrap();
    created.as_second() as u64
}
