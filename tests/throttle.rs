//! Logins under a flood: the argon2 queue is bounded, each client address may fail only a few
//! logins, and an operator's correct login stays fast while another address floods. The
//! attackers use other loopback addresses (127.0.0.2 and up), as a different host would.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{PASSWORD, TestApp, free_port, unique_instance};

/// Users with the test user's password, so each first login runs argon2 once.
const USERS: [&str; 6] = ["alone-1", "alone-2", "alone-3", "flooded-1", "flooded-2", "flooded-3"];

async fn app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (unique_instance(), free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &common::Options::default());
    let hash = yaml.split("password_hash: ").nth(1).and_then(|rest| rest.lines().next()).unwrap().to_owned();
    let users: String = USERS.iter().map(|user| format!("  - name: {user}\n    password_hash: {hash}\n")).collect();
    TestApp::start_from(dir, instance, nginx_port, yaml + &users).await
}

/// One flood at a time: they share two cores with the login they measure.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn client_from(address: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder().no_proxy().local_address(IpAddr::from(address)).build().unwrap()
}

async fn list_as(client: &reqwest::Client, app: &TestApp, user: &str, password: &str) -> reqwest::Response {
    client.get(app.url("/api/previews")).basic_auth(user, Some(password)).send().await.unwrap()
}

/// Seconds of one first login (argon2 included) as `user` from 127.0.0.1.
async fn login_time(app: &TestApp, user: &str) -> f64 {
    let started = Instant::now();
    let response = list_as(&client_from([127, 0, 0, 1]), app, user, PASSWORD).await;
    assert_eq!(response.status(), 200);
    started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Answers seen by a flood, by status.
#[derive(Default)]
struct Seen {
    unauthorized: AtomicUsize,
    throttled: AtomicUsize,
    busy: AtomicUsize,
    retry_after_missing: AtomicUsize,
}

/// `workers` loops of wrong-password guesses (each a new password), spread over `addresses`
/// loopback addresses, until `stop` is set: the next guess as soon as one is refused, or 200 ms
/// after a 429 (a real attacker's requests cost this host nothing to send; here the flood and
/// previewd share two cores).
fn flood(
    app: &TestApp,
    addresses: u8,
    workers: usize,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let url = app.url("/api/previews");
    (0..workers)
        .map(|worker| {
            let client = client_from([127, 0, 0, 2 + (worker % usize::from(addresses)) as u8]);
            let (url, stop, seen) = (url.clone(), Arc::clone(&stop), Arc::clone(&seen));
            tokio::spawn(async move {
                let mut guess = 0;
                while !stop.load(Ordering::Relaxed) {
                    guess += 1;
                    let password = format!("wrong-{worker}-{guess}");
                    let Ok(response) = client.get(&url).basic_auth("flooded-1", Some(password)).send().await else {
                        continue;
                    };
                    match response.status().as_u16() {
                        401 => seen.unauthorized.fetch_add(1, Ordering::Relaxed),
                        429 => {
                            if response.headers().get("retry-after").is_none() {
                                seen.retry_after_missing.fetch_add(1, Ordering::Relaxed);
                            }
                            let body = response.text().await.unwrap_or_default();
                            let counter = if body.contains("being checked") { &seen.busy } else { &seen.throttled };
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            counter.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("a wrong password got {other}"),
                    };
                }
            })
        })
        .collect()
}

/// Waits (30 s at most) until `counter` has counted something.
async fn until_counted(counter: &AtomicUsize, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_login_stays_fast_while_another_address_floods_wrong_passwords() {
    let _serial = SERIAL.lock().await;
    let app = app().await;
    let mut alone = Vec::new();
    for user in &USERS[..3] {
        alone.push(login_time(&app, user).await);
    }
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
    let workers = flood(&app, 1, 200, Arc::clone(&stop), Arc::clone(&seen));
    // The flood is under way once its address has been refused.
    until_counted(&seen.throttled, "the flood was never throttled").await;
    let mut flooded = Vec::new();
    for user in &USERS[3..] {
        flooded.push(login_time(&app, user).await);
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let (alone, flooded) = (median(alone), median(flooded));
    eprintln!("first login, median of 3: alone {alone:.3} s, under the flood {flooded:.3} s");
    assert!(flooded <= 3.0 * alone.max(0.01), "alone {alone:.3} s, under the flood {flooded:.3} s");
    assert!(seen.unauthorized.load(Ordering::Relaxed) <= 12, "the flood's address failed a burst, then waited");
    assert_eq!(seen.retry_after_missing.load(Ordering::Relaxed), 0, "every 429 says when to come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_failed_too_many_logins_must_wait_even_with_the_right_password() {
    let _serial = SERIAL.lock().await;
    let app = app().await;
    let attacker = client_from([127, 0, 0, 3]);
    let mut failed = 0;
    loop {
        let response = list_as(&attacker, &app, "alone-1", "guess").await;
        match response.status().as_u16() {
            401 => failed += 1,
            429 => break,
            other => panic!("a wrong password got {other}"),
        }
        assert!(failed <= 10, "more than ten failed logins were checked");
    }
    let refused = list_as(&attacker, &app, "alone-1", PASSWORD).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&wait), "{wait}");
    assert!(refused.text().await.unwrap().contains("failed logins from your address"));
    assert_eq!(list_as(&client_from([127, 0, 0, 1]), &app, "alone-1", PASSWORD).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_argon2_queue_is_full_a_login_is_answered_429_at_once() {
    let _serial = SERIAL.lock().await;
    let app = app().await;
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
    // 150 addresses, one check in flight each: more than the 4 running and 64 waiting.
    let workers = flood(&app, 150, 150, Arc::clone(&stop), Arc::clone(&seen));
    until_counted(&seen.busy, "the queue never filled").await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(seen.retry_after_missing.load(Ordering::Relaxed), 0, "every 429 says when to come back");
}
