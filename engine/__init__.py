"""weightsync.engine: the vLLM side. Receives weights from the data plane and applies them to a live engine.

vLLM is imported lazily (inside methods), so these modules import with only torch
and transformers installed.
"""

from weightsync.engine.extension import EXTENSION_CLS, WeightsyncWorkerExtension
from weightsync.engine.inventory import apply_unit, check_update, inventory_from_config, inventory_from_model_dir
from weightsync.engine.models import make_tiny_model, random_weights
from weightsync.engine.payload import assignment_from_dict, assignment_to_dict, decode_tensors, encode_tensors
from weightsync.engine.vllm_engine import ApplyReport, VllmEngine, VllmEngineConfig

__all__ = [
    "EXTENSION_CLS",
    "ApplyReport",
    "VllmEngine",
    "VllmEngineConfig",
    "WeightsyncWorkerExtension",
    "apply_unit",
    "assignment_from_dict",
    "assignment_to_dict",
    "check_update",
    "decode_tensors",
    "encode_tensors",
    "inventory_from_config",
    "inventory_from_model_dir",
    "make_tiny_model",
    "random_weights",
]
