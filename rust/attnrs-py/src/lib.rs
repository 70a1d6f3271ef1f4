//! `attnrs._attnrs`: the compiled half of attnrs. It converts Python arguments into plain Rust data,
//! validates them, releases the GIL, calls `attnrs-core` and converts back. It holds no algorithm.
//!
//! Modules: `attention` (the forward, native forward, backward and dropout-pattern calls), `operand` (the
//! packed mask program those calls take), `masks` (mask expressions, dense fills, block layouts), `native`
//! and `registry` (the kernel table and the Python-side registries), `dlpack` (zero-copy tensor import),
//! `door` (the one way into heavy work: GIL released, panics caught), `errors` (core errors as Python
//! exceptions) and, with the `test-hooks` feature only, `test_hooks` (entry points for the tests).

mod attention;
mod dlpack;
mod door;
mod errors;
mod masks;
mod native;
mod operand;
mod registry;
#[cfg(feature = "test-hooks")]
mod test_hooks;

use pyo3::prelude::*;

#[pymodule]
mod _attnrs {
    use attnrs_core::isa::Isa;
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::attention::{
        attention_backward, attention_forward, dropout_keep_pattern, native_attention_forward,
        varlen_attention_forward,
    };
    #[pymodule_export]
    use crate::masks::{PyBitmapBuilder, PyBlockLayout, PyMaskExpr};
    #[pymodule_export]
    use crate::native::{native_info, native_kernels, register_native, remove_native};
    #[pymodule_export]
    use crate::operand::{mask_operand, operand_mask};
    #[pymodule_export]
    use crate::registry::PyRegistry;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // A child forked after this never enters torch's OpenMP team (its threads stay in the parent).
        attnrs_core::threads::watch_forks();
        #[cfg(feature = "test-hooks")]
        crate::test_hooks::register(m)?;
        Ok(())
    }

    /// CPU features the kernels can use on this machine, best first (e.g. ["avx512_bf16", "avx512f", ...]).
    #[pyfunction]
    fn cpu_features() -> Vec<&'static str> {
        Isa::get().names()
    }

    /// The most bytes one attnrs request may need here (physical memory, cgroup and address-space limits):
    /// sizes beyond it are refused before anything is allocated.
    #[pyfunction]
    fn memory_budget() -> usize {
        attnrs_core::memory::budget()
    }

    /// `(path, reason)`: the micro-kernels `backend="auto"` runs on this CPU for inputs of `dtype` ("float32",
    /// "float64", "bfloat16" or "float16"), e.g. `("avx2", "AVX2+FMA, f32 (this CPU has no AVX-512)")`, following
    /// `ATTNRS_ISA` when it is set (an invalid value, or a path this CPU lacks, raises).
    #[pyfunction]
    fn kernel_path(py: Python<'_>, dtype: &str) -> PyResult<(&'static str, String)> {
        use attnrs_core::kernel::Backend;
        use attnrs_core::tensor::DType;
        let dtype = match dtype {
            "float32" => DType::F32,
            "float64" => DType::F64,
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "kernel_path: dtype must be \"float32\", \"float64\", \"bfloat16\" or \"float16\", got {dtype:?}"
                )));
            }
        };
        let (path, why) = Backend::auto_path(dtype).map_err(|e| crate::errors::to_pyerr(py, &e))?;
        Ok((path.name(), why))
    }

    /// The SIMD path the kernels take here: "avx512", "avx2", "neon" or "portable".
    #[pyfunction]
    fn simd_path() -> &'static str {
        Isa::get().best()
    }
}
