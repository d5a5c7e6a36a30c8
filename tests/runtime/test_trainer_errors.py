"""The trainer's abort reason names daemons, not only data-plane ranks."""

from weightsync.core import Assignment, BucketPlan, Participant, Rendezvous, TensorSpec
from weightsync.dataplane import RoundFailed
from weightsync.runtime.trainer import _describe_failure


def test_failure_names_the_daemon_behind_each_rank():
    """A data-plane failure on rank 2 is reported as the daemon that hosts rank 2."""
    a = Assignment("u1", 3, Rendezvous("gloo", "127.0.0.1", 1234, 3, "g"),
                   (Participant("engine-a", (1,)), Participant("engine-b", (2,))),
                   BucketPlan.build([TensorSpec("w", (4,), "float32")]), 10.0)
    text = _describe_failure(RoundFailed("u1", "transfer", {2: "connection reset"}), a)
    assert text == "transfer failed: engine-b (rank 2): connection reset"
    assert _describe_failure(ValueError("bad shape"), a) == "ValueError: bad shape"
