//! How much memory attnrs may ask for, and allocation that fails with an error instead of aborting.
//!
//! Every size that leads to a large allocation (a block layout, a bitmap, a dense mask) is checked against
//! [`budget`] before anything is allocated, so a request the machine cannot hold is an [`Error::Value`]
//! naming the argument and the size it would need. What remains possible (the budget is an estimate) goes
//! through [`zeroed`] / [`reserve`], whose failure is an [`Error::OutOfMemory`], never Rust's abort.

use std::sync::OnceLock;

use crate::{Error, Result};

/// The most bytes one request may need: the smallest of the machine's physical memory, the cgroup's
/// memory limit and the process's address-space and data limits (Linux; elsewhere only `isize::MAX`), read
/// once per process (a limit set later is not seen).
pub fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        [physical_memory(), cgroup_limit(), address_space_limit()]
            .into_iter()
            .flatten()
            .fold(isize::MAX as usize, usize::min)
    })
}

/// `MemTotal` of `/proc/meminfo`.
fn physical_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// cgroup v2 `memory.max` or v1 `memory.limit_in_bytes` ("max" and absurd v1 values mean no limit).
fn cgroup_limit() -> Option<usize> {
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| std::fs::read_to_string(path).ok()?.trim().parse().ok())
    .min()
}

/// The smaller soft limit of `/proc/self/limits`' "Max address space" and "Max data size"
/// (`setrlimit(RLIMIT_AS / RLIMIT_DATA)`), when either is set.
fn address_space_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    ["Max address space", "Max data size"]
        .iter()
        .filter_map(|name| {
            let line = text.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].split_whitespace().next()?.parse().ok()
        })
        .min()
}

/// Bytes as a short human-readable size ("1.5 GiB").
pub fn human(bytes: usize) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `Ok` if `bytes` (None: more than `usize` can count) fits in the [`budget`]; else an [`Error::Value`]
/// naming `arg`, saying what needs the memory (`what`, e.g. "a block layout of 2^40 blocks") and how much.
pub fn check(arg: &str, what: &str, bytes: Option<usize>) -> Result<()> {
    let budget = budget();
    match bytes {
        Some(n) if n <= budget => Ok(()),
        Some(n) => Err(Error::value(
            arg,
            format!("sizes whose memory fits here (at most {})", human(budget)),
            format!("{what}, which needs {}", human(n)),
        )),
        None => Err(Error::value(
            arg,
            format!("sizes whose memory fits here (at most {})", human(budget)),
            format!("{what}, which needs more bytes than a 64-bit size can count"),
        )),
    }
}

/// `a * b * ...`, or None if it overflows.
pub fn product(factors: &[usize]) -> Option<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
}

/// A vector of `len` default values, or [`Error::OutOfMemory`] if the allocator refuses.
pub fn zeroed<T: Clone + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    reserve(&mut v, len, what)?;
    v.resize(len, T::default());
    Ok(v)
}

/// Makes room for `extra` more elements in `v`, or [`Error::OutOfMemory`] if the allocator refuses.
pub fn reserve<T>(v: &mut Vec<T>, extra: usize, what: &str) -> Result<()> {
    v.try_reserve(extra).map_err(|_| Error::OutOfMemory {
        what: what.to_owned(),
        bytes: extra.saturating_mul(std::mem::size_of::<T>()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_positive_and_bounded_by_the_address_space() {
        let b = budget();
        assert!(b > 1 << 20 && b <= isize::MAX as usize, "{b}");
    }

    #[test]
    fn checks_name_the_argument_and_the_size() {
        assert!(check("BLOCK_SIZE", "x", Some(1024)).is_ok());
        let e = check("BLOCK_SIZE", "a layout of 3 blocks", Some(usize::MAX)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("BLOCK_SIZE: expected sizes whose memory fits here"),
            "{text}"
        );
        assert!(
            text.contains("a layout of 3 blocks, which needs 16.0 EiB"),
            "{text}"
        );
        let e = check("Q_LEN", "a mask", None).unwrap_err().to_string();
        assert!(e.contains("more bytes than a 64-bit size can count"), "{e}");
        assert!(matches!(
            check("x", "y", Some(usize::MAX)),
            Err(Error::Value { .. })
        ));
    }

    #[test]
    fn failed_allocations_are_errors() {
        let e = zeroed::<u64>(usize::MAX / 4, "a test table").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
        assert!(e.to_string().contains("a test table"), "{e}");
        assert_eq!(zeroed::<i32>(3, "t").unwrap(), vec![0, 0, 0]);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(product(&[2, 3, 4]), Some(24));
        assert_eq!(product(&[usize::MAX, 2]), None);
    }
}
