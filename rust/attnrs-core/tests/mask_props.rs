//! Property tests: every fast path of the mask evaluator against per-element `visible`, and block layouts
//! against a naive dense construction that follows torch's `_convert_mask_to_block_mask` literally.

mod common;

use attnrs_core::layout::{BlockSparse, Grid, fill_dense};
use attnrs_core::mask::tiles::{BlockClass, MaskTiles};
use attnrs_core::mask::{MaskExpr, PlacedMask};
use common::{block_class, case};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn classify_and_fill_agree_with_visible(c in case(), rects in prop::collection::vec((0usize..30, 1usize..12, 0usize..30, 1usize..12), 12)) {
        c.expr().check_dims(c.grid.batch, c.grid.heads).unwrap();
        let dense = c.dense();
        for b in 0..c.grid.batch {
            for h in 0..c.grid.heads {
                // (a) every block of the grid's tiling, clipped to the grid, plus random rectangles.
                let tiles = (0..c.grid.q.div_ceil(c.q_block))
                    .flat_map(|qb| (0..c.grid.kv.div_ceil(c.kv_block)).map(move |kb| (qb, kb)))
                    .map(|(qb, kb)| (qb * c.q_block, c.q_block, kb * c.kv_block, c.kv_block));
                for (r0, rn, c0, cn) in tiles.chain(rects.iter().copied()) {
                    let (r1, c1) = ((r0 + rn).min(c.grid.q), (c0 + cn).min(c.grid.kv));
                    if r0 >= r1 || c0 >= c1 {
                        continue;
                    }
                    let n = (r0..r1).flat_map(|i| (c0..c1).map(move |j| (i, j))).filter(|&(i, j)| c.at(&dense, b, h, i, j)).count();
                    let want = block_class(n, (r1 - r0) * (c1 - c0));
                    let q = c.mask.q_offset + r0 as i64..c.mask.q_offset + r1 as i64;
                    let k = c.mask.kv_offset + c0 as i64..c.mask.kv_offset + c1 as i64;
                    prop_assert_eq!(c.expr().classify(b, h, q.clone(), k.clone()), want, "classify {:?} rows {:?} cols {:?}", c.expr(), q, k);
                    // (d) the kernel's view of the same tile.
                    let placed = &c.mask;
                    prop_assert_eq!(placed.classify(b, h, r0..r1, c0..c1), want);
                    let mut tile = vec![7u8; (r1 - r0) * (c1 - c0)];
                    placed.fill(b, h, r0..r1, c0..c1, &mut tile);
                    for (t, (i, j)) in tile.iter().zip((r0..r1).flat_map(|i| (c0..c1).map(move |j| (i, j)))) {
                        prop_assert_eq!(*t, u8::from(c.at(&dense, b, h, i, j)), "tile fill at ({}, {})", i, j);
                    }
                }
            }
        }
        // (b) the whole grid through the dense builder.
        let mut out = vec![7u8; dense.len()];
        fill_dense(&c.mask, c.grid, &mut out, 2).unwrap();
        prop_assert!(out.iter().zip(&dense).all(|(&o, &d)| o == u8::from(d)), "dense fill of {:?}", c.expr());
        // (e) the flat program the attention operator receives decodes to the same mask.
        let program = c.expr().encode();
        let decoded = MaskExpr::decode(&program.program, &program.ints, &program.bytes).unwrap();
        let mut again = vec![7u8; dense.len()];
        fill_dense(&PlacedMask::new(decoded, c.mask.q_offset, c.mask.kv_offset), c.grid, &mut again, 1).unwrap();
        prop_assert_eq!(again, out);
    }

    #[test]
    fn block_sparse_matches_torch_construction(c in case()) {
        let bs = c.layout();
        let dense = c.dense();
        let (nqb, nkb) = (c.grid.q.div_ceil(c.q_block), c.grid.kv.div_ceil(c.kv_block));
        prop_assert_eq!((bs.num_q_blocks, bs.num_kv_blocks), (nqb, nkb));
        prop_assert_eq!(bs.layout_batch, if c.expr().depends_on_batch() { c.grid.batch } else { 1 });
        prop_assert_eq!(bs.layout_heads, if c.expr().depends_on_head() { c.grid.heads } else { 1 });
        let area = c.q_block * c.kv_block;
        for b in 0..c.grid.batch {
            for h in 0..c.grid.heads {
                let (lb, lh) = (b.min(bs.layout_batch - 1), h.min(bs.layout_heads - 1));
                // Classes of the padded blocks, exactly as torch counts them.
                let mut classes = vec![BlockClass::Empty; nqb * nkb];
                for qb in 0..nqb {
                    for kb in 0..nkb {
                        let n = (0..c.q_block).flat_map(|i| (0..c.kv_block).map(move |j| (i, j)))
                            .filter(|&(i, j)| c.at(&dense, b, h, qb * c.q_block + i, kb * c.kv_block + j))
                            .count();
                        classes[qb * nkb + kb] = block_class(n, area);
                    }
                }
                let pick = |want: BlockClass, by_q: bool, x: usize| -> Vec<i32> {
                    let n = if by_q { nkb } else { nqb };
                    (0..n).filter(|&y| {
                        let (qb, kb) = if by_q { (x, y) } else { (y, x) };
                        classes[qb * nkb + kb] == want
                    }).map(|y| y as i32).collect()
                };
                for qb in 0..nqb {
                    prop_assert_eq!(bs.kv.row(lb, lh, qb), &pick(BlockClass::Partial, true, qb)[..], "kv partial b={} qb={}", b, qb);
                    prop_assert_eq!(bs.full_kv.row(lb, lh, qb), &pick(BlockClass::Full, true, qb)[..], "kv full b={} qb={}", b, qb);
                }
                for kb in 0..nkb {
                    prop_assert_eq!(bs.q.row(lb, lh, kb), &pick(BlockClass::Partial, false, kb)[..], "q partial b={} kb={}", b, kb);
                    prop_assert_eq!(bs.full_q.row(lb, lh, kb), &pick(BlockClass::Full, false, kb)[..], "q full b={} kb={}", b, kb);
                }
            }
        }
        // CSR storage: shape[3] is the largest count, offsets are the counts' prefix sums, and indices hold
        // exactly the listed blocks. torch's padded rows: the listed blocks, then the rest by stable argsort.
        for (index, blocks, n) in [(&bs.kv, nqb, nkb), (&bs.full_kv, nqb, nkb), (&bs.q, nkb, nqb), (&bs.full_q, nkb, nqb)] {
            let [ib, ih, rows, width] = index.shape;
            prop_assert_eq!((ib, ih, rows), (bs.layout_batch, bs.layout_heads, blocks));
            prop_assert_eq!(index.counts_shape(), [ib, ih, rows]);
            prop_assert_eq!(index.counts.len(), ib * ih * rows);
            prop_assert_eq!(width, index.counts.iter().copied().max().unwrap_or(0) as usize);
            prop_assert_eq!(index.offsets.len(), index.counts.len() + 1);
            prop_assert_eq!(index.offsets[0], 0);
            for (w, &count) in index.offsets.windows(2).zip(&index.counts) {
                prop_assert_eq!(w[1] - w[0], count as usize);
            }
            prop_assert_eq!(index.indices.len(), index.counts.iter().map(|&c| c as usize).sum::<usize>());
            let mut counts = vec![-1i32; index.counts.len()];
            let mut order = vec![-1i32; index.counts.len() * n];
            index.write_torch_order(&mut counts, &mut order, n).unwrap();
            prop_assert_eq!(&counts, &index.counts);
            for b in 0..ib {
                for h in 0..ih {
                    for r in 0..rows {
                        let listed = index.row(b, h, r);
                        let mut want: Vec<i32> = (0..n as i32).collect();
                        want.sort_by_key(|j| !listed.contains(j));
                        let at = ((b * ih + h) * rows + r) * n;
                        prop_assert_eq!(&order[at..at + n], &want[..]);
                    }
                }
            }
        }
    }
}

/// `expr` at offsets (0, 0), laid out over `[batch, heads, q, kv]` with `block` sizes on one thread.
fn build(
    expr: &MaskExpr,
    [batch, heads, q, kv]: [usize; 4],
    block: (usize, usize),
) -> attnrs_core::Result<BlockSparse> {
    let mask = PlacedMask::new(expr.clone(), 0, 0);
    BlockSparse::build(mask, Grid::new(batch, heads, q, kv), block, 1)
}

#[test]
fn layouts_reject_bad_sizes() {
    let pad = MaskExpr::padding(&[1, 1, 0, 1, 1, 1], 3, 2).unwrap() & MaskExpr::causal();
    let err = build(&pad, [2, 1, 4, 4], (2, 2)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "padding mask batch: expected 1 or 2 (the batch size), got 3"
    );
    let causal = MaskExpr::causal();
    assert!(build(&causal, [0, 1, 4, 4], (2, 2)).is_err());
    assert!(build(&causal, [1, 0, 4, 4], (2, 2)).is_err());
    assert!(build(&causal, [1, 1, 4, 4], (0, 2)).is_err());
    let far = PlacedMask::new(causal.clone(), i64::MAX, 0);
    assert!(BlockSparse::build(far, Grid::new(1, 1, 4, 4), (2, 2), 1).is_err());
    let mut out = vec![0u8; 15];
    let at0 = PlacedMask::new(causal.clone(), 0, 0);
    assert!(fill_dense(&at0, Grid::new(1, 1, 4, 4), &mut out, 1).is_err());
    let bitmap = MaskExpr::bitmap(&[1, 0], [1, 2, 1, 1], 0, 0).unwrap();
    assert!(build(&bitmap, [1, 3, 1, 1], (1, 1)).is_err());
    let empty = build(&causal, [1, 1, 0, 5], (4, 4)).unwrap();
    assert_eq!(empty.kv.shape, [1, 1, 0, 0]);
    assert_eq!(empty.kv.offsets, vec![0]);
    assert_eq!(empty.q.counts, vec![0, 0]);
}

#[test]
fn causal_block_mask_at_scale_lists_only_needed_blocks() {
    // 1000 tokens, block 128: torch's padding rule makes the last (cut) q-block partial throughout.
    let mask = PlacedMask::new(MaskExpr::causal(), 0, 0);
    let bs = BlockSparse::build(mask, Grid::new(1, 1, 1000, 1000), (128, 128), 2).unwrap();
    assert_eq!(bs.num_q_blocks, 8);
    assert_eq!(bs.kv.counts, vec![1, 1, 1, 1, 1, 1, 1, 8]);
    assert_eq!(bs.full_kv.counts, vec![0, 1, 2, 3, 4, 5, 6, 0]);
    assert_eq!(bs.full_kv.shape, [1, 1, 8, 6]);
    assert_eq!(bs.q.row(0, 0, 7), &[7]);
    assert_eq!(bs.q.row(0, 0, 2), &[2, 7]);
    assert_eq!(bs.full_q.row(0, 0, 0), &[1, 2, 3, 4, 5, 6]);
}
