//! The catalog across real processes: a schema created through one node is described by the
//! others, a conflicting type is rejected whichever node receives it, a restarted node keeps
//! its catalog, an empty node receives the whole catalog, and the internal API refuses other
//! cluster ids. Prints the time for a schema change to reach all five nodes and the catalog's
//! bytes per metric.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use common::{TestNode, wait_until};
use std::time::{Duration, Instant};

fn node(dir: &std::path::Path, id: &str, seeds: &[String]) -> TestNode {
    let seeds =
        format!("shoal.cluster.seeds=[{}]", seeds.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(","));
    TestNode::start(&dir.join(id), &[&format!("shoal.node.id={id}"), &seeds])
}

fn describe(n: &TestNode, metric: &str) -> Option<serde_json::Value> {
    let (status, v) = n.get(&format!("/commands/db/ns/{metric}"));
    (status == 200).then_some(v)
}

#[test]
fn catalog_spreads_persists_and_fills_empty_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = vec![node(dir.path(), "c1", &[])];
    let seed = nodes[0].gossip_addr();
    for i in 2..=4 {
        nodes.push(node(dir.path(), &format!("c{i}"), std::slice::from_ref(&seed)));
    }
    for n in &nodes {
        wait_until(Duration::from_secs(30), "4 members", || (n.members().len() == 4).then_some(()));
    }

    let body = r#"{"db":"db","namespace":"ns","metric":"cpu","bit":{"timestamp":1,"value":1,"tags":{"region":"eu"},"dimensions":{"host":"a"}}}"#;
    assert_eq!(nodes[0].post("/data", body).0, 200);
    let want = describe(&nodes[0], "cpu").unwrap();
    for n in &nodes[1..] {
        let got = wait_until(Duration::from_secs(30), "the schema to reach every node", || describe(n, "cpu"));
        assert_eq!(got, want);
    }

    // A conflicting type is a 400 naming the field, whichever node receives it.
    let conflict = r#"{"db":"db","namespace":"ns","metric":"cpu","bit":{"timestamp":2,"value":1,"tags":{"region":7}}}"#;
    let (status, v) = nodes[2].post("/data", conflict);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("region"), "{v}");

    // A restarted node keeps its catalog even with nobody to sync from.
    for i in [0, 2, 3] {
        nodes[i].kill9();
    }
    nodes[1].restart();
    assert_eq!(describe(&nodes[1], "cpu"), Some(want.clone()), "the catalog must come back from disk");
    // Ports are picked anew on each start (port 0), so the others now seed from c2.
    let seed = nodes[1].gossip_addr();
    for i in [0, 2, 3] {
        nodes[i].sets.push(format!("shoal.cluster.seeds=[\"{seed}\"]"));
        nodes[i].start_again();
    }

    // An empty node gets the whole catalog; then a new schema reaches all five nodes.
    nodes.push(node(dir.path(), "c5", std::slice::from_ref(&seed)));
    wait_until(Duration::from_secs(30), "the empty node to receive the catalog", || describe(&nodes[4], "cpu"));
    for n in &nodes {
        wait_until(Duration::from_secs(30), "5 alive members", || {
            (n.members().iter().filter(|m| m.1 == "alive").count() == 5).then_some(())
        });
    }
    let started = Instant::now();
    let body =
        r#"{"db":"db","namespace":"ns","metric":"mem","bit":{"timestamp":1,"value":1.5,"tags":{"region":"eu"}}}"#;
    assert_eq!(nodes[3].post("/data", body).0, 200);
    for n in &nodes {
        wait_until(Duration::from_secs(30), "the new schema on every node", || describe(n, "mem"));
    }
    println!("schema change reached all 5 nodes in {} ms", started.elapsed().as_millis());

    // Catalog size: 100 more metrics with 3 fields each.
    let lines: String = (0..100).map(|i| format!("m{i},region=eu,host=h value=1i,load=2i 1000\n")).collect();
    assert_eq!(nodes[0].post("/write?db=db&namespace=ns&precision=ms", lines).0, 204);
    let size = std::fs::metadata(nodes[0].data_dir.join("catalog.log")).unwrap().len();
    let metrics = nodes[0].get("/commands/db/ns/metrics").1["metrics"].as_array().unwrap().len();
    println!("catalog: {size} bytes for {metrics} metrics = {} bytes per metric", size / metrics as u64);

    // The internal API refuses other clusters.
    let resp = reqwest::blocking::Client::new()
        .post(nodes[0].url("/internal/v1/catalog/diff"))
        .header("x-shoal-cluster", "someone-else")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

#[test]
fn placement_uses_storage_nodes_only_and_refuses_too_few() {
    let dir = tempfile::tempdir().unwrap();
    let rf2 = "shoal.cluster.replication-factor=2";
    let s1 = TestNode::start(&dir.path().join("s1"), &["shoal.node.id=s1", rf2]);
    let seed = format!("shoal.cluster.seeds=[\"{}\"]", s1.gossip_addr());
    let s2 = TestNode::start(&dir.path().join("s2"), &["shoal.node.id=s2", rf2, &seed]);
    let q = TestNode::start(&dir.path().join("q"), &["shoal.node.id=q", rf2, &seed, "shoal.cluster.roles=[\"query\"]"]);
    for n in [&s1, &s2, &q] {
        wait_until(Duration::from_secs(30), "3 members with capacity", || {
            let (_, v) = n.get("/cluster/members");
            let members = v["members"].as_array().unwrap().clone();
            (members.len() == 3 && members.iter().all(|m| m["capacity"]["mix"].is_number() && m["state"] != "dead"))
                .then_some(())
        });
    }
    // Ten shards, written through the query-only node.
    let lines: String = (0..10).map(|d| format!("load value={d}i {}\n", d * 86_400_000)).collect();
    let (status, v) = q.post("/write?db=db&namespace=ns&precision=ms", lines);
    assert_eq!(status, 204, "{v}");
    for n in [&s1, &s2, &q] {
        let shards = wait_until(Duration::from_secs(30), "placements on every node", || {
            let shards = n.get("/cluster/shards").1["shards"].as_array().unwrap().clone();
            (shards.len() == 10).then_some(shards)
        });
        for s in shards {
            let ids: Vec<&str> = s["replicas"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
            assert_eq!(ids, ["s1", "s2"], "exactly RF replicas, never the query-only node: {s}");
            assert_eq!(s["end"].as_i64().unwrap() - s["start"].as_i64().unwrap(), 86_400_000);
        }
    }
    // RF 3 with two storage nodes: a new shard cannot be placed, and the answer says why.
    let rf3 = "shoal.cluster.replication-factor=3";
    let s3 =
        TestNode::start(&dir.path().join("s3"), &["shoal.node.id=s3", rf3, &seed, "shoal.cluster.roles=[\"query\"]"]);
    wait_until(Duration::from_secs(30), "s3 to see 4 members", || (s3.members().len() == 4).then_some(()));
    let (status, v) = s3.post("/write?db=db&namespace=ns&precision=ms", "load value=1i 999999999999");
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("replication factor 3 needs 3 live storage nodes but only 2"), "{v}");
}
