"""The README's CPU `weightsync serve` recipes (tensor parallel 1 and 2), extracted from README.md and run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.engine.helpers import hf_greedy
from tests.runtime.helpers import stop_gracefully
from weightsync.control.trainer_client import SyncTrainerClient
from weightsync.core import WeightsyncError
from weightsync.engine import inventory_from_model_dir, make_tiny_model, random_weights
from weightsync.runtime.trainer import WeightSync

# Engine starts took up to 4 minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [5, 77, 300, 12, 900, 41]
NUM_TOKENS = 6


def readme_cpu_recipes() -> list[str]:
    """The CPU command lines of the README's serve recipes, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### `weightsync serve` recipes"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if "weightsync serve" in line]
    return [line for line in lines if "--dtype float32" in line]


def _run_recipe(line: str, tmp: Path, model_dir: Path, address: str, port: int) -> subprocess.Popen:
    # Only what names this machine changes: paths, ports, the cores to bind, and sizes for a tiny model.
    line = (line.replace("MODEL_DIR", str(model_dir)).replace("HOST:50051", address).replace("--port 8000", f"--port {port}")
            .replace("0-3|4-7", "0|1").replace("--max-model-len 2048", "--max-model-len 256")
            .replace("--kv-cache-memory-bytes 1073741824", f"--kv-cache-memory-bytes {64 << 20}"))
    words = shlex.split(line)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CACHE_ROOT": str(tmp / "vcache"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
           "VLLM_NO_USAGE_STATS": "1", "WEIGHTSYNC_STATE_DIR": str(tmp / "state")}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "weightsync", line
    exe = str(Path(sys.executable).parent / "weightsync")
    # Its own process group, so that teardown also reaches vLLM's EngineCore processes.
    return subprocess.Popen([exe, *words[1:]], cwd=ROOT, env=env, stdout=open(tmp / f"serve-{port}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _tokens(port: int, model_dir: Path) -> list[int]:
    body = json.dumps({"model": str(model_dir), "prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0.0,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return list(json.loads(r.read())["choices"][0]["token_ids"])


def test_readme_cpu_serve_recipes_start_register_and_apply_a_round(tmp_path):
    """Both CPU recipes (TP 1, TP 2 with VLLM_CPU_OMP_THREADS_BIND) start, register within --require-coordinator-s and serve a pushed round exactly."""
    recipes = readme_cpu_recipes()
    assert len(recipes) == 2 and "--tensor-parallel-size 2" in recipes[1] and "VLLM_CPU_OMP_THREADS_BIND" in recipes[1], recipes
    (tmp_path / "rpc").mkdir()
    model_dir = make_tiny_model(tmp_path / "model", "qwen2", seed=0, dtype="float32")
    specs = inventory_from_model_dir(model_dir)
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "weightsync.runtime.cli", "coordinator", "--listen", address],
                              cwd=ROOT, stdout=open(tmp_path / "coordinator.log", "w"), stderr=subprocess.STDOUT)]
    client = None
    try:
        ports = [free_port() for _ in recipes]
        for line, port in zip(recipes, ports):
            procs.append(_run_recipe(line, tmp_path, model_dir, address, port))
        client = SyncTrainerClient(address, rpc_timeout_s=10)
        deadline = time.monotonic() + 600
        while True:
            try:
                rows = client.list_daemons().daemons
            except WeightsyncError:
                rows = []
            if len([d for d in rows if d.state == 1]) == 2:
                break
            for p in procs:
                assert p.poll() is None, f"a process exited {p.returncode}; logs in {tmp_path}"
            assert time.monotonic() < deadline, f"the recipes did not register; logs in {tmp_path}"
            time.sleep(0.5)
        assert sorted(d.num_ranks for d in rows) == [1, 2]
        weights = random_weights(specs, seed=7)
        with WeightSync(address, collective_timeout_s=60, deadline_s=300) as sync:
            report = sync.push(weights, version=1)
        assert report.committed and len(report.results) == 2
        want = hf_greedy(model_dir, weights, [PROMPT], NUM_TOKENS)[0]
        for port in ports:
            assert _tokens(port, model_dir) == want
    finally:
        if client is not None:
            client.close()
        stop_gracefully(procs)
