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
//!
//! On Linux the workers of a thread's own pool are kept off the CPU the caller runs on ([`placement`]): the
//! scheduler often wakes a sleeping worker onto its waker's CPU, where it waits behind the caller until the
//! next load balance (2-3 ms on a 2-vCPU virtual machine), so a call after the pool sat idle ran on one
//! thread, or slower.
//!
//! Decode's items go through [`for_each_init`] and [`map_init`], which run them on torch's OpenMP team when
//! the process has one ([`openmp`]: its workers are still spinning after torch's last op) and on the pool
//! otherwise.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::{Error, Result};

#[cfg(target_os = "linux")]
pub(crate) mod openmp;

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
    /// Where the workers may run, kept off the caller's CPU.
    placement: placement::Placement,
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
            let placement = placement::Placement::default();
            let pool = ThreadPoolBuilder::new()
                .num_threads(num_threads)
                .use_current_thread()
                .thread_name(|i| format!("attnrs-{i}"))
                .start_handler(placement.start_handler())
                .build()
                .ok()?;
            Some(OwnPool {
                pid: std::process::id(),
                size: num_threads,
                pool: Arc::new(pool),
                placement,
            })
        });
        match own {
            // A forked child has this thread but none of the pool's workers.
            Some(o) if o.size == num_threads && o.pid == std::process::id() => {
                o.placement.keep_off_caller_cpu();
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

/// Runs `f(state, i)` for every `i < n` on up to `threads` threads, each thread's `state` made by `init` when
/// it takes its first item; on the calling thread alone when `threads` is 1. The threads are the OpenMP
/// team of [`openmp::run_team`] where there is one, else the pool the caller runs in ([`install`]).
pub(crate) fn for_each_init<S>(
    n: usize,
    threads: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    if n == 0 {
        return;
    }
    if threads <= 1 || n == 1 {
        let mut state = init();
        (0..n).for_each(|i| f(&mut state, i));
        return;
    }
    #[cfg(target_os = "linux")]
    if use_team() {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            let mut state = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(state.get_or_insert_with(&init), i);
            }
        };
        if openmp::run_team(threads.min(n), &work) {
            return;
        }
    }
    (0..n).into_par_iter().for_each_init(init, f);
}

/// Starts noting forks, so that a forked child never enters the OpenMP team (see [`openmp`]); call it when the
/// library loads. A no-op off Linux.
pub fn watch_forks() {
    #[cfg(target_os = "linux")]
    openmp::watch_forks();
}

/// `[f(state, i) for i < n]`, run as [`for_each_init`] runs it.
pub(crate) fn map_init<S, R: Send>(
    n: usize,
    threads: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) -> R + Sync + Send,
) -> Vec<R> {
    let slots: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    for_each_init(n, threads, init, |state, i| {
        let r = f(state, i);
        *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    });
    slots
        .into_iter()
        .map(|slot| {
            let r = slot.into_inner().unwrap_or_else(|p| p.into_inner());
            r.expect("every item ran") // each index in 0..n was taken by exactly one thread
        })
        .collect()
}

/// Whether calls may take the OpenMP team, in tests: a test that clears it (to cover the pool) or depends on
/// it holds [`TEAM_SWITCH`] meanwhile; other tests pass on either path.
#[cfg(test)]
pub(crate) static TEAM_IN_TESTS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);
#[cfg(test)]
pub(crate) static TEAM_SWITCH: Mutex<()> = Mutex::new(());

fn use_team() -> bool {
    #[cfg(test)]
    return TEAM_IN_TESTS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    true
}

/// Keeps a pool's workers off the CPU its caller runs on (Linux; elsewhere a no-op).
///
/// Each worker records its thread id when it starts. On a call, when the caller is on another CPU than at the
/// last call (or a worker has started since), every worker's affinity becomes the caller's own minus the
/// caller's CPU: one `sched_setaffinity` per worker, only then; otherwise the cost is reading the CPU number.
/// A caller allowed a single CPU leaves the workers as they are. The workers stay free among the other CPUs.
mod placement {
    use std::cell::Cell;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    pub(super) struct Placement {
        /// Thread ids of the workers that have started.
        workers: Arc<Mutex<Vec<i32>>>,
        /// The caller's CPU and the number of workers when the affinities were last set.
        applied: Cell<Option<(usize, usize)>>,
    }

    impl Placement {
        /// The pool's start handler: records the starting worker's thread id.
        pub(super) fn start_handler(&self) -> impl Fn(usize) + Send + Sync + 'static {
            let workers = Arc::clone(&self.workers);
            move |_| {
                if let Some(tid) = this_thread_id() {
                    workers.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
                }
            }
        }

        /// Moves the workers off the calling thread's CPU if it (or the set of workers) changed since last time.
        pub(super) fn keep_off_caller_cpu(&self) {
            let Some(cpu) = current_cpu() else { return };
            let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            if self.applied.get() == Some((cpu, workers.len())) {
                return;
            }
            self.applied.set(Some((cpu, workers.len())));
            exclude_cpu(&workers, cpu);
        }

        #[cfg(test)]
        pub(super) fn state(&self) -> (Vec<i32>, Option<(usize, usize)>) {
            (self.workers.lock().unwrap().clone(), self.applied.get())
        }
    }

    #[cfg(target_os = "linux")]
    fn this_thread_id() -> Option<i32> {
        // The raw system call: glibc's gettid() wrapper is newer (2.30) than the manylinux_2_17 wheels' glibc.
        // SAFETY: gettid takes no arguments and cannot fail.
        i32::try_from(unsafe { libc::syscall(libc::SYS_gettid) }).ok()
    }

    #[cfg(target_os = "linux")]
    pub(super) fn current_cpu() -> Option<usize> {
        // SAFETY: sched_getcpu takes no arguments; it returns -1 on failure.
        usize::try_from(unsafe { libc::sched_getcpu() }).ok()
    }

    /// The CPUs thread `tid` (0: the calling thread) may run on.
    #[cfg(target_os = "linux")]
    pub(super) fn allowed_cpus(tid: i32) -> Option<libc::cpu_set_t> {
        // SAFETY: cpu_set_t is plain bits, valid all zero; the kernel writes at most `size_of` bytes into it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            (libc::sched_getaffinity(tid, size, &mut set) == 0).then_some(set)
        }
    }

    /// How many CPUs `set` holds.
    #[cfg(target_os = "linux")]
    pub(super) fn count(set: &libc::cpu_set_t) -> usize {
        // SAFETY: reads the bits of a valid cpu_set_t.
        unsafe { libc::CPU_COUNT(set) as usize }
    }

    /// Whether `set` holds CPU `cpu` (false past CPU_SETSIZE).
    #[cfg(all(test, target_os = "linux"))]
    pub(super) fn holds(set: &libc::cpu_set_t, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET reads bit `cpu` of the set, checked to lie inside it.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, set) }
    }

    /// Lets each of `workers` run where the calling thread may, except on `cpu`; nothing when that leaves no
    /// CPU. A refusal (a worker that exited, a seccomp filter) leaves that worker as it was.
    #[cfg(target_os = "linux")]
    fn exclude_cpu(workers: &[i32], cpu: usize) {
        let Some(mut set) = allowed_cpus(0) else {
            return;
        };
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        // SAFETY: cpu < CPU_SETSIZE, the bits `set` holds.
        unsafe { libc::CPU_CLR(cpu, &mut set) };
        if count(&set) == 0 {
            return;
        }
        for &tid in workers {
            // SAFETY: `set` is a valid cpu_set_t of the size passed; the call only changes thread `tid`'s
            // affinity, and fails harmlessly for a thread id that no longer exists.
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn this_thread_id() -> Option<i32> {
        None
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn current_cpu() -> Option<usize> {
        None
    }

    #[cfg(not(target_os = "linux"))]
    fn exclude_cpu(_: &[i32], _: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item runs exactly once and `map_init` keeps their order, on the calling thread, the OpenMP team
    /// and the pool, with a team thread's state made once; a panic in an item reaches the caller.
    #[test]
    fn items_run_once_on_the_team_and_on_the_pool() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let _switch = TEAM_SWITCH.lock().unwrap_or_else(|p| p.into_inner());
        for team in [true, false] {
            TEAM_IN_TESTS.store(team, Ordering::Relaxed);
            std::thread::spawn(move || {
                for threads in [1usize, 2, 3] {
                    for n in [0usize, 1, 2, 7, 100] {
                        let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        let states = AtomicUsize::new(0);
                        let init = || states.fetch_add(1, Ordering::Relaxed);
                        #[cfg(target_os = "linux")]
                        let regions = openmp::tests::REGIONS.load(Ordering::Relaxed);
                        let out = install(threads, || {
                            map_init(n, threads, init, |_, i| {
                                counts[i].fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(std::time::Duration::from_micros(50));
                                3 * i
                            })
                        })
                        .unwrap();
                        assert_eq!(out, (0..n).map(|i| 3 * i).collect::<Vec<_>>());
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                        let made = states.load(Ordering::Relaxed);
                        // rayon may make a state per piece of work it splits off; a team thread makes one.
                        let most = if team { threads.min(n).max(1) } else { n.max(1) };
                        assert!(made <= most && (n == 0 || made >= 1), "{made} states");
                        #[cfg(target_os = "linux")]
                        if team && threads > 1 && n > 1 {
                            if openmp::tests::available() {
                                assert!(openmp::tests::REGIONS.load(Ordering::Relaxed) > regions);
                            } else {
                                eprintln!("no OpenMP runtime (libgomp.so.1) here: the team path is untested");
                            }
                        }
                    }
                }
                let panicked = std::panic::catch_unwind(|| {
                    install(2, || {
                        for_each_init(8, 2, || (), |_, i| assert!(i != 5, "item five"));
                    })
                });
                let message = *panicked.expect_err("the panic was lost").downcast::<&str>().unwrap();
                assert_eq!(message, "item five");
            })
            .join()
            .unwrap();
        }
        TEAM_IN_TESTS.store(true, Ordering::Relaxed);
    }

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

    #[cfg(target_os = "linux")]
    #[test]
    fn own_pool_workers_keep_off_the_callers_cpu() {
        std::thread::spawn(|| {
            let Some(allowed) = placement::allowed_cpus(0) else {
                return;
            };
            // This thread's own pool's workers and the (caller CPU, workers) the affinities were set for.
            let state = || {
                OWN_POOL.with(|own| {
                    let own = own.borrow();
                    own.as_ref().unwrap().as_ref().unwrap().placement.state()
                })
            };
            // Wait until both workers have started (their start handlers record them).
            let mut started = 0;
            for _ in 0..500 {
                install(3, || ()).unwrap();
                started = state().0.len();
                if started == 2 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            assert_eq!(
                started, 2,
                "the workers' start handlers did not record them"
            );
            install(3, || ()).unwrap();
            let (workers, applied) = state();
            let (cpu, count) = applied.expect("a caller CPU was read");
            assert_eq!(count, 2);
            for tid in workers {
                let set = placement::allowed_cpus(tid).expect("the worker's affinity");
                if placement::count(&allowed) > 1 {
                    assert!(
                        !placement::holds(&set, cpu),
                        "worker {tid} may still run on the caller's CPU {cpu}"
                    );
                    for other in (0..libc::CPU_SETSIZE as usize).filter(|&c| c != cpu) {
                        assert_eq!(
                            placement::holds(&set, other),
                            placement::holds(&allowed, other)
                        );
                    }
                } else {
                    assert!(
                        placement::holds(&set, cpu),
                        "a single allowed CPU must stay allowed"
                    );
                }
            }
        })
        .join()
        .unwrap();
    }
}
