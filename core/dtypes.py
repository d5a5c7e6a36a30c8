"""Dtype names on the wire: torch dtype names without the "torch." prefix."""

from __future__ import annotations

__all__ = ["DTYPE_ITEMSIZE", "itemsize", "is_known_dtype"]

# Kept free of torch so that the coordinator validates manifests without it.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def is_known_dtype(name: str) -> bool:
    return name in DTYPE_ITEMSIZE


def itemsize(name: str) -> int:
    try:
        return DTYPE_ITEMSIZE[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}: expected one of {sorted(DTYPE_ITEMSIZE)}"
        ) from None
