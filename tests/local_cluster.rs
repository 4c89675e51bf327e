//! `shoal local-cluster N` starts N nodes that form one cluster, prints their addresses, and
//! stops them all on SIGTERM.
#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;

use common::wait_until;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn local_cluster_starts_n_nodes_that_form_one_cluster_and_stops_them() {
    shoal::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::BIN)
        .args(["local-cluster", "3", "--http-port", "0", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Lines such as "  node2    http://127.0.0.1:41234  gossip 127.0.0.1:40000".
    let mut printed = Vec::new();
    let addrs: Vec<String> = loop {
        let line = rx.recv_timeout(Duration::from_secs(90)).expect("local-cluster prints its nodes");
        printed.push(line.clone());
        if line.starts_with("try:") {
            break printed
                .iter()
                .filter_map(|l| l.split_whitespace().nth(1)?.strip_prefix("http://").map(String::from))
                .collect();
        }
    };
    assert_eq!(addrs.len(), 3, "{printed:?}");
    let http = reqwest::blocking::Client::new();
    for addr in &addrs {
        wait_until(Duration::from_secs(60), "every node to see three alive members", || {
            let v: serde_json::Value = http.get(format!("http://{addr}/cluster/members")).send().ok()?.json().ok()?;
            let alive = v["members"].as_array()?.iter().filter(|m| m["state"] == "alive").count();
            (alive == 3).then_some(())
        });
    }
    // A write through node1 is read back through node3.
    wait_until(Duration::from_secs(30), "a write through node1 to be accepted", || {
        let resp = http
            .post(format!("http://{}/write?db=try&namespace=it&precision=s", addrs[0]))
            .body("cpu,host=a value=1.5 1700000000\ncpu,host=b value=2.5 1700000001")
            .send()
            .ok()?;
        resp.status().is_success().then_some(())
    });
    let body = serde_json::json!({"db": "try", "namespace": "it", "queryString": "SELECT count(*) FROM cpu"});
    let v: serde_json::Value =
        http.post(format!("http://{}/query", addrs[2])).json(&body).send().unwrap().json().unwrap();
    assert_eq!(v["records"][0]["value"], 2, "{v}");
    // SIGTERM stops every node, cleanly.
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = wait_until(Duration::from_secs(60), "local-cluster to exit", || child.try_wait().unwrap());
    assert!(status.success(), "{status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(rest.iter().filter(|l| l.ends_with(" stopped")).count(), 3, "{rest:?}");
    for addr in &addrs {
        assert!(std::net::TcpStream::connect(addr).is_err(), "{addr} still listens after the stop");
    }
}
