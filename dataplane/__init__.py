"""weightsync.dataplane: moves tensors along a bucket plan over torch.distributed, and never speaks gRPC.

Trainer (data-plane rank 0):

    store = TrainerStore("10.0.0.5")          # port 0: a free port; pass store.port in BeginUpdate
    groups = GroupCache(trainer_store=store)
    result = send_assignment(assignment, model_state, groups.get(assignment, rank=0))

Receiver (one per inference worker):

    groups = GroupCache()
    group = groups.get(assignment, rank)
    result = receive_assignment(assignment, rank, group, engine.apply)

Any failure raises TransferError (RoundFailed when ranks agreed on it) on every rank.
"""

from weightsync.dataplane.checksum import bytes_checksum, checksum_views, tensor_checksum
from weightsync.dataplane.deferred import DeferredTensor
from weightsync.dataplane.groups import DataPlaneGroup, GroupCache
from weightsync.dataplane.trainer_store import TrainerStore
from weightsync.dataplane.handshake import RoundFailed
from weightsync.dataplane.memory_engine import MemoryEngine, load_named_tensors
from weightsync.dataplane.names import TitanToHF, rotary_permute
from weightsync.dataplane.receiver import ReceiveResult, ReceiveStream, iter_assignment, receive_assignment
from weightsync.dataplane.sender import SendResult, send_assignment

__all__ = [
    "DataPlaneGroup",
    "DeferredTensor",
    "GroupCache",
    "MemoryEngine",
    "ReceiveResult",
    "ReceiveStream",
    "RoundFailed",
    "SendResult",
    "TitanToHF",
    "TrainerStore",
    "bytes_checksum",
    "checksum_views",
    "iter_assignment",
    "load_named_tensors",
    "receive_assignment",
    "rotary_permute",
    "send_assignment",
    "tensor_checksum",
]
