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
    """Greedy continuations from transformers, optionally with other weights loaded (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if weights is not None:
        # A tied lm_head shares the embedding Parameter, so it follows the copy.
        missing, unexpected = model.load_state_dict(dict(weights), strict=False)
        assert not unexpected, unexpected
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
) -> Assignment:
    # Short: closing a group broken by a failed round waits up to this long (gloo
    # shutdown with a receive still posted), and the failure tests break two.
    rendezvous = Rendezvous("gloo", HOST, port, 2, group_id, timeout_s=5.0)
    plan = BucketPlan.build(list(specs), bucket_size_bytes)
    return Assignment(update_id, version, rendezvous, (Participant("engine", (1,)),), plan, deadline_s=120.0)


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
