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
