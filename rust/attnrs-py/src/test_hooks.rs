//! Test-only entry points, compiled with the `test-hooks` feature only (the test install enables it; the
//! release module lacks them): capsules of deliberately broken or misbehaving kernel tables
//! (`_test_capsule`), element-by-element copies and sums through DLPack views (`_strided_copy`,
//! `_strided_sum`) and the size of a thread pool (`_pool_threads`).

use std::ffi::{CStr, c_void};
use std::ptr::NonNull;

use attnrs_abi::{
    AttnArgsV1, AttnKernelV1, AttnTile, KERNEL_CAPSULE_NAME, KernelError, feature, forward_fn,
};
use attnrs_core::{Error, tensor};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::dlpack;
use crate::door::run_detached;
use crate::errors::PyAttnrsError;

/// Adds the test entry points to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_test_capsule, m)?)?;
    m.add_function(wrap_pyfunction!(_strided_copy, m)?)?;
    m.add_function(wrap_pyfunction!(_strided_sum, m)?)?;
    m.add_function(wrap_pyfunction!(_pool_threads, m)?)?;
    Ok(())
}

/// Copies `src` into `dst` element by element through DLPack views (tests of the tensor bridge).
#[pyfunction]
fn _strided_copy(py: Python<'_>, src: &Bound<'_, PyAny>, dst: &Bound<'_, PyAny>) -> PyResult<()> {
    let src = dlpack::import(src, "src")?;
    let dst = dlpack::import_output(dst, "dst")?;
    run_detached(py, || tensor::strided_copy(&src.view, &dst.view))
}

/// Sums a floating tensor in float64 through its DLPack view (tests of the tensor bridge).
#[pyfunction]
fn _strided_sum(py: Python<'_>, src: &Bound<'_, PyAny>) -> PyResult<f64> {
    let src = dlpack::import(src, "src")?;
    run_detached(py, || tensor::strided_sum(&src.view))
}

/// Worker threads of the pool `num_threads` selects (starts it if needed).
#[pyfunction]
fn _pool_threads(py: Python<'_>, num_threads: usize) -> PyResult<usize> {
    run_detached(py, || {
        attnrs_core::threads::install(num_threads, attnrs_core::threads::current_num_threads)
    })
}

fn refuses(_: *mut c_void, _: &AttnArgsV1) -> Result<(), KernelError> {
    Err(KernelError::unsupported(
        "the test kernel refuses every call",
    ))
}
forward_fn!(fn refuses_c = refuses;);

fn panics(_: *mut c_void, args: &AttnArgsV1) -> Result<(), KernelError> {
    panic!("the test kernel panicked (scale {})", args.scale);
}
forward_fn!(fn panics_c = panics;);

fn asks_outside(_: *mut c_void, args: &AttnArgsV1) -> Result<(), KernelError> {
    let tile = AttnTile {
        row_end: 1,
        col_end: u64::MAX,
        ..AttnTile::default()
    };
    // SAFETY: the host's mask pointer is null or valid during the call; the host checks the tile.
    unsafe {
        if let Some(mask) = args.mask.as_ref() {
            mask.classify(&tile);
        }
    }
    Ok(())
}
forward_fn!(fn asks_outside_c = asks_outside;);

const ALL_FEATURES: u64 =
    feature::LSE | feature::SOFTCAP | feature::SINKS | feature::BIAS | feature::GQA;
const ALL_DTYPES: u32 = attnrs_abi::dtype::F32
    | attnrs_abi::dtype::F64
    | attnrs_abi::dtype::BF16
    | attnrs_abi::dtype::F16;

static REFUSES: AttnKernelV1 = AttnKernelV1 {
    features: ALL_FEATURES,
    dtypes: ALL_DTYPES,
    ..AttnKernelV1::new(c"test-refuses", refuses_c)
};
static PANICS: AttnKernelV1 = AttnKernelV1 {
    name: c"test-panics".as_ptr(),
    forward: Some(panics_c),
    ..REFUSES
};
static ASKS_OUTSIDE: AttnKernelV1 = AttnKernelV1 {
    name: c"test-asks-outside".as_ptr(),
    forward: Some(asks_outside_c),
    ..REFUSES
};
static WRONG_VERSION: AttnKernelV1 = AttnKernelV1 {
    abi_version: 2,
    ..REFUSES
};
static SMALL: AttnKernelV1 = AttnKernelV1 {
    struct_size: 24,
    ..REFUSES
};
static NULL_FORWARD: AttnKernelV1 = AttnKernelV1 {
    forward: None,
    ..REFUSES
};
static NULL_NAME: AttnKernelV1 = AttnKernelV1 {
    name: std::ptr::null(),
    ..REFUSES
};

/// A capsule for the tests: "refuses" (status UNSUPPORTED), "panics", "asks_outside" (requests a mask tile
/// outside the grid), "wrong_name" (a valid table in a capsule named "attnrs.kernel.v0"), "wrong_version",
/// "small_size", "null_forward", "null_name".
#[pyfunction]
fn _test_capsule<'py>(py: Python<'py>, kind: &str) -> PyResult<Bound<'py, PyCapsule>> {
    let (table, name): (&'static AttnKernelV1, &'static CStr) = match kind {
        "refuses" => (&REFUSES, KERNEL_CAPSULE_NAME),
        "panics" => (&PANICS, KERNEL_CAPSULE_NAME),
        "asks_outside" => (&ASKS_OUTSIDE, KERNEL_CAPSULE_NAME),
        "wrong_name" => (&REFUSES, c"attnrs.kernel.v0"),
        "wrong_version" => (&WRONG_VERSION, KERNEL_CAPSULE_NAME),
        "small_size" => (&SMALL, KERNEL_CAPSULE_NAME),
        "null_forward" => (&NULL_FORWARD, KERNEL_CAPSULE_NAME),
        "null_name" => (&NULL_NAME, KERNEL_CAPSULE_NAME),
        other => {
            return Err(PyAttnrsError(Error::value(
                "kind",
                "refuses, panics, asks_outside, wrong_name, wrong_version, small_size, null_forward or null_name",
                format!("'{other}'"),
            ))
            .into())
        }
    };
    let pointer = NonNull::from(table).cast::<c_void>();
    // SAFETY: the pointer refers to a `static` table, valid for the life of the process.
    unsafe { PyCapsule::new_with_pointer(py, pointer, name) }
}
