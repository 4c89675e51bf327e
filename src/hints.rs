//! Hinted handoff. When a write meets its consistency level but a replica missed its share, the
//! coordinator keeps that share for the replica in `<data-dir>/hints/<node>.log` (framed and
//! checksummed like the WAL, fsynced before the write is acknowledged), and replays the hints in
//! order once the replica is alive again. Replicas store replayed points through
//! [`crate::storage::Shard::merge`], so a hint for a write that did arrive after all (a timeout
//! after the fact) stores nothing twice.
//!
//! Each target's hints are bounded by bytes and by age (`shoal.hints.*`): past either bound new
//! hints for that target are dropped and counted, and replica repair, which compares the
//! replicas' block digests, brings the replica up to date instead. Replay works on a rotated
//! file (`<node>.replaying`), so new hints keep appending while older ones are sent.

use crate::metrics::Metrics;
use crate::storage::wal::AppendLog;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;

/// One target's hints: the file being appended and, while a replay is under way, the rotated
/// file being sent.
#[derive(Default)]
struct Target {
    appending: Option<AppendLog>,
    /// Bytes in both files.
    bytes: u64,
    /// When the oldest waiting hint was recorded (epoch ms).
    oldest_ms: Option<i64>,
    /// How far the rotated file has been replayed.
    replay_offset: u64,
}

pub struct HintStore {
    dir: PathBuf,
    targets: Mutex<HashMap<String, Target>>,
    bytes_max: u64,
    age_max_ms: i64,
}

/// A hint read back for replay.
pub struct Hint {
    pub recorded_ms: i64,
    /// The postcard `ReplicaWrite` the replica missed.
    pub payload: Vec<u8>,
}

impl HintStore {
    /// Opens the hint folder and finds the hints a previous run left.
    pub fn open(data_dir: &Path, bytes_max: u64, age_max: std::time::Duration) -> std::io::Result<Self> {
        let dir = data_dir.join("hints");
        std::fs::create_dir_all(&dir)?;
        let mut targets: HashMap<String, Target> = HashMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let (Some(stem), Some(ext)) = (path.file_stem(), path.extension()) else { continue };
            if ext != "log" && ext != "replaying" {
                continue;
            }
            let t = targets.entry(stem.to_string_lossy().to_string()).or_default();
            t.bytes += std::fs::metadata(&path)?.len();
            if let Some((hint, _)) = read_frame(&path, 0)? {
                t.oldest_ms = Some(t.oldest_ms.map_or(hint.recorded_ms, |o| o.min(hint.recorded_ms)));
            }
        }
        Ok(Self { dir, targets: Mutex::new(targets), bytes_max, age_max_ms: age_max.as_millis() as i64 })
    }

    fn log_path(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.log"))
    }

    fn replaying_path(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.replaying"))
    }

    /// Durably records `payload` (a postcard `ReplicaWrite`) for `target`. Returns false when
    /// the target's hints are past their bounds and this one was dropped.
    pub fn record(&self, target: &str, payload: &[u8], now_ms: i64, metrics: &Metrics) -> std::io::Result<bool> {
        let mut targets = self.targets.lock().expect("hints lock");
        let t = targets.entry(target.to_string()).or_default();
        let mut content = Vec::with_capacity(payload.len() + 8);
        content.extend_from_slice(&now_ms.to_le_bytes());
        content.extend_from_slice(payload);
        let mut frame = Vec::with_capacity(content.len() + 8);
        crate::storage::wal::frame(&content, &mut frame);
        let too_old = t.oldest_ms.is_some_and(|o| now_ms - o > self.age_max_ms);
        if too_old || t.bytes + frame.len() as u64 > self.bytes_max {
            metrics.hints_dropped.fetch_add(1, Relaxed);
            return Ok(false);
        }
        if t.appending.is_none() {
            t.appending = Some(AppendLog::open(&self.log_path(target))?);
        }
        t.appending.as_mut().expect("opened above").append_durable(&frame)?;
        t.bytes += frame.len() as u64;
        t.oldest_ms.get_or_insert(now_ms);
        metrics.hints_stored.fetch_add(1, Relaxed);
        Ok(true)
    }

    /// Targets with hints waiting, and how many bytes each.
    pub fn pending(&self) -> Vec<(String, u64)> {
        let targets = self.targets.lock().expect("hints lock");
        let mut out: Vec<(String, u64)> =
            targets.iter().filter(|(_, t)| t.bytes > 0).map(|(k, t)| (k.clone(), t.bytes)).collect();
        out.sort();
        out
    }

    /// The next hints for `target`, oldest first, at most about `bytes_max` of them; `None`
    /// when nothing waits. Call [`HintStore::replayed`] once they are stored on the target.
    ///
    /// Hints older than the age bound at `now_ms` are dropped (and counted) instead: a delete's
    /// tombstone lives only that long, so an older hint could bring back points deleted since.
    /// Replica repair brings the replica up to date instead.
    pub fn next(
        &self,
        target: &str,
        bytes_max: u64,
        now_ms: i64,
        metrics: &Metrics,
    ) -> std::io::Result<Option<(Vec<Hint>, u64)>> {
        let mut targets = self.targets.lock().expect("hints lock");
        let Some(t) = targets.get_mut(target) else { return Ok(None) };
        let replaying = self.replaying_path(target);
        if !replaying.exists() {
            // Rotate: what was appended so far is replayed, new hints go to a fresh file.
            if t.appending.take().is_none() && !self.log_path(target).exists() {
                return Ok(None);
            }
            std::fs::rename(self.log_path(target), &replaying)?;
            crate::storage::fsync_dir(&self.dir)?;
            t.replay_offset = 0;
        }
        let (mut hints, mut offset, mut read) = (Vec::new(), t.replay_offset, 0u64);
        while read < bytes_max {
            match read_frame(&replaying, offset)? {
                Some((hint, next)) => {
                    read += next - offset;
                    offset = next;
                    if now_ms - hint.recorded_ms > self.age_max_ms {
                        metrics.hints_dropped.fetch_add(1, Relaxed);
                    } else {
                        hints.push(hint);
                    }
                }
                None => {
                    // The end, or a torn tail from a crash (never acknowledged): either way
                    // the rotated file is done, and must not be read again forever.
                    offset = offset.max(std::fs::metadata(&replaying)?.len());
                    break;
                }
            }
        }
        Ok(Some((hints, offset)))
    }

    /// Records that the hints [`HintStore::next`] returned, up to `offset`, reached the target.
    /// Once the whole rotated file has been sent, it is removed.
    pub fn replayed(&self, target: &str, offset: u64, count: u64, metrics: &Metrics) -> std::io::Result<()> {
        let mut targets = self.targets.lock().expect("hints lock");
        let Some(t) = targets.get_mut(target) else { return Ok(()) };
        let replaying = self.replaying_path(target);
        let len = std::fs::metadata(&replaying).map(|m| m.len()).unwrap_or(0);
        metrics.hints_replayed.fetch_add(count, Relaxed);
        if offset >= len {
            std::fs::remove_file(&replaying)?;
            crate::storage::fsync_dir(&self.dir)?;
            // What waits now is the file being appended (recounted: a torn tail is not a hint).
            t.bytes = match &t.appending {
                Some(log) => log.len(),
                None => std::fs::metadata(self.log_path(target)).map_or(0, |m| m.len()),
            };
            t.replay_offset = 0;
            t.oldest_ms = read_frame(&self.log_path(target), 0)?.map(|(h, _)| h.recorded_ms);
        } else {
            t.replay_offset = offset;
        }
        Ok(())
    }

    /// Drops every hint for `target` (a node that left or was replaced for good), counting
    /// them as dropped.
    pub fn discard(&self, target: &str, metrics: &Metrics) -> std::io::Result<()> {
        let mut targets = self.targets.lock().expect("hints lock");
        let Some(t) = targets.remove(target) else { return Ok(()) };
        for path in [self.log_path(target), self.replaying_path(target)] {
            let mut offset = 0;
            while let Some((_, next)) = read_frame(&path, offset)? {
                offset = next;
                metrics.hints_dropped.fetch_add(1, Relaxed);
            }
            if path.exists() {
                std::fs::remove_file(&path)?;
            }
        }
        drop(t);
        crate::storage::fsync_dir(&self.dir)
    }

    /// When the oldest hint for `target` was recorded.
    pub fn oldest_ms(&self, target: &str) -> Option<i64> {
        self.targets.lock().expect("hints lock").get(target).and_then(|t| t.oldest_ms)
    }
}

/// Reads the record at `offset`; `None` at the end of the file or at a torn or corrupt record.
fn read_frame(path: &Path, offset: u64) -> std::io::Result<Option<(Hint, u64)>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let Some(mut content) = crate::storage::wal::read_record(&mut std::io::BufReader::new(file))? else {
        return Ok(None);
    };
    if content.len() < 8 {
        return Ok(None);
    }
    let len = content.len();
    let recorded_ms = i64::from_le_bytes(content[..8].try_into().expect("8 bytes"));
    let hint = Hint { recorded_ms, payload: content.split_off(8) };
    Ok(Some((hint, offset + crate::storage::wal::record_len(len))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_replay_in_order_across_rotation_and_reopen_and_respect_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::default();
        let store = HintStore::open(dir.path(), 1 << 20, std::time::Duration::from_secs(60)).unwrap();
        for i in 0..5u8 {
            assert!(store.record("b", &[i; 10], 1000 + i64::from(i), &m).unwrap());
        }
        // A replay takes the first two, then more hints arrive, then the store is reopened.
        let (hints, offset) = store.next("b", 30, 2000, &m).unwrap().unwrap();
        assert_eq!(hints.iter().map(|h| h.payload[0]).collect::<Vec<_>>(), [0, 1]);
        store.replayed("b", offset, 2, &m).unwrap();
        assert!(store.record("b", &[9; 10], 2000, &m).unwrap());
        drop(store);
        let store = HintStore::open(dir.path(), 1 << 20, std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(store.oldest_ms("b"), Some(1000));
        let mut seen = Vec::new();
        while let Some((hints, offset)) = store.next("b", 1 << 20, 2000, &m).unwrap() {
            if hints.is_empty() {
                // The rotated file is finished; the next call rotates the newer file.
                store.replayed("b", offset, 0, &m).unwrap();
                if store.pending().is_empty() {
                    break;
                }
                continue;
            }
            seen.extend(hints.iter().map(|h| h.payload[0]));
            store.replayed("b", offset, hints.len() as u64, &m).unwrap();
        }
        // After the reopen nothing remembered the offset, so 0 and 1 come again (a replica
        // stores repeats once); the order is kept.
        assert_eq!(seen, [0, 1, 2, 3, 4, 9]);
        assert!(store.pending().is_empty());
        // Bounds: bytes, then age.
        let small = HintStore::open(&dir.path().join("s"), 60, std::time::Duration::from_secs(1)).unwrap();
        assert!(small.record("c", &[1; 10], 0, &m).unwrap());
        assert!(!small.record("c", &[1; 100], 0, &m).unwrap(), "past the byte bound");
        assert!(!small.record("c", &[1; 1], 5000, &m).unwrap(), "the oldest hint is past the age bound");
        assert_eq!(m.hints_dropped.load(Relaxed), 2);
        small.discard("c", &m).unwrap();
        assert!(small.pending().is_empty());
        assert_eq!(m.hints_dropped.load(Relaxed), 3);
    }

    /// A hint that waited past the age bound is not replayed: a delete since then may have
    /// outlived its tombstone.
    #[test]
    fn hints_past_the_age_bound_are_dropped_at_replay() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::default();
        let store = HintStore::open(dir.path(), 1 << 20, std::time::Duration::from_secs(60)).unwrap();
        assert!(store.record("b", &[1; 10], 0, &m).unwrap());
        assert!(store.record("b", &[2; 10], 30_000, &m).unwrap());
        let (hints, offset) = store.next("b", 1 << 20, 70_000, &m).unwrap().unwrap();
        assert_eq!(hints.iter().map(|h| h.payload[0]).collect::<Vec<_>>(), [2], "the hint of t=0 is 70 s old");
        assert_eq!(m.hints_dropped.load(Relaxed), 1);
        store.replayed("b", offset, 1, &m).unwrap();
        assert!(store.pending().is_empty());
    }
}
