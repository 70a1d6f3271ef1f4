//! `attnrs_example_kernel._native`: publishes the naive kernel of [`naive`] to attnrs.
//!
//! The whole plugin side of the ABI is here: a `static` [`AttnKernelV1`] table describing the kernel, its
//! forward function wrapped by [`forward_fn!`] (which catches panics and checks the argument header), and a
//! Python function returning the table in a capsule named `"attnrs.kernel.v1"`. attnrs finds
//! `kernel_capsule` through the `attnrs.kernels` entry point declared in `pyproject.toml`.

mod naive;

use std::ffi::c_void;
use std::ptr::NonNull;

use attnrs_abi::{AttnKernelV1, KERNEL_CAPSULE_NAME, feature, forward_fn};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

forward_fn!(fn forward = naive::forward;);

/// The kernel: CPU (the default), float32, with or without masks, and these optional features.
static KERNEL: AttnKernelV1 = AttnKernelV1 {
    features: feature::LSE | feature::SOFTCAP | feature::SINKS | feature::GQA,
    ..AttnKernelV1::new(c"example", forward)
};

/// The same kernel with its debug switch on: every call panics inside the plugin.
static PANIC_SETTINGS: naive::Settings = naive::Settings {
    panic_on_call: true,
};

/// A table with a `user_data` pointer, built once (raw pointers keep it out of a plain `static`).
fn panicking_table() -> &'static AttnKernelV1 {
    static TABLE: std::sync::OnceLock<AttnKernelV1> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| AttnKernelV1 {
        name: c"example-panics".as_ptr(),
        user_data: (&PANIC_SETTINGS as *const naive::Settings)
            .cast_mut()
            .cast::<c_void>(),
        ..KERNEL
    })
}

fn capsule<'py>(py: Python<'py>, table: &'static AttnKernelV1) -> PyResult<Bound<'py, PyCapsule>> {
    // SAFETY: the table is 'static (and so is what its user_data points to), as the ABI requires.
    unsafe {
        PyCapsule::new_with_pointer(
            py,
            NonNull::from(table).cast::<c_void>(),
            KERNEL_CAPSULE_NAME,
        )
    }
}

#[pymodule]
mod _native {
    use super::*;

    /// The example kernel as a capsule for `attnrs.register_native` (the `attnrs.kernels` entry point).
    #[pyfunction]
    fn kernel_capsule(py: Python<'_>) -> PyResult<Bound<'_, PyCapsule>> {
        capsule(py, &KERNEL)
    }

    /// The example kernel with its debug switch on: every call panics (for tests of the panic guard).
    #[pyfunction]
    fn panicking_kernel_capsule(py: Python<'_>) -> PyResult<Bound<'_, PyCapsule>> {
        capsule(py, panicking_table())
    }
}
