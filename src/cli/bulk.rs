//! Bulk data movement through the public HTTP API, with progress bars: `shoal backup` (every
//! shard of a db, read from a live replica through any node), `shoal restore` (a backup into
//! any cluster) and `shoal import` (a line-protocol file).
//!
//! A backup is a directory: `manifest.json` (written last, so a backup without it is
//! incomplete) and one zstd-compressed JSON-lines file per shard, each line a point exactly
//! as `POST /data` takes it (`{"timestamp", "value", "dimensions", "tags"}`), so that restore
//! is a plain insert and types (integer or decimal values, dimension or tag) survive.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

/// Points one backup query reads at most; a shard range holding more is split in halves.
const CHUNK_POINTS: u64 = 50_000;
/// Points per restore request (well under `shoal.write.max-batch-points`).
const RESTORE_BATCH: usize = 10_000;
/// Lines and bytes per import request (under `shoal.http.max-body`).
const IMPORT_LINES: usize = 10_000;
const IMPORT_BYTES: usize = 4 * 1024 * 1024;
/// Tries of one request that failed for a reason worth retrying (a node stopping, a
/// quorum missing for a moment, a connection reset).
const TRIES: u32 = 5;
const FORMAT: &str = "shoal-backup/1";

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    db: String,
    /// When the backup began (epoch ms): it holds every point acknowledged before this and
    /// not deleted before its shard was read; points written meanwhile may be in it or not.
    started_ms: i64,
    points: u64,
    shards: Vec<ShardFile>,
}

#[derive(Serialize, Deserialize)]
struct ShardFile {
    namespace: String,
    metric: String,
    start: i64,
    end: i64,
    points: u64,
    file: String,
}

/// A node's public API, as the CLI reaches it.
pub struct Api {
    pub http: reqwest::Client,
    /// Base URL, e.g. `http://127.0.0.1:9000`.
    pub node: String,
}

impl Api {
    /// POSTs and returns the JSON answer; retries what a client should retry.
    async fn post(&self, path: &str, body: Vec<u8>, json: bool) -> anyhow::Result<serde_json::Value> {
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=TRIES {
            let mut req = self.http.post(format!("{}{path}", self.node)).body(body.clone());
            if json {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            let outcome = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null));
                    }
                    let retry = status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                    (retry, anyhow::anyhow!("{path}: the node answered {status}: {text}"))
                }
                Err(e) => (true, anyhow::anyhow!("{path}: cannot reach {} ({e})", self.node)),
            };
            match outcome {
                (true, _) if attempt < TRIES => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                (_, e) => return Err(e),
            }
        }
        unreachable!("the last try returns")
    }

    async fn query(
        &self,
        db: &str,
        namespace: &str,
        metric: &str,
        select: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({
            "db": db, "namespace": namespace, "metric": metric,
            "queryString": format!("SELECT {select} FROM {}", quoted(metric)),
            "from": from, "to": to - 1,
        });
        self.post("/query", body.to_string().into_bytes(), true).await
    }
}

/// `metric` as an SQL name: bare when it is a plain identifier, else double-quoted.
fn quoted(metric: &str) -> String {
    let plain = metric.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && metric.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain { metric.to_string() } else { format!("\"{}\"", metric.replace('"', "\"\"")) }
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> "));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `shoal backup`: every shard of `db` into the directory `out` (which must not exist yet or
/// be empty).
pub async fn backup(api: &Api, db: &str, out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        anyhow::ensure!(
            out.read_dir()?.next().is_none(),
            "{} exists and is not empty; back up into a new directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = tokio::time::Instant::now();
    let started_ms = chrono_now_ms();
    let listing: serde_json::Value = api
        .http
        .get(format!("{}/cluster/shards", api.node))
        .send()
        .await
        .context("cannot reach the node (see --node)")?
        .error_for_status()?
        .json()
        .await?;
    let mut shards: Vec<(String, String, i64, i64)> = listing["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["db"] == db)
        .filter_map(|s| {
            Some((
                s["namespace"].as_str()?.to_string(),
                s["metric"].as_str()?.to_string(),
                s["start"].as_i64()?,
                s["end"].as_i64()?,
            ))
        })
        .collect();
    shards.sort();
    anyhow::ensure!(!shards.is_empty(), "db {db:?} has no shards (nothing to back up, or a wrong name)");
    let progress = bar(shards.len() as u64, "backup {bar:30} {pos}/{len} shards, {msg} [{elapsed_precise}]");
    let mut manifest =
        Manifest { format: FORMAT.to_string(), db: db.to_string(), started_ms, points: 0, shards: Vec::new() };
    for (i, (namespace, metric, start, end)) in shards.into_iter().enumerate() {
        let file = format!("shard-{i:06}.jsonl.zst");
        let path = out.join(&file);
        let mut encoder = zstd::Encoder::new(std::fs::File::create(&path)?, 3)?;
        let points = dump_shard(api, db, &namespace, &metric, start, end, &mut encoder).await?;
        let inner = encoder.finish()?;
        inner.sync_all()?;
        manifest.points += points;
        progress.set_message(format!("{} points", manifest.points));
        progress.inc(1);
        manifest.shards.push(ShardFile { namespace, metric, start, end, points, file });
    }
    let tmp = out.join("manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, out.join("manifest.json"))?;
    std::fs::File::open(out)?.sync_all()?;
    progress.finish_and_clear();
    println!(
        "backed up {} points of {} shards of db {db} to {} in {:.1} s",
        manifest.points,
        manifest.shards.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the points of one shard as JSON lines, reading at most [`CHUNK_POINTS`] a query.
async fn dump_shard(
    api: &Api,
    db: &str,
    namespace: &str,
    metric: &str,
    start: i64,
    end: i64,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let mut ranges = vec![(start, end)];
    let mut written = 0;
    // Oldest first: ranges split in halves are pushed later half first.
    while let Some((from, to)) = ranges.pop() {
        let count = api.query(db, namespace, metric, "count(*)", from, to).await?;
        let count = count["records"][0]["value"].as_u64().unwrap_or(0);
        if count == 0 {
            continue;
        }
        if count > CHUNK_POINTS && to - from > 1 {
            let mid = from + (to - from) / 2;
            ranges.push((mid, to));
            ranges.push((from, mid));
            continue;
        }
        let answer = api.query(db, namespace, metric, "*", from, to).await?;
        for record in answer["records"].as_array().into_iter().flatten() {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
            written += 1;
        }
    }
    Ok(written)
}

/// `shoal restore`: the backup in `dir` into the cluster of `api`, into db `into` (default:
/// the db it came from).
pub async fn restore(api: &Api, dir: &Path, into: Option<&str>) -> anyhow::Result<()> {
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("{} is not a complete backup (no manifest.json)", dir.display()))?;
    let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("{}", manifest_path.display()))?;
    anyhow::ensure!(
        manifest.format == FORMAT,
        "{}: format {:?}, expected {FORMAT}",
        manifest_path.display(),
        manifest.format
    );
    let db = into.unwrap_or(&manifest.db);
    let started = tokio::time::Instant::now();
    let progress = bar(manifest.points, "restore {bar:30} {pos}/{len} points ({per_sec}, eta {eta})");
    let mut restored = 0u64;
    for shard in &manifest.shards {
        let path = dir.join(&shard.file);
        let reader = std::io::BufReader::new(zstd::Decoder::new(
            std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?,
        )?);
        let mut bits: Vec<serde_json::Value> = Vec::with_capacity(RESTORE_BATCH);
        let mut in_file = 0u64;
        let mut lines = reader.lines();
        loop {
            let line = lines.next().transpose().with_context(|| format!("reading {}", path.display()))?;
            if let Some(line) = &line {
                bits.push(
                    serde_json::from_str(line).with_context(|| format!("{}: a line is not a point", path.display()))?,
                );
            }
            if bits.len() >= RESTORE_BATCH || (line.is_none() && !bits.is_empty()) {
                let n = bits.len() as u64;
                let body =
                    serde_json::json!({ "db": db, "namespace": shard.namespace, "metric": shard.metric, "bits": bits });
                api.post("/data", body.to_string().into_bytes(), true).await?;
                bits.clear();
                in_file += n;
                restored += n;
                progress.inc(n);
            }
            if line.is_none() {
                break;
            }
        }
        anyhow::ensure!(
            in_file == shard.points,
            "{}: {in_file} points, the manifest says {} (a damaged backup)",
            path.display(),
            shard.points
        );
    }
    progress.finish_and_clear();
    println!(
        "restored {restored} points of {} shards into db {db} in {:.1} s",
        manifest.shards.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `shoal import`: a line-protocol file (`-` for standard input) in batches, with the rate.
pub async fn import(api: &Api, file: &Path, db: &str, namespace: &str, precision: &str) -> anyhow::Result<()> {
    let (reader, size): (Box<dyn BufRead>, u64) = if file == Path::new("-") {
        (Box::new(std::io::BufReader::new(std::io::stdin())), 0)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let size = f.metadata()?.len();
        (Box::new(std::io::BufReader::with_capacity(1 << 20, f)), size)
    };
    let progress = bar(size, "import {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}");
    let path = reqwest::Url::parse_with_params(
        &format!("{}/write", api.node),
        &[("db", db), ("namespace", namespace), ("precision", precision)],
    )
    .context("--node must be a URL such as http://127.0.0.1:9000")?;
    let path = format!("{}?{}", path.path(), path.query().unwrap_or_default());
    let started = tokio::time::Instant::now();
    let (mut body, mut lines_in_body, mut lines, mut line_no) = (String::new(), 0usize, 0u64, 0u64);
    let mut input = reader.lines();
    loop {
        let line = input.next().transpose().with_context(|| format!("reading {}", file.display()))?;
        if let Some(line) = &line {
            line_no += 1;
            progress.inc(line.len() as u64 + 1);
            let trimmed = line.trim();
            // Blank lines and comments (`influx -export` writes `# DML` and `# CONTEXT-…`).
            if !trimmed.is_empty() && !trimmed.starts_with('#') {
                body.push_str(trimmed);
                body.push('\n');
                lines_in_body += 1;
            }
        }
        let full = lines_in_body >= IMPORT_LINES || body.len() >= IMPORT_BYTES;
        if full || (line.is_none() && lines_in_body > 0) {
            let first = line_no - lines_in_body as u64 + 1;
            api.post(&path, std::mem::take(&mut body).into_bytes(), false)
                .await
                .with_context(|| format!("the batch of lines from about line {first}"))?;
            lines += lines_in_body as u64;
            lines_in_body = 0;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            progress.set_message(format!("{lines} lines, {:.0} lines/s", lines as f64 / secs));
        }
        if line.is_none() {
            break;
        }
    }
    progress.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    println!(
        "imported {lines} lines into db {db} namespace {namespace} in {secs:.1} s ({:.0} lines/s)",
        lines as f64 / secs
    );
    Ok(())
}

/// A progress bar for `shoal leave`: shards handed off of those to hand off.
pub fn leave_bar() -> ProgressBar {
    bar(0, "leave {bar:30} {pos}/{len} shards handed off {msg}")
}

fn chrono_now_ms() -> i64 {
    #[allow(clippy::disallowed_methods)] // the CLI stamps the backup with the real time
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
