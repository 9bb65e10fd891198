"""Errors the snapshot service raises; each maps to the gRPC status containerd expects."""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class; str() is the message sent to the client."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass
