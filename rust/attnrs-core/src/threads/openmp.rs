//! torch's OpenMP team as the threads of a decode call (Linux).
//!
//! After a parallel torch op, the OpenMP runtime's workers spin for some milliseconds waiting for the next
//! region (libgomp's `GOMP_SPINCOUNT`), as they do after every matmul of a model's decode step. attnrs's own
//! pool workers then share the CPUs with them: on a 2-vCPU virtual machine a bf16 decode at Lk 8192 took
//! 2.0 ms right after a torch op, 1.2-1.4 ms with `OMP_WAIT_POLICY=PASSIVE`. Running a decode's items on that
//! team puts the spinning threads to work instead of competing with them.
//!
//! The runtime is used only when the process has loaded one (looked up by soname, never loaded here), outside
//! a parallel region, and not in a child forked after attnrs was loaded ([`watch_forks`]): libgomp's team does
//! not survive `fork`, so a region in such a child waits for threads that are not there (torch's own parallel
//! ops hang in it the same way). A child of a process that used OpenMP but had not loaded attnrs cannot be
//! told apart; there a threaded decode hangs as torch's ops do.

use std::any::Any;
use std::ffi::{CStr, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// The entry points of an OpenMP runtime attnrs calls.
struct Runtime {
    /// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on each thread of a team of (at most)
    /// `num_threads`, the caller among them, and returns when every one has returned.
    parallel: unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint),
    /// `omp_in_parallel()`: nonzero inside an active parallel region.
    in_parallel: unsafe extern "C" fn() -> c_int,
}

/// Runtimes by soname: GNU's (torch's PyPI wheels ship it), LLVM's and Intel's (both implement GNU's entry
/// points).
const SONAMES: [&CStr; 3] = [c"libgomp.so.1", c"libomp.so", c"libiomp5.so"];

/// Set in a child forked after [`watch_forks`].
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn in_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Notes every later `fork` (once per process; the Python module calls it when it loads).
pub(crate) fn watch_forks() {
    static ONCE: Once = Once::new();
    // SAFETY: registers an async-signal-safe child handler (one atomic store), valid for the process's life.
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
    });
}

fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    watch_forks();
    if FORKED.load(Ordering::Relaxed) {
        return None;
    }
    RUNTIME.get_or_init(resolve).as_ref()
}

fn resolve() -> Option<Runtime> {
    #[cfg(test)]
    tests::load_gnu_runtime();
    for name in SONAMES {
        // SAFETY: with RTLD_NOLOAD, dlopen only finds a library already loaded (it maps nothing and runs no
        // initialiser); the handle is kept for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            continue;
        }
        // SAFETY: dlsym on a valid handle with NUL-terminated names; it returns null for a missing symbol.
        let (parallel, in_parallel) = unsafe {
            (
                libc::dlsym(handle, c"GOMP_parallel".as_ptr()),
                libc::dlsym(handle, c"omp_in_parallel".as_ptr()),
            )
        };
        if parallel.is_null() || in_parallel.is_null() {
            continue;
        }
        // SAFETY: these symbols are the runtime's functions with these C signatures (libgomp's ABI since GCC 4.9,
        // `GOMP_4.0`; LLVM's and Intel's runtimes export the same).
        return Some(unsafe {
            Runtime {
                parallel: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint),
                >(parallel),
                in_parallel: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(
                    in_parallel,
                ),
            }
        });
    }
    None
}

/// What every thread of a region runs, and the first panic one of them caught.
struct Region<'a> {
    work: &'a (dyn Fn() + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

extern "C" fn member(data: *mut c_void) {
    // SAFETY: `data` is the `Region` of `run_team`, alive until `GOMP_parallel` returns, which is after every
    // member has returned; members share it through `&` only (the panic slot is behind a mutex).
    let region = unsafe { &*data.cast_const().cast::<Region>() };
    // A panic must not unwind into the C runtime: it is caught here and raised again on the caller.
    if let Err(panic) = catch_unwind(AssertUnwindSafe(region.work)) {
        let mut slot = region.panic.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(panic);
    }
}

/// Runs `work()` once on each thread of an OpenMP team of at most `threads` (the calling thread among them),
/// returning when all have; `false`, having run nothing, when no runtime is usable here. `work` must share
/// its items out itself (the team may be smaller than asked). A panic in `work` is raised again here.
pub(super) fn run_team(threads: usize, work: &(dyn Fn() + Sync)) -> bool {
    let Some(runtime) = runtime() else {
        return false;
    };
    // SAFETY: omp_in_parallel takes no arguments and only reads the calling thread's OpenMP state.
    if unsafe { (runtime.in_parallel)() } != 0 {
        return false; // nested regions run on one thread in libgomp's default: leave it to the pool
    }
    let region = Region {
        work,
        panic: Mutex::new(None),
    };
    let data = std::ptr::from_ref(&region).cast_mut().cast::<c_void>();
    let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
    // SAFETY: `member` never unwinds (it catches panics); `region` outlives the call, which returns only after
    // every member has returned.
    unsafe { (runtime.parallel)(member, data, threads, 0) };
    #[cfg(test)]
    tests::REGIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(panic) = region.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
        std::panic::resume_unwind(panic);
    }
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    /// Parallel regions run through the runtime in this test process.
    pub(crate) static REGIONS: AtomicUsize = AtomicUsize::new(0);

    /// Loads the system's libgomp into the test process (where nothing else loads an OpenMP runtime), so that
    /// the kernel tests run decode on its team when the machine has it (gcc's runtime library).
    pub(super) fn load_gnu_runtime() {
        // SAFETY: loads a shared library by soname; a missing one gives null, which is ignored.
        unsafe { libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOW) };
    }

    /// Whether an OpenMP runtime is usable in this test process.
    pub(crate) fn available() -> bool {
        super::runtime().is_some()
    }
}
