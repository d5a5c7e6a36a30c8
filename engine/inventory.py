"""The engine's inventory: every tensor it accepts, by Hugging Face checkpoint name.

Derived from the model config alone, by building the transformers model on the
meta device: no weights are read and no vLLM is needed, so the daemon can
register before its engine has started, and tests can compare it against what
vLLM really loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from weightsync.core import InvalidArgument, TensorSpec, apply_unit
from weightsync.core.dtypes import DTYPE_ITEMSIZE
from weightsync.core.problems import Problems, dtype_fix, examples

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

__all__ = [
    "MAX_LISTED_PROBLEMS",
    "apply_unit",
    "check_update",
    "dtype_name",
    "inventory_from_config",
    "inventory_from_model_dir",
    "torch_dtype",
]

MAX_LISTED_PROBLEMS = 40


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype for a wire dtype name such as "bfloat16"."""
    import torch

    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPE_ITEMSIZE)}")
    return getattr(torch, name)


def dtype_name(dtype: "torch.dtype | str") -> str:
    """The wire name of a torch dtype (torch.bfloat16 -> "bfloat16")."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"dtype {dtype}: not a wire dtype, expected one of {sorted(DTYPE_ITEMSIZE)}")
    return name


def inventory_from_config(
    config: "PretrainedConfig", dtype: "str | torch.dtype | None" = None
) -> tuple[TensorSpec, ...]:
    """Checkpoint names and shapes in checkpoint order, every tensor cast to `dtype`.

    `dtype` is the serving dtype (vLLM's `--dtype`); None takes the config's own
    dtype, float32 when it names none. A tied lm_head is left out: save_pretrained
    does not write it and vLLM's loaders skip it, so the tensor that serves it is
    model.embed_tokens.weight. Non-persistent buffers (rotary inv_freq) are not
    weights and are left out too.
    """
    import torch
    from transformers import AutoModelForCausalLM

    wire_dtype = _resolve_dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # named_parameters() drops aliases and keeps the first name registered,
    # which is the one save_pretrained keeps for tied weights.
    params = {name for name, _ in model.named_parameters()}
    specs = [
        TensorSpec(name, tuple(tensor.shape), wire_dtype)
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name in params or not isinstance(tensor, torch.nn.Parameter)
    ]
    if not specs:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has no parameters")
    return tuple(specs)


def inventory_from_model_dir(
    model_dir: str | os.PathLike[str], dtype: "str | torch.dtype | None" = None
) -> tuple[TensorSpec, ...]:
    """inventory_from_config for a local model directory; never contacts the hub."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.fspath(model_dir), local_files_only=True)
    return inventory_from_config(config, dtype)


def check_update(
    inventory: Mapping[str, TensorSpec],
    update: Iterable[TensorSpec],
    *,
    require_full: bool = False,
) -> None:
    """Raises InvalidArgument listing every problem of an update against the inventory.

    Checks unknown names, duplicates, shape and dtype mismatches, and units (see
    apply_unit) that the update covers only in part. With require_full, every
    inventory tensor must be present.
    """
    found = Problems()
    seen: set[str] = set()
    for spec in update:
        have = inventory.get(spec.name)
        if spec.name in seen:
            found.add("duplicate tensors", f"tensor {spec.name!r} appears twice", spec.name)
        elif have is None:
            found.add("unknown tensors", f"unknown tensor {spec.name!r}: the engine has no such checkpoint tensor", spec.name)
        elif have.shape != spec.shape:
            found.add("shape mismatches", f"tensor {spec.name!r} shape: expected {list(have.shape)}, got {list(spec.shape)}",
                      f"{spec.name} {list(spec.shape)} instead of {list(have.shape)}")
        elif have.dtype != spec.dtype:
            found.add("dtype mismatches", f"tensor {spec.name!r} dtype: expected {have.dtype} (the serving dtype; "
                      f"{dtype_fix(have.dtype)}), got {spec.dtype}", f"{spec.name} {spec.dtype}")
        seen.add(spec.name)
    found.hint("unknown tensors", f"the engine's inventory has e.g. {examples(n for n in inventory if n not in seen)} instead")
    problems = found.render()
    if require_full:
        missing = [name for name in inventory if name not in seen]
        if missing:
            problems.append(f"a full update lacks {len(missing)} tensors: {_preview(missing)}")
    else:
        problems.extend(_partial_units(inventory, seen))
    if problems:
        raise InvalidArgument("update does not fit the engine", _capped(problems))


def _partial_units(inventory: Mapping[str, TensorSpec], present: set[str]) -> list[str]:
    units: dict[str, list[str]] = {}
    for name in inventory:
        units.setdefault(apply_unit(name), []).append(name)
    problems = []
    for unit, members in units.items():
        sent = [m for m in members if m in present]
        if sent and len(sent) != len(members):
            absent = [m for m in members if m not in present]
            problems.append(
                f"module {unit!r} is loaded as one unit: the update has {sent} but not {absent}; "
                "send all of them or none"
            )
    return problems


def _resolve_dtype(config: "PretrainedConfig", dtype: "str | torch.dtype | None") -> str:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return dtype_name(dtype)


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    return problems[:MAX_LISTED_PROBLEMS] + [f"... and {len(problems) - MAX_LISTED_PROBLEMS} more"]
