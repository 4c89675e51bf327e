//! Write-ahead log of one shard. A record is `[len: u32 LE][crc32 of payload: u32 LE][payload]`,
//! the payload a postcard-encoded [`RowBatch`] (one ingest request's points for this shard).
//! Appends are batched by the shard's writer (group commit) and made durable with one
//! `fdatasync` per batch. Replay stops at the first record that is short or fails its checksum
//! and truncates the file there: that is a torn tail from a crash, never an acknowledged write.

use crate::model::batch::RowBatch;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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

pub struct WalWriter {
    file: File,
    pub seq: u64,
}

impl WalWriter {
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(wal_path(dir, seq))?;
        super::fsync_dir(dir)?;
        Ok(Self { file, seq })
    }

    /// Appends already-framed records and makes them durable before returning.
    pub fn append_durable(&mut self, records: &[u8]) -> std::io::Result<()> {
        self.file.write_all(records)?;
        self.file.sync_data()
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
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut replay = Replay::default();
    let mut pos = 0usize;
    while pos + HEADER_BYTES <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let start = pos + HEADER_BYTES;
        if len > RECORD_BYTES_MAX || start + len > bytes.len() {
            break;
        }
        let payload = &bytes[start..start + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        match postcard::from_bytes::<RowBatch>(payload) {
            Ok(batch) if batch.validate().is_ok() => replay.batches.push(batch),
            _ => break,
        }
        pos = start + len;
    }
    if pos < bytes.len() {
        replay.torn_bytes = (bytes.len() - pos) as u64;
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(pos as u64)?;
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
