"""Same-GPU transport: receivers read the sender's memory through CUDA IPC.

For a trainer and an engine that share one GPU, where NCCL refuses two ranks on one
device. No process group is built; control messages travel through the rendezvous
store, and the sender announces one of two modes per round in `ipc/{round}/sources`:

- direct: every tensor is already a contiguous CUDA tensor in its wire dtype. The sender
  exports the storages that hold them (once per storage, kept across rounds while the
  trainer keeps its tensors) and says where each tensor lies; receivers copy each tensor
  straight out of the trainer's memory, into the engine's own tensor where the consumer
  offers one, checksumming on the way. Nothing is packed; the sender only checksums its
  tensors, then waits for every receiver's "done".
- ring: anything else (casts, gathered DTensors, deferred tensors). The sender packs
  buckets into its ring buffers as for the other transports and publishes "bucket k is in
  slot s" once its packing stream has finished; each receiver copies the bucket out and
  acknowledges it; the sender reuses a slot only when every receiver has acknowledged it.

Handles travel as plain JSON, never pickle: anyone who can write to the store must
not be able to run code in a receiver.
"""

from __future__ import annotations

import hashlib
import json
import logging

from collections.abc import Mapping

import torch

from weightsync.core import BucketPlan, TransferError
from weightsync.dataplane.fused import PendingChecksums, prepare
from weightsync.dataplane.groups import DataPlaneGroup
from weightsync.dataplane.layout import keep_bytes, known_bytes, wire_bytes

__all__ = ["DirectOut", "Ipc", "IpcIn", "IpcOut", "export_buffer", "export_storage", "import_buffer"]

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


def export_storage(t: torch.Tensor) -> tuple[dict, int]:
    """(description of the whole storage holding t, byte offset of t in it), for direct mode."""
    storage = t.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8, device=t.device)
    whole.set_(storage, 0, (storage.nbytes(),), (1,))
    return json.loads(export_buffer(whole)), t.data_ptr() - storage.data_ptr()


def _receiver_ranks(group: DataPlaneGroup) -> range:
    return range(1, group.world_size)


def _sources_key(group: DataPlaneGroup) -> str:
    return f"ipc/{group.round_index}/sources"


class DirectOut:
    """Sender side of direct mode: say where every tensor lies, then wait for every receiver.

    Call it once every write to the tensors is done on the device (torch.cuda.synchronize).

    The layout (exported storages and each tensor's offset) is published once under its own
    digest and reused while the trainer sends from the same memory, as it does when it
    updates its parameters in place: a round then costs one small store key per side.
    """

    def __init__(self, group: DataPlaneGroup, tensors: list[torch.Tensor], state: dict) -> None:
        """`state`: what the group's Ipc keeps for this across rounds (exports, layout digest)."""
        self._group = group
        key = tuple(t.data_ptr() for t in tensors) + tuple(t.numel() for t in tensors)
        if state.get("key") != key:
            self._publish_layout(state, key, tensors)
        # The caller has synchronised the device: receivers read outside any stream ordering.
        group.store.set(_sources_key(group), json.dumps({"mode": "direct", "layout": state["layout"]}))

    def _publish_layout(self, state: dict, key: tuple, tensors: list[torch.Tensor]) -> None:
        # Exports live as long as the group: the storages stay referenced here, so that a
        # receiver's cached mapping never outlives the memory it maps, and an address in
        # `key` cannot be reused by another tensor while the layout stands.
        exports: dict[tuple[int, int], tuple[torch.Tensor, dict]] = state.setdefault("exports", {})
        used: dict[tuple[int, int], int] = {}
        descs: list[dict] = []
        entries: list[list[int]] = []
        for t in tensors:
            storage = t.untyped_storage()
            skey = (storage.data_ptr(), storage.nbytes())
            found = exports.get(skey)
            if found is None:
                desc, _ = export_storage(t)
                exports[skey] = found = (t, desc)
            index = used.get(skey)
            if index is None:
                index = used[skey] = len(descs)
                descs.append(found[1])
            entries.append([index, t.data_ptr() - storage.data_ptr()])
        for skey in [k for k in exports if k not in used]:
            del exports[skey]  # the trainer no longer sends from that storage
        blob = json.dumps({"exports": descs, "entries": entries})
        layout = hashlib.sha256(blob.encode()).hexdigest()[:32]
        old = state.get("layout")
        self._group.store.set(f"ipc/layout/{layout}", blob)
        if old is not None and old != layout:
            self._group.store.delete_key(f"ipc/layout/{old}")
        state.update(key=key, layout=layout)

    def wait_done(self) -> None:
        r = self._group.round_index
        keys = [f"ipc/{r}/done/{rank}" for rank in _receiver_ranks(self._group)]
        self._group.wait_keys(keys, "the receivers' copies out of this process's tensors")
        self._group.forget([_sources_key(self._group), *keys])


class IpcOut:
    """Sender side of ring mode: publishes packed buckets and waits for every receiver's acknowledgement."""

    def __init__(self, group: DataPlaneGroup, ring: list[torch.Tensor], num_buckets: int) -> None:
        self._group = group
        self._num_buckets = num_buckets
        buffers = [json.loads(export_buffer(buf)) for buf in ring]
        group.store.set(_sources_key(group), json.dumps({"mode": "ring", "buffers": buffers}))

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
        self._group.forget([f"ipc/{r}/ready/{k}", *acks])

    def close(self) -> None:
        """Forgets the buffer handles; call once the round is closed and no receiver still looks them up."""
        self._group.forget([_sources_key(self._group)])


def _mapping_key(desc: dict) -> str:
    return f"{desc['handle']}/{desc['storage_offset']}/{desc['storage_bytes']}"


class IpcIn:
    """Receiver side: finds each bucket's bytes in the sender's memory; the stream copies them out.

    Direct mode: `finish` returns each entry's bytes in the trainer's tensors, mapped once
    per storage and kept across rounds while the sender keeps exporting it. Ring mode: it
    returns the slice of the sender's ring slot that holds the bucket, then `copied`
    acknowledges it so that the sender may reuse the slot.
    """

    def __init__(self, group: DataPlaneGroup, plan: BucketPlan, state: dict) -> None:
        """`state`: what the group's Ipc keeps for this across rounds (direct-mode mappings)."""
        self._group = group
        self._state = state
        self._plan = plan
        self._num_buckets = len(plan.buckets)
        self._mode: str | None = None
        self._ring: list[torch.Tensor] = []
        self._entry_sources: list[torch.Tensor] = []
        self._first_entry = [0]
        for bucket in plan.buckets:
            self._first_entry.append(self._first_entry[-1] + len(bucket.entries))

    def _open(self, device: torch.device) -> None:
        key = _sources_key(self._group)
        self._group.wait_keys([key], "the sender's CUDA IPC handles")
        try:
            d = json.loads(self._group.store.get(key))
            self._mode = d["mode"]
            if self._mode == "ring":
                self._ring = [import_buffer(json.dumps(b)) for b in d["buffers"]]
            elif self._mode == "direct":
                self._entry_sources = self._direct_layout(str(d["layout"]))
            else:
                raise ValueError(f"unknown mode {self._mode!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise self._group.fail(f"malformed CUDA IPC source description: {e}") from e
        for src in self._ring or self._entry_sources[:1]:
            if src.device != device:
                raise self._group.fail(f"sender's memory is on {src.device}, this receiver on {device}")

    def _direct_layout(self, layout: str) -> list[torch.Tensor]:
        """Each plan entry's bytes in the sender's memory; mapped once per layout and plan."""
        state = self._state
        key = (layout, self._plan.digest)
        if state.get("key") == key:
            return state["sources"]
        blob_key = f"ipc/layout/{layout}"
        self._group.wait_keys([blob_key], "the sender's tensor layout")
        d = json.loads(self._group.store.get(blob_key))
        sources = self._map_direct(state, d["exports"], d["entries"])
        state.update(key=key, sources=sources)
        return sources

    def _map_direct(self, state: dict, exports: list[dict], entries: list[list[int]]) -> list[torch.Tensor]:
        cache: dict[str, torch.Tensor] = state.setdefault("mappings", {})
        mapped = []
        for desc in exports:
            key = _mapping_key(desc)
            if key not in cache:
                cache[key] = import_buffer(json.dumps(desc))
            mapped.append(cache[key])
        in_use = {_mapping_key(desc) for desc in exports}
        for key in [k for k in cache if k not in in_use]:
            del cache[key]  # the sender stopped exporting it; let the mapping go
        plan_entries = [e for _, e in self._plan.entries()]
        if len(entries) != len(plan_entries):
            raise ValueError(f"{len(entries)} tensor locations for a plan of {len(plan_entries)} tensors")
        sources = []
        for (index, offset), e in zip(entries, plan_entries):
            storage = mapped[int(index)]
            if not 0 <= int(offset) <= storage.numel() - e.nbytes:
                raise ValueError(f"{e.name}: {e.nbytes} bytes at offset {offset} lie outside its {storage.numel()}-byte storage")
            sources.append(storage[int(offset) : int(offset) + e.nbytes])
        return sources

    def start(self, k: int, slot: int, view: torch.Tensor) -> torch.Tensor:
        return view  # nothing to post: the sender publishes, the receiver pulls in finish()

    def finish(self, k: int, view: torch.Tensor) -> list[torch.Tensor]:
        """The source bytes of bucket k's entries, in the sender's memory."""
        if self._mode is None:
            self._open(view.device)
        bucket = self._plan.buckets[k]
        if self._mode == "direct":
            return self._entry_sources[self._first_entry[k] : self._first_entry[k + 1]]
        r = self._group.round_index
        what = f"bucket {k + 1}/{self._num_buckets} over CUDA IPC"
        key = f"ipc/{r}/ready/{k}"
        self._group.wait_keys([key], what)
        slot_text, nbytes_text = self._group.store.get(key).decode().split()
        if int(nbytes_text) != view.numel():
            raise self._group.fail(f"{what}: sender published {nbytes_text} bytes, the plan says {view.numel()}")
        src = self._ring[int(slot_text)]
        return [src[e.offset_bytes : e.offset_bytes + e.nbytes] for e in bucket.entries]

    def copied(self, k: int, device: torch.device) -> None:
        """Bucket k's bytes are out of the sender's memory (queued on the current stream)."""
        if self._mode == "ring":
            # The acknowledgement lets the sender overwrite the slot: the copy must be done first.
            torch.cuda.current_stream(device).synchronize()
            self._group.store.set(f"ipc/{self._group.round_index}/ack/{k}/{self._group.rank}", "")
        elif k == self._num_buckets - 1:
            torch.cuda.current_stream(device).synchronize()
            self._group.store.set(f"ipc/{self._group.round_index}/done/{self._group.rank}", "")

    def close(self) -> None:
        # Ring mappings hold the sender's buffers alive: let go of them every round.
        # Direct-mode mappings stay cached on the group for the next round.
        self._ring = []
        self._entry_sources = []


class Ipc:
    """The cuda_ipc transport (dataplane/transports.py): ring mode, or direct mode when the
    trainer's tensors already are the wire bytes. Keeps, across the group's rounds, what
    direct mode exported, mapped and prepared, and whether CUDA IPC refused to export."""

    device_type = "cuda"
    single_wire = False  # ring mode publishes whole buckets; direct mode needs no bucket at all

    def __init__(self, group: DataPlaneGroup) -> None:
        self._group = group
        self._refused: str | None = None  # why exporting the trainer's memory failed, once
        self._seen: dict = {}  # layout.known_bytes of the trainer's tensors
        self._checksum_key: tuple | None = None
        self._checksums = None  # prepared launch summing the direct sources
        self._out: dict = {}  # DirectOut's exports and layout digest
        self._in: dict = {}  # IpcIn's mappings

    def outbound(self, ring: list[torch.Tensor], num_buckets: int) -> IpcOut:
        return IpcOut(self._group, ring, num_buckets)

    def inbound(self, plan: BucketPlan) -> IpcIn:
        return IpcIn(self._group, plan, self._in)

    def direct_sources(
        self, plan: BucketPlan, source: Mapping[str, object], device: torch.device
    ) -> tuple[list[torch.Tensor], PendingChecksums] | None:
        """Every plan tensor's wire bytes in place and their checksums (queued now: they do not
        depend on the receivers, so the GPU sums while the ranks agree), or None if any needs
        packing (a cast, a gather, a computation) or this group's memory cannot be exported."""
        if self._refused is not None:
            return None
        out = []
        for _, e in plan.entries():
            t = source[e.name]
            raw = known_bytes(self._seen, e.name, t)
            if raw is None:
                if not isinstance(t, torch.Tensor) or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
                    return None
                raw = wire_bytes(t.detach(), e, device)
                if raw is None:
                    return None
                keep_bytes(self._seen, e.name, t, raw)
            out.append(raw)
        # Receivers will read these tensors outside any stream ordering: every write the
        # trainer queued, on any stream, must be done first.
        torch.cuda.synchronize(device)
        key = tuple(t.data_ptr() for t in out) + tuple(t.numel() for t in out)
        if self._checksum_key != key:
            self._checksum_key, self._checksums = key, prepare(out)
        return out, self._checksums.run()

    def direct_out(self, sources: list[torch.Tensor]) -> DirectOut | None:
        try:
            return DirectOut(self._group, sources, self._out)
        except RuntimeError as e:
            # E.g. memory that CUDA IPC cannot export (expandable segments, foreign allocators):
            # this group packs from now on; the receivers have not been told anything yet.
            log.warning("cuda_ipc: cannot export the trainer's tensors (%s); packing them instead", e)
            self._refused = str(e)
            return None
