//! The one door into heavy work: detach from the interpreter, catch panics, map errors.

use std::panic::{AssertUnwindSafe, catch_unwind};

use attnrs_core::{Error, Result};
use pyo3::prelude::*;

use crate::errors::to_pyerr;

/// Runs `work` with the GIL released. A panic becomes an `attnrs.errors.InternalError`; a core error becomes
/// its typed exception. Inputs must already be plain Rust data (`Send`).
pub fn run_detached<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> Result<T> + Send,
) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(work)));
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(to_pyerr(py, &e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(to_pyerr(py, &Error::Internal(format!("panic: {what}"))))
        }
    }
}
