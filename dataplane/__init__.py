"""weightsync.dataplane."""
