"""Typed views of plan entries inside flat byte buffers, and dtype names on the wire."""

from __future__ import annotations

import torch

from weightsync.core import Bucket, BucketEntry
from weightsync.core.dtypes import DTYPE_ITEMSIZE

__all__ = ["dtype_name", "entry_spans", "entry_view", "keep_bytes", "known_bytes", "torch_dtype"]

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


def wire_bytes(t: torch.Tensor, entry: BucketEntry, device: torch.device) -> torch.Tensor | None:
    """t's bytes as a flat uint8 view when they already are the wire bytes on `device`, else None."""
    if t.device != device or t.dtype != torch_dtype(entry.dtype) or not t.is_contiguous():
        return None
    return t.reshape(-1).view(torch.uint8)


def known_bytes(seen: dict, name: str, t: object) -> torch.Tensor | None:
    """The flat uint8 view kept for `name` if `t` is the very tensor kept with it, unmoved and
    unreshaped: trainers and engines hand over the same tensors round after round, and looking
    at each once per group keeps per-tensor work off every round."""
    known = seen.get(name)
    if known is not None and known[0] is t and known[1] == t.data_ptr() and known[2] == t.shape:
        return known[3]
    return None


def keep_bytes(seen: dict, name: str, t: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Remembers `raw`, the flat uint8 view of `t`, for known_bytes; returns it."""
    seen[name] = (t, t.data_ptr(), t.shape, raw)
    return raw
