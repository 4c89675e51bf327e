//! The seams through which nondeterminism enters a node, so the simulator can drive it: the
//! wall clock ([`Clock`], skewable), blocking work ([`spawn_blocking`], inline under the
//! simulator), the disk ([`write_file`]: full, or crashing before an fsync); the gossip
//! transport, the peer client and the capacity probe come in through `node::NodeIo`.

use std::path::Path;
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

/// The disk as the simulator sees it: it may refuse writes (a full disk), and it learns how
/// much of each append-only log is durable, so that a simulated crash can drop the rest.
/// Production installs none, and writes go straight to the file.
pub trait DiskSeam: Send + Sync + 'static {
    /// How many of `len` bytes may be written under `path` now; fewer than `len` means the
    /// disk filled up part way through the write.
    fn writable(&self, path: &Path, len: usize) -> usize;
    /// The append-only log at `path` is durable up to `len` bytes.
    fn synced(&self, path: &Path, len: u64);
}

static DISK_SEAM: std::sync::OnceLock<Box<dyn DiskSeam>> = std::sync::OnceLock::new();

/// Routes every later file write in this process through `seam` (for the simulator only).
pub fn install_disk_seam(seam: Box<dyn DiskSeam>) {
    let _ = DISK_SEAM.set(seam);
}

/// Writes all of `bytes` to `out`, the file at `path`: every data file write in the node goes
/// through here. A full disk (real, or the simulator's) fails with `StorageFull` after writing
/// a prefix, as a real short write does; the caller cuts that prefix off.
pub fn write_file(out: &mut impl std::io::Write, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(seam) = DISK_SEAM.get() {
        let allowed = seam.writable(path, bytes.len());
        if allowed < bytes.len() {
            out.write_all(&bytes[..allowed])?;
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("no space left on the device writing {}", path.display()),
            ));
        }
    }
    out.write_all(bytes)
}

/// Tells the disk seam that the log at `path` is durable up to `len` bytes.
pub fn log_synced(path: &Path, len: u64) {
    if let Some(seam) = DISK_SEAM.get() {
        seam.synced(path, len);
    }
}
