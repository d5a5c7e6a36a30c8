"""Faults against real vLLM engines (`weightsync serve` processes): daemon kill and coordinator restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.engine.helpers import hf_greedy
from tests.runtime.helpers import kill_group
from weightsync.control.trainer_client import RoundFailed, SyncTrainerClient
from weightsync.core import WeightsyncError
from weightsync.dataplane import DeferredTensor
from weightsync.engine import inventory_from_model_dir, make_tiny_model, random_weights
from weightsync.runtime.trainer import WeightSync

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [5, 77, 300, 12, 900, 41]
NUM_TOKENS = 8


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", "WARNING", *args]


class VllmFleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model_dir = make_tiny_model(tmp / "model", "qwen2", seed=0, dtype="float32")
        self.specs = inventory_from_model_dir(self.model_dir)
        self.address = f"127.0.0.1:{free_port()}"
        (tmp / "rpc").mkdir()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                    "VLLM_CACHE_ROOT": str(tmp / "vcache"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"), "VLLM_NO_USAGE_STATS": "1"}
        self.http = {f"engine-{i}": free_port() for i in range(2)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_coordinator()
        for name in self.http:
            self.start_engine(name)
        self.client = SyncTrainerClient(self.address, rpc_timeout_s=10)
        self.wait_engines()

    def _log(self, name):
        return open(self.tmp / f"{name}.log", "a")

    def start_coordinator(self) -> None:
        self.procs["coordinator"] = subprocess.Popen(
            _cli("coordinator", "--listen", self.address, "--heartbeat-interval-s", "0.3", "--heartbeat-timeout-s", "4",
                 "--state-file", str(self.tmp / "coordinator-state.json")),
            cwd=ROOT, env=self.env, stdout=self._log("coordinator"), stderr=subprocess.STDOUT)

    def start_engine(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            _cli("serve", str(self.model_dir), "--coordinator", self.address, "--daemon-id", name, "--served-version", "0",
                 "--host", "127.0.0.1", "--port", str(self.http[name]), "--dtype", "float32", "--max-model-len", "256",
                 "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)),
            cwd=ROOT, env=self.env, stdout=self._log(name), stderr=subprocess.STDOUT,
            start_new_session=True)  # its own group: a kill also reaches whatever vLLM started

    def wait_engines(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ds = {d.daemon_id: d for d in self.client.list_daemons().daemons}
                if all(n in ds and ds[n].state == 1 for n in self.http):
                    return
            except WeightsyncError:
                pass
            for n, p in self.procs.items():
                assert p.poll() is None, f"{n} exited {p.returncode}; see {self.tmp / (n + '.log')}"
            assert time.monotonic() < deadline, f"engines not ready; logs in {self.tmp}"
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill()
        p.wait(10)
        kill_group(p)

    def tokens(self, name: str) -> list[int]:
        body = json.dumps({"model": str(self.model_dir), "prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0.0,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http[name]}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"])

    def weights(self, seed: int) -> dict[str, torch.Tensor]:
        return random_weights(self.specs, seed=seed)

    def push(self, weights, version: int, *, slow_s: float = 0.0):
        """Pushes from this process; slow_s delays each tensor so that a fault lands mid-transfer."""
        source = weights
        if slow_s:
            def slow(t):
                return lambda: (time.sleep(slow_s), t)[1]
            source = {n: DeferredTensor(tuple(t.shape), t.dtype, slow(t)) for n, t in weights.items()}
        with WeightSync(self.address, collective_timeout_s=10, deadline_s=40) as sync:
            return sync.push(source, version=version)

    def assert_engines_hold(self, weights, version: int) -> None:
        info = {d.daemon_id: d for d in self.client.list_daemons().daemons}
        want = hf_greedy(self.model_dir, weights, [PROMPT], NUM_TOKENS)[0]
        for name in self.http:
            assert info[name].served_version == version and not info[name].dirty and not info[name].stale, info[name]
            assert self.tokens(name) == want, f"{name} does not generate like version {version}"

    def close(self) -> None:
        self.client.close()
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(30)
            kill_group(p)



@pytest.fixture(scope="module")
def vfleet(tmp_path_factory):
    f = VllmFleet(tmp_path_factory.mktemp("vllm-fleet"))
    yield f
    f.close()


def _push_in_background(fleet, weights, version, slow_s):
    box = {}

    def run():
        try:
            box["report"] = fleet.push(weights, version, slow_s=slow_s)
        except Exception as e:  # the test inspects whatever the push raised
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_vllm_engine_killed_mid_transfer_then_resynced(vfleet):
    """A vLLM engine SIGKILLed mid-transfer fails the round; restarted, it and its peer are re-synced and generate like the new weights."""
    new = vfleet.weights(11)
    t, box = _push_in_background(vfleet, new, 1, slow_s=0.15)
    time.sleep(1.5)
    vfleet.kill("engine-1")
    t.join(60)
    assert not t.is_alive()
    assert isinstance(box.get("error"), RoundFailed), box
    assert box["error"].report.state in ("FAILED", "ABORTED")
    vfleet.start_engine("engine-1")
    vfleet.wait_engines()
    info = {d.daemon_id: d for d in vfleet.client.list_daemons().daemons}
    verdicts = {v.daemon_id: v.status for v in box["error"].report.results}
    assert verdicts["engine-1"] == "FAILED"
    # The survivor either verified the whole round (its checksums matched) or is flagged.
    assert info["engine-0"].dirty or (verdicts["engine-0"] == "OK" and info["engine-0"].served_version == 1)
    # The restarted engine holds the last committed version (0), so it is not stale.
    assert info["engine-1"].served_version == 0 and not info["engine-1"].dirty
    report = vfleet.push(new, 2)
    assert report.committed
    vfleet.assert_engines_hold(new, 2)


def test_vllm_coordinator_restart_mid_round_and_between_rounds(vfleet):
    """The coordinator killed mid-round and between rounds: vLLM engines reconnect with their versions and the next rounds commit."""
    new = vfleet.weights(12)
    t, box = _push_in_background(vfleet, new, 10, slow_s=0.15)
    time.sleep(1.5)
    vfleet.kill("coordinator")
    t.join(90)
    assert not t.is_alive() and "error" in box, box
    vfleet.start_coordinator()
    vfleet.wait_engines()
    assert all(d.dirty for d in vfleet.client.list_daemons().daemons), "no verdict reached them: flagged"
    assert vfleet.push(new, 11).committed
    vfleet.assert_engines_hold(new, 11)
    time.sleep(1.0)
    vfleet.kill("coordinator")
    vfleet.start_coordinator()
    vfleet.wait_engines()
    listed = vfleet.client.list_daemons()
    assert listed.committed_version == 11 and not any(d.dirty for d in listed.daemons)
    original = load_file(str(vfleet.model_dir / "model.safetensors"))
    assert vfleet.push(original, 12).committed
    vfleet.assert_engines_hold(None, 12)
