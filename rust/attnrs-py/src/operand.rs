//! The mask operand of the attention calls, packed and unpacked here and nowhere else.
//!
//! A structural mask crosses the custom operators as ONE flat `torch.uint8` tensor, the *mask program*: the
//! three sections of [`MaskExpr::encode`] behind a small header. The grid offsets are folded in as the
//! expression's `Shift` node (`shift(q_offset, kv_offset)` at offset 0 is the expression placed at the
//! offsets), so the kernel always places it at offset 0. An empty tensor means "no structural mask".
//!
//! | bytes | content (native-endian words) |
//! |---|---|
//! | `0..8` | [`MAGIC`] |
//! | `8..32` | the section lengths: program words, ints words, bytes |
//! | `32..` | the program (i64 words), the ints table (i64 words), the bytes table |
//!
//! Beside it travel the optional dense bool mask and additive bias ([`MaskArgs`]).
//!
//! `python/attnrs/masks/program.py` writes the same bytes for structural masks with torch ops (so that
//! `torch.compile` traces them and new table values need no recompilation); every operand is decoded and
//! validated here when an operator runs, so table values never checked while tracing are checked then.

use attnrs_core::mask::{MaskExpr, MaskProgram};
use attnrs_core::tensor::DType;
use attnrs_core::{Error, Result};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

use crate::dlpack::{self, Imported};
use crate::errors::PyAttnrsError;
use crate::masks::PyMaskExpr;

/// The first word of every packed mask program (`b"attnrsM1"`).
pub const MAGIC: u64 = u64::from_le_bytes(*b"attnrsM1");
/// Bytes before the first section: the magic and three lengths.
pub const HEADER: usize = 32;

/// The Python argument every error about the operand names.
const ARG: &str = "mask_program";

fn malformed(got: impl Into<String>) -> Error {
    Error::value(
        ARG,
        "a packed mask program from attnrs._attnrs.mask_operand",
        got,
    )
}

/// Packs an encoded expression (see the [module documentation](self)).
pub fn pack(p: &MaskProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 8 * (p.program.len() + p.ints.len()) + p.bytes.len());
    for word in [
        MAGIC,
        p.program.len() as u64,
        p.ints.len() as u64,
        p.bytes.len() as u64,
    ] {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    for word in p.program.iter().chain(&p.ints) {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    out.extend_from_slice(&p.bytes);
    out
}

fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
}

/// The sections of a packed program, checked against the header: `(program, ints, bytes)`.
pub fn sections(packed: &[u8]) -> Result<(Vec<i64>, Vec<i64>, &[u8])> {
    let Some(header) = packed.get(..HEADER) else {
        return Err(malformed(format!(
            "{} bytes, shorter than its {HEADER}-byte header",
            packed.len()
        )));
    };
    let [magic, n_program, n_ints, n_bytes]: [u64; 4] = {
        let mut h = words(header);
        [(); 4].map(|()| h.next().unwrap_or(0))
    };
    if magic != MAGIC {
        return Err(malformed(format!(
            "a header starting with {:?}",
            magic.to_le_bytes().escape_ascii().to_string()
        )));
    }
    let needed = n_program
        .checked_add(n_ints)
        .and_then(|w| w.checked_mul(8))
        .and_then(|w| w.checked_add(n_bytes))
        .and_then(|w| w.checked_add(HEADER as u64));
    if needed != Some(packed.len() as u64) {
        return Err(malformed(format!(
            "section lengths ({n_program} program words, {n_ints} ints words, {n_bytes} bytes) that do not \
             fill its {} bytes",
            packed.len()
        )));
    }
    // Every length fits: their sum is the buffer's length.
    let (program, rest) = packed[HEADER..].split_at(8 * n_program as usize);
    let (ints, bytes) = rest.split_at(8 * n_ints as usize);
    let signed = |b: &[u8]| words(b).map(|w| w as i64).collect();
    Ok((signed(program), signed(ints), bytes))
}

/// The expression of a packed program; `None` for an empty one (no structural mask).
pub fn unpack(packed: &[u8]) -> Result<Option<MaskExpr>> {
    if packed.is_empty() {
        return Ok(None);
    }
    let (program, ints, bytes) = sections(packed)?;
    MaskExpr::decode(&program, &ints, bytes).map(Some)
}

/// The operand of `expr` on a grid whose row `i` is query position `q_offset + i` and column `j` key
/// position `kv_offset + j`: `expr.shift(q_offset, kv_offset)`, packed for placement at offset 0.
pub fn operand(expr: &MaskExpr, q_offset: i64, kv_offset: i64) -> Vec<u8> {
    pack(&expr.shift(q_offset, kv_offset).encode())
}

/// The packed mask program of `expr` placed at `(q_offset, kv_offset)`, as a bytearray for
/// `torch.frombuffer(..., dtype=torch.uint8)`: the `mask_program` the attention calls take.
#[pyfunction]
pub fn mask_operand<'py>(
    py: Python<'py>,
    expr: &Bound<'py, PyMaskExpr>,
    q_offset: i64,
    kv_offset: i64,
) -> Bound<'py, PyByteArray> {
    PyByteArray::new(py, &operand(&expr.get().expr, q_offset, kv_offset))
}

/// The mask of one call as Python passes it: `(mask_program, dense_mask, bias)`.
#[derive(FromPyObject)]
pub struct MaskArgs<'py>(
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

/// [`MaskArgs`] imported: the structural expression (placed at offset 0), the dense bool tensor
/// (`attn_mask`) and the additive bias (`attn_mask`).
pub struct Mask {
    pub expr: Option<MaskExpr>,
    pub dense: Option<Imported>,
    pub bias: Option<Imported>,
}

impl MaskArgs<'_> {
    /// Imports the tensors and decodes the program (a malformed one is an `ArgumentError`).
    pub fn import(&self) -> PyResult<Mask> {
        let dense = dlpack::import_optional(self.1.as_ref(), "attn_mask")?;
        let bias = dlpack::import_optional(self.2.as_ref(), "attn_mask")?;
        let expr = import_program(&self.0)?;
        Ok(Mask { expr, dense, bias })
    }
}

/// The expression of a `mask_program` tensor (a 1-D `torch.uint8` tensor; empty means none), decoded and
/// validated: a malformed program, or tables the expression refuses (e.g. a negative prefix length), are
/// typed errors naming the argument.
fn import_program(obj: &Bound<'_, PyAny>) -> PyResult<Option<MaskExpr>> {
    let program = dlpack::import(obj, ARG)?;
    let view = &program.view;
    if view.dtype() != DType::U8 || view.ndim() != 1 {
        let got = format!("{} of shape {:?}", view.dtype().torch_name(), view.shape());
        return Err(PyAttnrsError(Error::dtype(ARG, "a 1-D torch.uint8 tensor", got)).into());
    }
    if view.numel() == 0 {
        return Ok(None);
    }
    Ok(unpack(&view.to_contiguous_bytes()).map_err(PyAttnrsError)?)
}

/// The expression a packed `mask_program` tensor holds (placed at offset 0), or None for an empty one: what
/// the custom operators evaluate, for operators that need more than attention (block tables under
/// `torch.compile`).
#[pyfunction]
pub fn operand_mask(mask_program: &Bound<'_, PyAny>) -> PyResult<Option<PyMaskExpr>> {
    Ok(import_program(mask_program)?.map(PyMaskExpr::from))
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use attnrs_core::mask::PlacedMask;
    use attnrs_core::mask::tiles::MaskTiles;

    use super::*;

    fn samples() -> Vec<MaskExpr> {
        let window = MaskExpr::sliding_window(5, true).unwrap();
        let valid: Vec<u8> = (0..2 * 40).map(|i| u8::from(i % 7 != 3)).collect();
        let ids: Vec<i64> = (0..2 * 40).map(|i| (i % 40) / 9).collect();
        vec![
            MaskExpr::causal(),
            MaskExpr::causal_with_offset(-3),
            window.clone(),
            MaskExpr::sliding_window(4, false).unwrap(),
            MaskExpr::chunked(6, &[0, 2]).unwrap(),
            MaskExpr::padding(&valid, 2, 40).unwrap(),
            MaskExpr::document(&ids, 2, 40).unwrap(),
            MaskExpr::prefix_lm(&[5, 11]).unwrap(),
            MaskExpr::and([
                MaskExpr::causal(),
                MaskExpr::padding(&valid, 2, 40).unwrap(),
            ]),
            MaskExpr::or([window.negate(), MaskExpr::chunked(8, &[1]).unwrap()]),
            window.shift(2, -1),
        ]
    }

    fn tiles(n: usize, step: usize) -> impl Iterator<Item = Range<usize>> {
        (0..n).step_by(step).flat_map(move |s| {
            (s + 1..=n)
                .step_by(step)
                .chain(std::iter::once(n))
                .map(move |e| s..e)
        })
    }

    /// The operand (the expression shifted by the offsets, placed at 0) classifies and fills every tile
    /// exactly like the expression placed at the offsets, negative offsets included.
    #[test]
    fn shifted_operand_at_zero_equals_placed_at_offsets() {
        let (q_len, kv_len) = (13, 17);
        for expr in samples() {
            for (q_offset, kv_offset) in [
                (0, 0),
                (4, 0),
                (0, 9),
                (23, 23),
                (-5, 0),
                (3, -7),
                (-11, -2),
            ] {
                let unpacked = unpack(&operand(&expr, q_offset, kv_offset))
                    .unwrap()
                    .unwrap();
                let shifted = PlacedMask::new(unpacked, 0, 0);
                let placed = PlacedMask::new(expr.clone(), q_offset, kv_offset);
                for b in 0..2 {
                    for rows in tiles(q_len, 3) {
                        for cols in tiles(kv_len, 4) {
                            let what = format!(
                                "{expr:?} at ({q_offset}, {kv_offset}) b{b} {rows:?}x{cols:?}"
                            );
                            assert_eq!(
                                shifted.classify(b, 0, rows.clone(), cols.clone()),
                                placed.classify(b, 0, rows.clone(), cols.clone()),
                                "classify {what}"
                            );
                            let n = rows.len() * cols.len();
                            let (mut got, mut want) = (vec![7u8; n], vec![9u8; n]);
                            shifted.fill(b, 0, rows.clone(), cols.clone(), &mut got);
                            placed.fill(b, 0, rows.clone(), cols.clone(), &mut want);
                            assert_eq!(got, want, "fill {what}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pack_round_trips_and_empty_means_none() {
        for expr in samples() {
            let p = expr.encode();
            let packed = pack(&p);
            let (program, ints, bytes) = sections(&packed).unwrap();
            assert_eq!(
                (program, ints, bytes.to_vec()),
                (p.program, p.ints, p.bytes)
            );
        }
        assert!(unpack(&[]).unwrap().is_none());
    }

    #[test]
    fn malformed_operands_are_value_errors_naming_the_argument() {
        let good = operand(&samples()[5], 2, 1);
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        let mut bad_length = good.clone();
        bad_length[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        let mut bad_program = good.clone();
        bad_program[HEADER..HEADER + 8].copy_from_slice(&99i64.to_ne_bytes());
        let cases: [(&[u8], &str); 6] = [
            (&good[..5], "shorter than its 32-byte header"),
            (&good[..HEADER + 3], "do not fill"),
            (&good[..good.len() - 1], "do not fill"),
            (&bad_magic, "a header starting with"),
            (&bad_length, "do not fill"),
            (&bad_program, "mask program"),
        ];
        for (bytes, message) in cases {
            match unpack(bytes) {
                Err(e @ Error::Value { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(message), "{text}");
                    if message != "mask program" {
                        assert!(text.starts_with("mask_program: "), "{text}");
                    }
                }
                other => panic!("expected a value error, got {other:?}"),
            }
        }
    }
}
