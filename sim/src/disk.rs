//! The simulated disk, behind `shoal::env::DiskSeam`: per node, whether the disk is full (a
//! write then stores a random prefix and fails, as a real short write does), and how much of
//! each append-only log is durable, so that a crash loses every byte written after the last
//! fsync and may leave a torn record behind.
//!
//! The state is per thread: each seed runs on a thread of its own, and with blocking work
//! inline every file write of its nodes happens on that thread.

use crate::rng::Rng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Default)]
struct NodeDisk {
    full: bool,
    /// Durable length of each log written under the node's data dir.
    synced: BTreeMap<PathBuf, u64>,
}

#[derive(Default)]
struct Disks {
    /// By data dir.
    nodes: BTreeMap<PathBuf, NodeDisk>,
    rng: Option<Rng>,
}

impl Disks {
    fn node_of(&mut self, path: &Path) -> Option<&mut NodeDisk> {
        self.nodes.iter_mut().find(|(dir, _)| path.starts_with(dir)).map(|(_, d)| d)
    }
}

thread_local! {
    static DISKS: RefCell<Disks> = RefCell::default();
}

/// The seam the simulator installs in the process.
pub struct SimDisk;

impl shoal::env::DiskSeam for SimDisk {
    fn writable(&self, path: &Path, len: usize) -> usize {
        DISKS.with(|d| {
            let mut d = d.borrow_mut();
            if !d.node_of(path).is_some_and(|n| n.full) || len == 0 {
                return len;
            }
            d.rng.as_mut().map_or(0, |rng| rng.below(len as u64) as usize)
        })
    }

    fn synced(&self, path: &Path, len: u64) {
        DISKS.with(|d| {
            if let Some(node) = d.borrow_mut().node_of(path) {
                node.synced.insert(path.to_path_buf(), len);
            }
        })
    }
}

/// Starts a seed's disks: no node yet, and the seed's generator for short writes and torn
/// tails.
pub fn reset(seed: u64) {
    DISKS.with(|d| *d.borrow_mut() = Disks { nodes: BTreeMap::new(), rng: Some(Rng::derive(seed, "disk")) });
}

/// A node's data dir gets a disk of its own.
pub fn add_node(dir: &Path) {
    DISKS.with(|d| {
        d.borrow_mut().nodes.entry(dir.to_path_buf()).or_default();
    });
}

pub fn set_full(dir: &Path, full: bool) {
    DISKS.with(|d| {
        if let Some(node) = d.borrow_mut().nodes.get_mut(dir) {
            node.full = full;
        }
    })
}

/// Whether `path` is a node WAL file (`wal-<seq>.log`) with a newer one beside it (maybe
/// still empty, so never fsynced through the seam).
fn superseded_wal_file(path: &Path) -> bool {
    let wal_name =
        |p: &Path| p.file_name().and_then(|n| n.to_str()).filter(|n| n.starts_with("wal-")).map(String::from);
    let (Some(name), Some(dir)) = (wal_name(path), path.parent()) else { return false };
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().filter_map(|e| wal_name(&e.path())).any(|other| other > name)
}

/// The power goes out under node `dir`: each log loses what was written after its last fsync,
/// and, when the seed says so, one log ends in a torn record (a write that was under way).
/// Returns what was cut and added, for the trace.
pub fn crash(dir: &Path) -> String {
    DISKS.with(|d| {
        let mut d = d.borrow_mut();
        let Disks { nodes, rng } = &mut *d;
        let (Some(node), Some(rng)) = (nodes.get_mut(dir), rng.as_mut()) else { return String::new() };
        let mut cut = 0u64;
        let mut logs = Vec::new();
        for (path, &durable) in &node.synced {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            if meta.len() > durable {
                cut += meta.len() - durable;
                let file = std::fs::OpenOptions::new().write(true).open(path).expect("a log the node wrote");
                file.set_len(durable).expect("truncating a log");
            }
            logs.push(path.clone());
        }
        // Only a log still being appended to can hold a write under way: the node WAL appends
        // to its newest file alone (an older one was fsynced whole before the next began).
        logs.retain(|path| !superseded_wal_file(path));
        let mut torn = String::new();
        if rng.chance(0.5)
            && let Some(path) = rng.pick(&logs).cloned()
        {
            let garbage: Vec<u8> = (0..rng.between(1, 40)).map(|_| rng.below(256) as u8).collect();
            let mut file = std::fs::OpenOptions::new().append(true).open(&path).expect("a log the node wrote");
            std::io::Write::write_all(&mut file, &garbage).expect("appending a torn record");
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            torn = format!(", torn record of {} bytes on {name}", garbage.len());
        }
        format!("lost {cut} unsynced bytes{torn}")
    })
}
