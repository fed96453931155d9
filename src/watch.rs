//! Keeps routes right while previewd runs. Docker restarts preview containers by itself (after
//! a crash, or when the engine restarts), and a container may be removed behind previewd's back
//! (by hand, or a removal a killed previewd had asked for); this follows Docker's container start
//! and destroy events and refreshes those previews. When the event stream breaks (the engine
//! went away), it reconnects with backoff and refreshes every preview, since events may have
//! been missed meanwhile. And a managed nginx that died is started again.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lifecycle::Lifecycle;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Runs until `shutdown` is cancelled; refreshes run as tasks of `tasks`.
pub async fn follow_container_changes(lifecycle: Lifecycle, tasks: TaskTracker, shutdown: CancellationToken) {
    let mut retry = FIRST_RETRY;
    let mut reconnecting = false;
    loop {
        if lifecycle.runtime().ping().await.is_ok() {
            let changes = lifecycle.runtime().container_changes();
            if reconnecting && let Err(err) = lifecycle.refresh_all().await {
                tracing::warn!(error = %err, "cannot refresh the routes after reconnecting to Docker");
            }
            tokio::pin!(changes);
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = changes.next() => event,
                };
                match event {
                    Some(Ok(slug)) => {
                        retry = FIRST_RETRY;
                        let lifecycle = lifecycle.clone();
                        tasks.spawn(async move {
                            if let Err(err) = lifecycle.refresh(&slug).await {
                                tracing::warn!(%slug, error = %err, "cannot refresh the route of a preview Docker changed");
                            }
                        });
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "lost Docker's event stream; reconnecting");
                        break;
                    }
                    None => break,
                }
            }
        }
        reconnecting = true;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// How often the managed nginx is checked.
const NGINX_CHECK: Duration = Duration::from_secs(2);

/// Starts the managed nginx again whenever its master is gone (killed, OOM, crashed), from the
/// vhost files on disk, which always hold what it served. Runs until `shutdown`.
///
/// A master killed outright leaves its workers running: they keep serving the old config, cannot
/// be reloaded, and hold the port a new nginx needs. So the workers of the live master are
/// remembered, and those are stopped before nginx starts again.
pub async fn keep_nginx_running(lifecycle: Lifecycle, shutdown: CancellationToken) {
    let router = lifecycle.router();
    if !router.nginx().is_managed() {
        return;
    }
    let mut workers = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(NGINX_CHECK) => {}
        }
        if let Some(master) = router.nginx().master_pid() {
            workers = crate::nginx::process::workers(master);
            continue;
        }
        if shutdown.is_cancelled() {
            // Stopping: the nginx is gone because previewd's own shutdown stops it.
            return;
        }
        tracing::error!(orphaned_workers = workers.len(), "the managed nginx is not running; starting it again");
        crate::nginx::process::stop_orphaned_workers(&std::mem::take(&mut workers)).await;
        match router.nginx().start_managed(router.sites().dir()).await {
            Ok(()) => tracing::info!("the managed nginx runs again"),
            Err(err) => tracing::error!(error = %err, "cannot start the managed nginx; trying again"),
        }
    }
}
