"""Tiny random Llama and Qwen2 checkpoints that vLLM loads with no hub access.

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

ARCHITECTURES = ("llama", "qwen2")
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
    """The config of the tiny model: hidden 128, 4 heads, 2 KV heads (head_dim 32), 2 layers."""
    from transformers import LlamaConfig, Qwen2Config

    _check_arch_dtype(arch, dtype)
    common = dict(
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
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **common)
    else:
        # Qwen2 carries q/k/v biases and, like the small Qwen2.5 models, ties
        # lm_head to the embedding: both are paths the engine must get right.
        config = Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common)
    config.dtype = dtype
    return config


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
    import torch
    from transformers import AutoModelForCausalLM

    from weightsync.engine.inventory import inventory_from_config

    config = tiny_config(arch, dtype)
    specs = inventory_from_config(config, dtype=dtype)
    weights = random_weights(specs, seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # assign=True adopts our tensors instead of copying into meta storage;
    # strict=False because a tied lm_head is not part of the inventory.
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if unexpected:
        raise AssertionError(f"tiny model does not know tensors {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise AssertionError(f"tiny model left tensors {still_meta} uninitialised (missing {missing})")
    model.save_pretrained(directory, safe_serialization=True)
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
