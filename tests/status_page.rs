//! The status page (`/ui`) in a real browser: headless Chromium (Debian's `chromium`) loads it
//! from a 3-node cluster, sees every member alive and the shard map; after one node is killed
//! the page shows it dead. A screenshot is saved for people to look at.

mod common;

use common::wait_until;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs headless Chromium on `url` with `args` (`--dump-dom`, `--screenshot=…`); its stdout.
fn chromium(profile: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn member_row(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("data-member=\"{id}\""))?;
    Some(dom[at..at + dom[at..].find("</tr>")?].to_string())
}

#[test]
fn status_page_in_chromium_shows_members_shards_and_a_killed_node_dead() {
    if common::tool_missing("chromium", "--version", "status page test", "chromium") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("chromium");
    let mut nodes = common::cluster(dir.path(), &["a", "b", "c"], &["shoal.cluster.replication-factor=2"]);
    let (status, v) = nodes[0].post("/write?db=web&namespace=ui&precision=s", "cpu,host=x value=1i 1700000000");
    assert!(status < 300, "{v}");
    let url = nodes[0].url("/ui");

    let dom = chromium(&profile, &url, &["--dump-dom"]);
    for id in ["a", "b", "c"] {
        let row = member_row(&dom, id).unwrap_or_else(|| panic!("no row for member {id}: {dom}"));
        assert!(row.contains("data-state=\"alive\""), "{row}");
    }
    assert!(dom.contains("web.ui.cpu") && dom.contains("1 points"), "the shard map lists the shard: {dom}");
    assert!(dom.contains("points stored/s") && dom.contains("queries/s"), "{dom}");

    nodes[2].kill9();
    wait_until(Duration::from_secs(60), "a to see c dead", || {
        nodes[0].members().iter().any(|(id, state, _)| id == "c" && state == "dead").then_some(())
    });
    let dom = chromium(&profile, &url, &["--dump-dom"]);
    let row = member_row(&dom, "c").expect("c is still listed");
    assert!(row.contains("data-state=\"dead\"") && row.contains("state-dead"), "{row}");
    assert!(member_row(&dom, "b").unwrap().contains("data-state=\"alive\""));

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&profile, &url, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("chromium saved the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    println!("screenshot of the status page with c dead: {}", shot.display());
}
