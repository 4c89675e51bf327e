//! `shoal backup` of a db on a 3-node cluster (several namespaces, metrics and shards, integer
//! and decimal values, dimensions and tags, a DELETE before the backup) and `shoal restore`
//! into another cluster give the same points, compared one by one; `shoal import` loads a
//! line-protocol file in batches.

mod common;

use common::{TestNode, cluster};
use std::process::Command;

const DB: &str = "prod";
const DAY_MS: i64 = 86_400_000;

fn shoal(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Every point of a metric, each as canonical JSON, sorted.
fn points(node: &TestNode, db: &str, ns: &str, metric: &str) -> Vec<String> {
    let mut out: Vec<String> =
        node.query(db, ns, &format!("SELECT * FROM {metric}")).iter().map(|r| r.to_string()).collect();
    out.sort();
    out
}

#[test]
fn backup_of_a_cluster_restores_point_for_point_into_another_and_import_loads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = cluster(dir.path(), &["a", "b", "c"], &["shoal.cluster.replication-factor=2"]);
    let base = 1_700_000_000_000i64;
    // Three days (three shards a metric), two namespaces, two metrics.
    let metrics = [("ops", "cpu"), ("ops", "mem"), ("biz", "orders")];
    for (m, (ns, metric)) in metrics.iter().enumerate() {
        let bits: Vec<serde_json::Value> = (0..3000)
            .map(|i: i64| {
                let region = ["eu", "us", "ap"][(i % 3) as usize];
                let value =
                    if m == 0 { serde_json::json!(i * 7 + m as i64) } else { serde_json::json!(i as f64 / 8.0 + 0.25) };
                serde_json::json!({
                    "timestamp": base + (i % 3) * DAY_MS + i * 1000,
                    "value": value,
                    "dimensions": {"host": format!("h{}", i % 13), "core": i % 4, "load": (i % 5) as f64 * 0.5},
                    "tags": {"region": region},
                })
            })
            .collect();
        let chunked: Vec<_> = bits.chunks(1000).collect();
        for chunk in chunked {
            let body = serde_json::json!({"db": DB, "namespace": ns, "metric": metric, "bits": chunk});
            let (status, v) = source[(m + 1) % 3].post("/data", body.to_string());
            assert_eq!(status, 200, "{v}");
        }
    }
    // Deleted before the backup: must not come back with the restore.
    let delete = serde_json::json!({"db": DB, "namespace": "ops", "queryString": "DELETE FROM cpu WHERE host = 'h3'"});
    let (status, v) = source[0].post("/query", delete.to_string());
    assert_eq!(status, 200, "{v}");
    assert!(v["deleted"].as_u64().unwrap() > 0, "{v}");

    let backup = dir.path().join("backup");
    let (ok, stdout, stderr) = shoal(&["backup", "--node", &source[2].url(""), "--db", DB, backup.to_str().unwrap()]);
    assert!(ok, "backup failed: {stderr}");
    assert!(stdout.contains("backed up") && backup.join("manifest.json").exists(), "{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(backup.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 9, "3 metrics x 3 days: {manifest}");
    // A second backup into the same place is refused rather than mixed in.
    let (ok, _, stderr) = shoal(&["backup", "--node", &source[0].url(""), "--db", DB, backup.to_str().unwrap()]);
    assert!(!ok && stderr.contains("not empty"), "{stderr}");

    // Into another cluster (a single node, another cluster id).
    let target = TestNode::start(&dir.path().join("dst"), &["shoal.cluster.id=other"]);
    let (ok, stdout, stderr) = shoal(&["restore", "--node", &target.url(""), backup.to_str().unwrap()]);
    assert!(ok, "restore failed: {stderr}");
    assert!(stdout.contains("restored"), "{stdout}");
    for (ns, metric) in metrics {
        let before = points(&source[0], DB, ns, metric);
        let after = points(&target, DB, ns, metric);
        assert!(!before.is_empty());
        assert_eq!(before.len(), after.len(), "{ns}.{metric}: point counts differ");
        assert_eq!(before, after, "{ns}.{metric}: the restored points differ");
    }
    assert!(!points(&target, DB, "ops", "cpu").iter().any(|p| p.contains("\"h3\"")), "a deleted point came back");
    // A directory that is not a complete backup is refused with a reason.
    std::fs::remove_file(backup.join("manifest.json")).unwrap();
    let (ok, _, stderr) = shoal(&["restore", "--node", &target.url(""), backup.to_str().unwrap()]);
    assert!(!ok && stderr.contains("not a complete backup"), "{stderr}");

    // import: 25,000 lines in several batches, comments and blank lines skipped.
    let file = dir.path().join("lines.lp");
    let mut text = String::from("# DML\n# CONTEXT-DATABASE: imp\n\n");
    for i in 0..25_000 {
        text.push_str(&format!("load,host=h{} value={i}i {}\n", i % 7, 1_700_000_000 + i));
    }
    std::fs::write(&file, text).unwrap();
    let (ok, stdout, stderr) = shoal(&[
        "import",
        "--node",
        &target.url(""),
        "--db",
        "imp",
        "--namespace",
        "n",
        "--precision",
        "s",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "import failed: {stderr}");
    assert!(stdout.contains("imported 25000 lines"), "{stdout}");
    assert_eq!(target.query("imp", "n", "SELECT count(*) FROM load")[0]["value"], 25_000);
    assert_eq!(target.query("imp", "n", "SELECT sum(value) FROM load")[0]["value"], 25_000i64 * 24_999 / 2);
}
