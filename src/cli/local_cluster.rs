//! `shoal local-cluster N`: N nodes of one cluster on this machine, for trying Shoal. Each is
//! a `shoal start` child process with its own data dir under `--dir` and its own ports; the
//! first one's gossip address seeds the others. Ctrl-C or SIGTERM stops them all (each a
//! clean stop, as for a single node), and they stop too if this process dies.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Most nodes one machine is asked to run.
pub const NODES_MAX: usize = 16;
/// How long a node may take to bind its ports and write its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Options {
    pub nodes: usize,
    pub dir: PathBuf,
    /// HTTP port of the first node (the others follow it); 0: every port chosen by the OS.
    pub http_port: u16,
    /// Gossip port of the first node (the others follow it); ignored with `http_port` 0.
    pub gossip_port: u16,
    pub replication_factor: usize,
    /// Extra `--set` overrides for every node.
    pub sets: Vec<String>,
}

struct LocalNode {
    id: String,
    dir: PathBuf,
    process: Child,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=NODES_MAX).contains(&opts.nodes),
        "local-cluster runs 1 to {NODES_MAX} nodes, not {}",
        opts.nodes
    );
    anyhow::ensure!(opts.replication_factor >= 1, "--replication-factor must be at least 1");
    let exe = std::env::current_exe().context("cannot find the shoal binary to start nodes with")?;
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let mut children: Vec<LocalNode> = Vec::new();
    let started = start_all(&exe, &opts, &mut children).await;
    let result = match started {
        Ok(addrs) => {
            println!("local cluster of {} nodes (data under {}):", opts.nodes, opts.dir.display());
            for (child, (http, gossip)) in children.iter().zip(&addrs) {
                println!("  {:<8} http://{http}  gossip {gossip}", child.id);
            }
            println!("try: shoal members --node http://{}", addrs[0].0);
            println!("Ctrl-C stops every node (their data stays for the next run)");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            wait_for_stop(&mut children).await
        }
        Err(e) => Err(e),
    };
    stop_all(&mut children).await;
    result
}

/// Starts node 1, then the others seeded by it; returns each one's (HTTP, gossip) address.
async fn start_all(exe: &Path, opts: &Options, children: &mut Vec<LocalNode>) -> anyhow::Result<Vec<(String, String)>> {
    let mut addrs = Vec::new();
    let mut seed: Option<String> = None;
    for i in 1..=opts.nodes {
        let id = format!("node{i}");
        let dir = opts.dir.join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for file in ["http.addr", "gossip.addr"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let port = |base: u16| if opts.http_port == 0 { 0 } else { base + i as u16 - 1 };
        let mut sets = vec![
            format!("shoal.node.id={id}"),
            format!("shoal.data-dir={}", dir.display()),
            format!("shoal.http.port={}", port(opts.http_port)),
            format!("shoal.gossip.port={}", port(opts.gossip_port)),
            format!("shoal.cluster.id=local-{}", std::process::id()),
            format!("shoal.cluster.bootstrap-expect={}", opts.nodes),
            format!("shoal.cluster.replication-factor={}", opts.replication_factor.min(opts.nodes)),
        ];
        if let Some(seed) = &seed {
            sets.push(format!("shoal.cluster.seeds=[\"{seed}\"]"));
        }
        sets.extend(opts.sets.iter().cloned());
        let log = std::fs::File::create(opts.dir.join(format!("{id}.log")))?;
        let mut cmd = Command::new(exe);
        cmd.arg("start");
        for s in &sets {
            cmd.arg("--set").arg(s);
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // SAFETY: prctl only sets a flag of the child about to exec; it allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // The node gets SIGTERM (a clean stop) when this process dies, even by SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let process = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
        children.push(LocalNode { id: id.clone(), dir: dir.clone(), process });
        let child = children.last_mut().expect("just pushed");
        let http = wait_for_file(child, "http.addr", &opts.dir).await?;
        let gossip = wait_for_file(child, "gossip.addr", &opts.dir).await?;
        seed.get_or_insert_with(|| gossip.clone());
        addrs.push((http, gossip));
    }
    Ok(addrs)
}

/// The contents of a file the node writes once it listens, or an error with its log's end.
async fn wait_for_file(child: &mut LocalNode, name: &str, dir: &Path) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(child.dir.join(name))
            && !text.is_empty()
        {
            return Ok(text);
        }
        let log = || {
            let text = std::fs::read_to_string(dir.join(format!("{}.log", child.id))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        if let Some(status) = child.process.try_wait()? {
            anyhow::bail!("{} exited with {status} while starting:\n{}", child.id, log());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} did not start within {START_TIMEOUT:?}:\n{}",
            child.id,
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns on Ctrl-C or SIGTERM (Ok) or when a node exits by itself (an error naming it).
async fn wait_for_stop(children: &mut [LocalNode]) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = poll.tick() => {
                for child in children.iter_mut() {
                    if let Some(status) = child.process.try_wait()? {
                        anyhow::bail!("{} exited with {status}; its log is {}.log", child.id, child.dir.display());
                    }
                }
            }
        }
    }
}

/// SIGTERM to every node still running, then waits for each (SIGKILL after the drain time).
async fn stop_all(children: &mut [LocalNode]) {
    for child in children.iter() {
        // SAFETY: kill only sends a signal to a process id we started.
        unsafe {
            libc::kill(child.process.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for child in children.iter_mut() {
        while matches!(child.process.try_wait(), Ok(None)) {
            if tokio::time::Instant::now() >= deadline {
                let _ = child.process.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.process.wait();
        println!("{} stopped", child.id);
    }
}
