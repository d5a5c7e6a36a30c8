"""Same-GPU transport: receivers read the sender's bucket buffers through CUDA IPC.

For a trainer and an engine that share one GPU, where NCCL refuses two ranks on one
device. The sender exports its ring buffers once per round; for each bucket it
publishes "bucket k is in slot s" in the rendezvous store after its packing stream
has finished; each receiver copies the bucket device-to-device into its own ring,
synchronises, and acknowledges; the sender reuses a slot only when every receiver
has acknowledged the bucket in it. No process group is built.

Handles travel as plain JSON, never pickle: anyone who can write to the store must
not be able to run code in a receiver.
"""

from __future__ import annotations

import json
import logging

import torch

from weightsync.core import TransferError
from weightsync.dataplane.groups import DataPlaneGroup

__all__ = ["IpcIn", "IpcOut", "export_buffer", "import_buffer"]

log = logging.getLogger(__name__)


def export_buffer(buf: torch.Tensor) -> str:
    """A JSON description of a flat uint8 CUDA buffer that another process on the same GPU can map."""
    from torch.multiprocessing.reductions import reduce_tensor

    if buf.device.type != "cuda" or buf.dtype != torch.uint8 or buf.dim() != 1 or buf.storage_offset() != 0:
        raise ValueError(f"export_buffer needs a whole 1-D uint8 CUDA buffer, got {buf.dtype} on {buf.device}")
    _, args = reduce_tensor(buf)
    (_, size, _, _, _, _, device, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset, event, event_sync) = args
    return json.dumps(
        {
            "numel": int(size[0]),
            "device": int(device),
            "handle": bytes(handle).hex(),
            "storage_bytes": int(storage_bytes),
            "storage_offset": int(storage_offset),
            "ref_handle": bytes(ref_handle).hex(),
            "ref_offset": int(ref_offset),
            "event": bytes(event).hex() if event is not None else None,
            "event_sync": bool(event_sync),
        }
    )


def import_buffer(blob: str | bytes) -> torch.Tensor:
    """Maps a buffer described by export_buffer; keep the tensor only while the exporter keeps its buffer."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        d = json.loads(blob)
        event = bytes.fromhex(d["event"]) if d["event"] is not None else None
        return rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size([int(d["numel"])]),
            (1,),
            0,
            torch.storage.TypedStorage,
            torch.uint8,
            int(d["device"]),
            bytes.fromhex(d["handle"]),
            int(d["storage_bytes"]),
            int(d["storage_offset"]),
            False,
            bytes.fromhex(d["ref_handle"]),
            int(d["ref_offset"]),
            event,
            bool(d["event_sync"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(f"malformed CUDA IPC buffer description: {e}") from e


def _receiver_ranks(group: DataPlaneGroup) -> range:
    return range(1, group.world_size)


class IpcOut:
    """Sender side: publishes packed buckets and waits for every receiver's acknowledgement."""

    def __init__(self, group: DataPlaneGroup, ring: list[torch.Tensor], num_buckets: int) -> None:
        self._group = group
        self._num_buckets = num_buckets
        self._num_slots = len(ring)
        r = group.round_index
        for slot, buf in enumerate(ring):
            group.store.set(f"ipc/{r}/buffer/{slot}", export_buffer(buf))

    def start(self, k: int, slot: int, view: torch.Tensor) -> None:
        # Receivers read from another process, outside any stream ordering: the bytes
        # must be complete on the device before the store says so.
        torch.cuda.current_stream(view.device).synchronize()
        self._group.store.set(f"ipc/{self._group.round_index}/ready/{k}", f"{slot} {view.numel()}")

    def finish(self, k: int, handle: None) -> None:
        r = self._group.round_index
        acks = [f"ipc/{r}/ack/{k}/{rank}" for rank in _receiver_ranks(self._group)]
        self._group.wait_keys(acks, f"acknowledgements of bucket {k + 1}/{self._num_buckets}")
        # Every receiver has read and acknowledged bucket k: its keys are spent.
        for key in (f"ipc/{r}/ready/{k}", *acks):
            self._group.store.delete_key(key)

    def close(self) -> None:
        """Forgets the buffer handles; call once the round is closed and no receiver still looks them up."""
        r = self._group.round_index
        for slot in range(self._num_slots):
            self._group.store.delete_key(f"ipc/{r}/buffer/{slot}")


class IpcIn:
    """Receiver side: copies each published bucket out of the sender's buffer and acknowledges it."""

    def __init__(self, group: DataPlaneGroup, num_buckets: int) -> None:
        self._group = group
        self._num_buckets = num_buckets
        self._mapped: dict[int, torch.Tensor] = {}

    def _source(self, slot: int) -> torch.Tensor:
        src = self._mapped.get(slot)
        if src is None:
            key = f"ipc/{self._group.round_index}/buffer/{slot}"
            self._group.wait_keys([key], f"CUDA IPC handle of buffer {slot}")
            src = self._mapped[slot] = import_buffer(self._group.store.get(key))
        return src

    def start(self, k: int, slot: int, view: torch.Tensor) -> torch.Tensor:
        return view  # nothing to post: the sender publishes, the receiver pulls in finish()

    def finish(self, k: int, view: torch.Tensor) -> None:
        r = self._group.round_index
        what = f"bucket {k + 1}/{self._num_buckets} over CUDA IPC"
        key = f"ipc/{r}/ready/{k}"
        self._group.wait_keys([key], what)
        slot_text, nbytes_text = self._group.store.get(key).decode().split()
        if int(nbytes_text) != view.numel():
            raise self._group.fail(f"{what}: sender published {nbytes_text} bytes, the plan says {view.numel()}")
        src = self._source(int(slot_text))
        if src.device != view.device:
            raise self._group.fail(f"{what}: sender's buffer is on {src.device}, this receiver on {view.device}")
        view.copy_(src[: view.numel()])
        # The acknowledgement lets the sender overwrite the slot: the copy must be done first.
        torch.cuda.current_stream(view.device).synchronize()
        self._group.store.set(f"ipc/{r}/ack/{k}/{self._group.rank}", "")

    def close(self) -> None:
        # Mapped storages hold the sender's memory alive; let go of them at the end of every round.
        self._mapped.clear()
