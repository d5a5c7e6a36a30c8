"""The loader dry run's bookkeeping on a small torch model with a vLLM-style load_weights (no vLLM needed).

The real-engine side is tests/engine/test_architectures.py (nine architectures, no
problems) and test_loader_check.py (skipped tensors); this covers the outcomes that
no served tiny model produces: a loader that raises for one name, a parameter no
name fills, a module split across apply units, and a loader that fails outright.
"""

from __future__ import annotations

import torch

from weightsync.core import TensorSpec
from weightsync.engine.loader_check import dry_run_loader


class _Model(torch.nn.Module):
    """q/k/v stacked into qkv_proj as vLLM does; unknown names raise KeyError; `.bias` without a parameter is skipped."""

    def __init__(self, fail_at_end: bool = False) -> None:
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.qkv_proj = torch.nn.Linear(4, 12, bias=False)
        self.norm = torch.nn.Linear(4, 4, bias=False)
        self.orphan = torch.nn.Linear(4, 4, bias=False)
        self.fail_at_end = fail_at_end

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            if name.endswith(".bias") and name not in params:
                continue
            for shard in ("q", "k", "v"):
                if name == f"attn.{shard}_proj.weight":
                    params["attn.qkv_proj.weight"].weight_loader(params["attn.qkv_proj.weight"], tensor, shard)
                    break
            else:
                param = params[name]
                param.weight_loader(param, tensor)
        if self.fail_at_end:
            raise RuntimeError("post-load check failed")


def _specs(*names: str) -> list[TensorSpec]:
    return [TensorSpec(n, (4, 4), "float32") for n in names]


def test_dry_run_maps_names_and_lists_every_disagreement():
    """Stacked names land in one parameter; skipped, rejected and unfilled ones are each reported; nothing is written."""
    model = _Model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    qkv = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
    specs = _specs(*qkv, "norm.weight", "norm.bias", "extra.weight")
    check = dry_run_loader(model, specs)
    assert check.targets["attn.k_proj.weight"] == ["attn.qkv_proj.weight"]
    assert check.skipped == ["norm.bias"]
    assert list(check.rejected) == ["extra.weight"] and "KeyError" in check.rejected["extra.weight"]
    assert check.unfilled == ["orphan.weight"]
    assert check.split_modules == {}
    assert [s.name for s in check.accepted(specs)] == [*qkv, "norm.weight"]
    assert len(check.problems()) == 3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all("weight_loader" not in p.__dict__ for p in model.parameters())


def test_module_filled_by_two_apply_units_is_reported():
    """Two names landing in one vLLM module but in different core.apply_unit groups break the unit rule."""
    model = _Model()
    model.load_weights = lambda weights: [model.norm.weight.weight_loader(model.norm.weight, t) for _, t in weights]
    check = dry_run_loader(model, _specs("a.weight", "b.weight"))
    assert check.split_modules == {"norm": ["a", "b"]}


def test_loader_failing_outside_any_tensor_leaves_the_inventory_unchecked():
    """A loader that fails after the last name keeps every name and says the check did not run."""
    specs = _specs("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
    check = dry_run_loader(_Model(fail_at_end=True), specs)
    assert check.accepted(specs) == specs
    assert check.problems() == [
        "the dry run of vLLM's loader failed, so the checkpoint's names are unchecked: RuntimeError: post-load check failed"
    ]
