"""A synthetic optimizer step: the next version of a bf16 model, with about FRACTION of its elements changed.

    new = step_like(base, fraction=0.02, seed=7)

What a real step looks like (bench/delta_change_stream.py, BENCHMARKS.md "A real change
stream"): with fp32 master weights and a bf16 wire, an element's bf16 value changes when its
master weight crosses a rounding boundary, so a change is almost always one unit in the last
place, the changed elements are scattered without structure, and the changed fraction
differs from tensor to tensor around the model's mean (the first steps, and small tensors
such as norms, change more). So per tensor a fraction is drawn log-normally around FRACTION
(then scaled so that the model's element-weighted mean is FRACTION), each element changes
independently with that probability, and a changed element moves one ulp up or down.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["change_stream", "changed_fraction", "step_like"]

# Spread of the per-tensor fraction (log-normal sigma). The real stream's tensors span about a
# factor of 2-3 either side of the mean at lr 1e-6 (gaps8 for most, indices for the sparser,
# dense for small tensors that change a lot); 0.5 gives that spread.
_SIGMA = 0.5
_INT = {2: torch.int16, 4: torch.int32}
_MAGNITUDE = {2: 0x7FFF, 4: 0x7FFFFFFF}


def step_like(base: Mapping[str, torch.Tensor], *, fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """`base` after one synthetic step: per tensor a fraction drawn around `fraction`, positions scattered, one ulp each."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not base:
        raise ValueError("base: expected at least one tensor, got none")
    g = torch.Generator().manual_seed(seed)
    names = list(base)
    numels = torch.tensor([base[n].numel() for n in names], dtype=torch.float64)
    # Median exp(mu) = fraction before the rescale; the rescale keeps the weighted mean exact.
    draws = torch.exp(torch.randn(len(names), generator=g, dtype=torch.float64) * _SIGMA - _SIGMA**2 / 2)
    per_tensor = (draws * fraction * numels.sum() / (draws * numels).sum()).clamp(max=1.0)
    out = {}
    for name, p in zip(names, per_tensor.tolist()):
        t = base[name]
        if t.element_size() not in _INT or not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a 16- or 32-bit float tensor, got {t.dtype}")
        bits = t.detach().contiguous().reshape(-1).view(_INT[t.element_size()]).clone()
        changed = torch.rand(bits.numel(), generator=g) < p
        # +-1 on the bit pattern is the neighbouring representable value: never the same value
        # for the finite, non-extreme weights a model holds. A zero (+0 or -0) steps by +1 only:
        # -0's pattern minus one would wrap to a NaN.
        sign = torch.where(torch.rand(bits.numel(), generator=g) < 0.5, -1, 1).to(bits.dtype)
        magnitude = bits & _MAGNITUDE[t.element_size()]
        step = torch.where(changed, torch.where(magnitude == 0, torch.ones_like(sign), sign), torch.zeros_like(sign))
        out[name] = (bits + step).view(t.dtype).reshape(t.shape)
    return out


def changed_fraction(base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """Element-weighted fraction of elements whose bits differ between `base` and `new`."""
    changed = total = 0
    for name, b in base.items():
        n = new[name]
        ib, inew = (x.contiguous().reshape(-1).view(_INT[x.element_size()]) for x in (b, n))
        changed += int((ib != inew).sum())
        total += b.numel()
    return changed / max(1, total)


def change_stream(specs, *, seed: int, steps: int, fraction: float = 0.02) -> dict[str, torch.Tensor]:
    """Version `steps` of a reproducible change stream: random tensors of `seed`, then `steps` calls of `step_like`."""
    from weightsync.dataplane.synthetic import random_tensor

    tensors = {s.name: random_tensor(s, seed) for s in specs}
    for i in range(steps):
        tensors = step_like(tensors, fraction=fraction, seed=seed * 1000 + i)
    return tensors
