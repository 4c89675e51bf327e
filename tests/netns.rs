//! Recovery under real faults: real `shoal` processes, each in its own network namespace joined
//! to a bridge (tests/common/netns.rs), under a Jepsen-style set load. Each case injects one
//! fault while the load writes with `consistency=one`, ends it, and then checks that
//! - every shard of the set converges: exactly RF = 2 alive replicas with equal digests and
//!   point counts (`GET /cluster/shards?verify=true`); the time from the end of the fault is
//!   printed as `FIGURE case<N>: …` for docs;
//! - the set read through every remaining node has nothing lost (acknowledged, not found),
//!   nothing duplicated and nothing unexpected (found, never sent).
//!
//! The load stops when the fault ends, so a figure is the recovery alone (hint replay, repair,
//! re-replication), not the time the last writes take to settle. Needs root (namespaces,
//! iptables): otherwise each case prints `SKIP: …`.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use common::netns::{History, LOAD_TIMEOUT, Load, Net, Sampler};
use common::wait_until;
use std::time::{Duration, Instant};

/// Node settings of every case, on top of what the harness sets (id, data dir, addresses,
/// seeds, replication factor): the one place to change them.
const COMMON_SETTINGS: &[&str] =
    &["shoal.repair.interval=2s", "shoal.hints.replay-interval=500ms", "shoal.write.consistency=one"];

/// Load before the fault is injected.
const BEFORE_FAULT: Duration = Duration::from_secs(3);
/// How long a fault is held under load once its effect has been seen and writes went on.
const FAULT_HOLD: Duration = Duration::from_secs(3);
/// Deadline for a fault's effect (a node seen dead, `left`, …) to show.
const DETECT: Duration = Duration::from_secs(30);
/// Batches the load must get acknowledged while a fault holds: with `consistency=one` one
/// node down or cut off must not stop writes through the others.
const ACKED_DURING_FAULT: u64 = 20;

fn settings(extra: &[&str]) -> Vec<String> {
    COMMON_SETTINGS.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Lets the load run (pacing, not synchronisation).
fn let_load_run(d: Duration) {
    std::thread::sleep(d);
}

/// Holds the fault under load: until the load has had `min_acked` more batches acknowledged,
/// then `hold` more.
fn hold_fault(net: &Net, load: &Load, min_acked: u64, hold: Duration) {
    let (ok, sent) = load.counts();
    wait_until(DETECT, &format!("{min_acked} batches acknowledged during the fault"), || {
        (load.counts().0 >= ok + min_acked).then_some(())
    });
    let_load_run(hold);
    let now = load.counts();
    net.say(&format!("under the fault: {} of {} batches acknowledged", now.0 - ok, now.1 - sent));
}

/// Whether `observer` lists `subject` as dead.
fn seen_dead(net: &Net, observer: usize, subject: usize) -> bool {
    net.state_seen(observer, subject).as_deref() == Some("dead")
}

/// The end checks of every case: digests converge through every node of `via` (none of the
/// replicas on `gone`), then the set checker finds nothing lost, duplicated or unexpected
/// through each of them.
fn end_checks(net: &Net, history: &History, via: &[usize], gone: &[&str], fault_end: Instant, fault: &str) {
    assert!(history.acked.len() >= 1000, "the load must get points acknowledged: {}", history.summary());
    let took = net.await_converged(via, gone, history, fault_end);
    println!("FIGURE case{}: digests equal {:.1} s after the fault ended ({fault})", net.case, took.as_secs_f64());
    net.await_set(via, history);
}

/// `kill -9` of one node under load, restarted on the same data dir: what it missed comes
/// back by hints and repair.
#[test]
fn case1_kill9_and_restart_one_of_three() {
    let Some(mut net) = Net::setup(1, 3) else { return };
    net.start_all(&settings(&[]));
    let load = Load::start(&net);
    let_load_run(BEFORE_FAULT);
    load.retire(2);
    net.kill9(2);
    wait_until(DETECT, "n1 and n2 to see n3 dead", || (seen_dead(&net, 0, 2) && seen_dead(&net, 1, 2)).then_some(()));
    hold_fault(&net, &load, ACKED_DURING_FAULT, FAULT_HOLD);
    let history = load.stop();
    net.restart(2);
    let fault_end = Instant::now();
    end_checks(&net, &history, &[0, 1, 2], &[], fault_end, "n3 restarted");
}

/// One node cut off from the other two (both ways) under load, the load still writing to all
/// three, then healed.
#[test]
fn case2_partition_one_of_three_then_heal() {
    let Some(mut net) = Net::setup(2, 3) else { return };
    net.start_all(&settings(&[]));
    let load = Load::start(&net);
    let_load_run(BEFORE_FAULT);
    net.partition(2);
    wait_until(DETECT, "both sides to see the other dead", || {
        [(0, 2), (1, 2), (2, 0), (2, 1)].iter().all(|&(o, s)| seen_dead(&net, o, s)).then_some(())
    });
    hold_fault(&net, &load, ACKED_DURING_FAULT, FAULT_HOLD);
    let history = load.stop();
    net.heal(2);
    let fault_end = Instant::now();
    net.say("healed n3");
    end_checks(&net, &history, &[0, 1, 2], &[], fault_end, "partition healed");
}

/// A one-way partition: n3 can send to its peers but receives nothing from them. Beyond the
/// end checks, no node may report any member `left` (only a leave may say that) in any sample
/// of the members views taken through the whole case.
#[test]
fn case3_one_way_partition_then_heal() {
    let Some(mut net) = Net::setup(3, 3) else { return };
    net.start_all(&settings(&[]));
    let sampler = Sampler::start(&net);
    let load = Load::start(&net);
    let_load_run(BEFORE_FAULT);
    net.partition_inbound(2);
    wait_until(DETECT, "n3 to see its peers dead", || (seen_dead(&net, 2, 0) && seen_dead(&net, 2, 1)).then_some(()));
    // n1 and n2 still hear n3 and take it for alive, so their writes to its replicas wait for
    // the replica timeout: no progress is required here, the fault is held long enough for
    // such writes to be answered.
    hold_fault(&net, &load, 0, FAULT_HOLD + LOAD_TIMEOUT);
    let history = load.stop();
    net.heal(2);
    let fault_end = Instant::now();
    net.say("healed n3");
    end_checks(&net, &history, &[0, 1, 2], &[], fault_end, "one-way partition healed");
    let samples = sampler.stop();
    for node in &net.nodes {
        let answered = samples.answered.get(&node.id).copied().unwrap_or(0);
        assert!(answered >= 10, "{} answered only {answered} members samples", node.id);
    }
    let left = samples.reported("left");
    assert!(left.is_empty(), "(observer, member, samples) reported left: {left:?}");
}

/// 5 % packet loss on every link under load: writes keep being acknowledged, nobody is
/// declared dead, and the end checks pass once the loss is gone.
#[test]
fn case4_packet_loss_on_every_link() {
    const LOSS_TIME: Duration = Duration::from_secs(15);
    let Some(mut net) = Net::setup(4, 3) else { return };
    net.start_all(&settings(&[]));
    let sampler = Sampler::start(&net);
    let load = Load::start(&net);
    let_load_run(BEFORE_FAULT);
    let before = load.counts();
    net.packet_loss(5);
    let_load_run(LOSS_TIME);
    let during = load.counts();
    let history = load.stop();
    net.heal_all();
    let fault_end = Instant::now();
    let (ok, done) = (during.0 - before.0, during.1 - before.1);
    net.say(&format!("under loss: {ok} of {done} batches acknowledged"));
    assert!(done >= 50, "the load must keep sending under loss: {done} batches in {LOSS_TIME:?}");
    assert!(ok * 10 >= done * 9, "under 5% loss only {ok} of {done} batches were acknowledged");
    end_checks(&net, &history, &[0, 1, 2], &[], fault_end, "loss removed");
    let samples = sampler.stop();
    for node in &net.nodes {
        let answered = samples.answered.get(&node.id).copied().unwrap_or(0);
        assert!(answered >= 10, "{} answered only {answered} members samples", node.id);
    }
    let dead = samples.reported("dead");
    assert!(dead.is_empty(), "(observer, member, samples) reported dead under 5% loss: {dead:?}");
}

/// Permanent loss of one of four nodes: after `replica-replace-after` its shards get a new
/// replica elsewhere, so every shard is back to 2 alive replicas without it.
#[test]
fn case5_permanent_loss_restores_rf() {
    let Some(mut net) = Net::setup(5, 4) else { return };
    net.start_all(&settings(&["shoal.cluster.replica-replace-after=3s"]));
    let load = Load::start(&net);
    let_load_run(BEFORE_FAULT);
    load.retire(3);
    net.kill9(3);
    let killed = Instant::now();
    // Writes go on while n4 is dead (its replicas miss them); the fault never ends, so the
    // figure counts from the kill and includes detection and `replica-replace-after`.
    hold_fault(&net, &load, ACKED_DURING_FAULT, FAULT_HOLD);
    let history = load.stop();
    end_checks(&net, &history, &[0, 1, 2], &["n4"], killed, "n4 killed and never restarted: counted from the kill");
}

/// `shoal leave` of one of four nodes under load: the command succeeds, the node exits, every
/// other node reports it `left`, and its shards are re-replicated onto the others.
#[test]
fn case6_leave_restores_rf() {
    let Some(mut net) = Net::setup(6, 4) else { return };
    net.start_all(&settings(&[]));
    let load = Load::start(&net);
    let_load_run(BEFORE_FAULT);
    load.retire(3);
    net.say("shoal leave n4");
    let out = net.leave(3);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    net.say(&format!("shoal leave: {}\n{stdout}{stderr}", out.status));
    assert!(out.status.success(), "shoal leave failed: {}\n{stdout}{stderr}", out.status);
    let status = net.wait_exit(3, Duration::from_secs(30));
    assert!(status.success(), "n4 exited with {status} after leaving");
    let left = Instant::now();
    let history = load.stop();
    for o in 0..3 {
        wait_until(DETECT, &format!("n{} to report n4 left", o + 1), || {
            (net.state_seen(o, 3).as_deref() == Some("left")).then_some(())
        });
    }
    end_checks(&net, &history, &[0, 1, 2], &["n4"], left, "n4 exited after `shoal leave`");
}
