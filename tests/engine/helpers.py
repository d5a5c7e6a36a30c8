"""Reference decoding with transformers and a data-plane trainer thread, for the engine tests."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous, TensorSpec
from weightsync.dataplane import GroupCache, SendResult, TrainerStore, send_assignment

HOST = "127.0.0.1"
PROMPTS = ([5, 77, 300, 12, 900, 41, 7, 8], [600, 3, 3, 1000, 250])
NUM_TOKENS = 12


def hf_greedy(
    model_dir: str | Path,
    weights: Mapping[str, torch.Tensor] | None,
    prompts: Sequence[Sequence[int]],
    num_tokens: int,
) -> list[list[int]]:
    """Greedy continuations from transformers, optionally with other weights (checkpoint names) loaded, in float32.

    The weights go through a checkpoint file and from_pretrained, so transformers
    does its own name conversion (per-expert names into its fused MoE experts).
    """
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="hf-greedy-") as tmp:
        source = str(model_dir)
        if weights is not None:
            tensors = load_file(str(Path(model_dir) / "model.safetensors"))
            unexpected = sorted(set(weights) - set(tensors))
            assert not unexpected, unexpected
            tensors.update({n: t.detach().to("cpu").contiguous() for n, t in weights.items()})
            save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy(Path(model_dir) / "config.json", Path(tmp) / "config.json")
            source = tmp
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(num_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(prompt):])
    return out


def make_assignment(
    specs: Sequence[TensorSpec],
    port: int,
    *,
    update_id: str,
    version: int,
    bucket_size_bytes: int = 256 << 10,
    group_id: str = "engine-tests",
    num_workers: int = 1,
) -> Assignment:
    """One round from rank 0 to one engine whose `num_workers` workers are ranks 1..num_workers."""
    # Short: closing a group broken by a failed round waits up to this long (gloo
    # shutdown with a receive still posted), and the failure tests break two.
    rendezvous = Rendezvous("gloo", HOST, port, 1 + num_workers, group_id, timeout_s=5.0)
    plan = BucketPlan.build(list(specs), bucket_size_bytes)
    ranks = tuple(range(1, 1 + num_workers))
    return Assignment(update_id, version, rendezvous, (Participant("engine", ranks),), plan, deadline_s=120.0)


def perturbed(checkpoint: Mapping[str, torch.Tensor], seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """The checkpoint plus seeded Gaussian noise: the "next checkpoint" a trainer would push."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (t.float() + std * torch.randn(t.shape, generator=generator)).to(t.dtype)
        for name, t in checkpoint.items()
    }


def sparse_step(prev: Mapping[str, torch.Tensor], seed: int, fraction: float = 0.02) -> dict[str, torch.Tensor]:
    """`prev` with about `fraction` of its elements moved a little, spread at random like an optimizer step's."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in prev.items():
        mask = torch.rand(t.shape, generator=g) < fraction
        out[name] = torch.where(mask, t + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype), t)
    return out


class Trainer:
    """Data-plane rank 0 on a thread: hosts the store and sends one round per `send`."""

    def __init__(self) -> None:
        self.store = TrainerStore(HOST)
        self.groups = GroupCache(trainer_store=self.store)

    @property
    def port(self) -> int:
        return self.store.port

    def send(self, assignment: Assignment, tensors: Mapping[str, object]) -> "SendThread":
        thread = SendThread(self, assignment, tensors)
        thread.start()
        return thread

    def close(self) -> None:
        self.groups.close()
        self.store.close()


class SendThread(threading.Thread):
    def __init__(self, trainer: Trainer, assignment: Assignment, tensors: Mapping[str, object]) -> None:
        super().__init__(name=f"trainer-{assignment.update_id}", daemon=True)
        self._trainer = trainer
        self._assignment = assignment
        self._tensors = tensors
        self.result: SendResult | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            group = self._trainer.groups.get(self._assignment, 0)
            self.result = send_assignment(self._assignment, self._tensors, group)
        except BaseException as e:  # handed to the test through .error
            self.error = e

    def outcome(self, timeout_s: float = 60.0) -> SendResult:
        self.join(timeout_s)
        assert not self.is_alive(), "trainer thread did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
