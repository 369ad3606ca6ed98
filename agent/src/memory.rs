//! Keeping the agent's resident memory to what it holds.
//!
//! Every datastore change builds a new snapshot and drops the old one: at
//! scale (1,000 pods, 500 policies, 1,000 services) that frees megabytes
//! at a time. glibc's malloc keeps freed memory in its arenas, and makes an
//! arena per thread that allocates (up to 8 per core), so without help the
//! agent's RSS grows with each rebuild and with every runtime thread, for
//! memory it no longer uses. Two fixes, both glibc-only (other C libraries
//! compile these to nothing):
//! - [`limit_arenas`] at start: one arena, enough for an agent whose hot
//!   paths are in the kernel. With two, where the datastore's thread (which
//!   parses every object) and the runtime's threads landed differed from
//!   run to run, and so did malloc's memory: at 1,000 pods 15 to 21 MiB
//!   once loaded, the larger whenever the datastore had the second arena
//!   to itself; with one, 18.3-18.9 MiB in every run;
//! - [`Trimmer`]: after snapshots change, at most once per `every`, hand
//!   the arenas' free pages back to the kernel (`malloc_trim`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Caps glibc's malloc arenas at one. Call before other threads start.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc tunable; called before the
    // process has other threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the free pages of every arena to the kernel; true when some
/// were.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim walks malloc's own free lists under its locks.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Trims after memory was freed in bulk, at most once per interval: a
/// burst of datastore events costs one trim, not one per event.
#[derive(Clone, Default)]
pub struct Trimmer {
    dirty: Arc<AtomicBool>,
}

impl Trimmer {
    /// Notes that a large structure was replaced.
    pub fn freed(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Trims every `every` while something was freed since the last trim.
    pub async fn run(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.dirty.swap(false, Ordering::Relaxed) {
                // A blocking thread: trimming tens of megabytes takes a few
                // milliseconds, which a runtime worker should not spend.
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Freed small allocations between live ones stay resident (malloc
    /// can only shrink the top of a heap by itself); a trim gives their
    /// pages back.
    #[test]
    fn trim_returns_freed_heap_to_the_kernel() {
        // 100,000 blocks of 512 bytes (below the mmap threshold, so on the
        // heap), touched; every 100th stays alive, so the freed ones lie
        // between live blocks, as a dropped snapshot's do.
        let mut blocks: Vec<Option<Vec<u8>>> = (0..100_000).map(|i| Some(vec![i as u8; 512])).collect();
        for (i, b) in blocks.iter_mut().enumerate() {
            if i % 100 != 0 {
                *b = None;
            }
        }
        let before = rss_kib();
        assert!(trim(), "malloc_trim released nothing");
        let after = rss_kib();
        // About 50 MB were freed; most of it is whole pages.
        assert!(
            before.saturating_sub(after) > 20_000,
            "RSS {before} KiB after the frees, {after} KiB after the trim"
        );
        assert_eq!(blocks.iter().flatten().count(), 1_000);
    }

    #[tokio::test]
    async fn the_trimmer_trims_once_per_burst() {
        let t = Trimmer::default();
        t.freed();
        t.freed();
        assert!(t.dirty.load(Ordering::Relaxed));
        let task = tokio::spawn(t.clone().run(Duration::from_millis(20)));
        let start = std::time::Instant::now();
        while t.dirty.load(Ordering::Relaxed) {
            assert!(start.elapsed() < Duration::from_secs(10), "never trimmed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task.abort();
    }
}
