"""Tiny random checkpoints (dense and MoE) that vLLM loads with no hub access.

Tests and demos need a real model directory (config, safetensors weights, a
tokenizer) without downloading anything. The shapes are the smallest that the
vLLM CPU attention backend accepts: it refuses head_dim below 32.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from weightsync.core import TensorSpec

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

__all__ = [
    "ARCHITECTURES",
    "TINY_VOCAB_SIZE",
    "make_tiny_model",
    "random_weights",
    "tiny_config",
]

logger = logging.getLogger(__name__)

TINY_VOCAB_SIZE = 1024
_MARKER = "weightsync_tiny_model.json"
_EOS_TOKEN = "<|endoftext|>"
_PAD_TOKEN = "<|pad|>"
# Wider than transformers' default 0.02: with hidden size 128 that default gives
# near-uniform logits, so greedy decoding would hinge on rounding-level ties and
# two correct implementations could pick different tokens.
DEFAULT_WEIGHT_STD = 0.08
_NORM_STD = 0.1
_DTYPES = ("float32", "bfloat16", "float16")


def tiny_config(arch: str = "llama", dtype: str = "float32") -> "PretrainedConfig":
    """The config of the tiny model: hidden 128, 4 heads, 2 KV heads (head_dim 32), 2 layers.

    MoE architectures get 4 experts of intermediate size 64, 2 per token.
    """
    import transformers

    _check_arch_dtype(arch, dtype)
    class_name, extra = _ARCH_CONFIGS[arch]
    common: dict[str, object] = dict(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    common.update(extra)
    config = getattr(transformers, class_name)(**common)
    config.dtype = dtype
    _set_architecture(config)
    return config


def _set_architecture(config: "PretrainedConfig") -> None:
    """Names the causal-LM class in the config, as save_pretrained of a model would: vLLM picks its model by it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]


# Test models only: which transformers config and what makes each architecture
# itself. The engine never looks at this table; its inventory comes from the
# checkpoint (inventory.py).
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
_ARCH_CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    # Qwen2 carries q/k/v biases and, like the small Qwen2.5 models, ties
    # lm_head to the embedding: both are paths the engine must get right.
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False, use_sliding_window=False)),
    # Qwen3: per-head RMSNorm on q and k (q_norm, k_norm), no q/k/v biases.
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(tie_word_embeddings=False, num_experts=4, norm_topk_prob=True, decoder_sparse_step=1, **_MOE),
    ),
    "mixtral": ("MixtralConfig", dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=64)),
    # Shared expert (always on, with its own sigmoid gate) beside the routed ones, as in DeepSeek.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(tie_word_embeddings=False, num_experts=4, shared_expert_intermediate_size=128,
             decoder_sparse_step=1, use_sliding_window=False, **_MOE),
    ),
    "gemma": ("GemmaConfig", dict(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
}
ARCHITECTURES = tuple(_ARCH_CONFIGS)


def random_weights(
    specs: Iterable[TensorSpec],
    seed: int,
    *,
    std: float = DEFAULT_WEIGHT_STD,
) -> dict[str, "torch.Tensor"]:
    """Deterministic random tensors for the given specs, in spec order.

    Norm weights are drawn around 1 and everything else (biases included, so a
    dropped bias changes the output) around 0. The same (specs, seed, std) give
    bit-identical tensors on every machine.
    """
    import torch

    from weightsync.engine.inventory import torch_dtype

    if std <= 0:
        raise ValueError(f"std {std}: expected > 0")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        values = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
        if _is_norm_weight(spec.name):
            values = 1.0 + _NORM_STD * values
        else:
            values = std * values
        out[spec.name] = values.to(torch_dtype(spec.dtype))
    return out


def make_tiny_model(
    model_dir: str | os.PathLike[str],
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Writes a tiny random model (weights, config, tokenizer) to model_dir once.

    A directory already holding the same (arch, seed, dtype) is reused as is, so
    concurrent test sessions can share one cache directory. The model is built
    in a sibling temporary directory and renamed into place, so a reader never
    sees a half-written model. An existing non-empty directory holding anything
    else is refused rather than overwritten.
    """
    _check_arch_dtype(arch, dtype)
    target = Path(model_dir)
    wanted = {"arch": arch, "seed": int(seed), "dtype": dtype, "format": 1}
    if _matches(target, wanted):
        return target
    if target.exists() and any(target.iterdir()):
        raise ValueError(
            f"{target} exists and does not hold the tiny model {wanted}: "
            "pass an empty or missing directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_model(staging, arch, seed, dtype)
        (staging / _MARKER).write_text(json.dumps(wanted, sort_keys=True) + "\n")
        try:
            # rename(2) replaces a missing or empty directory atomically.
            os.replace(staging, target)
        except OSError:
            if not _matches(target, wanted):
                raise
            logger.debug("another process wrote %s first; keeping its copy", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _matches(target: Path, wanted: Mapping[str, object]) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == dict(wanted)
    except (OSError, ValueError):
        return False


def _write_model(directory: Path, arch: str, seed: int, dtype: str) -> None:
    from safetensors.torch import save_file

    from weightsync.engine.inventory import inventory_from_config

    config = tiny_config(arch, dtype)
    # The checkpoint is written from the config-derived inventory (per-expert
    # names for MoE, no tied lm_head), as save_pretrained would write it;
    # tests check that transformers loads it back with nothing missing.
    weights = random_weights(inventory_from_config(config, dtype=dtype), seed)
    config.save_pretrained(directory)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _train_tokenizer(seed).save_pretrained(directory)


def _train_tokenizer(seed: int):
    """A byte-level BPE tokenizer trained on a generated corpus: no downloads."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + ["th", "sh", "ng", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + "." for _ in range(3000)]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[_EOS_TOKEN, _PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if tokenizer.get_vocab_size() > TINY_VOCAB_SIZE:
        raise AssertionError(f"tokenizer has {tokenizer.get_vocab_size()} tokens: expected <= {TINY_VOCAB_SIZE}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_EOS_TOKEN,
        eos_token=_EOS_TOKEN,
        pad_token=_PAD_TOKEN,
        model_max_length=512,
    )


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight")


def _check_arch_dtype(arch: str, dtype: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHITECTURES}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {_DTYPES}")
