//! One simulated run: the seed picks the cluster size, every fault and every workload step;
//! the run heals all faults, lets the cluster settle, and checks the invariants. Everything
//! happens on one thread, on tokio's paused clock, so a seed replays exactly (the trace hash
//! says so).

use crate::cluster::{Cluster, EPOCH_MS};
use crate::net::Net;
use crate::rng::Rng;
use shoal::env::Clock;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The replication factor of the simulated clusters: 2, or `SHOAL_SIM_RF` (a run with 3
/// explores quorums of 2 of 3 and two crashes at once).
pub fn rf() -> usize {
    static RF: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *RF.get_or_init(|| match std::env::var("SHOAL_SIM_RF") {
        Ok(v) => v.parse().ok().filter(|rf| (1..=5).contains(rf)).expect("SHOAL_SIM_RF is 1 to 5"),
        Err(_) => 2,
    })
}
/// Simulated time of the workload with faults.
const CHAOS: Duration = Duration::from_secs(40);
/// Longest the cluster gets to settle after the faults are healed.
const SETTLE_MAX: Duration = Duration::from_secs(120);
const METRICS: [&str; 3] = ["m0", "m1", "m2"];
const HOUR_MS: i64 = 3_600_000;

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub trace_hash: u64,
    /// Invariants violated, the first one first.
    pub violations: Vec<String>,
    /// Simulated milliseconds the run covered.
    pub sim_ms: u64,
    /// Simulated milliseconds from the heal until every check passed (None if never).
    pub settled_after_ms: Option<u64>,
    /// The seed never finished: its thread still spins.
    pub hung: bool,
}

/// The ordered events of a run; their hash is the run's fingerprint.
struct Trace {
    start: tokio::time::Instant,
    hash: u64,
    verbose: bool,
}

impl Trace {
    fn event(&mut self, text: impl AsRef<str>) {
        let line = format!("{:>8} {}", self.start.elapsed().as_millis(), text.as_ref());
        for b in line.bytes().chain([b'\n']) {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        if self.verbose {
            println!("{line}");
        }
    }
}

/// Real time a seed may take before it counts as hung: a task that spins without yielding
/// stops the simulated clock, so only a wall-clock watchdog can see it.
const SEED_REAL_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs one seed on a fresh thread and runtime (so thread-local generators and hash keys are
/// drawn after the reseed). A panic, or a seed still running after [`SEED_REAL_TIME_MAX`], is
/// reported as a violation; a hung seed's thread is left behind, so the caller should stop.
pub fn run_seed(seed: u64, verbose: bool) -> Report {
    crate::entropy::reseed(seed);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("sim-{seed}"))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .start_paused(true)
                    .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
                    .build()
                    .expect("a runtime");
                runtime.block_on(simulate(seed, verbose))
            });
            let _ = tx.send(outcome);
        })
        .expect("a thread");
    let failed = |violation: String| Report {
        seed,
        trace_hash: 0,
        violations: vec![violation],
        sim_ms: 0,
        settled_after_ms: None,
        hung: false,
    };
    match rx.recv_timeout(SEED_REAL_TIME_MAX) {
        Ok(Ok(report)) => report,
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed(format!("panic: {message}"))
        }
        Err(_) => Report {
            hung: true,
            ..failed(format!("hung: still running after {} s of real time", SEED_REAL_TIME_MAX.as_secs()))
        },
    }
}

/// A fault in force, and when it ends.
#[derive(Debug, Clone)]
enum Fault {
    Partition(usize),
    OneWay(usize),
    Loss,
    Latency,
    Duplicate,
    Crash(usize),
    /// The process stops being scheduled (a long GC pause, SIGSTOP): nothing in or out, but
    /// nothing lost either.
    Pause(usize),
    Skew(usize),
    /// Every write on the node's disk stores a random prefix and fails, until space is freed.
    DiskFull(usize),
    /// SIGTERM, then a start again when the fault ends: a restart, not a leave.
    Restart(usize),
}

/// The acknowledged and attempted points (by their unique value).
#[derive(Default)]
struct History {
    /// Metric and host tag (`NO_HOST` for points written without one) of every point sent.
    attempted: BTreeMap<i64, (&'static str, u64)>,
    /// When each acknowledged point was acknowledged.
    acked: BTreeMap<i64, tokio::time::Instant>,
    /// Points a DROP or DELETE removed for certain: they must never be returned again.
    gone: BTreeSet<i64>,
    /// Points a DROP or DELETE may or may not have removed (the request failed, or the point
    /// was acknowledged too close to it): neither required nor forbidden.
    uncertain: BTreeSet<i64>,
    /// Each point's write time as its coordinator stamps it: between that node's clock when
    /// the request was sent and when it was answered (clock skew faults included).
    stamps: BTreeMap<i64, (i64, i64)>,
    /// Deletes that may have taken effect (all but 404s): metric, host and the range of the
    /// coordinator's clock the delete was stamped in.
    deletes: Vec<(&'static str, u64, (i64, i64))>,
    next_id: i64,
}

const NO_HOST: u64 = u64::MAX;
async fn simulate(seed: u64, verbose: bool) -> Report {
    let mut trace = Trace { start: tokio::time::Instant::now(), hash: 0xcbf2_9ce4_8422_2325, verbose };
    crate::disk::reset(seed);
    let mut script = Rng::derive(seed, "script");
    let mut load = Rng::derive(seed, "workload");
    let net = Net::new(seed);
    let settings: Vec<String> = [
        format!("shoal.cluster.replication-factor={}", rf()),
        "shoal.gossip.interval=100ms".into(),
        "shoal.repair.interval=3s".into(),
        "shoal.hints.replay-interval=500ms".into(),
        "shoal.cluster.replica-replace-after=15s".into(),
        "shoal.cluster.capacity-interval=1s".into(),
        "shoal.sharding.interval=1h".into(),
        "shoal.storage.memtable-max-points=300".into(),
        // Below what the shards of a node hold together: memtables compacted for the budget too.
        "shoal.storage.memtable-budget-points=500".into(),
        "shoal.storage.flush-interval=5s".into(),
        "shoal.log-level=warn".into(),
    ]
    .into();
    let mut cluster = Cluster::new(net.clone(), settings).expect("a temp dir");
    let size = 3 + script.below(3) as usize;
    trace.event(format!("seed {seed}: {size} nodes, RF {}", rf()));
    for _ in 0..size {
        let capacity = script.between(20, 90) as f64 / 100.0;
        cluster.add_node(capacity).await.expect("a node starts");
        tokio::time::sleep(Duration::from_millis(script.between(0, 300))).await;
    }
    let mut violations = Vec::new();
    let formed = async {
        for _ in 0..40 {
            if membership_agrees(&cluster).await.is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    };
    if !formed.await {
        violations.push("the cluster did not form".to_string());
    }
    trace.event("formed");

    // The chaos phase: workload steps and faults, all chosen by the seed.
    let mut history = History::default();
    let mut active: Vec<(Fault, tokio::time::Instant)> = Vec::new();
    let chaos_end = tokio::time::Instant::now() + CHAOS;
    while tokio::time::Instant::now() < chaos_end {
        tokio::time::sleep(Duration::from_millis(load.between(50, 400))).await;
        // Faults whose time is up end.
        let now = tokio::time::Instant::now();
        let (ended, kept): (Vec<_>, Vec<_>) = active.into_iter().partition(|(_, until)| *until <= now);
        active = kept;
        for (fault, _) in ended {
            violations.extend(end_fault(&mut cluster, &fault, &mut trace).await);
        }
        let roll = load.below(100);
        if roll < 55 {
            insert(&cluster, &mut load, &mut history, &mut trace).await;
        } else if roll < 70 {
            if let Some(v) = query_check(&cluster, &mut load, &history, &mut trace).await {
                violations.push(v);
            }
        } else if roll < 75 {
            schema_change(&cluster, &mut load, &mut history, &mut trace).await;
        } else if roll < 78 {
            delete(&cluster, &mut load, &mut history, &mut trace).await;
        } else if roll < 79 {
            drop_metric(&cluster, &mut load, &mut history, &mut trace).await;
        } else if roll < 88 && active.len() < 2 {
            if let Some(fault) = start_fault(&mut cluster, &mut script, &active, &mut trace).await {
                let until = tokio::time::Instant::now() + Duration::from_millis(script.between(1_000, 12_000));
                active.push((fault, until));
            }
        } else if roll < 90 && cluster.nodes.len() < 7 {
            let capacity = script.between(20, 90) as f64 / 100.0;
            match cluster.add_node(capacity).await {
                Ok(i) => trace.event(format!("join n{i}")),
                Err(e) => violations.push(format!("a joining node failed to start: {e}")),
            }
        } else if roll < 91 {
            // A leave, when enough storage nodes stay for RF with one spare.
            let live: Vec<usize> = cluster.live();
            let crashed = cluster.nodes.iter().any(|n| n.node.is_none() && !n.left);
            if live.len() > rf() + 1 && !crashed && active.is_empty() {
                let idx = *script.pick(&live).expect("live nodes");
                trace.event(format!("leave n{idx}"));
                if let Err(e) = cluster.leave(idx).await {
                    trace.event(format!("leave n{idx}: {e}"));
                }
            }
        }
    }

    // Heal everything, restart what crashed, and let the cluster settle.
    for (fault, _) in active.drain(..) {
        violations.extend(end_fault(&mut cluster, &fault, &mut trace).await);
    }
    trace.event(format!("healed; {} acknowledged of {} attempted", history.acked.len(), history.attempted.len()));
    let healed_at = tokio::time::Instant::now();
    let settle_deadline = healed_at + SETTLE_MAX;
    let final_check = loop {
        let found = all_checks(&cluster, &history).await;
        if found.is_empty() || tokio::time::Instant::now() >= settle_deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let settled_after_ms = final_check.is_empty().then(|| healed_at.elapsed().as_millis() as u64);
    trace.event(format!("settled after {settled_after_ms:?} ms"));
    violations.extend(final_check);
    let stats = net.with(|n| n.stats);
    trace.event(format!("net {stats:?}"));
    for node in cluster.live() {
        let n = cluster.nodes[node].node.as_ref().expect("live");
        trace.event(format!("n{node} catalog {:016x} shards {}", n.catalog.digest(), n.storage.shard_count()));
    }
    Report {
        seed,
        trace_hash: trace.hash,
        violations,
        sim_ms: trace.start.elapsed().as_millis() as u64,
        settled_after_ms,
        hung: false,
    }
}

async fn insert(cluster: &Cluster, load: &mut Rng, history: &mut History, trace: &mut Trace) {
    let Some(&via) = load.pick(&cluster.live()) else { return };
    let metric = *load.pick(&METRICS).expect("metrics");
    let consistency = *load.pick(&["one", "quorum", "all"]).expect("levels");
    let count = load.between(1, 20);
    let mut lines = String::new();
    let mut ids = Vec::new();
    for _ in 0..count {
        let id = history.next_id;
        history.next_id += 1;
        let ts = EPOCH_MS - 3 * HOUR_MS + load.below(4 * HOUR_MS as u64) as i64;
        let host = load.below(5);
        lines.push_str(&format!("{metric},host=h{host} value={id}i {ts}\n"));
        history.attempted.insert(id, (metric, host));
        ids.push(id);
    }
    let uri = format!("/write?db=sim&namespace=ns&precision=ms&consistency={consistency}");
    let stale = behind_a_drop(cluster, via, metric);
    let sent_ms = cluster.nodes[via].clock.now_ms();
    let (status, _) = cluster.request(via, "POST", &uri, lines).await;
    let stamp = (sent_ms, cluster.nodes[via].clock.now_ms());
    for id in &ids {
        history.stamps.insert(*id, stamp);
        let (metric, host) = history.attempted[id];
        // Stamped no later than a DELETE that matches it (a clock behind, or at the same
        // time): that DELETE may take it.
        if history.deletes.iter().any(|(m, h, at)| *m == metric && *h == host && stamp.0 <= at.1) {
            history.uncertain.insert(*id);
        }
    }
    if status == 204 {
        let now = tokio::time::Instant::now();
        history.acked.extend(ids.iter().map(|id| (*id, now)));
        if stale {
            history.uncertain.extend(ids.iter().copied());
        }
    }
    trace.event(format!(
        "insert n{via} {metric} {count} points {consistency} -> {status} (ids {}..={})",
        ids[0],
        ids[ids.len() - 1]
    ));
}

/// Whether node `via` has not heard yet of a drop of `metric` that another node made: a write
/// it accepts now is concurrent with that drop (the node was cut off when it ran), and goes
/// when the drop reaches it.
fn behind_a_drop(cluster: &Cluster, via: usize, metric: &str) -> bool {
    let key = shoal::model::MetricKey::new("sim", "ns", metric).expect("a valid key");
    let epoch = |i: usize| cluster.nodes[i].node.as_ref().map_or(0, |n| n.catalog.drop_epoch(&key));
    cluster.live().into_iter().any(|i| epoch(i) > epoch(via))
}

/// Every value a node returns for `metric`, or None if the query failed.
async fn values(cluster: &Cluster, via: usize, metric: &str) -> Option<Vec<i64>> {
    let body = serde_json::json!({"db": "sim", "namespace": "ns", "queryString": format!("SELECT * FROM {metric} LIMIT 10000000")});
    let (status, v) = cluster.request(via, "POST", "/query", body.to_string()).await;
    if status == 404 {
        return Some(Vec::new());
    }
    (status == 200).then(|| v["records"].as_array().map(|r| r.iter().filter_map(|x| x["value"].as_i64()).collect()))?
}

async fn query_check(cluster: &Cluster, load: &mut Rng, history: &History, trace: &mut Trace) -> Option<String> {
    let &via = load.pick(&cluster.live())?;
    let metric = *load.pick(&METRICS).expect("metrics");
    let found = values(cluster, via, metric).await;
    trace.event(format!("query n{via} {metric} -> {:?}", found.as_ref().map(Vec::len)));
    let unexpected: Vec<i64> =
        found?.into_iter().filter(|v| history.attempted.get(v).is_none_or(|(m, _)| *m != metric)).take(5).collect();
    (!unexpected.is_empty()).then(|| format!("point returned that was never written: {metric} {unexpected:?}"))
}

/// A new field (a dimension with a random type) on a metric: the first type wins, a later
/// contradicting one is a 400.
async fn schema_change(cluster: &Cluster, load: &mut Rng, history: &mut History, trace: &mut Trace) {
    let Some(&via) = load.pick(&cluster.live()) else { return };
    let metric = *load.pick(&METRICS).expect("metrics");
    let id = history.next_id;
    history.next_id += 1;
    let field = format!("d{}", load.below(3));
    let value = if load.chance(0.5) { serde_json::json!(load.below(10)) } else { serde_json::json!("x") };
    let ts = EPOCH_MS - 3 * HOUR_MS + load.below(4 * HOUR_MS as u64) as i64;
    let body = serde_json::json!({"db": "sim", "namespace": "ns", "metric": metric,
        "bit": {"timestamp": ts, "value": id, "dimensions": {field.clone(): value}, "tags": {}}});
    history.attempted.insert(id, (metric, NO_HOST));
    // `/data` answers 200 with the count of points stored.
    let stale = behind_a_drop(cluster, via, metric);
    let (status, _) = cluster.request(via, "POST", "/data", body.to_string()).await;
    if status == 200 {
        history.acked.insert(id, tokio::time::Instant::now());
        if stale {
            history.uncertain.insert(id);
        }
    }
    trace.event(format!("schema n{via} {metric}.{field}={value} -> {status}"));
}

/// `DELETE FROM m WHERE host = 'hK'`: on success the matching points acknowledged with a write
/// time before it are gone for good; those whose write time may fall after it are uncertain,
/// and those written after it by the clocks must stay.
async fn delete(cluster: &Cluster, load: &mut Rng, history: &mut History, trace: &mut Trace) {
    let Some(&via) = load.pick(&cluster.live()) else { return };
    let metric = *load.pick(&METRICS).expect("metrics");
    let host = load.below(5);
    let sql = format!("DELETE FROM {metric} WHERE host = 'h{host}'");
    let body = serde_json::json!({"db": "sim", "namespace": "ns", "queryString": sql});
    let sent_ms = cluster.nodes[via].clock.now_ms();
    let (status, _) = cluster.request(via, "POST", "/query", body.to_string()).await;
    let at = (sent_ms, cluster.nodes[via].clock.now_ms());
    let matching: Vec<i64> =
        history.attempted.iter().filter(|(_, (m, h))| *m == metric && *h == host).map(|(id, _)| *id).collect();
    // A 404 (the metric does not exist yet) removes nothing. A failed DELETE may have reached
    // some replicas, and spreads from there.
    if status == 404 {
        trace.event(format!("delete n{via} {metric} h{host} -> {status}"));
        return;
    }
    history.deletes.push((metric, host, at));
    for id in matching {
        let Some(&(lo, hi)) = history.stamps.get(&id) else { continue };
        if hi < at.0 {
            // Written before the DELETE by the clocks (points carry their write time, and a
            // DELETE removes what was written up to it): gone for good once it succeeded.
            if status == 200 && history.acked.contains_key(&id) {
                history.gone.insert(id);
                history.uncertain.remove(&id);
            } else if !history.gone.contains(&id) {
                history.uncertain.insert(id);
            }
        } else if lo <= at.1 && !history.gone.contains(&id) {
            history.uncertain.insert(id);
        }
        // Stamped after it (a clock ahead): the DELETE leaves it.
    }
    trace.event(format!("delete n{via} {metric} h{host} -> {status}"));
}

/// Drops a metric: on success every point of it sent so far is gone; on an error they are
/// uncertain. Points written afterwards belong to the metric created again.
async fn drop_metric(cluster: &Cluster, load: &mut Rng, history: &mut History, trace: &mut Trace) {
    let Some(&via) = load.pick(&cluster.live()) else { return };
    let metric = *load.pick(&METRICS).expect("metrics");
    let (status, _) = cluster.request(via, "DELETE", &format!("/commands/sim/ns/{metric}"), String::new()).await;
    let of_metric: Vec<i64> = history.attempted.iter().filter(|(_, (m, _))| *m == metric).map(|(id, _)| *id).collect();
    for id in of_metric {
        if status == 200 {
            history.gone.insert(id);
            history.uncertain.remove(&id);
        } else if status != 404 && !history.gone.contains(&id) {
            history.uncertain.insert(id);
        }
    }
    trace.event(format!("drop n{via} {metric} -> {status}"));
}

async fn start_fault(
    cluster: &mut Cluster,
    script: &mut Rng,
    active: &[(Fault, tokio::time::Instant)],
    trace: &mut Trace,
) -> Option<Fault> {
    let live = cluster.live();
    let busy: BTreeSet<usize> = active
        .iter()
        .filter_map(|(f, _)| match f {
            Fault::Partition(i)
            | Fault::OneWay(i)
            | Fault::Crash(i)
            | Fault::Pause(i)
            | Fault::Skew(i)
            | Fault::DiskFull(i)
            | Fault::Restart(i) => Some(*i),
            _ => None,
        })
        .collect();
    let free: Vec<usize> = live.iter().copied().filter(|i| !busy.contains(i)).collect();
    // At most RF - 1 nodes crashed at once, so acknowledged points always keep a replica.
    let crashed = cluster.nodes.iter().filter(|n| n.node.is_none() && !n.left).count();
    let fault = match script.below(10) {
        0 => Fault::Partition(*script.pick(&free)?),
        1 => Fault::OneWay(*script.pick(&free)?),
        2 => Fault::Loss,
        3 => Fault::Latency,
        4 => Fault::Duplicate,
        5 if crashed < rf() - 1 && live.len() > rf() => Fault::Crash(*script.pick(&free)?),
        6 => Fault::Skew(*script.pick(&free)?),
        7 => Fault::Pause(*script.pick(&free)?),
        8 => Fault::DiskFull(*script.pick(&free)?),
        9 if crashed < rf() - 1 && live.len() > rf() => Fault::Restart(*script.pick(&free)?),
        _ => return None,
    };
    if active.iter().any(|(f, _)| std::mem::discriminant(f) == std::mem::discriminant(&fault)) {
        return None;
    }
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    match &fault {
        Fault::Partition(i) => cluster.net.with(|n| {
            for &j in all.iter().filter(|j| *j != i) {
                n.faults.cut.insert((*i, j));
                n.faults.cut.insert((j, *i));
            }
        }),
        Fault::OneWay(i) => cluster.net.with(|n| {
            for &j in all.iter().filter(|j| *j != i) {
                n.faults.cut.insert((j, *i));
            }
        }),
        Fault::Loss => {
            let p = script.between(0, 50) as f64 / 100.0;
            cluster.net.with(|n| n.faults.loss = p);
            trace.event(format!("fault loss {p}"));
        }
        Fault::Latency => {
            let hi = script.between(10, 400);
            cluster.net.with(|n| n.faults.latency_ms = (1, hi));
            trace.event(format!("fault latency 1..{hi} ms"));
        }
        Fault::Duplicate => cluster.net.with(|n| n.faults.duplicate = 0.3),
        Fault::Crash(i) => {
            let lost = cluster.crash(*i).await;
            trace.event(format!("crash n{i}: {lost}"));
        }
        Fault::Restart(i) => cluster.stop(*i).await,
        Fault::DiskFull(i) => crate::disk::set_full(&cluster.nodes[*i].dir, true),
        Fault::Pause(i) => {
            cluster.net.with(|n| n.down.insert(*i));
        }
        Fault::Skew(i) => {
            let skew = script.between(0, 60_000) as i64 - 30_000;
            cluster.nodes[*i].clock.skew_ms.store(skew, std::sync::atomic::Ordering::Relaxed);
            trace.event(format!("fault skew n{i} {skew} ms"));
        }
    }
    trace.event(format!("fault start {fault:?}"));
    Some(fault)
}

/// Ends `fault`; a node that cannot start again after a crash or a restart is a violation
/// (its data dir is what a real power cut or SIGTERM leaves behind).
async fn end_fault(cluster: &mut Cluster, fault: &Fault, trace: &mut Trace) -> Option<String> {
    let mut violation = None;
    match fault {
        Fault::Partition(_) | Fault::OneWay(_) => cluster.net.with(|n| n.faults.cut.clear()),
        Fault::Loss => cluster.net.with(|n| n.faults.loss = 0.0),
        Fault::Latency => cluster.net.with(|n| n.faults.latency_ms = (1, 5)),
        Fault::Duplicate => cluster.net.with(|n| n.faults.duplicate = 0.0),
        Fault::Crash(i) | Fault::Restart(i) => {
            if let Err(e) = cluster.start(*i).await {
                // The error names files under the seed's temporary dir, which differs per run.
                let e = e.to_string().replace(&cluster.nodes[*i].dir.display().to_string(), "<dir>");
                trace.event(format!("restart n{i} failed: {e}"));
                violation = Some(format!("n{i} failed to restart after {fault:?}: {e}"));
            }
        }
        Fault::Pause(i) => {
            cluster.net.with(|n| n.down.remove(i));
        }
        Fault::Skew(i) => cluster.nodes[*i].clock.skew_ms.store(0, std::sync::atomic::Ordering::Relaxed),
        Fault::DiskFull(i) => crate::disk::set_full(&cluster.nodes[*i].dir, false),
    }
    trace.event(format!("fault end {fault:?}"));
    violation
}

/// None when every live node sees every other live node alive (and left nodes not alive).
async fn membership_agrees(cluster: &Cluster) -> Option<String> {
    let live: BTreeSet<String> = cluster.live().iter().map(|&i| cluster.nodes[i].id.clone()).collect();
    for &i in &cluster.live() {
        let members = cluster.nodes[i].node.as_ref()?.members().await;
        let alive: BTreeSet<String> =
            members.iter().filter(|m| m.state == shoal::membership::Liveness::Alive).map(|m| m.id.clone()).collect();
        if alive != live {
            return Some(format!("membership disagrees: n{i} sees alive {alive:?}, live are {live:?}"));
        }
    }
    None
}

/// None when all catalogs are equal and every shard has RF live replicas with equal digests.
async fn converged(cluster: &Cluster) -> Option<String> {
    let live = cluster.live();
    let nodes: Vec<&std::sync::Arc<shoal::node::Node>> =
        live.iter().filter_map(|&i| cluster.nodes[i].node.as_ref()).collect();
    let first = nodes.first()?;
    if let Some(n) = nodes.iter().find(|n| n.catalog.digest() != first.catalog.digest()) {
        return Some(format!("catalogs differ: {} and {}", first.cfg.node_id, n.cfg.node_id));
    }
    let live_ids: BTreeSet<&str> = nodes.iter().map(|n| n.cfg.node_id.as_str()).collect();
    let interval = first.shard_interval_ms();
    for (shard, replicas) in first.catalog.placement() {
        let on_live: Vec<&String> = replicas.iter().filter(|r| live_ids.contains(r.as_str())).collect();
        if on_live.len() < rf() || on_live.len() != replicas.len() {
            return Some(format!(
                "shard {shard} has replicas {replicas:?}, {} of them live, RF {}",
                on_live.len(),
                rf()
            ));
        }
        let mut digests = BTreeSet::new();
        for r in &on_live {
            let node = nodes.iter().find(|n| &n.cfg.node_id == *r)?;
            let blocks = match node.storage.shard_if_held(&shard) {
                Some(s) => s.digests(shard.start, shard.start + interval, interval).ok()?,
                None => Vec::new(),
            };
            digests.insert(shoal::storage::BlockDigest::total(&blocks));
        }
        if digests.len() != 1 {
            return Some(format!("shard {shard}: replicas {on_live:?} differ: {digests:?}"));
        }
    }
    None
}

/// Every end-of-run invariant; empty when all hold.
async fn all_checks(cluster: &Cluster, history: &History) -> Vec<String> {
    let mut found: Vec<String> = membership_agrees(cluster).await.into_iter().collect();
    found.extend(converged(cluster).await);
    found.extend(check_points(cluster, history).await);
    found.extend(check_bounds(cluster).await);
    found
}

/// Through every live node: no acknowledged point lost, none duplicated, none unexpected.
async fn check_points(cluster: &Cluster, history: &History) -> Vec<String> {
    let mut violations = Vec::new();
    for &via in &cluster.live() {
        for metric in METRICS {
            let Some(found) = values(cluster, via, metric).await else {
                violations.push(format!("query of {metric} through n{via} failed after the heal"));
                continue;
            };
            let mut seen = BTreeMap::new();
            for v in &found {
                *seen.entry(*v).or_insert(0) += 1;
            }
            let lost: Vec<i64> = history
                .acked
                .keys()
                .filter(|id| history.attempted.get(id).is_some_and(|(m, _)| *m == metric) && !seen.contains_key(id))
                .filter(|id| !history.gone.contains(id) && !history.uncertain.contains(id))
                .copied()
                .collect();
            let duplicated: Vec<i64> = seen.iter().filter(|(_, n)| **n > 1).map(|(v, _)| *v).collect();
            let unexpected: Vec<i64> = seen
                .keys()
                .filter(|v| history.attempted.get(v).is_none_or(|(m, _)| *m != metric) || history.gone.contains(v))
                .copied()
                .collect();
            if !lost.is_empty() {
                violations.push(format!(
                    "acknowledged points lost through n{via}: {metric} {} e.g. {:?}",
                    lost.len(),
                    &lost[..lost.len().min(5)]
                ));
            }
            if !duplicated.is_empty() {
                violations.push(format!(
                    "points duplicated through n{via}: {metric} {:?}",
                    &duplicated[..duplicated.len().min(5)]
                ));
            }
            if !unexpected.is_empty() {
                violations.push(format!(
                    "points never written, or deleted or dropped, returned through n{via}: {metric} {:?}",
                    &unexpected[..unexpected.len().min(5)]
                ));
            }
        }
    }
    violations
}

/// Hint stores within their bound.
async fn check_bounds(cluster: &Cluster) -> Vec<String> {
    let mut violations = Vec::new();
    for &i in &cluster.live() {
        let node = cluster.nodes[i].node.as_ref().expect("live");
        let status = node.status();
        for entry in status["hints_pending_bytes"].as_array().into_iter().flatten() {
            let bytes = entry[1].as_u64().unwrap_or(0);
            if bytes > node.cfg.hints_bytes_max_per_node {
                violations.push(format!("n{i} keeps {bytes} bytes of hints, above the bound"));
            }
        }
        // The memtable budget's count is every shard's memtable, whatever compactions failed.
        let counted = node.metrics.memtable_points.load(std::sync::atomic::Ordering::Relaxed);
        let held: u64 = node.storage.all_shards().iter().map(|s| s.memtable_points()).sum();
        if counted != held {
            violations.push(format!("n{i} counts {counted} points in memtables, which hold {held}"));
        }
    }
    violations
}
