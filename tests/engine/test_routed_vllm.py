"""Routed rounds into real vLLM engines at TP=2: a 2-rank FSDP2 trainer sends each TP worker only what its loader reads.

Real processes throughout: a coordinator, two `weightsync serve` engines with
--tensor-parallel-size 2 (each worker declares its needs, engine/needs.py), and
the trainer's two ranks (FSDP2 over gloo, WeightSync(routed=True)), each sending
the pieces of its own shards. Per architecture (dense qwen2 with tied embeddings and q/k/v
biases; qwen3_moe) two engine starts, one staged and one streamed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.engine import _routed_vllm_trainer as trainer
from tests.engine.helpers import hf_greedy, perturbed, sparse_step
from tests.runtime.helpers import kill_group
from weightsync.control.trainer_client import SyncTrainerClient
from weightsync.core import WeightsyncError
from weightsync.engine import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
S, TP = 2, 2
ENGINES = ("vllm-a", "vllm-b")
# Each of the dense round's two shapes (engine/receive.py), one per engine.
STAGING = {"vllm-a": "staged", "vllm-b": "stream"}
# The trainer's layout per architecture: FSDP2 over the transformers model where its names are the
# checkpoint's; the same Shard(0) DTensors built from the checkpoint for MoE (_routed_vllm_trainer.py).
LAYOUT = {"qwen2": "fsdp2", "qwen3_moe": "dtensor"}
PROMPT = [5, 77, 300, 12, 900, 41]
# A routed delta's wire bytes per engine against the model's dense bytes at ~2% changed float32
# elements: gaps8 deltas plus the frames' piece metadata (measured 3.2% for qwen2, 2026-12-06).
MAX_ROUTED_DELTA_FRACTION = 0.06
NUM_TOKENS = 8
IDLE = 1  # DAEMON_STATE_IDLE


def _cli(*args: str, log_level: str = "WARNING") -> list[str]:
    return [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", log_level, *args]


def _wait(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"a process exited ({p.args[4:6]}) while waiting for {what}"
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.2)


class _Fleet:
    """A coordinator and two TP=2 `weightsync serve` engines, shared by the module's tests."""

    def __init__(self, tmp: Path, arch: str) -> None:
        self.tmp = tmp
        self.arch = arch
        self.model_dir = make_tiny_model(tmp / "model", arch, seed=0, dtype="float32")
        self.checkpoint = load_file(str(self.model_dir / "model.safetensors"))
        self.address = f"127.0.0.1:{free_port()}"
        self.http = {name: free_port() for name in ENGINES}
        self.procs: dict[str, subprocess.Popen] = {}
        (tmp / "rpc").mkdir()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CACHE_ROOT": str(tmp / "vcache"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
               # Two CPU workers per engine (FACTS.md); their file:// rendezvous goes to the temp dir.
               "VLLM_CPU_OMP_THREADS_BIND": "0|1", "TMPDIR": str(tmp)}
        self._start("coordinator", _cli("coordinator", "--listen", self.address, "--heartbeat-interval-s", "0.3",
                                         "--heartbeat-timeout-s", "10"), env)
        for name in ENGINES:
            # INFO: the engine logs each routed round's staging peak, which the test reads.
            self._start(name, _cli(
                "serve", str(self.model_dir), "--staging", STAGING[name], "--coordinator", self.address, "--daemon-id", name,
                "--served-version", "0", "--host", "127.0.0.1", "--port", str(self.http[name]), "--dtype", "float32",
                "--max-model-len", "256", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
                "--tensor-parallel-size", str(TP), log_level="INFO",
            ), env)
        self.client = SyncTrainerClient(self.address, rpc_timeout_s=10)

    def _start(self, name: str, cmd: list[str], env: dict) -> None:
        log = open(self.tmp / f"{name}.log", "a")
        # Its own group: closing also reaches the TP workers vLLM starts.
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def daemons(self) -> dict:
        try:
            return {d.daemon_id: d for d in self.client.list_daemons().daemons}
        except WeightsyncError:  # the coordinator may still be starting
            return {}

    def wait_idle(self, timeout_s: float) -> None:
        def idle():
            ds = self.daemons()
            return all(n in ds and ds[n].state == IDLE for n in ENGINES)

        _wait(idle, timeout_s, f"engines {ENGINES} idle (logs in {self.tmp})", list(self.procs.values()))

    def staging_peak_bytes(self, name: str, update_id: str) -> int:
        """The peak of full-size staging bytes per worker that the engine logged for a routed round."""
        pattern = re.compile(rf"update {update_id} routed: staging peak (\d+) bytes per worker \((\w+)\)")
        found = pattern.findall((self.tmp / f"{name}.log").read_text(errors="replace"))
        assert len(found) == 1 and found[0][1] == STAGING[name], (name, found)
        return int(found[0][0])

    def weights(self, seed: int):
        return perturbed(self.checkpoint, seed=seed)

    def push(self, seed: int, version: int, die_at_bucket: dict[int, int] | None = None, timeout_s: float = 300.0,
             delta: tuple[int, int] | None = None):
        """Runs the S trainer ranks; returns {rank: (summary, error, seconds)} and their exit codes.
        `delta` = (base path, base_version): a routed delta round (the trainer script's docstring)."""
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed.tensor", "transformers", "weightsync.runtime.trainer"])
        outbox = ctx.Queue()
        init_file = str(self.tmp / f"init-v{version}")
        procs = [
            ctx.Process(target=trainer.main, args=(r, S, init_file, self.address, str(self.model_dir), LAYOUT[self.arch], seed, version,
                                                   (die_at_bucket or {}).get(r), outbox, delta), daemon=True)
            for r in range(S)
        ]
        for p in procs:
            p.start()
        out = {}
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                killed = {r for r, p in enumerate(procs) if p.exitcode is not None and p.exitcode < 0}
                if set(out) | killed >= set(range(S)):
                    break
                assert time.monotonic() < deadline, f"trainer ranks {sorted(set(range(S)) - set(out))} did not report; logs in {self.tmp}"
                try:
                    rank, summary, error, seconds = outbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                out[rank] = (summary, error, seconds)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
        return out, [p.exitcode for p in procs]

    def tokens(self, name: str) -> list[int]:
        body = json.dumps({"model": str(self.model_dir), "prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0.0,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http[name]}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"])

    def assert_engines_hold(self, weights: dict, version: int) -> None:
        info = self.daemons()
        want = hf_greedy(self.model_dir, weights, [PROMPT], NUM_TOKENS)[0]
        for name in ENGINES:
            assert info[name].served_version == version and not info[name].dirty, info[name]
            assert self.tokens(name) == want, f"{name} does not generate like version {version}"

    def close(self) -> None:
        self.client.close()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            kill_group(p)


@pytest.fixture(scope="module", params=list(LAYOUT))
def fleet(request, tmp_path_factory):
    f = _Fleet(tmp_path_factory.mktemp(f"routed-vllm-{request.param}"), request.param)
    try:
        # Two TP=2 engines (4 workers) start on a shared 2-core machine: minutes, not seconds.
        f.wait_idle(600)
        yield f
    finally:
        f.close()


def _receiver_ranks(name: str) -> list[int]:
    first = S + ENGINES.index(name) * TP
    return list(range(first, first + TP))


def test_routed_round_into_tp2_engines_moves_half_and_generates_like_transformers(fleet):
    """Both FSDP2 ranks send; each TP worker receives half of the sharded bytes plus the replicated norms; tokens equal transformers'."""
    out, codes = fleet.push(seed=1, version=1)
    summary, error, _ = out[0]
    assert error is None and summary["state"] == "COMMITTED", (summary, error, f"logs in {fleet.tmp}")
    assert codes == [0, 0]
    assert summary["num_sharded"] == len(fleet.checkpoint)  # every tensor sharded: no rank holds a whole one
    model_bytes = sum(t.numel() * t.element_size() for t in fleet.checkpoint.values())
    # TP=2 workers read half of every tensor but the norms and the MoE router (vocab rows, q/k/v rows
    # and biases, o_proj and down_proj columns, gate/up rows, each expert's intermediate half): vLLM's
    # own loaders, as engine/needs.py derived them.
    replicated = sum(
        t.numel() * t.element_size() for n, t in fleet.checkpoint.items()
        if (t.dim() == 1 and "norm" in n) or n.endswith("mlp.gate.weight")
    )
    per_worker = (model_bytes - replicated) // TP + replicated
    rank_bytes = summary["rank_bytes"]
    for name in ENGINES:
        for r in _receiver_ranks(name):
            assert rank_bytes[r] == (name, 0, per_worker), (r, rank_bytes[r], per_worker, model_bytes)
    sent = [rank_bytes[r][1] for r in range(S)]
    # Each needed byte leaves the senders once (the engines relay it); the TP halves cover the model.
    assert sum(sent) == model_bytes and min(sent) > 0.3 * sum(sent), sent
    fleet.assert_engines_hold(fleet.weights(seed=1), version=1)
    # Memory: streamed, staging lives as long as vLLM buffers a module, plus one batch handed over
    # (measured 0.38 of the model for qwen2, 0.47 for qwen3_moe: its embedding and lm_head, 0.23 each,
    # dominate a tiny model); staged, every needed tensor waits full-size for the commit (half written).
    streamed = fleet.staging_peak_bytes("vllm-b", summary["update_id"])
    assert 0 < streamed < 0.6 * model_bytes, (streamed, model_bytes)
    assert fleet.staging_peak_bytes("vllm-a", summary["update_id"]) == model_bytes


# The fault path does not depend on the architecture: run once, on qwen2's engines.
@pytest.mark.parametrize("fleet", ["qwen2"], indirect=True)
def test_source_killed_mid_round_fails_fast_flags_engines_and_next_push_heals(fleet):
    """Trainer rank 1 SIGKILLed at its 3rd bucket: rank 0 returns within the collective timeout, both engines are flagged; the next push heals them."""
    fleet.wait_idle(120)
    out, codes = fleet.push(seed=2, version=2, die_at_bucket={1: 3})
    assert codes[1] == -9
    summary, error, seconds = out[0]
    assert summary is not None and summary["state"] in ("ABORTED", "FAILED"), (summary, error)
    assert all(status != "OK" for status, _ in summary["results"].values()), summary
    assert seconds < trainer.COLLECTIVE_TIMEOUT_S, seconds
    _wait(lambda: all(fleet.daemons()[n].dirty for n in ENGINES), 30, "both engines flagged dirty")
    fleet.wait_idle(180)
    out, codes = fleet.push(seed=3, version=3)
    summary, error, _ = out[0]
    assert error is None and summary["state"] == "COMMITTED", (summary, error, f"logs in {fleet.tmp}")
    fleet.assert_engines_hold(fleet.weights(seed=3), version=3)


# Delta rounds do not depend on the architecture: qwen2's engines.
@pytest.mark.parametrize("fleet", ["qwen2"], indirect=True)
def test_routed_delta_rounds_patch_each_workers_regions_and_heal(fleet, tmp_path):
    """Routed deltas into TP=2 engines (staged and streamed): each worker patches the regions its loader reads.

    After a routed round every worker's shadow is exact in its needed regions only, so the next
    routed delta push patches those (a few % of the dense bytes, tokens equal transformers'); a
    wrong base ends CHECKSUM_MISMATCH on both engines and flags them, and the next push heals them
    dense; a plain (not routed) delta push patches whole tensors, so it is dense there and leaves
    whole shadows, which a routed delta then patches again.
    """
    from safetensors.torch import save_file

    from weightsync.runtime.trainer import WeightSync

    model_bytes = sum(t.numel() * t.element_size() for t in fleet.checkpoint.values())

    def routed(version: int, base: dict, base_version: int, seed: int):
        save_file(base, tmp_path / f"base-{version}.safetensors")
        out, codes = fleet.push(seed=seed, version=version, delta=(str(tmp_path / f"base-{version}.safetensors"), base_version))
        summary, error, _ = out[0]
        assert error is None and codes == [0, 0], (out, codes, f"logs in {fleet.tmp}")
        return summary, sparse_step(base, seed)

    fleet.wait_idle(120)
    out, _ = fleet.push(seed=11, version=11)
    assert out[0][0]["state"] == "COMMITTED", out
    w11 = fleet.weights(seed=11)
    fleet.wait_idle(120)
    summary, w12 = routed(12, w11, 11, seed=12)
    assert summary["state"] == "COMMITTED", (summary, f"logs in {fleet.tmp}")
    for name in ENGINES:
        encoding, nbytes = summary["encodings"][name]
        assert encoding == "delta" and 0 < nbytes < MAX_ROUTED_DELTA_FRACTION * model_bytes, (name, nbytes, model_bytes)
    fleet.assert_engines_hold(w12, version=12)
    # A base that is not what the engines hold: the regions they patch do not become the trainer's.
    summary, _ = routed(13, perturbed(w12, seed=99), 12, seed=13)
    assert summary["state"] == "FAILED" and {n: s for n, (s, _) in summary["results"].items()} == dict.fromkeys(ENGINES, "CHECKSUM_MISMATCH"), summary
    _wait(lambda: all(fleet.daemons()[n].dirty for n in ENGINES), 30, "both engines flagged dirty")
    fleet.wait_idle(120)
    summary, w14 = routed(14, w12, 12, seed=14)
    assert summary["state"] == "COMMITTED" and {e for e, _ in summary["encodings"].values()} == {"dense"}, summary
    fleet.assert_engines_hold(w14, version=14)
    fleet.wait_idle(120)
    # A plain delta push patches whole tensors: the routed round's shadows do not qualify.
    w15 = sparse_step(w14, seed=15)
    with WeightSync(fleet.address, collective_timeout_s=trainer.COLLECTIVE_TIMEOUT_S, deadline_s=trainer.DEADLINE_S,
                    min_daemons=2) as sync:
        report = sync.push(w15, version=15, base=w14, base_version=14, raise_on_failure=False)
    assert report.committed, (report, f"logs in {fleet.tmp}")
    assert {v.daemon_id: (v.status, v.encoding) for v in report.results} == dict.fromkeys(ENGINES, ("OK", "dense")), report
    fleet.assert_engines_hold(w15, version=15)
    fleet.wait_idle(120)
    # The dense round left whole shadows: a routed delta patches them.
    summary, w16 = routed(16, w15, 15, seed=16)
    assert summary["state"] == "COMMITTED" and {e for e, _ in summary["encodings"].values()} == {"delta"}, summary
    fleet.assert_engines_hold(w16, version=16)
