//! The one error type of the core. The Python bindings map each variant to a typed exception.

use std::fmt;

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core, with enough context to name the argument at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A tensor or a length has the wrong shape or size.
    Shape {
        arg: String,
        expected: String,
        got: String,
    },
    /// A tensor has an element type the operation does not accept.
    Dtype {
        arg: String,
        expected: String,
        got: String,
    },
    /// A tensor lives on a device the operation cannot read.
    Device {
        arg: String,
        expected: String,
        got: String,
    },
    /// Strides, offsets or memory overlap make a tensor unusable (e.g. an output aliasing an input).
    Layout {
        arg: String,
        expected: String,
        got: String,
    },
    /// A scalar argument lies outside its domain (a negative window, a non-finite scale, ...).
    Value {
        arg: String,
        expected: String,
        got: String,
    },
    /// A registry lookup named something that is not registered.
    UnknownName { name: String, valid: Vec<String> },
    /// The request is valid but this build does not implement it.
    Unsupported(String),
    /// The allocator refused memory for `what` (`bytes` of it): the machine or the process limit is short.
    OutOfMemory { what: String, bytes: usize },
    /// An invariant of attnrs itself broke; reported instead of panicking.
    Internal(String),
    /// A registered native kernel (a plugin) reported a failure: its ABI status code and message.
    Kernel {
        kernel: String,
        status: i32,
        message: String,
    },
}

impl Error {
    /// A [`Error::Shape`] naming `arg`.
    pub fn shape(
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Shape {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A [`Error::Dtype`] naming `arg`.
    pub fn dtype(
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Dtype {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A [`Error::Device`] naming `arg`.
    pub fn device(
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Device {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A [`Error::Layout`] naming `arg`.
    pub fn layout(
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Layout {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A [`Error::Value`] naming `arg`.
    pub fn value(
        arg: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Value {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape { arg, expected, got }
            | Self::Dtype { arg, expected, got }
            | Self::Device { arg, expected, got }
            | Self::Layout { arg, expected, got }
            | Self::Value { arg, expected, got } => {
                write!(f, "{arg}: expected {expected}, got {got}")
            }
            Self::UnknownName { name, valid } => {
                write!(
                    f,
                    "`{name}` is not registered; valid names are: {}",
                    valid.join(", ")
                )
            }
            Self::Unsupported(what) => write!(f, "not supported: {what}"),
            Self::OutOfMemory { what, bytes } => write!(
                f,
                "out of memory: {what} needs {} that the allocator could not provide",
                crate::memory::human(*bytes)
            ),
            Self::Internal(what) => {
                write!(f, "internal error in attnrs (please report it): {what}")
            }
            Self::Kernel {
                kernel, message, ..
            } => write!(f, "kernel '{kernel}' failed: {message}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_argument_and_both_sides() {
        let e = Error::shape("query", "a 4-D tensor [B, H, Q, D]", "shape [2, 3]");
        assert_eq!(
            e.to_string(),
            "query: expected a 4-D tensor [B, H, Q, D], got shape [2, 3]"
        );
    }
}
