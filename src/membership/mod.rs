//! Membership: who is in the cluster and who is alive, by chitchat's scuttlebutt gossip over
//! UDP and its phi-accrual failure detector. Each node publishes only small facts of its own
//! (HTTP address, roles, readiness; capacity and catalog digest come with the catalog issue).
//!
//! chitchat stays behind this module: the rest of Shoal sees [`Member`]s, produced by the pure
//! function [`view`] from a snapshot of chitchat's state, which keeps the newest generation per
//! node id so a restarted node never shows up twice.

pub mod sealed;

use chitchat::transport::Transport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

pub const KEY_HTTP_ADDR: &str = "http_addr";
pub const KEY_ROLES: &str = "roles";
pub const KEY_READINESS: &str = "state";
pub const KEY_CATALOG_DIGEST: &str = "catalog_digest";
pub const KEY_CAPACITY: &str = "capacity";

/// Heartbeat intervals longer than this are left out of the detector's statistics (a paused
/// process should not teach the detector that long silences are normal).
const DETECTOR_INTERVAL_MAX: Duration = Duration::from_secs(10);
const DETECTOR_WINDOW: usize = 1000;

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub node_id: String,
    pub generation: u64,
    pub cluster_id: String,
    pub listen_addr: SocketAddr,
    pub advertise_addr: SocketAddr,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub dead_node_grace: Duration,
    pub seeds: Vec<String>,
}

/// Liveness as this node's failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Alive,
    /// Alive by the detector, but silent for more than half the time it takes to be judged dead.
    Suspect,
    Dead,
    /// Dead after announcing it was leaving: a graceful exit, not a failure.
    Left,
}

#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: String,
    pub generation: u64,
    pub gossip_addr: String,
    pub http_addr: Option<String>,
    pub roles: Vec<String>,
    pub state: Liveness,
    /// What the member says of itself: joining, ready or leaving.
    pub readiness: String,
    pub heartbeat_age_ms: Option<u64>,
    /// Hash of the member's catalog content; differs from ours → anti-entropy pulls.
    pub catalog_digest: Option<String>,
    /// Free capacity as the member last published it.
    pub capacity: Option<crate::capacity::Capacity>,
    /// Time since the last heartbeat over the mean heartbeat interval (chitchat's phi).
    pub phi: Option<f64>,
    pub is_self: bool,
}

impl Member {
    /// Alive or suspect: the failure detector has not judged it dead.
    pub fn is_live(&self) -> bool {
        matches!(self.state, Liveness::Alive | Liveness::Suspect)
    }
}

/// What [`view`] needs from chitchat, copied out under its lock.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub self_id: Option<ChitchatId>,
    pub nodes: Vec<(ChitchatId, BTreeMap<String, String>)>,
    pub live: BTreeSet<ChitchatId>,
    pub dead: BTreeSet<ChitchatId>,
    /// Time since each node's heartbeat last advanced, as seen here.
    pub heartbeat_age: HashMap<ChitchatId, Duration>,
    /// The silence after which each node would be judged dead.
    pub detection_timeout: HashMap<ChitchatId, Duration>,
    pub phi_threshold: f64,
    /// chitchat files a node under dead until it has heard two heartbeats from it. A node that
    /// was never live here and whose heartbeat advanced more recently than this is not judged
    /// yet: suspect, not dead, so a joining node does not flap through "dead".
    pub unjudged_grace: Duration,
    /// Nodes this node has never seen live.
    pub never_live: BTreeSet<ChitchatId>,
}

/// Turns a snapshot into members: one per node id (its newest generation), sorted by id.
pub fn view(s: &Snapshot) -> Vec<Member> {
    let mut newest: BTreeMap<&str, &(ChitchatId, BTreeMap<String, String>)> = BTreeMap::new();
    for entry in &s.nodes {
        let id = &entry.0;
        match newest.get(id.node_id.as_ref()) {
            Some(known) if known.0.generation_id >= id.generation_id => {}
            _ => {
                newest.insert(id.node_id.as_ref(), entry);
            }
        }
    }
    newest
        .into_values()
        .map(|(id, keys)| {
            let is_self = s.self_id.as_ref() == Some(id);
            let readiness = keys.get(KEY_READINESS).cloned().unwrap_or_else(|| "joining".into());
            let age = s.heartbeat_age.get(id).copied();
            let timeout = s.detection_timeout.get(id).copied();
            let phi = match (age, timeout) {
                (Some(age), Some(t)) if !t.is_zero() => Some(age.as_secs_f64() / t.as_secs_f64() * s.phi_threshold),
                _ => None,
            };
            let state = if is_self {
                Liveness::Alive
            } else if s.dead.contains(id) {
                match age {
                    _ if readiness == "leaving" => Liveness::Left,
                    Some(age) if age < s.unjudged_grace && s.never_live.contains(id) => Liveness::Suspect,
                    _ => Liveness::Dead,
                }
            } else if s.live.contains(id) {
                match (age, timeout) {
                    (Some(age), Some(t)) if age * 2 > t => Liveness::Suspect,
                    _ => Liveness::Alive,
                }
            } else {
                // Known from gossip but not judged by our detector yet.
                Liveness::Suspect
            };
            Member {
                id: id.node_id.to_string(),
                generation: id.generation_id,
                gossip_addr: id.gossip_advertise_addr.to_string(),
                http_addr: keys.get(KEY_HTTP_ADDR).cloned(),
                roles: keys.get(KEY_ROLES).map(|r| r.split(',').map(String::from).collect()).unwrap_or_default(),
                state,
                readiness,
                heartbeat_age_ms: if is_self { Some(0) } else { age.map(|a| a.as_millis() as u64) },
                catalog_digest: keys.get(KEY_CATALOG_DIGEST).cloned(),
                capacity: keys.get(KEY_CAPACITY).and_then(|c| crate::capacity::Capacity::from_gossip(c)),
                phi: if is_self { Some(0.0) } else { phi },
                is_self,
            }
        })
        .collect()
}

pub struct Membership {
    handle: ChitchatHandle,
    cfg: MembershipConfig,
    /// The heartbeat value last seen per node and when it last advanced here.
    heartbeats: std::sync::Mutex<HashMap<ChitchatId, (u64, Instant)>>,
    /// Nodes seen live at least once (bounded like `heartbeats`).
    ever_live: std::sync::Mutex<std::collections::HashSet<ChitchatId>>,
    /// Set when chitchat's gossip task ends: the node is deaf and must say so.
    deaf: Arc<AtomicBool>,
}

impl Membership {
    pub async fn start(
        cfg: MembershipConfig,
        transport: &dyn Transport,
        keys: Vec<(String, String)>,
    ) -> anyhow::Result<Arc<Self>> {
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: ChitchatId::new(cfg.node_id.clone(), cfg.generation, cfg.advertise_addr),
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.listen_addr,
            seed_nodes: cfg.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: cfg.phi_threshold,
                sampling_window_size: DETECTOR_WINDOW,
                max_interval: DETECTOR_INTERVAL_MAX,
                // A prior near the real heartbeat period; chitchat's default (5 s) makes the
                // first detections slow.
                initial_interval: cfg.gossip_interval,
                dead_node_grace_period: cfg.dead_node_grace,
            },
            marked_for_deletion_grace_period: cfg.dead_node_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let handle = chitchat::spawn_chitchat(chitchat_cfg, keys, transport).await?;
        let deaf = Arc::new(AtomicBool::new(false));
        let watcher = handle.termination_watcher();
        let deaf2 = deaf.clone();
        tokio::spawn(async move {
            let outcome = watcher.await;
            deaf2.store(true, Ordering::SeqCst);
            tracing::error!(?outcome, "the gossip task ended: this node no longer hears the cluster");
        });
        Ok(Arc::new(Self { handle, cfg, heartbeats: Default::default(), ever_live: Default::default(), deaf }))
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    pub fn is_deaf(&self) -> bool {
        self.deaf.load(Ordering::SeqCst)
    }

    /// Sets one of this node's own keys; it spreads with the next gossip rounds.
    pub async fn set(&self, key: &str, value: &str) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        guard.self_node_state().set(key, value);
    }

    /// Sends one gossip round to `addr` (a peer found by DNS discovery, say).
    pub fn gossip_to(&self, addr: SocketAddr) {
        if let Err(e) = self.handle.gossip(addr) {
            tracing::warn!(%addr, error = %e, "could not gossip to a discovered peer");
        }
    }

    pub async fn snapshot(&self) -> Snapshot {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let now = Instant::now();
        let mut heartbeats = self.heartbeats.lock().expect("heartbeats lock");
        let mut snap = Snapshot {
            self_id: Some(guard.self_chitchat_id().clone()),
            phi_threshold: self.cfg.phi_threshold,
            unjudged_grace: self.cfg.gossip_interval.mul_f64(self.cfg.phi_threshold),
            ..Snapshot::default()
        };
        for (id, state) in guard.node_states() {
            let keys = state.key_values().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            snap.nodes.push((id.clone(), keys));
            let beat = u64::from(state.heartbeat());
            let entry = heartbeats.entry(id.clone()).or_insert((beat, now));
            if entry.0 != beat {
                *entry = (beat, now);
            }
            snap.heartbeat_age.insert(id.clone(), now.duration_since(entry.1));
            if let Some(t) = guard.failure_detection_timeout(id) {
                snap.detection_timeout.insert(id.clone(), t);
            }
        }
        // Forget nodes chitchat has evicted, so the map stays bounded by the cluster.
        heartbeats.retain(|id, _| guard.node_states().contains_key(id));
        snap.live = guard.live_nodes().cloned().collect();
        snap.dead = guard.dead_nodes().cloned().collect();
        let mut ever_live = self.ever_live.lock().expect("ever-live lock");
        ever_live.extend(snap.live.iter().cloned());
        ever_live.retain(|id| guard.node_states().contains_key(id));
        snap.never_live = snap.nodes.iter().map(|(id, _)| id).filter(|id| !ever_live.contains(*id)).cloned().collect();
        snap
    }

    /// Ids of the nodes chitchat's detector holds dead right now: a cheaper probe than
    /// [`Self::members`] for watching many nodes over long simulated runs.
    pub async fn dead_ids(&self) -> Vec<String> {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        guard.dead_nodes().map(|id| id.node_id.to_string()).collect()
    }

    pub async fn members(&self) -> Vec<Member> {
        view(&self.snapshot().await)
    }

    /// Keeps heartbeat ages fresh between requests; ends when the membership is dropped.
    pub fn spawn_observer(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = self.cfg.gossip_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                m.snapshot().await;
            }
        });
    }

    pub async fn shutdown(&self) {
        let _ = self.handle.initiate_shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, generation: u64) -> ChitchatId {
        ChitchatId::new(name.to_string(), generation, ([127, 0, 0, 1], 7000 + generation as u16).into())
    }

    fn keys(readiness: &str) -> BTreeMap<String, String> {
        [(KEY_READINESS.to_string(), readiness.to_string()), (KEY_HTTP_ADDR.to_string(), "127.0.0.1:1".to_string())]
            .into_iter()
            .collect()
    }

    #[test]
    fn view_keeps_newest_generation_and_names_states() {
        let me = id("a", 1);
        let old_b = id("b", 1);
        let new_b = id("b", 2);
        let c = id("c", 1);
        let d = id("d", 1);
        let e = id("e", 1);
        let f = id("f", 1);
        let g = id("g", 1);
        let mut s = Snapshot {
            self_id: Some(me.clone()),
            phi_threshold: 8.0,
            unjudged_grace: Duration::from_millis(800),
            ..Default::default()
        };
        s.nodes = vec![
            (me.clone(), keys("ready")),
            (old_b.clone(), keys("ready")),
            (new_b.clone(), keys("joining")),
            (c.clone(), keys("leaving")),
            (d.clone(), keys("ready")),
            (e.clone(), keys("ready")),
            (f.clone(), keys("joining")),
            (g.clone(), keys("ready")),
        ];
        s.live = [me.clone(), new_b.clone(), e.clone()].into_iter().collect();
        s.dead = [old_b.clone(), c.clone(), d.clone(), f.clone(), g.clone()].into_iter().collect();
        s.heartbeat_age.insert(g.clone(), Duration::from_millis(30));
        s.heartbeat_age.insert(d.clone(), Duration::from_millis(900));
        s.heartbeat_age.insert(f.clone(), Duration::from_millis(30));
        s.never_live.insert(f.clone());
        for n in [&new_b, &e] {
            s.detection_timeout.insert(n.clone(), Duration::from_millis(800));
        }
        s.heartbeat_age.insert(new_b.clone(), Duration::from_millis(100));
        s.heartbeat_age.insert(e.clone(), Duration::from_millis(500));
        let members = view(&s);
        let by_id: BTreeMap<&str, &Member> = members.iter().map(|m| (m.id.as_str(), m)).collect();
        assert_eq!(members.len(), 7, "one entry per node id");
        assert_eq!(by_id["b"].generation, 2);
        assert_eq!(by_id["b"].state, Liveness::Alive);
        assert_eq!(by_id["b"].phi, Some(1.0));
        assert_eq!(by_id["c"].state, Liveness::Left);
        assert_eq!(by_id["d"].state, Liveness::Dead);
        assert_eq!(by_id["e"].state, Liveness::Suspect);
        assert_eq!(by_id["f"].state, Liveness::Suspect, "heard once, not judged yet");
        assert_eq!(by_id["g"].state, Liveness::Dead, "was live, now judged dead at once");
        assert!(by_id["a"].is_self && by_id["a"].state == Liveness::Alive);
    }
}
