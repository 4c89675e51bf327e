//! etcd discovery against a real etcd (Debian's etcd-server) started by the test: nodes with
//! no seed list register under a key prefix with a lease, find each other there, a node added
//! later joins with no config change, and a killed node's key goes when its lease ends.
#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Server, TestNode, free_port, wait_until};
use std::process::{Command, Stdio};
use std::time::Duration;

fn start_etcd(dir: &std::path::Path) -> Server {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .args(["--name", "test", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("test=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    Server { child, addr: url }
}

/// The keys under `prefix` and their values, read straight from etcd.
fn etcd_keys(http: &reqwest::blocking::Client, etcd: &str, prefix: &str) -> Option<Vec<(String, String)>> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = serde_json::json!({"key": B64.encode(prefix), "range_end": B64.encode(end)});
    let v: serde_json::Value = http.post(format!("{etcd}/v3/kv/range")).json(&body).send().ok()?.json().ok()?;
    let text = |v: &serde_json::Value| String::from_utf8(B64.decode(v.as_str().unwrap_or_default()).ok()?).ok();
    v["kvs"]
        .as_array()
        .map_or(Some(Vec::new()), |kvs| kvs.iter().map(|kv| Some((text(&kv["key"])?, text(&kv["value"])?))).collect())
}

#[test]
fn nodes_find_each_other_through_etcd_and_a_dead_node_drops_out() {
    if common::tool_missing("etcd", "--version", "etcd discovery test", "etcd-server") {
        return;
    }
    shoal::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd(dir.path());
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    wait_until(Duration::from_secs(30), "etcd to answer", || {
        http.get(format!("{}/health", etcd.addr)).send().ok().filter(|r| r.status().is_success()).map(|_| ())
    });
    let endpoints = format!("shoal.cluster.discovery.etcd.endpoints=[\"{}\"]", etcd.addr);
    let settings = |id: &str, expect: usize| -> Vec<String> {
        vec![
            format!("shoal.node.id={id}"),
            "shoal.cluster.id=etcdtest".to_string(),
            "shoal.cluster.discovery.mode=etcd".to_string(),
            endpoints.clone(),
            "shoal.cluster.discovery.etcd.prefix=/shoal-test".to_string(),
            "shoal.cluster.discovery.etcd.lease-ttl=2s".to_string(),
            format!("shoal.cluster.bootstrap-expect={expect}"),
            "shoal.cluster.replication-factor=2".to_string(),
        ]
    };
    let start = |id: &str, expect: usize| {
        let sets = settings(id, expect);
        TestNode::start(&dir.path().join(id), &sets.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut nodes: Vec<TestNode> = ["a", "b", "c"].iter().map(|id| start(id, 3)).collect();
    let all_alive = |nodes: &[TestNode], n: usize| {
        for node in nodes.iter().filter(|n| n.is_running()) {
            wait_until(Duration::from_secs(60), &format!("{n} alive members"), || {
                let m = node.members();
                (m.iter().filter(|(_, s, _)| s == "alive").count() == n).then_some(())
            });
        }
    };
    all_alive(&nodes, 3);
    // Each node's key holds its gossip address.
    let keys = etcd_keys(&http, &etcd.addr, "/shoal-test/etcdtest/").unwrap();
    let mut expected: Vec<(String, String)> = nodes
        .iter()
        .zip(["a", "b", "c"])
        .map(|(n, id)| (format!("/shoal-test/etcdtest/{id}"), n.gossip_addr()))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
    // The cluster formed: a write through a is read through c.
    let (status, v) = nodes[0].post("/write?db=d&namespace=n&precision=s", "m,h=x value=1i 1700000000");
    assert!(status < 300, "{status} {v}");
    assert_eq!(nodes[2].query("d", "n", "SELECT count(*) FROM m")[0]["value"], 1);

    // A fourth node started the same way joins with no change anywhere.
    nodes.push(start("d", 3));
    all_alive(&nodes, 4);

    // A killed node stops renewing its lease, and its key goes.
    nodes[1].kill9();
    wait_until(Duration::from_secs(30), "b's key to expire", || {
        let keys = etcd_keys(&http, &etcd.addr, "/shoal-test/etcdtest/")?;
        (keys.len() == 3 && !keys.iter().any(|(k, _)| k.ends_with("/b"))).then_some(())
    });
}
