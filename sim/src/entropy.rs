//! Makes the process's own randomness replay from the seed. chitchat picks gossip peers with
//! `rand::rng()` and by iterating std `HashSet`s, whose hash keys are random per thread; both
//! are seeded through the C `getrandom` function. Defining that symbol here (in the simulator's
//! binaries only) replaces libc's, so every draw comes from a PRNG the simulator reseeds at
//! the start of each run (DESIGN.md section 7). Each run also starts on a fresh thread, so
//! thread-local generators and hash keys are drawn anew after the reseed.

use crate::rng::Rng;
use std::sync::Mutex;

static ENTROPY: Mutex<Option<Rng>> = Mutex::new(None);

/// Reseeds the process-wide entropy for a run of `seed`.
pub fn reseed(seed: u64) {
    *ENTROPY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Rng::derive(seed, "entropy"));
}

/// libc's `getrandom(2)` wrapper, replaced: fills `buf` from the seeded PRNG (or from a fixed
/// seed before the first run).
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes, as for libc's function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getrandom(buf: *mut u8, len: usize, _flags: u32) -> isize {
    if len == 0 {
        return 0;
    }
    // SAFETY: the caller passes a buffer valid for `len` bytes (getrandom(2)'s contract).
    let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
    let mut guard = ENTROPY.lock().unwrap_or_else(|e| e.into_inner());
    guard.get_or_insert_with(|| Rng::new(0x5eed)).fill(out);
    len as isize
}
