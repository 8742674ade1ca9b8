"""Operator actions (API, admin, scenario runner): thin, validated entry points into
the engine. Each commits its state change with its event."""

from __future__ import annotations


class ActionError(ValueError):
    """An action that cannot be done as asked; the message says why (API: 400/409)."""
