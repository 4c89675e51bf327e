//! A real Prometheus (Debian's `prometheus`, started by the test) scrapes a Shoal node's
//! `/metrics` and remote-writes everything it scrapes into a 3-node cluster (RF 2); the samples
//! Prometheus holds are then read back from Shoal, exactly, through every node. Skipped, with
//! the reason, where `prometheus` is not installed (`.ci/run` installs it when root).

mod common;
use common::wait_until;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `up` and the scrape's own series, as Prometheus holds them: (timestamp ms, value) per
/// series up to `until_ms`.
fn prometheus_samples(http: &reqwest::blocking::Client, addr: &str, metric: &str, until_ms: i64) -> Vec<(i64, f64)> {
    let q = serde_urlencoded::to_string([
        ("query", format!("{metric}[10m]")),
        ("time", format!("{}", until_ms as f64 / 1000.0)),
    ])
    .unwrap();
    let v: Value = http.get(format!("http://{addr}/api/v1/query?{q}")).send().unwrap().json().unwrap();
    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
    assert!(result.len() <= 1, "one series of {metric}: {v}");
    result
        .first()
        .map(|s| {
            s["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| ((p[0].as_f64().unwrap() * 1000.0).round() as i64, p[1].as_str().unwrap().parse().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

fn shoal_samples(http: &reqwest::blocking::Client, addr: &str, metric: &str, until_ms: i64) -> Vec<(i64, f64)> {
    let q = format!("SELECT value FROM {metric} WHERE time <= {until_ms}ms");
    let params = serde_urlencoded::to_string([("db", "prom"), ("q", q.as_str()), ("epoch", "ms")]).unwrap();
    let v: Value = http.get(format!("http://{addr}/query?{params}")).send().unwrap().json().unwrap();
    v["results"][0]["series"][0]["values"]
        .as_array()
        .map(|rows| rows.iter().map(|r| (r[0].as_i64().unwrap(), r[1].as_f64().unwrap())).collect())
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_a_node_and_remote_writes_into_the_cluster_exactly() {
    if Command::new("prometheus").arg("--version").output().is_err() {
        println!("SKIP: prometheus is not installed; apt-get install prometheus");
        return;
    }
    shoal::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let nodes = common::cluster(dir.path(), &["a", "b", "c"], &["shoal.cluster.replication-factor=2"]);
    let web = format!("127.0.0.1:{}", common::free_port());
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: shoal\n    static_configs:\n      - targets: [\"{}\"]\nremote_write:\n  - url: http://{}/api/v1/write?db=prom\n    queue_config:\n      batch_send_deadline: 1s\n",
        nodes[0].addr, nodes[1].addr
    );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let prometheus = common::Server { child, addr: web };
    let http = reqwest::blocking::Client::new();
    wait_until(Duration::from_secs(60), "Prometheus to be ready", || {
        http.get(format!("http://{}/-/ready", prometheus.addr)).send().ok().filter(|r| r.status().is_success())
    });
    // Five scrapes or more held by Prometheus.
    let until_ms = wait_until(Duration::from_secs(60), "Prometheus to hold five scrapes", || {
        let now_ms = shoal::env::Clock::now_ms(&shoal::env::SystemClock);
        (prometheus_samples(&http, &prometheus.addr, "up", now_ms).len() >= 5).then_some(now_ms)
    });
    for metric in ["up", "scrape_samples_scraped", "shoal_http_requests_total"] {
        let expected = prometheus_samples(&http, &prometheus.addr, metric, until_ms);
        assert!(
            expected.len() >= 5,
            "{metric}: {expected:?}; log: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        for n in &nodes {
            wait_until(Duration::from_secs(30), "the remote-written samples in Shoal", || {
                (shoal_samples(&http, &n.addr, metric, until_ms) == expected).then_some(())
            });
        }
        println!("{metric}: {} samples, equal through all 3 nodes", expected.len());
    }
    // The operator metrics Prometheus scraped are there too.
    let (_, text) = nodes[0].get("/metrics");
    let text = text.as_str().unwrap_or_default().to_string();
    for needle in [
        "shoal_http_request_duration_seconds_bucket{route=\"/metrics\",le=\"0.005\"}",
        "shoal_query_duration_seconds_count",
        "shoal_members{state=\"alive\"} 3",
        "shoal_hints_pending_bytes",
        "shoal_repair_lag_seconds",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
}
