//! The data-carrying leaves (padding, documents, bitmaps), prepared once in O(length) so that every
//! question the evaluator asks is answered in O(1) or O(log n).

use std::ops::Range;

use super::interval::Iv;

/// Per-batch entry of a table whose batch dimension is 1 (broadcast) or B.
#[inline]
pub(crate) fn pick<T>(table: &[T], b: usize) -> &T {
    if table.len() == 1 {
        &table[0]
    } else {
        &table[b]
    }
}

/// Clips the half-open range `a..b` to `0..len`, as indices.
#[inline]
pub(crate) fn clip(a: i64, b: i64, len: usize) -> (usize, usize) {
    let len = len as i64;
    let a = a.clamp(0, len);
    let b = b.clamp(0, len);
    if a >= b {
        (0, 0)
    } else {
        (a as usize, b as usize)
    }
}

/// Zeroes the part of the window `out` (positions `k0..k0 + out.len()`) that lies outside a table of `len`
/// entries, and returns the rest of the window with the table's indices it covers (`None` if nothing).
#[inline]
fn clip_window(out: &mut [u8], k0: i64, len: usize) -> Option<(&mut [u8], Range<usize>)> {
    // Saturating: a window past the end of i64 (a shifted one) covers no table entry there.
    let (a, b) = clip(k0, k0.saturating_add(out.len() as i64), len);
    if a >= b {
        out.fill(0);
        return None;
    }
    let start = (a as i64 - k0) as usize;
    out[..start].fill(0);
    out[start + (b - a)..].fill(0);
    Some((&mut out[start..start + (b - a)], a..b))
}

/// One batch row of a padding mask: which absolute key positions hold real tokens.
pub(crate) struct PadRow {
    /// 1 = real token, 0 = padding, one byte per key position `0..Kabs`.
    pub valid: Box<[u8]>,
    /// `prefix[i]` = number of valid positions before `i` (length `Kabs + 1`).
    pub prefix: Box<[u32]>,
    /// The valid positions when they form one interval (the usual left or right padding), else `None`.
    pub run: Option<Iv>,
    /// First to last valid position.
    pub hull: Iv,
}

impl PadRow {
    pub fn new(row: &[u8]) -> PadRow {
        let valid: Box<[u8]> = row.iter().map(|&v| u8::from(v != 0)).collect();
        let mut prefix = Vec::with_capacity(valid.len() + 1);
        let mut count = 0u32;
        prefix.push(0);
        for &v in valid.iter() {
            count += u32::from(v);
            prefix.push(count);
        }
        let first = valid.iter().position(|&v| v == 1);
        let last = valid.iter().rposition(|&v| v == 1);
        let (hull, run) = match (first, last) {
            (Some(f), Some(l)) => {
                let hull = Iv::new(f as i64, l as i64);
                let dense = (count as usize) == l - f + 1;
                (hull, dense.then_some(hull))
            }
            _ => (Iv::EMPTY, Some(Iv::EMPTY)),
        };
        PadRow {
            valid,
            prefix: prefix.into(),
            run,
            hull,
        }
    }

    pub fn visible(&self, k: i64) -> bool {
        k >= 0 && (k as u64) < self.valid.len() as u64 && self.valid[k as usize] == 1
    }

    /// Valid positions in `k0..k1`.
    pub fn count(&self, k0: i64, k1: i64) -> u64 {
        let (a, b) = clip(k0, k1, self.valid.len());
        u64::from(self.prefix[b] - self.prefix[a])
    }

    /// Writes the window `k0..k0 + out.len()` as bytes.
    pub fn fill(&self, k0: i64, out: &mut [u8]) {
        if let Some((dst, keys)) = clip_window(out, k0, self.valid.len()) {
            dst.copy_from_slice(&self.valid[keys]);
        }
    }
}

/// One batch row of document ids, cut into runs (maximal stretches of equal ids) and grouped by id.
pub(crate) struct DocRow {
    pub ids: Box<[i64]>,
    /// Start of each run, plus `L` at the end.
    run_start: Box<[u32]>,
    /// Group (distinct id) of each run.
    run_group: Box<[u32]>,
    /// Whether the run's id occurs in no other run (then a row sees exactly its run: one interval).
    run_unique: Box<[bool]>,
    /// Runs of each group, ascending: `group_runs[group_offset[g]..group_offset[g + 1]]`.
    group_offset: Box<[u32]>,
    group_runs: Box<[u32]>,
    /// Prefix sums of run lengths in `group_runs` order.
    group_cum: Box<[u64]>,
    /// Every id occurs in one run only (e.g. sorted packed sequences).
    pub all_unique: bool,
}

impl DocRow {
    pub fn new(ids: &[i64]) -> DocRow {
        let mut run_start: Vec<u32> = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if i == 0 || ids[i - 1] != id {
                run_start.push(i as u32);
            }
        }
        let runs = run_start.len();
        run_start.push(ids.len() as u32);
        // Group runs by id: sort run indices by (id, index).
        let mut order: Vec<u32> = (0..runs as u32).collect();
        order.sort_unstable_by_key(|&r| (ids[run_start[r as usize] as usize], r));
        let mut run_group = vec![0u32; runs];
        let mut group_offset = Vec::new();
        let mut group_cum = Vec::with_capacity(runs + 1);
        group_cum.push(0u64);
        for (i, &r) in order.iter().enumerate() {
            let id = ids[run_start[r as usize] as usize];
            if i == 0 || ids[run_start[order[i - 1] as usize] as usize] != id {
                group_offset.push(i as u32);
            }
            run_group[r as usize] = (group_offset.len() - 1) as u32;
            let len = u64::from(run_start[r as usize + 1] - run_start[r as usize]);
            group_cum.push(group_cum[i] + len);
        }
        group_offset.push(runs as u32);
        let run_unique: Box<[bool]> = run_group
            .iter()
            .map(|&g| group_offset[g as usize + 1] - group_offset[g as usize] == 1)
            .collect();
        let all_unique = run_unique.iter().all(|&u| u);
        DocRow {
            ids: ids.into(),
            run_start: run_start.into(),
            run_group: run_group.into(),
            run_unique,
            group_offset: group_offset.into(),
            group_runs: order.into(),
            group_cum: group_cum.into(),
            all_unique,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Run containing position `p` (`p < L`).
    #[inline]
    pub fn run_of(&self, p: usize) -> usize {
        let runs = self.run_start.len() - 1;
        self.run_start[..runs].partition_point(|&s| s as usize <= p) - 1
    }

    #[inline]
    fn run_span(&self, r: usize) -> (usize, usize) {
        (self.run_start[r] as usize, self.run_start[r + 1] as usize)
    }

    pub fn visible(&self, q: i64, k: i64) -> bool {
        let l = self.ids.len() as i64;
        (0..l).contains(&q) && (0..l).contains(&k) && self.ids[q as usize] == self.ids[k as usize]
    }

    /// The keys row `q` sees, when they form one interval.
    pub fn row_iv(&self, q: i64) -> Option<Iv> {
        if q < 0 || q >= self.ids.len() as i64 {
            return Some(Iv::EMPTY);
        }
        let r = self.run_of(q as usize);
        self.run_unique[r].then(|| {
            let (s, e) = self.run_span(r);
            Iv::new(s as i64, e as i64 - 1)
        })
    }

    /// Positions in the index range `a..b` whose id is that of run `r`.
    pub fn count_like(&self, r: usize, a: usize, b: usize) -> u64 {
        if a >= b {
            return 0;
        }
        let g = self.run_group[r] as usize;
        let (g0, g1) = (
            self.group_offset[g] as usize,
            self.group_offset[g + 1] as usize,
        );
        let runs = &self.group_runs[g0..g1];
        // First run ending after a, first run starting at or after b.
        let i = runs.partition_point(|&x| self.run_start[x as usize + 1] as usize <= a);
        let j = runs.partition_point(|&x| (self.run_start[x as usize] as usize) < b);
        if i >= j {
            return 0;
        }
        let mut total = self.group_cum[g0 + j] - self.group_cum[g0 + i];
        let (first_start, _) = self.run_span(runs[i] as usize);
        let (_, last_end) = self.run_span(runs[j - 1] as usize);
        total -= a.saturating_sub(first_start) as u64;
        total -= last_end.saturating_sub(b) as u64;
        total
    }

    /// Keys visible from row `q` in `k0..k1`.
    pub fn count(&self, q: i64, k0: i64, k1: i64) -> u64 {
        if q < 0 || q >= self.ids.len() as i64 {
            return 0;
        }
        let (a, b) = clip(k0, k1, self.ids.len());
        self.count_like(self.run_of(q as usize), a, b)
    }

    /// Exact class of the block `q0..q1 x k0..k1`: (any visible, all visible).
    pub fn block(&self, q0: i64, q1: i64, k0: i64, k1: i64) -> (bool, bool) {
        let l = self.ids.len();
        let (ra, rb) = clip(q0, q1, l);
        let (ca, cb) = clip(k0, k1, l);
        if ra >= rb || ca >= cb {
            return (false, false);
        }
        let (r0, r1) = (self.run_of(ra), self.run_of(rb - 1));
        let (c0, c1) = (self.run_of(ca), self.run_of(cb - 1));
        let inside = ra as i64 == q0 && rb as i64 == q1 && ca as i64 == k0 && cb as i64 == k1;
        if inside && r0 == r1 && c0 == c1 && self.run_group[r0] == self.run_group[c0] {
            return (true, true);
        }
        let any = if self.all_unique {
            r0.max(c0) <= r1.min(c1)
        } else if r1 - r0 <= c1 - c0 {
            (r0..=r1).any(|r| self.count_like(r, ca, cb) > 0)
        } else {
            (c0..=c1).any(|c| self.count_like(c, ra, rb) > 0)
        };
        (any, false)
    }

    /// Superset of the keys visible from rows `q0..q1`.
    pub fn col_hull(&self, q0: i64, q1: i64) -> Iv {
        let (ra, rb) = clip(q0, q1, self.ids.len());
        if ra >= rb {
            Iv::EMPTY
        } else if self.all_unique {
            let (s, _) = self.run_span(self.run_of(ra));
            let (_, e) = self.run_span(self.run_of(rb - 1));
            Iv::new(s as i64, e as i64 - 1)
        } else {
            Iv::new(0, self.ids.len() as i64 - 1)
        }
    }

    /// Keys every row of `q0..q1` sees: the run, when all rows lie in one.
    pub fn col_core(&self, q0: i64, q1: i64) -> Iv {
        if q0 < 0 || q1 > self.ids.len() as i64 {
            return Iv::EMPTY;
        }
        let r = self.run_of(q0 as usize);
        if r != self.run_of(q1 as usize - 1) {
            return Iv::EMPTY;
        }
        let (s, e) = self.run_span(r);
        Iv::new(s as i64, e as i64 - 1)
    }

    /// Writes row `q` over the window `k0..k0 + out.len()`.
    pub fn fill(&self, q: i64, k0: i64, out: &mut [u8]) {
        if let Some(iv) = self.row_iv(q) {
            super::interval::fill_iv(out, k0, iv);
            return;
        }
        let id = self.ids[q as usize];
        if let Some((dst, keys)) = clip_window(out, k0, self.ids.len()) {
            for (o, &x) in dst.iter_mut().zip(&self.ids[keys]) {
                *o = u8::from(x == id);
            }
        }
    }
}

/// An evaluated boolean grid `[Bm, Hm, Qm, Km]`, packed 64 keys per word, placed at absolute position
/// `(q0, k0)`. `Bm` / `Hm` of 1 broadcast.
pub(crate) struct BitmapTable {
    pub batch: usize,
    pub heads: usize,
    pub rows: usize,
    pub cols: usize,
    pub q0: i64,
    pub k0: i64,
    pub words_per_row: usize,
    pub bits: Box<[u64]>,
}

impl BitmapTable {
    #[inline]
    pub fn row(&self, b: usize, h: usize, r: usize) -> &[u64] {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        let at = ((b * self.heads + h) * self.rows + r) * self.words_per_row;
        &self.bits[at..at + self.words_per_row]
    }

    /// The row index of absolute query position `q`, if inside.
    #[inline]
    pub fn row_index(&self, q: i64) -> Option<usize> {
        let r = q as i128 - self.q0 as i128;
        (0..self.rows as i128).contains(&r).then_some(r as usize)
    }

    pub fn visible(&self, b: usize, h: usize, q: i64, k: i64) -> bool {
        let c = k as i128 - self.k0 as i128;
        match self.row_index(q) {
            Some(r) if (0..self.cols as i128).contains(&c) => {
                let c = c as usize;
                self.row(b, h, r)[c / 64] >> (c % 64) & 1 == 1
            }
            _ => false,
        }
    }

    /// The column index range covered by the window `k0..k1`.
    #[inline]
    fn cols_of(&self, k0: i64, k1: i64) -> (usize, usize) {
        clip(
            k0.saturating_sub(self.k0),
            k1.saturating_sub(self.k0),
            self.cols,
        )
    }

    /// Visible keys of row `q` in `k0..k1`.
    pub fn count(&self, b: usize, h: usize, q: i64, k0: i64, k1: i64) -> u64 {
        let (a, e) = self.cols_of(k0, k1);
        match self.row_index(q) {
            Some(r) if a < e => count_bits(self.row(b, h, r), a, e),
            _ => 0,
        }
    }

    /// Exact (any visible, all visible) of a block, scanning rows until both answers are known.
    pub fn block(&self, b: usize, h: usize, q0: i64, q1: i64, k0: i64, k1: i64) -> (bool, bool) {
        let (ra, rb) = clip(
            q0.saturating_sub(self.q0),
            q1.saturating_sub(self.q0),
            self.rows,
        );
        let (ca, cb) = self.cols_of(k0, k1);
        if ra >= rb || ca >= cb {
            return (false, false);
        }
        // In i128: a block may be wider than i64::MAX.
        let (height, width) = (q1 as i128 - q0 as i128, k1 as i128 - k0 as i128);
        let mut all = (rb - ra) as i128 == height && (cb - ca) as i128 == width;
        let width = width as u64;
        let mut any = false;
        for r in ra..rb {
            let n = count_bits(self.row(b, h, r), ca, cb);
            any |= n > 0;
            all &= n == width;
            if any && !all {
                break;
            }
        }
        (any, all)
    }

    pub fn col_hull(&self, q0: i64, q1: i64) -> Iv {
        let (ra, rb) = clip(
            q0.saturating_sub(self.q0),
            q1.saturating_sub(self.q0),
            self.rows,
        );
        if ra >= rb || self.cols == 0 {
            Iv::EMPTY
        } else {
            Iv::new(self.k0, self.k0 + self.cols as i64 - 1)
        }
    }

    pub fn fill(&self, b: usize, h: usize, q: i64, k0: i64, out: &mut [u8]) {
        let (a, e) = self.cols_of(k0, k0.saturating_add(out.len() as i64));
        let r = match self.row_index(q) {
            Some(r) if a < e => r,
            _ => {
                out.fill(0);
                return;
            }
        };
        let start = (a as i64 + self.k0 - k0) as usize;
        out[..start].fill(0);
        let words = self.row(b, h, r);
        for (i, o) in out[start..start + (e - a)].iter_mut().enumerate() {
            let c = a + i;
            *o = (words[c / 64] >> (c % 64) & 1) as u8;
        }
        out[start + (e - a)..].fill(0);
    }
}

/// Set bits in positions `a..b` of a packed row.
pub(crate) fn count_bits(words: &[u64], a: usize, b: usize) -> u64 {
    if a >= b {
        return 0;
    }
    let (wa, wb) = (a / 64, (b - 1) / 64);
    let lo_mask = u64::MAX << (a % 64);
    let hi_mask = u64::MAX >> (63 - (b - 1) % 64);
    if wa == wb {
        return u64::from((words[wa] & lo_mask & hi_mask).count_ones());
    }
    let mut n = (words[wa] & lo_mask).count_ones() + (words[wb] & hi_mask).count_ones();
    for w in &words[wa + 1..wb] {
        n += w.count_ones();
    }
    u64::from(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_count_like_ids() {
        let ids = [3, 3, 1, 1, 1, 3, 2, 3, 3];
        let doc = DocRow::new(&ids);
        assert!(!doc.all_unique);
        for q in 0..ids.len() {
            for a in 0..=ids.len() {
                for b in a..=ids.len() {
                    let want = ids[a..b].iter().filter(|&&x| x == ids[q]).count() as u64;
                    assert_eq!(
                        doc.count(q as i64, a as i64, b as i64),
                        want,
                        "q={q} a={a} b={b}"
                    );
                }
            }
        }
        assert_eq!(doc.row_iv(2), Some(Iv::new(2, 4)));
        assert_eq!(doc.row_iv(0), None);
        assert_eq!(doc.row_iv(9), Some(Iv::EMPTY));
        assert!(DocRow::new(&[0, 0, 1, 2, 2]).all_unique);
    }

    #[test]
    fn bits_are_counted_across_words() {
        let words = [u64::MAX, 0b1011, u64::MAX];
        assert_eq!(count_bits(&words, 0, 64), 64);
        assert_eq!(count_bits(&words, 60, 68), 4 + 3);
        assert_eq!(count_bits(&words, 65, 66), 1);
        assert_eq!(count_bits(&words, 66, 67), 0);
        assert_eq!(count_bits(&words, 3, 192), 61 + 3 + 64);
    }

    #[test]
    fn padding_rows_know_their_run() {
        let pad = PadRow::new(&[0, 0, 1, 1, 1]);
        assert_eq!(pad.run, Some(Iv::new(2, 4)));
        assert_eq!(pad.count(-5, 100), 3);
        let holes = PadRow::new(&[1, 0, 1]);
        assert_eq!(holes.run, None);
        assert_eq!(holes.hull, Iv::new(0, 2));
        let mut out = [7u8; 6];
        holes.fill(-1, &mut out);
        assert_eq!(out, [0, 1, 0, 1, 0, 0]);
    }
}
