//! Parsing cost of the ingest benchmark's line-protocol bodies (1000 lines, 400 series, 2
//! fields), without HTTP or storage: `cargo bench --bench parse`. Prints ns per line.

use shoal::ingest::{Precision, parse_line_protocol};

const SERIES: usize = 400;

fn body(first_line: usize) -> String {
    let mut out = String::new();
    for k in first_line..first_line + 1000 {
        let (series, v) = (k % SERIES, (k * 37) % 1000);
        let seconds = 1_700_000_000 + k / 400;
        out.push_str(&format!(
            "cpu,host=host_{series},region=r{} usage={}.{},idle={}.{} {seconds}000000000\n",
            series % 4,
            v % 100,
            v % 10,
            (v * 7) % 100,
            (v * 3) % 10
        ));
    }
    out
}

// A benchmark measures wall-clock time; the simulator's paused clock is not involved here.
#[allow(clippy::disallowed_methods)]
fn main() {
    let bodies: Vec<String> = (0..50).map(|i| body(i * 1000)).collect();
    let rounds = 40;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut points = 0;
        for _ in 0..rounds {
            for b in &bodies {
                points += parse_line_protocol(b, "bench", "bench", Precision::Ns, 0, 10_000).unwrap().len();
            }
        }
        let lines = rounds * bodies.len() * 1000;
        assert_eq!(points, 2 * lines);
        println!("parse_line_protocol: {:.0} ns/line", started.elapsed().as_nanos() as f64 / lines as f64);
    }
}
