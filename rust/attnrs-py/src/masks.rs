//! Mask expressions, dense fills and block layouts for Python (`attnrs._attnrs.MaskExpr`, `BitmapBuilder`,
//! `BlockLayout`). `attnrs/masks/` is the public face; this module only converts and calls the core.

use std::sync::{Arc, Mutex};

use attnrs_core::Error;
use attnrs_core::layout::{BlockIndex, BlockSparse, Grid, fill_dense};
use attnrs_core::mask::{BitmapBuilder, MaskExpr, PlacedMask};
use attnrs_core::tensor::{DType, TensorView};
use pyo3::prelude::*;

use crate::dlpack::{self, Imported};
use crate::door::run_detached;
use crate::errors::PyAttnrsError;

fn err<T>(e: Error) -> PyResult<T> {
    Err(PyAttnrsError(e).into())
}

/// Checks dtype and rank of an imported tensor.
fn expect(t: &Imported, arg: &str, dtypes: &[DType], ndim: usize) -> PyResult<()> {
    let v = &t.view;
    if !dtypes.contains(&v.dtype()) {
        let names: Vec<&str> = dtypes.iter().map(|d| d.torch_name()).collect();
        return err(Error::dtype(
            arg,
            names.join(" or "),
            v.dtype().torch_name(),
        ));
    }
    if v.ndim() != ndim {
        return err(Error::shape(
            arg,
            format!("a {ndim}-D tensor"),
            format!("shape {:?}", v.shape()),
        ));
    }
    Ok(())
}

/// The bytes of a contiguous output view, for writing. The slice is not tied to `view` (it borrows the
/// tensor's memory, which the caller's `Imported` keeps alive).
///
/// # Safety
/// `view` must be a contiguous view of writable memory that nothing else accesses while the slice lives,
/// and the slice must not outlive the imported tensor.
unsafe fn output_bytes<'a>(view: &TensorView) -> &'a mut [u8] {
    let len = view.numel() * view.dtype().size();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller guarantees contiguity, validity and exclusive access of `len` bytes from the pointer.
    unsafe { std::slice::from_raw_parts_mut(view.as_ptr(), len) }
}

fn contiguous_output(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    dtype: DType,
    shape: &[usize],
) -> PyResult<Imported> {
    let out = dlpack::import_output(obj, arg)?;
    expect(&out, arg, &[dtype], shape.len())?;
    if out.view.shape() != shape {
        return err(Error::shape(
            arg,
            format!("shape {shape:?}"),
            format!("shape {:?}", out.view.shape()),
        ));
    }
    if !out.view.is_contiguous() {
        return err(Error::layout(arg, "a contiguous tensor", "a strided view"));
    }
    Ok(out)
}

/// An immutable mask expression over absolute positions (see `attnrs-core`'s `mask` module).
#[pyclass(
    frozen,
    skip_from_py_object,
    name = "MaskExpr",
    module = "attnrs._attnrs"
)]
#[derive(Debug, Clone)]
pub struct PyMaskExpr {
    pub expr: MaskExpr,
}

impl From<MaskExpr> for PyMaskExpr {
    fn from(expr: MaskExpr) -> Self {
        Self { expr }
    }
}

#[pymethods]
impl PyMaskExpr {
    #[staticmethod]
    fn full() -> Self {
        MaskExpr::full().into()
    }

    #[staticmethod]
    fn empty() -> Self {
        MaskExpr::empty().into()
    }

    #[staticmethod]
    #[pyo3(signature = (offset=0))]
    fn causal(offset: i64) -> Self {
        MaskExpr::causal_with_offset(offset).into()
    }

    #[staticmethod]
    fn sliding_window(window: i64, causal: bool) -> PyResult<Self> {
        Ok(MaskExpr::sliding_window(window, causal)
            .map_err(PyAttnrsError)?
            .into())
    }

    #[staticmethod]
    fn sliding_window_overlay(window: i64) -> PyResult<Self> {
        Ok(MaskExpr::sliding_window_overlay(window)
            .map_err(PyAttnrsError)?
            .into())
    }

    #[staticmethod]
    fn chunked(size: i64, start: Vec<i64>) -> PyResult<Self> {
        Ok(MaskExpr::chunked(size, &start)
            .map_err(PyAttnrsError)?
            .into())
    }

    /// `valid`: bool tensor [B, K] indexed by absolute key position.
    #[staticmethod]
    fn padding(valid: &Bound<'_, PyAny>) -> PyResult<Self> {
        let t = dlpack::import(valid, "mask2d")?;
        expect(&t, "mask2d", &[DType::Bool, DType::U8], 2)?;
        let (batch, len) = (t.view.shape()[0], t.view.shape()[1]);
        let bytes = t.view.to_contiguous_bytes();
        Ok(MaskExpr::padding(&bytes, batch, len)
            .map_err(PyAttnrsError)?
            .into())
    }

    /// `ids`: int64 tensor [B, L] of document ids.
    #[staticmethod]
    fn document(ids: &Bound<'_, PyAny>) -> PyResult<Self> {
        let t = dlpack::import(ids, "seq_ids")?;
        expect(&t, "seq_ids", &[DType::I64], 2)?;
        let (batch, len) = (t.view.shape()[0], t.view.shape()[1]);
        let ids: Vec<i64> = t
            .view
            .to_contiguous_bytes()
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(MaskExpr::document(&ids, batch, len)
            .map_err(PyAttnrsError)?
            .into())
    }

    #[staticmethod]
    fn prefix_lm(lengths: Vec<i64>) -> PyResult<Self> {
        Ok(MaskExpr::prefix_lm(&lengths).map_err(PyAttnrsError)?.into())
    }

    #[staticmethod]
    fn and_(parts: Vec<Bound<'_, PyMaskExpr>>) -> Self {
        MaskExpr::and(parts.iter().map(|p| p.get().expr.clone())).into()
    }

    #[staticmethod]
    fn or_(parts: Vec<Bound<'_, PyMaskExpr>>) -> Self {
        MaskExpr::or(parts.iter().map(|p| p.get().expr.clone())).into()
    }

    fn negate(&self) -> Self {
        self.expr.negate().into()
    }

    /// `shift(dq, dk)(q, k) == self(q + dq, k + dk)`.
    fn shift(&self, dq: i64, dk: i64) -> Self {
        self.expr.shift(dq, dk).into()
    }

    fn kind(&self) -> &'static str {
        self.expr.kind()
    }

    fn depends_on_batch(&self) -> bool {
        self.expr.depends_on_batch()
    }

    fn depends_on_head(&self) -> bool {
        self.expr.depends_on_head()
    }

    fn visible(&self, b: usize, h: usize, q: i64, k: i64) -> bool {
        self.expr.visible(b, h, q, k)
    }

    fn __repr__(&self) -> String {
        format!("MaskExpr({:?})", self.expr)
    }

    /// Writes visibility into `out`, a contiguous bool tensor [B', H', Q, K] (B'/H' of 1 broadcast).
    fn fill_dense(
        &self,
        py: Python<'_>,
        out: &Bound<'_, PyAny>,
        q_offset: i64,
        kv_offset: i64,
        num_threads: usize,
    ) -> PyResult<()> {
        let t = dlpack::import_output(out, "out")?;
        expect(&t, "out", &[DType::Bool], 4)?;
        if !t.view.is_contiguous() {
            return err(Error::layout(
                "out",
                "a contiguous tensor",
                "a strided view",
            ));
        }
        let s = t.view.shape();
        let grid = Grid::new(s[0], s[1], s[2], s[3]);
        let mask = PlacedMask::new(self.expr.clone(), q_offset, kv_offset);
        run_detached(py, move || {
            // SAFETY: `out` was imported as a writable, non-overlapping, contiguous bool tensor that this call
            // alone writes while the GIL is released (the caller allocated it for this purpose).
            let bytes = unsafe { output_bytes(&t.view) };
            fill_dense(&mask, grid, bytes, num_threads)
        })
    }

    /// The FlexAttention-compatible block layout over `[batch, heads, q_len, kv_len]`.
    #[allow(clippy::too_many_arguments)]
    fn block_sparse(
        &self,
        py: Python<'_>,
        batch: usize,
        heads: usize,
        q_len: usize,
        kv_len: usize,
        q_offset: i64,
        kv_offset: i64,
        q_block: usize,
        kv_block: usize,
        num_threads: usize,
    ) -> PyResult<PyBlockLayout> {
        let mask = PlacedMask::new(self.expr.clone(), q_offset, kv_offset);
        let grid = Grid::new(batch, heads, q_len, kv_len);
        let layout = run_detached(py, move || {
            BlockSparse::build(mask, grid, (q_block, kv_block), num_threads)
        })?;
        Ok(PyBlockLayout {
            layout: Arc::new(layout),
        })
    }
}

/// Builds a bitmap mask from row chunks of an evaluated callable.
#[pyclass(frozen, name = "BitmapBuilder", module = "attnrs._attnrs")]
#[derive(Debug)]
pub struct PyBitmapBuilder {
    shape: [usize; 4],
    builder: Mutex<Option<BitmapBuilder>>,
}

#[pymethods]
impl PyBitmapBuilder {
    /// An all-false grid `shape = [Bm, Hm, Q, K]` whose element [b, h, i, j] is the pair (q0 + i, k0 + j).
    #[new]
    fn new(shape: [usize; 4], q0: i64, k0: i64) -> PyResult<Self> {
        let builder = BitmapBuilder::new(shape, q0, k0).map_err(PyAttnrsError)?;
        Ok(Self {
            shape,
            builder: Mutex::new(Some(builder)),
        })
    }

    /// Sets rows `q_start..q_start + n` from `values`, a bool tensor [Bm, Hm, n, K]. The copy (O(Bm·Hm·n·K))
    /// runs with the GIL released.
    fn write_rows(
        &self,
        py: Python<'_>,
        q_start: usize,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let t = dlpack::import(values, "values")?;
        expect(&t, "values", &[DType::Bool], 4)?;
        let s = t.view.shape();
        if s[0] != self.shape[0] || s[1] != self.shape[1] || s[3] != self.shape[3] {
            let expected = format!(
                "[{}, {}, n, {}]",
                self.shape[0], self.shape[1], self.shape[3]
            );
            return err(Error::shape("values", expected, format!("{s:?}")));
        }
        let (heads, per_bh) = (s[1], s[2] * s[3]);
        run_detached(py, || {
            let mut guard = self.builder.lock().unwrap_or_else(|p| p.into_inner());
            let Some(builder) = guard.as_mut() else {
                return Err(Error::value(
                    "BitmapBuilder",
                    "a builder that is not finished",
                    "a finished one",
                ));
            };
            if per_bh > 0 {
                let bytes = t.view.to_contiguous_bytes();
                for (i, slab) in bytes.chunks_exact(per_bh).enumerate() {
                    builder.write_rows(i / heads, i % heads, q_start, slab)?;
                }
            }
            Ok(())
        })
    }

    fn finish(&self) -> PyResult<PyMaskExpr> {
        let mut guard = self.builder.lock().unwrap_or_else(|p| p.into_inner());
        match guard.take() {
            Some(builder) => Ok(builder.finish().into()),
            None => err(Error::value(
                "BitmapBuilder",
                "a builder that is not finished",
                "a finished one",
            )),
        }
    }
}

/// A block-sparse layout (FlexAttention's counts and indices, both directions) computed in Rust.
#[pyclass(frozen, name = "BlockLayout", module = "attnrs._attnrs")]
#[derive(Debug)]
pub struct PyBlockLayout {
    pub layout: Arc<BlockSparse>,
}

impl PyBlockLayout {
    fn index(&self, name: &str) -> PyResult<&BlockIndex> {
        let l = &self.layout;
        match name {
            "kv" => Ok(&l.kv),
            "full_kv" => Ok(&l.full_kv),
            "q" => Ok(&l.q),
            "full_q" => Ok(&l.full_q),
            other => err(Error::value(
                "name",
                "'kv', 'full_kv', 'q' or 'full_q'",
                format!("'{other}'"),
            )),
        }
    }
}

#[pymethods]
impl PyBlockLayout {
    #[getter]
    fn layout_batch(&self) -> usize {
        self.layout.layout_batch
    }
    #[getter]
    fn layout_heads(&self) -> usize {
        self.layout.layout_heads
    }
    #[getter]
    fn num_q_blocks(&self) -> usize {
        self.layout.num_q_blocks
    }
    #[getter]
    fn num_kv_blocks(&self) -> usize {
        self.layout.num_kv_blocks
    }
    #[getter]
    fn memory_bytes(&self) -> usize {
        self.layout.memory_bytes()
    }

    /// Writes one direction's counts [Lb, Lh, rows] (int32, contiguous).
    fn write_counts(&self, name: &str, counts: &Bound<'_, PyAny>) -> PyResult<()> {
        let index = self.index(name)?;
        let [lb, lh, rows] = index.counts_shape();
        let out = contiguous_output(counts, "counts", DType::I32, &[lb, lh, rows])?;
        // SAFETY: `out` was imported as a writable, contiguous int32 tensor of exactly `counts.len()`
        // elements that nothing else touches during this call; torch aligns int32 storage to 4 bytes.
        let dst = unsafe { as_i32(output_bytes(&out.view)) };
        dst.copy_from_slice(&index.counts);
        Ok(())
    }

    /// Writes one direction's counts [Lb, Lh, rows] and indices [Lb, Lh, rows, blocks] (int32, contiguous) in
    /// torch's order: the listed blocks ascending, then every other block ascending.
    fn write(
        &self,
        py: Python<'_>,
        name: &str,
        counts: &Bound<'_, PyAny>,
        indices: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let index = self.index(name)?;
        let [lb, lh, rows, _] = index.shape;
        let blocks = if name.ends_with("kv") {
            self.layout.num_kv_blocks
        } else {
            self.layout.num_q_blocks
        };
        let counts = contiguous_output(counts, "counts", DType::I32, &[lb, lh, rows])?;
        let indices = contiguous_output(indices, "indices", DType::I32, &[lb, lh, rows, blocks])?;
        if counts.view.overlaps(&indices.view) {
            return err(Error::layout(
                "indices",
                "memory disjoint from counts",
                "an aliasing tensor",
            ));
        }
        let layout = Arc::clone(&self.layout);
        let name = name.to_owned();
        run_detached(py, move || {
            let index = match name.as_str() {
                "kv" => &layout.kv,
                "full_kv" => &layout.full_kv,
                "q" => &layout.q,
                _ => &layout.full_q,
            };
            // SAFETY: both tensors were imported as writable, contiguous int32 outputs of the checked shapes,
            // disjoint from each other, and nothing else touches them during this call.
            let (c, i) = unsafe { (output_bytes(&counts.view), output_bytes(&indices.view)) };
            // SAFETY: the byte lengths are multiples of 4 and torch aligns int32 storage to 4 bytes.
            let (c, i) = unsafe { (as_i32(c), as_i32(i)) };
            index.write_torch_order(c, i, blocks)
        })
    }
}

/// Views bytes as i32s.
///
/// # Safety
/// `bytes` must be 4-byte aligned with a length that is a multiple of 4.
unsafe fn as_i32(bytes: &mut [u8]) -> &mut [i32] {
    let len = bytes.len() / 4;
    // SAFETY: alignment and length are guaranteed by the caller; i32 has no invalid bit patterns.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<i32>(), len) }
}
