//! The replica side of the internal API, called through the peer client as a coordinator will:
//! a replica write is stored and fsynced, a partial result comes back as postcard and merges;
//! bad replica writes are refused with 400, a query-only node refuses to store.

mod common;
use chitchat::transport::ChannelTransport;
use common::inproc::start;
use shoal::ingest::{Precision, parse_line_protocol};
use shoal::model::{MetricKey, ShardId};
use shoal::peer::{HttpPeers, PartialAnswer, PartialRequest, PeerClient, PeerError, ReplicaWrite, ShardVersion};
use shoal::query::answer::finish;
use shoal::query::plan::{Statement, parse};

fn select(sql: &str) -> shoal::query::plan::SelectPlan {
    match parse(sql, 0).unwrap() {
        Statement::Select(p) => p,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_write_and_partial_through_the_peer_client() {
    let dir = tempfile::tempdir().unwrap();
    let transport = ChannelTransport::with_mtu(65_507);
    let storage = start(&transport, dir.path(), 1, &["shoal.sharding.interval=1h"]).await;
    let query_only =
        start(&transport, dir.path(), 2, &["shoal.sharding.interval=1h", "shoal.cluster.roles=[\"query\"]"]).await;
    let peers = HttpPeers::new("shoal", None, std::sync::Arc::new(shoal::env::SystemClock), None).unwrap();
    let addr = storage.http_addr.to_string();

    let lines = "cpu,region=eu value=1i 1000\ncpu,region=us value=5i 2000\ncpu,region=eu value=3i 3000";
    let batch = parse_line_protocol(lines, "db", "ns", Precision::Ms, 0, 100).unwrap();
    let (key, rows) = batch.metrics.into_iter().next().unwrap();
    let shard = ShardId { metric: key.clone(), start: 0 };
    let write = ReplicaWrite { shard: shard.clone(), batch: rows.clone(), epoch: 0 };
    peers.post(&addr, "/internal/v1/write", postcard::to_stdvec(&write).unwrap()).await.unwrap();
    assert_eq!(storage.storage.shard_if_held(&shard).unwrap().points(), 3, "stored on the replica");

    let plan = select("SELECT sum(value) FROM cpu GROUP BY region");
    let req = PartialRequest {
        shard: shard.clone(),
        plan: plan.clone(),
        from: i64::MIN,
        to: i64::MAX,
        epoch: 0,
        known: None,
    };
    let ask = async |req: &PartialRequest| {
        let bytes = peers.post(&addr, "/internal/v1/partial", postcard::to_stdvec(req).unwrap()).await.unwrap();
        postcard::from_bytes::<PartialAnswer>(&bytes).unwrap()
    };
    let PartialAnswer::Computed { version, partial } = ask(&req).await else { panic!("the replica holds it") };
    let records = finish(&plan, partial).into_points();
    let sums: Vec<(String, f64)> =
        records.iter().map(|r| (format!("{:?}", r.tags["region"]), r.value.as_f64())).collect();
    assert_eq!(sums, [("Str(\"eu\")".to_string(), 4.0), ("Str(\"us\")".to_string(), 5.0)]);

    // Asked with the version it answered from, the replica only confirms it; after a write
    // it computes again, at a new version.
    let known = PartialRequest { known: Some(version), ..req.clone() };
    assert!(matches!(ask(&known).await, PartialAnswer::Unchanged));
    let another = parse_line_protocol("cpu,region=us value=7i 4000", "db", "ns", Precision::Ms, 0, 100).unwrap();
    let rows_4000 = another.metrics.into_iter().next().unwrap().1;
    let one_more = ReplicaWrite { shard: shard.clone(), batch: rows_4000, epoch: 0 };
    peers.post(&addr, "/internal/v1/write", postcard::to_stdvec(&one_more).unwrap()).await.unwrap();
    match ask(&known).await {
        PartialAnswer::Computed { version: newer, partial } => {
            assert_ne!(newer, version);
            let us = finish(&plan, partial)
                .into_points()
                .into_iter()
                .find(|r| format!("{:?}", r.tags["region"]) == "Str(\"us\")");
            assert_eq!(us.unwrap().value.as_f64(), 12.0, "the new point is read");
        }
        other => panic!("a changed copy is read again, not confirmed: {other:?}"),
    }
    // Another generation's version (a restarted node) is not this copy's.
    let stale =
        PartialRequest { known: Some(ShardVersion { generation: version.generation + 1, ..version }), ..req.clone() };
    assert!(matches!(ask(&stale).await, PartialAnswer::Computed { .. }));

    // A shard this node does not hold answers "none held", not an error.
    let other = PartialRequest { shard: ShardId { metric: key.clone(), start: 3_600_000 }, ..req.clone() };
    assert!(matches!(ask(&other).await, PartialAnswer::NotHeld));

    // Points outside the named shard are refused.
    let wrong = ReplicaWrite {
        shard: ShardId { metric: MetricKey::new("db", "ns", "cpu").unwrap(), start: 3_600_000 },
        batch: rows.clone(),
        epoch: 0,
    };
    match peers.post(&addr, "/internal/v1/write", postcard::to_stdvec(&wrong).unwrap()).await {
        Err(PeerError::Refused { status: 400, message, .. }) => assert!(message.contains("outside shard"), "{message}"),
        other => panic!("{other:?}"),
    }
    // A query-only node stores nothing.
    let q_addr = query_only.http_addr.to_string();
    match peers.post(&q_addr, "/internal/v1/write", postcard::to_stdvec(&write).unwrap()).await {
        Err(PeerError::Refused { status: 400, message, .. }) => {
            assert!(message.contains("no storage role"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // A write made after a drop this node has not heard of (a newer drop epoch) first removes
    // what it holds of the metric; a write made before that drop (a late hint, a stale peer)
    // is refused with 409 rather than stored into the metric created after it.
    let after_drop = ReplicaWrite { batch: rows.select(&[0]), epoch: 7, ..write.clone() };
    peers.post(&addr, "/internal/v1/write", postcard::to_stdvec(&after_drop).unwrap()).await.unwrap();
    assert_eq!(storage.storage.shard_if_held(&shard).unwrap().points(), 1, "only the point written after the drop");
    assert_eq!(storage.catalog.drop_epoch(&key), 7);
    match peers.post(&addr, "/internal/v1/write", postcard::to_stdvec(&write).unwrap()).await {
        Err(PeerError::Refused { status: 409, message, .. }) => assert!(message.contains("was dropped"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(storage.storage.shard_if_held(&shard).unwrap().points(), 1);
    // Garbage is a 400, not a crash.
    match peers.post(&addr, "/internal/v1/partial", vec![0xff; 10]).await {
        Err(PeerError::Refused { status: 400, .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// Two in-process nodes with one-hour shards and replication factor `rf`, once each sees the
/// other live.
async fn two_nodes(
    transport: &ChannelTransport,
    dir: &std::path::Path,
    rf: u8,
) -> (std::sync::Arc<shoal::node::Node>, std::sync::Arc<shoal::node::Node>) {
    let rf = format!("shoal.cluster.replication-factor={rf}");
    let sets = ["shoal.sharding.interval=1h", rf.as_str(), "shoal.repair.interval=1h"];
    let a = start(transport, dir, 1, &sets).await;
    let b = start(transport, dir, 2, &sets).await;
    common::inproc::eventually("both nodes to see each other", async || {
        a.members().await.iter().filter(|m| m.is_live()).count() == 2
            && b.members().await.iter().filter(|m| m.is_live()).count() == 2
    })
    .await;
    (a, b)
}

/// A replica that is placed but has lost its copy (a new disk, say) is passed over by the read
/// coordinator, even when it is the coordinator itself: the query answers from the replica
/// that holds the points, not with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_its_copy_is_passed_over_by_reads() {
    let dir = tempfile::tempdir().unwrap();
    let transport = ChannelTransport::with_mtu(65_507);
    let (a, b) = two_nodes(&transport, dir.path(), 2).await;
    let lines: String = (0..100).map(|i| format!("cpu,region=eu value={i}i {}\n", 1000 + i)).collect();
    let batch = parse_line_protocol(&lines, "db", "ns", Precision::Ms, 0, 1000).unwrap();
    a.ingest(batch, Some(shoal::config::Consistency::All)).await.unwrap();
    let key = MetricKey::new("db", "ns", "cpu").unwrap();
    let shard = ShardId { metric: key.clone(), start: 0 };
    assert_eq!(b.storage.shard_if_held(&shard).unwrap().points(), 100, "written to both replicas");
    // b loses its copy; the placement still names it.
    b.storage.drop_metric(&key).await.unwrap();
    assert_eq!(b.catalog.replicas(&shard).len(), 2);
    let req = shoal::node::QueryRequest {
        db: "db".into(),
        namespace: "ns".into(),
        metric: None,
        query_string: "SELECT count(*) FROM cpu".into(),
        from: None,
        to: None,
    };
    match b.query(req, false).await.unwrap() {
        shoal::node::QueryOutcome::Records(body) => {
            let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(answer["records"][0]["value"], 100, "{answer}");
        }
        shoal::node::QueryOutcome::Deleted(_) => panic!("a select answers records"),
    }
}

/// Stores points `from..from + n` (value i at hour i plus `offset_ms`, host h{i % 3}) through
/// `via`, acknowledged by every replica: one shard each, placed on either node.
async fn write_hours(via: &std::sync::Arc<shoal::node::Node>, from: i64, n: i64, offset_ms: i64) {
    let lines: String =
        (from..from + n).map(|i| format!("cpu,host=h{} value={i}i {}\n", i % 3, i * 3_600_000 + offset_ms)).collect();
    let batch = parse_line_protocol(&lines, "db", "ns", Precision::Ms, 0, 1000).unwrap();
    via.ingest(batch, Some(shoal::config::Consistency::All)).await.unwrap();
}

/// The answer to `sql` through `via`, as JSON (`{"deleted": n}` for a delete).
async fn query(via: &shoal::node::Node, sql: &str) -> serde_json::Value {
    let req = shoal::node::QueryRequest {
        db: "db".into(),
        namespace: "ns".into(),
        metric: None,
        query_string: sql.into(),
        from: None,
        to: None,
    };
    match via.query(req, false).await.unwrap() {
        shoal::node::QueryOutcome::Records(body) => serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        shoal::node::QueryOutcome::Deleted(n) => serde_json::json!({ "deleted": n }),
    }
}

/// Two nodes (RF 1) holding points 0..8 of `write_hours`, one shard each, placed on either.
async fn eight_hour_shards_on_two_nodes(
    transport: &ChannelTransport,
    dir: &std::path::Path,
) -> (std::sync::Arc<shoal::node::Node>, std::sync::Arc<shoal::node::Node>, MetricKey) {
    let (a, b) = two_nodes(transport, dir, 1).await;
    write_hours(&a, 0, 8, 0).await;
    (a, b, MetricKey::new("db", "ns", "cpu").unwrap())
}

/// A select asked again is answered from the coordinator's cache only while every shard copy
/// it read is unchanged: each coordinator serves its kept answer (a hit is counted), and a
/// write or a delete through the other node, to copies on either node, is in the next answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_answer_is_served_only_while_its_copies_are_unchanged() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let transport = ChannelTransport::with_mtu(65_507);
    let (a, b, key) = eight_hour_shards_on_two_nodes(&transport, dir.path()).await;
    let sum = "SELECT sum(value) FROM cpu";
    let held = |n: &shoal::node::Node, hour: i64| {
        n.storage.shard_if_held(&ShardId { metric: key.clone(), start: hour * 3_600_000 }).is_some()
    };
    let holders = |n: &shoal::node::Node| (0..8).filter(|&hour| held(n, hour)).count();
    assert_eq!(holders(&a) + holders(&b), 8, "each shard on one node");
    assert!(holders(&a) > 0 && holders(&b) > 0, "copies on both nodes: each coordinator asks a remote replica");
    for node in [&a, &b] {
        let hits = node.metrics.query_cache_hits.load(Relaxed);
        assert_eq!(query(node, sum).await["records"][0]["value"], 28);
        assert_eq!(query(node, sum).await["records"][0]["value"], 28);
        assert_eq!(node.metrics.query_cache_hits.load(Relaxed), hits + 1, "the second answer is the kept one");
    }
    // A point into an existing shard and one into a new shard, through the other node.
    write_hours(&b, 3, 1, 1).await;
    assert_eq!(query(&a, sum).await["records"][0]["value"], 31, "a changed copy is read again");
    write_hours(&b, 8, 1, 0).await;
    assert_eq!(query(&a, sum).await["records"][0]["value"], 39, "a new shard in range is read");
    // A point already stored (points are a set) changes nothing, and the answer stays right.
    write_hours(&b, 8, 1, 0).await;
    assert_eq!(query(&b, sum).await["records"][0]["value"], 39);
    let deleted = query(&b, "DELETE FROM cpu WHERE host = 'h0'").await;
    assert!(deleted["deleted"].as_u64().unwrap() > 0, "{deleted}");
    // h0 held 0, 3 (at two times), 6: 12 less.
    assert_eq!(query(&a, sum).await["records"][0]["value"], 27, "a delete is in the next answer");
    let hits = a.metrics.query_cache_hits.load(Relaxed);
    assert_eq!(query(&a, sum).await["records"][0]["value"], 27);
    assert_eq!(a.metrics.query_cache_hits.load(Relaxed), hits + 1);
}

/// A coordinator that holds no copy serves its kept answer without asking the replicas once
/// they leased their copies to it (no request reaches them), and every change acknowledged
/// after that, through either node, is in its next answer: the change revoked the lease first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_answer_asks_no_replica_and_every_acknowledged_change_ends_the_lease() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let transport = ChannelTransport::with_mtu(65_507);
    let (a, b, key) = eight_hour_shards_on_two_nodes(&transport, dir.path()).await;
    let sum = "SELECT sum(value) FROM cpu";
    let on_b: Vec<i64> = (0..8)
        .filter(|&h| b.storage.shard_if_held(&ShardId { metric: key.clone(), start: h * 3_600_000 }).is_some())
        .collect();
    assert!(!on_b.is_empty(), "some copies only on b: a must ask b for them");
    // Copies written just now are not leased; a moment later they are.
    let leased = async |expected: i64| {
        common::inproc::eventually("a to serve its answer without asking b", async || {
            assert_eq!(query(&a, sum).await["records"][0]["value"], expected);
            let asked = b.metrics.http_requests.load(Relaxed);
            assert_eq!(query(&a, sum).await["records"][0]["value"], expected);
            b.metrics.http_requests.load(Relaxed) == asked
        })
        .await
    };
    leased(28).await;
    // A write through b to its own copy, then through a to b's copy: each in the next answer.
    let hour = *on_b.iter().max().unwrap();
    assert!(hour > 0, "a point of value {hour} changes the sum");
    write_hours(&b, hour, 1, 1).await;
    assert_eq!(query(&a, sum).await["records"][0]["value"], 28 + hour, "b's write revoked a's lease");
    leased(28 + hour).await;
    write_hours(&a, hour, 1, 2).await;
    assert_eq!(query(&a, sum).await["records"][0]["value"], 28 + 2 * hour, "a's write through b revoked it");
    leased(28 + 2 * hour).await;
    let host = hour % 3;
    let deleted = query(&b, &format!("DELETE FROM cpu WHERE host = 'h{host}'")).await;
    assert!(deleted["deleted"].as_u64().unwrap() > 0, "{deleted}");
    let kept: i64 = (0..8).filter(|i| i % 3 != host).sum::<i64>();
    assert_eq!(query(&a, sum).await["records"][0]["value"], kept, "the delete revoked it");
    assert!(b.metrics.lease_revokes.load(Relaxed) >= 3, "b told a each time");
    assert_eq!(b.metrics.lease_waits.load(Relaxed), 0, "a was reachable: no change waited a lease out");
}
