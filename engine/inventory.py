"""The engine's inventory: every tensor it accepts, by Hugging Face checkpoint name.

Ground truth is the checkpoint the engine serves: its safetensors headers give
every name and shape (headers only: no tensor data is read; sharded checkpoints
through model.safetensors.index.json), cast to the serving dtype. Inside a vLLM
worker this is then checked against what the model's loader accepts
(loader_check.py). Where no checkpoint exists (an engine built from a config
alone), the names come from the transformers model built on the meta device,
with transformers' own save-time conversion applied so that MoE experts get
their per-expert checkpoint names. No vLLM is needed for either.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    "checkpoint_files",
    "inventory_for_engine",
    "inventory_from_checkpoint",
    "inventory_from_config",
    "inventory_from_model_dir",
    "read_safetensors_header",
    "torch_dtype",
]

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 40
# safetensors itself refuses headers above 100 MB; a larger length prefix means a damaged file.
_MAX_HEADER_BYTES = 100_000_000
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_INDEX_FILE = "model.safetensors.index.json"


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
    """Checkpoint names and shapes for a model that exists only as a config, cast to `dtype`.

    Builds the transformers model on the meta device and applies transformers'
    own save-time weight conversion (revert_weight_conversion, what
    save_pretrained does), so fused in-memory MoE experts (`experts.gate_up_proj`
    [E, 2I, H]) come out under their per-expert checkpoint names. `dtype` is the
    serving dtype (vLLM's `--dtype`); None takes the config's own dtype, float32
    when it names none. A tied lm_head is left out: save_pretrained does not
    write it and vLLM's loaders skip it. Non-persistent buffers (rotary inv_freq)
    are not weights and are left out too.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    wire_dtype = _resolve_dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # named_parameters() drops aliases and keeps the first name registered,
    # which is the one save_pretrained keeps for tied weights.
    params = {name for name, _ in model.named_parameters()}
    state = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name in params or not isinstance(tensor, torch.nn.Parameter)
    }
    saved = revert_weight_conversion(model, state)
    specs = [TensorSpec(name, tuple(saved[name].shape), wire_dtype) for name in _in_unit_order(saved)]
    if not specs:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} has no parameters")
    return tuple(specs)


def checkpoint_files(model_dir: str | os.PathLike[str]) -> list[str]:
    """The safetensors files of a local checkpoint: those its index names, else every *.safetensors.

    Returns [] when the directory holds no safetensors checkpoint.
    """
    root = os.fspath(model_dir)
    index_path = os.path.join(root, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: field 'weight_map': expected a non-empty object of name -> file")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise ValueError(f"{index_path} names shard files that do not exist: {missing}")
        return [os.path.join(root, f) for f in files]
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".safetensors"))


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's header; reads no tensor data.

    The format is an 8-byte little-endian header length, then that many bytes of
    JSON. Parsed here rather than through safe_open, which maps the whole file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        length = int.from_bytes(prefix, "little")
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {length} bytes: expected at most {_MAX_HEADER_BYTES}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: safetensors header is not JSON: {e}") from e
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        code = entry.get("dtype") if isinstance(entry, dict) else None
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} dtype {code!r}: expected one of {sorted(_SAFETENSORS_DTYPES)}"
            )
        out[name] = (_SAFETENSORS_DTYPES[code], tuple(int(d) for d in entry["shape"]))
    return out


def inventory_from_checkpoint(
    model_dir: str | os.PathLike[str], dtype: "str | torch.dtype | None" = None
) -> tuple[TensorSpec, ...]:
    """Every tensor of a local safetensors checkpoint (headers only), floating ones cast to `dtype`.

    `dtype` None keeps each tensor's stored dtype. Integer tensors keep theirs:
    vLLM casts only floating weights to the serving dtype. Ordered as
    _in_unit_order says.
    """
    files = checkpoint_files(model_dir)
    if not files:
        raise ValueError(f"{os.fspath(model_dir)}: no safetensors checkpoint (no {_INDEX_FILE}, no *.safetensors)")
    wire_dtype = None if dtype is None or dtype == "auto" else dtype_name(dtype)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name in found:
                raise ValueError(f"tensor {name!r} appears in more than one shard of {os.fspath(model_dir)}")
            found[name] = entry
    return tuple(
        TensorSpec(name, found[name][1], wire_dtype if wire_dtype and found[name][0] in _FLOAT_DTYPES else found[name][0])
        for name in _in_unit_order(found)
    )


def inventory_from_model_dir(
    model_dir: str | os.PathLike[str], dtype: "str | torch.dtype | None" = None
) -> tuple[TensorSpec, ...]:
    """The inventory of a local model directory; never contacts the hub.

    From the safetensors headers when the directory holds a checkpoint, else
    from its config (inventory_from_config). `dtype` None or "auto" takes the
    config's dtype, as vLLM does.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.fspath(model_dir), local_files_only=True)
    if checkpoint_files(model_dir):
        return inventory_from_checkpoint(model_dir, _resolve_dtype(config, dtype))
    log.info("%s holds no safetensors checkpoint: inventory derived from its config", os.fspath(model_dir))
    return inventory_from_config(config, dtype)


def inventory_for_engine(model: str, hf_config: "PretrainedConfig", dtype: "str | torch.dtype") -> tuple[TensorSpec, ...]:
    """The inventory of the model an engine serves: its local checkpoint's headers, else its config.

    `model` is vLLM's model argument. A hub id resolves to a local snapshot
    only if one is already cached (the hub is never contacted).
    """
    model_dir = _local_model_dir(model)
    if model_dir is not None and checkpoint_files(model_dir):
        return inventory_from_checkpoint(model_dir, dtype)
    log.info("no local safetensors checkpoint for %r: inventory derived from its config", model)
    return inventory_from_config(hf_config, dtype)


def _local_model_dir(model: str) -> str | None:
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception:  # not cached, or not a hub id: the config path applies
        return None


def _in_unit_order(names: Iterable[str]) -> list[str]:
    """Names sorted with layer numbers compared as numbers, then each apply unit's members together.

    vLLM rebuilds a module as soon as all of its tensors arrived, so an update
    in this order buffers at most one module at a time.
    """
    units: dict[str, list[str]] = {}
    for name in sorted(names, key=_natural_key):
        units.setdefault(apply_unit(name), []).append(name)
    return [name for members in units.values() for name in members]


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_update(
    inventory: Mapping[str, TensorSpec],
    update: Iterable[TensorSpec],
    *,
    require_full: bool = False,
    refused: Mapping[str, str] | None = None,
) -> None:
    """Raises InvalidArgument listing every problem of an update against the inventory.

    Checks unknown names, duplicates, shape and dtype mismatches, and units (see
    apply_unit) that the update covers only in part. With require_full, every
    inventory tensor must be present. `refused` maps checkpoint names the
    engine's loader would not take (loader_check.py) to the reason, named in
    the message instead of "unknown".
    """
    found = Problems()
    seen: set[str] = set()
    for spec in update:
        have = inventory.get(spec.name)
        if spec.name in seen:
            found.add("duplicate tensors", f"tensor {spec.name!r} appears twice", spec.name)
        elif have is None and refused and spec.name in refused:
            found.add("tensors the engine's loader refuses", f"tensor {spec.name!r} is not accepted by the engine: {refused[spec.name]}",
                      f"{spec.name} ({refused[spec.name]})")
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
            # A MoE layer is one unit of hundreds of tensors: name what is missing, count the rest.
            problems.append(
                f"module {unit!r} is loaded as one unit of {len(members)} tensors: the update has "
                f"{_preview(sent, 3)} but not {_preview(absent, 10)}; send all of them or none"
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
