//! Differential test: the same data set (several metrics, tags, dimensions, out-of-order
//! timestamps over many shards) loaded into a single node and into a 3-node cluster with RF 2,
//! inserts spread over the three; a fixed list of queries covering every construct must return
//! identical records from the single node and from each cluster node.

mod common;
use common::{TestNode, wait_until};
use serde_json::{Value, json};
use std::time::Duration;

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_700_000_000_000;

/// Bodies for /data: (metric, bits) in 12 batches.
fn dataset() -> Vec<(String, Vec<Value>)> {
    let mut seed: u64 = 7;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    let regions = ["eu", "us", "ap", "sa"];
    let mut out = Vec::new();
    for batch in 0..12 {
        let metric = ["cpu", "mem", "disk"][batch % 3].to_string();
        let bits = (0..150)
            .map(|i| {
                let ts = T0 + (next() % (40 * HOUR as u64)) as i64 / 1000 * 1000;
                // Decimals are multiples of 1/8: their sums are exact in any order of addition.
                let value = if metric == "mem" {
                    json!((next() % 1000) as f64 / 8.0)
                } else {
                    json!((next() % 400) as i64 - 100)
                };
                let mut bit =
                    json!({"timestamp": ts, "value": value, "tags": {"region": regions[(next() % 4) as usize]}});
                if i % 3 != 0 {
                    bit["dimensions"] = json!({"host": format!("h{}", next() % 9), "core": (next() % 4) as i64});
                }
                bit
            })
            .collect();
        out.push((metric, bits));
    }
    out
}

fn queries() -> Vec<(&'static str, String)> {
    let mid = T0 + 20 * HOUR;
    let mut q: Vec<(&str, String)> = Vec::new();
    for metric in ["cpu", "mem"] {
        for agg in ["count(*)", "sum(value)", "min(value)", "max(value)", "avg(value)", "first(value)", "last(value)"] {
            q.push((metric, format!("SELECT {agg} FROM {metric}")));
            q.push((metric, format!("SELECT {agg} FROM {metric} GROUP BY region")));
        }
        q.push((metric, format!("SELECT sum(value) FROM {metric} GROUP BY INTERVAL 1h")));
        q.push((metric, format!("SELECT avg(value) FROM {metric} GROUP BY region, INTERVAL 6h")));
        q.push((metric, format!("SELECT count(distinct host) FROM {metric} GROUP BY region")));
        q.push((metric, format!("SELECT * FROM {metric} WHERE timestamp >= {mid} ORDER BY value DESC LIMIT 15")));
    }
    q.push(("disk", "SELECT count(*) FROM disk WHERE region IN ('eu', 'us') AND host IS NOT NULL".into()));
    q.push(("disk", "SELECT avg(value) FROM disk WHERE host LIKE 'h1%' OR value < 0 GROUP BY region".into()));
    q.push(("disk", "SELECT max(value) FROM disk WHERE NOT region = 'ap' GROUP BY INTERVAL 6h".into()));
    q.push(("disk", "SELECT * FROM disk WHERE core = 2 ORDER BY timestamp LIMIT 25".into()));
    q.push(("disk", "SELECT region, value FROM disk WHERE value BETWEEN 10 AND 20".into()));
    q.push(("disk", "SELECT * FROM disk".into()));
    q.push(("disk", "SELECT count(distinct core) FROM disk".into()));
    q.push(("disk", "SELECT max(value) FROM disk GROUP BY INTERVAL 12h, region".into()));
    q.push((
        "disk",
        format!("SELECT sum(value) FROM disk WHERE timestamp < {mid} GROUP BY region ORDER BY value LIMIT 2"),
    ));
    q
}

fn answer(n: &TestNode, sql: &str) -> Vec<Value> {
    n.query("db", "ns", sql)
}

#[test]
fn cluster_answers_equal_single_node() {
    let dir = tempfile::tempdir().unwrap();
    let shard = "shoal.sharding.interval=6h";
    let single = TestNode::start(&dir.path().join("single"), &["shoal.node.id=single", shard]);
    let rf = "shoal.cluster.replication-factor=2";
    let first = TestNode::start(&dir.path().join("c1"), &["shoal.node.id=c1", shard, rf]);
    let seed = format!("shoal.cluster.seeds=[\"{}\"]", first.gossip_addr());
    let mut cluster = vec![first];
    for id in ["c2", "c3"] {
        cluster.push(TestNode::start(&dir.path().join(id), &[&format!("shoal.node.id={id}"), shard, rf, &seed]));
    }
    for n in &cluster {
        wait_until(Duration::from_secs(30), "3 alive members", || {
            (n.members().iter().filter(|m| m.1 == "alive").count() == 3).then_some(())
        });
    }
    for (i, (metric, bits)) in dataset().into_iter().enumerate() {
        let body = json!({"db": "db", "namespace": "ns", "metric": metric, "bits": bits}).to_string();
        assert_eq!(single.post("/data", body.clone()).0, 200);
        let (status, v) = cluster[i % 3].post("/data", body);
        assert_eq!(status, 200, "{v}");
    }
    // Placements made elsewhere reach every catalog by anti-entropy before we compare.
    let placed = single.get("/cluster/shards").1["shards"].as_array().unwrap().len();
    for n in &cluster {
        wait_until(Duration::from_secs(30), "every placement in every catalog", || {
            (n.get("/cluster/shards").1["shards"].as_array().unwrap().len() == placed).then_some(())
        });
    }
    let queries = queries();
    assert!(queries.len() >= 40, "{} queries", queries.len());
    for (_, sql) in &queries {
        let want = answer(&single, sql);
        assert!(!want.is_empty(), "{sql} should match something");
        for n in &cluster {
            assert_eq!(answer(n, sql), want, "{sql} through {}", n.addr);
        }
    }
}
