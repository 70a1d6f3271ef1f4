"""The exceptions attnrs raises.

Every error derives from :class:`AttnrsError`, and also from the builtin exception a caller would expect, so
``except ValueError`` keeps working: bad shapes, devices and layouts are ``ValueError``\\ s, bad dtypes are
``TypeError``\\ s; and every one is a ``RuntimeError``, like torch's own errors, so SDPA-style ``except
RuntimeError`` handlers catch them too. Messages name the argument, what was expected and what was received.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "AttnrsError",
    "DeviceError",
    "DtypeError",
    "InternalError",
    "LayoutError",
    "OutOfMemoryError",
    "ShapeError",
    "UnknownNameError",
    "UnsupportedError",
]


class AttnrsError(RuntimeError):
    """Base class of every attnrs error. It is a ``RuntimeError``, as torch's own errors are, so code written for
    ``F.scaled_dot_product_attention`` (``except RuntimeError``) catches attnrs's too."""


class ShapeError(AttnrsError, ValueError):
    """A tensor or a length has the wrong shape, rank or size."""


class DtypeError(AttnrsError, TypeError):
    """A tensor has an element type the operation does not accept."""


class DeviceError(AttnrsError, ValueError):
    """A tensor lives on a device the operation cannot use."""


class LayoutError(AttnrsError, ValueError):
    """Strides, offsets or memory overlap make a tensor unusable (e.g. an output aliasing an input)."""


class ArgumentError(AttnrsError, ValueError):
    """A scalar argument lies outside its domain (a non-positive window, a non-finite scale, ...)."""


class UnknownNameError(AttnrsError, KeyError):
    """A name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class UnsupportedError(AttnrsError, NotImplementedError):
    """A valid request that this version does not implement yet."""


class OutOfMemoryError(AttnrsError, MemoryError):
    """The allocator refused memory attnrs needed (sizes beyond what the machine has are refused before
    allocating, as :class:`ArgumentError`\\ s naming the argument and the size)."""


class InternalError(AttnrsError):
    """An invariant of attnrs broke. Please report it."""
