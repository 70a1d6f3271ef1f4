//! The one dtype × ISA selection. [`Backend::resolve`] turns a requested [`Backend`] into one this CPU has;
//! [`select`] maps (dtype, resolved backend) to a micro-kernel family `K` and element type `T` and calls the
//! phase's generic code with them; [`Isa::enter`] runs a phase's loop compiled inside `K`'s target features.
//! Forward (prefill, split-KV decode) and backward all go through here: adding an ISA is one row of
//! [`select`], one `isa!` line and its micro-kernel in [`super::gemm`].

use half::{bf16, f16};

use super::gemm::{Kern, Portable};
use crate::isa::Isa as Cpu;
use crate::tensor::{DType, Float};
use crate::{Error, Result};

/// Which micro-kernels to run. [`Backend::Auto`] picks the best the CPU has; the others force a path and
/// fail with [`Error::Unsupported`] when the CPU lacks it. f64 inputs always run the portable f64 path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The best available path (AVX-512 BF16 for bf16 inputs, then AVX-512F, then AVX2+FMA, then portable).
    #[default]
    Auto,
    /// Plain Rust, no `target_feature`: correct on every CPU.
    Portable,
    /// AVX2 + FMA, f32 accumulation.
    Avx2,
    /// AVX-512F, f32 accumulation (bf16 inputs are widened to f32).
    Avx512,
    /// AVX-512 BF16 dot products for bf16 inputs (other dtypes run [`Backend::Avx512`]).
    Avx512Bf16,
}

impl Backend {
    /// The concrete path `self` resolves to on this CPU for inputs of `dtype`.
    pub fn resolve(self, dtype: DType) -> Result<Backend> {
        let isa = Cpu::get();
        let avx2 = isa.avx2 && isa.fma;
        let missing =
            |what: &str| Err(Error::Unsupported(format!("the {what} kernel on this CPU")));
        let chosen = match self {
            Backend::Auto if isa.avx512bf16 && dtype == DType::BF16 => Backend::Avx512Bf16,
            Backend::Auto if isa.avx512f => Backend::Avx512,
            Backend::Auto if avx2 => Backend::Avx2,
            Backend::Auto | Backend::Portable => Backend::Portable,
            Backend::Avx2 if avx2 => Backend::Avx2,
            Backend::Avx512 if isa.avx512f => Backend::Avx512,
            Backend::Avx512Bf16 if isa.avx512bf16 && dtype == DType::BF16 => Backend::Avx512Bf16,
            Backend::Avx512Bf16 if isa.avx512bf16 => Backend::Avx512,
            Backend::Avx2 => return missing("AVX2+FMA"),
            Backend::Avx512 => return missing("AVX-512F"),
            Backend::Avx512Bf16 => return missing("AVX-512 BF16"),
        };
        Ok(if dtype == DType::F64 {
            Backend::Portable
        } else {
            chosen
        })
    }
}

/// A phase's loop, to be compiled inside an ISA's target features. Every impl marks [`Body::run`]
/// `#[inline(always)]`, so the loop (and the `#[inline(always)]` generic code it calls) is compiled for the
/// ISA [`Isa::enter`] runs it under.
pub(crate) trait Body {
    type Out;
    fn run(self) -> Self::Out;
}

/// A micro-kernel family and the target features its loops are compiled with.
pub(crate) trait Isa: Kern {
    /// Runs `body` compiled with this family's target features.
    ///
    /// # Safety
    /// The CPU must support those features (true of every family [`select`] picks).
    unsafe fn enter<B: Body>(body: B) -> B::Out;
}

macro_rules! isa {
    ($kern:ty $(, $feature:literal)?) => {
        impl Isa for $kern {
            #[inline(always)]
            unsafe fn enter<B: Body>(body: B) -> B::Out {
                $(#[target_feature(enable = $feature)])?
                unsafe fn go<B: Body>(body: B) -> B::Out {
                    body.run()
                }
                // SAFETY: the caller guarantees the CPU has the features `go` is compiled for.
                unsafe { go(body) }
            }
        }
    };
}

isa!(Portable<f32>);
isa!(Portable<f64>);
#[cfg(target_arch = "x86_64")]
isa!(super::gemm::Avx2F32, "avx2,fma");
#[cfg(target_arch = "x86_64")]
isa!(super::gemm::Avx512F32, "avx512f,avx512bw,avx512vl,avx2,fma");
#[cfg(target_arch = "x86_64")]
isa!(
    super::gemm::Avx512Bf16,
    "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
);

/// Code generic over the micro-kernel family `K` and the input element type `T`.
pub(crate) trait Select {
    type Out;
    /// Called only with a `K` whose features this CPU has.
    fn with<K: Isa, T: Float>(self) -> Self::Out;
}

/// The dtype × ISA table: calls `call` with the family that `backend` (already [`Backend::resolve`]d for
/// `dtype`) names. f64 always runs the portable f64 family; the others accumulate in f32.
pub(crate) fn select<S: Select>(dtype: DType, backend: Backend, call: S) -> S::Out {
    match dtype {
        DType::F64 => call.with::<Portable<f64>, f64>(),
        DType::F32 => by_backend::<f32, S>(backend, call),
        DType::BF16 => by_backend::<bf16, S>(backend, call),
        _ => by_backend::<f16, S>(backend, call),
    }
}

fn by_backend<T: Float, S: Select>(backend: Backend, call: S) -> S::Out {
    #[cfg(target_arch = "x86_64")]
    {
        use super::gemm::{Avx2F32, Avx512Bf16, Avx512F32};
        // `backend` came from `Backend::resolve`, which checked the CPU's features.
        match backend {
            // bf16 inputs: `vdpbf16ps` products (f32 accumulation).
            Backend::Avx512Bf16 if T::DTYPE == DType::BF16 => return call.with::<Avx512Bf16, T>(),
            Backend::Avx512 | Backend::Avx512Bf16 => return call.with::<Avx512F32, T>(),
            Backend::Avx2 => return call.with::<Avx2F32, T>(),
            _ => {}
        }
    }
    let _ = backend;
    call.with::<Portable<f32>, T>()
}
