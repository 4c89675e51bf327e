//! Membership with real processes on loopback: gossip convergence, failure detection, restarts
//! as new generations, graceful leave, cluster-id isolation and the bootstrap-expect gate.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use common::{TestNode, wait_until};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(30);

fn node(dir: &std::path::Path, id: &str, seeds: &[String], extra: &[&str]) -> TestNode {
    let seeds =
        format!("shoal.cluster.seeds=[{}]", seeds.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(","));
    let id = format!("shoal.node.id={id}");
    let mut sets = vec![id.as_str(), seeds.as_str()];
    sets.extend_from_slice(extra);
    TestNode::start(&dir.join(id.trim_start_matches("shoal.node.id=")), &sets)
}

/// Waits until `observer` lists exactly `want` (id → state), ignoring generations.
fn wait_view(observer: &TestNode, want: &[(&str, &str)], what: &str) -> Vec<(String, String, u64)> {
    wait_until(CONVERGE, what, || {
        let members = observer.members();
        let got: Vec<(&str, &str)> = members.iter().map(|(id, st, _)| (id.as_str(), st.as_str())).collect();
        (got == want).then(|| members.clone())
    })
}

#[test]
fn five_nodes_converge_detect_failure_restart_and_leave() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = vec![node(dir.path(), "n1", &[], &[])];
    let seed = nodes[0].gossip_addr();
    for i in 2..=5 {
        nodes.push(node(dir.path(), &format!("n{i}"), std::slice::from_ref(&seed), &[]));
    }
    let all_alive = [("n1", "alive"), ("n2", "alive"), ("n3", "alive"), ("n4", "alive"), ("n5", "alive")];
    for n in &nodes {
        wait_view(n, &all_alive, "every node to list 5 alive members");
    }
    let old_generation = nodes[4].members().iter().find(|m| m.0 == "n5").unwrap().2;

    // kill -9: every survivor sees it dead.
    nodes[4].kill9();
    let n5_dead = [("n1", "alive"), ("n2", "alive"), ("n3", "alive"), ("n4", "alive"), ("n5", "dead")];
    for n in &nodes[..4] {
        wait_view(n, &n5_dead, "survivors to see n5 dead");
    }

    // Restart with the same id and data: a new generation, listed once.
    nodes[4].start_again();
    for n in &nodes {
        let members = wait_view(n, &all_alive, "the restarted node to be alive again everywhere");
        let n5 = members.iter().find(|m| m.0 == "n5").unwrap();
        assert!(n5.2 > old_generation, "restart must be a new generation: {} vs {old_generation}", n5.2);
    }

    // Graceful leave: `left`, not `dead`, everywhere.
    let out = std::process::Command::new(common::BIN).args(["leave", "--node", &nodes[3].url("")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    nodes[3].wait_exit();
    let n4_left = [("n1", "alive"), ("n2", "alive"), ("n3", "alive"), ("n4", "left"), ("n5", "alive")];
    for i in [0, 1, 2, 4] {
        wait_view(&nodes[i], &n4_left, "everyone to see n4 as left");
    }
    // Started again on its data dir (as a StatefulSet restarts a container until it is scaled
    // down), a node that left refuses to rejoin with copies no placement lists.
    let again = std::process::Command::new(common::BIN)
        .arg("start")
        .args(nodes[3].sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]))
        .args(["--set", &format!("shoal.data-dir={}", nodes[3].data_dir.display()), "--set", "shoal.http.port=0"])
        .args(["--set", "shoal.gossip.port=0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && stderr.contains("left the cluster"), "{stderr}");

    // The operator's table shows the same.
    let out = std::process::Command::new(common::BIN).args(["members", "--node", &nodes[0].url("")]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(table.lines().any(|l| l.contains("n4") && l.contains("left")), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains(" alive ")).count(), 4, "{table}");

    // Status of another member through n1.
    let (status, v) = nodes[0].get("/status?node=n2");
    assert_eq!((status, v["node_id"].as_str()), (200, Some("n2")), "{v}");
}

#[test]
fn bootstrap_expect_gates_writes_and_other_clusters_stay_out() {
    let dir = tempfile::tempdir().unwrap();
    let expect = ["shoal.cluster.bootstrap-expect=3", "shoal.cluster.id=blue"];
    let n1 = node(dir.path(), "b1", &[], &expect);
    let seed = n1.gossip_addr();
    let write = |n: &TestNode| n.post("/write?db=d&namespace=n", "m value=1i");
    let (status, v) = write(&n1);
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("2 missing"), "{v}");
    assert_eq!(n1.get("/readyz").0, 503);

    // A node of another cluster pointed at our seed.
    let foreign = node(dir.path(), "red1", std::slice::from_ref(&seed), &["shoal.cluster.id=red"]);
    let n2 = node(dir.path(), "b2", std::slice::from_ref(&seed), &expect);
    wait_until(CONVERGE, "b1 to see b2", || (n1.members().len() == 2).then_some(()));
    wait_until(CONVERGE, "b2 to count two members", || {
        let (status, v) = write(&n2);
        assert_eq!(status, 503, "two members must not be enough: {v}");
        v["error"].as_str().unwrap().contains("1 missing").then_some(())
    });

    let n3 = node(dir.path(), "b3", std::slice::from_ref(&seed), &expect);
    for n in [&n1, &n2, &n3] {
        wait_until(CONVERGE, "writes to be accepted once three members met", || (write(n).0 == 204).then_some(()));
        assert_eq!(n.get("/readyz").0, 200);
    }
    for n in [&n1, &n2, &n3] {
        let ids: Vec<String> = n.members().into_iter().map(|m| m.0).collect();
        assert_eq!(ids, ["b1", "b2", "b3"], "a node of another cluster id must never be listed");
    }
    let ids: Vec<String> = foreign.members().into_iter().map(|m| m.0).collect();
    assert_eq!(ids, ["red1"]);
}

#[test]
fn a_minority_refuses_writes_and_still_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    // RF 2: every point is on both nodes, so the survivor can answer reads alone.
    let gate = ["shoal.cluster.required-contact-point-nr=2", "shoal.cluster.replication-factor=2"];
    let mut n1 = node(dir.path(), "r1", &[], &gate);
    let seed = n1.gossip_addr();
    let mut n2 = node(dir.path(), "r2", std::slice::from_ref(&seed), &gate);
    let write = |n: &TestNode| n.post("/write?db=d&namespace=n&precision=ms", "m value=1i 1000");
    wait_until(CONVERGE, "two live members accept writes", || (write(&n1).0 == 204).then_some(()));

    // r2 dies: r1 alone is below the gate.
    n2.kill9();
    // (Until r1 judges r2 dead, a write may also fail for want of r2's acknowledgement.)
    let (status, v) = wait_until(CONVERGE, "the lone node to refuse writes", || {
        let (status, v) = write(&n1);
        (status == 503 && v["error"].as_str().unwrap().contains("required-contact-point-nr")).then_some((status, v))
    });
    assert!(v["error"].as_str().unwrap().contains("required-contact-point-nr"), "{status} {v}");
    assert_eq!(n1.get("/readyz").0, 503);
    // Every write that was acknowledged before the gate closed is still readable here.
    let records = n1.query("d", "n", "SELECT count(*) FROM m");
    assert!(records[0]["value"].as_u64().unwrap() >= 1, "reads are still served: {records:?}");

    // r2 comes back: writes are accepted again.
    n2.start_again();
    wait_until(CONVERGE, "writes accepted again", || (write(&n1).0 == 204).then_some(()));
    n1.stop();
}
