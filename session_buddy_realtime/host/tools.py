"""The MCP tools: ``realtime_start``, ``realtime_stop``, ``realtime_status``, ``realtime_snapshot``.

The plugin's only module that imports ``mcp`` (the stdio host does too). Tools work on any
server object with the ``tool(...)`` decorator factory: mcp's ``MCPServer`` (mcp 2.x) or
``FastMCP`` (mcp 1.x), and the standalone FastMCP (3.x on mcp 1.x, 4.x on mcp 2.x). Outputs
are typed models (structured output). Inputs publish their types and ranges in the input
schema, but the tools check them themselves (``tool_arguments``) rather than leave it to the
server, so that a client reads one line naming the argument and what it accepts, the same on
every server kind. Arguments a tool does not take are refused by name where the server shows
them (see ``_Registrar``). Expected failures are raised as the server's own ``ToolError``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar, cast

from mcp.types import ToolAnnotations

from session_buddy_realtime.errors import RealtimeError
from session_buddy_realtime.host.service import RealtimeService
from session_buddy_realtime.host.tool_arguments import (
    ArgumentError,
    HostName,
    Interval,
    Port,
    RedisUrl,
    SkillName,
    check_host,
    check_interval,
    check_port,
    check_redis,
    check_skill,
    not_applied,
    unknown_arguments,
)
from session_buddy_realtime.host.tool_models import (
    Anomaly,
    RealtimeSnapshot,
    RealtimeStatus,
    SkillRow,
)
from session_buddy_realtime.protocol import ProtocolError

__all__ = [
    "TOOL_NAMES",
    "Anomaly",
    "RealtimeSnapshot",
    "RealtimeStatus",
    "SkillRow",
    "ToolServer",
    "register_tools",
]

START: Final = "realtime_start"
STOP: Final = "realtime_stop"
STATUS: Final = "realtime_status"
SNAPSHOT: Final = "realtime_snapshot"
TOOL_NAMES: Final = (START, STOP, STATUS, SNAPSHOT)

R = TypeVar("R")


def _annotations(title: str, *, read_only: bool, idempotent: bool) -> ToolAnnotations:
    # Built from the wire names so that both the mcp 1.x and 2.x models accept them.
    return ToolAnnotations.model_validate(
        {
            "title": title,
            "readOnlyHint": read_only,
            "destructiveHint": False,
            "idempotentHint": idempotent,
            "openWorldHint": False,
        }
    )


def _is_standalone_fastmcp(mcp: object) -> bool:
    return any(cls.__module__.split(".")[0] == "fastmcp" for cls in type(mcp).__mro__)


def _tool_error_class(mcp: object) -> type[Exception]:
    """The exception whose message the given server passes on to the client."""
    if _is_standalone_fastmcp(mcp):
        from fastmcp.exceptions import ToolError as StandaloneToolError

        return StandaloneToolError
    try:
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:  # mcp 1.x
        from mcp.server.fastmcp.exceptions import (  # type: ignore[no-redef,import-not-found,unused-ignore]
            ToolError,
        )
    return ToolError


def _mcpserver_context_class(mcp: object) -> type[Any] | None:
    """mcp 2.x's ``Context`` if ``mcp`` is an ``MCPServer``: it shows a tool its raw arguments."""
    try:
        from mcp.server.mcpserver import Context, MCPServer
    except ImportError:  # mcp 1.x: its FastMCP shows a tool no raw arguments
        return None
    return Context if isinstance(mcp, MCPServer) else None


_CONTEXT: Final = "realtime_call_context"


class ToolServer(Protocol):
    """Any MCP server with the ``tool(...)`` decorator factory."""

    def tool(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], object]: ...


_ToolFunction = TypeVar("_ToolFunction", bound=Callable[..., Awaitable[Any]])


class _Registrar:
    """Adds tools to one server: errors as its ``ToolError``, unknown arguments refused.

    How an argument a tool does not take is seen depends on the server. The standalone
    FastMCP refuses it itself, with pydantic's text, before the tool runs, so a middleware
    answers first, by name. mcp 2.x's ``MCPServer`` drops it, but shows a tool that asks for
    its ``Context`` the call's raw arguments. mcp 1.x's ``FastMCP`` drops it and shows it
    nowhere public, so there it stays ignored.
    """

    def __init__(self, mcp: ToolServer) -> None:
        self._mcp = mcp
        self._error = _tool_error_class(mcp)
        self._accepted: dict[str, tuple[str, ...]] = {}
        self._context = _mcpserver_context_class(mcp)
        if _is_standalone_fastmcp(mcp):
            cast(Any, mcp).add_middleware(_refusing_middleware(self._accepted, self._error))

    def tool(
        self, name: str, *, description: str, annotations: ToolAnnotations
    ) -> Callable[[_ToolFunction], _ToolFunction]:
        """Register the decorated function as the tool ``name``."""

        def register(function: _ToolFunction) -> _ToolFunction:
            self._accepted[name] = tuple(inspect.signature(function).parameters)
            self._mcp.tool(name=name, description=description, annotations=annotations)(
                self._wrap(name, function)
            )
            return function

        return register

    def _wrap(
        self, name: str, function: Callable[..., Awaitable[R]]
    ) -> Callable[..., Awaitable[R]]:
        error, context, accepted = self._error, self._context, self._accepted[name]

        @functools.wraps(function)
        async def run(**arguments: Any) -> R:
            try:
                if context is not None:
                    raw = _raw_arguments(name, arguments.pop(_CONTEXT))
                    if refused := unknown_arguments(name, raw, accepted):
                        raise ArgumentError(refused)
                return await function(**arguments)
            except (ArgumentError, RealtimeError, ProtocolError) as exc:
                raise error(str(exc)) from exc

        if context is not None:
            # The server fills this keyword-only parameter and leaves it out of the schema.
            signature = inspect.signature(function, eval_str=True)
            hidden = inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=context)
            run.__signature__ = signature.replace(  # type: ignore[attr-defined]
                parameters=[*signature.parameters.values(), hidden]
            )
            run.__annotations__ = {**function.__annotations__, _CONTEXT: context}
        return run


def _raw_arguments(tool: str, context: Any) -> Mapping[str, object]:
    """The arguments the client sent to ``tool``, from mcp 2.x's ``Context``; {} if unknown."""
    try:
        params = context.request_context.params
    except ValueError:  # called in-process, outside any request
        return {}
    # A tool called from inside another tool's request sees that request's parameters.
    if not isinstance(params, Mapping) or params.get("name") != tool:
        return {}
    arguments = params.get("arguments")
    return arguments if isinstance(arguments, Mapping) else {}


def _refusing_middleware(accepted: Mapping[str, Sequence[str]], error: type[Exception]) -> object:
    """A standalone-FastMCP middleware refusing unknown arguments to the tools in ``accepted``."""
    from fastmcp.server.middleware import Middleware

    class RefuseUnknownArguments(Middleware):
        async def on_call_tool(self, context: Any, call_next: Any) -> Any:
            name, arguments = context.message.name, context.message.arguments
            refused = name in accepted and unknown_arguments(name, arguments or {}, accepted[name])
            if refused:
                raise error(refused)
            return await call_next(context)

    return RefuseUnknownArguments()


def register_tools(mcp: ToolServer, service: RealtimeService) -> None:
    """Add the four realtime tools to ``mcp`` (any server with ``tool(...)``)."""
    tool = _Registrar(mcp).tool

    @tool(
        START,
        description="Start the realtime WebSocket server that streams live skill metrics to "
        "dashboards, reading the host's skills database (with redis_url it also publishes the "
        "stream through Redis for edges). Returns the status. When already "
        "running, returns the running status; its note names any argument that differs from "
        "the running server's and was not applied (stop, then start, to apply it).",
        annotations=_annotations("Start realtime metrics", read_only=False, idempotent=True),
    )
    async def realtime_start(
        host: HostName = None,
        port: Port = None,
        interval: Interval = None,
        redis_url: RedisUrl = None,
    ) -> RealtimeStatus:
        wanted = (
            check_host(host),
            check_port(port),
            check_interval(interval),
            check_redis(redis_url),
        )
        status = await service.start(*wanted)
        if note := not_applied(status, *wanted):
            status["note"] = note if status["note"] is None else f"{note}; {status['note']}"
        return RealtimeStatus.model_validate(status)

    @tool(
        STOP,
        description="Stop the realtime WebSocket server, closing dashboard connections. "
        "Harmless when it is not running. Returns the status.",
        annotations=_annotations("Stop realtime metrics", read_only=False, idempotent=True),
    )
    async def realtime_stop() -> RealtimeStatus:
        return RealtimeStatus.model_validate(await service.stop())

    @tool(
        STATUS,
        description="Report whether the realtime server runs, its URLs, uptime, interval, "
        "connected clients and their subscriptions, counters, last tick, last error, and the "
        "database state.",
        annotations=_annotations("Realtime metrics status", read_only=True, idempotent=True),
    )
    async def realtime_status() -> RealtimeStatus:
        return RealtimeStatus.model_validate(service.status())

    @tool(
        SNAPSHOT,
        description="Read the live skill metrics now, exactly as a dashboard would receive "
        "them: the top 10 skills (or one skill) with completion rates and durations, and "
        "current anomalies. Needs the server running.",
        annotations=_annotations("Realtime metrics snapshot", read_only=True, idempotent=True),
    )
    async def realtime_snapshot(skill: SkillName = None) -> RealtimeSnapshot:
        return RealtimeSnapshot.model_validate(await service.snapshot(check_skill(skill)))
