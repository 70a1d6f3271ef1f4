//! Private rayon pools, sized by the caller.
//!
//! A library must not own the global pool: the host application (or torch) may size it differently. Pools
//! are cached per thread count. After `fork` the child has none of the parent's worker threads, so a pool
//! is only reused in the process that built it; a child builds its own (and leaks the parent's, whose
//! threads do not exist there).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::{Error, Result};

struct Pools {
    pid: u32,
    by_size: HashMap<usize, Arc<ThreadPool>>,
}

fn pools() -> &'static Mutex<Pools> {
    static POOLS: OnceLock<Mutex<Pools>> = OnceLock::new();
    POOLS.get_or_init(|| {
        Mutex::new(Pools {
            pid: std::process::id(),
            by_size: HashMap::new(),
        })
    })
}

/// The pool with `num_threads` workers (at least one), built on first use in this process.
pub fn pool(num_threads: usize) -> Result<Arc<ThreadPool>> {
    let num_threads = num_threads.max(1);
    // A poisoned lock only means another thread panicked while holding it; the map is still valid.
    let mut pools = pools()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if pools.pid != pid {
        // We are a forked child: the cached pools' threads live only in the parent.
        let stale = std::mem::take(&mut pools.by_size);
        std::mem::forget(stale);
        pools.pid = pid;
    }
    if let Some(pool) = pools.by_size.get(&num_threads) {
        return Ok(Arc::clone(pool));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .thread_name(|i| format!("attnrs-{i}"))
        .build()
        .map_err(|e| {
            // The OS refused (a thread limit, memory): the environment's doing, not an attnrs bug.
            Error::value(
                "num_threads (ATTNRS_NUM_THREADS or torch.get_num_threads())",
                "a number of worker threads the OS can start",
                format!("{num_threads}, which failed: {e}"),
            )
        })?;
    let pool = Arc::new(pool);
    pools.by_size.insert(num_threads, Arc::clone(&pool));
    Ok(pool)
}

/// Worker threads of the pool the caller runs in (the global pool's size outside any pool).
pub fn current_num_threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` inside the pool of `num_threads` workers.
pub fn install<R: Send>(num_threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(pool(num_threads)?.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_cached_and_sized() {
        let a = pool(3).unwrap();
        let b = pool(3).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 3);
        assert_eq!(install(2, rayon::current_num_threads).unwrap(), 2);
        assert_eq!(pool(0).unwrap().current_num_threads(), 1);
    }
}
