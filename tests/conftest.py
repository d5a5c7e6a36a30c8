"""Shared fixtures: a real coordinator on 127.0.0.1:0 and real daemon agents."""

from __future__ import annotations

import os
import socket
import sys

import pytest

collect_ignore_glob: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        have_gpu = torch.cuda.is_available()
    except ImportError:
        have_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def subprocess_env(tmp_path):
    """Environment for child processes: this interpreter's packages, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONPATH", "")
    return env


PYTHON = sys.executable
