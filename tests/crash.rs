//! `kill -9` during ingest loses no acknowledged point: several writers load a real node, the
//! node is killed without warning while requests are in flight, and after a restart every
//! acknowledged point is there, with no point that was never sent.

#![allow(clippy::disallowed_methods)] // tests read the real clock

mod common;
use common::{TestNode, wait_until};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WRITERS: i64 = 4;
/// Each writer stops after this many batches even if the node is never killed.
const BATCHES_MAX: i64 = 2000;
const BATCH_POINTS: i64 = 50;

#[test]
fn kill_9_mid_ingest_loses_no_acknowledged_point() {
    let dir = tempfile::tempdir().unwrap();
    // A small memtable makes compaction run during the load, so the kill can land in it too.
    let mut node = TestNode::start(
        &dir.path().join("n1"),
        &["shoal.storage.memtable-max-points=3000", "shoal.sharding.interval=1h"],
    );
    let url = node.url("/write?db=db&namespace=ns&precision=ms");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, acked, stop) = (url.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
                for b in 0..BATCHES_MAX {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // Unique timestamps per point; spread over several one-hour shards.
                    let ts: Vec<i64> =
                        (0..BATCH_POINTS).map(|i| ((b * BATCH_POINTS + i) * WRITERS + w) * 1000).collect();
                    let body: String = ts.iter().map(|t| format!("load,writer=w{w} value={t}i {t}\n")).collect();
                    match http.post(&url).body(body).send() {
                        Ok(r) if r.status().as_u16() == 204 => acked.lock().unwrap().extend(ts),
                        _ => break, // the node is gone; what was not acknowledged may or may not be there
                    }
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(60), "enough acknowledged points", || {
        (acked.lock().unwrap().len() >= 20_000).then_some(())
    });
    node.kill9();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    node.start_again();
    let records = node.query("db", "ns", "SELECT * FROM load");
    let stored: BTreeSet<i64> = records.iter().map(|r| r["timestamp"].as_i64().unwrap()).collect();
    assert_eq!(stored.len(), records.len(), "no point may be stored twice");
    let lost: Vec<_> = acked.difference(&stored).take(10).collect();
    assert!(lost.is_empty(), "{} acknowledged points lost, e.g. {lost:?}", acked.difference(&stored).count());
    for r in &records {
        let t = r["timestamp"].as_i64().unwrap();
        assert_eq!(r["value"].as_i64(), Some(t), "a point must come back exactly as sent");
        let w = (t / 1000) % WRITERS;
        assert_eq!(r["tags"]["writer"], format!("w{w}"));
    }
    println!(
        "acknowledged {}, stored {} (in-flight at the kill: {})",
        acked.len(),
        stored.len(),
        stored.len() - acked.len()
    );
}
