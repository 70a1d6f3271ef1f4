//! Times the CPU attention kernel's forward on the shapes of the performance targets.
//!
//! `cargo run --release -p attnrs-core --example attn_timing [-- FILTER] [--threads N] [--reps N] [--len N]`
//! (the flags of every timing example: see `common/mod.rs`; `--bf16`, `--full` and `--window` do not apply,
//! the case list has both dtypes and every mask).
//!
//! Shapes: B1 H32 Hkv8 D128. Prefill L (`--len`, 4096) full, causal, sliding window 512, 8 packed documents,
//! f32 and bf16; decode Q=1 over Lk 1024, 8192 and 65536 without a mask. Prints the best and median wall time of
//! several runs (at least `--reps`, more for short cases), useful GFLOP/s (4·B·H·D·visible pairs, at the best
//! time), for decode the K+V bytes read per second, and the best and median CPU time per thread (the
//! uncontended estimate when another job shares the cores) with the bandwidth at the best of those.
//!
//! Each timed decode run follows one pass of a streaming read of 512 MiB with the same threads. That pass
//! evicts K and V from the caches (a model's decode finds a layer's K/V in memory, not in cache), and its rate
//! is the memory bandwidth of that moment: the `probe` column is the median over runs of decode's K/V rate
//! divided by the pass just before it, so the host's drifting bandwidth cancels (the best probe pass is
//! printed first). Short decode cases run at most 60 times, as each pass costs ~15 ms.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use attnrs_core::kernel::{AttentionArgs, attention_forward_with};
use attnrs_core::mask::tiles::{MaskTiles, NoMask};
use attnrs_core::mask::{MaskExpr, PlacedMask};
use attnrs_core::tensor::DType;
use common::{Flags, Mask, cpu_seconds, tensor};

struct Case {
    name: String,
    dtype: DType,
    q: usize,
    k: usize,
    mask: Box<dyn MaskTiles>,
    /// Visible (query, key) pairs per head.
    pairs: f64,
}

/// `n` packed documents of equal length over `l` positions, causal inside each.
fn documents(l: usize, n: usize) -> Box<dyn MaskTiles> {
    let ids: Vec<i64> = (0..l).map(|i| (i / (l / n)) as i64).collect();
    let expr = MaskExpr::and([MaskExpr::causal(), MaskExpr::document(&ids, 1, l).unwrap()]);
    Box::new(PlacedMask::new(expr, 0, 0))
}

/// A buffer larger than any last-level cache, read by [`StreamingRead::pass`].
struct StreamingRead {
    buf: Vec<u64>,
    threads: usize,
}

impl StreamingRead {
    fn new(threads: usize) -> StreamingRead {
        let words = 512usize << 17; // 512 MiB of u64 words, every page touched here
        StreamingRead {
            buf: (0..words as u64).collect(),
            threads,
        }
    }

    /// One read of the whole buffer split among the threads, in GB/s.
    fn pass(&self) -> f64 {
        let chunk = self.buf.len().div_ceil(self.threads);
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = self
                .buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        // Eight independent sums, so the adds never limit the read.
                        let mut acc = [0u64; 8];
                        for w in part.chunks_exact(8) {
                            for (a, &x) in acc.iter_mut().zip(w) {
                                *a = a.wrapping_add(x);
                            }
                        }
                        acc.iter().fold(0u64, |a, &x| a.wrapping_add(x))
                    })
                })
                .collect();
            parts
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        (self.buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    }
}

fn main() {
    let flags = Flags::parse(3, 4096);
    let (threads, backend, l) = (flags.threads, flags.backend, flags.len);
    let (b, h, hkv, d) = (1usize, 32usize, 8usize, 128usize);
    let doc = l / 8;
    let doc_pairs = 8.0 * (doc * (doc + 1) / 2) as f64;
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let tag = if dtype == DType::F32 { "f32" } else { "bf16" };
        for mask in [Mask::Full, Mask::Causal, Mask::Window(512)] {
            cases.push(Case {
                name: format!("{} L{l} {tag}", mask.name()),
                dtype,
                q: l,
                k: l,
                mask: mask.tiles(),
                pairs: mask.pairs(l),
            });
        }
        cases.push(Case {
            name: format!("8docs L{l} {tag}"),
            dtype,
            q: l,
            k: l,
            mask: documents(l, 8),
            pairs: doc_pairs,
        });
        for lk in [1024usize, 8192, 65536] {
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
        "B{b} H{h} Hkv{hkv} D{d}, {threads} threads, backend {:?}, at least {} runs",
        backend.resolve(DType::BF16).unwrap(),
        flags.reps
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "case",
        "best ms",
        "med ms",
        "GFLOP/s",
        "KV GB/s",
        "cpu/thr",
        "cpu med",
        "cpu GB/s",
        "probe"
    );
    let mut probe: Option<StreamingRead> = None;
    for case in cases.iter().filter(|c| c.name.contains(&flags.filter)) {
        let decode = case.q == 1;
        if decode && probe.is_none() {
            let p = StreamingRead::new(threads);
            let best = (0..5).map(|_| p.pass()).fold(0.0, f64::max);
            println!(
                "streaming read of 512 MiB, {threads} threads: best of 5 passes {best:.1} GB/s"
            );
            probe = Some(p);
        }
        let mut stores: Vec<Vec<u32>> = vec![Vec::new(); 5];
        let [sq, sk, sv, so, sl] = &mut stores[..] else {
            unreachable!()
        };
        let q = tensor(sq, case.dtype, &[b, h, case.q, d], 1);
        let k = tensor(sk, case.dtype, &[b, hkv, case.k, d], 2);
        let v = tensor(sv, case.dtype, &[b, hkv, case.k, d], 3);
        let out = tensor(so, case.dtype, &[b, h, case.q, d], 4);
        let lse = tensor(sl, DType::F32, &[b, h, case.q], 5);
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
            score: Default::default(),
            num_threads: threads,
            f32_precision: Default::default(),
        };
        attention_forward_with(&args, backend).unwrap(); // warm-up (pools, page faults)
        // Short cases repeat more, so that each is timed over at least ~0.3 s in all.
        let t = Instant::now();
        attention_forward_with(&args, backend).unwrap();
        let once = t.elapsed().as_secs_f64();
        let mut reps = flags.reps.max((0.3 / once) as usize).min(200);
        if decode && probe.is_some() {
            reps = reps.min(60);
        }
        let kv_bytes = (2 * b * hkv * case.k * d * case.dtype.size()) as f64;
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        let mut shares = Vec::new();
        for _ in 0..reps {
            let before = probe.as_ref().filter(|_| decode).map(StreamingRead::pass);
            let (c, t) = (cpu_seconds(), Instant::now()); // the clock starts after the /proc reads
            attention_forward_with(&args, backend).unwrap();
            let wall = t.elapsed().as_secs_f64();
            walls.push(wall);
            cpus.push((cpu_seconds() - c) / threads as f64);
            if let Some(gbs) = before {
                shares.push(kv_bytes / wall / 1e9 / gbs);
            }
        }
        walls.sort_by(f64::total_cmp);
        cpus.sort_by(f64::total_cmp);
        let (best, median) = (walls[0], walls[reps / 2]);
        let (cpu, cpu_med) = (cpus[0], cpus[reps / 2]);
        let flops = 4.0 * (b * h * d) as f64 * case.pairs;
        let gbs = |t: f64| {
            if case.q == 1 {
                format!("{:>9.1}", kv_bytes / t / 1e9)
            } else {
                format!("{:>9}", "-")
            }
        };
        shares.sort_by(f64::total_cmp);
        let share = match shares.get(shares.len() / 2) {
            Some(x) => format!(" {:>5.0}%", 100.0 * x),
            None => String::new(),
        };
        println!(
            "{:<24} {:>9.2} {:>9.2} {:>9.1} {} {:>9.2} {:>9.2} {}{}",
            case.name,
            best * 1e3,
            median * 1e3,
            flops / best / 1e9,
            gbs(best),
            cpu * 1e3,
            cpu_med * 1e3,
            gbs(cpu),
            share,
        );
    }
}
