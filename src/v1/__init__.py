"""Generated gRPC code for protos/gridserve/v1 (built by `make protos`, not committed)."""
