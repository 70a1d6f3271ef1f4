//! Private rayon pools, sized by the caller.
//!
//! A library must not own the global pool: the host application (or torch) may size it differently. Each
//! calling thread gets its own pool on its first call ([`install`]): the caller itself as worker 0 (rayon's
//! `use_current_thread`) plus `n - 1` workers. A call then starts on the caller's thread with no hand-off:
//! handing the work to a pool thread and sleeping until it is done costs two wake-ups per call, 60-240 µs on a
//! virtual machine between calls (more than a whole short decode step). A thread asking for another size, a
//! thread already inside a rayon pool, and a forked child use the shared pools, cached per thread count.
//! After `fork` the child has none of the parent's worker threads, so a shared pool is only reused in the
//! process that built it; a child builds its own (and leaks the parent's, whose threads do not exist there).

use std::cell::RefCell;
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

/// A thread's own pool: the thread itself as worker 0 and `size - 1` workers, in process `pid`.
struct OwnPool {
    pid: u32,
    size: usize,
    pool: Arc<ThreadPool>,
}

thread_local! {
    /// This thread's own pool, once built (`None` inside: building it failed, use the shared pools).
    static OWN_POOL: RefCell<Option<Option<OwnPool>>> = const { RefCell::new(None) };
}

/// The calling thread's own pool if it has (or can build) one of `num_threads` workers in this process.
fn own_pool(num_threads: usize) -> Option<Arc<ThreadPool>> {
    OWN_POOL.with(|own| {
        let mut own = own.borrow_mut();
        let own = own.get_or_insert_with(|| {
            if rayon::current_thread_index().is_some() {
                return None; // a worker of another pool (rayon would refuse): stay on the shared pools
            }
            let pool = ThreadPoolBuilder::new()
                .num_threads(num_threads)
                .use_current_thread()
                .thread_name(|i| format!("attnrs-{i}"))
                .build()
                .ok()?;
            Some(OwnPool {
                pid: std::process::id(),
                size: num_threads,
                pool: Arc::new(pool),
            })
        });
        match own {
            // A forked child has this thread but none of the pool's workers.
            Some(o) if o.size == num_threads && o.pid == std::process::id() => {
                Some(Arc::clone(&o.pool))
            }
            _ => None,
        }
    })
}

/// Runs `f` inside a pool of `num_threads` workers (at least one): the calling thread's own pool when it
/// has that size (`f` then runs on the calling thread), else the shared pool of that size.
pub fn install<R: Send>(num_threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let num_threads = num_threads.max(1);
    match own_pool(num_threads) {
        Some(own) => Ok(own.install(f)),
        None => Ok(pool(num_threads)?.install(f)),
    }
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

    #[test]
    fn a_thread_runs_its_calls_in_its_own_pool() {
        std::thread::spawn(|| {
            let caller = std::thread::current().id();
            let on_caller = || std::thread::current().id() == caller;
            // The first size this thread asks for: its own pool, entered on this thread, nested calls too.
            assert_eq!(install(3, rayon::current_num_threads).unwrap(), 3);
            assert!(install(3, on_caller).unwrap());
            assert!(install(3, || install(3, on_caller).unwrap()).unwrap());
            // Work still spreads over the pool's workers.
            let threads: std::collections::HashSet<_> = install(3, || {
                use rayon::prelude::*;
                (0..64)
                    .into_par_iter()
                    .map(|_| {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        std::thread::current().id()
                    })
                    .collect()
            })
            .unwrap();
            assert!(threads.len() > 1, "one thread did all the work");
            // Another size: a shared pool of that size, off this thread.
            assert_eq!(install(2, rayon::current_num_threads).unwrap(), 2);
            assert!(!install(2, on_caller).unwrap());
            assert!(!install(0, on_caller).unwrap());
            assert_eq!(install(0, rayon::current_num_threads).unwrap(), 1);
        })
        .join()
        .unwrap();
        // A worker of a shared pool asking for its own: the shared pool of that size.
        let inner = pool(2)
            .unwrap()
            .install(|| install(4, rayon::current_num_threads).unwrap());
        assert_eq!(inner, 4);
    }
}
