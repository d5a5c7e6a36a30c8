"""weightsync.control."""
