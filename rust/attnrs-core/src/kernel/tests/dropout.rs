//! The dropout keep pattern: its rate, its dependence on seed and index, and refused probabilities.

use crate::kernel::dropout::*;

#[test]
fn keep_rate_matches_p() {
    for p in [0.1, 0.5, 0.9] {
        let shape = [2, 3, 64, 100];
        let mut out = vec![false; 2 * 3 * 64 * 100];
        keep_pattern(Dropout { p, seed: 7 }, shape, &mut out).unwrap();
        let n = out.len() as f64;
        let kept = out.iter().filter(|&&x| x).count() as f64 / n;
        let sd = (p * (1.0 - p) / n).sqrt();
        assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {kept}");
    }
}

#[test]
fn patterns_depend_on_seed_and_every_index() {
    let shape = [2, 2, 8, 64];
    let n = 2 * 2 * 8 * 64;
    let (mut a, mut b) = (vec![false; n], vec![false; n]);
    keep_pattern(Dropout { p: 0.5, seed: 1 }, shape, &mut a).unwrap();
    keep_pattern(Dropout { p: 0.5, seed: 1 }, shape, &mut b).unwrap();
    assert_eq!(a, b);
    keep_pattern(Dropout { p: 0.5, seed: 2 }, shape, &mut b).unwrap();
    assert_ne!(a, b);
    // Rows of different batches, heads and queries differ (each row holds 64 decisions).
    let rows: Vec<&[bool]> = a.chunks(64).collect();
    for i in 0..rows.len() {
        for j in 0..i {
            assert_ne!(rows[i], rows[j], "rows {i} and {j}");
        }
    }
}

#[test]
fn bad_probabilities_are_refused() {
    let mut out = vec![false; 4];
    for p in [-0.1, 1.0, f64::NAN, f64::INFINITY] {
        assert!(keep_pattern(Dropout { p, seed: 0 }, [1, 1, 2, 2], &mut out).is_err());
    }
    assert!(keep_pattern(Dropout { p: 0.5, seed: 0 }, [1, 1, 2, 3], &mut out).is_err());
    keep_pattern(Dropout { p: 0.0, seed: 0 }, [1, 1, 2, 2], &mut out).unwrap();
    assert!(out.iter().all(|&x| x));
}
