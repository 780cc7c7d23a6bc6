"""Assistants behind one small interface (`base.Backend`): vapi, local, echo."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.backends.base import Backend, BackendFactory


def backend_factory(name: str, **options: Any) -> "BackendFactory":
    """The factory for a backend by name ("echo", "local", "vapi")."""
    if name == "echo":
        from engine.backends.echo import EchoBackend

        return EchoBackend.factory(**options)
    if name == "local":
        from engine.backends.local import LocalBackend

        return LocalBackend.factory(**options)
    if name == "vapi":
        from engine.backends.vapi import VapiBackend

        return VapiBackend.factory(**options)
    raise ValueError(f"unknown backend {name!r}")


__all__ = ["Backend", "BackendFactory", "backend_factory"]
