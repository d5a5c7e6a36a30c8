"""weightsync: verified, bucketed weight updates from an RL trainer into live vLLM engines."""

__version__ = "0.1.0"
