"""A trainer rank of an S-rank gloo DTensor trainer pushing routed rounds with WeightSync(routed=True)."""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback

import torch

from weightsync.dataplane.synthetic import MODEL_SHAPES, random_tensor

BUCKET_BYTES = 16 << 10  # the tiny model in ~12 buckets: room for a death mid-round
COLLECTIVE_TIMEOUT_S = 10.0
DEADLINE_S = 30.0


def specs():
    return MODEL_SHAPES["tiny"].manifest()


def _die_at_bucket(n: int) -> None:
    """SIGKILLs this process when its sender checks for aborts the n-th time (once per bucket)."""
    from weightsync.dataplane.groups import DataPlaneGroup

    real = DataPlaneGroup.check_abort
    seen = []

    def check(self, what):
        if what.startswith("routed round bucket"):
            seen.append(what)
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, what)

    DataPlaneGroup.check_abort = check


def main(rank: int, world: int, init_file: str, address: str, version: int, die_at_bucket: int | None, outbox) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        from weightsync.runtime.trainer import WeightSync

        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        # FSDP2's layout: dim 0 of every 2-D tensor sharded, 1-D tensors replicated here.
        model = {
            s.name: distribute_tensor(random_tensor(s, version), mesh, [Shard(0)] if len(s.shape) == 2 else [Replicate()])
            for s in specs()
        }
        if die_at_bucket is not None:
            _die_at_bucket(die_at_bucket)
        started = time.monotonic()
        with WeightSync(
            address, routed=True, bucket_size_bytes=BUCKET_BYTES, collective_timeout_s=COLLECTIVE_TIMEOUT_S, deadline_s=DEADLINE_S
        ) as sync:
            try:
                report = sync.push(model, version=version, raise_on_failure=False)
                error = None
            except Exception as e:  # reported to the test, which asserts on it
                report, error = sync.last_report, f"{type(e).__name__}: {e}"
        outbox.put((rank, _summary(report), error, time.monotonic() - started))
        torch.distributed.destroy_process_group()
    except BaseException as e:
        outbox.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))


def _summary(report) -> dict | None:
    if report is None:
        return None
    return {
        "state": report.state,
        "reason": report.reason,
        "results": {v.daemon_id: (v.status, list(v.mismatched_tensors)) for v in report.results},
        "rank_bytes": dict(report.rank_bytes),
        "wire": {v.daemon_id: (v.encoding, v.bytes_received) for v in report.results},
    }


STREAM_SEED = 10  # version v of the delta tests' stream is STREAM_SEED's tensors after v - STREAM_SEED steps


def stream_version(version: int) -> dict[str, torch.Tensor]:
    """The full tensors of `version` in the delta tests' change stream (about 2% of elements change per version)."""
    from bench.fleet.step import change_stream

    return change_stream(specs(), seed=STREAM_SEED, steps=version - STREAM_SEED)


def serve(rank: int, world: int, init_file: str, address: str, inbox, outbox, routed: bool = True) -> None:
    """One long-lived rank of a WeightSync(routed=routed, delta=True) trainer: pushes what `inbox` says, keeping its base between pushes.

    A command is (version, base, die_at_bucket): base None pushes against the kept base (or
    dense), else (content version, claimed base_version, whole) pushes an explicit base, as
    whole tensors or sharded like the model; None stops.
    """
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        from weightsync.runtime.trainer import WeightSync

        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))

        def model(version: int) -> dict:
            full = stream_version(version)
            return {s.name: distribute_tensor(full[s.name], mesh, [Shard(0)] if len(s.shape) == 2 else [Replicate()]) for s in specs()}

        with WeightSync(
            address, routed=routed, delta=True, bucket_size_bytes=BUCKET_BYTES, collective_timeout_s=COLLECTIVE_TIMEOUT_S,
            deadline_s=DEADLINE_S,
        ) as sync:
            while (command := inbox.get()) is not None:
                version, base, die_at_bucket = command
                if die_at_bucket is not None:
                    _die_at_bucket(die_at_bucket)
                started = time.monotonic()
                explicit = {}
                if base is not None:
                    explicit = {"base": stream_version(base[0]) if base[2] else model(base[0]), "base_version": base[1]}
                try:
                    report = sync.push(model(version), version=version, raise_on_failure=False, **explicit)
                    error = None
                except Exception as e:  # reported to the test, which asserts on it
                    report, error = sync.last_report, f"{type(e).__name__}: {e}"
                outbox.put((rank, _summary(report), error, time.monotonic() - started))
        torch.distributed.destroy_process_group()
    except BaseException as e:
        outbox.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 0.0))
