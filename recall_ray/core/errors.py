"""Errors that name the problem and its fix, shared by the pure core and the I/O around it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A model file that cannot be used as it is, with the file named and the fix."""
