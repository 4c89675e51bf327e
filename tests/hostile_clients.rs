//! Slow or hostile clients and TLS, with real processes on loopback: idle and trickling
//! connections are closed after the header timeout, a body sent too slowly gets 408, 1,000
//! idle connections do not stop `/readyz` from answering; TLS serves the API, peers talk over
//! https, and a changed certificate is served without a restart.
#![allow(clippy::disallowed_methods)]

mod common;
use common::{BIN, TestNode, wait_until};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Whether the server closed `conn` (EOF or reset) within `within`.
fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_slow_clients_are_cut_off_and_readyz_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(
        &dir.path().join("h1"),
        &["shoal.http.header-read-timeout=1s", "shoal.http.request-timeout=2s", "shoal.http.max-connections=2000"],
    );
    let addr = n.addr.clone();
    // 1,000 connections that send nothing.
    let mut idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let started = Instant::now();
    assert_eq!(n.get("/readyz").0, 200, "readyz answers beside 1,000 idle connections");
    assert!(started.elapsed() < Duration::from_secs(1), "and at once: {:?}", started.elapsed());
    // A connection that trickles its headers, one byte a while.
    let mut trickle = TcpStream::connect(&addr).unwrap();
    trickle.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").unwrap();
    // The idle ones and the trickling one are closed after the header timeout.
    assert!(closed_within(&mut idle[0], Duration::from_secs(5)), "an idle connection is closed");
    assert!(closed_within(&mut idle[999], Duration::from_secs(2)));
    assert!(closed_within(&mut trickle, Duration::from_secs(5)), "a trickling connection is closed");
    // A body that never arrives whole: 408 after the request timeout.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /write?db=d&namespace=n HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nm value=1")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("shoal.http.request-timeout"), "{answer}");
    // Nothing of it was stored, and the node is still well.
    assert_eq!(n.get("/readyz").0, 200);
    assert_eq!(n.post("/query", r#"{"db":"d","namespace":"n","queryString":"SELECT * FROM m"}"#).0, 404);
}

#[test]
fn connections_past_the_limit_wait_rather_than_pile_up() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(
        &dir.path().join("h2"),
        &["shoal.http.header-read-timeout=1s", "shoal.http.max-connections=20"],
    );
    let _idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(&n.addr).unwrap()).collect();
    // The 21st waits in the backlog until the header timeout frees a slot, then is served.
    let started = Instant::now();
    assert_eq!(n.get("/readyz").0, 200);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(5), "{waited:?}");
}

/// Runs openssl; `None` (the test skips) when it is not installed.
fn openssl(dir: &std::path::Path, args: &[&str]) -> Option<()> {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().ok()?;
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(())
}

/// A CA, and a certificate for 127.0.0.1 named `cn` signed by it, as PEM files in `dir`.
fn make_certs(dir: &std::path::Path, cn: &str) -> Option<()> {
    if !dir.join("ca.pem").exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=shoal-test-ca",
            ],
        )?;
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "new.key",
            "-out",
            "node.csr",
            "-subj",
            &format!("/CN={cn}"),
        ],
    )?;
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "new.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    )?;
    // Swapped in by rename, key first, so a reload never reads a half-written file.
    std::fs::rename(dir.join("new.key"), dir.join("node.key")).unwrap();
    std::fs::rename(dir.join("new.pem"), dir.join("node.pem")).unwrap();
    Some(())
}

/// The subject of the certificate `addr` serves.
fn served_subject(dir: &std::path::Path, addr: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", addr, "-CAfile", "ca.pem"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_string()
}

#[test]
fn tls_serves_the_api_peers_use_https_and_a_new_certificate_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    if make_certs(&certs, "shoal-node-1").is_none() {
        println!("SKIP: openssl is not installed (CI installs it)");
        return;
    }
    let file = |name: &str| certs.join(name).display().to_string();
    let tls = [
        format!("shoal.http.tls.cert-file=\"{}\"", file("node.pem")),
        format!("shoal.http.tls.key-file=\"{}\"", file("node.key")),
        format!("shoal.http.tls.ca-file=\"{}\"", file("ca.pem")),
        "shoal.cluster.replication-factor=2".to_string(),
        "shoal.write.consistency=all".to_string(),
    ];
    let mut sets: Vec<String> = tls.to_vec();
    sets.push("shoal.node.id=t1".into());
    let t1 = TestNode::start(&dir.path().join("t1"), &sets.iter().map(String::as_str).collect::<Vec<_>>());
    let mut sets: Vec<String> = tls.to_vec();
    sets.push("shoal.node.id=t2".into());
    sets.push(format!("shoal.cluster.seeds=[\"{}\"]", t1.gossip_addr()));
    let t2 = TestNode::start(&dir.path().join("t2"), &sets.iter().map(String::as_str).collect::<Vec<_>>());

    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.pem")).unwrap()).unwrap();
    let https = reqwest::blocking::Client::builder().tls_certs_only([ca]).build().unwrap();
    let url = |n: &TestNode, path: &str| format!("https://{}{path}", n.addr);
    wait_until(Duration::from_secs(30), "two members over gossip", || {
        let v: serde_json::Value = https.get(url(&t1, "/cluster/members")).send().ok()?.json().ok()?;
        (v["members"].as_array()?.iter().filter(|m| m["state"] == "alive").count() == 2).then_some(())
    });
    // RF 2 at consistency all: the write reaches the peer over https.
    let resp = https.post(url(&t2, "/write?db=d&namespace=n&precision=ms")).body("m value=1i 1000").send().unwrap();
    assert_eq!(resp.status().as_u16(), 204, "{}", resp.text().unwrap());
    let body = r#"{"db":"d","namespace":"n","queryString":"SELECT count(*) FROM m"}"#;
    let v: serde_json::Value = https.post(url(&t1, "/query")).body(body).send().unwrap().json().unwrap();
    assert_eq!(v["records"][0]["value"], 1, "{v}");
    // Plain HTTP to the TLS port gets no API answer.
    let plain = reqwest::blocking::Client::new().get(format!("http://{}/status", t1.addr)).send();
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // The CLI verifies against --ca-file.
    let out = std::process::Command::new(BIN)
        .args(["status", "--node", &url(&t1, ""), "--ca-file", &file("ca.pem")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !std::process::Command::new(BIN).args(["status", "--node", &url(&t1, "")]).output().unwrap().status.success()
    );

    // A renewed certificate is served without a restart.
    assert!(served_subject(&certs, &t1.addr).contains("shoal-node-1"));
    make_certs(&certs, "shoal-node-renewed").unwrap();
    wait_until(Duration::from_secs(20), "the renewed certificate to be served", || {
        served_subject(&certs, &t1.addr).contains("shoal-node-renewed").then_some(())
    });
    let v: serde_json::Value = https.post(url(&t2, "/query")).body(body).send().unwrap().json().unwrap();
    assert_eq!(v["records"][0]["value"], 1);
}
