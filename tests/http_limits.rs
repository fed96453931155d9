//! `http`: a client that is slow with its request headers or body, or that opens many
//! connections or sends many large webhooks, cannot tie up the API or previewd's memory. Raw
//! TCP on loopback, so the tests control exactly which bytes are sent when.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{BinaryConfig, Daemon, PASSWORD, TestApp, USER, client, free_port, unique_instance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "webhook secret for tests";
/// Previewd's webhook limit (5 MiB), as the 413 answer names it.
const WEBHOOK_LIMIT: &str = "5242880";

/// A previewd with this `http` section and a `github` section that never calls GitHub.
async fn app_with(http: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (instance, nginx_port) = (unique_instance(), free_port());
    let yaml = common::config_yaml(&instance, dir.path(), nginx_port, &common::Options::default())
        + &sections(dir.path(), http);
    TestApp::start_from(dir, instance, nginx_port, yaml).await
}

fn sections(dir: &std::path::Path, http: &str) -> String {
    std::fs::write(dir.join("webhook.secret"), SECRET).unwrap();
    std::fs::write(dir.join("github.token"), "ghs_unused").unwrap();
    format!(
        "http:\n{http}github:\n  api_url: http://127.0.0.1:9\n  webhook_secret_file: webhook.secret\n  token_file: github.token\n  sync_interval: 0\n  repos:\n    octo/app:\n      image: demo\n"
    )
}

fn basic_auth() -> String {
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    format!("Authorization: Basic {credentials}\r\n")
}

/// The head of a webhook delivery declaring `length` bytes, with `signature` if any.
fn webhook_head(length: usize, signature: Option<&str>) -> String {
    let signature = signature.map(|s| format!("X-Hub-Signature-256: {s}\r\n")).unwrap_or_default();
    format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-GitHub-Event: pull_request\r\nX-GitHub-Delivery: d-1\r\n{signature}Content-Length: {length}\r\n\r\n"
    )
}

async fn send(stream: &mut TcpStream, bytes: &str) {
    stream.write_all(bytes.as_bytes()).await.unwrap();
}

/// The status and the rest of the answer's head and first bytes, once its head is complete;
/// `None` when the connection closes first. Panics past `within`.
async fn answer(stream: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(within, read_answer(stream))
        .await
        .unwrap_or_else(|_| panic!("no answer and no close within {within:?}"))
}

async fn read_answer(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => seen.extend_from_slice(&buffer[..read]),
        }
    }
    // The JSON bodies of these answers are short: a moment more gets them.
    if let Ok(Ok(read)) = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer)).await {
        seen.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// How long until the peer closes the connection (EOF or reset), reading whatever it sends.
async fn time_until_closed(stream: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(within, async {
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                break;
            }
        }
    });
    closed.await.unwrap_or_else(|_| panic!("the connection was still open after {within:?}"));
    start.elapsed()
}

#[tokio::test]
async fn a_client_that_stalls_in_its_request_headers_is_disconnected_after_the_header_timeout() {
    let app = app_with("  header_timeout: 2\n").await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    send(&mut stream, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ").await;
    let closed_after = time_until_closed(&mut stream, Duration::from_secs(10)).await;
    println!("stalled headers: closed after {closed_after:?}");
    assert!(closed_after >= Duration::from_millis(1800), "not before the timeout: {closed_after:?}");
    assert!(closed_after <= Duration::from_secs(4), "{closed_after:?}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let app = app_with("  header_timeout: 1\n").await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    let closed_after = time_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed_after >= Duration::from_millis(800) && closed_after <= Duration::from_secs(3), "{closed_after:?}");
}

#[tokio::test]
async fn a_request_body_that_stalls_is_answered_408_after_the_body_timeout() {
    let app = app_with("  body_timeout: 2\n").await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    let auth = basic_auth();
    let head = format!(
        "POST /launch HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
    );
    let start = Instant::now();
    send(&mut stream, &format!("{head}image_name=demo")).await;
    let (status, text) = answer(&mut stream, Duration::from_secs(10)).await.expect("an answer, not just a close");
    let elapsed = start.elapsed();
    println!("stalled body: {status} after {elapsed:?}");
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("http.body_timeout"), "the answer names the setting: {text}");
    assert!(elapsed >= Duration::from_millis(1800) && elapsed <= Duration::from_secs(5), "{elapsed:?}");
}

#[tokio::test]
async fn a_webhook_declaring_more_than_the_limit_is_answered_413_before_its_body_is_sent() {
    let app = app_with("").await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    let forged = format!("sha256={}", "ab".repeat(32));
    send(&mut stream, &webhook_head(30_000_000, Some(&forged))).await;
    let (status, text) = answer(&mut stream, Duration::from_secs(5)).await.expect("an answer");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains(WEBHOOK_LIMIT), "the answer names the limit: {text}");
}

#[tokio::test]
async fn a_webhook_without_a_signature_is_answered_401_before_its_body_is_sent() {
    let app = app_with("").await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    send(&mut stream, &webhook_head(4_000_000, None)).await;
    let (status, text) = answer(&mut stream, Duration::from_secs(5)).await.expect("an answer");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("X-Hub-Signature-256"), "{text}");
}

#[tokio::test]
async fn a_launch_declaring_more_than_64_kib_is_answered_413_before_its_body_is_sent() {
    let app = app_with("").await;
    let mut stream = TcpStream::connect(app.api).await.unwrap();
    let auth = basic_auth();
    send(&mut stream, &format!("POST /launch HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 100000\r\n\r\n"))
        .await;
    let (status, text) = answer(&mut stream, Duration::from_secs(5)).await.expect("an answer");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("65536"), "{text}");
}

#[tokio::test]
async fn connections_beyond_max_connections_are_served_only_once_one_closes() {
    let app = app_with("  max_connections: 8\n  header_timeout: 30\n").await;
    let healthz = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(app.api).await.unwrap();
        send(&mut stream, healthz).await;
        assert_eq!(answer(&mut stream, Duration::from_secs(5)).await.map(|(s, _)| s), Some(200));
        idle.push(stream);
    }
    let mut ninth = TcpStream::connect(app.api).await.unwrap();
    send(&mut ninth, healthz).await;
    let waited = tokio::time::timeout(Duration::from_millis(1500), read_answer(&mut ninth)).await;
    assert!(waited.is_err(), "the ninth connection was served while eight were open: {waited:?}");

    drop(idle.pop());
    assert_eq!(answer(&mut ninth, Duration::from_secs(5)).await.map(|(s, _)| s), Some(200));
    drop(idle);
    drop(ninth);
    let response = client().get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200, "served again once the idle connections went away");
}

// ---- memory under a flood of large webhooks, measured on the real binary ----

const FLOOD: usize = 50;
const BODY_BYTES: usize = 4_000_000;
const ALLOWED_GROWTH_KIB: u64 = 20 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends one delivery of BODY_BYTES while reading its answer (previewd may answer before the
/// body is sent); its status, `None` when the connection closed without one.
async fn flood_one(api: std::net::SocketAddr, signature: Option<String>) -> Option<u16> {
    let stream = TcpStream::connect(api).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = webhook_head(BODY_BYTES, signature.as_deref());
    let writing = tokio::spawn(async move {
        let body = vec![b' '; BODY_BYTES];
        // Previewd may close once it answered: the rest of the body is not its to read.
        if writer.write_all(head.as_bytes()).await.is_ok() {
            writer.write_all(&body).await.ok();
        }
        writer
    });
    let mut seen = Vec::new();
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        while !seen.windows(2).any(|w| w == b"\r\n") {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    });
    read.await.expect("an answer or a close within two minutes");
    drop(writing.await);
    String::from_utf8_lossy(&seen).split(' ').nth(1).and_then(|s| s.parse().ok())
}

/// Runs previewd as its own process, floods it, and returns (baseline, peak) VmRSS in KiB and
/// the statuses it answered.
async fn flood(signature: Option<String>) -> (u64, u64, Vec<Option<u16>>) {
    let setup = BinaryConfig::new();
    let _cleanup = setup.cleanup();
    let yaml = std::fs::read_to_string(&setup.path).unwrap() + &sections(setup.dir.path(), "  max_connections: 1024\n");
    std::fs::write(&setup.path, yaml).unwrap();
    let mut daemon = Daemon::start(&setup.path, &setup.dir.path().join("previewd.log"));
    daemon.wait_until_healthy(&client(), &setup.api).await;
    let pid = daemon.child.id();
    let api: std::net::SocketAddr = setup.api.trim_start_matches("http://").parse().unwrap();
    // One small delivery first, so that what the first request sets up is in the baseline.
    let mut warm = TcpStream::connect(api).await.unwrap();
    send(&mut warm, &(webhook_head(2, Some(&format!("sha256={}", "ab".repeat(32)))) + "{}")).await;
    answer(&mut warm, Duration::from_secs(5)).await;
    let baseline = rss_kib(pid);

    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let senders: Vec<_> = (0..FLOOD).map(|_| tokio::spawn(flood_one(api, signature.clone()))).collect();
    let mut statuses = Vec::new();
    for sender in senders {
        statuses.push(sender.await.unwrap());
    }
    sampler.abort();
    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
    daemon.terminate();
    (baseline, peak.load(Ordering::Relaxed), statuses)
}

#[tokio::test]
async fn fifty_parallel_unsigned_4_mb_webhooks_grow_previewds_memory_by_at_most_20_mib() {
    let (baseline, peak, statuses) = flood(None).await;
    let growth = peak.saturating_sub(baseline);
    println!("{FLOOD} unsigned {BODY_BYTES}-byte webhooks: VmRSS {baseline} KiB -> peak {peak} KiB (+{growth} KiB)");
    assert!(statuses.iter().all(|s| matches!(s, Some(401) | None)), "{statuses:?}");
    assert!(statuses.contains(&Some(401)), "{statuses:?}");
    assert!(growth <= ALLOWED_GROWTH_KIB, "RSS grew by {growth} KiB");
}

#[tokio::test]
async fn fifty_parallel_4_mb_webhooks_with_forged_signatures_grow_previewds_memory_by_at_most_20_mib() {
    let forged = format!("sha256={}", "ab".repeat(32));
    let started = Instant::now();
    let (baseline, peak, statuses) = flood(Some(forged)).await;
    let growth = peak.saturating_sub(baseline);
    println!(
        "{FLOOD} forged {BODY_BYTES}-byte webhooks: VmRSS {baseline} KiB -> peak {peak} KiB (+{growth} KiB), all answered in {:?}",
        started.elapsed()
    );
    assert!(statuses.iter().all(|s| *s == Some(401)), "each is read and refused: {statuses:?}");
    assert!(growth <= ALLOWED_GROWTH_KIB, "RSS grew by {growth} KiB");
}
