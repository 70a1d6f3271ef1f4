//! Times the CPU attention kernel on the shapes of the performance targets.
//!
//! `cargo run --release -p attnrs-core --example attn_timing [-- FILTER] [--threads N] [--reps N]`
//!
//! Shapes: B1 H32 Hkv8 D128. Prefill L4096 full, causal (f32, bf16), sliding window 512, 8 packed documents;
//! decode Q=1 over Lk 8192 and 65536 without a mask. Prints the best and median wall time of several runs
//! (at least `--reps`, more for short cases), useful GFLOP/s (4·B·H·D·visible pairs, at the best time), for
//! decode the K+V bytes read per second, and the best and median CPU time per thread (the uncontended
//! estimate when another job shares the cores) with the bandwidth at the best of those.

use std::ops::Range;
use std::time::Instant;

use attnrs_core::block::{BlockClass, CausalTiles, MaskTiles, NoMask};
use attnrs_core::kernel::{attention_forward_with, AttentionArgs, Backend};
use attnrs_core::tensor::{DType, TensorView};
use half::bf16;

/// Causal sliding window: key j visible from row i when i - w < j <= i.
struct Window(usize);

impl MaskTiles for Window {
    fn classify(&self, _: usize, _: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let (r0, r1, c0, c1) = (
            rows.start as i64,
            rows.end as i64 - 1,
            cols.start as i64,
            cols.end as i64 - 1,
        );
        let w = self.0 as i64;
        if c0 > r1 || c1 <= r0 - w {
            BlockClass::Empty
        } else if c1 <= r0 && c0 > r1 - w {
            BlockClass::Full
        } else {
            BlockClass::Partial
        }
    }
    fn fill(&self, _: usize, _: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let width = cols.len();
        for (r, row) in rows.zip(out.chunks_exact_mut(width)) {
            for (c, v) in cols.clone().zip(row.iter_mut()) {
                *v = u8::from(c <= r && c + self.0 > r);
            }
        }
    }
}

/// Packed documents of equal length, causal inside each.
struct Documents(usize);

impl MaskTiles for Documents {
    fn classify(&self, _: usize, _: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let n = self.0;
        let (r0, r1, c0, c1) = (rows.start, rows.end - 1, cols.start, cols.end - 1);
        if c0 > r1 || c1 / n < r0 / n || c0 / n > r1 / n {
            BlockClass::Empty
        } else if r0 / n == r1 / n && c0 / n == r0 / n && c1 / n == r0 / n && c1 <= r0 {
            BlockClass::Full
        } else {
            BlockClass::Partial
        }
    }
    fn fill(&self, _: usize, _: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let width = cols.len();
        for (r, row) in rows.zip(out.chunks_exact_mut(width)) {
            for (c, v) in cols.clone().zip(row.iter_mut()) {
                *v = u8::from(c <= r && c / self.0 == r / self.0);
            }
        }
    }
}

fn tensor(store: &mut Vec<u16>, dtype: DType, shape: [usize; 4], seed: u64) -> TensorView {
    let n: usize = shape.iter().product();
    let words = n * dtype.size() / 2;
    store.resize(words, 0);
    let mut s = seed;
    let mut rnd = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    match dtype {
        DType::F32 => {
            for c in store.chunks_exact_mut(2) {
                let b = rnd().to_bits();
                c[0] = b as u16;
                c[1] = (b >> 16) as u16;
            }
        }
        _ => store
            .iter_mut()
            .for_each(|x| *x = bf16::from_f32(rnd()).to_bits()),
    }
    let strides = vec![
        (shape[1] * shape[2] * shape[3]) as isize,
        (shape[2] * shape[3]) as isize,
        shape[3] as isize,
        1,
    ];
    // SAFETY: `store` holds exactly the elements of a contiguous tensor of `shape` and outlives the view (the
    // caller keeps it alive for the whole run).
    unsafe { TensorView::new(store.as_mut_ptr().cast(), dtype, shape.to_vec(), strides) }.unwrap()
}

struct Case {
    name: String,
    dtype: DType,
    q: usize,
    k: usize,
    mask: Box<dyn MaskTiles>,
    /// Visible (query, key) pairs per head.
    pairs: f64,
}

/// CPU seconds this process has used: the sum over its threads of `/proc/self/task/*/schedstat` (ns
/// resolution), else user + system from `/proc/self/stat` (10 ms ticks); 0 off Linux. Another job sharing the
/// cores stretches wall time but not CPU time, so `cpu / threads` estimates the uncontended time.
fn cpu_seconds() -> f64 {
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

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let opt = |flag: &str, default: usize| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let threads = opt("--threads", 2);
    let reps = opt("--reps", 3);
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
    let (b, h, hkv, d) = (1usize, 32usize, 8usize, 128usize);
    let l = 4096usize;
    let causal_pairs = (l * (l + 1) / 2) as f64;
    let window_pairs: f64 = (0..l).map(|i| (i + 1).min(512) as f64).sum();
    let doc = l / 8;
    let doc_pairs = 8.0 * (doc * (doc + 1) / 2) as f64;
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let tag = if dtype == DType::F32 { "f32" } else { "bf16" };
        let full = (l * l) as f64;
        cases.push(Case {
            name: format!("full L{l} {tag}"),
            dtype,
            q: l,
            k: l,
            mask: Box::new(NoMask),
            pairs: full,
        });
        let causal = Box::new(CausalTiles { diagonal: 0 });
        cases.push(Case {
            name: format!("causal L{l} {tag}"),
            dtype,
            q: l,
            k: l,
            mask: causal,
            pairs: causal_pairs,
        });
        cases.push(Case {
            name: format!("window512 L{l} {tag}"),
            dtype,
            q: l,
            k: l,
            mask: Box::new(Window(512)),
            pairs: window_pairs,
        });
        cases.push(Case {
            name: format!("8docs L{l} {tag}"),
            dtype,
            q: l,
            k: l,
            mask: Box::new(Documents(doc)),
            pairs: doc_pairs,
        });
        for lk in [8192usize, 65536] {
            cases.push(Case {
                name: format!("decode Q1 Lk{lk} {tag}"),
                dtype,
                q: 1,
                k: lk,
                mask: Box::new(NoMask),
                pairs: lk as f64,
            });
        }
    }
    println!(
        "B{b} H{h} Hkv{hkv} D{d}, {threads} threads, backend {:?}, at least {reps} runs",
        backend.resolve(DType::BF16).unwrap()
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "case", "best ms", "med ms", "GFLOP/s", "KV GB/s", "cpu/thr", "cpu med", "cpu GB/s"
    );
    for case in cases.iter().filter(|c| c.name.contains(&filter)) {
        let (mut sq, mut sk, mut sv, mut so, mut sl) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let q = tensor(&mut sq, case.dtype, [b, h, case.q, d], 1);
        let k = tensor(&mut sk, case.dtype, [b, hkv, case.k, d], 2);
        let v = tensor(&mut sv, case.dtype, [b, hkv, case.k, d], 3);
        let out = tensor(&mut so, case.dtype, [b, h, case.q, d], 4);
        sl.resize(b * h * case.q * 2, 0u16);
        // SAFETY: `sl` holds b·h·q f32 values and outlives the view.
        let lse = unsafe {
            TensorView::new(
                sl.as_mut_ptr().cast(),
                DType::F32,
                vec![b, h, case.q],
                vec![(h * case.q) as isize, case.q as isize, 1],
            )
        }
        .unwrap();
        let args = AttentionArgs {
            query: &q,
            key: &k,
            value: &v,
            out: &out,
            lse: Some(&lse),
            mask: case.mask.as_ref(),
            bias: None,
            scale: 1.0 / (d as f64).sqrt(),
            softcap: None,
            sinks: None,
            dropout: None,
            num_threads: threads,
        };
        attention_forward_with(&args, backend).unwrap(); // warm-up (pools, page faults)
                                                         // Short cases repeat more, so that each is timed over at least ~0.3 s in all.
        let t = Instant::now();
        attention_forward_with(&args, backend).unwrap();
        let once = t.elapsed().as_secs_f64();
        let reps = reps.max(1).max((0.3 / once) as usize).min(200);
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        for _ in 0..reps {
            let (t, c) = (Instant::now(), cpu_seconds());
            attention_forward_with(&args, backend).unwrap();
            walls.push(t.elapsed().as_secs_f64());
            cpus.push((cpu_seconds() - c) / threads as f64);
        }
        walls.sort_by(f64::total_cmp);
        cpus.sort_by(f64::total_cmp);
        let (best, median) = (walls[0], walls[reps / 2]);
        let (cpu, cpu_med) = (cpus[0], cpus[reps / 2]);
        let flops = 4.0 * (b * h * d) as f64 * case.pairs;
        let kv_bytes = (2 * b * hkv * case.k * d * case.dtype.size()) as f64;
        let gbs = |t: f64| {
            if case.q == 1 {
                format!("{:>9.1}", kv_bytes / t / 1e9)
            } else {
                format!("{:>9}", "-")
            }
        };
        println!(
            "{:<24} {:>9.2} {:>9.2} {:>9.1} {} {:>9.2} {:>9.2} {}",
            case.name,
            best * 1e3,
            median * 1e3,
            flops / best / 1e9,
            gbs(best),
            cpu * 1e3,
            cpu_med * 1e3,
            gbs(cpu),
        );
    }
}
