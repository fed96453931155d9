//! Serves the API over HTTP/1 with previewd's own accept loop (axum's `serve` has no header
//! timeout): a connection whose request headers are not complete within `http.header_timeout`
//! is closed, at most `http.max_connections` are served at once (further ones wait in the
//! kernel's listen queue, not in previewd's memory), and on shutdown no connection is accepted
//! any more while the requests in flight finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::add_extension::AddExtension;

use crate::config::HttpSettings;

/// What one connection may buffer of what its client sends (hyper's default is about 400 KiB):
/// `max_connections` of them is what a flood of connections can make previewd hold. The request
/// head must fit in it: 64 KiB is twice what nginx accepts by default (4 buffers of 8 KiB).
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `router` until `shutdown` is cancelled, then waits for the requests in flight.
pub async fn serve(listener: TcpListener, router: Router, settings: HttpSettings, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout).max_buf_size(READ_BUFFER_BYTES);
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    pause_after(&err).await;
                    continue;
                }
            },
        };
        let connection = serve_connection(&builder, stream, peer, router.clone());
        let watched = graceful.watch(connection);
        tokio::spawn(finish(watched, peer, slot));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The connection with the peer's address as `ConnectInfo`, as `into_make_service_with_connect_info`
/// gives it (handlers and `client_address` read it there).
fn serve_connection(
    builder: &http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
) -> http1::Connection<TokioIo<TcpStream>, TowerToHyperService<AddExtension<Router, ConnectInfo<SocketAddr>>>> {
    let service = TowerToHyperService::new(AddExtension::new(router, ConnectInfo(peer)));
    builder.serve_connection(TokioIo::new(stream), service)
}

/// Runs a connection to its end, then frees its slot.
async fn finish(
    connection: impl Future<Output = Result<(), hyper::Error>>,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    if let Err(err) = connection.await {
        // Timeouts and clients that hang up: expected, and a flood of them must not fill the journal.
        tracing::debug!(%peer, error = %err, "connection closed");
    }
}

/// A failed accept: the client gave up (nothing to do) or previewd is out of file descriptors or
/// memory (retrying at once would spin; the connections being served will free some).
async fn pause_after(err: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(err.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) {
        return;
    }
    tracing::error!(error = %err, "cannot accept a connection; trying again in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
