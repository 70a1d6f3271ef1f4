//! The kernel's tests: forward and backward against naive f64 references on every path this CPU has, and
//! their argument errors. Shared randomness and layouts in [`support`].

mod backward;
mod backward_errors;
mod backward_reference;
mod backward_support;
mod forward;
mod forward_errors;
mod forward_support;
pub(crate) mod support;
