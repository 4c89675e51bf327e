//! Replicated writes and distributed queries with real processes: RF = 2 over three storage
//! nodes and one query-only node. Every shard gets exactly two replicas on distinct storage
//! nodes; every node answers the same; after `kill -9` of one node every acknowledged point is
//! still returned through each survivor; `consistency=all` fails with a replica down while
//! `one` succeeds; the query-only node stores nothing.

mod common;
use common::{TestNode, wait_until};
use std::collections::BTreeSet;
use std::time::Duration;

const DAY: i64 = 86_400_000;

#[test]
fn rf2_writes_reads_failover_and_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let rf = "shoal.cluster.replication-factor=2";
    let first = TestNode::start(&dir.path().join("n1"), &["shoal.node.id=n1", rf]);
    let seed = format!("shoal.cluster.seeds=[\"{}\"]", first.gossip_addr());
    let mut nodes = vec![first];
    for id in ["n2", "n3"] {
        nodes.push(TestNode::start(&dir.path().join(id), &[&format!("shoal.node.id={id}"), rf, &seed]));
    }
    let query_only =
        TestNode::start(&dir.path().join("q"), &["shoal.node.id=q", rf, &seed, "shoal.cluster.roles=[\"query\"]"]);
    for n in nodes.iter().chain([&query_only]) {
        wait_until(Duration::from_secs(30), "4 alive members with capacity", || {
            let (_, v) = n.get("/cluster/members");
            let members = v["members"].as_array().unwrap().clone();
            (members.len() == 4 && members.iter().all(|m| m["state"] == "alive" && m["capacity"].is_object()))
                .then_some(())
        });
    }

    // 1200 points over 12 daily shards, inserted through every node in turn.
    let mut sum = 0i64;
    for chunk in 0..12 {
        let lines: String = (0..100)
            .map(|i| {
                let v = chunk * 100 + i;
                sum += v;
                format!("load,host=h{} value={v}i {}\n", v % 5, chunk * DAY + i * 1000)
            })
            .collect();
        let via = if chunk % 4 == 3 { &query_only } else { &nodes[chunk as usize % 3] };
        let (status, v) = via.post("/write?db=db&namespace=ns&precision=ms", lines);
        assert_eq!(status, 204, "{v}");
    }

    // Placements made by other nodes reach n1 by anti-entropy.
    let shards = wait_until(Duration::from_secs(30), "12 placed shards in n1's catalog", || {
        let shards = nodes[0].get("/cluster/shards").1["shards"].as_array().unwrap().clone();
        (shards.len() == 12).then_some(shards)
    });
    for s in &shards {
        let ids: BTreeSet<&str> = s["replicas"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 2, "exactly RF distinct replicas: {s}");
        assert!(!ids.contains("q"), "never the query-only node: {s}");
    }
    let check = |n: &TestNode| {
        let r = n.query("db", "ns", "SELECT count(*) FROM load");
        assert_eq!(r[0]["value"], 1200, "through {}", n.addr);
        let r = n.query("db", "ns", "SELECT sum(value) FROM load");
        assert_eq!(r[0]["value"], sum);
        let r = n.query("db", "ns", "SELECT count(*) FROM load GROUP BY host");
        assert_eq!(r.len(), 5);
    };
    for n in nodes.iter().chain([&query_only]) {
        check(n);
    }
    assert!(!query_only.data_dir.join("shards").join("db").exists(), "a query-only node stores no shard");

    // DELETE reaches every replica: no node returns a deleted point.
    let body = serde_json::json!({"db": "db", "namespace": "ns", "queryString": "DELETE FROM load WHERE host = 'h0'"});
    let (status, v) = query_only.post("/query", body.to_string());
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(240)), "{v}");
    sum -= (0..1200).filter(|v| v % 5 == 0).sum::<i64>();
    for n in nodes.iter().chain([&query_only]) {
        let r = n.query("db", "ns", "SELECT count(*) FROM load");
        assert_eq!(r[0]["value"], 960, "through {}", n.addr);
    }
    let check = |n: &TestNode| {
        let r = n.query("db", "ns", "SELECT count(*) FROM load");
        assert_eq!(r[0]["value"], 960, "through {}", n.addr);
        let r = n.query("db", "ns", "SELECT sum(value) FROM load");
        assert_eq!(r[0]["value"], sum);
        let r = n.query("db", "ns", "SELECT count(*) FROM load GROUP BY host");
        assert_eq!(r.len(), 4);
    };

    // kill -9 of n3: every acknowledged point is still returned through each survivor.
    nodes[2].kill9();
    for n in [&nodes[0], &nodes[1], &query_only] {
        wait_until(Duration::from_secs(30), "n3 to be seen dead", || {
            n.members().iter().any(|m| m.0 == "n3" && m.1 == "dead").then_some(())
        });
        check(n);
    }

    // A shard with a replica on the dead node: `all` cannot be met, `one` can.
    let on_n3 = shards
        .iter()
        .find(|s| s["replicas"].as_array().unwrap().iter().any(|r| r["id"] == "n3"))
        .expect("some shard has a replica on n3");
    let ts = on_n3["start"].as_i64().unwrap() + 500;
    let line = format!("load,host=h0 value=1i {ts}");
    let (status, v) = nodes[0].post("/write?db=db&namespace=ns&precision=ms&consistency=all", line.clone());
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("1 of 2 replicas acknowledged"), "{v}");
    let (status, v) = nodes[0].post("/write?db=db&namespace=ns&precision=ms&consistency=one", line);
    assert_eq!(status, 204, "{v}");
    // The share n3 missed is kept as a durable hint on the coordinator.
    let metrics = nodes[0].get("/metrics").1.as_str().unwrap().to_string();
    assert!(metrics.contains("shoal_hints_stored_total 1\n"), "{metrics}");
    assert!(std::fs::metadata(nodes[0].data_dir.join("hints/n3.log")).unwrap().len() > 0);
    let (status, v) = nodes[0].post("/write?db=db&namespace=ns&consistency=most", "load value=1i");
    assert_eq!(status, 400, "{v}");

    // Dropping the metric removes it from every live node.
    assert_eq!(nodes[1].delete("/commands/db/ns/load").0, 200);
    assert!(
        !nodes[0].data_dir.join("shards/db/ns/load").exists() && !nodes[1].data_dir.join("shards/db/ns/load").exists()
    );
    for n in [&nodes[0], &nodes[1], &query_only] {
        wait_until(Duration::from_secs(30), "the drop to reach every catalog", || {
            let body = serde_json::json!({"db": "db", "namespace": "ns", "queryString": "SELECT * FROM load"});
            (n.post("/query", body.to_string()).0 == 404).then_some(())
        });
    }
}

/// A shard that no replica can answer for fails the query with a 503 naming it; with
/// `?partial=true` the answer is 200 with what could be read and the missing shards listed.
#[test]
fn a_query_missing_a_shard_is_refused_or_marked_partial() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestNode::start(&dir.path().join("p1"), &["shoal.node.id=p1"]);
    let seed = format!("shoal.cluster.seeds=[\"{}\"]", first.gossip_addr());
    let mut second = TestNode::start(&dir.path().join("p2"), &["shoal.node.id=p2", &seed]);
    for n in [&first, &second] {
        wait_until(Duration::from_secs(30), "2 alive members with capacity", || {
            let (_, v) = n.get("/cluster/members");
            let members = v["members"].as_array().unwrap().clone();
            (members.len() == 2 && members.iter().all(|m| m["state"] == "alive" && m["capacity"].is_object()))
                .then_some(())
        });
    }
    // 8 daily shards at RF 1: each node holds some of them (placement ranks by capacity and
    // breaks ties by a hash of shard and node, so both get shards).
    let lines: String = (0..8).map(|d| format!("m value={d}i {}\n", d * DAY)).collect();
    assert_eq!(first.post("/write?db=db&namespace=ns&precision=ms", lines).0, 204);
    let shards = wait_until(Duration::from_secs(30), "8 placed shards in p1's catalog", || {
        let shards = first.get("/cluster/shards").1["shards"].as_array().unwrap().clone();
        (shards.len() == 8).then_some(shards)
    });
    let on_p2: Vec<i64> =
        shards.iter().filter(|s| s["replicas"][0]["id"] == "p2").map(|s| s["start"].as_i64().unwrap()).collect();
    assert!(!on_p2.is_empty() && on_p2.len() < 8, "both nodes hold shards: {shards:?}");
    second.kill9();
    let body = serde_json::json!({"db": "db", "namespace": "ns", "queryString": "SELECT count(*) FROM m"}).to_string();
    let (status, v) = wait_until(Duration::from_secs(30), "p2 seen dead", || {
        let (status, v) = first.post("/query", body.clone());
        (status != 200).then_some((status, v))
    });
    let error = v["error"].as_str().unwrap();
    assert_eq!(status, 503, "{v}");
    assert!(error.contains(&format!("{} shard(s)", on_p2.len())) && error.contains("partial=true"), "{v}");
    let (status, v) = first.post("/query?partial=true", body.clone());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["records"][0]["value"], 8 - on_p2.len() as i64, "{v}");
    assert_eq!(v["partial"].as_array().unwrap().len(), on_p2.len(), "{v}");
    assert_eq!(first.post("/query?partial=maybe", body).0, 400);
}

/// A node restarted alone has not compared its catalog with another member's: it refuses
/// writes and a DELETE (its schemas and shard map may be stale: a shard placed while it was
/// down would keep its points), naming why, and takes them once it hears the cluster again.
/// (Simulator seed 444087341 answered 200 and the points came back.)
#[test]
fn a_node_restarted_alone_refuses_a_delete_until_it_hears_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let rf = "shoal.cluster.replication-factor=2";
    let mut a = TestNode::start(&dir.path().join("a"), &["shoal.node.id=a", rf]);
    let seed_a = format!("shoal.cluster.seeds=[\"{}\"]", a.gossip_addr());
    let mut b = TestNode::start(&dir.path().join("b"), &["shoal.node.id=b", rf, &seed_a]);
    wait_until(Duration::from_secs(30), "2 alive members", || {
        let m = a.members();
        (m.len() == 2 && m.iter().all(|(_, s, _)| s == "alive")).then_some(())
    });
    let lines: String = (0..50).map(|i| format!("load,host=h{} value={i}i {}\n", i % 2, i * 1000)).collect();
    let (status, v) = a.post("/write?db=db&namespace=ns&precision=ms", lines);
    assert_eq!(status, 204, "{v}");

    b.stop();
    a.stop();
    a.start_again();
    let delete =
        serde_json::json!({"db": "db", "namespace": "ns", "queryString": "DELETE FROM load WHERE host = 'h0'"})
            .to_string();
    let why = "has not compared its catalog with another member's since it started";
    // (Its first readiness check may still be "starting".)
    wait_until(Duration::from_secs(10), "a write refused for the catalog", || {
        let (status, v) = a.post("/write?db=db&namespace=ns&precision=ms", "load,host=h9 value=1i 100000\n");
        assert_eq!(status, 503, "{v}");
        v.to_string().contains(why).then_some(())
    });
    let (status, v) = a.post("/query", delete.clone());
    assert_eq!(status, 503, "{v}");
    assert!(v.to_string().contains(why), "{v}");
    let (status, v) = a.get("/readyz");
    assert_eq!(status, 503, "not ready either: {v}");
    // Nor does it answer a query from its catalog alone, unless a partial answer is accepted.
    let count = serde_json::json!({"db": "db", "namespace": "ns", "queryString": "SELECT count(*) FROM load"});
    let (status, v) = a.post("/query", count.to_string());
    assert_eq!(status, 503, "{v}");
    assert!(v.to_string().contains(why), "{v}");
    let (status, v) = a.post("/query?partial=true", count.to_string());
    assert_eq!((status, &v["records"][0]["value"]), (200, &serde_json::json!(50)), "{v}");
    assert!(v.to_string().contains("catalog is not confirmed"), "says what may be missing: {v}");

    // b comes back, seeded with a's new gossip address: the DELETE goes through.
    b.sets.retain(|s| !s.starts_with("shoal.cluster.seeds="));
    b.sets.push(format!("shoal.cluster.seeds=[\"{}\"]", a.gossip_addr()));
    b.start_again();
    let v = wait_until(Duration::from_secs(60), "the DELETE accepted once a hears b", || {
        let (status, v) = a.post("/query", delete.clone());
        (status == 200).then_some(v)
    });
    assert_eq!(v["deleted"].as_u64(), Some(25), "{v}");
    for n in [&a, &b] {
        let r = n.query("db", "ns", "SELECT count(*) FROM load");
        assert_eq!(r[0]["value"], 25, "through {}", n.addr);
    }
}
