"""The inventory derived from a config, and the update checks built on it (no vLLM needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from weightsync.core import InvalidArgument, TensorSpec
from weightsync.engine.inventory import apply_unit, check_update, inventory_from_config, inventory_from_model_dir
from weightsync.engine.models import tiny_config


def _checkpoint_specs(model_dir) -> list[tuple[str, tuple[int, ...], str]]:
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sorted(
            (k, tuple(f.get_slice(k).get_shape()), names[f.get_slice(k).get_dtype()]) for k in f.keys()
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inventory_equals_the_saved_checkpoint(model_dirs, arch):
    """Names, shapes and dtypes from the config alone equal what save_pretrained wrote."""
    specs = inventory_from_model_dir(model_dirs[arch])
    assert sorted((s.name, s.shape, s.dtype) for s in specs) == _checkpoint_specs(model_dirs[arch])


def test_tied_lm_head_is_left_out_and_untied_kept():
    """Qwen2 ties lm_head to the embedding, so only the embedding is listed; Llama lists both."""
    qwen = {s.name for s in inventory_from_config(tiny_config("qwen2"))}
    llama = {s.name for s in inventory_from_config(tiny_config("llama"))}
    assert "lm_head.weight" not in qwen and "model.embed_tokens.weight" in qwen
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= llama
    assert "model.layers.0.self_attn.q_proj.bias" in qwen
    assert "model.layers.0.self_attn.q_proj.bias" not in llama


def test_serving_dtype_is_applied_to_every_tensor():
    """Passing the serving dtype casts every spec, whatever the config says."""
    specs = inventory_from_config(tiny_config("llama", "float32"), "bfloat16")
    assert {s.dtype for s in specs} == {"bfloat16"}
    assert specs[0] == TensorSpec("model.embed_tokens.weight", (1024, 128), "bfloat16")


def test_apply_units_group_qkv_weights_with_biases():
    """q/k/v weights and biases load as one vLLM module, gate/up as another, norms alone."""
    assert apply_unit("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.self_attn.qkv_proj"
    assert apply_unit("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    assert apply_unit("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert apply_unit("model.norm.weight") == "model.norm"


def test_check_update_lists_every_problem():
    """Unknown names, shape and dtype mismatches, duplicates and split units are all reported at once."""
    inventory = {s.name: s for s in inventory_from_config(tiny_config("qwen2"))}
    update = [
        TensorSpec("model.layers.0.self_attn.q_proj.bias", (128,), "float32"),  # unit without its siblings
        TensorSpec("model.norm.weight", (64,), "float32"),
        TensorSpec("model.layers.1.input_layernorm.weight", (128,), "bfloat16"),
        TensorSpec("lm_head.weight", (1024, 128), "float32"),  # tied: not accepted
        TensorSpec("model.layers.1.input_layernorm.weight", (128,), "float32"),
    ]
    with pytest.raises(InvalidArgument) as info:
        check_update(inventory, update)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5, text
    assert "shape: expected [128], got [64]" in text
    assert "dtype: expected float32" in text
    assert "unknown tensor 'lm_head.weight'" in text
    assert "appears twice" in text
    assert "model.layers.0.self_attn.qkv_proj" in text


def test_check_update_accepts_whole_units_and_full_updates():
    """A partial update of whole modules passes; require_full refuses it and accepts the whole inventory."""
    specs = inventory_from_config(tiny_config("llama"))
    inventory = {s.name: s for s in specs}
    layer0 = [s for s in specs if s.name.startswith("model.layers.0.")]
    check_update(inventory, layer0)
    with pytest.raises(InvalidArgument, match="a full update lacks"):
        check_update(inventory, layer0, require_full=True)
    check_update(inventory, specs, require_full=True)


def test_engine_modules_import_without_vllm():
    """The inventory, payload, extension and adapter modules import without pulling in vLLM."""
    code = (
        "import sys, json\n"
        "import weightsync.engine.inventory, weightsync.engine.payload\n"
        "import weightsync.engine.extension, weightsync.engine.vllm_engine, weightsync.engine.receive\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == []
