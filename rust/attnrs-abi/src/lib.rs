//! The attnrs plugin ABI.
//!
//! Everything here is `#[repr(C)]` and dependency-free, so a kernel crate can depend on it without pulling
//! in attnrs. The tensor structs follow DLPack (dlpack.h, v1.x) field for field; attnrs also uses them to
//! import torch tensors. The layout is append-only: new fields go at the end and older readers check sizes.
//!
//! The kernel half (a versioned table, [`AttnKernelV1`], that a plugin publishes in a Python capsule named
//! [`KERNEL_CAPSULE_NAME`]) is described in the [`kernel`](crate::AttnKernelV1) items: the argument struct
//! [`AttnArgsV1`], the mask callbacks [`AttnMaskV1`], the status codes in [`status`] and the panic guard
//! [`guard`] with its macros [`forward_fn!`] and [`backward_fn!`].

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// DLPack device types used by attnrs (dlpack.h `DLDeviceType`).
pub mod device_type {
    pub const CPU: i32 = 1;
    pub const CUDA: i32 = 2;
    pub const CUDA_HOST: i32 = 3;
    pub const OPENCL: i32 = 4;
    pub const VULKAN: i32 = 7;
    pub const METAL: i32 = 8;
    pub const VPI: i32 = 9;
    pub const ROCM: i32 = 10;
    pub const ROCM_HOST: i32 = 11;
    pub const EXT_DEV: i32 = 12;
    pub const CUDA_MANAGED: i32 = 13;
    pub const ONE_API: i32 = 14;
    pub const WEBGPU: i32 = 15;
    pub const HEXAGON: i32 = 16;
    pub const MAIA: i32 = 17;
}

/// DLPack data type codes (dlpack.h `DLDataTypeCode`).
pub mod type_code {
    pub const INT: u8 = 0;
    pub const UINT: u8 = 1;
    pub const FLOAT: u8 = 2;
    pub const OPAQUE_HANDLE: u8 = 3;
    pub const BFLOAT: u8 = 4;
    pub const COMPLEX: u8 = 5;
    pub const BOOL: u8 = 6;
}

/// Where a tensor lives.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

/// Element type: `code`, `bits` per lane, `lanes` (1 for scalars).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

/// A strided tensor view (dlpack.h `DLTensor`). Strides count elements; null strides mean row-major.
#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

/// A `DLTensor` with its owner's deleter (legacy capsule name "dltensor").
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// DLPack ABI version.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLPackVersion {
    pub major: u32,
    pub minor: u32,
}

/// The versioned managed tensor (capsule name "dltensor_versioned", DLPack >= 1.0).
#[repr(C)]
#[derive(Debug)]
pub struct DLManagedTensorVersioned {
    pub version: DLPackVersion,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    pub flags: u64,
    pub dl_tensor: DLTensor,
}

/// `DLManagedTensorVersioned::flags` bit: the producer allows reads only.
pub const DLPACK_FLAG_BITMASK_READ_ONLY: u64 = 1 << 0;
/// `DLManagedTensorVersioned::flags` bit: the tensor was copied by the producer.
pub const DLPACK_FLAG_BITMASK_IS_COPIED: u64 = 1 << 1;

/// A borrowed, NUL-terminated UTF-8 string, used in names and messages.
pub type CStr = *const c_char;

mod kernel;
pub use kernel::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_dlpack_h() {
        // Sizes of the C structs on 64-bit targets, as dlpack.h lays them out.
        assert_eq!(std::mem::size_of::<DLDevice>(), 8);
        assert_eq!(std::mem::size_of::<DLDataType>(), 4);
        assert_eq!(std::mem::size_of::<DLTensor>(), 48);
        assert_eq!(std::mem::size_of::<DLManagedTensor>(), 64);
        assert_eq!(std::mem::size_of::<DLManagedTensorVersioned>(), 80);
        assert_eq!(
            std::mem::offset_of!(DLManagedTensorVersioned, dl_tensor),
            32
        );
    }
}
