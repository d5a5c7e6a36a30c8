"""An engine that holds its weights in a dict: for tests, dry runs and `weightsync daemon --engine memory`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weightsync.core import TensorSpec
from weightsync.core.regions import Region
from weightsync.dataplane.layout import dtype_name, torch_dtype

__all__ = ["MemoryEngine", "load_named_tensors", "tp_needs"]

log = logging.getLogger(__name__)

_INDEX_NAME = "model.safetensors.index.json"


def _load_dir(directory: Path, device: str) -> dict[str, torch.Tensor]:
    index = directory / _INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
        weight_map = {}
    if not shards:
        raise ValueError(
            f"{directory}: no *.safetensors files: expected a Hugging Face model directory "
            "(.bin and .pt checkpoints are not loaded, they are pickles)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        for name, t in load_file(directory / shard, device=device).items():
            if name in tensors:
                raise ValueError(f"{directory}: tensor {name!r} appears in more than one shard (again in {shard})")
            tensors[name] = t
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensor(s) listed in weight_map are in no shard, e.g. {missing[:3]}")
    return tensors


def load_named_tensors(path: str | os.PathLike, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors by checkpoint name from a .safetensors file or a Hugging Face model directory (sharded or not)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (expected a .safetensors file or a Hugging Face model directory)")
    if p.is_dir():
        return _load_dir(p, device)
    if p.is_file() and p.suffix == ".safetensors":
        return load_file(p, device=device)
    raise ValueError(f"{p}: expected a .safetensors file or a Hugging Face model directory")


def tp_needs(specs: Iterable[TensorSpec], tp: int) -> list[dict[str, Region]]:
    """What each of `tp` memory-engine ranks needs, standing in for tensor-parallel workers without vLLM.

    The rule (not vLLM's per-layer one, which engine/needs.py derives): rank t needs block t of
    dim 0 of every 2-D tensor whose dim 0 divides by tp (a column- or vocab-parallel shard), and
    every other tensor whole (replicated, like norms and biases). So the fleet can measure the
    bytes a TP worker receives (~1/tp of the sharded tensors) with memory engines.
    """
    if tp < 1:
        raise ValueError(f"tp {tp}: expected >= 1")
    specs = list(specs)
    needs = []
    for t in range(tp):
        per = {}
        for s in specs:
            if tp > 1 and len(s.shape) == 2 and s.shape[0] % tp == 0:
                block = s.shape[0] // tp
                per[s.name] = Region(0, t * block, block)
            else:
                per[s.name] = Region.whole()
        needs.append(per)
    return needs


class MemoryEngine:
    """Weights held in memory by Hugging Face name; `apply` checks each batch fully before writing any of it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            TensorSpec(name, tuple(t.shape), dtype_name(t.dtype))  # validates name and dtype
            self._tensors[name] = t.detach().contiguous()
        self.num_applied = 0

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, device: str = "cpu") -> "MemoryEngine":
        return cls(load_named_tensors(path, device=device))

    @classmethod
    def from_specs(cls, specs: Iterable[TensorSpec], *, device: str = "cpu") -> "MemoryEngine":
        """Zero-filled tensors with the given names, shapes and dtypes."""
        return cls({s.name: torch.zeros(s.shape, dtype=torch_dtype(s.dtype), device=device) for s in specs})

    def inventory(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in self._tensors.items()]

    def apply(self, batch: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies each (name, tensor) into the held tensor of that name; same shape and dtype required.

        The batch is collected into a list and checked before anything is written, so pass one
        bucket's pairs at a time, not a whole ReceiveStream (its views do not outlive their bucket).
        """
        batch = list(batch)
        problems = []
        for name, t in batch:
            have = self._tensors.get(name)
            if t is have:
                continue  # written in place by the data plane (destination)
            if have is None:
                problems.append(f"{name}: not held by this engine")
            elif tuple(t.shape) != tuple(have.shape) or t.dtype != have.dtype:
                problems.append(
                    f"{name}: got {list(t.shape)} {dtype_name(t.dtype)}, "
                    f"engine holds {list(have.shape)} {dtype_name(have.dtype)}"
                )
        if problems:
            raise ValueError(f"{len(problems)} tensor(s) cannot be applied: " + "; ".join(problems))
        for name, t in batch:
            held = self._tensors[name]
            if t is not held:
                held.copy_(t)
        self.num_applied += len(batch)

    def destination(self, name: str) -> torch.Tensor | None:
        """The held tensor for `name`, for receive_assignment(destination=...) to write into directly."""
        return self._tensors.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live tensors (not copies), by name."""
        return dict(self._tensors)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes a .safetensors file; a directory path gets model.safetensors inside it."""
        p = Path(path)
        if p.is_dir():
            p = p / "model.safetensors"
        elif p.suffix != ".safetensors":
            raise ValueError(f"{p}: expected a directory or a path ending in .safetensors")
        save_file({n: t.cpu() for n, t in self._tensors.items()}, str(p))
        return p
