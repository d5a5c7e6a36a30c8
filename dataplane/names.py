"""torchtitan (Meta-style) parameter names and layouts -> Hugging Face, for Llama-style models.

Meta checkpoints keep each head's rotary pairs interleaved (x0, x1), (x2, x3), ...;
Hugging Face rotates the two halves of a head against each other. The q and k
projections (weights and biases) are therefore permuted, as transformers'
convert_llama_weights_to_hf does: w.view(heads, dim1 // heads // 2, 2, ...)
.transpose(1, 2).reshape(w.shape), with num_kv_heads for k.

MoE experts live stacked in torchtitan as [num_experts, out, in] (the per-expert
nn.Linear layout) under layers.N.moe.experts.w{1,2,3} (torchtitan before 0.3) or
layers.N.moe.routed_experts.inner_experts.w1_EFD / w3_EFD / w2_EDF (0.3); expert
e becomes model.layers.N.mlp.experts.e.{gate,down,up}_proj.weight. Shared
experts, the router and the router's expert bias follow the names torchtitan
0.3's own DeepSeek-V3 and Qwen3 state-dict adapters use (their `from_hf_map`).

Why not call torchtitan's adapters (`StateDictAdapter.to_hf`) directly: torchtitan
is not a dependency of the trainer side, its adapters need the torchtitan model
config, and `to_hf` splits a sharded (DTensor) expert weight into this rank's
local experts only, at once. weightsync needs every expert of the full tensor
and gathers lazily (one source tensor at a time, as the sender packs it), so it
keeps the name tables here, checked against torchtitan's in tests/dataplane/test_names.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from weightsync.core import TensorSpec
from weightsync.dataplane.deferred import DeferredTensor, materialize

__all__ = ["TitanToHF", "rotary_permute"]

_FIXED = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.expert_bias_E": "mlp.gate.e_score_correction_bias",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_EXPERTS = re.compile(
    r"^moe\.(?:experts\.(w1|w2|w3)(?:\.weight)?|routed_experts\.inner_experts\.(w1|w3)_EFD|routed_experts\.inner_experts\.(w2)_EDF)$"
)
_EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def rotary_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Meta -> Hugging Face rotary layout along dim 0 of a q/k weight ([dim1, dim2]) or bias ([dim1])."""
    dim1 = w.shape[0]
    if dim1 % (2 * num_heads):
        raise ValueError(f"rotary permute: dim 0 of size {dim1} is not divisible by 2 * {num_heads} heads")
    rest = tuple(w.shape[1:])
    return w.reshape(num_heads, dim1 // num_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# One rule: the HF name(s) and how to cut each HF tensor out of the (full) source tensor.
_Piece = tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True, slots=True)
class TitanToHF:
    """Maps torchtitan Llama-style names and layouts to Hugging Face ones.

    head_dim, when given, is checked against the q/k shapes. With tie_word_embeddings the
    output projection is dropped (Hugging Face ties lm_head to the embedding).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0:
            raise ValueError(f"num_heads {self.num_heads} and num_kv_heads {self.num_kv_heads}: expected > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ValueError(f"head_dim {self.head_dim}: expected a positive even number (rotary pairs)")

    def _permuter(self, name: str, shape: tuple[int, ...], heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.head_dim is not None and shape[0] != heads * self.head_dim:
            raise ValueError(
                f"{name}: dim 0 is {shape[0]}, expected {heads} heads * head_dim {self.head_dim} = {heads * self.head_dim}"
            )
        if shape[0] % (2 * heads):
            raise ValueError(f"{name}: dim 0 of size {shape[0]} is not divisible by 2 * {heads} heads")
        return lambda t: rotary_permute(t, heads)

    def _pieces(self, name: str, shape: tuple[int, ...]) -> list[_Piece]:
        identity: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731
        if name in _FIXED:
            if name == "output.weight" and self.tie_word_embeddings:
                return []
            return [(_FIXED[name], shape, identity)]
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a known torchtitan Llama-style parameter name")
        layer, part = m.groups()
        prefix = f"model.layers.{layer}."
        if part in _LAYER_PARTS:
            hf = prefix + _LAYER_PARTS[part]
            if part.startswith("attention.wq."):
                return [(hf, shape, self._permuter(name, shape, self.num_heads))]
            if part.startswith("attention.wk."):
                return [(hf, shape, self._permuter(name, shape, self.num_kv_heads))]
            return [(hf, shape, identity)]
        e = _EXPERTS.match(part)
        if e is not None:
            if len(shape) != 3:
                raise ValueError(f"{name}: stacked expert weights must be [num_experts, out, in], got {list(shape)}")
            proj = _EXPERT_PROJ[next(g for g in e.groups() if g)]
            return [
                (f"{prefix}mlp.experts.{i}.{proj}.weight", shape[1:], lambda t, i=i: t[i])
                for i in range(shape[0])
            ]
        raise ValueError(f"{name!r} is not a known torchtitan Llama-style parameter name")

    def map(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The Hugging Face (name, tensor) pairs for one torchtitan parameter (a DTensor is gathered first)."""
        pieces = self._pieces(name, tuple(tensor.shape))
        if not pieces:
            return []
        full = materialize(tensor)
        return [(hf, cut(full)) for hf, _, cut in pieces]

    def map_manifest(self, specs: Iterable[TensorSpec]) -> list[TensorSpec]:
        """The Hugging Face manifest (names, shapes, dtypes) for torchtitan specs, in the same order."""
        return [TensorSpec(hf, hf_shape, s.dtype) for s in specs for hf, hf_shape, _ in self._pieces(s.name, s.shape)]

    def map_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, DeferredTensor]:
        """HF name -> DeferredTensor: nothing is gathered or permuted until the sender packs it.

        A source tensor cut into several HF tensors (stacked experts) is gathered once and
        kept only until its last piece is packed.
        """
        out: dict[str, DeferredTensor] = {}
        for name, t in state_dict.items():
            pieces = self._pieces(name, tuple(t.shape))
            shared = _SharedSource(t, len(pieces))
            for hf, hf_shape, cut in pieces:
                out[hf] = DeferredTensor(hf_shape, t.dtype, lambda s=shared, c=cut: c(s.take()), t.device)
        return out


class _SharedSource:
    """Gathers a source tensor on first use and forgets it after its last use."""

    def __init__(self, tensor: torch.Tensor, uses: int) -> None:
        self._tensor = tensor
        self._uses = uses
        self._full: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        if self._uses <= 0:
            raise ValueError("a torchtitan tensor was asked for more pieces than it has")
        if self._full is None:
            self._full = materialize(self._tensor)
        full = self._full
        self._uses -= 1
        if self._uses == 0:
            self._full = None
        return full
