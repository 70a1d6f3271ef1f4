//! The kernel half of the ABI: what a plugin publishes ([`AttnKernelV1`]) and what attnrs passes to it
//! ([`AttnArgsV1`], [`AttnMaskV1`]).
//!
//! # Contract
//!
//! * A plugin publishes a `static` [`AttnKernelV1`] in a Python capsule named [`KERNEL_CAPSULE_NAME`]
//!   (`"attnrs.kernel.v1"`). attnrs checks the capsule name, then `abi_version == ATTNRS_ABI_VERSION` and
//!   `struct_size >= size_of::<AttnKernelV1>()`, then that `name` and `forward` are not null, before it uses
//!   anything else. The table and whatever `user_data` points to must outlive the capsule (a `static` does).
//! * Every struct starts with `abi_version: u32, struct_size: u32`. Version 1 structs only ever grow at the
//!   end; a reader uses a field only if `struct_size` covers it. A change that cannot be expressed by
//!   appending bumps [`ATTNRS_ABI_VERSION`] (and the capsule name).
//! * `forward` may be called from several threads at once, with the GIL released. It must not unwind: use
//!   [`forward_fn!`] (or [`guard`]) so a panic becomes [`status::PANIC`] with a message.
//! * Tensors are DLPack [`DLTensor`](crate::DLTensor)s on the CPU with element strides (never null from
//!   attnrs, never negative, possibly 0 on inputs). `out` and `lse` may be non-contiguous views (attnrs hands
//!   a `[B, Q, H, Dv]` buffer viewed as `[B, H, Q, Dv]`) but never overlap themselves or an input.
//! * The mask is exact: for any tile, [`AttnMaskV1::classify`] says whether it is empty, full or partial, and
//!   [`AttnMaskV1::fill`] writes the visibility bytes of a partial one. The callbacks are thread-safe and run
//!   no Python.

use std::ffi::{self, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::DLTensor;

/// The ABI generation this crate describes; it is also the `abi_version` of every v1 struct.
pub const ATTNRS_ABI_VERSION: u32 = 1;

/// The name of the Python capsule that holds a `*const AttnKernelV1`.
pub const KERNEL_CAPSULE_NAME: &ffi::CStr = c"attnrs.kernel.v1";

/// Return codes of [`AttnForwardFn`] / [`AttnBackwardFn`]. Anything but `OK` comes with a message.
pub mod status {
    /// Success: `out` (and `lse` when requested) were written.
    pub const OK: i32 = 0;
    /// An argument is wrong (shape, dtype, stride...). Raised in Python as `attnrs.ArgumentError`.
    pub const INVALID_ARGUMENT: i32 = 1;
    /// The kernel cannot do what was asked (dtype, option). Raised as `attnrs.UnsupportedError`.
    pub const UNSUPPORTED: i32 = 2;
    /// The kernel panicked (caught by [`guard`](super::guard)). Raised as `attnrs.InternalError`.
    pub const PANIC: i32 = 3;
    /// Any other failure. Raised as `attnrs.InternalError`.
    pub const INTERNAL: i32 = 4;
}

/// Bits of [`AttnKernelV1::dtypes`]: the element type of q, k, v and out (they always share one).
pub mod dtype {
    pub const F32: u32 = 1 << 0;
    pub const F64: u32 = 1 << 1;
    pub const BF16: u32 = 1 << 2;
    pub const F16: u32 = 1 << 3;
}

/// Bits of [`AttnKernelV1::mask_kinds`].
pub mod mask_kind {
    /// Calls without a mask (every pair visible).
    pub const NONE: u32 = 1 << 0;
    /// Calls with a mask given as [`AttnMaskV1`](super::AttnMaskV1) tile callbacks. attnrs turns every mask
    /// form it knows (expressions, block masks, dense bool tensors) into these.
    pub const TILES: u32 = 1 << 1;
}

/// Bits of [`AttnKernelV1::features`]: optional inputs and outputs the kernel handles. attnrs refuses a call
/// that needs a feature the kernel lacks, so a kernel never sees an argument it did not declare.
pub mod feature {
    /// Writes `lse` when it is not null.
    pub const LSE: u64 = 1 << 0;
    /// Applies `softcap` when it is > 0.
    pub const SOFTCAP: u64 = 1 << 1;
    /// Adds `sinks` to the softmax denominators when not null.
    pub const SINKS: u64 = 1 << 2;
    /// Adds `bias` to the logits when not null.
    pub const BIAS: u64 = 1 << 3;
    /// Accepts fewer kv heads than query heads (`H % Hkv == 0`, GQA / MQA).
    pub const GQA: u64 = 1 << 4;
}

/// The bit of [`AttnKernelV1::devices`] for a DLPack device type ([`device_type`](crate::device_type)).
pub const fn device_bit(device_type: i32) -> u64 {
    1u64 << (device_type as u32 & 63)
}

/// What [`AttnMaskV1::classify`] answers (negative: the tile was invalid, or the host failed).
pub mod tile_class {
    /// No pair of the tile is visible: skip it.
    pub const EMPTY: i32 = 0;
    /// Every pair is visible: no mask work.
    pub const FULL: i32 = 1;
    /// Some pairs are visible: ask [`fill`](super::AttnMaskV1::fill) for the bytes.
    pub const PARTIAL: i32 = 2;
    /// The tile was out of range or the host failed; the call will fail, treat the tile as empty.
    pub const ERROR: i32 = -1;
}

/// A rectangle of the (query row, key column) grid of one batch element and one *query* head.
/// Ranges are half-open, non-empty and inside `0..Q`, `0..K`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttnTile {
    pub batch: u64,
    pub head: u64,
    pub row_start: u64,
    pub row_end: u64,
    pub col_start: u64,
    pub col_end: u64,
}

impl AttnTile {
    /// Rows times columns: the bytes [`AttnMaskV1::fill`] writes.
    pub fn len(&self) -> usize {
        let rows = self.row_end.saturating_sub(self.row_start);
        let cols = self.col_end.saturating_sub(self.col_start);
        (rows as usize).saturating_mul(cols as usize)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `classify(ctx, tile) -> tile_class::*`.
pub type AttnClassifyFn = unsafe extern "C" fn(ctx: *const c_void, tile: *const AttnTile) -> i32;
/// `fill(ctx, tile, out) -> 0 | negative`: writes `tile.len()` bytes row-major, 1 = visible, 0 = masked.
pub type AttnFillFn =
    unsafe extern "C" fn(ctx: *const c_void, tile: *const AttnTile, out: *mut u8) -> i32;

/// The mask of one call, as two callbacks attnrs implements over its own mask representation. Both are
/// thread-safe and cheap to call per tile; neither runs Python. Valid only during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttnMaskV1 {
    pub abi_version: u32,
    pub struct_size: u32,
    pub ctx: *const c_void,
    pub classify: Option<AttnClassifyFn>,
    pub fill: Option<AttnFillFn>,
}

impl AttnMaskV1 {
    /// The class of `tile` (a [`tile_class`] value).
    ///
    /// # Safety
    /// `self` must be the mask attnrs passed to the running call.
    pub unsafe fn classify(&self, tile: &AttnTile) -> i32 {
        match self.classify {
            // SAFETY: the host's callback takes its own ctx and a tile valid for the call.
            Some(f) => unsafe { f(self.ctx, tile) },
            None => tile_class::PARTIAL,
        }
    }

    /// Writes the visibility of `tile` into `out` (`out.len()` must be `tile.len()`); 0 on success.
    ///
    /// # Safety
    /// `self` must be the mask attnrs passed to the running call.
    pub unsafe fn fill(&self, tile: &AttnTile, out: &mut [u8]) -> i32 {
        if out.len() != tile.len() {
            return tile_class::ERROR;
        }
        match self.fill {
            // SAFETY: `out` holds exactly `tile.len()` bytes, as the callback requires.
            Some(f) => unsafe { f(self.ctx, tile, out.as_mut_ptr()) },
            None => {
                out.fill(1);
                0
            }
        }
    }
}

/// One forward call.
///
/// ```text
/// s[b,h,i,j]   = scale * q[b,h,i,:] · k[b,h/G,j,:]                 (G = H / Hkv)
/// s            = softcap * tanh(s / softcap)                         (softcap > 0)
/// s            = s + bias[b,h,i,j]                                    (bias not null)
/// s            = -inf where the mask hides (i, j)
/// out[b,h,i,:] = Σ_j exp(s_ij - m) v[b,h/G,j,:] / (Σ_j exp(s_ij - m) + exp(sinks[h] - m))
/// lse[b,h,i]   = ln(Σ_j exp(s_ij) + exp(sinks[h]))                   (-inf for a row that sees nothing)
/// ```
/// A row that sees no key and has no sink gets zeros in `out`, never NaN.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttnArgsV1 {
    pub abi_version: u32,
    pub struct_size: u32,
    /// `[B, H, Q, D]`.
    pub query: *const DLTensor,
    /// `[B, Hkv, K, D]`, `H % Hkv == 0`.
    pub key: *const DLTensor,
    /// `[B, Hkv, K, Dv]`.
    pub value: *const DLTensor,
    /// `[B, H, Q, Dv]`, same dtype as the query; written.
    pub out: *const DLTensor,
    /// Null, or float32 `[B, H, Q]`; written (only when the kernel declares [`feature::LSE`]).
    pub lse: *const DLTensor,
    /// Null (every pair visible) or the tile callbacks of the mask.
    pub mask: *const AttnMaskV1,
    /// Null, or an additive float tensor `[B, H, Q, K]` (broadcast dims have stride 0).
    pub bias: *const DLTensor,
    /// Null, or a float tensor `[H]`.
    pub sinks: *const DLTensor,
    /// Multiplies `q · k`; finite.
    pub scale: f64,
    /// `> 0`: cap the logits; `0`: no cap.
    pub softcap: f64,
    /// Threads the caller would like the kernel to use (the kernel may use fewer); at least 1.
    pub num_threads: u32,
    /// Reserved, 0 in version 1.
    pub flags: u32,
}

/// One backward call (reserved: attnrs does not call `backward` yet; the slot is part of version 1 so that
/// plugins can ship it without a new ABI).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttnBackwardArgsV1 {
    pub abi_version: u32,
    pub struct_size: u32,
    /// The forward call's arguments; `out` and `lse` (never null here) hold its results.
    pub forward: *const AttnArgsV1,
    /// `[B, H, Q, Dv]`.
    pub grad_out: *const DLTensor,
    /// `[B, H, Q, D]`, written.
    pub grad_query: *const DLTensor,
    /// `[B, Hkv, K, D]`, written.
    pub grad_key: *const DLTensor,
    /// `[B, Hkv, K, Dv]`, written.
    pub grad_value: *const DLTensor,
    /// Null, or `[H]` float32, written when the forward had sinks.
    pub grad_sinks: *const DLTensor,
}

/// `forward(user_data, args, message, message_capacity) -> status`. On failure the kernel writes a
/// NUL-terminated UTF-8 message of at most `message_capacity` bytes (including the NUL) into `message`.
pub type AttnForwardFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    args: *const AttnArgsV1,
    message: *mut c_char,
    message_capacity: usize,
) -> i32;

/// `backward(user_data, args, message, message_capacity) -> status`, like [`AttnForwardFn`].
pub type AttnBackwardFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    args: *const AttnBackwardArgsV1,
    message: *mut c_char,
    message_capacity: usize,
) -> i32;

/// The table a plugin publishes. Build it with [`AttnKernelV1::new`] in a `static`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttnKernelV1 {
    /// [`ATTNRS_ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<AttnKernelV1>()` of the plugin's build.
    pub struct_size: u32,
    /// NUL-terminated UTF-8, not null: the kernel's own name (for messages and `attnrs info`).
    pub name: *const c_char,
    /// Bits [`device_bit`] of the DLPack device types it runs on.
    pub devices: u64,
    /// [`dtype`] bits.
    pub dtypes: u32,
    /// [`mask_kind`] bits.
    pub mask_kinds: u32,
    /// [`feature`] bits.
    pub features: u64,
    /// Not null.
    pub forward: Option<AttnForwardFn>,
    /// Null when the kernel has no backward.
    pub backward: Option<AttnBackwardFn>,
    /// Passed back as the first argument of `forward` / `backward`. Must be safe to use from several
    /// threads at once and live as long as the capsule.
    pub user_data: *mut c_void,
}

// SAFETY: the table is read-only after construction, and the ABI requires `forward`, `backward` and
// `user_data` to be usable from any thread at once, so sharing a `&AttnKernelV1` (or a copy) is sound.
unsafe impl Sync for AttnKernelV1 {}
// SAFETY: as for `Sync`: nothing in the table is tied to the thread that made it.
unsafe impl Send for AttnKernelV1 {}

impl AttnKernelV1 {
    /// The size every v1 table has at least.
    pub const STRUCT_SIZE: u32 = std::mem::size_of::<AttnKernelV1>() as u32;

    /// A CPU, float32, mask-aware kernel with no optional features; adjust the fields with struct update
    /// syntax: `AttnKernelV1 { features: feature::LSE, ..AttnKernelV1::new(c"mine", my_forward) }`.
    pub const fn new(name: &'static ffi::CStr, forward: AttnForwardFn) -> AttnKernelV1 {
        AttnKernelV1 {
            abi_version: ATTNRS_ABI_VERSION,
            struct_size: Self::STRUCT_SIZE,
            name: name.as_ptr(),
            devices: device_bit(crate::device_type::CPU),
            dtypes: dtype::F32,
            mask_kinds: mask_kind::NONE | mask_kind::TILES,
            features: 0,
            forward: Some(forward),
            backward: None,
            user_data: std::ptr::null_mut(),
        }
    }
}

impl DLTensor {
    /// The `ndim` sizes.
    ///
    /// # Safety
    /// `self` must be a valid DLTensor (`shape` points to `ndim` values).
    pub unsafe fn shape_slice(&self) -> &[i64] {
        match usize::try_from(self.ndim) {
            Ok(n) if n > 0 && !self.shape.is_null() => {
                // SAFETY: DLPack: `shape` points to `ndim` int64 values that live as long as the tensor.
                unsafe { std::slice::from_raw_parts(self.shape, n) }
            }
            _ => &[],
        }
    }

    /// The `ndim` element strides, or `None` when they are null (compact row-major).
    ///
    /// # Safety
    /// `self` must be a valid DLTensor.
    pub unsafe fn strides_slice(&self) -> Option<&[i64]> {
        match usize::try_from(self.ndim) {
            Ok(n) if !self.strides.is_null() => {
                // SAFETY: DLPack: non-null `strides` point to `ndim` int64 values.
                Some(unsafe { std::slice::from_raw_parts(self.strides, n) })
            }
            _ => None,
        }
    }
}

/// A failed call: a [`status`] code and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    pub status: i32,
    pub message: String,
}

impl KernelError {
    pub fn invalid_argument(message: impl Into<String>) -> KernelError {
        KernelError {
            status: status::INVALID_ARGUMENT,
            message: message.into(),
        }
    }
    pub fn unsupported(message: impl Into<String>) -> KernelError {
        KernelError {
            status: status::UNSUPPORTED,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> KernelError {
        KernelError {
            status: status::INTERNAL,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for KernelError {}

/// Copies `text` into `buffer` as NUL-terminated UTF-8, cut at a character boundary to fit `capacity`
/// bytes (NUL included). Interior NULs become spaces. A null buffer or zero capacity writes nothing.
///
/// # Safety
/// `buffer` is null or valid for writing `capacity` bytes.
pub unsafe fn write_message(buffer: *mut c_char, capacity: usize, text: &str) {
    if buffer.is_null() || capacity == 0 {
        return;
    }
    let mut end = text.len().min(capacity - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    // SAFETY: `buffer` is valid for `capacity` bytes and `end + 1 <= capacity`.
    let out = unsafe { std::slice::from_raw_parts_mut(buffer.cast::<u8>(), end + 1) };
    for (o, b) in out.iter_mut().zip(text.as_bytes()[..end].iter()) {
        *o = if *b == 0 { b' ' } else { *b };
    }
    out[end] = 0;
}

/// Reads the message a kernel wrote into a buffer filled by [`write_message`] (lossy UTF-8, up to the first
/// NUL or the end of the buffer).
pub fn read_message(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// The text of a caught panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned())
}

/// Runs `work`, turning its error into a status and message and catching any panic, so that nothing
/// unwinds across `extern "C"`. [`forward_fn!`] and [`backward_fn!`] wrap a function in it.
///
/// # Safety
/// `message` is null or valid for writing `capacity` bytes.
pub unsafe fn guard(
    message: *mut c_char,
    capacity: usize,
    work: impl FnOnce() -> Result<(), KernelError>,
) -> i32 {
    let (code, text) = match catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(())) => return status::OK,
        Ok(Err(e)) => (e.status, e.message),
        Err(payload) => {
            let text = format!("panic: {}", panic_message(payload.as_ref()));
            // A payload whose destructor panics would unwind from here; forget it instead.
            std::mem::forget(payload);
            (status::PANIC, text)
        }
    };
    // SAFETY: the caller's contract on `message` and `capacity`.
    unsafe { write_message(message, capacity, &text) };
    if code == status::OK {
        status::INTERNAL // an error must not read as success
    } else {
        code
    }
}

/// Checks the header of the argument struct a host passed and borrows it.
///
/// # Safety
/// `args` is null or points to an `AttnArgsV1`-prefixed struct valid for the duration of the call.
pub unsafe fn checked_args<'a>(args: *const AttnArgsV1) -> Result<&'a AttnArgsV1, KernelError> {
    if args.is_null() {
        return Err(KernelError::invalid_argument("args: null"));
    }
    // SAFETY: not null, and valid by the caller's contract; the header fields come first in every version.
    let (version, size) = unsafe { ((*args).abi_version, (*args).struct_size) };
    if version != ATTNRS_ABI_VERSION {
        return Err(KernelError::unsupported(format!(
            "args: ABI version {version}, this kernel speaks {ATTNRS_ABI_VERSION}"
        )));
    }
    if (size as usize) < std::mem::size_of::<AttnArgsV1>() {
        return Err(KernelError::invalid_argument(format!(
            "args: struct_size {size} < {}",
            std::mem::size_of::<AttnArgsV1>()
        )));
    }
    // SAFETY: checked above: a v1 struct at least as large as ours.
    Ok(unsafe { &*args })
}

/// Checks the header of a backward argument struct and borrows it (see [`checked_args`]).
///
/// # Safety
/// As [`checked_args`].
pub unsafe fn checked_backward_args<'a>(
    args: *const AttnBackwardArgsV1,
) -> Result<&'a AttnBackwardArgsV1, KernelError> {
    if args.is_null() {
        return Err(KernelError::invalid_argument("args: null"));
    }
    // SAFETY: not null, and valid by the caller's contract; the header comes first.
    let (version, size) = unsafe { ((*args).abi_version, (*args).struct_size) };
    if version != ATTNRS_ABI_VERSION || (size as usize) < std::mem::size_of::<AttnBackwardArgsV1>()
    {
        return Err(KernelError::unsupported(format!(
            "backward args: ABI version {version} with struct_size {size}"
        )));
    }
    // SAFETY: checked above.
    Ok(unsafe { &*args })
}

/// Defines an `unsafe extern "C"` [`AttnForwardFn`] named `$name` around a Rust function
/// `fn(user_data: *mut c_void, args: &AttnArgsV1) -> Result<(), KernelError>`. The generated function checks
/// the argument header and catches panics ([`guard`]), so nothing unwinds into the host.
///
/// ```
/// use attnrs_abi::{forward_fn, AttnArgsV1, AttnKernelV1, KernelError};
/// fn my_forward(_: *mut std::ffi::c_void, _args: &AttnArgsV1) -> Result<(), KernelError> {
///     Err(KernelError::unsupported("not yet"))
/// }
/// forward_fn!(pub fn my_forward_c = my_forward;);
/// pub static KERNEL: AttnKernelV1 = AttnKernelV1::new(c"mine", my_forward_c);
/// ```
#[macro_export]
macro_rules! forward_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident = $body:expr;) => {
        $(#[$attr])*
        $vis unsafe extern "C" fn $name(
            user_data: *mut ::std::ffi::c_void,
            args: *const $crate::AttnArgsV1,
            message: *mut ::std::ffi::c_char,
            message_capacity: usize,
        ) -> i32 {
            let body: fn(
                *mut ::std::ffi::c_void,
                &$crate::AttnArgsV1,
            ) -> ::std::result::Result<(), $crate::KernelError> = $body;
            // SAFETY: the host passes `message` valid for `message_capacity` bytes and `args` valid for the
            // duration of the call (the ABI contract); `checked_args` verifies the header before use.
            unsafe {
                $crate::guard(message, message_capacity, || {
                    body(user_data, $crate::checked_args(args)?)
                })
            }
        }
    };
}

/// Like [`forward_fn!`], for an [`AttnBackwardFn`] around
/// `fn(user_data: *mut c_void, args: &AttnBackwardArgsV1) -> Result<(), KernelError>`.
#[macro_export]
macro_rules! backward_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident = $body:expr;) => {
        $(#[$attr])*
        $vis unsafe extern "C" fn $name(
            user_data: *mut ::std::ffi::c_void,
            args: *const $crate::AttnBackwardArgsV1,
            message: *mut ::std::ffi::c_char,
            message_capacity: usize,
        ) -> i32 {
            let body: fn(
                *mut ::std::ffi::c_void,
                &$crate::AttnBackwardArgsV1,
            ) -> ::std::result::Result<(), $crate::KernelError> = $body;
            // SAFETY: as in `forward_fn!`.
            unsafe {
                $crate::guard(message, message_capacity, || {
                    body(user_data, $crate::checked_backward_args(args)?)
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(_: *mut c_void, args: &AttnArgsV1) -> Result<(), KernelError> {
        if args.scale < 0.0 {
            panic!("negative scale {}", args.scale);
        }
        Err(KernelError::unsupported("ünsupported thing"))
    }
    forward_fn!(fn fails_c = fails;);

    fn args(scale: f64) -> AttnArgsV1 {
        AttnArgsV1 {
            abi_version: ATTNRS_ABI_VERSION,
            struct_size: std::mem::size_of::<AttnArgsV1>() as u32,
            query: std::ptr::null(),
            key: std::ptr::null(),
            value: std::ptr::null(),
            out: std::ptr::null(),
            lse: std::ptr::null(),
            mask: std::ptr::null(),
            bias: std::ptr::null(),
            sinks: std::ptr::null(),
            scale,
            softcap: 0.0,
            num_threads: 1,
            flags: 0,
        }
    }

    fn call(a: &AttnArgsV1, capacity: usize) -> (i32, String) {
        let mut buf = vec![0xffu8; capacity.max(1)];
        // SAFETY: the buffer holds `capacity` bytes; `a` lives across the call.
        let code = unsafe { fails_c(std::ptr::null_mut(), a, buf.as_mut_ptr().cast(), capacity) };
        (code, read_message(&buf[..capacity]))
    }

    #[test]
    fn errors_and_panics_become_codes() {
        assert_eq!(
            call(&args(1.0), 256),
            (status::UNSUPPORTED, "ünsupported thing".into())
        );
        let (code, text) = call(&args(-2.0), 256);
        assert_eq!(code, status::PANIC);
        assert_eq!(text, "panic: negative scale -2");
        // Truncation keeps UTF-8 whole: "ü" is two bytes and does not fit in 1 + NUL.
        assert_eq!(call(&args(1.0), 2), (status::UNSUPPORTED, "".into()));
        assert_eq!(call(&args(1.0), 3), (status::UNSUPPORTED, "ü".into()));
        let mut bad = args(1.0);
        bad.abi_version = 2;
        let (code, text) = call(&bad, 256);
        assert_eq!(code, status::UNSUPPORTED);
        assert!(text.contains("ABI version 2"), "{text}");
        bad = args(1.0);
        bad.struct_size = 8;
        assert_eq!(call(&bad, 256).0, status::INVALID_ARGUMENT);
        let mut buf = [0u8; 64];
        // SAFETY: a null args pointer is what is being tested; the buffer holds 64 bytes.
        let code = unsafe {
            fails_c(
                std::ptr::null_mut(),
                std::ptr::null(),
                buf.as_mut_ptr().cast(),
                64,
            )
        };
        assert_eq!(code, status::INVALID_ARGUMENT);
    }

    #[test]
    fn table_header_comes_first() {
        static T: AttnKernelV1 = AttnKernelV1::new(c"t", fails_c);
        assert_eq!(std::mem::offset_of!(AttnKernelV1, abi_version), 0);
        assert_eq!(std::mem::offset_of!(AttnKernelV1, struct_size), 4);
        assert_eq!(std::mem::offset_of!(AttnArgsV1, struct_size), 4);
        assert_eq!(std::mem::offset_of!(AttnMaskV1, struct_size), 4);
        assert_eq!(T.struct_size as usize, std::mem::size_of::<AttnKernelV1>());
        // The v1 layouts on 64-bit targets; appending fields may only grow these.
        assert_eq!(std::mem::size_of::<AttnKernelV1>(), 64);
        assert_eq!(std::mem::size_of::<AttnArgsV1>(), 96);
        assert_eq!(std::mem::size_of::<AttnMaskV1>(), 32);
        assert_eq!(std::mem::size_of::<AttnTile>(), 48);
        assert_eq!(device_bit(crate::device_type::CPU), 2);
    }

    #[test]
    fn mask_wrappers_check_lengths() {
        let mask = AttnMaskV1 {
            abi_version: 1,
            struct_size: std::mem::size_of::<AttnMaskV1>() as u32,
            ctx: std::ptr::null(),
            classify: None,
            fill: None,
        };
        let tile = AttnTile {
            row_end: 2,
            col_end: 3,
            ..Default::default()
        };
        let mut out = [0u8; 6];
        // SAFETY: a mask without callbacks touches nothing but `out`.
        unsafe {
            assert_eq!(mask.classify(&tile), tile_class::PARTIAL);
            assert_eq!(mask.fill(&tile, &mut out), 0);
            assert_eq!(mask.fill(&tile, &mut out[..5]), tile_class::ERROR);
        }
        assert_eq!(out, [1; 6]);
    }
}
