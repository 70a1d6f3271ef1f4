use super::*;
use crate::mask::MaskExpr;
use crate::tensor::{DType, TensorView};

/// A bool view of `bits` with `shape`, row-major.
fn view(bits: &mut [u8], shape: &[usize]) -> TensorView {
    let mut strides = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as isize;
    }
    assert_eq!(bits.len(), shape.iter().product::<usize>());
    // SAFETY: the strides are row-major for `shape`, whose elements are exactly the bytes of `bits`.
    unsafe { TensorView::new(bits.as_mut_ptr(), DType::Bool, shape.to_vec(), strides) }.unwrap()
}

/// Every tile of a `q x kv` grid (all row and column ranges), for batch 0..2 and head 0..2.
fn tiles(q: usize, kv: usize) -> impl Iterator<Item = (usize, usize, Range<usize>, Range<usize>)> {
    let ranges = |n: usize| (0..n).flat_map(move |a| (a + 1..=n).map(move |e| a..e));
    (0..2).flat_map(move |b| {
        (0..2).flat_map(move |h| {
            ranges(q).flat_map(move |r| ranges(kv).map(move |c| (b, h, r.clone(), c)))
        })
    })
}

/// Whether `got` answers every tile as `want` does.
fn same_tiles(got: &dyn MaskTiles, want: &dyn MaskTiles, q: usize, kv: usize) {
    for (b, h, rows, cols) in tiles(q, kv) {
        let n = rows.len() * cols.len();
        let (mut a, mut e) = (vec![7u8; n], vec![9u8; n]);
        got.fill(b, h, rows.clone(), cols.clone(), &mut a);
        want.fill(b, h, rows.clone(), cols.clone(), &mut e);
        assert_eq!(a, e, "fill b={b} h={h} {rows:?} x {cols:?}");
        // What a kernel reads, spans or bytes, is the filled tile.
        let mut vis = TileVis::new(rows.len(), cols.len());
        vis.load(got, b, h, rows.clone(), cols.clone());
        for (i, want_row) in e.chunks(cols.len()).enumerate() {
            let mut row = vec![1u8; cols.len()];
            vis.row(i).hide(&mut row, 0);
            assert_eq!(
                row, want_row,
                "TileVis b={b} h={h} {rows:?} x {cols:?} row {i}"
            );
        }
        assert_eq!(
            got.classify(b, h, rows.clone(), cols.clone()),
            want.classify(b, h, rows.clone(), cols.clone()),
            "classify b={b} h={h} {rows:?} x {cols:?}"
        );
    }
}

#[test]
fn block_class_of_counts() {
    assert_eq!(BlockClass::of(false, false), BlockClass::Empty);
    assert_eq!(BlockClass::of(true, false), BlockClass::Partial);
    assert_eq!(BlockClass::of(true, true), BlockClass::Full);
}

#[test]
fn grid_shape_and_size() {
    let grid = Grid::new(2, 3, 4, 5);
    assert_eq!(grid, Grid::from([2, 3, 4, 5]));
    assert_eq!(grid.shape(), [2, 3, 4, 5]);
    assert_eq!(grid.numel(), Some(120));
    assert_eq!(Grid::new(usize::MAX, 2, 1, 1).numel(), None);
    assert_eq!(Grid::new(0, 2, 1, 1).numel(), Some(0));
}

#[test]
fn placed_masks_map_tiles_to_positions() {
    let placed = PlacedMask::new(MaskExpr::causal(), 5, 0);
    assert_eq!(placed.classify(0, 0, 0..1, 0..6), BlockClass::Full);
    assert_eq!(placed.classify(0, 0, 0..1, 0..7), BlockClass::Partial);
    let mut out = [0u8; 8];
    placed.fill(0, 0, 0..1, 2..10, &mut out);
    assert_eq!(out, [1, 1, 1, 1, 0, 0, 0, 0]);
}

#[test]
fn dense_tiles_and_both() {
    // A 3x4 mask broadcast to 1x2x3x4.
    let mut bits: Vec<u8> = vec![1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0];
    let dense = DenseTiles::new(view(&mut bits, &[3, 4]), [1, 2, 3, 4]).unwrap();
    assert!(DenseTiles::new(view(&mut bits, &[3, 4]), [1, 2, 3, 5]).is_err());
    assert_eq!(dense.classify(0, 1, 0..2, 0..2), BlockClass::Full);
    assert_eq!(dense.classify(0, 1, 0..2, 0..4), BlockClass::Partial);
    assert_eq!(dense.classify(0, 0, 2..3, 0..4), BlockClass::Empty);
    let mut out = vec![9u8; 8];
    dense.fill(0, 1, 0..2, 0..4, &mut out);
    assert_eq!(out, [1, 1, 0, 0, 1, 1, 1, 1]);
    let causal = PlacedMask::new(MaskExpr::causal(), 0, 0);
    let both = BothTiles {
        first: &dense,
        second: &causal,
    };
    assert_eq!(both.classify(0, 0, 1..2, 0..4), BlockClass::Partial);
    both.fill(0, 0, 1..2, 0..4, &mut out[..4]);
    assert_eq!(&out[..4], [1, 1, 0, 0]);
    assert_eq!(both.classify(0, 0, 2..3, 0..1), BlockClass::Empty);
}

#[test]
fn both_of_two_interval_masks_intersects_their_spans() {
    let causal = PlacedMask::new(MaskExpr::causal(), 0, 0);
    let window = PlacedMask::new(MaskExpr::sliding_window(2, false).unwrap(), 0, 0);
    let both = BothTiles {
        first: &causal,
        second: &window,
    };
    let mut spans = [(9, 9); 3];
    assert!(both.spans(0, 0, 2..5, 0..6, &mut spans));
    // Row q sees keys max(0, q - 2)..=q.
    assert_eq!(spans, [(0, 3), (1, 4), (2, 5)]);
    let and = PlacedMask::new(
        MaskExpr::causal() & MaskExpr::sliding_window(2, false).unwrap(),
        0,
        0,
    );
    same_tiles(&both, &and, 5, 6);
}

#[test]
fn call_mask_picks_the_representation() {
    let grid = Grid::new(2, 2, 3, 4);
    // Per (head, row): a [2, 3, 4] tensor broadcast over the batch.
    let mut bits: Vec<u8> = (0..24u8).map(|i| u8::from(i % 3 != 1)).collect();
    let placed = PlacedMask::new(MaskExpr::sliding_window(2, true).unwrap(), 1, 0);

    let none = CallMask::new(grid, None, None).unwrap();
    assert!(!none.is_masked());
    same_tiles(&none, &NoMask, 3, 4);

    let structural = CallMask::new(grid, Some(placed.clone()), None).unwrap();
    assert!(structural.is_masked());
    same_tiles(&structural, &placed, 3, 4);

    let tensor = DenseTiles::new(view(&mut bits, &[2, 3, 4]), grid.shape()).unwrap();
    let only_dense = CallMask::new(grid, None, Some(view(&mut bits, &[2, 3, 4]))).unwrap();
    assert!(only_dense.is_masked());
    same_tiles(&only_dense, &tensor, 3, 4);

    let both = CallMask::new(
        grid,
        Some(placed.clone()),
        Some(view(&mut bits, &[2, 3, 4])),
    )
    .unwrap();
    assert!(both.is_masked());
    let want = BothTiles {
        first: &placed,
        second: &tensor,
    };
    same_tiles(&both, &want, 3, 4);
    // And the AND element by element.
    let mut out = vec![0u8; 12];
    both.fill(1, 1, 0..3, 0..4, &mut out);
    for (i, row) in out.chunks(4).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let structural = placed.expr.visible(1, 1, 1 + i as i64, j as i64);
            let dense = bits[(3 + i) * 4 + j] != 0;
            assert_eq!(v, u8::from(structural && dense), "({i}, {j})");
        }
    }
}

#[test]
fn call_mask_refuses_what_dense_tiles_refuse() {
    let grid = Grid::new(1, 2, 3, 4);
    let mut bits = vec![1u8; 15];
    let placed = PlacedMask::new(MaskExpr::causal(), 0, 0);
    for structural in [None, Some(placed)] {
        let err = CallMask::new(grid, structural, Some(view(&mut bits, &[3, 5]))).unwrap_err();
        let want = DenseTiles::new(view(&mut bits, &[3, 5]), grid.shape()).unwrap_err();
        assert_eq!(err.to_string(), want.to_string());
        assert!(err.to_string().starts_with("attn_mask"), "{err}");
    }
    let mut floats = vec![0f32; 12];
    // SAFETY: the view addresses exactly the 12 floats of `floats`.
    let wrong = unsafe {
        TensorView::new(
            floats.as_mut_ptr().cast(),
            DType::F32,
            vec![3, 4],
            vec![4, 1],
        )
    }
    .unwrap();
    let err = CallMask::new(grid, None, Some(wrong)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "attn_mask: expected torch.bool, got torch.float32"
    );
}
