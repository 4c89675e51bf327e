//! The deterministic simulator of a Shoal cluster (issue 7, DESIGN.md section 7): many real
//! nodes in one process, on tokio's paused clock, on one thread; one seed decides every fault
//! and every workload step, and a failing seed replays exactly.
//!
//! Data flows: [`run::run_seed`] reseeds the process's entropy ([`entropy`]), builds a
//! [`cluster::Cluster`] of real `shoal::node::Node`s whose gossip and internal API go through
//! the simulated [`net::Net`], drives the workload and the faults, heals, settles, and checks
//! the invariants.

pub mod cluster;
pub mod entropy;
pub mod membership;
pub mod net;
pub mod rng;
pub mod run;

/// Seeds that once found a bug; `cargo test` replays them on every run. The first five
/// found that nodes joining after the only seed node left never joined (the harness now gives
/// each node every other node as a seed, as an operator would).
pub const REGRESSION_SEEDS: &[u64] = &[795774592, 795774684, 795774691, 795774751, 795774760];

/// Sets the process up for simulation: blocking work inline (no thread pool deciding the
/// order of events) and, when `verbose`, logs from the nodes.
pub fn prepare(verbose: bool) {
    shoal::env::run_blocking_work_inline();
    if verbose {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
    }
}
