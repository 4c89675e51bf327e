//! Hinted handoff, the recording half: when a write succeeds at its consistency level but a
//! replica missed it, the coordinator keeps the replica's share in `<data-dir>/hints/<node>.log`
//! (framed and checksummed like the WAL, fsynced before the write is acknowledged). The recovery
//! issue replays these files to their targets when they are alive again. Each target's file is
//! bounded; past the bound hints are dropped and counted, and replica repair must fill the gap.

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;

/// Most bytes of hints kept for one target node.
pub const HINT_BYTES_MAX_PER_NODE: u64 = 1 << 30;

pub struct HintStore {
    dir: PathBuf,
    files: Mutex<HashMap<String, (File, u64)>>,
    bytes_max: u64,
}

impl HintStore {
    pub fn new(data_dir: &std::path::Path) -> Self {
        Self { dir: data_dir.join("hints"), files: Mutex::new(HashMap::new()), bytes_max: HINT_BYTES_MAX_PER_NODE }
    }

    /// Durably records `payload` (a postcard `ReplicaWrite`) for `target`. Returns false when
    /// the target's hints are full and this one was dropped.
    pub fn record(&self, target: &str, payload: &[u8], metrics: &Metrics) -> std::io::Result<bool> {
        let mut files = self.files.lock().expect("hints lock");
        if !files.contains_key(target) {
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("{target}.log"));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let len = file.metadata()?.len();
            crate::storage::fsync_dir(&self.dir)?;
            files.insert(target.to_string(), (file, len));
        }
        let (file, len) = files.get_mut(target).expect("opened above");
        let mut frame = Vec::with_capacity(payload.len() + 8);
        crate::storage::wal::frame(payload, &mut frame);
        if *len + frame.len() as u64 > self.bytes_max {
            metrics.hints_dropped.fetch_add(1, Relaxed);
            return Ok(false);
        }
        file.write_all(&frame)?;
        file.sync_data()?;
        *len += frame.len() as u64;
        metrics.hints_stored.fetch_add(1, Relaxed);
        Ok(true)
    }

    /// Bytes of hints waiting per target node.
    pub fn pending(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> =
            self.files.lock().expect("hints lock").iter().map(|(k, (_, len))| (k.clone(), *len)).collect();
        out.sort();
        out
    }
}
