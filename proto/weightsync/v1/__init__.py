"""Generated protobuf and gRPC code for the weightsync.v1 protocol."""
