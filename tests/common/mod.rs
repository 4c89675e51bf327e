//! Test harness: real `shoal` processes on 127.0.0.1 with port 0, driven over HTTP.
#![allow(dead_code)]
#![allow(clippy::disallowed_methods)] // tests read the real clock

pub mod inproc;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_shoal");

/// Polls `cond` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct TestNode {
    pub data_dir: PathBuf,
    pub sets: Vec<String>,
    pub addr: String,
    child: Option<Child>,
    http: reqwest::blocking::Client,
}

impl TestNode {
    /// Starts a node whose data lives in `data_dir`, with extra `--set` overrides.
    pub fn start(data_dir: &Path, sets: &[&str]) -> Self {
        // reqwest's TLS needs a rustls provider installed before any client is built.
        shoal::tls::install_default_provider();
        let mut node = TestNode {
            data_dir: data_dir.to_path_buf(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            addr: String::new(),
            child: None,
            http: reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let addr_file = self.data_dir.join("http.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(BIN);
        cmd.arg("start").arg("--set").arg(format!("shoal.data-dir={}", self.data_dir.display())).args([
            "--set",
            "shoal.http.port=0",
            "--set",
            "shoal.node.id=test1",
            "--set",
            "shoal.gossip.port=0",
        ]);
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.with_extension("log")).unwrap();
        cmd.stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log)).env("RUST_LOG", "info");
        let mut child = cmd.spawn().expect("spawn shoal");
        self.addr = wait_until(Duration::from_secs(30), "the node to write http.addr", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("shoal exited early with {status}; log: {}", self.log());
            }
            std::fs::read_to_string(&addr_file).ok().filter(|s| !s.is_empty())
        });
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    pub fn gossip_addr(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("gossip.addr")).unwrap()
    }

    /// This node's member list as (id, state, generation), sorted by id.
    pub fn members(&self) -> Vec<(String, String, u64)> {
        let (status, v) = self.get("/cluster/members");
        assert_eq!(status, 200, "{v}");
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["state"].as_str().unwrap().to_string(),
                    m["generation"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits for the process to exit by itself (after `shoal leave`).
    pub fn wait_exit(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = wait_until(Duration::from_secs(30), "the node to exit", || c.try_wait().unwrap());
            assert!(status.success(), "exit after leave failed: {status}; log: {}", self.log());
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            let status = wait_until(Duration::from_secs(30), "the node to exit", || c.try_wait().unwrap());
            assert!(status.success(), "clean stop failed: {status}; log: {}", self.log());
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    pub fn post(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> (u16, serde_json::Value) {
        let resp = self.http.post(self.url(path)).body(body).send().expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self.http.get(self.url(path)).send().expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    pub fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self.http.delete(self.url(path)).send().expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(serde_json::Value::Null))
    }

    /// Runs `sql` and returns its records, panicking on an error answer.
    pub fn query(&self, db: &str, ns: &str, sql: &str) -> Vec<serde_json::Value> {
        let body = serde_json::json!({"db": db, "namespace": ns, "queryString": sql}).to_string();
        let (status, v) = self.post("/query", body);
        assert_eq!(status, 200, "{sql}: {v}");
        v["records"].as_array().unwrap().clone()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts nodes `ids` (each in `dir/<id>`, seeding from the first) with `settings`, and waits
/// until every node sees every other alive.
#[allow(dead_code)]
pub fn cluster(dir: &Path, ids: &[&str], settings: &[&str]) -> Vec<TestNode> {
    let mut sets: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
    sets.push(format!("shoal.node.id={}", ids[0]));
    let first = TestNode::start(&dir.join(ids[0]), &sets.iter().map(String::as_str).collect::<Vec<_>>());
    let seed = format!("shoal.cluster.seeds=[\"{}\"]", first.gossip_addr());
    let mut nodes = vec![first];
    for id in &ids[1..] {
        let mut sets: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        sets.push(format!("shoal.node.id={id}"));
        sets.push(seed.clone());
        nodes.push(TestNode::start(&dir.join(id), &sets.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    for n in &nodes {
        wait_until(Duration::from_secs(30), "every member alive", || {
            let m = n.members();
            (m.len() == ids.len() && m.iter().all(|(_, s, _)| s == "alive")).then_some(())
        });
    }
    nodes
}

/// A port free on loopback now, for a server the test starts that cannot bind port 0 itself.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server process the test started (InfluxDB, Prometheus), killed when the test ends.
#[allow(dead_code)]
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `program` is missing (it does not answer `program version_arg`); if so, prints why
/// `test` is skipped and which Debian package brings it (.ci/run installs them as root).
#[allow(dead_code)]
pub fn tool_missing(program: &str, version_arg: &str, test: &str, package: &str) -> bool {
    if Command::new(program).arg(version_arg).output().is_ok() {
        return false;
    }
    println!("SKIP {test}: {program} is not installed (Debian package {package}; .ci/run installs it as root)");
    true
}
