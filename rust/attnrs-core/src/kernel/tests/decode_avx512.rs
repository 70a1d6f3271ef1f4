//! The AVX-512 decode kernel's pieces (the transpose-add reduction, the query load, the reorder of O) and the
//! AVX-512 store of output rows, each against a scalar definition.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::kernel::forward::decode_avx512::{
    interleaved_col, load_bf16_bits, natural_order, reduce16,
};
use crate::kernel::forward::tile::{round_up, store_scaled, store_scaled_avx512};
use crate::kernel::gemm::bf16_bits;
use crate::tensor::Float;

#[test]
fn reduce16_sums_each_vector() {
    if !crate::isa::Isa::get().avx512f {
        return;
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn go() -> [f32; 16] {
        let x: [__m512; 16] = std::array::from_fn(|i| {
            let v: [f32; 16] = std::array::from_fn(|l| (i * 100 + l) as f32);
            // SAFETY: v holds 16 floats.
            unsafe { _mm512_loadu_ps(v.as_ptr()) }
        });
        let mut out = [0f32; 16];
        // SAFETY: AVX-512F is present; out holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), reduce16(&x)) };
        out
    }
    // SAFETY: checked above.
    let out = unsafe { go() };
    for (i, &s) in out.iter().enumerate() {
        assert_eq!(s, (i * 1600 + 120) as f32, "lane {i}: {out:?}");
    }
}

/// O in the interleaved column order of `interleaved_col` at stride `round_up(Dv, 32)` comes back in natural
/// order at stride `round_up(Dv, 16)`, in place, for head dims that fill no, part of, or several 32-column chunks.
#[test]
fn natural_order_undoes_the_interleaving() {
    if !crate::isa::Isa::get().avx512f {
        return;
    }
    for dv in [1usize, 5, 16, 24, 31, 32, 40, 64, 80, 100, 128, 256] {
        let (ld, dvp, rows) = (round_up(dv, 32), round_up(dv, 16), 7);
        let value = |r: usize, c: usize| (r * 1000 + c) as f32;
        let mut o = vec![-1.0f32; round_up(rows, 4) * ld];
        for r in 0..rows {
            for k in 0..ld {
                let c = 32 * (k / 32) + interleaved_col(k % 32);
                o[r * ld + k] = if c < dv { value(r, c) } else { 0.0 };
            }
        }
        // SAFETY: AVX-512F is present (checked above).
        unsafe { natural_order(&mut o, rows, ld, dvp, dv) };
        for r in 0..rows {
            for c in 0..dv {
                assert_eq!(o[r * dvp + c], value(r, c), "dv {dv}: row {r} column {c}");
            }
        }
    }
}

/// Special bf16 values: zeros, a subnormal, the largest finite, infinities, quiet and signalling NaNs.
const SPECIAL_BF16: [u16; 12] = [
    0x0000, 0x8000, 0x0001, 0x807f, 0x3f80, 0x7f7f, 0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffa5, 0x7fff,
];

/// The vector load of a bf16 query row gives the scalar path's bits (`bf16_bits` of the value widened to f32),
/// NaNs quietened the same way, and zeros after the row up to a multiple of 32.
#[test]
fn bf16_query_load_matches_the_scalar_conversion() {
    let isa = crate::isa::Isa::get();
    if !(isa.avx512f && isa.avx512bf16) {
        return;
    }
    for d in [1usize, 7, 31, 32, 33, 80, 128] {
        let row: Vec<u16> = (0..d)
            .map(|i| {
                SPECIAL_BF16
                    .get(i)
                    .copied()
                    .unwrap_or((0x3c00 + 37 * i) as u16)
            })
            .collect();
        let mut got = vec![0xdeadu16; round_up(d, 32)];
        // SAFETY: AVX-512F/BW are present; `row` holds D values and `got` round_up(D, 32).
        unsafe { load_bf16_bits(row.as_ptr().cast(), d, &mut got) };
        for (i, &x) in row.iter().enumerate() {
            assert_eq!(
                got[i],
                bf16_bits(bf16::from_bits(x).to_f32()),
                "d {d}: element {i} ({x:#06x})"
            );
        }
        assert!(
            got[d..].iter().all(|&x| x == 0),
            "d {d}: padding {:?}",
            &got[d..]
        );
    }
}

/// The AVX-512 row store writes exactly what the scalar store writes, for f32, bf16 and f16, on values that
/// round up, down and to even, overflow, underflow to subnormals, and NaNs; and nothing past the row.
#[test]
fn avx512_row_store_matches_the_scalar_store() {
    if !crate::isa::Isa::get().avx512f {
        return;
    }
    let mut src: Vec<f32> = [
        0.0,
        -0.0,
        1.0,
        f32::from_bits(0x3f80_8000), // a bf16 tie, to even (down)
        f32::from_bits(0x3f81_8000), // a bf16 tie, to even (up)
        f32::from_bits(0x3f80_8001),
        1.0 + 1.0 / 2048.0, // an f16 tie
        65520.0,            // rounds to f16 infinity
        3.0e38,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // a signalling NaN
        f32::from_bits(0xffc1_2345),
        f32::from_bits(0x7fff_ffff), // a NaN that rounding up would carry into the sign bit
        f32::from_bits(0xffff_8000),
        1.0e-39, // an f32 subnormal: a bf16 subnormal
        3.0e-5,  // an f16 subnormal
        1.0e-8,  // below f16's least subnormal
        f32::MIN_POSITIVE,
    ]
    .to_vec();
    src.extend((0..40).map(|i| (i as f32 - 17.3) * 0.731));
    fn both<T: Float + PartialEq + std::fmt::Debug>(src: &[f32], f: f32, bits: impl Fn(T) -> u32) {
        for n in [0, 1, 15, 16, 17, src.len()] {
            let mut want = vec![T::from_f32(7.0); n + 3];
            let mut got = want.clone();
            // SAFETY: both buffers hold n + 3 elements; AVX-512F/BW/VL are present (checked by the caller).
            unsafe {
                store_scaled(&src[..n], f, want.as_mut_ptr(), 1);
                store_scaled_avx512(&src[..n], f, got.as_mut_ptr());
            }
            for (i, (&w, &g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(
                    bits(g),
                    bits(w),
                    "{:?} n {n} f {f}: element {i} of {}",
                    T::DTYPE,
                    src[i.min(n.max(1) - 1)]
                );
            }
        }
    }
    for f in [1.0f32, 0.37, 2.5e-3] {
        both::<f32>(&src, f, f32::to_bits);
        both::<bf16>(&src, f, |x| x.to_bits().into());
        both::<f16>(&src, f, |x| x.to_bits().into());
    }
}
