"""Manifests of well-known model shapes and reproducible random tensors: for tests, benchmarks and dry runs."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from weightsync.core import TensorSpec
from weightsync.dataplane.layout import torch_dtype

__all__ = ["MODEL_SHAPES", "ModelShape", "random_tensor", "random_tensors"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A Llama/Qwen2-style decoder, enough to list its Hugging Face tensors."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool

    def __post_init__(self) -> None:
        fields = (self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)
        if min(fields + (self.intermediate_size, self.vocab_size)) <= 0:
            raise ValueError(f"every size of a ModelShape must be > 0: {self}")

    def manifest(self, dtype: str = "bfloat16") -> list[TensorSpec]:
        """Tensor specs in the order of transformers' state_dict()."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        specs = [TensorSpec("model.embed_tokens.weight", (self.vocab_size, h), dtype)]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                specs.append(TensorSpec(f"{p}self_attn.{proj}.weight", (rows, h), dtype))
                if self.qkv_bias:
                    specs.append(TensorSpec(f"{p}self_attn.{proj}.bias", (rows,), dtype))
            specs += [
                TensorSpec(f"{p}self_attn.o_proj.weight", (h, q), dtype),
                TensorSpec(f"{p}mlp.gate_proj.weight", (self.intermediate_size, h), dtype),
                TensorSpec(f"{p}mlp.up_proj.weight", (self.intermediate_size, h), dtype),
                TensorSpec(f"{p}mlp.down_proj.weight", (h, self.intermediate_size), dtype),
                TensorSpec(f"{p}input_layernorm.weight", (h,), dtype),
                TensorSpec(f"{p}post_attention_layernorm.weight", (h,), dtype),
            ]
        specs.append(TensorSpec("model.norm.weight", (h,), dtype))
        if not self.tie_word_embeddings:
            specs.append(TensorSpec("lm_head.weight", (self.vocab_size, h), dtype))
        return specs


MODEL_SHAPES: dict[str, ModelShape] = {
    # From the models' config.json files.
    "qwen2.5-0.5b": ModelShape(896, 24, 14, 2, 64, 4864, 151936, tie_word_embeddings=True, qkv_bias=True),
    "qwen2.5-1.5b": ModelShape(1536, 28, 12, 2, 128, 8960, 151936, tie_word_embeddings=True, qkv_bias=True),
    "llama-8b": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, tie_word_embeddings=False, qkv_bias=False),
    # Small enough for fast tests, with every kind of tensor the large ones have.
    "tiny": ModelShape(64, 2, 4, 2, 16, 128, 256, tie_word_embeddings=True, qkv_bias=True),
}


def random_tensor(spec: TensorSpec, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Random bytes (any bit pattern, NaNs included) for one spec, the same for the same (spec.name, seed)."""
    # torch's CPU generator keeps only the low 32 bits of its seed: mix the seed in there.
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}/{spec.name}".encode()))
    dtype = torch_dtype(spec.dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=gen, dtype=torch.bool).to(device)
    nbytes = spec.nbytes
    # One draw per 4 bytes rather than per byte; trimmed to the tensor's size.
    words = torch.randint(-(2**31), 2**31, ((nbytes + 3) // 4,), generator=gen, dtype=torch.int64).to(torch.int32)
    raw = words.view(torch.uint8)[:nbytes]
    return raw.view(dtype).reshape(spec.shape).to(device)


def random_tensors(specs: Iterable[TensorSpec], seed: int, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    for spec in specs:
        yield spec.name, random_tensor(spec, seed, device)
