//! Membership figures from the simulator: Shoal's membership layer (chitchat with Shoal's
//! view on top) for many nodes on the simulated network, measured in gossip rounds.

use crate::net::{Net, SimTransport, gossip_addr};
use crate::rng::Rng;
use shoal::membership::{Liveness, Membership, MembershipConfig};
use std::sync::Arc;
use std::time::Duration;

pub const GOSSIP: Duration = Duration::from_millis(100);
const STEADY_BEFORE_KILL: Duration = Duration::from_secs(20);

#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// Rounds from the last node's start until every node sees all of them alive.
    pub converge_rounds: Option<f64>,
    /// Rounds from a kill until every survivor reports the killed node dead.
    pub detect_rounds: Option<f64>,
    /// Times an observer judged a live node dead (checked every gossip round).
    pub false_dead: u64,
    pub sampled_seconds: u64,
}

async fn start(net: &Net, transport: &SimTransport, i: usize, phi: f64) -> Arc<Membership> {
    let cfg = MembershipConfig {
        node_id: format!("n{i}"),
        generation: 1,
        cluster_id: "sim".into(),
        listen_addr: gossip_addr(i),
        advertise_addr: gossip_addr(i),
        gossip_interval: GOSSIP,
        phi_threshold: phi,
        dead_node_grace: Duration::from_secs(3600),
        seeds: vec![gossip_addr(0).to_string()],
    };
    net.with(|n| n.down.remove(&i));
    Membership::start(cfg, transport, vec![("readiness".into(), "ready".into())]).await.expect("membership starts")
}

/// `nodes` nodes from one seed node, at `loss`, with failure detector threshold `phi`; then, with `detect`, one node killed; then
/// `watch` of sampling every survivor's view every second for false dead reports.
pub async fn measure(seed: u64, nodes: usize, loss: f64, phi: f64, detect: bool, watch: Duration) -> Figures {
    let net = Net::new(seed);
    let transport = SimTransport(net.clone());
    let mut rng = Rng::derive(seed, "membership");
    let mut members = Vec::new();
    for i in 0..nodes {
        members.push(start(&net, &transport, i, phi).await);
        // Start-up jitter: nodes of a real deployment do not start in the same millisecond.
        tokio::time::sleep(Duration::from_millis(rng.between(0, 20))).await;
    }
    net.with(|n| n.faults.loss = loss);
    let mut figures = Figures::default();
    let started = tokio::time::Instant::now();
    let alive_everywhere = |members: &[Arc<Membership>], expect: usize| {
        let members = members.to_vec();
        async move {
            for m in &members {
                let alive = m.members().await.iter().filter(|x| x.state == Liveness::Alive).count();
                if alive != expect {
                    return false;
                }
            }
            true
        }
    };
    for _ in 0..600 {
        if alive_everywhere(&members, nodes).await {
            figures.converge_rounds = Some(started.elapsed().as_secs_f64() / GOSSIP.as_secs_f64());
            break;
        }
        tokio::time::sleep(GOSSIP / 4).await;
    }
    if detect && figures.converge_rounds.is_some() {
        // The kill comes in steady state, after each detector has learnt the real heartbeat
        // rhythm: right after convergence its mean interval is still mostly the start-up prior.
        tokio::time::sleep(STEADY_BEFORE_KILL).await;
        let victim = 1 + rng.below(nodes as u64 - 1) as usize;
        net.with(|n| n.down.insert(victim));
        members[victim].shutdown().await;
        let killed = tokio::time::Instant::now();
        let survivors: Vec<Arc<Membership>> =
            members.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, m)| m.clone()).collect();
        let id = format!("n{victim}");
        for _ in 0..2_400 {
            let mut all = true;
            for m in &survivors {
                let dead = m.members().await.iter().any(|x| x.id == id && x.state == Liveness::Dead);
                all &= dead;
            }
            if all {
                figures.detect_rounds = Some(killed.elapsed().as_secs_f64() / GOSSIP.as_secs_f64());
                break;
            }
            tokio::time::sleep(GOSSIP / 4).await;
        }
        members = survivors;
    }
    // Every observer's dead set is read once per gossip round, and each time a live node
    // enters one it counts as a false dead report.
    let live_ids: std::collections::HashSet<String> = members.iter().map(|m| m.config().node_id.clone()).collect();
    let mut held_dead: std::collections::HashSet<(usize, String)> = Default::default();
    let watch_end = tokio::time::Instant::now() + watch;
    let mut last_second = tokio::time::Instant::now();
    while tokio::time::Instant::now() < watch_end {
        tokio::time::sleep(GOSSIP).await;
        if last_second.elapsed() >= Duration::from_secs(1) {
            last_second += Duration::from_secs(1);
            figures.sampled_seconds += 1;
        }
        let mut now_dead = std::collections::HashSet::new();
        for (observer, m) in members.iter().enumerate() {
            for id in m.dead_ids().await {
                if live_ids.contains(&id) {
                    if !held_dead.contains(&(observer, id.clone())) {
                        figures.false_dead += 1;
                    }
                    now_dead.insert((observer, id));
                }
            }
        }
        held_dead = now_dead;
    }
    for m in &members {
        m.shutdown().await;
    }
    figures
}

/// Runs [`measure`] for one seed on a fresh thread and paused runtime, like a cluster run.
pub fn measure_seed(seed: u64, nodes: usize, loss: f64, phi: f64, detect: bool, watch: Duration) -> Figures {
    crate::entropy::reseed(seed);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
            .build()
            .expect("a runtime")
            .block_on(measure(seed, nodes, loss, phi, detect, watch))
    })
    .join()
    .expect("the measurement does not panic")
}
