//! The simulated network. Gossip datagrams (chitchat's `Transport`) and internal API calls
//! (Shoal's `PeerClient`, delivered in process to the target node's real axum router) both
//! pass through one [`Net`], whose faults the run script sets: directed cuts (symmetric and
//! one-way partitions), packet loss, latency with reordering, duplicated API calls, and nodes
//! that are down. Every random choice comes from the net's own seeded stream.

use crate::rng::Rng;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use shoal::peer::{CALL_TIMEOUT, CLUSTER_HEADER, PeerClient, PeerError};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Datagrams waiting for one node beyond this are dropped, like a full socket buffer.
const INBOX_DEPTH: usize = 1024;

/// Node `i`'s addresses: `10.0.<i / 250>.<i % 250 + 1>`, gossip on 7280, HTTP on 9000.
pub fn gossip_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250 + 1) as u8], 7280))
}

pub fn http_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250 + 1) as u8], 9000))
}

fn index_of(addr: &SocketAddr) -> Option<usize> {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            let o = ip.octets();
            (o[0] == 10 && o[3] > 0).then(|| o[2] as usize * 250 + o[3] as usize - 1)
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Directed links `(from, to)` that deliver nothing.
    pub cut: BTreeSet<(usize, usize)>,
    /// Probability that a gossip datagram is lost (an API call then costs a retransmit).
    pub loss: f64,
    /// One-way delay, uniform in this range (ms): different delays reorder messages.
    pub latency_ms: (u64, u64),
    /// Probability that an internal API call is delivered twice.
    pub duplicate: f64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub datagrams: u64,
    pub datagrams_lost: u64,
    pub calls: u64,
    pub calls_failed: u64,
    pub calls_duplicated: u64,
}

pub struct NetState {
    rng: Rng,
    pub faults: Faults,
    /// Nodes whose process is down: nothing reaches them, nothing leaves them.
    pub down: BTreeSet<usize>,
    inboxes: HashMap<usize, mpsc::Sender<(SocketAddr, ChitchatEnvelope)>>,
    routers: HashMap<usize, axum::Router>,
    pub stats: NetStats,
}

/// The shared network; cheap to clone.
#[derive(Clone)]
pub struct Net(Arc<Mutex<NetState>>);

impl Net {
    pub fn new(seed: u64) -> Self {
        Net(Arc::new(Mutex::new(NetState {
            rng: Rng::derive(seed, "net"),
            faults: Faults { latency_ms: (1, 5), ..Default::default() },
            down: BTreeSet::new(),
            inboxes: HashMap::new(),
            routers: HashMap::new(),
            stats: NetStats::default(),
        })))
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut NetState) -> T) -> T {
        f(&mut self.0.lock().expect("net lock"))
    }

    pub fn set_router(&self, i: usize, router: Option<axum::Router>) {
        self.with(|n| match router {
            Some(r) => n.routers.insert(i, r),
            None => n.routers.remove(&i),
        });
    }

    /// Whether a message from `from` to `to` can pass now.
    fn link_up(n: &NetState, from: usize, to: usize) -> bool {
        !n.down.contains(&from) && !n.down.contains(&to) && !n.faults.cut.contains(&(from, to))
    }

    fn delay(n: &mut NetState) -> Duration {
        let (lo, hi) = n.faults.latency_ms;
        Duration::from_millis(n.rng.between(lo, hi.max(lo)))
    }
}

/// chitchat's transport over the simulated network.
pub struct SimTransport(pub Net);

#[async_trait::async_trait]
impl Transport for SimTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let me = index_of(&listen_addr).ok_or_else(|| anyhow::anyhow!("{listen_addr} is not a simulated address"))?;
        let (tx, rx) = mpsc::channel(INBOX_DEPTH);
        self.0.with(|n| n.inboxes.insert(me, tx));
        Ok(Box::new(SimSocket { me, addr: listen_addr, net: self.0.clone(), rx }))
    }
}

struct SimSocket {
    me: usize,
    addr: SocketAddr,
    net: Net,
    rx: mpsc::Receiver<(SocketAddr, ChitchatEnvelope)>,
}

#[async_trait::async_trait]
impl Socket for SimSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        // chitchat keeps its byte encoding private: envelopes travel as values.
        let num_bytes_sent = 0;
        let Some(target) = index_of(&to) else { return Ok(SendOutcome { num_bytes_sent }) };
        let (me, addr, net) = (self.me, self.addr, self.net.clone());
        let delay = net.with(|n| {
            n.stats.datagrams += 1;
            let loss = n.faults.loss;
            if !Net::link_up(n, me, target) || n.rng.chance(loss) {
                n.stats.datagrams_lost += 1;
                None
            } else {
                Some(Net::delay(n))
            }
        });
        if let Some(delay) = delay {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // Judged again on arrival: a partition or crash meanwhile loses it.
                let inbox =
                    net.with(|n| if Net::link_up(n, me, target) { n.inboxes.get(&target).cloned() } else { None });
                if let Some(inbox) = inbox {
                    let _ = inbox.try_send((addr, envelope));
                }
            });
        }
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let (from_addr, envelope) =
            self.rx.recv().await.ok_or_else(|| anyhow::anyhow!("the simulated socket closed"))?;
        Ok(RecvOutcome { from_addr, envelope, num_bytes_received: 0 })
    }
}

/// The internal API client of node `me`: calls reach the target's real router in process.
pub struct SimPeers {
    pub me: usize,
    pub net: Net,
    pub cluster_id: String,
}

impl SimPeers {
    async fn call(&self, method: &str, addr: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, PeerError> {
        let unreachable = |reason: &str| PeerError::Unreachable { addr: addr.to_string(), reason: reason.to_string() };
        let target =
            addr.parse::<SocketAddr>().ok().and_then(|a| index_of(&a)).ok_or_else(|| unreachable("no such host"))?;
        let me = self.me;
        // (router, delay there, delay back, duplicate?)
        let plan = self.net.with(|n| {
            n.stats.calls += 1;
            if n.down.contains(&target) {
                return Err(false);
            }
            if !Net::link_up(n, me, target) || !Net::link_up(n, target, me) {
                return Err(true);
            }
            let router = n.routers.get(&target).cloned().ok_or(false)?;
            // A lost segment is retransmitted: it costs time, not the call.
            let loss = n.faults.loss;
            let mut there = Net::delay(n);
            while n.rng.chance(loss) {
                there += Duration::from_millis(200);
            }
            let back = Net::delay(n);
            let duplicate = n.rng.chance(n.faults.duplicate);
            if duplicate {
                n.stats.calls_duplicated += 1;
            }
            Ok((router, there, back, duplicate))
        });
        let (router, there, back, duplicate) = match plan {
            Ok(p) => p,
            Err(timeout) => {
                self.net.with(|n| n.stats.calls_failed += 1);
                if timeout {
                    tokio::time::sleep(CALL_TIMEOUT).await;
                    return Err(unreachable("timed out (partitioned)"));
                }
                return Err(unreachable("connection refused (down)"));
            }
        };
        let request = |body: Vec<u8>| {
            axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header(CLUSTER_HEADER, &self.cluster_id)
                .header("content-type", "application/octet-stream")
                .body(axum::body::Body::from(body))
                .expect("a valid request")
        };
        if duplicate {
            let (router, req) = (router.clone(), request(body.clone()));
            tokio::spawn(async move {
                tokio::time::sleep(there * 2).await;
                let _ = tower::ServiceExt::oneshot(router, req).await;
            });
        }
        tokio::time::sleep(there).await;
        let call = async {
            let response = tower::ServiceExt::oneshot(router, request(body)).await.expect("routers are infallible");
            let status = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, bytes.to_vec()))
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, call).await;
        tokio::time::sleep(back).await;
        let (status, bytes) = match answer {
            Err(_) => return Err(unreachable("timed out")),
            Ok(Err(e)) => return Err(unreachable(&e)),
            Ok(Ok(a)) => a,
        };
        // The answer must come back over the link too.
        if !self.net.with(|n| Net::link_up(n, target, me)) {
            self.net.with(|n| n.stats.calls_failed += 1);
            return Err(unreachable("the answer was lost"));
        }
        if !(200..300).contains(&status) {
            let message = String::from_utf8_lossy(&bytes).to_string();
            return Err(PeerError::Refused { addr: addr.to_string(), status, message });
        }
        Ok(bytes)
    }
}

#[async_trait::async_trait]
impl PeerClient for SimPeers {
    async fn get(&self, addr: &str, path: &str) -> Result<Vec<u8>, PeerError> {
        self.call("GET", addr, path, Vec::new()).await
    }

    async fn post(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, PeerError> {
        self.call("POST", addr, path, body).await
    }
}
