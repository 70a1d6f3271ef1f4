//! `attnrs._attnrs`: the compiled half of attnrs. It converts Python arguments into plain Rust data,
//! validates them, releases the GIL, calls `attnrs-core` and converts back. It holds no algorithm.

mod attention;
mod dlpack;
mod door;
mod errors;
mod masks;
mod native;
mod registry;

use pyo3::prelude::*;

#[pymodule]
mod _attnrs {
    use attnrs_core::isa::Isa;
    use attnrs_core::tensor;
    use pyo3::prelude::*;

    use crate::dlpack;
    use crate::door::run_detached;

    #[pymodule_export]
    use crate::attention::{
        attention_backward, attention_forward, dropout_keep_pattern, native_attention_forward,
    };
    #[pymodule_export]
    use crate::masks::{PyBitmapBuilder, PyBlockLayout, PyMaskExpr};
    #[pymodule_export]
    use crate::native::{
        _test_capsule, native_info, native_kernels, register_native, remove_native,
    };
    #[pymodule_export]
    use crate::registry::PyRegistry;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }

    /// CPU features the kernels can use on this machine, best first (e.g. ["avx512_bf16", "avx512f", ...]).
    #[pyfunction]
    fn cpu_features() -> Vec<&'static str> {
        Isa::get().names()
    }

    /// The SIMD path the kernels take here: "avx512", "avx2", "neon" or "portable".
    #[pyfunction]
    fn simd_path() -> &'static str {
        Isa::get().best()
    }

    /// Copies `src` into `dst` element by element through DLPack views (tests of the tensor bridge).
    #[pyfunction]
    fn _strided_copy(
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
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
}
