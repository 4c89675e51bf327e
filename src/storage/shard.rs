//! One shard: a metric's points in one time bucket `[start, end)`, in one folder.
//!
//! A single writer task per shard takes every append waiting in its queue, drops the points the
//! shard holds already, hands the rest to the node's WAL as one submission (which fsyncs it with
//! other shards' submissions) and only then makes the points visible and answers the callers
//! (group commit). While a group is on its way to disk the writer checks and submits the next
//! ones (up to [`IN_FLIGHT_MAX`]), so a shard's appends meet the WAL's next fsync rather than
//! the one after; groups become visible and are answered in the order they were submitted. The
//! same task compacts the in-memory points into segments, merges segments and applies deletes,
//! so those never race with appends.
//!
//! Folder: `MANIFEST` (live segments, and the WAL position up to which the shard's records are
//! in them), `seg-<seq>.seg`. Files not named by the manifest are leftovers of a crash and are
//! removed.

use super::digest::{BlockDigest, row_hashes, same_point, series_hash, series_hashes};
use super::segment::{
    BlockMeta, Segment, SegmentWriter, SeriesKey, segment_path, series_key, window_of, write_segment,
};
use super::wal::{Durable, NodeWal, encode_record, list_wal_seqs, replay_shard_wal, wal_path};
use super::{MemtableBudget, StorageConfig, StorageError, fsync_dir};
use crate::metrics::Metrics;
pub use crate::model::ShardId;
use crate::model::batch::{RowBatch, RowBatchBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// Appends waiting beyond this many make callers wait (backpressure), bounding memory.
const QUEUE_DEPTH: usize = 1024;
/// Most appends one group commit takes, bounding one write's size.
const GROUP_APPENDS_MAX: usize = 256;
/// Groups submitted to the WAL and not yet durable, per shard; the writer takes no new appends
/// beyond them (their memory is bounded by this times [`GROUP_APPENDS_MAX`] appends).
const IN_FLIGHT_MAX: usize = 4;

pub fn shard_dir(root: &Path, id: &ShardId) -> PathBuf {
    root.join(&id.metric.db).join(&id.metric.namespace).join(&id.metric.metric).join(id.start.to_string())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    segments: Vec<u64>,
    /// The shard's records in the node WAL that end at or before this LSN are in the segments
    /// (or were dropped before the shard was created anew): replay skips them.
    flushed_lsn: u64,
    format: u32,
}

/// `format` of a manifest written since the node WAL.
const MANIFEST_FORMAT: u32 = 2;

/// The manifest of a shard from before the node WAL, which had a WAL of its own.
#[derive(Deserialize)]
struct LegacyManifest {
    segments: Vec<u64>,
    /// The first of the shard's own WAL files not in segments.
    wal_from: u64,
}

impl Manifest {
    /// The manifest, and for a shard from before the node WAL, its first WAL to replay;
    /// `None` when the shard has no manifest.
    fn read(dir: &Path) -> Result<Option<(Self, Option<u64>)>, StorageError> {
        let path = dir.join("MANIFEST");
        let Some(body) = read_checked_bytes(&path)? else { return Ok(None) };
        let corrupt = |e: postcard::Error| StorageError::Corrupt(format!("{}: {e}", path.display()));
        // A legacy manifest is one field short, so it never reads as a current one.
        match postcard::from_bytes::<Manifest>(&body) {
            Ok(m) if m.format == MANIFEST_FORMAT => Ok(Some((m, None))),
            Ok(m) => Err(StorageError::Corrupt(format!("{}: unknown format {}", path.display(), m.format))),
            Err(_) => {
                let legacy: LegacyManifest = postcard::from_bytes(&body).map_err(corrupt)?;
                let m = Manifest { segments: legacy.segments, flushed_lsn: 0, format: MANIFEST_FORMAT };
                Ok(Some((m, Some(legacy.wal_from))))
            }
        }
    }

    fn write(&self, dir: &Path) -> Result<(), StorageError> {
        write_checked(&dir.join("MANIFEST"), self)
    }
}

/// Reads a small file written by [`write_checked`]: postcard followed by its crc32. A missing
/// file is the default value; a bad checksum or a short file is corruption, never ignored.
fn read_checked<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, StorageError> {
    match read_checked_bytes(path)? {
        Some(body) => {
            postcard::from_bytes(&body).map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))
        }
        None => Ok(T::default()),
    }
}

/// The body of a file written by [`write_checked`], its checksum verified; `None` when missing.
fn read_checked_bytes(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(mut bytes) if bytes.len() >= 4 => {
            let crc = bytes.split_off(bytes.len() - 4);
            if crc32fast::hash(&bytes).to_le_bytes()[..] != crc[..] {
                return Err(StorageError::Corrupt(format!("{} fails its checksum", path.display())));
            }
            Ok(Some(bytes))
        }
        Ok(_) => Err(StorageError::Corrupt(format!("{} is truncated", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
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
    /// How many points the last memtable held when it was flushed: the next one, likely to fill
    /// as that one did, is allocated for as many when its first points arrive.
    memtable_rows_expected: usize,
    /// When the oldest point in the memtable arrived (for flushing idle shards).
    memtable_since: Option<tokio::time::Instant>,
    /// When points last joined the memtable: a shard is idle when this is long past.
    last_write: Option<tokio::time::Instant>,
    /// A memtable being written to a segment: still visible to scans until the segment is.
    frozen: Option<Arc<RowBatch>>,
    segments: Vec<Arc<Segment>>,
    /// WAL positions: no record of the memtable (of the frozen memtable) begins before
    /// `memtable_wal_from` (`frozen_wal_from`); `None` when it holds none. The oldest of them
    /// keeps the node WAL's files from there on.
    memtable_wal_from: Option<u64>,
    frozen_wal_from: Option<u64>,
    /// Where the last record in the memtable ends: once the memtable is in a segment, the
    /// shard's records up to here need no replay.
    memtable_lsn: u64,
    /// As in the MANIFEST (see [`Manifest::flushed_lsn`]).
    flushed_lsn: u64,
    /// Changes with every change of what a scan sees (see [`Shard::state_mut`]).
    version: u64,
}

/// Versions of shard states, unique in this process (so a shard dropped and made again never
/// repeats a version its former self had): with the node's generation, a version names one
/// state of one shard on one node for good, which is what a cached answer is checked against.
static NEXT_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_version() -> u64 {
    NEXT_VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
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
    /// Merge the segments of an idle shard into one (see [`Shard::needs_merge`]).
    Merge,
    /// Compact the memtable now: the node is over its memtable budget.
    Compact,
    /// Tell the memtable budget what the memtable holds (once its WAL records are replayed).
    Recount,
    /// `keep: None` records the tombstone only (for later merges) and deletes nothing.
    Delete {
        keep: Option<KeepRow>,
        tombstone: Option<Tombstone>,
        done: Reply<u64>,
    },
    /// The tombstones still live at `now_ms`.
    Tombstones {
        now_ms: i64,
        done: Reply<Vec<Tombstone>>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub at_ms: i64,
    pub rule: Vec<u8>,
}

pub type TombstoneRule = Arc<dyn Fn(&[u8]) -> KeepRow + Send + Sync>;

/// When a batch is merged (`now_ms`, epoch ms on this node's clock): tombstones older than the
/// grace then are forgotten.
#[derive(Debug, Clone, Copy)]
pub struct MergeTimes {
    pub now_ms: i64,
}

/// A delete's rule limited to the points written at or before it (see
/// [`crate::model::batch::WRITTEN_COLUMN`]): a point written again after the delete stays.
pub fn keep_written_after(keep: KeepRow, at_ms: i64) -> KeepRow {
    Box::new(move |batch: &RowBatch| {
        let mut flags = keep(batch);
        if flags.iter().any(|k| !k) {
            for (flag, written) in flags.iter_mut().zip(batch.written()) {
                *flag |= written > at_ms;
            }
        }
        flags
    })
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
    /// Held while the list of segments changes (see [`commit_segments`]).
    manifest: std::sync::Mutex<()>,
    tx: mpsc::Sender<Command>,
}

struct Writer {
    shard: Arc<Shard>,
    wal: Arc<NodeWal>,
    /// Sequence number of the next segment file.
    next_seq: u64,
    /// The flush of a frozen memtable running in the background, if any (one per shard).
    compacting: Option<tokio::task::JoinHandle<Result<(), StorageError>>>,
    /// The merge of segments running in the background, if any (one per shard, beside a
    /// flush: a merge of a size tier of a many-series shard takes a second or more, and a
    /// flush that waited for it stalled the shard's writes once its memtable filled).
    merging: Option<tokio::task::JoinHandle<()>>,
    cfg: StorageConfig,
    metrics: Arc<Metrics>,
    /// The memtable's points by hash (and the frozen memtable's while it is being compacted),
    /// to find a point that is already stored: points are a set (see `dedup`).
    index: MemtableIndex,
    frozen_index: MemtableIndex,
    /// Built at the first append (after WAL replay).
    frontier: Option<Frontier>,
    tombstones: Vec<(Tombstone, KeepRow)>,
    /// Tombstones recorded whose delete did not complete (a full disk failed its flush or
    /// rewrite): applied again at each tombstone exchange until it does. Without this, the
    /// points stayed here while the tombstone kept another replica from taking them back, and
    /// repair never made the two agree. At most one per tombstone.
    unapplied: Vec<Tombstone>,
    rule: TombstoneRule,
    /// Groups submitted to the WAL, oldest first: not yet in the memtable, but new appends are
    /// checked against them too.
    in_flight: VecDeque<InFlight>,
    budget: BudgetShare,
}

/// A writer's part of the node's memtable budget: its memtable's points as last told.
struct BudgetShare {
    budget: Arc<MemtableBudget>,
    held: u64,
}

impl BudgetShare {
    /// Tells the budget how many points the memtable holds now; whether the node is over it.
    fn tell(&mut self, points: usize) -> bool {
        let over = self.budget.adjust(self.held, points as u64);
        self.held = points as u64;
        over
    }
}

impl Drop for BudgetShare {
    /// A shard closed (dropped, handed off, or the node stopping) holds no share any more.
    fn drop(&mut self) {
        self.budget.adjust(self.held, 0);
    }
}

/// A group commit whose records are on their way to disk.
struct InFlight {
    /// The points kept (after `dedup`), one batch per append, and where to answer each.
    batches: Vec<RowBatch>,
    replies: Vec<Reply<u64>>,
    /// Where each batch begins among the group's rows.
    starts: Vec<usize>,
    /// The group's points by hash (rows counted from the group's first row), once `complete`.
    chunk: Option<IndexChunk>,
    /// Whether `chunk` indexes every row of the group: a group whose rows all fell outside
    /// their series' held ranges (see [`Frontier`]) is indexed only when a later group first
    /// needs it.
    complete: bool,
    /// `None` when every point was already held: nothing to write.
    durable: Option<Durable>,
    /// Set when an earlier group failed: this one was checked against that group's points, so
    /// it is answered with this error, though what it wrote still joins the memtable.
    /// (Its kind is kept: a full disk answers 507, not 500.)
    earlier_failed: Option<(std::io::ErrorKind, String)>,
}

impl InFlight {
    /// Whether row `r` of `batch` (hash `h`) is one of the group's points.
    fn holds(&self, batch: &RowBatch, r: usize, h: u64) -> bool {
        let Some(chunk) = &self.chunk else { return false };
        let ts = batch.timestamps[r];
        ts >= chunk.min_ts
            && ts <= chunk.max_ts
            && chunk.points.get(&h).is_some_and(|&at| {
                let (k, row) = locate(&self.starts, at as usize);
                same_point(&self.batches[k], row, batch, r)
            })
    }

    fn rows(&self) -> usize {
        self.batches.iter().map(RowBatch::len).sum()
    }
}

/// Which batch of a group holds the group's row `at`, and its row there (`starts`: where each
/// batch begins; an empty batch begins where the next one does).
fn locate(starts: &[usize], at: usize) -> (usize, usize) {
    let k = starts.partition_point(|&s| s <= at) - 1;
    (k, at - starts[k])
}

/// What [`Writer::dedup`] keeps of a group: the batches, where each begins among the group's
/// rows, and their index (`complete`: it covers every row kept).
struct Deduped {
    batches: Vec<RowBatch>,
    starts: Vec<usize>,
    chunk: Option<IndexChunk>,
    complete: bool,
}

/// The index of a group's rows (counted from its first row), `None` when it has none.
fn chunk_of(batches: &[RowBatch]) -> Option<IndexChunk> {
    let mut chunk = IndexChunk { min_ts: i64::MAX, max_ts: i64::MIN, points: PointIndex::default(), base: 0 };
    let mut at = 0u32;
    for batch in batches {
        for (h, &ts) in row_hashes(batch).into_iter().zip(&batch.timestamps) {
            chunk.points.entry(h).or_insert(at);
            chunk.min_ts = chunk.min_ts.min(ts);
            chunk.max_ts = chunk.max_ts.max(ts);
            at += 1;
        }
    }
    (!chunk.points.is_empty()).then_some(chunk)
}

/// Where in time each series a shard holds has points, anywhere (segments, memtables, groups
/// in flight), as a few ranges per series hash: a row outside its series' ranges is new, with
/// no index looked at. Appends in time order, even from several writers at once (each
/// writer's batch a range of its own), mostly fall outside. Ranges only grow (two merge into
/// one past [`HELD_RANGES`]) and deletes leave them as they are: a range says where points
/// may be. Series that share a hash share ranges, which only sends more rows to the indexes.
struct Frontier {
    series: HashMap<u64, Held, std::hash::BuildHasherDefault<IdentityHasher>>,
    /// The time range of blocks of the first segment format, which name no series.
    unsorted: Option<(i64, i64)>,
    /// The series the current batch touched (see [`Held::batch`]), and its number (from 1).
    touched: Vec<u64>,
    batch: u64,
}

/// Ranges kept per series: as many writers as this append at once without their rows looking
/// like repeats.
const HELD_RANGES: usize = 4;

#[derive(Default)]
struct Held {
    /// Sorted, disjoint; the first `len` are used.
    ranges: [(i64, i64); HELD_RANGES],
    len: u8,
    /// The times of rows kept from batch number `batch` (0: none yet); once that batch is
    /// done, they are in `ranges` too.
    batch: u64,
    batch_range: (i64, i64),
}

impl Held {
    fn holds(&self, ts: i64) -> bool {
        self.ranges[..self.len as usize].iter().any(|&(lo, hi)| lo <= ts && ts <= hi)
    }

    /// Called once per series per batch, so it works in place, with no allocation.
    fn add(&mut self, (lo, hi): (i64, i64)) {
        let mut all = [(0i64, 0i64); HELD_RANGES + 1];
        let mut len = self.len as usize;
        all[..len].copy_from_slice(&self.ranges[..len]);
        all[len] = (lo, hi);
        len += 1;
        all[..len].sort_unstable();
        // Overlapping ranges become one.
        let mut merged = 0;
        for i in 1..len {
            if all[i].0 <= all[merged].1 {
                all[merged].1 = all[merged].1.max(all[i].1);
            } else {
                merged += 1;
                all[merged] = all[i];
            }
        }
        len = merged + 1;
        if len > HELD_RANGES {
            // The two closest ranges become one.
            let i = (0..len - 1).min_by_key(|&i| all[i + 1].0.saturating_sub(all[i].1)).expect("two");
            all[i].1 = all[i + 1].1;
            all.copy_within(i + 2..len, i + 1);
            len -= 1;
        }
        self.len = len as u8;
        self.ranges[..len].copy_from_slice(&all[..len]);
    }
}

impl Frontier {
    fn of(st: &ShardState, in_flight: &VecDeque<InFlight>) -> Self {
        let mut frontier = Frontier { series: HashMap::default(), unsorted: None, touched: Vec::new(), batch: 1 };
        for seg in &st.segments {
            let hashes: Vec<u64> =
                (0..seg.series_count() as u32).map(|id| seg.series(id).map_or(0, |tags| series_hash(tags))).collect();
            for meta in &seg.blocks {
                match hashes.get(meta.series as usize) {
                    Some(&h) => frontier.series.entry(h).or_default().add((meta.min_ts, meta.max_ts)),
                    None => {
                        let (lo, hi) = frontier.unsorted.unwrap_or((meta.min_ts, meta.max_ts));
                        frontier.unsorted = Some((lo.min(meta.min_ts), hi.max(meta.max_ts)));
                    }
                }
            }
        }
        let memtables = [&st.memtable.batch].into_iter().chain(st.frozen.as_deref());
        for batch in memtables.chain(in_flight.iter().flat_map(|g| &g.batches)) {
            let series = series_hashes(batch);
            for (r, &ts) in batch.timestamps.iter().enumerate() {
                frontier.keep(series[r], ts);
            }
            frontier.end_batch();
        }
        frontier
    }

    /// Whether a row of `series` at `ts` is surely new: outside the series' ranges, and later
    /// than the rows of its series kept from the current batch.
    fn is_new(&mut self, series: u64, ts: i64) -> bool {
        if self.unsorted.is_some_and(|(lo, hi)| lo <= ts && ts <= hi) {
            return false;
        }
        let held = self.series.entry(series).or_default();
        (held.batch != self.batch || ts > held.batch_range.1) && !held.holds(ts)
    }

    /// Records a row kept from the current batch.
    fn keep(&mut self, series: u64, ts: i64) {
        let held = self.series.entry(series).or_default();
        if held.batch != self.batch {
            held.batch = self.batch;
            held.batch_range = (ts, ts);
            self.touched.push(series);
        } else {
            held.batch_range = (held.batch_range.0.min(ts), held.batch_range.1.max(ts));
        }
    }

    /// Adds the current batch's rows kept to their series' ranges.
    fn end_batch(&mut self) {
        for series in std::mem::take(&mut self.touched) {
            if let Some(held) = self.series.get_mut(&series) {
                let range = held.batch_range;
                held.add(range);
            }
        }
        self.batch += 1;
    }
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
    let mut index = PointIndex::default();
    for (row, h) in row_hashes(batch).into_iter().enumerate() {
        index.entry(h).or_insert(row as u32);
    }
    index
}

/// Time range of a batch's rows (`None` when empty).
pub(crate) fn time_range(batch: &RowBatch) -> Option<(i64, i64)> {
    let lo = *batch.timestamps.iter().min()?;
    Some((lo, *batch.timestamps.iter().max()?))
}

/// The points of a memtable by hash, as one index per group commit with the group's time range.
/// A new row is looked up only in the groups whose time range holds it: points mostly arrive in
/// time order, so a row usually falls in no group, or in the last one or two. Small indexes also
/// stay in the CPU cache, where one index of a whole memtable does not.
#[derive(Default)]
struct MemtableIndex {
    /// How many memtable rows the chunks cover; a mismatch (after recovery, or a compaction that
    /// failed and put its rows back) rebuilds the index.
    rows: usize,
    chunks: Vec<IndexChunk>,
}

#[derive(Default)]
struct IndexChunk {
    min_ts: i64,
    max_ts: i64,
    /// Hash → row, counted from `base`: the memtable row where the chunk's group begins.
    points: PointIndex,
    base: usize,
}

/// When more chunks than this overlap a batch (points arriving out of time order), they are
/// merged into one, so that a row costs one lookup rather than one per chunk.
const CHUNKS_PROBED_MAX: usize = 4;

impl MemtableIndex {
    fn of(batch: &RowBatch) -> Self {
        let chunks = match time_range(batch) {
            Some((min_ts, max_ts)) => vec![IndexChunk { min_ts, max_ts, points: index_of(batch), base: 0 }],
            None => Vec::new(),
        };
        Self { rows: batch.len(), chunks }
    }

    fn stale() -> Self {
        Self { rows: usize::MAX, chunks: Vec::new() }
    }

    /// The chunks whose time range meets `[lo, hi]`, as a range of `self.chunks`.
    fn overlapping(&mut self, lo: i64, hi: i64) -> std::ops::Range<usize> {
        let (mut hit, rest): (Vec<IndexChunk>, Vec<IndexChunk>) =
            std::mem::take(&mut self.chunks).into_iter().partition(|c| c.min_ts <= hi && lo <= c.max_ts);
        self.chunks = rest;
        if hit.len() > CHUNKS_PROBED_MAX {
            let points = hit.iter().map(|c| c.points.len()).sum();
            let mut merged = IndexChunk {
                min_ts: i64::MAX,
                max_ts: i64::MIN,
                points: PointIndex::with_capacity_and_hasher(points, Default::default()),
                base: 0,
            };
            for c in hit.drain(..) {
                merged.min_ts = merged.min_ts.min(c.min_ts);
                merged.max_ts = merged.max_ts.max(c.max_ts);
                for (h, row) in c.points {
                    merged.points.entry(h).or_insert((c.base + row as usize) as u32);
                }
            }
            hit.push(merged);
        }
        let start = self.chunks.len();
        self.chunks.extend(hit);
        start..self.chunks.len()
    }

    /// Whether row `r` of `batch` (hash `h`) is one of the points of `chunks` in `memtable`.
    fn holds(&self, chunks: &std::ops::Range<usize>, memtable: &RowBatch, batch: &RowBatch, r: usize, h: u64) -> bool {
        let ts = batch.timestamps[r];
        self.chunks[chunks.clone()].iter().any(|c| {
            ts >= c.min_ts
                && ts <= c.max_ts
                && c.points.get(&h).is_some_and(|&at| same_point(memtable, c.base + at as usize, batch, r))
        })
    }
}

impl Shard {
    /// Opens (or creates) the shard folder and starts its writer task. Its records in the node
    /// WAL are replayed into it afterwards, through [`Shard::replay`].
    pub async fn open(
        root: &Path,
        id: ShardId,
        cfg: StorageConfig,
        wal: Arc<NodeWal>,
        metrics: Arc<Metrics>,
        rule: TombstoneRule,
        budget: Arc<MemtableBudget>,
    ) -> Result<Arc<Self>, StorageError> {
        let dir = shard_dir(root, &id);
        let dir2 = dir.clone();
        let metrics2 = metrics.clone();
        let wal_end = wal.end();
        let (recovered, tombstones) = crate::env::spawn_blocking(move || {
            let recovered = recover(&dir2, wal_end, &metrics2)?;
            Ok::<_, StorageError>((recovered, read_tombstones(&dir2)?))
        })
        .await
        .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        let Recovered { state, next_seq, legacy_wal } = recovered;
        let tombstones =
            tombstones.into_iter().map(|t| (t.clone(), keep_written_after(rule(&t.rule), t.at_ms))).collect();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let end = id.start.saturating_add(cfg.shard_interval_ms);
        let shard =
            Arc::new(Shard { id, end, dir: dir.clone(), state: RwLock::new(state), manifest: Default::default(), tx });
        let writer = Writer {
            shard: shard.clone(),
            wal,
            next_seq,
            compacting: None,
            merging: None,
            cfg,
            metrics,
            index: MemtableIndex::stale(),
            frozen_index: MemtableIndex::default(),
            frontier: None,
            tombstones,
            unapplied: Vec::new(),
            rule,
            in_flight: VecDeque::new(),
            budget: BudgetShare { budget, held: 0 },
        };
        tokio::spawn(writer.run(rx));
        if legacy_wal {
            // The shard's own WAL, from before the node WAL: its points go into a segment now,
            // and then the files go.
            shard.flush().await?;
            blocking(move || {
                for seq in list_wal_seqs(&dir)? {
                    std::fs::remove_file(wal_path(&dir, seq))?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(shard)
    }

    /// Replays one of the shard's node WAL records, `[start, end)`: `batch` is its postcard
    /// `RowBatch`. Records already in segments are skipped. Only before the first append.
    pub fn replay(&self, start: u64, end: u64, batch: &[u8]) -> Result<(), StorageError> {
        let mut st = self.state_mut();
        if end <= st.flushed_lsn {
            return Ok(());
        }
        let batch = postcard::from_bytes::<RowBatch>(batch).ok().filter(|b| b.validate().is_ok()).ok_or_else(|| {
            StorageError::Corrupt(format!("the WAL record ending at {end} for {} is not a batch", self.id))
        })?;
        st.memtable.extend_from(&batch, None);
        st.memtable_wal_from.get_or_insert(start);
        st.memtable_lsn = end;
        st.memtable_since.get_or_insert_with(tokio::time::Instant::now);
        Ok(())
    }

    /// Where the shard's oldest record not in a segment begins in the node WAL (`None`: none).
    pub fn unflushed_from(&self) -> Option<u64> {
        let st = self.state.read().expect("shard lock");
        st.memtable_wal_from.into_iter().chain(st.frozen_wal_from).min()
    }

    /// The LSN its MANIFEST names.
    pub fn flushed_lsn(&self) -> u64 {
        self.state.read().expect("shard lock").flushed_lsn
    }

    /// Makes `points` durable; returns once they are fsynced and visible to scans, with how
    /// many of them were new (a point equal to a stored one is not stored again).
    pub async fn append(&self, batch: RowBatch) -> Result<u64, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Append { batch, merge: None, done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Asks the writer to compact the memtable soon, without waiting (see [`MemtableBudget`]).
    /// A writer whose queue is full is busy with appends and sees the budget itself.
    pub fn compact(&self) {
        let _ = self.tx.try_send(Command::Compact);
    }

    /// Has the writer count the memtable's points into the node's budget: those replayed from
    /// the WAL at start-up are in no group commit.
    pub fn recount(&self) {
        let _ = self.tx.try_send(Command::Recount);
    }

    /// Points in the memtable (not counting one being compacted).
    pub fn memtable_points(&self) -> u64 {
        self.state.read().expect("shard lock").memtable.batch.len() as u64
    }

    pub async fn flush(&self) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Flush { done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Removes the points for which `keep` says false; returns how many were removed. With a
    /// tombstone, later merges cannot bring those points back until it expires.
    pub async fn delete(&self, keep: Option<KeepRow>, tombstone: Option<Tombstone>) -> Result<u64, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Delete { keep, tombstone, done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// The shard's tombstones still live at `now_ms` (younger than the grace).
    pub async fn tombstones(&self, now_ms: i64) -> Result<Vec<Tombstone>, StorageError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Tombstones { now_ms, done }).await.map_err(|_| StorageError::Closed)?;
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
    /// Whether the shard is idle (nothing in memory, nothing written for `idle`; a shard being
    /// loaded has an empty memtable for a moment after each flush) with segments worth merging
    /// into one: those written since its largest one hold at least an eighth as many bytes. Each flush
    /// of a shard with many series writes a few points per series per block; merged, a series
    /// has one block per window, which is smaller on disk and quicker to read. The eighth
    /// keeps a shard that gets a point now and then from being rewritten at every flush.
    pub fn needs_merge(&self, now: tokio::time::Instant, idle: std::time::Duration) -> bool {
        let st = self.state.read().expect("shard lock");
        let written_lately = st.last_write.is_some_and(|at| now.duration_since(at) < idle);
        if written_lately || !st.memtable.batch.is_empty() || st.frozen.is_some() || st.segments.len() < 2 {
            return false;
        }
        let (total, largest) = st
            .segments
            .iter()
            .fold((0, 0), |(total, largest), seg| (total + seg.block_bytes, largest.max(seg.block_bytes)));
        (total - largest) * 8 >= largest
    }

    /// Asks the writer to merge the segments in the background (see [`Shard::needs_merge`]).
    pub fn merge_segments(&self) {
        // A full queue means the shard is busy, so not idle: the merge waits for a later turn.
        let _ = self.tx.try_send(Command::Merge);
    }

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
        struct Every<'a>(&'a mut dyn FnMut(&RowBatch));
        impl BlockVisitor for Every<'_> {
            fn rows(&mut self, batch: &RowBatch) {
                (self.0)(batch)
            }
        }
        self.visit(from, to, columns, &mut Every(f))
    }

    /// Shows `visitor` what may hold points in `[from, to)`: the in-memory batches, then each
    /// segment's blocks of the series it selects, which it decodes or answers from the block's
    /// summary.
    pub fn visit(
        &self,
        from: i64,
        to: i64,
        columns: Option<&[String]>,
        visitor: &mut dyn BlockVisitor,
    ) -> Result<(), StorageError> {
        self.snapshot().visit_part(from, to, columns, visitor, 0, 1)
    }

    /// The version of the shard's state now (see [`ShardSnapshot::version`]).
    pub fn version(&self) -> u64 {
        self.state.read().expect("shard lock").version
    }

    /// The state, to change it: every change gets a new version, so an answer computed from
    /// an earlier state is never taken for this one. (A write lock that changes nothing
    /// costs a cached answer, never a wrong one.)
    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, ShardState> {
        let mut st = self.state.write().expect("shard lock");
        st.version = next_version();
        st
    }

    /// What the shard holds now, for one or more scans that must see the same points.
    /// The lock is held only to copy the memtable (a memcpy of its columns, bounded by
    /// `memtable-max-points`) and take the rest by reference count: writers wait for that,
    /// never for the query's own work.
    pub fn snapshot(&self) -> ShardSnapshot {
        let st = self.state.read().expect("shard lock");
        ShardSnapshot {
            version: st.version,
            memtable: (!st.memtable.batch.is_empty()).then(|| st.memtable.batch.clone()),
            frozen: st.frozen.clone(),
            segments: st.segments.clone(),
        }
    }
}

/// A shard's points at one instant (see [`Shard::snapshot`]).
pub struct ShardSnapshot {
    /// The state's version: equal versions of one shard on one node (of one generation) hold
    /// the same points.
    pub version: u64,
    memtable: Option<RowBatch>,
    frozen: Option<Arc<RowBatch>>,
    segments: Vec<Arc<Segment>>,
}

impl ShardSnapshot {
    /// How many segment blocks of the series `visitor` selects meet `[from, to)`: the work a
    /// scan may have to decode (a one-host query over a big shard has little).
    pub fn blocks_in(&self, from: i64, to: i64, visitor: &mut dyn BlockVisitor) -> usize {
        self.segments
            .iter()
            .map(|seg| {
                let series = visitor.series(seg);
                seg.blocks_of(series.as_deref()).filter(|b| b.max_ts >= from && b.min_ts < to).count()
            })
            .sum()
    }

    /// [`Shard::visit`] over part `part` of `parts`: part 0 takes the in-memory batches, and
    /// each part one contiguous run of every segment's selected blocks (runs of whole series,
    /// mostly), so that parts scanned side by side build partials with few groups in common.
    pub fn visit_part(
        &self,
        from: i64,
        to: i64,
        columns: Option<&[String]>,
        visitor: &mut dyn BlockVisitor,
        part: usize,
        parts: usize,
    ) -> Result<(), StorageError> {
        for seg in &self.segments {
            let series = visitor.series(seg);
            let selected: Vec<&BlockMeta> =
                seg.blocks_of(series.as_deref()).filter(|b| b.max_ts >= from && b.min_ts < to).collect();
            let run = selected.len() * part / parts..selected.len() * (part + 1) / parts;
            for meta in &selected[run] {
                if visitor.block(seg, meta) == BlockUse::Decode {
                    visitor.rows(&seg.read_block(meta, columns)?);
                }
            }
        }
        // The newest points last, so that groups mostly grow at their ends.
        if part == 0 {
            if let Some(frozen) = &self.frozen {
                visitor.rows(frozen);
            }
            if let Some(memtable) = &self.memtable {
                visitor.rows(memtable);
            }
        }
        Ok(())
    }
}

/// What a scan does with a block of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockUse {
    /// Its points are needed: decode it.
    Decode,
    /// Not needed, or answered from the block's summary.
    Skip,
}

/// A reader of a shard's points, which may use the segments' series index and summaries to
/// read less (see [`Shard::visit`]).
pub trait BlockVisitor {
    /// The series of `seg` worth reading, ascending; `None`: every series.
    fn series(&mut self, _seg: &Segment) -> Option<Vec<u32>> {
        None
    }
    /// What to do with block `meta` of `seg`, which meets the scan's time range.
    fn block(&mut self, _seg: &Segment, _meta: &BlockMeta) -> BlockUse {
        BlockUse::Decode
    }
    /// Points that may be in the scan's range (a caller filters them by time itself).
    fn rows(&mut self, batch: &RowBatch);
}

impl Shard {
    /// Digests of the non-empty blocks of `block_ms` in `[from, to)`, oldest first.
    pub fn digests(&self, from: i64, to: i64, block_ms: i64) -> Result<Vec<BlockDigest>, StorageError> {
        let block_ms = block_ms.max(1);
        let mut blocks: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        self.scan(from, to, None, &mut |b| {
            for (&ts, h) in b.timestamps.iter().zip(row_hashes(b)) {
                if ts >= from && ts < to {
                    let e = blocks.entry(ts.div_euclid(block_ms) * block_ms).or_default();
                    e.0 += 1;
                    e.1 = e.1.wrapping_add(h);
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
    /// set), except that points a held tombstone removes (matched by its rule and written at or
    /// before it) are not stored: they are copies from before their delete.
    pub async fn merge(&self, batch: RowBatch, times: MergeTimes) -> Result<u64, StorageError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let (done, rx) = oneshot::channel();
        self.tx.send(Command::Append { batch, merge: Some(times), done }).await.map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }
}

struct Recovered {
    state: ShardState,
    next_seq: u64,
    /// The shard's memtable holds points from its own WAL files (from before the node WAL).
    legacy_wal: bool,
}

/// Reads the manifest, opens its segments and removes crash leftovers. A new shard gets a
/// manifest naming `wal_end`: any record of the node WAL for a shard of the same id is from
/// one that was dropped. A shard from before the node WAL replays its own WAL files.
fn recover(dir: &Path, wal_end: u64, metrics: &Metrics) -> Result<Recovered, StorageError> {
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    let legacy_seqs = list_wal_seqs(dir)?;
    let (manifest, legacy_wal_from) = match Manifest::read(dir)? {
        Some(found) => found,
        // A shard from before the node WAL that never compacted has WAL files only.
        None if !legacy_seqs.is_empty() => (Manifest { format: MANIFEST_FORMAT, ..Default::default() }, Some(0)),
        None => {
            let manifest = Manifest { segments: Vec::new(), flushed_lsn: wal_end, format: MANIFEST_FORMAT };
            manifest.write(dir)?;
            (manifest, None)
        }
    };
    let mut state = ShardState { flushed_lsn: manifest.flushed_lsn, version: next_version(), ..Default::default() };
    let mut max_seq = 0;
    for &seq in &manifest.segments {
        let seg = Segment::open_sharing(&segment_path(dir, seq), seq, state.segments.last().map(|s| &**s))?;
        state.segments.push(Arc::new(seg));
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
    let mut legacy_wal = false;
    if let Some(wal_from) = legacy_wal_from {
        for seq in legacy_seqs {
            // Segment and WAL files shared one sequence.
            max_seq = max_seq.max(seq);
            let path = wal_path(dir, seq);
            if seq < wal_from {
                std::fs::remove_file(&path)?;
                continue;
            }
            let (batches, torn) = replay_shard_wal(&path)?;
            if torn > 0 {
                tracing::warn!(wal = %path.display(), torn_bytes = torn, "dropped a torn WAL tail");
                metrics.wal_torn_bytes.fetch_add(torn, std::sync::atomic::Ordering::Relaxed);
            }
            for batch in batches {
                state.memtable.extend_from(&batch, None);
            }
        }
        legacy_wal = true;
        if state.memtable.batch.is_empty() {
            // Nothing to compact: the manifest is rewritten in the current format at once.
            manifest.write(dir)?;
            for seq in list_wal_seqs(dir)? {
                std::fs::remove_file(wal_path(dir, seq))?;
            }
            legacy_wal = false;
        }
    }
    if !state.memtable.batch.is_empty() {
        state.memtable_since = Some(tokio::time::Instant::now());
    }
    Ok(Recovered { state, next_seq: max_seq + 1, legacy_wal })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    crate::env::spawn_blocking(f).await.map_err(|e| StorageError::Io(std::io::Error::other(e)))?
}

/// What the WAL says of the oldest group in flight (see [`Writer::settle`]); cancel-safe.
async fn oldest_durable(in_flight: &mut VecDeque<InFlight>) -> std::io::Result<Option<u64>> {
    match in_flight.front_mut().and_then(|g| g.durable.as_mut()) {
        Some(durable) => durable.wait().await.map(Some),
        None => Ok(None),
    }
}

/// Compaction and merges: on the background threads (see [`crate::env::spawn_background`]).
async fn background<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    crate::env::spawn_background(f).await.map_err(|e| StorageError::Io(std::io::Error::other(e)))?
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut pending: Option<Command> = None;
        loop {
            let cmd = match pending.take() {
                Some(c) => c,
                None => {
                    let settle = !self.in_flight.is_empty();
                    let take = self.in_flight.len() < IN_FLIGHT_MAX;
                    tokio::select! {
                        // Answering a durable group comes first: its callers wait.
                        biased;
                        durable = oldest_durable(&mut self.in_flight), if settle => {
                            if self.settle(durable) {
                                self.compact_full().await;
                            }
                            continue;
                        }
                        cmd = rx.recv(), if take => match cmd {
                            Some(c) => c,
                            None => {
                                self.settle_all().await;
                                return;
                            }
                        },
                    }
                }
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
                    self.submit(group).await;
                }
                // Other commands see every append before them in the memtable.
                Command::Flush { done } => {
                    self.settle_all().await;
                    let _ = done.send(self.flush(true).await);
                }
                Command::Merge => self.merge_idle().await,
                Command::Compact => self.compact_full().await,
                Command::Recount => {
                    let len = self.shard.memtable_points() as usize;
                    if self.count_memtable(len) {
                        self.compact_full().await;
                    }
                }
                Command::Delete { keep, tombstone, done } => {
                    self.settle_all().await;
                    let _ = done.send(self.delete(keep, tombstone).await);
                }
                Command::Tombstones { now_ms, done } => {
                    self.expire_tombstones(now_ms);
                    // Repair exchanges tombstones before it compares replicas: a delete left
                    // half-done is finished first.
                    self.settle_all().await;
                    if let Err(e) = self.apply_unapplied().await {
                        tracing::warn!(shard = %self.shard.id, error = %e, "a recorded delete still cannot be applied");
                    }
                    let _ = done.send(Ok(self.tombstones.iter().map(|(t, _)| t.clone()).collect()));
                }
                Command::Close { done } => {
                    self.settle_all().await;
                    if let Some(running) = self.compacting.take() {
                        let _ = self.await_compaction(running).await;
                    }
                    self.finish_merge().await;
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    /// Drops from each batch the points the shard already holds (in the memtable, the frozen
    /// memtable, a segment or a group in flight) or that an earlier row of the group carries:
    /// a shard stores a set of points, so a write that is repeated (a client retry, a hint
    /// replayed for a write that did arrive, a repair racing the write it repairs) stores
    /// nothing twice.
    ///
    /// A row later than every point of its series (the [`Frontier`]) is new, with nothing
    /// looked up: appends in time order, the common case, build no index at all. The first
    /// other row of a group builds the indexes still missing (the memtables', the groups in
    /// flight's, this group's so far); from then on the group indexes each row it keeps.
    /// Such rows are found by hash and confirmed by comparing the rows, so a hash collision
    /// never drops a point; segments are read only for rows inside their time range.
    fn dedup(&mut self, batches: Vec<RowBatch>) -> Result<Deduped, StorageError> {
        let st = self.shard.state.read().expect("shard lock");
        let frontier = self.frontier.get_or_insert_with(|| Frontier::of(&st, &self.in_flight));
        let memtable = &st.memtable.batch;
        let no_frozen = RowBatch::default();
        let frozen = match &st.frozen {
            Some(f) => f.as_ref(),
            None => {
                self.frozen_index = MemtableIndex::default();
                &no_frozen
            }
        };
        // Worked out when a row first needs them.
        let mut seg_range: Option<(i64, i64)> = None;
        let mut blocks: Option<Vec<(&Arc<Segment>, &BlockMeta)>> = None;
        let mut decoded: HashMap<usize, (RowBatch, PointIndex)> = HashMap::new();
        let mut kept: Vec<RowBatch> = Vec::with_capacity(batches.len());
        // The group's own points once indexing: hash → row among the group's rows (`starts[i]`:
        // where kept batch i begins).
        let mut indexing = false;
        let mut group = IndexChunk { min_ts: i64::MAX, max_ts: i64::MIN, points: PointIndex::default(), base: 0 };
        let mut starts: Vec<usize> = Vec::with_capacity(batches.len());
        let mut next = 0;
        for batch in batches {
            let Some((lo, hi)) = time_range(&batch) else {
                starts.push(next);
                kept.push(batch);
                continue;
            };
            let series = series_hashes(&batch);
            let mut hashes: Vec<u64> = Vec::new();
            // The memtables' index chunks that meet the batch's time range.
            let mut probes: Option<(std::ops::Range<usize>, std::ops::Range<usize>)> = None;
            let mut rows: Vec<usize> = Vec::with_capacity(batch.len());
            for r in 0..batch.len() {
                let ts = batch.timestamps[r];
                let fresh = frontier.is_new(series[r], ts);
                if fresh && !indexing {
                    frontier.keep(series[r], ts);
                    group.min_ts = group.min_ts.min(ts);
                    group.max_ts = group.max_ts.max(ts);
                    rows.push(r);
                    continue;
                }
                if hashes.is_empty() {
                    hashes = row_hashes(&batch);
                }
                if !indexing {
                    indexing = true;
                    if self.index.rows != memtable.len() {
                        self.index = MemtableIndex::of(memtable);
                    }
                    if self.frozen_index.rows != frozen.len() {
                        self.frozen_index = MemtableIndex::of(frozen);
                    }
                    for g in self.in_flight.iter_mut().filter(|g| !g.complete) {
                        g.chunk = chunk_of(&g.batches);
                        g.complete = true;
                    }
                    let so_far = kept.iter().zip(&starts).flat_map(|(b, &start)| {
                        row_hashes(b).into_iter().enumerate().map(move |(i, h)| (h, start + i))
                    });
                    let this_batch = rows.iter().enumerate().map(|(i, &row)| (hashes[row], next + i));
                    for (h, at) in so_far.chain(this_batch) {
                        group.points.entry(h).or_insert(at as u32);
                    }
                }
                let h = hashes[r];
                let held_at = |at: usize, rows: &[usize]| -> bool {
                    if at >= next {
                        rows.get(at - next).is_some_and(|&kept_row| same_point(&batch, kept_row, &batch, r))
                    } else {
                        let (k, row) = locate(&starts, at);
                        same_point(&kept[k], row, &batch, r)
                    }
                };
                // One probe of the group's index finds a repeat or the slot for a new point.
                let slot = match group.points.entry(h) {
                    std::collections::hash_map::Entry::Occupied(e) if held_at(*e.get() as usize, &rows) => continue,
                    // A different point with the same hash keeps the slot (see below).
                    std::collections::hash_map::Entry::Occupied(_) => None,
                    std::collections::hash_map::Entry::Vacant(v) => Some(v),
                };
                if !fresh {
                    let (in_memtable, in_frozen) = probes
                        .get_or_insert_with(|| (self.index.overlapping(lo, hi), self.frozen_index.overlapping(lo, hi)));
                    if self.in_flight.iter().any(|g| g.holds(&batch, r, h))
                        || self.index.holds(in_memtable, memtable, &batch, r, h)
                        || self.frozen_index.holds(in_frozen, frozen, &batch, r, h)
                    {
                        continue;
                    }
                    let (seg_min, seg_max) = *seg_range.get_or_insert_with(|| {
                        st.segments
                            .iter()
                            .flat_map(|seg| &seg.blocks)
                            .fold((i64::MAX, i64::MIN), |(lo, hi), b| (lo.min(b.min_ts), hi.max(b.max_ts)))
                    });
                    if ts >= seg_min && ts <= seg_max {
                        let mut found = false;
                        let blocks = blocks.get_or_insert_with(|| {
                            st.segments.iter().flat_map(|seg| seg.blocks.iter().map(move |b| (seg, b))).collect()
                        });
                        for (i, (seg, meta)) in blocks.iter().enumerate() {
                            if ts < meta.min_ts || ts > meta.max_ts || !seg.may_hold(meta, &batch, r) {
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
                }
                // A new point; a hash already indexed for a different point (a collision)
                // keeps the first one indexed, which at worst lets a later repeat through.
                if let Some(slot) = slot {
                    slot.insert((next + rows.len()) as u32);
                }
                frontier.keep(series[r], ts);
                group.min_ts = group.min_ts.min(ts);
                group.max_ts = group.max_ts.max(ts);
                rows.push(r);
            }
            frontier.end_batch();
            let batch = if rows.len() == batch.len() { batch } else { batch.select(&rows) };
            starts.push(next);
            next += batch.len();
            kept.push(batch);
        }
        let complete = indexing || next == 0;
        let chunk = (indexing && !group.points.is_empty()).then_some(group);
        Ok(Deduped { batches: kept, starts, chunk, complete })
    }

    /// Checks a group of appends and hands its new points to the WAL; they are answered by
    /// [`Writer::settle`] once durable.
    async fn submit(&mut self, group: Vec<(RowBatch, Reply<u64>)>) {
        let (batches, replies): (Vec<RowBatch>, Vec<Reply<u64>>) = group.into_iter().unzip();
        let Deduped { batches, starts, chunk, complete } = match self.dedup(batches) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(shard = %self.shard.id, error = %e, "cannot check new points against a segment");
                for done in replies {
                    let _ = done.send(Err(StorageError::Corrupt(e.to_string())));
                }
                return;
            }
        };
        // Room for the records up front (a timestamp, a value and a code per column take at
        // most 10 + 10 + 5 bytes as postcard varints): grown by doubling instead, the buffer of
        // a 100,000-line body was copied and faulted in again several times over.
        let room = batches.iter().map(|b| b.len() * (20 + 5 * b.columns.len()) + 64).sum();
        let mut bytes = Vec::with_capacity(room);
        for batch in batches.iter().filter(|b| !b.is_empty()) {
            encode_record(&(&self.shard.id, batch), &mut bytes);
        }
        // A group with nothing new still waits its turn: its points may be those of a group
        // in flight, and are held only once that one is durable.
        let mut group = InFlight { batches, replies, starts, chunk, complete, durable: None, earlier_failed: None };
        if !bytes.is_empty() {
            // The records will begin at or after the WAL's end now; the memtable keeps the log
            // from there on until it is in a segment.
            self.shard.state_mut().memtable_wal_from.get_or_insert(self.wal.end());
            match self.wal.submit(bytes).await {
                Ok(durable) => group.durable = Some(durable),
                Err(e) => {
                    // The WAL writer is gone; the groups in flight learn it from their `Durable`.
                    for done in group.replies {
                        let _ = done.send(Err(StorageError::Io(std::io::Error::new(e.kind(), e.to_string()))));
                    }
                    return;
                }
            }
        }
        self.in_flight.push_back(group);
    }

    /// Makes the oldest group in flight visible and answers its callers, given what the WAL
    /// said of it (`Ok(None)`: it had nothing to write). Returns whether the memtable is to be
    /// compacted: it is full, or the node is over its memtable budget and this memtable is
    /// large enough to help.
    fn settle(&mut self, durable: std::io::Result<Option<u64>>) -> bool {
        let lsn = match durable {
            Ok(lsn) => lsn,
            Err(e) => {
                self.fail_in_flight(&e);
                return false;
            }
        };
        let group = self.in_flight.pop_front().expect("settled group is in flight");
        let written = group.rows();
        let memtable_len = {
            let mut st = self.shard.state_mut();
            if let Some(lsn) = lsn {
                // The group's index names rows from where the memtable ends now; had the
                // memtable changed since the index was built (a failed compaction put rows
                // back), it is rebuilt instead.
                let in_place = st.memtable.batch.len() == self.index.rows;
                if st.memtable.batch.is_empty() && st.memtable_rows_expected > 0 {
                    st.memtable = RowBatchBuilder::with_capacity(st.memtable_rows_expected);
                }
                let base = st.memtable.batch.len();
                for batch in &group.batches {
                    st.memtable.extend_from(batch, None);
                }
                let now = tokio::time::Instant::now();
                st.memtable_since.get_or_insert(now);
                st.last_write = Some(now);
                st.memtable_lsn = lsn;
                if in_place && group.complete {
                    self.index.rows += written;
                    self.index.chunks.extend(group.chunk.map(|c| IndexChunk { base, ..c }));
                } else {
                    self.index = MemtableIndex::stale();
                }
            }
            st.memtable.batch.len()
        };
        self.metrics.points_written.fetch_add(written as u64, std::sync::atomic::Ordering::Relaxed);
        for (batch, done) in group.batches.iter().zip(group.replies) {
            let answer = match &group.earlier_failed {
                None => Ok(batch.len() as u64),
                Some((kind, e)) => Err(StorageError::Io(std::io::Error::new(
                    *kind,
                    format!("an earlier write to the WAL failed: {e}"),
                ))),
            };
            let _ = done.send(answer);
        }
        self.count_memtable(memtable_len)
    }

    /// Tells the budget the memtable's new length; whether the memtable is to be compacted.
    fn count_memtable(&mut self, memtable_len: usize) -> bool {
        let over_budget = self.budget.tell(memtable_len);
        if memtable_len >= self.cfg.memtable_points_max {
            return true;
        }
        if over_budget {
            if memtable_len as u64 >= self.budget.budget.flush_min() {
                return true;
            }
            self.budget.budget.press();
        }
        false
    }

    /// The oldest group in flight could not be written: it fails. The later ones were checked
    /// against its points (a point it held was dropped from them), so they fail too; but their
    /// own records may still reach the WAL in a later commit, and a record in the WAL must be in
    /// the memtable, or a retry of its points would be stored twice after a restart. So they
    /// stay in flight and settle as usual, answered with the error.
    fn fail_in_flight(&mut self, e: &std::io::Error) {
        let group = self.in_flight.pop_front().expect("failed group is in flight");
        for done in group.replies {
            let _ = done.send(Err(StorageError::Io(std::io::Error::new(e.kind(), e.to_string()))));
        }
        for later in &mut self.in_flight {
            later.earlier_failed.get_or_insert_with(|| (e.kind(), e.to_string()));
        }
        let mut st = self.shard.state_mut();
        if st.memtable.batch.is_empty() && self.in_flight.is_empty() {
            st.memtable_wal_from = None;
        }
    }

    /// Waits for every group in flight and settles it.
    async fn settle_all(&mut self) {
        while !self.in_flight.is_empty() {
            let durable = oldest_durable(&mut self.in_flight).await;
            self.settle(durable);
        }
    }

    /// A full memtable goes to a segment, after the groups in flight join it.
    async fn compact_full(&mut self) {
        self.settle_all().await;
        if let Err(e) = self.flush(false).await {
            tracing::error!(shard = %self.shard.id, error = %e, "compaction failed; points stay in the WAL");
        }
    }

    /// Starts merging the segments into one in the background (the next delete or close
    /// waits for it), unless a flush or a merge runs or the shard is no longer idle.
    async fn merge_idle(&mut self) {
        if self.compacting.as_ref().is_some_and(|c| !c.is_finished())
            || self.merging.as_ref().is_some_and(|m| !m.is_finished())
        {
            return;
        }
        if let Some(done) = self.compacting.take()
            && let Err(e) = self.await_compaction(done).await
        {
            tracing::error!(shard = %self.shard.id, error = %e, "compaction failed; points stay in the WAL");
        }
        // The caller found the shard idle: only what changed since is checked again.
        if !self.in_flight.is_empty() || !self.shard.needs_merge(tokio::time::Instant::now(), std::time::Duration::ZERO)
        {
            return;
        }
        self.start_merge(None);
    }

    /// Starts merging a size tier's segments (see [`segments_to_merge`]) when one is full and
    /// no merge runs.
    fn start_tier_merge(&mut self) {
        if self.merging.as_ref().is_some_and(|m| !m.is_finished()) {
            return;
        }
        let chosen = {
            let st = self.shard.state.read().expect("shard lock");
            let points: Vec<u64> = st.segments.iter().map(|s| s.points()).collect();
            segments_to_merge(&points, self.cfg.segments_max, self.cfg.memtable_points_max as u64)
                .into_iter()
                .map(|i| st.segments[i].seq)
                .collect::<Vec<u64>>()
        };
        if !chosen.is_empty() {
            self.start_merge(Some(chosen));
        }
    }

    /// Merges the segments numbered in `only` (all when `None`) in the background. A merge
    /// that fails (a full disk) leaves the segments as they were: it is only logged, so that
    /// the next flush or delete does not fail with its error.
    fn start_merge(&mut self, only: Option<Vec<u64>>) {
        let (shard, seg_seq) = (self.shard.clone(), self.take_seq());
        self.merging = Some(tokio::spawn(async move {
            if let Err(e) = rewrite(&shard, seg_seq, None, only.as_deref()).await {
                tracing::warn!(shard = %shard.id, error = %e, "merging segments failed; they stay");
            }
        }));
    }

    /// Waits for a memtable's compaction. One that failed put its points back into the
    /// memtable (they are still in the WAL): the budget is told.
    async fn await_compaction(
        &mut self,
        running: tokio::task::JoinHandle<Result<(), StorageError>>,
    ) -> Result<(), StorageError> {
        let outcome = running.await.map_err(|e| StorageError::Io(std::io::Error::other(e))).and_then(|r| r);
        if outcome.is_err() {
            self.budget.tell(self.shard.memtable_points() as usize);
        }
        outcome
    }

    /// Waits for the merge running, if any.
    async fn finish_merge(&mut self) {
        if let Some(running) = self.merging.take() {
            let _ = running.await;
        }
    }

    /// Waits for the merge running and for those of the size tiers it fills in turn (a few
    /// rounds at most: a merge that fails leaves its tier full).
    async fn finish_merges(&mut self) {
        for _ in 0..MERGE_ROUNDS_MAX {
            self.finish_merge().await;
            self.start_tier_merge();
            if self.merging.is_none() {
                return;
            }
        }
        self.finish_merge().await;
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Moves the memtable into a new segment. With `wait` false (the ingest path) the segment is
    /// written in the background while appends go on into a fresh memtable and WAL; one flush
    /// runs at a time, and a memtable twice over its limit waits for it (backpressure). A size
    /// tier that a flush filled is merged in the background beside the next flushes. With
    /// `wait` true (flush, delete, shutdown) it returns once all is on disk and merged.
    async fn flush(&mut self, wait: bool) -> Result<(), StorageError> {
        if let Some(running) = self.compacting.take() {
            let memtable_len = self.shard.state.read().expect("shard lock").memtable.batch.len();
            if !wait && !running.is_finished() && memtable_len < 2 * self.cfg.memtable_points_max {
                self.compacting = Some(running);
                return Ok(());
            }
            self.await_compaction(running).await?;
        }
        // The flush just done may have filled a size tier.
        self.start_tier_merge();
        // Flushes do not wait for merges, but a shard whose merges fall behind (more segments
        // than twice a tier's worth) stops adding segments until the running one is done.
        let segments = self.shard.state.read().expect("shard lock").segments.len();
        if segments > 2 * (self.cfg.segments_max + 1) {
            self.finish_merge().await;
            self.start_tier_merge();
        }
        let frozen = {
            let mut st = self.shard.state_mut();
            if st.memtable.batch.is_empty() {
                // No record of a failed append keeps the WAL (see `fail_in_flight`).
                st.memtable_wal_from = None;
                None
            } else {
                st.memtable_rows_expected = st.memtable.batch.len().min(2 * self.cfg.memtable_points_max);
                let frozen = Arc::new(std::mem::take(&mut st.memtable).finish());
                st.memtable_since = None;
                st.frozen = Some(frozen.clone());
                st.frozen_wal_from = st.memtable_wal_from.take();
                Some((frozen, st.memtable_lsn))
            }
        };
        self.budget.tell(0);
        let Some((frozen, flushed_lsn)) = frozen else {
            if wait {
                self.finish_merges().await;
            }
            return Ok(());
        };
        // The memtable's index now describes the frozen rows.
        let index = std::mem::take(&mut self.index);
        self.frozen_index = if index.rows == frozen.len() { index } else { MemtableIndex::stale() };
        let seg_seq = self.take_seq();
        let job = Compaction { shard: self.shard.clone(), frozen, seg_seq, flushed_lsn, metrics: self.metrics.clone() };
        let running = tokio::spawn(job.run());
        if wait {
            self.await_compaction(running).await?;
            self.finish_merges().await;
        } else {
            self.compacting = Some(running);
        }
        Ok(())
    }

    /// Drops the rows of a batch that a held tombstone removes (matched by its rule, written
    /// at or before it): a merged copy from before the delete, or a replica write that was
    /// still on its way when the delete came. A merge also forgets tombstones older than the
    /// grace (they can no longer meet such a copy).
    fn apply_tombstones(&mut self, mut batch: RowBatch, merge: Option<MergeTimes>) -> RowBatch {
        if let Some(MergeTimes { now_ms }) = merge {
            self.expire_tombstones(now_ms);
        }
        for (_, keep) in &self.tombstones {
            let mask = keep(&batch);
            if mask.iter().any(|k| !k) {
                let rows: Vec<usize> = (0..batch.len()).filter(|&r| mask[r]).collect();
                batch = batch.select(&rows);
            }
        }
        batch
    }

    /// Forgets tombstones older than the grace at `now_ms`.
    fn expire_tombstones(&mut self, now_ms: i64) {
        let before = self.tombstones.len();
        self.tombstones.retain(|(t, _)| now_ms - t.at_ms <= self.cfg.tombstone_grace_ms);
        if self.tombstones.len() != before {
            let kept: Vec<Tombstone> = self.tombstones.iter().map(|(t, _)| t.clone()).collect();
            if let Err(e) = write_tombstones(&self.shard.dir, &kept) {
                tracing::warn!(shard = %self.shard.id, error = %e, "cannot rewrite the tombstones");
            }
        }
    }

    /// Applies a delete. A tombstone this shard already holds (the same delete, again or
    /// from another replica) changes nothing: its points are gone already. With a tombstone,
    /// only the points written at or before it go.
    async fn delete(&mut self, keep: Option<KeepRow>, tombstone: Option<Tombstone>) -> Result<u64, StorageError> {
        if let Some(t) = &tombstone
            && self.tombstones.iter().any(|(held, _)| held == t)
        {
            // A retry of a delete whose rows could not be removed (a full disk) removes them
            // now, or fails again: it is not acknowledged while its points are still here.
            return if self.unapplied.contains(t) { self.apply_unapplied().await } else { Ok(0) };
        }
        let keep = match (keep, &tombstone) {
            (Some(keep), Some(t)) => Some(keep_written_after(keep, t.at_ms)),
            (keep, _) => keep,
        };
        if let Some(t) = &tombstone {
            let mut all: Vec<Tombstone> = self.tombstones.iter().map(|(t, _)| t.clone()).collect();
            all.push(t.clone());
            let dir = self.shard.dir.clone();
            blocking(move || write_tombstones(&dir, &all)).await?;
            let rule = keep_written_after((self.rule)(&t.rule), t.at_ms);
            self.tombstones.push((t.clone(), rule));
        }
        let Some(keep) = keep else { return Ok(0) };
        let removed = self.remove_rows(keep).await;
        if let (Err(_), Some(t)) = (&removed, tombstone) {
            self.unapplied.push(t);
        }
        removed
    }

    /// Flushes the memtable and rewrites the segments without the rows `keep` refuses.
    async fn remove_rows(&mut self, keep: KeepRow) -> Result<u64, StorageError> {
        self.flush(true).await?;
        let seg_seq = self.take_seq();
        rewrite(&self.shard, seg_seq, Some(keep), None).await
    }

    /// Applies again the deletes of tombstones recorded while their delete failed; how many
    /// rows that removed.
    async fn apply_unapplied(&mut self) -> Result<u64, StorageError> {
        if self.unapplied.is_empty() {
            return Ok(0);
        }
        let rules: Vec<KeepRow> =
            self.unapplied.iter().map(|t| keep_written_after((self.rule)(&t.rule), t.at_ms)).collect();
        let keep: KeepRow = Box::new(move |batch: &RowBatch| {
            let mut keep = vec![true; batch.len()];
            for rule in &rules {
                for (k, r) in keep.iter_mut().zip(rule(batch)) {
                    *k &= r;
                }
            }
            keep
        });
        let removed = self.remove_rows(keep).await?;
        self.unapplied.clear();
        Ok(removed)
    }
}

/// Per segment, per block: whether a merge may copy the block as it is (see [`rewrite`]).
/// Which blocks of `segments` a merge copies as they are: those of one series whose window no
/// block of another segment shares for that series. The others are decoded and encoded anew
/// together, so a series' window ends up in one run of blocks (blocks of the first format,
/// which mix series, always are).
fn blocks_to_copy(segments: &[Arc<Segment>]) -> Vec<Vec<bool>> {
    // Each segment's series numbered across all of them.
    let mut numbers: BTreeMap<SeriesKey, usize> = BTreeMap::new();
    let global: Vec<Vec<usize>> = segments
        .iter()
        .map(|seg| {
            (0..seg.series_count())
                .map(|id| {
                    let next = numbers.len();
                    *numbers.entry(series_key(seg.series(id as u32).expect("in range"))).or_insert(next)
                })
                .collect()
        })
        .collect();
    let series_of = |s: usize, meta: &BlockMeta| global[s].get(meta.series as usize).copied();
    // (series, window) → the one segment holding it, or `None` once a second one does.
    let mut holder: HashMap<(usize, i64), Option<usize>> = HashMap::new();
    for (s, seg) in segments.iter().enumerate() {
        for meta in &seg.blocks {
            if let Some(series) = series_of(s, meta) {
                holder
                    .entry((series, window_of(meta.min_ts)))
                    .and_modify(|h| *h = h.filter(|&one| one == s))
                    .or_insert(Some(s));
            }
        }
    }
    segments
        .iter()
        .enumerate()
        .map(|(s, seg)| {
            seg.blocks
                .iter()
                .map(|meta| {
                    series_of(s, meta).is_some_and(|series| holder[&(series, window_of(meta.min_ts))] == Some(s))
                })
                .collect()
        })
        .collect()
}

/// Puts a frozen memtable back after a failed compaction; its points are still in the WAL.
fn unfreeze(shard: &Shard) {
    let mut st = shard.state_mut();
    if let Some(frozen) = st.frozen.take() {
        st.memtable_wal_from = st.frozen_wal_from.take().into_iter().chain(st.memtable_wal_from).min();
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
    /// Where the frozen memtable's last record ends in the WAL.
    flushed_lsn: u64,
    metrics: Arc<Metrics>,
}

/// Which of a shard's segments (given their points) a flush merges into one: a size tier's,
/// once it holds more than `segments_max` of them (tier k: fewer than `base` × fanout^(k+1)
/// points, where `base` is a full memtable and the fanout is `segments_max` + 1), so that a
/// point is written again about log_fanout(shard / memtable) times. Merging every segment
/// whenever there were more than `segments_max` rewrote a shard's hour of points every few
/// flushes, over and over as the hour filled. Past 4 × fanout segments (tiers out of order
/// after deletes and idle merges), all of them.
fn segments_to_merge(points: &[u64], segments_max: usize, base: u64) -> Vec<usize> {
    let fanout = segments_max.max(1) + 1;
    if points.len() > 4 * fanout {
        return (0..points.len()).collect();
    }
    let tier = |p: u64| {
        let (mut tier, mut bound) = (0u32, base.max(1).saturating_mul(fanout as u64));
        while p >= bound && bound < u64::MAX {
            tier += 1;
            bound = bound.saturating_mul(fanout as u64);
        }
        tier
    };
    let tiers: Vec<u32> = points.iter().map(|&p| tier(p)).collect();
    let mut by_tier: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &t) in tiers.iter().enumerate() {
        by_tier.entry(t).or_default().push(i);
    }
    by_tier.into_values().find(|segments| segments.len() >= fanout).unwrap_or_default()
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
        let newest = self.shard.state.read().expect("shard lock").segments.last().cloned();
        let (shard, frozen, seg_seq, flushed_lsn) =
            (self.shard.clone(), self.frozen.clone(), self.seg_seq, self.flushed_lsn);
        background(move || {
            let path = segment_path(&shard.dir, seg_seq);
            let seg = write_segment(&path, seg_seq, &frozen, newest.as_deref())?;
            fsync_dir(&shard.dir)?;
            commit_segments(
                &shard,
                Some(flushed_lsn),
                |segments| segments.push(Arc::new(seg)),
                |st| {
                    st.frozen = None;
                    st.frozen_wal_from = None;
                },
            )
        })
        .await?;
        self.metrics.segments_written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Changes a shard's list of segments: `change` edits a copy of the list as it is now, the
/// manifest naming the result (and `flushed_lsn`, or the shard's) is written, and the state
/// takes both, with `update`, in one step that scans see whole. A flush and a merge run side by
/// side, so each commits under the shard's manifest lock and edits the list as the other left
/// it, not as it was when it began.
fn commit_segments(
    shard: &Shard,
    flushed_lsn: Option<u64>,
    change: impl FnOnce(&mut Vec<Arc<Segment>>),
    update: impl FnOnce(&mut ShardState),
) -> Result<(), StorageError> {
    // The lock guards no data: a commit that panicked left nothing half-changed in memory.
    let _one_at_a_time = shard.manifest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mut segments, current_lsn) = {
        let st = shard.state.read().expect("shard lock");
        (st.segments.clone(), st.flushed_lsn)
    };
    change(&mut segments);
    let flushed_lsn = flushed_lsn.unwrap_or(current_lsn);
    Manifest { segments: segments.iter().map(|s| s.seq).collect(), flushed_lsn, format: MANIFEST_FORMAT }
        .write(&shard.dir)?;
    let mut st = shard.state_mut();
    st.segments = segments;
    st.flushed_lsn = flushed_lsn;
    update(&mut st);
    Ok(())
}

/// Rounds of merges a flush that waits (flush, delete, shutdown) sees through.
const MERGE_ROUNDS_MAX: usize = 4;

/// A block a merge decodes, and whether it may still be copied (when no row of it is dropped).
type BlockToMerge<'a> = (&'a Segment, &'a BlockMeta, bool);

/// Points a merge decodes before it encodes them (whole series' windows, so a little more).
/// Blocks come out the same whatever the bound (a series' window is never split across
/// calls); a smaller one keeps a merge's peak memory down (the batch grows by doubling: 256 Ki
/// rows held up to 19 MB while the merged segments' footers were also in memory).
const MERGE_ROWS_MAX: usize = 65_536;

/// Replaces the segments of `shard` numbered in `only` (all when `None`) by one (`seg_seq`, in
/// the place of the first of them), keeping the rows `keep` accepts (all when `None`). Returns
/// how many rows were dropped. Callers make sure no other compaction of the shard runs
/// meanwhile. (Points are a set: which segment holds one, and in what order, never matters.)
///
/// A block that overlaps no block of another segment in time, is at least half full and loses
/// no row is copied as it is: points mostly arrive in time order, so merging a shard's segments
/// is mostly a file copy. The other blocks' rows are sorted together and encoded anew, so
/// out-of-order points end up in blocks with narrow time ranges.
async fn rewrite(
    shard: &Arc<Shard>,
    seg_seq: u64,
    keep: Option<KeepRow>,
    only: Option<&[u64]>,
) -> Result<u64, StorageError> {
    let all: Vec<Arc<Segment>> = shard.state.read().expect("shard lock").segments.clone();
    let chosen = |seg: &Arc<Segment>| only.is_none_or(|seqs| seqs.contains(&seg.seq));
    let old: Vec<Arc<Segment>> = all.iter().filter(|s| chosen(s)).cloned().collect();
    if old.is_empty() {
        return Ok(0);
    }
    let (shard2, dir) = (shard.clone(), shard.dir.clone());
    let old2 = old.clone();
    let (replaced, dropped) = background(move || {
        let copyable = blocks_to_copy(&old2);
        let path = segment_path(&dir, seg_seq);
        let mut writer = SegmentWriter::create(&path)?;
        // The blocks to decode, by window and series: encoded anew a few series at a time, so
        // a merge holds a bounded number of points in memory, not every point it re-encodes
        // (a series' window is always encoded whole, in one run of blocks).
        let mut by_window: BTreeMap<(i64, SeriesKey), Vec<BlockToMerge>> = BTreeMap::new();
        for (seg, flags) in old2.iter().zip(&copyable) {
            for (meta, &copy) in seg.blocks.iter().zip(flags) {
                if copy && keep.is_none() {
                    writer.copy_block(seg, meta)?;
                } else {
                    let series = seg.series(meta.series).map(series_key).unwrap_or_default();
                    by_window.entry((window_of(meta.min_ts), series)).or_default().push((seg, meta, copy));
                }
            }
        }
        let mut dropped = 0u64;
        let mut rest = RowBatchBuilder::default();
        for blocks in by_window.into_values() {
            if rest.batch.len() >= MERGE_ROWS_MAX {
                writer.add_rows(&std::mem::take(&mut rest).finish())?;
            }
            for (seg, meta, copy) in blocks {
                let batch = seg.read_block(meta, None)?;
                let mask = keep.as_ref().map(|k| k(&batch));
                let removed = mask.as_ref().map_or(0, |m| m.iter().filter(|keep| !**keep).count() as u64);
                dropped += removed;
                if copy && removed == 0 {
                    writer.copy_block(seg, meta)?;
                } else {
                    rest.extend_from(&batch, mask.as_deref());
                }
            }
        }
        writer.add_rows(&rest.finish())?;
        if keep.is_some() && dropped == 0 {
            writer.abandon();
            return Ok((false, 0));
        }
        let replacement = if writer.is_empty() {
            writer.abandon();
            None
        } else {
            let seg = writer.finish(seg_seq, all.last().map(|s| &**s))?;
            fsync_dir(&dir)?;
            Some(Arc::new(seg))
        };
        // The new segment goes where the first merged one was; a flush may have added
        // segments since the merge began.
        let merged: Vec<u64> = old2.iter().map(|s| s.seq).collect();
        commit_segments(
            &shard2,
            None,
            |segments| {
                let place = segments.iter().position(|s| merged.contains(&s.seq)).unwrap_or(segments.len());
                segments.retain(|s| !merged.contains(&s.seq));
                segments.splice(place.min(segments.len())..place.min(segments.len()), replacement);
            },
            |_| {},
        )?;
        Ok((true, dropped))
    })
    .await?;
    if replaced {
        for seg in old {
            seg.retire();
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MetricKey, Num, Point};

    fn rows(range: std::ops::Range<i64>, value: i64) -> RowBatch {
        let points: Vec<Point> = range
            .map(|t| Point {
                timestamp: t,
                value: Num::Int(value),
                dimensions: Default::default(),
                tags: Default::default(),
            })
            .collect();
        RowBatch::from_points(&points).unwrap()
    }

    /// A shard whose memtable holds every test's points until flushed; two segments at most.
    async fn open_shard(dir: &Path) -> Arc<Shard> {
        open_shard_with(dir, 1_000_000).await
    }

    async fn open_shard_with(dir: &Path, memtable_points_max: usize) -> Arc<Shard> {
        let cfg = StorageConfig {
            shard_interval_ms: 1_000_000,
            memtable_points_max,
            memtable_budget_points: 4_000_000,
            flush_interval: std::time::Duration::from_secs(3600),
            segments_max: 2,
            tombstone_grace_ms: 1000,
            wal_file_bytes: super::super::wal::WAL_FILE_BYTES,
            wal_salvage: false,
        };
        let id = ShardId { metric: MetricKey::new("d", "n", "m").unwrap(), start: 0 };
        let keep_all: TombstoneRule = Arc::new(|_| Box::new(|b: &RowBatch| vec![true; b.len()]));
        let metrics = Arc::new(Metrics::default());
        let wal = NodeWal::new(&dir.join("wal"), cfg.wal_file_bytes, metrics.clone());
        wal.recover(0, false, |_, _| Ok::<(), std::io::Error>(())).unwrap();
        let budget = MemtableBudget::new(cfg.memtable_budget_points, metrics.clone());
        Shard::open(dir, id, cfg, wal, metrics, keep_all, budget).await.unwrap()
    }

    /// Points are a set however the memtable's index is cut: a write in time order, a write
    /// spanning many earlier groups (their indexes get merged) and repeats of both.
    #[tokio::test]
    async fn repeated_points_are_found_in_every_group_of_the_memtable() {
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard(dir.path()).await;
        for g in 0..10 {
            assert_eq!(shard.append(rows(g * 100..g * 100 + 100, 1)).await.unwrap(), 100);
        }
        // Every tenth point of every group again, plus 10 new ones (value 2), in one batch that
        // spans all ten groups' time ranges.
        let mut spanning = rows(0..0, 1);
        for t in (0..1000).step_by(10) {
            spanning.timestamps.extend([t, t]);
            spanning.values.extend([Num::Int(1), Num::Int(if t % 100 == 0 { 2 } else { 1 })]);
        }
        assert_eq!(shard.append(spanning.clone()).await.unwrap(), 10);
        assert_eq!(shard.append(spanning).await.unwrap(), 0);
        assert_eq!(shard.append(rows(0..1000, 1)).await.unwrap(), 0);
        assert_eq!(shard.append(rows(995..1005, 1)).await.unwrap(), 5);
        assert_eq!(shard.points(), 1015);
        // The same after a flush: the points now sit in a segment.
        shard.flush().await.unwrap();
        assert_eq!(shard.append(rows(990..1010, 1)).await.unwrap(), 5);
        assert_eq!(shard.points(), 1020);
    }

    /// Appends that overlap arrive while earlier groups are on their way to disk: each point
    /// is stored once and counted as new by exactly one append, whichever group it meets.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_racing_groups_in_flight_store_each_point_once() {
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard(dir.path()).await;
        let mut tasks = Vec::new();
        for task in 0..8i64 {
            let shard = shard.clone();
            tasks.push(tokio::spawn(async move {
                let mut new = 0;
                for round in 0..50i64 {
                    // Windows of 100 that overlap the next task's and the next round's.
                    let start = round * 40 + task * 20;
                    new += shard.append(rows(start..start + 100, 1)).await.unwrap();
                }
                new
            }));
        }
        let mut new = 0;
        for t in tasks {
            new += t.await.unwrap();
        }
        let distinct = (49 * 40 + 7 * 20 + 100) as u64;
        assert_eq!(new, distinct, "each point counted as new once");
        assert_eq!(shard.points(), distinct);
        shard.flush().await.unwrap();
        assert_eq!(shard.points(), distinct);
    }

    /// A merge copies the blocks of windows that no other segment shares for their series and
    /// re-encodes the rest; either way every point survives it, and each window of a series
    /// ends up in one block.
    /// An idle shard's segments are merged into one once the newer ones are worth it: the
    /// points stay, each series' window ends in one block, and a shard written to again is not
    /// merged while its memtable holds points.
    #[tokio::test]
    async fn an_idle_shard_merges_its_segments_into_one() {
        let mergeable = |shard: &Shard| shard.needs_merge(tokio::time::Instant::now(), std::time::Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard(dir.path()).await;
        // Values that do not compress to nothing, so bytes follow points.
        let varied = |range: std::ops::Range<i64>| {
            let mut batch = rows(range, 0);
            batch.values = (batch.timestamps.iter())
                .map(|t| {
                    Num::Int(
                        (t.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407) >> 33)
                            % 100_000,
                    )
                })
                .collect();
            batch
        };
        shard.append(varied(0..4000)).await.unwrap();
        shard.flush().await.unwrap();
        assert!(!mergeable(&shard), "one segment");
        shard.append(varied(4000..4100)).await.unwrap();
        shard.flush().await.unwrap();
        assert!(!mergeable(&shard), "100 points after 4000 are not worth a rewrite");
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard(dir.path()).await;
        shard.append(varied(0..4000)).await.unwrap();
        shard.flush().await.unwrap();
        shard.append(varied(4000..5000)).await.unwrap();
        assert!(!mergeable(&shard), "points in the memtable: not idle");
        shard.flush().await.unwrap();
        assert!(mergeable(&shard));
        let an_hour = std::time::Duration::from_secs(3600);
        assert!(!shard.needs_merge(tokio::time::Instant::now(), an_hour), "written within the hour: not idle");
        let before = shard.version();
        shard.merge_segments();
        shard.flush().await.unwrap(); // waits for the merge, as every flush waits for a compaction
        let snapshot = shard.snapshot();
        assert_eq!(snapshot.segments.len(), 1);
        assert_eq!(snapshot.segments[0].blocks.len(), 1, "one series, one window: one block");
        assert_eq!(shard.points(), 5000);
        assert_ne!(shard.version(), before, "a merge is a new state for cached answers");
        assert!(!mergeable(&shard));
    }

    #[test]
    fn held_ranges_merge_when_they_overlap_and_the_closest_two_past_the_limit() {
        let mut held = Held::default();
        for range in [(10, 20), (40, 50), (15, 30), (100, 110), (55, 70)] {
            held.add(range);
        }
        assert_eq!(&held.ranges[..held.len as usize], &[(10, 30), (40, 50), (55, 70), (100, 110)]);
        held.add((200, 210));
        assert_eq!(
            &held.ranges[..held.len as usize],
            &[(10, 30), (40, 70), (100, 110), (200, 210)],
            "40-50 and 55-70 were closest"
        );
        assert!(held.holds(52) && held.holds(30) && !held.holds(31) && !held.holds(211));
    }

    #[tokio::test]
    async fn rows_later_than_their_series_need_no_index_and_repeats_are_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard(dir.path()).await;
        assert_eq!(shard.append(rows(0..100, 1)).await.unwrap(), 100);
        assert_eq!(shard.append(rows(100..200, 1)).await.unwrap(), 100);
        // One batch repeating its own row, and the same time with another value (a new point).
        let mut batch = RowBatchBuilder::default();
        for part in [rows(200..203, 1), rows(201..202, 1), rows(201..202, 2)] {
            batch.extend_from(&part, None);
        }
        assert_eq!(shard.append(batch.finish()).await.unwrap(), 4);
        assert_eq!(shard.append(rows(50..150, 1)).await.unwrap(), 0, "repeats in the memtable, never indexed");
        shard.flush().await.unwrap();
        assert_eq!(shard.append(rows(190..210, 1)).await.unwrap(), 7, "repeats in a segment");
        assert_eq!(shard.append(rows(205..215, 1)).await.unwrap(), 5);
        // (This harness replays no WAL at reopen.)
        shard.flush().await.unwrap();
        shard.close().await;
        drop(shard);
        let shard = open_shard(dir.path()).await;
        assert_eq!(shard.append(rows(0..10, 1)).await.unwrap(), 0, "the frontier is built from the segments");
        assert_eq!(shard.append(rows(214..220, 1)).await.unwrap(), 5);
        assert_eq!(shard.points(), 221);
    }

    #[test]
    fn a_flush_merges_one_size_tier_once_it_holds_more_than_the_limit() {
        // Limit 2, so tiers of 3: tier 0 below 300 points, tier 1 below 900, ...
        let merge = |points: &[u64]| segments_to_merge(points, 2, 100);
        assert!(merge(&[100, 100]).is_empty());
        assert_eq!(merge(&[100, 100, 100]), vec![0, 1, 2]);
        assert_eq!(merge(&[300, 100, 250, 100]), vec![1, 2, 3], "the large one stays as it is");
        assert!(merge(&[300, 300, 100, 100]).is_empty());
        assert_eq!(merge(&[300, 900, 300, 300, 100]), vec![0, 2, 3], "tier 1 wherever its segments are");
        assert_eq!(merge(&[1_000_000; 13]).len(), 13, "past four tiers' worth, all of them");
        assert!(merge(&[]).is_empty());
    }

    #[tokio::test]
    async fn a_tier_merge_leaves_larger_segments_alone_and_the_manifest_follows() {
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard_with(dir.path(), 100).await;
        let seqs = |shard: &Shard| shard.snapshot().segments.iter().map(|s| s.seq).collect::<Vec<u64>>();
        // 300 points are tier 1 (memtable 100, limit 2: tiers of 3).
        shard.append(rows(0..300, 1)).await.unwrap();
        shard.flush().await.unwrap();
        let large = seqs(&shard);
        assert_eq!(large.len(), 1);
        for part in 0..3 {
            shard.append(rows(300 + part * 50..350 + part * 50, 2)).await.unwrap();
            shard.flush().await.unwrap();
        }
        let now = seqs(&shard);
        assert_eq!(now.len(), 2, "three small segments merged into one: {now:?}");
        assert_eq!(now[0], large[0], "the large segment is not rewritten");
        assert_eq!(shard.points(), 450);
        let (manifest, _) = Manifest::read(&shard.dir).unwrap().unwrap();
        assert_eq!(manifest.segments, now);
        let mut seen: Vec<i64> = Vec::new();
        shard.scan(i64::MIN, i64::MAX, None, &mut |b| seen.extend(&b.timestamps)).unwrap();
        seen.sort_unstable();
        assert_eq!(seen, (0..450).collect::<Vec<i64>>());
    }

    /// Flushes go on while a merge runs (each commits the list of segments as the other left
    /// it): every point stays, the manifest names exactly the segments held, and a restart
    /// finds them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushes_go_on_beside_merges_and_the_manifest_names_every_segment() {
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard_with(dir.path(), 100).await;
        let seqs = |shard: &Shard| shard.snapshot().segments.iter().map(|s| s.seq).collect::<Vec<u64>>();
        // A flush at every other append, a merge of a tier at every few flushes.
        for part in 0..120 {
            shard.append(rows(part * 50..part * 50 + 50, part)).await.unwrap();
        }
        shard.flush().await.unwrap();
        let held = seqs(&shard);
        assert!(held.len() <= 2 * 3, "tiers were merged: {held:?}");
        let (manifest, _) = Manifest::read(&shard.dir).unwrap().unwrap();
        assert_eq!(manifest.segments, held);
        let mut files: Vec<u64> = std::fs::read_dir(&shard.dir)
            .unwrap()
            .filter_map(|e| {
                e.unwrap().file_name().to_string_lossy().strip_prefix("seg-")?.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        files.sort_unstable();
        let mut sorted = held.clone();
        sorted.sort_unstable();
        assert_eq!(files, sorted, "no segment file is left behind or missing");
        shard.close().await;
        let reopened = open_shard_with(dir.path(), 100).await;
        let mut seen: Vec<i64> = Vec::new();
        reopened.scan(i64::MIN, i64::MAX, None, &mut |b| seen.extend(&b.timestamps)).unwrap();
        seen.sort_unstable();
        assert_eq!(seen, (0..6000).collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn merge_copies_unshared_windows_and_keeps_every_point() {
        let dir = tempfile::tempdir().unwrap();
        let shard = open_shard(dir.path()).await;
        let seconds = |range: std::ops::Range<i64>, value| {
            let mut batch = rows(range, value);
            batch.timestamps.iter_mut().for_each(|t| *t *= 1000);
            batch
        };
        // Three segments, one point a second: the first two share window 11 (39_600 s to
        // 43_200 s), the last two window 22 (79_200 s to 82_800 s), where they also overlap.
        let parts = [(0..40_000, 1), (40_000..80_000, 2), (79_990..100_000, 3)];
        for (range, value) in &parts[..2] {
            shard.append(seconds(range.clone(), *value)).await.unwrap();
            shard.flush().await.unwrap();
        }
        let segments = shard.state.read().unwrap().segments.clone();
        assert_eq!(segments.len(), 2);
        let copy = blocks_to_copy(&segments);
        for (seg, flags) in segments.iter().zip(&copy) {
            for (meta, &copied) in seg.blocks.iter().zip(flags) {
                assert_eq!(copied, window_of(meta.min_ts) != 11, "block {}..{}", meta.min_ts, meta.max_ts);
            }
        }
        let (range, value) = &parts[2];
        shard.append(seconds(range.clone(), *value)).await.unwrap();
        shard.flush().await.unwrap();
        let segments = shard.state.read().unwrap().segments.clone();
        assert_eq!(segments.len(), 1, "three segments over a limit of two merge into one");
        let merged = &segments[0];
        assert_eq!(merged.points(), 100_010);
        let windows: Vec<i64> = merged.blocks.iter().map(|b| window_of(b.min_ts)).collect();
        assert_eq!(windows, (0..=27).collect::<Vec<_>>(), "one block per window");
        let mut seen: Vec<(i64, i64)> = Vec::new();
        shard
            .scan(i64::MIN, i64::MAX, None, &mut |b| {
                seen.extend(b.timestamps.iter().zip(b.values.iter()).map(|(&t, v)| (t / 1000, v.as_f64() as i64)))
            })
            .unwrap();
        seen.sort_unstable();
        let mut expected: Vec<(i64, i64)> =
            parts.iter().flat_map(|(range, value)| range.clone().map(move |t| (t, *value))).collect();
        expected.sort_unstable();
        assert_eq!(seen, expected);
    }
}
