//! Debian's HAProxy, run on deploy/haproxy/haproxy.cfg as shipped, in front of three nodes:
//! while one node is killed, writes through it keep succeeding (with a client's retry) and
//! every acknowledged point is read back through it afterwards.
#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;

use common::{Server, TestNode, free_port, wait_until};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BATCHES: usize = 300;
const POINTS_PER_BATCH: usize = 10;
/// When node 2 is killed.
const KILL_AT: usize = 100;
/// Tries per batch, as a client's retry policy (Telegraf's, a script's).
const TRIES: usize = 20;

fn haproxy(nodes: &[TestNode], listen: &str) -> Server {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy/haproxy.cfg");
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f", config]).env("SHOAL_LISTEN", listen);
    for (i, node) in nodes.iter().enumerate() {
        cmd.env(format!("SHOAL_NODE{}", i + 1), &node.addr);
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("start haproxy");
    Server { child, addr: listen.to_string() }
}

#[test]
fn writes_through_haproxy_survive_a_killed_node_and_nothing_acknowledged_is_lost() {
    if common::tool_missing("haproxy", "-v", "load balancer test", "haproxy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let settings = ["shoal.cluster.replication-factor=3", "shoal.hints.replay-interval=200ms"];
    let mut nodes = common::cluster(dir.path(), &["a", "b", "c"], &settings);
    let lb = haproxy(&nodes, &format!("127.0.0.1:{}", free_port()));
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(70)).build().unwrap();
    let url = |path: &str| format!("http://{}{path}", lb.addr);
    wait_until(Duration::from_secs(30), "haproxy to pass /readyz through", || {
        http.get(url("/readyz")).send().ok().filter(|r| r.status() == 200).map(|_| ())
    });

    let base_ms: i64 = 1_700_000_000_000;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut retried = 0;
    for batch in 0..BATCHES {
        if batch == KILL_AT {
            nodes[1].kill9();
        }
        let body: String = (0..POINTS_PER_BATCH)
            .map(|j| {
                let id = batch * POINTS_PER_BATCH + j;
                format!("lb,host=h{j} value={id}i {}\n", base_ms + id as i64)
            })
            .collect();
        let mut tries = 0;
        loop {
            assert!(Instant::now() < deadline, "the load loop ran out of time at batch {batch}");
            tries += 1;
            let resp = http.post(url("/write?db=lb&namespace=t&precision=ms")).body(body.clone()).send();
            match resp {
                Ok(r) if r.status().is_success() => break,
                other => {
                    let why = other.map(|r| r.status().to_string()).unwrap_or_else(|e| e.to_string());
                    assert!(tries < TRIES, "batch {batch} failed {tries} times through haproxy, last: {why}");
                    retried += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    println!("{BATCHES} batches acknowledged through haproxy; {retried} client retries");

    // Every acknowledged point, exactly, through the balancer and through each live node.
    let total = (BATCHES * POINTS_PER_BATCH) as i64;
    let expected_sum = total * (total - 1) / 2;
    let answer = |addr: &str, sql: &str| -> Option<i64> {
        let query = serde_json::json!({"db": "lb", "namespace": "t", "queryString": sql});
        let v: serde_json::Value =
            http.post(format!("http://{addr}/query")).json(&query).send().unwrap().json().unwrap();
        v["records"][0]["value"].as_i64()
    };
    for addr in [lb.addr.as_str(), nodes[0].addr.as_str(), nodes[2].addr.as_str()] {
        assert_eq!(answer(addr, "SELECT count(*) FROM lb"), Some(total), "count through {addr}");
        assert_eq!(answer(addr, "SELECT sum(value) FROM lb"), Some(expected_sum), "sum through {addr}");
    }
}
