//! One shard: a metric's points in one time bucket `[start, end)`, in one folder.
//!
//! A single writer task per shard owns the WAL. It takes every append waiting in its queue,
//! writes them as one group, fsyncs once and only then makes the points visible and answers the
//! callers (group commit). The same task compacts the in-memory points into segments, merges
//! segments and applies deletes, so those never race with appends.
//!
//! Folder: `MANIFEST` (live segments and the first WAL to replay), `wal-<seq>.log`,
//! `seg-<seq>.seg`. Files not named by the manifest are leftovers of a crash and are removed.

use super::digest::{BlockDigest, RowHasher, same_point};
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
        read_checked(&dir.join("MANIFEST"))
    }

    fn write(&self, dir: &Path) -> Result<(), StorageError> {
        write_checked(&dir.join("MANIFEST"), self)
    }
}

/// Reads a small file written by [`write_checked`]: postcard followed by its crc32. A missing
/// file is the default value; a bad checksum or a short file is corruption, never ignored.
fn read_checked<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 4 => {
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            if crc32fast::hash(body).to_le_bytes() != crc {
                return Err(StorageError::Corrupt(format!("{} fails its checksum", path.display())));
            }
            postcard::from_bytes(body).map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))
        }
        Ok(_) => Err(StorageError::Corrupt(format!("{} is truncated", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e.into()),
    }
}

/// Replaces `path` atomically with `value` in postcard plus a crc32.
fn write_checked<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StorageError> {
    let mut bytes = postcard::to_stdvec(value).expect("storage metadata encodes");
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    super::write_atomic(path, &bytes)
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
    /// `merge`: the batch comes from a merge (repair, hint replay, hand-off), so the shard's
    /// tombstones apply to it.
    Append {
        batch: RowBatch,
        merge: Option<MergeTimes>,
        done: Reply<u64>,
    },
    Flush {
        done: Reply<()>,
    },
    Delete {
        keep: KeepRow,
        tombstone: Option<Tombstone>,
        done: Reply<u64>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// Decides which rows of a batch a delete keeps (`true` = keep), one flag per row.
pub type KeepRow = Box<dyn Fn(&RowBatch) -> Vec<bool> + Send + Sync>;

/// A delete, remembered for a while so that the points it removed cannot come back through a
/// merge (repair, hint replay, hand-off) carrying copies read before the delete. Storage does
/// not know what a delete matches: `rule` is the node's encoding, turned into a [`KeepRow`] by
/// the [`TombstoneRule`] the node gives when it opens storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tombstone {
    pub at_ms: i64,
    pub rule: Vec<u8>,
}

pub type TombstoneRule = Arc<dyn Fn(&[u8]) -> KeepRow + Send + Sync>;

/// A delete this long before a merged copy was read still filters it: deletes reach the
/// replicas of a shard within about this long of each other (two internal call timeouts).
pub const TOMBSTONE_MARGIN_MS: i64 = 10_000;

/// When a merged batch's points were known to exist (`as_of_ms`: read from a replica, or
/// recorded as a hint) and when it is merged (`now_ms`, to expire old tombstones), both epoch ms
/// on this node's clock (a hint's record time is the coordinator's: clocks are assumed to be
/// within the margin of each other).
#[derive(Debug, Clone, Copy)]
pub struct MergeTimes {
    pub as_of_ms: i64,
    pub now_ms: i64,
}

/// `<shard>/TOMBSTONES`: the shard's live tombstones.
fn read_tombstones(dir: &Path) -> Result<Vec<Tombstone>, StorageError> {
    read_checked(&dir.join("TOMBSTONES"))
}

fn write_tombstones(dir: &Path, tombstones: &[Tombstone]) -> Result<(), StorageError> {
    write_checked(&dir.join("TOMBSTONES"), tombstones)
}

pub struct Shard {
    pub id: ShardId,
    pub end: i64,
    pub dir: PathBuf,
    state: RwLock<ShardState>,
    tx: mpsc::Sender<Command>,
}

struct Writer {
    shard: Arc<Shard>,
    wal: Option<WalWriter>,
    next_seq: u64,
    /// The compaction running in the background, if any (at most one per shard).
    compacting: Option<tokio::task::JoinHandle<Result<(), StorageError>>>,
    cfg: StorageConfig,
    metrics: Arc<Metrics>,
    /// Hash → row of the memtable's points (and of the frozen memtable's while it is being
    /// compacted), to find a point that is already stored: points are a set (see `dedup`).
    index: PointIndex,
    /// How many memtable rows `index` covers; a mismatch (after recovery, or a compaction that
    /// failed and put its rows back) rebuilds it.
    index_rows: usize,
    frozen_index: PointIndex,
    tombstones: Vec<(Tombstone, KeepRow)>,
    rule: TombstoneRule,
}

/// Maps a point's hash to its row. The keys are hashes already, so they are used as they are.
type PointIndex = HashMap<u64, u32, std::hash::BuildHasherDefault<IdentityHasher>>;

#[derive(Default)]
struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn index_of(batch: &RowBatch) -> PointIndex {
    let hasher = RowHasher::new(batch);
    let mut index = PointIndex::default();
    for row in 0..batch.len() {
        index.entry(hasher.hash(batch, row)).or_insert(row as u32);
    }
    index
}

impl Shard {
    /// Opens (or creates) the shard folder, replays its WAL and starts its writer task.
    pub async fn open(
        root: &Path,
        id: ShardId,
        interval_ms: i64,
        cfg: StorageConfig,
        metrics: Arc<Metrics>,
        rule: TombstoneRule,
    ) -> Result<Arc<Self>, StorageError> {
        let dir = shard_dir(root, &id);
        let dir2 = dir.clone();
        let metrics2 = metrics.clone();
        let (state, next_seq, tombstones) = crate::env::spawn_blocking(move || {
            let (state, next_seq) = recover(&dir2, &metrics2)?;
            Ok::<_, StorageError>((state, next_seq, read_tombstones(&dir2)?))
        })
        .await
        .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        let tombstones = tombstones.into_iter().map(|t| (t.clone(), rule(&t.rule))).collect();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let end = id.start.saturating_add(interval_ms);
        let shard = Arc::new(Shard { id, end, dir: dir.clone(), state: RwLock::new(state), tx });
        let wal_dir = dir.clone();
        let wal = crate::env::spawn_blocking(move || WalWriter::create(&wal_dir, next_seq))
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        let writer = Writer {
            shard: shard.clone(),
            wal: Some(wal),
            next_seq: next_seq + 1,
            compacting: None,
            cfg,
            metrics,
            index: PointIndex::default(),
            index_rows: usize::MAX,
            frozen_index: PointIndex::default(),
            tombstones,
            rule,
        };
        tokio::spawn(writer.run(rx));
        Ok(shard)
    }

    /// Makes `points` durable; returns once they are fsynced and visible to scans, with how
    /// many of them were new (a point equal to a stored one is not stored again).
    pub async fn append(&self, batch: RowBatch) -> Result<u64, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Append { batch, merge: None, done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    pub async fn flush(&self) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Flush { done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Removes the points for which `keep` says false; returns how many were removed. With a
    /// tombstone, later merges cannot bring those points back until it expires.
    pub async fn delete(&self, keep: KeepRow, tombstone: Option<Tombstone>) -> Result<u64, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Delete { keep, tombstone, done }).await.map_err(|_| StorageError::Closed)?;
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
            let hasher = RowHasher::new(b);
            for (row, &ts) in b.timestamps.iter().enumerate() {
                if ts >= from && ts < to {
                    let e = blocks.entry(ts.div_euclid(block_ms) * block_ms).or_default();
                    e.0 += 1;
                    e.1 = e.1.wrapping_add(hasher.hash(b, row));
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

    /// Stores the points of `batch` this shard does not hold yet and returns how many. Hint
    /// replay, repair and hand-off store through here: like [`Shard::append`] (points are a
    /// set), except that points matched by a tombstone newer than the copy (less the margin)
    /// are not stored: they are copies read before their delete.
    pub async fn merge(&self, batch: RowBatch, times: MergeTimes) -> Result<u64, StorageError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Append { batch, merge: Some(times), done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
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
    crate::env::spawn_blocking(f).await.map_err(|e| StorageError::Io(std::io::Error::other(e)))?
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
                Command::Append { batch, merge, done } => {
                    let mut group = vec![(self.apply_tombstones(batch, merge), done)];
                    while group.len() < GROUP_APPENDS_MAX {
                        match rx.try_recv() {
                            Ok(Command::Append { batch, merge, done }) => {
                                group.push((self.apply_tombstones(batch, merge), done))
                            }
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
                Command::Delete { keep, tombstone, done } => {
                    let _ = done.send(self.delete(keep, tombstone).await);
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

    /// Drops from each batch the points the shard already holds (in the memtable, the frozen
    /// memtable or a segment) or that an earlier row of the group carries: a shard stores a
    /// set of points, so a write that is repeated (a client retry, a hint replayed for a write
    /// that did arrive, a repair racing the write it repairs) stores nothing twice. Points are
    /// found by hash and confirmed by comparing the rows, so a hash collision never drops a
    /// point. Segments are read only for rows inside their time range: appends of new times,
    /// the common case, never touch the disk here.
    fn dedup(&mut self, batches: Vec<RowBatch>) -> Result<Vec<RowBatch>, StorageError> {
        let st = self.shard.state.read().expect("shard lock");
        let memtable = &st.memtable.batch;
        if self.index_rows != memtable.len() {
            self.index = index_of(memtable);
            self.index_rows = memtable.len();
        }
        if st.frozen.is_none() {
            self.frozen_index.clear();
        }
        let blocks: Vec<(&Arc<Segment>, &super::segment::BlockMeta)> =
            st.segments.iter().flat_map(|seg| seg.blocks.iter().map(move |b| (seg, b))).collect();
        let (seg_min, seg_max) =
            blocks.iter().fold((i64::MAX, i64::MIN), |(lo, hi), (_, b)| (lo.min(b.min_ts), hi.max(b.max_ts)));
        let mut decoded: HashMap<usize, (RowBatch, PointIndex)> = HashMap::new();
        let mut kept: Vec<RowBatch> = Vec::with_capacity(batches.len());
        // Global row numbers continue the memtable's: `starts[i]` is where kept batch i begins.
        let mut starts: Vec<usize> = Vec::with_capacity(batches.len());
        let mut next = memtable.len();
        for batch in batches {
            let hasher = RowHasher::new(&batch);
            let mut rows: Vec<usize> = Vec::with_capacity(batch.len());
            for r in 0..batch.len() {
                let h = hasher.hash(&batch, r);
                // Where global row `at` is: the memtable, an earlier batch of the group, or a
                // row of this batch kept so far.
                let held_at = |at: usize, rows: &[usize]| -> bool {
                    if at < memtable.len() {
                        same_point(memtable, at, &batch, r)
                    } else if at >= next {
                        rows.get(at - next).is_some_and(|&kept_row| same_point(&batch, kept_row, &batch, r))
                    } else {
                        let k = starts.partition_point(|&s| s <= at) - 1;
                        same_point(&kept[k], at - starts[k], &batch, r)
                    }
                };
                // One probe of the memtable's index finds a stored point or the slot for a new one.
                let slot = match self.index.entry(h) {
                    std::collections::hash_map::Entry::Occupied(e) if held_at(*e.get() as usize, &rows) => continue,
                    // A different point with the same hash keeps the slot (see below).
                    std::collections::hash_map::Entry::Occupied(_) => None,
                    std::collections::hash_map::Entry::Vacant(v) => Some(v),
                };
                if let (Some(frozen), Some(&at)) = (&st.frozen, self.frozen_index.get(&h))
                    && same_point(frozen, at as usize, &batch, r)
                {
                    continue;
                }
                let ts = batch.timestamps[r];
                if ts >= seg_min && ts <= seg_max {
                    let mut found = false;
                    for (i, (seg, meta)) in blocks.iter().enumerate() {
                        if ts < meta.min_ts || ts > meta.max_ts {
                            continue;
                        }
                        let (block, index) = match decoded.entry(i) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                let block = seg.read_block(meta, None)?;
                                let index = index_of(&block);
                                e.insert((block, index))
                            }
                        };
                        if let Some(&at) = index.get(&h)
                            && same_point(block, at as usize, &batch, r)
                        {
                            found = true;
                            break;
                        }
                    }
                    if found {
                        continue;
                    }
                }
                // A new point; a hash already indexed for a different point (a collision)
                // keeps the first one indexed, which at worst lets a later repeat through.
                if let Some(slot) = slot {
                    slot.insert((next + rows.len()) as u32);
                }
                rows.push(r);
            }
            let batch = if rows.len() == batch.len() { batch } else { batch.select(&rows) };
            starts.push(next);
            next += batch.len();
            kept.push(batch);
        }
        Ok(kept)
    }

    async fn commit(&mut self, group: Vec<(RowBatch, Reply<u64>)>) {
        let (batches, replies): (Vec<RowBatch>, Vec<Reply<u64>>) = group.into_iter().unzip();
        let batches = match self.dedup(batches) {
            Ok(b) => b,
            Err(e) => {
                self.index_rows = usize::MAX;
                tracing::error!(shard = %self.shard.id, error = %e, "cannot check new points against a segment");
                for done in replies {
                    let _ = done.send(Err(StorageError::Corrupt(e.to_string())));
                }
                return;
            }
        };
        let mut bytes = Vec::new();
        for batch in batches.iter().filter(|b| !b.is_empty()) {
            encode_record(batch, &mut bytes);
        }
        let group: Vec<(RowBatch, Reply<u64>)> = batches.into_iter().zip(replies).collect();
        if bytes.is_empty() {
            for (_, done) in group {
                let _ = done.send(Ok(0));
            }
            return;
        }
        let mut wal = self.wal.take().expect("writer owns the WAL");
        let started = tokio::time::Instant::now();
        let (wal, res) = match crate::env::spawn_blocking(move || {
            let r = wal.append_durable(&bytes);
            (wal, r)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                // The blocking task panicked: the WAL handle is gone; fail this group and all later ones.
                self.index_rows = usize::MAX;
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
            // The index already lists the rejected rows: rebuild it from the memtable.
            self.index_rows = usize::MAX;
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
        self.index_rows = memtable_len;
        let written: usize = group.iter().map(|(p, _)| p.len()).sum();
        self.metrics.points_written.fetch_add(written as u64, std::sync::atomic::Ordering::Relaxed);
        for (batch, done) in group {
            let _ = done.send(Ok(batch.len() as u64));
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
        // The memtable's index now describes the frozen rows.
        self.frozen_index =
            if self.index_rows == frozen.len() { std::mem::take(&mut self.index) } else { index_of(&frozen) };
        self.index.clear();
        self.index_rows = 0;
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

    /// Drops the rows of a merged batch that a live tombstone matches; forgets tombstones older
    /// than the grace (they can no longer meet a copy read before their delete).
    fn apply_tombstones(&mut self, mut batch: RowBatch, merge: Option<MergeTimes>) -> RowBatch {
        let Some(MergeTimes { as_of_ms, now_ms }) = merge else { return batch };
        let before = self.tombstones.len();
        self.tombstones.retain(|(t, _)| now_ms - t.at_ms <= self.cfg.tombstone_grace_ms);
        if self.tombstones.len() != before {
            let kept: Vec<Tombstone> = self.tombstones.iter().map(|(t, _)| t.clone()).collect();
            if let Err(e) = write_tombstones(&self.shard.dir, &kept) {
                tracing::warn!(shard = %self.shard.id, error = %e, "cannot rewrite the tombstones");
            }
        }
        for (_, keep) in self.tombstones.iter().filter(|(t, _)| t.at_ms + TOMBSTONE_MARGIN_MS >= as_of_ms) {
            let mask = keep(&batch);
            if mask.iter().any(|k| !k) {
                let rows: Vec<usize> = (0..batch.len()).filter(|&r| mask[r]).collect();
                batch = batch.select(&rows);
            }
        }
        batch
    }

    async fn delete(&mut self, keep: KeepRow, tombstone: Option<Tombstone>) -> Result<u64, StorageError> {
        if let Some(t) = tombstone {
            let mut all: Vec<Tombstone> = self.tombstones.iter().map(|(t, _)| t.clone()).collect();
            all.push(t.clone());
            let dir = self.shard.dir.clone();
            blocking(move || write_tombstones(&dir, &all)).await?;
            let rule = (self.rule)(&t.rule);
            self.tombstones.push((t, rule));
        }
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
