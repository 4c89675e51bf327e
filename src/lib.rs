//! Shoal: a masterless clustered time-series database. A single node is a cluster of one.
//!
//! Data flows through the modules in this order (each uses only those before it):
//!
//! ```text
//! config ─▶ env (seams: clock, …) ─▶ model ─▶ ingest (NSDb JSON, line protocol)
//!        ─▶ catalog (schemas) ─▶ storage (node WAL + shard folders of segments)
//!        ─▶ query (plan, per-shard partials, merge) ─▶ node (assembly: coordinators)
//!        ─▶ hints, repair (recovery) ─▶ api (HTTP)
//! ```
//!
//! `node` is the one place that knows every concrete type; the binary (`main.rs`), the
//! integration tests and the simulator build nodes through it.

pub mod api;
pub mod auth;
pub mod capacity;
pub mod catalog;
pub mod config;
pub mod discovery;
pub mod env;
pub mod hints;
pub mod influxql;
pub mod ingest;
pub mod keyring;
pub mod lease;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod node;
pub mod peer;
pub mod placement;
pub mod prometheus;
pub mod query;
pub mod repair;
pub mod server;
pub mod storage;
pub mod tls;
pub mod ui;

/// Serves the HTTP API on `listener` until `shutdown` completes, with the connection limits,
/// timeouts and TLS of [`server`]. The caller owns the listener so tests and the simulator can
/// hand in their own (port 0, in-memory).
pub async fn serve(
    node: std::sync::Arc<node::Node>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(node, listener, shutdown).await
}
