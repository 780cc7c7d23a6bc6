"""The tools the assistant can call (VAPI `tool-calls` server messages), registered by decorator.

    @tool("check_availability", description="...", parameters={...})
    def check_availability(arguments: dict[str, Any]) -> str: ...

A handler takes the call's arguments dict and, optionally, a `ToolContext` as a second argument;
it may be sync or async. It returns a string (the result VAPI hands to the model), a `ToolResult`
(a string plus a request such as a transfer), or anything JSON-serialisable (sent as JSON text). It
fails by raising: `ToolError` carries a message meant for the model; any other exception is logged
and reported as "<name> failed". Sync handlers run on the event loop and must be quick; slow work
belongs in an async handler.

`definitions()` lists the registered tools in VAPI's function-tool shape, for an inline assistant.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.config import Settings
from engine.log import get_logger

log = get_logger("tools")

#: how long one tool may take before its call fails (VAPI itself waits about 20 s)
DEFAULT_TIMEOUT_S = 10.0


class ToolError(Exception):
    """A failure whose message is fit to show the model (and through it, the caller)."""


@dataclass(frozen=True)
class ToolContext:
    """What a handler may know about the call that asked."""

    settings: Settings  #: the engine's settings
    call_id: str | None = None  #: VAPI's call id, when the message had one
    tool_call_id: str | None = None  #: VAPI's id of this tool call


@dataclass(frozen=True)
class ToolResult:
    """A result plus what the engine should do about the live call."""

    text: str  #: the result the model sees
    transfer_to: str | None = None  #: hand the caller to this number (E.164)


@dataclass(frozen=True)
class ToolOutcome:
    """One finished tool call, as the webhook answers it."""

    tool_call_id: str
    name: str
    result: str | None = None  #: set on success
    error: str | None = None  #: set on failure
    transfer_to: str | None = None

    def as_vapi(self) -> dict[str, str]:
        out = {"toolCallId": self.tool_call_id, "name": self.name}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["result"] = self.result or ""
        return out


Handler = Callable[..., Any]


@dataclass(frozen=True)
class Tool:
    name: str
    handler: Handler
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout_s: float = DEFAULT_TIMEOUT_S
    wants_context: bool = False  #: the handler takes a `ToolContext` second argument

    def definition(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def tool(
        self,
        name: str,
        *,
        description: str = "",
        parameters: dict[str, Any] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Callable[[Handler], Handler]:
        """Registers the decorated function under `name` (a later registration replaces it)."""

        def register(fn: Handler) -> Handler:
            positional = [
                p for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self._tools[name] = Tool(
                name, fn, description or (inspect.getdoc(fn) or "").split("\n")[0],
                parameters or {"type": "object", "properties": {}}, timeout_s,
                wants_context=len(positional) >= 2,
            )
            return fn

        return register

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def definitions(self) -> list[dict[str, Any]]:
        return [self._tools[name].definition() for name in self.names()]

    async def call(
        self, name: str, arguments: Any, context: ToolContext, tool_call_id: str = ""
    ) -> ToolOutcome:
        """Runs one tool call; never raises (failures become `ToolOutcome.error`)."""
        tool = self._tools.get(name)
        if tool is None:
            return ToolOutcome(tool_call_id, name, error=f"unknown tool: {name}")
        if isinstance(arguments, str):
            # OpenAI-style providers send the arguments as a JSON string.
            try:
                arguments = orjson.loads(arguments) if arguments.strip() else {}
            except orjson.JSONDecodeError:
                return ToolOutcome(tool_call_id, name, error="arguments are not valid JSON")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return ToolOutcome(tool_call_id, name, error="arguments must be an object")
        try:
            if tool.wants_context:
                value = tool.handler(arguments, context)
            else:
                value = tool.handler(arguments)
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, tool.timeout_s)
        except ToolError as exc:
            return ToolOutcome(tool_call_id, name, error=str(exc) or f"{name} failed")
        except TimeoutError:
            log.warning("tool.timeout", tool=name, timeout_s=tool.timeout_s)
            return ToolOutcome(tool_call_id, name, error=f"{name} timed out")
        except Exception:
            log.exception("tool.failed", tool=name)
            return ToolOutcome(tool_call_id, name, error=f"{name} failed")
        if isinstance(value, ToolResult):
            return ToolOutcome(tool_call_id, name, result=value.text, transfer_to=value.transfer_to)
        if isinstance(value, str):
            return ToolOutcome(tool_call_id, name, result=value)
        try:
            return ToolOutcome(tool_call_id, name, result=orjson.dumps(value).decode())
        except TypeError:
            log.error("tool.bad_result", tool=name, type=type(value).__name__)
            return ToolOutcome(tool_call_id, name, error=f"{name} failed")


#: the engine's tools; `engine.webhooks` answers `tool-calls` from here
REGISTRY = ToolRegistry()
tool = REGISTRY.tool


# ---------------------------------------------------------------------------------------------
# The demo's tools
# ---------------------------------------------------------------------------------------------

#: the help desk's week, as the shipped assistant.toml states it: (opens, closes) or None
OPENING_HOURS: dict[str, tuple[str, str] | None] = {
    "monday": ("9:00", "18:00"),
    "tuesday": ("9:00", "18:00"),
    "wednesday": ("9:00", "18:00"),
    "thursday": ("9:00", "18:00"),
    "friday": ("9:00", "18:00"),
    "saturday": ("10:00", "14:00"),
    "sunday": None,
}


@tool(
    "check_availability",
    description="Whether the help desk is open on a day of the week, and its hours that day.",
    parameters={
        "type": "object",
        "properties": {"day": {"type": "string", "description": "a day of the week, e.g. Tuesday"}},
        "required": ["day"],
    },
)
def check_availability(arguments: dict[str, Any]) -> str:
    day = arguments.get("day")
    if not isinstance(day, str) or not day.strip():
        raise ToolError("which day? Give a day of the week")
    key = day.strip().lower()
    # Accept "tue", "Tues", "tuesday" alike.
    matches = [name for name in OPENING_HOURS if len(key) >= 3 and name.startswith(key[:3])]
    if len(matches) != 1:
        raise ToolError(f"unknown day: {day}")
    name = matches[0]
    hours = OPENING_HOURS[name]
    if hours is None:
        return f"We are closed on {name.capitalize()}."
    return f"We are open on {name.capitalize()} from {hours[0]} to {hours[1]}."


@tool(
    "transfer_call",
    description="Hand the caller to a person at the help desk.",
    parameters={"type": "object", "properties": {}},
)
def transfer_call(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
    number = context.settings.transfer_number
    if not number:
        raise ToolError("nobody is available to take the call; offer to help another way")
    return ToolResult("Transferring the caller now.", transfer_to=number)
