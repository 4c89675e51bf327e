//! Differential test against a real InfluxDB 1.6 (Debian's `influxdb`, started by the test):
//! the same line protocol into InfluxDB and into a 3-node Shoal cluster with RF 2 (spread over
//! its nodes), then InfluxQL statements of the kinds Grafana sends, through every Shoal node;
//! the answers must equal InfluxDB's (floats within 1e-9, relative). Skipped, with the reason,
//! where `influxd` is not installed (`.ci/run` installs it when root).

mod common;
use common::wait_until;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Seconds: the data spans 2 hours from here, every 10 s per series.
const T0: i64 = 1_600_000_200;
const SPAN: i64 = 7_200;

fn start_influxd(dir: &std::path::Path) -> common::Server {
    let (http, rpc) = (common::free_port(), common::free_port());
    let conf = format!(
        "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n[monitor]\n  store-enabled = false\n[http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n[continuous_queries]\n  enabled = false\n",
        d = dir.display()
    );
    let path = dir.join("influxdb.conf");
    std::fs::write(&path, conf).unwrap();
    let log = std::fs::File::create(dir.join("influxd.log")).unwrap();
    let child = Command::new("influxd")
        .arg("-config")
        .arg(&path)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let influxd = common::Server { child, addr: format!("127.0.0.1:{http}") };
    let http = reqwest::blocking::Client::new();
    wait_until(Duration::from_secs(30), "influxd to answer /ping", || {
        http.get(format!("http://{}/ping", influxd.addr)).send().ok().filter(|r| r.status().as_u16() == 204)
    });
    influxd
}

/// Two measurements, two tags, integer and float fields, a `value` field; values with two
/// decimals from a fixed generator.
fn lines() -> Vec<String> {
    let mut seed: u64 = 11;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut out = Vec::new();
    for t in (0..SPAN).step_by(10) {
        for h in 0..4 {
            let region = if h % 2 == 0 { "eu" } else { "us" };
            // Some series skip some times, so buckets and fills see gaps.
            if (t / 10 + h) % 7 == 3 {
                continue;
            }
            let usage = (next() % 10_000) as f64 / 100.0;
            let procs = (next() % 300) as i64;
            out.push(format!("cpu,host=h{h},region={region} usage={usage},procs={procs}i {}", T0 + t));
            if t % 60 == 0 {
                let v = (next() % 5_000) as f64 / 100.0;
                out.push(format!("temp,host=h{h},region={region} value={v} {}", T0 + t));
            }
        }
    }
    out
}

fn statements() -> Vec<String> {
    let (from, to) = (T0, T0 + SPAN);
    let w = format!("time >= {from}s AND time < {to}s");
    let half = format!("time >= {}s AND time <= {}s", from + 600, from + 4_200);
    [
        "SHOW DATABASES".to_string(),
        "SHOW MEASUREMENTS".into(),
        "SHOW TAG KEYS".into(),
        "SHOW TAG KEYS FROM cpu".into(),
        "SHOW TAG VALUES FROM cpu WITH KEY = \"host\"".into(),
        "SHOW TAG VALUES WITH KEY = \"region\"".into(),
        "SHOW TAG VALUES FROM cpu WITH KEY IN (\"host\", \"region\")".into(),
        "SHOW FIELD KEYS".into(),
        "SHOW FIELD KEYS FROM cpu".into(),
        "SHOW SERIES FROM temp".into(),
        format!("SELECT mean(usage) FROM cpu WHERE {w} GROUP BY time(10m) fill(null)"),
        format!("SELECT mean(\"usage\") FROM \"cpu\" WHERE {w} GROUP BY time(15m), \"host\" fill(null)"),
        format!("SELECT mean(usage), max(usage), min(usage) FROM cpu WHERE {w} GROUP BY time(30m), region"),
        format!("SELECT count(usage) FROM cpu WHERE {w} GROUP BY time(20m) fill(0)"),
        format!("SELECT sum(procs) FROM cpu WHERE {w} GROUP BY time(1h), *"),
        format!("SELECT median(usage) FROM cpu WHERE {w} GROUP BY time(30m), host"),
        format!("SELECT spread(procs), stddev(usage) FROM cpu WHERE {w} GROUP BY time(1h)"),
        format!("SELECT percentile(usage, 95) FROM cpu WHERE {w} GROUP BY time(30m) fill(none)"),
        format!("SELECT first(usage), last(usage) FROM cpu WHERE {w} GROUP BY host"),
        format!("SELECT last(usage) FROM cpu WHERE {w} GROUP BY host"),
        format!("SELECT max(procs) FROM cpu WHERE {w}"),
        format!("SELECT min(value) FROM temp WHERE {w}"),
        format!("SELECT count(value), mean(value) FROM temp WHERE {w}"),
        format!("SELECT mean(value) FROM temp WHERE {w} AND host = 'h1' GROUP BY time(10m) fill(previous)"),
        format!("SELECT mean(value) FROM temp WHERE {w} AND host = 'h1' GROUP BY time(5m) fill(linear)"),
        format!("SELECT mean(value) FROM temp WHERE {w} GROUP BY time(5m) fill(-1)"),
        format!("SELECT mean(usage) FROM cpu WHERE {w} AND host =~ /h[12]/ GROUP BY time(20m), host"),
        format!("SELECT mean(usage) FROM cpu WHERE {w} AND host !~ /h[12]/ GROUP BY time(20m)"),
        format!("SELECT mean(usage) FROM cpu WHERE {w} AND (host = 'h0' OR host = 'h3') GROUP BY time(30m)"),
        format!("SELECT mean(usage) FROM cpu WHERE {w} AND region != 'eu' GROUP BY time(30m), host"),
        format!("SELECT mean(usage) FROM cpu WHERE {half} GROUP BY time(10m, 3m)"),
        format!("SELECT count(usage) FROM cpu WHERE {w} GROUP BY time(10m) ORDER BY time DESC LIMIT 4"),
        format!("SELECT mean(usage) FROM cpu WHERE {w} GROUP BY time(30m), host SLIMIT 2 SOFFSET 1"),
        format!("SELECT mean(usage) FROM cpu WHERE {w} GROUP BY time(10m) LIMIT 3 OFFSET 2"),
        format!("SELECT usage FROM cpu WHERE {half} AND host = 'h2' LIMIT 20"),
        format!("SELECT usage, procs FROM cpu WHERE time >= {from}s AND time < {}s AND host = 'h3'", from + 300),
        format!("SELECT value FROM temp WHERE {half} AND host = 'h3' ORDER BY time DESC LIMIT 10"),
        format!("SELECT value FROM temp WHERE {half} GROUP BY host LIMIT 3"),
        format!("SELECT mean(usage) AS avg_usage FROM cpu WHERE {w} GROUP BY time(1h)"),
        format!("SELECT mean(usage), mean(procs) FROM cpu WHERE {w} GROUP BY time(1h), host"),
        format!("SELECT sum(usage) FROM cpu WHERE time > {}s AND time < {}s", from + 95, from + 905),
        "SELECT count(usage) FROM cpu WHERE time >= '2020-09-13T12:30:00Z' AND time < '2020-09-13T13:00:00Z' GROUP BY time(5m)".into(),
        format!("SELECT mean(usage) FROM cpu WHERE {w} GROUP BY time(1h); SELECT count(value) FROM temp WHERE {w}"),
        format!("SELECT mean(nothing) FROM cpu WHERE {w}"),
        format!("SELECT mean(usage) FROM nothing WHERE {w}"),
    ]
    .into()
}

fn query(http: &reqwest::blocking::Client, addr: &str, q: &str) -> Value {
    let params = serde_urlencoded::to_string([("db", "tele"), ("q", q), ("epoch", "ms")]).unwrap();
    let resp = http.get(format!("http://{addr}/query?{params}")).send().unwrap();
    resp.json().unwrap()
}

/// Equal JSON, numbers within 1e-9 (relative) of each other.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn influxql_answers_equal_influxdb_1_6_through_every_node() {
    if Command::new("influxd").arg("version").output().is_err() {
        println!("SKIP: influxd is not installed; apt-get install influxdb");
        return;
    }
    // reqwest's TLS needs a rustls provider installed before any client is built.
    shoal::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let influxd = start_influxd(dir.path());
    let nodes = common::cluster(dir.path(), &["a", "b", "c"], &["shoal.cluster.replication-factor=2"]);
    let http = reqwest::blocking::Client::new();
    let lines = lines();
    let post = |addr: &str, body: String| {
        let r = http.post(format!("http://{addr}/write?db=tele&precision=s")).body(body).send().unwrap();
        assert_eq!(r.status().as_u16(), 204, "{addr}: {}", r.text().unwrap());
    };
    query(&http, &influxd.addr, "CREATE DATABASE tele");
    for (i, chunk) in lines.chunks(500).enumerate() {
        let body = chunk.join("\n");
        post(&influxd.addr, body.clone());
        post(&nodes[i % 3].addr, body);
    }
    let mut compared = 0;
    for q in statements() {
        let expected = query(&http, &influxd.addr, &q);
        assert!(expected["results"][0].get("error").is_none(), "InfluxDB refused {q}: {expected}");
        for n in &nodes {
            let got = query(&http, &n.addr, &q);
            assert!(same(&got, &expected), "{q}\nthrough {}\n  shoal:    {got}\n  influxdb: {expected}", n.addr);
        }
        compared += 1;
    }
    println!("{compared} InfluxQL statements answered as InfluxDB 1.6 does, through each of 3 nodes");
    assert!(compared >= 40);
}
