"""Helpers shared by every op: implementation dispatch and input validation."""

from ops.common.dispatch import NotSupportedError, dispatch, resolve_interpret

__all__ = ["NotSupportedError", "dispatch", "resolve_interpret"]
