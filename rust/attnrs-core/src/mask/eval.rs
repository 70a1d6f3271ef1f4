//! The evaluator: per-element visibility, per-row intervals and counts, exact block classes, dense rows.

use super::interval::{Iv, Union, fill_iv, span};
use super::tables::pick;
use super::tiles::BlockClass;
use super::{MaskExpr, Node};

/// Reusable row buffers for `And` / `Or` children that must be materialised.
#[derive(Default)]
pub(crate) struct Scratch(Vec<Vec<u8>>);

impl Scratch {
    fn take(&mut self, width: usize) -> Vec<u8> {
        let mut buf = self.0.pop().unwrap_or_default();
        buf.resize(width, 0);
        buf
    }
    fn give(&mut self, buf: Vec<u8>) {
        self.0.push(buf);
    }
}

fn saturate(x: i128) -> i64 {
    x.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// The number of positions of the half-open window `k0..k1` (`k0 < k1`; wider than `i64::MAX` is fine).
fn width(k0: i64, k1: i64) -> u64 {
    (k1 as i128 - k0 as i128) as u64
}

/// The non-empty half-open range `lo..hi` moved by `d` (a `Shift`), as `visible` moves single positions:
/// saturating at the ends of `i64`. A range pushed wholly past an end collapses onto the last position
/// there, so that it stays non-empty. (Plain `+` overflowed here on shifts near the ends of `i64`.)
fn moved(lo: i64, hi: i64, d: i64) -> (i64, i64) {
    let (a, e) = (lo.saturating_add(d), hi.saturating_add(d));
    if a < e {
        (a, e)
    } else if a == i64::MAX {
        (i64::MAX - 1, i64::MAX)
    } else {
        (i64::MIN, i64::MIN + 1)
    }
}

/// Up to this many interval children of an `Or` are merged per row; beyond, rows are filled densely.
const OR_INTERVALS: usize = 8;

impl Node {
    /// Rows of the "monotone" leaves: one interval per row, both ends nondecreasing in `q`, and the union
    /// over consecutive rows contiguous. `None` for every other node.
    #[inline]
    fn mono_iv(&self, b: usize, q: i64) -> Option<Iv> {
        Some(match *self {
            Node::Full => Iv::ALL,
            Node::Causal { offset } => Iv::new(i64::MIN, q.saturating_add(offset)),
            Node::Sliding {
                window,
                causal: true,
            } => Iv::new(q.saturating_sub(window - 1), q),
            Node::Sliding {
                window,
                causal: false,
            } => Iv::new(q.saturating_sub(window), q.saturating_add(window)),
            Node::Overlay { window } => Iv::new(q.saturating_sub(window - 1), i64::MAX),
            Node::Chunked { size, ref start } => {
                let s = *pick(start, b) as i128;
                let size = size as i128;
                let lo = s + (q as i128 - s).div_euclid(size) * size;
                Iv::new(saturate(lo), saturate(lo + size - 1))
            }
            Node::PrefixLm(ref len) => Iv::new(i64::MIN, (pick(len, b) - 1).max(q)),
            // Moving every row by the same amount keeps the ends nondecreasing and the union contiguous.
            Node::Shift { dq, dk, ref inner } => inner
                .get()
                .mono_iv(b, q.saturating_add(dq))?
                .shifted_back(dk),
            _ => return None,
        })
    }

    /// The keys row `q` sees, when they form one interval (possibly empty or unbounded).
    pub(crate) fn row_iv(&self, b: usize, q: i64) -> Option<Iv> {
        if let Some(iv) = self.mono_iv(b, q) {
            return Some(iv);
        }
        match self {
            Node::Empty => Some(Iv::EMPTY),
            Node::Padding(rows) => pick(rows, b).run,
            Node::Document(rows) => pick(rows, b).row_iv(q),
            Node::And(parts) => {
                let mut iv = Iv::ALL;
                for p in parts.iter() {
                    iv = iv.meet(p.get().row_iv(b, q)?);
                }
                Some(iv)
            }
            Node::Or(parts) => {
                let mut union = Union::<OR_INTERVALS>::new();
                for p in parts.iter() {
                    if !union.push(p.get().row_iv(b, q)?) {
                        return None;
                    }
                }
                match union.merged() {
                    [] => Some(Iv::EMPTY),
                    [one] => Some(*one),
                    _ => None,
                }
            }
            Node::Not(inner) => inner.get().row_iv(b, q)?.complement(),
            Node::Shift { dq, dk, inner } => Some(
                inner
                    .get()
                    .row_iv(b, q.saturating_add(*dq))?
                    .shifted_back(*dk),
            ),
            _ => None,
        }
    }

    pub(crate) fn visible(&self, b: usize, h: usize, q: i64, k: i64) -> bool {
        if let Some(iv) = self.mono_iv(b, q) {
            return iv.contains(k);
        }
        match self {
            Node::Padding(rows) => pick(rows, b).visible(k),
            Node::Document(rows) => pick(rows, b).visible(q, k),
            Node::Bitmap(t) => t.visible(b, h, q, k),
            Node::And(parts) => parts.iter().all(|p| p.get().visible(b, h, q, k)),
            Node::Or(parts) => parts.iter().any(|p| p.get().visible(b, h, q, k)),
            Node::Not(inner) => !inner.get().visible(b, h, q, k),
            Node::Shift { dq, dk, inner } => {
                inner
                    .get()
                    .visible(b, h, q.saturating_add(*dq), k.saturating_add(*dk))
            }
            _ => false, // Empty
        }
    }

    /// Exact class of the non-empty block `q0..q1 x k0..k1`.
    pub(crate) fn classify(
        &self,
        b: usize,
        h: usize,
        q0: i64,
        q1: i64,
        k0: i64,
        k1: i64,
    ) -> BlockClass {
        if let (Some(first), Some(last)) = (self.mono_iv(b, q0), self.mono_iv(b, q1 - 1)) {
            // Rows' ends are nondecreasing and their union contiguous: the first and last rows decide.
            return if last.lo <= k0 && first.hi >= k1 - 1 {
                BlockClass::Full
            } else if last.hi < k0 || first.lo > k1 - 1 {
                BlockClass::Empty
            } else {
                BlockClass::Partial
            };
        }
        let width = width(k0, k1);
        match self {
            Node::Padding(rows) => {
                let n = pick(rows, b).count(k0, k1);
                BlockClass::of(n > 0, n == width)
            }
            Node::Document(rows) => {
                let (any, all) = pick(rows, b).block(q0, q1, k0, k1);
                BlockClass::of(any, all)
            }
            Node::Bitmap(t) => {
                let (any, all) = t.block(b, h, q0, q1, k0, k1);
                BlockClass::of(any, all)
            }
            Node::And(parts) | Node::Or(parts) => {
                // One child of the deciding class decides; children of the other whole class change nothing.
                let (decides, neutral) = match self {
                    Node::And(_) => (BlockClass::Empty, BlockClass::Full),
                    _ => (BlockClass::Full, BlockClass::Empty),
                };
                let mut partial = 0;
                for p in parts.iter() {
                    match p.get().classify(b, h, q0, q1, k0, k1) {
                        BlockClass::Partial => partial += 1,
                        c if c == decides => return decides,
                        _ => {}
                    }
                }
                match partial {
                    0 => neutral,
                    1 => BlockClass::Partial,
                    _ => self.resolve(b, h, q0, q1, k0, k1),
                }
            }
            Node::Not(inner) => match inner.get().classify(b, h, q0, q1, k0, k1) {
                BlockClass::Full => BlockClass::Empty,
                BlockClass::Empty => BlockClass::Full,
                BlockClass::Partial => BlockClass::Partial,
            },
            Node::Shift { dq, dk, inner } => {
                let ((q0, q1), (k0, k1)) = (moved(q0, q1, *dq), moved(k0, k1, *dk));
                inner.get().classify(b, h, q0, q1, k0, k1)
            }
            _ => BlockClass::Empty,
        }
    }

    /// Classifies a block row by row from exact visible counts, stopping as soon as it is known partial.
    fn resolve(&self, b: usize, h: usize, q0: i64, q1: i64, k0: i64, k1: i64) -> BlockClass {
        let width = width(k0, k1);
        let (mut any, mut all) = (false, true);
        let mut scratch = Scratch::default();
        for q in q0..q1 {
            let n = self.row_count(b, h, q, k0, k1, &mut scratch);
            any |= n > 0;
            all &= n == width;
            if any && !all {
                break;
            }
        }
        BlockClass::of(any, all)
    }

    /// Keys visible from row `q` in `k0..k1`.
    fn row_count(
        &self,
        b: usize,
        h: usize,
        q: i64,
        k0: i64,
        k1: i64,
        scratch: &mut Scratch,
    ) -> u64 {
        if k0 >= k1 {
            return 0;
        }
        let window = Iv::window(k0, k1);
        if let Some(iv) = self.row_iv(b, q) {
            return iv.meet(window).len();
        }
        match self {
            Node::Padding(rows) => pick(rows, b).count(k0, k1),
            Node::Document(rows) => pick(rows, b).count(q, k0, k1),
            Node::Bitmap(t) => t.count(b, h, q, k0, k1),
            Node::Not(inner) => width(k0, k1) - inner.get().row_count(b, h, q, k0, k1, scratch),
            Node::Shift { dq, dk, inner } => {
                let (k0, k1) = moved(k0, k1, *dk);
                inner
                    .get()
                    .row_count(b, h, q.saturating_add(*dq), k0, k1, scratch)
            }
            Node::And(parts) => {
                // Intersect the interval children; count the only other child inside the intersection.
                let mut iv = window;
                let (mut other, mut others) = (None, 0);
                for p in parts.iter() {
                    match p.get().row_iv(b, q) {
                        Some(piv) => iv = iv.meet(piv),
                        None => {
                            others += 1;
                            other.get_or_insert(p);
                        }
                    }
                }
                match other {
                    _ if iv.is_empty() => 0,
                    Some(p) if others == 1 => p.get().row_count(b, h, q, iv.lo, iv.hi + 1, scratch),
                    _ => self.dense_count(b, h, q, iv, scratch),
                }
            }
            Node::Or(parts) => {
                // |A ∪ U| = |A| + Σ (|U_i| - |A ∩ U_i|) over the disjoint parts U_i of the intervals' union.
                let mut union = Union::<OR_INTERVALS>::new();
                let (mut other, mut others, mut overflow) = (None::<&MaskExpr>, 0, false);
                for p in parts.iter() {
                    match p.get().row_iv(b, q) {
                        Some(piv) => overflow |= !union.push(piv.meet(window)),
                        None => {
                            others += 1;
                            other.get_or_insert(p);
                        }
                    }
                }
                if overflow || others > 1 {
                    return self.dense_count(b, h, q, window, scratch);
                }
                let merged = union.merged();
                match other {
                    None => merged.iter().map(|u| u.len()).sum(),
                    Some(a) => {
                        let a = a.get();
                        let mut n = a.row_count(b, h, q, k0, k1, scratch);
                        for u in merged {
                            n += u.len() - a.row_count(b, h, q, u.lo, u.hi + 1, scratch);
                        }
                        n
                    }
                }
            }
            _ => self.dense_count(b, h, q, window, scratch),
        }
    }

    /// Keys visible from row `q` among `keys` (a bounded interval), counted on the row filled densely.
    fn dense_count(&self, b: usize, h: usize, q: i64, keys: Iv, scratch: &mut Scratch) -> u64 {
        if keys.is_empty() {
            return 0;
        }
        let mut buf = scratch.take(keys.len() as usize);
        self.fill_row(b, h, q, keys.lo, &mut buf, scratch);
        let n = buf.iter().map(|&v| u64::from(v)).sum();
        scratch.give(buf);
        n
    }

    /// Writes row `q` over the window `k0..k0 + out.len()` as 1 / 0 bytes.
    pub(crate) fn fill_row(
        &self,
        b: usize,
        h: usize,
        q: i64,
        k0: i64,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) {
        if let Some(iv) = self.row_iv(b, q) {
            fill_iv(out, k0, iv);
            return;
        }
        match self {
            Node::Padding(rows) => pick(rows, b).fill(k0, out),
            Node::Document(rows) => pick(rows, b).fill(q, k0, out),
            Node::Bitmap(t) => t.fill(b, h, q, k0, out),
            Node::Not(inner) => {
                inner.get().fill_row(b, h, q, k0, out, scratch);
                out.iter_mut().for_each(|v| *v ^= 1);
            }
            Node::Shift { dq, dk, inner } => {
                let (q, k0) = (q.saturating_add(*dq), k0.saturating_add(*dk));
                inner.get().fill_row(b, h, q, k0, out, scratch)
            }
            Node::And(parts) => {
                let mut iv = Iv::ALL;
                for p in parts.iter() {
                    if let Some(piv) = p.get().row_iv(b, q) {
                        iv = iv.meet(piv);
                    }
                }
                let (a, e) = span(out.len(), k0, iv);
                out[..a].fill(0);
                out[e..].fill(0);
                if a >= e {
                    return;
                }
                let (sub, sk0) = (&mut out[a..e], k0.saturating_add(a as i64));
                let mut first = true;
                for p in parts.iter().filter(|p| p.get().row_iv(b, q).is_none()) {
                    if first {
                        p.get().fill_row(b, h, q, sk0, sub, scratch);
                        first = false;
                    } else {
                        let mut buf = scratch.take(sub.len());
                        p.get().fill_row(b, h, q, sk0, &mut buf, scratch);
                        sub.iter_mut().zip(&buf).for_each(|(o, &x)| *o &= x);
                        scratch.give(buf);
                    }
                }
            }
            Node::Or(parts) => {
                let mut first = true;
                for p in parts.iter().filter(|p| p.get().row_iv(b, q).is_none()) {
                    if first {
                        p.get().fill_row(b, h, q, k0, out, scratch);
                        first = false;
                    } else {
                        let mut buf = scratch.take(out.len());
                        p.get().fill_row(b, h, q, k0, &mut buf, scratch);
                        out.iter_mut().zip(&buf).for_each(|(o, &x)| *o |= x);
                        scratch.give(buf);
                    }
                }
                if first {
                    out.fill(0);
                }
                for p in parts.iter() {
                    if let Some(piv) = p.get().row_iv(b, q) {
                        let (a, e) = span(out.len(), k0, piv);
                        out[a..e].fill(1);
                    }
                }
            }
            _ => out.fill(0),
        }
    }

    /// A superset of the keys visible from some row in `q0..q1` (non-empty).
    pub(crate) fn col_hull(&self, b: usize, q0: i64, q1: i64) -> Iv {
        if let (Some(first), Some(last)) = (self.mono_iv(b, q0), self.mono_iv(b, q1 - 1)) {
            return Iv::new(first.lo, last.hi);
        }
        match self {
            Node::Padding(rows) => pick(rows, b).hull,
            Node::Document(rows) => pick(rows, b).col_hull(q0, q1),
            Node::Bitmap(t) => t.col_hull(q0, q1),
            Node::And(parts) => parts
                .iter()
                .fold(Iv::ALL, |iv, p| iv.meet(p.get().col_hull(b, q0, q1))),
            Node::Or(parts) => parts
                .iter()
                .fold(Iv::EMPTY, |iv, p| iv.hull(p.get().col_hull(b, q0, q1))),
            Node::Not(_) => Iv::ALL,
            Node::Shift { dq, dk, inner } => {
                let (q0, q1) = moved(q0, q1, *dq);
                inner.get().col_hull(b, q0, q1).shifted_back(*dk)
            }
            _ => Iv::EMPTY,
        }
    }

    /// A subset of the keys that *every* row in `q0..q1` (non-empty) sees: kv-blocks inside it are full
    /// without further work.
    pub(crate) fn col_core(&self, b: usize, q0: i64, q1: i64) -> Iv {
        if let (Some(first), Some(last)) = (self.mono_iv(b, q0), self.mono_iv(b, q1 - 1)) {
            return Iv::new(last.lo, first.hi);
        }
        match self {
            Node::Padding(rows) => pick(rows, b).run.unwrap_or(Iv::EMPTY),
            Node::Document(rows) => pick(rows, b).col_core(q0, q1),
            Node::And(parts) => parts
                .iter()
                .fold(Iv::ALL, |iv, p| iv.meet(p.get().col_core(b, q0, q1))),
            Node::Or(parts) => parts.iter().fold(Iv::EMPTY, |iv, p| {
                // A union of overlapping subsets is a subset; otherwise keep the longer one.
                let c = p.get().col_core(b, q0, q1);
                if c.is_empty() {
                    iv
                } else if iv.is_empty()
                    || (c.lo <= iv.hi.saturating_add(1) && iv.lo <= c.hi.saturating_add(1))
                {
                    iv.hull(c)
                } else if c.len() > iv.len() {
                    c
                } else {
                    iv
                }
            }),
            Node::Not(inner) => {
                // Keys no row sees in `inner`: the complement of its hull (the upper side if two).
                let hull = inner.get().col_hull(b, q0, q1);
                hull.complement()
                    .unwrap_or_else(|| Iv::new(hull.hi.saturating_add(1), i64::MAX))
            }
            Node::Shift { dq, dk, inner } => {
                let (q0, q1) = moved(q0, q1, *dq);
                inner.get().col_core(b, q0, q1).shifted_back(*dk)
            }
            _ => Iv::EMPTY,
        }
    }
}
