//! Two nodes assembled in this process (the same `Node` the binary runs), gossiping over
//! chitchat's in-memory transport and syncing their catalogs over real HTTP on loopback. A
//! partition cuts their gossip; each side creates its own metrics; after the heal both
//! catalogs hold everything and agree.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use chitchat::transport::ChannelTransport;
use common::inproc::{eventually, gossip_addr, start};
use shoal::ingest::{Precision, parse_line_protocol};
use shoal::model::MetricKey;
use shoal::node::Node;
use std::time::Duration;

async fn write(node: &std::sync::Arc<Node>, line: &str) {
    let batch = parse_line_protocol(line, "db", "ns", Precision::Ms, 0, 100).unwrap();
    node.ingest(batch, None).await.unwrap();
}

fn key(metric: &str) -> MetricKey {
    MetricKey::new("db", "ns", metric).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_nodes_that_each_create_metrics_converge_after_the_heal() {
    let dir = tempfile::tempdir().unwrap();
    let transport = ChannelTransport::with_mtu(65_507);
    let (a, b) = (start(&transport, dir.path(), 1, &[]).await, start(&transport, dir.path(), 2, &[]).await);
    let alive = async |n: &Node| n.members().await.iter().filter(|m| m.is_live()).count() == 2;
    eventually("both nodes to see each other", async || alive(&a).await && alive(&b).await).await;
    write(&a, "shared value=1i 1000").await;
    eventually("the shared metric on b", async || b.catalog.schema(&key("shared")).is_some()).await;

    transport.remove_link(gossip_addr(1), gossip_addr(2)).await;
    let alone = async |n: &Node| n.members().await.iter().filter(|m| m.is_live()).count() == 1;
    eventually("each side to see the other dead", async || alone(&a).await && alone(&b).await).await;
    // Let anti-entropy rounds that began before the partition was seen finish.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // New shards only: a shard placed before the partition may have its replica on the far side.
    write(&a, "left_side value=1i 1000\nshared,zone=x value=2i 200000000").await;
    write(&b, "right_side value=1.5 1000\nshared,rack=y value=3i 200000001").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.catalog.schema(&key("right_side")).is_none(), "a partition must keep the sides apart");
    assert!(b.catalog.schema(&key("left_side")).is_none());
    assert_ne!(a.catalog.digest(), b.catalog.digest());

    transport.add_link(gossip_addr(1), gossip_addr(2)).await;
    eventually("the catalogs to agree after the heal", async || a.catalog.digest() == b.catalog.digest()).await;
    for n in [&a, &b] {
        assert!(n.catalog.schema(&key("left_side")).is_some() && n.catalog.schema(&key("right_side")).is_some());
        let shared = n.catalog.schema(&key("shared")).unwrap();
        assert!(shared.fields.contains_key("zone") && shared.fields.contains_key("rack"), "{shared:?}");
    }
    assert_eq!(a.catalog.placement(), b.catalog.placement());
    // Both sides placed the same new shard on themselves: the placements merged into a union.
    let day2 = shoal::model::ShardId { metric: key("shared"), start: 172_800_000 };
    assert_eq!(a.catalog.replicas(&day2).len(), 2, "concurrent placements merge into their union");
}
