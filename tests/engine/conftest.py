"""Fixtures for the engine tests: tiny local models and a private vLLM environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightsync.engine.models import ARCHITECTURES, make_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture (seed 0, float32), written once per session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch, seed=0, dtype="float32") for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory: pytest.TempPathFactory):
    """vLLM in this process, with its caches and sockets in the test's temp dir."""
    root = tmp_path_factory.mktemp("vllm")
    (root / "rpc").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CACHE_ROOT", str(root / "cache"))
        mp.setenv("VLLM_RPC_BASE_PATH", str(root / "rpc"))
        mp.setenv("VLLM_NO_USAGE_STATS", "1")
        yield root
