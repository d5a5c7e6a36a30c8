"""A trainer process that stalls in the middle of a delta round, for a test to SIGKILL it there.

    python -m tests.engine._delta_trainer COORDINATOR NEW BASE BASE_VERSION VERSION MARKER

It pushes NEW (a safetensors file) as a delta against BASE (the tensors of BASE_VERSION).
The final norm (its own apply unit, so its own place in the plan) goes last and is computed
only when the sender reaches it: it touches MARKER (every earlier bucket is on the wire by
then) and then never returns.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from weightsync.dataplane import DeferredTensor
from weightsync.runtime.trainer import WeightSync


def main() -> None:
    coordinator, new_path, base_path, base_version, version, marker = sys.argv[1:7]
    logging.basicConfig(level=logging.INFO)
    new = load_file(new_path)
    last = "model.norm.weight"
    tensor = new.pop(last)

    def stall():
        Path(marker).touch()
        time.sleep(3600)
        return tensor

    new[last] = DeferredTensor(tuple(tensor.shape), tensor.dtype, stall)
    with WeightSync(coordinator, bucket_size_bytes=64 << 10, collective_timeout_s=20, deadline_s=120) as sync:
        sync.push(new, version=int(version), base=load_file(base_path), base_version=int(base_version))


if __name__ == "__main__":
    main()
