"""A whole fleet as real processes: coordinator, memory daemons, trainer pushes; faults by real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import free_port
from weightsync.control.trainer_client import SyncTrainerClient

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_TIMEOUT_S = 3.0
COLLECTIVE_TIMEOUT_S = 8.0
DEADLINE_S = 25.0
BUCKET_BYTES = 1 << 20
# Issue 10's target: every rank out of the round this long after a participant's loss is known.
FAST_S = 5.0


def out_of_round_bound_s(sig: int) -> float:
    """How soon after `sig` reached a daemon every rank must be out of the round: a stopped daemon
    (its sockets open, nothing read) is known lost only at the heartbeat timeout, a killed one at once."""
    return FAST_S + (HEARTBEAT_TIMEOUT_S if sig == signal.SIGSTOP else 0.0)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", "WARNING", *args]


def make_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(1024, 512, generator=g)}
    for i in range(4):
        for p, shape in (("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (128, 512)), ("self_attn.v_proj", (128, 512)),
                         ("self_attn.o_proj", (512, 512)), ("mlp.gate_proj", (1024, 512)), ("mlp.up_proj", (1024, 512)),
                         ("mlp.down_proj", (512, 1024))):
            out[f"model.layers.{i}.{p}.weight"] = torch.randn(shape, generator=g)
    out["model.norm.weight"] = torch.randn(512, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Polls `predicate` until it holds; fails naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


class LocalPush:
    """A push by WeightSync on a thread of this process: the same round as `weightsync push`, without an interpreter start."""

    def __init__(self, address: str, weights: Path, version: int, collective_timeout_s: float, deadline_s: float) -> None:
        self.result: tuple[int, dict | None] | None = None
        self._thread = threading.Thread(
            target=self._run, args=(address, weights, version, collective_timeout_s, deadline_s), name=f"push-v{version}", daemon=True
        )
        self._thread.start()

    def _run(self, address: str, weights: Path, version: int, collective_timeout_s: float, deadline_s: float) -> None:
        from weightsync.runtime.trainer import WeightSync

        try:
            with WeightSync(address, bucket_size_bytes=BUCKET_BYTES, collective_timeout_s=collective_timeout_s, deadline_s=deadline_s) as sync:
                report = sync.push(load_file(weights), version=version, raise_on_failure=False)
            summary = {"state": report.state, "daemons": {v.daemon_id: v.status for v in report.results}, "reason": report.reason}
            self.result = (0 if report.committed else 1, summary)
        except Exception as e:  # as the CLI would: the round failed, say how
            self.result = (1, {"error": f"{type(e).__name__}: {e}"})

    def wait(self, timeout_s: float) -> tuple[int, dict | None]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the push did not end within {timeout_s:g} s"
        return self.result


class _Impostor:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Fleet:
    def __init__(self, tmp: Path, num_daemons: int = 3, daemon_args: tuple[str, ...] = ()) -> None:
        """`daemon_args`: extra `weightsync daemon` arguments for every daemon (e.g. --tp 2 --tp-rank 0)."""
        self.tmp = tmp
        self.daemon_args = daemon_args
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.coordinator: subprocess.Popen | None = None
        self.daemons: dict[str, subprocess.Popen] = {}
        self.weights: dict[int, Path] = {}
        self.base = self.checkpoint(0)
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.start_coordinator()
        for i in range(num_daemons):
            self.start_daemon(f"mem{i}", served_version=0)
        self.client = SyncTrainerClient(self.address, rpc_timeout_s=10)
        try:
            # Cold start of 4 Python+torch processes: seconds on an idle machine, a minute or more on a loaded one.
            self.wait_daemons(list(self.daemons), timeout_s=180)
        except BaseException:
            self.close()  # the fixture's teardown never runs when its setup raised: leave no process behind
            raise

    # ---------------------------------------------------------------- processes

    def _log(self, name: str):
        return open(self.logs / f"{name}.log", "a")

    def start_coordinator(self) -> None:
        self.coordinator = subprocess.Popen(
            cli("coordinator", "--listen", self.address, "--heartbeat-interval-s", "0.3", "--heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S),
                "--state-file", str(self.tmp / "coordinator-state.json")),
            cwd=ROOT, env=self.env, stdout=self._log("coordinator"), stderr=subprocess.STDOUT,
        )

    def failpoints(self, daemon_id: str) -> Path:
        return self.tmp / f"{daemon_id}.failpoints"

    def saved(self, daemon_id: str) -> Path:
        return self.tmp / f"{daemon_id}.held.safetensors"

    def state_file(self, daemon_id: str) -> Path:
        return self.tmp / f"{daemon_id}.state.json"

    def own_view(self, daemon_id: str) -> dict | None:
        """The daemon's own view of its engine (served_version, dirty, stale, busy), or None before it wrote one."""
        try:
            return json.loads(self.state_file(daemon_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def start_daemon(self, daemon_id: str, served_version: int = -1) -> None:
        self.failpoints(daemon_id).write_text("")
        self.saved(daemon_id).unlink(missing_ok=True)
        self.state_file(daemon_id).unlink(missing_ok=True)
        self.daemons[daemon_id] = subprocess.Popen(
            cli("daemon", "--coordinator", self.address, "--weights", str(self.weights[0]), "--daemon-id", daemon_id,
                "--served-version", str(served_version), "--save-on-commit", str(self.saved(daemon_id)), "--drain-s", "2",
                "--state-file", str(self.state_file(daemon_id)), *self.daemon_args),
            cwd=ROOT, env={**self.env, "WEIGHTSYNC_FAILPOINTS_FILE": str(self.failpoints(daemon_id))},
            stdout=self._log(daemon_id), stderr=subprocess.STDOUT,
        )

    def start_impostor(self, daemon_id: str) -> "_Impostor":
        """A second daemon process under an existing daemon's id (stopped with .close())."""
        proc = subprocess.Popen(
            cli("daemon", "--coordinator", self.address, "--weights", str(self.weights[0]), "--daemon-id", daemon_id,
                "--served-version", "0", "--drain-s", "1"),
            cwd=ROOT, env=self.env, stdout=self._log(f"impostor-{daemon_id}"), stderr=subprocess.STDOUT,
        )
        return _Impostor(proc)

    def set_failpoints(self, daemon_id: str, **points) -> None:
        self.failpoints(daemon_id).write_text("".join(f"{k} {v}\n" for k, v in points.items()))

    def slow_all(self, apply_delay_s: float = 0.15) -> None:
        for d in self.daemons:
            self.set_failpoints(d, apply_delay_s=apply_delay_s)

    def clear_failpoints(self) -> None:
        for d in self.daemons:
            self.set_failpoints(d)

    def checkpoint(self, version: int) -> dict[str, torch.Tensor]:
        w = make_weights(version)
        path = self.tmp / f"v{version}.safetensors"
        save_file(w, path)
        self.weights[version] = path
        return w

    def push(
        self,
        version: int,
        *,
        background: bool = False,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
        deadline_s: float = DEADLINE_S,
        failpoints: dict | None = None,
        local: bool = False,
        base: int | None = None,
        base_version: int | None = None,
    ):
        """Runs `weightsync push` for `version` (local: a LocalPush in this process); `failpoints` go to the trainer process."""
        if version not in self.weights:
            self.checkpoint(version)
        if local:
            push = LocalPush(self.address, self.weights[version], version, collective_timeout_s, deadline_s)
            return push if background else push.wait(DEADLINE_S + 30)
        cmd = cli("push", "--coordinator", self.address, "--weights", str(self.weights[version]), "--version", str(version),
                  "--bucket-size-bytes", str(BUCKET_BYTES), "--collective-timeout-s", str(collective_timeout_s),
                  "--deadline-s", str(deadline_s), "--json")
        if base is not None:  # a delta against that checkpoint (see `weightsync push --base`)
            cmd += ["--base", str(self.weights[base])]
            if base_version is not None:
                cmd += ["--base-version", str(base_version)]
        env = self.env
        if failpoints:
            path = self.tmp / f"push-v{version}.failpoints"
            path.write_text("".join(f"{k} {v}\n" for k, v in failpoints.items()))
            env = {**env, "WEIGHTSYNC_FAILPOINTS_FILE": str(path)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log(f"push-v{version}"), text=True)
        if background:
            return proc
        return self.finish_push(proc)

    def push_mid_transfer(self, version: int, *, after_s: float, apply_delay_s: float = 0.15, **push_options) -> subprocess.Popen:
        """Starts a slowed push and returns once it has been transferring for after_s: time for a fault."""
        self.slow_all(apply_delay_s)
        proc = self.push(version, background=True, **push_options)
        self.wait_round_started()
        time.sleep(after_s)
        return proc

    def wait_round_ended(self, timeout_s: float = DEADLINE_S + 5) -> str:
        """Waits (bounded by the round deadline) until the latest round leaves TRANSFERRING; returns its state."""
        deadline = time.monotonic() + timeout_s
        while (state := self.client.list_rounds(1)[0].state) == "TRANSFERRING":
            assert time.monotonic() < deadline, "the round must end within its deadline"
            time.sleep(0.2)
        return state

    def finish_push(self, proc: "subprocess.Popen | LocalPush", timeout_s: float = DEADLINE_S + 30) -> tuple[int, dict | None]:
        if isinstance(proc, LocalPush):
            return proc.wait(timeout_s)
        out, _ = proc.communicate(timeout=timeout_s)
        try:
            return proc.returncode, json.loads(out) if out.strip() else None
        except json.JSONDecodeError:
            return proc.returncode, None

    # ---------------------------------------------------------------- observation

    def daemons_info(self) -> dict:
        return {d.daemon_id: d for d in self.client.list_daemons().daemons}

    def wait_daemons(self, ids, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                info = self.daemons_info()
                if all(i in info and info[i].state == 1 for i in ids):  # DAEMON_STATE_IDLE
                    return
            except Exception:  # the coordinator may be restarting; keep polling until the deadline
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"daemons {ids} not idle within {timeout_s} s; logs in {self.logs}")
            time.sleep(0.2)

    def wait_round_started(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rounds = self.client.list_rounds(1)
            if rounds and rounds[0].state == "TRANSFERRING":
                return
            time.sleep(0.05)
        raise AssertionError("no round started")

    def assert_consistent(self, version: int) -> None:
        """Every engine serves `version`, is clean, and holds exactly that version's bytes."""
        info = self.daemons_info()
        for d in self.daemons:
            assert info[d].served_version == version and not info[d].dirty and not info[d].stale, (d, info[d])
            # The coordinator's verdict may be listed before the daemon has saved it: poll (bounded).
            assert self.holds(d, version), f"{d} does not hold version {version}"

    def holds(self, daemon_id: str, version: int, timeout_s: float = 10.0) -> bool:
        """Whether the daemon's saved engine state equals `version`'s weights (saved after its OK verdict)."""
        want = load_file(self.weights[version])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if same(load_file(self.saved(daemon_id)), want):
                    return True
            except Exception:  # not written yet, or being written: look again
                pass
            time.sleep(0.2)
        return False

    # ---------------------------------------------------------------- faults

    def kill_daemon(self, daemon_id: str) -> None:
        self.daemons[daemon_id].kill()
        self.daemons[daemon_id].wait(10)

    def signal_daemon(self, daemon_id: str, sig: int) -> None:
        os.kill(self.daemons[daemon_id].pid, sig)

    def bring_back(self, daemon_id: str, sig: int) -> None:
        """Undoes `signal_daemon(daemon_id, sig)` for SIGKILL (a fresh daemon serving version 0) or SIGSTOP (SIGCONT)."""
        if sig == signal.SIGKILL:
            self.start_daemon(daemon_id, served_version=0)
        else:
            self.signal_daemon(daemon_id, signal.SIGCONT)

    def kill_coordinator(self) -> None:
        self.coordinator.kill()
        self.coordinator.wait(10)

    def close(self) -> None:
        self.client.close()
        for p in self.daemons.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.kill()
            p.wait(10)
        if self.coordinator.poll() is None:
            self.coordinator.kill()
        self.coordinator.wait(10)
