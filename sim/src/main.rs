//! `shoal-sim`: runs seeds and prints one line per failing seed, then `N passed, M failed`.
//!
//! - `shoal-sim [COUNT] [FIRST] [--skip-regression] [--hashes]`: the regression seeds, then
//!   COUNT seeds from FIRST (default 200 from a seed derived from the time, printed so the run
//!   can be repeated); `--hashes` prints every seed's trace hash;
//! - `SHOAL_SIM_SEED=<seed> shoal-sim`: replays one seed with its event log;
//! - `shoal-sim membership NODES LOSS SEEDS [--detect] [--watch SECONDS] [--phi PHI] [--first SEED]`:
//!   membership figures (convergence, detection of a node killed in steady state, in gossip
//!   rounds; false dead reports) over SEEDS seeds from SEED (default 1).

fn main() {
    // The getrandom override lives in the library; referring to it keeps the linker from
    // dropping it.
    std::hint::black_box(shoal_sim::entropy::getrandom as unsafe extern "C" fn(*mut u8, usize, u32) -> isize);
    if let Ok(seed) = std::env::var("SHOAL_SIM_SEED") {
        let Ok(seed) = seed.parse::<u64>() else {
            eprintln!("SHOAL_SIM_SEED must be an unsigned integer, got {seed:?}");
            std::process::exit(2);
        };
        shoal_sim::prepare(true);
        let report = shoal_sim::run::run_seed(seed, true);
        println!(
            "seed {seed}: trace {:016x}, {} simulated ms, settled after {:?} ms",
            report.trace_hash, report.sim_ms, report.settled_after_ms
        );
        for v in &report.violations {
            println!("VIOLATION: {v}");
        }
        std::process::exit(if report.violations.is_empty() { 0 } else { 1 });
    }
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("membership") {
        membership_figures(&all[1..]);
        return;
    }
    let skip_regression = all.iter().any(|a| a == "--skip-regression");
    let hashes = all.iter().any(|a| a == "--hashes");
    let args: Vec<&String> = all.iter().filter(|a| !a.starts_with("--")).collect();
    let count: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    #[allow(clippy::disallowed_methods)] // only picks the first random seed
    let clock_seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let first: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(clock_seed % 1_000_000_000);
    let regression: &[u64] = if skip_regression { &[] } else { shoal_sim::REGRESSION_SEEDS };
    println!("regression seeds {regression:?}, then {count} seeds from {first}");
    shoal_sim::prepare(false);
    #[allow(clippy::disallowed_methods)] // real time, for the seeds-per-second figure
    let started = std::time::Instant::now();
    let (mut passed, mut failed, mut simulated_ms) = (0u64, 0u64, 0u64);
    for seed in regression.iter().copied().chain(first..first + count) {
        let report = shoal_sim::run::run_seed(seed, false);
        if hashes {
            println!("seed {seed} trace {:016x}", report.trace_hash);
        }
        simulated_ms += report.sim_ms;
        match report.violations.first() {
            None => passed += 1,
            Some(v) => {
                failed += 1;
                println!("seed {seed} FAILED: {v}");
            }
        }
        if report.hung {
            // Its thread still spins and would slow every later seed: stop here.
            println!("stopping after a hung seed");
            break;
        }
    }
    let real = started.elapsed().as_secs_f64();
    println!(
        "{passed} passed, {failed} failed ({:.2} seeds/s, {:.0}x simulated/real time)",
        (passed + failed) as f64 / real,
        simulated_ms as f64 / 1000.0 / real
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn membership_figures(args: &[String]) {
    let positional: Vec<&String> = args.iter().take_while(|a| !a.starts_with("--")).collect();
    let num = |i: usize, default: f64| positional.get(i).and_then(|a| a.parse::<f64>().ok()).unwrap_or(default);
    let (nodes, loss, seeds) = (num(0, 100.0) as usize, num(1, 0.0), num(2, 10.0) as u64);
    let detect = args.iter().any(|a| a == "--detect");
    let phi: f64 = option(args, "--phi").unwrap_or(8.0);
    let watch: u64 = option(args, "--watch").unwrap_or(0);
    let first: u64 = option(args, "--first").unwrap_or(1);
    shoal_sim::prepare(false);
    #[allow(clippy::disallowed_methods)] // real time, for the cost figure
    let started = std::time::Instant::now();
    let (mut converge, mut detected, mut false_dead, mut sampled) = (Vec::new(), Vec::new(), 0, 0);
    for seed in first..first + seeds {
        let f =
            shoal_sim::membership::measure_seed(seed, nodes, loss, phi, detect, std::time::Duration::from_secs(watch));
        println!(
            "seed {seed}: converge {:?} rounds, detect {:?} rounds, false dead {} over {} s",
            f.converge_rounds, f.detect_rounds, f.false_dead, f.sampled_seconds
        );
        converge.push(f.converge_rounds.unwrap_or(f64::INFINITY));
        if detect {
            detected.push(f.detect_rounds.unwrap_or(f64::INFINITY));
        }
        false_dead += f.false_dead;
        sampled += f.sampled_seconds;
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
    };
    println!(
        "{nodes} nodes, loss {loss}, phi {phi}: converge p50 {:.1} p99 {:.1} max {:.1} rounds; detect p50 {:.1} p99 {:.1} max {:.1} rounds; false dead {false_dead} over {sampled} simulated s; {:.1} s real",
        pct(&mut converge, 0.5),
        pct(&mut converge, 0.99),
        pct(&mut converge, 1.0),
        pct(&mut detected, 0.5),
        pct(&mut detected, 0.99),
        pct(&mut detected, 1.0),
        started.elapsed().as_secs_f64()
    );
}

/// The value after `--name` in `args`, parsed.
fn option<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}
