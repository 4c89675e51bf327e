//! The seams through which nondeterminism enters a node: wall-clock time today, and (as the
//! cluster issues land) randomness, the gossip transport, the peer client and the capacity probe.
//! Production code reads the time only through [`Clock`], so the simulator can skew it.

use std::sync::Arc;

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time in epoch milliseconds: used for `NOW` in queries and points sent without
    /// a timestamp.
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        #[allow(clippy::disallowed_methods)] // the one sanctioned read of the system clock
        let now = std::time::SystemTime::now();
        now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }
}

/// A fixed, settable clock for tests.
#[derive(Default)]
pub struct ManualClock(pub std::sync::atomic::AtomicI64);

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Everything a node takes from its environment.
#[derive(Clone)]
pub struct Env {
    pub clock: Arc<dyn Clock>,
}

impl Env {
    pub fn production() -> Self {
        Self { clock: Arc::new(SystemClock) }
    }
}

/// Set by the simulator: blocking work runs inline on the calling task instead of tokio's
/// blocking pool, whose threads would make the order of events depend on the OS scheduler.
static BLOCKING_INLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every later [`spawn_blocking`] in this process run inline (for the simulator only).
pub fn run_blocking_work_inline() {
    BLOCKING_INLINE.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Runs file I/O and other blocking work off the async threads (tokio's blocking pool), or
/// inline under the simulator. Every blocking call in the node goes through here.
pub fn spawn_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> tokio::task::JoinHandle<T> {
    if BLOCKING_INLINE.load(std::sync::atomic::Ordering::Relaxed) {
        let value = f();
        tokio::spawn(async move { value })
    } else {
        tokio::task::spawn_blocking(f)
    }
}
