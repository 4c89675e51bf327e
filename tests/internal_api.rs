//! The replica side of the internal API, called through the peer client as a coordinator will:
//! a replica write is stored and fsynced, a partial result comes back as postcard and merges;
//! bad replica writes are refused with 400, a query-only node refuses to store.

mod common;
use chitchat::transport::ChannelTransport;
use common::inproc::start;
use shoal::ingest::{Precision, parse_line_protocol};
use shoal::model::{MetricKey, ShardId};
use shoal::peer::{HttpPeers, PartialRequest, PeerClient, PeerError, ReplicaWrite};
use shoal::query::exec::{Partial, finish};
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
    let req = PartialRequest { shard: shard.clone(), plan: plan.clone(), from: i64::MIN, to: i64::MAX, epoch: 0 };
    let bytes = peers.post(&addr, "/internal/v1/partial", postcard::to_stdvec(&req).unwrap()).await.unwrap();
    let partial: Partial = postcard::from_bytes::<Option<Partial>>(&bytes).unwrap().expect("the replica holds it");
    let records = finish(&plan, partial);
    let sums: Vec<(String, f64)> =
        records.iter().map(|r| (format!("{:?}", r.tags["region"]), r.value.as_f64())).collect();
    assert_eq!(sums, [("Str(\"eu\")".to_string(), 4.0), ("Str(\"us\")".to_string(), 5.0)]);

    // A shard this node does not hold answers "none held", not an error.
    let other = PartialRequest { shard: ShardId { metric: key.clone(), start: 3_600_000 }, ..req.clone() };
    let bytes = peers.post(&addr, "/internal/v1/partial", postcard::to_stdvec(&other).unwrap()).await.unwrap();
    assert!(postcard::from_bytes::<Option<Partial>>(&bytes).unwrap().is_none());

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

/// A replica that is placed but has lost its copy (a new disk, say) is passed over by the read
/// coordinator, even when it is the coordinator itself: the query answers from the replica
/// that holds the points, not with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_its_copy_is_passed_over_by_reads() {
    let dir = tempfile::tempdir().unwrap();
    let transport = ChannelTransport::with_mtu(65_507);
    let sets = ["shoal.sharding.interval=1h", "shoal.cluster.replication-factor=2", "shoal.repair.interval=1h"];
    let a = start(&transport, dir.path(), 1, &sets).await;
    let b = start(&transport, dir.path(), 2, &sets).await;
    common::inproc::eventually("both nodes to see each other", async || {
        a.members().await.iter().filter(|m| m.is_live()).count() == 2
            && b.members().await.iter().filter(|m| m.is_live()).count() == 2
    })
    .await;
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
        shoal::node::QueryOutcome::Records { records: r, .. } => assert_eq!(r[0].value.as_f64(), 100.0, "{r:?}"),
        shoal::node::QueryOutcome::Deleted(_) => panic!("a select answers records"),
    }
}
