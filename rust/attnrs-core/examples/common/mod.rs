//! What the timing examples share: one flag convention, test tensors, the masks by name and CPU time.
//!
//! Flags (every example): `[FILTER] [--threads N] [--reps N] [--len N] [--bf16] [--full | --window N]`.
//! `FILTER` picks cases by name, `--len` the sequence length, `--bf16` bf16 inputs (f32 otherwise),
//! `--full` no mask and `--window N` a causal sliding window of `N` keys (causal otherwise); an example
//! that runs a fixed set of cases ignores what does not apply to it. `ATTNRS_BACKEND` (`portable`, `avx2`,
//! `avx512`) forces a kernel path.

#![allow(dead_code)] // each example uses part of this

use attnrs_core::kernel::Backend;
use attnrs_core::mask::tiles::{MaskTiles, NoMask};
use attnrs_core::mask::{MaskExpr, PlacedMask};
use attnrs_core::tensor::{DType, TensorView};
use half::bf16;

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Flags {
    pub filter: String,
    pub threads: usize,
    pub reps: usize,
    pub len: usize,
    pub dtype: DType,
    pub mask: Mask,
    pub backend: Backend,
}

/// The mask of `--full`, `--window N` or the default (causal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    Causal,
    Full,
    Window(usize),
}

impl Mask {
    /// The mask as the kernels take it, built from the mask expressions.
    pub fn tiles(self) -> Box<dyn MaskTiles> {
        match self {
            Mask::Full => Box::new(NoMask),
            Mask::Causal => Box::new(PlacedMask::new(MaskExpr::causal(), 0, 0)),
            Mask::Window(w) => Box::new(PlacedMask::new(
                MaskExpr::sliding_window(w as i64, true).unwrap(),
                0,
                0,
            )),
        }
    }

    /// Visible (query, key) pairs per head of a square `l × l` grid.
    pub fn pairs(self, l: usize) -> f64 {
        match self {
            Mask::Full => (l * l) as f64,
            Mask::Causal => (l * (l + 1) / 2) as f64,
            Mask::Window(w) => (0..l).map(|i| (i + 1).min(w)).sum::<usize>() as f64,
        }
    }

    pub fn name(self) -> String {
        match self {
            Mask::Full => "full".into(),
            Mask::Causal => "causal".into(),
            Mask::Window(w) => format!("window{w}"),
        }
    }
}

impl Flags {
    /// Parses `std::env::args()`; `reps` and `len` default to the example's own values.
    pub fn parse(reps: usize, len: usize) -> Flags {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let opt = |flag: &str, default: usize| {
            argv.iter()
                .position(|a| a == flag)
                .and_then(|i| argv.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let window = opt("--window", 0);
        let mask = if argv.iter().any(|a| a == "--full") {
            Mask::Full
        } else if window > 0 {
            Mask::Window(window)
        } else {
            Mask::Causal
        };
        let filter = argv
            .iter()
            .find(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
            .cloned()
            .unwrap_or_default();
        let backend = match std::env::var("ATTNRS_BACKEND").as_deref() {
            Ok("portable") => Backend::Portable,
            Ok("avx2") => Backend::Avx2,
            Ok("avx512") => Backend::Avx512,
            _ => Backend::Auto,
        };
        Flags {
            filter,
            threads: opt("--threads", 2),
            reps: opt("--reps", reps).max(1),
            len: opt("--len", len),
            dtype: if argv.iter().any(|a| a == "--bf16") {
                DType::BF16
            } else {
                DType::F32
            },
            mask,
            backend,
        }
    }
}

/// A contiguous tensor of `shape` over `store` (random values in [-1, 1) for f32 and bf16; the store is
/// zeroed for other dtypes).
pub fn tensor(store: &mut Vec<u32>, dtype: DType, shape: &[usize], seed: u64) -> TensorView {
    let n: usize = shape.iter().product();
    store.clear();
    store.resize((n * dtype.size()).div_ceil(4), 0);
    let mut s = seed;
    let mut rnd = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    match dtype {
        DType::F32 => store.iter_mut().for_each(|x| *x = rnd().to_bits()),
        DType::BF16 => store.iter_mut().for_each(|x| {
            *x = u32::from(bf16::from_f32(rnd()).to_bits())
                | (u32::from(bf16::from_f32(rnd()).to_bits()) << 16)
        }),
        _ => {}
    }
    let mut strides = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as isize;
    }
    // SAFETY: `store` holds at least the elements of a contiguous tensor of `shape` and outlives the view
    // (the caller keeps it alive for the whole run).
    unsafe { TensorView::new(store.as_mut_ptr().cast(), dtype, shape.to_vec(), strides) }.unwrap()
}

/// CPU seconds this process has used: the sum over its threads of `/proc/self/task/*/schedstat` (ns
/// resolution), else user + system from `/proc/self/stat` (10 ms ticks); 0 off Linux. Another job sharing the
/// cores stretches wall time but not CPU time, so `cpu / threads` estimates the uncontended time.
pub fn cpu_seconds() -> f64 {
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let ns: u64 = tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        if ns > 0 {
            return ns as f64 * 1e-9;
        }
    }
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15) in USER_HZ = 100
}
