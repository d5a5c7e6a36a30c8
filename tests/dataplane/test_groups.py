"""TrainerStore and GroupCache: the store exists before the coordinator knows its port; bad rendezvous fail fast."""

from __future__ import annotations

import datetime
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch
from torch.distributed import TCPStore

from _dp_workers import make_assignment
from weightsync.core import Participant, TransferError
from weightsync.dataplane import GroupCache, TrainerStore


def test_trainer_store_picks_a_free_port_that_clients_can_dial():
    """TrainerStore(host) with port 0 listens on a real port, readable before any peer exists."""
    with TrainerStore("127.0.0.1") as store:
        assert store.host == "127.0.0.1" and 0 < store.port < 65536
        client = TCPStore("127.0.0.1", store.port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=5))
        client.set("k", "v")
        assert store.store.get("k") == b"v"


def test_trainer_store_refuses_a_port_in_use():
    """Asking for a port that is taken is a ValueError naming the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}"):
            TrainerStore("127.0.0.1", port)


def test_rank_0_needs_its_own_store_with_the_rendezvous_port(tiny_specs):
    """The trainer's GroupCache refuses to run without its TrainerStore or with another port in the rendezvous."""
    with TrainerStore("127.0.0.1") as store:
        a = make_assignment(tiny_specs, port=store.port + 1 if store.port < 65535 else 1, world_size=2, update_id="u")
        with pytest.raises(ValueError, match="trainer_store=TrainerStore"):
            GroupCache().get(a, 0)
        with pytest.raises(ValueError, match="rendezvous_port"):
            GroupCache(trainer_store=store).get(a, 0)


def test_ranks_outside_the_round_are_refused(tiny_specs):
    """A rank beyond world_size, or one that is not a receiver of the round, is a ValueError."""
    a = make_assignment(tiny_specs, port=1, world_size=2, update_id="u")
    with pytest.raises(ValueError, match="expected 0..1"):
        GroupCache().get(a, 2)
    wider = make_assignment(tiny_specs, port=1, world_size=3, update_id="u")
    only_rank_1 = replace(wider, participants=(Participant("d1", (1,)),))
    with pytest.raises(ValueError, match="rank 2 is not among the receiver ranks"):
        GroupCache().get(only_rank_1, 2)


def test_unreachable_store_raises_transfer_error_within_the_timeout(tiny_specs):
    """A receiver pointed at a port where nothing listens raises TransferError after timeout_s, naming the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        a = make_assignment(tiny_specs, port=port, world_size=2, update_id="u", timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(TransferError, match=f"rank 1: cannot reach the rendezvous store at 127.0.0.1:{port}"):
            GroupCache().get(a, 1)
    assert time.monotonic() - started < 10.0


def test_receiver_waiting_for_an_absent_trainer_round_raises_after_the_timeout(tiny_specs):
    """If the trainer never opens the round, the receiver raises TransferError instead of waiting forever."""
    with TrainerStore("127.0.0.1") as store:
        a = make_assignment(tiny_specs, port=store.port, world_size=2, update_id="never", timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(TransferError, match="rendezvous for update never failed"):
            GroupCache().get(a, 1)
        assert 0.9 < time.monotonic() - started < 5.0


def _store_only_pair(store: TrainerStore, timeout_s: float):
    """Rank 0 and rank 1 of a store-only (cuda_ipc) group, built directly: the waits need no GPU."""
    from torch.distributed import PrefixStore

    from weightsync.core import Rendezvous
    from weightsync.dataplane import DataPlaneGroup

    rdv = Rendezvous("cuda_ipc", "127.0.0.1", store.port, 2, "g", timeout_s)
    client = TCPStore("127.0.0.1", store.port, is_master=False, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=5))
    groups = []
    for rank, raw in ((0, store.store), (1, client)):
        g = DataPlaneGroup(rendezvous=rdv, rank=rank, generation=1, store=PrefixStore("t", raw),
                           device=torch.device("cpu"), backend=None)
        g.begin_round("u1", 60.0)
        groups.append(g)
    return groups


def test_abort_notice_reaches_a_rank_waiting_on_the_store():
    """A rank that fails posts a notice; a peer blocked in wait_keys raises TransferError with that reason at once."""
    with TrainerStore("127.0.0.1") as store:
        sender, receiver = _store_only_pair(store, timeout_s=30.0)
        errors = []

        def wait():
            started = time.monotonic()
            try:
                receiver.wait_keys(["never-set"], "bucket 1/1 over CUDA IPC")
            except TransferError as e:
                errors.append((str(e), time.monotonic() - started))

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)
        sender.fail("sender stopped: RuntimeError: boom")
        t.join(timeout=10)
        assert errors, "the waiting rank did not give up"
        message, elapsed = errors[0]
        assert "rank 1: bucket 1/1 over CUDA IPC abandoned: rank 0: sender stopped: RuntimeError: boom" in message
        assert elapsed < 2.0
        assert receiver.is_broken and sender.is_broken


def test_store_wait_gives_up_after_timeout_s():
    """A key that never appears makes wait_keys raise TransferError naming timeout_s, not wait forever."""
    with TrainerStore("127.0.0.1") as store:
        _, receiver = _store_only_pair(store, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(TransferError, match="did not finish within timeout_s=0.5"):
            receiver.wait_keys(["never-set"], "acknowledgements of bucket 1/1")
        assert 0.4 < time.monotonic() - started < 3.0


class _Procs:
    """Trainer and receiver processes, each holding its own GroupCache (_group_workers.py)."""

    def __init__(self, roles: dict[str, bool]) -> None:
        import torch.multiprocessing as mp

        import _group_workers

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "weightsync.dataplane", "_group_workers"])
        self.inbox = {name: ctx.Queue() for name in roles}
        self.outbox = {name: ctx.Queue() for name in roles}
        self.procs = {
            name: ctx.Process(target=_group_workers.serve, args=(trainer, self.inbox[name], self.outbox[name]), daemon=True)
            for name, trainer in roles.items()
        }
        for p in self.procs.values():
            p.start()
        self.port = {name: self.outbox[name].get(timeout=60)[1] for name, trainer in roles.items() if trainer}

    def round(self, seats: dict[str, tuple], timeout_s: float = 60.0) -> dict[str, tuple]:
        """seats: name -> (assignment, rank, delay_s, abort_after_s); returns name -> (status, value, seconds, constructions)."""
        for name, seat in seats.items():
            self.inbox[name].put(("round", *seat))
        return {name: self.outbox[name].get(timeout=timeout_s)[1:] for name in seats}

    def close(self) -> None:
        for q in self.inbox.values():
            q.put(("stop",))
        for p in self.procs.values():
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


def test_a_trainer_reusing_its_group_after_the_receiver_joined_another_trainer_forms_it_anew(tiny_specs):
    """Trainer A, then trainer B, then A again, into one receiver: A's cached group is rebuilt with the receiver, not reused alone.

    The receiver left A's group to join B's. Reused by A alone, the receiver would rebuild A's
    generation from the join keys and addresses left in A's store by the first formation (the
    round then failed: ABORTED).
    """
    procs = _Procs({"A": True, "B": True, "R": False})
    try:
        def rnd(trainer: str, update_id: str):
            a = make_assignment(tiny_specs, port=procs.port[trainer], world_size=2, update_id=update_id,
                                group_id=f"g{trainer}", timeout_s=5.0)
            return procs.round({trainer: (a, 0, 0.0, None), "R": (a, 1, 0.0, None)})

        for trainer, update_id in (("A", "a1"), ("B", "b1"), ("A", "a2")):
            out = rnd(trainer, update_id)
            assert out[trainer][0] == "ok" and out["R"][0] == "ok", (update_id, out)
            assert out[trainer][1] == out["R"][1] == 2.0, (update_id, out)
        assert out["A"][3] == 2, "trainer A rebuilt its group for the receiver that had left it"
        out = rnd("A", "a3")
        assert out["A"][:2] == out["R"][:2] == ("ok", 2.0), out
        assert out["A"][3] == 2, "a group every rank still holds is reused"
    finally:
        procs.close()


def test_a_formation_abandoned_by_one_rank_fails_every_rank_at_once_and_late_joiners_never_build_it(tiny_specs):
    """Rank 0 is aborted at the join barrier; the rank waiting there and the rank that arrives later both fail fast with its reason.

    Before, rank 0 left its join key behind: the late rank completed the barrier, and both
    receivers sat in gloo's group construction, waiting for rank 0's address until timeout_s.
    """
    procs = _Procs({"T": True, "R1": False, "R2": False})
    try:
        a = make_assignment(tiny_specs, port=procs.port["T"], world_size=3, update_id="u1", timeout_s=20.0)
        out = procs.round({"T": (a, 0, 0.0, 1.0), "R1": (a, 1, 0.0, None), "R2": (a, 2, 2.5, None)})
        for name in ("T", "R1", "R2"):
            assert out[name][0] == "error" and "the coordinator failed the round" in out[name][1], (name, out[name])
        assert out["R1"][2] < 5.0, out["R1"]  # rank 0 gave up after 1 s
        assert out["R2"][2] < 3.0, out["R2"]  # it arrived after the formation was abandoned
        # The next round forms a fresh group on every rank.
        b = make_assignment(tiny_specs, port=procs.port["T"], world_size=3, update_id="u2", timeout_s=20.0)
        out = procs.round({"T": (b, 0, 0.0, None), "R1": (b, 1, 0.0, None), "R2": (b, 2, 0.0, None)})
        assert all(o[:2] == ("ok", 3.0) for o in out.values()), out
    finally:
        procs.close()
