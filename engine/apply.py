"""Writing Hugging Face-named tensors into a live vLLM worker's model.

Runs inside the vLLM worker (called from the worker extension), on the thread
that also runs the model's forward passes, so nothing here races a step. All
vLLM imports are local to the functions.

What vLLM 0.32's `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`
does, and what this module adds (NOTES.md has the measurements):

* It moves every module's parameters to the meta device, buffers each incoming
  tensor per module, and rebuilds a module (materialise, weight_loader, CPU
  repacking, copy into the original storage) as soon as all of its elements have
  arrived. So it is applied module by module and is NOT atomic.
* If the iterator raises half way, vLLM leaves the not-yet-finished modules on
  the meta device and the next forward pass fails. `apply_weights` recovers:
  it drops the buffered tensors of unfinished modules and lets vLLM put their
  old tensors back, so every module ends up either wholly new or wholly old.
* A tied lm_head shares its weight with the embedding but keeps a packed copy
  for the CPU GEMM; vLLM never rebuilds it on reload (no tensor names it), so
  logits would come from the old embedding. `apply_weights` repacks it.
* A FusedMoE layer on CPU is prepacked into the grouped-GEMM layout (and its
  intermediate dimension padded) by the CPU experts' own
  process_weights_after_loading, which vLLM 0.32 runs on the first load only:
  on a reload (`moe_kernel` already set) it skips it and copies the plain
  layout into the prepacked storage, so the kernel then reads garbage (every
  token changed even when the reloaded values were the old ones).
  `apply_weights` makes the reload process such a layer as a first load.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from weightsync.core import FailedPrecondition, WeightsyncError

__all__ = [
    "APPLY_PATHS",
    "AppliedWeights",
    "ApplyFailed",
    "EngineWeightsBroken",
    "apply_weights",
    "broken_reason",
    "model_touched",
    "select_apply_path",
]

log = logging.getLogger(__name__)

# "reload_weights": vLLM's layerwise in-place reload; the only path that works on
# CPU (plain load_weights writes into parameters that CPU repacking emptied).
# "load_weights": model.load_weights straight into the parameters; correct on
# CUDA for unquantised models whose parameters are not repacked, and the path of
# vLLM versions that predate Worker.reload_weights.
APPLY_PATHS = ("reload_weights", "load_weights")


class EngineWeightsBroken(FailedPrecondition):
    """Applying failed and the model could not be put back into a servable state: restart the engine."""


class ApplyFailed(WeightsyncError):
    """Applying failed; the model is servable. `model_touched`: some modules may hold new tensors."""

    def __init__(self, message: str, *, model_touched: bool) -> None:
        super().__init__(message)
        self.model_touched = model_touched


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        yield e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def model_touched(error: BaseException) -> bool:
    """Whether a failure (or one it was raised from) may have written into the model."""
    for e in _causes(error):
        if isinstance(e, EngineWeightsBroken):
            return True
        if isinstance(e, ApplyFailed):
            return e.model_touched
    return False


def broken_reason(error: BaseException) -> str:
    """The EngineWeightsBroken message in a failure's chain, or "" when the model is servable."""
    return next((str(e) for e in _causes(error) if isinstance(e, EngineWeightsBroken)), "")


@dataclass(frozen=True, slots=True)
class AppliedWeights:
    num_tensors: int
    num_bytes: int
    apply_s: float


def select_apply_path(worker: Any, requested: str | None = None) -> str:
    """The apply path for this worker: the requested one, or the best this vLLM and device allow."""
    has_reload = callable(getattr(worker, "reload_weights", None))
    device_type = getattr(getattr(worker, "device", None), "type", "cpu")
    if requested is not None:
        if requested not in APPLY_PATHS:
            raise ValueError(f"apply path {requested!r}: expected one of {APPLY_PATHS}")
        if requested == "reload_weights" and not has_reload:
            raise FailedPrecondition("this vLLM has no Worker.reload_weights: use apply path 'load_weights' on CUDA")
        if requested == "load_weights" and device_type != "cuda":
            raise FailedPrecondition(
                f"apply path 'load_weights' corrupts repacked parameters on {device_type}: use 'reload_weights'"
            )
        return requested
    if has_reload:
        return "reload_weights"
    if device_type == "cuda":
        return "load_weights"
    raise FailedPrecondition(
        f"this vLLM has no Worker.reload_weights and plain load_weights is unsafe on {device_type}: "
        "upgrade to a vLLM with Worker.reload_weights"
    )


class _Counted:
    """Counts what the loader pulled, so a failure tells whether the model was touched."""

    def __init__(self, weights: Iterable[tuple[str, Any]]) -> None:
        self._it = iter(weights)
        self.num_tensors = 0
        self.num_bytes = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for name, tensor in self._it:
            self.num_tensors += 1
            self.num_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
        self.exhausted = True


def apply_weights(worker: Any, weights: Iterable[tuple[str, Any]], *, path: str) -> AppliedWeights:
    """Loads (hf_name, tensor) pairs into the worker's model through `path`.

    The loader may keep a tensor until the rest of its module arrives, so tensors
    must stay valid until this returns (copy views of reused buffers first).
    On failure the model is recovered (see the module docstring) and ApplyFailed
    is raised from the error; EngineWeightsBroken if recovery itself failed.
    """
    from vllm.config import set_current_vllm_config

    if path not in APPLY_PATHS:
        raise ValueError(f"apply path {path!r}: expected one of {APPLY_PATHS}")
    counted = _Counted(weights)
    started = time.perf_counter()
    model = worker.model_runner.get_model()
    try:
        if path == "reload_weights":
            with _moe_processed_as_first_load(model):
                worker.reload_weights(weights_iterator=iter(counted), is_checkpoint_format=True)
        else:
            with set_current_vllm_config(worker.vllm_config):
                model.load_weights(iter(counted))
        if not counted.exhausted:
            raise RuntimeError(
                f"the model's loader stopped after {counted.num_tensors} tensors without reading the rest"
            )
    except BaseException as error:
        if path == "reload_weights":
            _recover_reload(worker, model, error)
        # A new embedding may have been written before the error.
        _refresh_tied_modules(model)
        if not isinstance(error, Exception):
            raise
        raise ApplyFailed(
            f"applying weights failed after {counted.num_tensors} tensors: {type(error).__name__}: {error}",
            model_touched=counted.num_tensors > 0,
        ) from error
    _refresh_tied_modules(model)
    return AppliedWeights(counted.num_tensors, counted.num_bytes, time.perf_counter() - started)


@contextlib.contextmanager
def _moe_processed_as_first_load(model: Any) -> Iterator[None]:
    """During a reload, CPU FusedMoE layers are processed as on their first load (see the module docstring).

    Clearing `moe_kernel` is what makes vLLM's UnquantizedFusedMoEMethod take the
    first-load path: rebuild the kernel, then pad and prepack the new weights, so
    the values copied back into the live storage are in the layout the kernel
    reads. Layers the update did not reach get their old kernel back.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    saved = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if isinstance(method, UnquantizedFusedMoEMethod) and isinstance(
            getattr(kernel, "fused_experts", None), CPUUnquantizedExperts
        ):
            saved.append((method, kernel))
            method.moe_kernel = None
    try:
        yield
    finally:
        for method, kernel in saved:
            if method.moe_kernel is None:
                method.moe_kernel = kernel


def _recover_reload(worker: Any, model: Any, error: BaseException) -> None:
    try:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        unfinished = []
        for name, module in model.named_modules():
            info = LAYERWISE_INFO.get(module)
            if info is not None and info.can_load() and info.load_numel > 0:
                # Rebuilding it now would fill the missing elements from
                # uninitialised memory; forgetting them restores the old tensors.
                info.loaded_weights = []
                info.load_numel = 0
                unfinished.append(name)
        with set_current_vllm_config(worker.vllm_config):
            finalize_layerwise_reload(model, worker.vllm_config.model_config)
        on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    except Exception as recovery_error:  # vLLM internals; any failure here means the model is unusable
        raise EngineWeightsBroken(
            f"weights apply failed ({type(error).__name__}: {error}) and recovery failed "
            f"({type(recovery_error).__name__}: {recovery_error}): restart the engine"
        ) from recovery_error
    if on_meta:
        raise EngineWeightsBroken(
            f"weights apply failed ({type(error).__name__}: {error}) and {len(on_meta)} parameters are still "
            f"unmaterialised (e.g. {on_meta[0]!r}): restart the engine"
        ) from error
    log.warning(
        "weights apply failed (%s: %s); recovered: %d unfinished modules keep their old tensors: %s",
        type(error).__name__, error, len(unfinished), unfinished,
    )


def _refresh_tied_modules(model: Any) -> None:
    """Repacks modules that share a parameter with an earlier module (a tied lm_head)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owners: dict[int, list[Any]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        for module in modules[1:]:
            method = getattr(module, "quant_method", None)
            # Only the unquantised embedding method is known to be safe to run
            # twice (it keeps the weight and only rebuilds the GEMM dispatch).
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
