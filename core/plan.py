"""The bucket plan: which tensor sits at which offset of which bucket.

The coordinator computes it once and sends the same plan to the trainer and to
every daemon, so the two sides of the data plane cannot disagree on layout.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from weightsync.core.routing import RoutingPlan
from weightsync.core.types import Participant, Rendezvous, TensorSpec

__all__ = [
    "ALIGN_BYTES",
    "DEFAULT_BUCKET_SIZE_BYTES",
    "GPU_DEFAULT_BUCKET_SIZE_BYTES",
    "default_bucket_size",
    "Assignment",
    "Bucket",
    "BucketEntry",
    "BucketPlan",
    "apply_unit",
    "fusion_key",
]

# 256 B keeps every tensor view aligned for int64 checksum views and vector loads.
ALIGN_BYTES = 256
# Chosen by bench/transfer.py (BENCHMARKS.md): on gloo no size from 16 MiB to 256 MiB beat
# another beyond the run-to-run spread, and two 256 MiB buckets stay cheap in host memory.
DEFAULT_BUCKET_SIZE_BYTES = 256 << 20
# GPU transports gain from larger buckets (Llama-8B over NCCL on two H200s: e2e / raw 0.90 at
# 1 GiB against 0.79 at 256 MiB); two 1 GiB buffers per rank is what vLLM's own NCCL weight
# transfer holds too.
GPU_DEFAULT_BUCKET_SIZE_BYTES = 1 << 30


def default_bucket_size(transport: str) -> int:
    """The bucket size a round gets when the trainer asks for none: 1 GiB on nccl and cuda_ipc, else 256 MiB."""
    return GPU_DEFAULT_BUCKET_SIZE_BYTES if transport in ("nccl", "cuda_ipc") else DEFAULT_BUCKET_SIZE_BYTES

# vLLM fuses these into one parameter; a partial write of the group corrupts
# its siblings, so members of one group always travel and apply together.
_FUSION_PATTERNS = (
    (re.compile(r"\.(q_proj|k_proj|v_proj)\."), ".qkv_proj."),
    (re.compile(r"\.(gate_proj|up_proj)\."), ".gate_up_proj."),
    (re.compile(r"\.(w1|w3)\."), ".w13."),
)
# Per-expert checkpoint names (Hugging Face: experts.{e}.gate_proj/up_proj/down_proj,
# Mixtral: experts.{e}.w1/w3/w2) land in one FusedMoE module per layer, whose
# parameters stack every expert: w13_<param> (gate and up) and w2_<param> (down).
_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.\d+\.(?P<proj>[^.]+)\.(?P<param>[^.]+)$")
_EXPERT_PARAM = {"gate_proj": "w13", "up_proj": "w13", "w1": "w13", "w3": "w13", "down_proj": "w2", "w2": "w2"}


def fusion_key(name: str) -> str:
    """Tensors with equal keys are fused by vLLM into one parameter."""
    expert = _EXPERT.match(name)
    if expert is not None:
        fused = _EXPERT_PARAM.get(expert["proj"], expert["proj"])
        return f"{expert['layer']}.{fused}_{expert['param']}"
    for pattern, replacement in _FUSION_PATTERNS:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


def apply_unit(name: str) -> str:
    """The engine module a checkpoint tensor lands in: its tensors travel and apply together.

    vLLM rebuilds a module only once all of its tensors have arrived; a module that got
    part of them is rebuilt from uninitialised memory for the rest. So q/k/v weights and
    biases form one unit (qkv_proj), gate/up another, every module's weight and bias
    go together, and a MoE layer's experts (every expert's gate, up and down) form one
    unit: vLLM's FusedMoE holds them all in two parameters of one module, and a partial
    expert set corrupts the experts left out (tests/engine/test_moe.py shows it).
    engine/loader_check.py checks this rule against each served model's real loader.
    """
    return fusion_key(name).rpartition(".")[0] or name


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


@dataclass(frozen=True, slots=True)
class BucketEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset_bytes: int
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype)


@dataclass(frozen=True, slots=True)
class Bucket:
    index: int
    size_bytes: int
    entries: tuple[BucketEntry, ...]

    def __post_init__(self) -> None:
        for e in self.entries:
            if e.offset_bytes < 0 or e.offset_bytes + e.nbytes > self.size_bytes:
                raise ValueError(
                    f"bucket {self.index}: entry {e.name!r} at [{e.offset_bytes}, "
                    f"{e.offset_bytes + e.nbytes}) lies outside the bucket of {self.size_bytes} bytes"
                )


@dataclass(frozen=True, slots=True)
class BucketPlan:
    buckets: tuple[Bucket, ...]
    total_bytes: int
    digest: str

    @classmethod
    def build(cls, manifest: Sequence[TensorSpec], bucket_size_bytes: int = DEFAULT_BUCKET_SIZE_BYTES) -> "BucketPlan":
        """Packs tensors in manifest order, keeping each apply unit inside one bucket.

        A unit larger than bucket_size_bytes gets a bucket of its own size.
        """
        if bucket_size_bytes < ALIGN_BYTES:
            raise ValueError(f"bucket_size_bytes {bucket_size_bytes}: expected at least {ALIGN_BYTES}")
        groups: dict[str, list[TensorSpec]] = {}
        for spec in manifest:
            groups.setdefault(apply_unit(spec.name), []).append(spec)
        buckets: list[Bucket] = []
        current: list[BucketEntry] = []
        used = 0

        def close() -> None:
            nonlocal current, used
            if current:
                buckets.append(Bucket(len(buckets), max(used, 1), tuple(current)))
            current, used = [], 0

        for specs in groups.values():
            group_bytes = sum(_align(s.nbytes) for s in specs)
            if current and used + group_bytes > bucket_size_bytes:
                close()
            for s in specs:
                current.append(BucketEntry(s.name, s.shape, s.dtype, used, s.nbytes))
                used += _align(s.nbytes)
        close()
        total = sum(b.size_bytes for b in buckets)
        return cls(tuple(buckets), total, _digest(buckets))

    @classmethod
    def from_buckets(cls, buckets: Sequence[Bucket], digest: str | None = None) -> "BucketPlan":
        """Rebuilds a received plan and checks its digest, so a damaged plan is refused."""
        actual = _digest(buckets)
        if digest is not None and digest != actual:
            raise ValueError(f"bucket plan digest {digest!r} does not match its contents ({actual!r})")
        return cls(tuple(buckets), sum(b.size_bytes for b in buckets), actual)

    def entries(self) -> Iterator[tuple[Bucket, BucketEntry]]:
        for bucket in self.buckets:
            for entry in bucket.entries:
                yield bucket, entry

    @property
    def num_tensors(self) -> int:
        return sum(len(b.entries) for b in self.buckets)

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for _, e in self.entries())

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.size_bytes for b in self.buckets), default=0)


def _digest(buckets: Sequence[Bucket]) -> str:
    canon = [
        [b.index, b.size_bytes, [[e.name, list(e.shape), e.dtype, e.offset_bytes, e.nbytes] for e in b.entries]]
        for b in buckets
    ]
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Assignment:
    """One round as the data plane sees it: identical for the trainer and every daemon."""

    update_id: str
    version: int
    rendezvous: Rendezvous
    participants: tuple[Participant, ...]
    plan: BucketPlan
    deadline_s: float
    # The version a delta is encoded against; None: every participant gets dense.
    delta_base_version: int | None = None
    # A routed round (core/routing.py): trainer ranks 0..S-1 each send the pieces they hold to
    # the receivers that need them. None: rank 0 sends every tensor to every receiver.
    routing: RoutingPlan | None = None

    def __post_init__(self) -> None:
        if self.routing is not None:
            low = [r for r in self.receiver_ranks if r < self.routing.num_senders]
            if low:
                raise ValueError(
                    f"update {self.update_id}: receiver ranks {low} overlap the {self.routing.num_senders} "
                    f"trainer ranks: expected receivers from rank {self.routing.num_senders} on"
                )
        if self.delta_base_version is None and any(p.encoding != "dense" for p in self.participants):
            raise ValueError(f"update {self.update_id}: a participant takes a delta but delta_base_version is not set")
        if self.delta_base_version is not None and not 0 <= self.delta_base_version < self.version:
            raise ValueError(
                f"update {self.update_id}: delta_base_version {self.delta_base_version}: expected 0..{self.version - 1}"
            )

    @property
    def digest(self) -> str:
        """What every rank must agree on: the plan, and for a delta round who takes the delta against which base."""
        if self.routing is not None:
            canon = [self.plan.digest, "routed", self.routing.digest]
            if self.delta_base_version is not None:
                # A routed delta round: every sender frames a delta rank's pieces differently.
                canon += [self.delta_base_version, [[p.daemon_id, p.encoding] for p in self.participants]]
            return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()[:32]
        if self.delta_base_version is None:
            return self.plan.digest  # a dense round: unchanged from before deltas existed
        canon = [self.plan.digest, self.delta_base_version, [[p.daemon_id, p.encoding] for p in self.participants]]
        return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()[:32]

    @property
    def num_senders(self) -> int:
        """Trainer ranks that send in this round: data-plane ranks 0..num_senders-1."""
        return self.routing.num_senders if self.routing is not None else 1

    def encoding_of_rank(self, rank: int) -> str:
        for p in self.participants:
            if rank in p.ranks:
                return p.encoding
        raise KeyError(f"rank {rank} is not a receiver of update {self.update_id}")

    @property
    def delta_ranks(self) -> tuple[int, ...]:
        return tuple(r for p in self.participants if p.encoding == "delta" for r in p.ranks)

    @property
    def dense_ranks(self) -> tuple[int, ...]:
        return tuple(r for p in self.participants if p.encoding == "dense" for r in p.ranks)

    def ranks_of(self, daemon_id: str) -> tuple[int, ...]:
        for p in self.participants:
            if p.daemon_id == daemon_id:
                return p.ranks
        raise KeyError(f"daemon {daemon_id!r} is not a participant of update {self.update_id}")

    @property
    def receiver_ranks(self) -> tuple[int, ...]:
        return tuple(r for p in self.participants for r in p.ranks)
