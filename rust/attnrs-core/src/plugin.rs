//! Native kernels from other shared libraries, through the C ABI of `attnrs-abi`.
//!
//! [`AbiKernel::from_raw`] validates a published [`AttnKernelV1`] (version, size, null pointers, name) and
//! copies it; [`AbiKernel`] then implements [`AttentionKernel`]: each call is checked
//! ([`validate_args`]), its views become DLPack `DLTensor`s, the mask becomes the two tile callbacks of an
//! [`AttnMaskV1`] implemented over the call's [`MaskTiles`], and the kernel's status becomes an [`Error`].
//! The callbacks check every tile the kernel asks about and never unwind into it.

use std::any::Any;
use std::ffi::{CStr, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use attnrs_abi::{
    ATTNRS_ABI_VERSION, AttnArgsV1, AttnKernelV1, AttnMaskV1, AttnTile, DLDataType, DLDevice,
    DLTensor, device_type, dtype as abi_dtype, feature, mask_kind, read_message, status,
    tile_class, type_code,
};

use crate::kernel::AttentionArgs;
use crate::mask::tiles::{BlockClass, MaskTiles};
use crate::registry::{AttentionKernel, Capabilities, KernelFeatures, MaskKind};
use crate::tensor::{DType, TensorView};
use crate::{Error, Result};

/// Bytes of the message buffer a kernel may write on failure.
const MESSAGE_CAPACITY: usize = 1024;

/// A kernel published through the C ABI, validated and copied.
pub struct AbiKernel {
    name: String,
    table: AttnKernelV1,
    capabilities: Capabilities,
    features: KernelFeatures,
    /// Keeps the table's owner (e.g. the Python capsule) alive as long as the kernel is registered.
    _owner: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for AbiKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbiKernel")
            .field("name", &self.name)
            .field("capabilities", &self.capabilities)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

fn bad_table(expected: impl Into<String>, got: impl Into<String>) -> Error {
    Error::value("capsule", expected, got)
}

/// The torch name of a DLPack device type.
fn device_name(device_type: i32) -> String {
    match device_type {
        device_type::CPU => "cpu".to_owned(),
        device_type::CUDA | device_type::ROCM => "cuda".to_owned(),
        device_type::METAL => "mps".to_owned(),
        device_type::ONE_API => "xpu".to_owned(),
        device_type::MAIA => "maia".to_owned(),
        other => format!("dlpack:{other}"),
    }
}

impl AbiKernel {
    /// Validates and copies the table at `table`. `owner` is kept alive with the kernel.
    ///
    /// # Safety
    /// `table` is null or points to at least 8 readable bytes, and, when those bytes hold a v1 header whose
    /// `struct_size` is large enough, to a whole [`AttnKernelV1`] whose `name` (if not null) is a
    /// NUL-terminated string and whose functions and `user_data` stay valid while `owner` lives.
    pub unsafe fn from_raw(
        table: *const AttnKernelV1,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<AbiKernel> {
        if table.is_null() {
            return Err(bad_table("a pointer to an AttnKernelV1", "a null pointer"));
        }
        // SAFETY: not null; the caller guarantees the two header words are readable.
        let (version, size) = unsafe {
            (
                std::ptr::addr_of!((*table).abi_version).read_unaligned(),
                std::ptr::addr_of!((*table).struct_size).read_unaligned(),
            )
        };
        if version != ATTNRS_ABI_VERSION {
            return Err(bad_table(
                format!("a kernel table of ABI version {ATTNRS_ABI_VERSION}"),
                format!("ABI version {version} (rebuild the plugin against a matching attnrs-abi)"),
            ));
        }
        if size < AttnKernelV1::STRUCT_SIZE {
            return Err(bad_table(
                format!(
                    "an AttnKernelV1 of at least {} bytes (struct_size)",
                    AttnKernelV1::STRUCT_SIZE
                ),
                format!("struct_size {size}"),
            ));
        }
        // SAFETY: a v1 header with a large enough size: the caller guarantees a whole table. Newer fields past
        // our struct are ignored (append-only layout).
        let table = unsafe { std::ptr::read_unaligned(table) };
        if table.name.is_null() {
            return Err(bad_table("a kernel table with a name", "a null name"));
        }
        // SAFETY: not null, and NUL-terminated by the caller's contract.
        let name = unsafe { CStr::from_ptr(table.name) };
        let name = match name.to_str() {
            Ok(n) if !n.is_empty() => n.to_owned(),
            _ => {
                return Err(bad_table(
                    "a non-empty UTF-8 kernel name",
                    format!("{name:?}"),
                ));
            }
        };
        if table.forward.is_none() {
            return Err(bad_table(
                format!("kernel '{name}' with a forward function"),
                "a null forward pointer",
            ));
        }
        let dtypes: Vec<DType> = [
            (abi_dtype::F32, DType::F32),
            (abi_dtype::BF16, DType::BF16),
            (abi_dtype::F16, DType::F16),
            (abi_dtype::F64, DType::F64),
        ]
        .into_iter()
        .filter(|(bit, _)| table.dtypes & bit != 0)
        .map(|(_, d)| d)
        .collect();
        if dtypes.is_empty() {
            return Err(bad_table(
                format!("kernel '{name}' declaring at least one dtype"),
                format!("dtypes bits {:#x}", table.dtypes),
            ));
        }
        if table.devices == 0 {
            return Err(bad_table(
                format!("kernel '{name}' declaring at least one device"),
                "devices 0",
            ));
        }
        let devices = (0..64)
            .filter(|bit| table.devices & (1u64 << bit) != 0)
            .map(device_name)
            .collect();
        let mut mask_kinds = Vec::new();
        if table.mask_kinds & mask_kind::NONE != 0 {
            mask_kinds.push(MaskKind::None);
        }
        if table.mask_kinds & mask_kind::TILES != 0 {
            mask_kinds.extend([MaskKind::Dense, MaskKind::BlockSparse, MaskKind::Expression]);
        }
        if mask_kinds.is_empty() {
            return Err(bad_table(
                format!("kernel '{name}' declaring mask kinds (NONE and/or TILES)"),
                format!("mask_kinds bits {:#x}", table.mask_kinds),
            ));
        }
        let capabilities = Capabilities {
            devices,
            dtypes,
            mask_kinds,
            // attnrs does not call plugin backward functions yet; gradients are not provided through it.
            backward: false,
            lse: table.features & feature::LSE != 0,
        };
        let features = KernelFeatures {
            softcap: table.features & feature::SOFTCAP != 0,
            sinks: table.features & feature::SINKS != 0,
            bias: table.features & feature::BIAS != 0,
            gqa: table.features & feature::GQA != 0,
        };
        Ok(AbiKernel {
            name,
            table,
            capabilities,
            features,
            _owner: owner,
        })
    }

    /// The name the kernel gives itself in its table.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the table has a backward function (not called by attnrs yet).
    pub fn has_backward(&self) -> bool {
        self.table.backward.is_some()
    }
}

/// A `DLTensor` over a [`TensorView`], owning its shape and stride arrays.
struct DlView {
    _shape: Vec<i64>,
    _strides: Vec<i64>,
    tensor: DLTensor,
}

fn dl_dtype(dtype: DType) -> DLDataType {
    let (code, bits) = match dtype {
        DType::F32 => (type_code::FLOAT, 32),
        DType::F64 => (type_code::FLOAT, 64),
        DType::F16 => (type_code::FLOAT, 16),
        DType::BF16 => (type_code::BFLOAT, 16),
        DType::Bool => (type_code::BOOL, 8),
        DType::U8 => (type_code::UINT, 8),
        DType::I32 => (type_code::INT, 32),
        DType::I64 => (type_code::INT, 64),
    };
    DLDataType {
        code,
        bits,
        lanes: 1,
    }
}

impl DlView {
    fn new(view: &TensorView) -> DlView {
        Self::with_layout(
            view,
            view.shape().iter().map(|&n| n as i64).collect(),
            view.strides().iter().map(|&s| s as i64).collect(),
        )
    }

    fn with_layout(view: &TensorView, mut shape: Vec<i64>, mut strides: Vec<i64>) -> DlView {
        let tensor = DLTensor {
            data: view.as_ptr().cast::<c_void>(),
            device: DLDevice {
                device_type: device_type::CPU,
                device_id: 0,
            },
            ndim: shape.len() as i32,
            dtype: dl_dtype(view.dtype()),
            shape: shape.as_mut_ptr(),
            strides: strides.as_mut_ptr(),
            byte_offset: 0,
        };
        // The vectors' heap buffers do not move when they are moved into the struct.
        DlView {
            _shape: shape,
            _strides: strides,
            tensor,
        }
    }

    /// `view` broadcast to `target` (torch's rules: dims align right; size-1 or missing dims get stride 0).
    fn broadcast(view: &TensorView, target: [usize; 4], arg: &str) -> Result<DlView> {
        let skip = 4usize
            .checked_sub(view.ndim())
            .ok_or_else(|| Error::shape(arg, "at most 4 dims", format!("{:?}", view.shape())))?;
        let mut strides = vec![0i64; 4];
        for d in skip..4 {
            let (n, s) = (view.shape()[d - skip], view.strides()[d - skip]);
            if n == target[d] && n != 1 {
                strides[d] = s as i64;
            } else if n != 1 && n != target[d] {
                return Err(Error::shape(
                    arg,
                    format!("a tensor broadcastable to {target:?}"),
                    format!("{:?}", view.shape()),
                ));
            }
        }
        let shape = target.iter().map(|&n| n as i64).collect();
        Ok(Self::with_layout(view, shape, strides))
    }
}

/// Checks the shapes, dtypes and memory of a call, so a plugin only sees consistent arguments: the checks of
/// the built-in kernel ([`AttentionArgs::check`]), with the same messages.
pub fn validate_args(args: &AttentionArgs<'_>) -> Result<()> {
    args.check().map(drop)
}

/// What the tile callbacks see: the call's mask and grid, and the first failure.
struct MaskContext<'a> {
    tiles: &'a dyn MaskTiles,
    grid: [usize; 4],
    failure: Mutex<Option<String>>,
}

impl MaskContext<'_> {
    fn fail(&self, what: String) {
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(what);
    }

    /// The tile as ranges, if it lies inside the grid and is not empty.
    fn ranges(
        &self,
        tile: &AttnTile,
    ) -> Option<(usize, usize, std::ops::Range<usize>, std::ops::Range<usize>)> {
        let [b, h, q, k] = self.grid;
        let fits = tile.batch < b as u64
            && tile.head < h as u64
            && tile.row_start < tile.row_end
            && tile.row_end <= q as u64
            && tile.col_start < tile.col_end
            && tile.col_end <= k as u64;
        if !fits {
            self.fail(format!(
                "the kernel asked for the mask of tile {tile:?}, outside the grid [B, H, Q, K] = {:?}",
                self.grid
            ));
            return None;
        }
        Some((
            tile.batch as usize,
            tile.head as usize,
            tile.row_start as usize..tile.row_end as usize,
            tile.col_start as usize..tile.col_end as usize,
        ))
    }
}

unsafe extern "C" fn classify_tile(ctx: *const c_void, tile: *const AttnTile) -> i32 {
    if ctx.is_null() || tile.is_null() {
        return tile_class::ERROR;
    }
    // SAFETY: `ctx` is the `MaskContext` attnrs put in the mask it passed; it lives for the whole call, and
    // callbacks are only valid during the call. `tile` is not null and points to a tile (ABI contract).
    let (ctx, tile) = unsafe { (&*ctx.cast::<MaskContext<'_>>(), *tile) };
    let Some((b, h, rows, cols)) = ctx.ranges(&tile) else {
        return tile_class::ERROR;
    };
    match catch_unwind(AssertUnwindSafe(|| ctx.tiles.classify(b, h, rows, cols))) {
        Ok(BlockClass::Empty) => tile_class::EMPTY,
        Ok(BlockClass::Full) => tile_class::FULL,
        Ok(BlockClass::Partial) => tile_class::PARTIAL,
        Err(payload) => {
            ctx.fail(format!(
                "mask classify: {}",
                attnrs_abi::panic_message(payload.as_ref())
            ));
            std::mem::forget(payload);
            tile_class::ERROR
        }
    }
}

unsafe extern "C" fn fill_tile(ctx: *const c_void, tile: *const AttnTile, out: *mut u8) -> i32 {
    if ctx.is_null() || tile.is_null() || out.is_null() {
        return tile_class::ERROR;
    }
    // SAFETY: as in `classify_tile`.
    let (ctx, tile) = unsafe { (&*ctx.cast::<MaskContext<'_>>(), *tile) };
    let Some((b, h, rows, cols)) = ctx.ranges(&tile) else {
        return tile_class::ERROR;
    };
    // SAFETY: `out` holds rows * cols bytes for a tile inside the grid (ABI contract).
    let out = unsafe { std::slice::from_raw_parts_mut(out, rows.len() * cols.len()) };
    match catch_unwind(AssertUnwindSafe(|| {
        ctx.tiles.fill(b, h, rows, cols, &mut *out)
    })) {
        Ok(()) => 0,
        Err(payload) => {
            ctx.fail(format!(
                "mask fill: {}",
                attnrs_abi::panic_message(payload.as_ref())
            ));
            std::mem::forget(payload);
            out.fill(0);
            tile_class::ERROR
        }
    }
}

impl AttentionKernel for AbiKernel {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn features(&self) -> KernelFeatures {
        self.features
    }

    fn origin(&self) -> String {
        let backward = if self.has_backward() {
            ", has backward"
        } else {
            ""
        };
        format!(
            "plugin '{}' (ABI v{ATTNRS_ABI_VERSION}{backward})",
            self.name
        )
    }

    fn forward(&self, args: &AttentionArgs<'_>) -> Result<()> {
        validate_args(args)?;
        let q = args.query.shape();
        let grid = [q[0], q[1], q[2], args.key.shape()[2]];
        let query = DlView::new(args.query);
        let key = DlView::new(args.key);
        let value = DlView::new(args.value);
        let out = DlView::new(args.out);
        let lse = args.lse.map(DlView::new);
        let sinks = args.sinks.map(DlView::new);
        let bias = args
            .bias
            .map(|b| DlView::broadcast(b, grid, "bias"))
            .transpose()?;
        let context = MaskContext {
            tiles: args.mask,
            grid,
            failure: Mutex::new(None),
        };
        let mask = AttnMaskV1 {
            abi_version: ATTNRS_ABI_VERSION,
            struct_size: std::mem::size_of::<AttnMaskV1>() as u32,
            ctx: (&context as *const MaskContext<'_>).cast::<c_void>(),
            classify: Some(classify_tile),
            fill: Some(fill_tile),
        };
        let ptr = |v: &Option<DlView>| {
            v.as_ref()
                .map_or(std::ptr::null(), |v| &v.tensor as *const DLTensor)
        };
        let call = AttnArgsV1 {
            abi_version: ATTNRS_ABI_VERSION,
            struct_size: std::mem::size_of::<AttnArgsV1>() as u32,
            query: &query.tensor,
            key: &key.tensor,
            value: &value.tensor,
            out: &out.tensor,
            lse: ptr(&lse),
            mask: &mask,
            bias: ptr(&bias),
            sinks: ptr(&sinks),
            scale: args.scale,
            softcap: args.softcap.unwrap_or(0.0),
            num_threads: args.num_threads.clamp(1, u32::MAX as usize) as u32,
            flags: 0,
        };
        let mut message = vec![0u8; MESSAGE_CAPACITY];
        let forward = self
            .table
            .forward
            .ok_or_else(|| Error::Internal("a validated kernel lost its forward".into()))?;
        // SAFETY: the table was validated in `from_raw` and its owner is alive (held by `self`); every pointer in
        // `call` refers to locals that outlive the call, and `message` holds MESSAGE_CAPACITY bytes. The ABI
        // forbids the kernel to unwind.
        let code = unsafe {
            forward(
                self.table.user_data,
                &call,
                message.as_mut_ptr().cast(),
                message.len(),
            )
        };
        if code != status::OK {
            let mut text = read_message(&message);
            if text.is_empty() {
                text = format!("status {code} without a message");
            }
            return Err(Error::Kernel {
                kernel: self.name.clone(),
                status: code,
                message: text,
            });
        }
        let failure = context
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match failure {
            Some(what) => Err(Error::Kernel {
                kernel: self.name.clone(),
                status: status::INVALID_ARGUMENT,
                message: what,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
