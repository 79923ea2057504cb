"""How arena arrays are laid out, as numpy lays out its own: shapes, dtypes,
orders and strides checked and computed the way numpy's constructors do, and
where an array's bytes are. Plain numpy, no arena: arena.py calls these."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import numpy.typing as npt


def normalize_shape(shape: Any) -> tuple[int, ...]:
    try:
        shape = (operator.index(shape),)
    except TypeError:
        try:
            shape = tuple(operator.index(n) for n in shape)
        except TypeError:
            raise TypeError(f"shape must be an integer or a sequence of integers, not {shape!r}") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    if len(shape) > 64:
        raise ValueError(f"numpy arrays have at most 64 dimensions, not {len(shape)}")
    return shape


def check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"dtype {dtype} holds Python objects, which cannot live in arena memory")
    return dtype


def c_or_f(order: str) -> str:
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    return order


def like_layout(prototype: npt.NDArray[Any], shape: tuple[int, ...], dtype: np.dtype[Any],
                order: str) -> tuple[str, list[int] | None]:
    """(order, strides) for an array like `prototype`, as numpy's *_like do:
    'A' and 'K' follow the prototype; 'K' keeps its axis order exactly."""
    if order not in ("C", "F", "A", "K"):
        raise ValueError(f"order must be 'C', 'F', 'A' or 'K', not {order!r}")
    fortran = prototype.flags.f_contiguous and not prototype.flags.c_contiguous
    if order == "A":
        return ("F" if fortran else "C"), None
    if order != "K":
        return order, None
    if shape != prototype.shape or prototype.ndim < 2:
        return "C", None
    axes = sorted(range(prototype.ndim), key=lambda axis: -abs(prototype.strides[axis]))
    strides, step = [0] * len(shape), dtype.itemsize
    for axis in reversed(axes):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return "C", strides


def root_of(array: Any) -> Any:
    """The object at the end of `array`'s chain of bases: a Block, the
    ndarray that owns the memory, or something else."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def byte_bounds(array: npt.NDArray[Any]) -> tuple[int, int]:
    """[lo, hi) of the bytes `array` can touch."""
    lo = hi = array.__array_interface__["data"][0]
    if array.size == 0:
        return lo, lo
    for n, stride in zip(array.shape, array.strides):
        reach = (n - 1) * stride
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + array.itemsize
