//! Times forward + backward of the CPU attention kernel (the training step's attention).
//!
//! `cargo run --release -p attnrs-core --example attn_backward_timing [-- --len N] [--threads N] [--reps N]
//! [--bf16] [--full | --window N]` (the flags of every timing example: see `common/mod.rs`).
//!
//! Shape: B1 H32 Hkv8 D128 L (`--len`, 2048), causal unless `--full` (no mask) or `--window N` (causal
//! sliding window), f32 unless `--bf16`. Prints the best time of the forward (with lse) and of the backward,
//! and the backward's useful GFLOP/s (10·B·H·D·visible pairs: the five products QKᵀ, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q,
//! dS·K, which is what this kernel runs on its usual path).

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use attnrs_core::kernel::{
    AttentionArgs, AttentionGradArgs, attention_backward_with, attention_forward_with,
};
use attnrs_core::tensor::DType;
use common::{Flags, cpu_seconds, tensor};

fn main() {
    let flags = Flags::parse(2, 2048);
    let (threads, reps, l, dtype, backend) = (
        flags.threads,
        flags.reps,
        flags.len,
        flags.dtype,
        flags.backend,
    );
    let (b, h, hkv, d) = (1usize, 32usize, 8usize, 128usize);
    let mask = flags.mask.tiles();
    let pairs = flags.mask.pairs(l);
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
        score: Default::default(),
        num_threads: threads,
        f32_precision: Default::default(),
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
        score: Default::default(),
        grad_score_distance: None,
        grad_score_key: None,
        num_threads: threads,
        f32_precision: Default::default(),
    };
    let (mut best_f, mut best_b) = (f64::INFINITY, f64::INFINITY);
    let (mut cpu_f, mut cpu_b) = (0.0, 0.0);
    for _ in 0..reps {
        let (c, t) = (cpu_seconds(), Instant::now()); // the clock starts after the /proc reads
        attention_forward_with(&fwd, backend).unwrap();
        best_f = best_f.min(t.elapsed().as_secs_f64());
        cpu_f += cpu_seconds() - c;
        let (c, t) = (cpu_seconds(), Instant::now()); // the clock starts after the /proc reads
        attention_backward_with(&bwd, backend).unwrap();
        best_b = best_b.min(t.elapsed().as_secs_f64());
        cpu_b += cpu_seconds() - c;
    }
    let per_thread = |cpu: f64| cpu / reps as f64 / threads as f64 * 1e3;
    let flops = 10.0 * (b * h * d) as f64 * pairs;
    println!(
        "B{b} H{h} Hkv{hkv} D{d} L{l} {} {dtype:?}, {threads} threads, backend {:?}, best of {reps}",
        flags.mask.name(),
        backend.resolve(dtype).unwrap()
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
