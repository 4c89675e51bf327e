//! The deterministic simulator of a Shoal cluster (issue 7, DESIGN.md section 7): many real
//! nodes in one process, on tokio's paused clock, on one thread; one seed decides every fault
//! and every workload step, and a failing seed replays exactly.
//!
//! Data flows: [`run::run_seed`] reseeds the process's entropy ([`entropy`]), builds a
//! [`cluster::Cluster`] of real `shoal::node::Node`s whose gossip and internal API go through
//! the simulated [`net::Net`], drives the workload and the faults, heals, settles, and checks
//! the invariants.

pub mod cluster;
pub mod disk;
pub mod entropy;
pub mod membership;
pub mod net;
pub mod rng;
pub mod run;

/// Seeds that once found a bug; `cargo test` replays them on every run.
/// - The first five: nodes joining after the only seed node left never joined (the harness
///   now gives each node every other node as a seed, as an operator would).
/// - 1016: a catalog change that could not be persisted (a full disk) stayed in memory while
///   the gossiped digest kept the old value; the node's catalog never converged again.
/// - 1037: a crash left a torn record at the end of a hint log, and hint replay spun on it
///   forever without yielding (the whole node hung).
/// - 795802023: a node left right after a one-way partition healed, while it still saw no peer
///   live; no node could take its shards, it left anyway and took the only copy of 14
///   acknowledged points with it (a write at consistency one while the other replica's disk
///   was full). A leave now retries such shards, and is abandoned rather than finished.
/// - 2089, 2041 (with DELETE in the workload): a replica that had missed a DELETE got its
///   tombstone by the repair exchange and deleted every matching point, also those written
///   after the DELETE; an acknowledged re-insert was lost from every replica. Points now
///   carry their write time, and a DELETE removes only what was written up to it.
/// - 5031, 2016: a re-insert soon after a DELETE was filtered out of hint replay and hand-off
///   by the DELETE's tombstone, and lost when its only holder left (fixed by write times too).
/// - 1006 (with deletes checked strictly): a node that joined later ran its clock behind by
///   its join time (a simulator bug), so a DELETE it coordinated missed points written
///   before it. Clocks now count from the cluster's start; the seed stays for the deletes.
/// - 6007: a DELETE coordinated by a node whose disk was full missed shards of the metric
///   (its catalog could not record their placements) and answered 200. A DELETE now first
///   syncs its metric's part of the catalog with every live member, or fails.
/// - 6050: a write through a node whose clock ran 25 s behind was stamped before an earlier
///   DELETE and taken by it, as last-write-wins says (the simulator now tracks write times).
/// - 796474849: a DELETE through a node cut off from every other (its network paused) synced
///   its shard map with nobody, did not know the shards of a metric created again meanwhile,
///   and answered 200. A DELETE now needs the shard map confirmed by a majority of members.
/// - 795774691 also found that a write accepted by a node that had not heard of a drop goes
///   with the drop (now counted as concurrent with it, see docs/TESTING.md).
/// - 12044, 796496292 (simulator bugs): a crash tore a record onto a WAL file that a newer one
///   had already replaced, which no real power cut can do, and the node refused to restart
///   unnoticed (a failed restart is now a violation); and the trace named the seed's
///   temporary dir, so the same seed gave two trace hashes.
/// - 90012: a DROP through a node cut off from every other answered 200; the node crashed
///   before the drop spread, and when it came back its drop took the points the others had
///   acknowledged since. A DROP now needs a majority, as a DELETE does.
/// - 796590669 (and 1016, 2041 again): with write times kept to the second, a DELETE first
///   waited out its second after its fan-out; one that failed midway answered before its
///   stamp, and writes sent after that answer, stamped in the same second, went with it. The
///   wait now comes before the fan-out.
/// - 444087341: a DELETE through a node restarted a moment before, which heard no other member
///   yet: counting only itself, it was its own majority, confirmed its shard map with nobody,
///   missed a shard placed while it was down and answered 200; the points came back. A node
///   restarted in a cluster now refuses writes, DELETE and DROP until it has compared its
///   catalog with a live peer's (unless its catalog names no other node, or
///   `dead-node-grace` has passed).
pub const REGRESSION_SEEDS: &[u64] = &[
    795774592, 795774684, 795774691, 795774751, 795774760, 1016, 1037, 795802023, 2089, 2041, 5031, 2016, 1006, 6007,
    6050, 796474849, 12044, 796496292, 90012, 796590669, 444087341,
];

/// Sets the process up for simulation: blocking work inline (no thread pool deciding the
/// order of events), file writes through the simulated disk and, when `verbose`, logs from
/// the nodes.
pub fn prepare(verbose: bool) {
    shoal::env::run_blocking_work_inline();
    shoal::env::install_disk_seam(Box::new(disk::SimDisk));
    if verbose {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
    }
}
