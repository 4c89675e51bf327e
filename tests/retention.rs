//! `shoal.retention`: points older than it are refused with a 400 naming the key, and shards
//! entirely older are dropped, with their placement, while the node runs.
#![allow(clippy::disallowed_methods)] // the test's points are stamped with the real clock

mod common;
use common::{TestNode, wait_until};
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn points_past_retention_are_refused_and_expired_shards_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(&dir.path().join("r1"), &["shoal.retention=3s", "shoal.sharding.interval=1s"]);
    let write = |lines: String| n.post("/write?db=d&namespace=n&precision=ms", lines);
    let (status, v) = write(format!("m value=1i {}", now_ms() - 60_000));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("shoal.retention"), "{v}");
    let t = now_ms();
    let (status, v) = write((0..10).map(|i| format!("m value={i}i {}\n", t + i)).collect());
    assert_eq!(status, 204, "{v}");
    assert_eq!(n.query("d", "n", "SELECT count(*) FROM m")[0]["value"], 10);
    assert!(!n.get("/cluster/shards").1["shards"].as_array().unwrap().is_empty());
    // Within a few seconds the shard is past retention: gone from the catalog and the disk.
    wait_until(Duration::from_secs(30), "the expired shard to be dropped", || {
        let placed = n.get("/cluster/shards").1["shards"].as_array().unwrap().len();
        let held = n.get("/status").1["shards"].as_u64().unwrap();
        (placed == 0 && held == 0).then_some(())
    });
    let records = n.query("d", "n", "SELECT * FROM m");
    assert!(records.is_empty(), "{records:?}");
    assert!(
        !dir.path().join("r1/shards/d/n/m").read_dir().is_ok_and(|mut d| d.next().is_some()),
        "no shard folder left"
    );
}
