//! Mask expressions: which (query, key) pairs may attend, for each batch and head.
//!
//! A [`MaskExpr`] is a small immutable tree (cheap to clone: nodes are shared behind an [`Arc`]) over
//! **absolute** positions: query position `q` and key position `k` are `i64`, and grids are placed with
//! `q_offset` / `kv_offset` (row `i` is position `q_offset + i`, column `j` is `kv_offset + j`), the
//! convention of transformers' `masking_utils`. The leaves follow transformers' mask functions exactly:
//!
//! | leaf | visible iff |
//! |---|---|
//! | `Full` / `Empty` | always / never |
//! | `Causal { offset }` | `k <= q + offset` |
//! | `SlidingWindow { w, causal: true }` | `q - w < k <= q` (w keys, self included) |
//! | `SlidingWindow { w, causal: false }` | `abs(q - k) <= w` (2w + 1 keys) |
//! | `SlidingWindowOverlay { w }` | `k > q - w` (AND it with `Causal` as transformers does) |
//! | `Chunked { size, start[b] }` | `floor((k - start[b]) / size) == floor((q - start[b]) / size)` |
//! | `Padding { valid[b, Kabs] }` | `0 <= k < Kabs && valid[b][k]` |
//! | `Document { ids[b, L] }` | `0 <= q, k < L && ids[b][q] == ids[b][k]` |
//! | `PrefixLm { len[b] }` | `k < len[b] || k <= q` |
//! | `Bitmap { [Bm, Hm, Qm, Km] at (q0, k0) }` | inside the rectangle and the bit is set |
//!
//! combined by `And`, `Or` and `Not`. Per-batch tables of batch size 1 broadcast over every batch.
//!
//! # How evaluation stays exact and cheap
//! Every question is answered from per-row *intervals* of visible keys whenever possible. Causal, sliding,
//! chunked, prefix-LM rows are one interval whose ends never decrease with `q` and whose union over
//! consecutive rows is contiguous, so a block's class follows from its first and last rows in O(1).
//! Padding answers from prefix counts (and is an interval when the valid keys are contiguous), documents
//! from their runs of equal ids (binary searches; a sorted id list makes each row one interval), bitmaps
//! by popcounts over packed rows. `And` / `Or` / `Not` combine the children's classes; only when two
//! children are both partial is the block resolved row by row, where each row's visible count is again
//! computed from intervals (intersections of intervals are intervals) and prefix counts, falling back to
//! filling that one row only when two children are neither. Dense filling writes each row as memsets of
//! its interval, copies of padding bytes, and ANDs/ORs of children.
//!
//! [`tiles`] is what kernels see of a mask: the [`MaskTiles`](tiles::MaskTiles) contract over tensor indices,
//! an expression placed at offsets ([`PlacedMask`]), a dense bool tensor, and the mask of one call.

mod eval;
mod interval;
mod program;
mod tables;
pub mod tiles;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::{Error, Result};

pub use program::{EMPTY_TABLE_ROWS, MAX_DEPTH, MaskProgram};
pub use tiles::PlacedMask;

use eval::Scratch;
use tables::{BitmapTable, DocRow, PadRow};
use tiles::BlockClass;

/// A mask expression; see the [module documentation](self) for the semantics of each node.
#[derive(Clone)]
pub struct MaskExpr(Arc<Node>);

pub(crate) enum Node {
    Full,
    Empty,
    Causal {
        offset: i64,
    },
    Sliding {
        window: i64,
        causal: bool,
    },
    Overlay {
        window: i64,
    },
    Chunked {
        size: i64,
        start: Box<[i64]>,
    },
    Padding(Box<[PadRow]>),
    Document(Box<[DocRow]>),
    PrefixLm(Box<[i64]>),
    Bitmap(BitmapTable),
    And(Box<[MaskExpr]>),
    Or(Box<[MaskExpr]>),
    Not(MaskExpr),
    /// `inner` seen through offsets: visible(q, k) = inner.visible(q + dq, k + dk).
    Shift {
        dq: i64,
        dk: i64,
        inner: MaskExpr,
    },
}

fn per_batch_non_empty(arg: &str, len: usize) -> Result<()> {
    if len == 0 {
        Err(Error::shape(
            arg,
            "one value per batch (at least one)",
            "0 values",
        ))
    } else {
        Ok(())
    }
}

/// The rows of a row-major `[batch, per_row]` table `values` (`what` names a row's entries), checked: at
/// least one row, exactly `batch * per_row` values, and fewer than 2^32 per row.
fn table_rows<'a, T>(
    arg: &str,
    values: &'a [T],
    batch: usize,
    per_row: usize,
    what: &str,
) -> Result<impl Iterator<Item = &'a [T]>> {
    if batch == 0 {
        return Err(Error::shape(arg, "at least one batch row", "0 rows"));
    }
    let len = values.len();
    if batch.checked_mul(per_row) != Some(len) {
        return Err(Error::shape(
            arg,
            format!("{batch} x {per_row} {what}"),
            format!("{len} values"),
        ));
    }
    if per_row >= u32::MAX as usize {
        return Err(Error::shape(
            arg,
            format!("fewer than 2^32 {what}"),
            per_row.to_string(),
        ));
    }
    Ok((0..batch).map(move |b| &values[b * per_row..(b + 1) * per_row]))
}

impl MaskExpr {
    fn node(node: Node) -> MaskExpr {
        MaskExpr(Arc::new(node))
    }

    pub(crate) fn get(&self) -> &Node {
        &self.0
    }

    /// Every pair visible (transformers' `bidirectional_mask_function`).
    pub fn full() -> MaskExpr {
        MaskExpr::node(Node::Full)
    }

    /// No pair visible.
    pub fn empty() -> MaskExpr {
        MaskExpr::node(Node::Empty)
    }

    /// `k <= q` (transformers' `causal_mask_function`).
    pub fn causal() -> MaskExpr {
        MaskExpr::causal_with_offset(0)
    }

    /// `k <= q + offset`.
    pub fn causal_with_offset(offset: i64) -> MaskExpr {
        MaskExpr::node(Node::Causal { offset })
    }

    /// With `causal`: `q - window < k <= q` (transformers' `sliding_window_causal_mask_function`).
    /// Without: `abs(q - k) <= window` (`sliding_window_bidirectional_overlay`, inclusive).
    pub fn sliding_window(window: i64, causal: bool) -> Result<MaskExpr> {
        if window <= 0 {
            return Err(Error::value(
                "window",
                "a positive integer",
                window.to_string(),
            ));
        }
        Ok(MaskExpr::node(Node::Sliding { window, causal }))
    }

    /// `k > q - window` (transformers' `sliding_window_overlay`, to be ANDed with causal).
    pub fn sliding_window_overlay(window: i64) -> Result<MaskExpr> {
        if window <= 0 {
            return Err(Error::value(
                "window",
                "a positive integer",
                window.to_string(),
            ));
        }
        Ok(MaskExpr::node(Node::Overlay { window }))
    }

    /// `floor((k - start[b]) / size) == floor((q - start[b]) / size)` (transformers' `chunked_overlay`;
    /// `start` is the left padding per batch, one value or one per batch).
    pub fn chunked(size: i64, start: &[i64]) -> Result<MaskExpr> {
        if size <= 0 {
            return Err(Error::value(
                "chunk size",
                "a positive integer",
                size.to_string(),
            ));
        }
        per_batch_non_empty("chunked start", start.len())?;
        Ok(MaskExpr::node(Node::Chunked {
            size,
            start: start.into(),
        }))
    }

    /// `0 <= k < kv_len && valid[b][k]`. `valid` is row-major `[batch, kv_len]`, nonzero = real token
    /// (transformers' 2-D `attention_mask` indexed by absolute key position).
    pub fn padding(valid: &[u8], batch: usize, kv_len: usize) -> Result<MaskExpr> {
        let rows = table_rows("padding mask", valid, batch, kv_len, "keys")?.map(PadRow::new);
        Ok(MaskExpr::node(Node::Padding(rows.collect())))
    }

    /// `0 <= q, k < len && ids[b][q] == ids[b][k]`. `ids` is row-major `[batch, len]` (transformers'
    /// `packed_sequence_mask_function`); ids need not be sorted.
    pub fn document(ids: &[i64], batch: usize, len: usize) -> Result<MaskExpr> {
        let rows = table_rows("document ids", ids, batch, len, "positions")?.map(DocRow::new);
        Ok(MaskExpr::node(Node::Document(rows.collect())))
    }

    /// `k < len[b] || k <= q` (prefix-LM: the prefix is bidirectional, the rest causal).
    pub fn prefix_lm(len: &[i64]) -> Result<MaskExpr> {
        per_batch_non_empty("prefix_lengths", len.len())?;
        if let Some(bad) = len.iter().find(|&&l| l < 0) {
            return Err(Error::value(
                "prefix_lengths",
                "non-negative integers",
                bad.to_string(),
            ));
        }
        Ok(MaskExpr::node(Node::PrefixLm(len.into())))
    }

    /// An evaluated grid: `values` is row-major `[Bm, Hm, Qm, Km]` (nonzero = visible), placed so that its
    /// element `[b, h, i, j]` is the pair `(q0 + i, k0 + j)`. Outside the rectangle nothing is visible.
    /// `Bm` / `Hm` of 1 broadcast. For grids built in pieces, see [`BitmapBuilder`].
    pub fn bitmap(values: &[u8], shape: [usize; 4], q0: i64, k0: i64) -> Result<MaskExpr> {
        let [bm, hm, qm, km] = shape;
        // Checked before the table is allocated: a shape that lies must not allocate for what it claims.
        let total = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if total != Some(values.len()) {
            let total = total.map_or("more than 2^64".to_string(), |t| t.to_string());
            return Err(Error::shape(
                "bitmap",
                format!("{bm} x {hm} x {qm} x {km} = {total} values"),
                format!("{} values", values.len()),
            ));
        }
        let mut builder = BitmapBuilder::new(shape, q0, k0)?;
        if qm > 0 && km > 0 {
            for (i, slab) in values.chunks_exact(qm * km).enumerate() {
                builder.write_rows(i / hm, i % hm, 0, slab)?;
            }
        }
        Ok(builder.finish())
    }

    /// Visible iff every part is (`Full` when `parts` is empty, like transformers' `and_masks`).
    /// Nested `And`s are flattened.
    pub fn and(parts: impl IntoIterator<Item = MaskExpr>) -> MaskExpr {
        let mut flat = Vec::new();
        for p in parts {
            match p.get() {
                Node::And(children) => flat.extend(children.iter().cloned()),
                _ => flat.push(p),
            }
        }
        MaskExpr::node(Node::And(flat.into()))
    }

    /// Visible iff some part is (`Empty` when `parts` is empty). Nested `Or`s are flattened.
    pub fn or(parts: impl IntoIterator<Item = MaskExpr>) -> MaskExpr {
        let mut flat = Vec::new();
        for p in parts {
            match p.get() {
                Node::Or(children) => flat.extend(children.iter().cloned()),
                _ => flat.push(p),
            }
        }
        MaskExpr::node(Node::Or(flat.into()))
    }

    /// `self` seen through offsets: the result at `(q, k)` is `self` at `(q + dq, k + dk)` (transformers'
    /// `add_offsets_to_mask_function`, which FlexAttention needs because it takes lengths, not offsets).
    pub fn shift(&self, dq: i64, dk: i64) -> MaskExpr {
        match self.get() {
            _ if dq == 0 && dk == 0 => self.clone(),
            Node::Shift {
                dq: a,
                dk: b,
                inner,
            } => inner.shift(a.saturating_add(dq), b.saturating_add(dk)),
            _ => MaskExpr::node(Node::Shift {
                dq,
                dk,
                inner: self.clone(),
            }),
        }
    }

    /// Visible iff `self` is not.
    pub fn negate(&self) -> MaskExpr {
        match self.get() {
            Node::Not(inner) => inner.clone(),
            _ => MaskExpr::node(Node::Not(self.clone())),
        }
    }

    /// The node's kind: `"full"`, `"empty"`, `"causal"`, `"sliding_window"`, `"sliding_window_overlay"`,
    /// `"chunked"`, `"padding"`, `"document"`, `"prefix_lm"`, `"bitmap"`, `"and"`, `"or"`, `"not"` or
    /// `"shift"`.
    pub fn kind(&self) -> &'static str {
        match self.get() {
            Node::Full => "full",
            Node::Empty => "empty",
            Node::Causal { .. } => "causal",
            Node::Sliding { .. } => "sliding_window",
            Node::Overlay { .. } => "sliding_window_overlay",
            Node::Chunked { .. } => "chunked",
            Node::Padding(_) => "padding",
            Node::Document(_) => "document",
            Node::PrefixLm(_) => "prefix_lm",
            Node::Bitmap(_) => "bitmap",
            Node::And(_) => "and",
            Node::Or(_) => "or",
            Node::Not(_) => "not",
            Node::Shift { .. } => "shift",
        }
    }

    /// The children of `and` / `or` / `not` (empty for leaves).
    pub fn children(&self) -> &[MaskExpr] {
        match self.get() {
            Node::And(c) | Node::Or(c) => c,
            Node::Not(c) | Node::Shift { inner: c, .. } => std::slice::from_ref(c),
            _ => &[],
        }
    }

    /// Whether visibility differs between batches (some per-batch table has more than one row).
    pub fn depends_on_batch(&self) -> bool {
        match self.get() {
            Node::Chunked { start, .. } => start.len() > 1,
            Node::Padding(rows) => rows.len() > 1,
            Node::Document(rows) => rows.len() > 1,
            Node::PrefixLm(len) => len.len() > 1,
            Node::Bitmap(t) => t.batch > 1,
            _ => self.children().iter().any(MaskExpr::depends_on_batch),
        }
    }

    /// Whether visibility differs between heads (only a bitmap with more than one head row).
    pub fn depends_on_head(&self) -> bool {
        match self.get() {
            Node::Bitmap(t) => t.heads > 1,
            _ => self.children().iter().any(MaskExpr::depends_on_head),
        }
    }

    /// Checks that every per-batch table has 1 or `batch` rows and every bitmap 1 or `heads` heads, so
    /// that `b < batch`, `h < heads` may be evaluated.
    pub fn check_dims(&self, batch: usize, heads: usize) -> Result<()> {
        let rows = |arg: &str, n: usize| {
            if n == 1 || n == batch {
                Ok(())
            } else {
                Err(Error::shape(
                    arg,
                    format!("1 or {batch} (the batch size)"),
                    n.to_string(),
                ))
            }
        };
        match self.get() {
            Node::Chunked { start, .. } => rows("chunked start batch", start.len()),
            Node::Padding(r) => rows("padding mask batch", r.len()),
            Node::Document(r) => rows("document ids batch", r.len()),
            Node::PrefixLm(len) => rows("prefix lengths batch", len.len()),
            Node::Bitmap(t) => {
                rows("bitmap batch", t.batch)?;
                if t.heads == 1 || t.heads == heads {
                    Ok(())
                } else {
                    Err(Error::shape(
                        "bitmap heads",
                        format!("1 or {heads} (the head count)"),
                        t.heads.to_string(),
                    ))
                }
            }
            _ => self
                .children()
                .iter()
                .try_for_each(|c| c.check_dims(batch, heads)),
        }
    }

    /// Whether query position `q` sees key position `k` in batch `b`, head `h`.
    ///
    /// `b` and `h` must be valid for the tables (see [`MaskExpr::check_dims`]); out of range they panic.
    pub fn visible(&self, b: usize, h: usize, q: i64, k: i64) -> bool {
        self.get().visible(b, h, q, k)
    }

    /// Exact class of the block `q x k` (absolute positions): `Empty` if no pair is visible, `Full` if all
    /// are, else `Partial`. An empty range gives `Empty`.
    pub fn classify(&self, b: usize, h: usize, q: Range<i64>, k: Range<i64>) -> BlockClass {
        if q.is_empty() || k.is_empty() {
            return BlockClass::Empty;
        }
        self.get().classify(b, h, q.start, q.end, k.start, k.end)
    }

    /// Writes visibility (1 / 0) of the block `q x k`, row-major, into `out`.
    ///
    /// # Panics
    /// If `out.len() != q.len() * k.len()`.
    pub fn fill(&self, b: usize, h: usize, q: Range<i64>, k: Range<i64>, out: &mut [u8]) {
        let width = usize::try_from(k.end.saturating_sub(k.start)).unwrap_or(0);
        let height = usize::try_from(q.end.saturating_sub(q.start)).unwrap_or(0);
        assert_eq!(
            out.len(),
            width * height,
            "fill: output length must be rows x cols"
        );
        if width == 0 {
            return;
        }
        let mut scratch = Scratch::default();
        for (q, row) in q.zip(out.chunks_exact_mut(width)) {
            self.get().fill_row(b, h, q, k.start, row, &mut scratch);
        }
    }

    /// The visible keys of each query row of the block `q x k` as one run per row, when every row sees a
    /// single interval (causal, sliding, chunked, prefix-LM, documents, contiguous padding, and their ANDs):
    /// writes `out[i] = (a, e)`, offsets into `k` with `a <= e` (`a == e`: nothing visible) and returns true.
    /// Returns false (with `out` unspecified) when some row is not one interval; [`MaskExpr::fill`] then
    /// gives the bytes.
    ///
    /// # Panics
    /// If `out.len() != q.len()`.
    pub fn spans(&self, b: usize, q: Range<i64>, k: Range<i64>, out: &mut [(u32, u32)]) -> bool {
        let width = usize::try_from(k.end.saturating_sub(k.start)).unwrap_or(0);
        assert_eq!(
            out.len() as i64,
            q.end.saturating_sub(q.start).max(0),
            "spans: one span per query row"
        );
        if u32::try_from(width).is_err() {
            return false;
        }
        for (q, slot) in q.zip(out.iter_mut()) {
            let Some(iv) = self.get().row_iv(b, q) else {
                return false;
            };
            let (a, e) = interval::span(width, k.start, iv);
            // Both ends are at most `width`, which fits in u32 (checked above).
            *slot = (a as u32, e as u32);
        }
        true
    }

    /// A superset (closed interval, possibly unbounded or empty) of the key positions that some query in
    /// `q` sees; used to enumerate candidate blocks without visiting empty ones.
    pub fn key_hull(&self, b: usize, q: Range<i64>) -> (i64, i64) {
        if q.is_empty() {
            return (i64::MAX, i64::MIN);
        }
        let iv = self.get().col_hull(b, q.start, q.end);
        (iv.lo, iv.hi)
    }

    /// A subset (closed interval, possibly empty) of the key positions that *every* query in `q` sees;
    /// blocks inside it are full without classification.
    pub fn key_core(&self, b: usize, q: Range<i64>) -> (i64, i64) {
        if q.is_empty() {
            return (i64::MAX, i64::MIN);
        }
        let iv = self.get().col_core(b, q.start, q.end);
        (iv.lo, iv.hi)
    }
}

impl std::ops::BitAnd for MaskExpr {
    type Output = MaskExpr;
    fn bitand(self, rhs: MaskExpr) -> MaskExpr {
        MaskExpr::and([self, rhs])
    }
}

impl std::ops::BitOr for MaskExpr {
    type Output = MaskExpr;
    fn bitor(self, rhs: MaskExpr) -> MaskExpr {
        MaskExpr::or([self, rhs])
    }
}

impl std::ops::Not for MaskExpr {
    type Output = MaskExpr;
    fn not(self) -> MaskExpr {
        self.negate()
    }
}

impl fmt::Debug for MaskExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, name: &str, parts: &[MaskExpr]| {
            write!(f, "{name}(")?;
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    write!(f, ", ")?;
                }
                write!(f, "{p:?}")?;
            }
            write!(f, ")")
        };
        match self.get() {
            Node::Full => write!(f, "Full"),
            Node::Empty => write!(f, "Empty"),
            Node::Causal { offset } => write!(f, "Causal(offset={offset})"),
            Node::Sliding { window, causal } => {
                write!(f, "SlidingWindow(window={window}, causal={causal})")
            }
            Node::Overlay { window } => write!(f, "SlidingWindowOverlay(window={window})"),
            Node::Chunked { size, start } => write!(f, "Chunked(size={size}, start={start:?})"),
            Node::Padding(rows) => {
                write!(
                    f,
                    "Padding(batch={}, kv_len={})",
                    rows.len(),
                    rows[0].valid.len()
                )
            }
            Node::Document(rows) => {
                write!(f, "Document(batch={}, len={})", rows.len(), rows[0].len())
            }
            Node::PrefixLm(len) => write!(f, "PrefixLm(len={len:?})"),
            Node::Bitmap(t) => write!(
                f,
                "Bitmap(shape=[{}, {}, {}, {}], q0={}, k0={})",
                t.batch, t.heads, t.rows, t.cols, t.q0, t.k0
            ),
            Node::And(parts) => list(f, "And", parts),
            Node::Or(parts) => list(f, "Or", parts),
            Node::Not(inner) => write!(f, "Not({inner:?})"),
            Node::Shift { dq, dk, inner } => write!(f, "Shift(dq={dq}, dk={dk}, {inner:?})"),
        }
    }
}

impl fmt::Display for MaskExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Builds a [`MaskExpr::bitmap`] piece by piece (e.g. from a Python callable evaluated in chunks of rows),
/// so the unpacked bytes never need to exist all at once.
#[derive(Debug)]
pub struct BitmapBuilder {
    table: BitmapTable,
}

impl BitmapBuilder {
    /// An all-false grid of `shape = [Bm, Hm, Qm, Km]` placed at `(q0, k0)`; `Bm, Hm >= 1`.
    pub fn new(shape: [usize; 4], q0: i64, k0: i64) -> Result<BitmapBuilder> {
        Ok(BitmapBuilder {
            table: BitmapTable::empty(shape, q0, k0)?,
        })
    }

    /// Sets rows `q_start..` of batch `b`, head `h` from `values` (row-major, `Km` per row, nonzero =
    /// visible).
    pub fn write_rows(&mut self, b: usize, h: usize, q_start: usize, values: &[u8]) -> Result<()> {
        let t = &mut self.table;
        if b >= t.batch || h >= t.heads {
            return Err(Error::shape(
                "bitmap rows",
                format!("b < {} and h < {}", t.batch, t.heads),
                format!("b = {b}, h = {h}"),
            ));
        }
        // Whole rows only; a grid without columns takes no values.
        let n_rows = match values.len().checked_div(t.cols) {
            Some(n) if n * t.cols == values.len() => Some(n),
            None if values.is_empty() => Some(0),
            _ => None,
        };
        let fits = n_rows
            .and_then(|n| q_start.checked_add(n))
            .is_some_and(|end| end <= t.rows);
        if !fits {
            return Err(Error::shape(
                "bitmap rows",
                format!("whole rows of {} values inside {} rows", t.cols, t.rows),
                format!("{} values from row {q_start}", values.len()),
            ));
        }
        if t.cols == 0 {
            return Ok(());
        }
        for (i, src) in values.chunks_exact(t.cols).enumerate() {
            let at = ((b * t.heads + h) * t.rows + q_start + i) * t.words_per_row;
            let dst = &mut t.bits[at..at + t.words_per_row];
            for (word, bytes) in dst.iter_mut().zip(src.chunks(64)) {
                *word = pack_word(bytes);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> MaskExpr {
        MaskExpr::node(Node::Bitmap(self.table))
    }
}

/// Packs up to 64 bytes (nonzero = set) into a word, bit `j` from byte `j`, eight bytes at a time.
fn pack_word(bytes: &[u8]) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut word = 0u64;
    let mut eights = bytes.chunks_exact(8);
    for (i, eight) in eights.by_ref().enumerate() {
        let x = u64::from_le_bytes(eight.try_into().unwrap_or([0; 8]));
        // One 0/1 per byte, then the multiply gathers byte j's bit into bit 56 + j (no carries: the
        // partial products land on distinct bits).
        let ones = (((x & LOW7) + LOW7) | x) & HIGH;
        let bits = ((ones >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8;
        word |= u64::from(bits) << (8 * i);
    }
    let done = bytes.len() - eights.remainder().len();
    for (j, &v) in eights.remainder().iter().enumerate() {
        word |= u64::from(v != 0) << (done + j);
    }
    word
}

impl BitmapTable {
    /// The number of packed words of a table of `shape = [Bm, Hm, Qm, Km]`, if it fits in `usize`.
    pub(crate) fn words(shape: [usize; 4]) -> Option<usize> {
        let [bm, hm, qm, km] = shape;
        [bm, hm, qm, km.div_ceil(64)]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// An all-false table of `shape = [Bm, Hm, Qm, Km]` placed at `(q0, k0)`; `Bm, Hm >= 1`.
    pub(crate) fn empty(shape: [usize; 4], q0: i64, k0: i64) -> Result<BitmapTable> {
        let [bm, hm, qm, km] = shape;
        if bm == 0 || hm == 0 {
            return Err(Error::shape(
                "bitmap",
                "batch and head sizes of at least 1",
                format!("{shape:?}"),
            ));
        }
        let words_per_row = km.div_ceil(64);
        let words = BitmapTable::words(shape);
        let overflow = i64::try_from(qm)
            .ok()
            .and_then(|n| q0.checked_add(n))
            .is_none()
            || i64::try_from(km)
                .ok()
                .and_then(|n| k0.checked_add(n))
                .is_none();
        let words = match words {
            Some(w) if !overflow => w,
            _ => {
                return Err(Error::shape(
                    "bitmap",
                    "a grid that fits in memory",
                    format!("{shape:?}"),
                ));
            }
        };
        crate::memory::check(
            "mask",
            &format!("a bitmap of {shape:?}"),
            words.checked_mul(8),
        )?;
        let table = BitmapTable {
            batch: bm,
            heads: hm,
            rows: qm,
            cols: km,
            q0,
            k0,
            words_per_row,
            bits: crate::memory::zeroed::<u64>(words, "a mask bitmap")?.into(),
        };
        Ok(table)
    }
}

impl fmt::Debug for BitmapTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BitmapTable([{}, {}, {}, {}])",
            self.batch, self.heads, self.rows, self.cols
        )
    }
}

#[cfg(test)]
mod tests;
