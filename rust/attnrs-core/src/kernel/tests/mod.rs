//! The kernel's tests: forward and backward against naive f64 references on every path this CPU has, and
//! their argument errors. Shared randomness and layouts in [`support`].

mod backward;
mod backward_errors;
mod backward_reference;
mod backward_support;
#[cfg(target_arch = "x86_64")]
mod decode_avx512;
mod dropout;
mod forward;
mod forward_errors;
mod forward_support;
mod ragged;
mod score;
mod softmax;
pub(crate) mod support;
