//! Fuzzing on stable Rust, bounded so that CI runs it every time: each target starts from
//! valid seed inputs and feeds the parser mutations of them (bit flips, byte edits, inserts,
//! deletes, repeats, splices between seeds, boundary values). An input whose outcome is new
//! (a different error, or success) joins the corpus, a crude but useful feedback. Every input
//! must give a result or an error that says something, never a panic, and for files never
//! anything but an error naming the file.
//!
//! `SHOAL_FUZZ_SECONDS` (default 3 per target) and `SHOAL_FUZZ_SEED` set the run; a failure
//! prints the seed and writes the input to `target/fuzz-failures/<target>.bin`. The figures
//! of a longer run are in docs/security.md.
#![allow(clippy::disallowed_methods)] // time bounds on the real clock

use shoal::model::MetricKey;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"-",
    b"=",
    b",",
    b" ",
    b"\n",
    b"\\",
    b"\"",
    b"'",
    b"{",
    b"}",
    b"[",
    b"]",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"1e308",
    b"NaN",
    b"inf",
    b"0",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x01",
];

/// One mutation of `input`, sometimes spliced with another corpus entry.
fn mutate(input: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => out.insert(at, rng.next() as u8),
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 => {
                let what = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(at..at, what.iter().copied());
            }
            5 if !out.is_empty() => {
                // Repeat a slice: long runs find length and limit bugs.
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(32)).min(out.len());
                let piece: Vec<u8> = out[start..end].to_vec();
                for _ in 0..rng.below(64) {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => out.truncate(at),
        }
    }
    out.truncate(1 << 20);
    out
}

fn budget() -> Duration {
    let secs = std::env::var("SHOAL_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("SHOAL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed)
}

/// Runs `check` on mutations of `seeds` for the time budget; `check` returns a short label of
/// the outcome (used as feedback) and panics only on a real failure. Returns inputs tried.
fn fuzz(target: &str, seeds: Vec<Vec<u8>>, check: impl Fn(&[u8]) -> String) -> u64 {
    let mut rng = Rng(seed() ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let mut corpus = seeds;
    let mut outcomes = HashSet::new();
    let deadline = Instant::now() + budget();
    let mut tried = 0u64;
    while Instant::now() < deadline {
        let base = corpus[rng.below(corpus.len())].clone();
        let input = mutate(&base, &corpus, &mut rng);
        tried += 1;
        match std::panic::catch_unwind(AssertUnwindSafe(|| check(&input))) {
            Ok(label) => {
                if outcomes.insert(label) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(panic) => {
                let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join(format!("{target}.bin"));
                std::fs::write(&path, &input).unwrap();
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                panic!(
                    "{target}: input {tried} (seed {}) failed: {what:?}; the input is in {}",
                    seed(),
                    path.display()
                );
            }
        }
    }
    println!("fuzz {target}: {tried} inputs, {} distinct outcomes, corpus {}", outcomes.len(), corpus.len());
    tried
}

/// The outcome label of an error message: its first words, without the varying details.
fn label(prefix: &str, message: &str) -> String {
    assert!(!message.trim().is_empty(), "an error must say what was wrong");
    let words: String = message.split_whitespace().take(4).collect::<Vec<_>>().join(" ");
    format!("{prefix}: {words}")
}

#[test]
fn fuzz_line_protocol() {
    let seeds = [
        "cpu,host=a,region=eu value=0.5 1700000000000000000\ncpu,host=b value=1i 1700000000000000001",
        "mem,host=a used=10i,free=2.5,ok=true,name=\"x y\" 1700000000000000000",
        "weather,location=us\\ midwest temperature=82 1465839830100400200\n# comment\n\n",
        "m value=1",
        "m,t=\"q\" value=-1e-3,other=3u 1",
    ];
    let tried = fuzz("line_protocol", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |input| {
        let text = String::from_utf8_lossy(input);
        for precision in [shoal::ingest::Precision::Ns, shoal::ingest::Precision::S] {
            match shoal::ingest::parse_line_protocol(&text, "db", "ns", precision, 1_700_000_000_000, 10_000) {
                Ok(batch) => {
                    for (_, rows) in &batch.metrics {
                        rows.validate().expect("a parsed batch is well formed");
                    }
                }
                Err(e) => return label("err", &e.to_string()),
            }
        }
        "ok".into()
    });
    assert!(tried > 100);
}

#[test]
fn fuzz_nsdb_json() {
    let seeds = [
        r#"{"db":"d","namespace":"n","metric":"m","bit":{"timestamp":1000,"value":1.5,"dimensions":{"a":"x"},"tags":{"t":1}}}"#,
        r#"{"db":"d","namespace":"n","metric":"m","bits":[{"timestamp":1,"value":1},{"timestamp":2,"value":-2,"tags":{"k":"v"}}]}"#,
    ];
    let tried = fuzz("nsdb_json", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |input| {
        match shoal::ingest::parse_nsdb_json(input, 1_700_000_000_000, 10_000) {
            Ok(batch) => {
                for (_, rows) in &batch.metrics {
                    rows.validate().expect("a parsed batch is well formed");
                }
                "ok".into()
            }
            Err(e) => label("err", &e.to_string()),
        }
    });
    assert!(tried > 100);
}

#[test]
fn fuzz_sql() {
    let seeds = [
        "SELECT avg(value) FROM cpu WHERE timestamp > now - 2h AND region = 'eu' GROUP BY region",
        "SELECT count(distinct host) FROM cpu GROUP BY INTERVAL 5 m ORDER BY timestamp DESC LIMIT 10",
        "SELECT * FROM m WHERE value >= 1.5 OR host LIKE 'a%' AND tag IN ('x', 'y') AND d IS NULL",
        "DELETE FROM m WHERE timestamp < 1000 AND NOT host = 'z'",
        "SELECT first(value), last(value), min(value), max(value), sum(value) FROM m",
    ];
    let tried = fuzz("sql", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |input| {
        let text = String::from_utf8_lossy(input);
        match shoal::query::plan::parse(&text, 1_700_000_000_000) {
            Ok(shoal::query::plan::Statement::Select(_)) => "select".into(),
            Ok(shoal::query::plan::Statement::Delete(_)) => "delete".into(),
            Err(e) => label("err", &e.0),
        }
    });
    assert!(tried > 100);
}

fn sample_batch() -> shoal::model::batch::RowBatch {
    let lines = "cpu,host=a,region=eu value=0.5 1000\ncpu,host=b,region=us value=2.0 2000\ncpu,host=a value=3.25 3000";
    let batch = shoal::ingest::parse_line_protocol(lines, "db", "ns", shoal::ingest::Precision::Ms, 0, 100).unwrap();
    batch.metrics.into_iter().next().unwrap().1
}

#[test]
fn fuzz_internal_wire_frames() {
    use shoal::peer::*;
    let shard = shoal::model::ShardId { metric: MetricKey::new("db", "ns", "cpu").unwrap(), start: 0 };
    let batch = sample_batch();
    let seeds = vec![
        postcard::to_stdvec(&ReplicaWrite { shard: shard.clone(), batch: batch.clone(), epoch: 3 }).unwrap(),
        postcard::to_stdvec(&MergeRequest { shard: shard.clone(), batch, epoch: 0 }).unwrap(),
        postcard::to_stdvec(&DigestRequest { shard: shard.clone(), from: 0, to: 10, block_ms: 1, epoch: 0 }).unwrap(),
        postcard::to_stdvec(&PointsRequest { shard: shard.clone(), from: 0, to: 10, max: 9, epoch: 0 }).unwrap(),
    ];
    let tried = fuzz("wire_frames", seeds, |input| {
        let mut outcome = String::new();
        match ReplicaWrite::decode(input) {
            // What the replica does with a decoded write before storing it.
            Ok(w) => outcome += if w.batch.validate().is_ok() { "write-valid " } else { "write-invalid " },
            Err(_) => outcome += "write-err ",
        }
        match postcard::from_bytes::<MergeRequest>(input) {
            Ok(m) => outcome += if m.batch.validate().is_ok() { "merge-valid " } else { "merge-invalid " },
            Err(_) => outcome += "merge-err ",
        }
        outcome += if postcard::from_bytes::<DigestRequest>(input).is_ok() { "digest " } else { "digest-err " };
        outcome += if postcard::from_bytes::<PointsRequest>(input).is_ok() { "points " } else { "points-err " };
        outcome += if postcard::from_bytes::<PartialRequest>(input).is_ok() { "partial " } else { "partial-err " };
        outcome += if postcard::from_bytes::<TombstonesRequest>(input).is_ok() { "tomb " } else { "tomb-err " };
        outcome += if ReplicaDelete::from_rule(input).is_ok() { "rule" } else { "rule-err" };
        outcome
    });
    assert!(tried > 100);
}

#[test]
fn fuzz_catalog_state_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = shoal::catalog::Catalog::open(dir.path(), "a", 0, false).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let key = MetricKey::new("db", "ns", "cpu").unwrap();
    rt.block_on(catalog.admit(&[(key.clone(), sample_batch())], &Default::default())).unwrap();
    let shard = shoal::model::ShardId { metric: key.clone(), start: 0 };
    rt.block_on(catalog.add_replicas(&shard, &["a".into(), "b".into()])).unwrap();
    let state = catalog.state_bytes();
    drop(catalog);
    let work = tempfile::tempdir().unwrap();
    let tried = fuzz("catalog", vec![state], |input| {
        // As a peer's state or a push of some parts.
        let state = match shoal::catalog::CatalogState::from_bytes(input) {
            Ok(s) => {
                let _ = (s.placement(), s.schemas(), s.digest());
                "state-ok"
            }
            Err(_) => "state-err",
        };
        // As a record of the node's catalog log, framed so that its checksum matches and the
        // decoder is reached.
        let mut record = Vec::new();
        shoal::storage::wal::frame(input, &mut record);
        std::fs::write(work.path().join("catalog.log"), &record).unwrap();
        let file = match shoal::catalog::Catalog::open(work.path(), "a", 0, false) {
            Ok(c) => {
                let _ = (c.placement(), c.metrics());
                "file-ok".to_string()
            }
            Err(e) => {
                assert!(e.to_string().contains("catalog.log"), "the error names the file: {e}");
                "file-err".to_string()
            }
        };
        format!("{state} {file}")
    });
    assert!(tried > 100);
}

#[test]
fn fuzz_wal_replay() {
    let dir = tempfile::tempdir().unwrap();
    let shard = shoal::model::ShardId { metric: MetricKey::new("db", "ns", "cpu").unwrap(), start: 0 };
    let mut log = Vec::new();
    for _ in 0..3 {
        let payload = postcard::to_stdvec(&(&shard, sample_batch())).unwrap();
        log.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        log.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        log.extend_from_slice(&payload);
    }
    let path = dir.path().join("wal-0000000000000000.log");
    let tried = fuzz("wal", vec![log], |input| {
        std::fs::write(&path, input).unwrap();
        let mut records = 0;
        let outcome = shoal::storage::wal::replay_records(&path, |_, payload| {
            // What node replay does with a record: decode its shard and points.
            let decoded = postcard::take_from_bytes::<shoal::model::ShardId>(payload)
                .and_then(|(_, rest)| postcard::from_bytes::<shoal::model::batch::RowBatch>(rest));
            if let Ok(batch) = decoded {
                let _ = batch.validate();
            }
            records += 1;
            Ok::<(), std::io::Error>(())
        });
        match outcome {
            Ok((len, torn)) => {
                assert!(len + torn <= input.len() as u64, "replay never counts past the file");
                format!("ok {records} {}", torn > 0)
            }
            Err(e) => label("err", &e.to_string()),
        }
    });
    assert!(tried > 100);
}

#[test]
fn fuzz_segment_reader() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.seg");
    shoal::storage::segment::write_segment(&good, 1, &sample_batch(), None).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let path = dir.path().join("seg-0000000000000001.seg");
    let tried = fuzz("segment", vec![bytes], |input| {
        // Raw bytes, then the same with the footer checksum made to match, so that the footer
        // decoder and the block reader see the mutation too.
        let mut outcome = String::new();
        for reseal in [false, true] {
            let mut data = input.to_vec();
            if reseal && data.len() >= 24 {
                let n = data.len();
                let footer_len = u32::from_le_bytes(data[n - 16..n - 12].try_into().unwrap()) as usize;
                if footer_len <= n - 16 {
                    let crc = crc32fast::hash(&data[n - 16 - footer_len..n - 16]);
                    data[n - 12..n - 8].copy_from_slice(&crc.to_le_bytes());
                }
            }
            std::fs::write(&path, &data).unwrap();
            match shoal::storage::segment::Segment::open(&path, 1) {
                Ok(segment) => {
                    for meta in segment.blocks.clone() {
                        if let Err(e) = segment.read_block(&meta, None) {
                            assert!(e.to_string().contains(&path.display().to_string()), "names the file: {e}");
                        }
                    }
                    outcome += "open ";
                }
                Err(e) => {
                    assert!(e.to_string().contains(&path.display().to_string()), "names the file: {e}");
                    outcome += &label("err", &e.to_string());
                }
            }
        }
        outcome
    });
    assert!(tried > 100);
}
