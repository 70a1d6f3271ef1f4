//! Core errors -> Python exceptions.
//!
//! The exception classes are declared once, in Python (`attnrs/errors.py`), because they need two bases
//! each (`ShapeError(AttnrsError, ValueError)`), which `create_exception!` cannot express. They are looked
//! up once and cached.

use attnrs_core::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// A core error on its way to Python (`?` converts it).
#[derive(Debug)]
pub struct PyAttnrsError(pub Error);

impl From<Error> for PyAttnrsError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

fn exception_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
) -> Bound<'py, PyType> {
    cell.import(py, "attnrs.errors", name)
        .cloned()
        .unwrap_or_else(|_| py.get_type::<PyRuntimeError>())
}

macro_rules! exception_classes {
    ($($fn_name:ident => $class:literal),* $(,)?) => {
        $(
            pub fn $fn_name(py: Python<'_>) -> Bound<'_, PyType> {
                static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
                exception_class(py, &CELL, $class)
            }
        )*
    };
}

exception_classes! {
    shape_error => "ShapeError",
    dtype_error => "DtypeError",
    device_error => "DeviceError",
    layout_error => "LayoutError",
    argument_error => "ArgumentError",
    unknown_name_error => "UnknownNameError",
    unsupported_error => "UnsupportedError",
    out_of_memory_error => "OutOfMemoryError",
    internal_error => "InternalError",
}

/// Builds the Python exception for `e`.
pub fn to_pyerr(py: Python<'_>, e: &Error) -> PyErr {
    let message = e.to_string();
    let class = match e {
        Error::Shape { .. } => shape_error(py),
        Error::Dtype { .. } => dtype_error(py),
        Error::Device { .. } => device_error(py),
        Error::Layout { .. } => layout_error(py),
        Error::Value { .. } => argument_error(py),
        Error::UnknownName { .. } => unknown_name_error(py),
        Error::Unsupported(_) => unsupported_error(py),
        Error::OutOfMemory { .. } => out_of_memory_error(py),
        Error::Internal(_) => internal_error(py),
        Error::Kernel { status, .. } => match *status {
            attnrs_abi::status::INVALID_ARGUMENT => argument_error(py),
            attnrs_abi::status::UNSUPPORTED => unsupported_error(py),
            _ => internal_error(py),
        },
    };
    PyErr::from_type(class, message)
}

impl From<PyAttnrsError> for PyErr {
    fn from(e: PyAttnrsError) -> Self {
        Python::attach(|py| to_pyerr(py, &e.0))
    }
}
