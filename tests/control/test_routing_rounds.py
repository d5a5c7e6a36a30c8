"""Routed rounds end to end: a 2-rank gloo DTensor trainer pushes into 2 memory daemons with TP=2 needs (real processes)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.conftest import free_port
from tests.control import _routed_trainer as trainer
from weightsync.control.trainer_client import SyncTrainerClient
from weightsync.core.routing import box_of
from weightsync.dataplane.memory_engine import tp_needs
from weightsync.dataplane.synthetic import random_tensor

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
S, TP = 2, 2
DAEMONS = ("tp-a", "tp-b")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsync.runtime.cli", "--log-level", "WARNING", *args]


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.1)


class _Fleet:
    """A coordinator and two `weightsync daemon --tp 2` processes, shared by the module's tests."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        weights = tmp / "v0.safetensors"
        save_file({s.name: random_tensor(s, 0) for s in trainer.specs()}, weights)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._start(_cli("coordinator", "--listen", self.address, "--heartbeat-interval-s", "0.3", "--heartbeat-timeout-s", "3"), "coordinator", env)
        for d in DAEMONS:
            self.failpoints(d).write_text("")
            self._start(
                _cli("daemon", "--coordinator", self.address, "--weights", str(weights), "--daemon-id", d, "--tp", str(TP),
                     "--served-version", "0", "--save-on-commit", str(tmp / f"{d}.safetensors"), "--drain-s", "2"),
                d, {**env, "WEIGHTSYNC_FAILPOINTS_FILE": str(self.failpoints(d))},
            )
        self.client = SyncTrainerClient(self.address, rpc_timeout_s=10)

    def _start(self, cmd, name, env) -> None:
        log = open(self.tmp / f"{name}.log", "a")
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def failpoints(self, d: str) -> Path:
        return self.tmp / f"{d}.failpoints"

    def daemons(self) -> dict:
        try:
            return {d.daemon_id: d for d in self.client.list_daemons().daemons}
        except Exception:  # the coordinator may still be starting
            return {}

    def wait_idle(self, timeout_s: float) -> None:
        _wait(lambda: all(d in self.daemons() and self.daemons()[d].state == 1 for d in DAEMONS), timeout_s, f"daemons {DAEMONS} idle")

    def push(self, version: int, die_at_bucket: dict[int, int] | None = None, timeout_s: float = 120.0):
        """Runs the S trainer ranks; returns {rank: (summary, error, seconds)} and their exit codes."""
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed.tensor", "weightsync.runtime.trainer"])
        outbox = ctx.Queue()
        init_file = str(self.tmp / f"init-v{version}")
        procs = [
            ctx.Process(target=trainer.main, args=(r, S, init_file, self.address, version, (die_at_bucket or {}).get(r), outbox), daemon=True)
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
                p.join(timeout=20)
                if p.is_alive():
                    p.kill()
                    p.join()
        return out, [p.exitcode for p in procs]

    def close(self) -> None:
        self.client.close()
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = _Fleet(tmp_path_factory.mktemp("routed"))
    try:
        f.wait_idle(180)  # cold start of 3 Python+torch processes on a loaded 2-core machine
        yield f
    finally:
        f.close()


def _receiver_ranks(d: str) -> list[int]:
    first = S + DAEMONS.index(d) * TP
    return list(range(first, first + TP))


def test_routed_round_moves_only_the_needed_bytes(fleet):
    """Every TP rank holds the trainer's bytes in its region; the round record shows half the sharded bytes plus the replicated ones per rank, and the senders emitting each needed byte once."""
    out, codes = fleet.push(1)
    summary, error, _ = out[0]
    assert error is None and summary["state"] == "COMMITTED", (summary, error)
    assert codes == [0, 0]
    specs = trainer.specs()
    needs = tp_needs(specs, TP)
    for d in DAEMONS:
        for t in range(TP):
            held = load_file(fleet.tmp / f"{d}.rank{t}.safetensors")
            for s in specs:
                inside = tuple(slice(lo, hi) for lo, hi in box_of(needs[t][s.name], s.shape))
                assert torch.equal(held[s.name][inside].view(torch.int16), random_tensor(s, 1)[inside].view(torch.int16)), (d, t, s.name)
    sharded = sum(s.nbytes for s in specs if len(s.shape) == 2 and s.shape[0] % TP == 0)
    whole = sum(s.nbytes for s in specs) - sharded
    rank_bytes = summary["rank_bytes"]
    for d in DAEMONS:
        for r in _receiver_ranks(d):
            assert rank_bytes[r] == (d, 0, sharded // TP + whole), (r, rank_bytes[r])
    sent = [rank_bytes[r][1] for r in range(S)]
    # Every distinct needed byte leaves the senders once (receivers relay it to the other engine).
    assert sum(sent) == sharded + whole and min(sent) > 0.4 * sum(sent), sent
    info = fleet.daemons()
    assert all(info[d].served_version == 1 and not info[d].dirty for d in DAEMONS)
    shown = json.loads(subprocess.run(
        _cli("status", "--coordinator", fleet.address, "--json", "--rounds", "1"), cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout)
    listed = {int(b["rank"]): (b["daemonId"], int(b["bytesSent"]), int(b["bytesReceived"])) for b in shown["rounds"][0]["rankBytes"]}
    assert listed == rank_bytes


def test_corrupt_piece_flags_that_engine_only(fleet):
    """A bit flipped in one engine after its apply: CHECKSUM_MISMATCH naming that tensor for that engine, the other OK."""
    name = "model.layers.0.mlp.down_proj.weight"
    fleet.wait_idle(30)
    fleet.failpoints("tp-b").write_text(f"corrupt_applied {name}\n")
    try:
        out, _ = fleet.push(2)
    finally:
        fleet.failpoints("tp-b").write_text("")
    summary, _, _ = out[0]
    assert summary["state"] == "FAILED", summary
    assert summary["results"]["tp-a"] == ("OK", [])
    assert summary["results"]["tp-b"] == ("CHECKSUM_MISMATCH", [name])
    info = fleet.daemons()
    assert info["tp-b"].dirty and not info["tp-a"].dirty


def test_source_killed_mid_round_fails_fast_and_flags_engines(fleet):
    """Trainer rank 1 SIGKILLed at its 2nd bucket: rank 0's round ends within seconds, not the collective timeout, and both engines are flagged."""
    fleet.wait_idle(30)
    out, codes = fleet.push(3, die_at_bucket={1: 2})
    assert codes[1] == -9
    summary, error, seconds = out[0]
    assert summary is not None and summary["state"] in ("ABORTED", "FAILED"), (summary, error)
    assert all(status != "OK" for status, _ in summary["results"].values()), summary
    assert seconds < trainer.COLLECTIVE_TIMEOUT_S, seconds
    info = fleet.daemons()
    assert all(info[d].dirty for d in DAEMONS)


def test_one_rank_trainer_is_routed_by_the_daemons_needs(fleet):
    """A plain single-rank WeightSync (no routed flag) into TP daemons: the round is routed from rank 0, each TP rank gets its half."""
    from weightsync.runtime.trainer import WeightSync

    fleet.wait_idle(30)
    specs = trainer.specs()
    with WeightSync(fleet.address, bucket_size_bytes=trainer.BUCKET_BYTES, collective_timeout_s=trainer.COLLECTIVE_TIMEOUT_S,
                    deadline_s=trainer.DEADLINE_S) as sync:
        report = sync.push({s.name: random_tensor(s, 4) for s in specs}, version=4)
    assert report.committed
    sharded = sum(s.nbytes for s in specs if len(s.shape) == 2 and s.shape[0] % TP == 0)
    whole = sum(s.nbytes for s in specs) - sharded
    assert report.rank_bytes[0][1] == sharded + whole  # each needed byte once: the engines relay it
    # One sender: receivers are data-plane ranks 1..4.
    assert {r: b[2] for r, b in report.rank_bytes.items() if r > 0} == {r: sharded // TP + whole for r in range(1, 1 + len(DAEMONS) * TP)}


class _DeltaTrainer:
    """S long-lived ranks of a WeightSync(routed=True, delta=True) trainer (`_routed_trainer.serve`): the base lives between pushes."""

    def __init__(self, fleet: _Fleet, name: str, routed: bool = True) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed.tensor", "weightsync.runtime.trainer"])
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(S)]
        init_file = str(fleet.tmp / f"init-{name}")
        self.procs = [
            ctx.Process(target=trainer.serve, args=(r, S, init_file, fleet.address, self.inboxes[r], self.outbox, routed), daemon=True)
            for r in range(S)
        ]
        for p in self.procs:
            p.start()

    def push(self, version: int, base: tuple[int, int, bool] | None = None, die_at_bucket: dict[int, int] | None = None, timeout_s: float = 120.0):
        """{rank: (summary, error, seconds)} of one push on every rank; a rank killed on the way reports nothing."""
        for r, q in enumerate(self.inboxes):
            q.put((version, base, (die_at_bucket or {}).get(r)))
        out = {}
        deadline = time.monotonic() + timeout_s
        while set(out) | {r for r, p in enumerate(self.procs) if p.exitcode is not None} < set(range(S)):
            assert time.monotonic() < deadline, f"trainer ranks {sorted(set(range(S)) - set(out))} did not report version {version}"
            try:
                rank, summary, error, seconds = self.outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            out[rank] = (summary, error, seconds)
        return out

    def close(self) -> None:
        for q, p in zip(self.inboxes, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()


def _assert_holds(fleet: _Fleet, version: int, daemons, timeout_s: float = 20.0) -> None:
    """Every TP rank of `daemons` saved exactly `version`'s bytes in the region it needs.

    A daemon saves when its verdict arrives, which may be after the trainer's report: the files
    are polled until they hold the version or the deadline passes, then compared once more."""
    full = trainer.stream_version(version)
    needs = tp_needs(trainer.specs(), TP)

    def wrong() -> list:
        out = []
        for d in daemons:
            for t in range(TP):
                try:
                    held = load_file(fleet.tmp / f"{d}.rank{t}.safetensors")
                except Exception as e:  # not written yet, or being rewritten
                    out.append((d, t, type(e).__name__))
                    continue
                for s in trainer.specs():
                    inside = tuple(slice(lo, hi) for lo, hi in box_of(needs[t][s.name], s.shape))
                    if not torch.equal(held[s.name][inside].view(torch.int16), full[s.name][inside].view(torch.int16)):
                        out.append((d, t, s.name))
        return out

    deadline = time.monotonic() + timeout_s
    while wrong() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wrong() == [], (version, wrong()[:5])


def test_routed_delta_rounds_from_a_sharded_trainer(fleet):
    """2 DTensor ranks, each encoding what it sends, into --tp 2 memory daemons: dense then routed deltas (bytes equal after each,
    a few % of the dense wire bytes); a dirty engine and a late joiner dense in the same push as a delta; a wrong base caught on
    every engine and healed; a trainer rank killed mid-delta fails fast and flags both engines; the next push heals them.
    Then one-rank and sharded trainers without routed=True: the daemons' needs route them, and their kept base makes routed
    delta rounds from rank 0."""
    fleet.wait_idle(30)
    encodings = lambda summary: {d: w[0] for d, w in summary["wire"].items()}  # noqa: E731
    first = trainer.STREAM_SEED
    t = _DeltaTrainer(fleet, "delta-a")
    try:
        out = t.push(first)  # a fresh WeightSync has no base: dense
        summary, error, _ = out[0]
        assert error is None and summary["state"] == "COMMITTED", (summary, error)
        assert encodings(summary) == {"tp-a": "dense", "tp-b": "dense"}
        dense_bytes = summary["wire"]["tp-a"][1]
        assert dense_bytes == summary["wire"]["tp-b"][1] > 0
        _assert_holds(fleet, first, DAEMONS)
        # Deltas against the base every rank kept of its own shard.
        for v in (first + 1, first + 2):
            summary, error, _ = t.push(v)[0]
            assert error is None and summary["state"] == "COMMITTED", (summary, error)
            assert encodings(summary) == {"tp-a": "delta", "tp-b": "delta"}, summary
            print(f"version {v}: wire bytes {summary['wire']}, dense {dense_bytes}")
            for d in DAEMONS:
                assert 0 < summary["wire"][d][1] < 0.12 * dense_bytes, (d, summary["wire"][d], dense_bytes)
            _assert_holds(fleet, v, DAEMONS)
        # A bad apply on tp-b: only tp-b is flagged; tp-a verified (it serves the new version, though the round failed).
        v = first + 3
        fleet.failpoints("tp-b").write_text("corrupt_applied model.layers.0.mlp.down_proj.weight\n")
        try:
            summary, _, _ = t.push(v)[0]
        finally:
            fleet.failpoints("tp-b").write_text("")
        assert summary["state"] == "FAILED" and encodings(summary) == {"tp-a": "delta", "tp-b": "delta"}, summary
        assert summary["results"]["tp-a"] == ("OK", []) and summary["results"]["tp-b"] == ("CHECKSUM_MISMATCH", ["model.layers.0.mlp.down_proj.weight"])
        assert fleet.daemons()["tp-b"].dirty and not fleet.daemons()["tp-a"].dirty
        # A late joiner (claims version 0) and dirty tp-b get dense in the same push as tp-a's delta (explicit base: tp-a's version).
        fleet._start(
            _cli("daemon", "--coordinator", fleet.address, "--weights", str(fleet.tmp / "v0.safetensors"), "--daemon-id", "tp-c",
                 "--tp", str(TP), "--served-version", "0", "--save-on-commit", str(fleet.tmp / "tp-c.safetensors"), "--drain-s", "2"),
            "tp-c", {**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        everyone = (*DAEMONS, "tp-c")
        _wait(lambda: all(d in fleet.daemons() and fleet.daemons()[d].state == 1 for d in everyone), 180, f"{everyone} idle")
        v = first + 4
        summary, error, _ = t.push(v, base=(v - 1, v - 1, True))[0]  # whole tensors: each rank cuts out what it holds
        assert error is None and summary["state"] == "COMMITTED", (summary, error)
        assert encodings(summary) == {"tp-a": "delta", "tp-b": "dense", "tp-c": "dense"}, summary
        # Dense ranks of a delta round take their pieces whole in frames: the dense bytes plus headers and meta.
        assert summary["wire"]["tp-a"][1] < 0.12 * dense_bytes
        assert dense_bytes < summary["wire"]["tp-b"][1] == summary["wire"]["tp-c"][1] < 1.2 * dense_bytes, summary["wire"]
        _assert_holds(fleet, v, everyone)
        # The explicit base's push committed: every rank kept what it sent; all three are clean on it.
        summary, error, _ = t.push(first + 5)[0]
        assert summary["state"] == "COMMITTED" and set(encodings(summary).values()) == {"delta"}, (summary, error)
        _assert_holds(fleet, first + 5, everyone)
        # A wrong base: the bytes of first+4 said to be first+5 (which the engines serve): caught on every engine.
        v = first + 6
        summary, _, _ = t.push(v, base=(first + 4, first + 5, False))[0]
        assert summary["state"] == "FAILED" and set(encodings(summary).values()) == {"delta"}, summary
        assert {d: r[0] for d, r in summary["results"].items()} == dict.fromkeys(everyone, "CHECKSUM_MISMATCH"), summary
        assert all(fleet.daemons()[d].dirty for d in everyone)
        # Healed: flagged engines get dense (the kept base is still first+5's), and end verified.
        v = first + 7
        summary, error, _ = t.push(v)[0]
        assert error is None and summary["state"] == "COMMITTED" and set(encodings(summary).values()) == {"dense"}, (summary, error)
        _assert_holds(fleet, v, everyone)
        # Trainer rank 1 SIGKILLed at its 2nd bucket of a delta round: rank 0 ends within seconds, every engine flagged.
        v = first + 8
        out = t.push(v, die_at_bucket={1: 2})
        assert t.procs[1].exitcode == -9 and 1 not in out
        summary, error, seconds = out[0]
        assert summary is not None and summary["state"] in ("ABORTED", "FAILED"), (summary, error)
        assert set(encodings(summary).values()) == {"delta"}, summary
        assert seconds < trainer.COLLECTIVE_TIMEOUT_S, seconds
        assert all(fleet.daemons()[d].dirty for d in everyone)
    finally:
        t.close()
    # The next push (a new trainer: no base) heals every engine.
    _wait(lambda: all(d in fleet.daemons() and fleet.daemons()[d].state == 1 for d in everyone), 60, f"{everyone} idle")
    t = _DeltaTrainer(fleet, "delta-b")
    try:
        v = first + 9
        summary, error, _ = t.push(v)[0]
        assert error is None and summary["state"] == "COMMITTED" and set(encodings(summary).values()) == {"dense"}, (summary, error)
        _assert_holds(fleet, v, everyone)
        assert not any(fleet.daemons()[d].dirty for d in everyone)
    finally:
        t.close()
    # A single-rank WeightSync(delta=True): the daemons' needs route its rounds from rank 0 (holding all), and its
    # kept base (whole tensors) makes the next one a routed delta round.
    from weightsync.runtime.trainer import WeightSync

    with WeightSync(fleet.address, delta=True, bucket_size_bytes=trainer.BUCKET_BYTES, collective_timeout_s=trainer.COLLECTIVE_TIMEOUT_S,
                    deadline_s=trainer.DEADLINE_S) as sync:
        model = trainer.stream_version(first + 10)
        for v, want in ((first + 10, "dense"), (first + 11, "delta")):
            # Written in place, as an optimizer step writes parameters: the kept base must be a copy.
            for name, t in trainer.stream_version(v).items():
                model[name].copy_(t)
            report = sync.push(model, version=v)
            assert report.committed and {r.encoding for r in report.results} == {want}, report
            assert report.rank_bytes and min(report.rank_bytes) == 0 and max(report.rank_bytes) == len(everyone) * TP
            _assert_holds(fleet, v, everyone)
        assert all(r.bytes_received < 0.12 * dense_bytes for r in report.results), report.results
    # A sharded trainer without routed=True keeps its path (every rank gathers in plan order, rank 0 keeps the whole
    # base and sends); the daemons' needs route its rounds from rank 0, and its second push is a routed delta round.
    t = _DeltaTrainer(fleet, "delta-c", routed=False)
    try:
        for v, want in ((first + 12, "dense"), (first + 13, "delta")):
            summary, error, _ = t.push(v)[0]
            assert error is None and summary["state"] == "COMMITTED" and set(encodings(summary).values()) == {want}, (summary, error)
            assert max(summary["rank_bytes"]) == len(everyone) * TP  # one sender: data-plane rank 0, receivers 1..6
            _assert_holds(fleet, v, everyone)
    finally:
        t.close()
