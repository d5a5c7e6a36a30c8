"""The inventory from checkpoint headers or a config, and the update checks built on it (no vLLM needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsync.core import InvalidArgument, TensorSpec
from weightsync.engine.inventory import (
    apply_unit,
    check_update,
    inventory_from_checkpoint,
    inventory_from_config,
    inventory_from_model_dir,
    read_safetensors_header,
)
from weightsync.engine.models import ARCHITECTURES, tiny_config


def _checkpoint_specs(model_dir) -> list[tuple[str, tuple[int, ...], str]]:
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sorted(
            (k, tuple(f.get_slice(k).get_shape()), names[f.get_slice(k).get_dtype()]) for k in f.keys()
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_inventory_equals_the_checkpoint_headers(model_dirs, arch):
    """For every architecture, MoE included, the config-only inventory names what the checkpoint holds."""
    from_headers = inventory_from_model_dir(model_dirs[arch])
    assert sorted((s.name, s.shape, s.dtype) for s in from_headers) == _checkpoint_specs(model_dirs[arch])
    from_config = inventory_from_config(tiny_config(arch))
    assert from_config == from_headers


def test_moe_inventory_has_per_expert_names():
    """transformers keeps experts fused in memory; the inventory lists them per expert, as checkpoints do."""
    names = {s.name for s in inventory_from_config(tiny_config("qwen3_moe"))}
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    mixtral = {s.name: s.shape for s in inventory_from_config(tiny_config("mixtral"))}
    assert mixtral["model.layers.1.block_sparse_moe.experts.2.w1.weight"] == (64, 128)


def test_headers_are_read_without_tensor_data(tmp_path):
    """A checkpoint cut off right after its header still gives every name, shape and dtype."""
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.int64)}, str(path))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    path.write_bytes(path.read_bytes()[: 8 + header_len])
    assert read_safetensors_header(path) == {"a.weight": ("bfloat16", (4, 8)), "b": ("int64", (3,))}
    # Floating tensors take the serving dtype; integer ones keep theirs.
    assert inventory_from_checkpoint(tmp_path, "float32") == (
        TensorSpec("a.weight", (4, 8), "float32"),
        TensorSpec("b", (3,), "int64"),
    )


def test_sharded_checkpoint_is_read_through_its_index(model_dirs, tmp_path):
    """A checkpoint split into shards with model.safetensors.index.json gives the same inventory."""
    from safetensors.torch import load_file

    tensors = load_file(str(model_dirs["qwen3_moe"] / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(tmp_path / file))
    weight_map = {n: file for file, members in shards.items() for n in members}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(model_dirs["qwen3_moe"] / "config.json", tmp_path / "config.json")
    assert inventory_from_model_dir(tmp_path) == inventory_from_model_dir(model_dirs["qwen3_moe"])


def test_bad_checkpoints_are_refused_with_the_file_and_field(tmp_path):
    """A damaged header or index names the file and what was expected."""
    (tmp_path / "model.safetensors").write_bytes((10**12).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="header length 1000000000000 bytes: expected at most"):
        inventory_from_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ValueError, match="field 'weight_map'"):
        inventory_from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="no safetensors checkpoint"):
        inventory_from_checkpoint(tmp_path / "missing")


def test_inventory_keeps_each_apply_unit_together():
    """Members of one unit (q/k/v, all experts of a layer) are adjacent, so vLLM buffers one module at a time."""
    for arch in ("qwen2", "qwen3_moe"):
        units = [apply_unit(s.name) for s in inventory_from_config(tiny_config(arch))]
        runs = [u for i, u in enumerate(units) if i == 0 or units[i - 1] != u]
        assert len(runs) == len(set(runs)), arch


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
    assert TensorSpec("model.embed_tokens.weight", (1024, 128), "bfloat16") in specs


def test_apply_units_group_qkv_weights_with_biases():
    """q/k/v weights and biases load as one vLLM module, gate/up as another, norms alone."""
    assert apply_unit("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.self_attn.qkv_proj"
    assert apply_unit("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    assert apply_unit("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert apply_unit("model.norm.weight") == "model.norm"


def test_apply_units_put_every_expert_of_a_layer_together():
    """All experts of one MoE layer (gate, up, down) form one unit; router and shared expert are their own."""
    assert apply_unit("model.layers.2.mlp.experts.0.gate_proj.weight") == "model.layers.2.mlp.experts"
    assert apply_unit("model.layers.2.mlp.experts.7.down_proj.weight") == "model.layers.2.mlp.experts"
    assert apply_unit("model.layers.2.block_sparse_moe.experts.1.w3.weight") == "model.layers.2.block_sparse_moe.experts"
    assert apply_unit("model.layers.2.mlp.gate.weight") == "model.layers.2.mlp.gate"
    assert apply_unit("model.layers.2.mlp.shared_expert.up_proj.weight") == "model.layers.2.mlp.shared_expert.gate_up_proj"


def test_moe_manifest_missing_an_expert_or_with_a_wrong_shape_is_refused():
    """One expert left out, or an expert of the wrong shape: refused with one message per problem."""
    specs = inventory_from_config(tiny_config("qwen3_moe"))
    inventory = {s.name: s for s in specs}
    missing = "model.layers.1.mlp.experts.2.up_proj.weight"
    wrong = "model.layers.0.mlp.experts.1.down_proj.weight"
    update = [s for s in specs if s.name != missing]
    update = [TensorSpec(s.name, (64, 128), s.dtype) if s.name == wrong else s for s in update]
    with pytest.raises(InvalidArgument) as info:
        check_update(inventory, update)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert any(f"tensor {wrong!r} shape: expected [128, 64], got [64, 128]" in p for p in problems)
    assert any("'model.layers.1.mlp.experts' is loaded as one unit of 12 tensors" in p and missing in p for p in problems)


def test_coordinator_refuses_a_moe_manifest_missing_an_expert_before_bytes_move():
    """The coordinator's manifest check (BeginUpdate) groups a MoE layer's experts the same way."""
    from weightsync.control.validation import check_against_inventory

    specs = inventory_from_config(tiny_config("mixtral"))
    missing = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    with pytest.raises(InvalidArgument) as info:
        check_against_inventory([s for s in specs if s.name != missing], {"d1": {s.name: s for s in specs}})
    (problem,) = info.value.problems
    assert "daemon 'd1'" in problem and missing in problem


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
