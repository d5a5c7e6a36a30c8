"""Fixtures shared by the data-plane tests."""

from __future__ import annotations

import pytest
import torch

from weightsync.core import TensorSpec
from weightsync.dataplane.synthetic import MODEL_SHAPES


@pytest.fixture
def tiny_specs() -> list[TensorSpec]:
    """A tiny Qwen2-shaped manifest (26 tensors, ~180 KB of bf16): every kind of tensor, fast to move."""
    return MODEL_SHAPES["tiny"].manifest()


@pytest.fixture
def qwen_0_5b_specs() -> list[TensorSpec]:
    """Qwen2.5-0.5B's manifest: 290 bf16 tensors, ~0.92 GiB."""
    return MODEL_SHAPES["qwen2.5-0.5b"].manifest()


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Two cores host up to three ranks here: keep the test process itself from competing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
