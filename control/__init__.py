"""The gRPC control plane: coordinator, daemon agent and trainer client. Never touches tensors."""

from weightsync.control.coordinator import Coordinator, CoordinatorConfig
from weightsync.control.daemon_agent import DaemonAgent, DaemonIdentity, HandlerResult, UpdateHandler
from weightsync.control.server import CoordinatorServer
from weightsync.control.trainer_client import DaemonVerdict, RoundFailed, RoundReport, SyncTrainerClient, TrainerClient

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorServer",
    "DaemonAgent",
    "DaemonIdentity",
    "DaemonVerdict",
    "HandlerResult",
    "RoundFailed",
    "RoundReport",
    "SyncTrainerClient",
    "TrainerClient",
    "UpdateHandler",
]
