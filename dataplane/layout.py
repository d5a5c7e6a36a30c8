"""Typed views of plan entries inside flat byte buffers, and dtype names on the wire."""

from __future__ import annotations

import torch

from weightsync.core import Bucket, BucketEntry
from weightsync.core.dtypes import DTYPE_ITEMSIZE

__all__ = ["dtype_name", "entry_spans", "entry_view", "torch_dtype"]

_TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}: expected one of {sorted(_TORCH_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype ("bfloat16"); ValueError for dtypes the wire cannot carry."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise ValueError(f"dtype {dtype} cannot travel on the wire: expected one of {sorted(_TORCH_DTYPES)}")
    return name


def entry_view(buffer: torch.Tensor, entry: BucketEntry) -> torch.Tensor:
    """The entry's bytes in a flat uint8 bucket buffer, viewed with its wire dtype and shape."""
    raw = buffer[entry.offset_bytes : entry.offset_bytes + entry.nbytes]
    return raw.view(torch_dtype(entry.dtype)).view(entry.shape)


def entry_spans(bucket: Bucket) -> list[tuple[int, int]]:
    return [(e.offset_bytes, e.nbytes) for e in bucket.entries]
