"""Domain values shared by the control plane and the data plane: no gRPC, no tensors."""

from weightsync.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TransferError,
    Unauthenticated,
    Unavailable,
    WeightsyncError,
)
from weightsync.core.plan import (
    ALIGN_BYTES,
    DEFAULT_BUCKET_SIZE_BYTES,
    GPU_DEFAULT_BUCKET_SIZE_BYTES,
    Assignment,
    Bucket,
    BucketEntry,
    BucketPlan,
    apply_unit,
    default_bucket_size,
    fusion_key,
)
from weightsync.core.rounds import is_full_round
from weightsync.core.types import Participant, Rendezvous, TensorSpec

__all__ = [
    "ALIGN_BYTES",
    "AlreadyExists",
    "DEFAULT_BUCKET_SIZE_BYTES",
    "GPU_DEFAULT_BUCKET_SIZE_BYTES",
    "Assignment",
    "Bucket",
    "BucketEntry",
    "BucketPlan",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Participant",
    "PermissionDenied",
    "Rendezvous",
    "ResourceExhausted",
    "TensorSpec",
    "TransferError",
    "Unauthenticated",
    "Unavailable",
    "WeightsyncError",
    "apply_unit",
    "default_bucket_size",
    "fusion_key",
    "is_full_round",
]
