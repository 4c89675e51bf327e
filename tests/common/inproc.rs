//! Nodes assembled inside the test process (the same `Node` the binary runs): gossip over
//! chitchat's in-memory transport, the HTTP API (public and internal) on real loopback sockets.

use chitchat::transport::ChannelTransport;
use shoal::capacity::{Capacity, CapacityProbe};
use shoal::config::Config;
use shoal::node::{Node, NodeIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub struct FixedProbe;
impl CapacityProbe for FixedProbe {
    fn sample(&mut self) -> Capacity {
        Capacity::new(0.5, 0.5, 0.5, 0.5)
    }
}

/// The in-memory gossip address of node `i` (nothing listens there; the transport routes it).
pub fn gossip_addr(i: u16) -> SocketAddr {
    ([127, 0, 0, 1], 20_000 + i).into()
}

/// Starts node `p<i>` with data under `dir`, seeded by node 1, plus extra `--set` lines.
pub async fn start(transport: &ChannelTransport, dir: &std::path::Path, i: u16, extra: &[&str]) -> Arc<Node> {
    let mut sets = vec![
        format!("shoal.node.id=p{i}"),
        format!("shoal.data-dir={}", dir.join(format!("p{i}")).display()),
        format!("shoal.cluster.seeds=[\"{}\"]", gossip_addr(1)),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let cfg = Config::from_layers("", &Default::default(), &sets).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let io = NodeIo {
        http_addr: listener.local_addr().unwrap(),
        gossip_listen: gossip_addr(i),
        gossip_advertise: gossip_addr(i),
        gossip_transport: transport,
        capacity_probe: Box::new(FixedProbe),
        peers: Arc::new(
            shoal::peer::HttpPeers::new(&cfg.cluster_id, None, Arc::new(shoal::env::SystemClock), None).unwrap(),
        ),
        keyring: None,
    };
    let node = Node::open(cfg, shoal::env::Env::production(), io).await.unwrap();
    tokio::spawn(shoal::serve(node.clone(), listener, std::future::pending()));
    node
}

/// Polls `cond` every 20 ms until it holds; panics after 30 s.
pub async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    #[allow(clippy::disallowed_methods)] // a test deadline on the real clock
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond().await {
        #[allow(clippy::disallowed_methods)]
        let now = std::time::Instant::now();
        assert!(now < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
