//! Typed raw views of validated tensors, as the forward and backward loops read and write them: [`Strided`]
//! (q, k, v, out, lse and the gradients), [`BiasRef`] (a broadcast bias of any float dtype) and the sinks.

use crate::tensor::{DType, Float, TensorView};

/// A typed base pointer plus four element strides, and where row `(i0, i2)` lives ([`Rows`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided<T> {
    pub ptr: *mut T,
    pub st: [isize; 4],
    pub rows: Rows,
}

/// How `(i0, i2)` (batch, row) maps to a row of the underlying view.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rows {
    /// A dense batch: `i0 * st[0] + i2 * st[2]`.
    Batched,
    /// Sequences packed along dim 2 of a batch-1 view: row `start[i0] + i2`.
    Packed(*const usize),
    /// A paged pool along dim 2 of a batch-1 view: row `pages[i0 * per_seq + i2 / page] * page + i2 % page`.
    Paged {
        pages: *const u32,
        per_seq: usize,
        page: usize,
    },
}

// SAFETY: a `Strided` is an address plus strides taken from a validated `TensorView`, whose creator guarantees
// the memory outlives the call; the driver only writes disjoint elements from different threads.
unsafe impl<T> Send for Strided<T> {}
// SAFETY: as for `Send`: shared use only reads elements, or writes elements no other thread touches.
unsafe impl<T> Sync for Strided<T> {}

impl<T> Strided<T> {
    pub fn of(v: &TensorView) -> Self {
        let mut st = [0isize; 4];
        for (s, &v) in st.iter_mut().zip(v.strides()) {
            *s = v;
        }
        Strided {
            ptr: v.as_ptr().cast(),
            st,
            rows: Rows::Batched,
        }
    }
    /// The same view with its rows found through `rows`.
    ///
    /// # Safety
    /// The tables `rows` points to must outlive every use of the result, and every row they yield for the
    /// indices callers pass must lie inside the view (as `kernel::ragged::Ragged` checks).
    pub unsafe fn with_rows(self, rows: Rows) -> Self {
        Strided { rows, ..self }
    }
    /// Pointer to element `[i0, i1, i2, i3]`.
    ///
    /// # Safety
    /// The indices must be in range for the view this was made from.
    #[inline(always)]
    pub unsafe fn at(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> *mut T {
        let row = match self.rows {
            Rows::Batched => i0 as isize * self.st[0] + i2 as isize * self.st[2],
            // SAFETY: `i0` is a sequence of the checked ragged call, so its table entry exists.
            Rows::Packed(start) => (unsafe { *start.add(i0) } + i2) as isize * self.st[2],
            Rows::Paged {
                pages,
                per_seq,
                page,
            } => {
                // SAFETY: `i2` is a used key of sequence `i0`, whose page entry was checked.
                let p = unsafe { *pages.add(i0 * per_seq + i2 / page) } as usize;
                (p * page + i2 % page) as isize * self.st[2]
            }
        };
        let off = row + i1 as isize * self.st[1] + i3 as isize * self.st[3];
        // SAFETY: in range by the caller's promise, so the offset stays inside the viewed allocation.
        unsafe { self.ptr.offset(off) }
    }
}

/// The bias as the driver reads it: any float dtype, `[B, H, Q, K]` strides (0 where broadcast).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BiasRef {
    pub ptr: *const u8,
    pub dtype: DType,
    pub st: [isize; 4],
}

// SAFETY: read-only address plus strides of a validated view (see `Strided`).
unsafe impl Send for BiasRef {}
// SAFETY: read-only.
unsafe impl Sync for BiasRef {}

impl BiasRef {
    /// Reads `bias[b, h, i, c0 + j]` for `j < dst.len()` into `dst`, converted by `conv`.
    ///
    /// # Safety
    /// `b, h, i` and `c0 + dst.len() - 1` must be in range of `[B, H, Q, K]`.
    #[inline(always)]
    pub unsafe fn row<A: Copy>(
        &self,
        b: usize,
        h: usize,
        i: usize,
        c0: usize,
        dst: &mut [A],
        conv: impl Fn(f64) -> A,
    ) {
        #[inline(always)]
        unsafe fn go<T: Float, A>(
            p: &BiasRef,
            base: isize,
            dst: &mut [A],
            conv: impl Fn(f64) -> A,
        ) {
            let ptr = p.ptr as *const T;
            for (j, x) in dst.iter_mut().enumerate() {
                // SAFETY: `base + j * st[3]` addresses an in-range bias element (caller's promise).
                *x = conv(unsafe { ptr.offset(base + j as isize * p.st[3]).read() }.to_f64());
            }
        }
        let base = b as isize * self.st[0]
            + h as isize * self.st[1]
            + i as isize * self.st[2]
            + c0 as isize * self.st[3];
        // SAFETY: forwarded caller promise; the dtype matches the pointer's element type.
        unsafe {
            match self.dtype {
                DType::F32 => go::<f32, A>(self, base, dst, conv),
                DType::F64 => go::<f64, A>(self, base, dst, conv),
                DType::BF16 => go::<half::bf16, A>(self, base, dst, conv),
                _ => go::<half::f16, A>(self, base, dst, conv),
            }
        }
    }
}

/// Reads the `[H]` sinks (any float dtype) into f64.
pub(crate) fn read_sinks(sinks: &TensorView) -> Vec<f64> {
    fn go<T: Float>(v: &TensorView) -> Vec<f64> {
        let p = v.as_ptr() as *const T;
        let s = v.strides()[0];
        // SAFETY: the view was validated as `[H]`; every index `< H` is readable by its contract.
        (0..v.shape()[0])
            .map(|i| unsafe { p.offset(i as isize * s).read() }.to_f64())
            .collect()
    }
    match sinks.dtype() {
        DType::F32 => go::<f32>(sinks),
        DType::F64 => go::<f64>(sinks),
        DType::BF16 => go::<half::bf16>(sinks),
        _ => go::<half::f16>(sinks),
    }
}
