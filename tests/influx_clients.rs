//! Influx clients that no one here wrote, against a Shoal node: the Python `influxdb` client
//! (Debian's python3-influxdb) and the `influx` CLI (Debian's influxdb-client). `.ci/run`
//! installs both when it runs as root; elsewhere a missing one is skipped with the reason.

mod common;

use common::TestNode;
use std::process::Command;

/// The Python the Debian package installs into (a pyenv `python3` first on PATH has not).
const PYTHON: &str = "/usr/bin/python3";

fn python_client_available() -> Result<(), String> {
    match Command::new(PYTHON).args(["-c", "import influxdb"]).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("{PYTHON}: {e}")),
    }
}

/// write_points, query, get_list_database and get_list_measurements of influxdb 5.3, as a user
/// of it would call them; the script prints what the client returned, as JSON.
#[test]
fn the_python_influxdb_client_writes_and_queries() {
    if let Err(why) = python_client_available() {
        println!("SKIP: the Python influxdb client is not installed ({why}); apt-get install python3-influxdb");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let (host, port) = node.addr.rsplit_once(':').unwrap();
    let script = format!(
        r#"
import json
from influxdb import InfluxDBClient
c = InfluxDBClient(host="{host}", port={port}, database="tele")
out = {{}}
out["ping"] = c.ping()
c.create_database("tele")
points = []
for i in range(60):
    for host in ("a", "b"):
        points.append({{"measurement": "cpu", "tags": {{"host": host, "region": "eu"}},
                        "time": 1599999900 + i * 10,
                        "fields": {{"usage_user": i * 1.5 + (0 if host == "a" else 100), "busy": i % 2 == 0, "note": "x"}}}})
out["written"] = c.write_points(points, time_precision="s")
out["databases"] = c.get_list_database()
out["measurements"] = c.get_list_measurements()
rs = c.query('SELECT mean("usage_user"), count("usage_user") FROM "cpu" WHERE time >= 1599999900s AND time < 1600000500s GROUP BY time(5m), "host" fill(null)')
out["grouped"] = {{"%s" % k[1]["host"]: list(v) for k, v in rs.items()}}
rs = c.query('SELECT last("usage_user") FROM "cpu" WHERE "host" = \'b\'', epoch="s")
out["last_b"] = list(rs.get_points())
rs = c.query('SELECT sum("busy") FROM "cpu"')
out["busy"] = list(rs.get_points())
rs = c.query('SHOW FIELD KEYS FROM "cpu"')
out["fields"] = list(rs.get_points())
print(json.dumps(out))
"#
    );
    let run = Command::new(PYTHON).args(["-c", &script]).output().unwrap();
    assert!(run.status.success(), "the client failed: {}", String::from_utf8_lossy(&run.stderr));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert!(out["ping"].as_str().is_some_and(|v| v.starts_with("1.")), "ping gives a 1.x version: {out}");
    assert_eq!(out["written"], true);
    assert_eq!(out["databases"], serde_json::json!([{"name": "tele"}]));
    assert_eq!(out["measurements"], serde_json::json!([{"name": "cpu"}]));
    // 5-minute buckets (from 12:25, on the hour's grid) of 30 points each, per host; the means
    // are exact.
    for (host, base) in [("a", 0.0), ("b", 100.0)] {
        let rows = out["grouped"][host].as_array().unwrap_or_else(|| panic!("{host}: {out}"));
        assert_eq!(rows.len(), 2, "{rows:?}");
        for (k, row) in rows.iter().enumerate() {
            let first = (k * 30) as f64;
            let mean = base + 1.5 * (first + first + 29.0) / 2.0;
            assert!((row["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{row}");
            assert_eq!(row["count"], 30);
        }
        assert_eq!(rows[0]["time"], "2020-09-13T12:25:00Z");
    }
    assert_eq!(out["last_b"], serde_json::json!([{"time": 1600000490, "last": 100.0 + 59.0 * 1.5}]));
    // Booleans are stored as 1 and 0: half of the 120 points were busy.
    assert_eq!(out["busy"][0]["sum"], 60);
    let fields: Vec<&str> = out["fields"].as_array().unwrap().iter().map(|f| f["fieldKey"].as_str().unwrap()).collect();
    assert_eq!(fields, ["busy", "usage_user"], "the string field was skipped");
}

/// The `influx` CLI of InfluxDB 1.6: INSERT through /write, SHOW and SELECT through /query.
#[test]
fn the_influx_cli_inserts_and_queries() {
    if Command::new("influx").arg("-version").output().is_err() {
        println!("SKIP: the influx CLI is not installed; apt-get install influxdb-client");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let (host, port) = node.addr.rsplit_once(':').unwrap();
    let influx = |args: &[&str]| {
        let out = Command::new("influx")
            .args(["-host", host, "-port", port, "-database", "tele", "-precision", "s"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "influx {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    influx(&["-execute", "CREATE DATABASE tele"]);
    for (i, v) in [1.5, 2.5, 4.0].iter().enumerate() {
        influx(&["-execute", &format!("INSERT mem,host=h{i} used={v} {}", 1_600_000_000 + i)]);
    }
    let measurements = influx(&["-execute", "SHOW MEASUREMENTS", "-format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&measurements).unwrap();
    assert_eq!(v["results"][0]["series"][0]["values"], serde_json::json!([["mem"]]), "{measurements}");
    let sum = influx(&["-execute", "SELECT sum(used), max(used) FROM mem", "-format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&sum).unwrap();
    assert_eq!(v["results"][0]["series"][0]["values"][0][1], 8.0, "{sum}");
    assert_eq!(v["results"][0]["series"][0]["values"][0][2], 4.0, "{sum}");
    let tags = influx(&["-execute", "SHOW TAG VALUES FROM mem WITH KEY = \"host\"", "-format", "csv"]);
    assert!(tags.contains("mem,host,h0") && tags.contains("mem,host,h2"), "{tags}");
    // A statement that fails answers its error, as InfluxDB does.
    let bad = Command::new("influx")
        .args(["-host", host, "-port", port, "-database", "tele", "-execute", "SELECT FROM"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&bad.stdout), String::from_utf8_lossy(&bad.stderr));
    assert!(text.contains("error parsing query"), "{text}");
}

/// What Telegraf relies on, by hand: `/ping` headers, a gzipped body, a batch whose string
/// field is skipped and counted, and strict mode refusing that batch whole.
#[test]
fn ping_gzip_and_string_fields_behave_as_telegraf_expects() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let http = reqwest::blocking::Client::new();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = http.request(method.clone(), node.url("/ping")).send().unwrap();
        assert_eq!(r.status().as_u16(), 204, "{method}");
        assert!(r.headers()["x-influxdb-version"].to_str().unwrap().starts_with("1."));
    }
    let body = "sys,host=a load1=0.5,uptime=10i,uptime_format=\"0 days, 0:00\" 1600000000\n\
                sys,host=a load1=0.75,uptime=20i,uptime_format=\"0 days, 0:01\" 1600000010\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let gzipped = gz.finish().unwrap();
    let r = http
        .post(node.url("/write?db=tele&precision=s"))
        .header("content-encoding", "gzip")
        .body(gzipped.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers()["x-shoal-skipped-fields"], "2", "the two string fields were skipped and counted");
    // Strict: the same batch is refused whole, naming the field; nothing more is stored.
    let r = http
        .post(node.url("/write?db=tele&precision=s&strict=true"))
        .header("content-encoding", "gzip")
        .body(gzipped)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().unwrap();
    assert!(text.contains("uptime_format") && text.contains("line 1"), "{text}");
    // A body that says gzip and is not: a clear 400.
    let r = http.post(node.url("/write?db=tele")).header("content-encoding", "gzip").body("sys v=1").send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().unwrap().contains("gzip"));
    let q = serde_urlencoded::to_string([("db", "tele"), ("q", "SELECT count(load1), sum(uptime) FROM sys")]).unwrap();
    let v: serde_json::Value = http.get(node.url(&format!("/query?{q}"))).send().unwrap().json().unwrap();
    assert_eq!(v["results"][0]["series"][0]["values"][0][1], 2, "{v}");
    assert_eq!(v["results"][0]["series"][0]["values"][0][2], 30, "{v}");
    let (_, metrics) = node.get("/metrics");
    assert!(metrics.as_str().unwrap().contains("shoal_write_fields_skipped_total 2"));
}
