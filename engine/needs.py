"""What this vLLM worker's loader reads of each checkpoint tensor: its needs, derived from vLLM itself.

A tensor-parallel worker's loader keeps a block of most checkpoint tensors (the
rows of a column-parallel shard, the columns of a row-parallel one, its q/k/v or
gate/up part of a fused parameter, its vocab rows, its slice of every expert) and
all of a replicated one. The many-senders data path sends each worker only that
block (core/regions.py, ../shared/DATAPATH.md), so the block must be exactly what
the loader reads: a block one element too small corrupts the model.

How it is derived: no per-architecture table, and not vLLM's `m2n_layout.py`
either (it derives a shard dim from a small set of known loaders and falls back
to whole tensors for every fused parameter, q/k/v, gate/up and MoE experts
included). Instead the model's own `load_weights` runs, once per tensor dim d,
over tensors whose values are their index along d (plus one, so that a loader's
zero-fill of padding never looks like index 0); each parameter's weight_loader is
swapped for a probe that calls the *original* loader on a meta-device copy of
the parameter in its model format (vLLM's reload metadata, the shapes and
attributes it had before CPU repacking). A TorchDispatchMode intercepts every
`copy_` into that meta parameter and keeps its source values: the indices along
d the loader read. Nothing is written anywhere (the destination is on meta).

Per tensor, the reads are one block along at most one dim, or the region cannot
be stated as a Region and the tensor is declared whole (a "whole fallback",
counted): e.g. Phi-3's checkpoint-fused `qkv_proj` at TP 2 reads three disjoint
row blocks. The probe is fail-closed: an op that could change values on their
way to the parameter (anything but views, copies, concatenation and lossless
casts), a write into a real tensor, a count of elements read that is not the
block's, or any error makes the tensor whole. A loader that is called but reads
nothing (e.g. an expert another expert-parallel rank holds) means the tensor is
not needed by this worker.

What is assumed (and checked per architecture by tests/engine/test_needs_poison.py,
which poisons everything outside the declared regions): the model's load_weights
writes checkpoint data only through weight_loaders (the names loader_check.py
accepted all reach one), and reads a tensor the same way whatever its values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from weightsync.core import TensorSpec
from weightsync.core.rank_regions import RankRegions
from weightsync.core.regions import Region

__all__ = ["WorkerNeeds", "derive_needs", "rank_regions_from_workers"]

log = logging.getLogger(__name__)

# float32 holds every integer up to 2^24 exactly; a longer dim is declared whole.
_MAX_EXACT_INDEX = 1 << 24

# Ops that only move, view or losslessly widen values: a value that reaches a
# parameter through them is still the index it was read at. Anything else that
# produces a floating tensor while a probe runs makes that tensor whole.
_MOVING_OPS = {
    "alias", "as_strided", "cat", "clone", "contiguous", "detach", "empty_like", "expand", "flatten",
    "index_select", "lift_fresh", "narrow", "permute", "reshape", "select", "slice", "split",
    "split_with_sizes", "squeeze", "stack", "t", "transpose", "unbind", "unflatten", "unsqueeze",
    "view", "_unsafe_view", "_reshape_alias", "chunk", "unsafe_split", "unsafe_split_with_sizes",
    "new_empty", "empty", "empty_strided", "zeros", "zeros_like", "fill", "zero",
}
_LOSSLESS_DTYPES = ("float32", "float64")


@dataclass(slots=True)
class WorkerNeeds:
    """One worker's needs: checkpoint name -> region read; names absent are not needed."""

    regions: dict[str, Region] = field(default_factory=dict)
    # Names declared whole because their region could not be derived, with why.
    whole_fallbacks: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, so that the result survives collective_rpc across processes."""
        return {
            "regions": [[n, r.dim, r.start, r.length] for n, r in self.regions.items()],
            "whole_fallbacks": dict(self.whole_fallbacks),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkerNeeds":
        return cls(
            regions={str(n): Region(int(dim), int(start), int(length)) for n, dim, start, length in d["regions"]},
            whole_fallbacks={str(k): str(v) for k, v in d.get("whole_fallbacks", {}).items()},
        )


def rank_regions_from_workers(results: Sequence[dict[str, Any]]) -> tuple[RankRegions, ...]:
    """Each worker's weightsync_needs result as the RankRegions of its rank (vLLM's worker rank), in rank order."""
    out = []
    for result in sorted(results, key=lambda r: int(r["rank"])):
        needs = WorkerNeeds.from_dict(result)
        out.append(RankRegions(int(result["rank"]), needs.regions, len(needs.whole_fallbacks)))
    return tuple(out)


@dataclass(slots=True)
class _Reads:
    """What the probes saw of one checkpoint tensor over all passes."""

    shape: tuple[int, ...]
    # per dim: how often each index (bin i + 1) was read
    counts: dict[int, Any] = field(default_factory=dict)
    # the dims whose pass called a loader for it
    called: set[int] = field(default_factory=set)
    unsafe: str = ""

    def mark(self, why: str) -> None:
        self.unsafe = self.unsafe or why


def derive_needs(model: Any, specs: Sequence[TensorSpec], vllm_config: Any = None) -> WorkerNeeds:
    """Runs the model's load_weights over index-encoded tensors (see the module docstring)."""
    import contextlib

    import torch

    from weightsync.engine.loader_check import swap_weight_loader

    reads = {s.name: _Reads(tuple(s.shape)) for s in specs}
    probe = _Probe(model, reads)
    restores = [swap_weight_loader(p, probe.loader_for(p)) for p in model.parameters()]
    if vllm_config is not None:
        from vllm.config import set_current_vllm_config

        context = set_current_vllm_config(vllm_config)
    else:
        context = contextlib.nullcontext()
    try:
        with context, torch.no_grad():
            for dim in range(max((len(s.shape) for s in specs), default=0)):
                probe.dim = dim
                todo = [s for s in specs if dim < len(s.shape) and not reads[s.name].unsafe]
                while todo:
                    probe.yielded = []
                    try:
                        with probe.recorder:
                            model.load_weights(_index_tensors(todo, dim, probe))
                        break
                    except Exception as e:  # the loader refused an encoded tensor: that one is whole, the rest go on
                        name = probe.current
                        log.debug("needs: load_weights failed on %r in pass %d", name, dim, exc_info=True)
                        if name not in reads:
                            for r in reads.values():
                                r.mark(f"load_weights raised {type(e).__name__} outside any tensor: {e}")
                            break
                        reads[name].mark(f"load_weights raised {type(e).__name__}: {e}")
                        done = set(probe.yielded)
                        todo = [s for s in todo if s.name not in done]
                    finally:
                        probe.current = None
    finally:
        for restore in restores:
            restore()
    needs = WorkerNeeds()
    for spec in specs:
        region, why = _region(spec, reads[spec.name])
        if why:
            needs.whole_fallbacks[spec.name] = why
            needs.regions[spec.name] = Region.whole()
        elif region is not None:
            needs.regions[spec.name] = region
    return needs


def _index_tensors(specs: Sequence[TensorSpec], dim: int, probe: "_Probe") -> Iterator[tuple[str, Any]]:
    """Each tensor as values index + 1 along `dim`, expanded (no memory of its own)."""
    import torch

    for spec in specs:
        # Made with no current tensor, so the recorder does not count these ops as a loader's.
        probe.current = None
        size = spec.shape[dim]
        if size >= _MAX_EXACT_INDEX:
            probe.reads[spec.name].mark(f"dim {dim} has {size} indices, more than float32 holds exactly")
            continue
        view = [1] * len(spec.shape)
        view[dim] = size
        values = torch.arange(1, size + 1, dtype=torch.float32).view(view).expand(spec.shape)
        probe.current = spec.name
        probe.yielded.append(spec.name)
        yield spec.name, values
    probe.current = None


class _Probe:
    """Stands in for every weight_loader: runs the original on a meta copy; its recorder counts what was read."""

    def __init__(self, model: Any, reads: dict[str, _Reads]) -> None:
        self.reads = reads
        self.current: str | None = None
        self.dim = 0
        self.in_loader = False
        # names handed to load_weights in the current attempt of the current pass
        self.yielded: list[str] = []
        self.recorder = _read_recorder(self)
        # id(live parameter) -> (its module, its attribute name)
        self._owner: dict[int, tuple[Any, str]] = {}
        # Attributes (loader included) of each live parameter before its loader is swapped for a probe.
        self._live_attrs: dict[int, dict[str, Any]] = {}
        for module in model.modules():
            for attr, p in module.named_parameters(recurse=False):
                # A tied parameter keeps its first owner (the embedding), as named_parameters() does.
                self._owner.setdefault(id(p), (module, attr))
                self._live_attrs.setdefault(id(p), p.__dict__.copy())

    def loader_for(self, param: Any):
        def probe(*args: Any, **kwargs: Any) -> bool:
            # Loaders are called as (param, loaded_weight, ...) or with those as keywords (FusedMoE).
            self._run(param, list(args), kwargs)
            # FusedMoE's loader reports success (return_success=True); others ignore it.
            return True

        return probe

    def _run(self, param: Any, args: list, kwargs: dict) -> None:
        r = self.reads.get(self.current) if self.current is not None else None
        if r is None:
            return
        r.called.add(self.dim)
        if r.unsafe:
            return
        self.in_loader = True
        try:
            target = self._meta_copy(param)
            if args:
                args[0] = target
            else:
                kwargs["param"] = target
            _original_loader(target)(*args, **kwargs)
        except Exception as e:  # any failure of the real loader on the probe: declare the tensor whole
            log.debug("needs: the loader of %r failed on the probe", self.current, exc_info=True)
            r.mark(f"its loader raised {type(e).__name__} on the probe: {e}")
        finally:
            self.in_loader = False

    def _meta_copy(self, param: Any) -> Any:
        """The parameter in its model format (before CPU repacking), on meta, bound to its layer."""
        import torch
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

        module, attr = self._owner[id(param)]
        info = LAYERWISE_INFO.get(module)
        source = info.restore_metadata[0].get(attr) if info is not None else None
        # Not recorded (e.g. `bias`, never moved to meta): its live shape is its model format.
        attrs = source.__dict__ if source is not None else self._live_attrs[id(param)]
        source = param if source is None else source
        # float32 whatever the serving dtype, so a loader's cast to the parameter's dtype keeps indices exact.
        target = torch.empty(tuple(source.shape), dtype=torch.float32, device="meta")
        target.__class__ = source.__class__
        target.__dict__ = attrs.copy()
        return restore_layer_refs(target, module)


def _original_loader(target: Any):
    from vllm.model_executor.model_loader.reload.layerwise import _get_original_loader

    # vLLM's own unwrapping of its layerwise-reload wrappers; default_weight_loader when none is set.
    return _get_original_loader(target)


def _read_recorder(probe: _Probe):
    """A TorchDispatchMode over a whole load_weights pass (a factory: torch is imported lazily)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        """Never runs a copy into a meta tensor; counts the indices it would have copied."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            r = probe.reads.get(probe.current) if probe.current is not None else None
            op = func.overloadpacket.__name__
            if r is None:
                return func(*args, **kwargs)
            if op == "copy_":
                dst, src = args[0], args[1]
                if not dst.is_meta:
                    r.mark("its loader writes into a real tensor, not only the parameter")
                elif probe.in_loader and isinstance(src, torch.Tensor) and not src.is_meta and src.numel():
                    self._count(r, src)
                return dst
            if op in ("fill_", "zero_"):
                # Padding a parameter (vocab rows past the checkpoint's): reads nothing.
                if not args[0].is_meta:
                    r.mark(f"its loader writes into a real tensor with {op}")
                    return args[0]
                return func(*args, **kwargs)
            if op.endswith("_"):
                # Values written by any other in-place op are not counted: whole. Never into a real
                # tensor (it may be the live model's).
                r.mark(f"its loader writes in place with {op}")
                return func(*args, **kwargs) if args[0].is_meta else args[0]
            out = func(*args, **kwargs)
            if op == "_to_copy":
                dtype = str(kwargs.get("dtype", torch.float32)).removeprefix("torch.")
                if dtype not in _LOSSLESS_DTYPES and _is_float(out):
                    r.mark(f"its loader casts to {dtype}")
            elif op not in _MOVING_OPS and _is_float(out):
                r.mark(f"its loader transforms the values ({op})")
            return out

        def _count(self, r: _Reads, src: Any) -> None:
            size = r.shape[probe.dim]
            # Along a dim of stride 0 (still a view of the expanded index tensor) every element is
            # the same memory, so the same value: count one and multiply. The usual loader then
            # costs O(indices along dim), not O(elements read), whatever the model's size.
            values, multiplicity = src.detach(), 1
            for d in range(values.dim()):
                if values.stride(d) == 0 and values.shape[d] > 1:
                    multiplicity *= values.shape[d]
                    values = values.narrow(d, 0, 1)
            values = values.reshape(-1)
            as_int = values.to(torch.int64)
            if not torch.equal(as_int.to(values.dtype), values) or int(as_int.min()) < 1 or int(as_int.max()) > size:
                r.mark("its loader copies values that are not indices of the tensor")
                return
            counts = torch.bincount(as_int, minlength=size + 1) * multiplicity
            prev = r.counts.get(probe.dim)
            r.counts[probe.dim] = counts if prev is None else prev + counts

    return Recorder()


def _is_float(out: Any) -> bool:
    import torch

    items = out if isinstance(out, (list, tuple)) else (out,)
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta for t in items)


def _region(spec: TensorSpec, r: _Reads) -> tuple[Region | None, str]:
    """(region, "") when derived; (None, "") when not needed; (None, why) when declared whole."""
    if r.unsafe:
        return None, r.unsafe
    if not spec.shape:
        # A 0-d tensor has no dim to encode an index along: whole (one element, not worth a fallback).
        return Region.whole(), ""
    dims = range(len(spec.shape))
    if not all(d in r.called for d in dims):
        return None, "its loader was not called in every pass"
    blocks: list[tuple[int, int]] = []
    totals: set[int] = set()
    for d in dims:
        counts = r.counts.get(d)
        counts_list: list[int] = [] if counts is None else counts[1:].tolist()
        read = [i for i, c in enumerate(counts_list) if c]
        totals.add(sum(counts_list))
        if not read:
            blocks.append((0, 0))
            continue
        lo, hi = read[0], read[-1] + 1
        if hi - lo != len(read):
            return None, f"it reads {_runs(read)} disjoint blocks along dim {d}"
        blocks.append((lo, hi))
    if totals == {0}:
        return None, ""
    if len(totals) != 1:
        return None, f"its passes counted different numbers of elements read {sorted(totals)}"
    (total,) = totals
    if total != math.prod(hi - lo for lo, hi in blocks):
        return None, f"it reads {total} elements, not the {math.prod(hi - lo for lo, hi in blocks)} of one block (some twice?)"
    narrowed = [(d, lo, hi) for d, (lo, hi) in enumerate(blocks) if hi - lo < spec.shape[d]]
    if not narrowed:
        return Region.whole(), ""
    if len(narrowed) > 1:
        return None, f"it reads a block along {len(narrowed)} dims {[d for d, _, _ in narrowed]}"
    d, lo, hi = narrowed[0]
    return Region(d, lo, hi - lo), ""


def _runs(indices: list[int]) -> int:
    return 1 + sum(1 for a, b in zip(indices, indices[1:]) if b != a + 1)
