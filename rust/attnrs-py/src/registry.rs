//! `attnrs._attnrs.Registry`: the storage behind `AttentionInterface` and `AttentionMaskInterface`.
//!
//! A frozen pyclass around the core's lock-protected ordered map, so many Python threads can register and
//! look up at once. It behaves like a `dict` of name -> callable (the Python `GeneralInterface` layers the
//! global/local semantics of transformers on top of two of these). Validation happens before anything is
//! stored, so a failed registration leaves the registry unchanged.

use std::sync::Arc;

use attnrs_core::Error;
use attnrs_core::registry::{Capabilities, MaskKind, Registry, validate_name};
use attnrs_core::tensor::DType;
use pyo3::exceptions::{PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::PyAttnrsError;

/// One registered entry: the callable Python sees, plus what it can do (None: not declared).
#[derive(Debug, Clone)]
struct Entry {
    value: Arc<Py<PyAny>>,
    capabilities: Option<Capabilities>,
}

/// A thread-safe, insertion-ordered mapping of names to attention callables with their capabilities.
#[pyclass(frozen, name = "Registry", module = "attnrs._attnrs")]
#[derive(Debug, Default)]
pub struct PyRegistry {
    entries: Registry<Entry>,
}

fn name_of<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<&'a Bound<'a, PyString>> {
    key.cast::<PyString>().map_err(|_| {
        let got = key
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("name: expected a str, got {got}"))
    })
}

fn dtype_from_name(name: &str) -> Result<DType, Error> {
    let short = name.strip_prefix("torch.").unwrap_or(name);
    Ok(match short {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "bfloat16" => DType::BF16,
        "float16" | "half" => DType::F16,
        _ => {
            return Err(Error::value(
                "capabilities['dtypes']",
                "float32, float64, bfloat16 or float16",
                name,
            ));
        }
    })
}

fn mask_kind_from_name(name: &str) -> Result<MaskKind, Error> {
    [
        MaskKind::None,
        MaskKind::Dense,
        MaskKind::BlockSparse,
        MaskKind::Expression,
    ]
    .into_iter()
    .find(|k| k.name() == name)
    .ok_or_else(|| {
        Error::value(
            "capabilities['mask_kinds']",
            "'none', 'dense', 'block_sparse' or 'expression'",
            name,
        )
    })
}

/// Parses `{"devices": [...], "dtypes": [...], "mask_kinds": [...], "backward": bool, "lse": bool}`.
fn capabilities_from_dict(d: &Bound<'_, PyDict>) -> PyResult<Capabilities> {
    const KNOWN: [&str; 5] = ["devices", "dtypes", "mask_kinds", "backward", "lse"];
    let mut caps = Capabilities::default();
    for (key, value) in d.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "devices" => caps.devices = value.extract()?,
            "dtypes" => {
                let names: Vec<String> = value.extract()?;
                caps.dtypes = names
                    .iter()
                    .map(|n| dtype_from_name(n))
                    .collect::<Result<_, _>>()
                    .map_err(PyAttnrsError)?;
            }
            "mask_kinds" => {
                let names: Vec<String> = value.extract()?;
                caps.mask_kinds = names
                    .iter()
                    .map(|n| mask_kind_from_name(n))
                    .collect::<Result<_, _>>()
                    .map_err(PyAttnrsError)?;
            }
            "backward" => caps.backward = value.extract()?,
            "lse" => caps.lse = value.extract()?,
            other => {
                let err = Error::value(
                    "capabilities",
                    format!("keys among {KNOWN:?}"),
                    format!("'{other}'"),
                );
                return Err(PyAttnrsError(err).into());
            }
        }
    }
    Ok(caps)
}

/// The dict form of `caps` (the keys `capabilities_from_dict` reads).
pub fn capabilities_to_dict<'py>(
    py: Python<'py>,
    caps: &Capabilities,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("devices", PyList::new(py, &caps.devices)?)?;
    let dtypes: Vec<&str> = caps.dtypes.iter().map(|t| t.torch_name()).collect();
    d.set_item("dtypes", PyList::new(py, dtypes)?)?;
    let kinds: Vec<&str> = caps.mask_kinds.iter().map(|k| k.name()).collect();
    d.set_item("mask_kinds", PyList::new(py, kinds)?)?;
    d.set_item("backward", caps.backward)?;
    d.set_item("lse", caps.lse)?;
    Ok(d)
}

impl PyRegistry {
    fn checked_entry(
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        capabilities: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(String, Entry)> {
        let name = name_of(key)?.to_str()?.to_owned();
        validate_name(&name).map_err(PyAttnrsError)?;
        if !value.is_callable() {
            let got = value.get_type().name()?.to_string();
            return Err(PyTypeError::new_err(format!(
                "value for '{name}': expected a callable attention or mask function, got {got}"
            )));
        }
        let capabilities = capabilities.map(capabilities_from_dict).transpose()?;
        Ok((
            name,
            Entry {
                value: Arc::new(value.clone().unbind()),
                capabilities,
            },
        ))
    }
}

#[pymethods]
impl PyRegistry {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn __getitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let found = name_of(key)
            .ok()
            .and_then(|n| n.to_str().ok().and_then(|n| self.entries.get(n)));
        match found {
            Some(entry) => Ok(entry.value.clone_ref(py)),
            None => Err(PyKeyError::new_err(key.clone().unbind())),
        }
    }

    fn __setitem__(&self, key: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let (name, entry) = Self::checked_entry(key, value, None)?;
        self.entries.insert(&name, entry).map_err(PyAttnrsError)?;
        Ok(())
    }

    fn __delitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let removed = name_of(key)
            .ok()
            .and_then(|n| n.to_str().ok().and_then(|n| self.entries.remove(n)));
        removed
            .map(|_| ())
            .ok_or_else(|| PyKeyError::new_err(key.clone().unbind()))
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> bool {
        name_of(key)
            .ok()
            .and_then(|n| n.to_str().ok().map(|n| self.entries.contains(n)))
            .unwrap_or(false)
    }

    fn __len__(&self) -> usize {
        self.entries.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.entries.keys())?
            .try_iter()
            .map(|it| it.into_any())
    }

    fn __repr__(&self) -> String {
        format!("Registry({:?})", self.entries.keys())
    }

    /// Names in insertion order.
    fn keys(&self) -> Vec<String> {
        self.entries.keys()
    }

    /// Registered callables in insertion order.
    fn values(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.entries
            .items()
            .into_iter()
            .map(|(_, e)| e.value.clone_ref(py))
            .collect()
    }

    /// `(name, callable)` pairs in insertion order.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.entries
            .items()
            .into_iter()
            .map(|(k, e)| {
                PyTuple::new(
                    py,
                    [k.into_pyobject(py)?.into_any(), e.value.bind(py).clone()],
                )
            })
            .collect()
    }

    #[pyo3(signature = (key, default=None))]
    fn get(&self, py: Python<'_>, key: &Bound<'_, PyAny>, default: Option<Py<PyAny>>) -> Py<PyAny> {
        match name_of(key)
            .ok()
            .and_then(|n| n.to_str().ok().and_then(|n| self.entries.get(n)))
        {
            Some(entry) => entry.value.clone_ref(py),
            None => default.unwrap_or_else(|| py.None()),
        }
    }

    /// Removes `key` and returns its callable; `default` if given and missing, else KeyError.
    #[pyo3(signature = (key, *default))]
    fn pop(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        default: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<PyAny>> {
        let removed = name_of(key)
            .ok()
            .and_then(|n| n.to_str().ok().and_then(|n| self.entries.remove(n)));
        match (removed, default.len()) {
            (Some(entry), _) => Ok(entry.value.clone_ref(py)),
            (None, 0) => Err(PyKeyError::new_err(key.clone().unbind())),
            (None, 1) => Ok(default.get_item(0)?.unbind()),
            (None, n) => Err(PyTypeError::new_err(format!(
                "pop expected at most 2 arguments, got {}",
                n + 1
            ))),
        }
    }

    fn clear(&self) {
        self.entries.clear();
    }

    /// Stores `value` under `key` (validated first: nothing is stored if anything is wrong).
    #[pyo3(signature = (key, value, capabilities=None))]
    fn register(
        &self,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        capabilities: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let (name, entry) = Self::checked_entry(key, value, capabilities)?;
        self.entries.insert(&name, entry).map_err(PyAttnrsError)?;
        Ok(())
    }

    /// The declared capabilities of `key` as a dict, or None when none were declared.
    fn capabilities<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let name = name_of(key)?.to_str()?;
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))?;
        entry
            .capabilities
            .as_ref()
            .map(|c| capabilities_to_dict(py, c))
            .transpose()
    }
}
