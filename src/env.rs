//! The seams through which nondeterminism enters a node, so the simulator can drive it: the
//! wall clock ([`Clock`], skewable), blocking work ([`spawn_blocking`] and
//! [`spawn_background`], inline under the simulator), the disk ([`write_file`]: full, or
//! crashing before an fsync); the gossip transport, the peer client and the capacity probe
//! come in through `node::NodeIo`.

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

/// How many threads one scan of a shard may use: the cores (at most 4), or 1 under the
/// simulator, where threads of their own would make runs depend on the OS scheduler.
pub fn scan_threads() -> usize {
    if BLOCKING_INLINE.load(std::sync::atomic::Ordering::Relaxed) {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// How much CPU background work (compaction, segment merges) may take from the work that
/// requests wait for (`shoal.storage.compaction-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundPriority {
    /// Linux `SCHED_IDLE`: runs when a core would otherwise be idle (and gets a sliver of CPU
    /// when none is), so it never delays a request.
    Idle,
    /// Nice 19: yields to the node's other threads, but keeps a small share under full load.
    Low,
    /// The same as request work.
    Normal,
}

static BACKGROUND_PRIORITY: std::sync::Mutex<BackgroundPriority> = std::sync::Mutex::new(BackgroundPriority::Low);
static BACKGROUND_POOL: std::sync::OnceLock<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>> =
    std::sync::OnceLock::new();

/// Sets the priority of the background threads; only before the first [`spawn_background`]
/// (the threads keep the priority they start with: an unprivileged thread cannot raise its
/// priority again).
pub fn set_background_priority(priority: BackgroundPriority) {
    let mut current = BACKGROUND_PRIORITY.lock().expect("background priority lock");
    if BACKGROUND_POOL.get().is_some() && *current != priority {
        tracing::warn!(?priority, running = ?*current, "the background threads run already; their priority stays");
    }
    *current = priority;
}

/// Runs CPU-heavy work that no request waits for on the node's background threads, whose
/// lower CPU priority keeps the writes and queries running beside it fast: compaction on
/// tokio's blocking pool took turns with the request threads on a busy core, and a request
/// behind it waited a whole scheduler slice. Inline under the simulator.
///
/// A shard writer does wait for a compaction when its memtable reaches twice its limit, and
/// flush, delete and shutdown wait for theirs: the writer then takes no CPU itself, which is
/// what the compaction gets instead.
///
/// The queue has no bound of its own: each shard writer has at most one job in it.
pub fn spawn_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, BackgroundPanicked>> {
    let (done, result) = tokio::sync::oneshot::channel();
    let job = move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = done.send(outcome.map_err(|_| BackgroundPanicked));
    };
    if BLOCKING_INLINE.load(std::sync::atomic::Ordering::Relaxed) {
        job();
    } else {
        let pool = BACKGROUND_POOL.get_or_init(start_background_pool);
        pool.send(Box::new(job)).expect("background threads run as long as the process");
    }
    async move { result.await.unwrap_or(Err(BackgroundPanicked)) }
}

#[derive(Debug, thiserror::Error)]
#[error("background work panicked")]
pub struct BackgroundPanicked;

/// One thread per core (eight at most): background work uses all the idle CPU there is.
fn start_background_pool() -> std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>> {
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let priority = *BACKGROUND_PRIORITY.lock().expect("background priority lock");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    for i in 0..threads {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("shoal-background-{i}"))
            .spawn(move || {
                lower_thread_priority(priority);
                loop {
                    let job = rx.lock().expect("background queue lock").recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })
            .expect("cannot start a background thread");
    }
    tx
}

/// Applies `priority` to the calling thread (Linux schedules threads one by one; elsewhere
/// background work runs at normal priority).
fn lower_thread_priority(priority: BackgroundPriority) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: both calls take plain values (and a pointer to one that outlives the call)
        // and change only the calling thread's scheduling.
        let failed = unsafe {
            match priority {
                BackgroundPriority::Idle => {
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0
                }
                BackgroundPriority::Low => libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0,
                BackgroundPriority::Normal => false,
            }
        };
        if failed {
            tracing::warn!(?priority, error = %std::io::Error::last_os_error(), "cannot lower the priority of a background thread");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
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
