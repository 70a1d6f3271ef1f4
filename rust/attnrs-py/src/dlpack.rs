//! Zero-copy import of tensors through DLPack.
//!
//! A tensor is asked for a versioned capsule (`__dlpack__(max_version=(1, 0))`, torch >= 2.9) and, if the
//! producer is older, a legacy one. A plain CPU `torch.Tensor` gets its capsule from torch's C exporter
//! directly: `Tensor.__dlpack__` is a Python function whose checks cost ~3 µs a tensor, and a decode call
//! imports six. DLPack has no negative bit, so a neg view is resolved (input) or refused (output) first. The capsule is consumed exactly once: it is renamed to
//! `used_dltensor[_versioned]` (so its destructor leaves the tensor alone) and the producer's deleter is
//! called exactly once, when the [`Imported`] value is dropped.

use std::ffi::{CStr, c_char};
use std::ptr::NonNull;

use attnrs_abi::{
    DLDataType, DLManagedTensor, DLManagedTensorVersioned, DLPACK_FLAG_BITMASK_READ_ONLY, DLTensor,
    device_type, type_code,
};
use attnrs_core::Error;
use attnrs_core::tensor::{DType, TensorView};
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCapsule, PyCapsuleMethods, PyDict, PyType};

use crate::errors::{PyAttnrsError, to_pyerr};

const VERSIONED: &CStr = c"dltensor_versioned";
const USED_VERSIONED: &CStr = c"used_dltensor_versioned";
const LEGACY: &CStr = c"dltensor";
const USED_LEGACY: &CStr = c"used_dltensor";

/// The producer's handle; its deleter runs once, on drop.
#[derive(Debug)]
enum Owner {
    Versioned(NonNull<DLManagedTensorVersioned>),
    Legacy(NonNull<DLManagedTensor>),
}

// SAFETY: the handle is only used to call the producer's deleter once. torch's deleter drops a reference to
// the C++ tensor, which is thread-safe; the pointers are never dereferenced concurrently.
unsafe impl Send for Owner {}

impl Drop for Owner {
    fn drop(&mut self) {
        match *self {
            Owner::Versioned(p) => {
                // SAFETY: `p` came from a capsule we consumed (renamed), so we own it and call its deleter
                // exactly once, here.
                unsafe {
                    if let Some(deleter) = (*p.as_ptr()).deleter {
                        deleter(p.as_ptr());
                    }
                }
            }
            Owner::Legacy(p) => {
                // SAFETY: as above, for the legacy struct.
                unsafe {
                    if let Some(deleter) = (*p.as_ptr()).deleter {
                        deleter(p.as_ptr());
                    }
                }
            }
        }
    }
}

/// A tensor borrowed from Python without a copy. Keep it alive while its view is used.
#[derive(Debug)]
pub struct Imported {
    pub view: TensorView,
    pub read_only: bool,
    _owner: Owner,
}

fn dtype_of(dt: DLDataType, arg: &str) -> Result<DType, Error> {
    let found = match (dt.code, dt.bits, dt.lanes) {
        (type_code::FLOAT, 32, 1) => Some(DType::F32),
        (type_code::FLOAT, 64, 1) => Some(DType::F64),
        (type_code::FLOAT, 16, 1) => Some(DType::F16),
        (type_code::BFLOAT, 16, 1) => Some(DType::BF16),
        (type_code::BOOL, 8, 1) => Some(DType::Bool),
        (type_code::UINT, 8, 1) => Some(DType::U8),
        (type_code::INT, 32, 1) => Some(DType::I32),
        (type_code::INT, 64, 1) => Some(DType::I64),
        _ => None,
    };
    found.ok_or_else(|| {
        Error::dtype(
            arg,
            "float32, float64, bfloat16, float16, bool, uint8, int32 or int64",
            format!(
                "DLPack type code {} with {} bits x {} lanes",
                dt.code, dt.bits, dt.lanes
            ),
        )
    })
}

/// Builds a view of `t`.
///
/// # Safety
/// `t` must be a valid `DLTensor` whose memory stays alive as long as the returned view is used.
unsafe fn view_of(t: &DLTensor, arg: &str) -> Result<TensorView, Error> {
    if t.device.device_type != device_type::CPU {
        return Err(Error::device(
            arg,
            "a CPU tensor",
            format!("DLPack device type {}", t.device.device_type),
        ));
    }
    let dtype = dtype_of(t.dtype, arg)?;
    let ndim =
        usize::try_from(t.ndim).map_err(|_| Error::shape(arg, "ndim >= 0", t.ndim.to_string()))?;
    let dims: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: DLPack guarantees `shape` points to `ndim` int64 values.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let mut shape = Vec::with_capacity(ndim);
    for &d in dims {
        shape.push(
            usize::try_from(d)
                .map_err(|_| Error::shape(arg, "non-negative sizes", format!("{dims:?}")))?,
        );
    }
    let strides: Vec<isize> = if t.strides.is_null() || ndim == 0 {
        // Null strides mean compact row-major.
        let mut s = vec![1isize; ndim];
        for d in (0..ndim.saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1].max(1) as isize;
        }
        s
    } else {
        // SAFETY: DLPack guarantees `strides`, when non-null, points to `ndim` int64 values.
        unsafe { std::slice::from_raw_parts(t.strides, ndim) }
            .iter()
            .map(|&s| s as isize)
            .collect()
    };
    let offset = usize::try_from(t.byte_offset)
        .map_err(|_| Error::layout(arg, "a byte offset", "overflow"))?;
    // SAFETY: `data + byte_offset` is the first element by the DLPack contract (the producer keeps it valid).
    let ptr = unsafe { t.data.cast::<u8>().add(offset) };
    if !(ptr as usize).is_multiple_of(dtype.size()) && shape.iter().product::<usize>() != 0 {
        return Err(Error::layout(
            arg,
            format!("data aligned to {} bytes", dtype.size()),
            "a misaligned pointer",
        ));
    }
    // SAFETY: the DLPack producer guarantees every strided element is addressable while the tensor lives.
    unsafe { TensorView::new(ptr, dtype, shape, strides) }.map_err(|e| match e {
        Error::Layout { expected, got, .. } => Error::layout(arg, expected, got),
        other => other,
    })
}

fn device_name(obj: &Bound<'_, PyAny>) -> Option<String> {
    let device = obj.getattr("device").ok()?;
    let kind: String = device.getattr("type").ok()?.extract().ok()?;
    if kind == "cpu" {
        return None;
    }
    Some(device.str().map(|s| s.to_string()).unwrap_or(kind))
}

/// What [`plain_tensor_capsule`] needs from torch, looked up once per process.
struct TorchExporter {
    tensor_type: Py<PyType>,
    strided: Py<PyAny>,
    has_torch_function_unary: Py<PyAny>,
    to_dlpack_versioned: Py<PyAny>,
}

fn torch_exporter(py: Python<'_>) -> Option<&'static TorchExporter> {
    static CELL: PyOnceLock<Option<TorchExporter>> = PyOnceLock::new();
    CELL.get_or_init(py, || {
        let lookup = || -> PyResult<TorchExporter> {
            let torch = py.import("torch")?;
            let c = torch.getattr("_C")?;
            Ok(TorchExporter {
                tensor_type: torch.getattr("Tensor")?.cast_into::<PyType>()?.unbind(),
                strided: torch.getattr("strided")?.unbind(),
                has_torch_function_unary: c.getattr("_has_torch_function_unary")?.unbind(),
                to_dlpack_versioned: c.getattr("_to_dlpack_versioned")?.unbind(),
            })
        };
        // A torch without these private names (or no torch at all) takes the general path.
        lookup().ok()
    })
    .as_ref()
}

/// The versioned capsule of a plain CPU tensor, from torch's C exporter, or `None` when `obj` needs the
/// general path: not exactly `torch.Tensor`, a torch function mode active, requires grad, the conjugate bit
/// set, a layout other than strided, or not on the CPU. These are the conditions `Tensor.__dlpack__` checks
/// before it calls the same exporter, so both paths give the same capsule.
fn plain_tensor_capsule<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = obj.py();
    let Some(torch) = torch_exporter(py) else {
        return Ok(None);
    };
    if !obj.get_type().is(torch.tensor_type.bind(py))
        || torch
            .has_torch_function_unary
            .bind(py)
            .call1((obj,))?
            .is_truthy()?
    {
        return Ok(None);
    }
    let plain = obj.getattr(intern!(py, "is_cpu"))?.is_truthy()?
        && !obj.getattr(intern!(py, "requires_grad"))?.is_truthy()?
        && !obj.call_method0(intern!(py, "is_conj"))?.is_truthy()?
        && obj
            .getattr(intern!(py, "layout"))?
            .is(torch.strided.bind(py));
    if !plain {
        return Ok(None);
    }
    torch.to_dlpack_versioned.bind(py).call1((obj,)).map(Some)
}

/// Imports `obj` (a torch tensor or any DLPack producer) for reading; `arg` names it in errors.
/// Tensors that require grad are detached first (DLPack refuses them otherwise).
pub fn import(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Imported> {
    // A neg view (`z.conj().imag`, `torch._neg_view`) would be read as its negation: read a resolved copy.
    if is_neg_view(obj) {
        return import_without_neg_bit(&obj.call_method0("resolve_neg")?, arg);
    }
    import_without_neg_bit(obj, arg)
}

/// [`import`] of an object known not to be a neg view.
fn import_without_neg_bit(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Imported> {
    let capsule = match plain_tensor_capsule(obj)? {
        Some(capsule) => capsule,
        None => producer_capsule(obj, arg)?,
    };
    let capsule = capsule.cast_into::<PyCapsule>().map_err(PyErr::from)?;
    consume(&capsule, arg)
}

/// The capsule from `obj.__dlpack__`, after refusing what is not a CPU DLPack producer.
fn producer_capsule<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    if let Some(device) = device_name(obj) {
        return Err(to_pyerr(
            py,
            &Error::device(arg, "a CPU tensor", format!("a tensor on {device}")),
        ));
    }
    if !obj.hasattr("__dlpack__")? {
        let type_name = obj.get_type().name()?.to_string();
        return Err(to_pyerr(
            py,
            &Error::dtype(arg, "a torch.Tensor", type_name),
        ));
    }
    let detached;
    let obj = if obj
        .getattr("requires_grad")
        .and_then(|r| r.extract::<bool>())
        .unwrap_or(false)
    {
        detached = obj.call_method0("detach")?;
        &detached
    } else {
        obj
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item("max_version", (1, 0))?;
    match obj.call_method("__dlpack__", (), Some(&kwargs)) {
        Err(e) if e.is_instance_of::<PyTypeError>(py) => obj.call_method0("__dlpack__"),
        result => result,
    }
}

/// Whether `obj` is a torch tensor with the negative bit set (its memory holds the negation of its values).
fn is_neg_view(obj: &Bound<'_, PyAny>) -> bool {
    obj.call_method0(intern!(obj.py(), "is_neg"))
        .and_then(|r| r.is_truthy())
        .unwrap_or(false)
}

/// Imports `obj` as an output: it must be writable and must not address any element twice.
pub fn import_output(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Imported> {
    let fail =
        |expected: &str, got: &str| Err(PyAttnrsError(Error::layout(arg, expected, got)).into());
    if is_neg_view(obj) {
        return fail(
            "a tensor without the negative bit",
            "a neg view (call resolve_neg() first)",
        );
    }
    let imported = import_without_neg_bit(obj, arg)?;
    if imported.read_only {
        return fail("a writable tensor", "a read-only DLPack tensor");
    }
    if imported.view.has_internal_overlap() {
        return fail(
            "a tensor whose elements do not overlap",
            "an expanded or overlapping view (stride 0)",
        );
    }
    Ok(imported)
}

/// [`import`] of an optional argument (`None` or absent: `None`).
pub fn import_optional(obj: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<Imported>> {
    obj.filter(|o| !o.is_none())
        .map(|o| import(o, arg))
        .transpose()
}

/// [`import_output`] of an optional argument (`None` or absent: `None`).
pub fn import_output_optional(
    obj: Option<&Bound<'_, PyAny>>,
    arg: &str,
) -> PyResult<Option<Imported>> {
    obj.filter(|o| !o.is_none())
        .map(|o| import_output(o, arg))
        .transpose()
}

fn consume(capsule: &Bound<'_, PyCapsule>, arg: &str) -> PyResult<Imported> {
    let py = capsule.py();
    let name = capsule.name()?;
    // SAFETY: the name pointer of a live capsule is a valid C string for as long as the capsule lives.
    let name: Option<&CStr> = name.map(|n| unsafe { n.as_cstr() });
    let versioned = match name {
        Some(n) if n == VERSIONED => true,
        Some(n) if n == LEGACY => false,
        other => {
            let got = other
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "an unnamed capsule".into());
            return Err(to_pyerr(
                py,
                &Error::layout(arg, "a 'dltensor' capsule", format!("'{got}'")),
            ));
        }
    };
    let raw = capsule.pointer_checked(Some(if versioned { VERSIONED } else { LEGACY }))?;
    let used: &CStr = if versioned {
        USED_VERSIONED
    } else {
        USED_LEGACY
    };
    // SAFETY: the capsule is alive; renaming it marks it consumed, so its destructor won't call the deleter
    // and we must (Owner::drop). The name is a 'static C string.
    if unsafe { ffi::PyCapsule_SetName(capsule.as_ptr(), used.as_ptr() as *const c_char) } != 0 {
        return Err(PyErr::fetch(py));
    }
    if versioned {
        let managed = raw.cast::<DLManagedTensorVersioned>();
        let owner = Owner::Versioned(managed);
        // SAFETY: the capsule held a valid DLManagedTensorVersioned, now owned by `owner`.
        let m = unsafe { managed.as_ref() };
        if m.version.major != 1 {
            let got = format!("DLPack {}.{}", m.version.major, m.version.minor);
            return Err(to_pyerr(py, &Error::layout(arg, "DLPack 1.x", got)));
        }
        let read_only = m.flags & DLPACK_FLAG_BITMASK_READ_ONLY != 0;
        // SAFETY: `owner` keeps the tensor alive as long as the view (both live in `Imported`).
        let view = unsafe { view_of(&m.dl_tensor, arg) }.map_err(|e| to_pyerr(py, &e))?;
        Ok(Imported {
            view,
            read_only,
            _owner: owner,
        })
    } else {
        let managed = raw.cast::<DLManagedTensor>();
        let owner = Owner::Legacy(managed);
        // SAFETY: the capsule held a valid DLManagedTensor, now owned by `owner`.
        let m = unsafe { managed.as_ref() };
        // SAFETY: as above.
        let view = unsafe { view_of(&m.dl_tensor, arg) }.map_err(|e| to_pyerr(py, &e))?;
        Ok(Imported {
            view,
            read_only: false,
            _owner: owner,
        })
    }
}
