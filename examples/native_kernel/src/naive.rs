//! A naive, exact attention kernel written against `attnrs-abi` alone: float32 on the CPU, with masks (tile
//! callbacks), GQA, softcap, sinks and the log-sum-exp. It favours clarity over speed: one query row at a
//! time, accumulating in f64, work items (batch, head) spread over scoped threads.
//!
//! Pure Rust with no Python: the PyO3 module in `lib.rs` only publishes it, and attnrs-core's tests run it
//! against the built-in kernel.

use std::ffi::c_void;

use attnrs_abi::{
    AttnArgsV1, AttnMaskV1, AttnTile, DLTensor, KernelError, device_type, tile_class, type_code,
};

/// What `user_data` points to in this crate's tables.
#[derive(Debug)]
pub struct Settings {
    /// A debug switch: every call panics (shows that a panic becomes a Python exception, not an abort).
    pub panic_on_call: bool,
}

/// Query rows and key columns per mask tile.
const TILE_ROWS: usize = 16;
const TILE_COLS: usize = 64;

/// A strided float32 view of a `DLTensor` from the host.
#[derive(Clone, Copy)]
struct View {
    data: *mut f32,
    shape: [usize; 4],
    strides: [isize; 4],
}

// SAFETY: a view is an address plus metadata; the host keeps the memory alive for the call, and the kernel
// writes disjoint elements from different threads (each work item owns its (batch, head) rows).
unsafe impl Send for View {}
// SAFETY: see `Send`.
unsafe impl Sync for View {}

impl View {
    /// Reads `t` (null: `None`) as a float32 CPU tensor of at most 4 dims, padded on the left to 4.
    ///
    /// # Safety
    /// `t` is null or a valid `DLTensor` for the duration of the call.
    unsafe fn new(t: *const DLTensor, arg: &str) -> Result<Option<View>, KernelError> {
        // SAFETY: null or valid (caller).
        let Some(t) = (unsafe { t.as_ref() }) else {
            return Ok(None);
        };
        if t.device.device_type != device_type::CPU {
            return Err(KernelError::unsupported(format!(
                "{arg}: a CPU tensor only"
            )));
        }
        if (t.dtype.code, t.dtype.bits, t.dtype.lanes) != (type_code::FLOAT, 32, 1) {
            return Err(KernelError::unsupported(format!(
                "{arg}: this kernel takes float32 only, got type code {} with {} bits",
                t.dtype.code, t.dtype.bits
            )));
        }
        // SAFETY: `t` is valid (caller).
        let dims = unsafe { t.shape_slice() };
        if dims.len() > 4 || dims.iter().any(|&d| d < 0) {
            return Err(KernelError::invalid_argument(format!(
                "{arg}: shape {dims:?}"
            )));
        }
        let pad = 4 - dims.len();
        let mut shape = [1usize; 4];
        let mut strides = [0isize; 4];
        // SAFETY: `t` is valid (caller).
        let given = unsafe { t.strides_slice() };
        let mut running = 1isize;
        for d in (0..dims.len()).rev() {
            shape[pad + d] = dims[d] as usize;
            strides[pad + d] = given.map_or(running, |s| s[d] as isize);
            running *= dims[d] as isize;
        }
        // SAFETY: `byte_offset` bytes past `data` is the first element (DLPack).
        let data = unsafe { t.data.cast::<u8>().add(t.byte_offset as usize) }.cast::<f32>();
        Ok(Some(View {
            data,
            shape,
            strides,
        }))
    }

    /// Pointer to element `i` (4-D index).
    ///
    /// # Safety
    /// `i` lies inside `shape`.
    unsafe fn at(&self, i: [usize; 4]) -> *mut f32 {
        let offset: isize = (0..4).map(|d| i[d] as isize * self.strides[d]).sum();
        // SAFETY: an in-range index addresses an element of the tensor (caller).
        unsafe { self.data.offset(offset) }
    }

    /// # Safety
    /// As [`View::at`].
    unsafe fn get(&self, i: [usize; 4]) -> f32 {
        // SAFETY: as `at`.
        unsafe { self.at(i).read() }
    }
}

/// The tensors and scalars of one call.
struct Call<'a> {
    q: View,
    k: View,
    v: View,
    out: View,
    lse: Option<View>,
    sinks: Option<View>,
    mask: Option<&'a AttnMaskV1>,
    scale: f64,
    softcap: f64,
}

// SAFETY: the mask callbacks are thread-safe by the ABI contract; the views are `Sync`.
unsafe impl Sync for Call<'_> {}

/// The forward function (wrapped by `attnrs_abi::forward_fn!` in `lib.rs`).
pub fn forward(user_data: *mut c_void, args: &AttnArgsV1) -> Result<(), KernelError> {
    // SAFETY: this crate's tables set `user_data` to null or to a `static Settings`.
    if let Some(settings) = unsafe { user_data.cast::<Settings>().as_ref() }
        && settings.panic_on_call
    {
        panic!("the example kernel was asked to panic (debug switch)");
    }
    let required = |v: Option<View>, arg: &str| {
        v.ok_or_else(|| KernelError::invalid_argument(format!("{arg}: null")))
    };
    // SAFETY: the host passes valid (or null) tensors for the duration of the call.
    let call = unsafe {
        Call {
            q: required(View::new(args.query, "query")?, "query")?,
            k: required(View::new(args.key, "key")?, "key")?,
            v: required(View::new(args.value, "value")?, "value")?,
            out: required(View::new(args.out, "out")?, "out")?,
            lse: View::new(args.lse, "lse")?,
            sinks: View::new(args.sinks, "sinks")?,
            mask: args.mask.as_ref(),
            scale: args.scale,
            softcap: args.softcap,
        }
    };
    if !args.bias.is_null() {
        return Err(KernelError::unsupported("bias: this kernel takes none"));
    }
    let [b, h, _, _] = call.q.shape;
    let hkv = call.k.shape[1];
    if hkv == 0 || h % hkv != 0 {
        return Err(KernelError::invalid_argument(format!(
            "key: {hkv} heads for {h} query heads"
        )));
    }
    let items = b * h;
    let threads = (args.num_threads.max(1) as usize).min(items.max(1));
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (call, failed) = (&call, &failed);
            scope.spawn(move || {
                for item in (t..items).step_by(threads) {
                    if !call.head(item / h, item % h) {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    if failed.into_inner() {
        return Err(KernelError::invalid_argument(
            "the host's mask callbacks reported an error",
        ));
    }
    Ok(())
}

impl Call<'_> {
    /// Computes every query row of `(b, h)`; false if a mask callback failed.
    fn head(&self, b: usize, h: usize) -> bool {
        let [_, heads, q_len, d] = self.q.shape;
        let [_, kv_heads, k_len, _] = self.k.shape;
        let dv = self.v.shape[3];
        let kh = h / (heads / kv_heads);
        let mut scores = vec![f64::NEG_INFINITY; TILE_ROWS * k_len];
        let mut bits = vec![0u8; TILE_ROWS * TILE_COLS];
        let mut ok = true;
        for r0 in (0..q_len).step_by(TILE_ROWS) {
            let r1 = (r0 + TILE_ROWS).min(q_len);
            scores.fill(f64::NEG_INFINITY);
            for c0 in (0..k_len).step_by(TILE_COLS) {
                let c1 = (c0 + TILE_COLS).min(k_len);
                let tile = AttnTile {
                    batch: b as u64,
                    head: h as u64,
                    row_start: r0 as u64,
                    row_end: r1 as u64,
                    col_start: c0 as u64,
                    col_end: c1 as u64,
                };
                // SAFETY: the mask is the host's, valid for this call.
                let class = self
                    .mask
                    .map_or(tile_class::FULL, |m| unsafe { m.classify(&tile) });
                let visible = &mut bits[..tile.len()];
                match class {
                    tile_class::EMPTY => continue,
                    tile_class::FULL => visible.fill(1),
                    tile_class::PARTIAL => {
                        let mask = self.mask.expect("PARTIAL comes from a mask");
                        // SAFETY: as above; `visible` holds tile.len() bytes.
                        if unsafe { mask.fill(&tile, visible) } != 0 {
                            ok = false;
                            continue;
                        }
                    }
                    _ => {
                        ok = false;
                        continue;
                    }
                }
                for i in r0..r1 {
                    for j in c0..c1 {
                        if visible[(i - r0) * (c1 - c0) + (j - c0)] == 0 {
                            continue;
                        }
                        let mut s = 0.0f64;
                        for e in 0..d {
                            // SAFETY: every index is inside the shapes read from the tensors.
                            s += unsafe {
                                self.q.get([b, h, i, e]) as f64 * self.k.get([b, kh, j, e]) as f64
                            };
                        }
                        s *= self.scale;
                        if self.softcap > 0.0 {
                            s = self.softcap * (s / self.softcap).tanh();
                        }
                        scores[(i - r0) * k_len + j] = s;
                    }
                }
            }
            for i in r0..r1 {
                let row = &scores[(i - r0) * k_len..(i - r0 + 1) * k_len];
                // SAFETY: `h` is inside the sinks' [H].
                let sink = self.sinks.map(|s| unsafe { s.get([0, 0, 0, h]) } as f64);
                let m = row
                    .iter()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut acc = vec![0.0f64; dv];
                let mut denominator = 0.0f64;
                if m > f64::NEG_INFINITY {
                    for (j, &s) in row.iter().enumerate() {
                        if s == f64::NEG_INFINITY {
                            continue;
                        }
                        let p = (s - m).exp();
                        denominator += p;
                        for (e, a) in acc.iter_mut().enumerate() {
                            // SAFETY: in range.
                            *a += p * unsafe { self.v.get([b, kh, j, e]) } as f64;
                        }
                    }
                    denominator += sink.map_or(0.0, |s| (s - m).exp());
                }
                for (e, a) in acc.iter().enumerate() {
                    let value = if denominator > 0.0 {
                        a / denominator
                    } else {
                        0.0
                    };
                    // SAFETY: in range; this thread owns row (b, h, i) of `out`.
                    unsafe { self.out.at([b, h, i, e]).write(value as f32) };
                }
                if let Some(lse) = self.lse {
                    let value = if denominator > 0.0 {
                        m + denominator.ln()
                    } else {
                        f64::NEG_INFINITY
                    };
                    // SAFETY: lse is [B, H, Q] padded to [1, B, H, Q]; this thread owns (b, h, i).
                    unsafe { lse.at([0, b, h, i]).write(value as f32) };
                }
            }
        }
        ok
    }
}
