//! The AVX-512 decode kernel's transpose-add reduction.

use std::arch::x86_64::*;

use crate::kernel::forward::decode_avx512::reduce16;

#[test]
fn reduce16_sums_each_vector() {
    if !crate::isa::Isa::get().avx512f {
        return;
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn go() -> [f32; 16] {
        let x: [__m512; 16] = std::array::from_fn(|i| {
            let v: [f32; 16] = std::array::from_fn(|l| (i * 100 + l) as f32);
            // SAFETY: v holds 16 floats.
            unsafe { _mm512_loadu_ps(v.as_ptr()) }
        });
        let mut out = [0f32; 16];
        // SAFETY: AVX-512F is present; out holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), reduce16(&x)) };
        out
    }
    // SAFETY: checked above.
    let out = unsafe { go() };
    for (i, &s) in out.iter().enumerate() {
        assert_eq!(s, (i * 1600 + 120) as f32, "lane {i}: {out:?}");
    }
}
