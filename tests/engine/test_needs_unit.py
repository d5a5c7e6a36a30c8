"""derive_needs on a small torch model with hand-written loaders: each read pattern gives its region, or whole, fail-closed.

No engine: the model's load_weights hands each checkpoint tensor to its parameter's
weight_loader, as vLLM's models do; the loaders below read what a TP worker's loaders
read (a row block, a column block, padding, disjoint blocks, nothing) or do what must
make a tensor whole (change values, write elsewhere, fail).
"""

from __future__ import annotations

import torch

from weightsync.core import TensorSpec
from weightsync.core.rank_regions import RankRegions
from weightsync.core.regions import Region
from weightsync.engine.needs import derive_needs

ROWS, COLS = 8, 6


def _rows(param, w):  # a column-parallel shard: rows 4..8 (worker 1 of 2)
    param.data.copy_(w.narrow(0, 4, 4))


def _cols(param, w):  # a row-parallel shard: columns 0..3
    param.data.copy_(w.narrow(1, 0, 3))


def _padded(param, w):  # vocab-parallel last shard: rows 6..8 plus zero-filled padding
    param.data[:2].copy_(w.narrow(0, 6, 2))
    param.data[2:].fill_(0)


def _disjoint(param, w):  # a checkpoint-fused q/k/v: two row blocks
    param.data[:2].copy_(w.narrow(0, 0, 2))
    param.data[2:].copy_(w.narrow(0, 5, 2))


def _nothing(param, w):  # an expert another expert-parallel rank holds
    return


def _scaled(param, w):  # a transform: the values are not the checkpoint's
    param.data.copy_(w.narrow(0, 0, 4) * 2)


def _elsewhere(param, w):  # writes a real tensor besides the parameter
    torch.empty(w.shape).copy_(w)
    param.data.copy_(w)


def _indexed(param, w):  # an in-place write the probe does not count
    param.data[torch.tensor([0, 1])] = w.narrow(0, 0, 2)


def _fails(param, w):
    raise RuntimeError("no")


def _twice(param, w):  # reads the same block twice
    param.data[:4].copy_(w.narrow(0, 0, 4))
    param.data[4:].copy_(w.narrow(0, 0, 4))


LOADERS = {
    "rows": (_rows, (4, COLS), Region(0, 4, 4)),
    "cols": (_cols, (ROWS, 3), Region(1, 0, 3)),
    "padded": (_padded, (4, COLS), Region(0, 6, 2)),
    "whole": (None, (ROWS, COLS), Region.whole()),
    "vector": (lambda p, w: p.data.copy_(w.narrow(0, 2, 2)), (2,), Region(0, 2, 2)),
    "nothing": (_nothing, (ROWS, COLS), None),
    "disjoint": (_disjoint, (4, COLS), "2 disjoint blocks along dim 0"),
    "scaled": (_scaled, (4, COLS), "transforms the values (mul)"),
    "elsewhere": (_elsewhere, (ROWS, COLS), "writes into a real tensor"),
    "indexed": (_indexed, (ROWS, COLS), "writes in place with index_put_"),
    "fails": (_fails, (ROWS, COLS), "its loader raised RuntimeError on the probe: no"),
    "twice": (_twice, (ROWS, COLS), "reads 48 elements, not the 24 of one block"),
}


class Tiny(torch.nn.Module):
    """One parameter per loader; load_weights routes checkpoint name 'x.weight' to parameter x, as vLLM models do."""

    def __init__(self) -> None:
        super().__init__()
        for name, (loader, shape, _) in LOADERS.items():
            param = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
            if loader is not None:
                param.weight_loader = loader
            self.register_parameter(name, param)

    def load_weights(self, weights):
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        for name, w in weights:
            param = params[name.removesuffix(".weight")]
            getattr(param, "weight_loader", default_weight_loader)(param, w)


def test_each_read_pattern_gives_its_region_or_whole_with_the_reason():
    """Blocks along one dim become regions, padding reads nothing extra, a loader reading nothing means not needed; the rest is whole with why."""
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = {"vector": (4,)}
    specs = [TensorSpec(f"{n}.weight", shapes.get(n, (ROWS, COLS)), "float32") for n in LOADERS]
    needs = derive_needs(model, specs)
    for name, (_, _, expected) in LOADERS.items():
        key = f"{name}.weight"
        if isinstance(expected, str):
            assert needs.regions[key] == Region.whole(), name
            assert expected in needs.whole_fallbacks[key], (name, needs.whole_fallbacks.get(key))
        elif expected is None:
            assert key not in needs.regions, name
        else:
            assert needs.regions[key] == expected and key not in needs.whole_fallbacks, (name, needs.regions.get(key))
    # A dry run: nothing was written into the model, and every loader is back.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.rows.weight_loader is _rows and not hasattr(model.whole, "weight_loader")
    assert RankRegions(0, needs.regions, len(needs.whole_fallbacks)).num_bytes({s.name: s for s in specs}) == 4 * (4 * COLS + ROWS * 3 + 2 * COLS + ROWS * COLS + 2 + 6 * ROWS * COLS)
