"""20 seeded rounds, each with one fault or hostile act; after every round no view of any engine claims a
version it does not hold, and only rounds move the committed version and the floor."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time

import grpc
import pytest

from tests.faults.fleet import Fleet, wait_for
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

# Chosen so that 20 rounds draw every fault of FAULTS at least once.
SEED = 20261132
NUM_ROUNDS = 20
IDLE = 1
FAULTS = [
    "none",
    "daemon_kill",  # SIGKILL mid-transfer
    "daemon_stop",  # SIGSTOP mid-transfer, SIGCONT once it is LOST
    "trainer_kill",  # SIGKILL mid-transfer
    "trainer_kill_before_commit",  # SIGKILL after every daemon reported, before CommitUpdate
    "coordinator_kill",  # SIGKILL mid-round, then restarted
    "corrupt",  # one flipped bit in an applied tensor
    "late_join",  # a new daemon registers between rounds
    "stalled_stream",  # a Connect stream that never says hello and a connection stopped mid-frame, held through the round
    "absurd_registration",  # RegisterDaemon claiming served_version 2^63-1
    "duplicate_id",  # a second daemon process started with an existing daemon's id
    "bad_registration",  # RegisterDaemon with absurd sizes under an existing daemon's id
]
# Hostile input, not faults of the fleet: each such round must commit for every engine.
HOSTILE = {"stalled_stream", "absurd_registration", "duplicate_id", "bad_registration"}


class _StalledStreams:
    """A Connect stream that never sends its hello, and a raw connection that stops halfway through a frame."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self._sock = socket.create_connection((host, int(port)), timeout=5)
        # The HTTP/2 preface, then 4 of a SETTINGS frame's 9 header bytes: and nothing more.
        self._sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x06\x04")
        self._release = threading.Event()
        self._channel = grpc.insecure_channel(address)

        def never():
            self._release.wait()
            return
            yield  # a generator that yields nothing until released

        self._call = pb_grpc.DaemonServiceStub(self._channel).Connect(never())

    def close(self) -> None:
        self._release.set()
        self._call.cancel()
        self._channel.close()
        self._sock.close()


def _register(address: str, req: pb.RegisterDaemonRequest) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        try:
            pb_grpc.DaemonServiceStub(ch).RegisterDaemon(req, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def _register_absurd(fleet: Fleet, daemon_id: str) -> None:
    """A registration claiming served_version 2^63-1 is taken as an unknown version: dirty in every view, the floor unmoved."""
    req = pb.RegisterDaemonRequest(
        daemon_id=daemon_id, engine="memory", model="x", host="h", num_ranks=1,
        inventory=[pb.TensorSpec(name="model.norm.weight", shape=[512], dtype="bfloat16")],
        transports=["gloo"], served_version=2**63 - 1, dirty=False,
    )
    assert _register(fleet.address, req) == grpc.StatusCode.OK
    listed = {d.daemon_id: d for d in fleet.client.list_daemons().daemons}
    assert listed[daemon_id].unknown_version and listed[daemon_id].dirty, listed[daemon_id]


def _register_malformed(fleet: Fleet, victim: str, rng: random.Random) -> None:
    """Absurd sizes under a live daemon's id: INVALID_ARGUMENT, and the victim keeps its session."""
    req = pb.RegisterDaemonRequest(
        daemon_id=victim, engine="x", num_ranks=rng.choice([0, 10**6, 1]), transports=["gloo"],
        served_version=2**63 - 1, dirty=False, inventory=[pb.TensorSpec(name="w", shape=[2**62, 2**62], dtype="float32")],
    )
    assert _register(fleet.address, req) == grpc.StatusCode.INVALID_ARGUMENT


def _check_views(fleet: Fleet, committed: set[int], history: list) -> None:
    """No view of any engine claims a version its bytes do not hold.

    A daemon may rightly be clean on the version of a round that failed elsewhere: its own
    verdict was OK and the round covered its whole inventory. The fleet's committed version,
    though, must be one that committed, also across a coordinator restart (the state file).
    """
    listed = fleet.client.list_daemons()
    assert listed.committed_version in committed, (history, listed.committed_version)
    # Only rounds move the floor: no claim raises it past the newest round's version.
    assert listed.version_floor <= history[-1][0], (history, listed.version_floor)
    for d in listed.daemons:
        if d.daemon_id not in fleet.daemons:
            continue  # a registration without an engine (absurd_registration): no bytes to compare
        views = {"ListDaemons": (d.served_version, d.dirty or d.stale)}
        own = fleet.own_view(d.daemon_id)
        if own is not None:
            views["daemon"] = (own["served_version"], own["dirty"] or own["stale"])
        for view, (version, flagged) in views.items():
            if flagged or version <= 0:
                continue  # flagged engines claim nothing; version 0 is the files they started from
            assert fleet.holds(d.daemon_id, version), (history, view, d.daemon_id, version)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.mark.timeout(600)  # about 2-3 min alone; a machine shared by several suites needs the margin
def test_soak_twenty_seeded_rounds_of_mixed_faults(fleet):
    """20 rounds, each with one seeded fault (daemon/trainer/coordinator killed, stopped daemon, corrupt byte, late join,
    trainer killed before commit) or hostile act (stalled streams, absurd claim, duplicate id, malformed registration);
    every view stays truthful, hostile rounds commit, and a final round re-syncs every engine."""
    rng = random.Random(SEED)
    faults = FAULTS
    committed = {-1, 0}
    history = []
    version = 0
    started = time.monotonic()
    for r in range(NUM_ROUNDS):
        fault = rng.choice(faults)
        victim = rng.choice(sorted(fleet.daemons))
        version += 1
        rc = None
        if fault in ("none", "corrupt", "late_join", *HOSTILE):
            extra = None
            if fault == "corrupt":
                fleet.set_failpoints(victim, corrupt_applied="model.norm.weight")
            elif fault == "late_join":
                fleet.start_daemon(f"late{r}", served_version=-1)
                fleet.wait_daemons([f"late{r}"])
            elif fault == "stalled_stream":
                extra = _StalledStreams(fleet.address)
            elif fault == "absurd_registration":
                _register_absurd(fleet, f"absurd{r}")
            elif fault == "bad_registration":
                _register_malformed(fleet, victim, rng)
            elif fault == "duplicate_id":
                extra = fleet.start_impostor(victim)
            try:
                rc, _ = fleet.push(version, local=True)
            finally:
                if extra is not None:
                    extra.close()
        elif fault == "trainer_kill_before_commit":
            push = fleet.push(version, background=True, failpoints={"pause_before_commit_s": 600})
            try:
                fleet.wait_round_started()
                wait_for(lambda: all(d.state == IDLE for d in fleet.daemons_info().values()), 60, "daemons reported")
            finally:
                push.kill()
                push.wait(10)
            fleet.wait_round_ended()
        else:
            # A trainer that is to be killed is a process of its own; the others push from here (no start-up per round).
            push = fleet.push_mid_transfer(version, after_s=rng.uniform(0.2, 1.0), apply_delay_s=0.1, local=fault != "trainer_kill")
            if fault == "daemon_kill":
                fleet.kill_daemon(victim)
            elif fault == "daemon_stop":
                fleet.signal_daemon(victim, signal.SIGSTOP)
            elif fault == "trainer_kill":
                push.kill()
            elif fault == "coordinator_kill":
                fleet.kill_coordinator()
            rc, _ = fleet.finish_push(push)
            # Repair what the fault broke, as an operator or supervisor would.
            if fault == "daemon_kill":
                fleet.start_daemon(victim, served_version=0)
            elif fault == "daemon_stop":
                wait_for(lambda: fleet.daemons_info()[victim].state == 3, 30, f"{victim} LOST")  # DAEMON_STATE_LOST
                fleet.signal_daemon(victim, signal.SIGCONT)
            elif fault == "coordinator_kill":
                fleet.start_coordinator()
            elif fault == "trainer_kill":
                fleet.wait_round_ended()
        fleet.clear_failpoints()
        fleet.wait_daemons(list(fleet.daemons))
        if rc == 0:
            committed.add(version)
        history.append((version, fault, victim, rc))
        if fault in HOSTILE:
            listed = fleet.client.list_daemons()
            assert rc == 0 and listed.committed_version == listed.version_floor == version, (history, listed)
        _check_views(fleet, committed, history)
    version += 1
    rc, summary = fleet.push(version, local=True)
    assert rc == 0, (summary, history)
    fleet.assert_consistent(version)
    print(f"soak ({time.monotonic() - started:.0f} s):", history)
    assert sum(1 for _, f, _, _ in history if f != "none") >= 12, history
    assert {f for _, f, _, _ in history} == set(faults), history
