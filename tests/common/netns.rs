//! Network-namespace harness for the recovery suite (`tests/netns.rs`): real `shoal` processes,
//! each in its own Linux network namespace, joined by veth pairs to a bridge in the root
//! namespace. The root side of the bridge has `.254`, so the test process talks HTTP to every
//! node; faults are iptables rules (or netem, when the kernel has it) inside a node's namespace,
//! which never match `.254`.
//!
//! Needs root, `ip` and `iptables`; without them [`Net::setup`] prints `SKIP: <reason>` and the
//! case returns. Cases run one at a time ([`LOCK`] in this process, a file lock across
//! processes), and everything a case creates is removed on drop, also when it panics (then the
//! tail of every node's log is printed and the data dirs are kept).

use super::{BIN, wait_until};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One case at a time in this process (poisoning tolerated: a failed case must not fail the next).
pub static LOCK: Mutex<()> = Mutex::new(());

/// Every node has its own namespace, so fixed ports do not collide.
pub const HTTP_PORT: u16 = 9000;
pub const GOSSIP_PORT: u16 = 7280;
pub const RF: usize = 2;
pub const DB: &str = "jepsen";
pub const NS: &str = "ns";
pub const METRIC: &str = "set";
pub const DAY: i64 = 86_400_000;
/// The load spreads its points over this many days, so this many daily shards exist.
pub const DAYS: i64 = 6;

/// The load's bounds, whatever the case asks.
pub const LOAD_MAX_TIME: Duration = Duration::from_secs(60);
pub const LOAD_MAX_POINTS: i64 = 200_000;
pub const BATCH_POINTS: i64 = 100;
/// Concurrent writers of the load.
pub const LOAD_WORKERS: usize = 3;
/// Pause of each writer between two batches (load pacing: at most ~4k points/s, which leaves
/// CPU to gossip and repair on a 2-core machine).
pub const BATCH_PAUSE: Duration = Duration::from_millis(75);
/// Timeout of small requests (members, readyz).
pub const SHORT: Duration = Duration::from_secs(5);
/// Timeout of one load request: above the nodes' own 5 s timeout for a replica, so a write
/// slowed by an unreachable replica is seen with the node's answer, not as the client's timeout.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a full read of the set and of `/cluster/shards?verify=true`.
pub const LONG: Duration = Duration::from_secs(60);
/// Deadline for every shard's replicas to converge after a fault.
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for the set checker to pass through one node (once digests have converged, it
/// only waits for catalogs and reads to catch up).
pub const SET_CHECK_DEADLINE: Duration = Duration::from_secs(30);

fn http_client() -> reqwest::blocking::Client {
    shoal::tls::install_default_provider();
    // No retries: a request sent twice would look like a duplicate to the set checker.
    let no_retry = reqwest::retry::never();
    reqwest::blocking::Client::builder().timeout(SHORT).no_proxy().retry(no_retry).build().unwrap()
}

fn get(http: &reqwest::blocking::Client, url: &str, timeout: Duration) -> Result<(u16, serde_json::Value), String> {
    answer(http.get(url).timeout(timeout).send(), url)
}

fn post(
    http: &reqwest::blocking::Client,
    url: &str,
    body: String,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), String> {
    answer(http.post(url).body(body).timeout(timeout).send(), url)
}

fn answer(resp: reqwest::Result<reqwest::blocking::Response>, url: &str) -> Result<(u16, serde_json::Value), String> {
    let resp = resp.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().map_err(|e| format!("{url}: reading the body: {e}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))))
}

/// Runs a command; the caller decides what a failure means.
fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn must(args: &[&str]) -> String {
    let out = sh(args);
    assert!(out.status.success(), "{args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every `every` until it returns `Ok`, or panics after `timeout` naming `what` and
/// the last reason it gave.
pub fn poll<T>(timeout: Duration, every: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(why) => assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}: {why}"),
        }
        std::thread::sleep(every);
    }
}

/// Why this machine cannot run the cases, if it cannot.
fn skip_reason() -> Option<String> {
    match Command::new("id").arg("-u").output() {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        Ok(o) => return Some(format!("not root (uid {})", String::from_utf8_lossy(&o.stdout).trim())),
        Err(e) => return Some(format!("cannot run `id -u`: {e}")),
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn pid_alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

/// `<prefix><pid>c<case>[n<i>]`, the shape of the interface names this harness creates.
fn our_link_pid<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, tail) = rest.split_once('c')?;
    let (case, node) = tail.split_once('n').unwrap_or((tail, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(case) && digits(node)).then_some(pid)
}

/// Removes what an earlier run killed before its drop (SIGKILL, CI timeout) left behind: its
/// namespaces and root-side interfaces, recognised by name, whose process no longer exists.
/// Its `shoal` processes, if any are left, are cut off from the network but not killed.
fn sweep_stale() {
    for line in String::from_utf8_lossy(&sh(&["ip", "netns", "list"]).stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(pid) = name.strip_prefix("shoal-").and_then(|r| r.split('-').next())
            && !pid_alive(pid)
        {
            sh(&["ip", "netns", "del", name]);
        }
    }
    for line in String::from_utf8_lossy(&sh(&["ip", "-o", "link", "show"]).stdout).lines() {
        let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        if let Some(pid) = our_link_pid(name, "shb").or_else(|| our_link_pid(name, "shv"))
            && !pid_alive(pid)
        {
            sh(&["ip", "link", "del", name]);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub struct NsNode {
    /// `n1`, `n2`, …
    pub id: String,
    /// The network namespace.
    pub ns: String,
    /// `10.77.<case>.<i>`
    pub ip: String,
    /// The veth end inside the namespace.
    pub ifname: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    sets: Vec<String>,
    child: Option<Child>,
}

impl NsNode {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{HTTP_PORT}{path}", self.ip)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// One case's network: a bridge, one namespace per node, and the nodes' processes.
pub struct Net {
    pub case: u32,
    pub nodes: Vec<NsNode>,
    pub http: reqwest::blocking::Client,
    started: Instant,
    bridge: Option<String>,
    namespaces: Vec<String>,
    links: Vec<String>,
    dir: Option<tempfile::TempDir>,
    _flock: File,
    _guard: MutexGuard<'static, ()>,
}

impl Net {
    /// Creates the bridge and `n` namespaces for case `case` (1..=253), or prints `SKIP: …` and
    /// returns `None` when this machine cannot.
    pub fn setup(case: u32, n: usize) -> Option<Net> {
        assert!((1..=253).contains(&case) && (1..=253).contains(&n));
        let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = skip_reason() {
            println!("SKIP: {reason}");
            return None;
        }
        // Another test process (a second `cargo test`) would use the same subnets: one at a time.
        let flock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("shoal-netns.lock"))
            .unwrap();
        flock.lock().unwrap();
        sweep_stale();
        let pid = std::process::id();
        let probe = format!("shoal-{pid}-probe");
        let out = sh(&["ip", "netns", "add", &probe]);
        if !out.status.success() {
            println!("SKIP: `ip netns add` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        must(&["ip", "netns", "del", &probe]);

        let subnet = format!("10.77.{case}");
        let used = must(&["ip", "-o", "-4", "addr", "show", "to", &format!("{subnet}.0/24")]);
        assert!(used.trim().is_empty(), "{subnet}.0/24 is already in use in the root namespace:\n{used}");
        let mut net = Net {
            case,
            nodes: Vec::new(),
            http: http_client(),
            started: Instant::now(),
            bridge: None,
            namespaces: Vec::new(),
            links: Vec::new(),
            dir: Some(tempfile::tempdir().unwrap()),
            _flock: flock,
            _guard: guard,
        };
        // Each object is recorded as soon as it exists, so a failure half-way is cleaned up too.
        let tag = format!("{pid}c{case}");
        let bridge = format!("shb{tag}");
        must(&["ip", "link", "add", &bridge, "type", "bridge"]);
        net.bridge = Some(bridge.clone());
        must(&["ip", "addr", "add", &format!("{subnet}.254/24"), "dev", &bridge]);
        // A new bridge is down.
        must(&["ip", "link", "set", &bridge, "up"]);
        for i in 1..=n {
            let ns = format!("shoal-{pid}-c{case}-n{i}");
            must(&["ip", "netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let (host, peer) = (format!("shv{tag}n{i}"), format!("shp{tag}n{i}"));
            assert!(host.len() <= 15 && peer.len() <= 15, "interface names longer than 15: {host}, {peer}");
            must(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &peer]);
            net.links.push(host.clone());
            must(&["ip", "link", "set", &peer, "netns", &ns]);
            let ip = format!("{subnet}.{i}");
            must(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &peer]);
            must(&["ip", "-n", &ns, "link", "set", &peer, "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            must(&["ip", "link", "set", &host, "master", &bridge]);
            must(&["ip", "link", "set", &host, "up"]);
            let dir = net.dir.as_ref().unwrap().path();
            net.nodes.push(NsNode {
                id: format!("n{i}"),
                ns,
                ip,
                ifname: peer,
                data_dir: dir.join(format!("n{i}")),
                log_path: dir.join(format!("n{i}.log")),
                sets: Vec::new(),
                child: None,
            });
        }
        // Reachable = a TCP connect to the (closed) HTTP port is refused rather than timing out.
        for node in &net.nodes {
            let addr: std::net::SocketAddr = format!("{}:{HTTP_PORT}", node.ip).parse().unwrap();
            wait_until(
                Duration::from_secs(10),
                &format!("{} to be reachable from the root namespace", node.ns),
                || match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                    _ => None,
                },
            );
        }
        net.say(&format!("{n} namespaces on bridge {bridge}, {subnet}.0/24, root side {subnet}.254"));
        Some(net)
    }

    /// A progress line, prefixed with the case and the time since setup.
    pub fn say(&self, what: &str) {
        println!("[case{} +{:.1}s] {what}", self.case, self.started.elapsed().as_secs_f64());
    }

    pub fn node(&self, i: usize) -> &NsNode {
        &self.nodes[i]
    }

    /// The node settings every node gets from the harness; `extra` is appended by [`Net::start`].
    fn base_sets(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        let ip = &node.ip;
        vec![
            format!("shoal.node.id={}", node.id),
            format!("shoal.data-dir={}", node.data_dir.display()),
            format!("shoal.http.host={ip}"),
            format!("shoal.http.port={HTTP_PORT}"),
            format!("shoal.gossip.host={ip}"),
            format!("shoal.gossip.port={GOSSIP_PORT}"),
            format!("shoal.cluster.seeds=[\"{}:{GOSSIP_PORT}\"]", self.nodes[0].ip),
            format!("shoal.cluster.replication-factor={RF}"),
        ]
    }

    /// Starts every node with `extra` settings, waits until each is ready and sees all of them
    /// alive with a published capacity (so placement has every node to choose from).
    pub fn start_all(&mut self, extra: &[String]) {
        for i in 0..self.nodes.len() {
            self.nodes[i].sets = self.base_sets(i).into_iter().chain(extra.iter().cloned()).collect();
            self.spawn(i);
        }
        for i in 0..self.nodes.len() {
            self.wait_ready(i);
        }
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_all_alive(&all);
        self.say(&format!("{} nodes ready and alive in every view", self.nodes.len()));
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.id);
        let log = File::options().create(true).append(true).open(&node.log_path).unwrap();
        // `ip netns exec` execs the program: the child's pid is shoal's, so kill() is kill -9 of shoal.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns, BIN, "start"]);
        for s in &node.sets {
            cmd.arg("--set").arg(s);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log));
        cmd.env("RUST_LOG", "info");
        node.child = Some(cmd.spawn().expect("spawn ip netns exec shoal"));
    }

    /// Polls `GET /readyz` until 200; panics with the log's tail if the process exits first.
    pub fn wait_ready(&mut self, i: usize) {
        let http = self.http.clone();
        let node = &mut self.nodes[i];
        let url = node.url("/readyz");
        let (id, log) = (node.id.clone(), node.log_path.clone());
        let child = node.child.as_mut().expect("a running node");
        wait_until(Duration::from_secs(30), &format!("{id} to be ready"), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{id} exited early with {status}; log:\n{}", tail(&log, 40));
            }
            matches!(get(&http, &url, SHORT), Ok((200, _))).then_some(())
        });
    }

    /// Waits until every node in `live` sees exactly the nodes in `live` alive, each with a
    /// published capacity (others may be listed in other states).
    pub fn wait_all_alive(&self, live: &[usize]) {
        let want: BTreeSet<String> = live.iter().map(|&i| self.nodes[i].id.clone()).collect();
        for &i in live {
            let url = self.nodes[i].url("/cluster/members");
            wait_until(Duration::from_secs(30), &format!("{} to see {want:?} alive", self.nodes[i].id), || {
                let (_, v) = get(&self.http, &url, SHORT).ok()?;
                let alive: BTreeSet<String> = v["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["state"] == "alive" && m["capacity"].is_object())
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect();
                (alive == want).then_some(())
            });
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.say(&format!("kill -9 {}", self.nodes[i].id));
    }

    /// Starts a stopped node again on the same data dir and settings, and waits until ready.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i);
        self.say(&format!("{} restarted and ready", self.nodes[i].id));
    }

    /// Waits for a node to exit by itself (after `shoal leave`).
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        let node = &mut self.nodes[i];
        let mut child = node.child.take().expect("a running node");
        wait_until(timeout, &format!("{} to exit", node.id), || child.try_wait().unwrap())
    }

    /// Runs `args` inside node `i`'s namespace; it must succeed. Returns stdout.
    pub fn run_in(&self, i: usize, args: &[&str]) -> String {
        self.run_in_node(&self.nodes[i], args)
    }

    /// `shoal leave --node http://<ip>:9000`, run from the root namespace.
    pub fn leave(&self, i: usize) -> Output {
        let url = format!("http://{}:{HTTP_PORT}", self.nodes[i].ip);
        Command::new(BIN).args(["leave", "--node", &url]).output().expect("run shoal leave")
    }

    fn peers(&self, i: usize) -> Vec<String> {
        self.nodes.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| n.ip.clone()).collect()
    }

    /// Cuts node `i` off from every other node, both ways; the root side (`.254`) still reaches it.
    pub fn partition(&self, i: usize) {
        for peer in self.peers(i) {
            self.run_in(i, &["iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP"]);
            self.run_in(i, &["iptables", "-A", "OUTPUT", "-d", &peer, "-j", "DROP"]);
        }
        self.say(&format!("partitioned {} from its peers", self.nodes[i].id));
    }

    /// Node `i` can send to its peers but receives nothing from them.
    pub fn partition_inbound(&self, i: usize) {
        for peer in self.peers(i) {
            self.run_in(i, &["iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP"]);
        }
        self.say(&format!("{} can send but not receive", self.nodes[i].id));
    }

    /// Drops `percent` % of the packets on every link: netem on each namespace's veth when the
    /// kernel has it, else an iptables `statistic` rule on every namespace's INPUT. Returns
    /// which one was used.
    pub fn packet_loss(&self, percent: u32) -> &'static str {
        assert!((1..100).contains(&percent));
        let loss = format!("{percent}%");
        let netem = |node: &NsNode| {
            let ns = &node.ns;
            sh(&["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", &node.ifname, "root", "netem", "loss", &loss])
        };
        let method = if netem(&self.nodes[0]).status.success() {
            for node in &self.nodes[1..] {
                let out = netem(node);
                assert!(out.status.success(), "netem in {}: {}", node.ns, String::from_utf8_lossy(&out.stderr));
            }
            "netem"
        } else {
            let p = format!("{:.4}", f64::from(percent) / 100.0);
            for node in &self.nodes {
                let rule = ["iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random", "--probability", &p];
                self.run_in_node(node, &[&rule[..], &["-j", "DROP"]].concat());
            }
            "iptables statistic (no netem in this kernel)"
        };
        self.say(&format!("{percent}% packet loss on every link via {method}"));
        method
    }

    fn run_in_node(&self, node: &NsNode, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &node.ns];
        all.extend_from_slice(args);
        must(&all)
    }

    /// Removes every fault from node `i`'s namespace.
    pub fn heal(&self, i: usize) {
        self.run_in(i, &["iptables", "-F"]);
        // Fails when there is no netem qdisc, which is the usual case.
        sh(&["ip", "netns", "exec", &self.nodes[i].ns, "tc", "qdisc", "del", "dev", &self.nodes[i].ifname, "root"]);
    }

    pub fn heal_all(&self) {
        for i in 0..self.nodes.len() {
            self.heal(i);
        }
        self.say("healed every namespace");
    }

    /// Node `i`'s members view as (id, state).
    pub fn members(&self, i: usize) -> Result<Vec<(String, String)>, String> {
        members(&self.http, &self.nodes[i].url("/cluster/members"))
    }

    /// The state node `observer` reports for node `subject`, if it lists it.
    pub fn state_seen(&self, observer: usize, subject: usize) -> Option<String> {
        let members = self.members(observer).ok()?;
        members.into_iter().find(|(id, _)| *id == self.nodes[subject].id).map(|(_, s)| s)
    }

    /// Whether every shard of the set, as node `i` sees it, has exactly RF alive replicas (none
    /// of them in `gone`) with equal, non-null digests and point counts, and every day with an
    /// acknowledged point has its shard. `Err` says what is not there yet.
    pub fn shards_converged(&self, i: usize, gone: &[&str], history: &History) -> Result<usize, String> {
        let url = self.nodes[i].url("/cluster/shards?verify=true");
        let (status, v) = get(&self.http, &url, LONG)?;
        if status != 200 {
            return Err(format!("{url}: {status} {v}"));
        }
        let shards: Vec<&serde_json::Value> = v["shards"]
            .as_array()
            .ok_or(format!("no shards array: {v}"))?
            .iter()
            .filter(|s| s["db"] == DB && s["namespace"] == NS && s["metric"] == METRIC)
            .collect();
        let starts: BTreeSet<i64> = shards.iter().filter_map(|s| s["start"].as_i64()).collect();
        let days: BTreeSet<i64> = history.acked.iter().map(|id| day_of(*id) * DAY).collect();
        if let Some(missing) = days.difference(&starts).next() {
            return Err(format!("no shard starting at {missing} (have {starts:?})"));
        }
        for s in &shards {
            let replicas = s["replicas"].as_array().ok_or(format!("no replicas: {s}"))?;
            let ids: BTreeSet<&str> = replicas.iter().filter_map(|r| r["id"].as_str()).collect();
            let fine = replicas.len() == RF
                && ids.len() == RF
                && replicas.iter().all(|r| r["state"] == "alive" && !r["digest"].is_null() && !r["points"].is_null())
                && replicas
                    .iter()
                    .all(|r| r["digest"] == replicas[0]["digest"] && r["points"] == replicas[0]["points"])
                && !gone.iter().any(|g| ids.contains(g));
            if !fine {
                return Err(format!("shard not converged: {s}"));
            }
        }
        Ok(shards.len())
    }

    /// Polls [`Net::shards_converged`] through every node in `via` until all agree; returns the
    /// time since `since`.
    pub fn await_converged(&self, via: &[usize], gone: &[&str], history: &History, since: Instant) -> Duration {
        let shards = poll(CONVERGE_DEADLINE, Duration::from_millis(250), "replica digests to converge", || {
            let mut n = 0;
            for &i in via {
                n = self.shards_converged(i, gone, history).map_err(|e| format!("via {}: {e}", self.nodes[i].id))?;
            }
            Ok(n)
        });
        let took = since.elapsed();
        self.say(&format!("{shards} shards with {RF} alive replicas and equal digests through every node"));
        took
    }

    /// Reads the whole set through node `i` and compares it with the load's history.
    pub fn check_set(&self, i: usize, history: &History) -> Result<SetReport, String> {
        let query = format!("SELECT * FROM {METRIC} LIMIT 5000000");
        let body = serde_json::json!({"db": DB, "namespace": NS, "metric": METRIC, "queryString": query});
        let url = self.nodes[i].url("/query");
        let (status, v) = post(&self.http, &url, body.to_string(), LONG)?;
        if status != 200 {
            return Err(format!("{url}: {status} {v}"));
        }
        let records = v["records"].as_array().ok_or(format!("no records array: {v}"))?;
        let mut counts: BTreeMap<i64, u32> = BTreeMap::new();
        for r in records {
            let value = r["value"].as_i64().ok_or(format!("a record whose value is not an integer: {r}"))?;
            *counts.entry(value).or_default() += 1;
        }
        Ok(SetReport::new(counts, history))
    }

    /// Polls [`Net::check_set`] through every node in `via` until it finds nothing lost,
    /// duplicated or unexpected, and asserts that it did.
    pub fn await_set(&self, via: &[usize], history: &History) {
        for &i in via {
            let start = Instant::now();
            let deadline = start + SET_CHECK_DEADLINE;
            let report = loop {
                let report = self.check_set(i, history);
                if matches!(&report, Ok(r) if r.ok()) || Instant::now() >= deadline {
                    break report;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            let id = &self.nodes[i].id;
            let report = report.unwrap_or_else(|e| panic!("set check through {id}: {e}"));
            assert!(report.ok(), "set check through {id} after {SET_CHECK_DEADLINE:?}: {}", report.summary());
            self.say(&format!(
                "set check through {id}: {} after {:.1} s",
                report.summary(),
                start.elapsed().as_secs_f64()
            ));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            for node in &self.nodes {
                eprintln!(
                    "----- tail of {} ({}) -----\n{}",
                    node.id,
                    node.log_path.display(),
                    tail(&node.log_path, 60)
                );
            }
        }
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Deleting a namespace destroys its veth end (and so the pair) asynchronously: delete
        // the root ends too, so nothing is left for the next case.
        for ns in &self.namespaces {
            sh(&["ip", "netns", "del", ns]);
        }
        for link in &self.links {
            sh(&["ip", "link", "del", link]);
        }
        if let Some(bridge) = self.bridge.take() {
            sh(&["ip", "link", "del", &bridge]);
        }
        if let Some(dir) = self.dir.take()
            && failed
        {
            eprintln!("data dirs and logs kept in {}", dir.keep().display());
        }
    }
}

fn members(http: &reqwest::blocking::Client, url: &str) -> Result<Vec<(String, String)>, String> {
    let (status, v) = get(http, url, SHORT)?;
    if status != 200 {
        return Err(format!("{url}: {status} {v}"));
    }
    let list = v["members"].as_array().ok_or(format!("no members array: {v}"))?;
    Ok(list
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or("?").to_string(), m["state"].as_str().unwrap_or("?").to_string()))
        .collect())
}

/// The day (shard) of point `id`.
pub fn day_of(id: i64) -> i64 {
    id % DAYS
}

/// Point `id`'s timestamp: spread over [`DAYS`] days, unique per id.
pub fn timestamp_of(id: i64) -> i64 {
    day_of(id) * DAY + id
}

/// What the load client did: ids acknowledged (204) and ids whose fate is unknown.
#[derive(Debug, Default)]
pub struct History {
    pub acked: BTreeSet<i64>,
    pub maybe: BTreeSet<i64>,
    pub batches_ok: u64,
    pub batches_failed: u64,
    /// Why batches were not acknowledged: status code or transport error kind, with a count.
    pub failures: BTreeMap<String, u64>,
    /// The first few failure messages, for the log.
    pub examples: Vec<String>,
}

impl History {
    fn merge(&mut self, other: History) {
        self.acked.extend(other.acked);
        self.maybe.extend(other.maybe);
        self.batches_ok += other.batches_ok;
        self.batches_failed += other.batches_failed;
        for (kind, n) in other.failures {
            *self.failures.entry(kind).or_default() += n;
        }
        self.examples.extend(other.examples.into_iter().take(5_usize.saturating_sub(self.examples.len())));
    }

    pub fn summary(&self) -> String {
        format!(
            "{} points acknowledged, {} indeterminate; batches {} ok, {} failed {:?}",
            self.acked.len(),
            self.maybe.len(),
            self.batches_ok,
            self.batches_failed,
            self.failures
        )
    }
}

/// The Jepsen set checker's verdict for one read.
#[derive(Debug)]
pub struct SetReport {
    pub found: usize,
    pub acked: usize,
    pub lost: Vec<i64>,
    pub duplicated: Vec<i64>,
    pub unexpected: Vec<i64>,
}

impl SetReport {
    pub fn new(counts: BTreeMap<i64, u32>, h: &History) -> SetReport {
        SetReport {
            found: counts.values().map(|&c| c as usize).sum(),
            acked: h.acked.len(),
            lost: h.acked.iter().filter(|id| !counts.contains_key(id)).copied().collect(),
            duplicated: counts.iter().filter(|(_, c)| **c > 1).map(|(id, _)| *id).collect(),
            unexpected: counts.keys().filter(|id| !h.acked.contains(id) && !h.maybe.contains(id)).copied().collect(),
        }
    }

    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.unexpected.is_empty()
    }

    pub fn summary(&self) -> String {
        let first = |v: &[i64]| v.iter().take(8).copied().collect::<Vec<_>>();
        format!(
            "found {} of {} acknowledged; lost {} {:?}, duplicated {} {:?}, unexpected {} {:?}",
            self.found,
            self.acked,
            self.lost.len(),
            first(&self.lost),
            self.duplicated.len(),
            first(&self.duplicated),
            self.unexpected.len(),
            first(&self.unexpected)
        )
    }
}

/// The load client: [`LOAD_WORKERS`] threads writing batches of the set, each in turn to every
/// node marked usable. Several writers, so one request hanging on a node that just lost a peer
/// does not stall the load for the whole fault.
pub struct Load {
    shared: Arc<LoadShared>,
    workers: Vec<JoinHandle<History>>,
}

struct LoadShared {
    urls: Vec<String>,
    usable: Vec<AtomicBool>,
    /// Requests being sent to each node.
    in_flight: Vec<AtomicU64>,
    stop: AtomicBool,
    next_id: AtomicI64,
    batches_ok: AtomicU64,
    batches_sent: AtomicU64,
    started: Instant,
}

impl Load {
    /// Starts writing to every node of `net`.
    pub fn start(net: &Net) -> Load {
        let urls: Vec<String> = net
            .nodes
            .iter()
            .map(|n| n.url(&format!("/write?db={DB}&namespace={NS}&precision=ms&consistency=one")))
            .collect();
        let shared = Arc::new(LoadShared {
            usable: urls.iter().map(|_| AtomicBool::new(true)).collect(),
            in_flight: urls.iter().map(|_| AtomicU64::new(0)).collect(),
            urls,
            stop: AtomicBool::new(false),
            next_id: AtomicI64::new(0),
            batches_ok: AtomicU64::new(0),
            batches_sent: AtomicU64::new(0),
            started: Instant::now(),
        });
        let workers = (0..LOAD_WORKERS)
            .map(|w| {
                let shared = shared.clone();
                std::thread::spawn(move || load_worker(&shared, w))
            })
            .collect();
        Load { shared, workers }
    }

    /// Stops sending to node `i`; returns once no batch to it is in flight.
    pub fn retire(&self, i: usize) {
        self.shared.usable[i].store(false, SeqCst);
        wait_until(LOAD_TIMEOUT * 2, "the load's batches in flight to finish", || {
            (self.shared.in_flight[i].load(SeqCst) == 0).then_some(())
        });
    }

    /// Sends to node `i` again.
    pub fn restore(&self, i: usize) {
        self.shared.usable[i].store(true, SeqCst);
    }

    /// (batches acknowledged, batches sent) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.shared.batches_ok.load(SeqCst), self.shared.batches_sent.load(SeqCst))
    }

    /// Stops the load, waits for the batches in flight and returns the history.
    pub fn stop(mut self) -> History {
        self.shared.stop.store(true, SeqCst);
        let mut h = History::default();
        for worker in self.workers.drain(..) {
            h.merge(worker.join().expect("a load thread panicked"));
        }
        println!("load: {}", h.summary());
        for e in &h.examples {
            println!("load: not acknowledged: {e}");
        }
        h
    }
}

fn load_worker(shared: &LoadShared, w: usize) -> History {
    let http = http_client();
    let mut h = History::default();
    let mut turn = w;
    while !shared.stop.load(SeqCst) && shared.started.elapsed() < LOAD_MAX_TIME {
        let targets: Vec<usize> = (0..shared.urls.len()).filter(|&i| shared.usable[i].load(SeqCst)).collect();
        let Some(&target) = targets.get(turn % targets.len().max(1)) else {
            std::thread::sleep(BATCH_PAUSE);
            continue;
        };
        turn += 1;
        // Counted before the last look at `usable`: `retire` either waits for this batch or
        // this batch sees the retirement.
        shared.in_flight[target].fetch_add(1, SeqCst);
        if !shared.usable[target].load(SeqCst) {
            shared.in_flight[target].fetch_sub(1, SeqCst);
            continue;
        }
        let first = shared.next_id.fetch_add(BATCH_POINTS, SeqCst);
        if first >= LOAD_MAX_POINTS {
            shared.in_flight[target].fetch_sub(1, SeqCst);
            break;
        }
        let ids = first..first + BATCH_POINTS;
        let body: String = ids.clone().map(|id| format!("{METRIC} value={id}i {}\n", timestamp_of(id))).collect();
        let sent_at = shared.started.elapsed();
        let failure = match http.post(&shared.urls[target]).body(body).timeout(LOAD_TIMEOUT).send() {
            Ok(r) if r.status().as_u16() == 204 => None,
            Ok(r) => {
                let status = r.status().as_u16();
                Some((status.to_string(), format!("{status} {}", r.text().unwrap_or_default())))
            }
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "io"
                };
                Some((kind.to_string(), e.to_string()))
            }
        };
        match failure {
            None => {
                h.acked.extend(ids);
                h.batches_ok += 1;
                shared.batches_ok.fetch_add(1, SeqCst);
            }
            Some((kind, message)) => {
                h.maybe.extend(ids);
                h.batches_failed += 1;
                *h.failures.entry(kind).or_default() += 1;
                if h.examples.len() < 5 {
                    h.examples.push(format!("batch sent to node #{} at +{sent_at:.1?}: {message}", target + 1));
                }
            }
        }
        shared.batches_sent.fetch_add(1, SeqCst);
        shared.in_flight[target].fetch_sub(1, SeqCst);
        std::thread::sleep(BATCH_PAUSE);
    }
    h
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Samples every node's members view periodically, recording each (observer, member, state)
/// ever reported.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Samples>>,
}

#[derive(Debug, Default)]
pub struct Samples {
    /// (observer, member, state) → how many samples reported it.
    pub seen: BTreeMap<(String, String, String), u32>,
    /// observer → how many samples it answered.
    pub answered: BTreeMap<String, u32>,
}

impl Samples {
    /// Every (observer, member) that was ever reported in `state`.
    pub fn reported(&self, state: &str) -> Vec<(String, String, u32)> {
        self.seen.iter().filter(|((_, _, s), _)| s == state).map(|((o, m, _), c)| (o.clone(), m.clone(), *c)).collect()
    }
}

impl Sampler {
    pub fn start(net: &Net) -> Sampler {
        let nodes: Vec<(String, String)> =
            net.nodes.iter().map(|n| (n.id.clone(), n.url("/cluster/members"))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let http = http_client();
            let mut samples = Samples::default();
            let started = Instant::now();
            while !stop2.load(SeqCst) && started.elapsed() < LOAD_MAX_TIME * 3 {
                for (observer, url) in &nodes {
                    let Ok(list) = members(&http, url) else { continue };
                    *samples.answered.entry(observer.clone()).or_default() += 1;
                    for (id, state) in list {
                        *samples.seen.entry((observer.clone(), id, state)).or_default() += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        });
        Sampler { stop, handle: Some(handle) }
    }

    pub fn stop(mut self) -> Samples {
        self.stop.store(true, SeqCst);
        self.handle.take().unwrap().join().expect("the sampler thread panicked")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
