//! Dropout on the attention weights, from a counter-based generator.
//!
//! Whether the pair `(b, h, i, j)` is kept depends only on the seed and those four indices, never on the
//! tiling, the work split or the thread count. So the backward regenerates exactly the forward's pattern
//! from the seed alone (nothing Q×K is stored), a re-run under gradient checkpointing drops the same pairs,
//! and one seed drawn from torch's generator makes `torch.manual_seed` reproduce a run.
//!
//! The generator is SplitMix64 (Steele, Lea and Flood 2014, the seeding generator of `java.util.SplittableRandom`)
//! used as a hash: each row `(b, h, i)` gets its own key from the seed, and column `j` of that row is the
//! `j`-th output of the SplitMix64 stream started at the key. A pair is dropped when the top 32 bits of its
//! output fall below `round(p · 2³²)`, so the keep rate is `1 - p` up to 2⁻³².
//!
//! The kept weights are scaled by `1 / (1 - p)` (inverted dropout, as `torch.nn.functional.dropout`): the
//! kernels zero dropped weights in `P` before `P·V` and apply the factor to the finished output row.

/// Dropout of one call: probability and seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// The probability of dropping a weight, in `[0, 1)`.
    pub p: f64,
    /// Any 64-bit seed (attnrs draws it from torch's default generator).
    pub seed: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser (a bijection of `u64` with full avalanche).
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A validated [`Dropout`] for one call's shape: finds the keep decision of any pair.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropMask {
    seed: u64,
    /// A pair is dropped when the top 32 bits of its hash are below this.
    threshold: u64,
    /// `1 / (1 - p)`.
    pub scale: f64,
    heads: usize,
    q_len: usize,
}

impl DropMask {
    /// `None` for `p == 0` (nothing is dropped). `p` must lie in `[0, 1)` (see [`check`]).
    pub fn new(dropout: Option<Dropout>, heads: usize, q_len: usize) -> Option<DropMask> {
        let d = dropout.filter(|d| d.p > 0.0)?;
        Some(DropMask {
            seed: d.seed,
            threshold: ((d.p * 4_294_967_296.0).round() as u64).min(1 << 32),
            scale: 1.0 / (1.0 - d.p),
            heads,
            q_len,
        })
    }

    /// The key of row `(b, h, i)`.
    #[inline(always)]
    pub fn row(&self, b: usize, h: usize, i: usize) -> RowKey {
        let row = ((b * self.heads + h) * self.q_len + i) as u64;
        RowKey {
            key: mix(self.seed ^ mix(row.wrapping_add(1).wrapping_mul(GOLDEN))),
            threshold: self.threshold,
        }
    }
}

/// The keep decisions of one row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowKey {
    key: u64,
    threshold: u64,
}

impl RowKey {
    /// Whether column `j` is kept.
    #[inline(always)]
    pub fn kept(&self, j: usize) -> bool {
        let z = mix(self
            .key
            .wrapping_add((j as u64).wrapping_add(1).wrapping_mul(GOLDEN)));
        (z >> 32) >= self.threshold
    }

    /// Sets `row[c]` to `zero` for every dropped column `j0 + c`.
    #[inline(always)]
    pub fn drop_into<E: Copy>(&self, j0: usize, row: &mut [E], zero: E) {
        for (c, x) in row.iter_mut().enumerate() {
            if !self.kept(j0 + c) {
                *x = zero;
            }
        }
    }
}

/// Checks a dropout probability: finite and in `[0, 1)`.
pub(crate) fn check(dropout: Option<Dropout>) -> crate::Result<()> {
    match dropout {
        Some(d) if !(0.0..1.0).contains(&d.p) => Err(crate::Error::value(
            "dropout_p",
            "a probability in [0, 1)",
            format!("{}", d.p),
        )),
        _ => Ok(()),
    }
}

/// Writes the keep pattern of a `[B, H, Q, K]` call into `out` (row-major, 1 = kept): what the kernels use,
/// for tests and for users who need the pattern.
pub fn keep_pattern(dropout: Dropout, shape: [usize; 4], out: &mut [bool]) -> crate::Result<()> {
    check(Some(dropout))?;
    let [b, h, q, k] = shape;
    let total = b
        .checked_mul(h)
        .and_then(|x| x.checked_mul(q))
        .and_then(|x| x.checked_mul(k));
    if total != Some(out.len()) {
        return Err(crate::Error::shape(
            "out",
            format!("{shape:?} elements"),
            format!("{} elements", out.len()),
        ));
    }
    let Some(mask) = DropMask::new(Some(dropout), h, q) else {
        out.fill(true);
        return Ok(());
    };
    for (r, row) in out.chunks_mut(k.max(1)).enumerate().take(b * h * q) {
        let key = mask.row(r / (h * q), (r / q) % h, r % q);
        for (j, x) in row.iter_mut().enumerate() {
            *x = key.kept(j);
        }
    }
    Ok(())
}
