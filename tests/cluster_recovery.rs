//! Recovery with real processes on loopback (the network-namespace suite in `netns.rs` adds
//! partitions and packet loss): a replica that was down catches up by hints and repair until
//! every replica's digest is equal; a node dead past `replica-replace-after` is replaced and,
//! when it comes back, drops what it no longer owns; `shoal leave` hands shards off first.
#![allow(clippy::disallowed_methods)]

mod common;
use common::{BIN, TestNode, wait_until};
use std::collections::BTreeSet;
use std::time::Duration;

const DAY: i64 = 86_400_000;
const SETTINGS: &[&str] = &[
    "shoal.cluster.replication-factor=2",
    "shoal.write.consistency=one",
    "shoal.repair.interval=1s",
    "shoal.hints.replay-interval=200ms",
    "shoal.cluster.replica-replace-after=2s",
];

fn cluster(dir: &std::path::Path, ids: &[&str]) -> Vec<TestNode> {
    cluster_with(dir, ids, SETTINGS)
}

fn cluster_with(dir: &std::path::Path, ids: &[&str], settings: &[&str]) -> Vec<TestNode> {
    common::cluster(dir, ids, settings)
}

/// Writes points `ids` (value = id, spread over 6 daily shards) through `via`; all must be
/// acknowledged.
fn write(via: &TestNode, ids: std::ops::Range<i64>) {
    let lines: String = ids.map(|i| format!("set value={i}i {}\n", (i % 6) * DAY + i)).collect();
    let (status, v) = via.post("/write?db=j&namespace=ns&precision=ms", lines);
    assert_eq!(status, 204, "{v}");
}

/// Every shard of the metric has exactly `rf` replicas among `expected`, all reporting the
/// same non-null digest; returns the shards' replica sets.
fn converged(n: &TestNode, rf: usize, expected: &BTreeSet<&str>) -> Option<Vec<BTreeSet<String>>> {
    let (status, v) = n.get("/cluster/shards?verify=true");
    assert_eq!(status, 200, "{v}");
    let shards = v["shards"].as_array()?.clone();
    if shards.len() != 6 {
        return None;
    }
    let mut sets = Vec::new();
    for s in shards {
        let replicas = s["replicas"].as_array()?;
        let ids: BTreeSet<String> = replicas.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
        let digests: BTreeSet<String> =
            replicas.iter().filter_map(|r| r["digest"].as_str().map(String::from)).collect();
        let all_answered = replicas.iter().all(|r| r["digest"].is_string() && r["state"] == "alive");
        if ids.len() != rf || !ids.iter().all(|i| expected.contains(i.as_str())) || !all_answered || digests.len() != 1
        {
            return None;
        }
        sets.push(ids);
    }
    Some(sets)
}

fn values(n: &TestNode) -> Vec<i64> {
    values_of(n, "set")
}

fn values_of(n: &TestNode, metric: &str) -> Vec<i64> {
    let sql = format!("SELECT * FROM {metric} LIMIT 1000000");
    let mut v: Vec<i64> = n.query("j", "ns", &sql).iter().map(|r| r["value"].as_i64().unwrap()).collect();
    v.sort_unstable();
    v
}

fn metric(n: &TestNode, name: &str) -> u64 {
    let (_, text) = n.get("/metrics");
    let text = text.as_str().unwrap().to_string();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().parse().unwrap()
}

#[test]
fn a_restarted_replica_catches_up_by_hints_and_repair() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["a", "b", "c"]);
    write(&nodes[0], 0..600);
    nodes[2].kill9();
    // Writes while c is down succeed at consistency one and leave hints for c.
    write(&nodes[0], 600..1200);
    write(&nodes[1], 1200..1800);
    let hints: u64 = nodes[..2].iter().map(|n| metric(n, "shoal_hints_stored_total")).sum();
    assert!(hints > 0, "writes that missed c left hints");
    nodes[2].start_again();
    let all: BTreeSet<&str> = ["a", "b", "c"].into();
    wait_until(Duration::from_secs(60), "equal digests on every replica", || converged(&nodes[0], 2, &all));
    let replayed: u64 = nodes[..2].iter().map(|n| metric(n, "shoal_hints_replayed_total")).sum();
    assert!(replayed > 0, "the hints were replayed");
    // Repair runs with c once it is back and every repair interval (the hints may have done
    // all the work already: repair then compares and copies nothing).
    wait_until(Duration::from_secs(30), "repair to compare blocks", || {
        let compared: u64 = nodes.iter().map(|n| metric(n, "shoal_repair_blocks_compared_total")).sum();
        (compared > 0).then_some(())
    });
    let expected: Vec<i64> = (0..1800).collect();
    for n in &nodes {
        assert_eq!(values(n), expected, "every acknowledged point, once, through every node");
    }
}

#[test]
fn a_lost_node_is_replaced_and_drops_its_shards_when_it_returns_and_leave_hands_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["a", "b", "c", "d"]);
    write(&nodes[0], 0..1200);
    // d is lost: after replica-replace-after its shards get a new replica from the survivors.
    nodes[3].kill9();
    write(&nodes[1], 1200..1800);
    let abc: BTreeSet<&str> = ["a", "b", "c"].into();
    let placed = wait_until(Duration::from_secs(60), "RF restored without d", || converged(&nodes[0], 2, &abc));
    assert!(placed.iter().all(|s| !s.contains("d")));
    let rereplicated: u64 = nodes[..3].iter().map(|n| metric(n, "shoal_shards_rereplicated_total")).sum();
    let expected: Vec<i64> = (0..1800).collect();
    for n in &nodes[..3] {
        assert_eq!(values(n), expected);
    }
    // d returns: it owns nothing any more and drops its shards after handing them over.
    nodes[3].start_again();
    assert!(nodes[3].get("/status").1["shards"].as_u64().unwrap() > 0, "d held replicas before it was lost");
    wait_until(Duration::from_secs(60), "d to drop the shards it no longer owns", || {
        (nodes[3].get("/status").1["shards"] == 0).then_some(())
    });
    assert_eq!(values(&nodes[3]), expected, "d still answers queries from the owners");
    // c leaves gracefully: its shards move first, then it exits and is reported left.
    let out = std::process::Command::new(BIN).args(["leave", "--node", &nodes[2].url("")]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("shards moved"), "progress is reported: {stdout}");
    nodes[2].wait_exit();
    wait_until(Duration::from_secs(30), "c reported left", || {
        nodes[0].members().iter().any(|(id, state, _)| id == "c" && state == "left").then_some(())
    });
    let abd: BTreeSet<&str> = ["a", "b", "d"].into();
    wait_until(Duration::from_secs(60), "RF restored without c", || converged(&nodes[0], 2, &abd));
    for n in [&nodes[0], &nodes[1], &nodes[3]] {
        assert_eq!(values(n), expected);
    }
    assert!(rereplicated > 0, "the survivors counted re-replicated shards");
}

/// A restart (SIGTERM, then start again) is not a decommission: a rolling restart of a 3-node
/// RF 3 cluster keeps all 3 replicas of every shard. A shard left below RF (here by a leave
/// that had no spare node to hand to) is topped back up once a node can take it.
#[test]
fn a_rolling_restart_keeps_every_replica_and_a_shard_below_rf_is_topped_up() {
    let dir = tempfile::tempdir().unwrap();
    let settings = [
        "shoal.cluster.replication-factor=3",
        "shoal.write.consistency=one",
        "shoal.repair.interval=1s",
        "shoal.hints.replay-interval=200ms",
    ];
    let mut nodes = cluster_with(dir.path(), &["a", "b", "c"], &settings);
    write(&nodes[0], 0..300);
    let abc: BTreeSet<&str> = ["a", "b", "c"].into();
    wait_until(Duration::from_secs(60), "3 equal replicas of every shard", || converged(&nodes[0], 3, &abc));
    for i in 0..3 {
        // Ports are chosen anew at each start (port 0): the restarted node seeds from a peer's
        // current gossip address.
        let seed = format!("shoal.cluster.seeds=[\"{}\"]", nodes[(i + 1) % 3].gossip_addr());
        nodes[i].sets.retain(|s| !s.starts_with("shoal.cluster.seeds="));
        nodes[i].sets.push(seed);
        nodes[i].stop();
        let via = (i + 1) % 3;
        // While it is down, it is still a replica of every shard: a stop is not a leave.
        let (_, v) = nodes[via].get("/cluster/shards");
        for s in v["shards"].as_array().unwrap() {
            let ids: BTreeSet<&str> =
                s["replicas"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
            assert_eq!(ids, abc, "node {i} stopped and kept its replicas: {s}");
        }
        nodes[i].start_again();
        write(&nodes[via], 300 + 100 * i as i64..400 + 100 * i as i64);
        let sets =
            wait_until(Duration::from_secs(60), "3 equal replicas after a restart", || converged(&nodes[via], 3, &abc));
        assert!(sets.iter().all(|s| s.len() == 3), "a restart kept every replica: {sets:?}");
    }
    let expected: Vec<i64> = (0..600).collect();
    for n in &nodes {
        assert_eq!(values(n), expected, "every acknowledged point, once, through every node");
    }
    // c leaves with no spare node: its shards stay on a and b only, below RF 3.
    let out = std::process::Command::new(BIN).args(["leave", "--node", &nodes[2].url("")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    nodes[2].wait_exit();
    let ab: BTreeSet<&str> = ["a", "b"].into();
    wait_until(Duration::from_secs(60), "2 replicas after c left", || converged(&nodes[0], 2, &ab));
    // d joins: every shard is topped back up to 3 replicas.
    let seed = format!("shoal.cluster.seeds=[\"{}\"]", nodes[0].gossip_addr());
    let mut sets: Vec<&str> = settings.to_vec();
    sets.extend(["shoal.node.id=d", seed.as_str()]);
    let d = TestNode::start(&dir.path().join("d"), &sets);
    let abd: BTreeSet<&str> = ["a", "b", "d"].into();
    wait_until(Duration::from_secs(60), "every shard topped up to 3 replicas", || converged(&nodes[0], 3, &abd));
    assert_eq!(values(&d), expected);
}

/// Nothing deleted or dropped comes back: a node that was away (and replaced) during a DELETE
/// and a DROP returns with its old copies, and neither the deleted points nor the dropped
/// metric's old points reappear, also after the metric was created again; points written
/// again after the DELETE stay.
#[test]
fn deleted_and_dropped_points_stay_gone_when_a_replaced_node_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["a", "b", "c", "d"]);
    write(&nodes[0], 0..1200);
    let old: String = (0..600).map(|i| format!("old value={i}i {}\n", (i % 6) * DAY + i)).collect();
    assert_eq!(nodes[0].post("/write?db=j&namespace=ns&precision=ms", old).0, 204);
    let held = nodes[3].get("/status").1["shards"].as_u64().unwrap();
    assert!(held > 0, "d holds replicas before it goes away");
    nodes[3].kill9();
    // A DELETE needs every replica: it goes through once d's shards have been replaced.
    let delete = serde_json::json!({"db": "j", "namespace": "ns", "queryString": "DELETE FROM set WHERE value < 300"});
    wait_until(Duration::from_secs(60), "the delete to reach every replica", || {
        (nodes[1].post("/query", delete.to_string()).0 == 200).then_some(())
    });
    assert_eq!(nodes[1].delete("/commands/j/ns/old").0, 200);
    let recreated: String = (0..60).map(|i| format!("old value={}i {}\n", 10_000 + i, (i % 6) * DAY + i)).collect();
    assert_eq!(nodes[2].post("/write?db=j&namespace=ns&precision=ms", recreated).0, 204);
    // The same points as some deleted ones, written again after the DELETE: they stay, while
    // d's copies of them from before the DELETE must not bring back the others.
    write(&nodes[1], 0..50);
    nodes[3].start_again();
    wait_until(Duration::from_secs(60), "d to drop the shards it no longer owns", || {
        (nodes[3].get("/status").1["shards"] == 0).then_some(())
    });
    let kept: Vec<i64> = (0..50).chain(300..1200).collect();
    let recreated: Vec<i64> = (10_000..10_060).collect();
    for n in &nodes {
        assert_eq!(values(n), kept, "no deleted point came back, through {}", n.addr);
        assert_eq!(values_of(n, "old"), recreated, "no point of the dropped metric came back, through {}", n.addr);
    }
}
