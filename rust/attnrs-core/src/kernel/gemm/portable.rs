//! The portable micro-kernel: plain Rust, no `target_feature`, correct on every CPU (f32 or f64 accumulation).

use super::Kern;
use crate::kernel::softmax::Acc;
use crate::tensor::{DType, Float};

/// Plain Rust, any accumulator: f32 (for f32/bf16/f16) or f64.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable<A>(std::marker::PhantomData<A>);

impl<A: Acc> Kern for Portable<A> {
    type A = A;
    type E = A;
    const PAIR: usize = 1;
    const RAW: Option<DType> = if A::IS_F32 { Some(DType::F32) } else { None };
    #[inline(always)]
    fn to_e(x: A) -> A {
        x
    }
    #[inline(always)]
    fn load<T: Float>(x: T) -> A {
        A::read(x)
    }
    #[inline(always)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        kp: usize,
        a: *const A,
        lda: usize,
        b: *const A,
        ldb: usize,
        c: *mut A,
        ldc: usize,
        accumulate: bool,
    ) {
        // Four rows at a time: each loaded B row feeds four accumulator rows.
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            for r in 0..rows {
                // SAFETY: row `i + r < m` of C has `n` elements (caller's promise).
                let crow = unsafe { std::slice::from_raw_parts_mut(c.add((i + r) * ldc), n) };
                if !accumulate {
                    crow.fill(A::ZERO);
                }
            }
            for p in 0..kp {
                // SAFETY: row `p < kp` of B has `n` elements starting at `p * ldb`.
                let brow = unsafe { std::slice::from_raw_parts(b.add(p * ldb), n) };
                for r in 0..rows {
                    // SAFETY: element `(i + r, p)` of A is in range; row `i + r` of C has `n` elements and no
                    // other live reference points into it.
                    let (av, crow) = unsafe {
                        (
                            *a.add((i + r) * lda + p),
                            std::slice::from_raw_parts_mut(c.add((i + r) * ldc), n),
                        )
                    };
                    for (x, &y) in crow.iter_mut().zip(brow) {
                        *x = *x + av * y;
                    }
                }
            }
            i += rows;
        }
    }
}
