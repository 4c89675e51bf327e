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
    let cfg = MembershipConfig {
        node_id: format!("n{i}"),
        generation: 1,
        cluster_id: "sim".into(),
        listen_addr: addr(i),
        advertise_addr: addr(i),
        gossip_interval: GOSSIP,
        phi_threshold: 8.0,
        dead_node_grace: Duration::from_secs(3600),
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
