//! The membership code on chitchat's in-memory transport under tokio's paused clock: no
//! sockets, no real sleeps. A partition splits four nodes two and two, each side sees the other
//! die, and after the heal everyone is alive again. The first stone of the simulator in sim/.

use chitchat::transport::ChannelTransport;
use shoal::membership::{Liveness, Membership, MembershipConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const GOSSIP: Duration = Duration::from_millis(100);

fn addr(i: u16) -> SocketAddr {
    ([127, 0, 0, 1], 10_000 + i).into()
}

async fn start(transport: &ChannelTransport, i: u16) -> Arc<Membership> {
    start_with_grace(transport, i, Duration::from_secs(3600)).await
}

async fn start_with_grace(transport: &ChannelTransport, i: u16, dead_node_grace: Duration) -> Arc<Membership> {
    let cfg = MembershipConfig {
        node_id: format!("n{i}"),
        generation: 1,
        cluster_id: "sim".into(),
        listen_addr: addr(i),
        advertise_addr: addr(i),
        gossip_interval: GOSSIP,
        phi_threshold: 8.0,
        dead_node_grace,
        seeds: vec![addr(1).to_string()],
    };
    Membership::start(cfg, transport, vec![("state".into(), "ready".into())]).await.unwrap()
}

/// Advances simulated time in gossip steps until `cond` holds; panics after `limit` steps.
async fn run_until<F: AsyncFnMut() -> bool>(limit: u32, what: &str, mut cond: F) -> u32 {
    for step in 0..limit {
        if cond().await {
            return step;
        }
        tokio::time::sleep(GOSSIP).await;
    }
    panic!("{what}: not reached within {limit} gossip intervals of simulated time");
}

async fn states(m: &Membership) -> Vec<(String, Liveness)> {
    m.members().await.into_iter().map(|m| (m.id, m.state)).collect()
}

#[tokio::test(start_paused = true)]
async fn partition_and_heal_on_paused_time() {
    let transport = ChannelTransport::with_mtu(65_507);
    let mut nodes = Vec::new();
    for i in 1..=4 {
        nodes.push(start(&transport, i).await);
    }
    let alive = |ids: &[&str]| ids.iter().map(|id| (id.to_string(), Liveness::Alive)).collect::<Vec<_>>();
    let everyone = alive(&["n1", "n2", "n3", "n4"]);
    let rounds = run_until(100, "all four alive everywhere", async || {
        for n in &nodes {
            if states(n).await != everyone {
                return false;
            }
        }
        true
    })
    .await;
    assert!(rounds <= 30, "convergence took {rounds} rounds");

    for a in [1, 2] {
        for b in [3, 4] {
            transport.remove_link(addr(a), addr(b)).await;
        }
    }
    let down = |side: &[&str], other: &[&str]| {
        let mut v: Vec<(String, Liveness)> = side.iter().map(|id| (id.to_string(), Liveness::Alive)).collect();
        v.extend(other.iter().map(|id| (id.to_string(), Liveness::Dead)));
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let left_view = down(&["n1", "n2"], &["n3", "n4"]);
    let right_view = down(&["n3", "n4"], &["n1", "n2"]);
    let detect = run_until(300, "each side to see the other dead", async || {
        states(&nodes[0]).await == left_view
            && states(&nodes[1]).await == left_view
            && states(&nodes[2]).await == right_view
            && states(&nodes[3]).await == right_view
    })
    .await;
    println!("converged in {rounds} rounds, partition detected in {detect} rounds");
    assert!(detect >= 3, "a partition cannot be detected instantly ({detect} rounds)");

    for a in [1, 2] {
        for b in [3, 4] {
            transport.add_link(addr(a), addr(b)).await;
        }
    }
    run_until(300, "everyone alive again after the heal", async || {
        for n in &nodes {
            if states(n).await != everyone {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn dead_members_are_evicted_after_the_grace_period() {
    let transport = ChannelTransport::with_mtu(65_507);
    let grace = Duration::from_secs(20);
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(start_with_grace(&transport, i, grace).await);
    }
    run_until(100, "three members everywhere", async || {
        for n in &nodes {
            if n.members().await.len() != 3 {
                return false;
            }
        }
        true
    })
    .await;
    nodes[2].shutdown().await;
    let dead = |states: Vec<(String, Liveness)>| states.iter().any(|(id, st)| id == "n3" && *st == Liveness::Dead);
    run_until(100, "n3 seen dead", async || dead(states(&nodes[0]).await) && dead(states(&nodes[1]).await)).await;
    // Still listed (as dead) well inside the grace period...
    tokio::time::sleep(grace / 2).await;
    assert!(dead(states(&nodes[0]).await), "a dead member stays visible during the grace period");
    // ...and gone after it.
    let steps = run_until(1000, "n3 evicted", async || {
        states(&nodes[0]).await.iter().all(|(id, _)| id != "n3")
            && states(&nodes[1]).await.iter().all(|(id, _)| id != "n3")
    })
    .await;
    assert!(steps as u128 * GOSSIP.as_millis() <= grace.as_millis() * 2, "eviction took {steps} intervals");
}
