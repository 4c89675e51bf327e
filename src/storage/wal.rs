//! The node's write-ahead log, shared by all its shards. A record is
//! `[len: u32 LE][crc32 of payload: u32 LE][payload]`, the payload a postcard-encoded
//! `(ShardId, RowBatch)`: one ingest request's points for one shard. One writer task takes the
//! records every shard has waiting, writes them with one `write` and makes them durable with one
//! `fdatasync` (group commit across shards): a request that touches several shards pays one
//! fsync, not one per shard.
//!
//! A record's position is its log sequence number (LSN): the byte offset of its end in the
//! log, counted across files. `wal-<start>.log` holds the log from byte `start`; past
//! [`WAL_FILE_BYTES`] a new file begins. A shard's MANIFEST names the LSN up to which its
//! records are in segments; replay skips those, and a file is deleted once every shard's
//! records in it are in segments (see `Storage::collect_wal`).
//!
//! Replay stops at the first record that is short or fails its checksum. In the last file that
//! is a torn tail from a crash, never an acknowledged write, and the file is cut there. An
//! earlier file was complete and durable before the next one began, so unreadable bytes there
//! are corruption: startup stops, naming the file and offset, unless the operator asks to
//! salvage (`shoal start --salvage-wal`), which cuts that file there too.
//!
//! A WAL file is zero-filled ahead of its appends, so that an append overwrites blocks the file
//! already has and its `fdatasync` writes only those: an append that grew the file would also
//! make the filesystem write the inode (and block maps) on every commit. A zero length field
//! reads as the end of the log, so the zeros are never taken for records or for a torn tail.

use crate::metrics::Metrics;
use crate::model::batch::RowBatch;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Largest record accepted on replay: guards against a corrupt length field.
pub const RECORD_BYTES_MAX: usize = 256 * 1024 * 1024;
const HEADER_BYTES: usize = 8;

pub fn wal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016}.log"))
}

/// Sequence numbers of the WAL files in `dir`, ascending.
pub fn list_wal_seqs(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name.strip_prefix("wal-").and_then(|s| s.strip_suffix(".log")).and_then(|s| s.parse().ok()) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Appends `value` to `out` as one framed record, encoded in place (no copy of the payload).
pub fn encode_record<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    *out = postcard::to_extend(value, std::mem::take(out)).expect("records always encode");
    let header = header(&out[start + HEADER_BYTES..]);
    out[start..start + HEADER_BYTES].copy_from_slice(&header);
}

/// `[len u32 LE][crc32 u32 LE][payload]`: the record framing shared by the WAL and hint files.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&header(payload));
    out.extend_from_slice(payload);
}

fn header(payload: &[u8]) -> [u8; HEADER_BYTES] {
    let mut header = [0; HEADER_BYTES];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    header
}

/// Zeros written ahead of a WAL's appends: the first extension, and the largest.
const ZEROS_AHEAD_MIN: u64 = 64 * 1024;
const ZEROS_AHEAD_MAX: u64 = 4 * 1024 * 1024;

/// An append-only file of framed records: a file of the node's WAL, or the hints kept for one
/// node.
/// An append is durable when it returns Ok. One that fails (a full disk, a failed fsync) is
/// cut off again, so the next record never lands behind a torn one, where replay, which stops
/// at the first bad record, would not find it.
pub struct AppendLog {
    file: File,
    path: PathBuf,
    durable_len: u64,
    /// The file's length: `durable_len` plus any zeros written ahead.
    file_len: u64,
    /// Whether appends zero-fill the file ahead of themselves (a WAL, see the module comment).
    zero_fill: bool,
    /// A failed append left bytes that could not be cut off yet.
    needs_cut: bool,
}

impl AppendLog {
    /// Opens (or creates) the log at `path`, cutting off bytes past the last whole record.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = Self::open_file(path)?;
        let mut durable_len = 0;
        let mut reader = std::io::BufReader::new(&file);
        while let Some(payload) = read_record(&mut reader)? {
            durable_len += record_len(payload.len());
        }
        Self::with_records(file, path, durable_len, false)
    }

    /// Opens (or creates) a file of the node WAL, whose records, `records_len` bytes, were just
    /// replayed (so they are not read again); appends zero-fill ahead of themselves.
    fn open_wal(path: &Path, records_len: u64) -> std::io::Result<Self> {
        Self::with_records(Self::open_file(path)?, path, records_len, true)
    }

    fn open_file(path: &Path) -> std::io::Result<File> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).read(true).open(path)?;
        if let Some(dir) = path.parent() {
            super::fsync_dir(dir)?;
        }
        Ok(file)
    }

    /// The log over `file`, whose first `durable_len` bytes are whole records; anything after
    /// them is cut off.
    fn with_records(file: File, path: &Path, durable_len: u64, zero_fill: bool) -> std::io::Result<Self> {
        let file_len = file.metadata()?.len();
        let mut log = Self {
            file,
            path: path.to_path_buf(),
            durable_len,
            file_len,
            zero_fill,
            needs_cut: durable_len < file_len,
        };
        if log.needs_cut {
            log.cut()?;
        }
        Ok(log)
    }

    /// Appends already-framed records and makes them durable before returning.
    pub fn append_durable(&mut self, records: &[u8]) -> std::io::Result<()> {
        // Nothing to make durable (a writer that only begins a new file): no zeros ahead, no
        // fsync.
        if records.is_empty() && !self.needs_cut {
            return Ok(());
        }
        if self.needs_cut {
            self.cut()?;
        }
        let written = self.write_at_end(records).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.durable_len += records.len() as u64;
                crate::env::log_synced(&self.path, self.durable_len);
                Ok(())
            }
            Err(e) => {
                self.needs_cut = true;
                if let Err(cut) = self.cut() {
                    tracing::warn!(log = %self.path.display(), error = %cut, "cannot cut a failed append yet");
                }
                Err(e)
            }
        }
    }

    /// Bytes of whole, durable records.
    pub fn len(&self) -> u64 {
        self.durable_len
    }

    pub fn is_empty(&self) -> bool {
        self.durable_len == 0
    }

    /// Writes `records` after the durable ones and, for a WAL whose zeros they reach, zeros
    /// ahead of them: as many as the file holds already (so a busy WAL extends itself rarely),
    /// within bounds. The zeros are only an optimization: when they cannot be written (a full
    /// disk), the file ends after the records.
    fn write_at_end(&mut self, records: &[u8]) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.file.seek(SeekFrom::Start(self.durable_len))?;
        crate::env::write_file(&mut self.file, &self.path, records)?;
        let end = self.durable_len + records.len() as u64;
        self.file_len = self.file_len.max(end);
        if !self.zero_fill || end < self.file_len {
            return Ok(());
        }
        let ahead = end.clamp(ZEROS_AHEAD_MIN, ZEROS_AHEAD_MAX);
        static ZEROS: [u8; ZEROS_AHEAD_MIN as usize] = [0; ZEROS_AHEAD_MIN as usize];
        let mut write_zeros = || -> std::io::Result<()> {
            let mut left = ahead as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                crate::env::write_file(&mut self.file, &self.path, &ZEROS[..n])?;
                left -= n;
            }
            Ok(())
        };
        match write_zeros() {
            Ok(()) => self.file_len = end + ahead,
            Err(e) => {
                tracing::debug!(log = %self.path.display(), error = %e, "cannot zero-fill ahead of the WAL");
                self.file.set_len(end)?;
                self.file_len = end;
            }
        }
        Ok(())
    }

    fn cut(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.durable_len)?;
        self.file.sync_data()?;
        self.file_len = self.durable_len;
        self.needs_cut = false;
        Ok(())
    }
}

/// A new WAL file begins once the current one holds this many bytes of records, so that the
/// log can be deleted a file at a time as shards compact.
pub const WAL_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Submissions waiting beyond this many make shard writers wait. Each shard writer has at most
/// a few submissions under way (its groups in flight), so this is rarely reached.
const QUEUE_DEPTH: usize = 1024;
/// Most submissions, and bytes, one group commit takes.
const GROUP_SUBMISSIONS_MAX: usize = 1024;
const GROUP_BYTES_MAX: usize = 16 * 1024 * 1024;

/// One shard writer's records for one group commit, and where to say where they ended.
struct Submission {
    records: Vec<u8>,
    /// Begin a new file first, even below the size bound (see [`NodeWal::remove_before`]).
    rotate: bool,
    done: oneshot::Sender<std::io::Result<u64>>,
}

/// What the writer task and the handles share.
struct Shared {
    dir: PathBuf,
    /// LSN of the end of the durable records.
    end: AtomicU64,
    /// Where each file starts, ascending; the last one is appended to.
    files: Mutex<Vec<u64>>,
    /// A new file begins once the current one holds this many bytes.
    file_bytes: u64,
}

/// The node's write-ahead log (see the module comment). Created with [`NodeWal::new`], which
/// reads nothing; [`NodeWal::recover`] replays the files and starts the writer task, so that
/// shards can be opened (with this handle) before their records are replayed into them.
pub struct NodeWal {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Submission>,
    rx: Mutex<Option<mpsc::Receiver<Submission>>>,
    metrics: Arc<Metrics>,
}

impl NodeWal {
    /// A log in `dir` that starts a new file past `file_bytes` ([`WAL_FILE_BYTES`] but in tests).
    pub fn new(dir: &Path, file_bytes: u64, metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let files = Mutex::new(Vec::new());
        let shared = Shared { dir: dir.to_path_buf(), end: AtomicU64::new(0), files, file_bytes };
        Arc::new(Self { shared: Arc::new(shared), tx, rx: Mutex::new(Some(rx)), metrics })
    }

    /// Replays the log: calls `apply(lsn, payload)` for every valid record in order, cutting
    /// the last file's torn tail off (counted in `shoal_wal_torn_bytes_total`), then starts the
    /// writer task. Unreadable bytes in an earlier file are an error naming the file and offset,
    /// or with `salvage` are cut off too (the records behind them in that file are lost). An
    /// error from `apply` stops the replay and is returned. A log with no file yet begins
    /// at `lsn_floor` (the highest LSN a shard's MANIFEST names), so that its records can never
    /// be taken for ones already in segments.
    pub fn recover<E: From<std::io::Error>>(
        &self,
        lsn_floor: u64,
        salvage: bool,
        mut apply: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let dir = &self.shared.dir;
        std::fs::create_dir_all(dir)?;
        let starts = list_wal_seqs(dir)?;
        let mut last_records_len = 0;
        for (i, &start) in starts.iter().enumerate() {
            let path = wal_path(dir, start);
            let (records_len, torn) = replay_records(&path, |file_end, payload| apply(start + file_end, payload))?;
            if torn > 0 {
                let last = i + 1 == starts.len();
                if !last && !salvage {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "WAL file {} is corrupt at offset {records_len}: {torn} bytes from there do not read as \
                             records, and it is not the last WAL file, so this is not a torn tail from a crash. \
                             Restore the data dir from a backup or another replica, or start once with \
                             `shoal start --salvage-wal` to cut the file at that offset and go on (the records \
                             behind it in that file are lost; repair copies them back from other replicas)",
                            path.display()
                        ),
                    )
                    .into());
                }
                cut_at(&path, records_len)?;
                if last {
                    tracing::warn!(wal = %path.display(), torn_bytes = torn, "dropped a torn WAL tail");
                } else {
                    tracing::error!(wal = %path.display(), offset = records_len, bytes = torn, "salvage: cut a corrupt WAL file");
                }
                self.metrics.wal_torn_bytes.fetch_add(torn, Ordering::Relaxed);
            }
            last_records_len = records_len;
        }
        let start = starts.last().copied().unwrap_or(lsn_floor);
        let log = AppendLog::open_wal(&wal_path(dir, start), last_records_len)?;
        *self.shared.files.lock().expect("wal files lock") = if starts.is_empty() { vec![start] } else { starts };
        self.shared.end.store(start + log.len(), Ordering::SeqCst);
        let rx = self.rx.lock().expect("wal rx lock").take().expect("the WAL is recovered once");
        tokio::spawn(run(self.shared.clone(), log, start, rx, self.metrics.clone()));
        Ok(())
    }

    /// LSN of the end of the durable records: every record appended from now on ends after it.
    pub fn end(&self) -> u64 {
        self.shared.end.load(Ordering::SeqCst)
    }

    /// Makes `records` (framed by [`encode_record`]) durable together with whatever other shards
    /// have waiting; returns the LSN of their end.
    pub async fn append(&self, records: Vec<u8>) -> std::io::Result<u64> {
        self.submit(records).await?.wait().await
    }

    /// Queues `records` behind every earlier submission and returns without waiting for them to
    /// be durable: a shard writer goes on checking its next appends meanwhile.
    pub async fn submit(&self, records: Vec<u8>) -> std::io::Result<Durable> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Submission { records, rotate: false, done }).await.map_err(|_| writer_stopped())?;
        Ok(Durable(rx))
    }

    /// Submissions waiting for the writer task.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Deletes the files whose records all end at or before `lsn` (every shard has them in
    /// segments). The file appended to is kept.
    ///
    /// When every record is in segments (`lsn` is the end) but the current file still holds
    /// records, the writer is asked to begin a new file, so that the next call removes this
    /// one: a WAL whose records are all compacted takes no space (its zero-filled tail
    /// included), whether or not more writes come.
    pub fn remove_before(&self, lsn: u64) -> std::io::Result<()> {
        let mut files = self.shared.files.lock().expect("wal files lock");
        while files.len() > 1 && files[1] <= lsn {
            std::fs::remove_file(wal_path(&self.shared.dir, files[0]))?;
            files.remove(0);
        }
        let current_holds_records = files.last().is_some_and(|start| *start < self.end());
        if lsn >= self.end() && current_holds_records {
            let (done, _) = oneshot::channel();
            // Best effort: with the queue full, writes are coming and a later call asks again.
            let _ = self.tx.try_send(Submission { records: Vec::new(), rotate: true, done });
        }
        Ok(())
    }

    /// Bytes the log holds, and where its oldest file ends (`None` when there is one file).
    pub fn size(&self) -> (u64, Option<u64>) {
        let files = self.shared.files.lock().expect("wal files lock");
        (self.end().saturating_sub(files[0]), files.get(1).copied())
    }
}

/// Submitted records on their way to disk.
pub struct Durable(oneshot::Receiver<std::io::Result<u64>>);

impl Durable {
    /// The LSN where the records end, once they are durable. Cancel-safe: a `select!` may
    /// drop this future and wait again later.
    pub async fn wait(&mut self) -> std::io::Result<u64> {
        (&mut self.0).await.map_err(|_| writer_stopped())?
    }
}

fn writer_stopped() -> std::io::Error {
    std::io::Error::other("the WAL writer stopped")
}

/// The writer task: one group commit at a time, each taking every submission waiting.
async fn run(
    shared: Arc<Shared>,
    mut log: AppendLog,
    mut start: u64,
    mut rx: mpsc::Receiver<Submission>,
    metrics: Arc<Metrics>,
) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut bytes = group[0].records.len();
        while group.len() < GROUP_SUBMISSIONS_MAX && bytes < GROUP_BYTES_MAX {
            match rx.try_recv() {
                Ok(s) => {
                    bytes += s.records.len();
                    group.push(s);
                }
                Err(_) => break,
            }
        }
        buf.clear();
        let base = start + log.len();
        let mut ends = Vec::with_capacity(group.len());
        for s in &group {
            buf.extend_from_slice(&s.records);
            ends.push(base + buf.len() as u64);
        }
        let rotate = log.len() >= shared.file_bytes || (group.iter().any(|s| s.rotate) && !log.is_empty());
        let dir = shared.dir.clone();
        let started = tokio::time::Instant::now();
        let joined = crate::env::spawn_blocking(move || {
            if rotate {
                match AppendLog::open_wal(&wal_path(&dir, base), 0) {
                    Ok(next) => {
                        log = next;
                        start = base;
                    }
                    Err(e) => return (log, start, buf, Err(e), false),
                }
            }
            let written = log.append_durable(&buf);
            (log, start, buf, written, rotate)
        })
        .await;
        let rotated;
        let written;
        match joined {
            Ok((l, s, b, w, r)) => {
                (log, start, buf, written, rotated) = (l, s, b, w, r);
            }
            Err(e) => {
                // The blocking task panicked and the file handle is gone: fail this group; the
                // dropped receiver fails every later one.
                for s in group {
                    let _ = s.done.send(Err(std::io::Error::other(e.to_string())));
                }
                return;
            }
        }
        if rotated {
            shared.files.lock().expect("wal files lock").push(start);
        }
        match written {
            Ok(()) => {
                metrics.observe_fsync(started.elapsed());
                shared.end.store(start + log.len(), Ordering::SeqCst);
                for (s, end) in group.into_iter().zip(ends) {
                    let _ = s.done.send(Ok(end));
                }
            }
            Err(e) => {
                tracing::error!(wal = %shared.dir.display(), error = %e, "WAL append failed");
                for s in group {
                    let _ = s.done.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}

/// Reads the record at the reader's position: its payload, or `None` at the end of the file
/// or at a record that is short or fails its checksum (a torn tail).
pub fn read_record(reader: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER_BYTES];
    if !read_whole(reader, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    // No record is empty: a zero length is where a WAL's zero-filled space begins.
    if len == 0 || len > RECORD_BYTES_MAX {
        return Ok(None);
    }
    // Read through `take`, so a garbage length past the end of the file allocates only what
    // is there.
    let mut payload = Vec::new();
    reader.by_ref().take(len as u64).read_to_end(&mut payload)?;
    if payload.len() < len || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(Some(payload))
}

/// Bytes a record of `payload_len` takes in the file.
pub fn record_len(payload_len: usize) -> u64 {
    (HEADER_BYTES + payload_len) as u64
}

/// Fills `buf`; false when the file ends first.
fn read_whole(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads every valid record of a log file, calling `apply(end, payload)` with the offset where
/// each ends; returns the bytes of valid records and how many bytes after them are not
/// records (zeros written ahead of the appends are not: counted up to the last byte that is
/// not zero). The file is left as it is.
pub fn replay_records<E: From<std::io::Error>>(
    path: &Path,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(u64, u64), E> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut pos = 0u64;
    while let Some(payload) = read_record(&mut reader)? {
        pos += record_len(payload.len());
        apply(pos, &payload)?;
    }
    let mut torn = 0;
    if pos < file_len {
        let mut rest = Vec::new();
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(pos))?;
        reader.read_to_end(&mut rest)?;
        torn = rest.iter().rposition(|&b| b != 0).map_or(0, |at| at as u64 + 1);
    }
    Ok((pos, torn))
}

/// Cuts a log file at `len` durably.
fn cut_at(path: &Path, len: u64) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_all()
}

/// Reads a WAL file of a shard from before the node WAL (one file per shard, the payload a
/// bare `RowBatch`), truncating a torn tail; returns its batches and the torn bytes.
pub fn replay_shard_wal(path: &Path) -> std::io::Result<(Vec<RowBatch>, u64)> {
    let mut batches = Vec::new();
    let (records_len, torn) = replay_records(path, |_, payload| {
        let batch = postcard::from_bytes::<RowBatch>(payload)
            .ok()
            .filter(|b| b.validate().is_ok())
            .ok_or_else(|| std::io::Error::other(format!("{}: a record is not a batch of points", path.display())))?;
        batches.push(batch);
        Ok::<(), std::io::Error>(())
    })?;
    if torn > 0 {
        cut_at(path, records_len)?;
    }
    Ok((batches, torn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Num, Point};

    fn points(ts: &[i64]) -> RowBatch {
        let points: Vec<Point> = ts
            .iter()
            .map(|&t| Point {
                timestamp: t,
                value: Num::Int(t),
                dimensions: Default::default(),
                tags: Default::default(),
            })
            .collect();
        RowBatch::from_points(&points).unwrap()
    }

    #[test]
    fn a_record_encoded_in_place_is_the_framed_payload() {
        let mut out = b"earlier".to_vec();
        encode_record(&points(&[5, 6]), &mut out);
        let mut expected = b"earlier".to_vec();
        frame(&postcard::to_stdvec(&points(&[5, 6])).unwrap(), &mut expected);
        assert_eq!(out, expected);
    }

    fn record(ts: &[i64]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&points(ts), &mut out);
        out
    }

    /// Recovers the log in `dir`: the (LSN, batch) of every record, and the running log.
    fn recover(dir: &Path, file_bytes: u64) -> (Vec<(u64, RowBatch)>, Arc<NodeWal>) {
        let wal = NodeWal::new(dir, file_bytes, Arc::new(Metrics::default()));
        let mut found = Vec::new();
        wal.recover(0, false, |lsn, payload| {
            found.push((lsn, postcard::from_bytes::<RowBatch>(payload).unwrap()));
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        (found, wal)
    }

    #[tokio::test]
    async fn records_replay_at_their_lsn_across_files_and_old_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let (found, wal) = recover(dir.path(), 50);
        assert!(found.is_empty());
        let mut ends = Vec::new();
        for t in 0..10 {
            ends.push(wal.append(record(&[t, t + 1])).await.unwrap());
        }
        assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
        assert_eq!(wal.end(), ends[9]);
        let files = list_wal_seqs(dir.path()).unwrap();
        assert!(files.len() > 2, "50-byte files: {files:?}");
        drop(wal);
        let (found, wal) = recover(dir.path(), 50);
        let expected: Vec<(u64, RowBatch)> = (0..10).map(|t| (ends[t as usize], points(&[t, t + 1]))).collect();
        assert_eq!(found, expected);
        // Records up to the fourth's end are in segments: the files holding only those go.
        wal.remove_before(ends[3]).unwrap();
        let kept = list_wal_seqs(dir.path()).unwrap();
        assert!(kept.len() < files.len() && kept[0] < ends[3] && kept.get(1).is_none_or(|&s| s > ends[3]), "{kept:?}");
        assert!(wal.size().0 >= ends[9] - ends[3]);
        // Appends go on after the end, and replay from the kept files still finds them.
        let next = wal.append(record(&[99])).await.unwrap();
        assert!(next > ends[9]);
        drop(wal);
        let (found, _) = recover(dir.path(), 50);
        assert_eq!(found.last().unwrap(), &(next, points(&[99])));
        for t in 4..10 {
            assert!(found.contains(&(ends[t as usize], points(&[t, t + 1]))), "record {t} is kept");
        }
    }

    #[tokio::test]
    async fn replay_drops_a_torn_tail_only_and_appends_follow_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (_, wal) = recover(dir.path(), WAL_FILE_BYTES);
        let first = wal.append(record(&[1, 2])).await.unwrap();
        let second = wal.append(record(&[3])).await.unwrap();
        drop(wal);
        let path = wal_path(dir.path(), 0);
        assert!(std::fs::metadata(&path).unwrap().len() >= ZEROS_AHEAD_MIN, "zero-filled ahead of its records");
        // A torn third record: header and half its payload, over the zeros.
        let torn = record(&[4]);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &torn[..torn.len() - 2], second).unwrap();
        let metrics = Arc::new(Metrics::default());
        let wal = NodeWal::new(dir.path(), WAL_FILE_BYTES, metrics.clone());
        let mut found = Vec::new();
        wal.recover(0, false, |lsn, _| {
            found.push(lsn);
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        assert_eq!(found, vec![first, second]);
        let torn_nonzero = torn[..torn.len() - 2].iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
        assert_eq!(metrics.wal_torn_bytes.load(Ordering::Relaxed), torn_nonzero, "zeros ahead are not torn");
        assert_eq!(wal.end(), second, "the log goes on where the torn record began");
        let third = wal.append(record(&[5])).await.unwrap();
        drop(wal);
        let (found, _) = recover(dir.path(), WAL_FILE_BYTES);
        assert_eq!(found.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(), vec![first, second, third]);
        assert_eq!(found[2].1, points(&[5]));
    }

    #[test]
    fn reopened_log_cuts_a_torn_tail_so_later_appends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_path(dir.path(), 3);
        let buf = record(&[1]);
        AppendLog::open(&path).unwrap().append_durable(&buf).unwrap();
        // A crash in the middle of a write: half a record at the end.
        let torn = record(&[2]);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, &torn[..torn.len() / 2]).unwrap();
        let mut log = AppendLog::open(&path).unwrap();
        assert_eq!(log.len(), buf.len() as u64, "the torn half is not counted");
        log.append_durable(&record(&[3])).unwrap();
        let (batches, torn) = replay_shard_wal(&path).unwrap();
        assert_eq!(batches, vec![points(&[1]), points(&[3])], "the record after the cut is found");
        assert_eq!(torn, 0);
    }

    #[test]
    fn replay_stops_at_bad_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_path(dir.path(), 7);
        let mut buf = record(&[1]);
        let first = buf.len();
        buf.extend(record(&[2]));
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        AppendLog::open(&path).unwrap().append_durable(&buf).unwrap();
        let (batches, torn) = replay_shard_wal(&path).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(torn, (buf.len() - first) as u64);
        assert_eq!(list_wal_seqs(dir.path()).unwrap(), vec![7]);
    }

    #[tokio::test]
    async fn a_corrupt_record_in_an_earlier_file_stops_replay_unless_salvaged() {
        let dir = tempfile::tempdir().unwrap();
        let (_, wal) = recover(dir.path(), 50);
        let ends: Vec<u64> = {
            let mut ends = Vec::new();
            for t in 0..6 {
                ends.push(wal.append(record(&[t])).await.unwrap());
            }
            ends
        };
        drop(wal);
        let files = list_wal_seqs(dir.path()).unwrap();
        assert!(files.len() >= 2, "{files:?}");
        // Flip a byte of the first file's first record: not the last file, so not a torn tail.
        let first = wal_path(dir.path(), files[0]);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[HEADER_BYTES] ^= 0xff;
        std::fs::write(&first, &bytes).unwrap();
        let wal = NodeWal::new(dir.path(), 50, Arc::new(Metrics::default()));
        let err = wal.recover(0, false, |_, _| Ok::<(), std::io::Error>(())).unwrap_err().to_string();
        assert!(err.contains(&first.display().to_string()) && err.contains("corrupt at offset 0"), "{err}");
        assert!(err.contains("--salvage-wal"), "{err}");
        assert_eq!(std::fs::read(&first).unwrap(), bytes, "nothing is cut without salvage");
        // Salvage cuts that file and replays every later file.
        let wal = NodeWal::new(dir.path(), 50, Arc::new(Metrics::default()));
        let mut found = Vec::new();
        wal.recover(0, true, |lsn, _| {
            found.push(lsn);
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        assert!(!found.contains(&ends[0]) && found.contains(&ends[5]), "{found:?} of {ends:?}");
        assert_eq!(std::fs::metadata(&first).unwrap().len(), 0);
    }
}
