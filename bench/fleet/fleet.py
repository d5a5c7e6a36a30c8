"""A whole weightsync fleet in emulated hosts: coordinator, trainer rank, memory daemons, each behind its own link.

    with EmulatedFleet(FleetSpec(num_engines=3, link=LinkSpec.symmetric(200))) as fleet:
        fleet.wait_daemons()
        answer = fleet.push(1)                  # {"state": "COMMITTED", "push_s": ..., ...}
        fleet.net.set_link_up("e1", False)      # a fault

Hosts: `coord` (coordinator, and the console that reads its state), `t0` (trainer rank 0,
which hosts the data-plane store and broadcasts), and one host per engine rank, `e{m}` or
`e{m}r{t}` with TP > 1 (a memory daemon is one receiver rank). Every process runs inside its
host's namespace through `ip netns exec`; everything is torn down by `close` (also on SIGTERM
once `install_signal_handlers` ran, and at interpreter exit). Each process logs to
WORKDIR/logs/NAME.log; set WEIGHTSYNC_FLEET_KEEP=1 to keep the work directory after close.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.fleet.net import LinkSpec, Network
from bench.fleet.step import step_like
from weightsync.core import TensorSpec
from weightsync.dataplane.synthetic import random_tensors

__all__ = ["EmulatedFleet", "FleetSpec", "fleet_manifest"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
COORDINATOR_PORT = 50051  # every run has its own namespaces, so a fixed port never collides
# Python processes importing torch on a loaded 2-core machine start slowly: 16 daemons
# starting at once under a load average of 20 took over 2 minutes.
_START_TIMEOUT_S = 600.0
_STOP_GRACE_S = 5.0
_TRAINER_WORLD_PORT = 29400  # the trainer's own gloo world, on t0; every run has its own namespaces
_ROWS_PER_TENSOR = 512
_COLS = 1024  # 512 x 1024 bf16 = 1 MiB per tensor


def fleet_manifest(model_mib: float) -> list[TensorSpec]:
    """A synthetic model of model_mib MiB in bf16, as 1 MiB tensors with decoder-style names."""
    if not model_mib > 0:
        raise ValueError(f"model_mib must be > 0, got {model_mib!r}")
    rows_total = max(1, round(model_mib * (1 << 20) / (2 * _COLS)))
    specs, i = [], 0
    while rows_total > 0:
        rows = min(_ROWS_PER_TENSOR, rows_total)
        specs.append(TensorSpec(f"model.layers.{i}.mlp.down_proj.weight", (rows, _COLS), "bfloat16"))
        rows_total -= rows
        i += 1
    return specs


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSpec:
    """What to emulate. Timeouts are passed to the coordinator (heartbeats) and to each push."""

    num_engines: int
    tp: int = 1
    # S > 1: trainer ranks t0..t{S-1} each send what they hold (routed rounds), and TP engine
    # ranks declare their needs (memory_engine.tp_needs); 1: trainer rank 0 sends all (routed
    # from it by the TP ranks' needs when tp > 1).
    trainer_ranks: int = 1
    # Today's single-root dense round: engine ranks declare no needs, every rank takes the whole model.
    dense: bool = False
    model_mib: float = 4.0
    link: LinkSpec = field(default_factory=lambda: LinkSpec.symmetric(200))
    # Per-host links that differ from `link` (e.g. one impairable host for fault tests).
    links: dict[str, LinkSpec] = field(default_factory=dict)
    bucket_size_bytes: int = 0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    collective_timeout_s: float = 120.0
    deadline_s: float = 600.0
    prefix: str | None = None
    # torch intra-op threads in every emulated host's process (OMP_NUM_THREADS); see EmulatedFleet._env.
    threads_per_host: int = 1

    def __post_init__(self) -> None:
        if self.num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {self.num_engines}")
        if self.threads_per_host < 1:
            raise ValueError(f"threads_per_host must be >= 1, got {self.threads_per_host}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.trainer_ranks < 1:
            raise ValueError(f"trainer_ranks must be >= 1, got {self.trainer_ranks}")
        if self.dense and self.trainer_ranks > 1:
            raise ValueError(f"dense: today's dense round has one sender, got trainer_ranks {self.trainer_ranks}")
        unknown = sorted(set(self.links) - set(self.host_names))
        if unknown:
            raise ValueError(f"links: unknown hosts {unknown}; hosts are {self.host_names}")

    @property
    def engine_hosts(self) -> list[str]:
        if self.tp == 1:
            return [f"e{m}" for m in range(self.num_engines)]
        return [f"e{m}r{t}" for m in range(self.num_engines) for t in range(self.tp)]

    @property
    def trainer_hosts(self) -> list[str]:
        return [f"t{r}" for r in range(self.trainer_ranks)]

    @property
    def routed(self) -> bool:
        return not self.dense and (self.trainer_ranks > 1 or self.tp > 1)

    @property
    def host_names(self) -> list[str]:
        return ["coord", *self.trainer_hosts, *self.engine_hosts]


class _Proc:
    """A child process inside a host; for agents, a line reader on its stdout."""

    def __init__(self, name: str, popen: subprocess.Popen, *, lines: bool) -> None:
        self.name = name
        self.popen = popen
        self.lines: queue.Queue[str] = queue.Queue()
        if lines:
            threading.Thread(target=self._read, daemon=True, name=f"read-{name}").start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put("")  # EOF

    def send(self, obj: dict) -> None:
        self.popen.stdin.write(json.dumps(obj) + "\n")
        self.popen.stdin.flush()

    def answer(self, timeout_s: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"{self.name} gave no answer within {timeout_s:g} s") from None
        if not line:
            raise RuntimeError(f"{self.name} exited (code {self.popen.poll()}) without answering")
        return json.loads(line)


class EmulatedFleet:
    def __init__(self, spec: FleetSpec, *, workdir: str | os.PathLike | None = None) -> None:
        self.spec = spec
        hosts = [(h, spec.links.get(h, spec.link)) for h in spec.host_names]
        self.net = Network(hosts, prefix=spec.prefix)
        self.prefix = self.net.prefix
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"weightsync-{self.prefix}-"))
        self.logs = self.workdir / "logs"
        self.manifest = fleet_manifest(spec.model_mib)
        self.coordinator_address = f"{self.net.hosts['coord'].address}:{COORDINATOR_PORT}"
        self.daemons: dict[str, _Proc] = {}
        self.coordinator: _Proc | None = None
        self.trainer: _Proc | None = None
        self.trainers: list[_Proc] = []
        self.console: _Proc | None = None
        self._weights: dict[int, Path] = {}
        self._closed = False
        self._push_pending = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "EmulatedFleet":
        """Builds the network, then starts the coordinator, console, daemons and trainer agent."""
        atexit.register(self.close)
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            self.net.create()
            self.checkpoint(0)
            self._start_coordinator()
            for host in self.spec.engine_hosts:
                self.start_daemon(host)
            self.console = self._start_agent("coord", "console")
            for r, host in enumerate(self.spec.trainer_hosts):
                self.trainers.append(self._start_agent(
                    host, "trainer" if r == 0 else f"trainer{r}",
                    "--rendezvous-host", self.net.hosts[host].address,
                    "--bucket-size-bytes", str(self.spec.bucket_size_bytes),
                    "--deadline-s", str(self.spec.deadline_s),
                    "--collective-timeout-s", str(self.spec.collective_timeout_s),
                    "--min-daemons", str(len(self.spec.engine_hosts)),
                    "--trainer-rank", str(r), "--trainer-ranks", str(self.spec.trainer_ranks),
                    "--trainer-master", f"{self.net.hosts['t0'].address}:{_TRAINER_WORLD_PORT}",
                ))
            self.trainer = self.trainers[0]
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "EmulatedFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGHUP end the program through SystemExit, so `finally` blocks tear the fleet down."""

        def stop(signum, _frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop)

    def close(self) -> None:
        """Stops every process, deletes namespaces, links and bridge, and the work directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        # A second Ctrl-C or SIGTERM must not cut the teardown short and leave namespaces behind.
        held = {}
        if threading.current_thread() is threading.main_thread():
            held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self._teardown()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
            atexit.unregister(self.close)

    def _teardown(self) -> None:
        procs = [p for p in (*self.trainers, self.console, *self.daemons.values(), self.coordinator) if p is not None]
        for p in procs:
            if p.popen.poll() is None:
                p.popen.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for p in procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(_STOP_GRACE_S)
        self.net.close()
        if self._own_workdir and not os.environ.get("WEIGHTSYNC_FLEET_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ processes

    def _env(self, host: str, **extra: str) -> dict[str, str]:
        # gloo picks its interface by name; the host has lo and this one. One intra-op thread per
        # emulated host by default: all hosts share this machine's few cores, and torch's default
        # (one thread per core in every process) oversubscribes them, so every small parallel op
        # of a receiver waits at an OpenMP barrier for threads that are not running (measured by
        # bench/apply_contention.py: 7 processes applying a 2% delta to 64 MiB at once on 2 cores,
        # apply median 6.4 s with 2 threads each, 0.23 s with 1). A real host has its own cores.
        return {
            **os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": self.net.hosts[host].ifname,
            "OMP_NUM_THREADS": str(self.spec.threads_per_host), **extra,
        }

    def _popen(self, host: str, name: str, argv: list[str], *, agent: bool, env: dict[str, str] | None = None) -> _Proc:
        log_file = open(self.logs / f"{name}.log", "ab")
        popen = subprocess.Popen(
            [*self.net.exec_prefix(host), *argv],
            cwd=REPO_ROOT, env=env or self._env(host),
            stdin=subprocess.PIPE if agent else subprocess.DEVNULL,
            stdout=subprocess.PIPE if agent else log_file,
            stderr=log_file, text=agent,
        )
        log_file.close()
        return _Proc(name, popen, lines=agent)

    @staticmethod
    def _cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", "INFO", *args]

    def _start_coordinator(self) -> None:
        self.coordinator = self._popen("coord", "coordinator", self._cli(
            "coordinator", "--listen", self.coordinator_address,
            "--heartbeat-interval-s", str(self.spec.heartbeat_interval_s),
            "--heartbeat-timeout-s", str(self.spec.heartbeat_timeout_s),
        ), agent=False)

    def _start_agent(self, host: str, name: str, *args: str) -> _Proc:
        proc = self._popen(host, name, [
            sys.executable, "-m", "bench.fleet.agent", "--coordinator", self.coordinator_address, *args,
        ], agent=True)
        ready = proc.answer(_START_TIMEOUT_S)
        if ready.get("event") != "ready":
            raise RuntimeError(f"{name} agent did not start: {ready}")
        return proc

    def failpoints(self, host: str) -> Path:
        return self.workdir / f"{host}.failpoints"

    def saved(self, host: str) -> Path:
        return self.workdir / f"{host}.held.safetensors"

    def _tp_rank(self, host: str) -> int | None:
        """The TP rank of a routed fleet's engine host (it declares that rank's needs); None otherwise."""
        if not self.spec.routed or self.spec.tp == 1:
            return None
        return int(host.rpartition("r")[2])

    def start_daemon(self, host: str, served_version: int = 0) -> None:
        self.failpoints(host).write_text("")
        self.saved(host).unlink(missing_ok=True)
        tp_rank = self._tp_rank(host)
        tp_args = ["--tp", str(self.spec.tp), "--tp-rank", str(tp_rank)] if tp_rank is not None else []
        self.daemons[host] = self._popen(host, host, self._cli(
            "daemon", "--coordinator", self.coordinator_address, "--weights", str(self._weights[0]),
            "--daemon-id", host, "--host", host, "--served-version", str(served_version),
            "--save-on-commit", str(self.saved(host)), "--drain-s", "2", *tp_args,
        ), agent=False, env=self._env(host, WEIGHTSYNC_FAILPOINTS_FILE=str(self.failpoints(host))))

    def set_failpoints(self, host: str, **points) -> None:
        self.failpoints(host).write_text("".join(f"{k} {v}\n" for k, v in points.items()))

    # ------------------------------------------------------------------ rounds

    def checkpoint(self, version: int) -> Path:
        """The weights of `version` (random, seeded by the version), written once."""
        if version not in self._weights:
            path = self.workdir / f"v{version}.safetensors"
            save_file(dict(random_tensors(self.manifest, seed=version)), path)
            self._weights[version] = path
        return self._weights[version]

    def step_checkpoint(self, version: int, *, base_version: int, fraction: float) -> Path:
        """The weights of `version`: `base_version`'s after a synthetic optimizer step (bench/fleet/step.py)."""
        if version in self._weights:
            raise ValueError(f"version {version}: its weights are already written ({self._weights[version]})")
        new = step_like(load_file(self.checkpoint(base_version)), fraction=fraction, seed=version)
        path = self.workdir / f"v{version}.safetensors"
        save_file(new, path)
        self._weights[version] = path
        return path

    def same_checkpoint(self, version: int, as_version: int) -> Path:
        """Declares `version` to carry exactly `as_version`'s weights (a dense round of the same step)."""
        if version in self._weights:
            raise ValueError(f"version {version}: its weights are already written ({self._weights[version]})")
        self._weights[version] = self.checkpoint(as_version)
        return self._weights[version]

    def start_push(self, version: int, *, hold: bool = False, base_version: int | None = None) -> None:
        """Asks the trainer for a round; `finish_push` (and, with hold, `release_commit`) follow.

        With base_version, the round is a delta against that version's weights (the coordinator
        sends it to daemons clean on exactly that version, dense to the others).
        """
        if self._push_pending:
            raise RuntimeError("a push is already pending: call finish_push first")
        for t in self.trainers:
            req = {"op": "push", "version": version, "weights": str(self.checkpoint(version)), "hold": hold and t is self.trainer}
            if base_version is not None:
                req.update(base=str(self.checkpoint(base_version)), base_version=base_version)
            t.send(req)
        self._push_pending = True

    def wait_sent(self, timeout_s: float) -> None:
        """With hold: waits until the trainer has sent everything and stopped before its commit."""
        answer = self.trainer.answer(timeout_s)
        if answer.get("event") != "sent":
            self._push_pending = False
            raise RuntimeError(f"expected the trainer to stop before its commit, got {answer}")

    def release_commit(self) -> None:
        self.trainer.send({"op": "go"})

    def finish_push(self, timeout_s: float) -> dict:
        """Rank 0's answer (the verdict); the other trainer ranks' answers are awaited too, so the next push finds them idle."""
        try:
            answers = [t.answer(timeout_s) for t in self.trainers]
            return answers[0]
        finally:
            self._push_pending = False

    def push(self, version: int, timeout_s: float | None = None, *, base_version: int | None = None) -> dict:
        self.start_push(version, base_version=base_version)
        return self.finish_push(timeout_s or self.spec.deadline_s + 60)

    # ------------------------------------------------------------------ observation

    def _ask(self, obj: dict, timeout_s: float = 30.0) -> dict:
        self.console.send(obj)
        answer = self.console.answer(timeout_s)
        if answer.get("event") == "error":
            raise RuntimeError(f"console: {answer['error']}")
        return answer

    def daemons_info(self) -> dict[str, dict]:
        """ListDaemons, by daemon id: state, served_version, dirty, stale."""
        return self._ask({"op": "daemons"})["daemons"]

    def last_round(self) -> dict | None:
        rounds = self._ask({"op": "rounds", "limit": 1})["rounds"]
        return rounds[0] if rounds else None

    def wait_until(self, predicate, timeout_s: float, what: str, interval_s: float = 0.2):
        """Polls predicate() until it returns something true; raises naming `what` after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except (RuntimeError, TimeoutError) as e:  # the console may lose the coordinator for a while
                last_error = e
            time.sleep(interval_s)
        raise TimeoutError(f"{what} not within {timeout_s:g} s (last error: {last_error}); logs in {self.logs}")

    def wait_daemons(self, hosts: list[str] | None = None, timeout_s: float = _START_TIMEOUT_S) -> dict[str, dict]:
        """Waits until these daemons (default: all) are registered and idle; returns ListDaemons."""
        want = hosts or list(self.daemons)

        def idle():
            info = self.daemons_info()
            return info if all(info.get(h, {}).get("state") == "IDLE" for h in want) else None

        return self.wait_until(idle, timeout_s, f"daemons {want} idle")

    def holds(self, host: str, version: int, timeout_s: float = 15.0) -> bool:
        """Whether the daemon's engine, as saved after its last OK verdict, equals `version`'s weights."""
        want = load_file(self.checkpoint(version))
        tp_rank = self._tp_rank(host)
        if tp_rank is not None:
            # A TP rank of a routed fleet holds its needed region of the new version, nothing more.
            from weightsync.core.routing import box_of
            from weightsync.dataplane.memory_engine import tp_needs

            needs = tp_needs(self.manifest, self.spec.tp)[tp_rank]
            want = {n: t[tuple(slice(lo, hi) for lo, hi in box_of(needs[n], tuple(t.shape)))] for n, t in want.items()}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                got = load_file(self.saved(host))
                if tp_rank is not None:
                    got = {n: t[tuple(slice(lo, hi) for lo, hi in box_of(needs[n], tuple(t.shape)))] for n, t in got.items()}
                if got.keys() == want.keys() and all(torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)) for k in want):
                    return True
            except Exception:  # not written yet, or being written: look again
                pass
            time.sleep(0.2)
        return False

    def counters(self) -> dict[str, dict[str, int]]:
        return self.net.counters()
