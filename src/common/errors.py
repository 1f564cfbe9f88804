"""The few named exception types every role raises, and how each maps to gRPC and HTTP."""
from __future__ import annotations

import grpc


class GridserveError(Exception):
    """Base of every error gridserve raises on purpose. `message` is shown to users as is."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    error_type = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# Recoverable: the request fails, the process goes on serving.

class InvalidRequest(GridserveError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    error_type = "invalid_request_error"


class NotFound(GridserveError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "not_found_error"


class Overloaded(GridserveError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "overloaded_error"


class Unavailable(GridserveError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "service_unavailable"


class Cancelled(GridserveError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499
    error_type = "cancelled"


# Fatal: the process cannot do its job with what it was given; restarting will not help.

class FatalError(GridserveError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 500
    error_type = "fatal_error"


class ConfigError(FatalError):
    """A config file or flag is wrong; the message names the field."""


class ModelLoadError(FatalError):
    """The model named by a config cannot be loaded (missing package, no hub access, bad files)."""


# How a failed gRPC call is shown to an HTTP client.
GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "overloaded_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (500, "internal_error"),
}


def http_from_grpc(code: grpc.StatusCode) -> tuple[int, str]:
    return GRPC_TO_HTTP.get(code, (502, "upstream_error"))
