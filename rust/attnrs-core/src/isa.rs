//! CPU feature detection, done once per process and cached, including the Linux permission AMX tile data
//! needs before its first instruction ([`Amx`]).

use std::sync::OnceLock;

/// Whether AMX's bf16 tiles can run in this process, or the first reason they cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Amx {
    /// The CPU lacks `amx_tile` or `amx_bf16` (CPUID leaf 7), or AVX-512 BF16 (which the AMX path's
    /// softmax and decode use), or this is not x86-64.
    #[default]
    Absent,
    /// The CPU has them, but the OS has not enabled the tile state in XCR0 (no XSAVE support for it).
    NotEnabled,
    /// The OS enables the tile state but refused this process the permission to use it
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, e.g. under a seccomp filter or an old kernel).
    NotPermitted,
    /// Tiles may run: the CPU has them and the OS granted this process its tile data.
    Ready,
}

impl Amx {
    /// Why AMX does not run here, in a few words, or `None` when it does.
    pub fn refusal(self) -> Option<&'static str> {
        match self {
            Amx::Ready => None,
            Amx::Absent => Some("this CPU has no AMX (amx_tile, amx_bf16)"),
            Amx::NotEnabled => Some("the OS has not enabled AMX tile state (XCR0)"),
            Amx::NotPermitted => {
                Some("AMX not permitted by the OS (arch_prctl ARCH_REQ_XCOMP_PERM refused)")
            }
        }
    }
}

/// The instruction-set extensions the kernels care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Isa {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bf16: bool,
    pub avx512fp16: bool,
    pub neon: bool,
    /// AMX bf16 tiles: detected, enabled by the OS and permitted for this process (asked once).
    pub amx: Amx,
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
            (self.amx == Amx::Ready, "amx_bf16"),
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
        amx: amx::detect(),
    }
}

/// AMX detection and the Linux tile-data permission. Raw CPUID, XGETBV and the syscall, so that the
/// answer does not depend on what the standard library's detection knows about, and no libc is needed.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::Amx;
    use std::arch::x86_64::__cpuid_count;

    /// CPUID.(EAX=7, ECX=0):EDX bits.
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    /// XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA).
    const XCR0_TILE: u64 = (1 << 17) | (1 << 18);

    pub(super) fn detect() -> Amx {
        let max_leaf = __cpuid_count(0, 0).eax;
        let has = max_leaf >= 7 && {
            let edx = __cpuid_count(7, 0).edx;
            edx & AMX_BF16 != 0 && edx & AMX_TILE != 0
        };
        if !has || !std::arch::is_x86_feature_detected!("avx512bf16") {
            return Amx::Absent;
        }
        // XGETBV is only defined when the OS has set CR4.OSXSAVE (CPUID.1:ECX bit 27).
        let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
        if !osxsave || xcr0() & XCR0_TILE != XCR0_TILE {
            return Amx::NotEnabled;
        }
        if request_permission() {
            Amx::Ready
        } else {
            Amx::NotPermitted
        }
    }

    fn xcr0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0; it is defined because the caller checked OSXSAVE. It touches
        // no memory and only the named registers.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (hi as u64) << 32 | lo as u64
    }

    /// Asks Linux for this process's AMX tile data (once per process; the grant is inherited across
    /// `fork` and covers every thread). True when granted.
    #[cfg(target_os = "linux")]
    fn request_permission() -> bool {
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: the arch_prctl system call with these arguments only changes this process's permitted
        // xstate features; it reads and writes no user memory. `syscall` clobbers rcx and r11.
        unsafe {
            std::arch::asm!("syscall",
                inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
                out("rcx") _, out("r11") _, options(nostack));
        }
        ret == 0
    }

    /// Other systems that enable the tile state in XCR0 grant it to every process.
    #[cfg(not(target_os = "linux"))]
    fn request_permission() -> bool {
        true
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
        if isa.amx == Amx::Ready {
            assert!(isa.avx512bf16 && isa.names().contains(&"amx_bf16"));
        }
        assert_eq!(isa.amx.refusal().is_none(), isa.amx == Amx::Ready);
        assert!(!isa.best().is_empty());
    }
}
