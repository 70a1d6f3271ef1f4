//! Times forward + backward of the CPU attention kernel (the training step's attention).
//!
//! `cargo run --release -p attnrs-core --example attn_backward_timing [-- --len N] [--threads N] [--reps N]
//! [--bf16] [--full | --window N]`
//!
//! Shape: B1 H32 Hkv8 D128, causal unless `--full` (no mask) or `--window N` (causal sliding window), f32
//! unless `--bf16`. Prints the best time of the forward
//! (with lse) and of the backward, and the backward's useful GFLOP/s (10·B·H·D·visible pairs: the five
//! products QKᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K, which is what this kernel runs on its usual path).

use std::time::Instant;

use attnrs_core::block::{CausalTiles, MaskTiles, NoMask};
use attnrs_core::kernel::{
    attention_backward, attention_forward, AttentionArgs, AttentionGradArgs,
};
use attnrs_core::mask::{MaskExpr, PlacedMask};
use attnrs_core::tensor::{DType, TensorView};
use half::bf16;

/// A contiguous tensor of `shape` over `store` (random values in [-1, 1)).
fn tensor(store: &mut Vec<u32>, dtype: DType, shape: &[usize], seed: u64) -> TensorView {
    let n: usize = shape.iter().product();
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
        _ => store.iter_mut().for_each(|x| {
            *x = u32::from(bf16::from_f32(rnd()).to_bits())
                | (u32::from(bf16::from_f32(rnd()).to_bits()) << 16)
        }),
    }
    let mut strides = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as isize;
    }
    // SAFETY: `store` holds at least the elements of a contiguous tensor of `shape` and outlives the view
    // (the caller keeps it alive for the whole run).
    unsafe { TensorView::new(store.as_mut_ptr().cast(), dtype, shape.to_vec(), strides) }.unwrap()
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux; 0 elsewhere). Another
/// job sharing the cores stretches wall time but not CPU time, so `cpu / threads` estimates the uncontended time.
fn cpu_seconds() -> f64 {
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
    let reps = opt("--reps", 2).max(1);
    let l = opt("--len", 2048);
    let dtype = if argv.iter().any(|a| a == "--bf16") {
        DType::BF16
    } else {
        DType::F32
    };
    let full = argv.iter().any(|a| a == "--full");
    let window = opt("--window", 0);
    let (b, h, hkv, d) = (1usize, 32usize, 8usize, 128usize);
    let mask: Box<dyn MaskTiles> = if full {
        Box::new(NoMask)
    } else if window > 0 {
        let expr = MaskExpr::sliding_window(window as i64, true).unwrap();
        Box::new(PlacedMask::new(expr, 0, 0))
    } else {
        Box::new(CausalTiles { diagonal: 0 })
    };
    let pairs = if full {
        (l * l) as f64
    } else if window > 0 {
        (0..l).map(|i| (i + 1).min(window)).sum::<usize>() as f64
    } else {
        (l * (l + 1) / 2) as f64
    };
    let mut stores: Vec<Vec<u32>> = vec![Vec::new(); 10];
    let [sq, sk, sv, so, sd, sl, sgq, sgk, sgv, _] = &mut stores[..] else {
        unreachable!()
    };
    let q = tensor(sq, dtype, &[b, h, l, d], 1);
    let k = tensor(sk, dtype, &[b, hkv, l, d], 2);
    let v = tensor(sv, dtype, &[b, hkv, l, d], 3);
    let out = tensor(so, dtype, &[b, h, l, d], 4);
    let dout = tensor(sd, dtype, &[b, h, l, d], 5);
    let lse = tensor(sl, DType::F32, &[b, h, l], 6);
    let gq = tensor(sgq, dtype, &[b, h, l, d], 7);
    let gk = tensor(sgk, dtype, &[b, hkv, l, d], 8);
    let gv = tensor(sgv, dtype, &[b, hkv, l, d], 9);
    let scale = 1.0 / (d as f64).sqrt();
    let fwd = AttentionArgs {
        query: &q,
        key: &k,
        value: &v,
        out: &out,
        lse: Some(&lse),
        mask: mask.as_ref(),
        bias: None,
        scale,
        softcap: None,
        sinks: None,
        dropout: None,
        num_threads: threads,
    };
    let bwd = AttentionGradArgs {
        grad_lse: None,
        query: &q,
        key: &k,
        value: &v,
        out: &out,
        grad_out: &dout,
        lse: &lse,
        mask: mask.as_ref(),
        bias: None,
        scale,
        softcap: None,
        sinks: None,
        grad_query: &gq,
        grad_key: &gk,
        grad_value: &gv,
        grad_sinks: None,
        grad_bias: None,
        dropout: None,
        num_threads: threads,
    };
    let (mut best_f, mut best_b) = (f64::INFINITY, f64::INFINITY);
    let (mut cpu_f, mut cpu_b) = (0.0, 0.0);
    for _ in 0..reps {
        let (t, c) = (Instant::now(), cpu_seconds());
        attention_forward(&fwd).unwrap();
        best_f = best_f.min(t.elapsed().as_secs_f64());
        cpu_f += cpu_seconds() - c;
        let (t, c) = (Instant::now(), cpu_seconds());
        attention_backward(&bwd).unwrap();
        best_b = best_b.min(t.elapsed().as_secs_f64());
        cpu_b += cpu_seconds() - c;
    }
    let per_thread = |cpu: f64| cpu / reps as f64 / threads as f64 * 1e3;
    let flops = 10.0 * (b * h * d) as f64 * pairs;
    println!(
        "B{b} H{h} Hkv{hkv} D{d} L{l} {} {dtype:?}, {threads} threads, best of {reps}",
        if full { "full" } else { "causal" }
    );
    println!(
        "forward {:.1} ms, backward {:.1} ms ({:.1} useful GFLOP/s), total {:.1} ms",
        best_f * 1e3,
        best_b * 1e3,
        flops / best_b / 1e9,
        (best_f + best_b) * 1e3
    );
    println!(
        "cpu-ms per thread (uncontended estimate): forward {:.1}, backward {:.1}",
        per_thread(cpu_f),
        per_thread(cpu_b)
    );
}
