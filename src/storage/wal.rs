//! Write-ahead log of one shard. A record is `[len: u32 LE][crc32 of payload: u32 LE][payload]`,
//! the payload a postcard-encoded [`RowBatch`] (one ingest request's points for this shard).
//! Appends are batched by the shard's writer (group commit) and made durable with one
//! `fdatasync` per batch. Replay stops at the first record that is short or fails its checksum
//! and truncates the file there: that is a torn tail from a crash, never an acknowledged write.
//!
//! A WAL file is zero-filled ahead of its appends, so that an append overwrites blocks the file
//! already has and its `fdatasync` writes only those: an append that grew the file would also
//! make the filesystem write the inode (and block maps) on every commit. A zero length field
//! reads as the end of the log, so the zeros are never taken for records or for a torn tail.

use crate::model::batch::RowBatch;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// Appends `batch` to `out` as one framed record, encoded in place (no copy of the payload).
pub fn encode_record(batch: &RowBatch, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    *out = postcard::to_extend(batch, std::mem::take(out)).expect("batches always encode");
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

/// An append-only file of framed records: a shard's WAL, or the hints kept for one node.
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
        let file = OpenOptions::new().create(true).truncate(false).write(true).read(true).open(path)?;
        if let Some(dir) = path.parent() {
            super::fsync_dir(dir)?;
        }
        let file_len = file.metadata()?.len();
        let mut durable_len = 0;
        let mut reader = std::io::BufReader::new(&file);
        while let Some(payload) = read_record(&mut reader)? {
            durable_len += record_len(payload.len());
        }
        let mut log = Self {
            file,
            path: path.to_path_buf(),
            durable_len,
            file_len,
            zero_fill: false,
            needs_cut: durable_len < file_len,
        };
        if log.needs_cut {
            log.cut()?;
        }
        Ok(log)
    }

    /// Appends already-framed records and makes them durable before returning.
    pub fn append_durable(&mut self, records: &[u8]) -> std::io::Result<()> {
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

pub struct WalWriter {
    log: AppendLog,
    pub seq: u64,
}

impl WalWriter {
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let mut log = AppendLog::open(&wal_path(dir, seq))?;
        log.zero_fill = true;
        Ok(Self { log, seq })
    }

    /// Appends already-framed records and makes them durable before returning.
    pub fn append_durable(&mut self, records: &[u8]) -> std::io::Result<()> {
        self.log.append_durable(records)
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

/// What replaying one WAL file found.
#[derive(Debug, Default)]
pub struct Replay {
    pub batches: Vec<RowBatch>,
    /// Bytes cut from the end because they did not form a whole, valid record.
    pub torn_bytes: u64,
}

/// Reads every valid record of a WAL file and truncates a torn tail.
pub fn replay(path: &Path) -> std::io::Result<Replay> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut replay = Replay::default();
    let mut pos = 0u64;
    while let Some(payload) = read_record(&mut reader)? {
        match postcard::from_bytes::<RowBatch>(&payload) {
            Ok(batch) if batch.validate().is_ok() => replay.batches.push(batch),
            _ => break,
        }
        pos += record_len(payload.len());
    }
    if pos < file_len {
        // Zeros written ahead of the appends are not a torn record: count up to the last byte
        // that is not zero.
        let mut rest = Vec::new();
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(pos))?;
        reader.read_to_end(&mut rest)?;
        replay.torn_bytes = rest.iter().rposition(|&b| b != 0).map_or(0, |at| at as u64 + 1);
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(pos)?;
        file.sync_all()?;
    }
    Ok(replay)
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

    #[test]
    fn replay_drops_torn_tail_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        encode_record(&points(&[1, 2]), &mut buf);
        encode_record(&points(&[3]), &mut buf);
        w.append_durable(&buf).unwrap();
        let path = wal_path(dir.path(), 1);
        let zero_filled = std::fs::metadata(&path).unwrap().len();
        assert!(zero_filled >= ZEROS_AHEAD_MIN, "the WAL is zero-filled ahead of its records");
        let r = replay(&path).unwrap();
        assert_eq!((r.batches.len(), r.torn_bytes), (2, 0), "zeros ahead are neither records nor torn");
        // A torn third record: header and half the payload.
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        let mut torn = Vec::new();
        encode_record(&points(&[4]), &mut torn);
        w.append_durable(&torn[..torn.len() - 2]).unwrap();
        let r = replay(&path).unwrap();
        assert_eq!(r.batches.len(), 2);
        assert_eq!(r.batches[1], points(&[3]));
        // Counted up to its last byte that is not zero.
        let torn_nonzero = torn[..torn.len() - 2].iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
        assert_eq!(r.torn_bytes, torn_nonzero);
        // The file was truncated, so a second replay finds nothing torn.
        let r = replay(&wal_path(dir.path(), 1)).unwrap();
        assert_eq!((r.batches.len(), r.torn_bytes), (2, 0));
    }

    #[test]
    fn reopened_log_cuts_a_torn_tail_so_later_appends_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_path(dir.path(), 3);
        let mut buf = Vec::new();
        encode_record(&points(&[1]), &mut buf);
        AppendLog::open(&path).unwrap().append_durable(&buf).unwrap();
        // A crash in the middle of a write: half a record at the end.
        let mut torn = Vec::new();
        encode_record(&points(&[2]), &mut torn);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, &torn[..torn.len() / 2]).unwrap();
        let mut log = AppendLog::open(&path).unwrap();
        assert_eq!(log.len(), buf.len() as u64, "the torn half is not counted");
        let mut next = Vec::new();
        encode_record(&points(&[3]), &mut next);
        log.append_durable(&next).unwrap();
        let r = replay(&path).unwrap();
        assert_eq!(r.batches, vec![points(&[1]), points(&[3])], "the record after the cut is found");
        assert_eq!(r.torn_bytes, 0);
    }

    #[test]
    fn replay_stops_at_bad_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 7).unwrap();
        let mut buf = Vec::new();
        encode_record(&points(&[1]), &mut buf);
        let first = buf.len();
        encode_record(&points(&[2]), &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        w.append_durable(&buf).unwrap();
        let r = replay(&wal_path(dir.path(), 7)).unwrap();
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.torn_bytes, (buf.len() - first) as u64);
        assert_eq!(list_wal_seqs(dir.path()).unwrap(), vec![7]);
    }
}
