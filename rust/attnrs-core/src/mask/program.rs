//! A flat, tensor-friendly encoding of mask expressions.
//!
//! `torch.library` custom operators take tensors and scalars, not Python objects. To hand a structural mask
//! to the attention operator (and keep it traceable by `torch.compile`), a [`MaskExpr`] is written as three
//! flat arrays: a postfix `program` of i64 words, an `ints` table (document ids, per-batch starts and
//! lengths) and a `bytes` table (padding flags, packed bitmap words). [`MaskExpr::decode`] rebuilds the
//! expression and validates every word, so a malformed program is an error, never an out-of-bounds read.
//!
//! Each node is `opcode, params...`; children come before their parent:
//!
//! | opcode | params | node |
//! |---|---|---|
//! | 0 / 1 | – | `Full` / `Empty` |
//! | 2 | offset | `Causal` |
//! | 3 | window, causal | `SlidingWindow` |
//! | 4 | window | `SlidingWindowOverlay` |
//! | 5 | size, ints_at, n | `Chunked` (starts in `ints`) |
//! | 6 | batch, kv_len, bytes_at | `Padding` (flags in `bytes`) |
//! | 7 | batch, len, ints_at | `Document` (ids in `ints`) |
//! | 8 | ints_at, n | `PrefixLm` (lengths in `ints`) |
//! | 9 | bm, hm, qm, km, q0, k0, bytes_at | `Bitmap` (packed little-endian u64 rows in `bytes`) |
//! | 10 / 11 | n | `And` / `Or` of the last `n` nodes |
//! | 12 | – | `Not` of the last node |
//! | 13 | dq, dk | `Shift` of the last node |

use super::tables::BitmapTable;
use super::{MaskExpr, Node};
use crate::{Error, Result};

/// An encoded mask: see the [module documentation](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskProgram {
    pub program: Vec<i64>,
    pub ints: Vec<i64>,
    pub bytes: Vec<u8>,
}

const FULL: i64 = 0;
const EMPTY: i64 = 1;
const CAUSAL: i64 = 2;
const SLIDING: i64 = 3;
const OVERLAY: i64 = 4;
const CHUNKED: i64 = 5;
const PADDING: i64 = 6;
const DOCUMENT: i64 = 7;
const PREFIX_LM: i64 = 8;
const BITMAP: i64 = 9;
const AND: i64 = 10;
const OR: i64 = 11;
const NOT: i64 = 12;
const SHIFT: i64 = 13;

/// How deep a decoded expression may nest. The evaluator and `Drop` recurse once per level (about 150 bytes
/// of stack each, more through and / or): 20 000 levels, a 320 KB program, overflowed a 2 MiB thread stack
/// (an abort), and nested and / or of partial children cost the evaluator more than linearly in the depth
/// (a classification of 512 such levels took seconds). Masks nest a few levels; the Python encoder
/// recurses once per level too.
pub const MAX_DEPTH: usize = 256;

/// How many rows the tables without columns (`[batch, 0]` padding or documents) of one program may have in
/// all: such a row costs no input but a few dozen bytes once decoded.
pub const EMPTY_TABLE_ROWS: usize = 1 << 16;

fn bad(what: impl Into<String>) -> Error {
    Error::value(
        "mask program",
        "a program written by MaskExpr::encode",
        what.into(),
    )
}

/// Appends `op, batch, len, at` to `program` for a `[batch, len]` table whose rows (`row` of each of
/// `rows`) are appended to `store`, starting at its index `at`.
fn push_table<'a, R, T: Copy + 'a>(
    program: &mut Vec<i64>,
    op: i64,
    rows: &'a [R],
    row: impl Fn(&'a R) -> &'a [T],
    store: &mut Vec<T>,
) {
    let len = rows.first().map_or(0, |r| row(r).len());
    program.extend([op, rows.len() as i64, len as i64, store.len() as i64]);
    rows.iter().for_each(|r| store.extend_from_slice(row(r)));
}

impl MaskExpr {
    /// Writes the expression as a [`MaskProgram`].
    pub fn encode(&self) -> MaskProgram {
        let mut out = MaskProgram::default();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut MaskProgram) {
        let p = &mut out.program;
        match self.get() {
            Node::Full => p.push(FULL),
            Node::Empty => p.push(EMPTY),
            Node::Causal { offset } => p.extend([CAUSAL, *offset]),
            Node::Sliding { window, causal } => p.extend([SLIDING, *window, i64::from(*causal)]),
            Node::Overlay { window } => p.extend([OVERLAY, *window]),
            Node::Chunked { size, start } => {
                p.extend([CHUNKED, *size, out.ints.len() as i64, start.len() as i64]);
                out.ints.extend_from_slice(start);
            }
            Node::Padding(rows) => push_table(p, PADDING, rows, |r| &r.valid, &mut out.bytes),
            Node::Document(rows) => push_table(p, DOCUMENT, rows, |r| &r.ids, &mut out.ints),
            Node::PrefixLm(len) => {
                p.extend([PREFIX_LM, out.ints.len() as i64, len.len() as i64]);
                out.ints.extend_from_slice(len);
            }
            Node::Bitmap(t) => {
                p.extend([
                    BITMAP,
                    t.batch as i64,
                    t.heads as i64,
                    t.rows as i64,
                    t.cols as i64,
                    t.q0,
                    t.k0,
                ]);
                p.push(out.bytes.len() as i64);
                t.bits
                    .iter()
                    .for_each(|w| out.bytes.extend_from_slice(&w.to_le_bytes()));
            }
            Node::And(parts) | Node::Or(parts) => {
                parts.iter().for_each(|c| c.encode_into(out));
                let op = if matches!(self.get(), Node::And(_)) {
                    AND
                } else {
                    OR
                };
                out.program.extend([op, parts.len() as i64]);
            }
            Node::Not(inner) => {
                inner.encode_into(out);
                out.program.push(NOT);
            }
            Node::Shift { dq, dk, inner } => {
                inner.encode_into(out);
                out.program.extend([SHIFT, *dq, *dk]);
            }
        }
    }

    /// Rebuilds an expression from [`MaskExpr::encode`]'s arrays, validating every word and table range.
    ///
    /// What it builds is bounded by its input: tables must come in the order `encode` writes them, each
    /// after the previous one of its array (so no input entry feeds two tables), every table is checked
    /// against its array before anything is allocated for it, and tables without columns (which cost no
    /// input) may have [`EMPTY_TABLE_ROWS`] rows in all. Expressions nest at most [`MAX_DEPTH`] levels.
    pub fn decode(program: &[i64], ints: &[i64], bytes: &[u8]) -> Result<MaskExpr> {
        let mut stack: Vec<MaskExpr> = Vec::new();
        let mut words = program.iter().copied();
        let mut next = |what: &str| {
            words
                .next()
                .ok_or_else(|| bad(format!("a program that ends inside {what}")))
        };
        let size = |x: i64, what: &str| {
            usize::try_from(x).map_err(|_| bad(format!("a negative {what}: {x}")))
        };
        // Where the next table of `ints` / `bytes` may start.
        let (mut ints_free, mut bytes_free) = (0usize, 0usize);
        let mut empty_rows_left = EMPTY_TABLE_ROWS;
        let mut slice = |at: i64, n: usize, in_bytes: bool, what: &str| {
            let (free, len) = if in_bytes {
                (&mut bytes_free, bytes.len())
            } else {
                (&mut ints_free, ints.len())
            };
            let at = size(at, what)?;
            if at < *free {
                return Err(bad(format!(
                    "a {what} table at {at}, inside the previous table (which ends at {free})"
                )));
            }
            let range = at
                .checked_add(n)
                .filter(|&end| end <= len)
                .map(|end| at..end)
                .ok_or_else(|| {
                    bad(format!(
                        "a {what} range {at}..+{n} outside a table of {len}"
                    ))
                })?;
            *free = range.end;
            Ok::<_, Error>(range)
        };
        // The depth of each expression on the stack (an upper bound: constructors may flatten).
        let mut depth: Vec<usize> = Vec::new();
        while let Ok(op) = next("") {
            // The depth of the node's deepest child (0 for a leaf).
            let mut children = 0;
            let node = match op {
                FULL => MaskExpr::full(),
                EMPTY => MaskExpr::empty(),
                CAUSAL => MaskExpr::causal_with_offset(next("causal")?),
                SLIDING => {
                    let window = next("sliding window")?;
                    MaskExpr::sliding_window(window, next("sliding window")? != 0)?
                }
                OVERLAY => MaskExpr::sliding_window_overlay(next("overlay")?)?,
                CHUNKED => {
                    let chunk = next("chunked")?;
                    let (at, n) = (next("chunked")?, size(next("chunked")?, "count")?);
                    MaskExpr::chunked(chunk, &ints[slice(at, n, false, "chunk start")?])?
                }
                PADDING | DOCUMENT => {
                    // A [batch, len] table: padding bytes or document ids.
                    let what = if op == PADDING { "padding" } else { "document" };
                    let batch = size(next(what)?, "batch")?;
                    let len = size(next(what)?, "length")?;
                    let n = batch
                        .checked_mul(len)
                        .ok_or_else(|| bad(format!("a {what} table that overflows")))?;
                    if len == 0 {
                        // Its rows take no input but memory each: bound them.
                        empty_rows_left = empty_rows_left.checked_sub(batch).ok_or_else(|| {
                            bad(format!(
                                "more than {EMPTY_TABLE_ROWS} rows of tables without columns"
                            ))
                        })?;
                    }
                    let at = next(what)?;
                    if op == PADDING {
                        MaskExpr::padding(&bytes[slice(at, n, true, what)?], batch, len)?
                    } else {
                        MaskExpr::document(&ints[slice(at, n, false, what)?], batch, len)?
                    }
                }
                PREFIX_LM => {
                    let (at, n) = (next("prefix_lm")?, size(next("prefix_lm")?, "count")?);
                    MaskExpr::prefix_lm(&ints[slice(at, n, false, "prefix length")?])?
                }
                BITMAP => {
                    let mut dims = [0usize; 4];
                    for d in dims.iter_mut() {
                        *d = size(next("bitmap")?, "bitmap size")?;
                    }
                    let (q0, k0) = (next("bitmap")?, next("bitmap")?);
                    let at = next("bitmap")?;
                    // The packed words must be in `bytes` before the table is allocated for them.
                    let n = BitmapTable::words(dims)
                        .and_then(|w| w.checked_mul(8))
                        .ok_or_else(|| bad(format!("a bitmap of {dims:?} that overflows")))?;
                    let range = slice(at, n, true, "bitmap")?;
                    let mut table = BitmapTable::empty(dims, q0, k0)?;
                    for (word, chunk) in table.bits.iter_mut().zip(bytes[range].chunks_exact(8)) {
                        let mut raw = [0u8; 8];
                        raw.copy_from_slice(chunk);
                        *word = u64::from_le_bytes(raw);
                    }
                    MaskExpr::node(Node::Bitmap(table))
                }
                AND | OR => {
                    let n = size(next("and/or")?, "child count")?;
                    if n > stack.len() {
                        return Err(bad(format!(
                            "an and/or of {n} children with {} on the stack",
                            stack.len()
                        )));
                    }
                    let parts = stack.split_off(stack.len() - n);
                    let below = depth.split_off(depth.len() - n);
                    children = below.into_iter().max().unwrap_or(0);
                    if op == AND {
                        MaskExpr::and(parts)
                    } else {
                        MaskExpr::or(parts)
                    }
                }
                NOT => {
                    let inner = stack
                        .pop()
                        .ok_or_else(|| bad("a not with nothing on the stack"))?;
                    children = depth.pop().unwrap_or(0);
                    inner.negate()
                }
                SHIFT => {
                    let (dq, dk) = (next("shift")?, next("shift")?);
                    let inner = stack
                        .pop()
                        .ok_or_else(|| bad("a shift with nothing on the stack"))?;
                    children = depth.pop().unwrap_or(0);
                    inner.shift(dq, dk)
                }
                other => return Err(bad(format!("opcode {other}"))),
            };
            if children >= MAX_DEPTH {
                return Err(bad(format!("an expression nested deeper than {MAX_DEPTH}")));
            }
            stack.push(node);
            depth.push(children + 1);
        }
        match (stack.pop(), stack.is_empty()) {
            (Some(expr), true) => Ok(expr),
            (None, _) => Err(bad("an empty program")),
            (Some(_), false) => Err(bad(format!(
                "{} expressions left on the stack",
                stack.len() + 1
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &MaskExpr, b: &MaskExpr) {
        for batch in 0..2 {
            for q in -3..20 {
                for k in -3..20 {
                    assert_eq!(
                        a.visible(batch, 0, q, k),
                        b.visible(batch, 0, q, k),
                        "({batch}, {q}, {k})"
                    );
                }
            }
        }
    }

    #[test]
    fn every_node_round_trips() {
        let pad =
            MaskExpr::padding(&[0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], 2, 8).unwrap();
        let docs =
            MaskExpr::document(&[0, 0, 1, 1, 1, 2, 2, 2, 5, 5, 5, 5, 4, 4, 4, 4], 2, 8).unwrap();
        let bits: Vec<u8> = (0..2 * 6 * 70).map(|i| u8::from(i % 3 != 0)).collect();
        let bitmap = MaskExpr::bitmap(&bits, [2, 1, 6, 70], 2, -1).unwrap();
        let exprs = [
            MaskExpr::full(),
            MaskExpr::empty(),
            MaskExpr::causal_with_offset(-2),
            MaskExpr::sliding_window(3, true).unwrap(),
            MaskExpr::sliding_window(2, false).unwrap(),
            MaskExpr::sliding_window_overlay(4).unwrap(),
            MaskExpr::chunked(3, &[1, 4]).unwrap(),
            pad.clone(),
            docs.clone(),
            MaskExpr::prefix_lm(&[3, 0]).unwrap(),
            bitmap.clone(),
            MaskExpr::and([pad.clone(), MaskExpr::causal()]),
            MaskExpr::or([docs.negate(), bitmap.shift(1, -2)]),
            MaskExpr::and([
                MaskExpr::or([pad, docs]),
                MaskExpr::causal().shift(3, 1).negate(),
            ]),
        ];
        for e in exprs {
            let p = e.encode();
            let back = MaskExpr::decode(&p.program, &p.ints, &p.bytes).unwrap();
            same(&e, &back);
            assert_eq!(back.encode(), p);
        }
    }

    #[test]
    fn malformed_programs_are_errors() {
        let p = MaskExpr::and([
            MaskExpr::document(&[0, 1], 1, 2).unwrap(),
            MaskExpr::causal(),
        ])
        .encode();
        // [DOCUMENT, 1, 2, 0, CAUSAL, 0, AND, 2]: every strict prefix but the lone document (4 words) is
        // incomplete or leaves two roots.
        for cut in [0, 1, 2, 3, 5, 6, 7] {
            let prefix = &p.program[..cut];
            assert!(
                MaskExpr::decode(prefix, &p.ints, &p.bytes).is_err(),
                "prefix {cut}"
            );
        }
        assert!(MaskExpr::decode(&p.program[..4], &p.ints, &p.bytes).is_ok());
        assert!(MaskExpr::decode(&p.program, &[], &p.bytes).is_err()); // ids out of range
        assert!(MaskExpr::decode(&[99], &[], &[]).is_err());
        assert!(MaskExpr::decode(&[AND, 2], &[], &[]).is_err());
        assert!(MaskExpr::decode(&[PADDING, 1, -4, 0], &[], &[]).is_err());
        assert!(MaskExpr::decode(&[PADDING, i64::MAX, i64::MAX, 0], &[], &[]).is_err());
        assert!(MaskExpr::decode(&[BITMAP, 1, 1, 4, 4, 0, 0, 0], &[], &[0; 7]).is_err());
        assert!(MaskExpr::decode(&[CAUSAL, 0, CAUSAL, 0], &[], &[]).is_err()); // two roots
    }

    /// Regressions (#15 fuzzing): what the decoder builds is bounded by its input.
    #[test]
    fn lengths_that_lie_do_not_allocate() {
        // A bitmap's size was trusted: 2^40 rows x 2^40 columns allocated 2^74 bits (an abort) before its
        // missing bytes were noticed.
        let huge = 1i64 << 40;
        assert!(MaskExpr::decode(&[BITMAP, 1, 1, huge, huge, 0, 0, 0], &[], &[0; 8]).is_err());
        assert!(MaskExpr::decode(&[BITMAP, i64::MAX, 2, 1, 1, 0, 0, 0], &[], &[]).is_err());
        // So was the batch of a table without columns: 2^40 empty rows, no input.
        assert!(MaskExpr::decode(&[PADDING, huge, 0, 0], &[], &[]).is_err());
        assert!(MaskExpr::decode(&[DOCUMENT, huge, 0, 0], &[], &[]).is_err());
        let rows = EMPTY_TABLE_ROWS as i64;
        assert!(MaskExpr::decode(&[PADDING, rows, 0, 0], &[], &[]).is_ok());
        let twice = [PADDING, rows, 0, 0, PADDING, 1, 0, 0, AND, 2];
        assert!(MaskExpr::decode(&twice, &[], &[]).is_err());
        // And one range of ids could feed any number of tables: 4 words per copy of all of `ints`.
        let ids: Vec<i64> = (0..64).collect();
        let mut program = Vec::new();
        for _ in 0..3 {
            program.extend([DOCUMENT, 1, 64, 0]);
        }
        program.extend([AND, 3]);
        assert!(MaskExpr::decode(&program, &ids, &[]).is_err());
        // Tables in encoding order, with gaps, still decode.
        // Nesting is bounded: alternating not / shift levels do not simplify away.
        let mut deep = vec![CAUSAL, 0];
        for _ in 0..MAX_DEPTH / 2 {
            deep.extend([NOT, SHIFT, 1, 1]);
        }
        assert!(MaskExpr::decode(&deep[..deep.len() - 4], &[], &[]).is_ok());
        assert!(MaskExpr::decode(&deep, &[], &[]).is_err());
        deep.extend(std::iter::repeat_n([NOT, SHIFT, 1, 1], 100_000).flatten());
        assert!(MaskExpr::decode(&deep, &[], &[]).is_err());
        let program = [DOCUMENT, 1, 2, 1, PREFIX_LM, 4, 1, AND, 2];
        let m = MaskExpr::decode(&program, &[9, 0, 1, 9, 3], &[]).unwrap();
        assert!(m.visible(0, 0, 1, 1) && !m.visible(0, 0, 0, 1));
        // The public constructor checked the bitmap's values after allocating for its shape.
        assert!(MaskExpr::bitmap(&[0; 4], [1, 1, 1 << 31, 1 << 31], 0, 0).is_err());
        assert!(MaskExpr::bitmap(&[], [usize::MAX, 2, 1, 1], 0, 0).is_err());
    }
}
