//! Validation of [`AttentionArgs`] and the typed, raw-pointer view of them the driver works from.

use super::AttentionArgs;
use crate::tensor::{DType, Float, TensorView};
use crate::{Error, Result};

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    /// Query heads per kv head (`H / Hkv`).
    pub g: usize,
    pub q: usize,
    pub k: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.b == 0 || self.h == 0 || self.q == 0
    }
}

/// A validated call: sizes, dtype and the broadcast strides of the bias.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub dims: Dims,
    pub dtype: DType,
    pub bias_strides: Option<[isize; 4]>,
    pub scale: f64,
    pub softcap: Option<f64>,
    pub threads: usize,
}

fn shape_str(v: &TensorView) -> String {
    format!("shape {:?}", v.shape())
}

fn four(v: &TensorView, arg: &str, layout: &str) -> Result<[usize; 4]> {
    match v.shape() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::shape(
            arg,
            format!("a 4-D tensor {layout}"),
            shape_str(v),
        )),
    }
}

fn expect_dim(arg: &str, what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::shape(
            arg,
            format!("{what} = {expected}"),
            format!("{got}"),
        ))
    }
}

impl Plan {
    pub fn new(a: &AttentionArgs) -> Result<Plan> {
        let [b, h, q, d] = four(a.query, "query", "[B, H, Q, D]")?;
        let [kb, hkv, k, kd] = four(a.key, "key", "[B, Hkv, K, D]")?;
        let [vb, vh, vk, dv] = four(a.value, "value", "[B, Hkv, K, Dv]")?;
        let [ob, oh, oq, odv] = four(a.out, "out", "[B, H, Q, Dv]")?;
        expect_dim("key", "batch size (dim 0) of query", b, kb)?;
        expect_dim("key", "head dim (dim 3) of query", d, kd)?;
        if hkv == 0 && h > 0 {
            return Err(Error::shape(
                "key",
                "at least one kv head",
                shape_str(a.key),
            ));
        }
        if hkv > 0 && h % hkv != 0 {
            return Err(Error::shape(
                "key",
                format!("a number of kv heads dividing the {h} query heads"),
                format!("{hkv} kv heads"),
            ));
        }
        expect_dim("value", "batch size (dim 0) of query", b, vb)?;
        expect_dim("value", "kv heads (dim 1) of key", hkv, vh)?;
        expect_dim("value", "length (dim 2) of key", k, vk)?;
        expect_dim("out", "batch size (dim 0) of query", b, ob)?;
        expect_dim("out", "heads (dim 1) of query", h, oh)?;
        expect_dim("out", "length (dim 2) of query", q, oq)?;
        expect_dim("out", "head dim (dim 3) of value", dv, odv)?;
        let dtype = a.query.dtype();
        if !dtype.is_float() {
            return Err(Error::dtype(
                "query",
                "float32, bfloat16, float16 or float64",
                dtype.torch_name(),
            ));
        }
        for (arg, t) in [("key", a.key), ("value", a.value), ("out", a.out)] {
            if t.dtype() != dtype {
                return Err(Error::dtype(
                    arg,
                    format!("{} like query", dtype.torch_name()),
                    t.dtype().torch_name(),
                ));
            }
        }
        if let Some(lse) = a.lse {
            if lse.dtype() != DType::F32 {
                return Err(Error::dtype(
                    "lse",
                    DType::F32.torch_name(),
                    lse.dtype().torch_name(),
                ));
            }
            if lse.shape() != [b, h, q] {
                return Err(Error::shape(
                    "lse",
                    format!("shape [{b}, {h}, {q}] ([B, H, Q])"),
                    shape_str(lse),
                ));
            }
        }
        let bias_strides = match a.bias {
            None => None,
            Some(bias) => {
                if !bias.dtype().is_float() {
                    return Err(Error::dtype(
                        "bias",
                        "a floating additive mask (float32, bfloat16, float16 or float64)",
                        bias.dtype().torch_name(),
                    ));
                }
                Some(broadcast_strides(bias, [b, h, q, k])?)
            }
        };
        if let Some(sinks) = a.sinks {
            if !sinks.dtype().is_float() {
                return Err(Error::dtype(
                    "sinks",
                    "a floating dtype",
                    sinks.dtype().torch_name(),
                ));
            }
            if sinks.shape() != [h] {
                return Err(Error::shape(
                    "sinks",
                    format!("shape [{h}] (one per query head)"),
                    shape_str(sinks),
                ));
            }
        }
        check_scale_softcap(a.scale, a.softcap)?;
        super::dropout::check(a.dropout)?;
        check_outputs(a)?;
        Ok(Plan {
            dims: Dims {
                b,
                h,
                hkv,
                g: h.checked_div(hkv).unwrap_or(1),
                q,
                k,
                d,
                dv,
            },
            dtype,
            bias_strides,
            scale: a.scale,
            softcap: a.softcap,
            threads: a.num_threads.max(1),
        })
    }
}

/// Strides that read `bias` as a `[B, H, Q, K]` tensor (torch broadcasting: dims align right, size 1 repeats).
fn broadcast_strides(bias: &TensorView, target: [usize; 4]) -> Result<[isize; 4]> {
    let n = bias.ndim();
    let expected = || format!("a shape broadcastable to {target:?} ([B, H, Q, K])");
    if n > 4 {
        return Err(Error::shape("bias", expected(), shape_str(bias)));
    }
    let mut strides = [0isize; 4];
    for i in 0..n {
        let t = 4 - n + i;
        let size = bias.shape()[i];
        if size == target[t] {
            strides[t] = if size == 1 { 0 } else { bias.strides()[i] };
        } else if size == 1 {
            strides[t] = 0;
        } else {
            return Err(Error::shape("bias", expected(), shape_str(bias)));
        }
    }
    Ok(strides)
}

/// The outputs must not alias themselves or anything else the call reads or writes.
fn check_outputs(a: &AttentionArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &TensorView)> =
        vec![("query", a.query), ("key", a.key), ("value", a.value)];
    inputs.extend(a.bias.map(|t| ("bias", t)));
    inputs.extend(a.sinks.map(|t| ("sinks", t)));
    let mut outputs = vec![("out", a.out)];
    outputs.extend(a.lse.map(|t| ("lse", t)));
    for (name, o) in &outputs {
        if o.has_internal_overlap() {
            return Err(Error::layout(
                *name,
                "a writable view whose elements do not overlap",
                "an overlapping view",
            ));
        }
        for (other, t) in &inputs {
            if o.overlaps(t) {
                return Err(Error::layout(
                    *name,
                    format!("memory disjoint from {other}"),
                    format!("a view aliasing {other}"),
                ));
            }
        }
    }
    if let Some(lse) = a.lse {
        if lse.overlaps(a.out) {
            return Err(Error::layout(
                "lse",
                "memory disjoint from out",
                "a view aliasing out",
            ));
        }
    }
    Ok(())
}

/// A typed base pointer plus four element strides.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided<T> {
    pub ptr: *mut T,
    pub st: [isize; 4],
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
        }
    }
    /// Pointer to element `[i0, i1, i2, i3]`.
    ///
    /// # Safety
    /// The indices must be in range for the view this was made from.
    #[inline(always)]
    pub unsafe fn at(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> *mut T {
        let off = i0 as isize * self.st[0]
            + i1 as isize * self.st[1]
            + i2 as isize * self.st[2]
            + i3 as isize * self.st[3];
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

/// `scale` must be finite and `softcap`, if any, finite and positive (shared by the forward and backward).
pub(crate) fn check_scale_softcap(scale: f64, softcap: Option<f64>) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::value("scale", "a finite number", format!("{scale}")));
    }
    match softcap {
        Some(c) if !(c.is_finite() && c > 0.0) => Err(Error::value(
            "softcap",
            "a finite positive number",
            format!("{c}"),
        )),
        _ => Ok(()),
    }
}
