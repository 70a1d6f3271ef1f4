//! The shared online-softmax pieces: the fast exp, finishing and merging rows.

use crate::kernel::softmax::*;

#[test]
fn fast_exp_is_accurate_and_flushes() {
    let mut worst = 0f64;
    let mut x = -80.0f32;
    while x <= 0.0 {
        let got = exp_f32(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max(((got - want) / want).abs());
        x += 0.0137;
    }
    assert!(worst < 1e-6, "relative error {worst}");
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-1e30), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
}

#[test]
fn finish_handles_empty_rows_and_sinks() {
    assert_eq!(
        finish(f32::NEG_INFINITY, 0.0, None),
        (0.0, f32::NEG_INFINITY)
    );
    assert_eq!(finish(f32::NEG_INFINITY, 0.0, Some(1.5)), (0.0, 1.5));
    let (f, lse) = finish(0.0f64, 2.0, Some(0.0));
    assert!((f - 1.0 / 3.0).abs() < 1e-15 && (lse - 3f64.ln()).abs() < 1e-15);
    let (f, _) = finish(-1e30f32, 1.0, Some(1e30));
    assert_eq!(f, 0.0);
}

/// Rows of logits the softmax passes see: hidden pairs (-inf), the row maximum itself, values far below it
/// (exps that underflow), odd widths of 16 (the bf16 pass's tail), and a NaN.
fn logit_rows() -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    for width in [16, 32, 48, 64] {
        let row: Vec<f32> = (0..width)
            .map(|j| match j % 7 {
                0 => f32::NEG_INFINITY,
                1 => -100.0 - j as f32,
                _ => (j as f32 * 0.37).sin() * 6.0,
            })
            .collect();
        rows.push(row);
    }
    let mut nan = rows[3].clone();
    nan[21] = f32::NAN;
    rows.push(nan);
    rows
}

/// Checks a family's f32 row passes against the portable ones on `row`; returns the portable exps (empty for a
/// row with a NaN, whose exps the step never compares).
fn check_f32_passes(
    row: &[f32],
    max: impl Fn(&[f32]) -> f32,
    exp: impl Fn(&[f32], f32, &mut [f32]) -> f32,
) -> Vec<f32> {
    let (want_max, got_max) = (max_row(row), max(row));
    assert!(
        got_max == want_max || (got_max.is_nan() && want_max.is_nan()),
        "max {got_max} vs {want_max}"
    );
    if want_max.is_nan() {
        return Vec::new();
    }
    let (mut want, mut got) = (vec![0f32; row.len()], vec![0f32; row.len()]);
    let want_sum = exp_row(row, want_max, &mut want, |x| x);
    let got_sum = exp(row, want_max, &mut got);
    assert!(
        (got_sum - want_sum).abs() <= 1e-6 * want_sum,
        "sum {got_sum} vs {want_sum}"
    );
    for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-7 * w.max(1e-30),
            "column {j}: {g} vs {w}"
        );
    }
    want
}

/// The AVX2 row passes (`max_row`, `exp_row`) against the portable ones.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_row_passes_match_the_portable_ones() {
    use crate::kernel::Backend;
    use crate::kernel::gemm::{Avx2F32, Kern};
    use crate::tensor::DType;
    if Backend::Avx2.resolve(DType::F32) != Ok(Backend::Avx2) {
        println!("skipped: this CPU has no AVX2 + FMA (the passes under test cannot run)");
        return;
    }
    for row in logit_rows() {
        check_f32_passes(
            &row,
            // SAFETY: AVX2 and FMA are present (checked above).
            |s| unsafe { Avx2F32::max_row(s) },
            // SAFETY: AVX2 and FMA are present (checked above).
            |s, m, p| unsafe { Avx2F32::exp_row(s, m, p) },
        );
    }
}

/// The AVX-512 row passes (`max_row`, and `exp_row` for f32 and bf16 operands) against the portable ones.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_row_passes_match_the_portable_ones() {
    use crate::kernel::Backend;
    use crate::kernel::gemm::{Avx512Bf16, Avx512F32, Kern, bf16_bits};
    use crate::tensor::DType;
    let f32_ok = Backend::Avx512.resolve(DType::F32) == Ok(Backend::Avx512);
    let bf16_ok = Backend::Avx512Bf16.resolve(DType::BF16) == Ok(Backend::Avx512Bf16);
    if !f32_ok {
        println!("skipped: this CPU has no AVX-512F (the passes under test cannot run)");
        return;
    }
    if !bf16_ok {
        println!("bf16 pass skipped: this CPU has no AVX-512 BF16");
    }
    for row in logit_rows() {
        let want = check_f32_passes(
            &row,
            // SAFETY: AVX-512F is present (checked above).
            |s| unsafe { Avx512F32::max_row(s) },
            // SAFETY: AVX-512F is present (checked above).
            |s, m, p| unsafe { Avx512F32::exp_row(s, m, p) },
        );
        if want.is_empty() || !bf16_ok {
            continue;
        }
        let want_sum: f32 = want.iter().sum();
        let mut got_bits = vec![0u16; row.len()];
        // SAFETY: AVX-512 BF16 is present (checked above).
        let bits_sum = unsafe { Avx512Bf16::exp_row(&row, max_row(&row), &mut got_bits) };
        assert!((bits_sum - want_sum).abs() <= 1e-6 * want_sum);
        for (j, (&g, &w)) in got_bits.iter().zip(&want).enumerate() {
            // One rounding of the (equally accurate) f32 exp: the same bits, or the neighbour when the two exps
            // straddle a rounding boundary.
            let w = bf16_bits(w);
            assert!(g.abs_diff(w) <= 1, "column {j}: bf16 bits {g:#x} vs {w:#x}");
        }
    }
}
