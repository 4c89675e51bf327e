//! A full disk, for real: a node whose data dir is a small tmpfs is loaded until writes fail.
//! They must fail with 507 naming the full disk, store nothing, and leave every acknowledged
//! point intact; once space is freed, writes succeed again, and after a `kill -9` and a restart
//! every acknowledged point is there and no refused one.
//!
//! Needs root (to mount the tmpfs); without it the test prints `SKIP: …` and passes.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use common::TestNode;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_small_tmpfs(at: &Path) -> Result<Mount, String> {
    let uid = Command::new("id").arg("-u").output().map_err(|e| format!("cannot run `id`: {e}"))?;
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    if uid != "0" {
        return Err(format!("not root (uid {uid}): cannot mount a tmpfs"));
    }
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "shoal-disk-full"])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run `mount`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`mount -t tmpfs` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(Mount(at.to_path_buf()))
}

/// A batch of `n` points with values `first..first + n`, all in one shard, so that a refused
/// batch stores nothing at all.
fn batch(first: i64, n: i64) -> String {
    (first..first + n).map(|id| format!("m,host=h{} value={id}i {}\n", id % 10, 1_700_000_000_000 + id)).collect()
}

#[test]
fn a_full_disk_refuses_writes_with_507_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    let _mount = match mount_small_tmpfs(&mnt) {
        Ok(m) => m,
        Err(reason) => {
            println!("SKIP: {reason}");
            return;
        }
    };
    // Ballast takes all but 200 KiB of the 4 MiB disk; deleting it later is "freeing space".
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; (4 << 20) - (200 << 10)]).unwrap();
    let mut node = TestNode::start(&mnt.join("data"), &["shoal.storage.memtable-max-points=20000"]);
    let url = "/write?db=db&namespace=ns&precision=ms";
    const POINTS: i64 = 500;
    let (mut acked, mut next) = (0i64, 0i64);
    let mut refused = None;
    for _ in 0..2_000 {
        let (status, body) = node.post(url, batch(next, POINTS));
        next += POINTS;
        if status == 204 {
            acked = next;
        } else {
            refused = Some((status, body));
            break;
        }
    }
    let (status, body) = refused.expect("the 200 KiB left on the disk filled up within 1M points");
    assert_eq!(status, 507, "a full disk answers 507: {body}");
    assert!(body["error"].as_str().unwrap().contains("no space left"), "the error names the full disk: {body}");
    // Still full: refused again, and what was acknowledged is all there, the refused batch not.
    assert_eq!(node.post(url, batch(next, POINTS)).0, 507);
    let count = |node: &TestNode| node.query("db", "ns", "SELECT count(*) FROM m")[0]["value"].as_i64().unwrap();
    assert_eq!(count(&node), acked, "exactly the acknowledged points");

    // Space is freed: writes succeed again, with no restart.
    std::fs::remove_file(&ballast).unwrap();
    let resumed = acked + POINTS;
    let (status, body) = node.post(url, batch(resumed, POINTS));
    assert_eq!(status, 204, "writes resume once space is freed: {body}");
    assert_eq!(count(&node), acked + POINTS);

    // And all of it survives a crash: nothing torn by the refused writes hides a later record.
    node.kill9();
    node.start_again();
    let values: std::collections::BTreeSet<i64> =
        node.query("db", "ns", "SELECT * FROM m LIMIT 1000000").iter().map(|r| r["value"].as_i64().unwrap()).collect();
    let expected: std::collections::BTreeSet<i64> = (0..acked).chain(resumed..resumed + POINTS).collect();
    assert_eq!(values.len(), expected.len(), "point count after the restart");
    assert!(values == expected, "the acknowledged points, and only those, after the restart");
}
