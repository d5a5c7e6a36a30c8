"""Frozen domain values. Protobuf converts to these at the gRPC boundary only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from weightsync.core.dtypes import DTYPE_ITEMSIZE, itemsize

__all__ = ["TensorSpec", "Rendezvous", "Participant", "TRANSPORTS"]

TRANSPORTS = ("gloo", "nccl", "cuda_ipc")
MAX_NAME_LENGTH = 1024
MAX_RANK = 1 << 20


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor by Hugging Face checkpoint name, shape and wire dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("tensor name must be a non-empty string")
        if len(self.name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"tensor name {self.name[:40]!r}... is {len(self.name)} characters: "
                f"expected at most {MAX_NAME_LENGTH}"
            )
        if not self.name.isprintable():
            raise ValueError(f"tensor name {self.name!r} has non-printable characters")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        bad = [d for d in self.shape if d < 0]
        if bad:
            raise ValueError(
                f"tensor {self.name!r}: shape {list(self.shape)} has negative dims: "
                "expected every dim >= 0"
            )
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(
                f"tensor {self.name!r}: unknown dtype {self.dtype!r}: expected one of "
                f"{sorted(DTYPE_ITEMSIZE)}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """Where data-plane ranks meet. group_id stays the same while membership does."""

    transport: str
    host: str
    port: int
    world_size: int
    group_id: str
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r}: expected one of {TRANSPORTS}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"rendezvous port {self.port}: expected 0..65535")
        if self.world_size < 2 and self.transport != "cuda_ipc":
            raise ValueError(f"world_size {self.world_size}: expected at least 2 (a sender and a receiver)")
        if self.timeout_s <= 0:
            raise ValueError(f"collective timeout_s {self.timeout_s}: expected > 0")


ENCODINGS = ("dense", "delta")


@dataclass(frozen=True, slots=True)
class Participant:
    """A daemon in a round and the data-plane ranks of its receivers."""

    daemon_id: str
    ranks: tuple[int, ...] = field(default_factory=tuple)
    # How this daemon's bytes travel: "dense" (whole tensors) or "delta" (the changes against
    # the assignment's delta_base_version, which this daemon holds exactly).
    encoding: str = "dense"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.daemon_id:
            raise ValueError("participant daemon_id must be non-empty")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"participant {self.daemon_id!r}: encoding {self.encoding!r}: expected one of {ENCODINGS}")
        if any(not 0 < r < MAX_RANK for r in self.ranks):
            raise ValueError(
                f"participant {self.daemon_id!r}: ranks {list(self.ranks)}: expected 1..{MAX_RANK - 1} "
                "(rank 0 is the trainer)"
            )
