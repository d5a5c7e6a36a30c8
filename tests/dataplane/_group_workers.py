"""A process that holds one GroupCache and forms groups on command, for the group-formation tests.

Each process is one trainer (rank 0, hosting a TrainerStore) or one receiver; the test sends
it rounds and it answers, per round, whether the group it got carried a real collective.
"""

from __future__ import annotations

import threading
import time
import traceback

import torch

from weightsync.dataplane import GroupCache, TrainerStore


def serve(is_trainer: bool, inbox, outbox) -> None:
    """Commands: ("round", assignment, rank, delay_s, abort_after_s) and ("stop",). Trainers first report their store port."""
    torch.set_num_threads(1)
    store = TrainerStore("127.0.0.1") if is_trainer else None
    cache = GroupCache(trainer_store=store)
    if store is not None:
        outbox.put(("port", store.port))
    try:
        while True:
            cmd = inbox.get()
            if cmd[0] == "stop":
                return
            _, a, rank, delay_s, abort_after_s = cmd
            time.sleep(delay_s)
            if abort_after_s is not None:
                threading.Timer(abort_after_s, cache.abort, (a.update_id, "the coordinator failed the round")).start()
            started = time.monotonic()
            try:
                group = cache.get(a, rank)
                group.begin_round(a.update_id, 60.0)
                t = torch.tensor([float(rank + 1)])
                group.wait(group.all_reduce_max(t, "probe"), "probe")
                outbox.put((rank, "ok", float(t.item()), time.monotonic() - started, cache.num_constructions))
            except Exception as e:  # reported to the test, which asserts on it
                outbox.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.monotonic() - started,
                            cache.num_constructions))
    finally:
        cache.close()
        if store is not None:
            store.close()
