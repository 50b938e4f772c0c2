"""Errors of the stores layer: what callers catch to fall back to local state."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The shared store did not answer usefully (down, frozen, over budget, cooling down, or
    it refused the command). Callers fall back to local state; never shown to clients."""
