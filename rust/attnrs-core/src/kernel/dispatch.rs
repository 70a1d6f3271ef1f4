//! The one dtype × ISA selection. [`Backend::resolve`] turns a requested [`Backend`] into one this CPU has;
//! `select!` maps (dtype, resolved backend) to a micro-kernel family `K` and element type `T` and calls the
//! phase's generic code with them; `for_each_isa!` lists the families and their target features, from
//! which every per-ISA entry point is generated (each phase's `#[target_feature]` trampolines, and
//! [`Isa::enter`] for a loop given as a [`Body`]). Forward (prefill, split-KV decode) and backward all go
//! through here: adding an ISA is one row of `select!`, one of `for_each_isa!` and its micro-kernel file in
//! [`super::gemm`].

use super::F32Precision;
use super::gemm::Kern;
use crate::isa::{Amx, Isa as Cpu};
use crate::tensor::DType;
use crate::{Error, Result};
use std::sync::OnceLock;

/// Which micro-kernels to run. [`Backend::Auto`] picks the best the CPU has; the others force a path and
/// fail with [`Error::Unsupported`] when the CPU lacks it. f64 inputs always run the portable f64 path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The best available path (AMX for bf16 inputs, then AVX-512 BF16, then AVX-512F, then AVX2+FMA,
    /// then portable).
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
    /// AMX tiles (`tdpbf16ps`) for bf16 inputs (other dtypes run [`Backend::Avx512`]). Needs the CPU's
    /// `amx_tile`/`amx_bf16` and the OS's permission ([`crate::isa::Amx::Ready`]).
    Amx,
    /// The AMX path's blocking over a scalar model of the tile instructions, for bf16 inputs (other dtypes
    /// run what [`Backend::Auto`] picks): how the tile logic is tested on CPUs without AMX. Slow; never
    /// chosen by `Auto`.
    AmxEmulated,
    /// f32 inputs as bf16×3 on AMX tiles (`hi·hi + hi·lo + lo·hi`), what f32 runs under
    /// [`F32Precision::High`] where [`Backend::Amx`] runs; other dtypes run [`Backend::Amx`]. Chosen by
    /// [`Backend::resolve_for`], not by `ATTNRS_ISA`.
    AmxBf16x3,
    /// [`Backend::AmxBf16x3`] on the emulated tiles (what `"high"` runs under `ATTNRS_ISA=amx_emulated`).
    AmxEmulatedBf16x3,
}

impl Backend {
    /// The concrete path `self` resolves to on this CPU for inputs of `dtype`. [`Backend::Auto`] follows
    /// `ATTNRS_ISA` when it is set (see [`Backend::from_env`]).
    pub fn resolve(self, dtype: DType) -> Result<Backend> {
        if self == Backend::Auto {
            match Backend::from_env() {
                Ok(None) => {}
                Ok(Some(forced)) => {
                    return forced.resolve_on_cpu(dtype).map_err(|e| {
                        Error::Unsupported(format!(
                            "ATTNRS_ISA={} on this CPU: {} (unset ATTNRS_ISA, or see `attnrs info` for the \
                             paths this CPU has)",
                            forced.name(),
                            match e {
                                Error::Unsupported(why) => why,
                                other => other.to_string(),
                            }
                        ))
                    });
                }
                Err(e) => return Err(e),
            }
        }
        self.resolve_on_cpu(dtype)
    }

    /// [`Backend::resolve`] for a call whose f32 inputs follow `precision`. Under [`F32Precision::Medium`],
    /// f32 runs the bf16 path `self` resolves to for bf16 when that path has fast bf16 products (AMX, real or
    /// emulated, or AVX-512 BF16), rounding the inputs to bf16 as it packs them. Under [`F32Precision::High`],
    /// f32 runs bf16×3 where that path is AMX ([`Backend::AmxBf16x3`]); on AVX-512 BF16 three bf16 products
    /// cost more than one f32 FMA, so f32 stays exact there, as torch's rule says (a lower precision only
    /// where a fast algorithm exists).
    pub fn resolve_for(self, dtype: DType, precision: F32Precision) -> Result<Backend> {
        if dtype == DType::F32 && precision != F32Precision::Highest {
            let bf16 = self.resolve(DType::BF16)?;
            let chosen = match (precision, bf16) {
                (F32Precision::High, Backend::Amx) => Some(Backend::AmxBf16x3),
                (F32Precision::High, Backend::AmxEmulated) => Some(Backend::AmxEmulatedBf16x3),
                (
                    F32Precision::Medium,
                    Backend::Amx | Backend::AmxEmulated | Backend::Avx512Bf16,
                ) => Some(bf16),
                _ => None,
            };
            if let Some(chosen) = chosen {
                return Ok(chosen);
            }
        }
        self.resolve(dtype)
    }

    /// [`Backend::resolve`] without `ATTNRS_ISA`.
    fn resolve_on_cpu(self, dtype: DType) -> Result<Backend> {
        let isa = Cpu::get();
        let avx2 = isa.avx2 && isa.fma;
        let amx = isa.amx == Amx::Ready;
        let bf16 = dtype == DType::BF16;
        let missing = |what: &str| {
            Err(Error::Unsupported(format!(
                "the {what} kernel needs what this CPU lacks"
            )))
        };
        let chosen = match self {
            Backend::Auto if amx && bf16 => Backend::Amx,
            Backend::Auto if isa.avx512bf16 && bf16 => Backend::Avx512Bf16,
            Backend::Auto if isa.avx512f => Backend::Avx512,
            Backend::Auto if avx2 => Backend::Avx2,
            Backend::Auto | Backend::Portable => Backend::Portable,
            Backend::Avx2 if avx2 => Backend::Avx2,
            Backend::Avx512 if isa.avx512f => Backend::Avx512,
            Backend::Avx512Bf16 if isa.avx512bf16 && bf16 => Backend::Avx512Bf16,
            Backend::Avx512Bf16 if isa.avx512bf16 => Backend::Avx512,
            Backend::Amx if amx && bf16 => Backend::Amx,
            Backend::Amx if amx => Backend::Avx512,
            Backend::AmxEmulated if bf16 => Backend::AmxEmulated,
            Backend::AmxEmulated => return Backend::Auto.resolve_on_cpu(dtype),
            Backend::AmxBf16x3 if amx && dtype == DType::F32 => Backend::AmxBf16x3,
            Backend::AmxBf16x3 => return Backend::Amx.resolve_on_cpu(dtype),
            Backend::AmxEmulatedBf16x3 if dtype == DType::F32 => Backend::AmxEmulatedBf16x3,
            Backend::AmxEmulatedBf16x3 => return Backend::AmxEmulated.resolve_on_cpu(dtype),
            Backend::Avx2 => return missing("AVX2+FMA"),
            Backend::Avx512 => return missing("AVX-512F"),
            Backend::Avx512Bf16 => return missing("AVX-512 BF16"),
            Backend::Amx => {
                let why = isa.amx.refusal().unwrap_or("AMX is not ready");
                return Err(Error::Unsupported(format!(
                    "the AMX kernel cannot run: {why}"
                )));
            }
        };
        Ok(if dtype == DType::F64 {
            Backend::Portable
        } else {
            chosen
        })
    }

    /// The path `ATTNRS_ISA` forces for every `Auto` call (read once per process): `None` when it is unset,
    /// empty or `auto`. It is how benchmarks and bug reports pin a path; a path the CPU lacks is refused by
    /// [`Backend::resolve`], never run.
    pub fn from_env() -> Result<Option<Backend>> {
        static FORCED: OnceLock<Result<Option<Backend>>> = OnceLock::new();
        FORCED
            .get_or_init(|| Backend::parse_forced(std::env::var("ATTNRS_ISA").ok().as_deref()))
            .clone()
    }

    /// Every path `ATTNRS_ISA` can name, by [`Backend::name`].
    pub const FORCEABLE: [Backend; 7] = [
        Backend::Auto,
        Backend::Amx,
        Backend::AmxEmulated,
        Backend::Avx512Bf16,
        Backend::Avx512,
        Backend::Avx2,
        Backend::Portable,
    ];

    /// [`Backend::from_env`]'s reading of one value of `ATTNRS_ISA`.
    pub fn parse_forced(value: Option<&str>) -> Result<Option<Backend>> {
        let value = match value.map(str::trim) {
            None | Some("") => return Ok(None),
            Some(v) => v,
        };
        match Backend::FORCEABLE.iter().find(|b| b.name() == value) {
            Some(Backend::Auto) => Ok(None),
            Some(&b) => Ok(Some(b)),
            None => {
                let names: Vec<_> = Backend::FORCEABLE.iter().map(|b| b.name()).collect();
                let expected = format!("one of {}", names.join(", "));
                Err(Error::value("ATTNRS_ISA", expected, format!("{value:?}")))
            }
        }
    }

    /// The name `attnrs info` and the benchmarks print for this path.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Portable => "portable",
            Backend::Avx2 => "avx2",
            Backend::Avx512 => "avx512",
            Backend::Avx512Bf16 => "avx512_bf16",
            Backend::Amx => "amx",
            Backend::AmxEmulated => "amx_emulated",
            Backend::AmxBf16x3 => "amx_bf16x3",
            Backend::AmxEmulatedBf16x3 => "amx_emulated_bf16x3",
        }
    }

    /// The path [`Backend::Auto`] takes on this CPU for inputs of `dtype` (forward, backward and decode
    /// alike), and why, in a few words; for bf16 off AMX, also why not AMX.
    /// Refused when `ATTNRS_ISA` is invalid or names a path this CPU lacks.
    pub fn auto_path(dtype: DType) -> Result<(Backend, String)> {
        let isa = Cpu::get();
        let chosen = Backend::Auto.resolve(dtype)?;
        // Named as forced only when ATTNRS_ISA named this very path (amx_emulated leaves non-bf16 dtypes to auto).
        let forced = matches!(Backend::from_env(), Ok(Some(b)) if b == chosen);
        let narrow = matches!(dtype, DType::BF16 | DType::F16);
        let why = match chosen {
            _ if dtype == DType::F64 => "float64 always runs the portable f64 path",
            Backend::Portable if forced => "portable Rust, forced by ATTNRS_ISA",
            Backend::Avx2 if forced => "AVX2+FMA, forced by ATTNRS_ISA",
            Backend::Avx512 if forced => "AVX-512F, forced by ATTNRS_ISA",
            Backend::AmxEmulated => {
                "emulated AMX tiles (a scalar model for tests, slow), forced by ATTNRS_ISA"
            }
            Backend::Amx => "AMX tiles (tdpbf16ps), f32 accumulation",
            Backend::Avx512Bf16 => "AVX-512 BF16 dot products (vdpbf16ps), f32 accumulation",
            Backend::Avx512 if dtype == DType::BF16 => {
                "AVX-512F, bf16 widened to f32 (this CPU has no AVX-512 BF16)"
            }
            Backend::Avx512 if narrow => "AVX-512F, fp16 widened to f32",
            Backend::Avx512 => "AVX-512F, f32 FMA",
            Backend::Avx2 if narrow => "AVX2+FMA, inputs widened to f32 (this CPU has no AVX-512)",
            Backend::Avx2 => "AVX2+FMA, f32 (this CPU has no AVX-512)",
            _ if isa.neon => "portable Rust (the compiler's NEON); no hand-written NEON kernel",
            _ => "portable Rust: this CPU has no AVX2+FMA",
        };
        let mut why = why.to_string();
        if dtype == DType::BF16
            && !matches!(chosen, Backend::Amx | Backend::AmxEmulated)
            && let Some(no_amx) = isa.amx.refusal()
        {
            why = format!("{why}; amx: {no_amx}");
        }
        Ok((chosen, why))
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

/// The ISA rows: `$m!(family)` or `$m!(family, "target features")` for every micro-kernel family. Every
/// per-ISA entry point (each phase's `#[target_feature]` trampolines, [`Isa::enter`]) is generated from this
/// one list.
macro_rules! for_each_isa {
    ($m:ident) => {
        $m!($crate::kernel::gemm::Portable<f32>);
        $m!($crate::kernel::gemm::Portable<f64>);
        #[cfg(target_arch = "x86_64")]
        $m!($crate::kernel::gemm::Avx2F32, "avx2,fma");
        #[cfg(target_arch = "x86_64")]
        $m!(
            $crate::kernel::gemm::Avx512F32,
            "avx512f,avx512bw,avx512vl,avx2,fma"
        );
        #[cfg(target_arch = "x86_64")]
        $m!(
            $crate::kernel::gemm::Avx512Bf16,
            "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
        );
        #[cfg(target_arch = "x86_64")]
        $m!(
            $crate::kernel::gemm::Amx,
            "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
        );
        $m!($crate::kernel::gemm::AmxEmulated);
        #[cfg(target_arch = "x86_64")]
        $m!(
            $crate::kernel::gemm::AmxBf16x3,
            "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
        );
        $m!($crate::kernel::gemm::AmxEmulatedBf16x3);
    };
}
pub(crate) use for_each_isa;

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

for_each_isa!(isa);

/// The dtype × ISA table: `select!(dtype, backend, f(args..))` calls `f::<K, T>(args..)` with the family `K`
/// that `backend` (already [`Backend::resolve`]d for `dtype`) names and the element type `T` of `dtype`. f64
/// always runs the portable f64 family; the others accumulate in f32. (A macro, so that each phase's `f` can
/// require its own per-ISA entry trait of `K`.)
macro_rules! select {
    ($dtype:expr, $backend:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            $crate::tensor::DType::F64 => $f::<$crate::kernel::gemm::Portable<f64>, f64>($($arg),*),
            $crate::tensor::DType::F32 => $crate::kernel::dispatch::select!(@f32 $backend, $f($($arg),*)),
            $crate::tensor::DType::BF16 => {
                $crate::kernel::dispatch::select!(@isa half::bf16, $backend, $f($($arg),*))
            }
            _ => $crate::kernel::dispatch::select!(@isa half::f16, $backend, $f($($arg),*)),
        }
    };
    // f32 alone has the bf16x3 families (`resolve_for` picks them only for f32), so only f32 instantiates them.
    (@f32 $backend:expr, $f:ident($($arg:expr),*)) => {{
        use $crate::kernel::dispatch::Backend;
        match $backend {
            #[cfg(target_arch = "x86_64")]
            Backend::AmxBf16x3 => $f::<$crate::kernel::gemm::AmxBf16x3, f32>($($arg),*),
            Backend::AmxEmulatedBf16x3 => $f::<$crate::kernel::gemm::AmxEmulatedBf16x3, f32>($($arg),*),
            other => $crate::kernel::dispatch::select!(@isa f32, other, $f($($arg),*)),
        }
    }};
    (@isa $t:ty, $backend:expr, $f:ident($($arg:expr),*)) => {{
        use $crate::kernel::dispatch::Backend;
        // `backend` came from `Backend::resolve`, which checked the CPU's features.
        match $backend {
            // bf16 products, f32 accumulation: AMX tiles (real or emulated) or `vdpbf16ps`. `resolve` picks
            // these for bf16 inputs, and for f32 ones under `F32Precision::Medium`.
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => $f::<$crate::kernel::gemm::Amx, $t>($($arg),*),
            Backend::AmxEmulated => $f::<$crate::kernel::gemm::AmxEmulated, $t>($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Bf16 => $f::<$crate::kernel::gemm::Avx512Bf16, $t>($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => $f::<$crate::kernel::gemm::Avx512F32, $t>($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => $f::<$crate::kernel::gemm::Avx2F32, $t>($($arg),*),
            _ => $f::<$crate::kernel::gemm::Portable<f32>, $t>($($arg),*),
        }
    }};
}
pub(crate) use select;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_path_is_what_auto_resolves_to_and_names_it() {
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let (path, why) = Backend::auto_path(dtype).unwrap();
            assert_eq!(Ok(path), Backend::Auto.resolve(dtype), "{dtype:?}");
            assert!(!why.is_empty() && path.name() != "auto", "{dtype:?}");
        }
        assert_eq!(Backend::auto_path(DType::F64).unwrap().0, Backend::Portable);
    }

    #[test]
    fn attnrs_isa_values_are_read_or_refused() {
        for (value, want) in [
            (None, None),
            (Some(""), None),
            (Some("auto"), None),
            (Some(" avx2 "), Some(Backend::Avx2)),
            (Some("portable"), Some(Backend::Portable)),
            (Some("avx512"), Some(Backend::Avx512)),
            (Some("avx512_bf16"), Some(Backend::Avx512Bf16)),
            (Some("amx"), Some(Backend::Amx)),
            (Some("amx_emulated"), Some(Backend::AmxEmulated)),
        ] {
            assert_eq!(Backend::parse_forced(value), Ok(want), "{value:?}");
        }
        assert!(
            matches!(Backend::parse_forced(Some("sse2")), Err(Error::Value { arg, .. }) if arg == "ATTNRS_ISA")
        );
        for b in Backend::FORCEABLE.into_iter().skip(1) {
            assert_eq!(
                Backend::parse_forced(Some(b.name())),
                Ok(Some(b)),
                "names read back"
            );
        }
    }

    #[test]
    fn amx_runs_only_where_the_cpu_and_os_allow_it() {
        let ready = Cpu::get().amx == Amx::Ready;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = Backend::Amx.resolve_on_cpu(dtype);
            match (ready, dtype) {
                (true, DType::BF16) => assert_eq!(got, Ok(Backend::Amx)),
                (true, _) => assert_eq!(got, Ok(Backend::Avx512)),
                (false, _) => assert!(
                    matches!(&got, Err(Error::Unsupported(m)) if m.contains(Cpu::get().amx.refusal().unwrap())),
                    "{got:?}"
                ),
            }
            assert_ne!(
                Backend::Auto.resolve_on_cpu(dtype),
                Ok(Backend::AmxEmulated)
            );
        }
        assert_eq!(
            Backend::AmxEmulated.resolve_on_cpu(DType::BF16),
            Ok(Backend::AmxEmulated)
        );
        assert_eq!(
            Backend::AmxEmulated.resolve_on_cpu(DType::F32),
            Backend::Auto.resolve_on_cpu(DType::F32)
        );
        assert_eq!(
            Backend::Auto.resolve_on_cpu(DType::BF16) == Ok(Backend::Amx),
            ready
        );
    }

    #[test]
    fn f32_precision_picks_the_bf16_paths_only_where_their_products_are_fast() {
        use F32Precision::*;
        let emulated = |p| Backend::AmxEmulated.resolve_for(DType::F32, p);
        assert_eq!(emulated(Medium), Ok(Backend::AmxEmulated));
        assert_eq!(emulated(High), Ok(Backend::AmxEmulatedBf16x3));
        assert_eq!(emulated(Highest), Backend::Auto.resolve(DType::F32));
        for p in [Highest, High, Medium] {
            // other dtypes ignore the precision
            for dtype in [DType::BF16, DType::F16, DType::F64] {
                assert_eq!(
                    Backend::AmxEmulated.resolve_for(dtype, p),
                    Backend::AmxEmulated.resolve(dtype)
                );
            }
        }
        let bf16 = Backend::Auto.resolve(DType::BF16).unwrap();
        let auto = |p| Backend::Auto.resolve_for(DType::F32, p).unwrap();
        let exact = Backend::Auto.resolve(DType::F32).unwrap();
        let fast = matches!(bf16, Backend::Amx | Backend::Avx512Bf16);
        assert_eq!(auto(Medium), if fast { bf16 } else { exact });
        let split = bf16 == Backend::Amx;
        assert_eq!(auto(High), if split { Backend::AmxBf16x3 } else { exact });
        assert_eq!(auto(Highest), exact);
        for b in [Backend::Portable, Backend::Avx2, Backend::Avx512] {
            if let Ok(exact) = b.resolve(DType::F32) {
                assert_eq!(b.resolve_for(DType::F32, Medium), Ok(exact), "{b:?}");
                assert_eq!(b.resolve_for(DType::F32, High), Ok(exact), "{b:?}");
            }
        }
    }
}
