//! Strategies and helpers shared by the property tests (`mask_props.rs`) and the fuzz targets
//! (`fuzz_masks.rs`): random mask expressions, grids to place them on, and the naive constructions the fast
//! paths are checked against.

// Each test binary uses part of this module.
#![allow(dead_code)]

use attnrs_core::layout::{BlockSparse, Grid};
use attnrs_core::mask::tiles::BlockClass;
use attnrs_core::mask::{MaskExpr, PlacedMask};
use proptest::prelude::*;

/// Per-batch table rows: one (broadcast) or `batch`.
pub fn rows(batch: usize) -> impl Strategy<Value = usize> {
    prop_oneof![Just(1), Just(batch)]
}

/// Any `i64`, biased to the values where arithmetic breaks: small ones, the ends of the range, powers of
/// two and their neighbours.
pub fn extreme() -> BoxedStrategy<i64> {
    prop_oneof![
        2 => -8i64..8,
        1 => i64::MIN..i64::MIN + 8,
        1 => i64::MAX - 8..=i64::MAX,
        1 => (0u32..63, any::<bool>(), -2i64..3).prop_map(|(e, neg, d)| {
            let x = (1i64 << e).saturating_add(d);
            if neg { -x } else { x }
        }),
        1 => any::<i64>(),
    ]
    .boxed()
}

/// The magnitude below which [`large`] numbers stay: sums of a few dozen of them fit in `i64`.
pub const LARGE: i64 = 1 << 58;

/// An `i64` of magnitude up to [`LARGE`], biased to small ones, powers of two and the bounds.
pub fn large() -> BoxedStrategy<i64> {
    prop_oneof![
        2 => -8i64..8,
        1 => (0u32..58, any::<bool>(), -2i64..3).prop_map(|(e, neg, d)| {
            let x = (1i64 << e) + d;
            if neg { -x } else { x }
        }),
        1 => -LARGE..=LARGE,
        1 => prop_oneof![Just(LARGE), Just(-LARGE)],
    ]
    .boxed()
}

/// How far the numbers of an expression (offsets, windows, chunk starts and sizes, prefix lengths, shifts,
/// bitmap corners) reach.
#[derive(Debug, Clone, Copy)]
pub enum Scale {
    /// The small ranges of the property tests.
    Small,
    /// Mostly small, sometimes up to [`LARGE`]: no evaluation near 0 can reach the ends of `i64`.
    Wide,
    /// Mostly small, sometimes up to the ends of `i64` (saturating arithmetic everywhere).
    Extreme,
}

impl Scale {
    /// `small`, or mostly `small` and sometimes a wide or extreme value.
    fn pick(self, small: impl Strategy<Value = i64> + 'static) -> BoxedStrategy<i64> {
        match self {
            Scale::Small => small.boxed(),
            Scale::Wide => prop_oneof![3 => small, 1 => large()].boxed(),
            Scale::Extreme => prop_oneof![3 => small, 1 => extreme()].boxed(),
        }
    }

    /// [`Scale::pick`] for positive numbers.
    fn pick_positive(self, small: impl Strategy<Value = i64> + 'static) -> BoxedStrategy<i64> {
        self.pick(small)
            .prop_map(|x| x.saturating_abs().max(1))
            .boxed()
    }
}

/// A random leaf for `batch` x `heads` grids.
pub fn leaf(batch: usize, heads: usize) -> BoxedStrategy<MaskExpr> {
    leaf_at(batch, heads, Scale::Small)
}

pub fn leaf_at(batch: usize, heads: usize, scale: Scale) -> BoxedStrategy<MaskExpr> {
    let offset = move || scale.pick(-3i64..4);
    let window = move || scale.pick_positive(1i64..7);
    let at = move || scale.pick(-4i64..8);
    prop_oneof![
        Just(MaskExpr::full()),
        Just(MaskExpr::empty()),
        offset().prop_map(MaskExpr::causal_with_offset),
        (window(), any::<bool>()).prop_map(|(w, c)| MaskExpr::sliding_window(w, c).unwrap()),
        window().prop_map(|w| MaskExpr::sliding_window_overlay(w).unwrap()),
        (window(), rows(batch))
            .prop_flat_map(move |(size, n)| (
                Just(size),
                prop::collection::vec(scale.pick(-4i64..6), n)
            ))
            .prop_map(|(size, start)| MaskExpr::chunked(size, &start).unwrap()),
        (rows(batch), 0usize..24, any::<bool>())
            .prop_flat_map(|(n, kabs, contiguous)| {
                let bits = prop::collection::vec(0u8..2, n * kabs);
                let runs = prop::collection::vec((0..=kabs, 0..=kabs), n);
                (Just((n, kabs, contiguous)), bits, runs)
            })
            .prop_map(|((n, kabs, contiguous), bits, runs)| {
                let valid: Vec<u8> = if contiguous {
                    // Left / right padding: one run of real tokens per row.
                    runs.iter()
                        .flat_map(|&(a, b)| {
                            (0..kabs).map(move |k| u8::from(a.min(b) <= k && k < a.max(b)))
                        })
                        .collect()
                } else {
                    bits
                };
                MaskExpr::padding(&valid, n, kabs).unwrap()
            }),
        (rows(batch), 0usize..24, any::<bool>())
            .prop_flat_map(|(n, len, sorted)| (
                Just((n, len, sorted)),
                prop::collection::vec(0i64..4, n * len)
            ))
            .prop_map(|((n, len, sorted), mut ids)| {
                if sorted && len > 0 {
                    ids.chunks_mut(len).for_each(|r| r.sort_unstable());
                }
                MaskExpr::document(&ids, n, len).unwrap()
            }),
        rows(batch)
            .prop_flat_map(move |n| prop::collection::vec(
                scale.pick(0i64..12).prop_map(i64::saturating_abs),
                n
            ))
            .prop_map(|len| MaskExpr::prefix_lm(&len).unwrap()),
        (
            rows(batch),
            prop_oneof![Just(1), Just(heads)],
            0usize..14,
            0usize..14,
            at(),
            at()
        )
            .prop_flat_map(|(bm, hm, qm, km, q0, k0)| {
                (
                    Just((bm, hm, qm, km, q0, k0)),
                    prop::collection::vec(prop::bool::weighted(0.7), bm * hm * qm * km),
                )
            })
            .prop_map(|((bm, hm, qm, km, q0, k0), bits)| {
                let bytes: Vec<u8> = bits.into_iter().map(u8::from).collect();
                // The rectangle must end inside i64.
                let (q0, k0) = (q0.min(i64::MAX - qm as i64), k0.min(i64::MAX - km as i64));
                MaskExpr::bitmap(&bytes, [bm, hm, qm, km], q0, k0).unwrap()
            }),
    ]
    .boxed()
}

/// A random expression (up to 3 levels of and / or / not / shift over [`leaf`]s).
pub fn expr(batch: usize, heads: usize) -> BoxedStrategy<MaskExpr> {
    expr_at(batch, heads, Scale::Small)
}

pub fn expr_at(batch: usize, heads: usize, scale: Scale) -> BoxedStrategy<MaskExpr> {
    let shift = move || scale.pick(-5i64..6);
    leaf_at(batch, heads, scale)
        .prop_recursive(3, 12, 3, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4).prop_map(MaskExpr::and),
                prop::collection::vec(inner.clone(), 1..4).prop_map(MaskExpr::or),
                inner.clone().prop_map(|m| m.negate()),
                (inner, shift(), shift()).prop_map(|(m, dq, dk)| m.shift(dq, dk)),
            ]
        })
        .boxed()
}

/// A mask placed over a grid, with the block size of its layout.
#[derive(Debug, Clone)]
pub struct Case {
    pub mask: PlacedMask,
    pub grid: Grid,
    pub q_block: usize,
    pub kv_block: usize,
}

/// A small case of [`expr`]: grids up to 29 x 29 near position 0, blocks up to 8.
pub fn case() -> impl Strategy<Value = Case> {
    (1usize..3, 1usize..3)
        .prop_flat_map(|(batch, heads)| {
            (
                Just((batch, heads)),
                expr(batch, heads),
                0usize..30,
                0usize..30,
                -6i64..10,
                -6i64..10,
                1usize..9,
                1usize..9,
            )
        })
        .prop_map(
            |((batch, heads), expr, q_len, kv_len, q_offset, kv_offset, q_block, kv_block)| Case {
                mask: PlacedMask::new(expr, q_offset, kv_offset),
                grid: Grid::new(batch, heads, q_len, kv_len),
                q_block,
                kv_block,
            },
        )
}

impl Case {
    pub fn expr(&self) -> &MaskExpr {
        &self.mask.expr
    }

    /// `[batch, heads, q, kv]` from `visible`.
    pub fn dense(&self) -> Vec<bool> {
        let (g, m) = (self.grid, &self.mask);
        let mut out = Vec::with_capacity(g.numel().unwrap());
        for b in 0..g.batch {
            for h in 0..g.heads {
                for i in 0..g.q {
                    for j in 0..g.kv {
                        out.push(m.expr.visible(
                            b,
                            h,
                            m.q_offset + i as i64,
                            m.kv_offset + j as i64,
                        ));
                    }
                }
            }
        }
        out
    }

    pub fn at(&self, dense: &[bool], b: usize, h: usize, i: usize, j: usize) -> bool {
        let g = self.grid;
        i < g.q && j < g.kv && dense[((b * g.heads + h) * g.q + i) * g.kv + j]
    }

    pub fn layout(&self) -> BlockSparse {
        BlockSparse::build(
            self.mask.clone(),
            self.grid,
            (self.q_block, self.kv_block),
            2,
        )
        .unwrap()
    }
}

/// The class of a tile of `area` pairs of which `visible` are.
pub fn block_class(visible: usize, area: usize) -> BlockClass {
    BlockClass::of(visible > 0, visible == area)
}
