use super::*;

/// Checks `classify` and `fill` against `visible` on every block of the window `q x k`.
fn consistent(expr: &MaskExpr, b: usize, q: Range<i64>, k: Range<i64>) {
    for q0 in q.clone() {
        for q1 in q0 + 1..=q.end {
            for k0 in k.clone() {
                for k1 in k0 + 1..=k.end {
                    let mut out = vec![9u8; ((q1 - q0) * (k1 - k0)) as usize];
                    expr.fill(b, 0, q0..q1, k0..k1, &mut out);
                    let mut n = 0;
                    for (i, qq) in (q0..q1).enumerate() {
                        for (j, kk) in (k0..k1).enumerate() {
                            let v = expr.visible(b, 0, qq, kk);
                            assert_eq!(
                                out[i * (k1 - k0) as usize + j],
                                u8::from(v),
                                "{expr:?} fill ({qq}, {kk})"
                            );
                            n += usize::from(v);
                        }
                    }
                    // Spans, where the mask gives them, are the filled rows' runs.
                    let mut spans = vec![(99u32, 0u32); (q1 - q0) as usize];
                    if expr.spans(b, q0..q1, k0..k1, &mut spans) {
                        let w = (k1 - k0) as usize;
                        for (i, &(a, e)) in spans.iter().enumerate() {
                            let run: Vec<u8> = (0..w)
                                .map(|j| u8::from((a as usize..e as usize).contains(&j)))
                                .collect();
                            assert!(a <= e, "{expr:?} span {a}..{e}");
                            assert_eq!(run, out[i * w..(i + 1) * w], "{expr:?} spans row {i}");
                        }
                    }
                    let want = match n {
                        0 => BlockClass::Empty,
                        n if n == out.len() => BlockClass::Full,
                        _ => BlockClass::Partial,
                    };
                    assert_eq!(
                        expr.classify(b, 0, q0..q1, k0..k1),
                        want,
                        "{expr:?} {q0}..{q1} x {k0}..{k1}"
                    );
                }
            }
        }
    }
}

fn row(expr: &MaskExpr, b: usize, q: i64, k: Range<i64>) -> String {
    k.map(|k| if expr.visible(b, 0, q, k) { '1' } else { '.' })
        .collect()
}

#[test]
fn causal_and_offsets() {
    let m = MaskExpr::causal();
    assert_eq!(row(&m, 0, 2, 0..5), "111..");
    let m = MaskExpr::causal_with_offset(-1);
    assert_eq!(row(&m, 0, 2, 0..5), "11...");
    consistent(&MaskExpr::causal_with_offset(2), 0, -3..5, 0..7);
}

#[test]
fn sliding_windows_follow_transformers() {
    let causal = MaskExpr::sliding_window(3, true).unwrap();
    assert_eq!(row(&causal, 0, 5, 0..8), "...111..");
    let bidir = MaskExpr::sliding_window(2, false).unwrap();
    assert_eq!(row(&bidir, 0, 5, 0..9), "...11111.");
    let overlay = MaskExpr::sliding_window_overlay(3).unwrap();
    assert_eq!(row(&overlay, 0, 5, 0..9), "...111111");
    let composed = overlay & MaskExpr::causal();
    for q in 0..9 {
        assert_eq!(row(&composed, 0, q, -2..10), row(&causal, 0, q, -2..10));
    }
    for m in [causal, bidir, composed] {
        consistent(&m, 0, 0..7, 0..7);
    }
}

#[test]
fn chunks_use_floor_division() {
    let m = MaskExpr::chunked(3, &[2, 0]).unwrap();
    // Batch 0: chunks start at 2 (left padding): ..., [-1, 1], [2, 4], [5, 7].
    assert_eq!(row(&m, 0, 0, -2..6), ".111....");
    assert_eq!(row(&m, 0, 4, -2..6), "....111.");
    assert_eq!(row(&m, 1, 4, -2..6), ".....111");
    assert!(m.depends_on_batch());
    consistent(&m, 0, -3..6, -3..6);
    let chunked_causal = m & MaskExpr::causal();
    consistent(&chunked_causal, 1, 0..7, 0..7);
}

#[test]
fn padding_hides_invalid_and_out_of_range_keys() {
    let m = MaskExpr::padding(&[0, 1, 1, 0, 1, 1, 1, 1], 2, 4).unwrap();
    assert_eq!(row(&m, 0, 0, -1..5), "..11..");
    assert_eq!(row(&m, 1, 3, -1..5), ".1111.");
    consistent(&m, 0, 0..3, -1..6);
    consistent(&(m.clone() & MaskExpr::causal()), 0, 0..6, -1..6);
    consistent(&(m & MaskExpr::causal()), 1, 0..6, -1..6);
}

#[test]
fn documents_match_ids_sorted_or_not() {
    let sorted = MaskExpr::document(&[0, 0, 1, 1, 1, 2], 1, 6).unwrap();
    assert_eq!(row(&sorted, 0, 3, -1..7), "...111..");
    assert_eq!(row(&sorted, 0, 6, -1..7), "........");
    consistent(&sorted, 0, -1..7, -1..7);
    let shuffled = MaskExpr::document(&[4, 4, 1, 4, 2, 1, 1], 1, 7).unwrap();
    assert_eq!(row(&shuffled, 0, 0, 0..7), "11.1...");
    consistent(&shuffled, 0, -1..8, -1..8);
    consistent(&(shuffled & MaskExpr::causal()), 0, 0..7, 0..7);
}

/// Whether `expr` answers the block `q x k` with spans.
fn has_spans(expr: &MaskExpr, q: Range<i64>, k: Range<i64>) -> bool {
    let mut out = vec![(0, 0); q.clone().count()];
    expr.spans(0, q, k, &mut out)
}

#[test]
fn interval_masks_have_spans_and_others_fall_back_to_bytes() {
    let (q, k) = (0..9, -2..11);
    let window = MaskExpr::sliding_window(3, true).unwrap();
    let sorted_docs = MaskExpr::document(&[0, 0, 1, 1, 1, 2, 2, 2, 2], 1, 9).unwrap();
    let left_pad = MaskExpr::padding(&[0, 0, 1, 1, 1, 1, 1, 1, 1], 1, 9).unwrap();
    for m in [
        MaskExpr::causal(),
        window.clone(),
        MaskExpr::chunked(4, &[0]).unwrap(),
        MaskExpr::prefix_lm(&[3]).unwrap(),
        sorted_docs.clone(),
        left_pad.clone(),
        MaskExpr::and([sorted_docs, left_pad, window]),
        MaskExpr::causal().shift(2, 0),
    ] {
        assert!(has_spans(&m, q.clone(), k.clone()), "{m:?}");
        consistent(&m, 0, 0..5, -1..6);
    }
    let bits: Vec<u8> = (0..81).map(|i| u8::from(i % 3 != 1)).collect();
    let holes = MaskExpr::padding(&[1, 0, 1, 1, 1, 1, 1, 1, 1], 1, 9).unwrap();
    for m in [
        MaskExpr::bitmap(&bits, [1, 1, 9, 9], 0, 0).unwrap(),
        holes.clone(),
        MaskExpr::causal() & holes,
        MaskExpr::sliding_window(2, true).unwrap().negate(),
    ] {
        assert!(!has_spans(&m, q.clone(), k.clone()), "{m:?}");
    }
}

#[test]
fn prefix_lm_is_bidirectional_in_the_prefix() {
    let m = MaskExpr::prefix_lm(&[3]).unwrap();
    assert_eq!(row(&m, 0, 0, 0..6), "111...");
    assert_eq!(row(&m, 0, 4, 0..6), "11111.");
    consistent(&m, 0, 0..7, -1..7);
}

#[test]
fn bitmaps_are_placed_and_broadcast() {
    // [1, 1, 2, 3] at (10, 20).
    let m = MaskExpr::bitmap(&[1, 0, 1, 0, 1, 1], [1, 1, 2, 3], 10, 20).unwrap();
    assert_eq!(row(&m, 5, 10, 19..24), ".1.1.");
    assert_eq!(row(&m, 0, 11, 19..24), "..11.");
    assert_eq!(row(&m, 0, 12, 19..24), ".....");
    assert!(!m.depends_on_batch() && !m.depends_on_head());
    consistent(&m, 0, 9..13, 19..24);
    let heads = MaskExpr::bitmap(&[1, 0, 0, 1], [1, 2, 1, 2], 0, 0).unwrap();
    assert!(heads.depends_on_head());
    assert!(heads.visible(0, 0, 0, 0) && !heads.visible(0, 1, 0, 0));
    // Wide rows span several words.
    let wide: Vec<u8> = (0..300).map(|i| u8::from(i % 7 != 0)).collect();
    let m = MaskExpr::bitmap(&wide, [1, 1, 2, 150], 0, -3).unwrap();
    assert_eq!(m.classify(0, 0, 0..2, -3..147), BlockClass::Partial);
    assert_eq!(m.classify(0, 0, 0..1, 54..60), BlockClass::Full);
    consistent(&m, 0, 0..2, 58..70);
}

#[test]
fn compositions_resolve_ambiguous_blocks() {
    let pad = MaskExpr::padding(&[0, 1, 0, 1, 1, 1, 0, 1], 1, 8).unwrap();
    let doc = MaskExpr::document(&[1, 1, 2, 1, 2, 2, 2, 3], 1, 8).unwrap();
    let bits: Vec<u8> = (0..64).map(|i| u8::from(i % 3 != 1)).collect();
    let bitmap = MaskExpr::bitmap(&bits, [1, 1, 8, 8], 0, 0).unwrap();
    let causal = MaskExpr::causal();
    let window = MaskExpr::sliding_window(2, false).unwrap();
    let cases = [
        MaskExpr::and([pad.clone(), doc.clone(), causal.clone()]),
        MaskExpr::or([pad.clone(), doc.clone()]),
        MaskExpr::or([causal.clone(), window.negate(), bitmap.clone()]),
        !(pad.clone() | !causal.clone()) & bitmap.clone(),
        MaskExpr::and([bitmap.clone(), pad.clone(), doc.clone()]),
        MaskExpr::or([
            window.clone(),
            MaskExpr::prefix_lm(&[2]).unwrap(),
            doc.clone(),
            pad.clone(),
        ]),
        MaskExpr::and([]),
        MaskExpr::or([]),
        MaskExpr::empty() | MaskExpr::full().negate(),
    ];
    for m in &cases {
        consistent(m, 0, -1..9, -1..9);
    }
    assert_eq!(
        MaskExpr::and([]).classify(0, 0, 0..4, 0..4),
        BlockClass::Full
    );
    assert_eq!(
        MaskExpr::or([]).classify(0, 0, 0..4, 0..4),
        BlockClass::Empty
    );
}

#[test]
fn bad_input_is_an_error() {
    assert_eq!(
        MaskExpr::sliding_window(0, true).unwrap_err(),
        Error::value("window", "a positive integer", "0")
    );
    assert!(matches!(
        MaskExpr::sliding_window_overlay(-3),
        Err(Error::Value { .. })
    ));
    assert!(matches!(
        MaskExpr::chunked(0, &[0]),
        Err(Error::Value { .. })
    ));
    assert!(matches!(
        MaskExpr::chunked(4, &[]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        MaskExpr::padding(&[1, 1, 1], 2, 2),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        MaskExpr::padding(&[], 0, 2),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        MaskExpr::document(&[0; 5], 2, 3),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(MaskExpr::prefix_lm(&[]), Err(Error::Shape { .. })));
    assert!(matches!(
        MaskExpr::prefix_lm(&[3, -1]),
        Err(Error::Value { .. })
    ));
    assert!(matches!(
        MaskExpr::bitmap(&[1; 5], [1, 1, 2, 3], 0, 0),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        MaskExpr::bitmap(&[], [0, 1, 2, 3], 0, 0),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        BitmapBuilder::new([1, 1, 4, 4], i64::MAX - 2, 0),
        Err(Error::Shape { .. })
    ));
    let mut builder = BitmapBuilder::new([1, 1, 2, 3], 0, 0).unwrap();
    assert!(builder.write_rows(0, 0, 1, &[1; 6]).is_err());
    assert!(builder.write_rows(1, 0, 0, &[1; 3]).is_err());
    assert!(builder.write_rows(0, 0, 0, &[1; 4]).is_err());
    builder.write_rows(0, 0, 1, &[1; 3]).unwrap();
    let m = builder.finish();
    assert_eq!(row(&m, 0, 1, 0..3), "111");
    let pad = MaskExpr::padding(&[1, 1, 1, 1, 1, 1], 3, 2).unwrap();
    assert_eq!(
        (pad & MaskExpr::causal()).check_dims(2, 1).unwrap_err(),
        Error::shape("padding mask batch", "1 or 2 (the batch size)", "3")
    );
}

#[test]
fn expressions_are_shareable() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<MaskExpr>();
    let m = MaskExpr::causal() & !MaskExpr::sliding_window(4, true).unwrap();
    assert_eq!(m.kind(), "and");
    assert_eq!(m.children().len(), 2);
    assert_eq!(
        format!("{m}"),
        "And(Causal(offset=0), Not(SlidingWindow(window=4, causal=true)))"
    );
}

#[test]
fn bytes_pack_into_words() {
    let bytes: Vec<u8> = (0..64u32)
        .map(|i| [0u8, 1, 2, 255, 128][(i * 7 % 5) as usize])
        .collect();
    let want = (0..64).fold(0u64, |w, j| w | (u64::from(bytes[j] != 0) << j));
    assert_eq!(pack_word(&bytes), want);
    assert_eq!(pack_word(&bytes[..13]), want & ((1 << 13) - 1));
    assert_eq!(pack_word(&[]), 0);
}

/// Regression (#15 fuzzing): shifts and windows near the ends of `i64` overflowed `+` / `-` in the
/// evaluator (`Shift` moved blocks with plain additions, negated `dk`, and block widths were `k1 - k0`).
/// They saturate now, as `visible` does.
#[test]
fn extreme_shifts_and_windows_do_not_overflow() {
    let pad = MaskExpr::padding(&[1, 0, 1, 1], 1, 4).unwrap();
    let docs = MaskExpr::document(&[0, 0, 1, 1], 1, 4).unwrap();
    let bitmap = MaskExpr::bitmap(&[1, 0, 1, 1], [1, 1, 2, 2], 0, 0).unwrap();
    let leaves = [pad, docs, bitmap, MaskExpr::causal(), MaskExpr::full()];
    let shifts = [i64::MIN, i64::MIN + 1, -5, 5, i64::MAX - 1, i64::MAX];
    for leaf in &leaves {
        for &dq in &shifts {
            for &dk in &shifts {
                for m in [
                    leaf.shift(dq, dk),
                    leaf.negate().shift(dq, dk),
                    (leaf.clone() | MaskExpr::causal().shift(1, 0).negate()).shift(dq, dk),
                ] {
                    for q0 in [i64::MIN, -3, 0, i64::MAX - 4] {
                        for k0 in [i64::MIN, -3, 0, i64::MAX - 4] {
                            let (q, k) = (q0..q0 + 4, k0..k0 + 4);
                            let _ = m.classify(0, 0, q.clone(), k.clone());
                            let _ = (m.key_hull(0, q.clone()), m.key_core(0, q.clone()));
                            let mut out = [0u8; 16];
                            m.fill(0, 0, q, k, &mut out);
                            let _ = m.visible(0, 0, q0, k0);
                        }
                    }
                }
            }
        }
        // A block wider than i64::MAX.
        let _ = leaf.negate().classify(0, 0, 0..2, i64::MIN..i64::MAX);
        let _ = leaf.classify(0, 0, i64::MIN..i64::MAX, 0..2);
    }
    // Where nothing saturates, a far shift is exact.
    let far = MaskExpr::padding(&[1, 0, 1, 1], 1, 4)
        .unwrap()
        .negate()
        .shift(i64::MAX - 10, i64::MIN + 10);
    let (q0, k0) = (8 - i64::MAX, i64::MAX - 11); // seen as rows and keys -2..6
    consistent(&far, 0, q0..q0 + 8, k0..k0 + 8);
}
