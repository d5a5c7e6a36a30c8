"""What a vLLM model's own loader does with each checkpoint name: a dry run, inside the worker.

The inventory (inventory.py) says which tensors the checkpoint holds. Whether
vLLM *accepts* each of them is decided by the model's `load_weights`: its
stacked-parameter mapping (q/k/v -> qkv_proj, gate/up -> gate_up_proj), its
`packed_modules_mapping`, `FusedMoE.make_expert_params_mapping` for per-expert
names (experts.{e}.gate_proj -> experts.w13_weight, expert e, shard w1), and the
names it skips silently (a tied lm_head, AutoWeightsLoader's ignored `.bias`
suffixes). Rather than re-implementing those rules per architecture, the dry
run calls the model's real `load_weights` with meta tensors of the checkpoint
shapes while every parameter's `weight_loader` is swapped for a recorder that
writes nothing. What each name reached (which parameter of which module) is
the ground truth for:

* names the loader skips or rejects: refused at registration, not mid-round;
* vLLM parameters no name fills;
* apply units: every checkpoint name that lands in one vLLM module must sit in
  one `core.apply_unit`, because vLLM's layerwise reload rebuilds a module
  only once all of its elements arrived (NOTES.md). A FusedMoE layer is one
  module (w13_weight and w2_weight for all experts), so its unit is the whole
  layer.

Attribution assumes the loader consumes one weight before pulling the next,
which holds for vLLM 0.32's loops and AutoWeightsLoader (itertools.groupby is
lazy); a loader that read ahead would show up as names landing in the wrong
module, which the coverage tests would catch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weightsync.core import TensorSpec, apply_unit

__all__ = ["LoaderCheck", "dry_run_loader", "swap_weight_loader"]

log = logging.getLogger(__name__)

@dataclass(slots=True)
class LoaderCheck:
    """The outcome of a dry run: where each name landed, and every disagreement found."""

    # checkpoint name -> the vLLM parameters its loader call(s) wrote
    targets: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    unfilled: list[str] = field(default_factory=list)
    split_modules: dict[str, list[str]] = field(default_factory=dict)
    # Set when the dry run itself failed outside any one tensor: nothing above is known.
    failed: str = ""

    def accepted(self, specs: Sequence[TensorSpec]) -> list[TensorSpec]:
        """The specs the loader takes; all of them when the dry run could not tell."""
        return list(specs) if self.failed else [s for s in specs if s.name in self.targets]

    def problems(self) -> list[str]:
        """One message per problem, naming the tensor and what vLLM does with it."""
        if self.failed:
            return [f"the dry run of vLLM's loader failed, so the checkpoint's names are unchecked: {self.failed}"]
        out = [f"checkpoint tensor {n!r}: vLLM's loader skips it (no parameter receives it)" for n in self.skipped]
        out += [f"checkpoint tensor {n!r}: vLLM's loader rejects it: {why}" for n, why in self.rejected.items()]
        out += [f"vLLM parameter {p!r}: no checkpoint tensor fills it" for p in self.unfilled]
        out += [
            f"vLLM module {module!r} is filled by tensors of several apply units {units}: "
            "core.apply_unit must put them in one unit"
            for module, units in self.split_modules.items()
        ]
        return out


class _Recorder:
    """Stands in for every parameter's weight_loader: records the call, writes nothing."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.targets: dict[str, list[str]] = {}

    def loader_for(self, param_name: str):
        def record(*args: Any, **kwargs: Any) -> bool:
            if self.current is not None:
                self.targets.setdefault(self.current, []).append(param_name)
            # FusedMoE's loader reports success (return_success=True); others ignore it.
            return True

        return record


def dry_run_loader(model: Any, specs: Sequence[TensorSpec], vllm_config: Any = None) -> LoaderCheck:
    """Runs model.load_weights over meta tensors of `specs`, recording where each lands.

    Nothing is written into the model: every parameter's weight_loader is
    replaced for the duration and put back afterwards. A name whose loading
    raises is recorded as rejected and the run restarts without it.
    """
    import contextlib

    import torch

    params = dict(model.named_parameters())
    recorder = _Recorder()
    restores = [swap_weight_loader(param, recorder.loader_for(name)) for name, param in params.items()]
    check = LoaderCheck()
    remaining = list(specs)
    if vllm_config is not None:
        from vllm.config import set_current_vllm_config

        context = set_current_vllm_config(vllm_config)
    else:
        context = contextlib.nullcontext()
    try:
        with context, torch.no_grad():
            while remaining:
                failed = _one_pass(model, remaining, recorder)
                if failed is None:
                    break
                name, error = failed
                check.rejected[name] = f"{type(error).__name__}: {error}"
                remaining = [s for s in remaining if s.name != name]
    except _DryRunFailed as e:
        log.warning("dry run of vLLM's loader failed: %s", e, exc_info=True)
        return LoaderCheck(failed=str(e))
    finally:
        for restore in restores:
            restore()
    check.targets = {n: recorder.targets[n] for n in (s.name for s in remaining) if n in recorder.targets}
    check.skipped = [s.name for s in remaining if s.name not in recorder.targets]
    filled = {p for targets in check.targets.values() for p in targets}
    check.unfilled = sorted(set(params) - filled)
    check.split_modules = _split_modules(check.targets)
    return check


def swap_weight_loader(param: Any, loader: Any) -> Callable[[], None]:
    """Sets param.weight_loader; returns the function that puts the original back."""
    if isinstance(getattr(type(param), "weight_loader", None), property):
        # vLLM's parameter classes keep the loader behind a property.
        old = param._weight_loader
        param.weight_loader = loader
        return lambda: setattr(param, "_weight_loader", old)
    if "weight_loader" in param.__dict__:
        old = param.__dict__["weight_loader"]
        param.weight_loader = loader
        return lambda: setattr(param, "weight_loader", old)
    param.weight_loader = loader
    return lambda: param.__dict__.pop("weight_loader", None)


def _one_pass(model: Any, specs: Sequence[TensorSpec], recorder: _Recorder) -> tuple[str, BaseException] | None:
    import torch

    from weightsync.engine.inventory import torch_dtype

    recorder.targets = {}

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for spec in specs:
            recorder.current = spec.name
            yield spec.name, torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device="meta")
        recorder.current = None

    try:
        model.load_weights(weights())
    except Exception as e:  # any loader failure names the tensor being loaded
        name = recorder.current
        recorder.current = None
        if name is None:
            raise _DryRunFailed(f"{type(e).__name__}: {e}") from e
        return name, e
    return None


class _DryRunFailed(Exception):
    """The loader failed after (or before) it pulled the checkpoint names."""


def _split_modules(targets: Mapping[str, list[str]]) -> dict[str, list[str]]:
    units_of_module: dict[str, set[str]] = {}
    for name, params in targets.items():
        for param in params:
            units_of_module.setdefault(param.rpartition(".")[0], set()).add(apply_unit(name))
    return {m: sorted(u) for m, u in sorted(units_of_module.items()) if len(u) > 1}
