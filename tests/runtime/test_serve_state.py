"""A real `weightsync serve` (vLLM on CPU): every view of the engine agrees, and a wrong coordinator is loud.

Views of one engine: the coordinator's ListDaemons row, the daemon agent (read through
`GET /weightsync/version`), vLLM's own weight-version label (`GET /weight_info`, dev mode)
and the `x-weightsync-version` header on a vLLM response.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.runtime.helpers import stop_gracefully
from weightsync.control.trainer_client import SyncTrainerClient
from weightsync.core import WeightsyncError
from weightsync.dataplane import DeferredTensor
from weightsync.engine import inventory_from_model_dir, make_tiny_model, random_weights
from weightsync.runtime.trainer import WeightSync

# Engine starts took up to 4 minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
HOST_NAME = "serve-host"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsync.runtime.cli", *args]


def _http(port: int, path: str) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _until(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except (OSError, WeightsyncError):
            pass  # not up yet: poll again
        for p in procs:
            assert p.poll() is None, f"a process exited with {p.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class ServeFleet:
    """A coordinator and one `weightsync serve` process without --daemon-id."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model_dir = make_tiny_model(tmp / "model", "qwen2", seed=0, dtype="float32")
        self.specs = inventory_from_model_dir(self.model_dir)
        (tmp / "rpc").mkdir()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                    "VLLM_CACHE_ROOT": str(tmp / "vcache"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
                    "VLLM_NO_USAGE_STATS": "1", "VLLM_SERVER_DEV_MODE": "1", "WEIGHTSYNC_STATE_DIR": str(tmp / "state")}
        self.address = f"127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_coordinator()
        self.client = SyncTrainerClient(self.address, rpc_timeout_s=10)
        self.start_serve("serve", self.address, self.http_port)

    def start_coordinator(self) -> None:
        self.procs["coordinator"] = subprocess.Popen(
            _cli("coordinator", "--listen", self.address, "--heartbeat-interval-s", "0.3", "--heartbeat-timeout-s", "5",
                 "--state-file", str(self.tmp / "coordinator-state.json")),
            cwd=ROOT, env=self.env, stdout=open(self.tmp / "coordinator.log", "a"), stderr=subprocess.STDOUT)

    def start_serve(self, name: str, coordinator: str, port: int, *extra: str) -> subprocess.Popen:
        p = subprocess.Popen(
            _cli("serve", str(self.model_dir), "--coordinator", coordinator, "--host-name", HOST_NAME, "--served-version", "0",
                 *extra, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
                 "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)),
            cwd=ROOT, env=self.env, stdout=open(self.tmp / f"{name}.log", "a"), stderr=subprocess.STDOUT,
            start_new_session=True)  # its own group, so that teardown also reaches vLLM's EngineCore
        self.procs[name] = p
        return p

    @property
    def daemon_id(self) -> str:
        return f"{HOST_NAME}-vllm-{self.http_port}"

    def row(self):
        rows = [d for d in self.client.list_daemons().daemons if d.daemon_id == self.daemon_id]
        return rows[0] if rows else None

    def wait_ready(self, timeout_s: float = 300) -> None:
        _until(lambda: _http(self.http_port, "/weightsync/ready")[0] == 200 and self.row() is not None and self.row().state == 1,
               timeout_s, "serve to register", [self.procs["serve"]])

    def views(self) -> dict[str, object]:
        row = self.row()
        _, agent, _ = _http(self.http_port, "/weightsync/version")
        _, info, _ = _http(self.http_port, "/weight_info")
        _, _, headers = _http(self.http_port, "/v1/models")
        return {
            "ListDaemons": (row.served_version, row.dirty),
            "agent": (agent["version"], agent["dirty"]),
            "vllm label": info["weight_version"],
            "header": headers.get("x-weightsync-version"),
        }

    def expect(self, version: int, dirty: bool) -> None:
        want = {"ListDaemons": (version, dirty), "agent": (version, dirty), "vllm label": str(version), "header": str(version)}
        # ListDaemons follows heartbeats: poll until every view has settled, then compare all of them.
        try:
            _until(lambda: self.views() == want, 30, f"every view to say version {version} dirty={dirty}")
        except AssertionError:
            assert self.views() == want
        assert self.views() == want

    def push(self, weights, version: int):
        with WeightSync(self.address, collective_timeout_s=10, deadline_s=60) as sync:
            return sync.push(weights, version=version, raise_on_failure=False)

    def close(self) -> None:
        self.client.close()
        stop_gracefully(self.procs.values())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = ServeFleet(tmp_path_factory.mktemp("serve-state"))
    try:
        f.wait_ready()
        yield f
    finally:
        f.close()


def test_every_view_agrees_after_full_partial_and_failed_rounds(fleet):
    """ListDaemons, the agent, vLLM's label and the response header agree after each kind of round, and after a coordinator restart."""
    # Version 0 was never committed by this coordinator: every view calls the claim dirty until a full round.
    fleet.expect(0, True)
    assert fleet.push(random_weights(fleet.specs, seed=1), 1).committed
    fleet.expect(1, False)

    # A partial round on a clean engine: the new version, still clean.
    norm = {"model.norm.weight": random_weights(fleet.specs, seed=2)["model.norm.weight"]}
    assert fleet.push(norm, 2).committed
    fleet.expect(2, False)

    # A failed round (the trainer dies while producing bytes): every view says dirty at the old version.
    def boom():
        raise RuntimeError("trainer crashed while computing the weights")

    failing = {s.name: DeferredTensor(s.shape, torch.float32, boom) for s in fleet.specs}
    report = fleet.push(failing, 3)
    assert report.state in ("ABORTED", "FAILED"), report
    assert "trainer crashed while computing the weights" in report.reason
    fleet.expect(2, True)

    # A partial round on a dirty engine verifies only its tensors: still dirty (HTTP said clean before).
    norm = {"model.norm.weight": random_weights(fleet.specs, seed=4)["model.norm.weight"]}
    _until(lambda: fleet.push(norm, 4).committed, 120, "a partial round after the failed one")
    fleet.expect(4, True)

    # A full round re-syncs it.
    assert fleet.push(random_weights(fleet.specs, seed=5), 5).committed
    fleet.expect(5, False)

    # The coordinator restarts (its state file keeps version 5 as committed): the engine says 503
    # meanwhile, then re-registers clean (it re-registered dirty before).
    fleet.procs["coordinator"].kill()
    fleet.procs["coordinator"].wait(30)
    _until(lambda: _http(fleet.http_port, "/weightsync/ready")[0] == 503, 30, "readiness to drop")
    _, body, _ = _http(fleet.http_port, "/weightsync/version")
    assert body["connected"] is False and body["coordinator"] == fleet.address and body["last_error"], body
    fleet.start_coordinator()
    fleet.wait_ready(60)
    listed = fleet.client.list_daemons()
    assert listed.committed_version == 5
    fleet.expect(5, False)


def test_restarted_serve_keeps_its_daemon_id(fleet):
    """Without --daemon-id, serve is HOST-vllm-PORT: a restart on the same port re-registers the same daemon, no second row; SIGTERM exits 0, SIGINT 130."""
    serve = fleet.procs["serve"]
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(120) == 0
    fleet.start_serve("serve", fleet.address, fleet.http_port)
    fleet.wait_ready()
    rows = fleet.client.list_daemons().daemons
    assert [d.daemon_id for d in rows] == [fleet.daemon_id]
    # Ctrl-C stops it gracefully too, with the interrupted status.
    fleet.procs["serve"].send_signal(signal.SIGINT)
    assert fleet.procs["serve"].wait(120) == 130


def test_wrong_coordinator_is_loud_and_require_exits_nonzero(fleet):
    """A serve pointed at a dead address answers 503 with the address and error, warns in its log, and exits 3 under --require-coordinator-s."""
    dead = f"127.0.0.1:{free_port()}"
    port = free_port()
    p = fleet.start_serve("wrong", dead, port, "--require-coordinator-s", "25")
    seen = {}

    def not_ready() -> bool:
        status, body, _ = _http(port, "/weightsync/ready")
        seen.update(body)
        return status == 503 and bool(body["last_error"])

    _until(not_ready, 300, "the wrong serve's HTTP server", [p])
    assert seen["connected"] is False and seen["coordinator"] == dead and "UNAVAILABLE" in seen["last_error"], seen
    assert p.wait(120) == 3
    log = (fleet.tmp / "wrong.log").read_text()
    assert f"cannot reach the coordinator at {dead}" in log and "WARNING" in log, log[-3000:]
    assert "--require-coordinator-s 25 s" in log, log[-3000:]
