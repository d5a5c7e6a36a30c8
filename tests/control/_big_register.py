"""Sends one large (legal) registration: python -m tests.control._big_register ADDRESS NUM_TENSORS; prints 'registered SECONDS'."""

from __future__ import annotations

import sys
import time

import grpc

from weightsync.control.channel import CLIENT_OPTIONS
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc


def main() -> None:
    address, num = sys.argv[1], int(sys.argv[2])
    pad = "p" * 60  # long names, as deep MoE checkpoints have
    inventory = [pb.TensorSpec(name=f"model.layers.{i // 64}.mlp.experts.{i % 64}.{pad}.weight", shape=[128, 64], dtype="bfloat16")
                 for i in range(num)]
    req = pb.RegisterDaemonRequest(daemon_id="big", engine="test", num_ranks=1, transports=["gloo"], inventory=inventory)
    print(f"bytes {req.ByteSize()}", flush=True)
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as ch:
        t0 = time.monotonic()
        pb_grpc.DaemonServiceStub(ch).RegisterDaemon(req, timeout=120)
        print(f"registered {time.monotonic() - t0:.2f}", flush=True)


if __name__ == "__main__":
    main()
