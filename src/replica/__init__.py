"""A replica: one model in one process, served over gRPC with streaming generation."""
