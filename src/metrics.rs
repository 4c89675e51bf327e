//! Process counters exported at `GET /metrics` in the Prometheus text format. Plain atomics:
//! a handful of counters does not need a metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the WAL fsync latency histogram buckets.
const FSYNC_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

/// Upper bounds (seconds) of the request and query latency histograms.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The routes requests are timed by: the first path segments that name an endpoint (the
/// internal API by its call), so the label set stays small whatever clients send.
pub const ROUTES: [&str; 16] = [
    "/write",
    "/data",
    "/query",
    "/api/v1/write",
    "/ping",
    "/commands",
    "/status",
    "/metrics",
    "/cluster",
    "/internal/write",
    "/internal/merge",
    "/internal/partial",
    "/internal/catalog",
    "/internal/repair",
    "/internal/other",
    "other",
];

/// The route label of a request path (see [`ROUTES`]).
pub fn route_of(path: &str) -> usize {
    let route = match path.trim_end_matches('/') {
        p if p.starts_with("/internal/v1/") => match &p["/internal/v1/".len()..] {
            "write" => "/internal/write",
            "merge" => "/internal/merge",
            "partial" => "/internal/partial",
            c if c.starts_with("catalog") => "/internal/catalog",
            "digests" | "points" | "tombstones" => "/internal/repair",
            _ => "/internal/other",
        },
        "/write" => "/write",
        "/data" => "/data",
        "/query" => "/query",
        "/api/v1/write" => "/api/v1/write",
        "/ping" => "/ping",
        "/status" => "/status",
        "/metrics" => "/metrics",
        p if p.starts_with("/commands") => "/commands",
        p if p.starts_with("/cluster") => "/cluster",
        _ => "other",
    };
    ROUTES.iter().position(|r| *r == route).expect("every label is listed")
}

/// A latency histogram (cumulative buckets, as Prometheus reads them).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    micros_sum: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.micros_sum.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bucket, bound) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}", bucket.load(Relaxed));
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.micros_sum.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Request latency by route (see [`ROUTES`]).
    pub request_seconds: [Histogram; ROUTES.len()],
    /// Latency of query statements (NSDb SQL and InfluxQL), from parse to answer.
    pub query_seconds: Histogram,
    /// When this node last finished a full repair round (epoch ms; 0: not yet).
    pub repair_round_finished_ms: std::sync::atomic::AtomicI64,
    pub http_requests: AtomicU64,
    pub http_client_errors: AtomicU64,
    pub http_server_errors: AtomicU64,
    pub points_written: AtomicU64,
    /// Points in the memtables of all shards (kept by [`crate::storage::MemtableBudget`]).
    pub memtable_points: AtomicU64,
    pub queries: AtomicU64,
    /// Selects answered from the answer cache (every replica read confirmed its copy unchanged).
    pub query_cache_hits: AtomicU64,
    /// Read leases revoked at their holder before a change to a copy (docs/design/replication.md).
    pub lease_revokes: AtomicU64,
    /// Changes that waited for a lease to run out, its holder being unreachable.
    pub lease_waits: AtomicU64,
    pub wal_torn_bytes: AtomicU64,
    pub segments_written: AtomicU64,
    pub hints_stored: AtomicU64,
    pub hints_dropped: AtomicU64,
    pub hints_replayed: AtomicU64,
    pub repair_blocks_compared: AtomicU64,
    pub repair_blocks_copied: AtomicU64,
    pub repair_points_copied: AtomicU64,
    pub shards_rereplicated: AtomicU64,
    /// Public API requests refused: no or wrong credentials (401) or missing permission (403).
    pub auth_refused: AtomicU64,
    /// Line protocol string fields skipped (Shoal stores numbers).
    pub fields_skipped: AtomicU64,
    /// Prometheus remote_write samples skipped: stale markers and other NaN or infinite values.
    pub samples_skipped: AtomicU64,
    fsync_buckets: [AtomicU64; FSYNC_BUCKETS.len()],
    fsync_count: AtomicU64,
    fsync_micros_sum: AtomicU64,
    /// Write and query rates for the status page, measured between its renders.
    pub rates: RateMeter,
}

/// Points stored and queries answered per second, over the time between two samples at
/// least [`RateMeter::WINDOW_MS`] apart (a sample sooner gives the last rates again).
#[derive(Default)]
pub struct RateMeter {
    state: std::sync::Mutex<RateState>,
}

#[derive(Default, Clone, Copy)]
struct RateState {
    /// (time ms, points written, queries) at the last sample.
    last: Option<(i64, u64, u64)>,
    rates: Option<(f64, f64)>,
}

impl RateMeter {
    pub const WINDOW_MS: i64 = 1000;

    /// (points stored/s, queries/s) of `metrics` at `now_ms`; `None` until two samples exist.
    pub fn sample(&self, metrics: &Metrics, now_ms: i64) -> Option<(f64, f64)> {
        let (points, queries) = (metrics.points_written.load(Relaxed), metrics.queries.load(Relaxed));
        let mut state = self.state.lock().expect("rates lock");
        match state.last {
            Some((at, p, q)) if now_ms - at >= Self::WINDOW_MS => {
                let secs = (now_ms - at) as f64 / 1000.0;
                state.rates = Some((points.saturating_sub(p) as f64 / secs, queries.saturating_sub(q) as f64 / secs));
                state.last = Some((now_ms, points, queries));
            }
            Some(_) => {}
            None => state.last = Some((now_ms, points, queries)),
        }
        state.rates
    }
}

impl Metrics {
    pub fn observe_fsync(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in self.fsync_buckets.iter().zip(FSYNC_BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.fsync_count.fetch_add(1, Relaxed);
        self.fsync_micros_sum.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    pub fn render(&self, shards: usize) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        };
        counter(&mut out, "shoal_http_requests_total", "HTTP requests served.", &self.http_requests);
        counter(&mut out, "shoal_http_client_errors_total", "HTTP requests answered 4xx.", &self.http_client_errors);
        counter(&mut out, "shoal_http_server_errors_total", "HTTP requests answered 5xx.", &self.http_server_errors);
        counter(&mut out, "shoal_points_written_total", "Points made durable on this node.", &self.points_written);
        counter(&mut out, "shoal_queries_total", "Queries executed.", &self.queries);
        counter(
            &mut out,
            "shoal_query_cache_hits_total",
            "Selects answered from the answer cache, every shard copy read being unchanged.",
            &self.query_cache_hits,
        );
        counter(
            &mut out,
            "shoal_read_lease_revokes_total",
            "Read leases on this node's copies revoked at their holder before a change.",
            &self.lease_revokes,
        );
        counter(
            &mut out,
            "shoal_read_lease_waits_total",
            "Changes that waited for a read lease to run out, its holder being unreachable.",
            &self.lease_waits,
        );
        counter(
            &mut out,
            "shoal_auth_refused_total",
            "Public API requests refused for missing or wrong credentials or permissions.",
            &self.auth_refused,
        );
        counter(
            &mut out,
            "shoal_write_fields_skipped_total",
            "Line protocol string fields and remote_write series with names Shoal cannot take, skipped.",
            &self.fields_skipped,
        );
        counter(
            &mut out,
            "shoal_remote_write_samples_skipped_total",
            "Prometheus remote_write samples skipped: stale markers and other NaN or infinite values.",
            &self.samples_skipped,
        );
        counter(&mut out, "shoal_wal_torn_bytes_total", "Bytes cut from WAL tails on recovery.", &self.wal_torn_bytes);
        counter(&mut out, "shoal_segments_written_total", "Segments written by compaction.", &self.segments_written);
        counter(&mut out, "shoal_hints_stored_total", "Hints kept for replicas a write missed.", &self.hints_stored);
        counter(
            &mut out,
            "shoal_hints_dropped_total",
            "Hints dropped: past the target's byte or age bound, or the target was replaced.",
            &self.hints_dropped,
        );
        counter(&mut out, "shoal_hints_replayed_total", "Hints delivered to their replica.", &self.hints_replayed);
        counter(
            &mut out,
            "shoal_repair_blocks_compared_total",
            "Shard blocks whose digests repair compared with a peer.",
            &self.repair_blocks_compared,
        );
        counter(
            &mut out,
            "shoal_repair_blocks_copied_total",
            "Shard blocks whose digests differed and whose points were copied.",
            &self.repair_blocks_copied,
        );
        counter(
            &mut out,
            "shoal_repair_points_copied_total",
            "Points a repair, hint replay or hand-off stored on a replica that lacked them.",
            &self.repair_points_copied,
        );
        counter(
            &mut out,
            "shoal_shards_rereplicated_total",
            "Shards given a new replica in place of a lost one.",
            &self.shards_rereplicated,
        );
        let _ = writeln!(
            out,
            "# HELP shoal_shards Shards held by this node.\n# TYPE shoal_shards gauge\nshoal_shards {shards}"
        );
        let _ = writeln!(
            out,
            "# HELP shoal_memtable_points Points held in memory by shards, not yet in segments.\n\
             # TYPE shoal_memtable_points gauge\nshoal_memtable_points {}",
            self.memtable_points.load(Relaxed)
        );
        let name = "shoal_http_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} HTTP request latency by route.\n# TYPE {name} histogram");
        for (route, histogram) in ROUTES.iter().zip(&self.request_seconds) {
            histogram.render(&mut out, name, &format!("route=\"{route}\""));
        }
        let name = "shoal_query_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Query latency (NSDb SQL and InfluxQL), parse to answer.\n# TYPE {name} histogram"
        );
        self.query_seconds.render(&mut out, name, "");
        let name = "shoal_wal_fsync_seconds";
        let _ = writeln!(out, "# HELP {name} WAL group-commit fsync latency.\n# TYPE {name} histogram");
        for (bucket, bound) in self.fsync_buckets.iter().zip(FSYNC_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", bucket.load(Relaxed));
        }
        let count = self.fsync_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.fsync_micros_sum.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}
