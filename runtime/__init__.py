"""weightsync.runtime."""
