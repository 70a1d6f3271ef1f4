//! CPU feature detection, done once per process and cached.

use std::sync::OnceLock;

/// The instruction-set extensions the kernels care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Isa {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bf16: bool,
    pub avx512fp16: bool,
    pub neon: bool,
}

impl Isa {
    /// The features of the running CPU (detected on first use).
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(detect)
    }

    /// Feature names, best first, as `attnrs info` prints them.
    pub fn names(&self) -> Vec<&'static str> {
        let table = [
            (self.avx512bf16, "avx512_bf16"),
            (self.avx512fp16, "avx512_fp16"),
            (self.avx512f, "avx512f"),
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.neon, "neon"),
        ];
        table
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect()
    }

    /// The widest SIMD path the kernels will take on this CPU.
    pub fn best(&self) -> &'static str {
        if self.avx512f {
            "avx512"
        } else if self.avx2 && self.fma {
            "avx2"
        } else if self.neon {
            "neon"
        } else {
            "portable"
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    Isa {
        avx2: std::arch::is_x86_feature_detected!("avx2"),
        fma: std::arch::is_x86_feature_detected!("fma"),
        avx512f: std::arch::is_x86_feature_detected!("avx512f"),
        avx512bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
        avx512fp16: std::arch::is_x86_feature_detected!("avx512fp16"),
        neon: false,
    }
}

#[cfg(target_arch = "aarch64")]
fn detect() -> Isa {
    Isa {
        neon: std::arch::is_aarch64_feature_detected!("neon"),
        ..Isa::default()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> Isa {
    Isa::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_stable_and_consistent() {
        let isa = Isa::get();
        assert_eq!(isa, Isa::get());
        if isa.avx512bf16 {
            assert!(isa.avx512f);
        }
        assert!(!isa.best().is_empty());
    }
}
