//! Closed intervals of key positions, the currency of exact mask evaluation.
//!
//! Most structural masks see, from one query row, a single interval of keys. Intersections of intervals
//! are intervals, so an `And` of such masks is still one interval per row; that is what keeps
//! classification and dense filling cheap.

/// The closed interval `lo..=hi` of absolute key positions; empty when `lo > hi`. `i64::MIN` / `i64::MAX`
/// stand for unbounded ends (positions are far from those values in practice; arithmetic saturates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Iv {
    pub lo: i64,
    pub hi: i64,
}

impl Iv {
    /// Every position.
    pub const ALL: Iv = Iv {
        lo: i64::MIN,
        hi: i64::MAX,
    };
    /// No position.
    pub const EMPTY: Iv = Iv {
        lo: i64::MAX,
        hi: i64::MIN,
    };

    pub fn new(lo: i64, hi: i64) -> Iv {
        Iv { lo, hi }
    }

    /// The half-open window `k0..k1` as a closed interval.
    pub fn window(k0: i64, k1: i64) -> Iv {
        Iv {
            lo: k0,
            hi: k1.saturating_sub(1),
        }
    }

    pub fn is_empty(self) -> bool {
        self.lo > self.hi
    }

    pub fn contains(self, k: i64) -> bool {
        self.lo <= k && k <= self.hi
    }

    /// The interval moved by `-d`, the keys `k` with `k + d` inside (empty stays empty, unbounded ends stay
    /// unbounded). Subtracting `d` rather than adding `-d`: `-i64::MIN` overflows.
    pub fn shifted_back(self, d: i64) -> Iv {
        if self.is_empty() {
            return Iv::EMPTY;
        }
        let end = |x: i64| {
            if x == i64::MIN || x == i64::MAX {
                x
            } else {
                x.saturating_sub(d)
            }
        };
        Iv {
            lo: end(self.lo),
            hi: end(self.hi),
        }
    }

    /// Intersection.
    pub fn meet(self, other: Iv) -> Iv {
        Iv {
            lo: self.lo.max(other.lo),
            hi: self.hi.min(other.hi),
        }
    }

    /// Smallest interval containing both.
    pub fn hull(self, other: Iv) -> Iv {
        if self.is_empty() {
            other
        } else if other.is_empty() {
            self
        } else {
            Iv {
                lo: self.lo.min(other.lo),
                hi: self.hi.max(other.hi),
            }
        }
    }

    /// Number of positions (saturating; only meaningful for bounded intervals).
    pub fn len(self) -> u64 {
        if self.is_empty() {
            0
        } else {
            (self.hi as i128 - self.lo as i128 + 1).min(u64::MAX as i128) as u64
        }
    }

    /// The complement, when it is a single interval.
    pub fn complement(self) -> Option<Iv> {
        if self.is_empty() {
            Some(Iv::ALL)
        } else if self.lo == i64::MIN && self.hi == i64::MAX {
            Some(Iv::EMPTY)
        } else if self.lo == i64::MIN {
            Some(Iv::new(self.hi + 1, i64::MAX))
        } else if self.hi == i64::MAX {
            Some(Iv::new(i64::MIN, self.lo - 1))
        } else {
            None
        }
    }
}

/// Writes the indicator of `iv` over the window starting at `k0` (`out.len()` wide): 1 inside, 0 outside.
pub(crate) fn fill_iv(out: &mut [u8], k0: i64, iv: Iv) {
    let (a, b) = span(out.len(), k0, iv);
    out[..a].fill(0);
    out[a..b].fill(1);
    out[b..].fill(0);
}

/// The index range `a..b` of a window of `width` positions starting at `k0` that `iv` covers.
pub(crate) fn span(width: usize, k0: i64, iv: Iv) -> (usize, usize) {
    if iv.is_empty() {
        return (0, 0);
    }
    let rel = |x: i128| x.clamp(0, width as i128) as usize;
    let a = rel(iv.lo as i128 - k0 as i128);
    let b = rel(iv.hi as i128 - k0 as i128 + 1);
    if a >= b { (0, 0) } else { (a, b) }
}

/// Merges up to `N` intervals into the sorted, disjoint, non-adjacent union; `None` when there are more.
pub(crate) struct Union<const N: usize> {
    parts: [Iv; N],
    len: usize,
}

impl<const N: usize> Union<N> {
    pub fn new() -> Self {
        Union {
            parts: [Iv::EMPTY; N],
            len: 0,
        }
    }

    /// Adds `iv`; false when the capacity is exceeded.
    pub fn push(&mut self, iv: Iv) -> bool {
        if iv.is_empty() {
            return true;
        }
        if self.len == N {
            return false;
        }
        self.parts[self.len] = iv;
        self.len += 1;
        true
    }

    /// Sorts and merges; returns the disjoint parts in ascending order.
    pub fn merged(&mut self) -> &[Iv] {
        let parts = &mut self.parts[..self.len];
        parts.sort_unstable_by_key(|iv| iv.lo);
        let mut n = 0;
        for i in 0..parts.len() {
            let iv = parts[i];
            if n > 0 && iv.lo <= parts[n - 1].hi.saturating_add(1) {
                parts[n - 1].hi = parts[n - 1].hi.max(iv.hi);
            } else {
                parts[n] = iv;
                n += 1;
            }
        }
        self.len = n;
        &self.parts[..n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_adjacent_and_overlapping() {
        let mut u = Union::<4>::new();
        assert!(u.push(Iv::new(5, 7)));
        assert!(u.push(Iv::new(0, 2)));
        assert!(u.push(Iv::new(3, 3)));
        assert!(u.push(Iv::EMPTY));
        assert!(u.push(Iv::new(10, 12)));
        assert!(!u.push(Iv::new(20, 21)));
        assert_eq!(u.merged(), &[Iv::new(0, 3), Iv::new(5, 7), Iv::new(10, 12)]);
    }

    #[test]
    fn spans_clip_to_the_window() {
        assert_eq!(span(10, 100, Iv::new(95, 103)), (0, 4));
        assert_eq!(span(10, 100, Iv::new(108, i64::MAX)), (8, 10));
        assert_eq!(span(10, 100, Iv::new(111, 120)), (0, 0));
        assert_eq!(span(10, 100, Iv::ALL), (0, 10));
        let mut out = [9u8; 6];
        fill_iv(&mut out, -2, Iv::new(0, 1));
        assert_eq!(out, [0, 0, 1, 1, 0, 0]);
        assert_eq!(
            Iv::new(i64::MIN, 4).complement(),
            Some(Iv::new(5, i64::MAX))
        );
        assert_eq!(Iv::new(1, 4).complement(), None);
    }
}
