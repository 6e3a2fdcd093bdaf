"""Errors that carry their gRPC status code, so handlers raise and the server builder answers.

Messages are meant for a person: they say what was expected and what to do.
"""

from __future__ import annotations

import grpc


class RiseError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(RiseError):
    """The request itself is wrong (shape, dtype, unknown view, bad value)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RiseError):
    """A named version, alias, model or run does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RiseError):
    """The request is valid but the system is not in a state to do it (e.g. version not loaded)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class CorruptVersion(RiseError):
    """A stored model version does not match its manifest (or has none): never served."""

    code = grpc.StatusCode.DATA_LOSS
