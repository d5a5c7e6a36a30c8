"""The newcomer's and operator's path without vLLM: the README's loop, loud wrong addresses, stable ids, CLI errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsync.runtime.cli", *args]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _status(address: str, env=None) -> dict:
    """What `weightsync status --json` prints, fetched in this process (a CLI start per poll costs seconds here)."""
    from weightsync.control.trainer_client import SyncTrainerClient
    from weightsync.runtime.status import status_json

    with SyncTrainerClient(address, rpc_timeout_s=5) as c:
        return json.loads(status_json(c.list_daemons(), c._run(c._client.list_rounds_pb(10))))


def _answers(address: str) -> bool:
    from weightsync.core import WeightsyncError

    try:
        _status(address)
        return True
    except WeightsyncError:
        return False


class _Procs:
    """Every process a test starts, killed and reaped when it ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WEIGHTSYNC_STATE_DIR": str(tmp / "state")}
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, log: str) -> subprocess.Popen:
        p = subprocess.Popen(_cli(*args), cwd=ROOT, env=self.env, stdout=open(self.tmp / log, "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def coordinator(self) -> str:
        address = f"127.0.0.1:{free_port()}"
        self.start("coordinator", "--listen", address, "--heartbeat-interval-s", "0.2", "--heartbeat-timeout-s", "5", log="coordinator.log")
        _wait_for(lambda: _answers(address), 60, "the coordinator")
        return address

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)


@pytest.fixture
def procs(tmp_path):
    p = _Procs(tmp_path)
    yield p
    p.close()


class _TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)


def readme_training_loop() -> str:
    """The first python block of the README's "Python API" section, as a user copies it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_training_loop_runs_as_written(procs, tmp_path):
    """The README's loop, extracted from README.md, commits every step into a daemon that serves version 0 like `weightsync serve`."""
    address = procs.coordinator()
    model = _TinyModel()
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "engine.safetensors")
    saved = tmp_path / "saved.safetensors"
    procs.start("daemon", "--coordinator", address, "--weights", str(tmp_path / "engine.safetensors"), "--served-version", "0",
                "--save-on-commit", str(saved), log="daemon.log")
    _wait_for(lambda: len(_status(address, procs.env)["daemons"]) == 1, 60, "the daemon")
    code = readme_training_loop()
    assert "WeightSync(" in code and "sync.push(model, version=step)" in code
    code = code.replace("coordinator:50051", address).replace("10.0.0.5", "127.0.0.1")

    def train_step(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5)

    scope = {"num_steps": 3, "model": model, "train_step": train_step}
    exec(compile(code, "README.md", "exec"), scope)
    scope["sync"].close()
    status = _status(address, procs.env)
    assert status["committed_version"] == 3, status
    _wait_for(saved.exists, 10, "the daemon's saved weights")
    _wait_for(lambda: torch.equal(load_file(saved)["proj.bias"], model.proj.bias.detach().to(torch.bfloat16)), 10,
              "the daemon to hold the last step's weights")


def test_daemon_wrong_coordinator_warns_and_require_exits_nonzero(procs):
    """A daemon pointed at a dead address warns with the address and the error, rate-limited, and --require-coordinator-s makes it exit 3."""
    dead = f"127.0.0.1:{free_port()}"
    weights = procs.tmp / "w.safetensors"
    save_file({"proj.weight": torch.zeros(4, 4)}, weights)
    t0 = time.monotonic()
    p = procs.start("daemon", "--coordinator", dead, "--weights", str(weights), "--require-coordinator-s", "3", log="daemon.log")
    assert p.wait(60) == 3
    assert time.monotonic() - t0 >= 3
    log = (procs.tmp / "daemon.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and f"cannot reach the coordinator at {dead}" in line]
    assert warnings and "UNAVAILABLE" in warnings[0], log
    # Several attempts in 3 s, one warning: the rest wait for the rate limit.
    assert len(warnings) == 1, log
    assert f"not registered with the coordinator at {dead} within --require-coordinator-s 3 s" in log


@pytest.mark.slow  # kills or signals processes
def test_daemon_require_coordinator_passes_when_registered(procs, tmp_path):
    """With a reachable coordinator, --require-coordinator-s does not stop the daemon; SIGINT then exits 130, SIGTERM 0 (the coordinator too)."""
    address = procs.coordinator()
    weights = tmp_path / "w.safetensors"
    save_file({"proj.weight": torch.zeros(4, 4)}, weights)
    p = procs.start("daemon", "--coordinator", address, "--weights", str(weights), "--require-coordinator-s", "30", log="d1.log")
    _wait_for(lambda: len(_status(address, procs.env)["daemons"]) == 1, 60, "the daemon")
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 130
    q = procs.start("daemon", "--coordinator", address, "--weights", str(weights), log="d2.log")
    _wait_for(lambda: any(d["state"] == "DAEMON_STATE_IDLE" for d in _status(address, procs.env)["daemons"]), 60, "the daemon")
    q.send_signal(signal.SIGTERM)
    assert q.wait(30) == 0
    coordinator = procs.procs[0]
    coordinator.send_signal(signal.SIGINT)
    assert coordinator.wait(30) == 130, "Ctrl-C on the coordinator exits non-zero"


@pytest.mark.slow  # kills or signals processes
def test_default_daemon_id_is_stable_across_restarts_and_unique_per_process(procs, tmp_path):
    """Without --daemon-id, a restarted memory daemon re-registers under the same id (no second row); a concurrent twin gets another id."""
    address = procs.coordinator()
    weights = tmp_path / "w.safetensors"
    save_file({"proj.weight": torch.zeros(4, 4)}, weights)

    def ids() -> list[str]:
        return sorted(d["daemonId"] for d in _status(address, procs.env)["daemons"])

    first = procs.start("daemon", "--coordinator", address, "--weights", str(weights), "--host", "hostA", log="a.log")
    _wait_for(lambda: len(ids()) == 1, 60, "the first daemon")
    (daemon_id,) = ids()
    assert daemon_id.startswith("hostA-memory-")
    first.kill()
    first.wait(30)
    procs.start("daemon", "--coordinator", address, "--weights", str(weights), "--host", "hostA", log="b.log")
    _wait_for(lambda: any(d["daemonId"] == daemon_id and d["state"] == "DAEMON_STATE_IDLE" and d.get("reason", "") == ""
                          for d in _status(address, procs.env)["daemons"]), 60, "the restarted daemon")
    assert ids() == [daemon_id]
    procs.start("daemon", "--coordinator", address, "--weights", str(weights), "--host", "hostA", log="c.log")
    _wait_for(lambda: len(ids()) == 2, 60, "the twin")
    assert ids() == [daemon_id, daemon_id + "-2"]


def test_cli_user_mistakes_are_one_line_and_debug_shows_traceback(procs, tmp_path):
    """Missing paths, bad weight files and an unreachable coordinator give one line and exit 1; --debug shows the traceback."""
    dead = f"127.0.0.1:{free_port()}"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    cases = {
        "missing": _cli("push", "--coordinator", dead, "--weights", str(tmp_path / "nope.safetensors"), "--version", "1"),
        "bad file": _cli("push", "--coordinator", dead, "--weights", str(bad), "--version", "1"),
        "unreachable": _cli("status", "--coordinator", dead, "--timeout-s", "2"),
        "serve missing": _cli("serve", str(tmp_path / "no-model"), "--coordinator", dead),
    }
    cases["missing, --debug"] = [*cases["missing"], "--debug"]
    running = {what: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=procs.env)
               for what, cmd in cases.items()}
    for what, p in running.items():
        _, err = p.communicate(timeout=120)
        if what.endswith("--debug"):
            assert p.returncode != 0 and "Traceback" in err and "FileNotFoundError" in err, (what, err)
            continue
        assert p.returncode == 1, (what, err)
        assert "Traceback" not in err, (what, err)
        assert re.search(r"^weightsync (push|status|serve): error: .+", err, re.M), (what, err)
        if what == "missing":
            assert "no such file or directory" in err, err
        if what == "serve missing":
            assert "no such model directory" in err, err
        assert "--debug" in err, (what, err)


def test_status_on_empty_coordinator_says_no_version_yet(procs):
    """`weightsync status` on a coordinator that has committed nothing says so instead of printing -1."""
    address = procs.coordinator()
    r = subprocess.run(_cli("status", "--coordinator", address), capture_output=True, text=True, cwd=ROOT, env=procs.env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "committed version: none (no version committed yet)" in r.stdout
    assert "-1" not in r.stdout


@pytest.mark.parametrize("command", ["coordinator", "status", "daemon", "push", "serve", "demo"])
def test_help_gives_every_option_a_text_and_default(command):
    """Every option of every subcommand has a help text; those with a default show it, with the unit in the name or metavar."""
    from weightsync.runtime.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices[command]
    text = sub.format_help()
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help text"
            if action.default not in (None, False) and action.help is not __import__("argparse").SUPPRESS:
                assert "default" in action.help or f"(default: {action.default})" in " ".join(text.split()), (
                    f"{command} {action.option_strings[0]}: default {action.default!r} not shown"
                )
    for opt in ("--deadline-s", "--drain-s", "--heartbeat-timeout-s", "--require-coordinator-s", "--timeout-s"):
        if opt in text:
            assert re.search(re.escape(opt) + r" SECONDS", text), f"{command} {opt} does not say its unit"


@pytest.mark.slow  # kills or signals processes
def test_push_raise_on_failure_false_returns_report_when_the_coordinator_ended_the_round_first(procs, tmp_path, caplog):
    """When a daemon fails and the coordinator ends the round before the trainer aborts it, push(raise_on_failure=False) returns the FAILED report."""
    from weightsync.dataplane import DeferredTensor
    from weightsync.runtime.trainer import WeightSync

    address = procs.coordinator()
    weights = {"a.weight": torch.zeros(64, 64), "b.weight": torch.zeros(64, 64)}
    save_file(weights, tmp_path / "w.safetensors")
    d = procs.start("daemon", "--coordinator", address, "--weights", str(tmp_path / "w.safetensors"), "--daemon-id", "victim",
                    log="victim.log")
    _wait_for(lambda: len(_status(address, procs.env)["daemons"]) == 1, 60, "the daemon")

    def then_kill():
        # The daemon dies while the trainer is still producing the round's bytes.
        d.kill()
        d.wait(30)
        _wait_for(lambda: any(r["state"] == "ROUND_STATE_FAILED" for r in _status(address, procs.env)["rounds"]), 30,
                  "the coordinator to fail the round")
        return torch.ones(64, 64)

    source = {"a.weight": DeferredTensor((64, 64), torch.float32, then_kill), "b.weight": torch.ones(64, 64)}
    with caplog.at_level("INFO", logger="weightsync"), WeightSync(address, collective_timeout_s=10, deadline_s=60) as sync:
        report = sync.push(source, version=1, raise_on_failure=False)
    assert report is not None and report.state == "FAILED", report
    # The late abort is routine, not an error: no ERROR, no traceback.
    assert not [r for r in caplog.records if r.name == "weightsync.runtime.trainer" and (r.levelno >= 40 or r.exc_info)], caplog.text
    assert "had already ended" in caplog.text
    assert [v.daemon_id for v in report.results] == ["victim"] and report.results[0].status == "FAILED"
    assert "see stack trace" not in report.reason.lower() and report.reason



async def test_a_dead_vllm_engine_is_named_as_the_reason_not_a_stack_trace():
    """vLLM's EngineDeadError ("See stack trace (above)") reaches the round as what happened, with its cause."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from weightsync.control.daemon_agent import failure_reason
    from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous, TensorSpec, TransferError
    from weightsync.runtime.vllm_commands import VllmHandler

    class DeadEngine:
        """Stands in for VllmEngine whose engine core process has died (killing one here would also end the server)."""

        async def apply_assignment(self, assignment, ranks, progress=None):
            try:
                raise ConnectionResetError("engine core socket closed")
            except ConnectionResetError as e:
                raise EngineDeadError() from e

    a = Assignment("u1", 3, Rendezvous("gloo", "127.0.0.1", 1234, 2, "g"), (Participant("engine-a", (1,)),),
                   BucketPlan.build([TensorSpec("w", (4,), "float32")]), 10.0)
    with pytest.raises(TransferError) as info:
        await VllmHandler(DeadEngine())(a, (1,), lambda *_: None)
    reason = failure_reason(info.value)
    assert "the vLLM engine died during update u1" in reason, reason
    assert "caused by ConnectionResetError: engine core socket closed" in reason, reason
    assert "stack trace (above)" not in reason, reason
