//! Keeps routes right while previewd runs. Docker restarts preview containers by itself (after
//! a crash, or when the engine restarts) and gives them new host ports; this follows Docker's
//! container start events and re-routes those previews. When the event stream breaks (the
//! engine went away), it reconnects with backoff and refreshes every preview, since events may
//! have been missed meanwhile.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lifecycle::Lifecycle;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Runs until `shutdown` is cancelled; refreshes run as tasks of `tasks`.
pub async fn follow_container_starts(lifecycle: Lifecycle, tasks: TaskTracker, shutdown: CancellationToken) {
    let mut retry = FIRST_RETRY;
    let mut reconnecting = false;
    loop {
        if lifecycle.runtime().ping().await.is_ok() {
            let starts = lifecycle.runtime().container_starts();
            if reconnecting && let Err(err) = lifecycle.refresh_all().await {
                tracing::warn!(error = %err, "cannot refresh the routes after reconnecting to Docker");
            }
            tokio::pin!(starts);
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = starts.next() => event,
                };
                match event {
                    Some(Ok(slug)) => {
                        retry = FIRST_RETRY;
                        let lifecycle = lifecycle.clone();
                        tasks.spawn(async move {
                            if let Err(err) = lifecycle.refresh(&slug).await {
                                tracing::warn!(%slug, error = %err, "cannot re-route a restarted preview");
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
