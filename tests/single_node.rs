//! A single real `shoal` process: ingest through both endpoints, every query construct checked
//! against answers computed here independently, the same answers after a restart, and a table
//! of bad inputs each answered with the right status and a message naming the problem.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use common::TestNode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

const DB: &str = "db";
const NS: &str = "ns";
const T0: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

/// One generated point, as the test knows it.
#[derive(Clone, Debug)]
struct P {
    ts: i64,
    value: i64,
    region: &'static str,
    host: Option<String>,
}

fn dataset() -> Vec<P> {
    let regions = ["eu", "us", "ap"];
    let mut seed: u64 = 42;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    (0..3000)
        .map(|i| P {
            // Out of order, across ~30 one-hour shards, with duplicate timestamps.
            ts: T0 + (next() % (30 * HOUR as u64)) as i64 / 1000 * 1000,
            value: (next() % 201) as i64 - 100,
            region: regions[(next() % 3) as usize],
            host: (i % 3 != 0).then(|| format!("h{}", next() % 7)),
        })
        .collect()
}

fn load(node: &TestNode, points: &[P]) {
    // Points with a host go through NSDb JSON (dimensions); the rest through line protocol.
    let (with_host, without): (Vec<&P>, Vec<&P>) = points.iter().partition(|p| p.host.is_some());
    for chunk in with_host.chunks(400) {
        let bits: Vec<Value> = chunk
            .iter()
            .map(|p| json!({"timestamp": p.ts, "value": p.value, "tags": {"region": p.region}, "dimensions": {"host": p.host}}))
            .collect();
        let body = json!({"db": DB, "namespace": NS, "metric": "cpu", "bits": bits}).to_string();
        let (status, v) = node.post("/data", body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["points"], chunk.len());
    }
    for chunk in without.chunks(400) {
        let body: String =
            chunk.iter().map(|p| format!("cpu,region={} value={}i {}\n", p.region, p.value, p.ts)).collect();
        let (status, v) = node.post(&format!("/write?db={DB}&namespace={NS}&precision=ms"), body);
        assert_eq!(status, 204, "{v}");
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn assert_close(sql: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{sql}: got {got}, want {want}");
}

/// Expected aggregate over a group of points, computed the obvious way.
fn agg(f: &str, ps: &[&P]) -> f64 {
    let vals: Vec<i64> = ps.iter().map(|p| p.value).collect();
    let first_last = |last: bool| {
        let mut sorted: Vec<(i64, i64)> = ps.iter().map(|p| (p.ts, p.value)).collect();
        sorted.sort();
        if last { sorted.last().unwrap().1 as f64 } else { sorted[0].1 as f64 }
    };
    match f {
        "count" => vals.len() as f64,
        "sum" => vals.iter().sum::<i64>() as f64,
        "min" => *vals.iter().min().unwrap() as f64,
        "max" => *vals.iter().max().unwrap() as f64,
        "avg" => vals.iter().sum::<i64>() as f64 / vals.len() as f64,
        "first" => first_last(false),
        "last" => first_last(true),
        _ => unreachable!(),
    }
}

/// Runs every construct and compares with the oracle. Returns the raw answers for restart checks.
fn check_queries(node: &TestNode, points: &[P]) -> Vec<Vec<Value>> {
    let mut answers = Vec::new();
    let mut q = |sql: &str| {
        let r = node.query(DB, NS, sql);
        answers.push(r.clone());
        r
    };
    let all: Vec<&P> = points.iter().collect();

    // Plain aggregates.
    for f in ["count", "sum", "min", "max", "avg", "first", "last"] {
        let sql = format!("SELECT {f}(value) FROM cpu");
        let r = q(&sql);
        assert_eq!(r.len(), 1, "{sql}");
        assert_close(&sql, num(&r[0]["value"]), agg(f, &all));
    }
    let r = q("SELECT count(*) FROM cpu");
    assert_eq!(r[0]["value"], points.len());

    // GROUP BY tag, for every aggregate.
    let mut by_region: BTreeMap<&str, Vec<&P>> = BTreeMap::new();
    points.iter().for_each(|p| by_region.entry(p.region).or_default().push(p));
    for f in ["count", "sum", "min", "max", "avg", "first", "last"] {
        let sql = format!("SELECT {f}(value) FROM cpu GROUP BY region");
        let r = q(&sql);
        assert_eq!(r.len(), by_region.len(), "{sql}");
        for rec in &r {
            let region = rec["tags"]["region"].as_str().unwrap();
            assert_close(&sql, num(&rec["value"]), agg(f, &by_region[region]));
        }
    }

    // count(distinct …) on a tag and on a dimension.
    let r = q("SELECT count(distinct region) FROM cpu");
    assert_eq!(r[0]["value"], 3);
    let hosts: BTreeSet<&String> = points.iter().filter_map(|p| p.host.as_ref()).collect();
    let r = q("SELECT count(distinct host) FROM cpu");
    assert_eq!(r[0]["value"], hosts.len());
    let r = q("SELECT count(distinct host) FROM cpu GROUP BY region");
    for rec in &r {
        let region = rec["tags"]["region"].as_str().unwrap();
        let want: BTreeSet<_> = by_region[region].iter().filter_map(|p| p.host.as_ref()).collect();
        assert_eq!(rec["value"], want.len());
    }

    // GROUP BY INTERVAL: epoch-aligned buckets, timestamp = upper bound.
    for (sql_unit, width) in [("1h", HOUR), ("90m", 90 * 60_000), ("1d", 24 * HOUR)] {
        let sql = format!("SELECT sum(value) FROM cpu GROUP BY INTERVAL {sql_unit}");
        let r = q(&sql);
        let mut want: BTreeMap<i64, i64> = BTreeMap::new();
        points.iter().for_each(|p| *want.entry(p.ts.div_euclid(width) * width).or_default() += p.value);
        assert_eq!(r.len(), want.len(), "{sql}");
        for (rec, (lower, sum)) in r.iter().zip(&want) {
            assert_eq!(rec["dimensions"]["lowerBound"], *lower, "{sql}");
            assert_eq!(rec["dimensions"]["upperBound"], lower + width, "{sql}");
            assert_eq!(rec["timestamp"], lower + width, "{sql}");
            assert_eq!(rec["value"], *sum, "{sql}");
        }
    }
    let r = q(&format!("SELECT avg(value) FROM cpu WHERE timestamp >= {} GROUP BY INTERVAL 2h", T0 + 10 * HOUR));
    let want_buckets: BTreeSet<i64> =
        points.iter().filter(|p| p.ts >= T0 + 10 * HOUR).map(|p| p.ts.div_euclid(2 * HOUR) * 2 * HOUR).collect();
    assert_eq!(r.len(), want_buckets.len());

    // WHERE: each operator against the oracle, via count(*).
    type Pred = Box<dyn Fn(&P) -> bool>;
    let mid = T0 + 15 * HOUR;
    let cases: Vec<(String, Pred)> = vec![
        ("region = 'eu'".into(), Box::new(|p: &P| p.region == "eu")),
        ("region != 'eu'".into(), Box::new(|p: &P| p.region != "eu")),
        ("value > 10".into(), Box::new(|p: &P| p.value > 10)),
        ("value >= 10".into(), Box::new(|p: &P| p.value >= 10)),
        ("value < -50".into(), Box::new(|p: &P| p.value < -50)),
        ("value <= -50".into(), Box::new(|p: &P| p.value <= -50)),
        ("value > 2.5".into(), Box::new(|p: &P| p.value as f64 > 2.5)),
        ("-5 > value".into(), Box::new(|p: &P| p.value < -5)),
        (format!("timestamp < {mid}"), Box::new(move |p: &P| p.ts < mid)),
        (format!("timestamp >= {mid} AND value > 0"), Box::new(move |p: &P| p.ts >= mid && p.value > 0)),
        ("region = 'eu' OR value = 0".into(), Box::new(|p: &P| p.region == "eu" || p.value == 0)),
        ("NOT region = 'us'".into(), Box::new(|p: &P| p.region != "us")),
        ("host LIKE 'h1%'".into(), Box::new(|p: &P| p.host.as_deref().is_some_and(|h| h.starts_with("h1")))),
        ("host NOT LIKE 'h_'".into(), Box::new(|p: &P| p.host.as_deref().is_some_and(|h| h.len() != 2))),
        ("region IN ('eu', 'ap')".into(), Box::new(|p: &P| p.region != "us")),
        ("region NOT IN ('eu')".into(), Box::new(|p: &P| p.region != "eu")),
        ("host IS NULL".into(), Box::new(|p: &P| p.host.is_none())),
        (
            "host IS NOT NULL AND (value < 0 OR region = 'ap')".into(),
            Box::new(|p: &P| p.host.is_some() && (p.value < 0 || p.region == "ap")),
        ),
        ("value BETWEEN -10 AND 10".into(), Box::new(|p: &P| (-10..=10).contains(&p.value))),
    ];
    for (cond, pred) in &cases {
        let sql = format!("SELECT count(*) FROM cpu WHERE {cond}");
        let r = q(&sql);
        let want = points.iter().filter(|p| pred(p)).count();
        assert_eq!(r[0]["value"], want, "{sql}");
    }

    // NOW - <duration>: the node reads its own clock, so bound the answer by the test's clock
    // read before and after, with the cutoff placed mid-dataset.
    let hours_back = (wall_ms() - mid) / HOUR;
    let sql = format!("SELECT count(*) FROM cpu WHERE timestamp > now - {hours_back}h");
    let before = wall_ms();
    let r = node.query(DB, NS, &sql);
    let after = wall_ms();
    let count_since = |t: i64| points.iter().filter(|p| p.ts > t - hours_back * HOUR).count();
    let got = r[0]["value"].as_u64().unwrap() as usize;
    assert!(count_since(after) <= got && got <= count_since(before), "{sql}: {got}");
    assert!(got > 0 && got < points.len(), "{sql}: the cutoff should split the data set");

    // Raw rows: ORDER BY and LIMIT, projections.
    let r = q("SELECT * FROM cpu ORDER BY value DESC LIMIT 5");
    let mut sorted: Vec<i64> = points.iter().map(|p| p.value).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let got: Vec<i64> = r.iter().map(|rec| rec["value"].as_i64().unwrap()).collect();
    assert_eq!(got, sorted[..5]);
    let r = q("SELECT * FROM cpu WHERE region = 'ap' ORDER BY timestamp LIMIT 20");
    let mut ap: Vec<i64> = points.iter().filter(|p| p.region == "ap").map(|p| p.ts).collect();
    ap.sort_unstable();
    let got: Vec<i64> = r.iter().map(|rec| rec["timestamp"].as_i64().unwrap()).collect();
    assert_eq!(got, ap[..20]);
    assert!(r.iter().all(|rec| rec["tags"]["region"] == "ap"));
    let r = q("SELECT region FROM cpu WHERE host IS NOT NULL LIMIT 3");
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|rec| rec["dimensions"].as_object().unwrap().is_empty() && rec["tags"]["region"].is_string()));
    let r = q("SELECT * FROM cpu");
    assert_eq!(r.len(), points.len());
    let r = q("SELECT count(*) FROM cpu GROUP BY region ORDER BY value DESC LIMIT 1");
    let biggest = by_region.iter().max_by_key(|(_, v)| v.len()).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["tags"]["region"], *biggest.0);
    answers
}

#[test]
fn ingest_query_restart_and_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = TestNode::start(
        &dir.path().join("n1"),
        &["shoal.sharding.interval=1h", "shoal.storage.memtable-max-points=700"],
    );
    let points = dataset();
    load(&node, &points);
    let before = check_queries(&node, &points);

    // Commands.
    assert_eq!(node.get("/commands/dbs").1["dbs"], json!([DB]));
    assert_eq!(node.get(&format!("/commands/{DB}/namespaces")).1["namespaces"], json!([NS]));
    assert_eq!(node.get(&format!("/commands/{DB}/{NS}/metrics")).1["metrics"], json!(["cpu"]));
    let (status, schema) = node.get(&format!("/commands/{DB}/{NS}/cpu"));
    assert_eq!(status, 200);
    let fields: Vec<&str> = schema["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(fields, ["host", "region", "value"]);
    let (status, st) = node.get("/status");
    assert_eq!((status, st["points"].as_u64()), (200, Some(points.len() as u64)));
    assert!(st["shards"].as_u64().unwrap() >= 25, "{st}");
    assert_eq!(node.get("/livez").0, 200);
    assert_eq!(node.get("/readyz").0, 200);
    let (_, metrics) = node.get("/metrics");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains(&format!("shoal_points_written_total {}", points.len())), "{metrics}");
    assert!(metrics.contains("shoal_wal_fsync_seconds_count"));

    // A clean restart gives the same answers (segments + WAL replay).
    node.restart();
    let after = check_queries(&node, &points);
    assert_eq!(before, after, "a restart must not change any answer");

    // DELETE removes exactly what it matches, durably.
    let cutoff = T0 + 5 * HOUR;
    let body = json!({"db": DB, "namespace": NS, "queryString": format!("DELETE FROM cpu WHERE timestamp < {cutoff} AND region = 'eu'")});
    let (status, v) = node.post("/query", body.to_string());
    assert_eq!(status, 200, "{v}");
    let removed = points.iter().filter(|p| p.ts < cutoff && p.region == "eu").count();
    assert_eq!(v["deleted"], removed);
    // A point the DELETE matches, sent right after its acknowledgement, is newer: it stays
    // (write times are kept to the second, and the DELETE goes out once its second is over).
    let again = format!("cpu,region=eu value=7i {}\n", T0);
    let (status, v) = node.post(&format!("/write?db={DB}&namespace={NS}&precision=ms"), again);
    assert_eq!(status, 204, "{v}");
    node.restart();
    let r = node.query(DB, NS, "SELECT count(*) FROM cpu");
    assert_eq!(r[0]["value"], points.len() - removed + 1);

    // Dropping the metric removes its schema and data.
    assert_eq!(node.delete(&format!("/commands/{DB}/{NS}/cpu")).0, 200);
    let body = json!({"db": DB, "namespace": NS, "queryString": "SELECT * FROM cpu"}).to_string();
    assert_eq!(node.post("/query", body).0, 404);
    assert!(!node.data_dir.join("shards").join(DB).join(NS).join("cpu").exists());
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn bad_inputs_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node =
        TestNode::start(&dir.path().join("n1"), &["shoal.http.max-body=64KiB", "shoal.write.max-batch-points=1000"]);
    let ok = json!({"db": DB, "namespace": NS, "metric": "m", "bit": {"timestamp": 1, "value": 1, "tags": {"region": "eu"}}});
    assert_eq!(node.post("/data", ok.to_string()).0, 200);

    let q = |sql: &str| json!({"db": DB, "namespace": NS, "queryString": sql}).to_string();
    let many_bits: Vec<Value> = (0..1001).map(|i| json!({"timestamp": i, "value": 1})).collect();
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        ("malformed JSON", "/data".into(), "{\"db\": ".into(), 400, "not valid JSON"),
        ("missing bit", "/data".into(), json!({"db": DB, "namespace": NS, "metric": "m"}).to_string(), 400, "\"bit\""),
        (
            "bad value",
            "/data".into(),
            json!({"db": DB, "namespace": NS, "metric": "m", "bits": [{"value": 1}, {"value": "x"}]}).to_string(),
            400,
            "bits[1]",
        ),
        (
            "bad metric name",
            "/data".into(),
            json!({"db": DB, "namespace": NS, "metric": "9m", "bit": {"value": 1}}).to_string(),
            400,
            "metric name",
        ),
        (
            "type conflict",
            "/data".into(),
            json!({"db": DB, "namespace": NS, "metric": "m", "bit": {"value": 1.5}}).to_string(),
            400,
            "field \"value\" has type INT",
        ),
        (
            "tag type conflict",
            "/data".into(),
            json!({"db": DB, "namespace": NS, "metric": "m", "bit": {"value": 1, "tags": {"region": 3}}}).to_string(),
            400,
            "region",
        ),
        (
            "timestamp out of range",
            "/data".into(),
            json!({"db": DB, "namespace": NS, "metric": "m", "bit": {"timestamp": i64::MIN, "value": 1}}).to_string(),
            400,
            "timestamp -9223372036854775808 is out of range",
        ),
        (
            "line timestamp out of range",
            format!("/write?db={DB}&namespace={NS}&precision=ms"),
            "m value=1i 1\nm value=1i 9000000000000000".into(),
            400,
            "line 2: timestamp 9000000000000000 is out of range",
        ),
        ("bad line", format!("/write?db={DB}&namespace={NS}"), "m value=1i\nm value=oops".into(), 400, "line 2"),
        ("line type conflict", format!("/write?db={DB}&namespace={NS}"), "m value=2.5".into(), 400, "DECIMAL"),
        ("missing db", format!("/write?namespace={NS}"), "m value=1i".into(), 400, "\"db\""),
        ("bad precision", format!("/write?db={DB}&namespace={NS}&precision=x"), "m value=1i".into(), 400, "precision"),
        (
            "too many points",
            "/data".into(),
            json!({"db": DB, "namespace": NS, "metric": "m", "bits": many_bits}).to_string(),
            413,
            "1000",
        ),
        ("oversized body", format!("/write?db={DB}&namespace={NS}"), "m value=1i 1\n".repeat(5200), 413, "max-body"),
        ("bad SQL", "/query".into(), q("SELECT * FORM m"), 400, "Line: 1, Column"),
        ("unknown aggregate", "/query".into(), q("SELECT median(value) FROM m"), 400, "median"),
        ("unknown field", "/query".into(), q("SELECT * FROM m WHERE nope = 1"), 400, "field nope"),
        ("unknown metric", "/query".into(), q("SELECT * FROM nope"), 404, "nope"),
        ("group by non-tag", "/query".into(), q("SELECT count(*) FROM m GROUP BY value"), 400, "not a tag"),
        ("query body", "/query".into(), "{}".into(), 400, "missing field"),
    ];
    for (name, path, body, status, needle) in cases {
        let (got, v) = node.post(&path, body);
        assert_eq!(got, status, "{name}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{name}: no error field in {v}"));
        assert!(msg.contains(needle), "{name}: {msg:?} should mention {needle:?}");
    }
    // A body sent without its length (chunked) is held to the same limit as it arrives.
    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new("m value=1i 1\n".repeat(5200).into_bytes()));
    let (got, v) = node.post(&format!("/write?db={DB}&namespace={NS}"), chunked);
    assert_eq!(got, 413, "{v}");
    assert!(v["error"].as_str().is_some_and(|m| m.contains("max-body")), "{v}");
    // Nothing of the rejected batches was stored.
    let r = node.query(DB, NS, "SELECT count(*) FROM m");
    assert_eq!(r[0]["value"], 1);
    let (status, schema) = node.get(&format!("/commands/{DB}/{NS}/m"));
    assert_eq!(status, 200);
    assert_eq!(schema["fields"].as_array().unwrap().len(), 2, "{schema}");
}

#[test]
fn bad_config_stops_the_node_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad_file = dir.path().join("bad.conf");
    std::fs::write(&bad_file, "shoal { http { port = ").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--set".into(), "shoal.http.port=abc".into()], "shoal.http.port"),
        (vec!["--set".into(), "shoal.write.consistency=most".into()], "one, quorum, all"),
        (vec!["--set".into(), "shoal.htpp.port=1".into()], "unknown config key shoal.htpp.port"),
        (vec!["--config".into(), bad_file.display().to_string()], "HOCON"),
        (vec!["--config".into(), dir.path().join("missing.conf").display().to_string()], "missing.conf"),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(common::BIN)
            .arg("start")
            .args(&args)
            .args(["--set", &format!("shoal.data-dir={}", dir.path().join("d").display())])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn cli_insert_query_status() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(&dir.path().join("n1"), &[]);
    let url = format!("http://{}", node.addr);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN).args(args).args(["--node", &url]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, _, err) = run(&[
        "insert",
        "--db",
        DB,
        "--namespace",
        NS,
        "--precision",
        "ms",
        "load,host=a value=2i 1000",
        "load,host=b value=4i 2000",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["query", "--db", DB, "--namespace", NS, "SELECT sum(value) FROM load"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"][0]["value"], 6);
    let (ok, out, _) = run(&["status"]);
    assert!(ok && out.contains("\"points\": 2"), "{out}");
    // A cluster of one has no node to hand its shard to: the leave is abandoned at once, the
    // command fails saying why, and the node stays up, ready, with its points.
    let (ok, _, err) = run(&["leave"]);
    assert!(!ok && err.contains("leave abandoned: 1 of 1 shards"), "{err}");
    assert!(node.is_running());
    assert_eq!(node.get("/readyz").0, 200, "ready again after the abandoned leave");
    let (ok, out, err) = run(&["query", "--db", DB, "--namespace", NS, "SELECT sum(value) FROM load"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["records"][0]["value"], 6);
    let (ok, _, err) = run(&["query", "--db", DB, "--namespace", NS, "SELECT * FROM nope"]);
    assert!(!ok && err.contains("404") && err.contains("nope"), "{err}");
}
