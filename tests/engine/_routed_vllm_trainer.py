"""One rank of a 2-rank FSDP2 trainer on gloo pushing a tiny Hugging Face model with WeightSync(routed=True)."""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback

import torch

BUCKET_BYTES = 64 << 10  # the tiny model in tens of buckets: room for a death mid-round
# The fault test's fail-fast bound. It had been raised to 60 s while group formation could leave
# ranks inside gloo's constructor for a whole timeout (dataplane/groups.py, GroupCache._join).
COLLECTIVE_TIMEOUT_S = 20.0
DEADLINE_S = 120.0


def _die_at_bucket(n: int) -> None:
    """SIGKILLs this process when its routed sender checks for aborts the n-th time (once per bucket)."""
    from weightsync.dataplane.groups import DataPlaneGroup

    real = DataPlaneGroup.check_abort
    seen = []

    def check(self, what):
        if what.startswith("routed round bucket"):
            seen.append(what)
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, what)

    DataPlaneGroup.check_abort = check


def fsdp2_model(model_dir: str, weights: dict[str, torch.Tensor], mesh):
    """The model built from its config, loaded with `weights` (checkpoint names), fully_shard-ed per layer and at the root."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(n == "lm_head.weight" for n in missing), (missing, unexpected)  # tied: from the embedding
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def dtensor_weights(weights: dict[str, torch.Tensor], mesh) -> dict:
    """Every checkpoint tensor as a DTensor in FSDP2's layout (Shard(0) over the mesh), for models whose
    transformers modules do not carry the checkpoint's names (transformers 5 fuses MoE experts in
    memory while the checkpoint, which vLLM loads, names each expert: FACTS.md)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in weights.items()}


def main(rank: int, world: int, init_file: str, address: str, model_dir: str, layout: str, seed: int, version: int,
         die_at_bucket: int | None, outbox, delta: tuple[str, int] | None = None) -> None:
    """Pushes perturbed(checkpoint, seed) as `version`; with `delta` = (base safetensors path, base_version),
    pushes sparse_step(base, seed) as a delta against that base (whole tensors: each rank cuts out its own)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    try:
        from safetensors.torch import load_file
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from tests.engine.helpers import perturbed, sparse_step
        from weightsync.runtime.trainer import WeightSync

        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        checkpoint = load_file(os.path.join(model_dir, "model.safetensors"))
        base = None if delta is None else load_file(delta[0])
        weights = perturbed(checkpoint, seed=seed) if base is None else sparse_step(base, seed)
        if layout == "fsdp2":
            state = fsdp2_model(model_dir, weights, mesh).state_dict()
            # The engine's names: the checkpoint's (a tied lm_head is not one of them).
            source = {n: state[n] for n in checkpoint}
        else:
            source = dtensor_weights(weights, mesh)
        num_sharded = sum(isinstance(t, DTensor) for t in source.values())
        if die_at_bucket is not None:
            _die_at_bucket(die_at_bucket)
        started = time.monotonic()
        with WeightSync(
            address, routed=True, bucket_size_bytes=BUCKET_BYTES, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
            deadline_s=DEADLINE_S, min_daemons=2,
        ) as sync:
            try:
                report = sync.push(source, version=version, raise_on_failure=False,
                                   base=base, base_version=None if delta is None else delta[1])
                error = None
            except Exception as e:  # reported to the test, which asserts on it
                report, error = sync.last_report, f"{type(e).__name__}: {e}"
        summary = None
        if report is not None:
            summary = {
                "update_id": report.update_id,
                "state": report.state,
                "reason": report.reason,
                "results": {v.daemon_id: (v.status, list(v.mismatched_tensors)) for v in report.results},
                "encodings": {v.daemon_id: (v.encoding, v.bytes_received) for v in report.results},
                "rank_bytes": dict(report.rank_bytes),
                "num_sharded": num_sharded,
            }
        outbox.put((rank, summary, error, time.monotonic() - started))
        torch.distributed.destroy_process_group()
    except BaseException as e:
        outbox.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))
