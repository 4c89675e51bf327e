//! Write-ahead log of one shard. A record is `[len: u32 LE][crc32 of payload: u32 LE][payload]`,
//! the payload a postcard-encoded [`RowBatch`] (one ingest request's points for this shard).
//! Appends are batched by the shard's writer (group commit) and made durable with one
//! `fdatasync` per batch. Replay stops at the first record that is short or fails its checksum
//! and truncates the file there: that is a torn tail from a crash, never an acknowledged write.

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

pub fn encode_record(batch: &RowBatch, out: &mut Vec<u8>) {
    frame(&postcard::to_stdvec(batch).expect("batches always encode"), out);
}

/// `[len u32 LE][crc32 u32 LE][payload]`: the record framing shared by the WAL and hint files.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// An append-only file of framed records: a shard's WAL, or the hints kept for one node.
/// An append is durable when it returns Ok. One that fails (a full disk, a failed fsync) is
/// cut off again, so the next record never lands behind a torn one, where replay, which stops
/// at the first bad record, would not find it.
pub struct AppendLog {
    file: File,
    path: PathBuf,
    durable_len: u64,
    /// A failed append left bytes that could not be cut off yet.
    needs_cut: bool,
}

impl AppendLog {
    /// Opens (or creates) the log at `path`, cutting off bytes past the last whole record.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).read(true).open(path)?;
        if let Some(dir) = path.parent() {
            super::fsync_dir(dir)?;
        }
        let file_len = file.metadata()?.len();
        let mut durable_len = 0;
        let mut reader = std::io::BufReader::new(&file);
        while let Some(payload) = read_record(&mut reader)? {
            durable_len += record_len(payload.len());
        }
        let mut log = Self { file, path: path.to_path_buf(), durable_len, needs_cut: durable_len < file_len };
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
        let written = crate::env::write_file(&mut self.file, &self.path, records).and_then(|()| self.file.sync_data());
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

    fn cut(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.durable_len)?;
        self.file.sync_data()?;
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
        Ok(Self { log: AppendLog::open(&wal_path(dir, seq))?, seq })
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
    if len > RECORD_BYTES_MAX {
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
        replay.torn_bytes = file_len - pos;
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
    fn replay_drops_torn_tail_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        encode_record(&points(&[1, 2]), &mut buf);
        encode_record(&points(&[3]), &mut buf);
        w.append_durable(&buf).unwrap();
        // A torn third record: header and half the payload.
        let mut torn = Vec::new();
        encode_record(&points(&[4]), &mut torn);
        w.append_durable(&torn[..torn.len() - 2]).unwrap();
        let r = replay(&wal_path(dir.path(), 1)).unwrap();
        assert_eq!(r.batches.len(), 2);
        assert_eq!(r.batches[1], points(&[3]));
        assert_eq!(r.torn_bytes, torn.len() as u64 - 2);
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
