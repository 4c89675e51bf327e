//! The HTTP server around the API router: our own accept loop on hyper, so that slow or
//! hostile clients meet limits (axum's `serve` has none to set):
//!
//! - at most `shoal.http.max-connections` connections; past it new ones wait in the listen
//!   backlog rather than take memory and descriptors;
//! - a connection must send a request's headers within `shoal.http.header-read-timeout`
//!   (also the TLS handshake's bound), so idle and trickling connections are closed; the
//!   server speaks HTTP/1.1 (what Influx clients, Telegraf and Prometheus send);
//! - a request must complete within `shoal.http.request-timeout` (see `api`), which bounds a
//!   body sent slowly;
//! - TLS (rustls) when `shoal.http.tls.cert-file` and `key-file` are set, with the files
//!   reloaded when they change ([`crate::tls`]).

use crate::node::Node;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long open connections get to finish their requests once the node stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the HTTP API on `listener` until `shutdown` completes.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = crate::api::router(node.clone());
    let tls = crate::tls::Reloading::from_config(&node.cfg)?;
    let permits = Arc::new(tokio::sync::Semaphore::new(node.cfg.http_connections_max));
    let header_timeout = node.cfg.http_header_read_timeout;
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_connection(stream, service, watcher, header_timeout).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, service, watcher, header_timeout).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still busy after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<axum::Router>,
    watcher: Watcher,
    header_timeout: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // HTTP/1.1 only: detecting HTTP/2 first waits for the client's first bytes with no
    // timeout, which would let a silent connection sit for ever. The header timer starts as
    // soon as a request is awaited, so a connection idle from the start or between requests
    // is closed too.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service).into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
