//! Durable shard storage on this node: one folder per shard under `<data-dir>/shards` with its
//! immutable segments (see `shard.rs`), and one write-ahead log for all of them under
//! `<data-dir>/wal` (see `wal.rs`). This layer knows nothing of schemas, placement or queries:
//! it stores points and hands batches to a scan callback.

pub mod digest;
pub mod segment;
pub mod shard;
pub mod wal;

use crate::metrics::Metrics;
use crate::model::MetricKey;
use crate::model::batch::RowBatch;
use dashmap::DashMap;
pub use digest::BlockDigest;
pub use shard::{KeepRow, MergeTimes, Shard, ShardId, ShardSnapshot, Tombstone, TombstoneRule};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wal::NodeWal;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
    #[error("the shard was closed (its metric was dropped or the node is stopping)")]
    Closed,
}

impl StorageError {
    /// The disk is full: nothing was stored, and the same write can succeed once space is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StorageConfig {
    pub shard_interval_ms: i64,
    pub memtable_points_max: usize,
    /// Points in all shards' memtables together (see [`MemtableBudget`]).
    pub memtable_budget_points: usize,
    pub flush_interval: std::time::Duration,
    pub segments_max: usize,
    /// How long a delete's tombstone filters merged points.
    pub tombstone_grace_ms: i64,
    /// A new WAL file begins past this many bytes ([`wal::WAL_FILE_BYTES`] but in tests).
    pub wal_file_bytes: u64,
    /// Cut a corrupt WAL file at its first bad record instead of refusing to start
    /// (`shoal start --salvage-wal`).
    pub wal_salvage: bool,
}

pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a shard's folder so that a crash part way leaves a folder that start-up removes too:
/// the MANIFEST goes first (a folder without one holds nothing, see [`Storage::open`]), then the
/// rest. Removed in whatever order the directory lists them, a segment could go before the
/// MANIFEST that names it, and the node would not start again.
fn remove_shard_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join("MANIFEST")) {
        Ok(()) => fsync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::remove_dir_all(dir)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    crate::env::write_file(&mut f, &tmp, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// When the WAL holds more than this many files' worth, the shards whose records keep its
/// oldest file compact, however few points they hold: a shard written to rarely would otherwise
/// keep every file written since its first point for up to `flush-interval`.
const WAL_FILES_MAX: u64 = 4;

/// The node's bound on points held in memtables, over all its shards. `memtable-max-points`
/// bounds one shard; a node written to in many shards at once (many metrics, or a backfill over
/// many intervals) would otherwise hold up to that much in each until `flush-interval`.
///
/// A writer whose memtable grows past its share sees the total after each group commit: over
/// the budget, it compacts its own memtable if that holds at least [`Self::flush_min`] points;
/// a smaller one wakes [`Storage::relieve_memtables`], which compacts the largest. Frozen
/// memtables (being written to segments) are not counted: memory peaks near twice the budget.
pub struct MemtableBudget {
    max: u64,
    /// Holds the total, so that it is also the `shoal_memtable_points` gauge.
    metrics: Arc<Metrics>,
    pressure: tokio::sync::Notify,
}

impl MemtableBudget {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { max: max as u64, metrics, pressure: Default::default() })
    }

    /// Changes the total by a memtable's growth (or shrinking); whether it is now over budget.
    pub fn adjust(&self, from: u64, to: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let held = &self.metrics.memtable_points;
        let total = if to >= from {
            held.fetch_add(to - from, Relaxed) + (to - from)
        } else {
            held.fetch_sub(from - to, Relaxed) - (from - to)
        };
        total > self.max
    }

    /// The smallest memtable compacted for the budget's sake: smaller ones would make many tiny
    /// segments, each to be merged again.
    pub fn flush_min(&self) -> u64 {
        (self.max / 16).max(1)
    }

    /// Asks for the largest memtables to be compacted.
    pub fn press(&self) {
        self.pressure.notify_one();
    }
}

/// Told of every change to the points of shards held here, before the change is acknowledged
/// (the node revokes the read leases on them: [`crate::lease`]).
#[async_trait::async_trait]
pub trait ChangeGate: Send + Sync + 'static {
    async fn changed(&self, shards: &[ShardId]);
}

pub struct Storage {
    root: PathBuf,
    cfg: StorageConfig,
    metrics: Arc<Metrics>,
    wal: Arc<NodeWal>,
    shards: DashMap<ShardId, Arc<Shard>>,
    rule: TombstoneRule,
    budget: Arc<MemtableBudget>,
    /// Serializes shard creation so two writers never open the same folder twice.
    opening: tokio::sync::Mutex<()>,
    gate: std::sync::OnceLock<Arc<dyn ChangeGate>>,
}

impl Storage {
    /// Opens every shard found under `<data_dir>/shards`, then replays the WAL into them.
    pub async fn open(
        data_dir: &Path,
        cfg: StorageConfig,
        metrics: Arc<Metrics>,
        rule: TombstoneRule,
    ) -> Result<Arc<Self>, StorageError> {
        let root = data_dir.join("shards");
        std::fs::create_dir_all(&root)?;
        let wal = NodeWal::new(&data_dir.join("wal"), cfg.wal_file_bytes, metrics.clone());
        let budget = MemtableBudget::new(cfg.memtable_budget_points, metrics.clone());
        let storage = Arc::new(Self {
            root: root.clone(),
            cfg,
            metrics,
            wal: wal.clone(),
            shards: DashMap::new(),
            rule: rule.clone(),
            budget: budget.clone(),
            opening: Default::default(),
            gate: Default::default(),
        });
        for id in discover_shards(&root)? {
            let dir = shard::shard_dir(&root, &id);
            if !dir.join("MANIFEST").exists() && wal::list_wal_seqs(&dir)?.is_empty() {
                // Its creation stopped before the MANIFEST was written, so it holds nothing;
                // WAL records with its id are of a shard that was dropped.
                std::fs::remove_dir_all(&dir)?;
                continue;
            }
            let shard =
                Shard::open(&root, id.clone(), cfg, wal.clone(), storage.metrics.clone(), rule.clone(), budget.clone())
                    .await?;
            storage.shards.insert(id, shard);
        }
        let lsn_floor = storage.shards.iter().map(|s| s.flushed_lsn()).max().unwrap_or(0);
        let replaying = storage.clone();
        crate::env::spawn_blocking(move || {
            replaying.wal.recover(lsn_floor, replaying.cfg.wal_salvage, |end, payload| {
                let (id, batch) = postcard::take_from_bytes::<ShardId>(payload)
                    .map_err(|e| StorageError::Corrupt(format!("the WAL record ending at {end}: {e}")))?;
                match replaying.shards.get(&id) {
                    Some(shard) => shard.replay(end - wal::record_len(payload.len()), end, batch),
                    // A shard dropped since.
                    None => Ok(()),
                }
            })
        })
        .await
        .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        for shard in storage.shards.iter().filter(|s| s.memtable_points() > 0) {
            shard.recount();
        }
        // Ends when the storage is dropped (its `Drop` wakes it one last time).
        let weak = Arc::downgrade(&storage);
        tokio::spawn(async move {
            loop {
                budget.pressure.notified().await;
                let Some(storage) = weak.upgrade() else { return };
                storage.relieve_memtables();
            }
        });
        Ok(storage)
    }

    /// Over the memtable budget: asks the shards with the largest memtables to compact them,
    /// until what they hold would bring the total down to half the budget (so that a node
    /// just over it does not compact at every write).
    fn relieve_memtables(&self) {
        let held = self.metrics.memtable_points.load(std::sync::atomic::Ordering::Relaxed);
        if held <= self.budget.max {
            return;
        }
        let mut by_size: Vec<(u64, Arc<Shard>)> =
            self.shards.iter().map(|s| (s.memtable_points(), s.clone())).filter(|(n, _)| *n > 0).collect();
        by_size.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let mut excess = held - self.budget.max / 2;
        for (points, shard) in by_size {
            if excess == 0 {
                break;
            }
            shard.compact();
            excess = excess.saturating_sub(points);
        }
    }

    /// Start of the shard holding `timestamp`: buckets are half-open `[start, start + interval)`.
    pub fn shard_start(&self, timestamp: i64) -> i64 {
        timestamp.div_euclid(self.cfg.shard_interval_ms) * self.cfg.shard_interval_ms
    }

    pub fn shard_interval_ms(&self) -> i64 {
        self.cfg.shard_interval_ms
    }

    /// Sets what is told of changes (once, as the node opens; before that nothing changes).
    pub fn set_change_gate(&self, gate: Arc<dyn ChangeGate>) {
        let _ = self.gate.set(gate);
    }

    /// Passes the change of `shards` through the gate; whatever the change's own outcome, as a
    /// failed one may have changed part of them.
    async fn changed<T>(&self, shards: &[ShardId], outcome: T) -> T {
        if let Some(gate) = self.gate.get() {
            gate.changed(shards).await;
        }
        outcome
    }

    async fn shard(&self, id: ShardId) -> Result<Arc<Shard>, StorageError> {
        if let Some(s) = self.shards.get(&id) {
            return Ok(s.clone());
        }
        let _guard = self.opening.lock().await;
        if let Some(s) = self.shards.get(&id) {
            return Ok(s.clone());
        }
        let shard = Shard::open(
            &self.root,
            id.clone(),
            self.cfg,
            self.wal.clone(),
            self.metrics.clone(),
            self.rule.clone(),
            self.budget.clone(),
        )
        .await?;
        self.shards.insert(id, shard.clone());
        Ok(shard)
    }

    /// Splits `batch` by shard and makes it durable; returns when every shard has fsynced.
    pub async fn write(&self, metric: &MetricKey, batch: RowBatch) -> Result<(), StorageError> {
        let Some((lo, hi)) = shard::time_range(&batch) else { return Ok(()) };
        if self.shard_start(lo) == self.shard_start(hi) {
            // The common case, a batch inside one shard, is handed over without a copy.
            let id = ShardId { metric: metric.clone(), start: self.shard_start(lo) };
            let outcome = self.shard(id.clone()).await?.append(batch).await.map(|_| ());
            return self.changed(&[id], outcome).await;
        }
        let mut rows_by_shard: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (row, &ts) in batch.timestamps.iter().enumerate() {
            rows_by_shard.entry(self.shard_start(ts)).or_default().push(row);
        }
        let mut appends = Vec::with_capacity(rows_by_shard.len());
        let mut ids = Vec::with_capacity(rows_by_shard.len());
        for (start, rows) in rows_by_shard {
            let shard = self.shard(ShardId { metric: metric.clone(), start }).await?;
            ids.push(shard.id.clone());
            let part = batch.select(&rows);
            appends.push(async move { shard.append(part).await });
        }
        let outcome = futures_util::future::join_all(appends).await.into_iter().try_for_each(|r| r.map(|_| ()));
        self.changed(&ids, outcome).await
    }

    /// Stores the points of `batch` (all inside `shard`) that the shard does not hold yet,
    /// creating the shard if needed; returns how many were new.
    pub async fn merge(&self, shard: &ShardId, batch: RowBatch, times: MergeTimes) -> Result<u64, StorageError> {
        let outcome = self.shard(shard.clone()).await?.merge(batch, times).await;
        match outcome {
            Ok(0) => outcome,
            _ => self.changed(std::slice::from_ref(shard), outcome).await,
        }
    }

    /// Deletes the rows of a shard that `keep` rejects, remembering the delete as a tombstone
    /// (the shard is created if this node holds none yet, so the tombstone still applies).
    pub async fn delete(&self, id: &ShardId, keep: KeepRow, tombstone: Tombstone) -> Result<u64, StorageError> {
        let outcome = self.shard(id.clone()).await?.delete(Some(keep), Some(tombstone)).await;
        self.changed(std::slice::from_ref(id), outcome).await
    }

    /// The live tombstones of a shard held here (none when it is not held).
    pub async fn tombstones(&self, id: &ShardId, now_ms: i64) -> Result<Vec<Tombstone>, StorageError> {
        let Some(shard) = self.shard_if_held(id) else { return Ok(Vec::new()) };
        // Tombstones received but not applied yet are applied first, which may remove points.
        let before = shard.version();
        let outcome = shard.tombstones(now_ms).await;
        if shard.version() == before { outcome } else { self.changed(std::slice::from_ref(id), outcome).await }
    }

    /// Removes one shard from this node (its replicas live elsewhere now).
    pub async fn drop_shard(&self, id: &ShardId) -> Result<(), StorageError> {
        let outcome = self.remove_shard(id).await;
        self.changed(std::slice::from_ref(id), outcome).await
    }

    async fn remove_shard(&self, id: &ShardId) -> Result<(), StorageError> {
        let _guard = self.opening.lock().await;
        if let Some((_, shard)) = self.shards.remove(id) {
            shard.close().await;
            remove_shard_dir(&shard.dir)?;
            if let Some(parent) = shard.dir.parent() {
                fsync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Shards of `metric` overlapping `[from, to)`, oldest first.
    pub fn shards_of(&self, metric: &MetricKey, from: i64, to: i64) -> Vec<Arc<Shard>> {
        let mut out: Vec<Arc<Shard>> = self
            .shards
            .iter()
            .filter(|e| &e.key().metric == metric && e.value().end > from && e.key().start < to)
            .map(|e| e.value().clone())
            .collect();
        out.sort_by_key(|s| s.id.start);
        out
    }

    /// The shard with this id, if this node holds it.
    pub fn shard_if_held(&self, id: &ShardId) -> Option<Arc<Shard>> {
        self.shards.get(id).map(|s| s.clone())
    }

    pub fn all_shards(&self) -> Vec<Arc<Shard>> {
        let mut out: Vec<Arc<Shard>> = self.shards.iter().map(|e| e.value().clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Removes every shard of `metric` from disk.
    pub async fn drop_metric(&self, metric: &MetricKey) -> Result<(), StorageError> {
        let mut removed = Vec::new();
        let outcome = self.remove_metric(metric, &mut removed).await;
        self.changed(&removed, outcome).await
    }

    /// Removes the metric's shards, naming in `removed` those it took out of the shard map.
    async fn remove_metric(&self, metric: &MetricKey, removed: &mut Vec<ShardId>) -> Result<(), StorageError> {
        let _guard = self.opening.lock().await;
        let ids: Vec<ShardId> =
            self.shards.iter().filter(|e| &e.key().metric == metric).map(|e| e.key().clone()).collect();
        for id in ids {
            if let Some((id, shard)) = self.shards.remove(&id) {
                shard.close().await;
                removed.push(id);
            }
        }
        let dir = self.root.join(&metric.db).join(&metric.namespace).join(&metric.metric);
        if dir.exists() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    remove_shard_dir(&entry.path())?;
                }
            }
            std::fs::remove_dir_all(&dir)?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Compacts the memtables of shards that have held points longer than the flush interval,
    /// and of those that keep the WAL's oldest file when it has grown past its bound; starts
    /// merging the segments of idle shards (see [`Shard::needs_merge`]); then deletes the WAL
    /// files whose records are all in segments. Over the memtable budget, it asks the largest
    /// memtables to compact again: a request can find a shard still compacting, or its queue
    /// full, and writes that stopped wake the relief task no more.
    pub async fn flush_idle(&self) {
        self.relieve_memtables();
        let now = tokio::time::Instant::now();
        let (wal_bytes, oldest_file_end) = self.wal.size();
        let keeps_oldest_file = |shard: &Shard| {
            wal_bytes > WAL_FILES_MAX * self.cfg.wal_file_bytes
                && oldest_file_end.is_some_and(|end| shard.unflushed_from().is_some_and(|from| from < end))
        };
        for shard in self.all_shards() {
            if (shard.needs_flush(now, self.cfg.flush_interval) || keeps_oldest_file(&shard))
                && let Err(e) = shard.flush().await
            {
                tracing::error!(shard = %shard.id, error = %e, "background compaction failed");
            }
            if shard.needs_merge(tokio::time::Instant::now(), self.cfg.flush_interval) {
                shard.merge_segments();
            }
        }
        if let Err(e) = self.collect_wal() {
            tracing::warn!(error = %e, "cannot delete old WAL files");
        }
    }

    /// Deletes the WAL files that no shard needs: those before the oldest record not yet in a
    /// segment. A shard dropped since needs none of its records.
    fn collect_wal(&self) -> std::io::Result<()> {
        // Read before the shards: a record appended meanwhile begins after it.
        let end = self.wal.end();
        let needed_from = self.shards.iter().filter_map(|s| s.unflushed_from()).min().unwrap_or(end).min(end);
        self.wal.remove_before(needed_from)
    }

    pub async fn flush_all(&self) -> Result<(), StorageError> {
        for shard in self.all_shards() {
            shard.flush().await?;
        }
        Ok(())
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // The relief task finds the storage gone and ends.
        self.budget.press();
    }
}

/// Finds shard folders: `<root>/<db>/<namespace>/<metric>/<start>`.
fn discover_shards(root: &Path) -> Result<Vec<ShardId>, StorageError> {
    fn subdirs(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                out.push((e.file_name().to_string_lossy().to_string(), e.path()));
            }
        }
        Ok(out)
    }
    let mut ids = Vec::new();
    for (db, db_dir) in subdirs(root)? {
        for (ns, ns_dir) in subdirs(&db_dir)? {
            for (metric, m_dir) in subdirs(&ns_dir)? {
                let Ok(key) = MetricKey::new(&db, &ns, &metric) else {
                    tracing::warn!(dir = %m_dir.display(), "ignoring a folder that is not a metric");
                    continue;
                };
                for (start, _) in subdirs(&m_dir)? {
                    match start.parse::<i64>() {
                        Ok(start) => ids.push(ShardId { metric: key.clone(), start }),
                        Err(_) => {
                            tracing::warn!(dir = %m_dir.display(), %start, "ignoring a folder that is not a shard")
                        }
                    }
                }
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Num, Point};

    fn cfg(memtable_points_max: usize) -> StorageConfig {
        StorageConfig {
            shard_interval_ms: 1000,
            memtable_points_max,
            memtable_budget_points: 4_000_000,
            flush_interval: std::time::Duration::from_secs(3600),
            segments_max: 3,
            tombstone_grace_ms: 1000,
            wal_file_bytes: wal::WAL_FILE_BYTES,
            wal_salvage: false,
        }
    }

    fn keep_all() -> TombstoneRule {
        Arc::new(|_| Box::new(|b: &RowBatch| vec![true; b.len()]))
    }

    fn count(storage: &Storage, key: &MetricKey) -> (usize, i64) {
        let (mut n, mut sum) = (0, 0);
        for shard in storage.shards_of(key, i64::MIN, i64::MAX) {
            shard
                .scan(i64::MIN, i64::MAX, None, &mut |b| {
                    n += b.len();
                    sum += b.values.iter().map(|v| v.as_f64() as i64).sum::<i64>();
                })
                .unwrap();
        }
        (n, sum)
    }

    /// Records the shards each change names.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<Vec<i64>>>);

    #[async_trait::async_trait]
    impl ChangeGate for Recorder {
        async fn changed(&self, shards: &[ShardId]) {
            let mut starts: Vec<i64> = shards.iter().map(|s| s.start).collect();
            starts.sort();
            self.0.lock().unwrap().push(starts);
        }
    }

    /// Every path that changes a shard's points tells the gate which shards it changed, and
    /// one that changes nothing (a merge of points held already) does not.
    #[tokio::test]
    async fn every_change_of_points_passes_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let storage = Storage::open(dir.path(), cfg(1000), Arc::new(Metrics::default()), keep_all()).await.unwrap();
        let gate = Arc::new(Recorder::default());
        storage.set_change_gate(gate.clone());
        let batch = |timestamps: &[i64]| {
            let points: Vec<Point> = timestamps
                .iter()
                .map(|&timestamp| Point {
                    timestamp,
                    value: Num::Int(1),
                    dimensions: Default::default(),
                    tags: Default::default(),
                })
                .collect();
            RowBatch::from_points(&points).unwrap()
        };
        let seen = || std::mem::take(&mut *gate.0.lock().unwrap());
        storage.write(&key, batch(&[10, 20])).await.unwrap();
        assert_eq!(seen(), vec![vec![0]], "a write inside one shard");
        storage.write(&key, batch(&[30, 1500, 2500])).await.unwrap();
        assert_eq!(seen(), vec![vec![0, 1000, 2000]], "a write over three shards");
        let shard = |start| ShardId { metric: key.clone(), start };
        let times = MergeTimes { now_ms: 10_000 };
        assert_eq!(storage.merge(&shard(0), batch(&[10, 20]), times).await.unwrap(), 0);
        assert!(seen().is_empty(), "a merge that stores nothing changes nothing");
        assert_eq!(storage.merge(&shard(0), batch(&[40]), MergeTimes { now_ms: 10_000 }).await.unwrap(), 1);
        assert_eq!(seen(), vec![vec![0]], "a merge that stores a point");
        let tombstone = Tombstone { at_ms: 10_000, rule: Vec::new() };
        storage.delete(&shard(1000), Box::new(|b: &RowBatch| vec![false; b.len()]), tombstone).await.unwrap();
        assert_eq!(seen(), vec![vec![1000]], "a delete");
        storage.drop_shard(&shard(2000)).await.unwrap();
        assert_eq!(seen(), vec![vec![2000]], "a shard dropped");
        storage.drop_metric(&key).await.unwrap();
        assert_eq!(seen(), vec![vec![0, 1000]], "a metric dropped: every shard of it held here");
    }

    /// The memtables of all shards together stay near the node's budget: many small ones are
    /// compacted, largest first, by the relief task; one large one compacts itself. Every
    /// point stays readable, and the gauge counts what the memtables hold.
    #[tokio::test]
    async fn memtables_of_all_shards_stay_within_the_node_budget() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let c = StorageConfig { memtable_budget_points: 1600, ..cfg(1_000_000) };
        let storage = Storage::open(dir.path(), c, metrics.clone(), keep_all()).await.unwrap();
        let held = || metrics.memtable_points.load(std::sync::atomic::Ordering::Relaxed);
        let in_memtables = || storage.all_shards().iter().map(|s| s.memtable_points()).sum::<u64>();
        // 40 metrics of 50 points: each memtable is below the budget's smallest compaction (100).
        let keys: Vec<MetricKey> = (0..40).map(|i| MetricKey::new("d", "n", &format!("m{i}")).unwrap()).collect();
        for key in &keys {
            storage.write(key, points(0..50, 1)).await.unwrap();
        }
        await_condition("the relief task back within the budget", || held() <= 1600 && held() == in_memtables()).await;
        assert!(metrics.segments_written.load(std::sync::atomic::Ordering::Relaxed) > 0, "small memtables compacted");
        for key in &keys {
            assert_eq!(count(&storage, key), (50, 50), "every point of {key:?} still read");
        }
        // Closed, a shard holds no share; reopened, the points replayed from the WAL count.
        for s in storage.all_shards() {
            s.close().await;
        }
        assert_eq!(held(), 0, "closed shards hold no part of the budget");
        drop(storage);
        let storage = Storage::open(dir.path(), c, metrics.clone(), keep_all()).await.unwrap();
        let in_memtables = || storage.all_shards().iter().map(|s| s.memtable_points()).sum::<u64>();
        assert!(in_memtables() > 0, "the memtables not compacted are replayed");
        await_condition("the replayed points counted", || held() == in_memtables()).await;
        // One shard past the budget compacts its own memtable.
        let big = MetricKey::new("d", "n", "big").unwrap();
        storage.write(&big, points(0..1000, 1)).await.unwrap();
        storage.write(&big, points(500..1500, 1)).await.unwrap();
        await_condition("the large memtable compacted", || held() <= 1600 && held() == in_memtables()).await;
        assert_eq!(count(&storage, &big).0, 1500, "the overlapping batch stored its new points once");
        // A shard gone holds no part of the budget.
        for key in keys.iter().chain([&big]) {
            storage.drop_metric(key).await.unwrap();
        }
        await_condition("nothing held once every shard is gone", || held() == 0).await;
        assert!(metrics.render(0).contains("\nshoal_memtable_points 0\n"), "the gauge is exported");
    }

    #[tokio::test]
    async fn writes_survive_reopen_through_wal_segments_merges_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let metrics = Arc::new(Metrics::default());
        let storage = Storage::open(dir.path(), cfg(50), metrics.clone(), keep_all()).await.unwrap();
        // 10 appends of 30 points over 3 shards: crosses the memtable limit and the merge limit.
        for round in 0..10 {
            let points: Vec<Point> = (0..30)
                .map(|i| Point {
                    timestamp: (round * 30 + i) * 10 - 500,
                    value: Num::Int(1),
                    dimensions: Default::default(),
                    tags: Default::default(),
                })
                .collect();
            storage.write(&key, RowBatch::from_points(&points).unwrap()).await.unwrap();
        }
        assert_eq!(count(&storage, &key), (300, 300));
        assert_eq!(storage.shard_count(), 4, "timestamps -500..2500 span 4 one-second shards");
        // Compaction runs behind the writes, on the background threads.
        await_condition("a segment written past the memtable limit", || {
            metrics.segments_written.load(std::sync::atomic::Ordering::Relaxed) > 0
        })
        .await;
        for s in storage.all_shards() {
            s.close().await;
        }
        drop(storage);
        let storage = Storage::open(dir.path(), cfg(50), metrics.clone(), keep_all()).await.unwrap();
        assert_eq!(count(&storage, &key), (300, 300));
        let shard = &storage.shards_of(&key, 0, 1)[0];
        let before = shard.points();
        let removed =
            shard.delete(Some(Box::new(|b| b.timestamps.iter().map(|t| t % 20 == 0).collect())), None).await.unwrap();
        assert!(removed > 0);
        assert_eq!(shard.points(), before - removed);
        storage.drop_metric(&key).await.unwrap();
        assert_eq!(count(&storage, &key).0, 0);
        assert!(!dir.path().join("shards/d/n/m").exists());
    }

    fn points(range: std::ops::Range<i64>, value: i64) -> RowBatch {
        let ps: Vec<Point> = range
            .map(|i| Point {
                timestamp: i,
                value: Num::Int(value),
                dimensions: Default::default(),
                tags: Default::default(),
            })
            .collect();
        RowBatch::from_points(&ps).unwrap()
    }

    async fn reopen(storage: Arc<Storage>, dir: &Path, c: StorageConfig) -> Arc<Storage> {
        for s in storage.all_shards() {
            s.close().await;
        }
        drop(storage);
        Storage::open(dir, c, Arc::new(Metrics::default()), keep_all()).await.unwrap()
    }

    /// The WAL keeps a dropped shard's records until its files go: they must not come back into
    /// a shard of the same id created since. Files go once every shard has their records in
    /// segments.
    #[tokio::test]
    async fn a_dropped_shard_stays_dropped_and_wal_files_go_once_in_segments() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let other = MetricKey::new("d", "n", "other").unwrap();
        let c = StorageConfig { wal_file_bytes: 256, ..cfg(1_000_000) };
        let storage = Storage::open(dir.path(), c, Arc::new(Metrics::default()), keep_all()).await.unwrap();
        for t in (0..1000).step_by(100) {
            storage.write(&key, points(t..t + 100, 1)).await.unwrap();
            storage.write(&other, points(t..t + 10, 5)).await.unwrap();
        }
        storage.drop_metric(&key).await.unwrap();
        storage.write(&key, points(0..10, 2)).await.unwrap();
        let storage = reopen(storage, dir.path(), c).await;
        assert_eq!(count(&storage, &key), (10, 20), "only the points written since the drop");
        assert_eq!(count(&storage, &other), (100, 500));
        let wal_files = || wal::list_wal_seqs(&dir.path().join("wal")).unwrap().len();
        assert!(wal_files() > 2, "256-byte WAL files");
        // One shard compacts: the files before its other records stay.
        storage.shard_if_held(&ShardId { metric: key.clone(), start: 0 }).unwrap().flush().await.unwrap();
        storage.collect_wal().unwrap();
        let after_one = wal_files();
        assert!(after_one > 1);
        storage.flush_all().await.unwrap();
        storage.collect_wal().unwrap();
        assert_eq!(wal_files(), 1, "only the file appended to");
        // Every record is in segments: the writer begins a new, empty file and the next
        // collection removes the last one with records, its zero-filled tail included.
        let wal_bytes = || -> u64 {
            let wal_dir = dir.path().join("wal");
            let seqs = wal::list_wal_seqs(&wal_dir).unwrap();
            seqs.iter().map(|s| std::fs::metadata(wal::wal_path(&wal_dir, *s)).unwrap().len()).sum()
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while wal_bytes() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the compacted WAL still takes {} bytes", wal_bytes());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            storage.collect_wal().unwrap();
        }
        assert_eq!(wal_files(), 1, "one empty file to append to");
        storage.write(&other, points(50..60, 7)).await.unwrap();
        let storage = reopen(storage, dir.path(), c).await;
        assert_eq!(count(&storage, &key), (10, 20));
        assert_eq!(count(&storage, &other), (110, 570));
    }

    /// A shard from before the node WAL (a WAL of its own, a manifest without a WAL position)
    /// opens with every point, and is moved to the current layout.
    #[tokio::test]
    async fn a_shard_with_its_own_wal_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let shard_dir = dir.path().join("shards/d/n/m/0");
        std::fs::create_dir_all(&shard_dir).unwrap();
        // Legacy MANIFEST: no segments, first WAL 2; WAL 1 is older (already compacted).
        let mut manifest = postcard::to_stdvec(&(Vec::<u64>::new(), 2u64)).unwrap();
        manifest.extend_from_slice(&crc32fast::hash(&manifest).to_le_bytes());
        std::fs::write(shard_dir.join("MANIFEST"), manifest).unwrap();
        for (seq, batch) in [(1, points(0..5, 9)), (2, points(0..10, 1)), (3, points(10..20, 1))] {
            let mut record = Vec::new();
            wal::encode_record(&batch, &mut record);
            wal::AppendLog::open(&wal::wal_path(&shard_dir, seq)).unwrap().append_durable(&record).unwrap();
        }
        let storage = Storage::open(dir.path(), cfg(1000), Arc::new(Metrics::default()), keep_all()).await.unwrap();
        assert_eq!(count(&storage, &key), (20, 20), "WAL 1 was before the manifest's first");
        assert!(wal::list_wal_seqs(&shard_dir).unwrap().is_empty(), "the shard's own WAL is gone");
        storage.write(&key, points(20..30, 1)).await.unwrap();
        let storage = reopen(storage, dir.path(), cfg(1000)).await;
        assert_eq!(count(&storage, &key), (30, 30));
    }

    #[tokio::test]
    async fn merge_stores_only_missing_points_and_digests_follow_content() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let id = ShardId { metric: key.clone(), start: 0 };
        let points = |range: std::ops::Range<i64>| -> RowBatch {
            let ps: Vec<Point> = range
                .map(|i| Point {
                    timestamp: i,
                    value: Num::Int(i),
                    dimensions: Default::default(),
                    tags: Default::default(),
                })
                .collect();
            RowBatch::from_points(&ps).unwrap()
        };
        let a = Storage::open(&dir.path().join("a"), cfg(20), Arc::new(Metrics::default()), keep_all()).await.unwrap();
        let b = Storage::open(&dir.path().join("b"), cfg(20), Arc::new(Metrics::default()), keep_all()).await.unwrap();
        // a gets 0..600 in pieces (some compacted to segments), b gets 300..1000 in one go.
        for chunk in [0..250, 250..600] {
            a.write(&key, points(chunk)).await.unwrap();
        }
        b.write(&key, points(300..1000)).await.unwrap();
        let (sa, sb) = (a.shard_if_held(&id).unwrap(), b.shard_if_held(&id).unwrap());
        let (da, db) = (sa.digests(0, 1000, 100).unwrap(), sb.digests(0, 1000, 100).unwrap());
        assert_eq!(da.len(), 6);
        assert_eq!(db.len(), 7);
        let same: Vec<i64> = da.iter().filter(|d| db.contains(d)).map(|d| d.start).collect();
        assert_eq!(same, [300, 400, 500], "blocks with the same points have the same digest");
        // Merging both ways gives both the union, once.
        assert_eq!(a.merge(&id, sb.points_in(0, 1000).unwrap(), MergeTimes { now_ms: 0 }).await.unwrap(), 400);
        assert_eq!(b.merge(&id, sa.points_in(0, 1000).unwrap(), MergeTimes { now_ms: 0 }).await.unwrap(), 300);
        assert_eq!(
            a.merge(&id, points(0..1000), MergeTimes { now_ms: 0 }).await.unwrap(),
            0,
            "a repeated merge adds nothing"
        );
        assert_eq!((sa.points(), sb.points()), (1000, 1000));
        // Points are a set whichever path stores them: a repeated write (over segments, the
        // memtable and itself) stores only what is new.
        let mut again = points(990..1000);
        again.timestamps.extend([999, 999]);
        again.values.extend([Num::Int(999), Num::Int(7)]);
        a.write(&key, points(0..1000)).await.unwrap();
        a.write(&key, again).await.unwrap();
        assert_eq!(sa.points(), 1001, "only (999, 7) was new");
        assert!(sa.digests(0, 1000, 100).unwrap() != sb.digests(0, 1000, 100).unwrap());
        b.merge(&id, sa.points_in(0, 1000).unwrap(), MergeTimes { now_ms: 0 }).await.unwrap();
        assert_eq!(sa.digests(0, 1000, 100).unwrap(), sb.digests(0, 1000, 100).unwrap());
        assert_eq!(BlockDigest::total(&sa.digests(0, 1000, 1000).unwrap()).0, 1001);
        a.drop_shard(&id).await.unwrap();
        assert!(a.shard_if_held(&id).is_none() && !sa.dir.exists());
    }

    #[tokio::test]
    async fn tombstones_stop_copies_written_before_the_delete_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let id = ShardId { metric: key.clone(), start: 0 };
        // The rule is "drop even timestamps"; storage does not care what it encodes.
        let evens: TombstoneRule =
            Arc::new(|_| Box::new(|b: &RowBatch| b.timestamps.iter().map(|t| t % 2 != 0).collect()));
        let batch = |n: i64, written: Option<i64>| {
            let ps: Vec<Point> = (0..n)
                .map(|i| Point {
                    timestamp: i,
                    value: Num::Int(i),
                    dimensions: Default::default(),
                    tags: Default::default(),
                })
                .collect();
            let mut b = RowBatch::from_points(&ps).unwrap();
            if let Some(at) = written {
                b.stamp_written(at);
            }
            b
        };
        let mut c = cfg(1000);
        c.tombstone_grace_ms = 60_000;
        let s = Storage::open(dir.path(), c, Arc::new(Metrics::default()), evens.clone()).await.unwrap();
        s.write(&key, batch(10, Some(99_000))).await.unwrap();
        let tomb = Tombstone { at_ms: 100_000, rule: vec![] };
        assert_eq!(s.delete(&id, evens("".as_bytes()), tomb.clone()).await.unwrap(), 5);
        // A copy of points written before the delete (or with no write time): the even
        // points stay deleted.
        let merged = MergeTimes { now_ms: 100_500 };
        assert_eq!(s.merge(&id, batch(10, Some(99_999)), merged).await.unwrap(), 0);
        assert_eq!(s.merge(&id, batch(10, None), merged).await.unwrap(), 0);
        // The same delete again (another replica's copy of it) changes nothing.
        assert_eq!(s.delete(&id, evens("".as_bytes()), tomb).await.unwrap(), 0);
        drop(s);
        let s = Storage::open(dir.path(), c, Arc::new(Metrics::default()), evens.clone()).await.unwrap();
        assert_eq!(s.merge(&id, batch(10, Some(100_000)), merged).await.unwrap(), 0, "the tombstone was persisted");
        // Points written after the delete, even a moment after, are new writes: stored. So is
        // everything once the tombstone has expired.
        assert_eq!(s.merge(&id, batch(4, Some(100_001)), merged).await.unwrap(), 2);
        let expired = MergeTimes { now_ms: 200_000 };
        assert_eq!(s.merge(&id, batch(10, Some(0)), expired).await.unwrap(), 3);
        assert_eq!(s.shard_if_held(&id).unwrap().points(), 10);
        // A delete of the same rule made later removes only what was written before it.
        let mut fresh = batch(10, None);
        fresh.values = fresh.values.iter().map(|_| Num::Int(1_000)).collect();
        fresh.stamp_written(300_000);
        s.write(&key, fresh).await.unwrap();
        let later = Tombstone { at_ms: 250_000, rule: vec![1] };
        assert_eq!(s.delete(&id, evens("".as_bytes()), later).await.unwrap(), 5, "only the points from before it");
        assert_eq!(s.shard_if_held(&id).unwrap().points(), 15);
    }

    #[tokio::test]
    async fn shard_buckets_are_half_open_and_floor_negative_times() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), cfg(10), Arc::new(Metrics::default()), keep_all()).await.unwrap();
        let s = |ts| storage.shard_start(ts);
        assert_eq!((s(0), s(999), s(1000), s(-1)), (0, 0, 1000, -1000));
    }

    /// Holds the first WAL write under a directory once armed, then fails it as a full disk
    /// does: the test decides what else is queued behind it meanwhile.
    mod held_write {
        use std::path::{Path, PathBuf};
        use std::sync::{Condvar, Mutex};

        pub enum Hold {
            Off,
            Armed(PathBuf),
            Holding,
            Released,
        }

        pub static HOLD: (Mutex<Hold>, Condvar) = (Mutex::new(Hold::Off), Condvar::new());

        /// Path prefixes whose disk is full: nothing more is written to a path beginning so.
        pub static FULL: Mutex<Vec<String>> = Mutex::new(Vec::new());

        pub struct Seam;

        impl crate::env::DiskSeam for Seam {
            fn writable(&self, path: &Path, len: usize) -> usize {
                if FULL.lock().unwrap().iter().any(|prefix| path.to_string_lossy().starts_with(prefix.as_str())) {
                    return 0;
                }
                let mut hold = HOLD.0.lock().unwrap();
                if !matches!(&*hold, Hold::Armed(dir) if path.starts_with(dir)) {
                    return len;
                }
                *hold = Hold::Holding;
                while !matches!(*hold, Hold::Released) {
                    hold = HOLD.1.wait(hold).unwrap();
                }
                *hold = Hold::Off;
                0
            }

            fn synced(&self, _: &Path, _: u64) {}
        }

        pub fn is_holding() -> bool {
            matches!(*HOLD.0.lock().unwrap(), Hold::Holding)
        }

        pub fn set(to: Hold) {
            *HOLD.0.lock().unwrap() = to;
            HOLD.1.notify_all();
        }
    }

    async fn await_condition(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    /// A delete whose rewrite fails (a full disk) after its tombstone was recorded is applied
    /// again at the next tombstone exchange, once the disk has room: otherwise the points
    /// stayed on this replica while the tombstone kept them from the others (simulator seed
    /// 795802023 showed two replicas that repair could not make agree).
    #[tokio::test]
    async fn a_delete_cut_short_by_a_full_disk_is_finished_later() {
        crate::env::install_disk_seam(Box::new(held_write::Seam));
        let dir = tempfile::tempdir().unwrap();
        // A tombstone's rule: the 8 bytes of a time; points before it go.
        let before: TombstoneRule = Arc::new(|rule: &[u8]| {
            let cut = i64::from_le_bytes(rule.try_into().expect("8 bytes"));
            Box::new(move |b: &RowBatch| b.timestamps.iter().map(|&t| t >= cut).collect())
        });
        let key = MetricKey::new("d", "n", "m").unwrap();
        let storage =
            Storage::open(dir.path(), cfg(1_000_000), Arc::new(Metrics::default()), before.clone()).await.unwrap();
        let shard = storage.shard(ShardId { metric: key.clone(), start: 0 }).await.unwrap();
        shard.append(points(0..100, 1)).await.unwrap();
        shard.flush().await.unwrap();
        let tombstone = Tombstone { at_ms: 1_000, rule: 50i64.to_le_bytes().to_vec() };
        let segments = shard.dir.join("seg-").to_string_lossy().into_owned();
        let full = |on: bool| {
            let mut prefixes = held_write::FULL.lock().unwrap();
            prefixes.retain(|p| p != &segments);
            if on {
                prefixes.push(segments.clone());
            }
        };
        // Full for segment files only: the tombstone is recorded, the rewrite fails.
        full(true);
        let failed = shard.delete(Some(before(&tombstone.rule)), Some(tombstone.clone())).await;
        assert!(failed.is_err(), "the rewrite cannot be written: {failed:?}");
        // A retry (the coordinator got an error) is not acknowledged while the points stay.
        let again = shard.delete(Some(before(&tombstone.rule)), Some(tombstone.clone())).await;
        assert!(again.is_err(), "the retry cannot be written either: {again:?}");
        full(false);
        assert_eq!(shard.points(), 100, "nothing deleted yet");
        let again = shard.delete(Some(before(&tombstone.rule)), Some(tombstone.clone())).await;
        assert_eq!(again.unwrap(), 50, "the retry, with room, removes the points");
        assert_eq!(shard.points(), 50);
        // Cut short again, and finished by the next tombstone exchange, through the gate.
        let gate = Arc::new(Recorder::default());
        storage.set_change_gate(gate.clone());
        let second = Tombstone { at_ms: 2_000, rule: 70i64.to_le_bytes().to_vec() };
        full(true);
        assert!(shard.delete(Some(before(&second.rule)), Some(second.clone())).await.is_err());
        full(false);
        let id = ShardId { metric: key.clone(), start: 0 };
        assert_eq!(storage.tombstones(&id, 0).await.unwrap(), [tombstone, second], "the tombstones are recorded");
        assert_eq!(shard.points(), 30, "the recorded delete is finished");
        assert_eq!(count(&storage, &key), (30, 30));
        assert_eq!(*gate.0.lock().unwrap(), vec![vec![0]], "the exchange that removed points passed the gate");
    }

    /// A group in flight behind one whose WAL write fails is answered with an error (it was
    /// checked against the failed group's points), but its own records reach the WAL in the
    /// next commit, so it joins the memtable: a retry then stores each point once, also after
    /// a crash that replays the WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_behind_a_failed_wal_write_stays_consistent_with_the_wal() {
        crate::env::install_disk_seam(Box::new(held_write::Seam));
        let dir = tempfile::tempdir().unwrap();
        let key = MetricKey::new("d", "n", "m").unwrap();
        let c = cfg(1_000_000);
        let storage = Storage::open(dir.path(), c, Arc::new(Metrics::default()), keep_all()).await.unwrap();
        let shard = storage.shard(ShardId { metric: key.clone(), start: 0 }).await.unwrap();
        held_write::set(held_write::Hold::Armed(dir.path().join("wal")));
        let first = tokio::spawn({
            let shard = shard.clone();
            async move { shard.append(points(0..100, 1)).await }
        });
        await_condition("the first WAL write", held_write::is_holding).await;
        // Checked against the first group while it is in flight: only 100..150 is new.
        let second = tokio::spawn({
            let shard = shard.clone();
            async move { shard.append(points(50..150, 1)).await }
        });
        await_condition("the second group's submission", || storage.wal.queued() == 1).await;
        held_write::set(held_write::Hold::Released);
        let first = first.await.unwrap().unwrap_err();
        assert!(first.is_disk_full() && first.to_string().contains("no space left"), "{first}");
        // Answered as the failure it followed: a full disk (507), not an internal error.
        let second = second.await.unwrap().unwrap_err();
        assert!(second.is_disk_full() && second.to_string().contains("an earlier write to the WAL failed"), "{second}");
        assert_eq!(shard.points(), 50, "the second group's own points are in the WAL and the memtable");
        assert_eq!(shard.append(points(50..150, 1)).await.unwrap(), 50, "the retry stores the rest");
        assert_eq!(count(&storage, &key), (100, 100));
        // A crash now: the WAL as it is on disk, replayed into a new node.
        let crashed = tempfile::tempdir().unwrap();
        copy_tree(dir.path(), crashed.path());
        let replayed = Storage::open(crashed.path(), c, Arc::new(Metrics::default()), keep_all()).await.unwrap();
        assert_eq!(count(&replayed, &key), (100, 100), "each point once after replay");
    }
}
