//! Prometheus metrics, counted where things happen and served at `GET /metrics` in the text
//! format: previews running, launches, redeploys and kills by result, launch duration (whole and
//! per step), nginx reloads, webhook deliveries by event and outcome and what their work acted
//! on, GitHub API calls.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByResult {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByStep {
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByDelivery {
    pub event: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByCommand {
    pub command: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByBasis {
    pub basis: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByReason {
    pub reason: &'static str,
}

/// A service or job of preview environments, by its name in config.yml.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByPart {
    pub name: String,
}

impl ByPart {
    pub fn new(name: &crate::preview::ServiceName) -> Self {
        Self { name: name.to_string() }
    }
}

pub const SUCCESS: ByResult = ByResult { result: "success" };
pub const FAILURE: ByResult = ByResult { result: "failure" };

pub struct Metrics {
    registry: Registry,
    pub previews: Gauge,
    pub launches: Family<ByResult, Counter>,
    pub redeploys: Family<ByResult, Counter>,
    pub kills: Family<ByResult, Counter>,
    pub resets: Family<ByResult, Counter>,
    pub launch_seconds: Histogram,
    pub launch_step_seconds: Family<ByStep, Histogram>,
    pub nginx_reloads: Family<ByResult, Counter>,
    pub webhook_deliveries: Family<ByDelivery, Counter>,
    pub pull_request_runs: Gauge,
    pub delivery_bases: Family<ByBasis, Counter>,
    pub pr_commands: Family<ByCommand, Counter>,
    pub github_calls: Family<ByResult, Counter>,
    pub refused_requests: Family<ByReason, Counter>,
    pub warm_networks: Gauge,
    pub cold_networks: Counter,
    pub service_failures: Family<ByPart, Counter>,
    pub job_failures: Family<ByPart, Counter>,
    pub builds: Family<ByResult, Counter>,
    pub build_seconds: Histogram,
    pub build_images_bytes: Gauge,
    pub docker_free_bytes: Gauge,
    pub previews_asleep: Gauge,
    pub sleeps: Family<ByReason, Counter>,
    pub wakes: Family<ByResult, Counter>,
    pub removals_by_age: Counter,
    pub previews_pinned: Gauge,
    pub wake_seconds: Histogram,
}

fn seconds_histogram() -> Histogram {
    // 50 ms to ~100 s.
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("previewd");
        let metrics = Self {
            previews: Gauge::default(),
            launches: Family::default(),
            redeploys: Family::default(),
            kills: Family::default(),
            resets: Family::default(),
            launch_seconds: seconds_histogram(),
            launch_step_seconds: Family::new_with_constructor(seconds_histogram),
            nginx_reloads: Family::default(),
            webhook_deliveries: Family::default(),
            pull_request_runs: Gauge::default(),
            delivery_bases: Family::default(),
            pr_commands: Family::default(),
            github_calls: Family::default(),
            refused_requests: Family::default(),
            warm_networks: Gauge::default(),
            cold_networks: Counter::default(),
            service_failures: Family::default(),
            job_failures: Family::default(),
            builds: Family::default(),
            // 0.5 s to ~34 min.
            build_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 13)),
            build_images_bytes: Gauge::default(),
            docker_free_bytes: Gauge::default(),
            previews_asleep: Gauge::default(),
            sleeps: Family::default(),
            wakes: Family::default(),
            removals_by_age: Counter::default(),
            previews_pinned: Gauge::default(),
            // 0.05 s to ~100 s.
            wake_seconds: seconds_histogram(),
            registry: Registry::default(),
        };
        registry.register("previews", "Previews whose container runs", metrics.previews.clone());
        registry.register("launches", "Launches of a new preview, by result", metrics.launches.clone());
        registry.register(
            "redeploys",
            "Launches that replaced a running preview, by result",
            metrics.redeploys.clone(),
        );
        registry.register("kills", "Removed previews, by result", metrics.kills.clone());
        registry.register("resets", "Previews whose data was reset, by result", metrics.resets.clone());
        registry.register(
            "launch_seconds",
            "Time from launch request to preview served",
            metrics.launch_seconds.clone(),
        );
        registry.register("launch_step_seconds", "Time of each launch step", metrics.launch_step_seconds.clone());
        registry.register("nginx_reloads", "nginx reloads, by result", metrics.nginx_reloads.clone());
        registry.register(
            "webhook_deliveries",
            "GitHub webhook deliveries, by event and outcome",
            metrics.webhook_deliveries.clone(),
        );
        registry.register(
            "pull_request_runs",
            "Runs applying a pull request's newest state, queued or running",
            metrics.pull_request_runs.clone(),
        );
        registry.register(
            "delivery_bases",
            "What the work of pull_request deliveries acted on: github (the state read from GitHub), payload (unverified, GitHub unreachable) or nothing",
            metrics.delivery_bases.clone(),
        );
        registry.register(
            "pr_commands",
            "`/preview` commands from pull-request comments, by command and outcome (done, refused)",
            metrics.pr_commands.clone(),
        );
        registry.register("github_api_calls", "Calls to GitHub's API, by result", metrics.github_calls.clone());
        registry.register(
            "refused_requests",
            "Requests answered 4xx, by reason (they are logged at debug only)",
            metrics.refused_requests.clone(),
        );
        registry.register(
            "warm_networks",
            "Preview networks kept ready for launches (network.warm)",
            metrics.warm_networks.clone(),
        );
        registry.register(
            "cold_networks",
            "Launches that waited for a network to be created because none was ready (raise network.warm if it grows)",
            metrics.cold_networks.clone(),
        );
        registry.register(
            "service_failures",
            "Services of preview environments that stopped or were not ready in time while a launch waited, by service name",
            metrics.service_failures.clone(),
        );
        registry.register(
            "job_failures",
            "Jobs of preview environments that exited non-zero or ran out of time, by job name",
            metrics.job_failures.clone(),
        );
        registry.register(
            "builds",
            "Builds of previews from source, by result: success, failure, superseded (a newer push stopped it) or removed (a kill stopped it)",
            metrics.builds.clone(),
        );
        registry.register("build_seconds", "Time of successful builds", metrics.build_seconds.clone());
        registry.register(
            "build_images_bytes",
            "Bytes the images previewd built add to their base images (read at most every 30 s)",
            metrics.build_images_bytes.clone(),
        );
        registry.register(
            "docker_free_bytes",
            "Free disk where Docker keeps images (builds stop below builds.min_free_disk)",
            metrics.docker_free_bytes.clone(),
        );
        registry.register(
            "previews_asleep",
            "Previews asleep (lifecycle.sleep_after, or put to sleep)",
            metrics.previews_asleep.clone(),
        );
        registry.register("sleeps", "Previews put to sleep, by reason: idle, manual, cap (room made under lifecycle.max_awake or max_awake_memory) or quiet_hours", metrics.sleeps.clone());
        registry.register("wakes", "Sleeping previews woken, by result", metrics.wakes.clone());
        registry.register(
            "removals_by_age",
            "Previews removed for no request and no deploy for lifecycle.remove_after",
            metrics.removals_by_age.clone(),
        );
        registry.register(
            "previews_pinned",
            "Previews pinned awake (by hand or by lifecycle.keep_awake_label)",
            metrics.previews_pinned.clone(),
        );
        registry.register(
            "wake_seconds",
            "Time of successful wakes, from the first request until the app is routed",
            metrics.wake_seconds.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Counts a delivery of `event` that ended as `outcome`.
    pub fn delivery(&self, event: &str, outcome: &'static str) {
        self.webhook_deliveries.get_or_create(&ByDelivery { event: event.to_owned(), outcome }).inc();
    }

    /// Counts a `/preview` command by its outcome (`done`, `refused`).
    pub fn pr_command(&self, command: &'static str, outcome: &'static str) {
        self.pr_commands.get_or_create(&ByCommand { command, outcome }).inc();
    }

    /// Counts a delivery's work that acted on `basis`.
    pub fn delivery_basis(&self, basis: &'static str) {
        self.delivery_bases.get_or_create(&ByBasis { basis }).inc();
    }

    /// Brings a counter kept elsewhere (as a plain total) up to date.
    pub fn sync_counter(counter: &Counter, total: u64) {
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        encode(&mut text, &self.registry).ok();
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_in_the_prometheus_text_format() {
        let metrics = Metrics::new();
        metrics.launches.get_or_create(&SUCCESS).inc();
        metrics.delivery("pull_request", "accepted");
        metrics.launch_step_seconds.get_or_create(&ByStep { step: "health" }).observe(0.3);
        Metrics::sync_counter(&metrics.nginx_reloads.get_or_create(&SUCCESS), 7);
        Metrics::sync_counter(&metrics.nginx_reloads.get_or_create(&SUCCESS), 7);
        let text = metrics.render();
        assert!(text.contains("previewd_launches_total{result=\"success\"} 1"), "{text}");
        assert!(
            text.contains("previewd_webhook_deliveries_total{event=\"pull_request\",outcome=\"accepted\"} 1"),
            "{text}"
        );
        assert!(text.contains("previewd_launch_step_seconds_count{step=\"health\"} 1"), "{text}");
        assert!(text.contains("previewd_nginx_reloads_total{result=\"success\"} 7"), "{text}");
    }
}
