//! The kernel against a naive f64 reference, on every path this CPU has.

use proptest::prelude::*;

use super::forward_support::*;
use crate::kernel::args::*;
use crate::kernel::tests::support::{Layout, Rng};
use crate::kernel::*;
use crate::mask::tiles::NoMask;
use crate::tensor::DType;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn forward_matches_reference(
        seed in any::<u64>(),
        dtype in dtype_strategy(),
        b in 1usize..=2,
        (hkv, g) in prop_oneof![Just((1usize, 1usize)), Just((1, 2)), Just((2, 2)), Just((1, 4)), Just((2, 1)), Just((1, 3))],
        q in 1usize..70,
        k in 1usize..70,
        (d, dv) in head_dims(),
        mask in 0u8..3,
        rows in prop_oneof![Just(6usize), Just(13), Just(32), Just(96)],
    ) {
        run_case(&Case { seed, dtype, b, hkv, g, q, k, d, dv, mask, rows });
    }

    #[test]
    fn decode_matches_reference(
        seed in any::<u64>(),
        dtype in dtype_strategy(),
        (hkv, g) in prop_oneof![
            Just((1usize, 4usize)), Just((2, 2)), Just((1, 1)), Just((1, 8)), Just((2, 4)), Just((1, 3)), Just((1, 5))
        ],
        q in 1usize..=4,
        k in prop_oneof![1usize..70, 120usize..700],
        (d, dv) in head_dims(),
        mask in 0u8..3,
    ) {
        run_case(&Case { seed, dtype, b: 1, hkv, g, q, k, d, dv, mask, rows: 96 });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Decode over a few thousand keys: several tiles, the split-KV merge, prefetches running ahead.
    #[test]
    fn long_decode_matches_reference(
        seed in any::<u64>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        (hkv, g) in prop_oneof![Just((1usize, 4usize)), Just((1, 8)), Just((2, 1))],
        q in 1usize..=2,
        k in 1500usize..3000,
        mask in 0u8..3,
    ) {
        run_case(&Case { seed, dtype, b: 1, hkv, g, q, k, d: 64, dv: 64, mask, rows: 96 });
    }
}

/// Small decodes under the real threshold run on the calling thread alone (no split, no worker): the same
/// answers as the reference, GQA, masks and head dims included. (Elsewhere the tests run every decode
/// parallel, to cover the split paths at small shapes.)
#[test]
fn serial_decode_matches_reference() {
    use crate::kernel::forward::split_kv::{SERIAL_KV_BYTES, SERIAL_KV_BYTES_IN_TESTS};
    std::thread::spawn(|| {
        SERIAL_KV_BYTES_IN_TESTS.with(|t| t.set(SERIAL_KV_BYTES));
        let mut seed = 7u64;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (hkv, g, q, k, (d, dv)) in [
                (1, 4, 1, 1, (128, 128)),
                (2, 4, 1, 300, (64, 64)),
                (1, 3, 2, 129, (40, 24)),
                (2, 1, 4, 65, (128, 64)),
            ] {
                for mask in 0u8..3 {
                    seed += 1;
                    let c = Case {
                        seed,
                        dtype,
                        b: 1,
                        hkv,
                        g,
                        q,
                        k,
                        d,
                        dv,
                        mask,
                        rows: 96,
                    };
                    run_case(&c);
                }
            }
        }
    })
    .join()
    .unwrap();
}

/// Decode on attnrs's own pool, the path when the process has no OpenMP runtime (the other tests take the
/// team of the libgomp they load where the machine has one): the reference's answers, the kv range split or
/// not, K/V head-major or token-major (the random layouts).
#[test]
fn decode_on_the_pool_matches_reference() {
    use std::sync::atomic::Ordering;
    let _switch = crate::threads::TEAM_SWITCH
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    crate::threads::TEAM_IN_TESTS.store(false, Ordering::Relaxed);
    let run = std::thread::spawn(|| {
        for seed in 0..12u64 {
            let dtype = [DType::F32, DType::BF16, DType::F16][seed as usize % 3];
            let (hkv, g) = [(1, 4), (2, 4), (8, 1), (2, 1)][seed as usize % 4];
            let k = [5, 300, 1500][seed as usize % 3];
            let c = Case {
                seed: 100 + seed,
                dtype,
                b: 1,
                hkv,
                g,
                q: 1 + seed as usize % 2,
                k,
                d: 64,
                dv: 64,
                mask: (seed % 3) as u8,
                rows: 96,
            };
            run_case(&c);
        }
    })
    .join();
    crate::threads::TEAM_IN_TESTS.store(true, Ordering::Relaxed);
    run.unwrap();
}

/// The portable path and every SIMD path agree on long decodes (too long for the f64 reference).
#[test]
fn decode_paths_agree_with_portable() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (hkv, g, q, k, d) = (2, 4, 1, 9000, 128);
        let mut rng = Rng(k as u64);
        let mut unit = |r: &mut Rng| r.range(-1.0, 1.0);
        let qb = Buf::new(
            dtype,
            &[1, hkv * g, q, d],
            Layout::Contiguous,
            &mut rng,
            &mut unit,
        );
        let kb = Buf::new(dtype, &[1, hkv, k, d], Layout::Padded, &mut rng, &mut unit);
        let vb = Buf::new(
            dtype,
            &[1, hkv, k, d],
            Layout::Transposed,
            &mut rng,
            &mut unit,
        );
        let run = |backend: Backend, rng: &mut Rng| {
            let out = Buf::zeros(dtype, &[1, hkv * g, q, d], Layout::Contiguous, rng);
            let args = AttentionArgs {
                query: &qb.view,
                key: &kb.view,
                value: &vb.view,
                out: &out.view,
                lse: None,
                mask: &NoMask,
                bias: None,
                scale: 2.0 / (d as f64).sqrt(),
                softcap: None,
                sinks: None,
                dropout: None,
                score: Default::default(),
                num_threads: 2,
                f32_precision: Default::default(),
            };
            attention_forward_with(&args, backend).unwrap();
            out
        };
        let want = run(Backend::Portable, &mut rng);
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        for backend in backends(dtype).into_iter().skip(1) {
            let got = run(backend, &mut rng);
            for h in 0..hkv * g {
                for c in 0..d {
                    let (x, y) = (got.get(&[0, h, 0, c]), want.get(&[0, h, 0, c]));
                    assert!(
                        (x - y).abs() <= tol,
                        "{backend:?} {dtype:?} out[{h},{c}] = {x}, portable {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn odd_and_degenerate_sizes() {
    for (q, k, d, dv) in [
        (3, 0, 8, 8),
        (2, 5, 1, 1),
        (2, 5, 3, 5),
        (130, 129, 16, 16),
        (1, 1, 0, 4),
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            for mask in [0u8, 1, 2] {
                run_case(&Case {
                    seed: (q * 1000 + k) as u64,
                    dtype,
                    b: 1,
                    hkv: 1,
                    g: 2,
                    q,
                    k,
                    d,
                    dv,
                    mask,
                    rows: 96,
                });
            }
        }
    }
}

/// f32 under `F32Precision::Medium` runs a bf16 path where one is fast (here forced: the emulated AMX tiles),
/// so its error against f64 is bf16's and well above f32's; `High` runs bf16×3 there, between the two;
/// `Highest` stays exact f32, and every precision is exact f32 on a path with no fast bf16 products (AVX2,
/// portable).
#[test]
fn f32_under_medium_and_high_precision_round_only_on_a_bf16_path() {
    let (hkv, g, q, k, d) = (2, 2, 37, 75, 64);
    let mut rng = Rng(11);
    let mut unit = |r: &mut Rng| r.range(-1.0, 1.0);
    let x = Inputs {
        q: Buf::new(
            DType::F32,
            &[1, hkv * g, q, d],
            Layout::Contiguous,
            &mut rng,
            &mut unit,
        ),
        k: Buf::new(
            DType::F32,
            &[1, hkv, k, d],
            Layout::Padded,
            &mut rng,
            &mut unit,
        ),
        v: Buf::new(
            DType::F32,
            &[1, hkv, k, d],
            Layout::Contiguous,
            &mut rng,
            &mut unit,
        ),
        bias: None,
        sinks: None,
        scale: 1.5 / (d as f32).sqrt(),
        softcap: None,
    };
    let (want, _) = reference(&x, &NoMask);
    let mut error = |backend: Backend, precision: F32Precision| {
        let out = Buf::zeros(
            DType::F32,
            &[1, hkv * g, q, d],
            Layout::Contiguous,
            &mut rng,
        );
        let args = AttentionArgs {
            query: &x.q.view,
            key: &x.k.view,
            value: &x.v.view,
            out: &out.view,
            lse: None,
            mask: &NoMask,
            bias: None,
            scale: f64::from(x.scale),
            softcap: None,
            sinks: None,
            dropout: None,
            score: Default::default(),
            num_threads: 2,
            f32_precision: precision,
        };
        attention_forward_with(&args, backend).unwrap();
        (0..want.len())
            .map(|i| (out.get(&[0, i / (q * d), (i / d) % q, i % d]) - want[i]).abs())
            .fold(0.0f64, f64::max)
    };
    let medium = error(Backend::AmxEmulated, F32Precision::Medium);
    let high = error(Backend::AmxEmulated, F32Precision::High);
    let exact = error(Backend::AmxEmulated, F32Precision::Highest);
    eprintln!(
        "max |out - f64| on amx_emulated: highest {exact:.6e}, high {high:.6e}, medium {medium:.6e}"
    );
    assert!(exact < 2e-6, "highest on amx_emulated: {exact}");
    assert!(
        high > exact,
        "high {high} is no less exact than highest: did bf16x3 run?"
    );
    assert!(
        medium > 20.0 * exact && medium < 2e-2,
        "medium {medium}, highest {exact}"
    );
    assert!(
        high < medium / 20.0 && high < 1e-4,
        "high {high}, medium {medium}"
    );
    for backend in [Backend::Portable, Backend::Avx2] {
        if backend.resolve(DType::F32).is_ok() {
            for precision in [F32Precision::Medium, F32Precision::High] {
                let e = error(backend, precision);
                assert!(
                    e < 2e-6,
                    "{backend:?} has no bf16 products, so {precision:?} stays exact: {e}"
                );
            }
        }
    }
}
