//! The files under deploy/ are checked against the code they deploy: the Kubernetes manifest's
//! environment is a valid config naming only real keys, its ports and grace period agree with
//! that config, the systemd unit passes `systemd-analyze verify`, and the Dockerfile builds in
//! one stage and runs as a non-root user in another.

mod common;

use std::collections::HashMap;
use std::path::Path;

/// Time a stop leaves for compacting memtables after the drain (default memtable bounds; a
/// compaction cut short only means a WAL replay at the next start).
const COMPACT_SECS: u64 = 60;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// `- { name: SHOAL_X, value: "v" }` lines of the manifest's container env (the entries
/// taken from the pod's fields are given as the test's pod would have them).
fn manifest_env(manifest: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for line in manifest.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("- { name: ") else { continue };
        let (name, rest) = rest.split_once(',').unwrap();
        let value = match rest.trim().strip_prefix("value: ") {
            Some(v) => v.trim_end_matches('}').trim().trim_matches('"').to_string(),
            None if name == "SHOAL_NODE_ID" => "shoal-0".to_string(),
            None if name == "POD_IP" => "10.1.2.3".to_string(),
            None => continue,
        };
        env.insert(name.to_string(), value);
    }
    let pod_ip = env.get("POD_IP").cloned().unwrap_or_default();
    for value in env.values_mut() {
        *value = value.replace("$(POD_IP)", &pod_ip);
    }
    env
}

/// The first number after `key:` in the manifest.
fn manifest_number(manifest: &str, key: &str) -> u64 {
    let at = manifest.find(&format!("{key}:")).unwrap_or_else(|| panic!("the manifest sets {key}"));
    let digits: String =
        manifest[at + key.len() + 1..].trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap()
}

#[test]
fn kubernetes_manifest_is_a_valid_config_whose_ports_and_grace_agree() {
    let manifest = read("deploy/kubernetes/shoal.yaml");
    let env = manifest_env(&manifest);
    assert!(env.len() >= 10, "env entries found: {env:?}");
    let unknown = shoal::config::unknown_env_vars(env.keys().map(String::as_str));
    assert!(unknown.is_empty(), "the manifest sets variables that name no config key: {unknown:?}");
    let cfg = shoal::config::Config::from_layers("", &env, &[]).expect("the manifest's environment is a valid config");
    assert_eq!(cfg.node_id, "shoal-0");
    assert_eq!(cfg.gossip_advertise.as_deref(), Some("10.1.2.3:7280"));
    assert_eq!(cfg.data_dir, Path::new("/data"));
    // The headless Service's ports are the ones the node listens on.
    assert!(manifest.contains(&format!("name: gossip, port: {}, protocol: UDP", cfg.gossip_port)));
    assert!(manifest.contains(&format!("name: http, port: {}, protocol: TCP", cfg.http_port)));
    assert!(manifest.contains(&format!("_gossip._udp.{}", "shoal.default.svc.cluster.local")));
    // SIGTERM drains open requests, then compacts: the grace period must leave time for both.
    let grace = manifest_number(&manifest, "terminationGracePeriodSeconds");
    assert!(
        grace >= COMPACT_SECS + shoal::server::DRAIN_TIMEOUT.as_secs(),
        "terminationGracePeriodSeconds {grace} leaves no time to compact after a {:?} drain",
        shoal::server::DRAIN_TIMEOUT
    );
    // One pod down at a time leaves a quorum of every shard's replicas, so writes go on.
    let unavailable = manifest_number(&manifest, "maxUnavailable") as usize;
    assert!(cfg.replication_factor - unavailable > cfg.replication_factor / 2, "a disruption breaks quorum writes");
    assert_eq!(manifest_number(&manifest, "replicas"), cfg.bootstrap_expect as u64);
    // docs/deployment.md points at the manifest rather than keeping a second copy that drifts.
    assert!(read("docs/deployment.md").contains("deploy/kubernetes/shoal.yaml"));
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("deploy/systemd/shoal.service");
    let stop: u64 = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).unwrap().parse().unwrap();
    assert!(
        stop >= COMPACT_SECS + shoal::server::DRAIN_TIMEOUT.as_secs(),
        "TimeoutStopSec {stop} is shorter than a drain plus a compaction"
    );
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        println!("SKIP systemd unit verify: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    // Verify a copy whose ExecStart is the binary under test and whose config file exists.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shoal.conf");
    std::fs::write(&config, read("config/single-node.conf")).unwrap();
    let unit = unit
        .replace("/usr/local/bin/shoal", common::BIN)
        .replace("/etc/shoal/shoal.conf", &config.display().to_string());
    let path = dir.path().join("shoal.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // Only lines about our unit count: verify also reports on the host's own units.
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("shoal.service")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {text}");
}

#[test]
fn dockerfile_builds_in_one_stage_and_runs_unprivileged_in_another() {
    let dockerfile = read("deploy/Dockerfile");
    let stages: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    assert!(stages[1].contains("slim"), "a small runtime base: {}", stages[1]);
    let runtime = &dockerfile[dockerfile.rfind("FROM ").unwrap()..];
    let user = runtime.lines().find_map(|l| l.strip_prefix("USER ")).expect("the runtime stage sets USER");
    assert!(!user.starts_with('0') && !user.starts_with("root"), "runs as root: {user}");
    assert!(runtime.contains("COPY --from=build"), "the runtime stage takes only the built binary");
    let cfg = shoal::config::Config::from_layers("", &HashMap::new(), &[]).unwrap();
    assert!(runtime.contains(&format!("EXPOSE {}/tcp {}/udp", cfg.http_port, cfg.gossip_port)));
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target"), "the build context leaves target/ out");
}
