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
    let peers = HttpPeers::new("shoal").unwrap();
    let addr = storage.http_addr.to_string();

    let lines = "cpu,region=eu value=1i 1000\ncpu,region=us value=5i 2000\ncpu,region=eu value=3i 3000";
    let batch = parse_line_protocol(lines, "db", "ns", Precision::Ms, 0, 100).unwrap();
    let (key, rows) = batch.metrics.into_iter().next().unwrap();
    let shard = ShardId { metric: key.clone(), start: 0 };
    let write = ReplicaWrite { shard: shard.clone(), batch: rows.clone() };
    peers.post(&addr, "/internal/v1/write", postcard::to_stdvec(&write).unwrap()).await.unwrap();
    assert_eq!(storage.storage.shard_if_held(&shard).unwrap().points(), 3, "stored on the replica");

    let plan = select("SELECT sum(value) FROM cpu GROUP BY region");
    let req = PartialRequest { shard: shard.clone(), plan: plan.clone(), from: i64::MIN, to: i64::MAX };
    let bytes = peers.post(&addr, "/internal/v1/partial", postcard::to_stdvec(&req).unwrap()).await.unwrap();
    let partial: Partial = postcard::from_bytes(&bytes).unwrap();
    let records = finish(&plan, partial);
    let sums: Vec<(String, f64)> =
        records.iter().map(|r| (format!("{:?}", r.tags["region"]), r.value.as_f64())).collect();
    assert_eq!(sums, [("Str(\"eu\")".to_string(), 4.0), ("Str(\"us\")".to_string(), 5.0)]);

    // A shard this node does not hold answers an empty partial, not an error.
    let other = PartialRequest { shard: ShardId { metric: key.clone(), start: 3_600_000 }, ..req.clone() };
    let bytes = peers.post(&addr, "/internal/v1/partial", postcard::to_stdvec(&other).unwrap()).await.unwrap();
    assert_eq!(postcard::from_bytes::<Partial>(&bytes).unwrap().rows(), 0);

    // Points outside the named shard are refused.
    let wrong = ReplicaWrite {
        shard: ShardId { metric: MetricKey::new("db", "ns", "cpu").unwrap(), start: 3_600_000 },
        batch: rows.clone(),
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
    // Garbage is a 400, not a crash.
    match peers.post(&addr, "/internal/v1/partial", vec![0xff; 10]).await {
        Err(PeerError::Refused { status: 400, .. }) => {}
        other => panic!("{other:?}"),
    }
}
