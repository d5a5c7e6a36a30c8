"""weightsync.engine."""
