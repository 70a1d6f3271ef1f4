//! Native kernels from Python: `register_native(name, capsule)` validates a capsule holding a
//! `*const AttnKernelV1` and stores it in the core's kernel table; `native_info`, `native_kernels` and
//! `remove_native` read and edit that table. (The deliberately broken tables of the tests live in
//! `test_hooks`.)

use std::ffi::CStr;
use std::sync::Arc;

use attnrs_abi::KERNEL_CAPSULE_NAME;
use attnrs_core::Error;
use attnrs_core::plugin::AbiKernel;
use attnrs_core::registry::{kernels, register_kernel, validate_name};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods, PyDict, PyList};

use crate::errors::PyAttnrsError;
use crate::registry::capabilities_to_dict;

/// Validates `capsule` (its name, then the table's ABI version, struct size, name and forward pointer) and
/// registers the kernel under `name`, replacing any kernel of that name. Nothing is stored on error.
#[pyfunction]
pub fn register_native(name: &str, capsule: &Bound<'_, PyAny>) -> PyResult<()> {
    validate_name(name).map_err(PyAttnrsError)?;
    let Ok(capsule) = capsule.cast::<PyCapsule>() else {
        let got = capsule.get_type().name()?.to_string();
        return Err(PyTypeError::new_err(format!(
            "capsule: expected a PyCapsule named '{}' holding an AttnKernelV1, got {got}",
            KERNEL_CAPSULE_NAME.to_string_lossy()
        )));
    };
    let found = capsule.name()?;
    // SAFETY: the name of a live capsule is a valid C string while the capsule lives (we hold it).
    let found: Option<&CStr> = found.map(|n| unsafe { n.as_cstr() });
    if found != Some(KERNEL_CAPSULE_NAME) {
        let got = found.map_or_else(
            || "an unnamed capsule".to_owned(),
            |n| format!("a capsule named '{}'", n.to_string_lossy()),
        );
        let expected = format!(
            "a capsule named '{}' (ABI version {})",
            KERNEL_CAPSULE_NAME.to_string_lossy(),
            attnrs_abi::ATTNRS_ABI_VERSION
        );
        return Err(PyAttnrsError(Error::value("capsule", expected, got)).into());
    }
    let table = capsule.pointer_checked(Some(KERNEL_CAPSULE_NAME))?;
    let owner: Box<dyn std::any::Any + Send + Sync> = Box::new(capsule.clone().unbind());
    // SAFETY: a capsule named "attnrs.kernel.v1" holds a `*const AttnKernelV1` by the ABI contract; the header
    // is checked before the rest is read, and the capsule (owner of the table) is kept alive with the kernel.
    let kernel = unsafe { AbiKernel::from_raw(table.as_ptr().cast(), Some(owner)) }
        .map_err(PyAttnrsError)?;
    register_kernel(name, Arc::new(kernel)).map_err(PyAttnrsError)?;
    Ok(())
}

/// Names of the registered native kernels, in registration order (the built-in "attnrs" first).
#[pyfunction]
pub fn native_kernels() -> Vec<String> {
    kernels().keys()
}

/// Removes the native kernel `name`; returns whether it was registered.
#[pyfunction]
pub fn remove_native(name: &str) -> bool {
    kernels().remove(name).is_some()
}

/// What the native kernel `name` declares: the registry's capability keys plus `features` (optional inputs)
/// and `origin`.
#[pyfunction]
pub fn native_info<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
    let kernel = kernels().lookup(name).map_err(PyAttnrsError)?;
    let d = capabilities_to_dict(py, kernel.capabilities())?;
    let f = kernel.features();
    let features: Vec<&str> = [
        (f.softcap, "softcap"),
        (f.sinks, "sinks"),
        (f.bias, "bias"),
        (f.gqa, "gqa"),
    ]
    .into_iter()
    .filter_map(|(on, n)| on.then_some(n))
    .collect();
    d.set_item("features", PyList::new(py, features)?)?;
    d.set_item("origin", kernel.origin())?;
    Ok(d)
}
