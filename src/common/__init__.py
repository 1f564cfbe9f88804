"""Pieces shared by every role: config, errors, gRPC helpers, logging."""
