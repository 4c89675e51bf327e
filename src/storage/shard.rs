//! One shard: a metric's points in one time bucket `[start, end)`, in one folder.
//!
//! A single writer task per shard owns the WAL. It takes every append waiting in its queue,
//! writes them as one group, fsyncs once and only then makes the points visible and answers the
//! callers (group commit). The same task compacts the in-memory points into segments, merges
//! segments and applies deletes, so those never race with appends.
//!
//! Folder: `MANIFEST` (live segments and the first WAL to replay), `wal-<seq>.log`,
//! `seg-<seq>.seg`. Files not named by the manifest are leftovers of a crash and are removed.

use super::digest::{BlockDigest, point_hash};
use super::segment::{Segment, segment_path, write_segment};
use super::wal::{WalWriter, encode_record, list_wal_seqs, replay, wal_path};
use super::{StorageConfig, StorageError, fsync_dir};
use crate::metrics::Metrics;
pub use crate::model::ShardId;
use crate::model::batch::{RowBatch, RowBatchBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// Appends waiting beyond this many make callers wait (backpressure), bounding memory.
const QUEUE_DEPTH: usize = 1024;
/// Most appends one group commit takes, bounding one write's size.
const GROUP_APPENDS_MAX: usize = 256;

pub fn shard_dir(root: &Path, id: &ShardId) -> PathBuf {
    root.join(&id.metric.db).join(&id.metric.namespace).join(&id.metric.metric).join(id.start.to_string())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    segments: Vec<u64>,
    wal_from: u64,
}

impl Manifest {
    fn read(dir: &Path) -> Result<Self, StorageError> {
        let path = dir.join("MANIFEST");
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 4 => {
                let (body, crc) = bytes.split_at(bytes.len() - 4);
                if crc32fast::hash(body).to_le_bytes() != crc {
                    return Err(StorageError::Corrupt(format!("{} fails its checksum", path.display())));
                }
                postcard::from_bytes(body).map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))
            }
            Ok(_) => Err(StorageError::Corrupt(format!("{} is truncated", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e.into()),
        }
    }

    fn write(&self, dir: &Path) -> Result<(), StorageError> {
        let mut bytes = postcard::to_stdvec(self).expect("manifest encodes");
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        super::write_atomic(&dir.join("MANIFEST"), &bytes)
    }
}

#[derive(Default)]
struct ShardState {
    memtable: RowBatchBuilder,
    /// When the oldest point in the memtable arrived (for flushing idle shards).
    memtable_since: Option<tokio::time::Instant>,
    /// A memtable being written to a segment: still visible to scans until the segment is.
    frozen: Option<Arc<RowBatch>>,
    segments: Vec<Arc<Segment>>,
}

/// Where the writer sends a command's outcome.
type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

enum Command {
    Append { batch: RowBatch, done: Reply<()> },
    Flush { done: Reply<()> },
    Delete { keep: KeepRow, done: Reply<u64> },
    Close { done: oneshot::Sender<()> },
}

/// Decides which rows of a batch a delete keeps (`true` = keep), one flag per row.
pub type KeepRow = Box<dyn Fn(&RowBatch) -> Vec<bool> + Send + Sync>;

pub struct Shard {
    pub id: ShardId,
    pub end: i64,
    pub dir: PathBuf,
    state: RwLock<ShardState>,
    tx: mpsc::Sender<Command>,
    /// Serializes [`Shard::merge`]s, so two merges of the same points cannot both find them
    /// missing and store them twice.
    merge_lock: tokio::sync::Mutex<()>,
}

struct Writer {
    shard: Arc<Shard>,
    wal: Option<WalWriter>,
    next_seq: u64,
    /// The compaction running in the background, if any (at most one per shard).
    compacting: Option<tokio::task::JoinHandle<Result<(), StorageError>>>,
    cfg: StorageConfig,
    metrics: Arc<Metrics>,
}

impl Shard {
    /// Opens (or creates) the shard folder, replays its WAL and starts its writer task.
    pub async fn open(
        root: &Path,
        id: ShardId,
        interval_ms: i64,
        cfg: StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StorageError> {
        let dir = shard_dir(root, &id);
        let dir2 = dir.clone();
        let metrics2 = metrics.clone();
        let (state, next_seq) = tokio::task::spawn_blocking(move || recover(&dir2, &metrics2))
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let end = id.start.saturating_add(interval_ms);
        let shard = Arc::new(Shard {
            id,
            end,
            dir: dir.clone(),
            state: RwLock::new(state),
            tx,
            merge_lock: Default::default(),
        });
        let wal_dir = dir.clone();
        let wal = tokio::task::spawn_blocking(move || WalWriter::create(&wal_dir, next_seq))
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        let writer =
            Writer { shard: shard.clone(), wal: Some(wal), next_seq: next_seq + 1, compacting: None, cfg, metrics };
        tokio::spawn(writer.run(rx));
        Ok(shard)
    }

    /// Makes `points` durable; returns once they are fsynced and visible to scans.
    pub async fn append(&self, batch: RowBatch) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Append { batch, done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    pub async fn flush(&self) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Flush { done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Removes the points for which `keep` says false; returns how many were removed.
    pub async fn delete(&self, keep: KeepRow) -> Result<u64, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Delete { keep, done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Close { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub fn points(&self) -> u64 {
        let st = self.state.read().expect("shard lock");
        st.memtable.batch.len() as u64
            + st.frozen.as_ref().map_or(0, |f| f.len() as u64)
            + st.segments.iter().map(|s| s.points()).sum::<u64>()
    }

    /// True when the shard has in-memory points older than `age`.
    pub fn needs_flush(&self, now: tokio::time::Instant, age: std::time::Duration) -> bool {
        let st = self.state.read().expect("shard lock");
        st.memtable_since.is_some_and(|since| now.duration_since(since) >= age)
    }

    /// Calls `f` with every batch that may hold points in `[from, to)`. `columns` limits which
    /// dimension/tag columns segments decode (`None` = all); in-memory batches carry all.
    pub fn scan(
        &self,
        from: i64,
        to: i64,
        columns: Option<&[String]>,
        f: &mut dyn FnMut(&RowBatch),
    ) -> Result<(), StorageError> {
        let segments = {
            let st = self.state.read().expect("shard lock");
            if !st.memtable.batch.is_empty() {
                f(&st.memtable.batch);
            }
            if let Some(frozen) = &st.frozen {
                f(frozen);
            }
            st.segments.clone()
        };
        for seg in segments {
            for meta in seg.blocks.iter().filter(|b| b.max_ts >= from && b.min_ts < to) {
                f(&seg.read_block(meta, columns)?);
            }
        }
        Ok(())
    }
}

impl Shard {
    /// Digests of the non-empty blocks of `block_ms` in `[from, to)`, oldest first.
    pub fn digests(&self, from: i64, to: i64, block_ms: i64) -> Result<Vec<BlockDigest>, StorageError> {
        let block_ms = block_ms.max(1);
        let mut blocks: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        self.scan(from, to, None, &mut |b| {
            for (row, &ts) in b.timestamps.iter().enumerate() {
                if ts >= from && ts < to {
                    let e = blocks.entry(ts.div_euclid(block_ms) * block_ms).or_default();
                    e.0 += 1;
                    e.1 = e.1.wrapping_add(point_hash(b, row));
                }
            }
        })?;
        Ok(blocks.into_iter().map(|(start, (count, hash))| BlockDigest { start, count, hash }).collect())
    }

    /// Every point in `[from, to)`, as one batch.
    pub fn points_in(&self, from: i64, to: i64) -> Result<RowBatch, StorageError> {
        let mut out = RowBatchBuilder::default();
        self.scan(from, to, None, &mut |b| {
            let keep: Vec<bool> = b.timestamps.iter().map(|&ts| ts >= from && ts < to).collect();
            if keep.iter().any(|k| *k) {
                out.extend_from(b, Some(&keep));
            }
        })?;
        Ok(out.finish())
    }

    /// Appends the points of `batch` this shard does not hold yet (a point held once and sent
    /// twice is stored once; copies count, so two equal points sent where one is held add one),
    /// and returns how many were appended. Hint replay, repair and hand-off all store through
    /// here, which makes every one of them safe to repeat.
    pub async fn merge(&self, batch: RowBatch) -> Result<u64, StorageError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let _guard = self.merge_lock.lock().await;
        let from = batch.timestamps.iter().copied().min().expect("not empty");
        let to = batch.timestamps.iter().copied().max().expect("not empty").saturating_add(1);
        let mut held: HashMap<u64, u64> = HashMap::new();
        self.scan(from, to, None, &mut |b| {
            for (row, &ts) in b.timestamps.iter().enumerate() {
                if ts >= from && ts < to {
                    *held.entry(point_hash(b, row)).or_default() += 1;
                }
            }
        })?;
        let keep: Vec<bool> = (0..batch.len())
            .map(|row| match held.get_mut(&point_hash(&batch, row)) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            })
            .collect();
        let missing = keep.iter().filter(|k| **k).count() as u64;
        if missing == 0 {
            return Ok(0);
        }
        let rows: Vec<usize> = (0..batch.len()).filter(|&r| keep[r]).collect();
        self.append(batch.select(&rows)).await?;
        Ok(missing)
    }
}

/// Reads the manifest, opens its segments, removes crash leftovers and replays the WAL.
fn recover(dir: &Path, metrics: &Metrics) -> Result<(ShardState, u64), StorageError> {
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    let manifest = Manifest::read(dir)?;
    let mut state = ShardState::default();
    let mut max_seq = manifest.wal_from;
    for &seq in &manifest.segments {
        state.segments.push(Arc::new(Segment::open(&segment_path(dir, seq), seq)?));
        max_seq = max_seq.max(seq);
    }
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        let stray_segment = name
            .strip_prefix("seg-")
            .and_then(|s| s.strip_suffix(".seg"))
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|seq| !manifest.segments.contains(&seq));
        if stray_segment || name.ends_with(".tmp") {
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    for seq in list_wal_seqs(dir)? {
        max_seq = max_seq.max(seq);
        let path = wal_path(dir, seq);
        if seq < manifest.wal_from {
            std::fs::remove_file(&path)?;
            continue;
        }
        let r = replay(&path)?;
        if r.torn_bytes > 0 {
            tracing::warn!(wal = %path.display(), torn_bytes = r.torn_bytes, "dropped a torn WAL tail");
            metrics.wal_torn_bytes.fetch_add(r.torn_bytes, std::sync::atomic::Ordering::Relaxed);
        }
        for batch in r.batches {
            state.memtable.extend_from(&batch, None);
        }
    }
    if !state.memtable.batch.is_empty() {
        state.memtable_since = Some(tokio::time::Instant::now());
    }
    Ok((state, max_seq + 1))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StorageError::Io(std::io::Error::other(e)))?
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut pending: Option<Command> = None;
        loop {
            let cmd = match pending.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => return,
                },
            };
            match cmd {
                Command::Append { batch, done } => {
                    let mut group = vec![(batch, done)];
                    while group.len() < GROUP_APPENDS_MAX {
                        match rx.try_recv() {
                            Ok(Command::Append { batch, done }) => group.push((batch, done)),
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(group).await;
                }
                Command::Flush { done } => {
                    let _ = done.send(self.flush(true).await);
                }
                Command::Delete { keep, done } => {
                    let _ = done.send(self.delete(keep).await);
                }
                Command::Close { done } => {
                    if let Some(running) = self.compacting.take() {
                        let _ = running.await;
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    async fn commit(&mut self, group: Vec<(RowBatch, Reply<()>)>) {
        let mut bytes = Vec::new();
        for (batch, _) in &group {
            encode_record(batch, &mut bytes);
        }
        let mut wal = self.wal.take().expect("writer owns the WAL");
        let started = tokio::time::Instant::now();
        let (wal, res) = match tokio::task::spawn_blocking(move || {
            let r = wal.append_durable(&bytes);
            (wal, r)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                // The blocking task panicked: the WAL handle is gone; fail this group and all later ones.
                for (_, done) in group {
                    let _ = done.send(Err(StorageError::Io(std::io::Error::other(e.to_string()))));
                }
                return;
            }
        };
        self.metrics.observe_fsync(started.elapsed());
        self.wal = Some(wal);
        if let Err(e) = res {
            tracing::error!(shard = %self.shard.id, error = %e, "WAL append failed");
            for (_, done) in group {
                let _ = done.send(Err(StorageError::Io(std::io::Error::new(e.kind(), e.to_string()))));
            }
            return;
        }
        let memtable_len = {
            let mut st = self.shard.state.write().expect("shard lock");
            for (batch, _) in &group {
                st.memtable.extend_from(batch, None);
            }
            if st.memtable_since.is_none() {
                st.memtable_since = Some(tokio::time::Instant::now());
            }
            st.memtable.batch.len()
        };
        let written: usize = group.iter().map(|(p, _)| p.len()).sum();
        self.metrics.points_written.fetch_add(written as u64, std::sync::atomic::Ordering::Relaxed);
        for (_, done) in group {
            let _ = done.send(Ok(()));
        }
        if memtable_len >= self.cfg.memtable_points_max
            && let Err(e) = self.flush(false).await
        {
            tracing::error!(shard = %self.shard.id, error = %e, "compaction failed; points stay in the WAL");
        }
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Moves the memtable into a new segment. With `wait` false (the ingest path) the segment is
    /// written in the background while appends go on into a fresh memtable and WAL; only one
    /// compaction runs at a time, and a memtable twice over its limit waits for it
    /// (backpressure). With `wait` true (flush, delete, shutdown) it returns once all is on disk.
    async fn flush(&mut self, wait: bool) -> Result<(), StorageError> {
        if let Some(running) = self.compacting.take() {
            let memtable_len = self.shard.state.read().expect("shard lock").memtable.batch.len();
            if !wait && !running.is_finished() && memtable_len < 2 * self.cfg.memtable_points_max {
                self.compacting = Some(running);
                return Ok(());
            }
            running.await.map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        }
        let frozen = {
            let mut st = self.shard.state.write().expect("shard lock");
            if st.memtable.batch.is_empty() {
                return Ok(());
            }
            let frozen = Arc::new(std::mem::take(&mut st.memtable).finish());
            st.memtable_since = None;
            st.frozen = Some(frozen.clone());
            frozen
        };
        let (wal_seq, seg_seq, merge_seq) = (self.take_seq(), self.take_seq(), self.take_seq());
        let dir = self.shard.dir.clone();
        let new_wal = match blocking(move || Ok(WalWriter::create(&dir, wal_seq)?)).await {
            Ok(w) => w,
            Err(e) => {
                unfreeze(&self.shard);
                return Err(e);
            }
        };
        let old_wal = self.wal.replace(new_wal).map(|w| w.seq);
        let job = Compaction {
            shard: self.shard.clone(),
            frozen,
            seg_seq,
            merge_seq,
            wal_from: wal_seq,
            old_wal,
            segments_max: self.cfg.segments_max,
            metrics: self.metrics.clone(),
        };
        let running = tokio::spawn(job.run());
        if wait {
            running.await.map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        } else {
            self.compacting = Some(running);
        }
        Ok(())
    }

    async fn delete(&mut self, keep: KeepRow) -> Result<u64, StorageError> {
        self.flush(true).await?;
        let wal_from = self.wal.as_ref().expect("writer owns the WAL").seq;
        let seg_seq = self.take_seq();
        rewrite(&self.shard, seg_seq, wal_from, Some(keep)).await
    }
}

/// Puts a frozen memtable back after a failed compaction; its points are still in the old WAL.
fn unfreeze(shard: &Shard) {
    let mut st = shard.state.write().expect("shard lock");
    if let Some(frozen) = st.frozen.take() {
        let mut restored = RowBatchBuilder::default();
        restored.extend_from(&frozen, None);
        restored.extend_from(&st.memtable.batch, None);
        st.memtable = restored;
        st.memtable_since.get_or_insert_with(tokio::time::Instant::now);
    }
}

/// One memtable on its way to a segment.
struct Compaction {
    shard: Arc<Shard>,
    frozen: Arc<RowBatch>,
    seg_seq: u64,
    /// Sequence number for the merged segment, if the segment count calls for a merge.
    merge_seq: u64,
    /// The first WAL not covered by segments once this compaction is done.
    wal_from: u64,
    old_wal: Option<u64>,
    segments_max: usize,
    metrics: Arc<Metrics>,
}

impl Compaction {
    async fn run(self) -> Result<(), StorageError> {
        let result = self.write().await;
        if let Err(e) = &result {
            tracing::error!(shard = %self.shard.id, error = %e, "compaction failed; points stay in the WAL");
            unfreeze(&self.shard);
        }
        result
    }

    async fn write(&self) -> Result<(), StorageError> {
        let segments: Vec<u64> = {
            let st = self.shard.state.read().expect("shard lock");
            st.segments.iter().map(|s| s.seq).chain([self.seg_seq]).collect()
        };
        let (dir, frozen, seg_seq, wal_from) =
            (self.shard.dir.clone(), self.frozen.clone(), self.seg_seq, self.wal_from);
        let seg = blocking(move || {
            let path = segment_path(&dir, seg_seq);
            write_segment(&path, &frozen)?;
            fsync_dir(&dir)?;
            let seg = Segment::open(&path, seg_seq)?;
            Manifest { segments, wal_from }.write(&dir)?;
            Ok(seg)
        })
        .await?;
        {
            let mut st = self.shard.state.write().expect("shard lock");
            st.segments.push(Arc::new(seg));
            st.frozen = None;
        }
        self.metrics.segments_written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(old) = self.old_wal {
            let dir = self.shard.dir.clone();
            blocking(move || {
                for seq in list_wal_seqs(&dir)?.into_iter().filter(|&s| s <= old) {
                    std::fs::remove_file(wal_path(&dir, seq))?;
                }
                Ok(())
            })
            .await?;
        }
        let too_many = self.shard.state.read().expect("shard lock").segments.len() > self.segments_max;
        if too_many {
            rewrite(&self.shard, self.merge_seq, self.wal_from, None).await?;
        }
        Ok(())
    }
}

/// Replaces all segments of `shard` by one (`seg_seq`), keeping the rows `keep` accepts (all
/// when `None`). Returns how many rows were dropped. Callers make sure no other compaction of
/// the shard runs meanwhile.
async fn rewrite(shard: &Arc<Shard>, seg_seq: u64, wal_from: u64, keep: Option<KeepRow>) -> Result<u64, StorageError> {
    let old: Vec<Arc<Segment>> = shard.state.read().expect("shard lock").segments.clone();
    if old.is_empty() {
        return Ok(0);
    }
    let dir = shard.dir.clone();
    let old2 = old.clone();
    let (replacement, dropped) = blocking(move || {
        let mut merged = RowBatchBuilder::default();
        let mut dropped = 0u64;
        for seg in &old2 {
            for meta in &seg.blocks {
                let batch = seg.read_block(meta, None)?;
                let mask = keep.as_ref().map(|k| k(&batch));
                if let Some(m) = &mask {
                    dropped += m.iter().filter(|keep| !**keep).count() as u64;
                }
                merged.extend_from(&batch, mask.as_deref());
            }
        }
        if keep.is_some() && dropped == 0 {
            return Ok((None, 0));
        }
        let merged = merged.finish();
        let seg = if merged.is_empty() {
            None
        } else {
            let path = segment_path(&dir, seg_seq);
            write_segment(&path, &merged)?;
            fsync_dir(&dir)?;
            Some(Segment::open(&path, seg_seq)?)
        };
        Manifest { segments: seg.iter().map(|s| s.seq).collect(), wal_from }.write(&dir)?;
        Ok((Some(seg), dropped))
    })
    .await?;
    let Some(replacement) = replacement else { return Ok(0) };
    {
        let mut st = shard.state.write().expect("shard lock");
        st.segments = replacement.into_iter().map(Arc::new).collect();
    }
    for seg in old {
        // Open readers keep their file handle; unlinking is safe under a running scan.
        let _ = std::fs::remove_file(&seg.path);
    }
    Ok(dropped)
}
