//! Real Shoal nodes (`shoal::node::Node`, the binary's assembly) on the simulator's seams:
//! gossip and internal API through [`Net`], a skewable clock on tokio's paused time, a
//! scripted capacity probe, and a data dir per node that survives crashes.

use crate::net::{Net, SimPeers, SimTransport, gossip_addr, http_addr};
use shoal::capacity::{Capacity, CapacityProbe};
use shoal::env::{Clock, Env};
use shoal::node::{Node, NodeIo};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Simulated wall clock: a fixed epoch plus tokio's (paused) time elapsed since the cluster
/// began, plus a skew the run script may change. Every node counts from the same instant, so
/// that clocks agree but for the skew faults (a node joining later must not run behind).
pub struct SimClock {
    start: tokio::time::Instant,
    pub skew_ms: AtomicI64,
}

/// Every run starts on the same wall-clock date, so times in the trace replay exactly.
pub const EPOCH_MS: i64 = 1_800_000_000_000;

impl SimClock {
    pub fn new(start: tokio::time::Instant) -> Self {
        Self { start, skew_ms: AtomicI64::new(0) }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        EPOCH_MS + self.start.elapsed().as_millis() as i64 + self.skew_ms.load(Ordering::Relaxed)
    }
}

/// A capacity the run script chose for the node.
struct ScriptedProbe(Capacity);

impl CapacityProbe for ScriptedProbe {
    fn sample(&mut self) -> Capacity {
        self.0
    }
}

pub struct SimNode {
    pub idx: usize,
    pub id: String,
    pub dir: PathBuf,
    pub clock: Arc<SimClock>,
    pub capacity: f64,
    pub node: Option<Arc<Node>>,
    /// Left the cluster for good (`shoal leave`).
    pub left: bool,
}

pub struct Cluster {
    pub net: Net,
    pub nodes: Vec<SimNode>,
    pub root: tempfile::TempDir,
    pub settings: Vec<String>,
    transport: SimTransport,
    /// When the cluster began: time zero of every node's clock.
    start: tokio::time::Instant,
}

impl Drop for Cluster {
    /// Each node's router sits in the network, and each node reaches the network through its
    /// peer client: a cycle that would keep every node, its open files and its runtime's
    /// handles alive after the seed. Taking the routers out breaks it.
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.net.set_router(i, None);
        }
    }
}

impl Cluster {
    pub fn new(net: Net, settings: Vec<String>) -> anyhow::Result<Self> {
        // Memory-backed when the machine has it: fsync then costs nothing, and the simulator
        // runs many clusters.
        let shm = std::path::Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("shoal-sim").clone();
        let root = if shm.is_dir() { builder.tempdir_in(shm)? } else { builder.tempdir()? };
        let start = tokio::time::Instant::now();
        Ok(Self { transport: SimTransport(net.clone()), net, nodes: Vec::new(), root, settings, start })
    }

    /// Adds node `n<i>` (the next index) and starts it.
    pub async fn add_node(&mut self, capacity: f64) -> anyhow::Result<usize> {
        let idx = self.nodes.len();
        let id = format!("n{idx}");
        let dir = self.root.path().join(&id);
        crate::disk::add_node(&dir);
        self.nodes.push(SimNode {
            idx,
            id,
            dir,
            clock: Arc::new(SimClock::new(self.start)),
            capacity,
            node: None,
            left: false,
        });
        self.start(idx).await?;
        Ok(idx)
    }

    /// Starts (or restarts) node `idx` on its data dir.
    pub async fn start(&mut self, idx: usize) -> anyhow::Result<()> {
        let seeds: Vec<String> =
            (0..self.nodes.len()).filter(|&j| j != idx).map(|j| format!("\"{}\"", gossip_addr(j))).collect();
        let n = &self.nodes[idx];
        let mut sets = vec![
            format!("shoal.node.id={}", n.id),
            format!("shoal.data-dir={}", n.dir.display()),
            "shoal.cluster.id=sim".to_string(),
            // Like an operator pointing a node at the cluster: every other node ever started.
            format!("shoal.cluster.seeds=[{}]", seeds.join(",")),
        ];
        sets.extend(self.settings.iter().cloned());
        let cfg = shoal::config::Config::from_layers("", &Default::default(), &sets)?;
        let peers = Arc::new(SimPeers { me: idx, net: self.net.clone(), cluster_id: cfg.cluster_id.clone() });
        let c = n.capacity;
        let io = NodeIo {
            http_addr: http_addr(idx),
            gossip_listen: gossip_addr(idx),
            gossip_advertise: gossip_addr(idx),
            gossip_transport: &self.transport,
            capacity_probe: Box::new(ScriptedProbe(Capacity::new(c, c, c, c))),
            peers,
            keyring: None,
        };
        let env = Env { clock: n.clock.clone() };
        self.net.with(|net| net.down.remove(&idx));
        let node = Node::open(cfg, env, io).await?;
        self.net.set_router(idx, Some(shoal::api::router(node.clone())));
        self.nodes[idx].node = Some(node);
        Ok(())
    }

    /// Kills node `idx`: it drops off the network at once, its gossip stops and its shards
    /// close; then its disk loses every byte not fsynced, and maybe ends a log in a torn record.
    /// Returns what the disk lost, for the trace.
    pub async fn crash(&mut self, idx: usize) -> String {
        self.net.with(|n| n.down.insert(idx));
        self.net.set_router(idx, None);
        if let Some(node) = self.nodes[idx].node.take() {
            node.membership.shutdown().await;
            for shard in node.storage.all_shards() {
                shard.close().await;
            }
        }
        crate::disk::crash(&self.nodes[idx].dir)
    }

    /// SIGTERM: the node stops cleanly (compacts, stops gossiping) without leaving; it keeps its
    /// place in every placement and its disk, and comes back with [`Cluster::start`].
    pub async fn stop(&mut self, idx: usize) {
        self.net.set_router(idx, None);
        if let Some(node) = self.nodes[idx].node.take() {
            let _ = node.storage.flush_all().await;
            node.membership.shutdown().await;
            for shard in node.storage.all_shards() {
                shard.close().await;
            }
        }
        self.net.with(|n| n.down.insert(idx));
    }

    /// `shoal leave`: hands off the node's shards, then it stops for good and its disk is
    /// gone. An abandoned leave (some shard found no new replica) leaves the node running.
    pub async fn leave(&mut self, idx: usize) -> Result<(), shoal::node::LeaveError> {
        if let Some(node) = self.nodes[idx].node.clone() {
            node.leave().await?;
        }
        self.nodes[idx].left = true;
        self.crash(idx).await;
        Ok(())
    }

    pub fn live(&self) -> Vec<usize> {
        self.nodes.iter().filter(|n| n.node.is_some()).map(|n| n.idx).collect()
    }

    /// Sends a public API request to node `idx` through its real router.
    pub async fn request(&self, idx: usize, method: &str, uri: &str, body: String) -> (u16, serde_json::Value) {
        let Some(node) = &self.nodes[idx].node else { return (0, serde_json::Value::Null) };
        let router = shoal::api::router(node.clone());
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .expect("a valid request");
        let response = tower::ServiceExt::oneshot(router, req).await.expect("routers are infallible");
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }
}
