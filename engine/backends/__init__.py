"""Assistants behind one small interface (`base.Backend`): vapi, local, and for benchmarks echo
and canned."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.backends.base import Backend, BackendFactory


def backend_factory(name: str, **options: Any) -> "BackendFactory":
    """The factory for a backend by name ("vapi", "local", "echo", "canned")."""
    if name == "echo":
        from engine.backends.echo import EchoBackend

        return EchoBackend.factory(**options)
    if name == "canned":
        from engine.backends.canned import CannedBackend

        return CannedBackend.factory(**options)
    if name == "local":
        from engine.backends.local import LocalBackend

        return LocalBackend.factory(**options)
    if name == "vapi":
        from engine.backends.vapi import VapiBackend

        return VapiBackend.factory(**options)
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["Backend", "BackendFactory", "backend_factory"]
