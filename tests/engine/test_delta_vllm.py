"""Delta rounds into real vLLM CPU engines: coordinator, daemon agents and WeightSync in this process.

A vLLM worker applies a delta to its host shadow of the served weights (engine/shadow.py) and
the patched whole tensors through the dense apply path; the coordinator sends a delta only to
an engine that is clean on the base and says it holds that shadow. Tokens must equal
transformers' with the trainer's tensors after every round.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio
from safetensors.torch import load_file, save_file

from tests.control.helpers import wait_until
from weightsync.control import CoordinatorConfig, CoordinatorServer, DaemonAgent, DaemonIdentity
from weightsync.control.trainer_client import TrainerClient
from weightsync.engine import VllmEngine, VllmEngineConfig
from weightsync.runtime.trainer import WeightSync
from weightsync.runtime.vllm_commands import VllmHandler

from .helpers import NUM_TOKENS, PROMPTS, hf_greedy, sparse_step as _step

# The TP=2 engine starts two worker processes: minutes on a shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
# A delta's wire bytes against the dense bytes at ~2% changed float32 elements (gaps8: ~2.5%).
MAX_DELTA_FRACTION = 0.06


class Stack:
    """One coordinator, vLLM engines of one model with their daemon agents, one in-process trainer."""

    def __init__(self, model_dir: Path, server: CoordinatorServer) -> None:
        self.model_dir = model_dir
        self.server = server
        self.checkpoint = load_file(str(model_dir / "model.safetensors"))
        self.dense_bytes = sum(t.numel() * t.element_size() for t in self.checkpoint.values())
        self.engines: dict[str, VllmEngine] = {}
        self.agents: dict[str, DaemonAgent] = {}
        self.sync = self.new_trainer()

    def new_trainer(self) -> WeightSync:
        return WeightSync(self.server.address, bucket_size_bytes=256 << 10, collective_timeout_s=30, deadline_s=120)

    async def start_agent(self, name: str) -> None:
        engine = self.engines[name]
        ident = DaemonIdentity(daemon_id=name, engine="vllm", model=str(self.model_dir), host="127.0.0.1",
                               inventory=engine.inventory(), num_ranks=engine.num_workers)
        agent = DaemonAgent(self.server.address, ident, VllmHandler(engine), served_version=0)
        agent.start()
        await agent.wait_connected(60)
        self.agents[name] = agent

    async def push(self, weights, version: int, base=None, base_version: int | None = None):
        return await asyncio.to_thread(
            self.sync.push, weights, version=version, base=base, base_version=base_version, raise_on_failure=False
        )

    async def assert_tokens(self, weights, names=None) -> None:
        want = await asyncio.to_thread(hf_greedy, self.model_dir, weights, PROMPTS, NUM_TOKENS)
        for name in names or self.agents:
            assert await self.engines[name].generate_greedy(PROMPTS, NUM_TOKENS) == want, name

    def assert_delta_bytes(self, report) -> None:
        for v in report.results:
            assert v.encoding == "delta" and 0 < v.bytes_received < MAX_DELTA_FRACTION * self.dense_bytes, (
                v.daemon_id, v.bytes_received, self.dense_bytes,
            )

    async def close(self) -> None:
        for agent in self.agents.values():
            await agent.close(5)
        for engine in self.engines.values():
            await engine.close()
        self.sync.close()
        await self.server.stop(1)


def _config(model_dir: Path, tp: int, staging: str) -> VllmEngineConfig:
    return VllmEngineConfig(model=str(model_dir), dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20,
                            tensor_parallel_size=tp, initial_version=0, staging=staging)


async def _stack(model_dir: Path, engines: dict[str, int], vllm_env: Path, staging: str = "staged") -> Stack:
    server = CoordinatorServer(CoordinatorConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=10.0))
    await server.start()
    stack = Stack(model_dir, server)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if max(engines.values()) > 1:
                # For every engine of the process: vLLM caches its environment once an engine has started.
                mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
                # vLLM's TP workers rendezvous through a file:// store in the temp dir.
                mp.setattr(tempfile, "tempdir", str(vllm_env))
            for name, tp in engines.items():
                stack.engines[name] = await VllmEngine.create(_config(model_dir, tp, staging))
    except BaseException:
        await stack.close()
        raise
    return stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def moe(model_dirs, vllm_env):
    """Qwen3-MoE in a TP=1 engine ("tp1") and a TP=2 engine ("tp2"); only tp1's daemon is registered."""
    stack = await _stack(model_dirs["qwen3_moe"], {"tp1": 1, "tp2": 2}, vllm_env)
    try:
        await stack.start_agent("tp1")
        yield stack
    finally:
        await stack.close()


# One test uses it: closed when that test ends, so that no two in-process engines of different
# models live at once (vLLM's parallel state is per process).
@pytest_asyncio.fixture(loop_scope="module")
async def dense(model_dirs, vllm_env):
    """Qwen2 in a TP=1 engine that applies rounds streamed (the other apply shape of engine/receive.py)."""
    stack = await _stack(model_dirs["qwen2"], {"qwen2": 1}, vllm_env, staging="stream")
    try:
        await stack.start_agent("qwen2")
        yield stack
    finally:
        await stack.close()


async def test_dense_then_delta_rounds_into_a_streamed_tp1_dense_engine(dense):
    """Qwen2, TP=1, streamed apply: dense, then two deltas of a few % of the dense bytes; tokens equal transformers' each time."""
    s = dense
    w = _step(s.checkpoint, seed=11)
    report = await s.push(w, 1, base=s.checkpoint, base_version=0)
    assert report.committed and [v.encoding for v in report.results] == ["dense"], report
    await s.assert_tokens(w)
    assert s.engines["qwen2"].holds_delta_base
    assert [i["shadow_bytes"] for i in await s.engines["qwen2"].weight_info()] == [s.dense_bytes]
    for v in (2, 3):
        prev, w = w, _step(w, seed=10 + v)
        report = await s.push(w, v, base=prev, base_version=v - 1)
        assert report.committed, report
        s.assert_delta_bytes(report)
        await s.assert_tokens(w)
    # The shadow turned off (VllmEngineConfig(delta_shadow=False), serve --no-delta-shadow): its
    # memory is freed and the engine gets dense weights, still verified.
    engine = s.engines["qwen2"]
    await engine._rpc("weightsync_set_version", 3, False, False)
    assert [i["shadow_bytes"] for i in await engine.weight_info()] == [0] and not engine.holds_delta_base
    # The coordinator learns it from the next heartbeat (a delta sent before that is refused by the worker).
    await wait_until(lambda: not s.server.coordinator.daemons["qwen2"].holds_delta_base, timeout_s=10)
    prev, w = w, _step(w, seed=14)
    report = await s.push(w, 4, base=prev, base_version=3)
    assert report.committed and [v.encoding for v in report.results] == ["dense"], report
    await s.assert_tokens(w)
    assert [i["shadow_bytes"] for i in await engine.weight_info()] == [0]


async def test_delta_rounds_into_tp1_and_tp2_moe_engines_heal_wrong_base_late_dirty_and_killed_trainer(moe, tmp_path):
    """Dense then delta rounds (a few % of the dense bytes, tokens equal transformers); a wrong base is caught,
    a dirty engine and a late joiner get dense in the same push, a trainer killed mid-delta leaves both flagged and
    the next push heals them."""
    s = moe
    # 1: a just-started engine holds no shadow: dense even when a base is offered.
    w1 = _step(s.checkpoint, seed=1)
    report = await s.push(w1, 1, base=s.checkpoint, base_version=0)
    assert report.committed and [(v.encoding, v.status) for v in report.results] == [("dense", "OK")], report
    await s.assert_tokens(w1)
    # 2: the dense round filled the shadow: a delta, verified on the whole tensors.
    w2 = _step(w1, seed=2)
    report = await s.push(w2, 2, base=w1, base_version=1)
    assert report.committed, report
    s.assert_delta_bytes(report)
    await s.assert_tokens(w2)
    # 3: a wrong base (other tensors called version 2): the patched shadow is not the trainer's
    # tensors; the whole-tensor checksums catch it and the engine is flagged. (Not an ANCESTOR of
    # the served version: a delta carries new values, not differences, so from an ancestor it yields
    # the new tensors wherever the served version's changes carried on into them, here everywhere,
    # and the checksums then rightly prove the result.)
    w3 = _step(w2, seed=3)
    report = await s.push(w3, 3, base=_step(w3, seed=33), base_version=2)
    assert report.state == "FAILED" and [(v.encoding, v.status) for v in report.results] == [("delta", "CHECKSUM_MISMATCH")]
    assert report.results[0].mismatched_tensors
    # 4: the flagged engine and a late joiner (tp2: version 0, no shadow) get dense in a delta push, and end verified.
    await s.start_agent("tp2")
    w4 = _step(w3, seed=4)
    report = await s.push(w4, 4, base=w2, base_version=2)
    assert report.committed, report
    assert {v.daemon_id: (v.encoding, v.status) for v in report.results} == {"tp1": ("dense", "OK"), "tp2": ("dense", "OK")}
    await s.assert_tokens(w4)
    # 5-6: both take deltas now, TP=2 included (each worker patches its own shadow).
    w = w4
    for v in (5, 6):
        prev, w = w, _step(w, seed=v)
        report = await s.push(w, v, base=prev, base_version=v - 1)
        assert report.committed, report
        s.assert_delta_bytes(report)
        await s.assert_tokens(w)
    w6 = w
    # 7: the trainer, a process of its own, is SIGKILLed in the middle of a delta round.
    w7 = _step(w6, seed=7)
    save_file(w7, tmp_path / "v7.safetensors")
    save_file(w6, tmp_path / "v6.safetensors")
    marker = tmp_path / "stalled"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tests.engine._delta_trainer", s.server.address, str(tmp_path / "v7.safetensors"),
         str(tmp_path / "v6.safetensors"), "6", "7", str(marker)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await wait_until(marker.exists, timeout_s=120)
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
    async with TrainerClient(s.server.address) as client:
        await wait_until_async(lambda: _round_ended(client), timeout_s=60)
        rnd = (await client.list_rounds(1))[0]
        assert rnd.version == 7 and rnd.state == "FAILED" and {v.encoding for v in rnd.results} == {"delta"}, rnd
        daemons = {d.daemon_id: d for d in (await client.list_daemons()).daemons}
        assert daemons["tp1"].dirty and daemons["tp2"].dirty, daemons
    # The round had patched part of each worker's shadow: none is left to patch again.
    await wait_until(lambda: not (s.engines["tp1"].holds_delta_base or s.engines["tp2"].holds_delta_base), timeout_s=60)
    assert [i["shadow_bytes"] for i in await s.engines["tp2"].weight_info()] == [0, 0]
    # 8: the next push (from a new trainer, as after a crash) heals both with dense weights; 9: and deltas resume.
    s.sync.close()
    s.sync = s.new_trainer()
    w8 = _step(w7, seed=8)
    report = await s.push(w8, 8, base=w6, base_version=6)
    assert report.committed, report
    assert {v.encoding for v in report.results} == {"dense"}, report
    await s.assert_tokens(w8)
    w9 = _step(w8, seed=9)
    report = await s.push(w9, 9, base=w8, base_version=8)
    assert report.committed, report
    s.assert_delta_bytes(report)
    await s.assert_tokens(w9)
    infos = await s.engines["tp2"].weight_info()
    assert [i["shadow_bytes"] for i in infos] == [s.dense_bytes] * 2


async def _round_ended(client: TrainerClient) -> bool:
    return (await client.list_rounds(1))[0].state != "TRANSFERRING"


async def wait_until_async(predicate, timeout_s: float, interval_s: float = 0.1) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(interval_s)
