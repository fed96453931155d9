//! previewd: a live preview per pull request (or per `/launch`) on one Docker host.
//!
//! Data flows one way, and each module owns one step:
//!
//! - [`config`]: `config.yml`, its schema and validation.
//! - [`preview`]: validated domain names (`Slug`, `BaseDomain`, `EnvName`, ...).
//! - [`http`]: the API: routes, body parsing, the error-to-response mapping.
//! - [`auth`]: HTTP Basic credentials against argon2 hashes.
//! - [`throttle`]: per-address budgets for failed logins and token lookups.
//! - [`github`]: pull-request previews: webhooks, desired state, feedback on the PR.
//! - [`request`]: launch and kill requests parsed from the API's fields.
//! - [`lifecycle`]: launch, replace, reset, kill, list and reconcile previews, with their
//!   services and jobs.
//! - [`build`]: builds of previews from source: queue, latest wins, logs, kept images, disk.
//! - [`admission`]: the preview limits, and the queue of launches.
//! - [`locks`]: one async lock per key (per preview, per credential).
//! - [`cache`]: a bounded map whose entries expire.
//! - [`metrics`]: Prometheus metrics, served at `/metrics`.
//! - [`runtime`]: the seam between the lifecycle and the container engine, in previewd's terms.
//! - [`docker`]: the Docker engine as that runtime; its labels are the record of what runs.
//! - [`network`]: each preview's own network, the warm pool of them, and the host firewall.
//! - [`probe`]: whether an app answers HTTP yet.
//! - [`nginx`]: vhost files, `nginx -t`, coalesced reloads, the managed nginx.
//! - [`watch`]: re-routes previews whose container Docker restarted on a new port.
//! - [`traffic`]: when each preview last served a request, from nginx's own request log.
//! - [`wake`]: the listener sleeping previews are routed to: the waking page, held requests.
//! - [`app`]: start-up (reconcile), serving and graceful shutdown.
//! - [`cli`]: the command line.
//! - [`client`]: the client side of `previewd launch|kill|list|logs|login`.
//! - [`clock`]: Unix time, UTC dates and short ages.

pub mod admission;
pub mod app;
pub mod auth;
pub mod build;
pub mod cache;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod docker;
pub mod doctor;
pub mod github;
pub mod http;
pub mod lifecycle;
pub mod locks;
pub mod metrics;
pub mod network;
pub mod nginx;
pub mod preview;
pub mod probe;
pub mod request;
pub mod runtime;
pub mod swarm;
pub mod throttle;
pub mod traffic;
pub mod wake;
pub mod watch;

/// An error's message followed by each of its causes, for messages people read.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
