//! Strangers get nothing, with real processes on loopback: a node without the cluster secret
//! (another secret, or none) never enters the members view of a secured cluster, and the
//! internal API refuses unsigned or wrongly signed requests; the secret rotates on a running
//! cluster with no downtime; with a users file, the public API asks for credentials and
//! enforces per-db permissions.
#![allow(clippy::disallowed_methods)]

mod common;
use common::{BIN, TestNode, wait_until};
use std::time::Duration;

const S: &str = "shoal-test-secret-one-0123456789";
const T: &str = "shoal-test-secret-two-0123456789";
const CONVERGE: Duration = Duration::from_secs(30);

fn node(dir: &std::path::Path, id: &str, seed: Option<&TestNode>, extra: &[&str]) -> TestNode {
    let mut sets = vec![format!("shoal.node.id={id}")];
    if let Some(seed) = seed {
        sets.push(format!("shoal.cluster.seeds=[\"{}\"]", seed.gossip_addr()));
    }
    sets.extend(extra.iter().map(|s| s.to_string()));
    TestNode::start(&dir.join(id), &sets.iter().map(String::as_str).collect::<Vec<_>>())
}

fn ids(n: &TestNode) -> Vec<String> {
    n.members().into_iter().filter(|m| m.1 == "alive").map(|m| m.0).collect()
}

fn metric(n: &TestNode, name: &str) -> u64 {
    let (_, text) = n.get("/metrics");
    text.as_str().unwrap().lines().find_map(|l| l.strip_prefix(&format!("{name} "))).map_or(0, |v| v.parse().unwrap())
}

fn secret(s: &str) -> String {
    format!("shoal.cluster.secret=\"{s}\"")
}

/// Signs internal requests with `secret` (none: unsigned), as a peer would.
fn peers(secret: Option<&str>) -> (shoal::peer::HttpPeers, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let keyring =
        secret.map(|s| std::sync::Arc::new(shoal::keyring::Keyring::open(dir.path(), Some(s)).unwrap().unwrap()));
    let clock = std::sync::Arc::new(shoal::env::SystemClock);
    (shoal::peer::HttpPeers::new("shoal", keyring, clock, None).unwrap(), dir)
}

#[test]
fn a_node_without_the_cluster_secret_cannot_join_or_call_the_internal_api() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret(S);
    let n1 = node(dir.path(), "s1", None, &[&s]);
    let n2 = node(dir.path(), "s2", Some(&n1), &[&s]);
    let other_secret = node(dir.path(), "x1", Some(&n1), &[&secret(T)]);
    let no_secret = node(dir.path(), "x2", Some(&n1), &[]);
    for n in [&n1, &n2] {
        wait_until(CONVERGE, "s1 and s2 to see each other", || (ids(n) == ["s1", "s2"]).then_some(()));
    }
    // Both strangers gossip to s1 every round; s1 drops what it cannot open.
    wait_until(CONVERGE, "s1 to have dropped many strangers' datagrams", || {
        (metric(&n1, "shoal_cluster_auth_rejected_total") >= 20).then_some(())
    });
    for n in [&n1, &n2] {
        let all: Vec<String> = n.members().into_iter().map(|m| m.0).collect();
        assert_eq!(all, ["s1", "s2"], "a stranger never enters the view");
    }
    assert_eq!(ids(&other_secret), ["x1"], "nor does the cluster enter the stranger's view");
    assert_eq!(ids(&no_secret), ["x2"]);

    // Writes through the secured cluster work (internal calls are signed).
    let (status, v) = n2.post("/write?db=d&namespace=n&precision=ms", "m value=1i 1000\nm value=2i 2000");
    assert_eq!(status, 204, "{v}");
    assert_eq!(n1.query("d", "n", "SELECT count(*) FROM m")[0]["value"], 2);

    // The internal API: unsigned, or signed with another secret, is 401 and changes nothing.
    let http = reqwest::blocking::Client::new();
    let empty = postcard::to_stdvec(&shoal::catalog::CatalogDiffRequest::default()).unwrap();
    let resp = http
        .post(n1.url("/internal/v1/catalog/diff"))
        .header("x-shoal-cluster", "shoal")
        .body(empty.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().unwrap().contains("must be signed"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    use shoal::peer::{PeerClient, PeerError};
    let diff =
        rt.block_on(async { peers(Some(S)).0.post(&n1.addr, "/internal/v1/catalog/diff", empty).await.unwrap() });
    let stolen = postcard::from_bytes::<shoal::catalog::CatalogDiff>(&diff).unwrap().state.to_bytes();
    let (wrong, _keep) = peers(Some(T));
    let push = rt.block_on(wrong.post(&n1.addr, "/internal/v1/catalog", stolen.clone()));
    match push {
        Err(PeerError::Refused { status: 401, message, .. }) => assert!(message.contains("lacks"), "{message}"),
        other => panic!("{other:?}"),
    }
    let (unsigned, _keep) = peers(None);
    let drop_all = rt.block_on(unsigned.post(&n1.addr, "/internal/v1/catalog", stolen));
    assert!(matches!(drop_all, Err(PeerError::Refused { status: 401, .. })), "{drop_all:?}");
    assert_eq!(n2.query("d", "n", "SELECT count(*) FROM m")[0]["value"], 2, "nothing a stranger sent took effect");
}

#[test]
fn the_cluster_secret_rotates_with_no_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret(S);
    let rf = "shoal.cluster.replication-factor=3";
    let n1 = node(dir.path(), "r1", None, &[&s, rf]);
    let n2 = node(dir.path(), "r2", Some(&n1), &[&s, rf]);
    let mut n3 = node(dir.path(), "r3", Some(&n1), &[&s, rf]);
    for n in [&n1, &n2, &n3] {
        wait_until(CONVERGE, "3 alive members", || (ids(n).len() == 3).then_some(()));
    }
    let mut written = 0;
    let mut write_and_check = |via: &TestNode, read: &TestNode| {
        let (status, v) = via.post(
            "/write?db=d&namespace=n&precision=ms&consistency=all",
            format!("m value={written}i {}", 1000 + written),
        );
        assert_eq!(status, 204, "{v}");
        written += 1;
        assert_eq!(read.query("d", "n", "SELECT count(*) FROM m")[0]["value"], written);
    };
    write_and_check(&n1, &n2);
    for (step, (op, key)) in [("install", T), ("use", T), ("remove", S)].into_iter().enumerate() {
        let body = serde_json::json!({"op": op, "key": key}).to_string();
        let (status, v) = n1.post("/cluster/keyring", body);
        assert_eq!(status, 200, "{op}: {v}");
        let nodes = v["nodes"].as_object().unwrap();
        assert_eq!(nodes.len(), 3, "{op} reached every member: {v}");
        assert!(nodes.values().all(|n| n["error"].is_null()), "{op}: {v}");
        // Writes at consistency all and reads through another node keep working at each step.
        let (via, read) = [(&n2, &n3), (&n3, &n1), (&n1, &n2)][step];
        write_and_check(via, read);
        for n in [&n1, &n2, &n3] {
            assert_eq!(ids(n).len(), 3, "after {op}, every member is still alive");
        }
    }
    let t_id = n1.get("/cluster/keyring").1["primary"].clone();
    for n in [&n1, &n2, &n3] {
        let (_, v) = n.get("/cluster/keyring");
        assert_eq!((v["primary"].clone(), v["keys"].as_array().unwrap().len()), (t_id.clone(), 1), "{v}");
    }
    // A restart keeps the rotated ring (the config still names the removed secret).
    n3.restart();
    wait_until(CONVERGE, "r3 back with the rotated keyring", || (ids(&n1).len() == 3).then_some(()));
    // A node with the removed secret stays out; one with the new secret joins.
    let old = node(dir.path(), "old", Some(&n1), &[&s]);
    let new = node(dir.path(), "new", Some(&n1), &[&secret(T)]);
    wait_until(CONVERGE, "the node with the new secret to join", || (ids(&n1).len() == 4).then_some(()));
    wait_until(CONVERGE, "r1 to drop the old secret's gossip", || {
        (metric(&n1, "shoal_cluster_auth_rejected_total") >= 10).then_some(())
    });
    assert!(!ids(&n1).contains(&"old".to_string()) && ids(&old) == ["old"]);
    assert!(ids(&new).len() == 4);
    assert_eq!(n1.post("/cluster/keyring", r#"{"op": "remove", "key": "shoal-test-secret-two-0123456789"}"#).0, 400);
    assert_eq!(n1.post("/cluster/keyring", r#"{"op": "shred"}"#).0, 400);
}

fn hash(password: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn with_a_users_file_the_public_api_needs_credentials_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let users = serde_json::json!({"users": [
        {"username": "admin", "password_hash": hash("admin-pw"), "perms": {"*": ["admin"]}},
        {"username": "writer", "password_hash": hash("writer-pw"), "perms": {"db1": ["write"]}},
        {"username": "reader", "password_hash": hash("reader-pw"), "perms": {"db1": ["read"]}},
    ]});
    let file = dir.path().join("users.json");
    std::fs::write(&file, users.to_string()).unwrap();
    let n = node(dir.path(), "a1", None, &[&format!("shoal.auth.file=\"{}\"", file.display())]);
    let http = reqwest::blocking::Client::new();
    let send = |req: reqwest::blocking::RequestBuilder| {
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let challenge = resp.headers().get("www-authenticate").is_some();
        (status, challenge, resp.text().unwrap())
    };
    let write =
        |db: &str| http.post(n.url(&format!("/write?db={db}&namespace=n&precision=ms"))).body("m value=1i 1000");
    let query = |sql: &str| {
        http.post(n.url("/query"))
            .body(serde_json::json!({"db": "db1", "namespace": "n", "queryString": sql}).to_string())
    };

    // Probes stay open; everything else needs credentials.
    assert_eq!(send(http.get(n.url("/livez"))).0, 200);
    assert_eq!(send(http.get(n.url("/readyz"))).0, 200);
    let (status, challenge, text) = send(write("db1"));
    assert_eq!((status, challenge), (401, true), "{text}");
    assert_eq!(send(http.get(n.url("/status"))).0, 401);
    assert_eq!(send(write("db1").basic_auth("writer", Some("wrong"))).0, 401);
    assert_eq!(send(write("db1").basic_auth("nobody", Some("writer-pw"))).0, 401);

    // Basic, Influx's Token and u/p all authenticate; permissions are per db.
    assert_eq!(send(write("db1").basic_auth("writer", Some("writer-pw"))).0, 204);
    assert_eq!(send(write("db1").header("Authorization", "Token writer:writer-pw")).0, 204);
    let url = n.url("/write?db=db1&namespace=n&precision=ms&u=writer&p=writer-pw");
    assert_eq!(send(http.post(url).body("m value=2i 2000")).0, 204);
    let (status, _, text) = send(write("db2").basic_auth("writer", Some("writer-pw")));
    assert!(status == 403 && text.contains("lacks write permission on db \\\"db2\\\""), "{status} {text}");
    let json =
        serde_json::json!({"db": "db1", "namespace": "n", "metric": "m", "bit": {"timestamp": 3000, "value": 3}});
    assert_eq!(send(http.post(n.url("/data")).body(json.to_string()).basic_auth("reader", Some("reader-pw"))).0, 403);
    assert_eq!(send(http.post(n.url("/data")).body(json.to_string()).basic_auth("writer", Some("writer-pw"))).0, 200);

    let (status, _, text) = send(query("SELECT count(*) FROM m").basic_auth("reader", Some("reader-pw")));
    assert!(status == 200 && text.contains("\"value\":3"), "{status} {text}");
    assert_eq!(send(query("SELECT count(*) FROM m").basic_auth("writer", Some("writer-pw"))).0, 403);
    assert_eq!(send(write("db1").basic_auth("reader", Some("reader-pw"))).0, 403);
    // DELETE, drop and leave need admin.
    assert_eq!(send(query("DELETE FROM m WHERE value = 1").basic_auth("reader", Some("reader-pw"))).0, 403);
    assert_eq!(send(http.delete(n.url("/commands/db1/n/m")).basic_auth("reader", Some("reader-pw"))).0, 403);
    assert_eq!(send(http.post(n.url("/cluster/leave")).basic_auth("reader", Some("reader-pw"))).0, 403);
    assert_eq!(send(query("DELETE FROM m WHERE value = 1").basic_auth("admin", Some("admin-pw"))).0, 200);
    assert_eq!(send(http.get(n.url("/commands/db1/n/m")).basic_auth("reader", Some("reader-pw"))).0, 200);
    assert_eq!(send(http.delete(n.url("/commands/db1/n/m")).basic_auth("admin", Some("admin-pw"))).0, 200);

    // The CLI sends --user/--password.
    let out = std::process::Command::new(BIN)
        .args(["status", "--node", &n.url(""), "--user", "reader", "--password", "reader-pw"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(BIN).args(["status", "--node", &n.url("")]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("401"));
    let metrics = send(http.get(n.url("/metrics")).basic_auth("admin", Some("admin-pw"))).2;
    let refused: u64 =
        metrics.lines().find_map(|l| l.strip_prefix("shoal_auth_refused_total ")).unwrap().parse().unwrap();
    assert!(refused >= 10, "{refused}");
}
