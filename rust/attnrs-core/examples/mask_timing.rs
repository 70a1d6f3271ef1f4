//! Times block-layout builds and dense fills of typical masks (not a test).
//!
//! `cargo run --release -p attnrs-core --example mask_timing [threads]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use attnrs_core::layout::{BlockSparse, Grid, fill_dense};
use attnrs_core::mask::{MaskExpr, PlacedMask};

/// Counts live heap bytes so that each build's peak can be reported.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

fn time_build(name: &str, expr: &MaskExpr, batch: usize, len: usize, threads: usize) {
    let grid = Grid::new(batch, 1, len, len);
    let mut best = f64::INFINITY;
    let mut peak = 0;
    let mut bytes = 0;
    let mut blocks = 0;
    for _ in 0..5 {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let mask = PlacedMask::new(expr.clone(), 0, 0);
        let t = Instant::now();
        let bs = BlockSparse::build(mask, grid, (128, 128), threads).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        peak = PEAK.load(Ordering::Relaxed) - base;
        bytes = bs.memory_bytes();
        blocks = bs
            .kv
            .counts
            .iter()
            .chain(&bs.full_kv.counts)
            .map(|&n| n as usize)
            .sum::<usize>();
    }
    println!(
        "{name:<34} {len:>7} {:>9.2} ms  arrays {:>6.2} MiB  peak {:>6.2} MiB  {blocks:>7} blocks",
        best * 1e3,
        bytes as f64 / MIB,
        peak as f64 / MIB
    );
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("threads = {threads}, block 128 x 128, B = 1 unless said, best of 5");
    for len in [32768usize, 131072] {
        let causal = MaskExpr::causal();
        let sliding = MaskExpr::sliding_window(512, true).unwrap();
        let overlay = MaskExpr::sliding_window_overlay(512).unwrap() & MaskExpr::causal();
        let ids: Vec<i64> = (0..len).map(|i| (i / (len / 8)) as i64).collect();
        let t = Instant::now();
        let docs = MaskExpr::document(&ids, 1, len).unwrap();
        let doc_prep = t.elapsed().as_secs_f64();
        let mut valid = vec![1u8; 2 * len];
        valid[..1000].fill(0);
        let t = Instant::now();
        let padding = MaskExpr::padding(&valid, 2, len).unwrap();
        let pad_prep = t.elapsed().as_secs_f64();
        let chunked = MaskExpr::chunked(8192, &[0]).unwrap() & MaskExpr::causal();
        println!(
            "prepare: document ids {:.2} ms, padding {:.2} ms",
            doc_prep * 1e3,
            pad_prep * 1e3
        );
        time_build("causal", &causal, 1, len, threads);
        time_build("sliding_window(512, causal)", &sliding, 1, len, threads);
        time_build("overlay(512) & causal", &overlay, 1, len, threads);
        time_build("document (8 equal)", &docs, 1, len, threads);
        time_build(
            "document (8 equal) & causal",
            &(docs.clone() & causal.clone()),
            1,
            len,
            threads,
        );
        time_build(
            "padding(B=2, 1000 left) & causal",
            &(padding.clone() & causal.clone()),
            2,
            len,
            threads,
        );
        time_build("chunked(8192) & causal", &chunked, 1, len, threads);
    }
    // Harder shapes: unsorted documents, padding with holes, a small window composed the transformers way
    // (both children partial on the diagonal, so blocks are resolved row by row), an evaluated bitmap.
    let len = 32768usize;
    let shuffled: Vec<i64> = (0..len).map(|i| ((i / 64) % 50) as i64).collect();
    let holes: Vec<u8> = (0..len).map(|i| u8::from(i % 3 != 0)).collect();
    let hard = [
        (
            "unsorted documents & causal",
            MaskExpr::document(&shuffled, 1, len).unwrap() & MaskExpr::causal(),
        ),
        (
            "padding with holes & causal",
            MaskExpr::padding(&holes, 1, len).unwrap() & MaskExpr::causal(),
        ),
        (
            "overlay(64) & causal",
            MaskExpr::sliding_window_overlay(64).unwrap() & MaskExpr::causal(),
        ),
    ];
    for (name, expr) in &hard {
        time_build(name, expr, 1, len, threads);
    }
    let side = 8192usize;
    let bytes: Vec<u8> = (0..side * side)
        .map(|x| u8::from(x % side <= x / side))
        .collect();
    let t = Instant::now();
    let bitmap = MaskExpr::bitmap(&bytes, [1, 1, side, side], 0, 0).unwrap();
    println!(
        "prepare: bitmap {side} x {side} {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(bytes);
    time_build("bitmap (causal, evaluated)", &bitmap, 1, side, threads);

    // Dense fill throughput.
    let (q, k) = (8192usize, 16384usize);
    let mut valid = vec![1u8; k];
    valid[..1000].fill(0);
    let cases = [
        ("causal", MaskExpr::causal()),
        (
            "padding & causal",
            MaskExpr::padding(&valid, 1, k).unwrap() & MaskExpr::causal(),
        ),
        (
            "sliding_window(512, causal)",
            MaskExpr::sliding_window(512, true).unwrap(),
        ),
        (
            "document(8) & causal",
            MaskExpr::document(
                &(0..k).map(|i| (i / (k / 8)) as i64).collect::<Vec<_>>(),
                1,
                k,
            )
            .unwrap()
                & MaskExpr::causal(),
        ),
    ];
    let mut out = vec![0u8; q * k];
    for (name, expr) in &cases {
        let mask = PlacedMask::new(expr.clone(), (k - q) as i64, 0);
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            fill_dense(&mask, Grid::new(1, 1, q, k), &mut out, threads).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "dense {name:<28} [{q} x {k}] {:>8.2} ms  {:>6.2} GB/s",
            best * 1e3,
            (q * k) as f64 / best / 1e9
        );
    }
}
