//! Start-up and shutdown: builds every part from a validated config, reconciles nginx with the
//! containers, binds the API listener, and on shutdown waits for in-flight operations and stops
//! the managed nginx (previews keep running; the next start picks them up).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::{Config, RuntimeConfig};
use crate::docker::DockerRuntime;
use crate::github::client::GitHubApi;
use crate::github::feedback::Feedback;
use crate::github::memory::Memory;
use crate::github::previews::PullRequestPreviews;
use crate::github::sync::Sync;
use crate::github::token_auth::TokenAuth;
use crate::http::{AppState, GitHubService, router};
use crate::lifecycle::{Lifecycle, ReconcileReport};
use crate::metrics::Metrics;
use crate::network::{Firewall, bridge_prefix};
use crate::nginx::sites::SitesDir;
use crate::nginx::vhost::VhostTemplate;
use crate::nginx::{Nginx, Router, RouterSettings};
use crate::runtime::Runtime;
use crate::swarm::SwarmRuntime;
use crate::watch::{follow_container_changes, keep_nginx_running};

pub struct Application {
    listener: TcpListener,
    /// Where nginx sends the hosts of sleeping previews (see `crate::wake`).
    wake_listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    reconcile: ReconcileReport,
    /// The periodic sync with GitHub's open pull requests, and how often it runs.
    sync: Option<(Sync, Duration)>,
}

impl Application {
    /// Everything up to serving: listener bound (port 0 picks a free port), Docker reachable,
    /// managed nginx running, routes reconciled. If a step fails after the managed nginx was
    /// started, it is stopped again.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        refuse_unsafe_images(&config)?;
        let config = Arc::new(config);
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        let template =
            VhostTemplate::load(&config.nginx.template, &config.trusted_proxies).map_err(anyhow::Error::msg)?;
        if config.lifecycle.follows_traffic() {
            template.check_traffic(&config.nginx.template).map_err(anyhow::Error::msg)?;
        }
        let traffic = crate::traffic::Traffic::start().await.context("cannot listen for nginx's request log")?;
        let wake_listener = crate::wake::bind().await.context("cannot listen for requests to sleeping previews")?;
        let runtime = connect_runtime(&config).await?;
        runtime.ping().await?;
        if let RuntimeConfig::Swarm { .. } = config.runtime {
            template.check_upstream_address(&config.nginx.template).map_err(anyhow::Error::msg)?;
        }
        // First of all: Docker has restarted the previews at boot already, and iptables rules do
        // not survive a reboot. On a Swarm the previews' networks are overlays on other hosts,
        // which this host's rules do not see.
        if config.network.isolation && !config.runtime.is_swarm() {
            let firewall = Firewall::new(&bridge_prefix(&config.instance), config.network.egress);
            firewall.install().await.context("cannot fence off the preview networks")?;
        }
        let sites_dir = &config.nginx.sites_dir;
        std::fs::create_dir_all(sites_dir)
            .with_context(|| format!("cannot create nginx.sites_dir {}", sites_dir.display()))?;
        let nginx =
            Nginx::new(config.nginx.clone(), &config.state_dir).with_status_port(wake_listener.local_addr()?.port());
        nginx.start_managed(sites_dir).await.context("cannot start the managed nginx")?;
        let router = Router::start(RouterSettings {
            template,
            instance: config.instance.clone(),
            base_domain: config.base_domain.clone(),
            listen: config.nginx.listen,
            sites: SitesDir::new(sites_dir.clone(), &config.instance),
            nginx,
            traffic: Some(traffic.clone()),
        });
        let metrics = Arc::new(Metrics::new());
        let lifecycle = Lifecycle::new(Arc::clone(&config), runtime, router, metrics, Some(traffic));
        lifecycle.sleepers().set_wake_port(wake_listener.local_addr()?.port());
        lifecycle.builds().recover();
        let reconcile = match lifecycle.reconcile().await {
            Ok(report) => report,
            Err(err) => {
                stop_managed_nginx(&lifecycle).await;
                return Err(anyhow::Error::new(err).context("cannot reconcile nginx with the running containers"));
            }
        };
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let (github, tokens, sync) = match github_service(&config, &lifecycle, &tasks, &shutdown) {
            Ok(github) => github,
            Err(err) => {
                stop_managed_nginx(&lifecycle).await;
                return Err(err);
            }
        };
        let state = AppState {
            auth: Authenticator::new(&config.users),
            log_streams: Arc::new(crate::http::streams::LogStreams::new(&config.limits)),
            config,
            lifecycle,
            tasks,
            github,
            tokens,
            shutdown: shutdown.clone(),
        };
        Ok(Self { listener, wake_listener, state, shutdown, reconcile, sync })
    }

    pub fn address(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.state.config.listen)
    }

    pub fn port(&self) -> u16 {
        self.address().port()
    }

    /// What the start-up reconcile did.
    pub fn reconcile_report(&self) -> &ReconcileReport {
        &self.reconcile
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.state.lifecycle
    }

    /// Cancel it to stop the application gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then finishes in-flight operations and
    /// stops the managed nginx.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { listener, wake_listener, state, shutdown, sync, .. } = self;
        tracing::info!(address = %listener.local_addr()?, "previewd is serving");
        let tasks = state.tasks.clone();
        let lifecycle = state.lifecycle.clone();
        let watcher = tokio::spawn(follow_container_changes(lifecycle.clone(), tasks.clone(), shutdown.clone()));
        let warm_networks = tokio::spawn(lifecycle.networks().clone().keep_warm(shutdown.clone()));
        let syncer = sync.map(|(sync, every)| tokio::spawn(sync.run(every, tasks.clone(), shutdown.clone())));
        let nginx_keeper = tokio::spawn(keep_nginx_running(lifecycle.clone(), shutdown.clone()));
        let wake_routes = crate::wake::routes(
            lifecycle.clone(),
            state.config.base_domain.clone(),
            state.config.lifecycle.wake_timeout,
            state.config.github.as_ref().map_or_else(|| "https://github.com".to_owned(), |github| github.web_url()),
        );
        let waker =
            tokio::spawn(crate::http::server::serve(wake_listener, wake_routes, state.config.http, shutdown.clone()));
        let sweeper =
            tokio::spawn(sweep_previews(lifecycle.clone(), state.config.lifecycle.sweep_every(), shutdown.clone()));
        // Stopped only after the last operation: those change what it writes.
        let memory_done = CancellationToken::new();
        let memory_writer = state
            .github
            .as_ref()
            .map(|github| tokio::spawn(Arc::clone(&github.memory).keep_written(memory_done.clone())));
        let http = state.config.http;
        crate::http::server::serve(listener, router(state), http, shutdown.clone()).await;
        watcher.await.ok();
        waker.await.ok();
        sweeper.await.ok();
        warm_networks.await.ok();
        nginx_keeper.await.ok();
        if let Some(syncer) = syncer {
            syncer.await.ok();
        }
        tasks.close();
        if !tasks.is_empty() {
            tracing::info!(operations = tasks.len(), "waiting for in-flight operations");
        }
        tasks.wait().await;
        memory_done.cancel();
        if let Some(writer) = memory_writer {
            writer.await.ok();
        }
        lifecycle.router().nginx().stop_managed().await.context("cannot stop the managed nginx")?;
        tracing::info!("stopped; previews keep running");
        Ok(())
    }
}

/// Every `LifecyclePolicy::sweep_every`, the lifecycle's sweep: quiet hours, idle previews put
/// to sleep, unused ones removed (see `Lifecycle::sweep`). Nothing without `sleep_after`,
/// `remove_after` or `quiet_hours`.
async fn sweep_previews(lifecycle: Lifecycle, every: Option<Duration>, shutdown: CancellationToken) {
    let Some(every) = every else { return };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        lifecycle.sweep(std::time::SystemTime::now()).await;
    }
    if let Err(err) = lifecycle.save_last_requests() {
        tracing::warn!(error = %err, "cannot save when previews were last used");
    }
}

/// What a `github` section brings: the webhook service, GitHub token checks (with
/// `github.api_auth`) and the periodic sync.
type GitHubParts = (Option<GitHubService>, Option<Arc<TokenAuth>>, Option<(Sync, Duration)>);

fn github_service(
    config: &Arc<Config>,
    lifecycle: &Lifecycle,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<GitHubParts> {
    let Some(github) = &config.github else { return Ok((None, None, None)) };
    let api = GitHubApi::new(&github.api_url, github.token.expose())
        .context("cannot set up the GitHub client")?
        .counted(Arc::clone(lifecycle.metrics()));
    let tokens = github.api_auth.then(|| Arc::new(TokenAuth::new(github, api.clone())));
    let feedback = Feedback::new(api.clone(), config.instance.clone(), tasks.clone(), shutdown.clone());
    let memory = Arc::new(Memory::load(&config.state_dir));
    let previews =
        PullRequestPreviews::new(Arc::clone(config), lifecycle.clone(), feedback, api.clone(), Arc::clone(&memory));
    let sync = github.sync_interval.map(|every| {
        let sync = Sync { api, previews: previews.clone(), lifecycle: lifecycle.clone(), config: Arc::clone(config) };
        (sync, every)
    });
    tasks.spawn(previews.clone().announce_removals(lifecycle.subscribe(), shutdown.clone()));
    let unverified = crate::http::body::ReadBudget::new(crate::http::webhook::UNVERIFIED_BUDGET);
    Ok((Some(GitHubService { previews, memory, unverified }), tokens, sync))
}

/// Images whose settings hand a preview the host run only with `allow_unsafe: true` (and are
/// logged then); a config that a copy-paste made unsafe is caught before the first launch.
fn refuse_unsafe_images(config: &Config) -> anyhow::Result<()> {
    let settings = config.unsafe_settings();
    for (line, _) in settings.iter().filter(|(_, refused)| !refused) {
        tracing::warn!("{line}");
    }
    let refused: Vec<&str> = settings.iter().filter(|(_, refused)| *refused).map(|(line, _)| line.as_str()).collect();
    if refused.is_empty() {
        return Ok(());
    }
    anyhow::bail!("these settings weaken the isolation of previews:\n  {}", refused.join("\n  "))
}

async fn stop_managed_nginx(lifecycle: &Lifecycle) {
    if let Err(err) = lifecycle.router().nginx().stop_managed().await {
        tracing::error!(error = %err, "cannot stop the managed nginx");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}

/// The engine previews run on, as `runtime` says.
async fn connect_runtime(config: &Config) -> anyhow::Result<Arc<dyn Runtime>> {
    Ok(match &config.runtime {
        RuntimeConfig::Docker => Arc::new(DockerRuntime::connect(config.instance.clone()).await?),
        RuntimeConfig::Swarm { constraints, holder } => {
            let constraints = constraints.iter().map(ToString::to_string).collect();
            Arc::new(SwarmRuntime::connect(config.instance.clone(), constraints, holder.clone()).await?)
        }
    })
}
