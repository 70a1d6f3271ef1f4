//! attnrs-core: the engine behind attnrs.
//!
//! It owns the registry of attention functions, the mask algebra and its layouts, and the CPU attention
//! kernels. Nothing here knows about Python; `rust/attnrs-py` converts, validates and calls in.

pub mod error;
pub mod isa;
pub mod kernel;
pub mod layout;
pub mod mask;
pub mod memory;
pub mod plugin;
pub mod registry;
pub mod tensor;
pub mod threads;

pub use error::{Error, Result};
